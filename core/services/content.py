"""containerd.services.content.v1.Content over the namespaced content metadata.

Every call acts on the blobs and ingests of the request's namespace (``containerd-namespace``), through
:class:`core.metadata.content.ContentMetadata` over one content plugin, the *backend*. The Write stream
follows containerd's content service message for message, because clients (``ctr content ingest``,
pulls) drive it that way:

- The first message must carry ``ref``; it opens (or resumes) the ingest and locks it for the stream
  (a second stream on the same ref gets UNAVAILABLE). Its ``total``/``expected`` are recorded.
- Every message is answered with the ingest's ``offset``; ``STAT`` adds ``digest``, ``total`` and
  the timestamps. Answers to ``WRITE``/``COMMIT`` carry the digest of what was written so far.
- ``WRITE``/``COMMIT`` at an ``offset`` > 0 must be at the current offset (else OUT_OF_RANGE); at
  offset 0 on a non-empty ingest they restart it (truncate to 0) first.
- A message with an ``expected`` digest the namespace already has ends the stream with
  ALREADY_EXISTS and removes the ingest (nothing left to write).
- ``COMMIT`` turns the ingest into a blob with ``labels``, checking ``total`` and ``expected``
  (FAILED_PRECONDITION when they differ; the ingest is kept), and ends the stream.
- A stream that ends or breaks before a commit closes the writer and keeps the ingest, which a later
  stream resumes (``STAT`` tells where).

The lease of a request (``containerd-lease`` metadata) holds the ingest and the committed blob.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc

from core.digest import Digest
from core.endpoint import LEASE_METADATA_KEY
from core.errors import AlreadyExists, NotFound, OutOfRange
from core.grpcwire.server import Server
from core.hookspecs import hookimpl
from core.plugin import InitContext, Registration
from core.server import metadata_value, method_paths, namespace_of
from core.services._convert import mask_paths, timestamp
from core.types import EPOCH

if TYPE_CHECKING:
    from core.content import ContentStore
    from core.content import Info as BlobInfo
    from core.content import Status as IngestStatus
    from core.metadata.content import ContentMetadata

log = logging.getLogger("containerkit.services.content")

READ_CHUNK = 1 << 20  # bytes per ReadContentResponse, as containerd
LIST_BATCH = 100  # infos per ListContentResponse, as containerd


@dataclass
class ContentServiceConfig:
    """``[plugins.service.content]``: ``backend`` is the id of the content plugin that stores the
    blobs (``"local"``); empty means the first content plugin that loaded ``ok``."""

    backend: str = ""


class ContentService:
    """The content service plugin; ``store`` is its :class:`ContentMetadata` (usable in-process)."""

    def __init__(self, store: ContentMetadata, backend: ContentStore, events: Any, gc: Any) -> None:
        self.store = store
        self.backend = backend
        self._events = events
        self._gc = gc

    @hookimpl
    def containerkit_gc_kinds(self) -> list[Any]:
        """The GC's view of blobs and ingests (see :mod:`core.gc`)."""
        from core.metadata.content import ContentKind

        return [ContentKind(self.store)]

    def register(self, server: Server) -> None:
        from google.protobuf import empty_pb2

        from core.api.containerd.events import content_pb2 as events_pb
        from core.api.containerd.services.content.v1 import content_pb2 as pb
        from core.api.containerd.services.content.v1 import content_pb2_grpc as pb_grpc

        service = self
        store = self.store

        def info_pb(info: BlobInfo) -> Any:
            # Built field by field: keyword arguments would build two Timestamps only to copy them,
            # and fill the labels map through a slow generic update(), even an empty one.
            message = pb.Info(digest=str(info.digest), size=info.size)
            _set_timestamp(message.created_at, info.created_at)
            _set_timestamp(message.updated_at, info.updated_at)
            labels = message.labels
            for key, value in info.labels.items():
                labels[key] = value
            return message

        def status_pb(status: IngestStatus) -> Any:
            return pb.Status(
                started_at=timestamp(status.started_at),
                updated_at=timestamp(status.updated_at),
                ref=status.ref,
                offset=status.offset,
                total=status.total,
                expected=str(status.expected or ""),
            )

        class Servicer(pb_grpc.ContentServicer):
            def Info(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                return pb.InfoResponse(info=info_pb(store.info(namespace, Digest(request.digest))))

            def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
                from core.content import Info as BlobInfo

                namespace = namespace_of(context)
                wanted = BlobInfo(digest=Digest(request.info.digest), labels=dict(request.info.labels))
                updated = store.update(namespace, wanted, mask_paths(request))
                return pb.UpdateResponse(info=info_pb(updated))

            def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                # From plain records straight into each response's repeated field: per blob, an Info
                # and its datetimes, a standalone message and its copy into the response would cost
                # several times what the listing itself does.
                namespace = namespace_of(context)
                records = store.blob_records(namespace, list(request.filters))
                for start in range(0, len(records), LIST_BATCH):
                    response = pb.ListContentResponse()
                    add = response.info.add
                    for digest, size, created, updated, labels in records[start : start + LIST_BATCH]:
                        info = add(digest=digest, size=size)
                        _set_timestamp_ns(info.created_at, created)
                        _set_timestamp_ns(info.updated_at, updated)
                        if labels:
                            info_labels = info.labels
                            for key, value in labels.items():
                                info_labels[key] = value
                    yield response

            def Delete(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                digest = Digest(request.digest)
                store.delete(namespace, digest)
                service._events.publish(namespace, "/content/delete", events_pb.ContentDelete(digest=digest))
                service._gc.schedule()
                return empty_pb2.Empty()

            def Read(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                namespace = namespace_of(context)
                with store.reader_at(namespace, Digest(request.digest)) as reader:
                    blob_size = reader.size
                    offset = max(request.offset, 0)
                    if offset > blob_size:
                        raise OutOfRange(f"read past object length {blob_size} bytes")
                    size = request.size
                    if size <= 0 or offset + size > blob_size:
                        size = blob_size - offset
                    end = offset + size
                    while offset < end:
                        data = reader.read(offset, min(READ_CHUNK, end - offset))
                        if not data:
                            break
                        yield pb.ReadContentResponse(offset=offset, data=data)
                        offset += len(data)

            def Status(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                return pb.StatusResponse(status=status_pb(store.status(namespace, request.ref)))

            def ListStatuses(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                statuses = store.list_statuses(namespace, list(request.filters))
                return pb.ListStatusesResponse(statuses=[status_pb(s) for s in statuses])

            def Write(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                namespace = namespace_of(context)
                yield from service._write(namespace, requests, context, pb)

            def Abort(self, request: Any, context: grpc.ServicerContext) -> Any:
                store.abort(namespace_of(context), request.ref)
                return empty_pb2.Empty()

        pb_grpc.add_ContentServicer_to_server(Servicer(), server)
        # Info reads metadata only; Read opens the backend's blob, which for a non-local backend may wait.
        server.answer_inline(method_paths(pb, "Content", ["Info", "Read"] if self.backend.reads_locally else ["Info"]))

    def _write(self, namespace: str, requests: Iterator[Any], context: grpc.ServicerContext, pb: Any) -> Iterator[Any]:
        """One Write stream (see the module doc). The writer is closed, never aborted, on the way out."""
        from core.errors import InvalidArgument

        request = next(requests, None)
        if request is None:
            return
        ref = request.ref
        if not ref:
            raise InvalidArgument("first message must have a reference")
        total = request.total
        expected = Digest(request.expected) if request.expected else None
        lease = metadata_value(context, LEASE_METADATA_KEY) or None
        writer = self.store.writer(namespace, ref, total, expected, lease=lease)
        log.debug("write started", extra={"namespace": namespace, "ref": ref, "offset": writer.offset})
        try:
            while True:
                status = writer.status()
                response = pb.WriteContentResponse(action=request.action, offset=status.offset)
                if request.expected:
                    expected = Digest(request.expected)
                    if self._visible(namespace, expected):
                        writer.close()
                        with contextlib.suppress(NotFound):
                            self.store.abort(namespace, ref)
                        raise AlreadyExists(f"blob with expected digest {expected} exists")
                if request.total > 0:
                    total = request.total
                if request.action == pb.STAT:
                    response.digest = str(writer.digest())
                    response.started_at.CopyFrom(timestamp(status.started_at))
                    response.updated_at.CopyFrom(timestamp(status.updated_at))
                    response.total = total or status.total  # a resuming stream learns the recorded total
                elif request.action in (pb.WRITE, pb.COMMIT):
                    if request.offset > 0 and request.offset != status.offset:
                        raise OutOfRange(f"write @{request.offset} must occur at current offset {status.offset}")
                    if request.offset == 0 and status.offset > 0:
                        writer.truncate(0)
                        response.offset = 0
                    if request.data:
                        response.offset += writer.write(request.data)
                    if request.action == pb.COMMIT:
                        digest = writer.commit(total, expected, dict(request.labels) or None)
                        response.digest = str(digest)
                    else:
                        response.digest = str(writer.digest())
                    response.total = total or status.total
                else:
                    raise InvalidArgument(f"unknown write action {request.action}")
                yield response
                if request.action == pb.COMMIT:
                    return
                request = next(requests, None)
                if request is None:
                    return
        finally:
            writer.close()  # keeps the ingest for resumption; a no-op after commit

    def _visible(self, namespace: str, digest: Digest) -> bool:
        try:
            self.store.info(namespace, digest)
        except NotFound:
            return False
        return True


def _set_timestamp(field: Any, when: datetime | None) -> None:
    """Set the ``google.protobuf.Timestamp`` field ``field`` to ``when`` in place, with the result of
    :func:`core.services._convert.timestamp` (the field is present even when ``when`` is None or
    EPOCH; naive datetimes are UTC), computed from ``when - EPOCH`` rather than through
    ``FromDatetime`` and its time-tuple round trip (about four times the cost).
    """
    if when is None or when == EPOCH:
        field.SetInParent()
        return
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - EPOCH
    field.seconds = delta.days * 86400 + delta.seconds
    field.nanos = delta.microseconds * 1000


def _set_timestamp_ns(field: Any, nanoseconds: int) -> None:
    """Set the ``google.protobuf.Timestamp`` field ``field`` to ``nanoseconds`` since the epoch, to the
    microsecond as an :class:`~core.content.Info` holds it: what :func:`_set_timestamp` sets for the
    Info's datetime (present, and empty for the epoch itself)."""
    micros = nanoseconds // 1000
    field.seconds = micros // 1_000_000
    field.nanos = micros % 1_000_000 * 1000


def _init(context: InitContext) -> ContentService:
    from core.metadata.content import ContentMetadata

    backend = context.get("content", context.config.backend or None)
    return ContentService(ContentMetadata(context.metadata, backend), backend, context.events, context.get("gc"))


plugin = Registration(init=_init, requires=("content", "gc"), config=ContentServiceConfig)
