"""The local content store (plugin ``content.local``), used as a library on real directories."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.config import ConfigError, from_table
from core.content import Info
from core.digest import Digest
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from core.plugin import InitContext
from core.types import Descriptor
from plugins.content_local import MAX_REF_BYTES, LocalContentConfig, LocalContentStore, plugin

MiB = 1 << 20
INGEST_FILES = {"ref", "data", "startedat", "updatedat", "total", "expected", "lock"}


def sha256(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def pattern(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


def ingest_dirs(root: Path) -> list[Path]:
    return sorted((root / "ingest").iterdir())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "content"


@pytest.fixture
def store(root: Path) -> LocalContentStore:
    s = LocalContentStore(root)
    yield s
    s.close()


# -- blobs ---------------------------------------------------------------------------------------


def test_committed_blob_is_a_read_only_file_named_by_digest(store: LocalContentStore, root: Path) -> None:
    data = b"hello, content"
    with store.writer("ref-1", len(data), sha256(data)) as w:
        assert w.write(data) == len(data)
        assert w.digest() == sha256(data)
        assert w.commit(len(data), sha256(data)) == sha256(data)
    path = root / "blobs" / "sha256" / sha256(data).hex
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o444
    assert blob_files(root) == [path]
    assert ingest_dirs(root) == []
    info = store.info(sha256(data))
    assert (info.digest, info.size, info.labels) == (sha256(data), len(data), {})
    assert abs(info.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert store.read_blob(Descriptor("application/octet-stream", sha256(data), len(data))) == data


def test_reader_at_offset(store: LocalContentStore) -> None:
    data = pattern(3 * MiB + 17)
    digest = store.write_blob("r", data)
    with store.reader_at(digest) as reader:
        assert reader.size == len(data)
        assert reader.read(0, 10) == data[:10]
        assert reader.read(MiB + 5, 2 * MiB) == data[MiB + 5 : 3 * MiB + 5]
        assert reader.read(len(data) - 3, 100) == data[-3:]
        assert reader.read(len(data), 10) == b""
        assert reader.read(len(data) + 100, 10) == b""
        assert reader.read(5, 0) == b""
        assert b"".join(reader.chunks(offset=1000, chunk_size=MiB)) == data[1000:]
        with pytest.raises(InvalidArgument):
            reader.read(-1, 10)
        with pytest.raises(InvalidArgument):
            reader.read(0, -1)
    with pytest.raises(FailedPrecondition):
        reader.read(0, 1)
    reader.close()  # idempotent


def test_reader_stays_valid_when_blob_is_deleted(store: LocalContentStore) -> None:
    data = pattern(MiB)
    digest = store.write_blob("r", data)
    with store.reader_at(digest) as reader:
        store.delete(digest)
        with pytest.raises(NotFound):
            store.info(digest)
        assert reader.read(0, len(data)) == data


def test_missing_blob_is_not_found(store: LocalContentStore) -> None:
    missing = sha256(b"absent")
    for call in (store.info, store.reader_at, store.delete, store.read_blob):
        with pytest.raises(NotFound):
            call(missing)
    with pytest.raises(NotFound):
        store.update(Info(missing, labels={"a": "b"}))


def test_delete_removes_blob_and_labels(store: LocalContentStore, root: Path) -> None:
    digest = store.write_blob("r", b"x", labels={"k": "v"})
    store.delete(digest)
    assert blob_files(root) == []
    assert not any(p.is_file() for p in (root / "labels").rglob("*"))
    assert list(store.walk()) == []
    digest = store.write_blob("r", b"x")  # committed again: no stale labels come back
    assert store.info(digest).labels == {}


def test_labels_are_set_on_commit_updated_and_kept_across_restart(root: Path) -> None:
    store = LocalContentStore(root)
    digest = store.write_blob("r", b"data", labels={"a": "1", "b": "2"})
    assert store.info(digest).labels == {"a": "1", "b": "2"}
    info = store.update(Info(digest, labels={"b": "", "c": "3"}), ["labels.b", "labels.c"])
    assert info.labels == {"a": "1", "c": "3"}
    assert store.update(Info(digest, labels={"z": "9"})).labels == {"z": "9"}  # no paths: replace all
    assert LocalContentStore(root).info(digest).labels == {"z": "9"}
    with pytest.raises(InvalidArgument):
        store.update(Info(digest, labels={"a": "1"}), ["size"])
    with pytest.raises(InvalidArgument):
        store.update(Info(digest, labels={"": "empty key"}))
    with pytest.raises(InvalidArgument):
        store.update(Info(digest, labels={"k": "v" * 5000}))
    with pytest.raises(InvalidArgument), store.writer("bad-labels") as w:
        w.write(b"other")
        w.commit(labels={"k": "v" * 5000})
    assert store.status("bad-labels").offset == 5  # an invalid commit keeps the ingest
    assert store.info(digest).labels == {"z": "9"}


def test_walk_with_filters(store: LocalContentStore) -> None:
    small = store.write_blob("a", b"a", labels={"kind": "config", "x.y": "1"})
    big = store.write_blob("b", b"b" * 100, labels={"kind": "layer"})
    bare = store.write_blob("c", b"c" * 7)
    assert {i.digest for i in store.walk()} == {small, big, bare}
    assert [i.digest for i in store.walk(["labels.kind==layer"])] == [big]
    assert {i.digest for i in store.walk(["labels.kind==layer", "size==7"])} == {big, bare}
    assert [i.digest for i in store.walk([f"digest=={small}"])] == [small]
    assert [i.digest for i in store.walk(['labels."x.y"'])] == [small]
    assert {i.digest for i in store.walk(["labels.kind!=config"])} == {big, bare}
    assert [i.digest for i in store.walk(["size~=^10"])] == [big]
    with pytest.raises(InvalidArgument):
        store.walk(["labels.kind=="])


@pytest.mark.parametrize(
    "bad",
    [
        "sha256:../../etc/passwd",
        "../../etc/passwd",
        "/etc/passwd",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 63 + "/",
        "md5:" + "a" * 32,
        "sha256/" + "a" * 64,
        "sha256:" + "a" * 64 + "\0",
        "",
    ],
)
def test_invalid_digests_are_invalid_argument(store: LocalContentStore, bad: str) -> None:
    for call in (store.info, store.reader_at, store.delete):
        with pytest.raises(InvalidArgument):
            call(bad)
    with pytest.raises(InvalidArgument):
        store.writer("r", 0, bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument), store.writer("r") as w:
        w.commit(0, bad)  # type: ignore[arg-type]


def test_unvalidated_digest_objects_never_become_paths(store: LocalContentStore, tmp_path: Path) -> None:
    forged = str.__new__(Digest, "sha256:../../../secret")  # a Digest that skipped validation
    (tmp_path / "secret").write_text("do not touch")
    for call in (store.info, store.reader_at, store.delete):
        with pytest.raises(InvalidArgument):
            call(forged)
    assert (tmp_path / "secret").exists()


# -- ingests ---------------------------------------------------------------------------------------


def test_commit_with_wrong_digest_keeps_ingest(store: LocalContentStore, root: Path) -> None:
    data = b"some bytes"
    with store.writer("r") as w:
        w.write(data)
        with pytest.raises(FailedPrecondition, match="unexpected commit digest"):
            w.commit(len(data), sha256(b"other bytes"))
        with pytest.raises(FailedPrecondition):
            w.write(b"more")  # commit always releases the writer
    assert blob_files(root) == []
    assert store.status("r").offset == len(data)
    with store.writer("r") as w:  # retry with the right digest
        assert w.offset == len(data)
        assert w.commit(len(data), sha256(data)) == sha256(data)
    assert store.list_statuses() == []


def test_commit_with_wrong_size_keeps_ingest(store: LocalContentStore, root: Path) -> None:
    with store.writer("r") as w:
        w.write(b"12345")
        with pytest.raises(FailedPrecondition, match="unexpected commit size 5, expected 6"):
            w.commit(6)
    assert blob_files(root) == []
    with store.writer("r") as w:
        w.write(b"6")
        assert w.commit(6) == sha256(b"123456")


def test_commit_of_existing_blob_is_already_exists_and_removes_ingest(store: LocalContentStore, root: Path) -> None:
    digest = store.write_blob("first", b"same", labels={"keep": "me"})
    with store.writer("second") as w:
        w.write(b"same")
        with pytest.raises(AlreadyExists):
            w.commit(4, digest, labels={"other": "x"})
    assert store.list_statuses() == []
    assert ingest_dirs(root) == []
    assert store.info(digest).labels == {"keep": "me"}
    assert store.write_blob("third", b"same") == digest  # the helper counts it as success


def test_writer_for_committed_digest_is_already_exists(store: LocalContentStore) -> None:
    digest = store.write_blob("r", b"present")
    with pytest.raises(AlreadyExists):
        store.writer("r2", 7, digest)
    with pytest.raises(NotFound):
        store.status("r2")


def test_second_writer_on_locked_ref_is_unavailable(store: LocalContentStore) -> None:
    w = store.writer("busy")
    with pytest.raises(Unavailable, match="ref 'busy' is locked"):
        store.writer("busy")
    with pytest.raises(Unavailable):
        store.abort("busy")
    w.close()
    w.close()  # idempotent
    with store.writer("busy") as again:
        assert again.offset == 0
    store.abort("busy")
    with pytest.raises(NotFound):
        store.status("busy")


def test_second_store_on_same_root_sees_the_lock(root: Path) -> None:
    one, two = LocalContentStore(root), LocalContentStore(root)
    with one.writer("shared") as w:
        w.write(b"x" * MiB)
        with pytest.raises(Unavailable, match="locked"):
            two.writer("shared")
        with pytest.raises(Unavailable):
            two.abort("shared")
        assert two.status("shared").offset == MiB
    with two.writer("shared") as w:
        assert w.offset == MiB


def test_writer_resumes_at_recorded_offset(store: LocalContentStore) -> None:
    data = pattern(5 * MiB + 123)
    with store.writer("resume", len(data)) as w:
        w.write(data[: 2 * MiB + 7])
    status = store.status("resume")
    assert (status.ref, status.offset, status.total) == ("resume", 2 * MiB + 7, len(data))
    with store.writer("resume") as w:
        assert w.offset == 2 * MiB + 7
        assert w.digest() == sha256(data[: 2 * MiB + 7])
        w.write(data[2 * MiB + 7 :])
        assert w.commit(len(data), sha256(data)) == sha256(data)
    assert store.read_blob(sha256(data)) == data


def test_small_writes_are_buffered_but_counted(store: LocalContentStore) -> None:
    pieces = [pattern(n, seed=n) for n in (1, 100, 4096, 70000, 3, 2 * MiB, 5, 65535)]
    with store.writer("small") as w:
        written = b""
        for piece in pieces:
            w.write(memoryview(piece))
            written += piece
            assert w.offset == len(written)
            assert store.status("small").offset == len(written)
        assert w.status().offset == len(written)
        assert w.digest() == sha256(written)
    assert store.status("small").offset == len(written)  # flushed on close
    with store.writer("small") as w:
        assert w.commit(len(written), sha256(written)) == sha256(written)


def test_expected_size_contradicting_total_is_failed_precondition(store: LocalContentStore) -> None:
    with store.writer("sized", 10):
        pass
    with pytest.raises(FailedPrecondition, match="total size 10"):
        store.writer("sized", 11)
    with store.writer("sized", 10) as w, store.writer("other") as other:
        assert w.status().total == 10
        assert other.status().total == 0
    with pytest.raises(InvalidArgument):
        store.writer("neg", -1)


def test_truncate_restarts_and_rehashes(store: LocalContentStore) -> None:
    with store.writer("t") as w:
        w.write(b"abcdef")
        w.truncate(3)
        assert (w.offset, w.digest()) == (3, sha256(b"abc"))
        with pytest.raises(InvalidArgument):
            w.truncate(4)
        w.truncate(0)
        assert (w.offset, w.digest()) == (0, sha256(b""))
        w.write(b"xyz")
        assert w.commit(3, sha256(b"xyz")) == sha256(b"xyz")


def test_writer_methods_fail_after_close(store: LocalContentStore) -> None:
    w = store.writer("closed")
    w.close()
    for call in (lambda: w.write(b"x"), w.digest, w.commit, lambda: w.truncate(0), w.status):
        with pytest.raises(FailedPrecondition):
            call()
    assert w.ref == "closed"


def test_status_list_and_abort(store: LocalContentStore, root: Path) -> None:
    for ref in ("ns-a/layer-1", "ns-a/layer-2", "ns-b/config"):
        with store.writer(ref, 100, sha256(ref.encode())) as w:
            w.write(b"x" * len(ref))
    statuses = {s.ref: s for s in store.list_statuses()}
    assert set(statuses) == {"ns-a/layer-1", "ns-a/layer-2", "ns-b/config"}
    assert statuses["ns-b/config"].offset == len("ns-b/config")
    assert statuses["ns-b/config"].expected == sha256(b"ns-b/config")
    assert statuses["ns-b/config"].total == 100
    assert statuses["ns-b/config"].started_at <= statuses["ns-b/config"].updated_at
    assert [s.ref for s in store.list_statuses(["ref~=^ns-a/"])] == sorted(
        ["ns-a/layer-1", "ns-a/layer-2"], key=lambda r: hashlib.sha256(r.encode()).hexdigest()
    )
    assert [s.ref for s in store.list_statuses(["ref==ns-b/config"])] == ["ns-b/config"]
    with pytest.raises(InvalidArgument):
        store.list_statuses(["ref=="])
    store.abort("ns-a/layer-1")
    with pytest.raises(NotFound):
        store.abort("ns-a/layer-1")
    with pytest.raises(NotFound):
        store.status("ns-a/layer-1")
    assert len(ingest_dirs(root)) == 2


def test_unknown_ref_is_not_found(store: LocalContentStore) -> None:
    with pytest.raises(NotFound):
        store.status("nope")
    with pytest.raises(NotFound):
        store.abort("nope")


@pytest.mark.parametrize(
    "ref",
    [
        "../../etc",
        "../../../../../../tmp/escaped",
        "/abs",
        "/",
        "a/../../b",
        "..",
        ".",
        "lock",
        "nul\0byte",
        "\0",
        "line\r\nbreak",
        "ünïcødé/😀",
        "x" * MAX_REF_BYTES,
    ],
)
def test_ref_with_dotdot_stays_inside_ingest_dir(tmp_path: Path, ref: str) -> None:
    root = tmp_path / "deep" / "content"
    store = LocalContentStore(root)
    with store.writer(ref) as w:
        w.write(b"payload")
    (folder,) = ingest_dirs(root)
    assert folder.name == hashlib.sha256(ref.encode()).hexdigest()
    assert {p.name for p in folder.iterdir()} <= INGEST_FILES
    assert (folder / "ref").read_bytes() == ref.encode()
    outside = [p for p in tmp_path.rglob("*") if root not in p.parents and p != root]
    assert outside == [tmp_path / "deep"]
    assert [s.ref for s in LocalContentStore(root).list_statuses()] == [ref]
    assert store.status(ref).offset == 7
    with store.writer(ref) as w:
        assert w.commit(7) == sha256(b"payload")
    assert ingest_dirs(root) == []


@pytest.mark.parametrize("ref", ["", "x" * (MAX_REF_BYTES + 1), "é" * (MAX_REF_BYTES // 2 + 1), "\udc80", None, b"r"])
def test_empty_overlong_or_non_text_ref_is_invalid_argument(store: LocalContentStore, root: Path, ref: object) -> None:
    for call in (store.writer, store.status, store.abort):
        with pytest.raises(InvalidArgument):
            call(ref)  # type: ignore[arg-type]
    assert ingest_dirs(root) == []


def test_sha512_ingest(store: LocalContentStore, root: Path) -> None:
    data = b"sha512 please"
    expected = Digest("sha512:" + hashlib.sha512(data).hexdigest())
    with store.writer("s", len(data), expected) as w:
        w.write(data)
        assert w.digest() == expected
        assert w.commit(len(data), expected) == expected
    assert blob_files(root) == [root / "blobs" / "sha512" / expected.hex]
    with store.writer("s256") as w:  # hashed as sha256, committed against a sha512: rehashed
        w.write(b"other")
        assert w.commit(5, Digest("sha512:" + hashlib.sha512(b"other").hexdigest())).algorithm == "sha512"


def test_concurrent_writers_on_different_refs(store: LocalContentStore) -> None:
    blobs = {f"ref-{i}": pattern(2 * MiB + i * 1000, seed=i) for i in range(8)}
    errors: list[BaseException] = []

    def ingest(ref: str, data: bytes) -> None:
        try:
            with store.writer(ref, len(data), sha256(data)) as w:
                for start in range(0, len(data), 100_000):
                    w.write(data[start : start + 100_000])
                w.commit(len(data), sha256(data))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=ingest, args=item) for item in blobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert {i.digest for i in store.walk()} == {sha256(d) for d in blobs.values()}
    for data in blobs.values():
        assert store.read_blob(sha256(data)) == data
    assert store.list_statuses() == []


def test_concurrent_writers_on_one_ref_get_one_lock(store: LocalContentStore) -> None:
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def race() -> None:
        barrier.wait()
        try:
            writer = store.writer("contended")
        except Unavailable:
            outcomes.append("unavailable")
            return
        outcomes.append("writer")
        time.sleep(0.2)
        writer.close()

    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["unavailable"] * 7 + ["writer"]


def test_large_blob_streams_with_flat_memory(store: LocalContentStore, root: Path) -> None:
    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc/self/status")

    chunk = pattern(MiB)
    total = 256 * MiB
    expected = hashlib.sha256()
    for _ in range(total // MiB):
        expected.update(chunk)
    before = peak = rss()
    with store.writer("big", total) as w:
        for i in range(total // MiB):
            w.write(chunk if i % 2 else memoryview(chunk)[: MiB // 2])
            if i % 2 == 0:
                w.write(memoryview(chunk)[MiB // 2 :])
            peak = max(peak, rss())
        digest = w.commit(total, Digest("sha256:" + expected.hexdigest()))
        peak = max(peak, rss())
    with store.reader_at(digest) as reader:
        for piece in reader.chunks():
            assert len(piece) <= MiB
        peak = max(peak, rss())
    assert peak - before < 64 * MiB
    assert (root / "blobs" / "sha256" / digest.hex).stat().st_size == total


# -- failures and restarts -------------------------------------------------------------------------

_CHILD = """
import random, sys, time
from plugins.content_local import LocalContentStore
store = LocalContentStore(sys.argv[1])
data = random.Random(11).randbytes(8 << 20)
writer = store.writer("layer-1", len(data))
for start in range(0, 3 << 20, 1 << 20):
    writer.write(data[start : start + (1 << 20)])
print("written", flush=True)
time.sleep(120)
"""


def test_killed_writer_resumes_after_restart(root: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "written", child.stderr.read() if child.stderr else ""
        live = LocalContentStore(root)
        with pytest.raises(Unavailable, match="locked"):
            live.writer("layer-1")  # the child holds the ref's flock
        with pytest.raises(Unavailable):
            live.abort("layer-1")
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    data = random.Random(11).randbytes(8 << 20)

    store = LocalContentStore(root)  # "after the restart"
    (status,) = store.list_statuses()
    assert (status.ref, status.offset, status.total) == ("layer-1", 3 * MiB, len(data))
    assert store.status("layer-1").offset == 3 * MiB
    assert blob_files(root) == []
    with store.writer("layer-1", len(data)) as w:
        assert w.offset == 3 * MiB
        assert w.digest() == sha256(data[: 3 * MiB])
        w.write(data[w.offset :])
        assert w.commit(len(data), sha256(data)) == sha256(data)
    assert blob_files(root) == [root / "blobs" / "sha256" / sha256(data).hex]
    assert store.read_blob(sha256(data)) == data
    assert store.list_statuses() == []


def test_interrupted_commit_debris_is_cleaned_at_init(root: Path) -> None:
    store = LocalContentStore(root)
    published, pending = b"published before the crash", b"chmodded before the crash"
    for ref, data in (("published", published), ("pending", pending)):
        with store.writer(ref) as w:
            w.write(data)
    folder = {s.ref: root / "ingest" / hashlib.sha256(s.ref.encode()).hexdigest() for s in store.list_statuses()}
    # crash after the data was linked into blobs/, before the ingest was removed
    (folder["published"] / "data").chmod(0o444)
    (root / "blobs" / "sha256").mkdir(exist_ok=True)
    os.link(folder["published"] / "data", root / "blobs" / "sha256" / sha256(published).hex)
    # crash after the data was made read-only, before it was linked
    (folder["pending"] / "data").chmod(0o444)
    # temp labels file of a dead process, labels of a blob that never appeared, a half-created ingest
    (root / "labels" / "sha256").mkdir(parents=True, exist_ok=True)
    dead_pid = 1 << 23  # above the kernel's pid_max
    (root / "labels" / "sha256" / f".tmp-{dead_pid}-1-{sha256(b'x').hex}").write_text("{}")
    (root / "labels" / "sha256" / sha256(b"never committed").hex).write_text('{"a": "b"}')
    (root / "ingest" / ("0" * 64)).mkdir()
    (root / "ingest" / ("0" * 64) / "data").write_bytes(b"orphan")

    store = LocalContentStore(root)
    assert [s.ref for s in store.list_statuses()] == ["pending"]
    assert sorted(p.name for p in (root / "ingest").iterdir()) == [folder["pending"].name]
    assert list((root / "labels" / "sha256").iterdir()) == []
    assert store.read_blob(sha256(published)) == published
    with store.writer("pending") as w:
        assert w.offset == len(pending)
        assert w.commit(len(pending), sha256(pending)) == sha256(pending)
    assert blob_files(root) == sorted(root / "blobs" / "sha256" / sha256(d).hex for d in (published, pending))
    assert (root / "blobs" / "sha256" / sha256(pending).hex).stat().st_nlink == 1


def test_stale_ingests_are_cleaned(root: Path) -> None:
    store = LocalContentStore(root, ingest_expiry=3600)
    for ref in ("old", "fresh"):
        with store.writer(ref) as w:
            w.write(b"abc")
    held = store.writer("held")
    later = datetime.now(UTC) + timedelta(hours=2)
    assert store.cleanup_stale_ingests(now=datetime.now(UTC)) == []
    assert sorted(store.cleanup_stale_ingests(now=later)) == ["fresh", "old"]  # "held" is locked
    assert [s.ref for s in store.list_statuses()] == ["held"]
    held.close()
    assert store.cleanup_stale_ingests(now=later.timestamp()) == ["held"]

    # at init: an ingest last written (updatedat and data mtime) two hours ago goes
    with store.writer("old") as w:
        w.write(b"abc")
    with store.writer("fresh") as w:
        w.write(b"abc")
    folder = root / "ingest" / hashlib.sha256(b"old").hexdigest()
    past = datetime.now(UTC) - timedelta(hours=2)
    (folder / "updatedat").write_text(past.isoformat())
    os.utime(folder / "data", (past.timestamp(), past.timestamp()))
    assert store.status("old").updated_at == past
    restarted = LocalContentStore(root, ingest_expiry=3600)
    assert [s.ref for s in restarted.list_statuses()] == ["fresh"]


def _mount_tmpfs(path: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")


def test_full_disk_leaves_no_partial_blob() -> None:
    mountpoint = Path(tempfile.mkdtemp(prefix="ck-fulldisk-"))
    mounted = False
    try:
        _mount_tmpfs(mountpoint, "2m")
        mounted = True
        root = mountpoint / "content"
        store = LocalContentStore(root)
        chunk = pattern(MiB)
        w = store.writer("too-big", 4 * MiB)
        with pytest.raises(OSError) as caught:
            for _ in range(4):
                w.write(chunk)
        assert caught.value.errno == errno.ENOSPC
        assert "no space left on device writing ingest ref 'too-big'" in str(caught.value)
        on_disk = (root / "ingest" / hashlib.sha256(b"too-big").hexdigest() / "data").read_bytes()
        assert 0 < len(on_disk) < 2 * MiB
        assert w.offset == len(on_disk) == store.status("too-big").offset
        assert w.digest() == sha256(on_disk)  # what was hashed is exactly what reached the disk
        with pytest.raises(FailedPrecondition):
            w.commit(4 * MiB)
        assert blob_files(root) == []
        store.abort("too-big")
        assert store.list_statuses() == []
        digest = store.write_blob("small", b"fits now")  # space is back: the store still works
        assert store.read_blob(digest) == b"fits now"
        assert blob_files(root) == [root / "blobs" / "sha256" / digest.hex]
    finally:
        if mounted:
            subprocess.run(["umount", str(mountpoint)], check=True)
        shutil.rmtree(mountpoint, ignore_errors=True)


# -- plugin ----------------------------------------------------------------------------------------


def test_plugin_init_creates_root_and_exports_it(tmp_path: Path) -> None:
    root = tmp_path / "daemon" / "content.local"
    ctx = InitContext(
        type="content",
        id="local",
        root=root,
        state=tmp_path / "state",
        config=from_table(LocalContentConfig, {"ingest_expiry_seconds": 60}),
        metadata=None,  # type: ignore[arg-type]
        hooks=None,  # type: ignore[arg-type]
        events=None,  # type: ignore[arg-type]
        daemon_root=tmp_path / "daemon",
    )
    store = plugin.init(ctx)
    assert isinstance(store, LocalContentStore)
    assert store.ingest_expiry == 60
    assert ctx.exports == {"root": str(root)}
    assert root.stat().st_mode & 0o777 == 0o700
    assert plugin.config is LocalContentConfig


def test_config_rejects_non_positive_expiry() -> None:
    assert LocalContentConfig().ingest_expiry_seconds == 7 * 24 * 3600
    with pytest.raises(ConfigError, match="ingest_expiry_seconds"):
        from_table(LocalContentConfig, {"ingest_expiry_seconds": 0})
    with pytest.raises(ValueError):
        LocalContentStore(tempfile.gettempdir(), ingest_expiry=-1)


def test_entry_point_names_the_plugin() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="containerkit.content") if e.name == "local"]
    assert ep.value == "plugins.content_local:plugin"
    assert ep.load() is plugin


def test_import_is_light() -> None:
    code = (
        "import sys; before = set(sys.modules); import plugins.content_local; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new - set(sys.stdlib_module_names) - {'core', 'plugins'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
