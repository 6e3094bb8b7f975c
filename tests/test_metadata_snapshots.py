"""Snapshot metadata (core.metadata.snapshots): namespaced snapshots over a namespace-unaware backend, and GC.

The backend here is :class:`MemorySnapshotter`, a complete in-memory implementation of
:class:`core.snapshot.Snapshotter` (its bookkeeping is real, it just has no files), so these tests
run anywhere; tests against the real overlay snapshotter are at the end.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from core import filters
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, NotImplementedByPlugin
from core.gc import Collector, Resource
from core.hookspecs import hookimpl, new_plugin_manager
from core.metadata import LeaseKind, LeaseResource, LeaseStore, MetadataStore, NamespaceStore
from core.metadata.snapshots import SnapshotKind, SnapshotMetadata, backend_key, inherited_labels
from core.snapshot import LABEL_REBASE, Info, Kind, Snapshotter, Usage
from core.types import Mount

NS = "default"
SN = "memory"
ROOT = {"containerd.io/gc.root": "2024-01-01T00:00:00Z"}


class MemorySnapshotter(Snapshotter):
    """A snapshotter keeping its snapshots in a dict, with containerd's rules (kinds, parents, leaves).

    ``lock_probe`` is called at the start of every mutation so tests can see what locks are held.
    """

    def __init__(self) -> None:
        self.snapshots: dict[str, Info] = {}
        self.removed: list[str] = []
        self.cleanups = 0
        self.lock_probe: Any = None
        self.fail_next: Exception | None = None
        self._lock = threading.Lock()

    def _mutating(self) -> None:
        if self.lock_probe is not None:
            self.lock_probe()
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure

    def _get(self, key: str) -> Info:
        if key not in self.snapshots:
            raise NotFound(f"snapshot {key} does not exist: not found")
        return self.snapshots[key]

    def stat(self, key: str) -> Info:
        with self._lock:
            return self._get(key)

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        with self._lock:
            self._mutating()
            current = self._get(info.name)
            assert list(fieldpaths) == ["labels"]
            self.snapshots[info.name] = Info(current.kind, current.name, current.parent, info.labels)
            return self.snapshots[info.name]

    def usage(self, key: str) -> Usage:
        with self._lock:
            self._get(key)
            return Usage(size=len(key), inodes=1)

    def mounts(self, key: str) -> list[Mount]:
        with self._lock:
            info = self._get(key)
            if info.kind is Kind.COMMITTED:
                raise FailedPrecondition(f"snapshot {key} is committed")
            mode = "ro" if info.kind is Kind.VIEW else "rw"
            return [Mount("bind", f"/memory/{key}", (mode, "rbind"))]

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        with self._lock:
            self._mutating()
            if key in self.snapshots:
                raise AlreadyExists(f"snapshot {key}: already exists")
            if parent and self._get(parent).kind is not Kind.COMMITTED:
                raise InvalidArgument(f"parent {parent} is not committed")
            self.snapshots[key] = Info(kind, key, parent, labels or {})
        return self.mounts(key)

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self.rebase(name, key, self.stat(key).parent, labels)

    def rebase(self, name: str, key: str, parent: str, labels: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self._mutating()
            if self._get(key).kind is not Kind.ACTIVE:
                raise FailedPrecondition(f"snapshot {key} is not active")
            if name in self.snapshots:
                raise AlreadyExists(f"snapshot {name}: already exists")
            del self.snapshots[key]
            self.snapshots[name] = Info(Kind.COMMITTED, name, parent, labels or {})

    def remove(self, key: str) -> None:
        with self._lock:
            self._mutating()
            self._get(key)
            if any(info.parent == key for info in self.snapshots.values()):
                raise FailedPrecondition("cannot remove snapshot with child")
            del self.snapshots[key]
            self.removed.append(key)

    def walk(self, filters_: Sequence[str] = ()) -> Iterator[Info]:
        matches = filters.parse(list(filters_))
        with self._lock:
            infos = list(self.snapshots.values())
        return iter([i for i in infos if matches({"name": i.name, "parent": i.parent, "labels": i.labels})])

    def cleanup(self) -> None:
        self.cleanups += 1


class Kinds:
    """A plugin contributing GC kinds through the real hook."""

    def __init__(self, *kinds: object) -> None:
        self.kinds = list(kinds)

    @hookimpl
    def containerkit_gc_kinds(self) -> list[Any]:
        return self.kinds


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    with MetadataStore(tmp_path / "meta.db") as opened:
        yield opened


@pytest.fixture
def backend() -> MemorySnapshotter:
    return MemorySnapshotter()


@pytest.fixture
def snapshots(store: MetadataStore, backend: MemorySnapshotter) -> SnapshotMetadata:
    return SnapshotMetadata(store, {SN: backend})


def collect(snapshots: SnapshotMetadata, *names: str) -> list[Resource]:
    """One real collection over the snapshot kinds of ``names`` (default: the memory one) and the leases."""
    hooks = new_plugin_manager()
    kinds = [SnapshotKind(snapshots, name) for name in names or (SN,)]
    hooks.register(Kinds(*kinds, LeaseKind(LeaseStore(snapshots.store))))
    stats = Collector(hooks, snapshots.store).collect()
    assert stats.errors == []
    return sorted(stats.removed)


def chain(snapshots: SnapshotMetadata, *names: str, namespace: str = NS, labels: dict[str, str] | None = None) -> None:
    """Commit ``names`` as a parent chain (each on the previous one)."""
    parent = ""
    for name in names:
        snapshots.prepare(namespace, SN, f"{name}-active", parent)
        snapshots.commit(namespace, SN, name, f"{name}-active", labels)
        parent = name


def snap(key: str, namespace: str = NS) -> Resource:
    return Resource(f"snapshot/{SN}", namespace, key)


# -- namespacing -------------------------------------------------------------------------------


def test_keys_are_per_namespace_and_map_to_unique_backend_keys(
    snapshots: SnapshotMetadata, backend: MemorySnapshotter
) -> None:
    chain(snapshots, "base", namespace="a")
    chain(snapshots, "base", namespace="b")
    snapshots.prepare("a", SN, "work", "base")
    assert [i.name for i in snapshots.walk("a", SN)] == ["base", "work"]
    assert [i.name for i in snapshots.walk("b", SN)] == ["base"]
    with pytest.raises(NotFound, match=r"snapshot work does not exist: not found"):
        snapshots.stat("b", SN, "work")
    assert sorted(backend.snapshots) == [backend_key("a", 2, "base"), backend_key("a", 5, "work"), "b/4/base"]
    assert backend.snapshots["a/5/work"].parent == "a/2/base"  # parents mapped to backend keys


def test_stat_shows_the_local_view(snapshots: SnapshotMetadata) -> None:
    chain(snapshots, "base")
    snapshots.prepare(NS, SN, "work", "base", {"team": "infra", "empty": ""})
    info = snapshots.stat(NS, SN, "work")
    assert (info.kind, info.name, info.parent, info.labels) == (Kind.ACTIVE, "work", "base", {"team": "infra"})
    assert info.created_at == info.updated_at and info.created_at.year >= 2024
    assert snapshots.stat(NS, SN, "base").kind is Kind.COMMITTED


def test_the_same_key_in_two_snapshotters_is_two_snapshots(store: MetadataStore) -> None:
    one, two = MemorySnapshotter(), MemorySnapshotter()
    snapshots = SnapshotMetadata(store, {"one": one, "two": two})
    snapshots.prepare(NS, "one", "k")
    snapshots.view(NS, "two", "k")
    assert snapshots.stat(NS, "one", "k").kind is Kind.ACTIVE
    assert snapshots.stat(NS, "two", "k").kind is Kind.VIEW
    assert len(one.snapshots) == len(two.snapshots) == 1


def test_an_unknown_or_missing_snapshotter_is_invalid_argument(snapshots: SnapshotMetadata) -> None:
    with pytest.raises(InvalidArgument, match=r"^snapshotter not loaded: nope: invalid argument$"):
        snapshots.prepare(NS, "nope", "k")
    with pytest.raises(InvalidArgument, match=r"^snapshotter argument missing"):
        snapshots.walk(NS, "")


def test_a_namespace_holding_snapshots_cannot_be_deleted(store: MetadataStore, snapshots: SnapshotMetadata) -> None:
    snapshots.prepare("tenant", SN, "k")
    with pytest.raises(
        FailedPrecondition, match=f'namespace "tenant" must be empty, but it still has snapshots on "{SN}" snapshotter$'
    ):
        NamespaceStore(store).delete("tenant")
    snapshots.remove("tenant", SN, "k")
    NamespaceStore(store).delete("tenant")


# -- prepare, view, commit, rebase -------------------------------------------------------------


def test_prepare_view_commit_and_mounts(snapshots: SnapshotMetadata) -> None:
    mounts = snapshots.prepare(NS, SN, "layer-1")
    assert mounts == [Mount("bind", "/memory/default/1/layer-1", ("rw", "rbind"))]
    assert snapshots.mounts(NS, SN, "layer-1") == mounts
    snapshots.commit(NS, SN, "l1", "layer-1", {"k": "v"})
    with pytest.raises(NotFound):
        snapshots.stat(NS, SN, "layer-1")
    committed = snapshots.stat(NS, SN, "l1")
    assert (committed.kind, committed.parent, committed.labels) == (Kind.COMMITTED, "", {"k": "v"})
    view = snapshots.view(NS, SN, "look", "l1")
    assert view[0].options == ("ro", "rbind")
    assert snapshots.stat(NS, SN, "look").kind is Kind.VIEW
    with pytest.raises(
        FailedPrecondition, match=r"^failed to get active mount: requested snapshot default/2/l1 not active or view"
    ):
        snapshots.mounts(NS, SN, "l1")
    assert snapshots.usage(NS, SN, "l1") == Usage(len("default/2/l1"), 1)


def test_creation_errors(snapshots: SnapshotMetadata, backend: MemorySnapshotter) -> None:
    chain(snapshots, "base")
    snapshots.prepare(NS, SN, "active", "base")
    with pytest.raises(AlreadyExists, match=r'^snapshot "active": already exists$'):
        snapshots.prepare(NS, SN, "active")
    with pytest.raises(AlreadyExists):
        snapshots.view(NS, SN, "base", "base")
    with pytest.raises(NotFound, match=r"^parent snapshot missing does not exist: not found$"):
        snapshots.prepare(NS, SN, "x", "missing")
    with pytest.raises(
        InvalidArgument, match=r'^failed to create snapshot: parent "default/3/active" is not committed snapshot'
    ):
        snapshots.view(NS, SN, "x", "active")
    with pytest.raises(InvalidArgument, match=r"key must not be empty"):
        snapshots.prepare(NS, SN, "")
    with pytest.raises(InvalidArgument, match=r"^info.Labels: label key and value greater than maximum size"):
        snapshots.prepare(NS, SN, "x", labels={"k": "v" * 5000})
    with pytest.raises(InvalidArgument, match=r"must match"):
        snapshots.prepare("bad namespace", SN, "x")
    assert len(backend.snapshots) == 2  # nothing half-made


def test_a_prepare_for_a_target_the_namespace_has_is_already_exists(snapshots: SnapshotMetadata) -> None:
    chain(snapshots, "sha256:chain")
    labels = {"containerd.io/snapshot.ref": "sha256:chain"}
    with pytest.raises(AlreadyExists, match=r'^target snapshot "sha256:chain": already exists$'):
        snapshots.prepare(NS, SN, "extract-1 sha256:chain", labels=labels)
    snapshots.prepare("other", SN, "extract-1 sha256:chain", labels=labels)  # another namespace unpacks it


def test_commit_errors(snapshots: SnapshotMetadata) -> None:
    chain(snapshots, "base")
    snapshots.prepare(NS, SN, "active", "base")
    snapshots.view(NS, SN, "view", "base")
    with pytest.raises(AlreadyExists, match=r'^snapshot "base": already exists$'):
        snapshots.commit(NS, SN, "base", "active")
    with pytest.raises(NotFound, match=r"^snapshot gone does not exist: not found$"):
        snapshots.commit(NS, SN, "new", "gone")
    with pytest.raises(
        FailedPrecondition, match=r'^failed to commit snapshot: snapshot "default/4/view" is not active'
    ):
        snapshots.commit(NS, SN, "new", "view")
    with pytest.raises(FailedPrecondition):
        snapshots.commit(NS, SN, "new", "base")
    with pytest.raises(InvalidArgument):
        snapshots.commit(NS, SN, "", "active")
    snapshots.commit(NS, SN, "new", "active")
    assert snapshots.stat(NS, SN, "new").parent == "base"


def test_a_failing_backend_leaves_no_record(snapshots: SnapshotMetadata, backend: MemorySnapshotter) -> None:
    backend.fail_next = OSError(28, "No space left on device")
    with pytest.raises(OSError):
        snapshots.prepare(NS, SN, "k")
    with pytest.raises(NotFound):
        snapshots.stat(NS, SN, "k")
    snapshots.prepare(NS, SN, "k")
    backend.fail_next = OSError(28, "No space left on device")
    with pytest.raises(OSError):
        snapshots.commit(NS, SN, "name", "k")
    assert [(i.name, i.kind) for i in snapshots.walk(NS, SN)] == [("k", Kind.ACTIVE)]


def test_a_backend_snapshot_whose_record_fails_to_commit_is_removed_again(tmp_path: Path) -> None:
    class ThenTheStoreGoes(MemorySnapshotter):
        def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
            mounts = super().prepare(key, parent, labels)
            store.close()  # the metadata commit that follows fails
            return mounts

    store = MetadataStore(tmp_path / "meta.db")
    backend = ThenTheStoreGoes()
    with pytest.raises(Exception, match="closed"):
        SnapshotMetadata(store, {SN: backend}).prepare(NS, SN, "k")
    assert backend.snapshots == {} and backend.removed == ["default/1/k"]


def test_backend_calls_happen_inside_the_transaction_under_the_gc_lock(
    store: MetadataStore, snapshots: SnapshotMetadata, backend: MemorySnapshotter
) -> None:
    seen: list[bool] = []

    def probe() -> None:
        # Another thread can neither take the gc lock nor read the uncommitted record.
        outside: list[bool] = []

        def look() -> None:
            outside.append(store.gc_lock.acquire(blocking=False))
            with store.read() as conn:
                outside.append(conn.execute("SELECT count(*) FROM snapshots").fetchone()[0] > len(backend.snapshots))
            if outside[0]:
                store.gc_lock.release()

        thread = threading.Thread(target=look)
        thread.start()
        thread.join()
        seen.append(outside == [False, False])

    backend.lock_probe = probe
    chain(snapshots, "base")
    snapshots.update(NS, SN, Info(Kind.COMMITTED, "base", labels={"containerd.io/snapshot/x": "1"}))
    assert seen == [True, True, True]


def test_rebase_commits_a_parentless_snapshot_onto_a_parent(
    snapshots: SnapshotMetadata, backend: MemorySnapshotter
) -> None:
    chain(snapshots, "lower")
    snapshots.prepare(NS, SN, "upper-active", labels={LABEL_REBASE: "true"})
    assert backend.snapshots["default/3/upper-active"].labels == {LABEL_REBASE: "true"}
    snapshots.rebase(NS, SN, "upper", "upper-active", "lower")
    assert snapshots.stat(NS, SN, "upper").parent == "lower"
    assert backend.snapshots["default/4/upper"].parent == "default/2/lower"

    snapshots.prepare(NS, SN, "child", "upper")
    with pytest.raises(InvalidArgument, match=r"has a parent"):
        snapshots.rebase(NS, SN, "x", "child", "lower")
    snapshots.prepare(NS, SN, "orphan")
    with pytest.raises(NotFound, match=r"parent snapshot missing does not exist"):
        snapshots.rebase(NS, SN, "x", "orphan", "missing")
    with pytest.raises(InvalidArgument, match=r"is not committed snapshot"):
        snapshots.rebase(NS, SN, "x", "orphan", "child")
    snapshots.rebase(NS, SN, "alone", "orphan", "")
    assert snapshots.stat(NS, SN, "alone").parent == ""


def test_rebase_on_a_backend_that_cannot_is_not_implemented(store: MetadataStore) -> None:
    class NoRebase(MemorySnapshotter):
        rebase = Snapshotter.rebase

        def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
            MemorySnapshotter.rebase(self, name, key, self.stat(key).parent, labels)

    snapshots = SnapshotMetadata(store, {SN: NoRebase()})
    snapshots.prepare(NS, SN, "k")
    with pytest.raises(NotImplementedByPlugin):
        snapshots.rebase(NS, SN, "name", "k", "")
    assert snapshots.stat(NS, SN, "k").kind is Kind.ACTIVE


# -- labels, update, walk ----------------------------------------------------------------------


def test_only_inherited_labels_reach_the_backend(snapshots: SnapshotMetadata, backend: MemorySnapshotter) -> None:
    labels = {
        "containerd.io/snapshot/remote": "yes",
        "containerd.io/snapshot.ref": "sha256:x",
        "containerkit.io/snapshot/rebase": "true",
        "containerd.io/gc.root": "now",
        "team": "infra",
    }
    snapshots.prepare(NS, SN, "k", labels=labels)
    assert backend.snapshots["default/1/k"].labels == inherited_labels(labels)
    assert set(inherited_labels(labels)) == set(list(labels)[:3])
    assert snapshots.stat(NS, SN, "k").labels == labels


def test_update_paths(snapshots: SnapshotMetadata, backend: MemorySnapshotter) -> None:
    snapshots.prepare(NS, SN, "k", labels={"a": "1", "b": "2"})
    before = snapshots.stat(NS, SN, "k")

    def update(labels: dict[str, str], *paths: str) -> dict[str, str]:
        return dict(snapshots.update(NS, SN, Info(Kind.ACTIVE, "k", labels=labels), paths).labels)

    assert update({"a": "9", "c": "3"}, "labels.a", "labels.b") == {"a": "9"}
    assert update({"c": "3"}) == {"c": "3"}
    assert update({"d": "4"}, "labels") == {"d": "4"}
    assert update({"d": ""}, "labels.d", "labels.containerd.io/snapshot/x") == {}
    after = snapshots.stat(NS, SN, "k")
    assert after.created_at == before.created_at and after.updated_at > before.updated_at
    assert backend.snapshots["default/1/k"].labels == {}

    update({"containerd.io/snapshot/x": "1"}, "labels.containerd.io/snapshot/x")
    assert backend.snapshots["default/1/k"].labels == {"containerd.io/snapshot/x": "1"}

    with pytest.raises(InvalidArgument, match=r'^cannot update "parent" field on snapshot "k"'):
        update({}, "parent")
    with pytest.raises(InvalidArgument, match=r"info.Labels"):
        update({"k": "v" * 5000})
    with pytest.raises(NotFound):
        snapshots.update(NS, SN, Info(Kind.ACTIVE, "nope"))
    with pytest.raises(InvalidArgument):
        snapshots.update(NS, SN, Info(Kind.ACTIVE, ""))
    assert snapshots.stat(NS, SN, "k").labels == {"containerd.io/snapshot/x": "1"}


def test_walk_filters_on_name_parent_kind_and_labels(snapshots: SnapshotMetadata) -> None:
    chain(snapshots, "base", labels={"tier": "os"})
    snapshots.prepare(NS, SN, "work", "base", {"tier": "app"})
    snapshots.view(NS, SN, "look", "base")

    def walked(*expressions: str) -> list[str]:
        return [info.name for info in snapshots.walk(NS, SN, expressions)]

    assert walked() == ["base", "look", "work"]
    assert walked("kind==committed") == ["base"]
    assert walked("kind==view", "kind==active") == ["look", "work"]
    assert walked("parent==base") == ["look", "work"]
    assert walked("labels.tier==app") == ["work"]
    assert walked("name~=^wo", "labels.tier==os") == ["base", "work"]
    with pytest.raises(InvalidArgument):
        snapshots.walk(NS, SN, ["kind=="])
    assert list(snapshots.walk("empty", SN)) == []


def test_remove_drops_the_record_only_and_refuses_a_parent(
    snapshots: SnapshotMetadata, backend: MemorySnapshotter
) -> None:
    chain(snapshots, "base")
    snapshots.prepare(NS, SN, "work", "base")
    with pytest.raises(FailedPrecondition, match=r"^cannot remove snapshot with child: failed precondition$"):
        snapshots.remove(NS, SN, "base")
    snapshots.remove(NS, SN, "work")
    with pytest.raises(NotFound):
        snapshots.remove(NS, SN, "work")
    assert "default/3/work" in backend.snapshots  # until gc
    snapshots.remove(NS, SN, "base")
    assert list(snapshots.walk(NS, SN)) == []


# -- leases --------------------------------------------------------------------------------------


def test_leases_hold_what_leased_calls_create(store: MetadataStore, snapshots: SnapshotMetadata) -> None:
    leases = LeaseStore(store)
    leases.create(NS, "pull")
    snapshots.prepare(NS, SN, "extract", lease="pull")
    assert leases.list_resources(NS, "pull") == [LeaseResource("extract", f"snapshots/{SN}")]
    snapshots.commit(NS, SN, "layer", "extract", lease="pull")
    assert leases.list_resources(NS, "pull") == [LeaseResource("layer", f"snapshots/{SN}")]
    snapshots.view(NS, SN, "look", "layer", lease="pull")
    snapshots.remove(NS, SN, "look", lease="pull")
    assert leases.list_resources(NS, "pull") == [LeaseResource("layer", f"snapshots/{SN}")]
    with pytest.raises(NotFound, match=r'lease "missing": not found'):
        snapshots.prepare(NS, SN, "x", lease="missing")
    with pytest.raises(NotFound):
        snapshots.stat(NS, SN, "x")


# -- garbage collection --------------------------------------------------------------------------


def test_gc_keeps_rooted_leased_and_referenced_snapshots_with_their_parents(
    store: MetadataStore, snapshots: SnapshotMetadata, backend: MemorySnapshotter
) -> None:
    chain(snapshots, "l1", "l2")
    snapshots.prepare(NS, SN, "rooted", "l2", ROOT)  # keeps l2 and l1
    chain(snapshots, "x1", "x2")
    snapshots.prepare(NS, SN, "pointer", labels={**ROOT, f"containerd.io/gc.ref.snapshot.{SN}/1": "x2"})
    LeaseStore(store).create(NS, "hold")
    snapshots.view(NS, SN, "leased", "", lease="hold")
    chain(snapshots, "u1", "u2", "u3")  # nothing keeps these
    snapshots.prepare("other", SN, "lonely")

    assert collect(snapshots) == [snap("u1"), snap("u2"), snap("u3"), snap("lonely", "other")]
    assert [i.name for i in snapshots.walk(NS, SN)] == ["l1", "l2", "leased", "pointer", "rooted", "x1", "x2"]
    removed = [key.rpartition("/")[2] for key in backend.removed]
    assert sorted(removed) == ["lonely", "u1", "u2", "u3"]
    assert removed.index("u3") < removed.index("u2") < removed.index("u1")  # leaves first
    assert len(backend.snapshots) == 7 and backend.cleanups == 1
    assert collect(snapshots) == [] and backend.cleanups == 1  # nothing to do: no cleanup either


def test_gc_removes_backend_snapshots_of_removed_records_leaf_first(
    snapshots: SnapshotMetadata, backend: MemorySnapshotter
) -> None:
    chain(snapshots, "a", "b", "c", labels=ROOT)
    for name in ("c", "b", "a"):
        snapshots.remove(NS, SN, name)
    assert len(backend.snapshots) == 3
    assert collect(snapshots) == [
        Resource(f"snapshot/{SN}", "", key) for key in ("default/2/a", "default/4/b", "default/6/c")
    ]
    assert backend.removed == ["default/6/c", "default/4/b", "default/2/a"] and backend.snapshots == {}


def test_gc_sweeps_backend_snapshots_left_without_record(
    snapshots: SnapshotMetadata, backend: MemorySnapshotter
) -> None:
    chain(snapshots, "kept", labels=ROOT)
    backend.prepare("default/99/crashed")  # as if the daemon died before recording it
    assert collect(snapshots) == [Resource(f"snapshot/{SN}", "", "default/99/crashed")]
    assert list(backend.snapshots) == ["default/2/kept"]


def test_gc_of_one_snapshotter_leaves_the_others_alone(store: MetadataStore) -> None:
    one, two = MemorySnapshotter(), MemorySnapshotter()
    snapshots = SnapshotMetadata(store, {"one": one, "two": two})
    snapshots.prepare(NS, "one", "k")
    snapshots.prepare(NS, "two", "k")
    assert collect(snapshots, "one") == [Resource("snapshot/one", NS, "k")]
    assert one.snapshots == {} and len(two.snapshots) == 1


def test_gc_keeps_a_snapshot_that_content_labels_reference(store: MetadataStore, snapshots: SnapshotMetadata) -> None:
    snapshots.prepare(NS, SN, "referenced")
    edges = {Resource("content", NS, "config"): [snap("referenced")]}

    class Content:
        types = ("content",)

        def roots(self) -> list[Resource]:
            return list(edges)

        def references(self, resource: Resource) -> list[Resource]:
            return edges.get(resource, [])

        def all(self) -> list[Resource]:
            return list(edges)

        def remove(self, resources: Sequence[Resource]) -> list[Resource]:
            return []

    hooks = new_plugin_manager()
    hooks.register(Kinds(SnapshotKind(snapshots, SN), Content()))
    assert Collector(hooks, store).collect().removed == []


def test_cleanup_calls_the_backend_under_the_gc_lock(
    store: MetadataStore, snapshots: SnapshotMetadata, backend: MemorySnapshotter
) -> None:
    owned = []
    backend.cleanup = lambda: owned.append(store.gc_lock._is_owned())  # type: ignore[method-assign]
    snapshots.cleanup(SN)
    assert owned == [True]


# -- over the real overlay snapshotter ----------------------------------------------------------


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Snapshotter]:
    from plugins.snapshot_overlay import OverlaySnapshotter

    snapshotter = OverlaySnapshotter(tmp_path / "overlay")
    yield snapshotter
    snapshotter.close()


def layer(snapshots: SnapshotMetadata, name: str, parent: str, files: dict[str, str], **options: Any) -> None:
    """Prepare, write ``files`` through the mounts, commit (or rebase onto ``parent`` when ``rebase``)."""
    from core.mount import temp_mount

    rebase = options.pop("rebase", False)
    labels = {LABEL_REBASE: "true"} if rebase else None
    mounts = snapshots.prepare(NS, "overlayfs", f"{name}-active", "" if rebase else parent, labels)
    with temp_mount(mounts) as root:
        for path, text in files.items():
            (root / path).write_text(text)
    if rebase:
        snapshots.rebase(NS, "overlayfs", name, f"{name}-active", parent, **options)
    else:
        snapshots.commit(NS, "overlayfs", name, f"{name}-active", **options)


def test_over_overlay_layers_stack_and_rebase_puts_a_layer_on_its_parent(
    store: MetadataStore, overlay: Snapshotter
) -> None:
    from core.mount import temp_mount

    snapshots = SnapshotMetadata(store, {"overlayfs": overlay})
    layer(snapshots, "l1", "", {"a": "1"})
    layer(snapshots, "l2", "l1", {"b": "2"})
    layer(snapshots, "l3", "l2", {"c": "3", "a": "changed"}, rebase=True)
    assert snapshots.stat(NS, "overlayfs", "l3").parent == "l2"
    with temp_mount(snapshots.view(NS, "overlayfs", "look", "l3")) as root:
        assert {p.name: p.read_text() for p in root.iterdir()} == {"a": "changed", "b": "2", "c": "3"}
    assert snapshots.usage(NS, "overlayfs", "l2").inodes >= 2


def test_over_overlay_gc_removes_unreferenced_layers_and_their_directories(
    store: MetadataStore, overlay: Snapshotter, tmp_path: Path
) -> None:
    snapshots = SnapshotMetadata(store, {"overlayfs": overlay})
    layer(snapshots, "kept", "", {"k": "1"}, labels=ROOT)
    layer(snapshots, "u1", "kept", {"x": "1"})
    layer(snapshots, "u2", "u1", {"y": "2"})
    overlay.prepare("default/999/crashed")
    assert len(list((tmp_path / "overlay" / "snapshots").iterdir())) == 4
    assert collect(snapshots, "overlayfs") == [
        Resource("snapshot/overlayfs", "", "default/999/crashed"),
        Resource("snapshot/overlayfs", NS, "u1"),
        Resource("snapshot/overlayfs", NS, "u2"),
    ]
    assert [info.name for info in overlay.walk()] == ["default/2/kept"]
    assert len(list((tmp_path / "overlay" / "snapshots").iterdir())) == 1
