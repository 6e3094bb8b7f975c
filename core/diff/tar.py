"""A lean streaming tar reader: headers parsed from 512-byte blocks, file data copied straight to a descriptor.

It reads what Go's ``archive/tar`` reads (and so what containerd applies): V7, ustar, GNU (long names
and links, access times) and PAX (``path``, ``linkpath``, ``size``, ``uid``, ``gid``, ``mtime``,
``atime``, ``SCHILY.xattr.*``). PAX global headers are skipped, as containerd ignores them. Sparse
files (GNU ``S`` entries, ``GNU.sparse.*`` records) are refused; no image tooling writes them.

Malformed input raises InvalidArgument: a bad checksum or number, a special header over 1 MiB (Go's
limit), an unsupported entry type, or a stream that ends inside a header or an entry's data.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterable, Iterator

from core.errors import InvalidArgument

__all__ = [
    "BLOCK",
    "BLOCK_DEVICE",
    "CHAR_DEVICE",
    "DIRECTORY",
    "FIFO",
    "HARDLINK",
    "REGULAR",
    "SYMLINK",
    "TarEntry",
    "TarReader",
]

BLOCK = 512
REGULAR = "0"
HARDLINK = "1"
SYMLINK = "2"
CHAR_DEVICE = "3"
BLOCK_DEVICE = "4"
DIRECTORY = "5"
FIFO = "6"

_REGULAR_TYPES = {"0": REGULAR, "\0": REGULAR, "7": REGULAR}  # '7' (contiguous) is a regular file
_HEADER_ONLY_TYPES = {HARDLINK, SYMLINK, CHAR_DEVICE, BLOCK_DEVICE, DIRECTORY, FIFO}
_MAX_SPECIAL = 1 << 20  # bytes in a PAX or GNU long-name header, as Go's archive/tar
_ZERO_BLOCK = bytes(BLOCK)
_XATTR_PREFIX = "SCHILY.xattr."
_ID_LIMIT = 1 << 32  # uids, gids and device numbers are 32-bit


class TarEntry:
    """One entry. ``type`` is one of the type constants; times are nanoseconds (``atime`` None when
    the archive has none); ``xattrs`` come from PAX ``SCHILY.xattr.*`` records; names are decoded
    UTF-8 with surrogate escapes, so they round-trip to the original bytes."""

    __slots__ = (
        "atime",
        "devmajor",
        "devminor",
        "gid",
        "linkname",
        "mode",
        "mtime",
        "name",
        "size",
        "type",
        "uid",
        "xattrs",
    )

    def __init__(self, name: str, type: str, mode: int, uid: int, gid: int, size: int, mtime: int) -> None:
        self.name = name
        self.type = type
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime = mtime
        self.atime: int | None = None
        self.linkname = ""
        self.devmajor = 0
        self.devminor = 0
        self.xattrs: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"TarEntry({self.name!r}, type={self.type!r}, size={self.size})"


class TarReader:
    """Entries of a tar stream given as chunks of bytes. Iterate for entries; before moving to the next,
    the current entry's data may be copied with :meth:`copy_to` or read with :meth:`data` (whatever is
    left is skipped)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buf = memoryview(b"")
        self._pos = 0
        self._remaining = 0  # data bytes of the current entry not consumed yet
        self._padding = 0  # zero bytes after them, up to the block boundary
        self._current = ""

    def __iter__(self) -> Iterator[TarEntry]:
        while (entry := self._next()) is not None:
            yield entry

    def copy_to(self, fd: int) -> None:
        """Write the current entry's data to ``fd``; InvalidArgument when the stream ends first."""
        for view in self.data():
            while view:
                view = view[os.write(fd, view) :]

    def data(self) -> Iterator[memoryview]:
        """The current entry's data in pieces (views of the stream's chunks, to be used before the next
        piece is asked for); InvalidArgument when the stream ends first."""
        while self._remaining:
            if self._pos == len(self._buf) and not self._next_chunk():
                self._truncated_data()
            end = min(len(self._buf), self._pos + self._remaining)
            view = self._buf[self._pos : end]
            self._remaining -= end - self._pos
            self._pos = end
            yield view

    def drain(self) -> None:
        """Consume everything left in the stream (bytes after the end of the archive included)."""
        while self._next_chunk():
            pass

    # -- internals -----------------------------------------------------------------------------

    def _next_chunk(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self._buf, self._pos = memoryview(chunk), 0
                return True
        self._buf, self._pos = memoryview(b""), 0
        return False

    def _skip(self, count: int) -> int:
        """Pass over up to ``count`` bytes; return how many were left unread because the stream ended."""
        while count:
            available = len(self._buf) - self._pos
            if available >= count:
                self._pos += count
                return 0
            count -= available
            if not self._next_chunk():
                return count
        return 0

    def _read(self, count: int) -> bytes:
        """Exactly ``count`` bytes, or fewer only when the stream ends."""
        end = self._pos + count
        if end <= len(self._buf):
            data = self._buf[self._pos : end].tobytes()
            self._pos = end
            return data
        parts = []
        while count:
            if self._pos == len(self._buf) and not self._next_chunk():
                break
            piece = self._buf[self._pos : self._pos + count]
            parts.append(piece.tobytes())
            self._pos += len(piece)
            count -= len(piece)
        return b"".join(parts)

    def _truncated_data(self) -> None:
        raise InvalidArgument(
            f"truncated tar stream: entry {self._current!r} ends {self._remaining} bytes before the end of its data"
        )

    def _next(self) -> TarEntry | None:
        if self._remaining and self._skip(self._remaining):
            self._truncated_data()
        self._skip(self._padding)  # a stream may end without the last entry's padding, as Go accepts
        self._remaining = self._padding = 0
        pax: dict[str, bytes] = {}
        long_name = long_link = None
        while True:
            block = self._read(BLOCK)
            if not block:
                return None
            if len(block) < BLOCK:
                raise InvalidArgument("truncated tar stream: it ends inside a header")
            if block == _ZERO_BLOCK:
                following = self._read(BLOCK)
                if following.strip(b"\0"):
                    raise InvalidArgument("invalid tar stream: data after an end-of-archive block")
                return None
            numbers = _numbers(block)
            _check_sum(block, numbers[5])
            flag = chr(block[156])
            size = numbers[3]
            if flag in ("x", "g", "L", "K"):
                if size > _MAX_SPECIAL:
                    raise InvalidArgument(f"invalid tar stream: a {flag!r} header of {size} bytes exceeds 1 MiB")
                if size < 0:  # read as is, it would move the stream backwards: the same header forever
                    raise InvalidArgument(f"invalid tar stream: a {flag!r} header of negative size {size}")
                data = self._read(size)
                if len(data) < size:
                    raise InvalidArgument("truncated tar stream: it ends inside a header")
                self._skip(-size % BLOCK)
                if flag == "x":
                    pax.update(_pax_records(data))
                elif flag == "L":
                    long_name = _string(data)
                elif flag == "K":
                    long_link = _string(data)
                continue  # a global header ("g") is skipped, as containerd ignores it
            entry = _entry(block, flag, numbers, pax)
            if long_name is not None:
                entry.name = long_name
            if long_link is not None:
                entry.linkname = long_link
            if flag == "\0" and entry.name.endswith("/"):
                entry.type = DIRECTORY
            self._current = entry.name
            if entry.type == REGULAR:
                self._remaining, self._padding = entry.size, -entry.size % BLOCK
            return entry


def _entry(block: bytes, flag: str, numbers: tuple[int, ...], pax: dict[str, bytes]) -> TarEntry:
    """The entry of a header block (whose :func:`_numbers` are given), with its PAX records applied."""
    kind = _REGULAR_TYPES.get(flag)
    if kind is None:
        if flag not in _HEADER_ONLY_TYPES:
            name = _string(block[0:100])
            what = "sparse files are" if flag == "S" else f"entry type {flag!r} is"
            raise InvalidArgument(f"unsupported tar entry {name!r}: {what} not supported")
        kind = flag
    name = _string(block[0:100])
    magic = block[257:263]
    atime = None
    if magic == b"ustar\0":
        prefix = _string(block[345:476] if block[508:512] == b"tar\0" else block[345:500])
        if prefix:
            name = f"{prefix}/{name}"
    elif magic == b"ustar " and block[345]:  # GNU: an access time may follow
        atime = _number(block[345:357], "atime") * 1_000_000_000
    mode, uid, gid, size, mtime, _ = numbers
    entry = TarEntry(name, kind, mode & 0o7777, uid, gid, size, mtime * 1_000_000_000)
    entry.atime = atime
    entry.linkname = _string(block[157:257])
    if kind in (CHAR_DEVICE, BLOCK_DEVICE):
        entry.devmajor = _number(block[329:337], "devmajor")
        entry.devminor = _number(block[337:345], "devminor")
    if pax:
        _apply_pax(entry, pax)
    if entry.size < 0:
        raise InvalidArgument(f"invalid tar entry {entry.name!r}: negative size {entry.size}")
    for field in ("uid", "gid", "devmajor", "devminor"):
        if not 0 <= getattr(entry, field) < _ID_LIMIT:
            raise InvalidArgument(f"invalid tar entry {entry.name!r}: {field} {getattr(entry, field)} is out of range")
    return entry


def _apply_pax(entry: TarEntry, pax: dict[str, bytes]) -> None:
    for key, value in pax.items():
        if key == "path":
            entry.name = value.decode("utf-8", "surrogateescape")
        elif key == "linkpath":
            entry.linkname = value.decode("utf-8", "surrogateescape")
        elif key in ("size", "uid", "gid"):
            number = _decimal(value)
            if number is None:
                raise InvalidArgument(f"invalid tar stream: PAX record {key}={value[:40]!r} is not a number")
            setattr(entry, key, number)
        elif key == "mtime":
            entry.mtime = _pax_time(value)
        elif key == "atime":
            entry.atime = _pax_time(value)
        elif key.startswith(_XATTR_PREFIX):
            entry.xattrs[key.removeprefix(_XATTR_PREFIX)] = value
        elif key.startswith("GNU.sparse."):
            raise InvalidArgument(f"unsupported tar entry {entry.name!r}: sparse files are not supported")


def _check_sum(block: bytes, recorded: int) -> None:
    """The header checksum: the sum of its bytes, the checksum field counted as spaces (unsigned, or
    signed as some old tars wrote it). Compared modulo 65521 through adler32's byte sum, ten times
    faster than summing in Python: only a checksum off by exactly 65521 passes where Go refuses it."""
    field = sum(block[148:156])
    if ((zlib.adler32(block) & 0xFFFF) - 1 - field + 8 * 32 - recorded) % 65521 == 0:
        return
    unsigned = sum(block) - field + 8 * 32
    signed = unsigned - 256 * sum(1 for byte in block if byte > 127) + 256 * sum(1 for b in block[148:156] if b > 127)
    if recorded != signed:
        raise InvalidArgument(f"invalid tar header for {_string(block[:100])!r}: checksum mismatch")


_USUAL_NUMBERS = re.compile(rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0([0-7]{6})\0 ")
_OCTAL = (8,) * 6
_NUMBER_FIELDS = (
    ("mode", 100, 108),
    ("uid", 108, 116),
    ("gid", 116, 124),
    ("size", 124, 136),
    ("mtime", 136, 148),
    ("checksum", 148, 156),
)


def _numbers(block: bytes) -> tuple[int, ...]:
    """Mode, uid, gid, size, mtime and checksum of a header block. Fast for the zero-padded,
    NUL-terminated octal fields that tar, Go and Python write; any other spelling goes field by field."""
    usual = _USUAL_NUMBERS.match(block, 100, 156)
    if usual is not None:
        return tuple(map(int, usual.groups(), _OCTAL))
    return tuple(_number(block[start:end], what) for what, start, end in _NUMBER_FIELDS)


def _number(field: bytes, what: str) -> int:
    """A numeric header field: octal text, or base-256 (GNU) when the high bit of its first byte is set."""
    text = field.strip(b" \0")
    if text.isdigit() and b"8" not in text and b"9" not in text:
        return int(text, 8)
    if not text:
        return 0
    if field[0] & 0x80:
        value = int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
        return value - (1 << (8 * len(field) - 1)) if field[0] & 0x40 else value
    raise InvalidArgument(f"invalid tar header: {what} field {field!r} is not an octal number")


def _string(field: bytes) -> str:
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, bytes]:
    """``"<length> <key>=<value>\\n"`` records; values stay bytes (xattrs may be binary)."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        length = _decimal(data[pos:space])
        if space < 0 or length is None:
            if not data[pos:].strip(b"\0"):
                break  # NUL padding after the records
            raise InvalidArgument("invalid tar stream: malformed PAX record")
        end = pos + length
        record = data[space + 1 : end]
        key, equals, value = record[:-1].partition(b"=")
        if end > len(data) or not record.endswith(b"\n") or not equals or b"\0" in key:
            raise InvalidArgument("invalid tar stream: malformed PAX record")
        if key in (b"path", b"linkpath") and b"\0" in value:
            raise InvalidArgument(f"invalid tar stream: PAX record {key.decode()} holds a NUL byte")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records


def _pax_time(value: bytes) -> int:
    """Nanoseconds of a PAX time (``[-]seconds[.fraction]``), fraction digits past nine dropped as Go does."""
    negative = value.startswith(b"-")
    text, _, fraction = value.removeprefix(b"-").partition(b".")
    seconds = _decimal(text)
    if seconds is None or (fraction and not fraction.isdigit()):
        raise InvalidArgument(f"invalid tar stream: PAX time {value[:40]!r}")
    nanos = seconds * 1_000_000_000 + int((fraction + b"000000000")[:9])
    return -nanos if negative else nanos


def _decimal(text: bytes) -> int | None:
    """The value of ASCII digits ``text`` when it fits an int64 (what Go's ParseInt accepts), else None
    (also keeps hostile digit runs away from Python's int-from-text limit)."""
    if not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if value < 1 << 63 else None
