"""containerkit.services.transfer.v1.Transfer: pull, push, export, import, convert, sign, verify, login,
done inside the daemon so that any thin client gets them (and their progress) through one call.

The work is :mod:`core.distribution`'s; this module adapts it to gRPC. Long calls (Pull, Push, Export)
run their work on a thread of their own that feeds a queue the response stream is read from, so a
call never holds up others and progress flows while the work goes on. When the client goes away (or
cancels, or the daemon stops) the next progress step of that work raises :class:`CallCancelled`: a pull
stops like any failed one, with no image record, its lease kept so that a retry resumes.

Credentials in a request are used for that request only and never logged or echoed in errors. The
service's own are ``[plugins.service.transfer.registries."HOST"]`` username/password, then the docker
``config.json`` of the daemon's user (``docker_config``, or ``$DOCKER_CONFIG/config.json``, or
``~/.docker/config.json``), re-read when it changes.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from core.errors import ContainerkitError, InvalidArgument
from core.plugin import InitContext, Registration
from core.server import namespace_of
from core.services.images import descriptor_pb, image_pb

if TYPE_CHECKING:
    from core.distribution.auth import CredentialStore
    from core.distribution.progress import Progress
    from core.distribution.reference import Reference
    from core.distribution.registry import HostConfig, RegistryClient
    from core.metadata.content import ContentMetadata
    from core.metadata.images import Image, ImageStore
    from core.metadata.leases import LeaseStore
    from core.types import Descriptor
    from core.unpack import Unpacker

T = TypeVar("T")
R = TypeVar("R")

EXPORT_CHUNK_SIZE = 1 << 20
"""Bytes per ExportChunk message (writes of the archive are gathered up to this)."""
EXPORT_QUEUE_CHUNKS = 8
"""ExportChunks buffered between the archive writer and a slow reader (memory stays flat)."""
PROGRESS_INTERVAL_SECONDS = 0.1
"""At most one event per blob and state in this time (state changes always pass)."""
ALL_PLATFORMS = "all"
TEMP_IMAGE_PREFIX = "containerkit.io/transfer-tmp/"
"""Name prefix of the recompressed copy a push with ``compression`` makes (deleted afterwards)."""


class CallCancelled(ContainerkitError):
    """The call this work serves has ended (client gone, cancelled, daemon stopping)."""

    grpc_code = "CANCELLED"


@dataclass
class RegistryHostTable:
    """``[plugins.service.transfer.registries."HOST"]``: how to reach HOST (``plain_http`` unset: plain HTTP
    for localhost and loopback addresses only), and the daemon's credentials for it."""

    plain_http: bool | None = None
    ca_file: str = ""
    skip_verify: bool = False
    mirrors: list[str] = field(default_factory=list)
    username: str = ""
    password: str = ""


@dataclass
class PolicyRule:
    """``[[plugins.service.transfer.policy]]``: pulls of references starting with ``prefix`` need a valid
    signature by one of ``keys`` (PEM public key paths)."""

    prefix: str
    keys: list[str] = field(default_factory=list)


@dataclass
class TransferServiceConfig:
    """``[plugins.service.transfer]``."""

    max_concurrent_downloads: int = 4
    max_concurrent_uploads: int = 4
    docker_config: str = ""
    snapshotter: str = "overlayfs"
    registries: dict[str, RegistryHostTable] = field(default_factory=dict)
    policy: list[PolicyRule] = field(default_factory=list)
    max_manifest_size: int = 4 << 20


def platforms_of(names: Sequence[str]) -> list[Any] | None:
    """Request platforms as PullOptions takes them: None (none given: the host's), ``[]`` for ``all``."""
    from core.types import Platform

    if not names:
        return None
    if ALL_PLATFORMS in names:
        return []
    return [Platform.parse(name) for name in names]


class _Stream:
    """One streaming call's work on a worker thread, and the queue between it and the response stream."""

    def __init__(self, maxsize: int = 0) -> None:
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize)
        self.ended = threading.Event()

    def emit(self, item: Any) -> None:
        """Queue ``item`` for the stream (waiting while it is full); CallCancelled once the call ended."""
        while not self.ended.is_set():
            try:
                self.items.put(("item", item), timeout=0.2)
                return
            except queue.Full:
                continue
        raise CallCancelled("the call ended before the work did (client gone or cancelled)")

    def run(self, work: Callable[[Callable[[Any], None]], Any]) -> None:
        """The worker thread's body: the outcome goes last into the queue (never blocked by a full one)."""
        try:
            outcome = ("result", work(self.emit))
        except BaseException as err:  # handed to the stream, which raises it in the call
            outcome = ("error", err)
        while not self.ended.is_set():
            try:
                self.items.put(outcome, timeout=0.2)
                return
            except queue.Full:
                continue


class TransferService:
    """The transfer service plugin: :mod:`core.distribution` behind ``containerkit.services.transfer.v1``."""

    def __init__(
        self,
        content: ContentMetadata,
        images: ImageStore,
        unpacker: Unpacker,
        leases: LeaseStore,
        events: Any,
        config: TransferServiceConfig,
    ) -> None:
        from core.distribution.pull import Puller

        self.config = config
        self._events = events
        self._content = content
        self._images = images
        self._unpacker = unpacker
        self._puller = Puller(content, images, unpacker, leases, events)
        self._credentials = self._credential_store()
        self._active: set[_Stream] = set()
        self._lock = threading.Lock()

    # -- registries ------------------------------------------------------------------------------------

    def host_config(self, host: str, plain_http: bool = False) -> HostConfig:
        """How to reach ``host``: its config table (or the defaults), plain HTTP when the request asks."""
        from core.distribution.reference import is_local_host
        from core.distribution.registry import HostConfig

        table = self.config.registries.get(host, RegistryHostTable())
        plain = table.plain_http if table.plain_http is not None else is_local_host(host)
        return HostConfig(
            plain_http=plain or plain_http,
            ca_file=table.ca_file,
            skip_verify=table.skip_verify,
            mirrors=tuple(table.mirrors),
        )

    def _credential_store(self) -> CredentialStore:
        """The daemon's credentials: the config's per host, then its user's docker config.json (re-read
        when it changes)."""
        from core.distribution.auth import Credentials, CredentialStore, default_docker_config

        configured = {
            host: Credentials(table.username, table.password)
            for host, table in self.config.registries.items()
            if table.username
        }
        path = Path(self.config.docker_config) if self.config.docker_config else default_docker_config()
        return CredentialStore(configured, path)

    def registry_client(self, plain_http: bool = False, username: str = "", password: str = "") -> RegistryClient:
        """A client for one operation; the request's credentials (when given) come before the daemon's."""
        from core.distribution.auth import Credentials
        from core.distribution.registry import RegistryClient

        return RegistryClient(
            lambda host: self.host_config(host, plain_http),
            self._credentials,
            Credentials(username, password) if username else None,
            max_manifest_size=self.config.max_manifest_size,
        )

    # -- operations (usable in-process) ----------------------------------------------------------------

    def pull(self, namespace: str, request: Any, progress: Callable[[Progress], None]) -> Image:
        """Pull ``request`` (a PullRequest) into ``namespace``; the image record is created last."""
        from core.distribution.pull import PullOptions
        from core.distribution.reference import Reference

        ref = Reference.parse(request.ref)
        verify = self.signature_check(namespace, ref)
        options = PullOptions(
            platforms=platforms_of(request.platforms),
            snapshotter=request.snapshotter or self.config.snapshotter,
            unpack=not request.skip_unpack,
            workers=request.max_concurrent or self.config.max_concurrent_downloads,
            labels=dict(request.labels),
            signatures=request.signatures or verify is not None,
            verify=verify,
        )
        client = self.registry_client(request.plain_http, request.username, request.password)
        return self._puller.pull(namespace, ref, client, options, progress)

    def signature_check(self, namespace: str, ref: Reference) -> Callable[[Reference, Descriptor], None] | None:
        """The signature policy's check of a pull of ``ref`` into ``namespace`` (run before its image record
        is made; FailedPrecondition refuses it), or None when no rule asks for a signature."""
        if not self.config.policy:
            return None
        from core.distribution import signature

        policy = signature.SignaturePolicy(self.config.policy)
        if not policy.keys_for(str(ref)):
            return None

        def verify(resolved: Reference, target: Descriptor) -> None:
            signature.enforce(policy, self._content, namespace, str(resolved), target)

        return verify

    def push(self, namespace: str, request: Any, progress: Callable[[Progress], None]) -> Image:
        """Push the local image ``request.local_name`` (default: ``request.ref``) to ``request.ref``,
        recompressed first when ``request.compression`` asks, then its signatures (when it has some);
        returns the image as the registry has it."""
        from core.distribution import signature
        from core.distribution.push import Pusher
        from core.distribution.reference import Reference
        from core.metadata.images import Image

        ref = Reference.parse(request.ref)
        local = request.local_name or request.ref
        client = self.registry_client(request.plain_http, request.username, request.password)
        if request.compression:
            local = self.convert(namespace, local, TEMP_IMAGE_PREFIX + uuid.uuid4().hex, request.compression).name
        try:
            target = Pusher(self._content, self._images, workers=self.config.max_concurrent_uploads).push(
                namespace,
                local,
                ref,
                client,
                platforms_of(request.platforms),
                progress,
                chunk_size=request.chunk_size,
            )
        finally:
            if request.compression:
                self._images.delete(namespace, local)
        signature.push_signatures(client, ref, target, self._content, namespace)
        return Image(name=str(ref), target=target)

    def convert(self, namespace: str, source: str, target: str, compression: str, level: int = 0) -> Image:
        """Recompress ``source``'s layers with ``compression`` (zstd or gzip) into the image ``target``."""
        from core.distribution.convert import convert_image

        image = convert_image(
            self._content, self._images, namespace, source, target, compression=compression, level=level or None
        )
        return self.published(namespace, image)

    def published(self, namespace: str, image: Image) -> Image:
        """``image`` (as just stored) after publishing ``/images/create``, or ``/images/update`` when it
        replaced a record (a fresh record's creation and update times are the same instant)."""
        from core.api.containerd.events import image_pb2 as events_pb

        if image.created_at == image.updated_at:
            self._events.publish(
                namespace, "/images/create", events_pb.ImageCreate(name=image.name, labels=dict(image.labels))
            )
        else:
            self._events.publish(
                namespace, "/images/update", events_pb.ImageUpdate(name=image.name, labels=dict(image.labels))
            )
        return image

    # -- gRPC ------------------------------------------------------------------------------------------

    def stopping(self) -> None:
        """The daemon stops: every streaming call's work is told to end at its next step."""
        with self._lock:
            for stream in self._active:
                stream.ended.set()

    def stream(
        self, context: grpc.ServicerContext, work: Callable[[Callable[[T], None]], R], maxsize: int = 0
    ) -> Generator[T, None, R]:
        """Run ``work(emit)`` on a thread of its own; yield what it emits as it comes, then return its result
        (or raise its error). The call ending early makes ``emit`` raise CallCancelled in the work."""
        stream = _Stream(maxsize)
        context.add_callback(stream.ended.set)
        with self._lock:
            self._active.add(stream)
        thread = threading.Thread(target=stream.run, args=(work,), name="transfer", daemon=True)
        thread.start()
        try:
            while True:
                try:
                    kind, value = stream.items.get(timeout=0.5)
                except queue.Empty:
                    if stream.ended.is_set():
                        raise CallCancelled("the call ended") from None
                    continue
                if kind == "item":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    return value
        finally:
            stream.ended.set()
            with self._lock:
                self._active.discard(stream)

    def register(self, server: grpc.Server) -> None:
        from core.api.containerkit.services.transfer.v1 import transfer_pb2 as pb
        from core.api.containerkit.services.transfer.v1 import transfer_pb2_grpc as pb_grpc

        service = self

        def event_pb(progress: Progress) -> Any:
            return pb.ProgressEvent(
                ref=progress.ref,
                kind=progress.kind,
                digest=progress.digest,
                state=progress.state,
                offset=progress.offset,
                total=progress.total,
                message=progress.message,
            )

        def progress_stream(
            context: grpc.ServicerContext, operation: Callable[[Callable[[Progress], None]], Image]
        ) -> Iterator[Any]:
            def work(emit: Callable[[Any], None]) -> Image:
                def forward(progress: Progress) -> None:
                    if progress.kind != "image" or progress.state != "done":  # the last event says it, with the image
                        emit(event_pb(progress))

                return operation(throttled(forward))

            image = yield from service.stream(context, work)
            digest = str(image.target.digest)
            yield pb.ProgressEvent(
                ref=image.name, kind="image", digest=digest, state="done", message=digest, image=image_pb(image)
            )

        class Servicer(pb_grpc.TransferServicer):
            def Pull(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                namespace = namespace_of(context)
                yield from progress_stream(context, lambda progress: service.pull(namespace, request, progress))

            def Push(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                namespace = namespace_of(context)
                yield from progress_stream(context, lambda progress: service.push(namespace, request, progress))

            def Export(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                from core.distribution.archive import export_images

                namespace = namespace_of(context)
                if not request.names:
                    raise InvalidArgument("export needs at least one image name")

                def work(emit: Callable[[bytes], None]) -> None:
                    with _ChunkWriter(emit) as out:
                        export_images(
                            service._content,
                            service._images,
                            namespace,
                            list(request.names),
                            out,
                            platforms_of(request.platforms),
                        )

                for data in service.stream(context, work, maxsize=EXPORT_QUEUE_CHUNKS):
                    yield pb.ExportChunk(data=data)

            def Import(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                from core.distribution.archive import import_archive

                namespace = namespace_of(context)
                first = next(requests, None)
                if first is None or first.WhichOneof("part") != "options":
                    raise InvalidArgument("the first ImportChunk must carry the options")
                options = first.options
                images = import_archive(
                    service._content,
                    service._images,
                    service._unpacker,
                    namespace,
                    _data_of(requests),
                    snapshotter=options.snapshotter or service.config.snapshotter,
                    unpack=not options.skip_unpack,
                    base_name=options.base_name,
                    labels=dict(options.labels),
                )
                return pb.ImportResponse(images=[image_pb(service.published(namespace, image)) for image in images])

            def Convert(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                image = service.convert(namespace, request.source, request.target, request.compression, request.level)
                return pb.ConvertResponse(image=image_pb(image))

            def Sign(self, request: Any, context: grpc.ServicerContext) -> Any:
                from core.distribution import signature

                namespace = namespace_of(context)
                key = _absolute(request.key_path, "key_path")
                signed = signature.sign(service._content, service._images, namespace, request.name, key)
                return pb.SignResponse(signature=descriptor_pb(signed.descriptor), key_id=signed.key_id)

            def Verify(self, request: Any, context: grpc.ServicerContext) -> Any:
                from core.distribution import signature

                namespace = namespace_of(context)
                keys = [_absolute(path, "public_key_paths") for path in request.public_key_paths]
                if not keys:
                    raise InvalidArgument("verify needs at least one public key")
                valid = signature.verify(service._content, service._images, namespace, request.name, keys)
                return pb.VerifyResponse(
                    signatures=[pb.Signature(key_id=s.key_id, artifact=descriptor_pb(s.descriptor)) for s in valid]
                )

            def Login(self, request: Any, context: grpc.ServicerContext) -> Any:
                if not request.host:
                    raise InvalidArgument("login needs a registry host")
                client = service.registry_client(request.plain_http, request.username, request.password)
                client.login(request.host)
                return pb.LoginResponse()

        pb_grpc.add_TransferServicer_to_server(Servicer(), server)


def throttled(
    progress: Callable[[Progress], None], interval: float = PROGRESS_INTERVAL_SECONDS
) -> Callable[[Progress], None]:
    """``progress`` passed every state change, but per ref at most one event each ``interval`` within a state."""
    last: dict[str, tuple[str, float]] = {}
    lock = threading.Lock()

    def forward(event: Progress) -> None:
        now = time.monotonic()
        with lock:
            state, when = last.get(event.ref, ("", -interval))
            if event.state == state and now - when < interval:
                return
            last[event.ref] = (event.state, now)
        progress(event)

    return forward


class _ChunkWriter:
    """A write-only binary file that hands its bytes to ``emit`` in chunks of ``size`` (the rest on close)."""

    def __init__(self, emit: Callable[[bytes], None], size: int = EXPORT_CHUNK_SIZE) -> None:
        self._emit = emit
        self._size = size
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) >= self._size:
            self._emit(bytes(self._buffer[: self._size]))
            del self._buffer[: self._size]
        return len(data)

    def flush(self) -> None:
        """Nothing to do: chunks go out as they fill (a partial one on close)."""

    def __enter__(self) -> _ChunkWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None and self._buffer:
            self._emit(bytes(self._buffer))


def _absolute(path: str, field_name: str) -> str:
    """``path`` when it is absolute (the daemon's working directory means nothing to a client)."""
    if not os.path.isabs(path):
        raise InvalidArgument(f"{field_name} {path!r} must be an absolute path")
    return path


def _data_of(requests: Iterable[Any]) -> Iterator[bytes]:
    """The data chunks of an Import stream after its options message."""
    for request in requests:
        if request.WhichOneof("part") != "data":
            raise InvalidArgument("only the first ImportChunk may carry options")
        yield request.data


def _init(context: InitContext) -> TransferService:
    config: TransferServiceConfig = context.config
    content = context.get("service", "content").store
    return TransferService(
        content,
        context.get("service", "images").store,
        context.get("service", "unpack").unpacker,
        context.get("service", "leases").store,
        context.events,
        config,
    )


plugin = Registration(
    init=_init,
    requires=("service.content", "service.images", "service.unpack", "service.leases", "differ"),
    config=TransferServiceConfig,
)
