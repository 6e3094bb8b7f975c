"""HPACK (RFC 7541) header compression for containerkit's HTTP/2 gRPC client (ckctl) and server (the daemon).

``Encoder`` emits only "literal header field without indexing, new name" representations with raw (non-Huffman)
strings: always valid, never touches the peer's dynamic table. ``Decoder`` accepts everything a server may send:
indexed fields (static + dynamic table), literals with incremental / without / never indexing, dynamic table size
updates, N-bit prefix integers and Huffman-coded strings.

Header names and values are ``str``; on the wire they are UTF-8, decoded with ``surrogateescape`` so arbitrary
octets survive a decode/encode round trip. Any malformed block raises ``HpackError``; after one the decoder's
dynamic table is in an undefined state and the HTTP/2 connection must be torn down (COMPRESSION_ERROR).

Pure stdlib; import does no work beyond defining constants (the Huffman decoding table is built on first use).
"""

from __future__ import annotations

import functools
from collections import deque

__all__ = ["STATIC_TABLE", "Decoder", "Encoder", "HpackError", "encode_integer", "huffman_decode", "huffman_lengths"]


class HpackError(ValueError):
    """A header block is malformed (HTTP/2 COMPRESSION_ERROR)."""


# RFC 7541 Appendix A: the static table, indices 1..61.
STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)
_STATIC_LEN = len(STATIC_TABLE)

# RFC 7541 Appendix B: bit length of the Huffman code of each symbol 0..255 and EOS (256), one byte each in hex.
# The code is canonical (codes assigned in order of (length, symbol)), so the lengths determine every code.
_HUFFMAN_LENGTHS_HEX = (
    "0d171c1c1c1c1c1c1c181e1c1c1e1c1c1c1c1c1c1c1c1e1c1c1c1c1c1c1c1c1c060a0a0c0d06080b0a0a080b080606060505"
    "050606060606060607080f060c0a0d06070707070707070707070707070707070707070707070807080d130d0e060f050605"
    "06050606060507070606060506070605050607070707070f0b0e0d1c14161414161616171617171717171817181816171817"
    "1717171516171617171816151416161717151716161815161717151516151716171714161616171616171a1a141316171619"
    "1a1a1a1b1b1a181913151a1b1b1a1b1815151a1a1c1b1b1b14181415161515171616191918181a171a1b1a1a1b1b1b1b1b1c"
    "1b1b1b1b1b1a1e"
)
_EOS = 256
_MAX_CODE_BITS = 30

# Built lazily by _huffman_table(): per distinct code length ascending, (length, first code, count, offset into
# the symbol list), and the symbols sorted by (length, symbol).
_huffman: tuple[tuple[tuple[int, int, int, int], ...], tuple[int, ...]] | None = None

# Integers above this are rejected: nothing legitimate in a header block comes close, and it bounds the work.
_MAX_INT = (1 << 32) - 1
_ENTRY_OVERHEAD = 32  # RFC 7541 section 4.1
_CACHED_STRING_MAX = 128  # Huffman strings up to this many octets are decoded once: paths, agents, namespaces...


def huffman_lengths() -> bytes:
    """The 257 Huffman code lengths of RFC 7541 Appendix B (index = symbol, 256 = EOS)."""
    return bytes.fromhex(_HUFFMAN_LENGTHS_HEX)


def _huffman_table() -> tuple[tuple[tuple[int, int, int, int], ...], tuple[int, ...]]:
    """Return (cached) the canonical decoding table rebuilt from the code lengths."""
    global _huffman
    if _huffman is None:
        lengths = huffman_lengths()
        symbols = tuple(sorted(range(len(lengths)), key=lambda s: (lengths[s], s)))
        groups: list[tuple[int, int, int, int]] = []
        code = 0
        prev_len = lengths[symbols[0]]
        offset = 0
        while offset < len(symbols):
            length = lengths[symbols[offset]]
            code <<= length - prev_len
            count = 0
            while offset + count < len(symbols) and lengths[symbols[offset + count]] == length:
                count += 1
            groups.append((length, code, count, offset))
            code += count
            offset += count
            prev_len = length
        _huffman = (tuple(groups), symbols)
    return _huffman


def huffman_decode(data: bytes) -> bytes:
    """Decode a Huffman-coded string (RFC 7541 section 5.2).

    Raises ``HpackError`` if the data holds EOS, ends in a truncated code, or its padding is longer than 7 bits
    or not made of 1 bits.
    """
    groups, symbols = _huffman_table()
    out = bytearray()
    acc = 0  # unconsumed bits, at most 37 of them: work per symbol stays constant however long the string
    bits = 0
    pos = 0
    size = len(data)
    while True:
        while bits < _MAX_CODE_BITS and pos < size:
            acc = (acc << 8) | data[pos]
            pos += 1
            bits += 8
        if not bits or (bits <= 7 and acc == (1 << bits) - 1):
            break  # done, or valid padding: the most significant bits of EOS (no symbol's code is that short)
        if bits >= _MAX_CODE_BITS:
            window = acc >> (bits - _MAX_CODE_BITS)
        else:  # end of the data: pad with 1s, a code that then matches longer than `bits` is an error below
            pad = _MAX_CODE_BITS - bits
            window = (acc << pad) | ((1 << pad) - 1)
        for length, first, count, offset in groups:
            index = (window >> (_MAX_CODE_BITS - length)) - first
            if 0 <= index < count:
                symbol = symbols[offset + index]
                break
        else:  # pragma: no cover - the code is complete, every 30-bit window matches
            raise HpackError("invalid Huffman code")
        if length > bits:  # the rest is not a whole code: it must have been padding, and it is bad padding
            if acc == (1 << bits) - 1:
                raise HpackError("Huffman padding longer than 7 bits")
            if bits <= 7:
                raise HpackError("Huffman padding is not the prefix of EOS")
            raise HpackError("Huffman string ends in a truncated code")
        if symbol == _EOS:
            raise HpackError("Huffman string contains EOS")
        out.append(symbol)
        bits -= length
        acc &= (1 << bits) - 1
    return bytes(out)


# Every call of every connection sends the same few strings (each new connection Huffman-codes them afresh):
# decoding one is ~1 us per octet here, a cache hit well under that. Errors are raised, never cached.
_cached_huffman_decode = functools.lru_cache(maxsize=1024)(huffman_decode)


def encode_integer(value: int, prefix_bits: int, first_byte: int = 0) -> bytes:
    """Encode ``value`` with an N-bit prefix (section 5.1); ``first_byte`` carries the pattern bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first_byte | value,))
    out = bytearray((first_byte | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    return encode_integer(len(raw), 7) + raw


class Encoder:
    """Stateless encoder: every field is a literal without indexing with a literal name and raw strings."""

    def encode(self, headers: list[tuple[str, str]]) -> bytes:
        """Return the header block for ``headers`` (names must already be lowercase, as HTTP/2 requires)."""
        out = bytearray()
        for name, value in headers:
            out.append(0x00)
            out += _encode_string(name)
            out += _encode_string(value)
        return bytes(out)


class Decoder:
    """Stateful decoder for one HTTP/2 connection's header blocks, in the order they arrive.

    ``max_table_size`` is the SETTINGS_HEADER_TABLE_SIZE we advertised: the peer may shrink the dynamic table
    with size updates but never grow it beyond that.
    """

    def __init__(self, max_table_size: int = 4096) -> None:
        self.max_table_size = max_table_size
        self.table_size = max_table_size  # current limit, changed by size updates
        self._entries: deque[tuple[str, str, int]] = deque()  # newest first
        self._used = 0

    @property
    def dynamic_table(self) -> list[tuple[str, str]]:
        """The dynamic table, newest entry first (index 62 first)."""
        return [(name, value) for name, value, _ in self._entries]

    @property
    def dynamic_table_used(self) -> int:
        """Size of the dynamic table in RFC 7541 octets (entry sizes include the 32-octet overhead)."""
        return self._used

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """Decode a complete header block (HEADERS plus CONTINUATION payloads) into (name, value) pairs.

        Raises ``HpackError`` on any malformed input.
        """
        data = bytes(block)
        headers: list[tuple[str, str]] = []
        pos = 0
        end = len(data)
        seen_field = False
        while pos < end:
            byte = data[pos]
            if byte & 0x80:  # 6.1 indexed header field
                index, pos = self._integer(data, pos, 7)
                headers.append(self._lookup(index))
                seen_field = True
            elif byte & 0x40:  # 6.2.1 literal with incremental indexing
                name, value, size, pos = self._literal(data, pos, 6)
                self._add(name, value, size)
                headers.append((name, value))
                seen_field = True
            elif byte & 0x20:  # 6.3 dynamic table size update
                if seen_field:
                    raise HpackError("dynamic table size update after a header field")
                size, pos = self._integer(data, pos, 5)
                if size > self.max_table_size:
                    raise HpackError(f"dynamic table size update to {size} exceeds the limit {self.max_table_size}")
                self.table_size = size
                self._evict(size)
            else:  # 6.2.2 without indexing (0000), 6.2.3 never indexed (0001)
                name, value, _, pos = self._literal(data, pos, 4)
                headers.append((name, value))
                seen_field = True
        return headers

    def _integer(self, data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
        limit = (1 << prefix_bits) - 1
        value = data[pos] & limit
        pos += 1
        if value < limit:
            return value, pos
        shift = 0
        while True:
            if pos >= len(data):
                raise HpackError("truncated integer")
            byte = data[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            if value > _MAX_INT:
                raise HpackError("integer too large")
            if not byte & 0x80:
                return value, pos
            shift += 7

    def _string(self, data: bytes, pos: int) -> tuple[str, int, int]:
        """Return (text, its length in octets, position after it)."""
        if pos >= len(data):
            raise HpackError("truncated header block: string expected")
        huffman = data[pos] & 0x80
        length, pos = self._integer(data, pos, 7)
        stop = pos + length
        if stop > len(data):
            raise HpackError(f"string length {length} runs past the end of the header block")
        raw = data[pos:stop]
        if huffman:
            raw = _cached_huffman_decode(raw) if length <= _CACHED_STRING_MAX else huffman_decode(raw)
        return raw.decode("utf-8", "surrogateescape"), len(raw), stop

    def _literal(self, data: bytes, pos: int, prefix_bits: int) -> tuple[str, str, int, int]:
        """Return (name, value, RFC 7541 entry size, position after the field)."""
        index, pos = self._integer(data, pos, prefix_bits)
        if index:
            name = self._lookup(index)[0]
            name_len = len(name.encode("utf-8", "surrogateescape"))
        else:
            name, name_len, pos = self._string(data, pos)
        value, value_len, pos = self._string(data, pos)
        return name, value, name_len + value_len + _ENTRY_OVERHEAD, pos

    def _lookup(self, index: int) -> tuple[str, str]:
        if 0 < index <= _STATIC_LEN:
            return STATIC_TABLE[index - 1]
        dyn = index - _STATIC_LEN - 1
        if index == 0 or dyn >= len(self._entries):
            raise HpackError(f"header table index {index} out of range (have {_STATIC_LEN + len(self._entries)})")
        name, value, _ = self._entries[dyn]
        return name, value

    def _add(self, name: str, value: str, size: int) -> None:
        if size > self.table_size:  # 4.4: an entry larger than the table empties it and is not added
            self._entries.clear()
            self._used = 0
            return
        self._evict(self.table_size - size)
        self._entries.appendleft((name, value, size))
        self._used += size

    def _evict(self, limit: int) -> None:
        while self._used > limit:
            _, _, size = self._entries.pop()
            self._used -= size
