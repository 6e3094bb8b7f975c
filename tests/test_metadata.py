"""The metadata store (sqlite), its migrations and transactions, and namespaces with containerd's semantics."""

from __future__ import annotations

import errno
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from core.identifiers import validate
from core.labels import validate_label, validate_labels
from core.metadata import MetadataStore, NamespaceStore

REPO = Path(__file__).resolve().parents[1]

WIDGETS = "CREATE TABLE widgets (namespace TEXT NOT NULL REFERENCES namespaces(name), id TEXT)"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    with MetadataStore(tmp_path / "meta.db") as opened:
        yield opened


@pytest.fixture
def namespaces(store: MetadataStore) -> NamespaceStore:
    return NamespaceStore(store)


# -- identifiers and labels ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "k8s.io", "moby", "a", "A9", "a_b-c.d", "a" * 76])
def test_valid_identifiers_are_returned(name: str) -> None:
    assert validate(name) == name


@pytest.mark.parametrize(
    "name", ["", "-a", "a-", "a..b", "a b", "a" * 77, "ñ", ".a", "a_", "a/b", "a\n", "a-_b", "日本"]
)
def test_invalid_namespace_names_are_invalid_argument(namespaces: NamespaceStore, name: str) -> None:
    with pytest.raises(InvalidArgument):
        namespaces.create(name)
    with pytest.raises(InvalidArgument):
        namespaces.set_label(name, "k", "v")
    with pytest.raises(InvalidArgument):
        namespaces.ensure(name)
    assert namespaces.list() == []


def test_identifier_messages_are_containerds() -> None:
    with pytest.raises(InvalidArgument, match=r"^identifier must not be empty$"):
        validate("")
    with pytest.raises(InvalidArgument) as too_long:
        validate("a" * 77)
    assert str(too_long.value) == f'identifier "{"a" * 77}" greater than maximum length (76 characters)'
    with pytest.raises(InvalidArgument) as bad:
        validate("a b")
    assert str(bad.value) == 'identifier "a b" must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$'
    with pytest.raises(InvalidArgument, match=r'^container name "-x" must match'):
        validate("-x", "container name")


def test_label_size_counts_utf8_bytes() -> None:
    validate_label("k", "v" * 4095)
    validate_label("é" * 1024, "é" * 1024)  # 4096 bytes
    with pytest.raises(InvalidArgument):
        validate_label("k", "é" * 2048)  # 2049 characters but 4097 bytes


def test_oversized_label_is_invalid_argument(namespaces: NamespaceStore) -> None:
    key = "containerkit.example/key"
    with pytest.raises(InvalidArgument) as raised:
        namespaces.create("big", {key: "x" * 4096})
    assert str(raised.value) == ("label key and value greater than maximum size (4096 bytes), key: containerk")
    with pytest.raises(InvalidArgument):
        namespaces.set_label("big", key, "x" * 4096)
    with pytest.raises(InvalidArgument):
        namespaces.replace_labels("big", {key: "x" * 4096})
    assert not namespaces.exists("big")


def test_empty_label_key_is_invalid_argument(namespaces: NamespaceStore) -> None:
    with pytest.raises(InvalidArgument):
        validate_labels({"": "v"})
    with pytest.raises(InvalidArgument):
        namespaces.set_label("default", "", "v")


# -- namespaces ----------------------------------------------------------------------------------


def test_create_then_list_sorted_by_name_with_labels(namespaces: NamespaceStore) -> None:
    namespaces.create("zeta")
    namespaces.create("Alpha", {"b": "2", "a": "1"})
    namespaces.create("k8s.io")
    assert namespaces.list() == [("Alpha", {"a": "1", "b": "2"}), ("k8s.io", {}), ("zeta", {})]
    assert namespaces.exists("zeta")
    assert not namespaces.exists("zet")


def test_create_twice_is_already_exists(namespaces: NamespaceStore) -> None:
    namespaces.create("default", {"a": "1"})
    with pytest.raises(AlreadyExists, match=r'^namespace "default": already exists$'):
        namespaces.create("default", {"b": "2"})
    assert namespaces.labels("default") == {"a": "1"}


def test_labels_of_missing_namespace_are_empty(namespaces: NamespaceStore) -> None:
    assert namespaces.labels("default") == {}
    assert not namespaces.exists("default")


def test_set_label_creates_namespace(namespaces: NamespaceStore) -> None:
    namespaces.set_label("fresh", "owner", "me")
    assert namespaces.exists("fresh")
    assert namespaces.labels("fresh") == {"owner": "me"}


def test_set_label_overwrites(namespaces: NamespaceStore) -> None:
    namespaces.set_label("ns", "k", "1")
    namespaces.set_label("ns", "k", "2")
    assert namespaces.labels("ns") == {"k": "2"}


def test_empty_label_value_clears_it(namespaces: NamespaceStore) -> None:
    namespaces.create("ns", {"keep": "1", "drop": "2"})
    namespaces.set_label("ns", "drop", "")
    namespaces.set_label("ns", "never-set", "")
    assert namespaces.labels("ns") == {"keep": "1"}


def test_replace_labels_replaces_all_and_drops_empty_values(namespaces: NamespaceStore) -> None:
    namespaces.create("ns", {"old": "1", "kept": "1"})
    namespaces.replace_labels("ns", {"kept": "2", "new": "3", "empty": ""})
    assert namespaces.labels("ns") == {"kept": "2", "new": "3"}
    namespaces.replace_labels("implicit", {"a": "b"})
    assert namespaces.labels("implicit") == {"a": "b"}


def test_ensure_creates_only_once(namespaces: NamespaceStore) -> None:
    assert namespaces.ensure("default") is True
    namespaces.set_label("default", "a", "1")
    assert namespaces.ensure("default") is False
    assert namespaces.labels("default") == {"a": "1"}


def test_delete_missing_is_not_found(namespaces: NamespaceStore) -> None:
    with pytest.raises(NotFound, match=r'^namespace "nope": not found$'):
        namespaces.delete("nope")


def test_delete_removes_namespace_and_its_labels(store: MetadataStore, namespaces: NamespaceStore) -> None:
    namespaces.create("gone", {"a": "1"})
    namespaces.delete("gone")
    assert not namespaces.exists("gone")
    assert namespaces.labels("gone") == {}
    with store.read() as conn:
        assert conn.execute("SELECT count(*) FROM namespace_labels").fetchone() == (0,)
    namespaces.create("gone")  # the name is free again


def test_delete_non_empty_namespace_is_failed_precondition(store: MetadataStore, namespaces: NamespaceStore) -> None:
    store.migrate("test", [WIDGETS])
    namespaces.create("busy", {"a": "1"})
    namespaces.create("idle")
    with store.transaction() as conn:
        conn.execute("INSERT INTO widgets (namespace, id) VALUES ('busy', 'w1')")

    with pytest.raises(FailedPrecondition) as raised:
        namespaces.delete("busy")
    assert str(raised.value) == 'namespace "busy" must be empty, but it still has widgets'
    assert namespaces.labels("busy") == {"a": "1"}

    namespaces.delete("idle")  # rows of another namespace do not count
    with store.transaction() as conn:
        conn.execute("DELETE FROM widgets")
    namespaces.delete("busy")
    assert namespaces.list() == []


def test_delete_names_every_table_still_in_use_in_creation_order(
    store: MetadataStore, namespaces: NamespaceStore
) -> None:
    store.migrate(
        "test",
        [
            "CREATE TABLE images (namespace TEXT NOT NULL REFERENCES namespaces(name), name TEXT)",
            "CREATE TABLE containers (ns TEXT NOT NULL REFERENCES namespaces, id TEXT)",
            "CREATE TABLE leases (namespace TEXT NOT NULL REFERENCES namespaces(name), id TEXT)",
        ],
    )
    namespaces.create("ns")
    with store.transaction() as conn:
        conn.execute("INSERT INTO images VALUES ('ns', 'alpine')")
        conn.execute("INSERT INTO containers VALUES ('ns', 'c1')")
    with pytest.raises(
        FailedPrecondition, match=r'^namespace "ns" must be empty, but it still has images, containers$'
    ):
        namespaces.delete("ns")


def test_cascading_tables_belong_to_the_namespace(store: MetadataStore, namespaces: NamespaceStore) -> None:
    store.migrate(
        "test",
        ["CREATE TABLE ns_settings (namespace TEXT NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE, v TEXT)"],
    )
    namespaces.create("ns")
    with store.transaction() as conn:
        conn.execute("INSERT INTO ns_settings VALUES ('ns', 'x')")
    namespaces.delete("ns")
    with store.read() as conn:
        assert conn.execute("SELECT count(*) FROM ns_settings").fetchone() == (0,)


def test_ensure_joins_an_open_transaction(store: MetadataStore, namespaces: NamespaceStore) -> None:
    store.migrate("test", [WIDGETS])
    with pytest.raises(RuntimeError, match="boom"), store.transaction() as conn:
        namespaces.ensure("joined")
        conn.execute("INSERT INTO widgets VALUES ('joined', 'w')")
        raise RuntimeError("boom")
    assert not namespaces.exists("joined")

    with store.transaction() as conn:
        namespaces.ensure("joined")
        conn.execute("INSERT INTO widgets VALUES ('joined', 'w')")
    assert namespaces.exists("joined")


# -- the store -----------------------------------------------------------------------------------


def test_wal_mode_and_foreign_keys_are_on_in_every_thread(store: MetadataStore) -> None:
    seen: list[tuple[str, int, int]] = []

    def probe() -> None:
        with store.read() as conn:
            seen.append(
                (
                    conn.execute("PRAGMA journal_mode").fetchone()[0],
                    conn.execute("PRAGMA foreign_keys").fetchone()[0],
                    conn.execute("PRAGMA synchronous").fetchone()[0],
                )
            )

    probe()
    worker = threading.Thread(target=probe)
    worker.start()
    worker.join()
    assert seen == [("wal", 1, 1), ("wal", 1, 1)]  # synchronous 1 = NORMAL


def test_foreign_keys_are_enforced(store: MetadataStore) -> None:
    store.migrate("test", [WIDGETS])
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as conn:
        conn.execute("INSERT INTO widgets VALUES ('no-such-namespace', 'w')")


def test_core_schema_is_version_1(store: MetadataStore) -> None:
    assert store.schema_version("core") == 1
    assert store.schema_version("never-migrated") == 0
    assert store.integrity_check() == "ok"


def test_migrations_apply_once_and_in_order(tmp_path: Path) -> None:
    applied: list[str] = []

    def second(conn: sqlite3.Connection) -> None:
        applied.append("second")
        conn.execute("INSERT INTO things (v) VALUES ('from step 2')")

    def third(conn: sqlite3.Connection) -> None:
        applied.append("third")
        conn.execute("ALTER TABLE things ADD COLUMN extra TEXT NOT NULL DEFAULT 'x'")

    first = """
        CREATE TABLE things (v TEXT NOT NULL);
        -- a trigger's body and a string literal hold semicolons: the script must not be cut there
        CREATE TRIGGER things_upper AFTER INSERT ON things BEGIN
            UPDATE things SET v = upper(v) WHERE rowid = new.rowid;
        END;
        INSERT INTO things (v) VALUES ('a;b');
    """
    with MetadataStore(tmp_path / "meta.db") as store:
        assert store.migrate("test", [first, second]) == 2
        assert store.migrate("test", [first, second]) == 2
        assert applied == ["second"]
    with MetadataStore(tmp_path / "meta.db") as store:
        assert store.migrate("test", [first, second, third]) == 3
        assert applied == ["second", "third"]
        assert store.schema_version("test") == 3
        assert store.schema_version("core") == 1
        with store.read() as conn:
            rows = conn.execute("SELECT v, extra FROM things ORDER BY rowid").fetchall()
        assert rows == [("A;B", "x"), ("FROM STEP 2", "x")]


def test_failed_migration_keeps_the_previous_version(store: MetadataStore) -> None:
    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        raise ValueError("step 2 is broken")

    with pytest.raises(ValueError, match="step 2 is broken") as raised:
        store.migrate("test", ["CREATE TABLE step_one (x)", broken])
    assert any("migration 2 of 'test'" in note for note in raised.value.__notes__)
    assert store.schema_version("test") == 1
    with store.read() as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "step_one" in tables
    assert "half_done" not in tables


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    with MetadataStore(tmp_path / "meta.db") as store:
        store.migrate("test", ["CREATE TABLE a (x)", "CREATE TABLE b (x)"])
        with pytest.raises(FailedPrecondition) as raised:
            store.migrate("test", ["CREATE TABLE a (x)"])
        assert str(raised.value) == (
            "metadata schema of test is version 2 but this containerkit knows only 1: "
            "it was written by a newer containerkit; upgrade or restore a backup"
        )
        with store.transaction() as conn:
            conn.execute("UPDATE schema_versions SET version = 7 WHERE component = 'core'")
    with pytest.raises(FailedPrecondition, match=r"^metadata schema of core is version 7 but .* knows only 1"):
        MetadataStore(tmp_path / "meta.db")


def test_server_uuid_persists_across_reopen(tmp_path: Path) -> None:
    with MetadataStore(tmp_path / "meta.db") as store:
        first = store.server_uuid()
        assert store.server_uuid() == first
    assert uuid.UUID(first).version == 4
    with MetadataStore(tmp_path / "meta.db") as store:
        assert store.server_uuid() == first
    with MetadataStore(tmp_path / "other.db") as store:
        assert store.server_uuid() != first


def test_failed_mutation_rolls_back(store: MetadataStore, namespaces: NamespaceStore) -> None:
    namespaces.create("kept")
    with pytest.raises(KeyError), store.transaction() as conn:
        conn.execute("INSERT INTO namespaces VALUES ('lost', 0, 0)")
        conn.execute("DELETE FROM namespaces WHERE name = 'kept'")
        raise KeyError("half way")
    assert [name for name, _ in namespaces.list()] == ["kept"]


def test_nested_transaction_failure_undoes_only_the_inner_block(
    store: MetadataStore, namespaces: NamespaceStore
) -> None:
    with store.transaction():
        namespaces.create("outer")
        with pytest.raises(AlreadyExists):
            namespaces.create("outer")
        with pytest.raises(LookupError), store.transaction() as conn:
            conn.execute("INSERT INTO namespaces VALUES ('inner', 0, 0)")
            raise LookupError
        assert not namespaces.exists("inner")
    assert [name for name, _ in namespaces.list()] == ["outer"]


def test_transaction_inside_read_is_refused(store: MetadataStore) -> None:
    with store.read(), pytest.raises(RuntimeError, match="inside read"), store.transaction():
        pass
    with store.transaction():  # the store is usable afterwards
        pass


def test_read_sees_one_snapshot(store: MetadataStore, namespaces: NamespaceStore) -> None:
    namespaces.create("a")
    with store.read() as conn:
        before = conn.execute("SELECT count(*) FROM namespaces").fetchone()
        writer = threading.Thread(target=namespaces.create, args=("b",))
        writer.start()
        writer.join()
        assert conn.execute("SELECT count(*) FROM namespaces").fetchone() == before
    assert namespaces.exists("b")


def test_concurrent_writers_from_threads(store: MetadataStore, namespaces: NamespaceStore) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(worker: int) -> None:
        try:
            start.wait()
            for i in range(25):
                namespaces.create(f"w{worker}-n{i}", {"worker": str(worker)})
                namespaces.set_label("shared", f"w{worker}", str(i))
                namespaces.labels(f"w{worker}-n{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    listed = dict(namespaces.list())
    assert len(listed) == 8 * 25 + 1
    assert listed["shared"] == {f"w{n}": "24" for n in range(8)}
    assert store.integrity_check() == "ok"


def test_busy_database_is_unavailable(tmp_path: Path) -> None:
    with MetadataStore(tmp_path / "meta.db") as holder, MetadataStore(tmp_path / "meta.db", busy_timeout=0.05) as other:
        with holder.transaction(), pytest.raises(Unavailable, match="locked"), other.transaction():
            pass
        with other.transaction():  # free again once the holder committed
            pass


def test_a_writer_of_the_same_store_waits_in_turn_then_is_unavailable(tmp_path: Path) -> None:
    """Writers of one store in one process queue on the store's own lock: the next one goes as soon as the
    holder commits, and one that waits longer than busy_timeout gets Unavailable, as at sqlite's lock."""
    with MetadataStore(tmp_path / "meta.db", busy_timeout=1.0) as store:
        holding, release = threading.Event(), threading.Event()
        outcome: list[str] = []

        def hold() -> None:
            with store.transaction() as conn:
                conn.execute("INSERT INTO namespaces (name, created_at, updated_at) VALUES ('held', 0, 0)")
                holding.set()
                release.wait(10)

        def write() -> None:
            try:
                with store.transaction() as conn:
                    conn.execute("INSERT INTO namespaces (name, created_at, updated_at) VALUES ('next', 0, 0)")
                outcome.append("written")
            except Unavailable as err:
                outcome.append(str(err))

        holder = threading.Thread(target=hold)
        holder.start()
        assert holding.wait(10)
        write()  # waits 1 s behind the holder, then gives up
        assert len(outcome) == 1 and "locked by another writer" in outcome[0]
        waiter = threading.Thread(target=write)
        waiter.start()
        release.set()
        holder.join(10)
        waiter.join(10)
        assert outcome[1] == "written"
        with store.read() as conn:
            names = {row[0] for row in conn.execute("SELECT name FROM namespaces")}
        assert {"held", "next"} <= names


def test_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "meta.db")
    store.close()
    store.close()
    with pytest.raises(Unavailable, match="closed"):
        NamespaceStore(store).labels("default")


def test_committed_mutation_survives_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "meta.db"
    script = (
        "import os, signal, sys\n"
        "from core.metadata import MetadataStore, NamespaceStore\n"
        "store = MetadataStore(sys.argv[1])\n"
        "NamespaceStore(store).create('survivor', {'k': 'v'})\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    child = subprocess.run([sys.executable, "-c", script, str(db)], cwd=REPO, capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    with MetadataStore(db) as store:
        assert NamespaceStore(store).labels("survivor") == {"k": "v"}
        assert store.integrity_check() == "ok"


def test_full_database_is_enospc_and_rolls_back(store: MetadataStore, namespaces: NamespaceStore) -> None:
    namespaces.create("before")
    with store.read() as conn:
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")  # this connection only: a "disk" that is full
    with pytest.raises(OSError) as raised:
        namespaces.create("big", {f"k{i}": "v" * 4000 for i in range(20)})
    assert raised.value.errno == errno.ENOSPC
    assert [name for name, _ in namespaces.list()] == ["before"]
