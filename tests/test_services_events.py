"""The content, images and leases services in-process: the events they publish, the collections they
ask for, and the GC kinds they contribute (a real gRPC server and stores, a recording exchange and GC)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from core.api.containerd.events import content_pb2 as content_events
from core.api.containerd.events import image_pb2 as image_events
from core.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from core.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from core.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from core.api.containerd.types import descriptor_pb2
from core.digest import Digest
from core.metadata import ContentMetadata, ImageStore, LeaseStore, MetadataStore
from core.server import ErrorMapping
from core.services.content import ContentService
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
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[ErrorMapping()])
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
