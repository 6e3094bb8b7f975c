"""Applying a layer's tar stream onto a directory, as containerd's ``archive.Apply`` does.

Path safety, as containerd (so that the same layer unpacks to the same tree):

- Entry names are cleaned and taken relative to the root as if it were ``/``: an absolute name
  starts at the root, and ``..`` stops there (``../../etc/x`` is ``etc/x``). An entry naming the
  root itself is ignored.
- The parent directories of an entry are resolved with symlinks followed *inside* the root: an
  absolute link target starts at the root, ``..`` stops there, chains are followed (at most 255
  links). The final component is never followed: it is replaced (removed first) unless both it and
  the entry are directories, which merge.
- A hardlink's target is resolved the same way, so it is inside the root too.

Missing parent directories are created (0755 root:root, or with the owner, mode, times and xattrs
of the same directory in the first ``parents`` directory holding it: an overlay's lower layers).
Entries keep their owner, mode (set after the owner, which may clear set-id bits), xattrs (except
``trusted.*``, refused as containerd does), access and modification times; directories get their
times last. On any error the directory is left as far as it got: the caller discards it.

Whiteouts (``.wh.NAME`` deletes NAME from lower layers, ``.wh..wh..opq`` hides a directory's
lower contents) are turned into what the target understands, see :class:`Whiteouts`.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress

from core.diff.tar import (
    BLOCK_DEVICE,
    CHAR_DEVICE,
    DIRECTORY,
    FIFO,
    HARDLINK,
    REGULAR,
    SYMLINK,
    TarEntry,
    TarReader,
)
from core.errors import InvalidArgument
from core.files import remove_tree

__all__ = [
    "OVERLAY_OPAQUE_XATTR",
    "WHITEOUT_OPAQUE",
    "WHITEOUT_PREFIX",
    "Whiteouts",
    "apply_tar",
    "scoped_path",
]

log = logging.getLogger("containerkit.diff")

WHITEOUT_PREFIX = ".wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
MAX_SYMLINKS = 255

_MAX_TIME_NS = (1 << 63) - 1
_DEVICE_TYPES = {CHAR_DEVICE: stat.S_IFCHR, BLOCK_DEVICE: stat.S_IFBLK, FIFO: stat.S_IFIFO}
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Whiteouts(enum.StrEnum):
    """How whiteout entries are applied.

    ``OVERLAY``: into an overlay upperdir: a deleted NAME becomes a 0/0 character device, an opaque
    directory gets the xattr ``trusted.overlay.opaque=y``. ``AUFS``: into an aufs branch: the
    whiteout files are written as they are. ``DELETE``: onto a merged tree (a mounted snapshot, a
    plain directory): NAME is removed, and an opaque directory loses every entry this layer did
    not add.
    """

    OVERLAY = "overlay"
    AUFS = "aufs"
    DELETE = "delete"


def apply_tar(
    chunks: Iterable[bytes],
    root: str | os.PathLike[str],
    *,
    whiteouts: Whiteouts = Whiteouts.DELETE,
    parents: Sequence[str] = (),
) -> None:
    """Extract the tar stream ``chunks`` into the existing directory ``root`` (see the module doc).

    The whole stream is consumed, bytes after the end of the archive included. ``parents`` are the
    directories below ``root`` (nearest first) that lend their attributes to created parents.
    InvalidArgument for a malformed or hostile archive; OSError (naming the entry) for I/O faults.
    """
    reader = TarReader(chunks)
    extractor = _Extractor(os.path.normpath(os.fspath(root)), whiteouts, parents)
    for entry in reader:
        try:
            extractor.extract(entry, reader)
        except OSError as err:
            raise OSError(err.errno, f"applying tar entry {entry.name!r}: {err.strerror}", err.filename) from err
    extractor.finish()
    reader.drain()


def scoped_path(root: str, rel: str, *, start: str = "") -> str:
    """``root`` joined with ``rel``, every symlink met resolved as if ``root`` were ``/`` (containerd's
    ``fs.RootPath``): the result is inside ``root``. Components that do not exist are kept as they are.
    ``start``, a path this function returned for ``root``, is where a relative ``rel`` begins (default:
    the root). InvalidArgument after :data:`MAX_SYMLINKS` links (a loop). Below a missing component
    nothing is looked up (so a deep missing path costs one lookup, not one per component)."""
    resolved = start[len(root) + 1 :].split("/") if len(start) > len(root) else []
    pending = rel.split("/")[::-1]
    links = 0
    missing = -1  # index in ``resolved`` of the first component that does not exist, -1: none
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            if len(resolved) <= missing:
                missing = -1
            continue
        resolved.append(part)
        if missing >= 0:
            continue
        full = root + "/" + "/".join(resolved)
        try:
            mode = os.lstat(full).st_mode
        except FileNotFoundError:
            missing = len(resolved) - 1
            continue
        if stat.S_ISLNK(mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise InvalidArgument(f"too many levels of symbolic links resolving {rel!r} in {root}")
            resolved.pop()
            target = os.readlink(full)
            if target.startswith("/"):
                resolved.clear()
            pending.extend(target.split("/")[::-1])
    return root + "/" + "/".join(resolved) if resolved else root


def _clean(name: str) -> str:
    """``name`` cleaned and made relative to the root, which ``..`` cannot leave (``""``: the root itself)."""
    if "//" not in name and "/." not in "/" + name:  # the common case: nothing to clean
        return name.strip("/")
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
    return "/".join(parts)


def _remove_all(path: str) -> bool:
    """Remove ``path`` (a whole tree for a directory; a symlink itself); return whether it was a
    directory or symlink (something a resolved path may have gone through). Missing is fine."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(mode):
        remove_tree(path)
        return True
    os.unlink(path)
    return stat.S_ISLNK(mode)


def _bound(nanoseconds: int) -> int:
    """containerd's boundTime: times before the epoch or past what a timespec holds become the epoch."""
    return nanoseconds if 0 <= nanoseconds <= _MAX_TIME_NS else 0


class _Extractor:
    def __init__(self, root: str, whiteouts: Whiteouts, parents: Sequence[str]) -> None:
        self.root = root
        self.whiteouts = whiteouts
        self.parents = [os.path.normpath(parent) for parent in parents]
        self.dirs: dict[str, str] = {}  # cleaned relative parent -> resolved path, known to be a directory
        self.unpacked: set[str] = set()  # paths this layer wrote (DELETE: kept by an opaque whiteout)
        self.dir_times: list[tuple[str, int, int]] = []

    def extract(self, entry: TarEntry, reader: TarReader) -> None:
        rel = _clean(entry.name)
        if not rel:
            return  # the root itself: containerd ignores it
        parent_rel, _, base = rel.rpartition("/")
        parent = self._directory(parent_rel)
        path = f"{parent}/{base}"
        if base.startswith(WHITEOUT_PREFIX) and self._whiteout(entry, parent, base):
            return
        kind = entry.type
        if kind == REGULAR:
            self._write_file(entry, path, reader)
        else:
            if kind == DIRECTORY:
                self._make_directory(path)
            elif kind == SYMLINK:
                self._create(path, lambda: os.symlink(entry.linkname, path))
            elif kind == HARDLINK:
                target = self._link_target(entry)
                self._create(path, lambda: os.link(target, path, follow_symlinks=False))
            else:
                device = os.makedev(entry.devmajor, entry.devminor)
                self._create(path, lambda: os.mknod(path, entry.mode | _DEVICE_TYPES[kind], device))
            self._set_attributes(entry, path)
        if self.whiteouts is Whiteouts.DELETE:
            self.unpacked.add(path)

    def finish(self) -> None:
        """Set the directories' times, now that nothing more is written into them."""
        for path, atime, mtime in self.dir_times:
            with suppress(FileNotFoundError):  # removed again by a later whiteout of the same layer
                os.utime(path, ns=(atime, mtime), follow_symlinks=False)

    # -- entries -------------------------------------------------------------------------------

    def _whiteout(self, entry: TarEntry, parent: str, base: str) -> bool:
        """Apply a whiteout entry; return whether it is done with (False: write it as a file)."""
        if base != WHITEOUT_OPAQUE:
            original = base.removeprefix(WHITEOUT_PREFIX)
            if original in ("", ".", ".."):
                raise InvalidArgument(f"invalid whiteout name {entry.name!r}")
            target = f"{parent}/{original}"
            if self.whiteouts is Whiteouts.OVERLAY:
                os.mknod(target, stat.S_IFCHR, 0)
                os.chown(target, entry.uid, entry.gid, follow_symlinks=False)
                return True
            if self.whiteouts is Whiteouts.DELETE:
                if _remove_all(target):
                    self.dirs.clear()
                return True
            return False
        if self.whiteouts is Whiteouts.OVERLAY:
            os.setxattr(parent, OVERLAY_OPAQUE_XATTR, b"y")
            return True
        if self.whiteouts is Whiteouts.DELETE:
            self._clear_opaque(parent)
            self.dirs.clear()
            return True
        return False

    def _clear_opaque(self, directory: str) -> None:
        """Remove what this layer did not write from ``directory``, at any depth (without recursion)."""
        pending = [directory]
        while pending:
            with os.scandir(pending.pop()) as entries:
                for child in entries:
                    if child.path not in self.unpacked:
                        _remove_all(child.path)
                    elif child.is_dir(follow_symlinks=False):
                        pending.append(child.path)

    def _write_file(self, entry: TarEntry, path: str, reader: TarReader) -> None:
        try:
            fd = os.open(path, _CREATE_FLAGS, 0o600)
        except FileExistsError:
            if _remove_all(path):
                self.dirs.clear()
            fd = os.open(path, _CREATE_FLAGS, 0o600)
        try:
            reader.copy_to(fd)
            os.fchown(fd, entry.uid, entry.gid)
            if entry.xattrs:
                self._set_xattrs(entry, fd, regular=True)
            os.fchmod(fd, entry.mode)
            os.utime(fd, ns=self._times(entry))
        finally:
            os.close(fd)

    def _make_directory(self, path: str) -> None:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                return  # merge: only the entry's attributes are applied
            if _remove_all(path):
                self.dirs.clear()
            os.mkdir(path, 0o700)

    def _create(self, path: str, make: Callable[[], None]) -> None:
        """Run ``make`` (which creates ``path``), replacing whatever is at ``path`` already."""
        try:
            make()
        except FileExistsError:
            if _remove_all(path):
                self.dirs.clear()
            make()

    def _link_target(self, entry: TarEntry) -> str:
        """The path a hardlink entry links to, inside the root; InvalidArgument unless it names an
        existing non-directory there (a layer can only link to what it or the snapshot holds)."""
        rel = _clean(entry.linkname)
        parent_rel, _, base = rel.rpartition("/")
        try:
            parent = self.dirs.get(parent_rel) or scoped_path(self.root, parent_rel)
            target = f"{parent}/{base}" if base else parent
            is_directory = stat.S_ISDIR(os.lstat(target).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            raise InvalidArgument(
                f"invalid hardlink {entry.name!r}: its target {entry.linkname!r} is not in the layer or snapshot"
            ) from None
        if is_directory:
            raise InvalidArgument(f"invalid hardlink {entry.name!r}: its target {entry.linkname!r} is a directory")
        return target

    def _set_attributes(self, entry: TarEntry, path: str) -> None:
        os.chown(path, entry.uid, entry.gid, follow_symlinks=False)
        mode = os.lstat(path).st_mode if entry.type == HARDLINK else 0
        if entry.xattrs:
            self._set_xattrs(entry, path, regular=entry.type == DIRECTORY or stat.S_ISREG(mode))
        if entry.type == DIRECTORY:
            os.chmod(path, entry.mode)
            self.dir_times.append((path, *self._times(entry)))
            return
        if entry.type != SYMLINK and not stat.S_ISLNK(mode):
            os.chmod(path, entry.mode)
        os.utime(path, ns=self._times(entry), follow_symlinks=False)

    @staticmethod
    def _times(entry: TarEntry) -> tuple[int, int]:
        """(atime, mtime) as containerd sets them: the access time is never older than the modification."""
        mtime = entry.mtime
        atime = entry.atime if entry.atime is not None and entry.atime > mtime else mtime
        return _bound(atime), _bound(mtime)

    def _set_xattrs(self, entry: TarEntry, target: int | str, *, regular: bool) -> None:
        for key, value in entry.xattrs.items():
            if key.startswith("trusted."):
                log.warning("ignored xattr %s of %r: admin attributes from a layer are not applied", key, entry.name)
                continue
            try:
                os.setxattr(target, key, value, follow_symlinks=isinstance(target, int))
            except OSError as err:
                # As containerd: a filesystem without xattrs, or user.* on what cannot carry them.
                if err.errno == errno.ENOTSUP or (err.errno == errno.EPERM and key.startswith("user.") and not regular):
                    log.warning("ignored xattr %s of %r: %s", key, entry.name, err.strerror)
                    continue
                raise

    # -- parents -------------------------------------------------------------------------------

    def _directory(self, rel: str) -> str:
        """The resolved path of parent ``rel`` (``""``: the root), created with its parents if missing.

        Each level not known yet is resolved in its parent's resolution (one component to look at, not
        all), top down and without recursion: a layer's paths may be deeper than the recursion limit."""
        unknown = []
        while rel and rel not in self.dirs:
            unknown.append(rel)
            rel = rel.rpartition("/")[0]
        path = self.dirs[rel] if rel else self.root
        for level in reversed(unknown):
            path = scoped_path(self.root, level.rpartition("/")[2], start=path)
            self._make_parents(path)
            self.dirs[level] = path
        return path

    def _make_parents(self, path: str) -> None:
        """containerd's mkparent: ``path`` (inside the root) must be a directory; create what is missing
        (the nearest existing ancestor found without recursion)."""
        missing = []
        while path != self.root:
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                missing.append(path)
                path = os.path.dirname(path)
                continue
            if not stat.S_ISDIR(mode):
                raise InvalidArgument(f"cannot extract into {path[len(self.root) :]!r}: it is not a directory")
            break
        for directory in reversed(missing):
            os.mkdir(directory, 0o755)
            os.chmod(directory, 0o755)
            self._copy_from_parents(directory)

    def _copy_from_parents(self, path: str) -> None:
        """Give a created directory the attributes of the same directory in the first parent that has it."""
        rel = path[len(self.root) + 1 :]
        for parent in self.parents:
            lower = scoped_path(parent, rel)
            try:
                info = os.lstat(lower)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(info.st_mode):
                return  # replaced below: nothing to inherit
            os.chown(path, info.st_uid, info.st_gid, follow_symlinks=False)
            os.chmod(path, stat.S_IMODE(info.st_mode))
            os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns), follow_symlinks=False)
            _copy_xattrs(lower, path)
            return


def _copy_xattrs(source: str, destination: str) -> None:
    """Copy ``source``'s xattrs but ``trusted.*`` onto ``destination``, keeping any it has already."""
    try:
        names = os.listxattr(source, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.ENODATA):
            return
        raise
    for name in names:
        if name.startswith("trusted."):
            continue
        try:
            os.setxattr(destination, name, os.getxattr(source, name), os.XATTR_CREATE)
        except OSError as err:
            if err.errno not in (errno.ENOTSUP, errno.ENODATA, errno.EEXIST):
                raise
