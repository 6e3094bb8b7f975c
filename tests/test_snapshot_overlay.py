"""The overlayfs snapshotter against the real kernel: mount shapes, layered content with whiteouts,
128-layer chains, rebase, the plugin's registration, and threads working at once.

Every mount is made with core.mount.temp_mount, which unmounts and removes its directory whatever happens.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from stevedore.extension import Extension

from core.config import Config
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.events import Exchange
from core.hookspecs import new_plugin_manager
from core.loader import PluginLoader
from core.metadata import MetadataStore
from core.mount import temp_mount
from core.plugin import Status
from core.snapshot import CAPABILITY_REBASE, LABEL_REBASE, Kind
from core.types import Mount
from plugins.snapshot_overlay import OverlaySnapshotter, plugin

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts need root")

INDEX_OFF = ("index=off",) if Path("/sys/module/overlay/parameters/index").exists() else ()


@pytest.fixture
def sn(tmp_path: Path) -> Iterator[OverlaySnapshotter]:
    snapshotter = OverlaySnapshotter(tmp_path / "root")
    yield snapshotter
    snapshotter.close()


def id_of(sn: OverlaySnapshotter, key: str) -> str:
    """The directory id of active snapshot ``key``."""
    for option in sn.mounts(key)[0].options:
        if option.startswith("upperdir="):
            return Path(option.removeprefix("upperdir=")).parent.name
    return Path(sn.mounts(key)[0].source).parent.name


def layer(sn: OverlaySnapshotter, name: str, parent: str = "", files: dict[str, str] | None = None) -> str:
    """Commit a layer on ``parent`` holding ``files`` (written through its mounts); return its id."""
    key = f"{name}-active"
    mounts = sn.prepare(key, parent)
    id = id_of(sn, key)
    with temp_mount(mounts) as root:
        for path, content in (files or {}).items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(content)
    sn.commit(name, key)
    return id


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> content) and every directory (-> "/")."""
    found = {}
    for directory, subdirs, files in os.walk(root):
        for name in subdirs:
            found[os.path.relpath(os.path.join(directory, name), root)] = "/"
        for name in files:
            found[os.path.relpath(os.path.join(directory, name), root)] = Path(directory, name).read_text()
    return found


# -- mount shapes ----------------------------------------------------------------------------------


def test_mount_shapes(sn: OverlaySnapshotter) -> None:
    fs = sn.fs_path
    assert sn.prepare("a") == [Mount("bind", str(fs(id_of(sn, "a"))), ("rw", "rbind"))]
    sn.commit("A", "a")
    a = "1"
    assert sn.view("v0", "") == [Mount("bind", str(fs("2")), ("ro", "rbind"))]
    assert sn.view("v1", "A") == [Mount("bind", str(fs(a)), ("ro", "rbind"))]
    assert sn.prepare("b", "A") == [
        Mount(
            "overlay",
            "overlay",
            (*INDEX_OFF, f"workdir={sn.work_path('4')}", f"upperdir={fs('4')}", f"lowerdir={fs(a)}"),
        )
    ]
    sn.commit("B", "b")
    assert sn.view("v2", "B") == [Mount("overlay", "overlay", (*INDEX_OFF, f"lowerdir={fs('4')}:{fs(a)}"))]
    assert sn.prepare("r", "", {LABEL_REBASE: "yes"}) == [
        Mount(
            "overlay",
            "overlay",
            (*INDEX_OFF, f"workdir={sn.work_path('6')}", f"upperdir={fs('6')}", f"lowerdir={sn.root / 'empty'}"),
        )
    ]
    for key in ("a", "b"):
        with pytest.raises(NotFound):
            sn.mounts(key)
    assert sn.mounts("v2") == sn.view("v3", "B")
    assert sorted(os.listdir(sn.snapshot_path("4"))) == ["fs", "work"]  # active: fs and work
    assert os.listdir(sn.snapshot_path("5")) == ["fs"]  # view: fs only


def test_mount_options_come_first(tmp_path: Path) -> None:
    sn = OverlaySnapshotter(tmp_path / "root", mount_options=("volatile",))
    try:
        sn.prepare("a")
        sn.commit("A", "a")
        (mount,) = sn.prepare("b", "A")
        assert mount.options[: len(INDEX_OFF) + 1] == (*INDEX_OFF, "volatile")
        assert mount.options[-1].startswith("lowerdir=")
        with temp_mount([mount]) as root:
            (root / "f").write_text("ok")
    finally:
        sn.close()


# -- real content ----------------------------------------------------------------------------------


def test_layers_stack_with_whiteouts_and_opaque_directories(sn: OverlaySnapshotter) -> None:
    layer(sn, "L1", files={"a": "1", "gone": "x", "dir/old": "o", "dir/kept-by-nobody": "k"})
    mounts = sn.prepare("l2", "L1")
    upper = sn.fs_path(id_of(sn, "l2"))
    with temp_mount(mounts) as root:
        assert tree(root) == {"a": "1", "gone": "x", "dir": "/", "dir/old": "o", "dir/kept-by-nobody": "k"}
        (root / "gone").unlink()
        for child in (root / "dir").iterdir():
            child.unlink()
        (root / "dir").rmdir()
        (root / "dir").mkdir()
        (root / "dir" / "new").write_text("n")
        (root / "b").write_text("2")
    whiteout = os.lstat(upper / "gone")
    assert stat.S_ISCHR(whiteout.st_mode)
    assert whiteout.st_rdev == 0
    assert os.getxattr(upper / "dir", "trusted.overlay.opaque") == b"y"
    sn.commit("L2", "l2")

    view = sn.view("v", "L2")
    with temp_mount(view) as root:
        assert tree(root) == {"a": "1", "b": "2", "dir": "/", "dir/new": "n"}
        with pytest.raises(OSError) as raised:
            (root / "c").write_text("refused")
        assert raised.value.errno == errno.EROFS
    with temp_mount(sn.view("v1", "L1")) as root:
        assert tree(root)["gone"] == "x"
        with pytest.raises(OSError):
            (root / "c").write_text("refused")

    usage = sn.usage("L2")
    assert usage.inodes == 5  # fs, gone (whiteout), dir, dir/new, b


def test_an_image_of_128_layers_mounts(sn: OverlaySnapshotter) -> None:
    parent = ""
    for i in range(128):
        layer(sn, f"layer-{i}", parent, files={f"file-{i}": str(i), "top": str(i)})
        parent = f"layer-{i}"
    (view,) = sn.view("view", parent)
    assert len(",".join(view.options)) > os.sysconf("SC_PAGE_SIZE")
    with temp_mount([view]) as root:
        assert (root / "top").read_text() == "127"
        assert sorted(os.listdir(root)) == sorted([f"file-{i}" for i in range(128)] + ["top"])
    with temp_mount(sn.prepare("rw", parent)) as root:
        (root / "top").write_text("mine")
        assert (root / "file-0").read_text() == "0"
    assert (sn.fs_path(id_of(sn, "rw")) / "top").read_text() == "mine"


# -- rebase ----------------------------------------------------------------------------------------


def test_rebase_puts_a_parentless_layer_on_a_parent(sn: OverlaySnapshotter) -> None:
    layer(sn, "base", files={"keep": "k", "gone": "g", "dir/old": "o"})
    mounts = sn.prepare("r", "", {LABEL_REBASE: "true"})
    upper = sn.fs_path(id_of(sn, "r"))
    with temp_mount(mounts) as root:  # what a differ extracting into the upperdir leaves behind
        (root / "new").write_text("n")
        os.mknod(upper / "gone", stat.S_IFCHR | 0o600, 0)
        (upper / "dir").mkdir()
        os.setxattr(upper / "dir", "trusted.overlay.opaque", b"y")
        (upper / "dir" / "fresh").write_text("f")
    sn.rebase("layer", "r", "base", labels={"l": "v"})
    info = sn.stat("layer")
    assert (info.kind, info.parent, info.labels) == (Kind.COMMITTED, "base", {"l": "v"})
    assert sn.usage("layer").inodes == 5
    with temp_mount(sn.view("v", "layer")) as root:
        assert tree(root) == {"keep": "k", "new": "n", "dir": "/", "dir/fresh": "f"}
    with pytest.raises(FailedPrecondition, match="has it as parent"):
        sn.remove("base")


def test_rebase_errors(sn: OverlaySnapshotter) -> None:
    layer(sn, "base")
    sn.prepare("child", "base")
    sn.prepare("plain")
    sn.prepare("r", "", {LABEL_REBASE: "1"})
    sn.view("view", "base")
    with pytest.raises(InvalidArgument, match="has a parent"):
        sn.rebase("x", "child", "base")
    with pytest.raises(NotFound, match="parent snapshot 'missing'"):
        sn.rebase("x", "r", "missing")
    with pytest.raises(InvalidArgument, match="not committed"):
        sn.rebase("x", "r", "child")
    with pytest.raises(InvalidArgument, match=LABEL_REBASE):
        sn.rebase("x", "plain", "base")
    with pytest.raises(AlreadyExists):
        sn.rebase("base", "r", "base")
    with pytest.raises(FailedPrecondition):
        sn.rebase("x", "view", "base")
    with pytest.raises(NotFound):
        sn.rebase("x", "missing", "base")
    assert sn.stat("r").kind is Kind.ACTIVE
    sn.rebase("root-layer", "r", "")  # onto nothing: a plain commit
    assert sn.stat("root-layer").parent == ""
    sn.rebase("plain-layer", "plain", "")
    assert sn.stat("plain-layer").kind is Kind.COMMITTED


# -- removal and cleanup ---------------------------------------------------------------------------


def test_remove_after_use_deletes_everything(sn: OverlaySnapshotter) -> None:
    layer(sn, "base", files={"f": "x"})
    mounts = sn.prepare("c", "base")
    id = id_of(sn, "c")
    with temp_mount(mounts) as root:
        (root / "f").write_text("changed")  # a copy-up: the workdir gets its own (mode 000) work/work
    sn.remove("c")
    assert not sn.snapshot_path(id).exists()
    sn.cleanup()
    assert sorted(os.listdir(sn.root / "snapshots")) == ["1"]


# -- the plugin ------------------------------------------------------------------------------------


def load(tmp_path: Path, table: dict[str, object] | None = None) -> tuple[PluginLoader, MetadataStore]:
    metadata = MetadataStore(tmp_path / "meta.db")
    hooks = new_plugin_manager()
    config = Config(
        root=tmp_path / "daemon-root",
        state=tmp_path / "state",
        plugins={"snapshotter": {"overlayfs": table}} if table else {},
    )
    extension = Extension("overlayfs", None, plugin, None)
    loader = PluginLoader(
        config, metadata=metadata, hooks=hooks, events=Exchange(hooks), extensions={"snapshotter": [extension]}
    )
    loader.load()
    return loader, metadata


def test_plugin_loads_with_rebase_capability(tmp_path: Path) -> None:
    loader, metadata = load(tmp_path)
    try:
        record = loader.records["snapshotter.overlayfs"]
        assert record.status is Status.OK, record.reason
        assert CAPABILITY_REBASE in record.capabilities
        assert isinstance(record.instance, OverlaySnapshotter)
        assert record.exports["root"] == str(tmp_path / "daemon-root" / "snapshotter.overlayfs")
        assert record.instance.root == tmp_path / "daemon-root" / "snapshotter.overlayfs"
        assert not os.listdir(record.instance.root / "snapshots")  # the support probe left nothing
    finally:
        loader.close()
        metadata.close()


def test_plugin_config(tmp_path: Path) -> None:
    loader, metadata = load(tmp_path, {"root_path": str(tmp_path / "elsewhere"), "mount_options": ["volatile"]})
    try:
        sn = loader.records["snapshotter.overlayfs"].instance
        assert isinstance(sn, OverlaySnapshotter)
        assert sn.root == tmp_path / "elsewhere"
        sn.prepare("a")
        sn.commit("A", "a")
        assert "volatile" in sn.prepare("b", "A")[0].options
    finally:
        loader.close()
        metadata.close()


# -- threads ---------------------------------------------------------------------------------------


def test_threads_prepare_mount_and_commit_at_once(sn: OverlaySnapshotter) -> None:
    layer(sn, "base", files={"shared": "s"})
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def work(index: int) -> None:
        start.wait()
        try:
            for round in range(3):
                key = f"w{index}-{round}"
                with temp_mount(sn.prepare(key, "base")) as root:
                    assert (root / "shared").read_text() == "s"
                    (root / "mine").write_text(key)
                sn.commit(f"{key}-done", key)
                with temp_mount(sn.view(f"{key}-view", f"{key}-done")) as root:
                    assert (root / "mine").read_text() == key
                sn.remove(f"{key}-view")
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(list(sn.walk(["kind==committed,parent==base"]))) == 18
