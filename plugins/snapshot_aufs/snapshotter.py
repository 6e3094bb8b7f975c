"""The aufs snapshotter: the layout and bookkeeping of :mod:`core.snapshot_storage`, stacked by aufs branches.

Mounts (as docker's and containerd's aufs drivers):

- without a parent: a bind of the snapshot's ``fs`` (read-write when active, read-only for a view);
- a view of a single layer: a read-only bind of that layer's ``fs``;
- otherwise ``Mount("aufs", "none", ("dio", "xino=/dev/shm/aufs.xino", "dirperm1", "br:<fs>=rw:<p1>=ro+wh:..."))``:
  the active snapshot's ``fs`` as the one read-write branch, then the parents nearest first, each
  read-only with whiteouts honoured (``=ro+wh``); a view has the parents only and mounts ``ro``.

aufs takes its branches in the mount data, which the kernel caps at one page. When they do not
fit, the first mount carries as many as fit and each further parent follows as a remount with
``append:<dir>=ro+wh`` (what docker did), so a list of several mounts comes back.

Whiteouts on aufs are files in the upper branch named as in OCI layers: ``.wh.NAME`` hides
``NAME`` below, ``.wh..wh..opq`` in a directory hides everything below it. aufs also keeps its own
``.wh..wh.plnk``/``.wh..wh.orph``/``.wh..wh.aufs`` entries at a writable branch's root.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from core.mount import parse_options
from core.snapshot import Kind
from core.snapshot_storage import DirectorySnapshotter, Snapshot
from core.types import Mount

__all__ = ["DEFAULT_XINO", "AufsSnapshotter", "aufs_mounts"]

DEFAULT_XINO = "/dev/shm/aufs.xino"
"""aufs's external inode number table, where docker and containerd put it (a tmpfs)."""


def aufs_mounts(branches: Sequence[str], options: Sequence[str], *, page_size: int | None = None) -> list[Mount]:
    """The aufs mounts stacking ``branches`` (``<dir>=<perm>``, topmost first) with ``options`` on the first.

    Branches that would push the first mount's data past ``page_size`` (default: the system's)
    follow one by one as ``remount`` mounts appending them at the bottom. Those repeat the flag
    words of ``options`` (``ro``, ``nosuid``...): a remount without them would drop them.
    """
    limit = (page_size or os.sysconf("SC_PAGE_SIZE")) - 1  # the kernel copies the data with its trailing NUL
    used = len(parse_options(options).data)
    first = "br:" + branches[0]
    rest = list(branches[1:])
    while rest and used + 1 + len(first) + 1 + len(rest[0]) <= limit:
        first += ":" + rest.pop(0)
    flags = tuple(option for option in options if not parse_options([option]).data)
    return [
        Mount("aufs", "none", (*options, first)),
        *(Mount("aufs", "none", ("remount", *flags, f"append:{branch}")) for branch in rest),
    ]


class AufsSnapshotter(DirectorySnapshotter):
    """Snapshots under ``root`` (layout of :mod:`core.snapshot_storage`: ``snapshots/<id>/fs``), mounted with aufs.

    ``dirperm1`` (aufs >= 4) checks permissions on the topmost directory only, as a single
    filesystem would; ``xino`` is the inode table file; ``mount_options`` are added to every aufs
    mount. Prepared snapshots labelled for a rebase are ordinary ones: this snapshotter cannot rebase.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        dirperm1: bool = True,
        xino: str = DEFAULT_XINO,
        mount_options: Sequence[str] = (),
    ) -> None:
        super().__init__(root)
        self._options = ("dio", f"xino={xino}", *(("dirperm1",) if dirperm1 else ()), *mount_options)

    def _mounts(self, snapshot: Snapshot) -> list[Mount]:
        parents = snapshot.parent_ids
        active = snapshot.kind is Kind.ACTIVE
        if not parents:
            return [Mount("bind", self.mount_source(snapshot.id), ("rw" if active else "ro", "rbind"))]
        if not active and len(parents) == 1:
            return [Mount("bind", self.mount_source(parents[0]), ("ro", "rbind"))]
        lowers = [f"{self.mount_source(id)}=ro+wh" for id in parents]
        if active:
            return aufs_mounts([f"{self.mount_source(snapshot.id)}=rw", *lowers], self._options)
        return aufs_mounts(lowers, ("ro", *self._options))
