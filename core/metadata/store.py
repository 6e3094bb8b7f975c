"""The metadata store: one sqlite database (``<root>/meta.db``) holding every component's records.

Every component keeps its tables in this one database so that one API mutation is one sqlite
transaction, whatever tables it touches. Components declare their schema as an ordered list of
forward migrations (:meth:`MetadataStore.migrate`); namespaced tables reference
``namespaces(name)`` and thereby protect a namespace from deletion while they hold rows for it
(see :class:`core.metadata.namespaces.NamespaceStore`).

Durability: the database runs in WAL mode with ``synchronous=NORMAL`` by default. A committed
transaction survives the daemon being killed (``kill -9``, a crash): the commit is in the WAL file,
which sqlite replays on the next open. Only an OS crash or power loss may lose the last few
transactions committed before it; the database stays consistent (never half a transaction). That
is acceptable here: a power loss also ends every container, whose state lives on tmpfs, and objects
whose record is lost are found again by garbage collection. ``synchronous="FULL"`` (an fsync per
commit) buys power-loss durability for those who want it.

Threads: the gRPC server calls in from a pool of threads. Each thread gets its own connection,
opened on first use; sqlite serialises writers (``BEGIN IMMEDIATE`` waits up to ``busy_timeout``)
while readers proceed concurrently on their WAL snapshot.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from core.errors import FailedPrecondition, Unavailable
from core.types import EPOCH

log = logging.getLogger("containerkit.metadata")

__all__ = ["CORE_MIGRATIONS", "MetadataStore", "Migration"]

Migration = str | Callable[[sqlite3.Connection], None]
"""One forward schema step: SQL (one or more ``;``-separated statements) or a function of the connection.

A step runs inside a transaction; it must not issue ``BEGIN``/``COMMIT`` itself. (As a consequence
it cannot toggle ``PRAGMA foreign_keys``; rebuild tables in ways that keep foreign keys valid.)
"""

CORE_MIGRATIONS: tuple[Migration, ...] = (
    # 1: namespaces, their labels, and facts about this installation (its uuid).
    """
    CREATE TABLE namespaces (
        name       TEXT    NOT NULL PRIMARY KEY,
        created_at INTEGER NOT NULL,  -- nanoseconds since the epoch, UTC
        updated_at INTEGER NOT NULL
    );
    CREATE TABLE namespace_labels (
        namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        key       TEXT NOT NULL,
        value     TEXT NOT NULL,
        PRIMARY KEY (namespace, key)
    );
    CREATE TABLE server_info (
        key   TEXT NOT NULL PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
)
"""The schema of component ``core``, applied by every :class:`MetadataStore` when it opens."""

Synchronous = Literal["NORMAL", "FULL", "EXTRA"]


class _ThreadState(threading.local):
    """Per-thread connection and transaction nesting (class attributes are each thread's defaults)."""

    conn: sqlite3.Connection | None = None
    mode: Literal["write", "read"] | None = None
    depth: int = 0


class MetadataStore:
    """The sqlite database behind all metadata, shared by every component of the daemon.

    Opening creates the file if needed, switches it to WAL mode and applies the ``core``
    migrations; it raises :class:`FailedPrecondition` if the file was written by a newer
    containerkit. Use :meth:`transaction` for every mutation (one per API call) and :meth:`read`
    for reads that must see one consistent state. Safe to use from many threads; :meth:`close`
    it once no thread uses it any more. After ``close`` every call raises :class:`Unavailable`.

    sqlite errors that mean "try again" (the database stayed locked for ``busy_timeout`` seconds)
    surface as :class:`Unavailable`; a full disk, an I/O error or a read-only file as
    :class:`OSError` with the matching errno. Any other sqlite error propagates unchanged.
    """

    def __init__(self, path: Path | str, *, busy_timeout: float = 30.0, synchronous: Synchronous = "NORMAL") -> None:
        """Open (creating if needed) the database file ``path``; its directory is created if missing."""
        if synchronous not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self._path = Path(path)
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._local = _ThreadState()
        self._lock = threading.Lock()
        self._writer = threading.Lock()  # held by this process's write transaction, from BEGIN to COMMIT
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._closed = False
        self._server_uuid: str | None = None
        self.gc_lock = threading.RLock()
        """Held by the garbage collector from mark to sweep, and briefly by any mutation that adds a
        reference the collector must see (a content commit, a lease resource), so that nothing becomes
        referenced between the two phases."""
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with self._translated_errors():
                conn = self._connection()
                (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if str(mode).lower() != "wal":
                raise FailedPrecondition(
                    f"metadata store {self._path}: cannot use WAL journal mode (got {mode!r}); "
                    "put the root directory on a local filesystem"
                )
            with self.transaction() as conn:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_versions ("
                    " component TEXT NOT NULL PRIMARY KEY, version INTEGER NOT NULL)"
                )
            self.migrate("core", CORE_MIGRATIONS)
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- transactions ------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: ``BEGIN IMMEDIATE``, yield the connection, ``COMMIT``; ``ROLLBACK`` on any exception.

        ``BEGIN IMMEDIATE`` takes the write lock up front, so the body never fails half-way for lock
        reasons and sees a state no one else changes under it. This store's writers first queue on a lock
        of the process's own, then on sqlite's (another process), each for up to ``busy_timeout``;
        Unavailable when that passes.
        Nested use on the same thread joins the outer transaction through a ``SAVEPOINT``: an
        exception out of the inner block undoes the inner block only, and nothing is durable before
        the outermost block commits. Starting a transaction inside :meth:`read` raises
        :class:`RuntimeError` (a read cannot safely be upgraded; open the transaction first).
        """
        state = self._local
        with self._translated_errors():
            conn = self._connection()
            if state.mode == "read":
                raise RuntimeError(
                    "metadata: transaction() inside read() on the same thread; "
                    "open the transaction() first, it reads consistently too"
                )
            if state.depth > 0:
                with self._savepoint(conn, state):
                    yield conn
                return
            # This process's writers queue here, and are woken as soon as the one before commits; at sqlite's
            # lock they would poll with sleeps of 1, 2, 5, 10... ms (its busy handler), which under a burst of
            # concurrent calls left the lock idle while they slept.
            if not self._writer.acquire(timeout=self._busy_timeout):
                raise _busy(self._path, self._busy_timeout)
            try:
                conn.execute("BEGIN IMMEDIATE")
                state.mode, state.depth = "write", 1
                try:
                    yield conn
                    if not conn.in_transaction:
                        raise RuntimeError(
                            "metadata: the transaction was aborted by sqlite after an error inside it "
                            "(the error was caught and ignored); its changes are lost"
                        )
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn, "ROLLBACK")
                    raise
                finally:
                    state.mode, state.depth = None, 0
            finally:
                self._writer.release()

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every statement in the block sees the same committed state.

        Read-only by contract (write through :meth:`transaction`). Inside a :meth:`transaction` or
        another ``read`` on the same thread it simply joins it.
        """
        state = self._local
        with self._translated_errors():
            conn = self._connection()
            if state.depth > 0:
                yield conn
                return
            conn.execute("BEGIN DEFERRED")
            state.mode, state.depth = "read", 1
            try:
                yield conn
                if conn.in_transaction:
                    conn.execute("COMMIT")
            except BaseException:
                _rollback(conn, "ROLLBACK")
                raise
            finally:
                state.mode, state.depth = None, 0

    @contextmanager
    def _savepoint(self, conn: sqlite3.Connection, state: _ThreadState) -> Iterator[None]:
        name = f"ck_savepoint_{state.depth}"
        conn.execute(f"SAVEPOINT {name}")
        state.depth += 1
        try:
            yield
            conn.execute(f"RELEASE {name}")
        except BaseException:
            _rollback(conn, f"ROLLBACK TO {name}", f"RELEASE {name}")
            raise
        finally:
            state.depth -= 1

    # -- schema --------------------------------------------------------------------------------

    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Bring ``component``'s schema to version ``len(migrations)``; return that version.

        ``migrations[i]`` takes the schema from version ``i`` to ``i + 1``; each pending step runs
        in its own transaction together with recording its version, so a crash leaves the schema at
        a step boundary and the next open resumes from there. Steps already applied are never run
        again: append new steps, never edit or reorder published ones. Raises
        :class:`FailedPrecondition` if the database holds a newer version than this code knows.
        """
        if not component:
            raise ValueError("migrate: component must not be empty")
        known = len(migrations)
        while True:
            with self.transaction() as conn:
                current = _schema_version(conn, component)
                if current > known:
                    raise FailedPrecondition(
                        f"metadata schema of {component} is version {current} but this containerkit knows only "
                        f"{known}: it was written by a newer containerkit; upgrade or restore a backup"
                    )
                if current == known:
                    return current
                try:
                    _apply(conn, migrations[current])
                except BaseException as exc:
                    exc.add_note(f"while applying metadata migration {current + 1} of {component!r} ({self._path})")
                    raise
                conn.execute(
                    "INSERT INTO schema_versions (component, version) VALUES (?, ?)"
                    " ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    (component, current + 1),
                )

    def schema_version(self, component: str) -> int:
        """The schema version of ``component`` in the database; 0 if it never migrated."""
        with self.read() as conn:
            return _schema_version(conn, component)

    # -- facts and tools -----------------------------------------------------------------------

    def server_uuid(self) -> str:
        """This installation's UUID (version 4): created on the first call, then stable across restarts."""
        if self._server_uuid is None:
            import uuid  # only on the first call: keeps it off the daemon's start-up path

            with self.transaction() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO server_info (key, value) VALUES ('uuid', ?)",
                    (str(uuid.uuid4()),),
                )
                (value,) = conn.execute("SELECT value FROM server_info WHERE key = 'uuid'").fetchone()
            self._server_uuid = value
        return self._server_uuid

    def delete_each(self, table: str, id_column: str, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
        """Delete the ``(namespace, id)`` rows of ``table``, each in its own transaction; return the keys
        that existed. A failing deletion is logged and skipped, so one bad row never stops the rest
        (what the garbage collector's sweep needs)."""
        deleted = set()
        for namespace, key in keys:
            try:
                with self.transaction() as conn:
                    cursor = conn.execute(
                        f"DELETE FROM {table} WHERE namespace = ? AND {id_column} = ?", (namespace, key)
                    )
                if cursor.rowcount:
                    deleted.add((namespace, key))
            except Exception:
                log.exception("removing %s %s of namespace %s failed", table, key, namespace)
        return deleted

    def integrity_check(self) -> str:
        """sqlite's ``PRAGMA integrity_check`` result: ``"ok"``, or the problems found, one per line."""
        with self.read() as conn:
            return "\n".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))

    def close(self) -> None:
        """Close every thread's connection. Idempotent; later calls on the store raise :class:`Unavailable`.

        Call it once no request is in flight (after the gRPC server stopped): a thread still inside
        a transaction loses it (rolled back, nothing half-written).
        """
        with self._lock:
            self._closed = True
            connections = [conn for _, conn in self._connections]
            self._connections.clear()
        for conn in connections:
            with suppress(sqlite3.Error):
                conn.close()

    # -- internals -----------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise Unavailable(f"metadata store {self._path} is closed")
        conn = self._local.conn
        if conn is None:
            conn = self._open()
            with self._lock:
                if self._closed:
                    conn.close()
                    raise Unavailable(f"metadata store {self._path} is closed")
                self._close_connections_of_finished_threads()
                self._connections.append((threading.current_thread(), conn))
            self._local.conn = conn
        return conn

    def _open(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions, we issue BEGIN/COMMIT ourselves.
        # check_same_thread=False only so that close() may close every thread's connection.
        conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _close_connections_of_finished_threads(self) -> None:
        """Close the connections of threads that ended (caller holds ``_lock``)."""
        alive = []
        for thread, conn in self._connections:
            if thread.is_alive():
                alive.append((thread, conn))
            else:
                with suppress(sqlite3.Error):
                    conn.close()
        self._connections = alive

    @contextmanager
    def _translated_errors(self) -> Iterator[None]:
        """Re-raise the sqlite errors that have a clearer meaning as :class:`Unavailable` / :class:`OSError`."""
        try:
            yield
        except sqlite3.Error as exc:
            translated = _translate(exc, self._path, self._busy_timeout)
            if translated is None:
                raise
            raise translated from exc


def _schema_version(conn: sqlite3.Connection, component: str) -> int:
    row = conn.execute("SELECT version FROM schema_versions WHERE component = ?", (component,)).fetchone()
    return 0 if row is None else int(row[0])


def _apply(conn: sqlite3.Connection, migration: Migration) -> None:
    if callable(migration):
        migration(conn)
        return
    # Not executescript(): it would COMMIT the transaction this step must run in.
    for statement in _statements(migration):
        conn.execute(statement)


def _statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (``;`` inside strings or triggers stays put)."""
    statements: list[str] = []
    pending = ""
    pieces = script.split(";")
    for piece in pieces[:-1]:
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip() != ";":
                statements.append(pending.strip())
            pending = ""
    pending += pieces[-1]
    if pending.strip():
        statements.append(pending.strip())
    return statements


def _rollback(conn: sqlite3.Connection, *statements: str) -> None:
    """Undo after an exception; errors here would only hide the original one, so they are dropped."""
    if not conn.in_transaction:  # sqlite already rolled back (e.g. after SQLITE_FULL)
        return
    with suppress(sqlite3.Error):
        for statement in statements:
            conn.execute(statement)


def _busy(path: Path, busy_timeout: float) -> Unavailable:
    """A writer waited longer than ``busy_timeout``, at this process's lock or at sqlite's."""
    return Unavailable(f"metadata store {path} stayed locked by another writer for more than {busy_timeout:g}s; retry")


def _translate(exc: sqlite3.Error, path: Path, busy_timeout: float) -> Exception | None:
    name = getattr(exc, "sqlite_errorname", None) or ""
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return _busy(path, busy_timeout)
    if name == "SQLITE_FULL":
        return OSError(errno.ENOSPC, f"metadata store: no space left on device ({exc})", str(path))
    if name.startswith("SQLITE_IOERR"):
        return OSError(errno.EIO, f"metadata store: I/O error ({name}: {exc})", str(path))
    if name.startswith("SQLITE_READONLY"):
        return OSError(errno.EROFS, f"metadata store: database is read-only ({exc})", str(path))
    if name.startswith("SQLITE_CANTOPEN"):
        return OSError(errno.EIO, f"metadata store: cannot open database ({exc})", str(path))
    return None


def from_ns(nanoseconds: int) -> datetime:
    """A timestamp column (integer nanoseconds since the epoch, UTC) as an aware datetime (microseconds)."""
    return EPOCH + timedelta(0, 0, nanoseconds // 1000)  # (days, seconds, microseconds): positional is faster
