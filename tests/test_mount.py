"""core.mount against the real kernel: binds, overlays (incl. more than a page of lowerdirs), tmpfs, unmounting."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.mount import (
    MS_BIND,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    is_mountpoint,
    mount_all,
    parse_options,
    temp_mount,
    unmount,
    unmount_all,
)
from core.types import Mount

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Path]:
    """An empty mount point; whatever a test leaves mounted there is detached afterwards."""
    where = tmp_path / "target"
    where.mkdir()
    yield where
    unmount_all(where, detach=True)


def test_parse_options_splits_flags_propagation_and_data() -> None:
    parsed = parse_options(["ro", "rbind", "nosuid", "rprivate", "lowerdir=/a:/b", "index=off"])
    assert parsed.flags == MS_RDONLY | MS_BIND | MS_REC | MS_NOSUID
    assert parsed.propagation == MS_PRIVATE | MS_REC
    assert parsed.data == "lowerdir=/a:/b,index=off"


def test_parse_options_later_words_win() -> None:
    assert parse_options(["ro", "rw"]).flags & MS_RDONLY == 0
    assert parse_options(["nosuid", "suid", "defaults"]).flags == 0


def test_rw_bind(tmp_path: Path, target: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    mount_all([Mount("bind", str(source), ("rw", "rbind"))], target)
    assert is_mountpoint(target)
    (target / "file").write_text("through the bind")
    assert (source / "file").read_text() == "through the bind"
    unmount(target)
    assert not is_mountpoint(target)
    assert not (target / "file").exists()


def test_ro_bind_refuses_writes(tmp_path: Path, target: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "present").write_text("x")
    mount_all([Mount("bind", str(source), ("ro", "rbind"))], target)
    assert (target / "present").read_text() == "x"
    with pytest.raises(OSError) as raised:
        (target / "new").write_text("y")
    assert raised.value.errno == errno.EROFS


def test_overlay_nearest_lower_wins(tmp_path: Path, target: Path) -> None:
    lower1, lower2, upper, work = (tmp_path / name for name in ("l1", "l2", "upper", "work"))
    for directory in (lower1, lower2, upper, work):
        directory.mkdir()
    (lower1 / "shared").write_text("from l1")
    (lower2 / "shared").write_text("from l2")
    (lower2 / "only2").write_text("2")
    options = (f"workdir={work}", f"upperdir={upper}", f"lowerdir={lower1}:{lower2}")
    mount_all([Mount("overlay", "overlay", options)], target)
    assert (target / "shared").read_text() == "from l1"
    assert (target / "only2").read_text() == "2"
    (target / "written").write_text("up")
    assert (upper / "written").read_text() == "up"


def test_overlay_with_more_than_a_page_of_lowerdirs(tmp_path: Path, target: Path) -> None:
    """128 lowers with long paths: the data only fits relative to the common parent, as containerd does it."""
    base = tmp_path / ("long-directory-name-" * 4) / "snapshots"
    lowers = []
    for i in range(128):
        lower = base / str(i) / "fs"
        lower.mkdir(parents=True)
        (lower / f"layer{i}").write_text(str(i))
        (lower / "top").write_text(str(i))
        lowers.append(str(lower))
    options = ("index=off", "lowerdir=" + ":".join(reversed(lowers)))
    assert len(",".join(options)) > os.sysconf("SC_PAGE_SIZE")
    cwd = os.getcwd()
    mount_all([Mount("overlay", "overlay", options)], target)
    assert os.getcwd() == cwd
    assert (target / "top").read_text() == "127"
    assert sorted(os.listdir(target)) == sorted([f"layer{i}" for i in range(128)] + ["top"])


def test_too_long_options_that_cannot_be_compacted(tmp_path: Path, target: Path) -> None:
    options = ("lowerdir=" + "/x" * 3000,)
    with pytest.raises(OSError, match="exceeds one page") as raised:
        mount_all([Mount("overlay", "overlay", options)], target)
    assert raised.value.errno == errno.EINVAL
    assert not is_mountpoint(target)


def test_failure_names_the_mount(tmp_path: Path, target: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(OSError, match=f"mount bind {missing} on {target}") as raised:
        mount_all([Mount("bind", str(missing), ("rbind",))], target)
    assert raised.value.errno == errno.ENOENT


def test_mount_all_is_all_or_nothing(tmp_path: Path, target: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    with pytest.raises(OSError):
        mount_all([Mount("bind", str(source), ("rbind",)), Mount("bind", str(tmp_path / "nope"), ("rbind",))], target)
    assert not is_mountpoint(target)


def test_mount_target_is_relative_and_propagation_applies(tmp_path: Path, target: Path) -> None:
    source = tmp_path / "source"
    (source / "inner").mkdir(parents=True)
    mounts = [
        Mount("bind", str(source), ("rbind", "rprivate")),
        Mount("tmpfs", "tmpfs", ("size=1m", "nosuid"), target="/inner"),
    ]
    mount_all(mounts, target)
    assert is_mountpoint(target / "inner")
    unmount(target / "inner")
    unmount(target)
    assert not is_mountpoint(target)


def test_unmount_all_unstacks(tmp_path: Path, target: Path) -> None:
    for i in range(3):
        source = tmp_path / f"s{i}"
        source.mkdir()
        mount_all([Mount("bind", str(source), ("rbind",))], target)
    unmount_all(target)
    assert not is_mountpoint(target)


def test_unmount_of_nothing_is_quiet(tmp_path: Path, target: Path) -> None:
    unmount(target)
    unmount_all(target)
    unmount_all(tmp_path / "does-not-exist")


def test_temp_mount_cleans_up(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "f").write_text("hi")
    with temp_mount([Mount("bind", str(source), ("ro", "rbind"))], parent=tmp_path) as where:
        assert where.parent == tmp_path
        assert where.name.startswith("containerkit-mount-")
        assert is_mountpoint(where)
        assert (where / "f").read_text() == "hi"
    assert not where.exists()

    with pytest.raises(RuntimeError), temp_mount([Mount("bind", str(source), ("rbind",))], parent=tmp_path) as where:
        raise RuntimeError("body failed")
    assert not where.exists()

    with pytest.raises(OSError), temp_mount([Mount("bind", str(tmp_path / "nope"), ("rbind",))], parent=tmp_path):
        pass
    assert [p.name for p in tmp_path.iterdir()] == ["source"]


def test_is_mountpoint_with_escaped_characters(tmp_path: Path) -> None:
    where = tmp_path / "with space\tand tab"
    where.mkdir()
    try:
        mount_all([Mount("tmpfs", "tmpfs", ("size=1m",))], where)
        assert is_mountpoint(where)
    finally:
        unmount_all(where, detach=True)
    assert not is_mountpoint(where)
