"""The event exchange: services publish what happened; subscribers and hook observers receive it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pluggy

log = logging.getLogger("containerkit.events")


@dataclass(frozen=True)
class Envelope:
    """One published event: when, in which namespace, under which topic, and the protobuf message."""

    timestamp: float
    namespace: str
    topic: str
    event: Any


class Subscription:
    """An iterator over events published after it was created; ``close()`` ends it."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self._queue: queue.Queue[Envelope | None] = queue.Queue()

    def _deliver(self, envelope: Envelope | None) -> None:
        self._queue.put(envelope)

    def get(self, timeout: float | None = None) -> Envelope | None:
        """The next event, or ``None`` once closed (every time) or after ``timeout`` seconds without one."""
        try:
            envelope = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if envelope is None:
            self._queue.put(None)  # stay closed for every later get and iteration
        return envelope

    def __iter__(self) -> Iterator[Envelope]:
        while (envelope := self.get()) is not None:
            yield envelope

    def close(self) -> None:
        self._exchange._unsubscribe(self)
        self._queue.put(None)


class Exchange:
    """Fans published events out to live subscriptions and to ``containerkit_event`` hook observers."""

    def __init__(self, hooks: pluggy.PluginManager) -> None:
        self._hooks = hooks
        self._subscriptions: list[Subscription] = []
        self._lock = threading.Lock()

    def publish(self, namespace: str, topic: str, event: Any, timestamp: float | None = None) -> None:
        """Deliver ``event`` to every subscriber and observer; an observer's failure is logged only.

        ``timestamp`` (seconds since the epoch) is when it happened: now when None; a forwarded event
        keeps the time its origin gave it."""
        envelope = Envelope(time.time() if timestamp is None else timestamp, namespace, topic, event)
        with self._lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription._deliver(envelope)
        # Each observer is called on its own, so that one raising cannot keep the others from running.
        trace = self._hooks.trace.root.get("hook")  # writes only under CONTAINERKIT_TRACE_HOOKS
        for impl in self._hooks.hook.containerkit_event.get_hookimpls():
            kwargs = {arg: getattr(envelope, arg) for arg in impl.argnames}
            trace(f"containerkit_event [{impl.plugin_name}]", kwargs)
            try:
                impl.function(**kwargs)
            except Exception:
                log.exception("event observer %s failed on %s", impl.plugin_name, topic)

    def subscribe(self) -> Subscription:
        """A new subscription that receives every event published from now on."""
        subscription = Subscription(self)
        with self._lock:
            self._subscriptions.append(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)

    def close(self) -> None:
        """End every subscription (the daemon is stopping)."""
        with self._lock:
            subscriptions, self._subscriptions = self._subscriptions, []
        for subscription in subscriptions:
            subscription._deliver(None)
