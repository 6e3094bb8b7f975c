"""``ctr snapshots`` against containerkitd, side by side with containerd 1.6: no images involved, just the
snapshot verbs on a chain of snapshots made and written here, and every error case; outputs must match."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
from interop import ctr, normalised

from core.mount import temp_mount
from core.types import Mount

pytestmark = pytest.mark.integration

NAMESPACE = "ctr-snapshots"


def written(mount_command: str, files: dict[str, str]) -> None:
    """Mount what a printed ``mount -t TYPE SOURCE TARGET -o OPTIONS`` line describes and write ``files``."""
    _, _, fstype, source, _, _, options = shlex.split(mount_command)
    with temp_mount([Mount(fstype, source, tuple(options.split(",")))]) as root:
        for name, text in files.items():
            (root / name).write_text(text)


def transcript(daemon: Any) -> list[tuple[str, int, str, str]]:
    """Run the same ``ctr snapshots`` session against ``daemon``; each command with its exit code and output."""
    lines: list[tuple[str, int, str, str]] = []

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        result = ctr(daemon, "snapshots", *args, check=False, namespace=NAMESPACE)
        if args[0] == "label":  # ctr prints the labels in Go's map order
            result.stdout = ",".join(sorted(result.stdout.strip().split(","))) + "\n"
        lines.append((" ".join(args), result.returncode, normalised(result.stdout), normalised(result.stderr)))
        return result

    run("prepare", "scratch")
    written(run("mounts", "/target", "scratch").stdout.strip(), {"hello": "hello\n"})
    run("commit", "base", "scratch")
    run("prepare", "work", "base")  # on a parent: an overlay
    written(run("mounts", "/target", "work").stdout.strip(), {"added": "added\n"})
    run("commit", "layer", "work")
    run("view", "look", "layer")
    run("label", "look", "containerd.io/gc.root=kept")  # ctr's views have no gc.root: a collection would take it
    run("view", "peek", "base")  # a view of one layer: a read-only bind
    run("label", "peek", "containerd.io/gc.root=kept")
    run("prepare", "--mounts", "top", "layer")
    run("mounts", "/mnt", "look")
    run("mounts", "/mnt", "peek")
    for key in ("base", "layer", "look", "top"):
        run("info", key)
    run("usage", "-b", "base")
    run("ls")
    run("tree")
    run("label", "layer", "team=infra", "tier=")
    run("info", "layer")
    for failing in (
        ("rm", "layer"),
        ("rm", "missing"),
        ("commit", "layer", "top"),
        ("commit", "new", "look"),
        ("commit", "new", "layer"),
        ("commit", "new", "missing"),
        ("prepare", "other", "missing"),
        ("prepare", "other", "top"),
        ("view", "other", "top"),
        ("prepare", "top"),
        ("mounts", "/mnt", "layer"),
        ("mounts", "/mnt", "missing"),
        ("info", "missing"),
        ("usage", "missing"),
    ):
        run(*failing)
    run("rm", "top", "look", "peek", "layer", "base")
    run("ls")
    return lines


QUIET_GC = "[plugins.gc.scheduler]\ndelay_after_delete_seconds = 60.0\nstartup_delay_seconds = 60.0\n"
"""The session's views live unlabelled for a moment (view, then label), as they would in containerd: a collection
0.1 s after the session's commits, or the one 1 s after the daemon started, could take one in between on a
loaded host, so ours waits a minute for both."""


def test_ctr_snapshots_session_matches_containerd(make_daemon: Any, containerd: Any) -> None:
    ours, theirs = transcript(make_daemon(QUIET_GC)), transcript(containerd)
    mismatches = [
        f"$ ctr snapshots {a[0]}\n  ours:   {a[1:]}\n  theirs: {b[1:]}"
        for a, b in zip(ours, theirs, strict=True)
        if a != b
    ]
    assert not mismatches, "\n".join(mismatches)


def test_an_unknown_snapshotter_is_refused_as_containerd_refuses_it(daemon: Any, containerd: Any) -> None:
    results = [ctr(d, "snapshots", "--snapshotter", "zfs", "ls", check=False) for d in (daemon, containerd)]
    assert [(r.returncode, r.stderr) for r in results[:1]] == [(r.returncode, r.stderr) for r in results[1:]]
    assert "snapshotter not loaded: zfs" in results[0].stderr


def test_a_view_without_gc_root_goes_with_the_next_collection(daemon: Any) -> None:
    """As in containerd: ``ctr snapshots view`` sets no gc.root label, so garbage collection takes the view."""
    ctr(daemon, "snapshots", "prepare", "a")
    ctr(daemon, "snapshots", "commit", "base", "a")
    ctr(daemon, "snapshots", "view", "look", "base")
    ctr(daemon, "leases", "create", "--id", "l")
    ctr(daemon, "leases", "rm", "--sync", "l")  # a synchronous collection
    assert ctr(daemon, "snapshots", "ls").stdout.split() == ["KEY", "PARENT", "KIND", "base", "Committed"]
    assert len(list(Path(daemon.root, "snapshotter.overlayfs", "snapshots").iterdir())) == 1
