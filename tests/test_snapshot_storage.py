"""core.snapshot_storage: the bookkeeping every directory snapshotter shares, its crash safety and concurrency.

The snapshotter here is the smallest real subclass (every snapshot a bind of its own ``fs``), so
these tests pin the shared semantics independently of overlayfs or aufs mounts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.plugin import SkipPlugin
from core.snapshot import Info, Kind, Usage
from core.snapshot_storage import DirectorySnapshotter, Snapshot, disk_usage, require_filesystem
from core.types import Mount

REPO = Path(__file__).resolve().parent.parent


class PlainSnapshotter(DirectorySnapshotter):
    """Records the Snapshot each mounts call got; mounts are a bind of the snapshot's own fs."""

    def __init__(self, root: Path) -> None:
        self.seen: list[Snapshot] = []
        super().__init__(root)

    def _mounts(self, snapshot: Snapshot) -> list[Mount]:
        self.seen.append(snapshot)
        return [Mount("bind", str(self.fs_path(snapshot.id)), ("rbind",))]


@pytest.fixture
def sn(tmp_path: Path) -> Iterator[PlainSnapshotter]:
    snapshotter = PlainSnapshotter(tmp_path / "root")
    yield snapshotter
    snapshotter.close()


def committed(sn: DirectorySnapshotter, name: str, parent: str = "", files: dict[str, str] | None = None) -> str:
    """Prepare, write ``files`` into the layer, commit as ``name``; return the snapshot's id."""
    key = f"{name}-active"
    sn.prepare(key, parent)
    id = snapshot_id(sn, key)
    for path, content in (files or {}).items():
        (sn.fs_path(id) / path).write_text(content)
    sn.commit(name, key)
    return id


def snapshot_id(sn: PlainSnapshotter | DirectorySnapshotter, key: str) -> str:
    """The directory id behind ``key`` (from the mount source of an active snapshot or view)."""
    (mount,) = sn.mounts(key)
    return Path(mount.source).parent.name


def dirs(sn: DirectorySnapshotter) -> list[str]:
    return sorted(os.listdir(sn.root / "snapshots"))


# -- disk_usage ------------------------------------------------------------------------------------


def test_disk_usage_counts_blocks_and_each_inode_once(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "data").write_bytes(b"x" * 10000)
    os.link(root / "sub" / "data", root / "hardlink")
    os.symlink("/usr", root / "symlink")
    with open(root / "sparse", "wb") as sparse:
        sparse.truncate(1 << 30)
    usage = disk_usage(root)
    expected = {os.lstat(p).st_ino: os.lstat(p).st_blocks * 512 for p in (root, root / "sub", root / "sub" / "data")}
    expected[os.lstat(root / "symlink").st_ino] = os.lstat(root / "symlink").st_blocks * 512
    expected[os.lstat(root / "sparse").st_ino] = os.lstat(root / "sparse").st_blocks * 512
    assert usage == Usage(sum(expected.values()), 5)
    assert usage.size < 1 << 20  # the sparse gigabyte takes no blocks, the symlink is not followed


# -- require_filesystem ----------------------------------------------------------------------------


def test_require_filesystem_reads_the_listing(tmp_path: Path) -> None:
    listing = tmp_path / "filesystems"
    listing.write_text("nodev\tsysfs\n\text4\nnodev\toverlay\n")
    require_filesystem("overlay", filesystems=listing)
    require_filesystem("ext4", filesystems=listing)


def test_require_filesystem_skips_with_the_modprobe_failure(tmp_path: Path) -> None:
    listing = tmp_path / "filesystems"
    listing.write_text("nodev\toverlay\n")
    with pytest.raises(SkipPlugin, match=r"^nosuchfs-ck is not in .*filesystems \(modprobe nosuchfs-ck failed: .+\)$"):
        require_filesystem("nosuchfs-ck", filesystems=listing)


# -- the Snapshotter contract ----------------------------------------------------------------------


def test_prepare_commit_stat_and_kinds(sn: PlainSnapshotter) -> None:
    mounts = sn.prepare("a", labels={"x": "1", "empty": ""})
    assert mounts == sn.mounts("a")
    info = sn.stat("a")
    assert (info.kind, info.name, info.parent, info.labels) == (Kind.ACTIVE, "a", "", {"x": "1"})
    assert info.created_at == info.updated_at
    id = snapshot_id(sn, "a")
    sn.commit("A", "a", labels={"y": "2"})
    with pytest.raises(NotFound):
        sn.stat("a")
    info = sn.stat("A")
    assert (info.kind, info.name, info.parent, info.labels) == (Kind.COMMITTED, "A", "", {"y": "2"})
    assert dirs(sn) == [id]  # the commit keeps the directory
    sn.view("v", "A")
    assert sn.stat("v").kind is Kind.VIEW
    assert sn.stat("v").parent == "A"


def test_parent_chain_is_nearest_first(sn: PlainSnapshotter) -> None:
    ids = [committed(sn, "L0")]
    for i in range(1, 4):
        ids.append(committed(sn, f"L{i}", f"L{i - 1}"))
    sn.seen.clear()
    sn.view("v", "L3")
    sn.prepare("p", "L3")
    view, active = sn.seen
    assert view.parent_ids == active.parent_ids == tuple(reversed(ids))
    assert (view.kind, active.kind) == (Kind.VIEW, Kind.ACTIVE)
    sn.seen.clear()
    sn.mounts("p")
    assert sn.seen[0].parent_ids == tuple(reversed(ids))


def test_new_layer_root_is_owned_like_the_parent(sn: PlainSnapshotter) -> None:
    id = committed(sn, "base")
    os.chown(sn.fs_path(id), 1234, 5678)
    sn.prepare("child", "base")
    st = os.stat(sn.fs_path(snapshot_id(sn, "child")))
    assert (st.st_uid, st.st_gid) == (1234, 5678)


@pytest.mark.parametrize(
    "call",
    [
        lambda sn: sn.stat(""),
        lambda sn: sn.usage(""),
        lambda sn: sn.mounts(""),
        lambda sn: sn.prepare(""),
        lambda sn: sn.view("", ""),
        lambda sn: sn.commit("", "k"),
        lambda sn: sn.commit("n", ""),
        lambda sn: sn.remove(""),
        lambda sn: sn.update(Info(Kind.ACTIVE, "")),
    ],
)
def test_empty_key_or_name_is_invalid(sn: PlainSnapshotter, call: Callable[[PlainSnapshotter], object]) -> None:
    with pytest.raises(InvalidArgument, match="must not be empty"):
        call(sn)


def test_creation_errors(sn: PlainSnapshotter) -> None:
    committed(sn, "base")
    sn.prepare("active", "base")
    sn.view("view", "base")
    with pytest.raises(AlreadyExists):
        sn.prepare("active")
    with pytest.raises(AlreadyExists):
        sn.view("base", "")  # one key space for every kind
    with pytest.raises(NotFound, match="parent snapshot 'missing'"):
        sn.prepare("x", "missing")
    for parent in ("active", "view"):
        with pytest.raises(InvalidArgument, match="not committed"):
            sn.prepare("x", parent)
        with pytest.raises(InvalidArgument, match="not committed"):
            sn.view("x", parent)
    with pytest.raises(InvalidArgument, match="label"):
        sn.prepare("x", labels={"k": "v" * 5000})
    assert {info.name for info in sn.walk()} == {"base", "active", "view"}
    assert len(dirs(sn)) == 3


def test_commit_errors(sn: PlainSnapshotter) -> None:
    committed(sn, "base")
    sn.view("view", "base")
    sn.prepare("active", "base")
    with pytest.raises(NotFound):
        sn.commit("n", "missing")
    with pytest.raises(FailedPrecondition, match="view, not active"):
        sn.commit("n", "view")
    with pytest.raises(FailedPrecondition, match="committed, not active"):
        sn.commit("n", "base")
    with pytest.raises(AlreadyExists):
        sn.commit("view", "active")
    with pytest.raises(AlreadyExists):
        sn.commit("active", "active")
    assert sn.stat("active").kind is Kind.ACTIVE


def test_mounts_errors(sn: PlainSnapshotter) -> None:
    committed(sn, "base")
    with pytest.raises(FailedPrecondition, match="committed"):
        sn.mounts("base")
    with pytest.raises(NotFound):
        sn.mounts("missing")


def test_remove_only_a_leaf(sn: PlainSnapshotter) -> None:
    base = committed(sn, "base")
    sn.prepare("child", "base")
    child = snapshot_id(sn, "child")
    with pytest.raises(FailedPrecondition, match="'child' has it as parent"):
        sn.remove("base")
    sn.remove("child")
    assert dirs(sn) == [base]
    sn.remove("base")
    assert dirs(sn) == []
    with pytest.raises(NotFound):
        sn.remove("base")
    assert child not in dirs(sn)


def test_update_labels(sn: PlainSnapshotter) -> None:
    sn.prepare("a", labels={"keep": "1", "drop": "2"})
    before = sn.stat("a")
    info = sn.update(Info(Kind.ACTIVE, "a", labels={"new": "3"}), ["labels.new", "labels.drop"])
    assert info.labels == {"keep": "1", "new": "3"}
    assert info.created_at == before.created_at
    assert info.updated_at > before.updated_at
    assert sn.stat("a") == info
    info = sn.update(Info(Kind.ACTIVE, "a", labels={"only": "x", "blank": ""}))
    assert info.labels == {"only": "x"}
    info = sn.update(replace(info, labels={"only": ""}), ["labels.only"])
    assert info.labels == {}
    for path in ("kind", "parent", "name", "created_at"):
        with pytest.raises(InvalidArgument, match=f'cannot update "{path}"'):
            sn.update(info, [path])
    with pytest.raises(InvalidArgument):
        sn.update(Info(Kind.ACTIVE, "a", labels={"": "x"}))
    with pytest.raises(NotFound):
        sn.update(Info(Kind.ACTIVE, "missing"))


def test_usage_is_computed_while_active_and_fixed_at_commit(sn: PlainSnapshotter) -> None:
    sn.prepare("a")
    fs = sn.fs_path(snapshot_id(sn, "a"))
    empty = sn.usage("a")
    assert empty.inodes == 1
    (fs / "file").write_bytes(b"x" * 8192)
    assert sn.usage("a") == disk_usage(fs)
    assert sn.usage("a").inodes == 2
    recorded = disk_usage(fs)
    sn.commit("A", "a")
    (fs / "later").write_bytes(b"y" * 8192)
    assert sn.usage("A") == recorded
    with pytest.raises(NotFound):
        sn.usage("a")


def test_walk_filters(sn: PlainSnapshotter) -> None:
    sn.prepare("a", labels={"color": "red"})
    sn.commit("A", "a", labels={"color": "blue", "dotted.key": "yes"})
    sn.prepare("b", "A", labels={"color": "red"})
    sn.view("v", "A")

    def names(*filters: str) -> set[str]:
        return {info.name for info in sn.walk(filters)}

    assert names() == {"A", "b", "v"}
    assert names("kind==committed") == {"A"}
    assert names("kind==active", "kind==view") == {"b", "v"}
    assert names("parent==A") == {"b", "v"}
    assert names("parent==A,labels.color==red") == {"b"}
    assert names("labels.color") == {"A", "b"}
    assert names("labels.dotted.key==yes") == {"A"}
    assert names("name~=^[ab]$") == {"b"}
    assert names("labels.color!=red") == {"A", "v"}
    with pytest.raises(InvalidArgument):
        sn.walk(["name=="])


def test_state_survives_reopening(tmp_path: Path) -> None:
    sn = PlainSnapshotter(tmp_path / "root")
    committed(sn, "A", files={"f": "1"})
    sn.prepare("b", "A", labels={"l": "v"})
    before = sorted(sn.walk(), key=lambda info: info.name)
    usage = sn.usage("A")
    sn.close()
    sn = PlainSnapshotter(tmp_path / "root")
    try:
        assert sorted(sn.walk(), key=lambda info: info.name) == before
        assert sn.usage("A") == usage
        sn.commit("B", "b")
        assert sn.stat("B").parent == "A"
    finally:
        sn.close()


def test_ids_are_never_reused(sn: PlainSnapshotter) -> None:
    sn.prepare("a")
    first = snapshot_id(sn, "a")
    sn.remove("a")
    sn.prepare("a")
    assert int(snapshot_id(sn, "a")) > int(first)


# -- crash safety ----------------------------------------------------------------------------------

CRASHING_CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    import core.snapshot_storage
    from core.snapshot_storage import DirectorySnapshotter
    from core.types import Mount

    class Plain(DirectorySnapshotter):
        def _mounts(self, snapshot):
            return [Mount("bind", str(self.fs_path(snapshot.id)), ("rbind",))]

    sn = Plain({root!r})
    where, action = {where!r}, {action!r}
    real_rename = os.rename

    def crash_rename(src, dst):
        if where == "after-rename":
            real_rename(src, dst)
        os._exit(86)

    def crash_remove_tree(path, *args, **kwargs):
        os._exit(86)

    os.rename = crash_rename
    core.snapshot_storage.remove_tree = crash_remove_tree
    if action == "prepare":
        sn.prepare("victim", "base")
    else:
        sn.remove("victim")
    os._exit(0)
    """
)


def crash(root: Path, where: str, action: str) -> None:
    """Run ``action`` on the snapshotter at ``root`` in a child process killed at ``where``."""
    code = CRASHING_CHILD.format(repo=str(REPO), root=str(root), where=where, action=action)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 86, result.stderr


@pytest.mark.parametrize("where", ["before-rename", "after-rename"])
def test_crash_while_preparing_leaves_nothing_half_made(tmp_path: Path, where: str) -> None:
    """Killed after the directory is built (and even renamed to its id) but before the sqlite commit."""
    root = tmp_path / "root"
    sn = PlainSnapshotter(root)
    base = committed(sn, "base")
    sn.close()
    crash(root, where, "prepare")
    leftovers = [name for name in os.listdir(root / "snapshots") if name != base]
    assert leftovers, "the crash should have left a directory behind"
    sn = PlainSnapshotter(root)  # opening reclaims the orphan
    try:
        with pytest.raises(NotFound):
            sn.stat("victim")
        assert [info.name for info in sn.walk()] == ["base"]
        assert dirs(sn) == [base]
        sn.prepare("victim", "base")  # the key and the next id are free again
        assert sn.stat("victim").parent == "base"
        assert (sn.fs_path(snapshot_id(sn, "victim"))).is_dir()
    finally:
        sn.close()


def test_crash_while_removing_leaves_an_orphan_that_is_reclaimed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    sn = PlainSnapshotter(root)
    sn.prepare("victim")
    victim = snapshot_id(sn, "victim")
    sn.close()
    crash(root, "remove", "remove")
    assert os.listdir(root / "snapshots") == [victim]  # the record went, the directory stayed
    sn = PlainSnapshotter(root)
    try:
        with pytest.raises(NotFound):
            sn.stat("victim")
        assert dirs(sn) == []
    finally:
        sn.close()


def test_cleanup_reclaims_orphans_and_keeps_snapshots(sn: PlainSnapshotter) -> None:
    kept = committed(sn, "base", files={"f": "x"})
    for orphan in ("999", "new-abc", "rm-old"):
        (sn.root / "snapshots" / orphan / "fs").mkdir(parents=True)
        (sn.root / "snapshots" / orphan / "fs" / "junk").write_text("junk")
    sn.cleanup()
    assert dirs(sn) == [kept]
    assert (sn.fs_path(kept) / "f").read_text() == "x"


def test_a_failing_directory_step_records_nothing(tmp_path: Path) -> None:
    class Failing(PlainSnapshotter):
        def _make_directory(self, path: Path, kind: Kind) -> None:
            super()._make_directory(path, kind)
            raise OSError(28, "No space left on device")

    sn = Failing(tmp_path / "root")
    try:
        with pytest.raises(OSError, match="No space"):
            sn.prepare("a")
        assert list(sn.walk()) == []
        assert dirs(sn) == []
    finally:
        sn.close()


# -- concurrency -----------------------------------------------------------------------------------


def run_threads(count: int, work: Callable[[int], object]) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(index: int) -> None:
        start.wait()
        try:
            work(index)
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_concurrent_prepares_and_commits(sn: PlainSnapshotter) -> None:
    committed(sn, "base")

    def work(index: int) -> None:
        for round in range(5):
            key = f"t{index}-{round}"
            sn.prepare(key, "base")
            sn.commit(f"{key}-done", key)

    assert run_threads(8, work) == []
    infos = list(sn.walk(["parent==base"]))
    assert len(infos) == 40
    assert all(info.kind is Kind.COMMITTED for info in infos)
    assert len(dirs(sn)) == 41


def test_concurrent_prepares_of_one_key_let_exactly_one_win(sn: PlainSnapshotter) -> None:
    errors = run_threads(8, lambda index: sn.prepare("contested"))
    assert len(errors) == 7
    assert all(isinstance(error, AlreadyExists) for error in errors)
    assert len(dirs(sn)) == 1
