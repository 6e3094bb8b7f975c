"""Pulling an image from a registry into a namespace: fetch and unpack in one streaming pass.

:meth:`Puller.pull` resolves the reference, then fetches the index and the manifests and configs of
the wanted platforms (each verified, and read from the content store when it has them already), then
the layers, and creates the image record last. Blobs are stored as containerd's
pull stores them: the labels ``containerd.io/gc.ref.content.m.<i>`` (index -> manifests),
``...config`` and ``...l.<i>`` (manifest -> config and layers) keep the graph alive under the image,
and ``containerd.io/distribution.source.<host>=<repository>`` records where each blob came from.

Layers download concurrently (``PullOptions.workers`` at a time). When the image is unpacked into a
snapshotter that can rebase, each layer is *applied while it arrives*: its bytes go to the content
writer (hashing them) and to the differ at once, every layer extracting in parallel into a parentless
snapshot that is rebased onto its parent in order (:class:`core.unpack.Unpacker` with a
:data:`~core.unpack.LayerSource`). A layer's snapshot is committed only once its blob's digest and
its diff id are verified; a bad layer leaves its ingest aborted and no snapshot. A thread per layer
fetches and writes it a few chunks ahead of the differ, so fetching overlaps with extracting. Other
snapshotters get the layers downloaded first, then unpacked. Memory stays flat: nothing holds a layer
whole, and what a layer in flight holds is bounded (a few MiB of chunks and decompressed pieces).

Blobs the namespace has are not downloaded; blobs the store has (another namespace pulled them) are
only recorded. Every blob is written through the ingest ``pull-<digest>``, so a pull that failed
midway resumes where it stopped (an HTTP Range request from the ingest's offset). The work runs
under a lease that expires after a day: deleted when the pull succeeds, kept when it fails, so that
the fetched blobs and committed snapshots wait for a retry instead of the garbage collector.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from core import oci
from core.content import Info, Writer
from core.crashpoints import crashpoint
from core.diff.apply import hand_over
from core.digest import Digest
from core.distribution.blobs import gc_labels, run_all, write_blob
from core.distribution.progress import Progress, ProgressFn, blob_ref
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from core.metadata.images import LABEL_GC_REF_CONTENT, Image
from core.metadata.leases import LABEL_GC_EXPIRE
from core.types import Descriptor, Platform
from core.unpack import LayerSource, lease_expiry

if TYPE_CHECKING:
    from core.distribution.reference import Reference
    from core.distribution.registry import RegistryClient
    from core.metadata.content import ContentMetadata
    from core.metadata.images import ImageStore
    from core.metadata.leases import LeaseStore
    from core.unpack import Unpacker

__all__ = ["INGEST_PREFIX", "LABEL_DISTRIBUTION_SOURCE", "LABEL_PULL", "PullOptions", "Puller"]

log = logging.getLogger("containerkit.pull")

INGEST_PREFIX = "pull-"
"""Content ingests of a pull are named ``pull-<digest>``: a later pull of the blob resumes them."""

LABEL_DISTRIBUTION_SOURCE = "containerd.io/distribution.source."
"""Blob label prefix ``...source.<host>``: the repositories of that registry the blob came from (comma-separated)."""

LABEL_PULL = "containerkit.io/pull"
"""Label of a pull's lease: the reference pulled (a lease left by a failed pull says what it was for)."""

_LOCKED_WAIT_MAX = 1.0  # seconds between looks at an ingest another pull is writing
_AHEAD = 4  # chunks (of up to 1 MiB) a layer's fetching thread may run ahead of its differ
_END = object()

T = TypeVar("T")


@dataclass(frozen=True)
class PullOptions:
    """How to pull.

    ``platforms``: None for the host's (and what it runs), ``[]`` for all (everything fetched, the
    host's unpacked if the image has it), else those (each unpacked). ``unpack`` into ``snapshotter``.
    ``workers``: layers downloaded at once. ``labels``: the image record's. ``signatures``: also fetch
    the signature artifacts of the image's target (:func:`core.distribution.signature.fetch_signatures`).
    ``verify``: called with the reference and the image's target once everything is in content (and
    unpacked), before the image record is made; raising fails the pull (a signature policy).
    """

    platforms: Sequence[Platform] | None = None
    snapshotter: str = "overlayfs"
    unpack: bool = True
    workers: int = 4
    labels: Mapping[str, str] = field(default_factory=dict)
    signatures: bool = False
    verify: Callable[[Reference, Descriptor], None] | None = None


class Puller:
    """Pulls images into a namespace's content, snapshots and images; safe to use from several threads.

    ``events`` (an event exchange, optional) gets ``/images/create`` or ``/images/update``.
    """

    def __init__(
        self,
        content: ContentMetadata,
        images: ImageStore,
        unpacker: Unpacker,
        leases: LeaseStore,
        events: Any = None,
    ) -> None:
        self._content = content
        self._images = images
        self._unpacker = unpacker
        self._leases = leases
        self._events = events

    def pull(
        self,
        namespace: str,
        ref: Reference,
        client: RegistryClient,
        options: PullOptions,
        progress: ProgressFn | None = None,
    ) -> Image:
        """Pull ``ref`` from ``client``'s registry into ``namespace`` (see the module doc); return the
        image record, named ``str(ref)``, whose target is what ``ref`` resolves to.

        Errors: those of the registry client (NotFound, Unavailable, Unauthenticated...);
        InvalidArgument for malformed or unsupported documents or options; FailedPrecondition for a blob
        whose digest or size differs from its descriptor ("digest mismatch: got X, want Y") or a layer
        whose diff id differs from the config's ("diff id mismatch"); NotFound when no manifest matches
        the platforms; the unpacker's and ``progress``'s errors. After an error no image record is made
        or changed, and the pull's lease (label :data:`LABEL_PULL`) is kept for a retry.
        """
        if options.workers < 1:
            raise InvalidArgument(f"workers must be at least 1, got {options.workers}")
        labels = {LABEL_GC_EXPIRE: lease_expiry(), LABEL_PULL: str(ref)}
        lease = self._leases.create(namespace, labels=labels).id
        job = _Pull(self, namespace, ref, client, options, lease, progress or _ignore)
        try:
            image = job.run()
        except BaseException as err:
            log.info("pull of %s failed; lease %s keeps what was fetched for a retry: %s", ref, lease, err)
            with suppress(Exception):  # the progress function may be what failed
                job.report(str(ref), "image", "", "error", message=str(err))
            raise
        self._leases.delete(namespace, lease)
        return image


def _ignore(_: Progress) -> None:
    """A progress function that drops every event."""


class _Pull:
    """One pull's state and steps (see :meth:`Puller.pull`)."""

    def __init__(
        self,
        puller: Puller,
        namespace: str,
        ref: Reference,
        client: RegistryClient,
        options: PullOptions,
        lease: str,
        progress: ProgressFn,
    ) -> None:
        self.content = puller._content
        self.puller = puller
        self.namespace = namespace
        self.ref = ref
        self.client = client
        self.options = options
        self.lease = lease
        self.progress = progress
        self.documents: dict[Digest, bytes] = {}
        self.settled: set[Digest] = set()  # blobs committed or labelled by this pull
        self.source_label = (LABEL_DISTRIBUTION_SOURCE + ref.domain, ref.path)

    # -- the steps -------------------------------------------------------------------------------------

    def run(self) -> Image:
        name = str(self.ref)
        root, data = self.client.resolve(self.ref)
        self.documents[root.digest] = data
        manifests_to_unpack: list[Descriptor] = []
        if self.options.platforms is not None and not self.options.platforms:
            manifests = self._walk_all(root)
            with suppress(NotFound):  # an image without the host's platform is fetched, not unpacked
                manifests_to_unpack.append(self._resolve(root, None).manifest_descriptor)
        else:
            wanted = self.options.platforms or [None]
            manifests = _unique(self._resolve(root, platform).manifest_descriptor for platform in wanted)
            manifests_to_unpack = manifests
        layers = self._store_documents(root, manifests)
        unpack = manifests_to_unpack if self.options.unpack else []
        stream = self.puller._unpacker.rebases(self.options.snapshotter)
        if stream:
            self._unpack(unpack, self._layer_source)
        self._download_all(layers)  # what no unpack streamed: other platforms, layers whose snapshot exists
        if not stream:
            self._unpack(unpack, None)
        if self.options.signatures:
            from core.distribution.signature import fetch_signatures

            fetch_signatures(self.client, self.ref, root, self.content, self.namespace, lease=self.lease)
        target = Descriptor(root.media_type, root.digest, root.size, root.annotations)
        if self.options.verify is not None:
            self.options.verify(self.ref, target)
        crashpoint("pull.before-image-create")
        image = self._record(Image(name, target, self.options.labels))
        self.report(name, "image", str(root.digest), "done", root.size, root.size)
        return image

    def _resolve(self, root: Descriptor, platform: Platform | None) -> oci.ResolvedImage:
        return oci.resolve_image(self._read, root, oci.only(platform))

    def _walk_all(self, desc: Descriptor) -> list[Descriptor]:
        """Every manifest under ``desc`` (an index's artifacts included), depth first."""
        name = f"{_kind(desc.media_type)} {desc.digest}"
        if oci.is_manifest(desc.media_type):
            return [desc]
        if not oci.is_index(desc.media_type):
            raise InvalidArgument(f"{name}: media type {desc.media_type!r} is not an image index or manifest")
        index = oci.parse_index(self._read(desc), desc.media_type, name)
        children = [
            child for child in index.manifests if oci.is_index(child.media_type) or oci.is_manifest(child.media_type)
        ]
        return [manifest for child in children for manifest in self._walk_all(child)]

    def _read(self, desc: Descriptor) -> bytes:
        """A document (index, manifest, config): read before, in the store (whichever namespace committed it:
        the bytes are checked against the digest), or fetched; verified."""
        data = self.documents.get(desc.digest)
        if data is not None:
            return data
        if desc.size > oci.MAX_DOCUMENT_SIZE:
            raise InvalidArgument(f"{desc.digest}: {desc.size} bytes is more than the {oci.MAX_DOCUMENT_SIZE} allowed")
        try:
            data = self.content.backend.read_blob(desc.digest)
        except NotFound:
            if oci.is_index(desc.media_type) or oci.is_manifest(desc.media_type):
                data = self.client.fetch_manifest(self.ref, desc)
            else:
                data = b"".join(self.client.fetch_blob(self.ref, desc))
        name = f"{_kind(desc.media_type)} {desc.digest}"
        _verify(desc, Digest.from_bytes(data, desc.digest.algorithm), len(data), name)
        self.documents[desc.digest] = data
        return data

    def _store_documents(self, root: Descriptor, manifests: list[Descriptor]) -> list[Descriptor]:
        """Store the configs, ``manifests`` and the indexes leading to them, labelled; return their layers."""
        chosen = {manifest.digest for manifest in manifests}
        layers: dict[Digest, Descriptor] = {}
        for desc in manifests:
            data = self._read(desc)
            manifest = oci.parse_manifest(data, desc.media_type, f"manifest {desc.digest}")
            self._read(manifest.config)
            self._store_document(manifest.config, {})
            self._store_document(desc, gc_labels(desc.media_type, data))
            for layer in manifest.layers:
                layers.setdefault(layer.digest, layer)

        def leads(desc: Descriptor) -> bool:
            """Whether ``desc`` is a chosen manifest or an index (stored, labelled) leading to one."""
            if not oci.is_index(desc.media_type):
                return desc.digest in chosen
            index = oci.parse_index(self.documents[desc.digest], desc.media_type, f"index {desc.digest}")
            kept = [child for child in index.manifests if child.digest in self.documents and leads(child)]
            if kept:
                refs = {f"{LABEL_GC_REF_CONTENT}.m.{n}": str(child.digest) for n, child in enumerate(kept)}
                self._store_document(desc, refs)
            return bool(kept)

        leads(root)
        return list(layers.values())

    def _store_document(self, desc: Descriptor, refs: Mapping[str, str]) -> None:
        """Store a document read before with the labels ``refs`` and the source label."""
        labels = {**refs, **self._source(desc.digest)}
        data = self.documents[desc.digest]
        _unlocked(
            lambda: write_blob(self.content, self.namespace, data, desc.media_type, lease=self.lease, labels=labels)
        )
        self._done(desc, "done")

    def _unpack(self, manifests: list[Descriptor], source: LayerSource | None) -> None:
        """Unpack the image of each of ``manifests`` under the pull's lease, its layers from ``source``."""
        for manifest in manifests:
            self.puller._unpacker.unpack(
                self.namespace,
                manifest,
                self.options.snapshotter,
                source=source,
                lease=self.lease,
                workers=self.options.workers,
            )

    def _record(self, image: Image) -> Image:
        """Create the image record, or replace target and labels of the one of that name."""
        from core.api.containerd.events import image_pb2 as events_pb

        try:
            stored = self.puller._images.create(self.namespace, image)
            topic, event = "/images/create", events_pb.ImageCreate(name=stored.name, labels=dict(stored.labels))
        except AlreadyExists:
            stored = self.puller._images.update(self.namespace, image)
            topic, event = "/images/update", events_pb.ImageUpdate(name=stored.name, labels=dict(stored.labels))
        if self.puller._events is not None:
            self.puller._events.publish(self.namespace, topic, event)
        return stored

    # -- layers ----------------------------------------------------------------------------------------

    def _download_all(self, layers: list[Descriptor]) -> None:
        """Download (or label, when the namespace has them) the ``layers`` not settled yet, ``workers`` at a
        time; the first error stops the rest."""
        missing = [layer for layer in layers if layer.digest not in self.settled]
        if not missing:
            return
        run_all([functools.partial(self._download, layer) for layer in missing], self.options.workers, "pull")

    def _download(self, desc: Descriptor) -> None:
        """Fetch blob ``desc`` into content (resuming its ingest), unless the namespace has it."""
        labels = self._source(desc.digest)
        writer = self._writer(desc, labels)
        if writer is not None:
            self._fill(writer, desc, labels)

    def _fill(self, writer: Writer, desc: Descriptor, labels: Mapping[str, str]) -> None:
        """Fetch the rest of ``desc`` into ``writer``, verify and commit it, close the writer. An ingest
        resumed from an earlier attempt whose bytes turn out not to be the blob is fetched once more, whole."""
        resumed = writer.offset
        try:
            with writer:
                _Download(self, desc, writer).finish()
                self._commit(writer, desc, labels)
        except _Mismatch as err:
            if not resumed:
                raise
            log.info("%s; the %d bytes resumed were not the blob's: fetching it again", err, resumed)
            writer = self._writer(desc, labels)
            if writer is not None:
                self._fill(writer, desc, labels)

    @contextmanager
    def _layer_source(self, desc: Descriptor) -> Iterator[Iterable[bytes]]:
        """The :data:`core.unpack.LayerSource` of a pull: the blob's bytes as they arrive, fetched and
        written to its ingest by a thread of their own (a few chunks ahead of the differ); committed
        (digest verified) when the block ends without error. A blob in content already, or one whose
        ingest was partly written before, is read back from content."""
        labels = self._source(desc.digest)
        writer = self._writer(desc, labels)
        if writer is not None and writer.offset:
            self._fill(writer, desc, labels)
            writer = None
        if writer is None:
            with self.content.reader_at(self.namespace, desc) as reader:
                yield reader.chunks()
            return
        with writer:  # closed without a commit (after an error) the ingest is kept for a retry
            download = _Download(self, desc, writer)
            ahead = _Ahead(download)
            try:
                yield ahead
            except (InvalidArgument, FailedPrecondition):
                ahead.close()
                download.finish()  # bytes that are not the blob make a better error than a bad layer
                self._check(writer, desc)
                raise
            finally:
                ahead.close()  # before the writer closes: the thread writes to it
            download.finish()
            self._commit(writer, desc, labels)

    # -- content ---------------------------------------------------------------------------------------

    def _source(self, digest: Digest) -> dict[str, str]:
        """The source label of blob ``digest``: this repository added to those it already names."""
        key, repository = self.source_label
        try:
            current = self.content.info(self.namespace, digest).labels.get(key, "")
        except NotFound:
            current = ""
        repositories = [name for name in current.split(",") if name]
        return {key: ",".join(repositories if repository in repositories else [*repositories, repository])}

    def _writer(self, desc: Descriptor, labels: Mapping[str, str]) -> Writer | None:
        """The ingest of ``desc`` (resumed where it stopped), or None when the namespace has the blob
        (then ``labels`` are set on it). Waits while another pull writes the same blob."""
        ref = INGEST_PREFIX + str(desc.digest)
        try:
            return _unlocked(lambda: self.content.writer(self.namespace, ref, desc.size, desc.digest, lease=self.lease))
        except AlreadyExists:
            self._label(desc, labels)
            return None

    def _label(self, desc: Descriptor, labels: Mapping[str, str]) -> None:
        """Set ``labels`` on blob ``desc``, which the namespace has."""
        self.content.update(self.namespace, Info(desc.digest, labels=labels), [f"labels.{key}" for key in labels])
        self.settled.add(desc.digest)
        self._done(desc, "exists")

    def _check(self, writer: Writer, desc: Descriptor) -> None:
        """Abort the ingest and raise :class:`_Mismatch` unless it holds exactly the blob ``desc``."""
        digest = writer.digest()
        if digest.algorithm != desc.digest.algorithm:
            return  # the commit checks it in the descriptor's algorithm
        try:
            _verify(desc, digest, writer.offset, f"{_kind(desc.media_type)} {desc.digest}")
        except FailedPrecondition as err:
            writer.close()
            self.content.abort(self.namespace, writer.ref)
            raise _Mismatch(str(err)) from None

    def _commit(self, writer: Writer, desc: Descriptor, labels: Mapping[str, str]) -> None:
        """Verify and commit the ingest with ``labels`` (set on the blob if the namespace has it meanwhile)."""
        self._check(writer, desc)
        try:
            writer.commit(desc.size, desc.digest, labels)
        except AlreadyExists:
            self._label(desc, labels)
            return
        self.settled.add(desc.digest)
        self._done(desc, "done")

    def _done(self, desc: Descriptor, state: str) -> None:
        """Report the last event of blob ``desc``: ``state`` with every byte done."""
        kind = _kind(desc.media_type)
        self.report(blob_ref(kind, str(desc.digest)), kind, str(desc.digest), state, desc.size, desc.size)

    def report(
        self, ref: str, kind: str, digest: str, state: str, offset: int = 0, total: int = 0, message: str = ""
    ) -> None:
        """Hand one :class:`Progress` event to the pull's progress function."""
        self.progress(Progress(ref, kind, digest, state, offset, total, message))


class _Mismatch(FailedPrecondition):
    """An ingest that does not hold the blob it was written for (it has been aborted)."""


class _Download:
    """The rest of blob ``desc`` from the registry, from the ingest's offset: iterating yields each
    chunk once it is written to ``writer`` (and reports progress); :meth:`finish` fetches what
    iterating left. An error of the fetch is raised again by every later call."""

    def __init__(self, pull: _Pull, desc: Descriptor, writer: Writer) -> None:
        self._pull = pull
        self._desc = desc
        self._writer = writer
        if writer.offset > desc.size:
            writer.truncate(0)
        self._offset = writer.offset
        self._chunks: Iterator[bytes] | None = None
        self._error: BaseException | None = None
        self._kind = _kind(desc.media_type)
        self._ref = blob_ref(self._kind, str(desc.digest))

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._error is not None:
            raise self._error
        try:
            if self._chunks is None:
                fetch = self._offset < self._desc.size
                self._chunks = (
                    self._pull.client.fetch_blob(self._pull.ref, self._desc, self._offset) if fetch else iter(())
                )
            chunk = next(self._chunks)
            self._writer.write(chunk)
        except StopIteration:
            raise
        except BaseException as err:
            self._error = err
            raise
        self._offset += len(chunk)
        self._pull.report(self._ref, self._kind, str(self._desc.digest), "downloading", self._offset, self._desc.size)
        return chunk

    def finish(self) -> None:
        """Fetch and write the rest of the blob."""
        for _ in self:
            pass


class _Ahead:
    """Iterates ``chunks`` in a thread of its own, up to :data:`_AHEAD` chunks ahead of the consumer,
    so that fetching (and writing, hashing) a blob overlaps with decompressing and extracting it.
    Iterating raises what the thread met. Always :meth:`close` it."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=_AHEAD)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(chunks,), name="containerkit-fetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[bytes]:
        while (item := self._queue.get()) is not _END:
            yield item  # type: ignore[misc]
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the thread after the chunk at hand (what it took but did not hand over is lost) and wait for it."""
        self._stop.set()
        self._thread.join()

    def _run(self, chunks: Iterator[bytes]) -> None:
        try:
            for chunk in chunks:
                if not hand_over(self._queue, chunk, self._stop):
                    return
        except BaseException as err:
            self._error = err
        hand_over(self._queue, _END, self._stop)


def _unlocked(call: Callable[[], T]) -> T:
    """``call()``, made again after a while for as long as it finds its ingest locked by another writer (the
    Unavailable "ref ... locked" of a concurrent pull of the same blob, which commits or gives up soon)."""
    delay = 0.01
    while True:
        try:
            return call()
        except Unavailable as err:
            if "locked" not in str(err):
                raise
        time.sleep(delay)
        delay = min(delay * 2, _LOCKED_WAIT_MAX)


def _verify(desc: Descriptor, digest: Digest, size: int, name: str) -> None:
    """FailedPrecondition unless ``digest`` and ``size`` are the descriptor's."""
    if size != desc.size:
        raise FailedPrecondition(f"{name}: size mismatch: got {size} bytes, want {desc.size}")
    if digest != desc.digest:
        raise FailedPrecondition(f"{name}: digest mismatch: got {digest}, want {desc.digest}")


def _kind(media_type: str) -> str:
    """The :data:`~core.distribution.progress.KINDS` entry of a blob of ``media_type``."""
    if oci.is_index(media_type):
        return "index"
    if oci.is_manifest(media_type):
        return "manifest"
    if oci.is_config(media_type):
        return "config"
    return "layer"


def _unique(descriptors: Iterable[Descriptor]) -> list[Descriptor]:
    """``descriptors`` without repeated digests, in order."""
    seen: dict[Digest, Descriptor] = {}
    for desc in descriptors:
        seen.setdefault(desc.digest, desc)
    return list(seen.values())
