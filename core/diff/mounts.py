"""What the differ reads from the shape of a snapshot's mounts (containerd's conventions for each type)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

from core.types import Mount

__all__ = ["aufs_branches", "is_bind", "lower_dirs", "overlay_dirs", "readonly"]


def overlay_dirs(mount: Mount) -> tuple[str, list[str]]:
    """An overlay mount's ``upperdir`` (``""`` without one) and its lowerdirs, nearest first."""
    upper, lowers = "", []
    for option in mount.options:
        if option.startswith("upperdir="):
            upper = option.removeprefix("upperdir=")
        elif option.startswith("lowerdir="):
            lowers = option.removeprefix("lowerdir=").split(":")
    return upper, lowers


def aufs_branches(mount: Mount) -> tuple[str, list[str]] | None:
    """The rw branch and the ro lowers of containerd's aufs options (``br:<upper>=rw[:<lower>=ro+wh]*``);
    None for any other shape."""
    upper, lowers = "", []
    for option in mount.options:
        if not option.startswith("br:"):
            continue
        for branch in option.removeprefix("br:").split(":"):
            if branch.endswith("=rw") and not upper:
                upper = branch.removesuffix("=rw")
            elif branch.endswith("=ro+wh") and upper:
                lowers.append(branch.removesuffix("=ro+wh"))
            else:
                return None
    return (upper, lowers) if upper else None


def is_bind(mount: Mount) -> bool:
    """Whether ``mount`` is a bind mount (of its ``source`` directory)."""
    return mount.type == "bind" or "bind" in mount.options or "rbind" in mount.options


def lower_dirs(mounts: Sequence[Mount]) -> list[str] | None:
    """The directories that, stacked nearest first, make up the tree of ``mounts`` (read-only): one
    bind mount's source, or one overlay's upperdir and lowerdirs. None for any other shape."""
    if len(mounts) != 1:
        return None
    mount = mounts[0]
    if mount.type == "overlay":
        upper, lowers = overlay_dirs(mount)
        dirs = [upper, *lowers] if upper else lowers
    elif is_bind(mount):
        dirs = [mount.source]
    else:
        return None
    return [os.path.normpath(path) for path in dirs]


def readonly(mounts: Sequence[Mount]) -> list[Mount]:
    """``mounts`` made read-only as containerd does: an overlay's upperdir becomes its top lowerdir
    (without a workdir, so it can be mounted beside a read-write mount of it), others get ``ro``."""
    out = []
    for mount in mounts:
        if mount.type == "overlay":
            upper, lowers = overlay_dirs(mount)
            options = [o for o in mount.options if not o.startswith(("upperdir=", "workdir=", "lowerdir="))]
            options.append("lowerdir=" + ":".join([upper, *lowers] if upper else lowers))
        else:
            options = [o for o in mount.options if o not in ("rw", "ro")] + ["ro"]
        out.append(replace(mount, options=tuple(options)))
    return out
