"""The aufs snapshotter: mount-option composition and layout everywhere; real aufs mounts where the kernel has aufs.

Most kernels today (this one included) have no aufs: the integration tests then skip, saying so,
and the plugin must report ``skip`` with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from stevedore.extension import Extension

from core.config import Config
from core.errors import NotImplementedByPlugin
from core.events import Exchange
from core.hookspecs import new_plugin_manager
from core.loader import PluginLoader
from core.metadata import MetadataStore
from core.mount import parse_options, temp_mount
from core.plugin import PluginRecord, Status
from core.snapshot import LABEL_REBASE, Kind
from core.types import Mount
from plugins.snapshot_aufs import AufsSnapshotter, aufs_mounts, plugin


def kernel_has_aufs() -> bool:
    with open("/proc/filesystems", encoding="utf-8") as listing:
        return any(line.split()[-1:] == ["aufs"] for line in listing)


HAS_AUFS = kernel_has_aufs()
needs_aufs = pytest.mark.skipif(
    not HAS_AUFS or os.geteuid() != 0,
    reason="aufs integration: needs root and a kernel with aufs (not in /proc/filesystems here)",
)
PAGE = os.sysconf("SC_PAGE_SIZE")
COMMON = ("dio", "xino=/dev/shm/aufs.xino", "dirperm1")


@pytest.fixture
def sn(tmp_path: Path) -> Iterator[AufsSnapshotter]:
    snapshotter = AufsSnapshotter(tmp_path / "root")
    yield snapshotter
    snapshotter.close()


def chain(sn: AufsSnapshotter, count: int) -> list[str]:
    """Commit ``count`` stacked layers named ``layer-<i>``; return their ids, bottom first."""
    ids, parent = [], ""
    for i in range(count):
        sn.prepare(f"k{i}", parent)
        ids.append(id_of_active(sn, f"k{i}"))
        sn.commit(f"layer-{i}", f"k{i}")
        parent = f"layer-{i}"
    return ids


def id_of_active(sn: AufsSnapshotter, key: str) -> str:
    """The id of active snapshot ``key``: its bind source, or its ``=rw`` branch."""
    first = sn.mounts(key)[0]
    if first.type == "bind":
        return Path(first.source).parent.name
    return Path(first.options[-1].removeprefix("br:").split(":")[0].removesuffix("=rw")).parent.name


def branches(mounts: list[Mount]) -> list[str]:
    """Every branch of an aufs mount list, topmost first: the ``br:`` list then the ``append:``s."""
    found = mounts[0].options[-1].removeprefix("br:").split(":")
    for m in mounts[1:]:
        found.append(m.options[-1].removeprefix("append:"))
    return found


# -- composition and layout (everywhere) -----------------------------------------------------------


def test_mount_shapes(sn: AufsSnapshotter) -> None:
    fs = sn.fs_path
    assert sn.prepare("a") == [Mount("bind", str(fs("1")), ("rw", "rbind"))]
    sn.commit("A", "a")
    assert sn.view("v0", "") == [Mount("bind", str(fs("2")), ("ro", "rbind"))]
    assert sn.view("v1", "A") == [Mount("bind", str(fs("1")), ("ro", "rbind"))]
    assert sn.prepare("b", "A") == [Mount("aufs", "none", (*COMMON, f"br:{fs('4')}=rw:{fs('1')}=ro+wh"))]
    sn.commit("B", "b")
    assert sn.view("v2", "B") == [Mount("aufs", "none", ("ro", *COMMON, f"br:{fs('4')}=ro+wh:{fs('1')}=ro+wh"))]
    assert sn.mounts("v2") == sn.view("v3", "B")


def test_layout_is_the_overlay_one_without_workdirs(sn: AufsSnapshotter) -> None:
    sn.prepare("a")
    sn.commit("A", "a")
    sn.prepare("b", "A")
    sn.view("v", "A")
    assert sorted(os.listdir(sn.root)) == ["metadata.db", "metadata.db-shm", "metadata.db-wal", "snapshots"]
    assert sorted(os.listdir(sn.root / "snapshots")) == ["1", "2", "3"]
    for id in ("1", "2", "3"):
        assert os.listdir(sn.snapshot_path(id)) == ["fs"]
    assert {info.name: info.kind for info in sn.walk()} == {"A": Kind.COMMITTED, "b": Kind.ACTIVE, "v": Kind.VIEW}


def test_options_follow_the_constructor(tmp_path: Path) -> None:
    sn = AufsSnapshotter(tmp_path / "root", dirperm1=False, xino="/run/x.xino", mount_options=("nosuid",))
    try:
        sn.prepare("a")
        sn.commit("A", "a")
        (mount,) = sn.prepare("b", "A")
        assert mount.options[:-1] == ("dio", "xino=/run/x.xino", "nosuid")
    finally:
        sn.close()


def test_no_rebase(sn: AufsSnapshotter) -> None:
    assert sn.prepare("r", "", {LABEL_REBASE: "1"}) == [Mount("bind", str(sn.fs_path("1")), ("rw", "rbind"))]
    with pytest.raises(NotImplementedByPlugin):
        sn.rebase("R", "r", "")
    assert plugin.capabilities == ()


def test_branches_past_a_page_are_appended_by_remounts() -> None:
    mounts = aufs_mounts(["/up=rw", "/l1=ro+wh", "/l2=ro+wh", "/l3=ro+wh"], ("ro", "dio"), page_size=34)
    assert mounts == [
        Mount("aufs", "none", ("ro", "dio", "br:/up=rw:/l1=ro+wh:/l2=ro+wh")),
        Mount("aufs", "none", ("remount", "ro", "append:/l3=ro+wh")),
    ]
    assert len(parse_options(mounts[0].options).data) == 33  # exactly a page minus the NUL
    assert aufs_mounts(["/up=rw"], ("dio",)) == [Mount("aufs", "none", ("dio", "br:/up=rw"))]


def test_a_128_layer_chain_composes_within_a_page(sn: AufsSnapshotter) -> None:
    ids = chain(sn, 128)
    for mounts, top in ((sn.view("view", "layer-127"), []), (sn.prepare("rw", "layer-127"), ["rw"])):
        assert len(mounts) > 1  # 128 branches do not fit one page
        assert all(len(parse_options(m.options).data) < PAGE for m in mounts)
        assert all(m.options[0] == "remount" for m in mounts[1:])
        expected = [f"{sn.fs_path(id)}=ro+wh" for id in reversed(ids)]
        if top:
            expected.insert(0, f"{sn.fs_path(id_of_active(sn, 'rw'))}=rw")
        assert branches(mounts) == expected


def load(tmp_path: Path) -> tuple[PluginLoader, MetadataStore, PluginRecord]:
    metadata = MetadataStore(tmp_path / "meta.db")
    hooks = new_plugin_manager()
    loader = PluginLoader(
        Config(root=tmp_path / "daemon-root", state=tmp_path / "state"),
        metadata=metadata,
        hooks=hooks,
        events=Exchange(hooks),
        extensions={"snapshotter": [Extension("aufs", None, plugin, None)]},
    )
    loader.load()
    return loader, metadata, loader.records["snapshotter.aufs"]


@pytest.mark.skipif(HAS_AUFS, reason="this kernel has aufs: the plugin loads (see the integration tests)")
def test_plugin_skips_with_the_reason_where_aufs_is_missing(tmp_path: Path) -> None:
    loader, metadata, record = load(tmp_path)
    try:
        assert record.status is Status.SKIP
        assert record.reason.startswith("aufs is not in /proc/filesystems (modprobe aufs failed: ")
        assert not (tmp_path / "daemon-root" / "snapshotter.aufs").exists()
    finally:
        loader.close()
        metadata.close()


# -- real aufs mounts (where the kernel has aufs) --------------------------------------------------


@needs_aufs
def test_plugin_loads_where_aufs_exists(tmp_path: Path) -> None:
    loader, metadata, record = load(tmp_path)
    try:
        assert record.status is Status.OK, record.reason
        assert isinstance(record.instance, AufsSnapshotter)
    finally:
        loader.close()
        metadata.close()


@needs_aufs
def test_layers_stack_with_aufs_whiteouts(sn: AufsSnapshotter) -> None:
    with temp_mount(sn.prepare("l1")) as root:
        (root / "keep").write_text("k")
        (root / "gone").write_text("g")
        (root / "dir").mkdir()
        (root / "dir" / "old").write_text("o")
    sn.commit("L1", "l1")
    mounts = sn.prepare("l2", "L1")
    upper = sn.fs_path(id_of_active(sn, "l2"))
    with temp_mount(mounts) as root:
        (root / "gone").unlink()
        (root / "new").write_text("n")
    assert (upper / ".wh.gone").exists()
    sn.commit("L2", "l2")
    with temp_mount(sn.view("v", "L2")) as root:
        assert sorted(os.listdir(root)) == ["dir", "keep", "new"]
        with pytest.raises(OSError):
            (root / "refused").write_text("x")


@needs_aufs
def test_128_layers_mount_with_appended_branches(sn: AufsSnapshotter) -> None:
    parent = ""
    for i in range(128):
        with temp_mount(sn.prepare(f"k{i}", parent)) as root:
            (root / f"file-{i}").write_text(str(i))
            (root / "top").write_text(str(i))
        sn.commit(f"layer-{i}", f"k{i}")
        parent = f"layer-{i}"
    with temp_mount(sn.view("view", parent)) as root:
        assert (root / "top").read_text() == "127"
        assert len([name for name in os.listdir(root) if name.startswith("file-")]) == 128
