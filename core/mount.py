"""Performing :class:`~core.types.Mount` lists on Linux: mount(2) and umount2(2) through libc.

Options are fstab-style, as ``mount(8)`` and containerd take them: the known flag words (``ro``,
``rbind``, ``nosuid``, ``rprivate``...) become mount flags, everything else joins the filesystem's
data string (``lowerdir=...``, ``br:...``). A read-only bind mount is made in two steps (bind, then
remount read-only) because the kernel ignores ``MS_RDONLY`` on the first. Propagation words
(``private``, ``rshared``...) are applied with a separate call after the mount, as the kernel wants.

The kernel caps a mount's data at one page. An overlay with many lower directories exceeds it, so
when its options come near the limit the lowerdirs are rewritten relative to their common parent
and the mount runs from that directory (in a helper thread with its own working directory, so the
process's working directory never changes).

Errors are :class:`OSError` with the errno of the failing call and a message naming the mount.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from core.types import Mount

__all__ = [
    "ParsedOptions",
    "is_mountpoint",
    "mount_all",
    "mount_points",
    "parse_options",
    "temp_mount",
    "unmount",
    "unmount_all",
]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 0x20000
MS_PRIVATE = 0x40000
MS_SLAVE = 0x80000
MS_SHARED = 0x100000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
CLONE_FS = 0x200

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_COMPACT_MARGIN = 512  # compact overlay lowerdirs once the data comes this close to a page, as containerd
_BUSY_RETRIES = 50
_BUSY_DELAY = 0.05

# option -> (clears the flag instead of setting it, flag)
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}

_PROPAGATION: dict[str, int] = {
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)


@dataclass(frozen=True)
class ParsedOptions:
    """Mount options split for mount(2): ``flags``, ``propagation`` flags (applied separately) and ``data``."""

    flags: int
    propagation: int
    data: str


def parse_options(options: Sequence[str]) -> ParsedOptions:
    """Split fstab-style options into flags, propagation flags and the data string (unknown words, in order)."""
    flags = propagation = 0
    data = []
    for option in options:
        if option in _FLAGS:
            clear, flag = _FLAGS[option]
            flags = flags & ~flag if clear else flags | flag
        elif option in _PROPAGATION:
            propagation |= _PROPAGATION[option]
        else:
            data.append(option)
    return ParsedOptions(flags, propagation, ",".join(data))


def mount_all(mounts: Sequence[Mount], target: str | os.PathLike[str]) -> None:
    """Perform ``mounts`` in order onto ``target`` (each ``Mount.target`` is relative to it).

    A mount with the ``remount`` option changes the one below it (e.g. aufs ``append:`` of a branch).
    All or nothing: if one fails, those already made are unmounted and the OSError is raised.
    """
    done: list[str] = []
    try:
        for m in mounts:
            where = os.path.join(os.fspath(target), m.target.lstrip("/")) if m.target else os.fspath(target)
            _mount(m, where)
            if "remount" not in m.options:
                done.append(where)
    except BaseException:
        for where in reversed(done):
            unmount(where, detach=True)
        raise


def unmount(target: str | os.PathLike[str], *, detach: bool = False) -> None:
    """Unmount the topmost mount at ``target``; nothing when nothing is mounted there (EINVAL).

    ``detach`` is a lazy unmount (MNT_DETACH). EBUSY is retried for a while before it is raised.
    """
    _unmount(os.fspath(target), detach, ignore=(errno.EINVAL,))


def unmount_all(target: str | os.PathLike[str], *, detach: bool = False) -> None:
    """Unmount every mount stacked at ``target`` until none is left (a missing ``target`` has none)."""
    path = os.fspath(target)
    while _unmount(path, detach, ignore=(errno.EINVAL, errno.ENOENT)):
        pass


@contextmanager
def temp_mount(
    mounts: Sequence[Mount],
    *,
    prefix: str = "containerkit-mount-",
    parent: str | os.PathLike[str] | None = None,
) -> Iterator[Path]:
    """Mount ``mounts`` on a fresh temporary directory (mode 0700, under ``parent`` or the temp dir) and
    yield it; on exit everything there is unmounted and the directory removed, whatever happened."""
    where = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        mount_all(mounts, where)
        try:
            yield where
        finally:
            try:
                unmount_all(where)
            except OSError:  # still busy: detach it, so the directory can go all the same
                unmount_all(where, detach=True)
    finally:
        where.rmdir()


def mount_points() -> list[str]:
    """Every mount point of this process's mount namespace, in /proc/self/mountinfo's order (stacked
    mounts appear once per mount)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as mountinfo:
        return [_unescape(line.split(" ", 5)[4]) for line in mountinfo]


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """Whether something is mounted at ``path`` (symlinks resolved), according to /proc/self/mountinfo."""
    return os.path.realpath(path) in mount_points()


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as octal (``\040``)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mount(m: Mount, target: str) -> None:
    """One mount as containerd's ``Mount.Mount``: main call, propagation change, read-only bind remount."""
    options, chdir = m.options, ""
    if m.type == "overlay" and len(",".join(options)) >= _PAGE_SIZE - _COMPACT_MARGIN:
        chdir, options = _compact_lowerdirs(options)
    parsed = parse_options(options)
    described = f"{m.type} {m.source} on {target} (options {m.format_options()})"
    if len(parsed.data) >= _PAGE_SIZE:
        raise OSError(
            errno.EINVAL, f"mount {described}: option data of {len(parsed.data)} bytes exceeds one page", target
        )
    if not parsed.flags & MS_REMOUNT or parsed.data:
        _syscall_mount(m.source, target, m.type, parsed.flags, parsed.data, chdir, described)
    if parsed.propagation:
        _syscall_mount("", target, "", parsed.propagation | MS_SILENT, "", "", described)
    if parsed.flags & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
        _syscall_mount("", target, "", parsed.flags | MS_REMOUNT, "", "", described)


def _compact_lowerdirs(options: Sequence[str]) -> tuple[str, tuple[str, ...]]:
    """Rewrite ``lowerdir=`` relative to the lowerdirs' common parent; return that parent and the new options.

    ``("", options)`` unchanged when there is nothing to gain (one lowerdir, or only ``/`` in common).
    """
    index = next((i for i, option in enumerate(options) if option.startswith("lowerdir=")), -1)
    if index < 0:
        return "", tuple(options)
    lowers = options[index].removeprefix("lowerdir=").split(":")
    if len(lowers) < 2 or not all(os.path.isabs(lower) for lower in lowers):
        return "", tuple(options)
    common = os.path.commonpath(lowers)
    if common in lowers:  # one lowerdir inside another: keep the parent of it as the base
        common = os.path.dirname(common)
    if common == "/":
        return "", tuple(options)
    relative = ":".join(os.path.relpath(lower, common) for lower in lowers)
    return common, (*options[:index], *options[index + 1 :], f"lowerdir={relative}")


def _syscall_mount(source: str, target: str, fstype: str, flags: int, data: str, chdir: str, described: str) -> None:
    if chdir:
        err = _in_directory(chdir, lambda: _call_mount(source, target, fstype, flags, data))
    else:
        err = _call_mount(source, target, fstype, flags, data)
    if err:
        raise OSError(err, f"mount {described}: {os.strerror(err)}", target)


def _call_mount(source: str, target: str, fstype: str, flags: int, data: str) -> int:
    """mount(2); the errno, 0 on success."""
    result = _libc.mount(
        os.fsencode(source) if source else None,
        os.fsencode(target),
        os.fsencode(fstype) if fstype else None,
        flags,
        os.fsencode(data) if data else None,
    )
    return ctypes.get_errno() if result != 0 else 0


def _in_directory(directory: str, call: Callable[[], int]) -> int:
    """Run ``call`` in a helper thread whose working directory is ``directory`` (unshared from the process)."""
    outcome: list[int] = []

    def run() -> None:
        if _libc.unshare(CLONE_FS) != 0:
            outcome.append(ctypes.get_errno())
            return
        try:
            os.chdir(directory)
        except OSError as exc:
            outcome.append(exc.errno or errno.EIO)
            return
        outcome.append(call())

    helper = threading.Thread(target=run, name="containerkit-mount-chdir")
    helper.start()
    helper.join()
    return outcome[0]


def _unmount(target: str, detach: bool, ignore: tuple[int, ...]) -> bool:
    """umount2(2) with EBUSY retries; True when something was unmounted, False on an ignored errno."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    encoded = os.fsencode(target)
    for _ in range(_BUSY_RETRIES):
        if _libc.umount2(encoded, flags) == 0:
            return True
        err = ctypes.get_errno()
        if err in ignore:
            return False
        if err != errno.EBUSY:
            raise OSError(err, f"unmount {target}: {os.strerror(err)}", target)
        time.sleep(_BUSY_DELAY)
    raise OSError(errno.EBUSY, f"unmount {target}: still busy after {_BUSY_RETRIES} attempts", target)
