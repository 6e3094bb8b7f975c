"""Namespaces: the tenants that isolate images, containers, snapshots and leases, with containerd's semantics.

The semantics follow containerd's metadata store exactly, because clients rely on them: ``ctr``
asks for the labels of ``default`` when it connects, whether or not that namespace exists, and
setting a label on a missing namespace creates it.

Deletion is refused while any other table still holds rows for the namespace. Which tables count
is derived from the schema, not listed here: every table with a foreign key to
``namespaces(name)`` protects the namespace, except tables whose foreign key is declared
``ON DELETE CASCADE`` (data that belongs to the namespace itself, such as its labels, and goes
with it). A component therefore only declares ``namespace TEXT NOT NULL REFERENCES
namespaces(name)`` in its tables; the error message names the table.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping

from core.errors import AlreadyExists, FailedPrecondition, NotFound
from core.identifiers import validate
from core.labels import validate_label, validate_labels
from core.metadata.store import MetadataStore

__all__ = ["NamespaceStore"]


class NamespaceStore:
    """Namespaces and their labels, in a :class:`MetadataStore`. Each mutation is one transaction.

    Mutations called inside an open :meth:`MetadataStore.transaction` on the same thread join it
    (so a component can :meth:`ensure` the namespace within its own transaction).
    """

    def __init__(self, store: MetadataStore) -> None:
        self._store = store

    def create(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        """Create namespace ``name`` with ``labels`` (stored as given, empty values included).

        Raises :class:`InvalidArgument` for a bad name or label and :class:`AlreadyExists` if the
        namespace exists.
        """
        validate(name)
        labels = validate_labels(labels or {})
        now = time.time_ns()
        with self._store.transaction() as conn:
            try:
                conn.execute("INSERT INTO namespaces (name, created_at, updated_at) VALUES (?, ?, ?)", (name, now, now))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f'namespace "{name}": already exists') from None
            conn.executemany(
                "INSERT INTO namespace_labels (namespace, key, value) VALUES (?, ?, ?)",
                [(name, key, value) for key, value in labels.items()],
            )

    def ensure(self, name: str) -> bool:
        """Create namespace ``name`` (without labels) unless it exists; return whether it was created.

        Raises :class:`InvalidArgument` for a bad name.
        """
        validate(name)
        with self._store.transaction() as conn:
            return _ensure(conn, name, time.time_ns())

    def exists(self, name: str) -> bool:
        """Whether namespace ``name`` exists."""
        with self._store.read() as conn:
            return _exists(conn, name)

    def labels(self, name: str) -> dict[str, str]:
        """The labels of namespace ``name``; ``{}`` if it does not exist (as containerd, never NotFound)."""
        with self._store.read() as conn:
            rows = conn.execute(
                "SELECT key, value FROM namespace_labels WHERE namespace = ? ORDER BY key", (name,)
            ).fetchall()
        return dict(rows)

    def set_label(self, name: str, key: str, value: str) -> None:
        """Set one label; see :meth:`set_labels`."""
        self.set_labels(name, {key: value})

    def set_labels(self, name: str, labels: Mapping[str, str]) -> None:
        """Set the given labels of namespace ``name``, in one transaction; an empty value removes a label.

        Creates the namespace if it does not exist (as containerd does). Raises
        :class:`InvalidArgument` for a bad name or label; nothing changes then.
        """
        validate(name)
        for key, value in labels.items():
            validate_label(key, value)
        now = time.time_ns()
        with self._store.transaction() as conn:
            _ensure(conn, name, now)
            for key, value in labels.items():
                _set_label(conn, name, key, value)
            conn.execute("UPDATE namespaces SET updated_at = ? WHERE name = ?", (now, name))

    def replace_labels(self, name: str, labels: Mapping[str, str]) -> None:
        """Replace all labels of namespace ``name`` by ``labels`` (an Update without field mask).

        Labels with an empty value are dropped; the namespace is created if it does not exist.
        Raises :class:`InvalidArgument` for a bad name or label; nothing changes then.
        """
        validate(name)
        labels = validate_labels(labels)
        now = time.time_ns()
        with self._store.transaction() as conn:
            _ensure(conn, name, now)
            conn.execute("DELETE FROM namespace_labels WHERE namespace = ?", (name,))
            for key, value in labels.items():
                _set_label(conn, name, key, value)
            conn.execute("UPDATE namespaces SET updated_at = ? WHERE name = ?", (now, name))

    def delete(self, name: str) -> None:
        """Delete namespace ``name`` and its labels.

        Raises :class:`NotFound` if it does not exist and :class:`FailedPrecondition` naming the
        tables that still hold rows for it (``namespace "x" must be empty, but it still has images,
        containers``).
        """
        with self._store.transaction() as conn:
            if not _exists(conn, name):
                raise NotFound(f'namespace "{name}": not found')
            in_use = [
                description
                for table, column in _protecting_references(conn)
                for description in _holdings(conn, table, column, name)
            ]
            if in_use:
                raise FailedPrecondition(
                    f'namespace "{name}" must be empty, but it still has {", ".join(dict.fromkeys(in_use))}'
                )
            conn.execute("DELETE FROM namespaces WHERE name = ?", (name,))

    def list(self) -> list[tuple[str, dict[str, str]]]:
        """Every namespace with its labels, sorted by name (bytewise)."""
        with self._store.read() as conn:
            names = [row[0] for row in conn.execute("SELECT name FROM namespaces ORDER BY name")]
            labels: dict[str, dict[str, str]] = {name: {} for name in names}
            for namespace, key, value in conn.execute(
                "SELECT namespace, key, value FROM namespace_labels ORDER BY namespace, key"
            ):
                labels[namespace][key] = value
        return [(name, labels[name]) for name in names]


def _exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM namespaces WHERE name = ?", (name,)).fetchone() is not None


def _ensure(conn: sqlite3.Connection, name: str, now: int) -> bool:
    cursor = conn.execute(
        "INSERT INTO namespaces (name, created_at, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
        (name, now, now),
    )
    return cursor.rowcount == 1


def _set_label(conn: sqlite3.Connection, name: str, key: str, value: str) -> None:
    if value == "":
        conn.execute("DELETE FROM namespace_labels WHERE namespace = ? AND key = ?", (name, key))
    else:
        conn.execute(
            "INSERT INTO namespace_labels (namespace, key, value) VALUES (?, ?, ?)"
            " ON CONFLICT (namespace, key) DO UPDATE SET value = excluded.value",
            (name, key, value),
        )


_CONTAINERD_ORDER = ("images", "blobs", "containers", "snapshots")
"""The tables containerd names in its "must be empty" message, in its order; others follow."""


def _protecting_references(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """``(table, column)`` of every foreign key to ``namespaces`` that is not ``ON DELETE CASCADE``.

    containerd's tables first, in its order, then the others in order of table creation.
    """
    rows = conn.execute(
        'SELECT m.name, f."from" FROM sqlite_master AS m, pragma_foreign_key_list(m.name) AS f'
        " WHERE m.type = 'table' AND f.\"table\" = 'namespaces' COLLATE NOCASE"
        " AND upper(f.on_delete) <> 'CASCADE' ORDER BY m.rowid, f.id"
    ).fetchall()
    references = [(str(table), str(column)) for table, column in rows]
    rank = {table: position for position, table in enumerate(_CONTAINERD_ORDER)}
    return sorted(references, key=lambda reference: rank.get(reference[0], len(rank)))  # stable: creation order


def _holdings(conn: sqlite3.Connection, table: str, column: str, namespace: str) -> list[str]:
    """How the "must be empty" message names what ``table`` holds for ``namespace``: ``[table]`` if
    anything, snapshots per snapshotter as containerd (``snapshots on "overlayfs" snapshotter``)."""
    quoted = f"{_quote_identifier(table)} WHERE {_quote_identifier(column)} = ?"
    if table == "snapshots":
        snapshotters = conn.execute(f"SELECT DISTINCT snapshotter FROM {quoted} ORDER BY snapshotter", (namespace,))
        return [f'snapshots on "{snapshotter}" snapshotter' for (snapshotter,) in snapshotters]
    return [table] if conn.execute(f"SELECT 1 FROM {quoted} LIMIT 1", (namespace,)).fetchone() else []


def _quote_identifier(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
