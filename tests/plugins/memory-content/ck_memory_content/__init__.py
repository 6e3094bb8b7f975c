"""An in-memory content store: a complete third-party containerkit plugin in one module.

Installed as the ``memory`` plugin of type ``content`` (see this distribution's pyproject.toml), it
implements :class:`core.content.ContentStore` with blobs and ingests held in dicts, so it is lost at
restart; ``max_bytes`` bounds what blobs and ingests may hold together. It also observes every
lifecycle event through the ``containerkit_event`` hook, appending ``<namespace> <topic>`` lines to
``event_log`` when one is configured. Usable without the daemon:
``MemoryContentStore(MemoryConfig(max_bytes=1 << 20))``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from core.content import ContentStore, Info, ReaderAt, Status, Writer
from core.digest import Digest, Digester
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from core.filters import parse as parse_filters
from core.hookspecs import hookimpl
from core.labels import validate_labels
from core.plugin import InitContext, Registration
from core.types import Descriptor

__all__ = ["MemoryConfig", "MemoryContentStore", "plugin"]


@dataclass
class MemoryConfig:
    """The keys accepted in ``[plugins.content.memory]``, with their defaults."""

    max_bytes: int = 64 << 20
    """The most bytes blobs and ingests may hold together; a write beyond it fails."""
    event_log: str = ""
    """A file to append ``<namespace> <topic>`` to for every event; empty: no log."""


@dataclass
class _Ingest:
    """One ingest in progress; ``locked`` is its per-ref lock, held by at most one writer."""

    ref: str
    total: int
    expected: Digest | None
    digester: Digester
    data: bytearray = field(default_factory=bytearray)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    locked: bool = False

    def status(self) -> Status:
        return Status(self.ref, len(self.data), self.total, self.expected, self.started_at, self.updated_at)


class _Reader(ReaderAt):
    """Reads one blob's bytes, which stay valid even if the blob is deleted meanwhile."""

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data
        self._size = len(data)

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, size: int) -> bytes:
        if self._data is None:
            raise FailedPrecondition("reader is closed")
        if offset < 0 or size < 0:
            raise InvalidArgument(f"cannot read {size} bytes at offset {offset}: both must be >= 0")
        return self._data[offset : offset + size]

    def close(self) -> None:
        self._data = None


class _Writer(Writer):
    """Appends to one locked ingest of a :class:`MemoryContentStore`."""

    def __init__(self, store: MemoryContentStore, ingest: _Ingest) -> None:
        self._store, self._ingest, self._open = store, ingest, True

    @property
    def ref(self) -> str:
        return self._ingest.ref

    @property
    def offset(self) -> int:
        return len(self._ingest.data)

    def _check_open(self) -> None:
        if not self._open:
            raise FailedPrecondition(f"writer for {self.ref!r} is closed")

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with self._store._lock:
            self._check_open()
            self._store._reserve(len(data))
            self._ingest.data += data
            self._ingest.digester.update(data)
            self._ingest.updated_at = datetime.now(UTC)
        return len(data)

    def digest(self) -> Digest:
        self._check_open()
        return self._ingest.digester.digest()

    def commit(self, size: int = 0, expected: Digest | None = None, labels: Mapping[str, str] | None = None) -> Digest:
        self._check_open()
        try:
            expected = None if expected is None else Digest(expected)
            checked = validate_labels(labels or {})
            ingest = self._ingest
            if size and size != len(ingest.data):
                raise FailedPrecondition(f"{self.ref!r}: unexpected commit size {len(ingest.data)}, expected {size}")
            actual = ingest.digester.digest()
            if expected is not None and expected.algorithm != actual.algorithm:
                actual = Digest.from_bytes(ingest.data, expected.algorithm)
            if expected is not None and actual != expected:
                raise FailedPrecondition(f"{self.ref!r}: unexpected commit digest {actual}, expected {expected}")
            with self._store._lock:
                del self._store._ingests[self.ref]
                if actual in self._store._blobs:
                    self._store._used -= len(ingest.data)
                    raise AlreadyExists(f"content {actual} already exists")
                now = datetime.now(UTC)
                self._store._blobs[actual] = (bytes(ingest.data), Info(actual, len(ingest.data), now, now, checked))
            return actual
        finally:
            self.close()

    def truncate(self, size: int) -> None:
        with self._store._lock:
            self._check_open()
            if not 0 <= size <= self.offset:
                raise InvalidArgument(f"cannot truncate {self.ref!r} to {size} bytes: it holds {self.offset}")
            self._store._used -= self.offset - size
            del self._ingest.data[size:]
            self._ingest.digester = Digester(self._ingest.digester.algorithm)
            self._ingest.digester.update(self._ingest.data)
            self._ingest.updated_at = datetime.now(UTC)

    def status(self) -> Status:
        self._check_open()
        return self._ingest.status()

    def close(self) -> None:
        with self._store._lock:
            if self._open:
                self._open, self._ingest.locked = False, False


class MemoryContentStore(ContentStore):
    """A :class:`core.content.ContentStore` in process memory; safe to use from several threads."""

    def __init__(self, config: MemoryConfig | None = None) -> None:
        self.config = config or MemoryConfig()
        if self.config.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {self.config.max_bytes}")
        self._lock = threading.Lock()
        self._blobs: dict[Digest, tuple[bytes, Info]] = {}
        self._ingests: dict[str, _Ingest] = {}
        self._used = 0
        self._event_log_lock = threading.Lock()

    def _reserve(self, size: int) -> None:
        """Count ``size`` more bytes as used, or refuse them. Call with ``_lock`` held."""
        if self._used + size > self.config.max_bytes:
            raise FailedPrecondition(
                f"memory content store is full: {size} more bytes exceed max_bytes {self.config.max_bytes} "
                f"({self._used} in use)"
            )
        self._used += size

    def _blob(self, digest: Digest) -> tuple[bytes, Info]:
        try:
            return self._blobs[Digest(digest)]
        except KeyError:
            raise NotFound(f"content {digest} not found") from None

    def _ingest(self, ref: str) -> _Ingest:
        try:
            return self._ingests[ref]
        except KeyError:
            raise NotFound(f"no ingest with ref {ref!r}") from None

    def info(self, digest: Digest) -> Info:
        with self._lock:
            return self._blob(digest)[1]

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        with self._lock:
            data, current = self._blob(info.digest)
            labels = dict(current.labels)
            for path in fieldpaths or ("labels",):
                if path == "labels":
                    labels = dict(info.labels)
                elif path.startswith("labels.") and (key := path.removeprefix("labels.")):
                    value = info.labels.get(key, "")
                    labels[key] = value
                    if not value:
                        del labels[key]
                else:
                    raise InvalidArgument(f"cannot update field {path!r} of content {info.digest}: only labels")
            updated = replace(current, labels=validate_labels(labels), updated_at=datetime.now(UTC))
            self._blobs[updated.digest] = (data, updated)
            return updated

    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        matches = parse_filters(filters)  # parsed now: a malformed filter fails the call
        with self._lock:
            infos = [info for _, info in self._blobs.values()]
        return iter([i for i in infos if matches({"digest": i.digest, "size": i.size, "labels": i.labels})])

    def delete(self, digest: Digest) -> None:
        with self._lock:
            data, _ = self._blob(digest)
            del self._blobs[Digest(digest)]
            self._used -= len(data)

    def reader_at(self, target: Descriptor | Digest) -> ReaderAt:
        with self._lock:
            return _Reader(self._blob(target.digest if isinstance(target, Descriptor) else target)[0])

    def writer(self, ref: str, expected_size: int = 0, expected_digest: Digest | None = None) -> Writer:
        if not ref:
            raise InvalidArgument("an ingest needs a non-empty ref")
        if expected_size < 0:
            raise InvalidArgument(f"invalid expected size {expected_size} for {ref!r}: must be >= 0")
        expected_digest = None if expected_digest is None else Digest(expected_digest)
        with self._lock:
            if expected_digest in self._blobs:
                raise AlreadyExists(f"content {expected_digest} already exists")
            ingest = self._ingests.get(ref)
            if ingest is None:
                algorithm = expected_digest.algorithm if expected_digest else "sha256"
                ingest = _Ingest(ref, expected_size, expected_digest, digester=Digester(algorithm))
                self._ingests[ref] = ingest
            elif ingest.locked:
                raise Unavailable(f"ref {ref!r} is locked by another writer; retry later")
            elif expected_size and ingest.total and expected_size != ingest.total:
                raise FailedPrecondition(f"ingest {ref!r} has total {ingest.total}, not {expected_size}")
            ingest.total = expected_size or ingest.total
            ingest.expected = expected_digest or ingest.expected
            ingest.locked = True
            return _Writer(self, ingest)

    def status(self, ref: str) -> Status:
        with self._lock:
            return self._ingest(ref).status()

    def list_statuses(self, filters: Sequence[str] = ()) -> list[Status]:
        matches = parse_filters(filters)
        with self._lock:
            return [ingest.status() for ingest in self._ingests.values() if matches({"ref": ingest.ref})]

    def abort(self, ref: str) -> None:
        with self._lock:
            if self._ingest(ref).locked:
                raise Unavailable(f"ref {ref!r} is locked by a writer; close it first")
            self._used -= len(self._ingests.pop(ref).data)

    @hookimpl
    def containerkit_event(self, namespace: str, topic: str) -> None:
        """Observe every published event (a pluggy hook, see core/hookspecs.py)."""
        if self.config.event_log:
            with self._event_log_lock, open(self.config.event_log, "a") as log:
                log.write(f"{namespace} {topic}\n")


def init(ctx: InitContext) -> MemoryContentStore:
    """Build the store from ``[plugins.content.memory]`` (``ctx.config``) and publish its limit."""
    config: MemoryConfig = ctx.config
    ctx.exports["max_bytes"] = str(config.max_bytes)
    return MemoryContentStore(config)


plugin = Registration(init=init, config=MemoryConfig)
"""What the ``containerkit.content`` entry point ``memory`` names."""
