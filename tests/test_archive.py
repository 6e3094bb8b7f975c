"""The tar applier (core.diff.archive / core.diff.tar): attributes kept, hostile archives refused or
contained, whiteouts in each mode. Every test checks that nothing outside the root was touched."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from core.diff.archive import Whiteouts, apply_tar, scoped_path
from core.errors import InvalidArgument

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="applying layers needs root (chown, mknod, trusted xattrs)")

MTIME = 1_600_000_000
CAPABILITY = "SCHILY.xattr.security.capability"
CAP_NET_RAW = b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + bytes(12)  # vfs_cap_data v2, cap_net_raw+ep


# -- building layers (also used by test_differ.py) ----------------------------------------------------


def member(
    name: str,
    data: bytes = b"",
    *,
    type: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int = MTIME,
    linkname: str = "",
    pax: dict[str, str] | None = None,
    devmajor: int = 0,
    devminor: int = 0,
) -> tuple[tarfile.TarInfo, bytes]:
    """One tar member: its header and its data (regular files only)."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = type, mode, uid, gid, mtime
    info.linkname, info.devmajor, info.devminor = linkname, devmajor, devminor
    info.size = len(data)
    info.pax_headers = dict(pax or {})
    return info, data


def directory(name: str, **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, type=tarfile.DIRTYPE, mode=fields.pop("mode", 0o755), **fields)


def symlink(name: str, target: str, **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, type=tarfile.SYMTYPE, linkname=target, mode=fields.pop("mode", 0o777), **fields)


def hardlink(name: str, target: str, **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    return member(name, type=tarfile.LNKTYPE, linkname=target, **fields)


def tar_of(*members: tuple[tarfile.TarInfo, bytes], format: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar archive of ``members`` in order (names written exactly as given, hostile ones included)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=format, encoding="utf-8", errors="surrogateescape") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def chunked(data: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


def fingerprint(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a test compares about a tree: type, mode, owner, size, content hash, link target,
    device, xattrs, mtime (seconds), per relative path."""
    out: dict[str, tuple[Any, ...]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        kind = stat.S_IFMT(info.st_mode)
        content = hashlib.sha256(path.read_bytes()).hexdigest() if kind == stat.S_IFREG else ""
        target = os.readlink(path) if kind == stat.S_IFLNK else ""
        xattrs = {
            name: os.getxattr(path, name, follow_symlinks=False) for name in os.listxattr(path, follow_symlinks=False)
        }
        out[str(path.relative_to(root))] = (
            kind,
            stat.S_IMODE(info.st_mode),
            info.st_uid,
            info.st_gid,
            info.st_size if kind == stat.S_IFREG else 0,
            content,
            target,
            info.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0,
            xattrs,
            info.st_mtime_ns // 1_000_000_000,
        )
    return out


@dataclass
class Jail:
    """A root to extract into and a directory outside it whose state is checked afterwards."""

    root: Path
    outside: Path
    before: dict[str, tuple[Any, ...]]

    def untouched(self) -> bool:
        return fingerprint(self.outside) == self.before and (self.outside / "secret").stat().st_nlink == 1


@pytest.fixture
def jail(tmp_path: Path) -> Iterator[Jail]:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_bytes(b"secret")
    (outside / "dir" / "inner").write_bytes(b"inner")
    (outside / "x").mkdir()
    jailed = Jail(root, outside, fingerprint(outside))
    yield jailed
    assert jailed.untouched(), "something outside the root changed"


def apply(jail: Jail, data: bytes, **options: Any) -> None:
    apply_tar(chunked(data, options.pop("chunk", 1 << 20)), jail.root, **options)


# -- attributes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [7, 512, 1 << 20])
def test_entries_keep_type_owner_mode_xattrs_and_times(jail: Jail, chunk: int) -> None:
    binary = bytes(range(256)) * 5000
    layer = tar_of(
        directory("etc", mode=0o750, uid=1, gid=2, mtime=MTIME - 100),
        member("etc/passwd", b"root:x:0:0\n", mode=0o600, uid=1000, gid=1000, mtime=MTIME - 5, pax={"atime": "1.5"}),
        member("etc/shadow", b"", mode=0o600, pax={"atime": f"{MTIME + 7}.5", "mtime": f"{MTIME}.25"}),
        member("bin/su", binary, mode=0o4755, pax={"SCHILY.xattr.user.note": "hi"}),
        member("bin/ping", b"ping", mode=0o755, pax={CAPABILITY: CAP_NET_RAW.decode("latin-1")}),
        symlink("bin/sh", "busybox", uid=3, gid=4, mtime=MTIME - 9),
        hardlink("bin/su2", "bin/su", mode=0o4755),
        member("dev/null", type=tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        member("dev/loop0", type=tarfile.BLKTYPE, mode=0o660, gid=6, devmajor=7, devminor=0),
        member("run/fifo", type=tarfile.FIFOTYPE, mode=0o620),
        directory("etc", mode=0o755, uid=1, gid=2, mtime=MTIME - 100),  # a later entry for the same dir merges
        member("etc/hosts", b"127.0.0.1 localhost\n"),
    )
    apply(jail, layer, chunk=chunk)
    root = jail.root
    etc = (root / "etc").lstat()
    assert (stat.S_IMODE(etc.st_mode), etc.st_uid, etc.st_gid, etc.st_mtime) == (0o755, 1, 2, MTIME - 100)
    passwd = (root / "etc/passwd").lstat()
    assert (stat.S_IMODE(passwd.st_mode), passwd.st_uid, passwd.st_gid, passwd.st_mtime) == (
        0o600,
        1000,
        1000,
        MTIME - 5,
    )
    su = (root / "bin/su").lstat()
    assert (root / "bin/su").read_bytes() == binary
    assert stat.S_IMODE(su.st_mode) == 0o4755 and su.st_nlink == 2
    assert passwd.st_atime == MTIME - 5, "the access time is never older than the modification time"
    shadow = (root / "etc/shadow").lstat()
    assert (shadow.st_atime_ns, shadow.st_mtime_ns) == ((MTIME + 7) * 10**9 + 5 * 10**8, MTIME * 10**9 + 25 * 10**7)
    assert os.getxattr(root / "bin/su", "user.note") == b"hi"
    assert os.getxattr(root / "bin/ping", "security.capability") == CAP_NET_RAW
    assert (root / "bin/su2").lstat().st_ino == su.st_ino
    sh = (root / "bin/sh").lstat()
    assert stat.S_ISLNK(sh.st_mode) and os.readlink(root / "bin/sh") == "busybox"
    assert (sh.st_uid, sh.st_gid, sh.st_mtime) == (3, 4, MTIME - 9)
    null = (root / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = (root / "dev/loop0").lstat()
    assert stat.S_ISBLK(loop.st_mode) and os.major(loop.st_rdev) == 7 and loop.st_gid == 6
    assert stat.S_ISFIFO((root / "run/fifo").lstat().st_mode)
    implicit = (root / "dev").lstat()  # a parent no entry names: created 0755 root:root
    assert (stat.S_IMODE(implicit.st_mode), implicit.st_uid, implicit.st_gid) == (0o755, 0, 0)


def test_long_and_non_utf8_names(jail: Jail) -> None:
    deep = "/".join(["d" * 60] * 5) + "/file"
    apply(
        jail,
        tar_of(member(deep, b"deep"), symlink("link", deep), format=tarfile.GNU_FORMAT)
        + b"",  # GNU long names and links
    )
    assert (jail.root / deep).read_bytes() == b"deep"
    assert os.readlink(jail.root / "link") == deep
    apply(jail, tar_of(member("caf\udce9", b"latin-1 name"), member("na\u00efve", b"utf-8 name")))
    names = os.listdir(os.fsencode(jail.root))
    assert b"caf\xe9" in names and "naïve".encode() in names


def test_root_entries_are_ignored(jail: Jail) -> None:
    before = jail.root.stat()
    apply(jail, tar_of(directory("./", mode=0o700, uid=5), directory("/", mode=0o700), member("a", b"a")))
    after = jail.root.stat()
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)
    assert (jail.root / "a").read_bytes() == b"a"


# -- hostile archives ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "lands"),
    [
        ("../escaped", "escaped"),
        ("a/../../escaped", "escaped"),
        ("./../escaped", "escaped"),
        ("a/b/../../../outside/secret", "outside/secret"),
        ("../" * 30 + "tmp/x", "tmp/x"),
    ],
)
def test_dot_dot_stops_at_the_root(jail: Jail, name: str, lands: str) -> None:
    apply(jail, tar_of(member(name, b"contained")))
    assert (jail.root / lands).read_bytes() == b"contained"


def test_dot_dot_inside_the_root_is_cleaned(jail: Jail) -> None:
    apply(jail, tar_of(member("a/b/../c", b"c"), member("./d/./e", b"e")))
    assert (jail.root / "a/c").read_bytes() == b"c" and (jail.root / "d/e").read_bytes() == b"e"


def test_absolute_names_are_relative_to_the_root(jail: Jail) -> None:
    apply(jail, tar_of(member(f"{jail.outside}/secret", b"pwned"), member("/../../top", b"top")))
    assert (jail.root / str(jail.outside).lstrip("/") / "secret").read_bytes() == b"pwned"
    assert (jail.root / "top").read_bytes() == b"top"


@pytest.mark.parametrize(
    "links",
    [
        pytest.param({"escape": "{outside}"}, id="absolute"),
        pytest.param({"escape": "../../../../../../../../{outside}"}, id="relative"),
        pytest.param({"escape": "a", "a": "b/../c", "c": "/../../{outside}"}, id="chain"),
        pytest.param({"escape": "dir/up", "dir/up": "../../../../../../{outside}"}, id="nested"),
    ],
)
def test_symlinked_parents_resolve_inside_the_root(jail: Jail, links: dict[str, str]) -> None:
    members = [directory("dir")]
    members += [symlink(name, target.format(outside=jail.outside)) for name, target in links.items()]
    members += [member("escape/secret", b"pwned"), member("escape/dir/inner", b"pwned"), directory("escape/new")]
    apply(jail, tar_of(*members))
    inside = jail.root / str(jail.outside).lstrip("/")
    assert (inside / "secret").read_bytes() == b"pwned"
    assert (inside / "dir/inner").read_bytes() == b"pwned"
    assert (inside / "new").is_dir()


def test_symlink_loops_are_refused(jail: Jail) -> None:
    with pytest.raises(InvalidArgument, match="too many levels of symbolic links"):
        apply(jail, tar_of(symlink("a", "b"), symlink("b", "a"), member("a/file", b"x")))


def test_final_symlinks_are_replaced_not_followed(jail: Jail) -> None:
    secret = str(jail.outside / "secret")
    apply(
        jail,
        tar_of(
            symlink("file", secret),
            member("file", b"replaced", mode=0o777, uid=9),
            symlink("dir", str(jail.outside / "dir")),
            directory("dir", mode=0o700),
            member("dir/inner", b"inner, inside"),
            symlink("chmod-me", secret),
            symlink("chmod-me", secret, mode=0o777, uid=4, pax={"SCHILY.xattr.user.x": "y"}),
            member("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
            symlink("dev", secret),
        ),
    )
    root = jail.root
    assert (root / "file").read_bytes() == b"replaced" and not (root / "file").is_symlink()
    assert (root / "dir").is_dir() and not (root / "dir").is_symlink()
    assert (root / "dir/inner").read_bytes() == b"inner, inside"
    assert os.readlink(root / "chmod-me") == secret and os.readlink(root / "dev") == secret


def test_hardlink_targets_resolve_inside_the_root(jail: Jail) -> None:
    missing = "its target .* is not in the layer or snapshot"
    with pytest.raises(InvalidArgument, match=missing):  # ../outside/secret is <root>/outside/secret: nothing there
        apply(jail, tar_of(hardlink("h", "../outside/secret")))
    with pytest.raises(InvalidArgument, match=missing):  # through a symlink: resolved inside, where there is nothing
        apply(jail, tar_of(symlink("out", str(jail.outside)), hardlink("h", "out/secret")))
    with pytest.raises(InvalidArgument, match="is a directory"):
        apply(jail, tar_of(directory("d"), hardlink("h", "d")))
    apply(jail, tar_of(member("outside/secret", b"inside"), hardlink("h", "../../outside/secret")))
    assert (jail.root / "h").read_bytes() == b"inside"
    apply(jail, tar_of(member("target", b"t"), symlink("s", "target"), hardlink("h", "s")))
    assert (jail.root / "h").is_symlink(), "a hardlink to a symlink links the symlink itself"
    apply(jail, tar_of(hardlink("abs", "/target")))
    assert (jail.root / "abs").stat().st_ino == (jail.root / "target").stat().st_ino


def _raw_header(name: bytes, size_field: bytes, type: bytes = b"0", checksum: bool = True) -> bytes:
    block = bytearray(512)
    block[0 : len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = block[116:124] = b"0000000\0"
    block[124:136] = size_field
    block[136:148] = b"00000000000\0"
    block[156:157] = type
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    value = sum(block) if checksum else sum(block) + 1
    block[148:156] = b"%06o\0 " % value
    return bytes(block)


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (_raw_header(b"big", b"77777777777\0") + b"x" * 1024, "truncated tar stream: entry 'big' ends"),
        (_raw_header(b"huge", b"\x80" + b"\0" * 6 + b"\xff" * 5) + b"x" * 512, "truncated tar stream"),
        (_raw_header(b"negative", b"\xff" * 12), "negative size"),
        (_raw_header(b"octal", b"0000000009a\0"), "not an octal number"),
        (_raw_header(b"sum", b"00000000001\0", checksum=False) + b"x" * 512, "checksum mismatch"),
        (_raw_header(b"pax", b"00010000000\0", type=b"x"), "exceeds 1 MiB"),
        (_raw_header(b"short-pax", b"00000001000\0", type=b"x") + b"9 a=b\n", "ends inside a header"),
        (_raw_header(b"sparse", b"00000000000\0", type=b"S"), "sparse files are not supported"),
        (_raw_header(b"volume", b"00000000000\0", type=b"V"), "entry type 'V' is not supported"),
        (_raw_header(b"cut", b"00000000000\0")[:300], "ends inside a header"),
        (bytes(512) + _raw_header(b"after-end", b"00000000000\0"), "data after an end-of-archive block"),
    ],
    ids=[
        "absurd-octal",
        "absurd-base256",
        "negative",
        "bad-octal",
        "checksum",
        "pax-size",
        "short-pax",
        "sparse",
        "unknown-type",
        "cut-header",
        "after-end",
    ],
)
def test_malformed_archives_are_refused(jail: Jail, layer: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        apply(jail, layer)


@pytest.mark.parametrize(
    "fields",
    [
        {"uid": 1 << 32},
        {"gid": 1 << 40},
        {"pax": {"uid": str(1 << 33)}},
        {"devmajor": 1 << 32, "type": tarfile.CHRTYPE},
    ],
)
def test_ids_out_of_range_are_refused(jail: Jail, fields: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument, match="out of range"):
        apply(
            jail,
            tar_of(member("f", **fields), format=tarfile.GNU_FORMAT if "pax" not in fields else tarfile.PAX_FORMAT),
        )


def test_space_padded_numbers_as_old_tars_wrote_them(jail: Jail) -> None:
    block = bytearray(_raw_header(b"old", b"        14 \0"))  # octal: 12 bytes
    block[100:108], block[108:116] = b"   750 \0", b"    17  "
    block[148:156] = b" " * 8
    block[148:156] = b"%6o\0 " % sum(block)
    apply(jail, bytes(block) + b"twelve bytes".ljust(512, b"\0"))
    info = (jail.root / "old").lstat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_size) == (0o750, 0o17, 12)


def test_malformed_pax_records_are_refused(jail: Jail) -> None:
    for records in (b"5 a=b\n", b"10 nokey\n\n", b"x path=a\n", b"12 mtime=1x\n"):
        data = records.ljust(512, b"\0")
        layer = _raw_header(b"pax", b"%011o\0" % len(records), type=b"x") + data + _raw_header(b"f", b"0" * 11 + b"\0")
        with pytest.raises(InvalidArgument, match="PAX"):
            apply(jail, layer)


def test_an_archive_may_end_without_its_end_blocks(jail: Jail) -> None:
    layer = tar_of(member("a", b"a" * 700))
    apply(jail, layer[: 512 + 1024])  # header, data and padding only
    assert (jail.root / "a").read_bytes() == b"a" * 700


def test_the_whole_stream_is_consumed(jail: Jail) -> None:
    consumed = []

    def source() -> Iterator[bytes]:
        for chunk in chunked(tar_of(member("a", b"a")) + b"trailing bytes" * 1000, 1000):
            consumed.append(len(chunk))
            yield chunk

    apply_tar(source(), jail.root)
    assert sum(consumed) == len(tar_of(member("a", b"a"))) + 14000


# -- replacing what is there --------------------------------------------------------------------------


def test_entries_replace_or_merge_what_exists(jail: Jail) -> None:
    root = jail.root
    (root / "was-dir/sub").mkdir(parents=True)
    (root / "was-dir/sub/file").write_bytes(b"old")
    (root / "was-file").write_bytes(b"old")
    (root / "merged").mkdir()
    (root / "merged/old").write_bytes(b"kept")
    (root / "linked").write_bytes(b"shared")
    os.link(root / "linked", root / "other-name")
    apply(
        jail,
        tar_of(
            member("was-dir", b"now a file"),
            directory("was-file", mode=0o701),
            directory("merged", mode=0o711, uid=8),
            member("merged/new", b"new"),
            member("linked", b"rewritten"),
        ),
    )
    assert (root / "was-dir").read_bytes() == b"now a file"
    assert (root / "was-file").is_dir() and stat.S_IMODE((root / "was-file").stat().st_mode) == 0o701
    assert sorted(os.listdir(root / "merged")) == ["new", "old"]
    assert (root / "merged").stat().st_uid == 8
    assert (root / "other-name").read_bytes() == b"shared", "a replaced file gets a new inode"


def test_parent_that_is_a_file_is_refused(jail: Jail) -> None:
    with pytest.raises(InvalidArgument, match="it is not a directory"):
        apply(jail, tar_of(member("a", b"file"), member("a/b", b"under a file")))


def test_trusted_xattrs_are_not_applied(jail: Jail) -> None:
    apply(jail, tar_of(member("f", b"x", pax={"SCHILY.xattr.trusted.overlay.opaque": "y", "SCHILY.xattr.user.a": "b"})))
    assert os.listxattr(jail.root / "f") == ["user.a"]


# -- whiteouts ------------------------------------------------------------------------------------------

WHITEOUT_LAYER = [
    member("a/.wh.gone", uid=3, gid=4),
    member(".wh.b"),
    member("c/kept-before", b"new"),
    member("c/.wh..wh..opq"),
    member("c/added-after", b"new"),
    directory("c/sub"),
    member("c/sub/new", b"new"),
]


def _lower(root: Path) -> None:
    (root / "a").mkdir(mode=0o711)
    os.chown(root / "a", 7, 8)
    (root / "a/keep").write_bytes(b"keep")
    (root / "a/gone").write_bytes(b"gone")
    (root / "b/deep").mkdir(parents=True)
    (root / "b/deep/file").write_bytes(b"b")
    (root / "c/sub").mkdir(parents=True)
    (root / "c/old").write_bytes(b"old")
    (root / "c/sub/old").write_bytes(b"old")


def test_whiteouts_delete(jail: Jail) -> None:
    _lower(jail.root)
    apply(jail, tar_of(*WHITEOUT_LAYER))
    root = jail.root
    assert sorted(os.listdir(root)) == ["a", "c"]
    assert os.listdir(root / "a") == ["keep"]
    assert sorted(os.listdir(root / "c")) == ["added-after", "kept-before", "sub"]
    assert os.listdir(root / "c/sub") == ["new"], "opaque hides lower entries at every depth"


def test_whiteouts_overlay(jail: Jail, tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    lower.mkdir()
    _lower(lower)
    apply(jail, tar_of(*WHITEOUT_LAYER), whiteouts=Whiteouts.OVERLAY, parents=[str(lower)])
    root = jail.root
    for name in ("a/gone", "b"):
        info = (root / name).lstat()
        assert stat.S_ISCHR(info.st_mode) and info.st_rdev == 0
    assert (root / "a/gone").lstat().st_uid == 3
    assert os.getxattr(root / "c", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(root / "c")) == ["added-after", "kept-before", "sub"]
    created = (root / "a").lstat()  # created as a parent: the lower directory's attributes
    assert (stat.S_IMODE(created.st_mode), created.st_uid, created.st_gid) == (0o711, 7, 8)


def test_whiteouts_aufs_are_kept_as_files(jail: Jail) -> None:
    apply(jail, tar_of(*WHITEOUT_LAYER), whiteouts=Whiteouts.AUFS)
    assert (jail.root / "a/.wh.gone").is_file() and (jail.root / ".wh.b").is_file()
    assert (jail.root / "c/.wh..wh..opq").is_file()


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", "a/.wh.."])
@pytest.mark.parametrize("mode", list(Whiteouts))
def test_invalid_whiteout_names_are_refused(jail: Jail, name: str, mode: Whiteouts) -> None:
    with pytest.raises(InvalidArgument, match="invalid whiteout name"):
        apply(jail, tar_of(member(name)), whiteouts=mode)


def test_scoped_path() -> None:
    assert scoped_path("/nonexistent-root", "a/../../b") == "/nonexistent-root/b"
    assert scoped_path("/nonexistent-root", "") == "/nonexistent-root"


def test_nul_bytes_in_pax_names_are_refused(jail: Jail) -> None:
    for pax in ({"path": "a\0b"}, {"linkpath": "t\0"}, {"SCHILY.xattr.user.a\0b": "v"}):
        with pytest.raises(InvalidArgument, match=r"NUL|malformed PAX record"):
            apply(jail, tar_of(member("f", b"x", pax=pax)))
