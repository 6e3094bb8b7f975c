"""Bookkeeping shared by snapshotters that keep each snapshot in a directory (containerd's ``snapshots/storage``).

:class:`DirectorySnapshotter` implements every :class:`~core.snapshot.Snapshotter` call except the
mounts, which a subclass (overlayfs, aufs) derives from a :class:`Snapshot` record. Layout under
the snapshotter's root::

    metadata.db           its own sqlite database (records, labels, recorded usage)
    snapshots/<id>/fs     the snapshot's own files (its layer)
    snapshots/<id>/...    whatever else the subclass needs (overlayfs: ``work`` for active snapshots)

Ids are never reused (sqlite ``AUTOINCREMENT``), so a directory name always means one snapshot.
A commit keeps the id: only the record changes.

Crash safety: every change of records runs in one sqlite transaction, and the directory step
happens inside it. A new snapshot's directory is built under a temporary name (``new-*``) and
renamed to its id just before the commit; a removal deletes the record first and the directory
after the commit. So after a crash at any point every recorded snapshot has its complete
directory, and what is on disk without a record (a half-built ``new-*``, an id whose record was
never committed or already deleted) is an orphan: invisible to every call, and reclaimed by
:meth:`DirectorySnapshotter.cleanup`, which also runs when the snapshotter opens.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import subprocess
import tempfile
import time
from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import filters as filter_language
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.files import remove_tree
from core.labels import merge_label_paths, validate_labels
from core.metadata.store import MetadataStore, Migration, from_ns
from core.plugin import SkipPlugin
from core.snapshot import LABEL_REBASE, Info, Kind, Snapshotter, Usage
from core.types import Mount

__all__ = ["SNAPSHOTTER_MIGRATIONS", "DirectorySnapshotter", "Snapshot", "disk_usage", "require_filesystem"]

log = logging.getLogger("containerkit.snapshotter")

SNAPSHOTTER_MIGRATIONS: tuple[Migration, ...] = (
    # 1: snapshot records (one key space for all kinds), their labels.
    """
    CREATE TABLE snapshots (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- the directory name; never reused
        key        TEXT    NOT NULL UNIQUE,            -- the active/view key or the committed name
        kind       INTEGER NOT NULL,                   -- core.snapshot.Kind value
        parent_id  INTEGER REFERENCES snapshots(id),
        rebase     INTEGER NOT NULL DEFAULT 0,         -- active, parentless, prepared for a rebase
        created_at INTEGER NOT NULL,                   -- nanoseconds since the epoch, UTC
        updated_at INTEGER NOT NULL,
        size       INTEGER NOT NULL DEFAULT 0,         -- usage recorded at commit
        inodes     INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX snapshots_by_parent ON snapshots (parent_id);
    CREATE TABLE snapshot_labels (
        id    INTEGER NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
        key   TEXT    NOT NULL,
        value TEXT    NOT NULL,
        PRIMARY KEY (id, key)
    );
    """,
)
"""Schema of component ``snapshotter`` in each directory snapshotter's own ``metadata.db``."""

_BLOCK = 512  # unit of st_blocks
_NEW_PREFIX = "new-"
_TRASH_PREFIX = "rm-"


@dataclass(frozen=True)
class Snapshot:
    """What a subclass needs to build mounts: the snapshot's id, kind and parent ids (nearest first).

    ``rebase`` marks an active snapshot prepared without a parent but with :data:`LABEL_REBASE`.
    """

    id: str
    kind: Kind
    parent_ids: tuple[str, ...] = ()
    rebase: bool = False


def disk_usage(path: str | os.PathLike[str]) -> Usage:
    """The bytes (``st_blocks * 512``) and inodes under ``path``, itself included, each inode counted
    once (hardlinks); symlinks are not followed. As containerd's ``fs.DiskUsage``."""
    root = os.lstat(path)
    seen = {(root.st_dev, root.st_ino)}
    size = root.st_blocks * _BLOCK
    pending = [os.fspath(path)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                inode = (st.st_dev, st.st_ino)
                if inode not in seen:
                    seen.add(inode)
                    size += st.st_blocks * _BLOCK
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return Usage(size, len(seen))


def require_filesystem(fstype: str, *, filesystems: str | os.PathLike[str] = "/proc/filesystems") -> None:
    """Return if the kernel supports ``fstype`` (listed in ``filesystems``, else after ``modprobe fstype``);
    raise :class:`~core.plugin.SkipPlugin` saying why not otherwise."""
    if _listed(fstype, filesystems):
        return
    try:
        result = subprocess.run(["modprobe", fstype], capture_output=True, text=True, timeout=60, check=False)
        failure = (result.stderr.strip() or f"exit status {result.returncode}") if result.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        failure = str(exc)
    if not failure and _listed(fstype, filesystems):
        return
    raise SkipPlugin(
        f"{fstype} is not in {os.fspath(filesystems)} "
        f"(modprobe {fstype} failed: {failure or 'the module loaded but the filesystem is still missing'})"
    )


def _listed(fstype: str, filesystems: str | os.PathLike[str]) -> bool:
    with open(filesystems, encoding="utf-8") as listing:
        return any(line.split()[-1:] == [fstype] for line in listing)


class DirectorySnapshotter(Snapshotter):
    """A snapshotter keeping snapshot ``<id>`` in ``<root>/snapshots/<id>`` and its records in ``<root>/metadata.db``.

    Subclasses implement :meth:`_mounts` and may extend :meth:`_make_directory`. Opening creates
    the root (0700) and reclaims orphaned directories (see the module docstring). Thread-safe:
    writers serialise on the database; directory scans (usage at commit) run outside the lock.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root)
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._snapshots = self._root / "snapshots"
        self._snapshots.mkdir(mode=0o700, exist_ok=True)
        self._snapshots_text = str(self._snapshots)
        self._store = MetadataStore(self._root / "metadata.db")
        try:
            self._store.migrate("snapshotter", SNAPSHOTTER_MIGRATIONS)
            self.cleanup()
        except BaseException:
            self._store.close()
            raise

    @property
    def root(self) -> Path:
        """The snapshotter's root directory."""
        return self._root

    def snapshot_path(self, id: str) -> Path:
        """The directory of snapshot ``id``."""
        return self._snapshots / id

    def fs_path(self, id: str) -> Path:
        """The directory holding snapshot ``id``'s own files (its layer; an overlay upperdir)."""
        return Path(self.mount_source(id))

    def mount_source(self, id: str, part: str = "fs") -> str:
        """``<root>/snapshots/<id>/<part>`` as text, for mounts: built without pathlib, whose joins were half the
        CPU of a Mounts call (computed on every one)."""
        return f"{self._snapshots_text}/{id}/{part}"

    # -- what subclasses provide -----------------------------------------------------------------

    @abstractmethod
    def _mounts(self, snapshot: Snapshot) -> list[Mount]:
        """The mounts of an active snapshot or view."""

    def _make_directory(self, path: Path, kind: Kind) -> None:
        """Populate a new snapshot's directory ``path`` (not yet at its final name): ``fs``, mode 0755."""
        (path / "fs").mkdir(mode=0o755)

    # -- Snapshotter ---------------------------------------------------------------------------

    def stat(self, key: str) -> Info:
        _require("key", key)
        with self._store.read() as conn:
            return _info(conn, _row(conn, key))

    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        _require("name", info.name)
        now = time.time_ns()
        with self._store.transaction() as conn:
            row = _row(conn, info.name)
            labels = merge_label_paths(_labels(conn, row["id"]), info.labels, fieldpaths, f'snapshot "{info.name}"')
            _write_labels(conn, row["id"], _clean_labels(labels))
            conn.execute("UPDATE snapshots SET updated_at = ? WHERE id = ?", (now, row["id"]))
            return _info(conn, _row(conn, info.name))

    def usage(self, key: str) -> Usage:
        _require("key", key)
        with self._store.read() as conn:
            row = _row(conn, key)
        if row["kind"] == Kind.ACTIVE.value:
            return disk_usage(self.fs_path(str(row["id"])))
        return Usage(row["size"], row["inodes"])

    def mounts(self, key: str) -> list[Mount]:
        _require("key", key)
        with self._store.read() as conn:
            row = _row(conn, key)
            if row["kind"] == Kind.COMMITTED.value:
                raise FailedPrecondition(f"snapshot {key!r} is committed: only active snapshots and views have mounts")
            return self._mounts(_snapshot(conn, row))

    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: Mapping[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, labels)

    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        self._commit(name, key, labels)

    def remove(self, key: str) -> None:
        _require("key", key)
        with self._store.transaction() as conn:
            row = _row(conn, key)
            child = conn.execute("SELECT key FROM snapshots WHERE parent_id = ? LIMIT 1", (row["id"],)).fetchone()
            if child is not None:
                raise FailedPrecondition(
                    f"cannot remove snapshot {key!r}: snapshot {child[0]!r} has it as parent (remove that first)"
                )
            conn.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))
        _remove_tree(self.snapshot_path(str(row["id"])))

    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        matches = filter_language.parse(list(filters))
        with self._store.read() as conn:
            rows = _select(conn, " ORDER BY s.id").fetchall()
            labels: dict[int, dict[str, str]] = {}
            for id, key, value in conn.execute("SELECT id, key, value FROM snapshot_labels"):
                labels.setdefault(id, {})[key] = value
        infos = [_info_of(row, labels.get(row["id"], {})) for row in rows]
        return iter([info for info in infos if matches(_fields(info))])

    def cleanup(self) -> None:
        """Remove every directory under ``snapshots/`` that belongs to no record (orphans of crashes and removals).

        Orphans are renamed aside inside a write transaction (no snapshot is being created or
        removed meanwhile), then deleted outside it.
        """
        trash = []
        with self._store.transaction() as conn:
            ids = {str(id) for (id,) in conn.execute("SELECT id FROM snapshots")}
            for entry in os.listdir(self._snapshots):
                if entry not in ids:
                    aside = self._snapshots / f"{_TRASH_PREFIX}{secrets.token_hex(8)}"
                    os.rename(self._snapshots / entry, aside)
                    trash.append(aside)
        for path in trash:
            _remove_tree(path)

    def close(self) -> None:
        self._store.close()

    # -- shared steps --------------------------------------------------------------------------

    def _create(self, kind: Kind, key: str, parent: str, labels: Mapping[str, str] | None) -> list[Mount]:
        """Record a new active snapshot or view and build its directory, in one transaction."""
        _require("key", key)
        labels = _clean_labels(labels or {})
        rebase = kind is Kind.ACTIVE and not parent and LABEL_REBASE in labels
        now = time.time_ns()
        temp: Path | None = None
        final: Path | None = None
        try:
            with self._store.transaction() as conn:
                parent_id = _committed_id(conn, parent) if parent else None
                if _find(conn, key) is not None:
                    raise AlreadyExists(f"snapshot {key!r} already exists")
                cursor = conn.execute(
                    "INSERT INTO snapshots (key, kind, parent_id, rebase, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (key, kind.value, parent_id, int(rebase), now, now),
                )
                id = str(cursor.lastrowid)
                _write_labels(conn, cursor.lastrowid, labels)
                snapshot = Snapshot(id, kind, _parent_ids(conn, parent_id), rebase)
                mounts = self._mounts(snapshot)
                temp = Path(tempfile.mkdtemp(prefix=_NEW_PREFIX, dir=self._snapshots))
                self._make_directory(temp, kind)
                if snapshot.parent_ids:  # the layer's root starts owned like the parent's, as containerd
                    st = os.stat(self.fs_path(snapshot.parent_ids[0]))
                    os.lchown(temp / "fs", st.st_uid, st.st_gid)
                final = self.snapshot_path(id)
                os.rename(temp, final)
                temp = None
        except BaseException:
            for path in (temp, final):
                if path is not None:
                    _remove_tree(path)
            raise
        return mounts

    def _commit(self, name: str, key: str, labels: Mapping[str, str] | None, onto: str | None = None) -> None:
        """Commit active ``key`` as ``name``; with ``onto`` set (a rebase) the new parent is ``onto`` instead of
        ``key``'s. Usage is measured before the write transaction, so other writers are not held up by it."""
        _require("name", name)
        _require("key", key)
        labels = _clean_labels(labels or {})
        with self._store.read() as conn:
            before = _find(conn, key)
        measured = None
        if before is not None and before["kind"] == Kind.ACTIVE.value:
            measured = (before["id"], disk_usage(self.fs_path(str(before["id"]))))
        now = time.time_ns()
        with self._store.transaction() as conn:
            if _find(conn, name) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            row = _row(conn, key)
            if row["kind"] != Kind.ACTIVE.value:
                raise FailedPrecondition(f"snapshot {key!r} is {Kind(row['kind'])}, not active: it cannot be committed")
            parent_id = row["parent_id"] if onto is None else self._rebase_parent(conn, key, row, onto)
            usage = measured[1] if measured and measured[0] == row["id"] else disk_usage(self.fs_path(str(row["id"])))
            conn.execute(
                "UPDATE snapshots SET key = ?, kind = ?, parent_id = ?, rebase = 0, created_at = ?, updated_at = ?,"
                " size = ?, inodes = ? WHERE id = ?",
                (name, Kind.COMMITTED.value, parent_id, now, now, usage.size, usage.inodes, row["id"]),
            )
            _write_labels(conn, row["id"], labels)

    def _rebase_parent(self, conn: sqlite3.Connection, key: str, row: sqlite3.Row, onto: str) -> int | None:
        """The id of ``onto`` as the new parent of active ``key``; errors as :meth:`Snapshotter.rebase` says."""
        if row["parent_id"] is not None:
            raise InvalidArgument(f"snapshot {key!r} has a parent: only a snapshot prepared without one can be rebased")
        if not onto:
            return None
        parent_id = _committed_id(conn, onto)
        if not row["rebase"]:
            raise InvalidArgument(
                f"snapshot {key!r} was not prepared with label {LABEL_REBASE}: its deletions were not recorded, "
                "so it cannot go on top of a parent"
            )
        return parent_id


_SELECT_ROWS = (
    "SELECT s.id, s.key, s.kind, s.parent_id, s.rebase, s.created_at, s.updated_at, s.size, s.inodes,"
    " COALESCE(p.key, '') AS parent FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"
)


def _require(what: str, value: str) -> None:
    if not value:
        raise InvalidArgument(f"snapshot {what} must not be empty")


def _clean_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Validated labels without the empty values (which mean "no such label")."""
    return {key: value for key, value in validate_labels(labels).items() if value}


def _select(conn: sqlite3.Connection, where: str = "", params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
    """Snapshot rows (with the parent's key as ``parent``) as :class:`sqlite3.Row`."""
    cursor = conn.cursor()
    cursor.row_factory = sqlite3.Row
    return cursor.execute(_SELECT_ROWS + where, params)


def _find(conn: sqlite3.Connection, key: str) -> sqlite3.Row | None:
    return _select(conn, " WHERE s.key = ?", (key,)).fetchone()


def _row(conn: sqlite3.Connection, key: str) -> sqlite3.Row:
    row = _find(conn, key)
    if row is None:
        raise NotFound(f"snapshot {key!r} does not exist")
    return row


def _committed_id(conn: sqlite3.Connection, parent: str) -> int:
    row = _find(conn, parent)
    if row is None:
        raise NotFound(f"parent snapshot {parent!r} does not exist")
    if row["kind"] != Kind.COMMITTED.value:
        raise InvalidArgument(f"parent snapshot {parent!r} is {Kind(row['kind'])}, not committed")
    return int(row["id"])


def _parent_ids(conn: sqlite3.Connection, parent_id: int | None) -> tuple[str, ...]:
    """The chain of ids from ``parent_id`` to the root, nearest first."""
    if parent_id is None:
        return ()
    rows = conn.execute(
        "WITH RECURSIVE chain (id, parent_id, depth) AS ("
        " SELECT id, parent_id, 0 FROM snapshots WHERE id = ?"
        " UNION ALL SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id)"
        " SELECT id FROM chain ORDER BY depth",
        (parent_id,),
    )
    return tuple(str(id) for (id,) in rows)


def _snapshot(conn: sqlite3.Connection, row: sqlite3.Row) -> Snapshot:
    return Snapshot(str(row["id"]), Kind(row["kind"]), _parent_ids(conn, row["parent_id"]), bool(row["rebase"]))


def _labels(conn: sqlite3.Connection, id: int) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM snapshot_labels WHERE id = ?", (id,)).fetchall())


def _write_labels(conn: sqlite3.Connection, id: int | None, labels: Mapping[str, str]) -> None:
    conn.execute("DELETE FROM snapshot_labels WHERE id = ?", (id,))
    conn.executemany(
        "INSERT INTO snapshot_labels (id, key, value) VALUES (?, ?, ?)", [(id, k, v) for k, v in labels.items()]
    )


def _info(conn: sqlite3.Connection, row: sqlite3.Row) -> Info:
    return _info_of(row, _labels(conn, row["id"]))


def _info_of(row: sqlite3.Row, labels: dict[str, str]) -> Info:
    return Info(
        kind=Kind(row["kind"]),
        name=row["key"],
        parent=row["parent"],
        labels=labels,
        created_at=from_ns(row["created_at"]),
        updated_at=from_ns(row["updated_at"]),
    )


def _fields(info: Info) -> dict[str, Any]:
    """What filters see of a snapshot (containerd's storage adaptor): name, parent, kind, labels."""
    return {"name": info.name, "parent": info.parent, "kind": str(info.kind), "labels": info.labels}


def _remove_tree(path: Path) -> None:
    """Delete a snapshot directory for good; failures are logged (the record is already gone or never was)."""
    remove_tree(path, lambda failed, error: log.warning("removing %s: failed on %s: %s", path, failed, error))
