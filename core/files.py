"""File-tree helpers shared by the snapshotters, the differ and the volume store."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

__all__ = ["remove_tree"]

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(top: str | os.PathLike[str], on_error: Callable[[str, OSError], None] | None = None) -> None:
    """Remove the directory tree ``top`` (nothing when it is missing), symlinks in it removed, never followed.

    Works at any depth: it walks with directory fds (``openat``/``unlinkat``, one fd open at a time, up
    through ``..``), so neither Python's recursion limit nor PATH_MAX stops it, as they stop
    ``shutil.rmtree`` on a hostile layer's tree. An ``OSError`` other than a vanished entry is raised, or,
    with ``on_error``, reported as ``on_error(path, error)`` and the rest removed as far as it can be.
    """
    top = os.fspath(top)
    names: list[str] = []  # the path below top of the directory ``fd`` is, for messages and the way up
    kept: set[tuple[int, int]] = set()  # directories that could not be emptied or removed: left in place

    def failed(name: str, error: OSError) -> None:
        if isinstance(error, FileNotFoundError):
            return
        if on_error is None:
            raise error
        on_error(os.path.join(top, *names, name) if name else top, error)

    try:
        fd = os.open(top, _DIRECTORY)
    except OSError as error:
        failed("", error)
        return
    try:
        while True:
            child = _empty_but_directories(fd, kept, failed)
            if child is not None:
                try:
                    inner = os.open(child, _DIRECTORY, dir_fd=fd)
                except OSError as error:
                    kept.add(_identity(child, fd))
                    failed(child, error)
                    continue
                os.close(fd)
                fd = inner
                names.append(child)
                continue
            if not names:
                break
            parent = os.open("..", _DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = parent
            name = names.pop()
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError as error:
                kept.add(_identity(name, fd))
                failed(name, error)
    finally:
        os.close(fd)
    try:
        os.rmdir(top)
    except OSError as error:
        failed("", error)


def _empty_but_directories(fd: int, kept: set[tuple[int, int]], failed: Callable[[str, OSError], None]) -> str | None:
    """Unlink every non-directory in directory ``fd``; return the name of a subdirectory to descend into
    (None when only ``kept`` ones are left)."""
    with os.scandir(fd) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if (entry.stat(follow_symlinks=False).st_dev, entry.inode()) not in kept:
                        return entry.name
                else:
                    os.unlink(entry.name, dir_fd=fd)
            except OSError as error:
                failed(entry.name, error)
    return None


def _identity(name: str, fd: int) -> tuple[int, int]:
    """(device, inode) of ``name`` in directory ``fd``."""
    info = os.stat(name, dir_fd=fd, follow_symlinks=False)
    if not stat.S_ISDIR(info.st_mode):
        return (-1, -1)
    return (info.st_dev, info.st_ino)
