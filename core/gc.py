"""Garbage collection: a generic mark-and-sweep collector over resource kinds that plugins contribute.

Every component that owns collectable resources (the content, image and lease metadata, a
snapshotter, ...) describes them as a :class:`ResourceKind` and hands it over through the
``containerkit_gc_kinds`` hook (:mod:`core.hookspecs`). A collection marks everything reachable from
the kinds' roots, following references across kinds, then asks each kind to remove its unmarked
resources. The ``gc`` plugin :data:`plugin` (id ``scheduler``) runs collections in a background
thread: periodically, shortly after start, and soon after a service calls
:meth:`GarbageCollector.schedule` following a deletion. Since a collection blocks every metadata
write, those requested ones are spaced out so that collecting takes at most ``pause_threshold`` of
the time (containerd's rule; see :class:`GcScheduler`).

As in containerd, a collection is all-or-nothing where safety is at stake: anything that makes the
mark phase incomplete (a hook or ``roots``/``references`` raising, two kinds claiming one type)
aborts it before anything is removed. In the sweep phase a failing kind is recorded in
:attr:`GcStats.errors` and does not stop the others.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from core.config import ConfigError
from core.errors import FailedPrecondition, Unavailable
from core.plugin import InitContext, Registration

if TYPE_CHECKING:
    import pluggy

    from core.events import Exchange
    from core.metadata import MetadataStore

__all__ = [
    "Collector",
    "GarbageCollector",
    "GcConfig",
    "GcScheduler",
    "GcStats",
    "Resource",
    "ResourceKind",
    "plugin",
]

log = logging.getLogger("containerkit.gc")


@dataclass(frozen=True, order=True)
class Resource:
    """One collectable object: ``type`` ("content", "ingest", "image", "lease",
    "snapshot/<snapshotter>", ...), the ``namespace`` it lives in, and its ``id``
    (a digest, a ref, a name, a key)."""

    type: str
    namespace: str
    id: str


@runtime_checkable
class ResourceKind(Protocol):
    """The collector's view of the resources of some ``types``, contributed via the
    ``containerkit_gc_kinds`` hook.

    Every method is called with :attr:`MetadataStore.gc_lock` held, on the collector's thread. In
    one collection, :meth:`roots` is called once on every kind before any :meth:`references`, so a
    kind may load all its edges in one query there and answer :meth:`references` from memory;
    :meth:`all` and :meth:`remove` follow once marking is over.

    A kind may also have ``finish_removal() -> list[Resource]``, called once the lock is released (on
    the same thread, before the collection returns; one at a time): for slow work such as deleting the
    files of what :meth:`remove` unrecorded, which would otherwise hold every metadata writer off. It
    returns further resources it removed; an exception it raises is a sweep error.
    """

    types: tuple[str, ...]
    """The resource types this kind owns; no other kind may claim one of them."""

    def roots(self) -> Iterable[Resource]:
        """Resources that are always live (images, unexpired leases, gc.root-labelled objects), of any type."""
        ...

    def references(self, resource: Resource) -> Iterable[Resource]:
        """Out-edges of ``resource`` (one of this kind's types); the targets may be of any type."""
        ...

    def all(self) -> Iterable[Resource]:
        """Every existing resource of this kind's types: the sweep candidates."""
        ...

    def remove(self, resources: Sequence[Resource]) -> list[Resource]:
        """Delete ``resources`` (unreferenced, of this kind's types); return those actually removed.
        A failure on one must not stop the others (log it)."""
        ...


@dataclass(frozen=True)
class GcStats:
    """What one collection did: how many resources it found live (``marked``), what it ``removed``,
    the sweep ``errors`` (one line each) and how long it took, in seconds."""

    marked: int = 0
    removed: list[Resource] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    duration: float = 0.0


class GarbageCollector(ABC):
    """The interface of a ``gc`` plugin.

    Services that delete things call :meth:`schedule` afterwards, and may look the collector up
    optionally (``ctx.get_all("gc")``) so that a disabled gc plugin does not fail them.
    """

    @abstractmethod
    def schedule(self) -> None:
        """Ask for a collection soon; returns at once. Calls close together lead to one collection,
        which starts after the last of them was made. It may be deferred to bound the time spent
        collecting; use :meth:`collect_now` to collect at once."""

    @abstractmethod
    def collect_now(self) -> GcStats:
        """Run one full collection on the calling thread and return what it did (``images delete
        --sync``). Raises what an aborted collection raises (see :meth:`Collector.collect`), and
        Unavailable once closed."""

    @abstractmethod
    def close(self) -> None:
        """Stop collecting; a collection in progress is finished first. Idempotent."""


class Collector:
    """Mark and sweep over the kinds that ``hooks`` contribute, under ``metadata.gc_lock``.

    ``on_removed`` is called with every removed resource once the collection is over (outside the
    lock); an exception it raises is logged only.
    """

    def __init__(
        self,
        hooks: pluggy.PluginManager,
        metadata: MetadataStore,
        on_removed: Callable[[Resource], None] | None = None,
    ) -> None:
        self._hooks = hooks
        self._metadata = metadata
        self._on_removed = on_removed
        self._finishing = threading.Lock()  # one collection's finish_removal phase at a time

    def collect(self) -> GcStats:
        """One collection. Raises FailedPrecondition, removing nothing, when two kinds claim the same
        type; an exception from the hook or from a kind's ``roots``/``references`` propagates, also
        before anything is removed. Failures of ``all``/``remove`` are in the returned ``errors``."""
        started = time.monotonic()
        with self._metadata.gc_lock:
            kinds, owners = self._gather()
            marked = self._mark(kinds, owners)
            removed, errors = self._sweep(kinds, marked)
        with self._finishing:
            for kind in kinds:
                finish = getattr(kind, "finish_removal", None)
                if finish is None:
                    continue
                try:
                    removed.extend(finish())
                except Exception as err:
                    log.exception("gc: finishing the removals of %s failed", _describe("", kind))
                    errors.append(f"{_describe('', kind)}: {type(err).__name__}: {err}")
        stats = GcStats(len(marked), removed, errors, time.monotonic() - started)
        for resource in removed:
            log.info("gc: removed %s %s in namespace %s", resource.type, resource.id, resource.namespace)
            if self._on_removed is not None:
                try:
                    self._on_removed(resource)
                except Exception:
                    log.exception("gc: reporting the removal of %s %s failed", resource.type, resource.id)
        log.log(
            logging.INFO if removed or errors else logging.DEBUG,
            "gc: marked %d, removed %d, %d errors in %.3fs",
            stats.marked,
            len(removed),
            len(errors),
            stats.duration,
        )
        return stats

    def _gather(self) -> tuple[list[ResourceKind], dict[str, ResourceKind]]:
        """Every kind the hook contributes (in hook order), and the kinds by the types they own. A kind
        owning no type still contributes roots."""
        every: list[ResourceKind] = []
        owners: dict[str, tuple[str, ResourceKind]] = {}
        conflicts: list[str] = []
        trace = self._hooks.trace.root.get("hook")  # writes only under CONTAINERKIT_TRACE_HOOKS
        for impl in self._hooks.hook.containerkit_gc_kinds.get_hookimpls():
            trace(f"containerkit_gc_kinds [{impl.plugin_name}]", {})
            try:
                kinds = impl.function() or []
            except Exception as err:
                err.add_note(f"gc: containerkit_gc_kinds of {impl.plugin_name} failed; collection aborted")
                raise
            for kind in kinds:
                every.append(kind)
                for type_ in kind.types:
                    if type_ in owners:
                        claims = (_describe(*owners[type_]), _describe(impl.plugin_name, kind))
                        conflicts.append(f"{type_!r} is claimed by {claims[0]} and {claims[1]}")
                    else:
                        owners[type_] = (impl.plugin_name, kind)
        if conflicts:
            raise FailedPrecondition(
                f"gc refused to collect: {'; '.join(conflicts)} (each resource type must have one owner; "
                "disable one of these plugins)"
            )
        return every, {type_: kind for type_, (_, kind) in owners.items()}

    def _mark(self, kinds: list[ResourceKind], owners: dict[str, ResourceKind]) -> set[Resource]:
        """Everything reachable from the roots of every kind (breadth first; each resource visited once)."""
        marked: set[Resource] = set()
        pending: deque[Resource] = deque()
        for kind in kinds:
            for resource in _calling(kind, "roots"):
                if resource not in marked:
                    marked.add(resource)
                    pending.append(resource)
        unowned: set[str] = set()
        while pending:
            resource = pending.popleft()
            kind = owners.get(resource.type)
            if kind is None:
                if resource.type not in unowned:
                    unowned.add(resource.type)
                    log.debug("gc: no kind owns type %r (e.g. %s); not following it", resource.type, resource)
                continue
            for reference in _calling(kind, "references", resource):
                if reference not in marked:
                    marked.add(reference)
                    pending.append(reference)
        return marked

    def _sweep(self, kinds: list[ResourceKind], marked: set[Resource]) -> tuple[list[Resource], list[str]]:
        removed: list[Resource] = []
        errors: list[str] = []
        for kind in kinds:
            if not kind.types:
                continue
            try:
                candidates = sorted(resource for resource in kind.all() if resource not in marked)
                if candidates:
                    removed.extend(kind.remove(candidates))
            except Exception as err:
                log.exception("gc: sweeping %s failed", _describe("", kind))
                errors.append(f"{_describe('', kind)}: {type(err).__name__}: {err}")
        return removed, errors


def _describe(plugin_name: str, kind: object) -> str:
    what = f"{type(kind).__qualname__}{tuple(getattr(kind, 'types', ()))}"
    return f"{what} of {plugin_name}" if plugin_name else what


def _calling(kind: ResourceKind, method: str, *args: Resource) -> Iterable[Resource]:
    """``kind.method(*args)`` as a list, the kind named in the error if it raises."""
    try:
        return list(getattr(kind, method)(*args))
    except Exception as err:
        err.add_note(f"gc: {_describe('', kind)}.{method}({', '.join(map(str, args))}) failed; collection aborted")
        raise


class GcScheduler(GarbageCollector):
    """Runs ``collector.collect()`` on a daemon thread: ``startup_delay_seconds`` after creation,
    then every ``interval_seconds`` after the previous run (never, if 0), and for :meth:`schedule`
    calls (those made while one is pending join it) at the later of ``delay_seconds`` after the call
    and ``start + duration / pause_threshold`` of the previous collection. That is containerd's
    ``pause_threshold``: as a collection holds every metadata writer off, the collections deletions
    ask for take at most that fraction of the time (a 5 ms collection at 0.02 lets the next start
    250 ms after it started). Every collection, whatever started it and even if it failed, counts as
    the previous one; only scheduled ones wait for the throttle (:meth:`collect_now` never does, and
    periodic and startup runs keep their times). A collection that fails is logged and the schedule
    goes on. Raises ValueError for a negative interval or delay, or a ``pause_threshold`` not in
    (0, 0.5]."""

    def __init__(
        self,
        collector: Collector,
        interval_seconds: float,
        delay_seconds: float,
        startup_delay_seconds: float = 0.0,
        pause_threshold: float = 0.02,
    ) -> None:
        if min(interval_seconds, delay_seconds, startup_delay_seconds) < 0:
            raise ValueError("gc intervals and delays must not be negative")
        if not 0 < pause_threshold <= 0.5:
            raise ValueError(f"gc pause_threshold must be > 0 and <= 0.5 (got {pause_threshold})")
        self._collector = collector
        self._interval = interval_seconds
        self._delay = delay_seconds
        self._pause_threshold = pause_threshold
        self._cond = threading.Condition()
        self._closed = False
        self._requested_at: float | None = None  # monotonic time a scheduled run is due, throttle aside
        self._periodic_at: float | None = time.monotonic() + startup_delay_seconds
        self._last_start: float | None = None  # monotonic start of the latest-started collection
        self._last_duration = 0.0  # ... and how long it took
        self._thread = threading.Thread(target=self._run, name="containerkit-gc", daemon=True)
        self._thread.start()

    def schedule(self) -> None:
        with self._cond:
            if self._closed or self._requested_at is not None:
                return
            self._requested_at = time.monotonic() + self._delay
            self._cond.notify()

    def collect_now(self) -> GcStats:
        with self._cond:
            if self._closed:
                raise Unavailable("the gc scheduler is closed")
            self._requested_at = None  # this run serves every request made so far
        return self._timed(self._collector.collect)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                log.warning("gc: a collection is still running after 30s; not waiting for it")

    def _run(self) -> None:
        while self._wait_until_due():
            try:
                self._timed(self._collector.collect)
            except Exception:
                log.exception("gc: collection failed")
            with self._cond:
                self._periodic_at = time.monotonic() + self._interval if self._interval > 0 else None

    def _timed(self, collect: Callable[[], GcStats]) -> GcStats:
        """``collect()``, recorded (even if it raises) as the previous collection for the throttle
        unless one that started later has been recorded already."""
        started = time.monotonic()
        try:
            return collect()
        finally:
            ended = time.monotonic()
            with self._cond:
                if self._last_start is None or started >= self._last_start:
                    self._last_start, self._last_duration = started, ended - started

    def _request_due(self) -> float | None:
        """When the pending request may run: its own deadline, held back by the throttle; None if none."""
        if self._requested_at is None:
            return None
        if self._last_start is None:
            return self._requested_at
        return max(self._requested_at, self._last_start + self._last_duration / self._pause_threshold)

    def _wait_until_due(self) -> bool:
        """Wait for the next run; False once closed. Clears the pending request the run will serve."""
        with self._cond:
            while not self._closed:
                deadlines = [d for d in (self._request_due(), self._periodic_at) if d is not None]
                remaining = min(deadlines) - time.monotonic() if deadlines else None
                if remaining is not None and remaining <= 0:
                    self._requested_at = None
                    return True
                self._cond.wait(remaining)
            return False


@dataclass
class GcConfig:
    """``[plugins.gc.scheduler]``: seconds between periodic collections (0: none), between a
    deletion's :meth:`~GarbageCollector.schedule` and the collection, and from start to the first
    collection (so leftovers of an interrupted pull do not wait for the interval); and
    ``pause_threshold``, the largest fraction of time that collections requested by deletions may
    take (in (0, 0.5], as containerd's; see :class:`GcScheduler`). ConfigError for a negative time
    or a threshold out of range."""

    interval_seconds: float = 300.0
    delay_after_delete_seconds: float = 0.1
    startup_delay_seconds: float = 1.0
    pause_threshold: float = 0.02

    def __post_init__(self) -> None:
        for name in ("interval_seconds", "delay_after_delete_seconds", "startup_delay_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative (got {getattr(self, name)})")
        if not 0 < self.pause_threshold <= 0.5:
            raise ConfigError(
                f"pause_threshold must be greater than 0 and at most 0.5 (got {self.pause_threshold}); "
                "it is the largest fraction of time garbage collection may take, e.g. 0.02"
            )


# Events for removed resources, where containerd defines one: type -> (module, message, topic, fields).
# containerd's own collector publishes nothing; a blob leaving a namespace is what its content
# service announces as /content/delete, so subscribers learn of GC removals the same way.
_EVENTS: dict[str, tuple[str, str, str, Callable[[Resource], dict[str, str]]]] = {
    "content": ("content_pb2", "ContentDelete", "/content/delete", lambda r: {"digest": r.id}),
    "snapshot": ("snapshot_pb2", "SnapshotRemove", "/snapshot/remove", lambda r: {"key": r.id}),
}


def _publisher(events: Exchange) -> Callable[[Resource], None]:
    """Publishes the containerd event of a removed resource, if its type has one and its message is built."""

    modules: dict[str, Any] = {}  # module name -> module, or None if not built (yet)

    def publish(resource: Resource) -> None:
        known = _EVENTS.get(resource.type.partition("/")[0])
        if known is None or not resource.namespace:  # no tenant to tell (a blob no namespace holds)
            return
        module, message, topic, fields = known
        if module not in modules:
            try:
                modules[module] = importlib.import_module(f"core.api.containerd.events.{module}")
            except ImportError:
                modules[module] = None
        if modules[module] is not None:
            events.publish(resource.namespace, topic, getattr(modules[module], message)(**fields(resource)))

    return publish


def _init(ctx: InitContext) -> GcScheduler:
    config: GcConfig = ctx.config
    ctx.exports.update(
        interval_seconds=str(config.interval_seconds),
        delay_after_delete_seconds=str(config.delay_after_delete_seconds),
        pause_threshold=str(config.pause_threshold),
    )
    collector = Collector(ctx.hooks, ctx.metadata, on_removed=_publisher(ctx.events))
    return GcScheduler(
        collector,
        interval_seconds=config.interval_seconds,
        delay_seconds=config.delay_after_delete_seconds,
        startup_delay_seconds=config.startup_delay_seconds,
        pause_threshold=config.pause_threshold,
    )


plugin = Registration(init=_init, config=GcConfig)
"""The ``gc`` plugin ``scheduler``: a :class:`GcScheduler` over every kind the hook contributes."""
