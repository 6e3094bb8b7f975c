"""The plugin-type interfaces and the shared value types in ``core``."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import subprocess
import sys
from abc import ABC
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from core import content, network, runtime, snapshot
from core.digest import Digest, Digester
from core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplementedByPlugin,
    Unavailable,
)
from core.plugin_types import PLUGIN_TYPES, PluginType, by_wire_type
from core.types import Descriptor, Mount, Platform

EMPTY_SHA256 = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

# The contract: exactly these methods must be implemented by a plugin of each type.
REQUIRED = {
    content.ContentStore: {
        "info",
        "update",
        "walk",
        "delete",
        "reader_at",
        "writer",
        "status",
        "list_statuses",
        "abort",
    },
    content.ReaderAt: {"size", "read", "close"},
    content.Writer: {"ref", "offset", "write", "digest", "commit", "truncate", "status", "close"},
    snapshot.Snapshotter: {"stat", "update", "usage", "mounts", "prepare", "view", "commit", "remove", "walk"},
    runtime.Runtime: {"create", "get", "tasks", "restore"},
    runtime.Task: {
        "id",
        "namespace",
        "bundle",
        "state",
        "start",
        "delete",
        "kill",
        "pause",
        "resume",
        "exec",
        "resize_pty",
        "close_io",
        "pids",
        "wait",
        "update",
        "stats",
    },
    network.NetworkDriver: {"create", "delete", "networks", "attach", "detach", "attachments", "interfaces"},
}


def _implementation(interface: type[ABC], skip: str = "") -> type:
    """A subclass of ``interface`` implementing every abstract method but ``skip``."""
    namespace: dict[str, Any] = {name: lambda *a, **k: None for name in interface.__abstractmethods__ if name != skip}
    return type(f"Fake{interface.__name__}", (interface,), namespace)


# -- interfaces -----------------------------------------------------------------------------------


@pytest.mark.parametrize("interface", list(REQUIRED), ids=lambda cls: cls.__name__)
def test_interface_cannot_be_instantiated(interface: type[ABC]) -> None:
    with pytest.raises(TypeError, match="abstract"):
        interface()


@pytest.mark.parametrize("interface", list(REQUIRED), ids=lambda cls: cls.__name__)
def test_interface_requires_exactly_its_contract_methods(interface: type[ABC]) -> None:
    assert set(interface.__abstractmethods__) == REQUIRED[interface]
    _implementation(interface)()  # all implemented: instantiable


@pytest.mark.parametrize(
    ("interface", "method"),
    [(interface, method) for interface, methods in REQUIRED.items() for method in sorted(methods)],
    ids=lambda value: value.__name__ if isinstance(value, type) else value,
)
def test_implementation_missing_a_method_cannot_be_instantiated(interface: type[ABC], method: str) -> None:
    with pytest.raises(TypeError, match=method):
        _implementation(interface, skip=method)()


def test_optional_methods_default_to_not_implemented_or_no_op() -> None:
    task = _implementation(runtime.Task)()
    with pytest.raises(NotImplementedByPlugin):
        task.checkpoint("/tmp/checkpoint")
    driver = _implementation(network.NetworkDriver)()
    for call in (
        lambda: driver.set_mtu("/proc/1/ns/net", "eth0", 1400),
        lambda: driver.set_up("/proc/1/ns/net", "eth0"),
        lambda: driver.set_down("/proc/1/ns/net", "eth0"),
        lambda: driver.add_address("/proc/1/ns/net", "eth0", "10.0.0.2/24"),
        lambda: driver.remove_address("/proc/1/ns/net", "eth0", "10.0.0.2/24"),
        lambda: driver.routes("/proc/1/ns/net"),
        lambda: driver.add_route("/proc/1/ns/net", network.Route("default", "10.0.0.1")),
        lambda: driver.remove_route("/proc/1/ns/net", network.Route("default", "10.0.0.1")),
    ):
        with pytest.raises(NotImplementedByPlugin):
            call()
    for plugin_interface in (content.ContentStore, snapshot.Snapshotter, runtime.Runtime, network.NetworkDriver):
        _implementation(plugin_interface)().close()  # optional, no-op by default
    _implementation(snapshot.Snapshotter)().cleanup()


def test_kinds_and_statuses_use_the_wire_enum_values() -> None:
    assert [(k.name, k.value) for k in snapshot.Kind] == [("VIEW", 1), ("ACTIVE", 2), ("COMMITTED", 3)]
    assert snapshot.Kind.parse("Committed") is snapshot.Kind.COMMITTED
    assert str(snapshot.Kind.VIEW) == "view"
    with pytest.raises(InvalidArgument, match="unknown snapshot kind"):
        snapshot.Kind.parse("frozen")
    assert runtime.TaskStatus.UNKNOWN.value == 0
    assert runtime.TaskStatus.PAUSING.value == 5
    assert str(runtime.TaskStatus.RUNNING) == "running"


def test_usage_adds_up() -> None:
    assert snapshot.Usage(10, 1) + snapshot.Usage(5, 2) == snapshot.Usage(15, 3)


def test_info_values_copy_their_labels_and_stay_hashable() -> None:
    labels = {"a": "1"}
    info = snapshot.Info(snapshot.Kind.ACTIVE, "k", labels=labels)
    labels["b"] = "2"
    assert info.labels == {"a": "1"}
    assert hash(info) == hash(snapshot.Info(snapshot.Kind.ACTIVE, "k", labels={"a": "1"}))
    blob = content.Info(EMPTY_SHA256)
    assert isinstance(blob.digest, Digest)
    assert blob.created_at == datetime(1970, 1, 1, tzinfo=UTC)


def test_create_task_request_takes_rootfs_as_a_tuple() -> None:
    request = runtime.CreateTaskRequest("default", "c1", {"ociVersion": "1.0.2"}, rootfs=[Mount("bind", "/src")])
    assert request.rootfs == (Mount("bind", "/src"),)
    assert request.stdio == runtime.Stdio()


# -- digests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha384", "sha512"])
def test_digest_parses_each_supported_algorithm(algorithm: str) -> None:
    hexdigest = hashlib.new(algorithm, b"x").hexdigest()
    digest = Digest.parse(f"{algorithm}:{hexdigest}")
    assert digest.algorithm == algorithm
    assert digest.hex == hexdigest
    assert digest == f"{algorithm}:{hexdigest}"  # a str, equal to the plain string
    assert Digest.from_bytes(b"x", algorithm) == digest


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "expected '<algorithm>:<hex>'"),
        ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "expected '<algorithm>:<hex>'"),
        ("sha256:", "expected '<algorithm>:<hex>'"),
        (":abc", "expected '<algorithm>:<hex>'"),
        ("md5:d41d8cd98f00b204e9800998ecf8427e", "unsupported algorithm 'md5'"),
        ("sha256:abc", "needs 64 hex characters, got 3"),
        (EMPTY_SHA256.upper().replace("SHA256", "sha256"), "lowercase"),
        (EMPTY_SHA256[:-1] + "g", "lowercase"),
        (EMPTY_SHA256 + "\n", "got 65"),
        ("sha384:" + "0" * 64, "needs 96 hex characters"),
    ],
)
def test_digest_rejects_malformed_values_with_invalid_argument(value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Digest.parse(value)


def test_digest_rejects_non_strings() -> None:
    with pytest.raises(InvalidArgument, match="must be a string"):
        Digest(b"sha256:00")  # type: ignore[arg-type]


def test_digest_is_a_plain_str_on_the_wire() -> None:
    digest = Digest(EMPTY_SHA256)
    assert Digest(digest) is digest
    assert Digest.from_bytes(b"") == EMPTY_SHA256
    assert {EMPTY_SHA256: 1}[digest] == 1
    assert pickle.loads(pickle.dumps(digest)) == digest
    assert type(pickle.loads(pickle.dumps(digest))) is Digest


def test_digester_hashes_incrementally_and_can_continue() -> None:
    digester = Digest(EMPTY_SHA256).digester()
    assert digester.digest() == EMPTY_SHA256
    digester.update(b"hello ")
    partial = digester.copy()
    digester.update(memoryview(b"world"))
    assert digester.digest() == Digest.from_bytes(b"hello world")
    assert partial.digest() == Digest.from_bytes(b"hello ")
    with pytest.raises(InvalidArgument, match="unsupported digest algorithm"):
        Digester("md5")


# -- mounts, platforms, descriptors ---------------------------------------------------------------


def test_mounts_compare_by_value_whatever_the_options_sequence() -> None:
    a = Mount("overlay", "overlay", ["lowerdir=/l", "upperdir=/u", "workdir=/w"])
    b = Mount("overlay", "overlay", ("lowerdir=/l", "upperdir=/u", "workdir=/w"))
    assert a == b
    assert hash(a) == hash(b)
    assert a != Mount("overlay", "overlay", ("lowerdir=/l",))
    assert a.format_options() == "lowerdir=/l,upperdir=/u,workdir=/w"
    assert Mount("tmpfs", "tmpfs").format_options() == ""
    assert Mount("bind", "/src", ("rbind", "ro")).readonly
    assert not a.readonly
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.source = "other"  # type: ignore[misc]
    with pytest.raises(TypeError, match="not a string"):
        Mount("bind", "/src", "ro")  # type: ignore[arg-type]


def test_platform_parses_and_prints_os_arch_variant() -> None:
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert str(Platform("linux", "amd64")) == "linux/amd64"
    assert Platform.from_oci(Platform("linux", "arm", "v7").to_oci()) == Platform("linux", "arm", "v7")
    for bad in ("linux", "linux//v7", "a/b/c/d"):
        with pytest.raises(InvalidArgument, match="invalid platform"):
            Platform.parse(bad)


def test_descriptors_compare_by_value_including_annotations() -> None:
    a = Descriptor("application/vnd.oci.image.manifest.v1+json", EMPTY_SHA256, 0, {"k": "v"})  # type: ignore[arg-type]
    b = Descriptor("application/vnd.oci.image.manifest.v1+json", Digest(EMPTY_SHA256), 0, {"k": "v"})
    assert a == b
    assert hash(a) == hash(b)
    assert isinstance(a.digest, Digest)
    assert a != dataclasses.replace(b, annotations={"k": "other"})
    assert a != dataclasses.replace(b, platform=Platform("linux", "amd64"))


def test_descriptor_validates_digest_and_size() -> None:
    with pytest.raises(InvalidArgument, match="invalid digest"):
        Descriptor("x", "sha256:nope", 0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="invalid size -1"):
        Descriptor("x", Digest(EMPTY_SHA256), -1)


def test_descriptor_round_trips_through_oci_json() -> None:
    desc = Descriptor(
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Digest(EMPTY_SHA256),
        0,
        annotations={"org.opencontainers.image.title": "layer"},
        urls=("https://example.com/blob",),
        platform=Platform("linux", "amd64"),
    )
    oci = desc.to_oci()
    assert oci["mediaType"] == desc.media_type
    assert oci["platform"] == {"architecture": "amd64", "os": "linux"}
    assert Descriptor.from_oci(oci) == desc
    assert Descriptor("t", Digest(EMPTY_SHA256), 0).to_oci() == {"mediaType": "t", "digest": EMPTY_SHA256, "size": 0}
    with pytest.raises(InvalidArgument, match="missing 'size'"):
        Descriptor.from_oci({"mediaType": "t", "digest": EMPTY_SHA256})


@pytest.mark.parametrize(
    "malformed",
    [
        {"mediaType": 1},
        {"annotations": ["a"]},
        {"annotations": {"a": 1}},
        {"urls": "https://example.com"},
        {"platform": "linux/amd64"},
        {"platform": {"os": "linux", "architecture": "amd64", "os.features": 5}},
    ],
)
def test_a_malformed_optional_descriptor_field_is_invalid_argument(malformed: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument, match="invalid"):
        Descriptor.from_oci({"mediaType": "t", "digest": EMPTY_SHA256, "size": 0, **malformed})


# -- content store helpers, against a minimal in-memory store -------------------------------------


class _Reader(content.ReaderAt):
    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        return len(self._data)

    def read(self, offset: int, size: int) -> bytes:
        return self._data[offset : offset + size]

    def close(self) -> None:
        pass


class _Writer(content.Writer):
    def __init__(self, store: _MemoryStore, ref: str) -> None:
        self._store, self._ref = store, ref

    @property
    def ref(self) -> str:
        return self._ref

    @property
    def offset(self) -> int:
        return len(self._store.ingests[self._ref])

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._store.ingests[self._ref] += data
        return len(data)

    def digest(self) -> Digest:
        return Digest.from_bytes(self._store.ingests[self._ref])

    def commit(self, size: int = 0, expected: Digest | None = None, labels: Mapping[str, str] | None = None) -> Digest:
        self.close()
        digest = self.digest()
        if (size and size != self.offset) or (expected and expected != digest):
            raise FailedPrecondition("unexpected commit size or digest")
        data = self._store.ingests.pop(self._ref)
        if digest in self._store.blobs:
            raise AlreadyExists(f"content {digest}")
        self._store.blobs[digest] = bytes(data)
        return digest

    def truncate(self, size: int) -> None:
        del self._store.ingests[self._ref][size:]

    def status(self) -> content.Status:
        return content.Status(self._ref, self.offset)

    def close(self) -> None:
        self._store.locked.discard(self._ref)


class _MemoryStore(content.ContentStore):
    def __init__(self) -> None:
        self.blobs: dict[Digest, bytes] = {}
        self.ingests: dict[str, bytearray] = {}
        self.locked: set[str] = set()

    def info(self, digest: Digest) -> content.Info:
        if digest not in self.blobs:
            raise NotFound(f"content {digest}")
        return content.Info(digest, len(self.blobs[digest]))

    def update(self, info: content.Info, fieldpaths: Sequence[str] = ()) -> content.Info:
        return self.info(info.digest)

    def walk(self, filters: Sequence[str] = ()) -> Iterator[content.Info]:
        return (self.info(digest) for digest in list(self.blobs))

    def delete(self, digest: Digest) -> None:
        self.info(digest)
        del self.blobs[digest]

    def reader_at(self, target: Descriptor | Digest) -> content.ReaderAt:
        digest = target.digest if isinstance(target, Descriptor) else target
        return _Reader(self.blobs[self.info(digest).digest])

    def writer(self, ref: str, expected_size: int = 0, expected_digest: Digest | None = None) -> content.Writer:
        if expected_digest in self.blobs:
            raise AlreadyExists(f"content {expected_digest}")
        if ref in self.locked:
            raise Unavailable(f"ref {ref} locked")
        self.locked.add(ref)
        self.ingests.setdefault(ref, bytearray())
        return _Writer(self, ref)

    def status(self, ref: str) -> content.Status:
        return content.Status(ref, len(self.ingests[ref]))

    def list_statuses(self, filters: Sequence[str] = ()) -> list[content.Status]:
        return [self.status(ref) for ref in self.ingests]

    def abort(self, ref: str) -> None:
        del self.ingests[ref]


def test_write_blob_then_read_blob_round_trips() -> None:
    store = _MemoryStore()
    digest = store.write_blob("ref-1", b"hello world")
    assert digest == Digest.from_bytes(b"hello world")
    assert store.read_blob(digest) == b"hello world"
    assert store.read_blob(Descriptor("t", digest, 11)) == b"hello world"
    assert store.ingests == {}
    assert store.locked == set()


def test_write_blob_of_existing_content_succeeds() -> None:
    store = _MemoryStore()
    digest = store.write_blob("ref-1", b"data")
    assert store.write_blob("ref-2", b"data") == digest
    assert store.write_blob("ref-3", b"data", expected=digest) == digest
    assert store.ingests == {}


def test_write_blob_restarts_a_leftover_ingest() -> None:
    store = _MemoryStore()
    store.ingests["ref-1"] = bytearray(b"stale partial")
    assert store.read_blob(store.write_blob("ref-1", b"fresh")) == b"fresh"


def test_write_blob_with_wrong_expected_digest_writes_nothing() -> None:
    store = _MemoryStore()
    with pytest.raises(FailedPrecondition, match="expected"):
        store.write_blob("ref-1", b"data", expected=Digest(EMPTY_SHA256))
    assert store.blobs == {}
    assert store.ingests == {}


def test_reader_chunks_cover_the_blob_from_an_offset() -> None:
    with _Reader(b"0123456789") as reader:
        assert list(reader.chunks(chunk_size=4)) == [b"0123", b"4567", b"89"]
        assert b"".join(reader.chunks(offset=7, chunk_size=2)) == b"789"


# -- plugin types ---------------------------------------------------------------------------------


def test_plugin_types_name_their_groups_interfaces_and_wire_types() -> None:
    assert {name: t.group for name, t in PLUGIN_TYPES.items()} == {
        "runtime": "containerkit.runtime",
        "snapshotter": "containerkit.snapshotter",
        "content": "containerkit.content",
        "network": "containerkit.network",
        "differ": "containerkit.differ",
        "gc": "containerkit.gc",
        "service": "containerkit.service",
    }
    assert PLUGIN_TYPES["runtime"].interface is runtime.Runtime
    assert PLUGIN_TYPES["snapshotter"].interface is snapshot.Snapshotter
    assert PLUGIN_TYPES["content"].interface is content.ContentStore
    assert PLUGIN_TYPES["network"].interface is network.NetworkDriver
    assert PLUGIN_TYPES["service"].interface is None
    assert PLUGIN_TYPES["differ"].interface_ref == "core.diff:Differ"
    assert by_wire_type("io.containerd.snapshotter.v1") is PLUGIN_TYPES["snapshotter"]
    assert by_wire_type("io.containerd.differ.v1") is PLUGIN_TYPES["differ"]
    assert by_wire_type("io.containerd.grpc.v1") is PLUGIN_TYPES["service"]
    assert by_wire_type("io.containerd.nope.v1") is None
    assert all(isinstance(t, PluginType) and t.doc for t in PLUGIN_TYPES.values())


def test_importing_plugin_types_does_not_import_the_interfaces() -> None:
    code = (
        "import sys, core.plugin_types; "
        "print([m for m in ('core.runtime', 'core.snapshot', 'core.content', 'core.network') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
