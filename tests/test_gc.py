"""Garbage collection: the collector over in-test resource kinds, the scheduler, and the gc plugin.

The kinds here are dict-backed graphs contributed through the real ``containerkit_gc_kinds`` hook
of a real pluggy manager; the metadata store (for its ``gc_lock``) and the plugin loader are real.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pluggy
import pytest
from stevedore.extension import Extension

from core import gc
from core.config import Config, ConfigError
from core.errors import FailedPrecondition, Unavailable
from core.events import Exchange
from core.gc import Collector, GarbageCollector, GcScheduler, GcStats, Resource, ResourceKind
from core.hookspecs import hookimpl, new_plugin_manager
from core.loader import PluginLoader
from core.metadata import MetadataStore
from core.plugin import Registration, Status

NS = "default"


def content(digest: str, namespace: str = NS) -> Resource:
    return Resource("content", namespace, digest)


def image(name: str, namespace: str = NS) -> Resource:
    return Resource("image", namespace, name)


def snapshot(key: str, namespace: str = NS) -> Resource:
    return Resource("snapshot/overlayfs", namespace, key)


class DictKind:
    """A ResourceKind over an in-memory graph: ``existing`` resources, ``edges`` and ``rooted`` ones."""

    def __init__(
        self,
        types: tuple[str, ...],
        existing: Iterable[Resource] = (),
        edges: dict[Resource, list[Resource]] | None = None,
        rooted: Iterable[Resource] = (),
    ) -> None:
        self.types = types
        self.existing = set(existing)
        self.edges = edges or {}
        self.rooted = set(rooted)
        self.reference_calls: list[Resource] = []
        self.remove_calls = 0

    def roots(self) -> Iterable[Resource]:
        return sorted(self.rooted & self.existing)

    def references(self, resource: Resource) -> Iterable[Resource]:
        self.reference_calls.append(resource)
        return self.edges.get(resource, [])

    def all(self) -> Iterable[Resource]:
        return sorted(self.existing)

    def remove(self, resources: Sequence[Resource]) -> list[Resource]:
        self.remove_calls += 1
        gone = [r for r in resources if r in self.existing]
        self.existing -= set(gone)
        return gone


class KindsPlugin:
    """A plugin instance contributing ``kinds`` through the hook."""

    def __init__(self, *kinds: object) -> None:
        self.kinds = list(kinds)

    @hookimpl
    def containerkit_gc_kinds(self) -> list[Any]:
        return self.kinds


@pytest.fixture
def metadata(tmp_path: Path) -> Iterator[MetadataStore]:
    store = MetadataStore(tmp_path / "meta.db")
    yield store
    store.close()


@pytest.fixture
def hooks() -> pluggy.PluginManager:
    return new_plugin_manager()


def collector_of(hooks: pluggy.PluginManager, metadata: MetadataStore, *kinds: object, **kwargs: Any) -> Collector:
    """A collector over ``kinds``, each contributed by its own plugin."""
    for index, kind in enumerate(kinds):
        hooks.register(KindsPlugin(kind), name=f"kinds{index}")
    return Collector(hooks, metadata, **kwargs)


def test_an_in_test_kind_satisfies_the_protocol():
    assert isinstance(DictKind(("content",)), ResourceKind)


def test_resources_are_ordered_values():
    assert sorted([content("b"), image("a"), content("a")]) == [content("a"), content("b"), image("a")]
    assert content("a") == Resource("content", NS, "a") and len({content("a"), content("a")}) == 1


# -- mark and sweep --------------------------------------------------------------------------------


def test_referenced_resources_survive_and_unreferenced_ones_are_removed(hooks, metadata):
    images = DictKind(("image",), [image("app")], {image("app"): [content("index")]}, rooted=[image("app")])
    blobs = DictKind(
        ("content", "ingest"),
        [content("index"), content("layer"), content("orphan"), Resource("ingest", NS, "pull-1")],
        {content("index"): [content("layer")]},
    )
    stats = collector_of(hooks, metadata, images, blobs).collect()
    assert sorted(stats.removed) == [content("orphan"), Resource("ingest", NS, "pull-1")]
    assert blobs.existing == {content("index"), content("layer")}
    assert images.existing == {image("app")}
    assert stats.marked == 3 and stats.errors == []
    assert isinstance(stats, GcStats) and stats.duration >= 0


def test_nothing_is_removed_when_everything_is_reachable(hooks, metadata):
    blobs = DictKind(("content",), [content("a"), content("b")], {content("a"): [content("b")]}, rooted=[content("a")])
    stats = collector_of(hooks, metadata, blobs).collect()
    assert stats.removed == [] and blobs.remove_calls == 0


def test_references_are_followed_across_kinds_and_namespaces_stay_apart(hooks, metadata):
    leases = DictKind(
        ("lease",),
        [Resource("lease", NS, "pull")],
        {Resource("lease", NS, "pull"): [content("config"), snapshot("sha256:layer")]},
        rooted=[Resource("lease", NS, "pull")],
    )
    blobs = DictKind(
        ("content",),
        [content("config"), content("label-target"), content("config", "other")],
        {content("config"): [content("label-target")]},
    )
    snapshots = DictKind(
        ("snapshot/overlayfs",),
        [snapshot("sha256:layer"), snapshot("sha256:parent"), snapshot("sha256:stale")],
        {snapshot("sha256:layer"): [snapshot("sha256:parent")]},
    )
    stats = collector_of(hooks, metadata, leases, blobs, snapshots).collect()
    assert sorted(stats.removed) == [content("config", "other"), snapshot("sha256:stale")]


def test_reference_cycles_are_followed_once_and_unrooted_cycles_are_removed(hooks, metadata):
    edges = {
        content("a"): [content("b")],
        content("b"): [content("a"), content("b")],
        content("x"): [content("y")],
        content("y"): [content("x")],
    }
    blobs = DictKind(("content",), edges, edges, rooted=[content("a")])
    stats = collector_of(hooks, metadata, blobs).collect()
    assert sorted(blobs.reference_calls) == [content("a"), content("b")]
    assert sorted(stats.removed) == [content("x"), content("y")]


def test_references_to_types_no_kind_owns_are_ignored(hooks, metadata, caplog):
    blobs = DictKind(
        ("content",),
        [content("config"), content("unused")],
        {content("config"): [snapshot("k1"), snapshot("k2")]},
        rooted=[content("config")],
    )
    with caplog.at_level(logging.DEBUG, logger="containerkit.gc"):
        stats = collector_of(hooks, metadata, blobs).collect()
    assert stats.removed == [content("unused")] and stats.errors == []
    unowned = [r for r in caplog.records if "no kind owns type 'snapshot/overlayfs'" in r.getMessage()]
    assert len(unowned) == 1 and unowned[0].levelno == logging.DEBUG


class FailingRemove(DictKind):
    def remove(self, resources: Sequence[Resource]) -> list[Resource]:
        raise OSError("disk on fire")


def test_a_kind_whose_remove_raises_is_in_errors_and_other_kinds_are_still_swept(hooks, metadata):
    broken = FailingRemove(("snapshot/overlayfs",), [snapshot("k")])
    blobs = DictKind(("content",), [content("orphan")])
    stats = collector_of(hooks, metadata, broken, blobs).collect()
    assert stats.removed == [content("orphan")] and blobs.existing == set()
    assert len(stats.errors) == 1
    assert "FailingRemove('snapshot/overlayfs',)" in stats.errors[0] and "OSError: disk on fire" in stats.errors[0]


class FailingAll(DictKind):
    def all(self) -> Iterable[Resource]:
        raise RuntimeError("table missing")


def test_a_kind_whose_all_raises_is_in_errors_and_other_kinds_are_still_swept(hooks, metadata):
    stats = collector_of(hooks, metadata, FailingAll(("image",)), DictKind(("content",), [content("orphan")])).collect()
    assert stats.removed == [content("orphan")]
    assert stats.errors == ["FailingAll('image',): RuntimeError: table missing"]


class FailingRoots(DictKind):
    def roots(self) -> Iterable[Resource]:
        raise RuntimeError("cannot read leases")


def test_a_failing_roots_aborts_the_collection_before_anything_is_removed(hooks, metadata):
    blobs = DictKind(("content",), [content("maybe-leased")])
    collector = collector_of(hooks, metadata, blobs, FailingRoots(("lease",)))
    with pytest.raises(RuntimeError, match="cannot read leases") as raised:
        collector.collect()
    assert any("FailingRoots('lease',).roots() failed" in note for note in raised.value.__notes__)
    assert blobs.existing == {content("maybe-leased")} and blobs.remove_calls == 0


def test_two_kinds_claiming_one_type_refuse_the_collection(hooks, metadata):
    first = DictKind(("content", "ingest"), [content("orphan")])
    second = DictKind(("ingest",), [Resource("ingest", NS, "r")])
    collector = collector_of(hooks, metadata, first, second)
    with pytest.raises(FailedPrecondition) as raised:
        collector.collect()
    message = str(raised.value)
    assert "'ingest' is claimed by" in message and "of kinds0" in message and "of kinds1" in message
    assert first.existing == {content("orphan")} and first.remove_calls == second.remove_calls == 0


def test_one_kind_may_own_several_types_and_is_swept_once(hooks, metadata):
    blobs = DictKind(("content", "ingest"), [content("orphan"), Resource("ingest", NS, "r")])
    stats = collector_of(hooks, metadata, blobs).collect()
    assert len(stats.removed) == 2 and blobs.remove_calls == 1


def test_a_kind_owning_no_type_still_contributes_roots(hooks, metadata):
    containers = DictKind(())
    containers.roots = lambda: [snapshot("web-rootfs")]  # type: ignore[method-assign]
    snapshots = DictKind(("snapshot/overlayfs",), [snapshot("web-rootfs"), snapshot("old")])
    stats = collector_of(hooks, metadata, containers, snapshots).collect()
    assert stats.removed == [snapshot("old")] and containers.remove_calls == 0


def test_a_plugin_may_contribute_no_kinds(hooks, metadata):
    hooks.register(KindsPlugin(), name="empty")
    stats = Collector(hooks, metadata).collect()
    assert (stats.marked, stats.removed, stats.errors) == (0, [], [])


class LockChecking(DictKind):
    def __init__(self, lock: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = lock
        self.owned: list[bool] = []

    def roots(self) -> Iterable[Resource]:
        self.owned.append(self.lock._is_owned())
        return super().roots()

    def all(self) -> Iterable[Resource]:
        self.owned.append(self.lock._is_owned())
        return super().all()

    def remove(self, resources: Sequence[Resource]) -> list[Resource]:
        self.owned.append(self.lock._is_owned())
        return super().remove(resources)


def test_collect_holds_the_metadata_gc_lock_from_mark_to_sweep(hooks, metadata):
    kind = LockChecking(metadata.gc_lock, ("content",), [content("orphan")])
    removed_with_lock: list[bool] = []
    collector = collector_of(
        hooks, metadata, kind, on_removed=lambda r: removed_with_lock.append(metadata.gc_lock._is_owned())
    )
    collector.collect()
    assert kind.owned == [True, True, True]
    assert removed_with_lock == [False]  # reporting happens after the lock is released


def test_removed_resources_are_logged_and_reported_even_if_reporting_fails(hooks, metadata, caplog):
    reported: list[Resource] = []

    def report(resource: Resource) -> None:
        reported.append(resource)
        raise ValueError("subscriber gone")

    blobs = DictKind(("content",), [content("sha256:aa"), content("sha256:bb")])
    with caplog.at_level(logging.INFO, logger="containerkit.gc"):
        stats = collector_of(hooks, metadata, blobs, on_removed=report).collect()
    assert reported == stats.removed == [content("sha256:aa"), content("sha256:bb")]
    messages = [r.getMessage() for r in caplog.records]
    assert "gc: removed content sha256:aa in namespace default" in messages
    assert any(m.startswith("gc: marked 0, removed 2, 0 errors in ") for m in messages)


def test_ten_thousand_blobs_are_swept_in_one_batch(hooks, metadata):
    blobs = [content(f"sha256:{i:064x}") for i in range(10_000)]
    images = DictKind(("image",), [image("big")], {image("big"): blobs[::2]}, rooted=[image("big")])
    store = DictKind(("content",), blobs)
    stats = collector_of(hooks, metadata, images, store).collect()
    assert len(stats.removed) == 5_000 and store.remove_calls == 1
    assert stats.marked == 5_001


# -- scheduler -------------------------------------------------------------------------------------


class CountingCollector(Collector):
    """Counts collections, each of which fails if ``fail``."""

    def __init__(self, fail: bool = False) -> None:
        self.runs = 0
        self.fail = fail

    def collect(self) -> GcStats:
        self.runs += 1
        if self.fail:
            raise RuntimeError("boom")
        return GcStats(marked=self.runs)


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture
def schedulers() -> Iterator[Callable[..., GcScheduler]]:
    made: list[GcScheduler] = []

    def make(collector: Collector, **kwargs: float) -> GcScheduler:
        kwargs = {"interval_seconds": 0, "delay_seconds": 0, "startup_delay_seconds": 3600, **kwargs}
        made.append(GcScheduler(collector, **kwargs))
        return made[-1]

    yield make
    for scheduler in made:
        scheduler.close()


def test_many_schedule_calls_lead_to_one_collection(schedulers):
    collector = CountingCollector()
    scheduler = schedulers(collector, delay_seconds=0.5)
    for _ in range(50):
        scheduler.schedule()
    assert eventually(lambda: collector.runs >= 1)
    time.sleep(0.7)
    assert collector.runs == 1
    scheduler.schedule()
    assert eventually(lambda: collector.runs == 2)


def test_collect_now_runs_synchronously_and_returns_the_stats(schedulers):
    collector = CountingCollector()
    scheduler = schedulers(collector)
    assert isinstance(scheduler, GarbageCollector)
    assert scheduler.collect_now() == GcStats(marked=1)
    assert collector.runs == 1


def test_collections_run_periodically_and_never_overlap_collect_now(hooks, metadata, schedulers):
    active: list[int] = []
    overlapped: list[bool] = []
    threads: list[str] = []

    class Watching(DictKind):
        def all(self) -> Iterable[Resource]:
            active.append(1)
            overlapped.append(len(active) > 1)
            threads.append(threading.current_thread().name)
            time.sleep(0.001)
            active.pop()
            return super().all()

    scheduler = schedulers(
        collector_of(hooks, metadata, Watching(("content",))), interval_seconds=0.01, startup_delay_seconds=0
    )
    for _ in range(20):
        scheduler.collect_now()
    assert eventually(lambda: threads.count("containerkit-gc") >= 3)
    assert threads.count(threading.current_thread().name) == 20
    assert not any(overlapped)


def test_a_collection_runs_once_shortly_after_start(schedulers):
    collector = CountingCollector()
    schedulers(collector, startup_delay_seconds=0.01)
    assert eventually(lambda: collector.runs == 1)


def test_a_failing_collection_is_logged_and_the_schedule_goes_on(schedulers, caplog):
    collector = CountingCollector(fail=True)
    with caplog.at_level(logging.ERROR, logger="containerkit.gc"):
        schedulers(collector, interval_seconds=0.01, startup_delay_seconds=0)
        assert eventually(lambda: collector.runs >= 2)
    assert any(r.getMessage() == "gc: collection failed" for r in caplog.records)


def test_close_stops_the_thread_and_later_calls(schedulers):
    collector = CountingCollector()
    scheduler = schedulers(collector, interval_seconds=3600)
    scheduler.close()
    assert not scheduler._thread.is_alive()
    scheduler.schedule()  # a no-op
    with pytest.raises(Unavailable):
        scheduler.collect_now()
    scheduler.close()  # idempotent
    assert collector.runs == 0


def test_negative_delays_are_rejected():
    with pytest.raises(ValueError):
        GcScheduler(CountingCollector(), interval_seconds=-1, delay_seconds=0)


@pytest.mark.parametrize("threshold", [0, -0.02, 0.6])
def test_a_pause_threshold_out_of_range_is_rejected(threshold):
    with pytest.raises(ValueError, match="pause_threshold"):
        GcScheduler(CountingCollector(), interval_seconds=0, delay_seconds=0, pause_threshold=threshold)


class SlowCollector(CountingCollector):
    """A collection takes at least ``seconds``; records when each started (monotonic)."""

    def __init__(self, seconds: float = 0.05) -> None:
        super().__init__()
        self.seconds = seconds
        self.starts: list[float] = []

    def collect(self) -> GcStats:
        self.starts.append(time.monotonic())
        time.sleep(self.seconds)
        return super().collect()


def test_a_scheduled_collection_waits_duration_over_pause_threshold_after_the_previous_start(schedulers):
    collector = SlowCollector(0.05)
    scheduler = schedulers(collector, pause_threshold=0.1)
    scheduler.schedule()
    assert eventually(lambda: collector.runs == 1)
    for _ in range(10):  # still coalesce while held back
        scheduler.schedule()
    assert eventually(lambda: collector.runs == 2)
    # the first took >= 0.05 s, so the second may not start before 0.05 / 0.1 = 0.5 s after it
    assert collector.starts[1] - collector.starts[0] >= 0.49
    assert scheduler._requested_at is None  # the ten calls were one request, which that run served


def test_collect_now_is_not_throttled_but_counts_as_the_previous_collection(schedulers):
    collector = SlowCollector(0.05)
    scheduler = schedulers(collector, pause_threshold=0.0001)  # a collection holds the next off >= 500 s
    scheduler.collect_now()
    assert scheduler.collect_now() == GcStats(marked=2)  # at once: a throttled one would wait 500 s
    scheduler.schedule()
    time.sleep(0.3)
    assert collector.runs == 2  # the scheduled one waits for the throttle


def test_the_startup_collection_counts_as_the_previous_collection(schedulers):
    collector = SlowCollector(0.05)
    scheduler = schedulers(collector, startup_delay_seconds=0, pause_threshold=0.0001)
    assert eventually(lambda: collector.runs == 1)
    scheduler.schedule()
    time.sleep(0.3)
    assert collector.runs == 1


# -- the plugin ------------------------------------------------------------------------------------


def load_gc(tmp_path: Path, metadata: MetadataStore, *others: tuple[str, Any], **table: Any) -> PluginLoader:
    hooks = new_plugin_manager()
    by_type: dict[str, list[Extension]] = {"gc": [Extension("scheduler", None, gc.plugin, None)]}
    for name, registration in others:
        type_name, plugin_id = name.split(".", 1)
        by_type.setdefault(type_name, []).append(Extension(plugin_id, None, registration, None))
    config = Config(root=tmp_path / "root", state=tmp_path / "state", plugins={"gc": {"scheduler": table}})
    loader = PluginLoader(config, metadata=metadata, hooks=hooks, events=Exchange(hooks), extensions=by_type)
    loader.load()
    return loader


class KindsService(KindsPlugin):
    def close(self) -> None:
        pass


def test_the_gc_plugin_loads_and_collects_what_loaded_plugins_contribute(tmp_path, metadata):
    blobs = DictKind(("content",), [content("orphan")])
    loader = load_gc(
        tmp_path,
        metadata,
        ("service.blobs", Registration(init=lambda ctx: KindsService(blobs))),
        startup_delay_seconds=3600,
    )
    try:
        record = loader.records["gc.scheduler"]
        assert record.status is Status.OK, record.reason
        assert isinstance(record.instance, GarbageCollector)
        assert record.exports == {
            "interval_seconds": "300.0",
            "delay_after_delete_seconds": "0.1",
            "pause_threshold": "0.02",
        }
        assert record.instance.collect_now().removed == [content("orphan")]
    finally:
        loader.close()
    assert not record.instance._thread.is_alive()


def test_content_removed_from_a_namespace_is_published_as_content_delete(tmp_path, metadata):
    content_pb2 = pytest.importorskip("core.api.containerd.events.content_pb2")

    blobs = DictKind(("content",), [content("sha256:00", namespace=""), content("sha256:aa")])
    loader = load_gc(tmp_path, metadata, ("service.blobs", Registration(init=lambda ctx: KindsService(blobs))))
    try:
        subscription = loader.events.subscribe()
        loader.records["gc.scheduler"].instance.collect_now()
        envelope = subscription.get(timeout=10)
        assert envelope is not None and (envelope.namespace, envelope.topic) == (NS, "/content/delete")
        assert envelope.event == content_pb2.ContentDelete(digest="sha256:aa")
        assert subscription.get(timeout=0.2) is None  # nothing for the blob no namespace held
    finally:
        loader.close()


def test_a_snapshot_removed_from_a_namespace_is_published_as_snapshot_remove(tmp_path, metadata):
    from core.api.containerd.events import snapshot_pb2

    snapshots = DictKind(("snapshot/overlayfs",), [Resource("snapshot/overlayfs", NS, "layer-1")])
    loader = load_gc(tmp_path, metadata, ("service.snaps", Registration(init=lambda ctx: KindsService(snapshots))))
    try:
        subscription = loader.events.subscribe()
        loader.records["gc.scheduler"].instance.collect_now()
        envelope = subscription.get(timeout=10)
        assert envelope is not None and (envelope.namespace, envelope.topic) == (NS, "/snapshot/remove")
        assert envelope.event == snapshot_pb2.SnapshotRemove(key="layer-1")
    finally:
        loader.close()


def test_a_negative_interval_is_a_config_error(tmp_path, metadata):
    with pytest.raises(ConfigError, match=r"plugins\.gc\.scheduler: interval_seconds must not be negative"):
        load_gc(tmp_path, metadata, interval_seconds=-1)


@pytest.mark.parametrize("threshold", [0, -0.1, 0.6])
def test_a_pause_threshold_out_of_range_is_a_config_error(tmp_path, metadata, threshold):
    with pytest.raises(
        ConfigError, match=r"plugins\.gc\.scheduler: pause_threshold must be greater than 0 and at most 0\.5"
    ):
        load_gc(tmp_path, metadata, pause_threshold=threshold)


def test_the_pause_threshold_is_configurable(tmp_path, metadata):
    loader = load_gc(tmp_path, metadata, pause_threshold=0.5, startup_delay_seconds=3600)
    try:
        record = loader.records["gc.scheduler"]
        assert record.status is Status.OK, record.reason
        assert record.exports["pause_threshold"] == "0.5"
        assert record.instance._pause_threshold == 0.5
    finally:
        loader.close()
