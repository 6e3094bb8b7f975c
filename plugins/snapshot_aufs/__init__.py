"""The aufs snapshotter (plugin ``snapshotter.aufs``): overlayfs's layout and bookkeeping, stacked by aufs.

Usable without the daemon where the kernel has aufs::

    from plugins.snapshot_aufs import AufsSnapshotter
    snapshotter = AufsSnapshotter("/tmp/aufs")

The plugin skips, saying why, where the kernel has no aufs (not in ``/proc/filesystems`` and
``modprobe aufs`` fails) - most kernels since aufs left the distributions. It probes whether this
aufs knows ``dirperm1`` and leaves it out otherwise.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from core.mount import temp_mount
from core.plugin import InitContext, Registration, SkipPlugin
from core.snapshot_storage import require_filesystem
from core.types import Mount
from plugins.snapshot_aufs.snapshotter import DEFAULT_XINO, AufsSnapshotter, aufs_mounts

__all__ = ["AufsConfig", "AufsSnapshotter", "aufs_mounts", "check_aufs", "plugin"]


@dataclass
class AufsConfig:
    """The keys accepted in ``[plugins.snapshotter.aufs]``, with their defaults."""

    root_path: str = ""
    """Where snapshots live; empty: the plugin's own root (``<root>/snapshotter.aufs``)."""

    xino: str = DEFAULT_XINO
    """aufs's external inode number table (``xino=``)."""

    mount_options: list[str] = field(default_factory=list)
    """Extra options for every aufs mount handed out."""


def check_aufs(root: Path, xino: str) -> bool:
    """Raise SkipPlugin unless an aufs branch mounts inside ``root``; return whether aufs accepts ``dirperm1``."""
    with tempfile.TemporaryDirectory(prefix="aufs-check-", dir=root) as probe:
        branch = Path(probe, "branch")
        branch.mkdir()
        failure: OSError | None = None
        for extra in (("dirperm1",), ()):
            options = ("dio", f"xino={xino}", *extra, f"br:{branch}=rw")
            try:
                with temp_mount([Mount("aufs", "none", options)], parent=probe):
                    return bool(extra)
            except OSError as exc:
                failure = exc
    raise SkipPlugin(f"aufs does not mount on {root}: {failure}")


def init(ctx: InitContext) -> AufsSnapshotter:
    """Check the kernel, open the snapshotter in its root (created 0700) and export where that is."""
    config: AufsConfig = ctx.config
    root = Path(config.root_path) if config.root_path else ctx.root
    require_filesystem("aufs")  # before creating anything on a host without aufs
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    dirperm1 = check_aufs(root, config.xino)
    ctx.exports["root"] = str(root)
    return AufsSnapshotter(root, dirperm1=dirperm1, xino=config.xino, mount_options=config.mount_options)


plugin = Registration(init=init, config=AufsConfig)
"""What the ``containerkit.snapshotter`` entry point ``aufs`` names."""
