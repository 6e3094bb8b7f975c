"""The default snapshotter (plugin ``snapshotter.overlayfs``): layers as directories, stacked by overlayfs.

Usable without the daemon::

    from plugins.snapshot_overlay import OverlaySnapshotter
    snapshotter = OverlaySnapshotter("/tmp/overlay")
    mounts = snapshotter.prepare("work", "")

Declares the ``rebase`` capability (:meth:`OverlaySnapshotter.rebase`). Skips, with the reason, on
a host whose kernel lacks overlayfs or whose root directory cannot hold overlay layers.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from core.mount import temp_mount
from core.plugin import InitContext, Registration, SkipPlugin
from core.snapshot import CAPABILITY_REBASE
from core.snapshot_storage import require_filesystem
from core.types import Mount
from plugins.snapshot_overlay.snapshotter import OverlaySnapshotter

__all__ = ["OverlayConfig", "OverlaySnapshotter", "check_overlay", "plugin"]


@dataclass
class OverlayConfig:
    """The keys accepted in ``[plugins.snapshotter.overlayfs]``, with their defaults."""

    root_path: str = ""
    """Where snapshots live; empty: the plugin's own root (``<root>/snapshotter.overlayfs``)."""

    mount_options: list[str] = field(default_factory=list)
    """Extra options for every overlay mount handed out (e.g. ``volatile``, ``metacopy=on``)."""


def check_overlay(root: Path) -> None:
    """Raise SkipPlugin unless overlayfs is available and an overlay of two lowerdirs mounts inside ``root``."""
    require_filesystem("overlay")
    with tempfile.TemporaryDirectory(prefix="overlay-check-", dir=root) as probe:
        lowers = [Path(probe, name) for name in ("lower1", "lower2")]
        for lower in lowers:
            lower.mkdir()
        try:
            with temp_mount([Mount("overlay", "overlay", (f"lowerdir={lowers[1]}:{lowers[0]}",))], parent=probe):
                pass
        except OSError as exc:
            raise SkipPlugin(f"overlayfs does not work on {root}: {exc}") from exc


def init(ctx: InitContext) -> OverlaySnapshotter:
    """Check the host, open the snapshotter in its root (created 0700) and export where that is."""
    config: OverlayConfig = ctx.config
    root = Path(config.root_path) if config.root_path else ctx.root
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_overlay(root)
    ctx.exports["root"] = str(root)
    return OverlaySnapshotter(root, mount_options=config.mount_options)


plugin = Registration(init=init, config=OverlayConfig, capabilities=(CAPABILITY_REBASE,))
"""What the ``containerkit.snapshotter`` entry point ``overlayfs`` names."""
