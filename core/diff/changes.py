"""Filesystem changes between two trees, as continuity's ``fs.Changes`` computes them for containerd.

Changes come in walk order: depth first, names sorted bytewise, a directory before its contents.
Two sources:

- :func:`double_walk`: any two mounted trees, walked side by side. Entries are compared on type,
  mode, owner, device, ``security.capability``, and (non-directories) size and mtime, down to the
  content when both mtimes are whole seconds (so they may have been truncated by a tar round trip).
- :func:`overlay_upper`: an overlay upperdir alone (its lowerdirs being the lower tree): every entry
  in it is a change, a 0/0 character device a deletion, an opaque directory hides what is below.
  Raises :class:`NotDescribedByUpper` when the upperdir uses overlay features (redirected
  directories, metacopy) that make the upperdir alone an incomplete account of the changes.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections.abc import Iterator
from typing import NamedTuple

__all__ = ["Change", "ChangeKind", "NotDescribedByUpper", "double_walk", "overlay_upper", "walk"]

_CAPABILITY = "security.capability"
_OPAQUE = "trusted.overlay.opaque"
_INCOMPLETE_XATTRS = ("trusted.overlay.redirect", "trusted.overlay.metacopy")
_COMPARE_CHUNK = 1 << 20


class ChangeKind(enum.Enum):
    """What happened to a path. ``UNMODIFIED`` is reported only for hardlinked files (their other
    names may need them); ``OPAQUE`` marks a directory whose lower contents are hidden."""

    ADD = "add"
    MODIFY = "modify"
    DELETE = "delete"
    UNMODIFIED = "unmodified"
    OPAQUE = "opaque"


class Change(NamedTuple):
    """A change of ``path`` (relative, ``/``-separated); ``info`` is the upper entry's lstat
    (None for a deletion)."""

    kind: ChangeKind
    path: str
    info: os.stat_result | None


class NotDescribedByUpper(Exception):
    """The overlay upperdir does not describe its changes by itself (see the module doc)."""


def walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative path, lstat)`` of everything under ``root`` (not ``root`` itself), in walk order. Iterative:
    a tree as deep as paths allow does not exhaust Python's recursion limit."""
    pending = [_listing(root, "")]  # one iterator per directory being walked, innermost last
    while pending:
        found = next(pending[-1], None)
        if found is None:
            pending.pop()
            continue
        yield found
        path, info = found
        if stat.S_ISDIR(info.st_mode):
            pending.append(_listing(root, path))


def _listing(root: str, rel: str) -> Iterator[tuple[str, os.stat_result]]:
    """The entries of directory ``rel`` under ``root``, names sorted bytewise, each with its lstat."""
    with os.scandir(f"{root}/{rel}" if rel else root) as found:
        entries = sorted(found, key=lambda entry: os.fsencode(entry.name))
    for entry in entries:
        yield (f"{rel}/{entry.name}" if rel else entry.name), entry.stat(follow_symlinks=False)


def double_walk(lower: str, upper: str) -> Iterator[Change]:
    """The changes that turn the tree ``lower`` into the tree ``upper``."""
    lowers, uppers = walk(lower), walk(upper)
    left, right = next(lowers, None), next(uppers, None)
    removed_dir = ""  # a deleted (or replaced) lower directory, with a trailing "/": its contents go with it
    while left is not None or right is not None:
        if left is None:
            order = 1
        elif right is None:
            order = -1
        else:
            order = _compare(left[0], right[0])
        if order > 0:
            assert right is not None
            removed_dir = ""
            yield Change(ChangeKind.ADD, right[0], right[1])
            right = next(uppers, None)
        elif order < 0:
            assert left is not None
            path, info = left
            left = next(lowers, None)
            if removed_dir and path.startswith(removed_dir):
                continue
            removed_dir = path + "/" if stat.S_ISDIR(info.st_mode) else ""
            yield Change(ChangeKind.DELETE, path, None)
        else:
            assert left is not None and right is not None
            path, lower_info = left
            upper_info = right[1]
            same = _same_file(f"{lower}/{path}", lower_info, f"{upper}/{path}", upper_info)
            replaced = stat.S_ISDIR(lower_info.st_mode) and not stat.S_ISDIR(upper_info.st_mode)
            removed_dir = path + "/" if replaced else ""
            left, right = next(lowers, None), next(uppers, None)
            if not same:
                yield Change(ChangeKind.MODIFY, path, upper_info)
            elif _linked(upper_info):
                yield Change(ChangeKind.UNMODIFIED, path, upper_info)


def overlay_upper(upperdir: str) -> list[Change]:
    """The changes an overlay upperdir records, read in full before any is returned (so that
    :class:`NotDescribedByUpper` comes before anything was written)."""
    changes = []
    for path, info in walk(upperdir):
        if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
            changes.append(Change(ChangeKind.DELETE, path, None))
            continue
        names = _xattr_names(f"{upperdir}/{path}")
        if any(name in names for name in _INCOMPLETE_XATTRS):
            raise NotDescribedByUpper(f"{path} in {upperdir} is a redirect or metacopy entry")
        changes.append(Change(ChangeKind.MODIFY, path, info))
        if _OPAQUE in names and os.getxattr(f"{upperdir}/{path}", _OPAQUE, follow_symlinks=False) == b"y":
            changes.append(Change(ChangeKind.OPAQUE, path, info))
    return changes


def _compare(a: str, b: str) -> int:
    """Walk order of two relative paths: component by component, bytewise."""
    key_a = os.fsencode(a).replace(b"/", b"\0")
    key_b = os.fsencode(b).replace(b"/", b"\0")
    return (key_a > key_b) - (key_a < key_b)


def _linked(info: os.stat_result) -> bool:
    return not stat.S_ISDIR(info.st_mode) and info.st_nlink > 1


def _same_file(lower: str, a: os.stat_result, upper: str, b: os.stat_result) -> bool:
    """continuity's sameFile (see the module doc)."""
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return True
    if (a.st_mode, a.st_uid, a.st_gid, a.st_rdev) != (b.st_mode, b.st_uid, b.st_gid, b.st_rdev):
        return False
    if _xattr(lower, _CAPABILITY) != _xattr(upper, _CAPABILITY):
        return False
    if stat.S_ISDIR(a.st_mode):
        return True
    if a.st_size != b.st_size or a.st_mtime_ns // 1_000_000_000 != b.st_mtime_ns // 1_000_000_000:
        return False
    nanos_a, nanos_b = a.st_mtime_ns % 1_000_000_000, b.st_mtime_ns % 1_000_000_000
    if nanos_a or nanos_b:
        return nanos_a == nanos_b
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(lower) == os.readlink(upper)
    return a.st_size == 0 or _same_content(lower, upper)


def _same_content(a: str, b: str) -> bool:
    with open(a, "rb") as left, open(b, "rb") as right:
        while True:
            chunk = left.read(_COMPARE_CHUNK)
            if chunk != right.read(_COMPARE_CHUNK):
                return False
            if not chunk:
                return True


def _xattr(path: str, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def _xattr_names(path: str) -> list[str]:
    try:
        return os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno == errno.ENOTSUP:
            return []
        raise
