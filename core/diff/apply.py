"""Applying a layer onto a snapshot's mounts: decompress, hash and extract in one streaming pass.

One thread reads and decompresses the layer, another hashes it (zlib, zstandard and hashlib
release the GIL), while the calling thread parses the tar stream and writes files. Where the layer
lands depends on the mounts, as containerd's applier decides:

- one overlay mount with an ``upperdir``: extracted straight into the upperdir, whiteouts as
  overlay's own, missing parents given the attributes of the lowerdirs' (no mount needed);
- one aufs mount (``br:<upper>=rw:<lower>=ro+wh...``): straight into the rw branch, whiteout files kept;
- one read-write bind mount: straight into its source directory, whiteouts as deletions;
- anything else: mounted on a temporary directory (core.mount.temp_mount), whiteouts as deletions.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

from core.diff.archive import Whiteouts, apply_tar
from core.diff.compression import Compression, decompress, media_type_compression
from core.diff.mounts import aufs_branches, is_bind, overlay_dirs
from core.digest import CANONICAL, Digest, Digester
from core.errors import FailedPrecondition
from core.oci import OCI_LAYER
from core.types import Descriptor, Mount

__all__ = ["apply_layer", "direct_target", "hand_over"]

_QUEUE_DEPTH = 2  # decompressed pieces (each up to 4 MiB) the inflating thread may run ahead (per layer in flight)
_POLL = 0.1  # seconds a blocked queue operation waits before looking whether it should stop
_END = object()


def apply_layer(
    chunks: Iterable[bytes],
    media_type: str,
    mounts: Sequence[Mount],
    *,
    diff_id: Digest | str | None = None,
) -> Descriptor:
    """Apply the layer blob ``chunks`` (of ``media_type``) onto ``mounts``; return the applied tar's
    descriptor (OCI layer tar media type, digest = the diff id, size = uncompressed bytes).

    InvalidArgument for an unsupported media type or a corrupt, truncated or hostile layer;
    FailedPrecondition for read-only mounts, and for a diff id other than ``diff_id`` when given
    (checked once everything is applied). On error the mounts hold a partly applied layer.
    """
    compression = media_type_compression(media_type)
    _check_writable(mounts)
    expected = Digest(diff_id) if diff_id else None
    inflater = _Inflater(chunks, compression, expected.algorithm if expected else CANONICAL)
    try:
        target = direct_target(mounts)
        if target is not None:
            root, whiteouts, parents = target
            apply_tar(inflater.pieces(), root, whiteouts=whiteouts, parents=parents)
        else:
            from core.mount import temp_mount

            with temp_mount(mounts, prefix="containerkit-apply-") as root:
                apply_tar(inflater.pieces(), root)
    finally:
        inflater.close()
    digest, size = inflater.result()
    if expected is not None and digest != expected:
        raise FailedPrecondition(f"applied layer has a wrong diff id: diff id mismatch: got {digest}, want {expected}")
    return Descriptor(OCI_LAYER, digest, size)


def direct_target(mounts: Sequence[Mount]) -> tuple[str, Whiteouts, list[str]] | None:
    """Where ``mounts`` can be written without mounting them: ``(directory, whiteouts, lower
    directories nearest first)``, or None when they must be mounted (see the module doc)."""
    if len(mounts) != 1:
        return None
    mount = mounts[0]
    if mount.type == "overlay":
        upper, lowers = overlay_dirs(mount)
        return (upper, Whiteouts.OVERLAY, lowers) if upper else None
    if mount.type == "aufs":
        branches = aufs_branches(mount)
        return (branches[0], Whiteouts.AUFS, branches[1]) if branches else None
    if is_bind(mount) and not mount.readonly:
        return mount.source, Whiteouts.DELETE, []
    return None


def _check_writable(mounts: Sequence[Mount]) -> None:
    for mount in mounts:
        if mount.readonly or (mount.type == "overlay" and not overlay_dirs(mount)[0]):
            raise FailedPrecondition(
                f"cannot apply a layer onto read-only mounts ({mount.type} {mount.source}): "
                "apply onto an active snapshot"
            )


class _Inflater:
    """Reads and decompresses a layer in one thread and hashes it in another, handing the decompressed
    pieces to :meth:`pieces`. Always :meth:`close` it (it stops and joins the threads).

    Hashing apart from decompressing keeps both off the critical path: extraction of small files is
    Python-bound, of large ones decompression-bound, and zlib, zstandard and hashlib all release the GIL.
    """

    def __init__(self, chunks: Iterable[bytes], compression: Compression, algorithm: str) -> None:
        self._pieces: queue.Queue[object] = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._hashing: queue.Queue[object] = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._stop = threading.Event()
        self._digester = Digester(algorithm)
        self._size = 0
        self._error: BaseException | None = None
        inflate = threading.Thread(target=self._inflate, args=(chunks, compression), name="containerkit-inflate")
        self._threads = [inflate, threading.Thread(target=self._hash, name="containerkit-hash")]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def pieces(self) -> Iterator[bytes]:
        """The decompressed stream; raises what the inflating thread met (corrupt data, I/O errors)."""
        while (item := self._pieces.get()) is not _END:
            yield item  # type: ignore[misc]
        if self._error is not None:
            raise self._error

    def result(self) -> tuple[Digest, int]:
        """The digest and size of the whole decompressed stream (once :meth:`pieces` is exhausted and
        the inflater closed)."""
        return self._digester.digest(), self._size

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _inflate(self, chunks: Iterable[bytes], compression: Compression) -> None:
        try:
            for piece in decompress(chunks, compression):
                self._size += len(piece)
                if not (hand_over(self._hashing, piece, self._stop) and hand_over(self._pieces, piece, self._stop)):
                    return
        except BaseException as err:
            self._error = err
        if hand_over(self._hashing, _END, self._stop):
            hand_over(self._pieces, _END, self._stop)

    def _hash(self) -> None:
        update = self._digester.update
        while True:
            try:
                piece = self._hashing.get(timeout=_POLL)
            except queue.Empty:
                if self._stop.is_set():  # given up on: nothing more is coming
                    return
                continue
            if piece is _END:
                return
            update(piece)  # type: ignore[arg-type]


def hand_over(into: queue.Queue[object], item: object, stop: threading.Event) -> bool:
    """Put ``item`` into the bounded ``into`` unless ``stop`` is set meanwhile (its consumer went away);
    return whether it was put."""
    while not stop.is_set():
        try:
            into.put(item, timeout=_POLL)
            return True
        except queue.Full:
            continue
    return False
