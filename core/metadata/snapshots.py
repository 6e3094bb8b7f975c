"""Snapshot metadata: each namespace's snapshots over namespace-unaware snapshotters (containerd's metadata).

Snapshotters (:class:`core.snapshot.Snapshotter`) see opaque keys. Every snapshot a namespace
creates is a record (table ``snapshots``) holding its local key, kind, parent, labels and times, and
maps to the backend key ``<namespace>/<id>/<key>``, where ``id`` is the record's never-reused row
id: two namespaces (or a key removed and created again before garbage collection) never collide in
the backend. Committing allocates a new record, hence a new backend key, for the committed name.

Labels are the namespace's. The backend receives only the *inherited* ones
(``containerd.io/snapshot/*``, ``containerd.io/snapshot.ref``, and ``containerkit.io/snapshot/*``
such as :data:`core.snapshot.LABEL_REBASE`), as containerd passes them.

Crash safety: every mutation that creates backend state runs the backend call last, inside the
metadata transaction and under :attr:`MetadataStore.gc_lock`: a failing backend call leaves no
record, and a crash between the backend call and the commit of the transaction leaves only a
backend snapshot without record, which garbage collection removes (:class:`SnapshotKind`).

Removing a snapshot drops its record only (refused while another snapshot of the namespace has it
as parent); the backend snapshot goes at the next garbage collection, leaf first, followed by the
snapshotter's ``cleanup()``, as in containerd.

Tables (component ``snapshots``): ``snapshots`` references ``namespaces(name)`` without cascade (a
namespace holding snapshots cannot be deleted: the message names ``snapshots``);
``snapshot_labels`` goes with its snapshot.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from typing import Any, NamedTuple

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.gc import Resource
from core.labels import merge_label_paths, validate_labels
from core.metadata.images import LABEL_GC_ROOT, label_references
from core.metadata.leases import LeaseResource, LeaseStore
from core.metadata.namespaces import NamespaceStore
from core.metadata.store import MetadataStore, Migration, from_ns
from core.snapshot import Info, Kind, Snapshotter, Usage
from core.types import Mount

__all__ = [
    "LABEL_SNAPSHOT_REF",
    "SNAPSHOT_MIGRATIONS",
    "SnapshotKind",
    "SnapshotMetadata",
    "backend_key",
    "inherited_labels",
]

log = logging.getLogger("containerkit.metadata.snapshots")

LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"
"""Label naming the committed snapshot a prepare is meant to become: the prepare is AlreadyExists
when the namespace has that snapshot (how clients skip layers that are unpacked already)."""

_INHERITED_PREFIXES = ("containerd.io/snapshot/", "containerkit.io/snapshot/")
_GC_REF_PREFIX = "containerd.io/gc.ref."

SNAPSHOT_MIGRATIONS: tuple[Migration, ...] = (
    # 1: every namespace's snapshots (protecting their namespace) and their labels.
    """
    CREATE TABLE snapshots (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: part of the backend key
        namespace   TEXT    NOT NULL REFERENCES namespaces(name),
        snapshotter TEXT    NOT NULL,
        key         TEXT    NOT NULL,
        kind        INTEGER NOT NULL,  -- core.snapshot.Kind
        parent_id   INTEGER REFERENCES snapshots (id),  -- same namespace and snapshotter; NULL: none
        created_at  INTEGER NOT NULL,  -- nanoseconds since the epoch, UTC
        updated_at  INTEGER NOT NULL,
        UNIQUE (namespace, snapshotter, key)
    );
    CREATE INDEX snapshots_by_snapshotter ON snapshots (snapshotter);
    CREATE INDEX snapshots_by_parent ON snapshots (parent_id);
    CREATE TABLE snapshot_labels (
        snapshot INTEGER NOT NULL REFERENCES snapshots (id) ON DELETE CASCADE,
        key      TEXT    NOT NULL,
        value    TEXT    NOT NULL,
        PRIMARY KEY (snapshot, key)
    );
    CREATE INDEX snapshot_labels_by_key ON snapshot_labels (key);
    """,
)
"""The schema of component ``snapshots``."""


def backend_key(namespace: str, record_id: int, key: str) -> str:
    """The backend key of the snapshot ``key`` of ``namespace`` whose record has ``record_id``."""
    return f"{namespace}/{record_id}/{key}"


def inherited_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels the backend snapshotter receives: ``containerd.io/snapshot/*``,
    ``containerd.io/snapshot.ref`` and ``containerkit.io/snapshot/*``."""
    return {k: v for k, v in labels.items() if k == LABEL_SNAPSHOT_REF or k.startswith(_INHERITED_PREFIXES)}


class _Record(NamedTuple):
    id: int
    key: str
    kind: Kind
    parent_id: int | None
    parent: str
    created_at: int
    updated_at: int


class SnapshotMetadata:
    """Per-namespace snapshots over the backend ``snapshotters`` (by name), with records in ``store``.

    ``leases`` is the lease store that leased mutations record their snapshots in (one is created
    on ``store`` when not given). Every method takes the namespace and the snapshotter's name first
    and mirrors :class:`core.snapshot.Snapshotter`, local keys in and out. Reads of an unknown
    namespace find nothing; creations create it. Errors are those of :mod:`core.errors`, worded as
    containerd's (``ctr`` prints them; like containerd's, a few name the backend key);
    InvalidArgument (``snapshotter not loaded: X``) for an unknown snapshotter.
    """

    def __init__(
        self, store: MetadataStore, snapshotters: Mapping[str, Snapshotter], *, leases: LeaseStore | None = None
    ) -> None:
        """Use ``store`` (creating or upgrading the ``snapshots`` tables) over ``snapshotters``."""
        self._store = store
        self._snapshotters = dict(snapshotters)
        self._namespaces = NamespaceStore(store)
        store.migrate("snapshots", SNAPSHOT_MIGRATIONS)
        self._leases = leases if leases is not None else LeaseStore(store)

    @property
    def store(self) -> MetadataStore:
        """The metadata store holding the records."""
        return self._store

    @property
    def snapshotters(self) -> Mapping[str, Snapshotter]:
        """The backend snapshotters, by name."""
        return self._snapshotters

    def backend(self, snapshotter: str) -> Snapshotter:
        """The backend named ``snapshotter``; InvalidArgument when the name is empty or not loaded."""
        if not snapshotter:
            raise InvalidArgument("snapshotter argument missing: invalid argument")
        backend = self._snapshotters.get(snapshotter)
        if backend is None:
            raise InvalidArgument(f"snapshotter not loaded: {snapshotter}: invalid argument")
        return backend

    # -- reads ---------------------------------------------------------------------------------

    def stat(self, namespace: str, snapshotter: str, key: str) -> Info:
        """The snapshot ``key`` as the namespace sees it. NotFound when absent."""
        self.backend(snapshotter)
        with self._store.read() as conn:
            record = _existing(conn, namespace, snapshotter, key)
            return _info(record, _labels(conn, record.id))

    def walk(self, namespace: str, snapshotter: str, filters: Sequence[str] = ()) -> Iterator[Info]:
        """The namespace's snapshots matching any of ``filters`` (fields ``name``, ``parent``, ``kind``,
        ``labels.<key>``), sorted by key. InvalidArgument (raised at once) for a malformed filter."""
        from core import filters as filter_language

        self.backend(snapshotter)
        matches = filter_language.parse(list(filters))
        with self._store.read() as conn:
            rows = conn.execute(
                f"{_SELECT} WHERE s.namespace = ? AND s.snapshotter = ? ORDER BY s.key", (namespace, snapshotter)
            ).fetchall()
            labels: dict[int, dict[str, str]] = {}
            for record_id, key, value in conn.execute(
                "SELECT l.snapshot, l.key, l.value FROM snapshot_labels l JOIN snapshots s ON s.id = l.snapshot"
                " WHERE s.namespace = ? AND s.snapshotter = ?",
                (namespace, snapshotter),
            ):
                labels.setdefault(record_id, {})[key] = value
        infos = [_info(record, labels.get(record.id, {})) for record in map(_record, rows)]
        return iter([info for info in infos if matches(_fields(info))])

    def usage(self, namespace: str, snapshotter: str, key: str) -> Usage:
        """The backend's usage of the snapshot. NotFound when absent."""
        backend = self.backend(snapshotter)
        with self._store.read() as conn:
            record = _existing(conn, namespace, snapshotter, key)
        return backend.usage(backend_key(namespace, record.id, key))

    def mounts(self, namespace: str, snapshotter: str, key: str) -> list[Mount]:
        """The mounts of an active snapshot or view. NotFound when absent; FailedPrecondition when committed."""
        backend = self.backend(snapshotter)
        with self._store.read() as conn:
            record = _existing(conn, namespace, snapshotter, key)
        bkey = backend_key(namespace, record.id, key)
        if record.kind is Kind.COMMITTED:
            raise FailedPrecondition(
                f"failed to get active mount: requested snapshot {bkey} not active or view: failed precondition"
            )
        return backend.mounts(bkey)

    # -- mutations -----------------------------------------------------------------------------

    def prepare(
        self,
        namespace: str,
        snapshotter: str,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> list[Mount]:
        """Create the active snapshot ``key`` on committed ``parent`` (``""``: none); return its mounts.

        ``lease`` (an existing lease of the namespace) then holds the snapshot. AlreadyExists when
        ``key`` is taken or the namespace has the snapshot that label ``containerd.io/snapshot.ref``
        names; NotFound for a missing parent or lease; InvalidArgument for an empty key, a parent
        that is not committed or an invalid label or namespace.
        """
        return self._create(Kind.ACTIVE, namespace, snapshotter, key, parent, labels, lease)

    def view(
        self,
        namespace: str,
        snapshotter: str,
        key: str,
        parent: str = "",
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> list[Mount]:
        """Create the read-only view ``key`` of committed ``parent``; as :meth:`prepare` otherwise."""
        return self._create(Kind.VIEW, namespace, snapshotter, key, parent, labels, lease)

    def commit(
        self,
        namespace: str,
        snapshotter: str,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> None:
        """Commit active snapshot ``key`` as ``name`` (same parent, carrying ``labels``); ``key`` is gone then.

        ``lease`` then holds ``name`` instead of ``key``. AlreadyExists when ``name`` is taken;
        NotFound for a missing ``key`` or lease; FailedPrecondition when ``key`` is not active;
        InvalidArgument for an empty name or key or an invalid label.
        """
        self._commit(namespace, snapshotter, name, key, None, labels, lease)

    def rebase(
        self,
        namespace: str,
        snapshotter: str,
        name: str,
        key: str,
        parent: str,
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> None:
        """Commit active snapshot ``key``, prepared without parent (with :data:`core.snapshot.LABEL_REBASE`),
        as ``name`` on committed ``parent`` (see :meth:`core.snapshot.Snapshotter.rebase`).

        Errors as :meth:`commit`, plus NotFound for a missing parent and InvalidArgument when ``key``
        has a parent or ``parent`` is not committed; NotImplementedByPlugin when the backend cannot rebase.
        """
        self._commit(namespace, snapshotter, name, key, parent, labels, lease)

    def update(self, namespace: str, snapshotter: str, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change the labels of snapshot ``info.name``; return it as stored.

        Field paths as containerd: ``labels`` replaces all, ``labels.<key>`` sets one (removed when
        ``info.labels`` lacks it or maps it to ``""``); none given means ``labels``. NotFound for an
        unknown snapshot; InvalidArgument for an empty name, another field path or an invalid label.
        """
        backend = self.backend(snapshotter)
        name = info.name
        if not name:
            raise InvalidArgument("snapshot name is required for update: invalid argument")
        now = time.time_ns()
        with self._store.gc_lock, self._store.transaction() as conn:
            record = _existing(conn, namespace, snapshotter, name)
            current = _labels(conn, record.id)
            subject = f'snapshot "{name}": invalid argument'  # containerd's message carries the code's text
            labels = _checked(merge_label_paths(current, info.labels, fieldpaths, subject))
            conn.execute("UPDATE snapshots SET updated_at = ? WHERE id = ?", (now, record.id))
            _write_labels(conn, record.id, labels, replace=True)
            if inherited_labels(labels) != inherited_labels(current):
                bkey = backend_key(namespace, record.id, name)
                backend.update(Info(record.kind, bkey, labels=inherited_labels(labels)), ("labels",))
        return _info(record._replace(updated_at=now), labels)

    def remove(self, namespace: str, snapshotter: str, key: str, lease: str | None = None) -> None:
        """Drop the namespace's snapshot ``key`` (and ``lease``'s hold on it, if it has one); garbage
        collection removes the backend snapshot. NotFound when absent; FailedPrecondition while
        another snapshot has it as parent."""
        self.backend(snapshotter)
        with self._store.transaction() as conn:
            record = _existing(conn, namespace, snapshotter, key)
            if conn.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (record.id,)).fetchone():
                raise FailedPrecondition("cannot remove snapshot with child: failed precondition")
            conn.execute("DELETE FROM snapshots WHERE id = ?", (record.id,))
            if lease:
                with suppress(NotFound):
                    self._leases.delete_resource(namespace, lease, _lease_resource(snapshotter, key))

    def cleanup(self, snapshotter: str) -> None:
        """Let the backend reclaim space left by removed snapshots (see :meth:`Snapshotter.cleanup`)."""
        backend = self.backend(snapshotter)
        with self._store.gc_lock:
            backend.cleanup()

    # -- internals -----------------------------------------------------------------------------

    def _create(
        self,
        kind: Kind,
        namespace: str,
        snapshotter: str,
        key: str,
        parent: str,
        labels: Mapping[str, str] | None,
        lease: str | None,
    ) -> list[Mount]:
        backend = self.backend(snapshotter)
        if not key:
            raise InvalidArgument("snapshot key must not be empty: invalid argument")
        checked = _checked(labels or {})
        target = checked.get(LABEL_SNAPSHOT_REF)
        now = time.time_ns()
        created = ""
        try:
            with self._store.gc_lock, self._store.transaction() as conn:
                self._namespaces.ensure(namespace)
                if target and _find(conn, namespace, snapshotter, target) is not None:
                    raise AlreadyExists(f'target snapshot "{target}": already exists')
                if _find(conn, namespace, snapshotter, key) is not None:
                    raise AlreadyExists(f'snapshot "{key}": already exists')
                parent_record = _committed_parent(conn, namespace, snapshotter, parent)
                parent_id = parent_record.id if parent_record else None
                record_id = _insert(conn, namespace, snapshotter, key, kind, parent_id, now, checked)
                if lease:
                    self._leases.add_resource(namespace, lease, _lease_resource(snapshotter, key))
                bkey = backend_key(namespace, record_id, key)
                bparent = backend_key(namespace, parent_id, parent) if parent_id else ""
                create = backend.view if kind is Kind.VIEW else backend.prepare
                mounts = create(bkey, bparent, inherited_labels(checked))
                created = bkey
        except BaseException:
            if created:  # the transaction failed to commit after the backend created it: undo that
                _remove_quietly(backend, snapshotter, created)
            raise
        return mounts

    def _commit(
        self,
        namespace: str,
        snapshotter: str,
        name: str,
        key: str,
        rebase_onto: str | None,
        labels: Mapping[str, str] | None,
        lease: str | None,
    ) -> None:
        """Commit (``rebase_onto`` None) or rebase (onto ``rebase_onto``, ``""``: none) ``key`` as ``name``."""
        backend = self.backend(snapshotter)
        if not name or not key:
            raise InvalidArgument("snapshot name and key must not be empty: invalid argument")
        checked = _checked(labels or {})
        now = time.time_ns()
        with self._store.gc_lock, self._store.transaction() as conn:
            if _find(conn, namespace, snapshotter, name) is not None:
                raise AlreadyExists(f'snapshot "{name}": already exists')
            active = _existing(conn, namespace, snapshotter, key)
            bkey = backend_key(namespace, active.id, key)
            if active.kind is not Kind.ACTIVE:
                raise FailedPrecondition(
                    f'failed to commit snapshot: snapshot "{bkey}" is not active: failed precondition'
                )
            parent_id = active.parent_id
            if rebase_onto is not None:
                if active.parent:
                    raise InvalidArgument(f'snapshot "{key}" has a parent, only a parentless one can be rebased')
                parent_record = _committed_parent(conn, namespace, snapshotter, rebase_onto)
                parent_id = parent_record.id if parent_record else None
            record_id = _insert(conn, namespace, snapshotter, name, Kind.COMMITTED, parent_id, now, checked)
            conn.execute("DELETE FROM snapshots WHERE id = ?", (active.id,))
            if lease:
                self._leases.add_resource(namespace, lease, _lease_resource(snapshotter, name))
                self._leases.delete_resource(namespace, lease, _lease_resource(snapshotter, key))
            bname = backend_key(namespace, record_id, name)
            inherited = inherited_labels(checked)
            if rebase_onto is None:
                backend.commit(bname, bkey, inherited)
            else:
                bparent = backend_key(namespace, parent_id, rebase_onto) if parent_id else ""
                backend.rebase(bname, bkey, bparent, inherited)


class SnapshotKind:
    """The garbage collector's view of the snapshots of one snapshotter (type ``snapshot/<snapshotter>``).

    Resources: ``("snapshot/<sn>", ns, key)`` for each record, and ``("snapshot/<sn>", "", backend
    key)`` for each backend snapshot no record maps to (removed, or left by a crash). Roots:
    records labelled ``containerd.io/gc.root``. A record references its parent and what its
    ``containerd.io/gc.ref.*`` labels name. Removal drops the records (children first, in one
    transaction) under the collector's lock; once it is released (:meth:`finish_removal`) the
    unrecorded backend snapshots among them are removed, leaves first, and the backend's ``cleanup()``
    runs. That is safe outside the lock: a record id is never reused, so no new record can come to map
    to a backend key doomed here.
    """

    def __init__(self, snapshots: SnapshotMetadata, snapshotter: str) -> None:
        self._store = snapshots.store
        self._snapshotter = snapshotter
        self._backend = snapshots.backend(snapshotter)
        self.types: tuple[str, ...] = (f"snapshot/{snapshotter}",)
        self._edges: dict[Resource, list[Resource]] = {}
        self._doomed: dict[str, Resource | None] = {}  # for finish_removal: backend key -> its orphan resource

    def roots(self) -> Iterable[Resource]:
        """Records labelled ``containerd.io/gc.root`` (loads every record's edges for :meth:`references`)."""
        with self._store.read() as conn:
            rows = conn.execute(
                "SELECT s.id, s.namespace, s.key, p.key FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
                " WHERE s.snapshotter = ?",
                (self._snapshotter,),
            ).fetchall()
            labels: dict[int, dict[str, str]] = {}
            for record_id, key, value in conn.execute(
                "SELECT l.snapshot, l.key, l.value FROM snapshot_labels l JOIN snapshots s ON s.id = l.snapshot"
                " WHERE s.snapshotter = ? AND (l.key = ? OR (l.key >= ? AND l.key < ?))",
                (self._snapshotter, LABEL_GC_ROOT, _GC_REF_PREFIX, _GC_REF_PREFIX[:-1] + "/"),
            ):
                labels.setdefault(record_id, {})[key] = value
        (type_,) = self.types
        roots, self._edges = [], {}
        for record_id, namespace, key, parent in rows:
            resource = Resource(type_, namespace, key)
            held = labels.get(record_id, {})
            edges = [Resource(type_, namespace, parent)] if parent else []
            self._edges[resource] = edges + label_references(namespace, held)
            if LABEL_GC_ROOT in held:
                roots.append(resource)
        return sorted(roots)

    def references(self, resource: Resource) -> Iterable[Resource]:
        """The record's parent and label references, as :meth:`roots` loaded them."""
        return self._edges.get(resource, [])

    def all(self) -> Iterable[Resource]:
        """Every record of this snapshotter, and every backend snapshot without record."""
        (type_,) = self.types
        with self._store.read() as conn:
            rows = conn.execute(
                "SELECT id, namespace, key FROM snapshots WHERE snapshotter = ?", (self._snapshotter,)
            ).fetchall()
        recorded = {backend_key(namespace, record_id, key) for record_id, namespace, key in rows}
        orphans = [Resource(type_, "", info.name) for info in self._backend.walk() if info.name not in recorded]
        return sorted([Resource(type_, namespace, key) for _, namespace, key in rows] + orphans)

    def remove(self, resources: Sequence[Resource]) -> list[Resource]:
        """Drop the given records and doom the given backend snapshots, removed by :meth:`finish_removal`
        (see the class doc); return the records dropped. A failure is logged and skipped."""
        removed: list[Resource] = []
        for resource in resources:
            if not resource.namespace:
                self._doomed[resource.id] = resource
        for resource, bkey in self._remove_records([r for r in resources if r.namespace]):
            removed.append(resource)
            self._doomed[bkey] = None
        return removed

    def finish_removal(self) -> list[Resource]:
        """Remove the backend snapshots :meth:`remove` doomed (the collector's lock released); return the
        orphan resources among them that are gone."""
        doomed, self._doomed = self._doomed, {}
        return self._remove_backend(doomed) if doomed else []

    def _remove_records(self, resources: Sequence[Resource]) -> list[tuple[Resource, str]]:
        """Delete the records, children before parents (a child's id is always greater); return each
        deleted one with its backend key."""
        with self._store.read() as conn:
            found = []
            for resource in resources:
                row = conn.execute(
                    "SELECT id FROM snapshots WHERE namespace = ? AND snapshotter = ? AND key = ?",
                    (resource.namespace, self._snapshotter, resource.id),
                ).fetchone()
                if row is not None:
                    found.append((row[0], resource))
        deleted = []
        with self._store.transaction():  # one commit; each record in a savepoint of its own
            for record_id, resource in sorted(found, reverse=True):
                try:
                    with self._store.transaction() as conn:
                        conn.execute("DELETE FROM snapshots WHERE id = ?", (record_id,))
                except Exception:
                    log.exception("gc: removing snapshot %s of namespace %s failed", resource.id, resource.namespace)
                    continue
                deleted.append((resource, backend_key(resource.namespace, record_id, resource.id)))
        return deleted

    def _remove_backend(self, doomed: Mapping[str, Resource | None]) -> list[Resource]:
        """Remove the ``doomed`` backend snapshots that no record maps to, deepest first, then clean
        the backend up; return the orphan resources whose snapshot is gone."""
        with self._store.read() as conn:
            recorded = {
                backend_key(namespace, record_id, key)
                for record_id, namespace, key in conn.execute(
                    "SELECT id, namespace, key FROM snapshots WHERE snapshotter = ?", (self._snapshotter,)
                )
            }
        parents = {info.name: info.parent for info in self._backend.walk()}
        removed = []
        for bkey in sorted((k for k in doomed if k not in recorded), key=lambda k: -_depth(k, parents)):
            try:
                with suppress(NotFound):
                    self._backend.remove(bkey)
            except Exception:
                log.warning("gc: removing snapshot %s from %s failed", bkey, self._snapshotter, exc_info=True)
                continue
            if (orphan := doomed[bkey]) is not None:
                removed.append(orphan)
        try:
            self._backend.cleanup()
        except Exception:
            log.exception("gc: cleanup of snapshotter %s failed", self._snapshotter)
        return removed


_SELECT = (
    "SELECT s.id, s.key, s.kind, s.parent_id, p.key, s.created_at, s.updated_at"
    " FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
)


def _record(row: tuple[Any, ...]) -> _Record:
    record_id, key, kind, parent_id, parent, created, updated = row
    return _Record(record_id, key, Kind(kind), parent_id, parent or "", created, updated)


def _find(conn: sqlite3.Connection, namespace: str, snapshotter: str, key: str) -> _Record | None:
    row = conn.execute(
        f"{_SELECT} WHERE s.namespace = ? AND s.snapshotter = ? AND s.key = ?", (namespace, snapshotter, key)
    ).fetchone()
    return None if row is None else _record(row)


def _existing(conn: sqlite3.Connection, namespace: str, snapshotter: str, key: str) -> _Record:
    record = _find(conn, namespace, snapshotter, key)
    if record is None:
        raise NotFound(f"snapshot {key} does not exist: not found")
    return record


def _committed_parent(conn: sqlite3.Connection, namespace: str, snapshotter: str, parent: str) -> _Record | None:
    """The record of ``parent`` (None for ``""``); NotFound when absent, InvalidArgument unless committed."""
    if not parent:
        return None
    record = _find(conn, namespace, snapshotter, parent)
    if record is None:
        raise NotFound(f"parent snapshot {parent} does not exist: not found")
    if record.kind is not Kind.COMMITTED:
        bparent = backend_key(namespace, record.id, parent)
        raise InvalidArgument(
            f'failed to create snapshot: parent "{bparent}" is not committed snapshot: invalid argument'
        )
    return record


def _insert(
    conn: sqlite3.Connection,
    namespace: str,
    snapshotter: str,
    key: str,
    kind: Kind,
    parent_id: int | None,
    now: int,
    labels: Mapping[str, str],
) -> int:
    cursor = conn.execute(
        "INSERT INTO snapshots (namespace, snapshotter, key, kind, parent_id, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (namespace, snapshotter, key, kind.value, parent_id, now, now),
    )
    record_id = cursor.lastrowid
    assert record_id is not None
    _write_labels(conn, record_id, labels, replace=False)
    return record_id


def _labels(conn: sqlite3.Connection, record_id: int) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM snapshot_labels WHERE snapshot = ? ORDER BY key", (record_id,)))


def _write_labels(conn: sqlite3.Connection, record_id: int, labels: Mapping[str, str], *, replace: bool) -> None:
    if replace:
        conn.execute("DELETE FROM snapshot_labels WHERE snapshot = ?", (record_id,))
    conn.executemany(
        "INSERT INTO snapshot_labels (snapshot, key, value) VALUES (?, ?, ?)",
        [(record_id, key, value) for key, value in labels.items()],
    )


def _checked(labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` validated (InvalidArgument as containerd's validateSnapshot), without empty values."""
    try:
        valid = validate_labels(labels)
    except InvalidArgument as err:
        raise InvalidArgument(f"info.Labels: {err}") from None
    return {key: value for key, value in valid.items() if value}


def _info(record: _Record, labels: Mapping[str, str]) -> Info:
    return Info(record.kind, record.key, record.parent, labels, from_ns(record.created_at), from_ns(record.updated_at))


def _fields(info: Info) -> dict[str, Any]:
    """What filters see of a snapshot (containerd's adaptSnapshot)."""
    return {"kind": str(info.kind), "name": info.name, "parent": info.parent, "labels": info.labels}


def _lease_resource(snapshotter: str, key: str) -> LeaseResource:
    return LeaseResource(key, f"snapshots/{snapshotter}")


def _depth(bkey: str, parents: Mapping[str, str]) -> int:
    """How many ancestors the backend snapshot has (0 for one the backend does not know)."""
    depth = 0
    while bkey := parents.get(bkey, ""):
        depth += 1
    return depth


def _remove_quietly(backend: Snapshotter, snapshotter: str, bkey: str) -> None:
    try:
        backend.remove(bkey)
    except Exception:
        log.exception("removing unrecorded snapshot %s from %s failed (gc will retry)", bkey, snapshotter)
