"""core.grpcwire.hpack: RFC 7541 Appendix C vectors, encoder round trips and malformed header blocks."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from core.grpcwire import hpack
from core.grpcwire.hpack import STATIC_TABLE, Decoder, Encoder, HpackError, encode_integer, huffman_decode

AUTHORITY = (":authority", "www.example.com")
DATE_21 = ("date", "Mon, 21 Oct 2013 20:13:21 GMT")
DATE_22 = ("date", "Mon, 21 Oct 2013 20:13:22 GMT")
LOCATION = ("location", "https://www.example.com")
COOKIE = ("set-cookie", "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")

# RFC 7541 C.3 / C.4: three requests on one connection; (block, headers, dynamic table after, table size after).
REQUESTS_PLAIN = [
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
REQUESTS_HUFFMAN = [
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]
REQUESTS_EXPECTED = [
    (
        [(":method", "GET"), (":scheme", "http"), (":path", "/"), AUTHORITY],
        [AUTHORITY],
        57,
    ),
    (
        [(":method", "GET"), (":scheme", "http"), (":path", "/"), AUTHORITY, ("cache-control", "no-cache")],
        [("cache-control", "no-cache"), AUTHORITY],
        110,
    ),
    (
        [(":method", "GET"), (":scheme", "https"), (":path", "/index.html"), AUTHORITY, ("custom-key", "custom-value")],
        [("custom-key", "custom-value"), ("cache-control", "no-cache"), AUTHORITY],
        164,
    ),
]

# RFC 7541 C.5 / C.6: three responses with SETTINGS_HEADER_TABLE_SIZE 256, so entries get evicted.
RESPONSES_PLAIN = [
    "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d546e17"
    "68747470733a2f2f7777772e6578616d706c652e636f6d",
    "4803333037c1c0bf",
    "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f6f3d41"
    "53444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b207665727369"
    "6f6e3d31",
]
RESPONSES_HUFFMAN = [
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b3960d5af2708"
    "7f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
]
RESPONSES_EXPECTED = [
    (
        [(":status", "302"), ("cache-control", "private"), DATE_21, LOCATION],
        [LOCATION, DATE_21, ("cache-control", "private"), (":status", "302")],
        222,
    ),
    (
        [(":status", "307"), ("cache-control", "private"), DATE_21, LOCATION],
        [(":status", "307"), LOCATION, DATE_21, ("cache-control", "private")],
        222,
    ),
    (
        [(":status", "200"), ("cache-control", "private"), DATE_22, LOCATION, ("content-encoding", "gzip"), COOKIE],
        [COOKIE, ("content-encoding", "gzip"), DATE_22],
        215,
    ),
]


def huffman_encode(data: bytes) -> bytes:
    """Test-only Huffman encoder built independently from the canonical code lengths (padding with 1 bits)."""
    lengths = hpack.huffman_lengths()
    codes: dict[int, int] = {}
    code = 0
    prev = 0
    for symbol in sorted(range(257), key=lambda s: (lengths[s], s)):
        code <<= lengths[symbol] - prev
        prev = lengths[symbol]
        codes[symbol] = code
        code += 1
    acc = 0
    bits = 0
    for byte in data:
        acc = (acc << lengths[byte]) | codes[byte]
        bits += lengths[byte]
    pad = -bits % 8
    acc = (acc << pad) | ((1 << pad) - 1)
    return acc.to_bytes((bits + pad) // 8, "big")


def literal(data: bytes, huffman: bool = False) -> bytes:
    """A string literal (length with 7-bit prefix + octets)."""
    if huffman:
        data = huffman_encode(data)
    return encode_integer(len(data), 7, 0x80 if huffman else 0) + data


# --- Appendix C vectors ---


def test_c1_integers() -> None:
    assert encode_integer(10, 5) == b"\x0a"
    assert encode_integer(1337, 5) == b"\x1f\x9a\x0a"
    assert encode_integer(42, 8) == b"\x2a"


@pytest.mark.parametrize(
    ("block", "headers", "table"),
    [
        (
            "400a637573746f6d2d6b65790d637573746f6d2d686561646572",
            [("custom-key", "custom-header")],
            [("custom-key", "custom-header")],
        ),
        ("040c2f73616d706c652f70617468", [(":path", "/sample/path")], []),
        ("100870617373776f726406736563726574", [("password", "secret")], []),
        ("82", [(":method", "GET")], []),
    ],
    ids=["C.2.1-incremental", "C.2.2-without-indexing", "C.2.3-never-indexed", "C.2.4-indexed"],
)
def test_c2_single_fields(block: str, headers: list[tuple[str, str]], table: list[tuple[str, str]]) -> None:
    decoder = Decoder()
    assert decoder.decode(bytes.fromhex(block)) == headers
    assert decoder.dynamic_table == table
    assert decoder.dynamic_table_used == (55 if table else 0)


@pytest.mark.parametrize("blocks", [REQUESTS_PLAIN, REQUESTS_HUFFMAN], ids=["C.3-plain", "C.4-huffman"])
def test_c3_c4_requests(blocks: list[str]) -> None:
    decoder = Decoder()
    for block, (headers, table, size) in zip(blocks, REQUESTS_EXPECTED, strict=True):
        assert decoder.decode(bytes.fromhex(block)) == headers
        assert decoder.dynamic_table == table
        assert decoder.dynamic_table_used == size


@pytest.mark.parametrize("blocks", [RESPONSES_PLAIN, RESPONSES_HUFFMAN], ids=["C.5-plain", "C.6-huffman"])
def test_c5_c6_responses_with_eviction(blocks: list[str]) -> None:
    decoder = Decoder(max_table_size=256)
    for block, (headers, table, size) in zip(blocks, RESPONSES_EXPECTED, strict=True):
        assert decoder.decode(bytes.fromhex(block)) == headers
        assert decoder.dynamic_table == table
        assert decoder.dynamic_table_used == size


def test_c4_huffman_strings() -> None:
    assert huffman_decode(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")) == b"www.example.com"
    assert huffman_decode(bytes.fromhex("a8eb10649cbf")) == b"no-cache"
    assert huffman_decode(bytes.fromhex("25a849e95ba97d7f")) == b"custom-key"
    assert huffman_decode(bytes.fromhex("25a849e95bb8e8b4bf")) == b"custom-value"
    assert huffman_decode(b"") == b""


# --- round trips ---


def test_encoder_round_trip_grpc_request() -> None:
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/containerd.services.version.v1.Version/Version"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", "30000m"),
        ("containerd-namespace", "default"),
        ("x-empty", ""),
        ("x-long", "v" * 5000),
        ("grpc-message", "caf\u00e9 \u2603"),
    ]
    block = Encoder().encode(headers)
    assert block[0] == 0x00  # literal without indexing, new name
    decoder = Decoder()
    assert decoder.decode(block) == headers
    assert decoder.dynamic_table == []  # our encoder never indexes
    assert Encoder().encode([]) == b""


def test_encoder_round_trip_random() -> None:
    rng = random.Random(7541)
    encoder, decoder = Encoder(), Decoder()
    for _ in range(200):
        headers = [
            (
                "".join(rng.choice("abcdefghijklmnopqrstuvwxyz-") for _ in range(rng.randrange(1, 40))),
                "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(0, 300))),
            )
            for _ in range(rng.randrange(0, 8))
        ]
        assert decoder.decode(encoder.encode(headers)) == headers


def test_undecodable_utf8_survives() -> None:
    block = b"\x00" + literal(b"x-bin") + literal(b"\xff\xfe\x80")
    headers = Decoder().decode(block)
    assert Encoder().encode(headers) == block


def test_huffman_round_trip_every_octet() -> None:
    rng = random.Random(1)
    samples = [bytes(range(256)), bytes(reversed(range(256))), b"a", b"\x00", b"\xff" * 10, b"grpc" * 4000]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 100))) for _ in range(200)]
    for data in samples:
        assert huffman_decode(huffman_encode(data)) == data


@pytest.mark.parametrize("prefix", [4, 5, 6, 7, 8])
def test_integer_round_trip(prefix: int) -> None:
    decoder = Decoder()
    for value in [0, 1, (1 << prefix) - 2, (1 << prefix) - 1, 1 << prefix, 127, 128, 300, 4096, 2**31 - 1, 2**32 - 1]:
        encoded = encode_integer(value, prefix, 0)
        assert decoder._integer(encoded + b"\xaa", 0, prefix) == (value, len(encoded))


def test_all_representations_and_static_table() -> None:
    assert len(STATIC_TABLE) == 61
    for index, entry in enumerate(STATIC_TABLE, 1):
        assert Decoder().decode(encode_integer(index, 7, 0x80)) == [entry]
    block = (
        encode_integer(31, 6, 0x40)  # incremental indexing, static name: content-type
        + literal(b"application/grpc", huffman=True)
        + encode_integer(0, 4, 0x10)  # never indexed, new name
        + literal(b"grpc-status", huffman=True)
        + literal(b"0")
        + encode_integer(62, 4, 0x00)  # without indexing, dynamic-table name
        + literal(b"application/grpc+proto")
        + encode_integer(62, 7, 0x80)  # indexed, dynamic table
    )
    decoder = Decoder()
    assert decoder.decode(block) == [
        ("content-type", "application/grpc"),
        ("grpc-status", "0"),
        ("content-type", "application/grpc+proto"),
        ("content-type", "application/grpc"),
    ]
    assert decoder.dynamic_table == [("content-type", "application/grpc")]
    assert decoder.dynamic_table_used == len("content-type") + len("application/grpc") + 32


def test_table_size_updates_and_eviction() -> None:
    decoder = Decoder(max_table_size=100)
    entry = b"\x40" + literal(b"aaaa") + literal(b"bbbb")  # 40 octets each
    decoder.decode(entry + entry)
    assert decoder.dynamic_table_used == 80
    decoder.decode(entry)  # third entry evicts the oldest
    assert len(decoder.dynamic_table) == 2
    decoder.decode(encode_integer(45, 5, 0x20))  # shrink: evict to one entry
    assert decoder.dynamic_table_used == 40
    assert decoder.table_size == 45
    decoder.decode(encode_integer(0, 5, 0x20) + encode_integer(100, 5, 0x20) + entry)  # two updates, then a field
    assert decoder.dynamic_table == [("aaaa", "bbbb")]
    big = b"\x40" + literal(b"k") + literal(b"v" * 80)  # 114 > 100: empties the table, not added
    assert decoder.decode(big) == [("k", "v" * 80)]
    assert decoder.dynamic_table == []
    assert decoder.dynamic_table_used == 0


# --- malformed input ---


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (b"\xff", "truncated integer"),
        (b"\xff\x80\x80", "truncated integer"),
        (b"\x7f" + b"\xff" * 10 + b"\x01", "integer too large"),
        (b"\x80", "index 0 out of range"),
        (b"\xbe", "index 62 out of range"),
        (b"\xff\x80\x01", "out of range"),
        (b"\x7e", "index 62 out of range"),
        (b"\x4f", "string expected"),
        (b"\x0f\x2f\x00", "out of range"),
        (b"\x00", "string expected"),
        (b"\x00\x01a", "string expected"),
        (b"\x00\x05abc", "runs past the end"),
        (b"\x00\x01a\x7f", "truncated integer"),
        (b"\x00\x01a\x7f\x80\x80\x80\x80\x80\x01", "too large"),
        (b"\x3f\xe2\x1f", "exceeds the limit 4096"),
        (b"\x82\x20", "size update after a header field"),
    ],
)
def test_malformed_blocks(block: bytes, message: str) -> None:
    with pytest.raises(HpackError, match=message):
        Decoder().decode(block)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff") + b"\xff", "padding longer than 7 bits"),
        (b"\xff\xff", "padding longer than 7 bits"),
        (b"\x00", "padding is not the prefix of EOS"),  # '0' (00000) followed by 000 padding
        (b"\x18", "padding is not the prefix of EOS"),  # 'a' (00011) then 000
        (b"\xff\xff\xff\xfc", "contains EOS"),  # the 30-bit EOS code then 11 padding
        (b"\x07\xff\xff\xff\xf0", "contains EOS"),  # '0', EOS, 0 padding
        (b"\xfe", "truncated code"),  # the first 8 bits of a 10-bit code
        (b"\x1f\xff", "padding longer than 7 bits"),  # 'a' then 11 one bits
    ],
)
def test_bad_huffman(data: bytes, message: str) -> None:
    with pytest.raises(HpackError, match=message):
        huffman_decode(data)
    with pytest.raises(HpackError):
        Decoder().decode(b"\x00" + literal(b"x") + encode_integer(len(data), 7, 0x80) + data)


def test_hpack_error_is_value_error() -> None:
    assert issubclass(HpackError, ValueError)


def test_import_is_light_and_lazy() -> None:
    code = (
        "import sys; before = set(sys.modules); import core.grpcwire.hpack as h; "
        "assert h._huffman is None; "
        "new = set(sys.modules) - before - {'core', 'core.grpcwire', 'core.grpcwire.hpack'}; "
        "assert not new, new"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
