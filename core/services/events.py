"""containerd.services.events.v1.Events over the daemon's event exchange (:class:`core.events.Exchange`).

Publish stamps a client's event with the request's namespace and puts it on the exchange; Forward
puts an enveloped event there under the envelope's namespace and topic (the exchange stamps it
again: it takes no timestamp). Both validate as containerd (topic ``/a/b``: identifiers after a
``/``) and decode the event when its type is one of containerkit's event messages, so that hook
observers and filters see the message; an unknown type stays a ``google.protobuf.Any``.

Subscribe streams every event published after it began, of every namespace, that matches any of
its filters. Filter fields: ``namespace``, ``topic``, ``event.<field>`` (the payload's string and
boolean fields by their proto names, nested messages by path, maps by key). On the wire an
event is an Any whose type URL is the message's full proto name (``containerd.events.TaskExit``,
``containerd.services.images.v1.ImageCreate``), as containerd's clients decode it. The stream
sends its headers once subscribed (so a client knows nothing published later is missed) and ends
when the client goes away or the daemon stops.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc

from core import identifiers
from core.errors import InvalidArgument
from core.event_messages import message_of
from core.plugin import InitContext, Registration
from core.server import namespace_of
from core.types import EPOCH

if TYPE_CHECKING:
    from core.events import Envelope, Exchange, Subscription

ANY_TYPE = "google.protobuf.Any"


def any_of(event: Any) -> Any:
    """``event`` as a ``google.protobuf.Any`` typed by its full proto name (an Any stays as it is)."""
    from google.protobuf import any_pb2

    if isinstance(event, any_pb2.Any):
        return event
    return any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())


def event_fields(event: Any) -> dict[str, Any]:
    """What filters see of an event message (``event.<field>``): string, boolean and numeric fields,
    string maps, and nested messages (Anys decoded when known); repeated fields are not filterable."""
    if event.DESCRIPTOR.full_name == ANY_TYPE:
        event = message_of(event)
        if event.DESCRIPTOR.full_name == ANY_TYPE:
            return {}
    fields: dict[str, Any] = {}
    for descriptor, value in event.ListFields():
        kind = descriptor.message_type
        if kind is not None and kind.GetOptions().map_entry:
            fields[descriptor.name] = {key: str(item) for key, item in value.items()}
        elif descriptor.is_repeated:
            continue
        elif kind is not None:
            fields[descriptor.name] = event_fields(value)
        else:
            fields[descriptor.name] = value
    return fields


def envelope_fields(envelope: Envelope) -> dict[str, Any]:
    """What Subscribe's filters see of an envelope (containerd's Envelope adaptor)."""
    return {
        "namespace": envelope.namespace or None,
        "topic": envelope.topic or None,
        "event": event_fields(envelope.event),
    }


def validate_topic(topic: str) -> None:
    """InvalidArgument unless ``topic`` is ``/`` followed by identifiers separated by ``/`` (containerd's rule)."""

    def invalid(reason: str) -> InvalidArgument:
        return InvalidArgument(f'envelope topic "{topic}": {reason}: invalid argument')

    if not topic:
        raise invalid("must not be empty")
    if topic[0] != "/":
        raise invalid("must start with '/'")
    if len(topic) == 1:
        raise invalid("must have at least one component")
    for component in topic[1:].split("/"):
        try:
            identifiers.validate(component)
        except InvalidArgument as err:
            raise invalid(f'failed validation on component "{component}": {err}') from None


class EventsService:
    """The events service plugin over ``exchange``; ``stopping()`` ends every Subscribe stream."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self._subscriptions: set[Subscription] = set()
        self._lock = threading.Lock()

    def stopping(self) -> None:
        """End the open Subscribe streams (the daemon is stopping)."""
        with self._lock:
            subscriptions, self._subscriptions = self._subscriptions, set()
        for subscription in subscriptions:
            subscription.close()

    def register(self, server: grpc.Server) -> None:
        from google.protobuf import empty_pb2

        from core.api.containerd.services.events.v1 import events_pb2 as pb
        from core.api.containerd.services.events.v1 import events_pb2_grpc as pb_grpc
        from core.services._convert import datetime_of

        service, exchange = self, self._exchange

        class Servicer(pb_grpc.EventsServicer):
            def Publish(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                validate_topic(request.topic)
                exchange.publish(namespace, request.topic, message_of(request.event))
                return empty_pb2.Empty()

            def Forward(self, request: Any, context: grpc.ServicerContext) -> Any:
                envelope = request.envelope
                try:
                    identifiers.validate(envelope.namespace)
                except InvalidArgument as err:
                    raise InvalidArgument(f"event envelope has invalid namespace: {err}: invalid argument") from None
                validate_topic(envelope.topic)
                when = datetime_of(envelope.timestamp)
                if when == EPOCH:
                    raise InvalidArgument("timestamp must be set on forwarded event: invalid argument")
                exchange.publish(envelope.namespace, envelope.topic, message_of(envelope.event), when.timestamp())
                return empty_pb2.Empty()

            def Subscribe(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                yield from service._stream(list(request.filters), context, pb.Envelope)

        pb_grpc.add_EventsServicer_to_server(Servicer(), server)

    def _stream(self, filters: list[str], context: grpc.ServicerContext, envelope_pb: type) -> Iterator[Any]:
        """The Envelope messages of the events matching ``filters`` from now on, until the call ends."""
        from core import filters as filter_language
        from core.services._convert import timestamp

        matches = filter_language.parse(filters)  # InvalidArgument before anything is sent
        subscription = self._exchange.subscribe()
        with self._lock:
            self._subscriptions.add(subscription)
        context.add_callback(subscription.close)
        try:
            context.send_initial_metadata(())
            for envelope in subscription:
                if matches is filter_language.match_all or matches(envelope_fields(envelope)):
                    yield envelope_pb(
                        timestamp=timestamp(_utc(envelope.timestamp)),
                        namespace=envelope.namespace,
                        topic=envelope.topic,
                        event=any_of(envelope.event),
                    )
        finally:
            subscription.close()
            with self._lock:
                self._subscriptions.discard(subscription)


def _utc(seconds: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC)


def _init(context: InitContext) -> EventsService:
    return EventsService(context.events)


plugin = Registration(init=_init)
