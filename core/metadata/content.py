"""Content metadata: each namespace's view of the shared content store (containerd's ``metadata/content.go``).

Blobs live once on disk in the backend :class:`~core.content.ContentStore`; a namespace sees a
blob only once it holds a record of it (table ``blobs``), with its own labels and timestamps.
Committing bytes the backend already has is instant: the record is added and no second copy is
written. Deleting a blob removes the namespace's record only; the bytes go when the garbage
collector finds that no namespace records them any more (:class:`ContentKind`).

Ingests are per namespace too: the namespace-local ``ref`` maps to the backend ref
``<namespace>/<ref>`` (namespace names cannot contain ``/``), so equal refs in two namespaces never
collide. Each is recorded in table ``ingests``; callers only ever see the local ref.

Content sharing follows containerd's default ``shared`` policy: a writer opened with an
``expected_digest`` the backend already has (committed by another namespace) starts complete, at
offset == total, and committing it just records the blob for the namespace. With
``shared=False`` ("isolated") a namespace must write every byte itself before it gets the record.

Leases: a writer opened with ``lease`` adds ``("ingests", ref)`` to the lease, and its commit
swaps that for ``("content", digest)``, in the tables of :class:`~core.metadata.leases.LeaseStore`.
An ingest without a lease is a garbage-collection root for ``ingest_expiry`` seconds (24 hours, as
containerd) after the writer was last opened, then it may be collected.

Garbage-collection safety: every mutation that adds a reference (a writer opening, a commit, a
label update) holds :attr:`MetadataStore.gc_lock`; a commit holds it from the backend commit to
the record's insertion, so the collector never sees the new bytes unrecorded. Take the lock, if at
all, before opening a transaction, never inside one (the collector writes while holding it).

Tables (component ``content``): ``blobs`` references ``namespaces(name)`` without cascade (a
namespace holding blobs cannot be deleted: containerd's message names it ``blobs``);
``blob_labels`` goes with its blob; ``ingests`` goes with its namespace.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from core.content import ContentStore, Info, ReaderAt, Status, Writer
from core.crashpoints import crashpoint
from core.digest import Digest
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from core.gc import Resource
from core.labels import merge_label_paths, validate_labels
from core.metadata.images import LABEL_GC_ROOT, label_references
from core.metadata.images import migrate as migrate_images
from core.metadata.leases import LeaseResource, LeaseStore
from core.metadata.namespaces import NamespaceStore
from core.metadata.store import MetadataStore, Migration, from_ns
from core.types import Descriptor

__all__ = ["CONTENT_MIGRATIONS", "DEFAULT_INGEST_EXPIRY", "BlobRecord", "ContentKind", "ContentMetadata", "backend_ref"]

log = logging.getLogger("containerkit.metadata.content")

DEFAULT_INGEST_EXPIRY = 24 * 3600.0
"""Seconds an ingest without a lease stays a GC root after its writer was last opened (containerd: 24h)."""

CONTENT_MIGRATIONS: tuple[Migration, ...] = (
    # 1: the blobs each namespace holds, their labels, and the namespace's ingests.
    """
    CREATE TABLE blobs (
        namespace  TEXT    NOT NULL REFERENCES namespaces(name),
        digest     TEXT    NOT NULL,
        size       INTEGER NOT NULL,
        created_at INTEGER NOT NULL,  -- nanoseconds since the epoch, UTC
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (namespace, digest)
    );
    CREATE INDEX blobs_by_digest ON blobs (digest);
    CREATE TABLE blob_labels (
        namespace TEXT NOT NULL,
        digest    TEXT NOT NULL,
        key       TEXT NOT NULL,
        value     TEXT NOT NULL,
        PRIMARY KEY (namespace, digest, key),
        FOREIGN KEY (namespace, digest) REFERENCES blobs (namespace, digest) ON DELETE CASCADE
    );
    CREATE INDEX blob_labels_by_key ON blob_labels (key);
    CREATE TABLE ingests (
        namespace   TEXT    NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        ref         TEXT    NOT NULL,
        backend_ref TEXT    NOT NULL UNIQUE,
        expected    TEXT,             -- shared: the digest committed without writing (the backend has it)
        lease       TEXT,             -- the lease of the writer that opened it last
        started_at  INTEGER NOT NULL, -- nanoseconds since the epoch, UTC
        expires_at  INTEGER,          -- until then a GC root; NULL when a lease protects it
        PRIMARY KEY (namespace, ref)
    );
    CREATE INDEX ingests_by_expected ON ingests (expected);
    """,
)
"""The schema of component ``content``."""


BlobRecord = tuple[str, int, int, int, dict[str, str]]
"""A blob as :meth:`ContentMetadata.blob_records` lists it: digest, size, created_at and updated_at
(nanoseconds since the epoch), labels."""


def backend_ref(namespace: str, ref: str) -> str:
    """The backend ingest ref of ``ref`` in ``namespace``: ``<namespace>/<ref>``."""
    return f"{namespace}/{ref}"


class ContentMetadata:
    """Per-namespace content over the shared ``backend``, with records in ``store``.

    ``leases`` is the lease store whose tables record a writer's lease (one is created on
    ``store`` when not given). Every method takes the namespace first; reads of an unknown
    namespace find nothing, writes create it. Errors are those of :mod:`core.errors`.
    """

    def __init__(
        self,
        store: MetadataStore,
        backend: ContentStore,
        *,
        leases: LeaseStore | None = None,
        shared: bool = True,
        ingest_expiry: float = DEFAULT_INGEST_EXPIRY,
    ) -> None:
        """Use ``store`` (creating or upgrading the ``content`` tables) over ``backend``."""
        if ingest_expiry < 0:
            raise ValueError(f"ingest_expiry must not be negative, got {ingest_expiry!r}")
        self._store = store
        self._backend = backend
        self._shared = shared
        self._ingest_expiry_ns = int(ingest_expiry * 1e9)
        self._namespaces = NamespaceStore(store)
        # The images table first, so that a namespace in use lists "images, blobs" as containerd does.
        migrate_images(store)
        store.migrate("content", CONTENT_MIGRATIONS)
        self._leases = leases if leases is not None else LeaseStore(store)
        self._refs_lock = threading.Lock()
        self._refs_in_use: set[tuple[str, str]] = set()

    @property
    def store(self) -> MetadataStore:
        """The metadata store holding the records."""
        return self._store

    @property
    def backend(self) -> ContentStore:
        """The shared content store holding the bytes."""
        return self._backend

    @property
    def leases(self) -> LeaseStore:
        """The lease store that writers record their lease in."""
        return self._leases

    # -- blobs ---------------------------------------------------------------------------------

    def info(self, namespace: str, digest: Digest | str) -> Info:
        """The namespace's :class:`Info` of the blob (its labels and times). NotFound unless the namespace holds it."""
        digest = Digest(digest)
        with self._store.read() as conn:
            info = _blob_info(conn, namespace, digest)
        if info is None:
            raise NotFound(f"content digest {digest}: not found")
        return info

    def update(self, namespace: str, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change the namespace's labels of blob ``info.digest``; return the updated Info.

        Field paths as containerd: ``labels`` replaces all, ``labels.<key>`` sets one (removes it
        when ``info.labels`` lacks it or maps it to ``""``), none given means ``labels``. Labels with
        an empty value are not stored. NotFound unless the namespace holds the blob; InvalidArgument
        for another field path or an invalid label.
        """
        digest = info.digest
        now = time.time_ns()
        with self._store.gc_lock, self._store.transaction() as conn:
            current = _blob_info(conn, namespace, digest)
            if current is None:
                raise NotFound(f"content digest {digest}: not found")
            labels = merge_label_paths(current.labels, info.labels, fieldpaths, f'content info "{digest}"')
            labels = {key: value for key, value in validate_labels(labels).items() if value}
            conn.execute(
                "UPDATE blobs SET updated_at = ? WHERE namespace = ? AND digest = ?", (now, namespace, str(digest))
            )
            _write_labels(conn, namespace, digest, labels, replace_all=True)
        return Info(digest, current.size, current.created_at, from_ns(now), labels)

    def walk(self, namespace: str, filters: Sequence[str] = ()) -> Iterator[Info]:
        """The namespace's blobs matching ``filters`` (fields ``digest``, ``size``, ``labels.<key>``), by digest.

        InvalidArgument (raised at once) for a malformed filter.
        """
        return iter(
            [
                Info(digest, size, from_ns(created), from_ns(updated), labels)
                for digest, size, created, updated, labels in self.blob_records(namespace, filters)
            ]
        )

    def blob_records(self, namespace: str, filters: Sequence[str] = ()) -> list[BlobRecord]:
        """What :meth:`walk` yields, as plain ``(digest, size, created_at, updated_at, labels)`` tuples
        with the times in nanoseconds since the epoch (an :class:`Info` keeps microseconds).

        For listings of many blobs, where building an Info per blob (a validated digest, two
        datetimes) would cost more than the rest of the listing. Same filters, order and errors
        as :meth:`walk`; each record has a labels dict of its own. Two queries in one read
        transaction, whatever the number of blobs.
        """
        from core import filters as filter_language

        matches = filter_language.parse(list(filters))
        with self._store.read() as conn:
            rows = conn.execute(
                "SELECT digest, size, created_at, updated_at FROM blobs WHERE namespace = ? ORDER BY digest",
                (namespace,),
            ).fetchall()
            labels: dict[str, dict[str, str]] = {}
            for digest, key, value in conn.execute(
                "SELECT digest, key, value FROM blob_labels WHERE namespace = ? ORDER BY digest, key", (namespace,)
            ):
                if (held := labels.get(digest)) is None:
                    labels[digest] = {key: value}
                else:
                    held[key] = value
        records = [(*row, labels.get(row[0]) or {}) for row in rows]
        if matches is filter_language.match_all:  # no filters: skip building each blob's fields
            return records
        return [record for record in records if matches(_record_fields(record))]

    def delete(self, namespace: str, digest: Digest | str) -> None:
        """Remove the namespace's record of the blob; the bytes stay until garbage collection finds
        that no namespace holds them. NotFound unless the namespace holds it."""
        digest = Digest(digest)
        with self._store.transaction() as conn:
            cursor = conn.execute("DELETE FROM blobs WHERE namespace = ? AND digest = ?", (namespace, str(digest)))
            if cursor.rowcount == 0:
                raise NotFound(f"content digest {digest}: not found")

    def reader_at(self, namespace: str, target: Descriptor | Digest | str) -> ReaderAt:
        """Open the blob for reading. NotFound unless the namespace holds it."""
        digest = target.digest if isinstance(target, Descriptor) else Digest(target)
        with self._store.read() as conn:
            held = _has_blob(conn, namespace, digest)
        if not held:
            raise NotFound(f"content digest {digest}: not found")
        return self._backend.reader_at(digest)

    # -- ingests -------------------------------------------------------------------------------

    def writer(
        self,
        namespace: str,
        ref: str,
        expected_size: int = 0,
        expected_digest: Digest | str | None = None,
        lease: str | None = None,
    ) -> Writer:
        """Open (or resume) the namespace's ingest ``ref``; see :class:`core.content.Writer`.

        InvalidArgument for an empty ref, a negative size or an invalid namespace; Unavailable
        ("ref X locked") while another writer of this store holds ``ref`` in ``namespace``;
        AlreadyExists when the namespace already holds ``expected_digest`` (then the blob is
        added to ``lease``); NotFound when ``lease`` does not exist in the namespace. The writer's
        :attr:`~core.content.Writer.ref` and statuses carry the local ref.
        """
        if not ref:
            raise InvalidArgument("ref must not be empty")
        if isinstance(expected_size, bool) or not isinstance(expected_size, int) or expected_size < 0:
            raise InvalidArgument(f"invalid expected size {expected_size!r} for ref {ref}: must be >= 0")
        expected = Digest(expected_digest) if expected_digest else None
        self._lock_ref(namespace, ref)
        try:
            return self._open_writer(namespace, ref, expected_size, expected, lease)
        except BaseException:
            self._unlock_ref(namespace, ref)
            raise

    def _open_writer(
        self, namespace: str, ref: str, expected_size: int, expected: Digest | None, lease: str | None
    ) -> _NamespacedWriter:
        bref = backend_ref(namespace, ref)
        now = time.time_ns()
        inner: Writer | None = None
        shared_size: int | None = None
        try:
            with self._store.gc_lock, self._store.transaction() as conn:
                if expected is not None and _has_blob(conn, namespace, expected):
                    if lease:
                        self._leases.add_resource(namespace, lease, LeaseResource(str(expected), "content"))
                    exists = True
                else:
                    exists = False
                    self._namespaces.ensure(namespace)
                    if expected is not None and self._shared:
                        try:
                            found = self._backend.info(expected)
                        except NotFound:
                            pass
                        else:
                            if expected_size in (0, found.size):
                                shared_size = found.size
                    row = conn.execute(
                        "SELECT started_at, expires_at FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref)
                    ).fetchone()
                    started, expires = (now, None) if row is None else row
                    if not lease:
                        expires = now + self._ingest_expiry_ns
                    conn.execute(
                        "INSERT INTO ingests (namespace, ref, backend_ref, expected, lease, started_at, expires_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (namespace, ref) DO UPDATE SET"
                        " expected = excluded.expected, lease = excluded.lease, expires_at = excluded.expires_at",
                        (
                            namespace,
                            ref,
                            bref,
                            str(expected) if shared_size is not None else None,
                            lease or None,
                            started,
                            expires,
                        ),
                    )
                    if lease:
                        self._leases.add_resource(namespace, lease, LeaseResource(ref, "ingests"))
                    if shared_size is None:
                        inner = self._backend.writer(bref, expected_size, None)
        except BaseException:
            if inner is not None:
                inner.close()
            raise
        if exists:
            raise AlreadyExists(f"content {expected}: already exists")
        return _NamespacedWriter(self, namespace, ref, bref, inner, expected, shared_size, lease or None)

    def status(self, namespace: str, ref: str) -> Status:
        """The status of the namespace's ingest ``ref`` (with the local ref). NotFound for an unknown ref."""
        with self._store.read() as conn:
            row = conn.execute(
                "SELECT backend_ref, expected, started_at FROM ingests WHERE namespace = ? AND ref = ?",
                (namespace, ref),
            ).fetchone()
        if row is None:
            raise NotFound(f"reference {ref}: not found")
        status = self._status_of(ref, *row)
        if status is None:
            raise NotFound(f"reference {ref}: not found")
        return status

    def list_statuses(self, namespace: str, filters: Sequence[str] = ()) -> list[Status]:
        """The statuses of the namespace's ingests matching ``filters`` (field ``ref``), sorted by ref.

        InvalidArgument for a malformed filter.
        """
        from core import filters as filter_language

        matches = filter_language.parse(list(filters))
        with self._store.read() as conn:
            rows = conn.execute(
                "SELECT ref, backend_ref, expected, started_at FROM ingests WHERE namespace = ? ORDER BY ref",
                (namespace,),
            ).fetchall()
        statuses = []
        for ref, bref, expected, started in rows:
            if not matches({"ref": ref}):
                continue
            status = self._status_of(ref, bref, expected, started)
            if status is not None:
                statuses.append(status)
        return statuses

    def _status_of(self, ref: str, bref: str, expected: str | None, started: int) -> Status | None:
        """The backend's status under the local ref; for a shared ingest not written to, a complete one."""
        try:
            return replace(self._backend.status(bref), ref=ref)
        except NotFound:
            if expected is None:
                return None
        try:
            size = self._backend.info(Digest(expected)).size
        except NotFound:
            return None
        return Status(ref, size, size, Digest(expected), from_ns(started), from_ns(started))

    def abort(self, namespace: str, ref: str) -> None:
        """Discard the namespace's ingest ``ref`` and its data.

        NotFound for an unknown ref; Unavailable while a writer holds it.
        """
        self._lock_ref(namespace, ref)
        try:
            with self._store.transaction() as conn:
                row = conn.execute(
                    "SELECT backend_ref, lease FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref)
                ).fetchone()
                if row is None:
                    raise NotFound(f"reference {ref}: not found")
                bref, lease = row
                conn.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref))
                if lease:
                    _drop_lease_resource(self._leases, namespace, lease, LeaseResource(ref, "ingests"))
                with suppress(NotFound):  # a shared ingest never written to has no data in the backend
                    self._backend.abort(bref)
        finally:
            self._unlock_ref(namespace, ref)

    # -- internals -----------------------------------------------------------------------------

    def _lock_ref(self, namespace: str, ref: str) -> None:
        """Reserve ``ref`` of ``namespace`` for one writer (or an abort); Unavailable when taken."""
        if not self._try_lock_ref(namespace, ref):
            raise Unavailable(f"ref {ref} locked: a writer holds it in namespace {namespace}; retry later")

    def _try_lock_ref(self, namespace: str, ref: str) -> bool:
        with self._refs_lock:
            if (namespace, ref) in self._refs_in_use:
                return False
            self._refs_in_use.add((namespace, ref))
            return True

    def _unlock_ref(self, namespace: str, ref: str) -> None:
        with self._refs_lock:
            self._refs_in_use.discard((namespace, ref))

    def _record_commit(self, writer: _NamespacedWriter, digest: Digest, size: int, labels: dict[str, str]) -> None:
        """Record the committed blob for the writer's namespace, drop its ingest, move its lease hold.

        Called with ``gc_lock`` held. AlreadyExists when the namespace held the blob already (the
        ingest is dropped all the same).
        """
        namespace, ref, lease = writer.namespace, writer.ref, writer.lease
        now = time.time_ns()
        with self._store.transaction() as conn:
            self._namespaces.ensure(namespace)
            exists = _has_blob(conn, namespace, digest)
            if not exists:
                conn.execute(
                    "INSERT INTO blobs (namespace, digest, size, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                    (namespace, str(digest), size, now, now),
                )
                _write_labels(conn, namespace, digest, labels, replace_all=False)
            conn.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (namespace, ref))
            if lease:
                self._leases.delete_resource(namespace, lease, LeaseResource(ref, "ingests"))
                self._leases.add_resource(namespace, lease, LeaseResource(str(digest), "content"))
        if exists:
            raise AlreadyExists(f"content {digest}: already exists")


class _NamespacedWriter(Writer):
    """A writer on a namespace's ingest: the backend writer under the backend ref, or, for a shared
    ingest not written to yet, none at all (the content is complete in the backend)."""

    def __init__(
        self,
        owner: ContentMetadata,
        namespace: str,
        ref: str,
        bref: str,
        inner: Writer | None,
        expected: Digest | None,
        shared_size: int | None,
        lease: str | None,
    ) -> None:
        self._owner = owner
        self.namespace = namespace
        self.lease = lease
        self._ref = ref
        self._bref = bref
        self._inner = inner
        self._expected = expected
        self._shared_size = shared_size or 0
        self._started = datetime.now(UTC)
        self._closed = False
        self._mutex = threading.RLock()

    @property
    def ref(self) -> str:
        return self._ref

    @property
    def offset(self) -> int:
        with self._mutex:
            self._check_open()
            return self._inner.offset if self._inner is not None else self._shared_size

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with self._mutex:
            self._check_open()
            if self._inner is None:
                if not data:
                    return 0
                self._copy_shared(self._shared_size)  # containerd: writing on complete content appends
            assert self._inner is not None
            return self._inner.write(data)

    def digest(self) -> Digest:
        with self._mutex:
            self._check_open()
            if self._inner is None:
                assert self._expected is not None
                return self._expected
            return self._inner.digest()

    def truncate(self, size: int) -> None:
        with self._mutex:
            self._check_open()
            if self._inner is not None:
                self._inner.truncate(size)
                return
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= self._shared_size:
                raise InvalidArgument(f"cannot truncate {self._ref} to {size!r} bytes: it holds {self._shared_size}")
            self._copy_shared(size)

    def status(self) -> Status:
        with self._mutex:
            self._check_open()
            if self._inner is not None:
                return replace(self._inner.status(), ref=self._ref)
            size = self._shared_size
            return Status(self._ref, size, size, self._expected, self._started, self._started)

    def commit(self, size: int = 0, expected: Digest | None = None, labels: Mapping[str, str] | None = None) -> Digest:
        with self._mutex:
            self._check_open()
            try:
                return self._commit(size, Digest(expected) if expected else None, labels)
            finally:
                self._release()

    def _commit(self, size: int, expected: Digest | None, labels: Mapping[str, str] | None) -> Digest:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidArgument(f"invalid commit size {size!r} for {self._ref}: must be >= 0")
        checked = {key: value for key, value in validate_labels(labels or {}).items() if value}
        gc_lock = self._owner.store.gc_lock
        if self._inner is None:
            assert self._expected is not None
            if size and size != self._shared_size:
                raise FailedPrecondition(f'"{self._ref}" failed size validation: {self._shared_size} != {size}')
            if expected is not None and expected != self._expected:
                raise FailedPrecondition(f'"{self._ref}" unexpected digest {self._expected}, expected {expected}')
            with gc_lock:
                self._owner._record_commit(self, self._expected, self._shared_size, checked)
            return self._expected
        inner = self._inner
        offset = inner.offset
        if size and size != offset:
            inner.close()
            raise FailedPrecondition(f'"{self._ref}" failed size validation: {offset} != {size}')
        actual = inner.digest()
        if expected is not None and expected.algorithm == actual.algorithm and expected != actual:
            inner.close()  # the ingest stays, to be resumed or aborted
            raise FailedPrecondition(f"unexpected commit digest {actual}, expected {expected}")  # containerd's words
        if expected is not None:
            actual = expected  # the backend verifies it, in its own algorithm when that differs
        with gc_lock:
            with suppress(AlreadyExists):  # the backend has these bytes already: only a record to add
                actual = inner.commit(offset, expected)
            crashpoint("content.commit.after-rename")
            self._owner._record_commit(self, actual, offset, checked)
        return actual

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            try:
                if self._inner is not None:
                    self._inner.close()
            finally:
                self._release()

    def _release(self) -> None:
        if not self._closed:
            self._closed = True
            if self._inner is not None:
                self._inner.close()  # idempotent; a no-op after the backend commit
            self._owner._unlock_ref(self.namespace, self._ref)

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"writer for {self._ref} is closed")

    def _copy_shared(self, size: int) -> None:
        """Start writing a shared ingest: a backend ingest holding the blob's first ``size`` bytes."""
        assert self._expected is not None
        backend = self._owner.backend
        inner = backend.writer(self._bref, self._shared_size, None)
        try:
            if inner.offset:
                inner.truncate(0)
            if size:
                with backend.reader_at(self._expected) as reader:
                    remaining = size
                    for chunk in reader.chunks():
                        inner.write(chunk[:remaining])
                        remaining -= min(len(chunk), remaining)
                        if not remaining:
                            break
        except BaseException:
            inner.close()
            raise
        self._inner = inner


class ContentKind:
    """The garbage collector's view of content (types ``content`` and ``ingest``).

    Resources: ``("content", ns, digest)`` for each blob a namespace holds, ``("ingest", ns, ref)``
    for each ingest; also backend leftovers that no namespace records at all, under namespace
    ``""``: ``("content", "", digest)`` for a blob and ``("ingest", "", backend_ref)`` for an ingest
    (an interrupted commit or abort). Roots: blobs labelled ``containerd.io/gc.root`` and ingests
    whose expiry (see :class:`ContentMetadata`) has not passed. A blob references what its
    ``containerd.io/gc.ref.*`` labels name; a shared ingest the blob it expects.

    Removing a blob drops its record; its bytes are deleted from the backend once no namespace
    records it and no ingest expects it. Removing an ingest aborts its backend data, unless a
    writer holds it (then it is skipped and logged).
    """

    types: tuple[str, ...] = ("content", "ingest")

    def __init__(self, content: ContentMetadata) -> None:
        self._content = content
        self._store = content.store
        self._backend = content.backend

    def roots(self) -> Iterable[Resource]:
        """Blobs labelled ``containerd.io/gc.root`` and unexpired ingests."""
        now = time.time_ns()
        with self._store.read() as conn:
            blobs = conn.execute(
                "SELECT namespace, digest FROM blob_labels WHERE key = ? ORDER BY namespace, digest", (LABEL_GC_ROOT,)
            ).fetchall()
            ingests = conn.execute(
                "SELECT namespace, ref FROM ingests WHERE expires_at > ? ORDER BY namespace, ref", (now,)
            ).fetchall()
        return [Resource("content", ns, digest) for ns, digest in blobs] + [
            Resource("ingest", ns, ref) for ns, ref in ingests
        ]

    def references(self, resource: Resource) -> Iterable[Resource]:
        """A blob's label references; the blob a shared ingest expects."""
        if not resource.namespace:
            return []
        with self._store.read() as conn:
            if resource.type == "content":
                labels = dict(
                    conn.execute(
                        "SELECT key, value FROM blob_labels WHERE namespace = ? AND digest = ?",
                        (resource.namespace, resource.id),
                    ).fetchall()
                )
                return label_references(resource.namespace, labels)
            if resource.type == "ingest":
                row = conn.execute(
                    "SELECT expected FROM ingests WHERE namespace = ? AND ref = ?", (resource.namespace, resource.id)
                ).fetchone()
                if row is not None and row[0]:
                    return [Resource("content", resource.namespace, row[0])]
        return []

    def all(self) -> Iterable[Resource]:
        """Every blob record and ingest of every namespace, and the backend's unrecorded blobs and ingests."""
        with self._store.read() as conn:
            blobs = conn.execute("SELECT namespace, digest FROM blobs ORDER BY namespace, digest").fetchall()
            ingests = conn.execute("SELECT namespace, ref, backend_ref FROM ingests ORDER BY namespace, ref").fetchall()
            expected = {row[0] for row in conn.execute("SELECT expected FROM ingests WHERE expected IS NOT NULL")}
        recorded = {digest for _, digest in blobs} | expected
        brefs = {bref for _, _, bref in ingests}
        out = [Resource("content", ns, digest) for ns, digest in blobs]
        out += [Resource("ingest", ns, ref) for ns, ref, _ in ingests]
        out += sorted(Resource("content", "", str(i.digest)) for i in self._backend.walk() if i.digest not in recorded)
        out += sorted(Resource("ingest", "", st.ref) for st in self._backend.list_statuses() if st.ref not in brefs)
        return out

    def remove(self, resources: Sequence[Resource]) -> list[Resource]:
        """Delete the given blobs and ingests (see the class doc); return those removed."""
        removed: list[Resource] = []
        unreferenced: dict[str, Resource | None] = {}  # digest -> the leftover resource naming it, if any
        with self._store.gc_lock:
            for resource in resources:
                if resource.type == "ingest":
                    expected = self._remove_ingest(resource, removed)
                    if expected:
                        unreferenced.setdefault(expected, None)
                elif resource.type == "content":
                    if resource.namespace:
                        self._remove_record(resource, removed)
                        unreferenced.setdefault(resource.id, None)
                    else:
                        unreferenced[resource.id] = resource
            for digest, leftover in unreferenced.items():
                try:
                    if self._delete_backend_blob(digest) and leftover is not None:
                        removed.append(leftover)
                except Exception:
                    log.exception("gc: deleting blob %s from the content store failed", digest)
        return removed

    def _remove_record(self, resource: Resource, removed: list[Resource]) -> None:
        if self._store.delete_each("blobs", "digest", [(resource.namespace, resource.id)]):
            removed.append(resource)

    def _remove_ingest(self, resource: Resource, removed: list[Resource]) -> str | None:
        """Abort the ingest; return the digest it expected (whose bytes may now be unreferenced)."""
        if not resource.namespace:
            try:
                self._backend.abort(resource.id)
                removed.append(resource)
            except NotFound:
                removed.append(resource)
            except Exception:
                log.exception("gc: aborting ingest %s in the content store failed", resource.id)
            return None
        if not self._content._try_lock_ref(resource.namespace, resource.id):
            log.info("gc: ingest %s of namespace %s is being written; kept", resource.id, resource.namespace)
            return None
        try:
            with self._store.transaction() as conn:
                row = conn.execute(
                    "SELECT backend_ref, expected FROM ingests WHERE namespace = ? AND ref = ?",
                    (resource.namespace, resource.id),
                ).fetchone()
                if row is None:
                    return None
                bref, expected = row
                conn.execute("DELETE FROM ingests WHERE namespace = ? AND ref = ?", (resource.namespace, resource.id))
                with suppress(NotFound):
                    self._backend.abort(bref)
            removed.append(resource)
            return expected
        except Exception:
            log.exception("gc: removing ingest %s of namespace %s failed", resource.id, resource.namespace)
            return None
        finally:
            self._content._unlock_ref(resource.namespace, resource.id)

    def _delete_backend_blob(self, digest: str) -> bool:
        """Delete the blob from the backend unless a namespace records it or an ingest expects it.

        Returns whether it is gone from the backend (deleted now, or already absent).
        """
        with self._store.read() as conn:
            if (
                conn.execute(
                    "SELECT 1 FROM blobs WHERE digest = ? UNION ALL SELECT 1 FROM ingests WHERE expected = ? LIMIT 1",
                    (digest, digest),
                ).fetchone()
                is not None
            ):
                return False
        with suppress(NotFound):
            self._backend.delete(Digest(digest))
        return True


def _has_blob(conn: sqlite3.Connection, namespace: str, digest: Digest) -> bool:
    row = conn.execute("SELECT 1 FROM blobs WHERE namespace = ? AND digest = ?", (namespace, str(digest))).fetchone()
    return row is not None


def _blob_info(conn: sqlite3.Connection, namespace: str, digest: Digest) -> Info | None:
    # One statement for the record and its labels (a row per label; one row of NULL labels without any).
    rows = conn.execute(
        "SELECT b.size, b.created_at, b.updated_at, l.key, l.value FROM blobs b"
        " LEFT JOIN blob_labels l ON l.namespace = b.namespace AND l.digest = b.digest"
        " WHERE b.namespace = ? AND b.digest = ? ORDER BY l.key",
        (namespace, str(digest)),
    ).fetchall()
    if not rows:
        return None
    size, created, updated, key, _ = rows[0]
    labels = {row[3]: row[4] for row in rows} if key is not None else {}
    return Info(digest, size, from_ns(created), from_ns(updated), labels)


def _write_labels(
    conn: sqlite3.Connection, namespace: str, digest: Digest, labels: Mapping[str, str], *, replace_all: bool
) -> None:
    if replace_all:
        conn.execute("DELETE FROM blob_labels WHERE namespace = ? AND digest = ?", (namespace, str(digest)))
    conn.executemany(
        "INSERT INTO blob_labels (namespace, digest, key, value) VALUES (?, ?, ?, ?)",
        [(namespace, str(digest), key, value) for key, value in labels.items()],
    )


def _drop_lease_resource(leases: LeaseStore, namespace: str, lease: str, resource: LeaseResource) -> None:
    """Release ``resource`` from ``lease`` if the lease still exists."""
    with suppress(NotFound):
        leases.delete_resource(namespace, lease, resource)


def _record_fields(record: BlobRecord) -> dict[str, Any]:
    """What filters see of a blob (containerd's content.AdaptInfo, plus ``size``)."""
    digest, size, _, _, labels = record
    return {"digest": digest, "size": str(size), "labels": labels}
