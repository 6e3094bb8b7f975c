"""Named volumes: core.volumes.VolumeStore as a library, and the volumes service with real containers.

The daemon tests run busybox (tests/oci_images.py, pushed to the interop registry) under runc in a
namespace per test on one containerkitd; afterwards every container there is removed
(tests/interop.py image_place), then every volume.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import RunningDaemon
from interop import busybox_image, image_place, namespace_for

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.metadata import MetadataStore, NamespaceStore
from core.metadata.containers import Container, ContainerStore
from core.volumes import VolumeStore

BAD_NAMES = ["", "a/b", "..", "../x", "x/../../y", ".hidden", "a..b", "-a", "a b", "é", "a" * 65]


# -- the library ---------------------------------------------------------------------------------------------


@pytest.fixture
def metadata(tmp_path: Path) -> Iterator[MetadataStore]:
    with MetadataStore(tmp_path / "meta.db") as store:
        yield store


@pytest.fixture
def volumes(metadata: MetadataStore, tmp_path: Path) -> VolumeStore:
    return VolumeStore(metadata, tmp_path / "volumes")


def files_under(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*"))


def container_mounting(id: str, *sources: str) -> Container:
    mounts = [{"type": "bind", "source": source, "destination": f"/m{i}", "options": ["rbind"]} for i, source in
              enumerate(sources)]  # fmt: skip
    return Container(id, runtime_name="io.containerd.runc.v2", spec={"mounts": mounts})


def test_create_get_list_remove(volumes: VolumeStore) -> None:
    created = volumes.create("ns1", "data", {"team": "infra", "empty": ""})
    assert (created.name, created.driver, dict(created.labels)) == ("data", "local", {"team": "infra"})
    assert created.mountpoint == volumes.root / "ns1" / "data" / "_data" == volumes.path("ns1", "data")
    assert created.mountpoint.is_dir() and list(created.mountpoint.iterdir()) == []
    assert (volumes.root.stat().st_mode & 0o777, created.mountpoint.stat().st_mode & 0o777) == (0o700, 0o755)
    assert volumes.get("ns1", "data") == created
    volumes.create("ns1", "cache")
    assert [v.name for v in volumes.list("ns1")] == ["cache", "data"]
    assert [v.name for v in volumes.list("ns1", ["labels.team==infra"])] == ["data"]
    assert [v.name for v in volumes.list("ns1", ["name==cache", "driver==nfs"])] == ["cache"]
    with pytest.raises(InvalidArgument):
        volumes.list("ns1", ["name=="])
    with pytest.raises(AlreadyExists, match='volume "data": already exists'):
        volumes.create("ns1", "data")
    assert volumes.ensure("ns1", "data") == (created, False)
    (created.mountpoint / "file").write_text("kept")
    volumes.remove("ns1", "data")
    assert not (volumes.root / "ns1" / "data").exists()
    with pytest.raises(NotFound, match='volume "data" in namespace "ns1": not found'):
        volumes.get("ns1", "data")
    with pytest.raises(NotFound):
        volumes.remove("ns1", "data")
    assert [v.name for v in volumes.list("ns1")] == ["cache"]


def test_namespaces_are_isolated(volumes: VolumeStore, metadata: MetadataStore) -> None:
    a = volumes.create("ns-a", "data")
    b, created = volumes.ensure("ns-b", "data")
    assert created and a.mountpoint != b.mountpoint
    assert [v.name for v in volumes.list("ns-c")] == []
    with pytest.raises(NotFound):
        volumes.get("ns-c", "data")
    ContainerStore(metadata).create("ns-b", container_mounting("c1", str(a.mountpoint)))  # ns-b binds ns-a's path
    assert volumes.users("ns-a") == {}
    volumes.remove("ns-a", "data")  # only containers of its own namespace keep a volume
    assert volumes.get("ns-b", "data") == b


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_and_nothing_is_made(volumes: VolumeStore, name: str) -> None:
    for call in (volumes.create, volumes.ensure, volumes.get, volumes.remove, volumes.path):
        with pytest.raises(InvalidArgument, match="volume name"):
            call("ns1", name)
    with pytest.raises(InvalidArgument, match="volume name"):
        volumes.bind_mounts("ns1", {"mounts": [{"type": "volume", "source": name, "destination": "/d"}]})
    with pytest.raises(InvalidArgument, match="namespace"):
        volumes.create("../ns", "data")
    with pytest.raises(InvalidArgument, match="volume name must not be empty"):
        volumes.bind_mounts("ns1", {"mounts": [{"type": "volume", "source": None, "destination": "/d"}]})
    assert volumes.list("ns1") == []
    assert not volumes.root.exists() or files_under(volumes.root) == []


def test_bind_mounts_rewrites_volume_mounts_and_creates_missing_volumes(volumes: VolumeStore) -> None:
    existing = volumes.create("ns1", "old")
    spec: dict[str, Any] = {
        "mounts": [
            {"type": "proc", "source": "proc", "destination": "/proc", "options": []},
            {"type": "volume", "source": "old", "destination": "/old", "options": ["ro"]},
            {"type": "volume", "source": "new", "destination": "/new"},
        ]
    }
    created = volumes.bind_mounts("ns1", spec)
    assert [v.name for v in created] == ["new"]
    assert spec["mounts"] == [
        {"type": "proc", "source": "proc", "destination": "/proc", "options": []},
        {"type": "bind", "source": str(existing.mountpoint), "destination": "/old", "options": ["rbind", "ro"]},
        {"type": "bind", "source": str(created[0].mountpoint), "destination": "/new", "options": ["rbind"]},
    ]
    assert volumes.bind_mounts("ns1", spec) == []  # nothing left to rewrite


def test_unknown_mount_options_are_refused_before_anything_is_created(volumes: VolumeStore) -> None:
    spec = {
        "mounts": [
            {"type": "volume", "source": "fine", "destination": "/a", "options": ["ro"]},
            {"type": "volume", "source": "other", "destination": "/b", "options": ["rw", "exec=yes"]},
        ]
    }
    with pytest.raises(InvalidArgument, match="'exec=yes' not supported"):
        volumes.bind_mounts("ns1", spec)
    assert volumes.list("ns1") == []


def test_remove_is_refused_while_containers_of_the_namespace_mount_it(
    volumes: VolumeStore, metadata: MetadataStore
) -> None:
    data = volumes.create("ns1", "data")
    volumes.create("ns1", "idle")
    containers = ContainerStore(metadata)
    containers.create("ns1", container_mounting("web", str(data.mountpoint)))
    containers.create("ns1", container_mounting("job", f"{data.mountpoint}/sub/", "/tmp"))  # below it counts too
    containers.create("ns1", container_mounting("tricky", f"{volumes.root}/ns1/idle/../data/_data"))
    containers.create("ns1", container_mounting("other", "/tmp", f"{volumes.root}/ns1", "relative"))
    assert volumes.users("ns1") == {"data": ["job", "tricky", "web"]}
    with pytest.raises(FailedPrecondition, match=r'volume "data" is in use by container\(s\) job, tricky, web'):
        volumes.remove("ns1", "data")
    assert volumes.get("ns1", "data") == data and data.mountpoint.is_dir()
    for id in ("job", "tricky", "web"):
        containers.delete("ns1", id)
    volumes.remove("ns1", "data")
    volumes.remove("ns1", "idle")


def test_a_namespace_with_volumes_cannot_be_deleted(volumes: VolumeStore, metadata: MetadataStore) -> None:
    volumes.create("ns1", "data")
    with pytest.raises(FailedPrecondition, match='namespace "ns1" must be empty, but it still has volumes'):
        NamespaceStore(metadata).delete("ns1")
    volumes.remove("ns1", "data")
    NamespaceStore(metadata).delete("ns1")


def test_leftover_directories_are_pruned_and_never_reused(volumes: VolumeStore, tmp_path: Path) -> None:
    kept = volumes.create("ns1", "kept")
    orphan = volumes.root / "ns1" / "gone" / "_data"
    orphan.mkdir(parents=True)
    (orphan / "secret").write_text("old data")
    assert volumes.create("ns1", "gone").mountpoint == orphan  # a record-less directory: wiped first
    assert list(orphan.iterdir()) == []
    volumes.remove("ns1", "gone")
    for leftover in (volumes.root / "ns1" / "gone" / "_data", volumes.root / "ns2" / "x" / "_data"):
        leftover.mkdir(parents=True)
    assert sorted(volumes.prune()) == [volumes.root / "ns1" / "gone", volumes.root / "ns2" / "x"]
    assert files_under(volumes.root) == ["ns1", "ns1/kept", "ns1/kept/_data", "ns2"]
    assert volumes.get("ns1", "kept") == kept


# -- the daemon, with real containers ------------------------------------------------------------------------

needs_containers = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("ctr", "runc", "docker-registry", "skopeo")),
    reason="needs runc, Debian's ctr, docker-registry and skopeo",
)


@pytest.fixture(scope="module")
def busybox(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    return busybox_image(registry, tmp_path_factory.mktemp("busybox"))


@dataclass(frozen=True)
class Place:
    """A namespace of the shared daemon holding busybox; ``ckctl`` and ``ctr`` act in it."""

    daemon: RunningDaemon
    namespace: str
    image: str

    def ckctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.daemon.ckctl(*args, check=check, namespace=self.namespace)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.daemon.ctr(*args, check=check, namespace=self.namespace)

    def volumes(self) -> dict[str, dict[str, Any]]:
        return {volume["name"]: volume for volume in self.daemon.ckctl_json("volumes", "ls", namespace=self.namespace)}

    def inspect(self, name: str) -> dict[str, Any]:
        return json.loads(self.ckctl("volumes", "inspect", name).stdout)

    def run(self, id: str, mount: str, script: str, *options: str) -> subprocess.CompletedProcess[str]:
        return self.ckctl("run", *options, "--mount", mount, self.image, id, "sh", "-c", script)


@pytest.fixture
def place(request: pytest.FixtureRequest, containerkitd: RunningDaemon, busybox: str) -> Iterator[Place]:
    namespace = namespace_for(request.node.originalname, "vol")
    with image_place(containerkitd, busybox, namespace):
        yield Place(containerkitd, namespace, busybox)
    for name in containerkitd.ckctl("volumes", "ls", "-q", namespace=namespace).stdout.split():
        containerkitd.ckctl("volumes", "rm", name, namespace=namespace)
    assert (
        not (containerkitd.root / "volumes" / namespace).exists()
        or files_under(containerkitd.root / "volumes" / namespace) == []
    )


@needs_containers
def test_data_in_a_volume_survives_its_containers(place: Place) -> None:
    mount = "type=volume,src=data,dst=/data"
    assert place.run("c1", mount, "echo hi > /data/f; echo written", "--rm").stdout == "written\n"
    volume = place.volumes()["data"]  # made by the mount
    assert (volume["driver"], volume["containers"]) == ("local", [])
    assert Path(volume["mountpoint"]) == place.daemon.root / "volumes" / place.namespace / "data" / "_data"
    assert (Path(volume["mountpoint"]) / "f").read_text() == "hi\n"
    assert place.run("c2", mount, "cat /data/f", "--rm").stdout == "hi\n"
    assert place.ckctl("containers", "ls", "-q").stdout == ""


@needs_containers
def test_ctr_run_mounts_volumes_through_the_hook(place: Place) -> None:
    place.ckctl("volumes", "create", "--label", "made=by-ckctl", "shared")
    place.ctr("run", "--rm", "--mount", "type=volume,src=shared,dst=/v,options=rbind:rw", place.image, "w1",
              "sh", "-c", "echo from-ctr > /v/f")  # fmt: skip
    assert place.run("r1", "type=volume,src=shared,dst=/data,options=ro", "cat /data/f", "--rm").stdout == "from-ctr\n"
    place.ctr("run", "--rm", "--mount", "type=volume,src=fresh,dst=/v", place.image, "w2", "true")
    assert sorted(place.volumes()) == ["fresh", "shared"]
    assert place.volumes()["shared"]["labels"] == {"made": "by-ckctl"}
    result = place.ctr("run", "--rm", "--mount", "type=volume,src=../../../..,dst=/v", place.image, "w3", "true",
                       check=False)  # fmt: skip
    assert result.returncode != 0 and "volume name" in result.stderr
    result = place.ctr("run", "--rm", "--mount", "type=volume,src=x,dst=/v,options=bogus", place.image, "w4", "true",
                       check=False)  # fmt: skip
    assert result.returncode != 0 and "'bogus' not supported" in result.stderr
    assert sorted(place.volumes()) == ["fresh", "shared"]
    assert place.ctr("containers", "ls", "-q").stdout == ""


@needs_containers
def test_read_only_mounts_are_read_only_inside(place: Place, tmp_path: Path) -> None:
    place.run("w", "type=volume,src=data,dst=/data", "echo v > /data/f", "--rm")
    probe = "cat /data/f; touch /data/new 2>/dev/null && echo writable || echo read-only"
    assert place.run("r1", "type=volume,src=data,dst=/data,options=ro", probe, "--rm").stdout == "v\nread-only\n"
    assert place.run("r2", "type=volume,src=data,dst=/data", probe, "--rm").stdout == "v\nwritable\n"
    (tmp_path / "f").write_text("b\n")
    assert place.run("r3", f"type=bind,src={tmp_path},dst=/data,options=ro", probe, "--rm").stdout == "b\nread-only\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["f"]


@needs_containers
def test_remove_is_refused_while_a_container_mounts_the_volume(place: Place) -> None:
    place.run("keeper", "type=volume,src=data,dst=/data", "echo kept > /data/f")  # no --rm: the container stays
    place.run("runner", "type=volume,src=data,dst=/data", "sleep 1000", "-d")
    assert place.volumes()["data"]["containers"] == ["keeper", "runner"]
    result = place.ckctl("volumes", "rm", "data", check=False)
    assert result.returncode == 1 and result.stderr == (
        'ckctl: data: volume "data" is in use by container(s) keeper, runner (failed precondition)\n'
    )
    place.ckctl("tasks", "rm", "-f", "runner")
    place.ckctl("containers", "rm", "runner")
    assert place.inspect("data")["containers"] == ["keeper"]
    assert place.ckctl("volumes", "rm", "data", check=False).returncode == 1
    place.ckctl("containers", "rm", "keeper")
    assert place.ckctl("volumes", "rm", "data").stdout == "data\n"
    assert place.volumes() == {} and not (place.daemon.root / "volumes" / place.namespace / "data").exists()


@needs_containers
def test_volumes_are_per_namespace(place: Place) -> None:
    other = f"{place.namespace}-b"
    place.run("w", "type=volume,src=data,dst=/data", "echo a > /data/f", "--rm")
    assert place.daemon.ckctl("volumes", "ls", "-q", namespace=other).stdout == ""
    place.daemon.ckctl("volumes", "create", "data", namespace=other)
    theirs = json.loads(place.daemon.ckctl("volumes", "inspect", "data", namespace=other).stdout)
    assert (
        theirs["mountpoint"] != place.volumes()["data"]["mountpoint"]
        and list(Path(theirs["mountpoint"]).iterdir()) == []
    )
    result = place.daemon.ckctl("namespaces", "rm", other, check=False)
    assert result.returncode == 1 and "still has volumes" in result.stderr
    place.daemon.ckctl("volumes", "rm", "data", namespace=other)
    place.daemon.ckctl("namespaces", "rm", other)


@needs_containers
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("volumes", "create", "a/b"), 'volume name "a/b" must match'),
        (("volumes", "create", ".."), 'volume name ".." must match'),
        (("volumes", "create", "a" * 65), "longer than 64 characters"),
        (("volumes", "create", "--label", "=v", "x"), "has no key"),
        (("volumes", "inspect", "nope"), 'volume "nope" in namespace'),
        (("volumes", "rm", "../../.."), 'volume name "../../.." must match'),
        (("run", "--rm", "--mount", "type=volume,src=../etc,dst=/x", "{image}", "b1", "true"), "volume name"),
        (("run", "--rm", "--mount", "type=volume,src=a/b,dst=/x", "{image}", "b2", "true"), "volume name"),
        (
            ("run", "--rm", "--mount", "type=volume,src=x,dst=/x,options=rw:size=1m", "{image}", "b3", "true"),
            "'size=1m' not supported",
        ),
        (("run", "--rm", "--mount", "type=volume,src=x,dst=rel", "{image}", "b4", "true"), "absolute path"),
    ],
    ids=["slash", "dotdot", "long", "label", "missing", "rm-dotdot", "run-dotdot", "run-slash", "option", "dst"],
)
def test_bad_input_is_one_clear_line_and_makes_nothing(place: Place, args: tuple[str, ...], message: str) -> None:
    result = place.ckctl(*(arg.format(image=place.image) for arg in args), check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("ckctl: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert place.volumes() == {} and place.ckctl("containers", "ls", "-q").stdout == ""
    root = place.daemon.root / "volumes"
    assert not root.exists() or all(files_under(root / ns) == [] for ns in (place.namespace, "etc"))


@needs_containers
def test_create_and_remove_publish_events(place: Place) -> None:
    from core.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc
    from core.api.containerkit.services.volumes.v1 import volumes_pb2
    from core.services.events import message_of

    with grpc.insecure_channel(f"unix:{place.daemon.address}") as channel:
        stream = events_pb2_grpc.EventsStub(channel).Subscribe(
            events_pb2.SubscribeRequest(filters=[f'namespace=={place.namespace},topic~="^/volumes/"']), timeout=60
        )
        stream.initial_metadata()  # the subscription is live
        place.ckctl("volumes", "create", "--label", "k=v", "made")
        place.run("c", "type=volume,src=implicit,dst=/d", "true", "--rm")
        place.ckctl("volumes", "rm", "made", "implicit")
        seen = [(envelope.topic, message_of(envelope.event)) for envelope in (next(stream) for _ in range(4))]
        stream.cancel()
    assert seen == [
        ("/volumes/create", volumes_pb2.VolumeCreate(name="made", labels={"k": "v"})),
        ("/volumes/create", volumes_pb2.VolumeCreate(name="implicit")),
        ("/volumes/delete", volumes_pb2.VolumeDelete(name="made")),
        ("/volumes/delete", volumes_pb2.VolumeDelete(name="implicit")),
    ]
