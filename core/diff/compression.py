"""Layer compression: what a layer's media type says, what its first bytes say, and streaming (de)compression.

As containerd: a media type tells whether a layer *may* be compressed (``+gzip``, ``+zstd``, Docker's
types); the magic bytes then decide which way (a ``+gzip`` layer holding zstd is read as zstd, a
Docker ``tar`` type holding gzip as gzip). The plain OCI ``tar`` types are never decompressed.

Decompression is streaming with bounded output pieces (a small hostile stream cannot make one huge
buffer) and refuses corrupt or truncated streams with InvalidArgument; both zlib and zstandard release
the GIL while they work, so a decompressing thread runs beside the one extracting.
"""

from __future__ import annotations

import enum
import zlib
from collections.abc import Callable, Iterable, Iterator

from core import oci
from core.errors import InvalidArgument

__all__ = [
    "LAYER_MEDIA_TYPES",
    "WRITTEN_MEDIA_TYPES",
    "Compression",
    "compressor",
    "decompress",
    "media_type_compression",
]

PIECE = 4 << 20
"""Upper bound of one decompressed piece, in bytes."""


class Compression(enum.StrEnum):
    """A layer's compression; ``DETECT`` means "whatever the magic bytes say"."""

    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"
    DETECT = "detect"


LAYER_MEDIA_TYPES: dict[str, Compression] = {
    oci.OCI_LAYER: Compression.NONE,
    oci.OCI_LAYER_GZIP: Compression.DETECT,
    oci.OCI_LAYER_ZSTD: Compression.DETECT,
    oci.OCI_LAYER_NONDISTRIBUTABLE: Compression.NONE,
    oci.OCI_LAYER_NONDISTRIBUTABLE_GZIP: Compression.DETECT,
    oci.OCI_LAYER_NONDISTRIBUTABLE_ZSTD: Compression.DETECT,
    oci.DOCKER_LAYER: Compression.DETECT,
    oci.DOCKER_LAYER_GZIP: Compression.DETECT,
    oci.DOCKER_LAYER_FOREIGN: Compression.DETECT,
    oci.DOCKER_LAYER_FOREIGN_GZIP: Compression.DETECT,
}
"""The layer media types a differ applies, and how each is decompressed."""

WRITTEN_MEDIA_TYPES: dict[str, Compression] = {
    oci.OCI_LAYER: Compression.NONE,
    oci.OCI_LAYER_GZIP: Compression.GZIP,
    oci.OCI_LAYER_ZSTD: Compression.ZSTD,
    oci.DOCKER_LAYER: Compression.NONE,
    oci.DOCKER_LAYER_GZIP: Compression.GZIP,
}
"""The layer media types a differ writes, and how each is compressed."""

_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_WBITS = 16 + zlib.MAX_WBITS


def media_type_compression(media_type: str) -> Compression:
    """How a layer of ``media_type`` is decompressed; InvalidArgument for a type that is not a layer's."""
    try:
        return LAYER_MEDIA_TYPES[media_type]
    except KeyError:
        raise InvalidArgument(f"unsupported layer media type {media_type!r}") from None


def decompress(chunks: Iterable[bytes], compression: Compression) -> Iterator[bytes]:
    """The decompressed stream of ``chunks``, in pieces of at most :data:`PIECE` bytes (NONE: as given).

    ``DETECT`` picks gzip, zstd or none from the first bytes. InvalidArgument when the stream is
    corrupt, truncated, or followed by bytes that are not another gzip member / zstd frame.
    """
    source = iter(chunks)
    if compression is Compression.DETECT:
        head = b""
        for chunk in source:
            head += chunk
            if len(head) >= len(_ZSTD_MAGIC):
                break
        compression = _detect(head)
        source = _prepend(head, source)
    if compression is Compression.GZIP:
        return _gunzip(source)
    if compression is Compression.ZSTD:
        return _unzstd(source)
    return (chunk for chunk in source if chunk)


def compressor(
    compression: Compression, level: int | None = None
) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
    """``(compress, flush)`` for writing a layer: feed pieces to ``compress``, end with ``flush()``.

    ``level`` is the gzip (1-9, default 6) or zstd (1-22, default 3) level; InvalidArgument outside those."""
    if compression is Compression.GZIP:
        gzip = zlib.compressobj(_level(level, 6, 9), zlib.DEFLATED, _GZIP_WBITS)
        return gzip.compress, gzip.flush
    if compression is Compression.ZSTD:
        import zstandard

        zstd = zstandard.ZstdCompressor(level=_level(level, 3, 22)).compressobj()
        return zstd.compress, zstd.flush
    if compression is Compression.NONE:
        return bytes, bytes
    raise ValueError(f"cannot compress as {compression}")


def _level(level: int | None, default: int, highest: int) -> int:
    if level is None:
        return default
    if not 1 <= level <= highest:
        raise InvalidArgument(f"compression level {level} is out of range (1-{highest})")
    return level


def _detect(head: bytes) -> Compression:
    if head.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    return Compression.NONE


def _prepend(head: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if head:
        yield head
    yield from rest


def _gunzip(source: Iterator[bytes]) -> Iterator[bytes]:
    """Every gzip member in turn (as Go's multistream reader), each checked against its CRC and size."""
    inflater = zlib.decompressobj(_GZIP_WBITS)
    try:
        for data in source:
            while data:
                if inflater.eof:  # the next member starts here
                    inflater = zlib.decompressobj(_GZIP_WBITS)
                out = inflater.decompress(data, PIECE)
                if out:
                    yield out
                data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
                while not data and len(out) == PIECE and not inflater.eof:  # output still pending
                    out = inflater.decompress(b"", PIECE)
                    if out:
                        yield out
                    data = inflater.unused_data if inflater.eof else inflater.unconsumed_tail
    except zlib.error as err:
        raise InvalidArgument(f"corrupt gzip stream: {err}") from None
    if not inflater.eof:
        raise InvalidArgument("truncated gzip stream: it ends inside a compressed member")


def _unzstd(source: Iterator[bytes]) -> Iterator[bytes]:
    """Every zstd frame in turn; the frame walker tells a complete stream from a truncated one."""
    import zstandard

    frames = _ZstdFrames()
    reader = zstandard.ZstdDecompressor().stream_reader(
        _ChunkFile(source, frames.feed), read_size=1 << 20, read_across_frames=True
    )
    try:
        while out := reader.read(PIECE):
            yield out
    except zstandard.ZstdError as err:
        raise InvalidArgument(f"corrupt zstd stream: {err}") from None
    if not frames.complete:
        raise InvalidArgument("truncated zstd stream: it ends inside a frame")


class _ChunkFile:
    """A readable file (``read`` only) over an iterator of chunks; each chunk is shown to ``observe`` first."""

    def __init__(self, chunks: Iterator[bytes], observe: Callable[[bytes], None]) -> None:
        self._chunks = chunks
        self._observe = observe
        self._rest = memoryview(b"")

    def read(self, size: int = -1) -> bytes:
        while not self._rest:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._observe(chunk)
            self._rest = memoryview(chunk)
        if size < 0:
            size = len(self._rest)
        out, self._rest = self._rest[:size], self._rest[size:]
        return bytes(out)


_ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)


class _ZstdFrames:
    """Follows the frame and block headers of a zstd stream (RFC 8878), only to know whether the
    stream ended between frames: the decompressor itself stops quietly at a truncated frame's end.
    Stream contents are the decompressor's to judge."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._want = 4  # bytes of the structure being read
        self._skip = 0  # payload bytes to pass over before it
        self._state = self._magic
        self._checksum = False

    @property
    def complete(self) -> bool:
        """Whether everything seen so far is whole frames."""
        return self._state == self._magic and not self._head and not self._skip

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                pos += step
                self._skip -= step
                continue
            take = self._want - len(self._head)
            self._head += data[pos : pos + take]
            pos += take
            if len(self._head) < self._want:
                return
            head = bytes(self._head)
            self._head.clear()
            self._state(head)

    def _magic(self, head: bytes) -> None:
        magic = int.from_bytes(head, "little")
        if magic == 0xFD2FB528:
            self._state, self._want = self._descriptor, 1
        elif magic in _ZSTD_SKIPPABLE:
            self._state, self._want = self._skippable, 4
        else:  # not zstd: the decompressor reports it
            self._state, self._want = self._magic, 4

    def _skippable(self, head: bytes) -> None:
        self._skip = int.from_bytes(head, "little")
        self._state, self._want = self._magic, 4

    def _descriptor(self, head: bytes) -> None:
        fhd = head[0]
        single_segment = fhd >> 5 & 1
        size_flag = fhd >> 6
        self._checksum = bool(fhd >> 2 & 1)
        dictionary = (0, 1, 2, 4)[fhd & 3]
        content_size = (single_segment, 2, 4, 8)[size_flag]
        rest = (0 if single_segment else 1) + dictionary + content_size
        self._state, self._want = self._block, 3
        self._skip = rest

    def _block(self, head: bytes) -> None:
        header = int.from_bytes(head, "little")
        last, kind, size = header & 1, header >> 1 & 3, header >> 3
        self._skip = 1 if kind == 1 else size
        if last:
            self._skip += 4 if self._checksum else 0
            self._state, self._want = self._magic, 4
