"""The overlayfs snapshotter: each snapshot's layer is a directory, and mounts stack them with overlayfs.

Mounts (as containerd's ``snapshots/overlay``):

- an active snapshot without a parent: a read-write bind of its ``fs``; a view without a parent:
  a read-only bind of its (empty) ``fs``;
- a view of a single layer: a read-only bind of that layer's ``fs``;
- otherwise an overlay, lowerdirs nearest parent first; an active snapshot adds its ``fs`` as
  upperdir and its ``work`` as workdir, a view has lowerdirs only (overlayfs makes that read-only).

An active snapshot prepared without a parent but with :data:`~core.snapshot.LABEL_REBASE` is an
overlay over the always-empty ``<root>/empty``, so deletions made through it (or extracted into
its upperdir by a differ) are recorded as overlay whiteouts: a character device 0/0 named like the
deleted entry, or the xattr ``trusted.overlay.opaque=y`` on a directory whose lower contents are
hidden. :meth:`OverlaySnapshotter.rebase` commits it on top of any committed parent, which is what
lets layers unpack in parallel.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from core.snapshot import Kind
from core.snapshot_storage import DirectorySnapshotter, Snapshot
from core.types import Mount

__all__ = ["OverlaySnapshotter"]

_INDEX_PARAMETER = Path("/sys/module/overlay/parameters/index")


class OverlaySnapshotter(DirectorySnapshotter):
    """Snapshots under ``root`` (layout of :mod:`core.snapshot_storage`, plus ``<root>/empty``), mounted with overlayfs.

    ``mount_options`` are added to every overlay mount (before the directories); ``index=off`` is
    always added where the kernel has the ``index`` feature, as containerd does.
    """

    def __init__(self, root: str | os.PathLike[str], *, mount_options: Sequence[str] = ()) -> None:
        super().__init__(root)
        self._empty = self.root / "empty"
        self._empty.mkdir(mode=0o755, exist_ok=True)
        self._options = (*(("index=off",) if _INDEX_PARAMETER.exists() else ()), *mount_options)

    def work_path(self, id: str) -> Path:
        """The overlay workdir of active snapshot ``id``."""
        return Path(self.mount_source(id, "work"))

    def rebase(self, name: str, key: str, parent: str, labels: Mapping[str, str] | None = None) -> None:
        self._commit(name, key, labels, onto=parent)

    def _make_directory(self, path: Path, kind: Kind) -> None:
        super()._make_directory(path, kind)
        if kind is Kind.ACTIVE:
            (path / "work").mkdir(mode=0o711)

    def _mounts(self, snapshot: Snapshot) -> list[Mount]:
        parents = snapshot.parent_ids
        active = snapshot.kind is Kind.ACTIVE
        if not parents and not snapshot.rebase:
            return [Mount("bind", self.mount_source(snapshot.id), ("rw" if active else "ro", "rbind"))]
        if not active and len(parents) == 1:
            return [Mount("bind", self.mount_source(parents[0]), ("ro", "rbind"))]
        lowers = [self.mount_source(id) for id in parents] or [str(self._empty)]
        options = list(self._options)
        if active:
            upper, work = self.mount_source(snapshot.id), self.mount_source(snapshot.id, "work")
            options += [f"workdir={work}", f"upperdir={upper}"]
        options.append("lowerdir=" + ":".join(lowers))
        return [Mount("overlay", "overlay", tuple(options))]
