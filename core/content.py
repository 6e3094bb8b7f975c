"""The ``content`` plugin type: a content-addressed blob store (containerd's ``content.Store``).

Blobs are immutable and addressed by :class:`~core.digest.Digest`. They enter the store through an
*ingest*: a :class:`Writer` opened under a caller-chosen ``ref`` that survives ``close()`` (and a
daemon restart) until it is committed or aborted, so interrupted downloads resume.

Contract for every implementation:

- The store is namespace-unaware. Blobs are shared on disk; the metadata layer records which
  namespace references which blob, hides the others, makes ``ref`` unique per namespace and
  drives garbage collection. A store used as a library has no namespaces at all.
- Methods may be called concurrently from several threads.
- ``filters`` are containerd filter expressions (``labels."k"==v``, ``digest~=re``...); a blob or
  ingest is returned when it matches any of them, everything when none is given. Fields: ``digest``,
  ``size``, ``labels.<key>`` for blobs; ``ref`` for ingests. InvalidArgument for a malformed filter.
- Errors come from :mod:`core.errors`; ``OSError`` escapes only for genuine I/O faults.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Self

from core.digest import Digest
from core.errors import AlreadyExists, FailedPrecondition
from core.types import EPOCH, Descriptor

__all__ = ["ContentStore", "Info", "ReaderAt", "Status", "Writer"]


@dataclass(frozen=True)
class Info:
    """A committed blob. In a value passed to :meth:`ContentStore.update` only ``digest`` and ``labels`` count."""

    digest: Digest
    size: int = 0
    created_at: datetime = EPOCH
    updated_at: datetime = EPOCH
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", Digest(self.digest))
        object.__setattr__(self, "labels", dict(self.labels))


@dataclass(frozen=True)
class Status:
    """An ingest in progress: ``offset`` bytes written of ``total`` (0 when unknown) toward ``expected``."""

    ref: str
    offset: int = 0
    total: int = 0
    expected: Digest | None = None
    started_at: datetime = EPOCH
    updated_at: datetime = EPOCH


class _ClosesOnExit(ABC):
    """Usable in a ``with`` block, which calls :meth:`close` on the way out."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ReaderAt(_ClosesOnExit):
    """Random access to one committed blob. Close it (or use ``with``) to release the file."""

    @property
    @abstractmethod
    def size(self) -> int:
        """The blob's size in bytes."""

    @abstractmethod
    def read(self, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes from ``offset``; fewer only at the end of the blob, ``b""`` at or past it.

        InvalidArgument for a negative ``offset`` or ``size``; FailedPrecondition after :meth:`close`.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the reader. Idempotent."""

    def chunks(self, offset: int = 0, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The blob from ``offset`` to its end, in pieces of at most ``chunk_size`` bytes."""
        while chunk := self.read(offset, chunk_size):
            yield chunk
            offset += len(chunk)


class Writer(_ClosesOnExit):
    """Appends to the ingest ``ref`` while holding its lock; at most one open writer per ref.

    ``close()`` (or leaving a ``with`` block) releases the lock and keeps the data for resumption.
    After :meth:`commit` or :meth:`close`, every method but :meth:`close` raises FailedPrecondition.
    """

    @property
    @abstractmethod
    def ref(self) -> str:
        """The ingest's ref."""

    @property
    @abstractmethod
    def offset(self) -> int:
        """Bytes in the ingest so far; where the next :meth:`write` lands (non-zero on resumption)."""

    @abstractmethod
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; return the number of bytes written (all of it)."""

    @abstractmethod
    def digest(self) -> Digest:
        """The digest of the bytes ``[0, offset)`` written so far."""

    @abstractmethod
    def commit(self, size: int = 0, expected: Digest | None = None, labels: Mapping[str, str] | None = None) -> Digest:
        """Turn the ingest into a blob with ``labels``; return its digest. Always releases the writer.

        ``size`` 0 and ``expected`` None mean "not checked". FailedPrecondition when the data's size
        or digest differs from them; the ingest is then kept, to be resumed (see :meth:`truncate`)
        or aborted. AlreadyExists when the blob is already in the store; the ingest is then removed
        (the content is there). InvalidArgument for invalid labels.
        """

    @abstractmethod
    def truncate(self, size: int) -> None:
        """Cut the ingest to ``size`` bytes and rehash. ``0`` (restart) must be supported; other
        sizes may raise NotImplementedByPlugin. InvalidArgument when ``size`` > :attr:`offset`."""

    @abstractmethod
    def status(self) -> Status:
        """The ingest's current :class:`Status`."""

    @abstractmethod
    def close(self) -> None:
        """Release the ref's lock and keep the ingest for resumption. Idempotent; no-op after commit."""


class ContentStore(ABC):
    """A content store plugin (wire type ``io.containerd.content.v1``)."""

    reads_locally: bool = False
    """Whether reading a blob never waits on anything but a local disk (no network, no other process): the
    daemon then serves ``Content.Read`` on its gRPC I/O thread (:meth:`~core.grpcwire.server.Server.answer_inline`)
    instead of a worker. Leave False unless that holds."""

    # -- blobs ---------------------------------------------------------------------------------

    @abstractmethod
    def info(self, digest: Digest) -> Info:
        """The blob's :class:`Info`. NotFound when it is not in the store."""

    @abstractmethod
    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change the labels of blob ``info.digest``; return the updated Info.

        Only labels are mutable. Field paths: ``labels`` replaces all labels, ``labels.<key>`` sets
        one (removes it when ``info.labels`` lacks the key or maps it to ``""``); none given means
        ``labels``. NotFound for an unknown blob; InvalidArgument for any other field path or an
        invalid label.
        """

    @abstractmethod
    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        """Every committed blob matching ``filters`` (see module doc), in no particular order."""

    @abstractmethod
    def delete(self, digest: Digest) -> None:
        """Remove the blob; open readers may finish. NotFound when it is not in the store."""

    @abstractmethod
    def reader_at(self, target: Descriptor | Digest) -> ReaderAt:
        """Open a blob for reading; only the digest of a descriptor is used. NotFound when absent."""

    # -- ingests -------------------------------------------------------------------------------

    @abstractmethod
    def writer(self, ref: str, expected_size: int = 0, expected_digest: Digest | None = None) -> Writer:
        """Open (or resume) the ingest ``ref`` and lock it.

        A new ref starts empty; an existing one resumes at its recorded :attr:`Writer.offset`.
        ``expected_*`` are recorded in the :class:`Status` (0/None: unknown). InvalidArgument for an
        empty ref or a negative size; Unavailable when another writer holds the ref (retry later);
        AlreadyExists when ``expected_digest`` is already committed (nothing to write);
        FailedPrecondition when ``expected_size`` contradicts the total recorded for the ref.
        """

    @abstractmethod
    def status(self, ref: str) -> Status:
        """The ingest's :class:`Status`, whether or not a writer holds it. NotFound for an unknown ref."""

    @abstractmethod
    def list_statuses(self, filters: Sequence[str] = ()) -> list[Status]:
        """The statuses of every ingest matching ``filters`` (field ``ref``)."""

    @abstractmethod
    def abort(self, ref: str) -> None:
        """Discard the ingest and its data. NotFound for an unknown ref; Unavailable while a writer holds it."""

    # -- helpers and life cycle ----------------------------------------------------------------

    def read_blob(self, target: Descriptor | Digest) -> bytes:
        """The whole blob, for small ones (manifests, configs). NotFound when absent."""
        with self.reader_at(target) as reader:
            return reader.read(0, reader.size)

    def write_blob(
        self,
        ref: str,
        data: bytes,
        expected: Digest | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Digest:
        """Store ``data`` in one go through ingest ``ref``; return its digest.

        A blob that already exists counts as success (its labels are left as they are).
        FailedPrecondition when ``expected`` does not match ``data`` (nothing is written); other
        errors are those of :meth:`writer` and :meth:`Writer.commit`.
        """
        actual = Digest.from_bytes(data, expected.algorithm if expected else "sha256")
        if expected is not None and actual != expected:
            raise FailedPrecondition(f"content for {ref!r} has digest {actual}, expected {expected}")
        try:
            writer = self.writer(ref, len(data), expected)
        except AlreadyExists:
            return actual
        with writer:
            if writer.offset:
                writer.truncate(0)
            writer.write(data)
            try:
                return writer.commit(len(data), expected, labels)
            except AlreadyExists:
                return actual

    def close(self) -> None:  # noqa: B027 - optional, a no-op by default
        """Release the store's resources at daemon shutdown; ingests persist. Default: nothing."""
