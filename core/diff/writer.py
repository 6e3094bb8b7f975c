"""Writing a layer: the changes between two snapshots' mounts as an OCI layer tar (containerd's
``archive.ChangeWriter`` over continuity's changes), compressed as asked, hashed as it is written.

The tar is PAX-format, entries in walk order (sorted, so the same trees give the same bytes), with
deletions as ``.wh.NAME`` and hidden lower directory contents as ``.wh..wh..opq`` (empty regular
files, time 0). Like containerd, each change's unchanged parent directories are written before it,
mtimes are truncated to seconds, sockets are skipped, and hardlinked files are written once with
their other names as links. Unlike containerd (which keeps only ``security.capability``), every
xattr but ``trusted.*`` and ``security.selinux`` (host-specific) is recorded.

Fast path: when ``upper`` is one overlay mount whose lowerdirs are exactly the tree of ``lower``,
the changes are read from its upperdir without mounting anything; otherwise both are mounted
read-only on temporary directories and walked side by side.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
from collections.abc import Callable, Iterable, Sequence

from core.diff.archive import WHITEOUT_OPAQUE, WHITEOUT_PREFIX
from core.diff.changes import Change, ChangeKind, NotDescribedByUpper, double_walk, overlay_upper
from core.diff.compression import Compression, compressor
from core.diff.mounts import lower_dirs, overlay_dirs, readonly
from core.digest import Digest, Digester
from core.types import Mount

__all__ = ["LayerWriter", "write_diff"]

log = logging.getLogger("containerkit.diff")

_BUFFER = 1 << 20
_SKIPPED_XATTRS = ("trusted.", "security.selinux")
_TYPES = {
    stat.S_IFREG: tarfile.REGTYPE,
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
}


def write_diff(
    lower: Sequence[Mount], upper: Sequence[Mount], compression: Compression, sink: Callable[[bytes], object]
) -> Digest:
    """Write the layer that turns ``lower`` into ``upper`` to ``sink``, compressed; return its diff id
    (the digest of the uncompressed tar). See the module doc for the two paths."""
    digester = Digester()
    compress, flush = compressor(compression)

    def out(data: bytes) -> None:
        digester.update(data)
        if piece := compress(data):
            sink(piece)

    upperdir = _overlay_upperdir(lower, upper)
    changes = None
    if upperdir:
        try:
            changes = overlay_upper(upperdir)
        except NotDescribedByUpper as err:
            log.debug("diff: walking both trees: %s", err)
    if changes is not None:
        _write(changes, upperdir, out)
    else:
        from core.mount import temp_mount

        with (
            temp_mount(readonly(lower), prefix="containerkit-diff-lower-") as lower_root,
            temp_mount(readonly(upper), prefix="containerkit-diff-upper-") as upper_root,
        ):
            _write(double_walk(str(lower_root), str(upper_root)), str(upper_root), out)
    if tail := flush():
        sink(tail)
    return digester.digest()


def _overlay_upperdir(lower: Sequence[Mount], upper: Sequence[Mount]) -> str:
    """The upperdir of ``upper`` when it alone holds the changes from ``lower``; ``""`` otherwise."""
    if len(upper) != 1 or upper[0].type != "overlay":
        return ""
    upperdir, lowers = overlay_dirs(upper[0])
    if upperdir and lower_dirs(lower) == [os.path.normpath(path) for path in lowers]:
        return upperdir
    return ""


def _write(changes: Iterable[Change], source: str, out: Callable[[bytes], None]) -> None:
    writer = LayerWriter(source, out)
    for change in changes:
        writer.add(change)
    writer.close()


class LayerWriter:
    """Turns changes of the tree at ``source`` into a layer tar, handed to ``out`` in pieces of
    about 1 MiB. Feed :meth:`add` in walk order, then :meth:`close`."""

    def __init__(self, source: str, out: Callable[[bytes], None]) -> None:
        self._source = source
        self._out = out
        self._buffer = bytearray()
        self._dirs: set[str] = set()  # directories written already
        self._inode_names: dict[tuple[int, int], str] = {}  # hardlinked inode -> the name written with data
        self._inode_waiting: dict[tuple[int, int], list[str]] = {}  # unmodified names of an inode not written yet

    def add(self, change: Change) -> None:
        """Write one change (and the parent directories it needs)."""
        kind, path = change.kind, change.path
        if kind is ChangeKind.DELETE:
            parent, _, base = path.rpartition("/")
            self._marker(f"{parent}/{WHITEOUT_PREFIX}{base}" if parent else WHITEOUT_PREFIX + base)
        elif kind is ChangeKind.OPAQUE:
            self._marker(f"{path}/{WHITEOUT_OPAQUE}")
        else:
            assert change.info is not None
            self._entry(kind, path, change.info)

    def close(self) -> None:
        """End the archive (two zero blocks) and hand out what is buffered."""
        self._buffer += bytes(2 * tarfile.BLOCKSIZE)
        self._flush()

    # -- internals -----------------------------------------------------------------------------

    def _entry(self, kind: ChangeKind, path: str, info: os.stat_result) -> None:
        fmt = stat.S_IFMT(info.st_mode)
        if fmt == stat.S_IFSOCK:
            return
        full = f"{self._source}/{path}"
        header = tarfile.TarInfo(path + "/" if fmt == stat.S_IFDIR else path)
        header.type = _TYPES[fmt]
        header.mode = stat.S_IMODE(info.st_mode)
        header.uid, header.gid = info.st_uid, info.st_gid
        header.uname = header.gname = ""
        header.mtime = info.st_mtime_ns // 1_000_000_000
        if fmt == stat.S_IFREG:
            header.size = info.st_size
        elif fmt == stat.S_IFLNK:
            header.linkname = os.readlink(full)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            header.devmajor, header.devminor = os.major(info.st_rdev), os.minor(info.st_rdev)
        links: list[str] = []
        if fmt != stat.S_IFDIR and info.st_nlink > 1:
            inode = (info.st_dev, info.st_ino)
            first = self._inode_names.get(inode)
            if first is not None:
                header.type, header.linkname, header.size = tarfile.LNKTYPE, first, 0
            elif kind is ChangeKind.UNMODIFIED:
                self._inode_waiting.setdefault(inode, []).append(header.name)
                return
            else:
                self._inode_names[inode] = header.name
                links = self._inode_waiting.pop(inode, [])
        elif kind is ChangeKind.UNMODIFIED:
            return
        header.pax_headers = _xattrs(full)
        self._parents(path)
        self._header(header)
        if fmt == stat.S_IFDIR:
            self._dirs.add(path)
        if header.type == tarfile.REGTYPE and header.size:
            self._copy(full, header.size)
        for name in links:
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.LNKTYPE, header.name
            link.mode, link.uid, link.gid, link.mtime = header.mode, header.uid, header.gid, header.mtime
            link.uname = link.gname = ""
            link.pax_headers = header.pax_headers
            self._parents(name)
            self._header(link)

    def _marker(self, name: str) -> None:
        """An empty whiteout file (deletion or opaque marker)."""
        self._parents(name)
        header = tarfile.TarInfo(name)
        header.mode = 0
        header.uname = header.gname = ""
        self._header(header)

    def _parents(self, path: str) -> None:
        """Write ``path``'s parent directory first, unless it is the root or already written."""
        parent = path.rpartition("/")[0]
        if parent and parent not in self._dirs:
            self._dirs.add(parent)
            self._entry(ChangeKind.MODIFY, parent, os.stat(f"{self._source}/{parent}"))

    def _header(self, header: tarfile.TarInfo) -> None:
        self._buffer += header.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        if len(self._buffer) >= _BUFFER:
            self._flush()

    def _copy(self, path: str, size: int) -> None:
        self._flush()
        left = size
        with open(path, "rb", buffering=0) as source:
            while left:
                data = source.read(min(left, _BUFFER))
                if not data:
                    raise OSError(f"{path} shrank while it was written to the layer ({size - left} of {size} bytes)")
                self._out(data)
                left -= len(data)
        self._buffer += bytes(-size % tarfile.BLOCKSIZE)

    def _flush(self) -> None:
        if self._buffer:
            self._out(bytes(self._buffer))
            self._buffer.clear()


def _xattrs(path: str) -> dict[str, str]:
    """The PAX records of ``path``'s xattrs (values as surrogate-escaped text: tarfile writes them back
    as the original bytes)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {
        f"SCHILY.xattr.{name}": os.getxattr(path, name, follow_symlinks=False).decode("utf-8", "surrogateescape")
        for name in names
        if not name.startswith(_SKIPPED_XATTRS)
    }
