"""Cross-cutting extension points: the pluggy hookspecs and the event exchange that feeds observers."""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any

import pytest

from core import hookspecs
from core.events import Envelope, Exchange
from core.hookspecs import hookimpl, new_plugin_manager

# -- hookspecs -----------------------------------------------------------------------------------


def test_every_hook_is_prefixed_and_documented():
    hooks = [name for name, value in vars(hookspecs).items() if hasattr(value, "containerkit_spec")]
    assert hooks == [
        "containerkit_adjust_spec",
        "containerkit_event",
        "containerkit_task_prepare",
        "containerkit_task_released",
        "containerkit_gc_kinds",
    ]
    for name in hooks:
        assert inspect.getdoc(getattr(hookspecs, name))


class Labeller:
    @hookimpl
    def containerkit_adjust_spec(self, spec: dict[str, Any], labels: dict[str, str]) -> None:
        spec["annotations"] = dict(labels)


class Namer:
    @hookimpl
    def containerkit_adjust_spec(self, spec: dict[str, Any], namespace: str, container_id: str) -> None:
        spec["hostname"] = f"{namespace}-{container_id}"


def test_spec_adjusters_each_get_the_arguments_they_name():
    manager = new_plugin_manager()
    manager.register(Labeller(), name="labeller")
    manager.register(Namer(), name="namer")
    spec: dict[str, Any] = {}
    manager.hook.containerkit_adjust_spec(spec=spec, namespace="default", container_id="c1", labels={"a": "b"})
    assert spec == {"annotations": {"a": "b"}, "hostname": "default-c1"}


def test_hook_calls_are_traced_to_stderr_when_asked(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setenv("CONTAINERKIT_TRACE_HOOKS", "1")
    manager = new_plugin_manager()
    manager.register(Namer(), name="namer")
    manager.hook.containerkit_adjust_spec(spec={}, namespace="default", container_id="c1", labels={})
    err = capsys.readouterr().err
    assert "containerkit_adjust_spec" in err
    assert "c1" in err


@pytest.mark.parametrize("value", [None, "", "0"])
def test_hook_calls_are_not_traced_by_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, value: str | None
):
    if value is None:
        monkeypatch.delenv("CONTAINERKIT_TRACE_HOOKS", raising=False)
    else:
        monkeypatch.setenv("CONTAINERKIT_TRACE_HOOKS", value)
    manager = new_plugin_manager()
    manager.register(Namer(), name="namer")
    manager.hook.containerkit_adjust_spec(spec={}, namespace="default", container_id="c1", labels={})
    assert capsys.readouterr().err == ""


# -- the event exchange: subscriptions -----------------------------------------------------------


def test_a_subscriber_gets_only_events_published_after_it_subscribed():
    exchange = Exchange(new_plugin_manager())
    exchange.publish("default", "/before", "e0")
    subscription = exchange.subscribe()
    exchange.publish("default", "/namespaces/create", "e1")
    exchange.publish("team-a", "/tasks/exit", "e2")
    subscription.close()
    got = [(e.namespace, e.topic, e.event) for e in subscription]
    assert got == [("default", "/namespaces/create", "e1"), ("team-a", "/tasks/exit", "e2")]


def test_an_envelope_is_timestamped():
    exchange = Exchange(new_plugin_manager())
    subscription = exchange.subscribe()
    exchange.publish("default", "/t", "e")
    envelope = subscription.get(timeout=1)
    assert isinstance(envelope, Envelope) and envelope.timestamp > 0


def test_get_times_out_with_none():
    subscription = Exchange(new_plugin_manager()).subscribe()
    assert subscription.get(timeout=0.01) is None


def test_a_closed_subscription_stays_closed():
    exchange = Exchange(new_plugin_manager())
    subscription = exchange.subscribe()
    subscription.close()
    exchange.publish("default", "/after", "e")
    assert subscription.get() is None
    assert subscription.get() is None
    assert list(subscription) == []


def test_close_ends_an_iteration_blocked_in_another_thread():
    exchange = Exchange(new_plugin_manager())
    subscription = exchange.subscribe()
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(e.topic for e in subscription))
    reader.start()
    exchange.publish("default", "/one", "e")
    subscription.close()
    reader.join(5)
    assert not reader.is_alive()
    assert got == ["/one"]


def test_closing_the_exchange_ends_every_subscription():
    exchange = Exchange(new_plugin_manager())
    first, second = exchange.subscribe(), exchange.subscribe()
    exchange.publish("default", "/t", "e")
    exchange.close()
    assert [len(list(first)), len(list(second))] == [1, 1]


# -- the event exchange: hook observers ----------------------------------------------------------


class TopicObserver:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    @hookimpl
    def containerkit_event(self, topic: str) -> None:
        self.seen.append(topic)


class FullObserver(TopicObserver):
    @hookimpl
    def containerkit_event(self, namespace: str, topic: str, event: Any) -> None:  # type: ignore[override]
        self.seen.append((namespace, topic, event))


class FailingObserver:
    @hookimpl
    def containerkit_event(self, event: Any) -> None:
        raise RuntimeError(f"cannot handle {event}")


def test_observers_receive_only_the_arguments_they_name():
    manager = new_plugin_manager()
    topic_only, full = TopicObserver(), FullObserver()
    manager.register(topic_only, name="topic")
    manager.register(full, name="full")
    Exchange(manager).publish("default", "/namespaces/create", "e1")
    assert topic_only.seen == ["/namespaces/create"]
    assert full.seen == [("default", "/namespaces/create", "e1")]


def test_a_raising_observer_is_logged_and_stops_neither_others_nor_the_publisher(caplog: pytest.LogCaptureFixture):
    manager = new_plugin_manager()
    before, after = TopicObserver(), TopicObserver()
    manager.register(before, name="before")
    manager.register(FailingObserver(), name="failing")
    manager.register(after, name="after")
    exchange = Exchange(manager)
    subscription = exchange.subscribe()
    with caplog.at_level(logging.ERROR, logger="containerkit.events"):
        exchange.publish("default", "/tasks/exit", "e1")
    assert before.seen == after.seen == ["/tasks/exit"]
    assert "event observer failing failed on /tasks/exit" in caplog.text
    assert "cannot handle e1" in caplog.text
    subscription.close()
    assert [e.topic for e in subscription] == ["/tasks/exit"]


def test_observer_calls_are_traced_when_asked(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.setenv("CONTAINERKIT_TRACE_HOOKS", "1")
    manager = new_plugin_manager()
    manager.register(TopicObserver(), name="observer")
    Exchange(manager).publish("default", "/namespaces/create", "e1")
    assert "containerkit_event [observer]" in capsys.readouterr().err
