"""The snapshots service (containerd.services.snapshots.v1.Snapshots).

In-process first (a real gRPC server over the real metadata store and overlay snapshotter, with an
exchange and GC that record what the service asks of them), then against a real containerkitd:
garbage collection, leases, namespaces, restarts and crash leftovers.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from core.api.containerd.events import snapshot_pb2 as events_pb
from core.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from core.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from core.config import GrpcConfig
from core.metadata import LeaseResource, LeaseStore, MetadataStore
from core.metadata.snapshots import SnapshotKind, SnapshotMetadata
from core.mount import temp_mount
from core.server import new_server
from core.services._convert import mounts_of
from core.services.snapshots import SnapshotsService, info_of, info_pb, mounts_pb
from core.snapshot import Info, Kind
from core.types import EPOCH, Mount
from plugins.snapshot_overlay import OverlaySnapshotter

SN = "overlayfs"
DEFAULT = [("containerd-namespace", "default")]
ROOT = {"containerd.io/gc.root": "2024-01-01T00:00:00Z"}


def ns(name: str) -> list[tuple[str, str]]:
    return [("containerd-namespace", name)]


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


class Recorder:
    """Stands in for the event exchange and the GC plugin."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []
        self.scheduled = 0

    def publish(self, namespace: str, topic: str, event: Any) -> None:
        self.events.append((namespace, topic, event))

    def schedule(self) -> None:
        self.scheduled += 1


class Served:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.store = MetadataStore(directory / "meta.db")
        self.backend = OverlaySnapshotter(directory / "overlay")
        self.recorder = Recorder()
        self.service = SnapshotsService(SnapshotMetadata(self.store, {SN: self.backend}), self.recorder, self.recorder)
        self.server = new_server(GrpcConfig())
        self.service.register(self.server)
        self.server.add_insecure_port(f"unix:{directory / 'sock'}")
        self.server.start()
        self.channel = grpc.insecure_channel(f"unix:{directory / 'sock'}")
        self.stub = pb_grpc.SnapshotsStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()
        self.backend.close()
        self.store.close()


@pytest.fixture
def served() -> Iterator[Served]:
    directory = Path(tempfile.mkdtemp(prefix="ck-sn-", dir="/tmp"))  # short: unix socket paths are limited
    served = Served(directory)
    try:
        yield served
    finally:
        served.close()
        shutil.rmtree(directory, ignore_errors=True)


def listed(stub: pb_grpc.SnapshotsStub, *filters: str, metadata: list[tuple[str, str]] = DEFAULT) -> list[pb.Info]:
    request = pb.ListSnapshotsRequest(snapshotter=SN, filters=filters)
    return [info for response in stub.List(request, metadata=metadata) for info in response.info]


# -- in-process ----------------------------------------------------------------------------------


def test_prepare_write_commit_view_read_and_remove(served: Served) -> None:
    stub, recorder = served.stub, served.recorder
    prepared = stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="work", labels=ROOT), metadata=DEFAULT)
    assert [m.type for m in prepared.mounts] == ["bind"]
    assert stub.Mounts(pb.MountsRequest(snapshotter=SN, key="work"), metadata=DEFAULT).mounts == prepared.mounts
    with temp_mount(mounts_of(prepared.mounts)) as root:
        (root / "hello").write_text("hello, snapshot\n")
    usage = stub.Usage(pb.UsageRequest(snapshotter=SN, key="work"), metadata=DEFAULT)
    assert usage.inodes >= 2 and usage.size > 0

    stub.Commit(pb.CommitSnapshotRequest(snapshotter=SN, name="base", key="work", labels=ROOT), metadata=DEFAULT)
    viewed = stub.View(pb.ViewSnapshotRequest(snapshotter=SN, key="look", parent="base"), metadata=DEFAULT)
    with temp_mount(mounts_of(viewed.mounts)) as root:
        assert (root / "hello").read_text() == "hello, snapshot\n"
        with pytest.raises(OSError):
            (root / "other").write_text("read-only")

    info = stub.Stat(pb.StatSnapshotRequest(snapshotter=SN, key="look"), metadata=DEFAULT).info
    assert (info.name, info.parent, info.kind, dict(info.labels)) == ("look", "base", pb.VIEW, {})
    assert [(i.name, i.kind) for i in listed(stub)] == [("base", pb.COMMITTED), ("look", pb.VIEW)]
    stub.Remove(pb.RemoveSnapshotRequest(snapshotter=SN, key="look"), metadata=DEFAULT)
    assert [i.name for i in listed(stub)] == ["base"]

    assert recorder.events == [
        ("default", "/snapshot/prepare", events_pb.SnapshotPrepare(key="work")),
        ("default", "/snapshot/commit", events_pb.SnapshotCommit(key="work", name="base")),
        ("default", "/snapshot/remove", events_pb.SnapshotRemove(key="look")),
    ]
    assert recorder.scheduled == 1


def test_errors_carry_containerd_codes_and_messages(served: Served) -> None:
    stub = served.stub
    stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="a"), metadata=DEFAULT)
    stub.Commit(pb.CommitSnapshotRequest(snapshotter=SN, name="base", key="a"), metadata=DEFAULT)
    stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="child", parent="base"), metadata=DEFAULT)
    cases = {
        "unknown snapshotter": (
            lambda: stub.Stat(pb.StatSnapshotRequest(snapshotter="zfs", key="a"), metadata=DEFAULT),
            (grpc.StatusCode.INVALID_ARGUMENT, "snapshotter not loaded: zfs: invalid argument"),
        ),
        "no snapshotter": (
            lambda: stub.Stat(pb.StatSnapshotRequest(key="a"), metadata=DEFAULT),
            (grpc.StatusCode.INVALID_ARGUMENT, "snapshotter argument missing: invalid argument"),
        ),
        "missing": (
            lambda: stub.Stat(pb.StatSnapshotRequest(snapshotter=SN, key="a"), metadata=DEFAULT),
            (grpc.StatusCode.NOT_FOUND, "snapshot a does not exist: not found"),
        ),
        "taken": (
            lambda: stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="child"), metadata=DEFAULT),
            (grpc.StatusCode.ALREADY_EXISTS, 'snapshot "child": already exists'),
        ),
        "parent": (
            lambda: stub.Remove(pb.RemoveSnapshotRequest(snapshotter=SN, key="base"), metadata=DEFAULT),
            (grpc.StatusCode.FAILED_PRECONDITION, "cannot remove snapshot with child: failed precondition"),
        ),
        "committed has no mounts": (
            lambda: stub.Mounts(pb.MountsRequest(snapshotter=SN, key="base"), metadata=DEFAULT),
            (
                grpc.StatusCode.FAILED_PRECONDITION,
                "failed to get active mount: requested snapshot default/2/base not active or view: failed precondition",
            ),
        ),
    }
    for name, (call, expected) in cases.items():
        assert code_of(call) == expected, name
    code, _ = code_of(lambda: stub.Stat(pb.StatSnapshotRequest(snapshotter=SN, key="base")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # no namespace
    assert served.recorder.scheduled == 0


def test_snapshots_are_per_namespace(served: Served) -> None:
    stub = served.stub
    stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="k"), metadata=ns("one"))
    stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="k", labels={"n": "2"}), metadata=ns("two"))
    assert [dict(i.labels) for i in listed(stub, metadata=ns("one"))] == [{}]
    assert [dict(i.labels) for i in listed(stub, metadata=ns("two"))] == [{"n": "2"}]
    assert listed(stub) == []


def test_list_streams_batches_of_100_and_filters(served: Served) -> None:
    stub = served.stub
    for index in range(205):
        labels = {"n": str(index)}
        stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key=f"k{index:03}", labels=labels), metadata=DEFAULT)
    responses = list(stub.List(pb.ListSnapshotsRequest(snapshotter=SN), metadata=DEFAULT))
    assert [len(r.info) for r in responses] == [100, 100, 5]
    infos = [info for response in responses for info in response.info]
    assert [i.name for i in infos] == [f"k{index:03}" for index in range(205)]
    assert infos[7] == stub.Stat(pb.StatSnapshotRequest(snapshotter=SN, key="k007"), metadata=DEFAULT).info
    assert [i.name for i in listed(stub, "labels.n==7", "name==k100")] == ["k007", "k100"]
    assert list(stub.List(pb.ListSnapshotsRequest(snapshotter=SN, filters=["kind==committed"]), metadata=DEFAULT)) == []


def test_update_follows_the_field_mask(served: Served) -> None:
    from google.protobuf import field_mask_pb2

    stub = served.stub
    stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="k", labels={"a": "1", "b": "2"}), metadata=DEFAULT)

    def update(labels: dict[str, str], *paths: str) -> dict[str, str]:
        mask = field_mask_pb2.FieldMask(paths=paths) if paths else None
        request = pb.UpdateSnapshotRequest(snapshotter=SN, info=pb.Info(name="k", labels=labels), update_mask=mask)
        return dict(stub.Update(request, metadata=DEFAULT).info.labels)

    assert update({"a": "x", "c": "3"}, "labels.a", "labels.b") == {"a": "x"}
    assert update({"d": "4"}) == {"d": "4"}
    code, details = code_of(lambda: update({}, "kind"))
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        'cannot update "kind" field on snapshot "k": invalid argument',
    )


def test_a_leased_prepare_is_held_by_the_lease(served: Served) -> None:
    leases = LeaseStore(served.store)
    leases.create("default", "unpack")
    leased = [*DEFAULT, ("containerd-lease", "unpack")]
    served.stub.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="extract"), metadata=leased)
    served.stub.Commit(pb.CommitSnapshotRequest(snapshotter=SN, name="layer", key="extract"), metadata=leased)
    assert leases.list_resources("default", "unpack") == [LeaseResource("layer", f"snapshots/{SN}")]
    code, details = code_of(
        lambda: served.stub.Prepare(
            pb.PrepareSnapshotRequest(snapshotter=SN, key="x"), metadata=[*DEFAULT, ("containerd-lease", "gone")]
        )
    )
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, 'lease "gone": not found')


def test_cleanup_and_the_gc_kinds_the_service_contributes(served: Served) -> None:
    served.stub.Cleanup(pb.CleanupRequest(snapshotter=SN), metadata=DEFAULT)
    (kind,) = served.service.containerkit_gc_kinds()
    assert isinstance(kind, SnapshotKind) and kind.types == (f"snapshot/{SN}",)
    assert served.service.store.snapshotters == {SN: served.backend}


def test_conversions_round_trip() -> None:
    mounts = [Mount("overlay", "overlay", ("lowerdir=/a:/b", "upperdir=/u"), "sub"), Mount("bind", "/x")]
    assert mounts_of(mounts_pb(mounts)) == mounts
    info = Info(Kind.VIEW, "v", "p", {"k": "v"}, EPOCH, EPOCH)
    assert info_of(info_pb(info)) == info
    assert info_of(pb.Info(name="x")).kind is Kind.COMMITTED  # unset kind reads as committed, as containerd


# -- against a real containerkitd ----------------------------------------------------------------


@pytest.fixture
def stubs(daemon: Any) -> Iterator[tuple[pb_grpc.SnapshotsStub, leases_pb2_grpc.LeasesStub]]:
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        yield pb_grpc.SnapshotsStub(channel), leases_pb2_grpc.LeasesStub(channel)


def backend_dirs(daemon: Any) -> list[str]:
    return sorted(path.name for path in (daemon.root / "snapshotter.overlayfs" / "snapshots").iterdir())


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.integration
def test_gc_removes_unrooted_snapshots_after_a_remove(daemon: Any, stubs: Any) -> None:
    snapshots, _ = stubs
    snapshots.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="kept", labels=ROOT), metadata=DEFAULT)
    snapshots.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="loose"), metadata=DEFAULT)
    snapshots.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="removed", labels=ROOT), metadata=DEFAULT)
    assert len(backend_dirs(daemon)) == 3
    snapshots.Remove(pb.RemoveSnapshotRequest(snapshotter=SN, key="removed"), metadata=DEFAULT)
    wait_for(lambda: len(backend_dirs(daemon)) == 1)
    assert [i.name for i in listed(snapshots)] == ["kept"]


@pytest.mark.integration
def test_a_lease_keeps_its_snapshots_until_it_is_deleted(daemon: Any, stubs: Any) -> None:
    snapshots, leases = stubs
    leases.Create(leases_pb2.CreateRequest(id="pull"), metadata=DEFAULT)
    leased = [*DEFAULT, ("containerd-lease", "pull")]
    snapshots.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="extract"), metadata=leased)
    snapshots.Commit(pb.CommitSnapshotRequest(snapshotter=SN, name="layer", key="extract"), metadata=leased)
    snapshots.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="top", parent="layer"), metadata=leased)
    daemon.ctr("snapshots", "rm", "top")  # schedules a collection; the lease holds "layer"
    time.sleep(0.5)
    assert [i.name for i in listed(snapshots)] == ["layer"]
    leases.Delete(leases_pb2.DeleteRequest(id="pull", sync=True), metadata=DEFAULT)
    assert listed(snapshots) == [] and backend_dirs(daemon) == []


@pytest.mark.integration
def test_a_namespace_with_snapshots_cannot_be_deleted(daemon: Any, stubs: Any) -> None:
    snapshots, _ = stubs
    snapshots.Prepare(pb.PrepareSnapshotRequest(snapshotter=SN, key="k", labels=ROOT), metadata=ns("busy"))
    result = daemon.ctr("namespaces", "rm", "busy", check=False)
    assert (
        result.returncode != 0 and f'must be empty, but it still has snapshots on "{SN}" snapshotter' in result.stderr
    )
    snapshots.Remove(pb.RemoveSnapshotRequest(snapshotter=SN, key="k"), metadata=ns("busy"))
    daemon.ctr("namespaces", "rm", "busy")


@pytest.mark.integration
def test_snapshots_survive_a_restart_and_crash_leftovers_are_swept(make_daemon: Any) -> None:
    daemon = make_daemon()
    daemon.ctr("snapshots", "prepare", "work")
    daemon.ctr("snapshots", "commit", "base", "work")
    assert daemon.stop() == 0
    # What a crash between the backend's prepare and the metadata commit leaves behind.
    backend = OverlaySnapshotter(daemon.root / "snapshotter.overlayfs")
    backend.prepare("default/999/crashed", "")
    backend.close()
    daemon.start()
    wait_for(lambda: len(backend_dirs(daemon)) == 1)  # the collection shortly after start
    assert daemon.ctr("snapshots", "ls").stdout.split("\n")[1].split() == ["base", "Committed"]
