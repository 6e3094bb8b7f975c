"""Containers in the metadata store: containerd's semantics and messages, per namespace, and their GC kind."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_metadata_snapshots import Kinds, MemorySnapshotter

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.gc import Collector, Resource, ResourceKind
from core.hookspecs import new_plugin_manager
from core.metadata import MetadataStore, NamespaceStore
from core.metadata.containers import SPEC_TYPE_URL, Container, ContainerKind, ContainerStore, decode_spec
from core.metadata.snapshots import SnapshotKind, SnapshotMetadata
from core.types import EPOCH

SPEC_JSON = b'{"ociVersion": "1.0.2-dev",  "process": {"args": ["sh"]}}'  # spacing a re-encoding would lose
OPTIONS = ("containerd.runc.v1.Options", b"\x12\x04runc")


@contextmanager
def exactly(kind: type[Exception], message: str) -> Iterator[None]:
    """Expect ``kind`` raised with exactly ``message``."""
    with pytest.raises(kind) as raised:
        yield
    assert str(raised.value) == message


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    with MetadataStore(tmp_path / "meta.db") as opened:
        yield opened


@pytest.fixture
def containers(store: MetadataStore) -> ContainerStore:
    return ContainerStore(store)


def container(id: str = "c1", **kwargs: Any) -> Container:
    fields: dict[str, Any] = {
        "runtime_name": "io.containerd.runc.v2",
        "spec": decode_spec(SPEC_JSON),
        "spec_json": SPEC_JSON,
        **kwargs,
    }
    return Container(id, **fields)


# -- create, get, list, delete -------------------------------------------------------------------


def test_create_stores_every_field_and_the_spec_bytes_as_given(containers: ContainerStore) -> None:
    given = container(
        labels={"team": "infra", "empty": ""},
        image="docker.io/library/busybox:latest",
        runtime_options=OPTIONS,
        snapshotter="overlayfs",
        snapshot_key="c1",
        extensions={"ext": ("example.Ext", b"\x00\x01")},
        sandbox="pod",
    )
    before = time.time()
    created = containers.create("default", given)
    assert created.created_at == created.updated_at and created.created_at.timestamp() >= before - 1
    assert created.labels == {"team": "infra"}  # empty values are dropped
    fetched = containers.get("default", "c1")
    assert fetched == created
    assert (fetched.spec_type_url, fetched.spec_json, fetched.spec_value()) == (SPEC_TYPE_URL, SPEC_JSON, SPEC_JSON)
    assert fetched.spec == {"ociVersion": "1.0.2-dev", "process": {"args": ["sh"]}}
    assert (fetched.runtime_options, fetched.extensions) == (OPTIONS, {"ext": ("example.Ext", b"\x00\x01")})
    assert (fetched.image, fetched.snapshotter, fetched.snapshot_key, fetched.sandbox) == (
        "docker.io/library/busybox:latest",
        "overlayfs",
        "c1",
        "pod",
    )


def test_a_spec_without_its_bytes_is_stored_encoded(containers: ContainerStore) -> None:
    created = containers.create("default", Container("c1", "rt", spec={"a": [1]}, spec_type_url="x/Spec"))
    assert (created.spec_json, containers.get("default", "c1").spec_type_url) == (b'{"a":[1]}', "x/Spec")


def test_create_makes_the_namespace_and_refuses_a_taken_id(store: MetadataStore, containers: ContainerStore) -> None:
    containers.create("fresh", container())
    assert NamespaceStore(store).exists("fresh")
    with exactly(AlreadyExists, 'container "c1": already exists'):
        containers.create("fresh", container())
    containers.create("other", container())  # ids are per namespace


PREFIX = "create container failed validation: "


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (container("a b"), 'container.ID: identifier "a b" must match'),
        (container(""), "container.ID: identifier must not be empty"),
        (container(extensions={"": ("t", b"")}), "container.Extension keys must not be zero-length"),
        (container(labels={"": "v"}), "containers.Labels: label key must not be empty"),
        (container(runtime_name=""), "container.Runtime.Name must be set"),
        (container(spec=None, spec_json=b""), "container.Spec must be set"),
        (container(snapshot_key="k"), "container.Snapshotter must be set if container.SnapshotKey is set"),
    ],
)
def test_invalid_containers_are_invalid_argument_worded_as_containerd(
    containers: ContainerStore, bad: Container, message: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        containers.create("default", bad)
    assert str(raised.value).startswith(PREFIX + message) and str(raised.value).endswith(": invalid argument")


def test_spec_json_must_be_an_object() -> None:
    with pytest.raises(InvalidArgument, match=re.escape("container.Spec: not valid JSON")):
        decode_spec(b"{nope")
    with pytest.raises(InvalidArgument, match=re.escape("container.Spec: not a JSON object")):
        decode_spec(b"[1]")


def test_get_and_delete_of_unknown_containers_are_not_found(containers: ContainerStore) -> None:
    with exactly(NotFound, 'container "x" in namespace "default": not found'):
        containers.get("default", "x")
    with exactly(NotFound, 'cannot delete container "x" in namespace "default": not found'):
        containers.delete("default", "x")
    containers.create("default", container())
    with exactly(NotFound, "container x: not found"):
        containers.delete("default", "x")
    containers.delete("default", "c1")
    with pytest.raises(NotFound):
        containers.get("default", "c1")


def test_list_is_per_namespace_sorted_and_filtered_as_containerd(containers: ContainerStore) -> None:
    containers.create("default", container("web", image="nginx", labels={"tier": "front", "a.b": "1"}))
    containers.create("default", container("db", image="postgres", labels={"tier": "back"}, runtime_name="rt2"))
    containers.create("default", container("bare", snapshotter="native", snapshot_key="k"))
    containers.create("other", container("elsewhere"))

    def ids(*filters: str) -> list[str]:
        return [c.id for c in containers.list("default", filters)]

    assert ids() == ["bare", "db", "web"]
    assert ids("labels.tier==front") == ["web"]
    assert ids("labels.a.b==1") == ["web"]
    assert ids("image~=^post") == ["db"]
    assert ids("runtime.name==rt2", "id==web") == ["db", "web"]
    assert ids("snapshotter==native") == ["bare"]
    assert ids("image") == ["db", "web"]  # present only when not empty
    assert ids("image!=nginx") == ["bare", "db"]
    assert containers.list("nowhere") == []
    with pytest.raises(InvalidArgument):
        containers.list("default", ["id=="])


def test_a_namespace_holding_containers_cannot_be_deleted(store: MetadataStore, containers: ContainerStore) -> None:
    containers.create("busy", container(labels={"l": "v"}, extensions={"e": ("t", b"")}))
    with pytest.raises(
        FailedPrecondition, match=re.escape('namespace "busy" must be empty, but it still has containers')
    ):
        NamespaceStore(store).delete("busy")
    containers.delete("busy", "c1")
    NamespaceStore(store).delete("busy")


# -- update --------------------------------------------------------------------------------------


@pytest.fixture
def stored(containers: ContainerStore) -> Container:
    return containers.create(
        "default",
        container(
            labels={"keep": "1", "drop": "2"},
            image="img:1",
            snapshotter="overlayfs",
            snapshot_key="c1",
            extensions={"x": ("t.X", b"x"), "y": ("t.Y", b"y")},
            runtime_options=OPTIONS,
        ),
    )


def _update(containers: ContainerStore, changed: Container, *paths: str) -> Container:
    time.sleep(0.002)
    updated = containers.update("default", changed, list(paths))
    assert containers.get("default", changed.id) == updated
    return updated


def test_update_without_paths_replaces_the_updatable_fields(containers: ContainerStore, stored: Container) -> None:
    changed = replace(
        stored,
        labels={"new": "x"},
        image="img:2",
        snapshot_key="other",
        spec={"v": 2},
        spec_json=b"",
        extensions={},
        sandbox="ignored",
    )
    updated = _update(containers, changed)
    assert (updated.labels, updated.image, updated.snapshot_key, updated.spec, updated.extensions) == (
        {"new": "x"},
        "img:2",
        "other",
        {"v": 2},
        {},
    )
    assert updated.sandbox == "" and updated.runtime_options == OPTIONS
    assert updated.created_at == stored.created_at and updated.updated_at > stored.updated_at


def test_update_without_paths_refuses_to_change_snapshotter_or_runtime(
    containers: ContainerStore, stored: Container
) -> None:
    with exactly(InvalidArgument, "container.Snapshotter field is immutable: invalid argument"):
        containers.update("default", replace(stored, snapshotter="native"))
    with exactly(InvalidArgument, "container.Runtime.Name field is immutable: invalid argument"):
        containers.update("default", replace(stored, runtime_name="other"))


def test_update_labels_and_extensions_whole_or_one(containers: ContainerStore, stored: Container) -> None:
    one = _update(containers, Container("c1", labels={"add": "a"}, extensions={"z": ("t.Z", b"z")}), *[
        "labels.add", "labels.drop", "extensions.z", "extensions.y",
    ])  # fmt: skip
    assert one.labels == {"keep": "1", "add": "a"}
    assert one.extensions == {"x": ("t.X", b"x"), "z": ("t.Z", b"z")}
    assert one.spec == stored.spec and one.spec_json == SPEC_JSON  # untouched
    whole = _update(containers, Container("c1", labels={"only": "1"}, extensions={}), "labels", "extensions")
    assert (whole.labels, whole.extensions) == ({"only": "1"}, {})


def test_update_spec_image_and_snapshot_key_by_path(containers: ContainerStore, stored: Container) -> None:
    spec_json = b'{"new":  true}'
    changed = Container(
        "c1", spec={"new": True}, spec_json=spec_json, spec_type_url="t/S", image="i:2", snapshot_key="k2"
    )
    updated = _update(containers, changed, "spec", "image", "snapshotkey")
    assert (updated.spec, updated.spec_json, updated.spec_type_url) == ({"new": True}, spec_json, "t/S")
    assert (updated.image, updated.snapshot_key, updated.labels) == ("i:2", "k2", stored.labels)


@pytest.mark.parametrize("path", ["runtime", "snapshotter", "id", "sandbox", "created_at"])
def test_update_of_another_field_is_invalid_argument(containers: ContainerStore, stored: Container, path: str) -> None:
    with exactly(InvalidArgument, f'cannot update "{path}" field on "c1": invalid argument'):
        containers.update("default", stored, [path])


def test_update_validates_the_result_and_needs_an_existing_container(
    containers: ContainerStore, stored: Container
) -> None:
    with pytest.raises(InvalidArgument, match="^" + re.escape("update failed validation: container.Spec must be set")):
        containers.update("default", Container("c1"), ["spec"])
    with exactly(InvalidArgument, "must specify a container id: invalid argument"):
        containers.update("default", Container(""), ["labels"])
    with exactly(NotFound, 'container "x": not found'):
        containers.update("default", container("x"), ["labels"])
    with exactly(NotFound, 'cannot update container "x" in namespace "empty": not found'):
        containers.update("empty", container("x"), ["labels"])
    assert containers.get("default", "c1") == stored


# -- garbage collection --------------------------------------------------------------------------


def test_every_container_is_a_root_referencing_its_snapshot_and_label_refs(containers: ContainerStore) -> None:
    kind = ContainerKind(containers)
    assert isinstance(kind, ResourceKind) and kind.types == ("container",)
    containers.create("a", container(snapshotter="overlayfs", snapshot_key="c1"))
    labels = {"containerd.io/gc.ref.content.x": "sha256:" + "1" * 64, "containerd.io/gc.ref.snapshot.native": "s"}
    containers.create("b", container("c2", labels=labels))
    roots = [Resource("container", "a", "c1"), Resource("container", "b", "c2")]
    assert list(kind.roots()) == roots and list(kind.all()) == roots
    assert list(kind.references(roots[0])) == [Resource("snapshot/overlayfs", "a", "c1")]
    assert list(kind.references(roots[1])) == [
        Resource("content", "b", "sha256:" + "1" * 64),
        Resource("snapshot/native", "b", "s"),
    ]
    assert list(kind.references(Resource("container", "a", "gone"))) == []
    assert kind.remove([roots[0], Resource("container", "a", "gone")]) == [roots[0]]
    assert [c.id for c in containers.list("a")] == []


def test_collection_keeps_a_containers_snapshot_until_the_container_goes(
    store: MetadataStore, containers: ContainerStore
) -> None:
    snapshots = SnapshotMetadata(store, {"memory": MemorySnapshotter()})
    snapshots.prepare("default", "memory", "rootfs")
    containers.create("default", container(snapshotter="memory", snapshot_key="rootfs"))
    hooks = new_plugin_manager()
    hooks.register(Kinds(SnapshotKind(snapshots, "memory"), ContainerKind(containers)))

    def collect() -> list[Resource]:
        stats = Collector(hooks, store).collect()
        assert stats.errors == []
        return stats.removed

    assert collect() == []
    containers.delete("default", "c1")
    assert collect() == [Resource("snapshot/memory", "default", "rootfs")]


def test_timestamps_given_are_ignored(containers: ContainerStore) -> None:
    created = containers.create("default", container(created_at=EPOCH.replace(year=2000)))
    assert created.created_at.year > 2000
