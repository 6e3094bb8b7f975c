"""Unpacking an image into committed snapshots named by chain id (containerd's ``Image.Unpack``).

For the manifest of the wanted platform, every layer ``i`` becomes the committed snapshot named
``chain_ids(diff_ids)[i]`` whose parent is the one below. Layers whose snapshot the namespace has
already are reused (the stack is scanned from the top, so one hit covers everything beneath). Each
missing layer is extracted into an active snapshot keyed ``extract-<nanoseconds>-<random>
<chain id>`` (containerd's ``UnpackKeyFormat``) by the differ, which checks the layer's diff id
against the config's before the snapshot is committed; on any failure that active snapshot is
removed and nothing is committed for the layer. The compressed layer blob then gets the label
``containerd.io/uncompressed=<diff id>``, and at the end the config blob gets
``containerd.io/gc.ref.snapshot.<snapshotter>=<top chain id>`` so that the image keeps its
snapshots alive.

Snapshotters that can rebase (:data:`core.snapshot.CAPABILITY_REBASE`) unpack in parallel: every
missing layer is extracted at once (a bounded pool) into a parentless snapshot labelled
:data:`core.snapshot.LABEL_REBASE`, then the snapshots are rebased onto their parents in order.
Others unpack one layer after the other. Both give the same snapshots.

Layers are read from the namespace's content, or, given a :data:`LayerSource`, from wherever it
opens them: a pull passes one that streams each blob from the registry into the content store and
the differ at once, so that a layer is applied while it downloads.

Everything runs under a temporary lease (expiring after a day should the process die), deleted at
the end, so that garbage collection never takes half-done work; or under the caller's lease.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from core import oci
from core.content import Info as BlobInfo
from core.crashpoints import crashpoint
from core.diff import LABEL_UNCOMPRESSED, Differ
from core.digest import Digest
from core.errors import AlreadyExists, ContainerkitError, InvalidArgument, NotFound
from core.metadata.content import ContentMetadata
from core.metadata.images import LABEL_GC_REF_SNAPSHOT
from core.metadata.leases import LABEL_GC_EXPIRE, LeaseResource, LeaseStore
from core.metadata.snapshots import LABEL_SNAPSHOT_REF, SnapshotMetadata
from core.snapshot import LABEL_REBASE
from core.types import Descriptor, Platform

__all__ = ["DEFAULT_WORKERS", "UNPACK_KEY_PREFIX", "LayerSource", "UnpackResult", "Unpacker"]

log = logging.getLogger("containerkit.unpack")

UNPACK_KEY_PREFIX = "extract"
"""Prefix of the keys of the active snapshots layers are extracted into (containerd's ``UnpackKeyPrefix``)."""

DEFAULT_WORKERS = 4
"""Layers extracted at once when unpacking in parallel."""

_LEASE_EXPIRY = timedelta(hours=24)

LayerSource = Callable[[Descriptor], AbstractContextManager[Iterable[bytes]]]
"""Opens a layer blob as chunks of bytes, in a ``with`` block. Leaving the block without an error
means the chunks were the whole blob, verified against the descriptor and now in the namespace's
content (so the layer's snapshot may be committed); an error raised in the block passes through the
source (it may raise a better one, such as a digest mismatch). The chunks may be consumed from
another thread than the one that entered the block, never from two at once."""


def lease_expiry() -> str:
    """The ``containerd.io/gc.expire`` value of a temporary lease made now: a day from now (RFC 3339)."""
    return (datetime.now(UTC) + _LEASE_EXPIRY).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class UnpackResult:
    """An unpacked image: its top snapshot (``chain_id``), its ``layers`` and how many were ``applied`` now."""

    chain_id: Digest
    layers: int
    applied: int


@dataclass(frozen=True)
class _Layer:
    """One layer to unpack: its blob, expected diff id, chain id and parent chain id (``""`` at the bottom)."""

    name: str
    blob: Descriptor
    diff_id: Digest
    chain_id: Digest
    parent: str


class Unpacker:
    """Unpacks images of a namespace's content into its snapshots; safe to use from several threads.

    ``rebase_snapshotters`` names the snapshotters that declare :data:`~core.snapshot.CAPABILITY_REBASE`
    (the parallel path is used for them); ``workers`` bounds the layers extracted at once.
    """

    def __init__(
        self,
        content: ContentMetadata,
        snapshots: SnapshotMetadata,
        differ: Differ,
        *,
        leases: LeaseStore,
        rebase_snapshotters: Collection[str] = (),
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._content = content
        self._snapshots = snapshots
        self._differ = differ
        self._leases = leases
        self._rebase_snapshotters = frozenset(rebase_snapshotters)
        self._workers = workers

    def unpack(
        self,
        namespace: str,
        image_target: Descriptor,
        snapshotter: str,
        platform: Platform | None = None,
        *,
        rebase: bool | None = None,
        source: LayerSource | None = None,
        lease: str | None = None,
        workers: int | None = None,
    ) -> UnpackResult:
        """Unpack the image whose target (index or manifest) is ``image_target`` for ``platform``
        (default: the host's) into ``snapshotter``; return its top chain id.

        ``rebase`` forces the parallel (True) or sequential (False) path; None picks by capability.
        ``source`` opens the layers to apply (default: from the namespace's content); it is entered
        only for layers whose snapshot is missing, so a layer blob may still be absent afterwards.
        ``lease``, when given, holds the work (snapshots committed, blobs labelled) and is left in
        place; otherwise a temporary lease does and is deleted at the end. ``workers`` overrides the
        number of layers extracted at once. The index or manifest and the config must be in content.
        Errors: NotFound for a missing blob or no manifest for the platform; InvalidArgument for
        malformed documents or a layer count that differs from the config's diff ids;
        FailedPrecondition when a layer's diff id does not match the config ("diff id mismatch");
        the differ's and snapshotter's errors otherwise. After an error no snapshot is committed for
        the failed layer (those below it may remain, unreferenced, for garbage collection).
        """
        parallel = self.rebases(snapshotter) if rebase is None else rebase
        held = lease or self._leases.create(namespace, labels={LABEL_GC_EXPIRE: lease_expiry()}).id
        try:
            image = oci.resolve_image(lambda desc: self._read(namespace, desc), image_target, oci.only(platform))
            layers = _layers(image)
            pending = self._pending(namespace, snapshotter, layers, held)
            if pending and parallel:
                self._unpack_parallel(namespace, snapshotter, pending, held, source, workers or self._workers)
            else:
                for layer in pending:
                    key = self._extract(namespace, snapshotter, layer, held, source)
                    self._commit(namespace, snapshotter, layer, key, held)
            top = layers[-1].chain_id
            label = f"{LABEL_GC_REF_SNAPSHOT}{snapshotter}"
            crashpoint("unpack.before-gc-label")
            self._content.update(
                namespace, BlobInfo(image.manifest.config.digest, labels={label: top}), [f"labels.{label}"]
            )
        finally:
            if not lease:
                self._leases.delete(namespace, held)
        log.debug("unpacked %s into %s: %s (%d of %d layers applied)", image_target.digest, snapshotter, top,
                  len(pending), len(layers))  # fmt: skip
        return UnpackResult(top, len(layers), len(pending))

    def rebases(self, snapshotter: str) -> bool:
        """Whether :meth:`unpack` extracts layers into ``snapshotter`` in parallel (it can rebase)."""
        return snapshotter in self._rebase_snapshotters

    def _read(self, namespace: str, desc: Descriptor) -> bytes:
        with self._content.reader_at(namespace, desc) as reader:
            return reader.read(0, reader.size)

    def _pending(self, namespace: str, snapshotter: str, layers: list[_Layer], lease: str) -> list[_Layer]:
        """The layers above the highest one already unpacked; the lease holds that one from now on."""
        for position in range(len(layers) - 1, -1, -1):
            chain_id = layers[position].chain_id
            # Held before the stat, so the collector cannot take it between the two.
            self._leases.add_resource(namespace, lease, LeaseResource(chain_id, f"snapshots/{snapshotter}"))
            try:
                self._snapshots.stat(namespace, snapshotter, chain_id)
            except NotFound:
                continue
            return layers[position + 1 :]
        return layers

    def _extract(
        self,
        namespace: str,
        snapshotter: str,
        layer: _Layer,
        lease: str,
        source: LayerSource | None,
        *,
        rebase: bool = False,
    ) -> str:
        """Prepare an active snapshot for ``layer`` (parentless and labelled for rebase if ``rebase``),
        apply the layer (from ``source``, or from content when None) and check its diff id; return the
        snapshot's key, or ``""`` when the layer's snapshot exists already. On failure the active
        snapshot is removed."""
        key = f"{UNPACK_KEY_PREFIX}-{time.time_ns()}-{secrets.token_urlsafe(6)} {layer.chain_id}"
        labels = {LABEL_SNAPSHOT_REF: layer.chain_id}
        if rebase:
            labels[LABEL_REBASE] = "true"
        try:
            mounts = self._snapshots.prepare(
                namespace, snapshotter, key, "" if rebase else layer.parent, labels, lease=lease
            )
        except AlreadyExists:
            self._snapshots.stat(namespace, snapshotter, layer.chain_id)  # unpacked meanwhile, else NotFound
            return ""
        try:
            if source is None:
                self._differ.apply(namespace, layer.blob, mounts, diff_id=layer.diff_id)
            else:
                with source(layer.blob) as chunks:
                    self._differ.apply_stream(namespace, layer.blob, chunks, mounts, diff_id=layer.diff_id)
        except ContainerkitError as err:
            self._discard(namespace, snapshotter, key, lease)
            raise type(err)(f"{layer.name}: {err}") from err
        except BaseException:
            self._discard(namespace, snapshotter, key, lease)
            raise
        crashpoint("unpack.layer.applied")
        return key

    def _commit(
        self, namespace: str, snapshotter: str, layer: _Layer, key: str, lease: str, *, rebase: bool = False
    ) -> None:
        """Commit (or rebase onto its parent) the extracted ``key`` as the layer's chain id, then label
        the layer blob with its diff id. A chain id committed meanwhile by someone else is fine."""
        if not key:
            return
        labels = {LABEL_SNAPSHOT_REF: layer.chain_id}
        try:
            if rebase:
                self._snapshots.rebase(namespace, snapshotter, layer.chain_id, key, layer.parent, labels, lease=lease)
            else:
                self._snapshots.commit(namespace, snapshotter, layer.chain_id, key, labels, lease=lease)
        except AlreadyExists:
            self._discard(namespace, snapshotter, key, lease)
        except BaseException:
            self._discard(namespace, snapshotter, key, lease)
            raise
        info = BlobInfo(layer.blob.digest, labels={LABEL_UNCOMPRESSED: layer.diff_id})
        self._content.update(namespace, info, [f"labels.{LABEL_UNCOMPRESSED}"])

    def _unpack_parallel(
        self,
        namespace: str,
        snapshotter: str,
        pending: list[_Layer],
        lease: str,
        source: LayerSource | None,
        workers: int,
    ) -> None:
        """Extract every layer at once (``workers`` at a time) into parentless snapshots, then rebase
        them in order."""
        with ThreadPoolExecutor(min(workers, len(pending)), thread_name_prefix="unpack") as pool:
            futures = [
                pool.submit(self._extract, namespace, snapshotter, layer, lease, source, rebase=True)
                for layer in pending
            ]
            done = 0
            try:
                for layer, future in zip(pending, futures, strict=True):
                    self._commit(namespace, snapshotter, layer, future.result(), lease, rebase=True)
                    done += 1
            except BaseException:
                self._abandon(namespace, snapshotter, futures[done + 1 :], lease)
                raise

    def _abandon(self, namespace: str, snapshotter: str, futures: list[Future[str]], lease: str) -> None:
        """Cancel extractions not started; remove the snapshots of those that finish."""
        for future in futures:
            future.cancel()
        for future in futures:
            if not future.cancelled() and future.exception() is None and future.result():
                self._discard(namespace, snapshotter, future.result(), lease)

    def _discard(self, namespace: str, snapshotter: str, key: str, lease: str) -> None:
        """Remove an extraction snapshot that will not be committed (and the lease's hold on it)."""
        try:
            self._snapshots.remove(namespace, snapshotter, key, lease=lease)
        except NotFound:
            pass
        except Exception:
            log.warning("could not remove extraction snapshot %r", key, exc_info=True)


def _layers(image: oci.ResolvedImage) -> list[_Layer]:
    """The layers of ``image`` with their chain ids; InvalidArgument when they do not fit the config."""
    blobs, diff_ids = image.manifest.layers, image.config.diff_ids
    where = f"image {image.manifest_descriptor.digest}"
    if len(blobs) != len(diff_ids):
        raise InvalidArgument(
            f"{where}: the manifest has {len(blobs)} layers but the config lists {len(diff_ids)} diff ids"
        )
    if not blobs:
        raise InvalidArgument(f"{where} has no layers to unpack")
    for position, blob in enumerate(blobs):
        if not oci.is_layer(blob.media_type):
            raise InvalidArgument(f"{where}: layer {position + 1} has media type {blob.media_type!r}, not a layer")
    chain = oci.chain_ids(diff_ids)
    return [
        _Layer(
            f"layer {position + 1}/{len(blobs)} {blob.digest}",
            blob,
            diff_id,
            chain_id,
            chain[position - 1] if position else "",
        )
        for position, (blob, diff_id, chain_id) in enumerate(zip(blobs, diff_ids, chain, strict=True))
    ]
