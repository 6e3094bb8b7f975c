"""Fuzzing (hypothesis) of everything that parses input a user, an image or a registry controls.

Targets: the layer applier (``core.diff``: generated tar streams with hostile names, ``..``, absolute
paths, symlink and hardlink escapes, devices, whiteouts, PAX/GNU headers, huge numbers, truncation,
flipped bytes, gzip/zstd), the OCI index/manifest/config parsers and ``resolve_image`` (``core.oci``),
the reference parser (``core.distribution.reference``), the filter language (``core.filters``), the
config loader (``core.config``) and the daemon's gRPC server (``core.grpcwire.server``: generated HTTP/2
frame sequences, valid calls among them, on a live server).

The property: no exception but the documented ones (``core.errors.*``; ``ConfigError`` for the config;
for the applier also an ``OSError`` naming the entry), and the applier writes nothing outside its
target root (a sentinel directory and a lower layer beside it are compared before and after). The server
ends or answers every connection, and afterwards still serves, with no call left open.

Every run first replays ``tests/fuzz_corpus/<target>/`` (seeds and every crash found), then runs a
small deterministic batch per target. ``CONTAINERKIT_FUZZ_SECONDS=N`` keeps each target going with
fresh random examples for N seconds. Every input counts as a "hostile input" in the robustness tally.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import socket
import subprocess
import tempfile
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import oci
from core.config import Config, ConfigError, from_table, load_config
from core.diff.apply import apply_layer
from core.diff.archive import Whiteouts, apply_tar
from core.digest import Digest
from core.distribution.reference import Reference, is_local_host
from core.errors import ContainerkitError, NotFound
from core.filters import parse as parse_filters
from core.grpcwire import http2
from core.grpcwire.hpack import Encoder
from core.types import Descriptor, Mount

CORPUS = Path(__file__).parent / "fuzz_corpus"
FUZZ_SECONDS = float(os.environ.get("CONTAINERKIT_FUZZ_SECONDS") or 0)

DEPTH = 1200 if FUZZ_SECONDS else 200  # the deepest generated path: a deep one costs seconds of path walks

T = typing.TypeVar("T")


def corpus(target: str) -> list[bytes]:
    """The committed inputs of ``target``, sorted by file name."""
    return [path.read_bytes() for path in sorted((CORPUS / target).iterdir()) if path.is_file()]


def fuzz(
    robustness: Any,
    target: str,
    decode: Callable[[bytes], T],
    strategy: st.SearchStrategy[T],
    check: Callable[[T], None],
    examples: int,
) -> None:
    """Replay ``target``'s corpus (files turned into inputs by ``decode``), then ``check`` ``examples``
    generated inputs (deterministically; random and repeated for CONTAINERKIT_FUZZ_SECONDS when set).
    Every input is recorded as a hostile input, contained when ``check`` returned."""
    tried = contained = 0

    def run(value: T) -> None:
        nonlocal tried, contained
        tried += 1
        check(value)
        contained += 1

    profile = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not FUZZ_SECONDS,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    generated = profile(given(strategy)(run))
    try:
        for seed in corpus(target):
            run(decode(seed))
        generated()
        end = time.monotonic() + FUZZ_SECONDS
        while time.monotonic() < end:
            generated()
    finally:
        robustness.record("hostile inputs", tried, contained)


def text(data: bytes) -> str:
    """A corpus file as text (undecodable bytes kept as surrogate escapes)."""
    return data.decode("utf-8", "surrogateescape")


# -- the layer applier -------------------------------------------------------------------------

ENTRY_TYPES = "0000012345567\0SxgLKVDMNA"  # weighted towards the usual ones, then what no layer should hold
COMPONENTS = (
    "a", "b", "etc", "etc/hostname", ".", "..", "", "out", "up", "loop", "victim", "@S", "@S/victim",
    ".wh.a", ".wh.etc", ".wh..wh..opq", ".wh..", ".wh...", ".wh.", "x" * 256, "\udcff\udcfe", "é", " ",
)  # fmt: skip
PAX_KEYS = (
    "path", "linkpath", "size", "uid", "gid", "mtime", "atime", "SCHILY.xattr.user.a",
    "SCHILY.xattr.trusted.overlay.opaque", "SCHILY.xattr.security.capability", "SCHILY.xattr.", "GNU.sparse.major",
    "comment", "",
)  # fmt: skip
SMALL = st.integers(0, 0o7777)
NUMBERS = st.one_of(  # mostly plausible, so that a stream gets past its first header often enough
    SMALL,
    SMALL,
    SMALL,
    st.integers(-(1 << 70), 1 << 70),
    st.sampled_from([0, 1000, (1 << 32) - 1, 1 << 32, 1 << 63, -1, 8**11, 8**11 - 1]),
)
PAX_VALUES = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["-1", "1.5", "-1.5", "1e3", "", "\0", "0x10", "9" * 30, "1." + "9" * 30]),
    st.integers(4290, 5000).map(lambda n: "9" * n),  # past Python's int-from-text digit limit
    st.integers(2, 300).map(lambda n: "a/" * n + "@S/victim"),
)
PATHS = st.one_of(
    st.lists(st.sampled_from(COMPONENTS) | st.text(alphabet="ab./", max_size=4), max_size=6).map("/".join),
    st.lists(st.sampled_from(COMPONENTS), max_size=4).map(lambda parts: "/" + "/".join(parts)),
    st.integers(2, 30).map(lambda n: "../" * n + "sentinel/victim"),
    st.integers(2, DEPTH).map(lambda n: "d/" * n + "f"),  # deep (the corpus holds one past the recursion limit)
)
ENTRIES = st.fixed_dictionaries(
    {"name": PATHS, "type": st.sampled_from(ENTRY_TYPES)},
    optional={
        "link": PATHS,
        "data": st.text(max_size=40),
        "size": NUMBERS,
        "mode": NUMBERS,
        "uid": NUMBERS,
        "gid": NUMBERS,
        "mtime": NUMBERS,
        "dev": st.tuples(NUMBERS, NUMBERS),
        "long": st.sampled_from(["pax", "gnu", "cut"]),
        "gnu": st.booleans(),
        "pax": st.dictionaries(st.sampled_from(PAX_KEYS), PAX_VALUES, max_size=3),
        "special": st.sampled_from(["x", "g", "L", "K"]),
        "special_size": NUMBERS,
    },
)
LAYERS = st.fixed_dictionaries(
    {"entries": st.lists(ENTRIES, max_size=8)},
    optional={
        "end": st.booleans(),
        "cut": st.integers(0, 6000),
        "flips": st.lists(st.tuples(st.integers(0, 6000), st.integers(1, 255)), max_size=3),
        "trailer": st.binary(max_size=600),
        "compression": st.sampled_from(["gzip", "zstd"]),
        "whiteouts": st.sampled_from([mode.value for mode in Whiteouts]),
        "chunk": st.integers(1, 2048),
    },
)


def number_field(value: int, width: int) -> bytes:
    """A numeric header field: octal when it fits, GNU base-256 otherwise (two's complement, wrapped)."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    bits = 8 * width
    return ((value % (1 << bits)) | (1 << (bits - 1))).to_bytes(width, "big")


def header(name: bytes, kind: bytes, size: int, entry: dict[str, Any], link: bytes = b"") -> bytes:
    """One 512-byte header block for ``entry``'s fields, with a correct checksum."""
    block = bytearray(512)
    block[0:100] = name[:100].ljust(100, b"\0")
    block[100:108] = number_field(entry.get("mode", 0o644), 8)
    block[108:116] = number_field(entry.get("uid", 0), 8)
    block[116:124] = number_field(entry.get("gid", 0), 8)
    block[124:136] = number_field(size, 12)
    block[136:148] = number_field(entry.get("mtime", 0), 12)
    block[156:157] = kind
    block[157:257] = link[:100].ljust(100, b"\0")
    block[257:265] = b"ustar  \0" if entry.get("gnu") else b"ustar\x0000"
    major, minor = entry.get("dev", (0, 0))
    block[329:337] = number_field(major, 8)
    block[337:345] = number_field(minor, 8)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def pax_record(key: str, value: str) -> bytes:
    """``"<length> key=value\\n"``, the length counting itself."""
    body = f" {key}={value}\n".encode("utf-8", "surrogateescape")
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length += 1
    return str(length).encode() + body


def entry_bytes(entry: dict[str, Any], sentinel: str) -> bytes:
    """The blocks of one generated entry; ``@S`` in its names stands for the sentinel's absolute path."""

    def raw(key: str) -> bytes:
        return entry.get(key, "").replace("@S", sentinel).encode("utf-8", "surrogateescape")

    name, link = raw("name"), raw("link")
    data = raw("data")
    out = b""
    if "special" in entry:
        special = entry["special"].encode()
        out += header(b"././@Special", special, entry.get("special_size", len(data)), {}) + padded(data)
    pax = {key: value.replace("@S", sentinel) for key, value in entry.get("pax", {}).items()}
    long = entry.get("long", "pax")
    for key, value, flag in (("path", name, b"L"), ("linkpath", link, b"K")):
        if len(value) > 100 and long == "pax":
            pax.setdefault(key, value.decode("utf-8", "surrogateescape"))
        elif len(value) > 100 and long == "gnu":
            out += header(b"././@LongLink", flag, len(value) + 1, {}) + padded(value + b"\0")
    if pax:
        records = b"".join(pax_record(key, value) for key, value in pax.items())
        out += header(b"PaxHeaders/x", b"x", len(records), {}) + padded(records)
    out += header(name, entry["type"].encode(), entry.get("size", len(data)), entry, link)
    return out + padded(data)


def layer_bytes(spec: dict[str, Any], sentinel: str) -> bytes:
    """The (maybe compressed, cut and flipped) layer blob of a generated spec."""
    stream = b"".join(entry_bytes(entry, sentinel) for entry in spec["entries"])
    if spec.get("end", True):
        stream += bytes(1024)
    stream += spec.get("trailer", b"")
    compression = spec.get("compression")
    if compression == "gzip":
        stream = gzip.compress(stream, mtime=0)
    elif compression == "zstd":
        stream = zstandard.ZstdCompressor().compress(stream)
    blob = bytearray(stream[: spec.get("cut", len(stream))])
    for position, mask in spec.get("flips", ()):
        if position < len(blob):
            blob[position] ^= mask
    return bytes(blob)


def outside_state(base: Path, root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything under ``base`` but the ``root`` subtree, as comparable tuples (metadata, contents, xattrs)."""
    state = {}
    for directory, dirs, files in os.walk(base):
        if directory == str(base):
            dirs.remove(root.name)
        for name in [".", *dirs, *files]:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            content: Any = None
            if os.path.islink(path):
                content = os.readlink(path)
            elif os.path.isfile(path):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            xattrs = {
                key: os.getxattr(path, key, follow_symlinks=False) for key in os.listxattr(path, follow_symlinks=False)
            }
            state[path] = (info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_nlink, info.st_mtime_ns,
                           info.st_ctime_ns, content, xattrs)  # fmt: skip
    return state


def decode_layer(data: bytes) -> dict[str, Any]:
    """A layer corpus file: the JSON of a generated spec (``trailer`` as latin-1 text)."""
    spec = json.loads(data)
    spec["trailer"] = spec.get("trailer", "").encode("latin-1")
    return spec


def check_layer(spec: dict[str, Any]) -> None:
    """Apply the layer onto a fresh root beside a sentinel directory and a lower layer: only documented
    errors, and nothing beside the root changes."""
    base = Path(tempfile.mkdtemp(prefix="ck-fuzz-layer-"))
    try:
        root, sentinel, lower = base / "root", base / "sentinel", base / "lower"
        for directory in (root / "etc", sentinel, lower / "etc"):
            directory.mkdir(parents=True)
        (sentinel / "victim").write_bytes(b"original\n")
        (root / "etc" / "hostname").write_bytes(b"fuzz\n")
        os.setxattr(lower / "etc", "user.lower", b"1")
        for link, target in (("out", str(sentinel)), ("up", "../../sentinel"), ("loop", "loop")):
            os.symlink(target, root / link)
        before = outside_state(base, root)
        blob = layer_bytes(spec, str(sentinel))
        chunk = spec.get("chunk", 1 << 20)
        chunks = [blob[at : at + chunk] for at in range(0, len(blob), chunk)]
        try:
            if "compression" in spec:
                media_type = oci.OCI_LAYER_ZSTD if spec["compression"] == "zstd" else oci.OCI_LAYER_GZIP
                apply_layer(chunks, media_type, [Mount("bind", str(root), ("rbind", "rw"))])
            else:
                apply_tar(chunks, root, whiteouts=Whiteouts(spec.get("whiteouts", "delete")), parents=[str(lower)])
        except ContainerkitError:
            pass
        except OSError as err:
            if "applying tar entry" not in str(err):
                raise
        assert outside_state(base, root) == before, "the layer changed something outside its root"
    finally:
        subprocess.run(["rm", "-rf", "--", str(base)], check=True)  # shutil.rmtree recurses: trees may be deeper


def test_fuzz_layer_applier(robustness: Any) -> None:
    """Generated tar layers fail only with documented errors and never write outside the root."""
    fuzz(robustness, "layers", decode_layer, LAYERS, check_layer, examples=250)


# -- OCI documents -----------------------------------------------------------------------------


@dataclass
class Blobs:
    """A content store of documents for ``resolve_image``: a valid config and manifest to point at."""

    blobs: dict[str, bytes] = field(default_factory=dict)

    def add(self, data: bytes, media_type: str = oci.OCI_MANIFEST) -> Descriptor:
        """Store ``data``; its descriptor."""
        digest = Digest.from_bytes(data)
        self.blobs[digest] = data
        return Descriptor(media_type, digest, len(data))

    def read(self, desc: Descriptor) -> bytes:
        """The bytes of ``desc``; NotFound when not stored."""
        try:
            return self.blobs[desc.digest]
        except KeyError:
            raise NotFound(f"blob {desc.digest}: not found") from None


STORE = Blobs()
CONFIG = STORE.add(
    json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
)
MANIFEST = STORE.add(
    json.dumps(
        {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "layers": [],
         "config": {"mediaType": oci.OCI_CONFIG, "digest": CONFIG.digest, "size": CONFIG.size}}
    ).encode()
)  # fmt: skip
JSON_KEYS = (
    "mediaType", "schemaVersion", "manifests", "config", "layers", "digest", "size", "platform", "os",
    "architecture", "variant", "os.version", "os.features", "rootfs", "type", "diff_ids", "annotations", "urls",
    "subject", "Entrypoint", "Cmd", "Env", "WorkingDir", "User", "fsLayers",
)  # fmt: skip
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 3),
    st.sampled_from([CONFIG.size, MANIFEST.size, 1 << 64, -(1 << 40), 9 << 20]),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from(
        [oci.OCI_INDEX, oci.OCI_MANIFEST, oci.OCI_CONFIG, oci.DOCKER_MANIFEST_LIST, oci.DOCKER_CONFIG,
         oci.OCI_LAYER_GZIP, "application/vnd.docker.distribution.manifest.v1+json", "layers", "linux", "amd64",
         str(CONFIG.digest), str(MANIFEST.digest), "sha256:" + "0" * 64, "sha512:ab", "md5:" + "0" * 32]
    ),
)  # fmt: skip
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(JSON_KEYS) | st.text(max_size=4), inner, max_size=6)
    ),
    max_leaves=25,
)
DOCUMENTS = st.one_of(
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=64),
    st.integers(900, 3000).map(lambda n: b"[" * n + b"]" * n),  # deeper than Python's recursion limit
    st.integers(900, 3000).map(lambda n: b'{"manifests": ' + b"[" * n),
    st.integers(4300, 5000).map(lambda n: b'{"schemaVersion": ' + b"2" * n + b"}"),
)
OCI_INPUTS = st.tuples(DOCUMENTS, st.sampled_from(["", oci.OCI_INDEX, oci.OCI_MANIFEST, oci.DOCKER_MANIFEST_LIST]))


def check_oci(case: tuple[bytes, str]) -> None:
    """Parsing a document as index, manifest and config, and resolving it as an image target, end in a
    result or a core.errors error."""
    data, media_type = case
    store = Blobs(dict(STORE.blobs))
    target = store.add(data, media_type or oci.OCI_INDEX)
    for parse in (
        lambda: oci.parse_index(data, media_type),
        lambda: oci.parse_manifest(data, media_type),
        lambda: oci.parse_config(data),
        lambda: oci.resolve_image(store.read, target),
    ):
        with contextlib.suppress(ContainerkitError):
            parse()


def test_fuzz_oci_documents(robustness: Any) -> None:
    """Generated JSON documents fail to parse or resolve only with documented errors."""
    fuzz(robustness, "oci", lambda data: (data, ""), OCI_INPUTS, check_oci, examples=250)


# -- references --------------------------------------------------------------------------------

REFERENCE_PIECES = st.sampled_from(
    ["docker.io", "index.docker.io", "localhost", "localhost:5000", "[::1]:5000", "127.0.0.1", "Host.Example:443",
     "/", "//", ":", "::", "@", "@sha256:" + "a" * 64, "@sha256:A", "library", "busybox", "a__b", "a--b", "a..b",
     "_", "-", "latest", "UPPER", "x" * 130, "a" * 64, "é", " ", "\0", "\n", "sha256", "[", "]", "a.b", "0"]
)  # fmt: skip
REFERENCES = st.one_of(st.text(max_size=40), st.lists(REFERENCE_PIECES, max_size=8).map("".join))


def check_reference(text_: str) -> None:
    """A reference parses into one that prints and parses back to itself, or fails with InvalidArgument."""
    try:
        ref = Reference.parse(text_)
    except ContainerkitError:
        return
    assert Reference.parse(str(ref)) == ref
    is_local_host(ref.domain)
    with contextlib.suppress(ContainerkitError):
        ref.with_tag(text_)


def test_fuzz_reference_parser(robustness: Any) -> None:
    """Generated references parse, round-trip, or fail with InvalidArgument."""
    fuzz(robustness, "reference", text, REFERENCES, check_reference, examples=300)


# -- filters -----------------------------------------------------------------------------------

FILTER_PIECES = st.sampled_from(
    ["name", "labels", ".", "a.b", "==", "!=", "~=", "=", "!", "~", ",", " ", "\t", '"', "/", "|", "\\", "\\x",
     "\\u00e9", "\\U0010ffff", "\\U00110000", "\\377", "\\400", "\\n", "\\q", "ff", "\0", "é", "(", ")", "[", "*",
     "+", "{99999999999}", "{2,1}", "(?P<a>", "(?<=a)", "\\1", "\\pL", "\\z", "a" * 20]
)  # fmt: skip
FILTER_TEXTS = st.one_of(
    st.text(max_size=30),
    st.lists(FILTER_PIECES, max_size=12).map("".join),
    st.integers(100, 2000).map(lambda n: "name~=/" + "(" * n + ")" * n + "/"),  # nesting past the recursion limit
)
FILTERS = st.one_of(FILTER_TEXTS, st.lists(FILTER_TEXTS, max_size=3))
FILTER_OBJECTS = (
    {},
    {"name": "docker.io/library/busybox:latest", "labels": {"a.b": "c", "x": ""}, "target": {"digest": "sha256:0"}},
    {"id": "x", "capabilities": ["a", "b"], "exported": True, "size": 3, "none": None, "nested": {"a": {"b": [1]}}},
)


def check_filters(filters: str | list[str]) -> None:
    """A filter compiles (then evaluates on any object without raising) or fails with InvalidArgument."""
    try:
        matches = parse_filters(filters)
    except ContainerkitError:
        return
    for fields in FILTER_OBJECTS:
        matches(fields)


def test_fuzz_filter_language(robustness: Any) -> None:
    """Generated filters compile and evaluate, or fail with InvalidArgument."""
    fuzz(robustness, "filters", text, FILTERS, check_filters, examples=300)


# -- config ------------------------------------------------------------------------------------

TOML_LINES = st.sampled_from(
    ['root = "/tmp/x"', "root = 1", 'state = ""', 'disabled_plugins = ["a", 1]', "required_plugins = []",
     "[grpc]", 'address = "/run/x.sock"', "gid = 1000", "gid = -1", "gid = true", "gid = 1.5", "[debug]",
     'level = "debug"', 'level = "trace"', "[plugins.snapshotter.overlayfs]", "[plugins]", "[plugins.x]",
     "plugins = 3", "[[grpc]]", "unknown = 1", "a.b.c = 1", "x = 1979-05-27T07:32:00Z", "x = nan", "x = inf",
     'x = """', "x = {a = {b = 1}}", "[grpc", "= 1", "\0", "\udcff", "x = 0x_1"]
)  # fmt: skip
TOML_TEXTS = st.one_of(
    st.lists(TOML_LINES | st.text(max_size=12), max_size=10).map("\n".join),
    st.integers(900, 3000).map(lambda n: "root = " + "[" * n + "]" * n),  # past the recursion limit
    st.integers(900, 3000).map(lambda n: "root = " + "{a=" * n + "1" + "}" * n),
    st.integers(4300, 5000).map(lambda n: "[grpc]\ngid = " + "1" * n),  # past the int-from-text digit limit
)


def check_config_file(toml: str) -> None:
    """A config file loads or fails with ConfigError."""
    with tempfile.TemporaryDirectory(prefix="ck-fuzz-config-") as directory:
        path = Path(directory) / "config.toml"
        path.write_bytes(toml.encode("utf-8", "surrogateescape"))
        with contextlib.suppress(ConfigError):
            load_config(path)


@dataclass
class Shapes:
    """Every field type from_table supports, for tables made up by the fuzzer."""

    name: str = ""
    count: int = 0
    ratio: float = 0.0
    flag: bool = False
    path: Path = Path("/")
    anything: Any = None
    level: Literal["a", "b", 1] = "a"
    items: list[int] = field(default_factory=list)
    pair: tuple[str, ...] = ()
    table: dict[str, list[str]] = field(default_factory=dict)
    maybe: int | None = None
    config: Config = field(default_factory=Config)


TOML_VALUES = st.recursive(
    st.one_of(st.booleans(), st.integers(), st.floats(), st.text(max_size=6), st.datetimes(), st.dates(), st.times()),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from([f.name for f in Shapes.__dataclass_fields__.values()] + ["root", "grpc", "x"]),
                      inner, max_size=5),
    max_leaves=20,
)  # fmt: skip
TABLES = st.dictionaries(
    st.sampled_from(list(Shapes.__dataclass_fields__)) | st.text(max_size=4), TOML_VALUES, max_size=6
)


def check_config_table(table: dict[str, Any]) -> None:
    """A parsed table builds the dataclass or fails with ConfigError."""
    with contextlib.suppress(ConfigError):
        from_table(Shapes, table)


def test_fuzz_config_file(robustness: Any) -> None:
    """Generated config files load or fail with ConfigError."""
    fuzz(robustness, "config", text, TOML_TEXTS, check_config_file, examples=200)


def test_fuzz_config_tables(robustness: Any) -> None:
    """Generated tables build a config or fail with ConfigError."""
    fuzz(robustness, "config-tables", json.loads, TABLES, check_config_table, examples=200)


# -- the gRPC server ---------------------------------------------------------------------------

ECHO = "/fuzz.Echo/Call"
INLINE_ECHO = "/fuzz.Echo/Inline"  # answered on the server's I/O thread
STREAM_IDS = st.sampled_from([0, 1, 1, 1, 2, 3, 5, 2**31 - 1])
FRAME_TYPES = st.one_of(st.integers(0, 9), st.integers(0, 9), st.integers(10, 255))


def _request_block(path: str) -> bytes:
    return Encoder().encode(
        [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
         ("content-type", "application/grpc"), ("te", "trailers")]
    )  # fmt: skip


CALL_PIECES = st.sampled_from(
    [
        http2.frame(http2.HEADERS, http2.END_HEADERS, 1, _request_block(ECHO)),
        http2.frame(http2.HEADERS, http2.END_HEADERS, 3, _request_block("/fuzz.Echo/Missing")),
        http2.frame(http2.HEADERS, http2.END_HEADERS, 5, _request_block(INLINE_ECHO)),
        http2.frame(http2.DATA, http2.END_STREAM, 5, b"\0\0\0\0\3abc"),
        http2.frame(http2.DATA, http2.END_STREAM, 1, b"\0\0\0\0\3abc"),
        http2.frame(http2.DATA, 0, 1, b"\0\xff\xff\xff\xff"),
        http2.frame(http2.DATA, 0, 1, b"\1\0\0\0\2ab"),
        http2.frame(http2.SETTINGS, 0, 0, b"\0\4\0\0\0\0"),
        http2.frame(http2.WINDOW_UPDATE, 0, 1, b"\x7f\xff\xff\xff"),
        http2.frame(http2.RST_STREAM, 0, 1, b"\0\0\0\x08"),
    ]
)
RANDOM_FRAMES = st.builds(
    lambda kind, flags, stream, payload: http2.frame(kind, flags, stream, payload),
    FRAME_TYPES,
    st.integers(0, 255),
    STREAM_IDS,
    st.binary(max_size=48),
)
H2_INPUTS = st.one_of(
    st.lists(st.one_of(CALL_PIECES, RANDOM_FRAMES), max_size=8).map(lambda frames: http2.PREFACE + b"".join(frames)),
    st.binary(max_size=80).map(lambda data: http2.PREFACE + data),
    st.binary(max_size=40),
)


@pytest.fixture(scope="module")
def fuzzed_server() -> typing.Iterator[tuple[Any, str]]:
    """A live daemon gRPC server (core.server.new_server) with an echo method run by a worker and one answered
    inline, and its socket path."""
    import grpc

    from core.config import GrpcConfig
    from core.server import new_server

    directory = tempfile.mkdtemp(prefix="ck-fuzz-h2-", dir="/tmp")
    address = f"{directory}/sock"
    server = new_server(GrpcConfig())
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("fuzz.Echo", {"Call": echo, "Inline": echo})])
    server.answer_inline([INLINE_ECHO])
    server.add_insecure_port(f"unix:{address}")
    server.start()
    try:
        yield server, address
    finally:
        server.stop(None).wait(10)
        with contextlib.suppress(OSError):
            os.unlink(address)
        os.rmdir(directory)


def check_http2(server: Any, address: str, data: bytes) -> None:
    """The server takes ``data`` from a client that then stops sending, answers or closes, and closes the
    connection once the client does; its I/O thread lives on."""
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(address)
        with contextlib.suppress(OSError):  # the server may close first, on a protocol error
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while client.recv(65536):
                pass
    assert server._thread.is_alive()


def test_fuzz_http2_server(robustness: Any, fuzzed_server: tuple[Any, str]) -> None:
    """Generated HTTP/2 input leaves the server alive, serving, and with no call open."""
    import grpc

    server, address = fuzzed_server
    fuzz(robustness, "http2", bytes, H2_INPUTS, lambda data: check_http2(server, address, data), examples=300)
    with grpc.insecure_channel(f"unix:{address}") as channel:
        assert channel.unary_unary(ECHO)(b"still serving", timeout=10) == b"still serving"
    deadline = time.monotonic() + 10
    while server._open_calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server._open_calls == 0


@pytest.mark.parametrize("target", ["layers", "oci", "reference", "filters", "config", "config-tables", "http2"])
def test_every_target_has_a_corpus(target: str) -> None:
    """Each target replays committed seeds."""
    assert corpus(target), f"tests/fuzz_corpus/{target}/ holds no inputs"
