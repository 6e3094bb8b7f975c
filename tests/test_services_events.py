"""The content, images and leases services in-process: the events they publish, the collections they
ask for, and the GC kinds they contribute (a real gRPC server and stores, a recording exchange and GC);
and the events service over a real exchange: Subscribe with filters, Publish, Forward."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2

from core.api.containerd.events import container_pb2 as container_events
from core.api.containerd.events import content_pb2 as content_events
from core.api.containerd.events import image_pb2 as image_events
from core.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from core.api.containerd.services.events.v1 import events_pb2, events_pb2_grpc
from core.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from core.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from core.api.containerd.types import descriptor_pb2
from core.config import GrpcConfig
from core.digest import Digest
from core.events import Exchange
from core.hookspecs import hookimpl, new_plugin_manager
from core.metadata import ContentMetadata, ImageStore, LeaseStore, MetadataStore
from core.server import new_server
from core.services.content import ContentService
from core.services.events import EventsService
from core.services.images import ImagesService
from core.services.leases import LeasesService
from plugins.content_local import LocalContentStore

DEFAULT = [("containerd-namespace", "default")]


class Recorder:
    """Stands in for the event exchange and the GC plugin: records what the services ask of them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []
        self.gc_calls: list[str] = []

    def publish(self, namespace: str, topic: str, event: Any) -> None:
        self.events.append((namespace, topic, event))

    def schedule(self) -> None:
        self.gc_calls.append("schedule")

    def collect_now(self) -> None:
        self.gc_calls.append("collect_now")


@pytest.fixture
def served() -> Iterator[tuple[grpc.Channel, Recorder, dict[str, Any]]]:
    directory = Path(tempfile.mkdtemp(prefix="ck-svc-", dir="/tmp"))  # short: unix socket paths are limited
    store = MetadataStore(directory / "meta.db")
    recorder = Recorder()
    backend = LocalContentStore(directory / "content")
    services = {
        "content": ContentService(ContentMetadata(store, backend), backend, recorder, recorder),
        "images": ImagesService(ImageStore(store), recorder, recorder),
        "leases": LeasesService(LeaseStore(store), recorder),
    }
    server = new_server(GrpcConfig())
    for service in services.values():
        service.register(server)
    server.add_insecure_port(f"unix:{directory / 'sock'}")
    server.start()
    channel = grpc.insecure_channel(f"unix:{directory / 'sock'}")
    try:
        yield channel, recorder, services
    finally:
        channel.close()
        server.stop(None).wait()
        store.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_content_delete_publishes_content_delete_and_schedules_gc(served: Any) -> None:
    channel, recorder, _ = served
    stub = content_pb2_grpc.ContentStub(channel)
    requests = [
        content_pb2.WriteContentRequest(action=content_pb2.STAT, ref="r"),
        content_pb2.WriteContentRequest(action=content_pb2.COMMIT, data=b"event me"),
    ]
    responses = list(stub.Write(iter(requests), metadata=DEFAULT))
    digest = Digest.from_bytes(b"event me")
    assert [(r.action, r.offset, r.digest) for r in responses] == [
        (content_pb2.STAT, 0, Digest.from_bytes(b"")),
        (content_pb2.COMMIT, 8, digest),
    ]
    assert recorder.events == [] and recorder.gc_calls == []
    stub.Delete(content_pb2.DeleteContentRequest(digest=digest), metadata=DEFAULT)
    assert recorder.events == [("default", "/content/delete", content_events.ContentDelete(digest=digest))]
    assert recorder.gc_calls == ["schedule"]


def test_image_events_carry_name_and_labels_and_sync_delete_collects_now(served: Any) -> None:
    channel, recorder, _ = served
    stub = images_pb2_grpc.ImagesStub(channel)
    target = descriptor_pb2.Descriptor(
        media_type="application/vnd.oci.image.manifest.v1+json", digest=Digest.from_bytes(b"m"), size=1
    )
    stub.Create(
        images_pb2.CreateImageRequest(image=images_pb2.Image(name="a", labels={"k": "v"}, target=target)),
        metadata=DEFAULT,
    )
    stub.Update(
        images_pb2.UpdateImageRequest(image=images_pb2.Image(name="a", labels={"k": "w"}, target=target)),
        metadata=DEFAULT,
    )
    stub.Delete(images_pb2.DeleteImageRequest(name="a"), metadata=DEFAULT)
    stub.Create(images_pb2.CreateImageRequest(image=images_pb2.Image(name="b", target=target)), metadata=DEFAULT)
    stub.Delete(images_pb2.DeleteImageRequest(name="b", sync=True), metadata=DEFAULT)
    assert recorder.events == [
        ("default", "/images/create", image_events.ImageCreate(name="a", labels={"k": "v"})),
        ("default", "/images/update", image_events.ImageUpdate(name="a", labels={"k": "w"})),
        ("default", "/images/delete", image_events.ImageDelete(name="a")),
        ("default", "/images/create", image_events.ImageCreate(name="b")),
        ("default", "/images/delete", image_events.ImageDelete(name="b")),
    ]
    assert recorder.gc_calls == ["schedule", "collect_now"]


def test_lease_delete_schedules_gc_or_collects_now_with_sync(served: Any) -> None:
    channel, recorder, _ = served
    stub = leases_pb2_grpc.LeasesStub(channel)
    for lease_id in ("one", "two"):
        stub.Create(leases_pb2.CreateRequest(id=lease_id), metadata=DEFAULT)
    stub.Delete(leases_pb2.DeleteRequest(id="one"), metadata=DEFAULT)
    stub.Delete(leases_pb2.DeleteRequest(id="two", sync=True), metadata=DEFAULT)
    assert recorder.gc_calls == ["schedule", "collect_now"]
    assert recorder.events == []  # containerd publishes no lease events


def test_services_contribute_their_gc_kinds(served: Any) -> None:
    _, _, services = served
    types = {name: [kind.types for kind in service.containerkit_gc_kinds()] for name, service in services.items()}
    assert types == {"content": [("content", "ingest")], "images": [("image",)], "leases": [("lease",)]}


# -- the events service: Subscribe, Publish and Forward over the real exchange ---------------------


class Observer:
    """A ``containerkit_event`` observer recording what the exchange hands it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, Any]] = []

    @hookimpl
    def containerkit_event(self, namespace: str, topic: str, event: Any) -> None:
        self.seen.append((namespace, topic, event))


@pytest.fixture
def exchanged() -> Iterator[tuple[Any, Exchange, Observer, EventsService]]:
    """The events service on a real exchange (with an observer), served on a private socket."""
    directory = Path(tempfile.mkdtemp(prefix="ck-ev-", dir="/tmp"))
    hooks, observer = new_plugin_manager(), Observer()
    hooks.register(observer)
    exchange = Exchange(hooks)
    service = EventsService(exchange)
    server = new_server(GrpcConfig())
    service.register(server)
    server.add_insecure_port(f"unix:{directory / 'sock'}")
    server.start()
    channel = grpc.insecure_channel(f"unix:{directory / 'sock'}")
    try:
        yield events_pb2_grpc.EventsStub(channel), exchange, observer, service
    finally:
        service.stopping()
        channel.close()
        server.stop(None).wait()
        shutil.rmtree(directory, ignore_errors=True)


def subscribed(stub: Any, *filters: str) -> Any:
    """A Subscribe stream that is live: everything published from now on reaches it."""
    stream = stub.Subscribe(events_pb2.SubscribeRequest(filters=list(filters)))
    stream.initial_metadata()  # sent once the subscription exists
    return stream


def test_subscribers_see_what_services_publish_typed_as_containerd_names_it(exchanged: Any) -> None:
    stub, exchange, _, _ = exchanged
    stream = subscribed(stub)
    before = time.time()
    exchange.publish("default", "/images/create", image_events.ImageCreate(name="a", labels={"k": "v"}))
    exchange.publish("other", "/containers/delete", container_events.ContainerDelete(id="c1"))
    first, second = next(stream), next(stream)
    stream.cancel()
    assert (first.namespace, first.topic, first.event.type_url) == (
        "default",
        "/images/create",
        "containerd.services.images.v1.ImageCreate",
    )
    assert image_events.ImageCreate.FromString(first.event.value) == image_events.ImageCreate(
        name="a", labels={"k": "v"}
    )
    assert abs(first.timestamp.ToNanoseconds() / 1e9 - before) < 5
    assert (second.namespace, second.topic, second.event.type_url) == (
        "other",
        "/containers/delete",
        "containerd.events.ContainerDelete",
    )


def test_subscribe_filters_on_namespace_topic_and_event_fields(exchanged: Any) -> None:
    stub, exchange, _, _ = exchanged
    runtime = container_events.ContainerCreate.Runtime(name="io.containerd.runc.v2")
    create = container_events.ContainerCreate(id="c1", image="busybox", runtime=runtime)
    cases = {
        "namespace==two": ("two", "/containers/delete", container_events.ContainerDelete(id="x")),
        'topic~="^/images/"': ("one", "/images/delete", image_events.ImageDelete(name="img")),
        "event.id==c1": ("one", "/containers/create", create),
        "event.runtime.name==io.containerd.runc.v2": ("one", "/containers/create", create),
        "event.labels.tier==db": ("one", "/images/update", image_events.ImageUpdate(name="i", labels={"tier": "db"})),
    }
    for filter_, (namespace, topic, event) in cases.items():
        stream = subscribed(stub, filter_)
        exchange.publish("one", "/containers/delete", container_events.ContainerDelete(id="other"))  # never matches
        exchange.publish(namespace, topic, event)
        received = next(stream)
        stream.cancel()
        assert (received.namespace, received.topic, received.event.value) == (
            namespace,
            topic,
            event.SerializeToString(),
        ), filter_
    with pytest.raises(grpc.RpcError) as raised:
        next(stub.Subscribe(events_pb2.SubscribeRequest(filters=["topic=="])))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_publish_decodes_known_events_for_observers_and_passes_unknown_ones_through(exchanged: Any) -> None:
    stub, _, observer, _ = exchanged
    stream = subscribed(stub, "namespace==default")
    known = any_pb2.Any(type_url="containerd.events.ContainerDelete", value=b"\n\x02c1")
    unknown = any_pb2.Any(type_url="types.example.com/x.Unknown", value=b"\x01\x02")
    stub.Publish(events_pb2.PublishRequest(topic="/containers/delete", event=known), metadata=DEFAULT)
    stub.Publish(events_pb2.PublishRequest(topic="/x/y-z", event=unknown), metadata=DEFAULT)
    received = [next(stream), next(stream)]
    stream.cancel()
    assert [(e.topic, e.event) for e in received] == [("/containers/delete", known), ("/x/y-z", unknown)]
    assert observer.seen == [
        ("default", "/containers/delete", container_events.ContainerDelete(id="c1")),
        ("default", "/x/y-z", unknown),
    ]


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        ("", 'envelope topic "": must not be empty: invalid argument'),
        ("tasks", "envelope topic \"tasks\": must start with '/': invalid argument"),
        ("/", 'envelope topic "/": must have at least one component: invalid argument'),
        ("/a//b", 'envelope topic "/a//b": failed validation on component "": identifier must not be empty'),
    ],
)
def test_publish_validates_the_topic_as_containerd(exchanged: Any, topic: str, message: str) -> None:
    stub, _, observer, _ = exchanged
    with pytest.raises(grpc.RpcError) as raised:
        stub.Publish(events_pb2.PublishRequest(topic=topic, event=any_pb2.Any()), metadata=DEFAULT)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details().startswith(message)
    assert observer.seen == []


def test_forward_dispatches_the_envelope_under_its_namespace_and_topic(exchanged: Any) -> None:
    stub, _, observer, _ = exchanged
    envelope = events_pb2.Envelope(
        namespace="elsewhere",
        topic="/containers/delete",
        event=any_pb2.Any(type_url="containerd.events.ContainerDelete", value=b"\n\x02c9"),
    )
    with pytest.raises(grpc.RpcError) as raised:
        stub.Forward(events_pb2.ForwardRequest(envelope=envelope))
    assert raised.value.details() == "timestamp must be set on forwarded event: invalid argument"
    envelope.timestamp.GetCurrentTime()
    stub.Forward(events_pb2.ForwardRequest(envelope=envelope))
    assert observer.seen == [("elsewhere", "/containers/delete", container_events.ContainerDelete(id="c9"))]
    envelope.namespace = "not valid"
    with pytest.raises(grpc.RpcError) as raised:
        stub.Forward(events_pb2.ForwardRequest(envelope=envelope))
    assert raised.value.details().startswith('event envelope has invalid namespace: identifier "not valid" must match')


def test_a_forwarded_event_keeps_the_time_its_origin_gave_it(exchanged: Any) -> None:
    stub, exchange, _, _ = exchanged
    subscription = exchange.subscribe()
    try:
        envelope = events_pb2.Envelope(
            namespace="elsewhere",
            topic="/containers/delete",
            event=any_pb2.Any(type_url="containerd.events.ContainerDelete", value=b"\n\x02c9"),
        )
        envelope.timestamp.FromSeconds(1_600_000_000)
        stub.Forward(events_pb2.ForwardRequest(envelope=envelope))
        delivered = subscription.get(timeout=10)
        assert delivered is not None and delivered.timestamp == 1_600_000_000
    finally:
        subscription.close()


def test_stopping_ends_every_subscription(exchanged: Any) -> None:
    stub, exchange, _, service = exchanged
    streams = [subscribed(stub), subscribed(stub, "namespace==x")]
    service.stopping()
    assert [list(stream) for stream in streams] == [[], []]
    exchange.publish("x", "/containers/delete", container_events.ContainerDelete(id="late"))  # no one left
