"""What a running containerkitd holds, for the soak and resource-limit tests: open fds, memory, threads,
mounts under its directory, the processes naming it (shims and their containers) and a namespace's cgroups.

Everything is read from /proc and /sys/fs/cgroup; nothing here changes the daemon.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from interop import CGROUPS, processes_naming

MIB = 1 << 20


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _kib(value: str) -> int:
    return int(value.split()[0]) * 1024


def rss(pid: int) -> int:
    """The process's resident set size now, in bytes."""
    return _kib(_status(pid)["VmRSS"])


def peak_rss(pid: int) -> int:
    """The largest resident set size the process has had so far (VmHWM), in bytes."""
    return _kib(_status(pid)["VmHWM"])


def reset_peak_rss(pid: int) -> None:
    """Start measuring :func:`peak_rss` afresh from the process's RSS now (Linux's clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory`` (from /proc/self/mountinfo)."""
    prefix = str(directory).rstrip("/") + "/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [point for point in points if point == str(directory) or point.startswith(prefix)]


def namespace_cgroups(namespace: str) -> list[str]:
    """Cgroup directories below ``/sys/fs/cgroup/*/NAMESPACE`` (containers' cgroups; the parent excluded)."""
    return sorted(str(path) for parent in CGROUPS.glob(f"*/{namespace}") for path in parent.rglob("*") if path.is_dir())


@dataclass(frozen=True)
class Usage:
    """One look at a daemon: counts of what it holds (see :func:`usage`)."""

    fds: int
    rss: int
    threads: int
    mounts: int
    processes: int
    cgroups: int

    def excess(self, baseline: Usage, limits: Usage) -> dict[str, tuple[int, int]]:
        """{field: (baseline, now)} for every count above ``baseline`` by more than its ``limits`` value."""
        names = ("fds", "rss", "threads", "mounts", "processes", "cgroups")
        return {
            name: (getattr(baseline, name), getattr(self, name))
            for name in names
            if getattr(self, name) > getattr(baseline, name) + getattr(limits, name)
        }


def usage(pid: int, directory: Path, namespaces: list[str]) -> Usage:
    """What the daemon ``pid`` (root, state and socket under ``directory``) holds now: its open fds, RSS
    and threads, the mounts under ``directory``, the other processes naming ``directory`` (shims and what
    they run), and the cgroups under the ``namespaces``."""
    return Usage(
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        rss=rss(pid),
        threads=len(os.listdir(f"/proc/{pid}/task")),
        mounts=len(mounts_under(directory)),
        processes=len([p for p in processes_naming(str(directory)) if p != pid]),
        cgroups=sum(len(namespace_cgroups(namespace)) for namespace in namespaces),
    )
