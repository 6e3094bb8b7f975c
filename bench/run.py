"""Container benchmark: ``ctr run`` through containerkitd beside containerd 1.6, the same ``ctr``, the same image.

The busybox image (tests/oci_images.py) is pushed with skopeo to Debian's docker-registry on 127.0.0.1
(tests/interop.py) and pulled into both daemons, each started once on a fresh temp dir
(bench/_daemons.py; containerd with its default config, only the paths moved). Then:

- **run --rm**: ``ctr -n bench run --rm IMAGE ID sh -c 'exit 0'`` timed until it returns, the daemons taking
  turns, ``--runs`` times each after ``--warmup`` unmeasured runs: container create, task create (shim
  start, runc create), start, wait, task delete, container delete.
- **shim RSS**: one task (``sleep``) running; VmRSS and Pss of its shim (the parent of the task's pid: ours,
  or containerd-shim-runc-v2).
- **concurrent starts**: ``--concurrent`` ``ctr run -d IMAGE ID sleep 1000`` launched at once; the wall time
  until the last returns, the daemon's CPU per container (its own threads; shims are other processes) and the
  whole host's busy CPU per container (/proc/stat: ctr, runc, shims and kernel included; the burst keeps both
  CPUs busy, so this is what decides the wall time). ``--batches`` bursts per daemon, the daemons taking turns;
  medians are reported (one burst's wall time swings by 15% on a shared 2-CPU VM).
- **100 tasks**: ``--tasks`` tasks running; the daemon's own VmRSS (its shims are other processes), the
  sum of the shims' VmRSS and Pss, and that Pss plus the Pss of containerkitd's shim fork server (the zygote
  its shims are forked from and share pages with, and its one spare shim; containerd has none).

Each phase removes its containers (tasks killed, deleted, containers and snapshots removed). Afterwards both
daemons get SIGTERM by pid; any shim or container still naming their temp dirs is SIGKILLed by pid, their
mounts undone, their temp dirs removed.

    /work/venv-ck/bin/python bench/run.py [--runs 20] [--warmup 2] [--concurrent 50] [--batches 3] [--tasks 100]
        [--json] [--inherit-env]

Numbers only: nothing here asserts. Targets from the issue: run --rm and concurrent starts no slower than
containerd (ratio <= 1.0), a shim no larger than containerd-shim-runc-v2. Must run as root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from _daemons import (
    REPO,
    SUBJECTS,
    RunningDaemon,
    add_output_arguments,
    cpu_ms,
    print_columns,
    print_load,
    python_env,
    running_as_root,
    start_daemon,
    status_kb,
)

sys.path.insert(0, str(REPO / "tests"))

from interop import (  # tests/interop.py
    CTR,
    busybox_image,
    ctr,
    kill_leftovers,
    remove_containers,
    remove_namespace_dirs,
    running_registry,
)

NAMESPACE = "bench"
PREFIX = {"containerkit": "ck", "containerd": "cd"}  # ids differ per daemon: one cgroup path per container
TARGET_RATIO = 1.0
ZYGOTE_MARK = b"containerkit-shim-zygote"
SPARE_MARK = b"containerkit-shim-spare"


def pss_kb(pid: int) -> int:
    """Pss of one process (its share of the pages it maps with others), from /proc/PID/smaps_rollup."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def shim_of(daemon: RunningDaemon, task: str) -> int:
    """The pid of the task's shim: the parent of the task's init process."""
    rows = ctr(daemon, "tasks", "ls", namespace=NAMESPACE).stdout.splitlines()[1:]
    [pid] = [int(row.split()[1]) for row in rows if row.split()[0] == task]
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def helpers_of(daemon: RunningDaemon) -> list[int]:
    """The daemon's long-lived helper processes that are not shims: containerkitd's shim fork server (zygote),
    a child of the daemon, and the spare shim it keeps forked (``containerkit-shim-spare ZYGOTE_PID``), whose
    pages the shims share; none for containerd."""
    children = [
        pid for task in Path(f"/proc/{daemon.pid}/task").iterdir() for pid in (task / "children").read_text().split()
    ]
    zygotes = [pid for pid in children if ZYGOTE_MARK in Path(f"/proc/{pid}/cmdline").read_bytes()]
    spares = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            words = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
            if words[:1] == [SPARE_MARK] and words[1].decode() in zygotes:
                spares.append(entry.name)
    return [int(pid) for pid in zygotes + spares]


def run_rm(daemon: RunningDaemon, image: str, task: str) -> tuple[float, float]:
    """(seconds, daemon CPU ms) of one ``ctr run --rm IMAGE TASK sh -c 'exit 0'``."""
    cpu0, t0 = cpu_ms(daemon.pid), time.perf_counter()
    ctr(daemon, "run", "--rm", image, task, "sh", "-c", "exit 0", namespace=NAMESPACE)
    return time.perf_counter() - t0, cpu_ms(daemon.pid) - cpu0


def host_busy_ms() -> float:
    """CPU time (ms) the whole host has spent busy since boot (all CPUs; idle and iowait excluded)."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) * 1000 / os.sysconf("SC_CLK_TCK")


def burst(daemon: RunningDaemon, image: str, tasks: list[str]) -> tuple[float, float, float]:
    """The tasks started at once, then removed: (wall seconds, daemon CPU ms and host busy CPU ms per task)."""
    cpu0, busy0 = cpu_ms(daemon.pid), host_busy_ms()
    with running_tasks(daemon, image, tasks) as seconds:
        cpu1, busy1 = cpu_ms(daemon.pid), host_busy_ms()
    return seconds, (cpu1 - cpu0) / len(tasks), (busy1 - busy0) / len(tasks)


def start_detached(daemon: RunningDaemon, image: str, tasks: list[str]) -> float:
    """``ctr run -d IMAGE ID sleep 1000`` for every id, all at once; seconds until the last returned."""
    t0 = time.perf_counter()
    argv = [CTR, "-a", str(daemon.address), "-n", NAMESPACE, "run", "-d", image]
    procs = [
        subprocess.Popen([*argv, task, "sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
        for task in tasks
    ]  # fmt: skip
    failures = [proc.communicate()[1].decode().strip() for proc in procs if proc.wait() != 0]
    seconds = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{daemon.subject}: {len(failures)} of {len(tasks)} runs failed: {failures[0]}")
    return seconds


@contextmanager
def running_tasks(daemon: RunningDaemon, image: str, tasks: list[str]) -> Iterator[float]:
    """The tasks started at once (yields the wall time), then removed."""
    try:
        yield start_detached(daemon, image, tasks)
    finally:
        remove_containers(daemon, NAMESPACE)


def measure(image: str, daemons: dict[str, RunningDaemon], args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        subject: {
            "run_rm_s": [],
            "run_rm_cpu_ms": [],
            "concurrent_s": [],
            "concurrent_cpu_ms": [],
            "concurrent_host_ms": [],
        }
        for subject in SUBJECTS
    }
    for run in range(args.warmup + args.runs):
        for subject in SUBJECTS if run % 2 == 0 else tuple(reversed(SUBJECTS)):
            seconds, cpu = run_rm(daemons[subject], image, f"{PREFIX[subject]}-rm-{run}")
            if run >= args.warmup:
                results[subject]["run_rm_s"].append(seconds)
                results[subject]["run_rm_cpu_ms"].append(cpu)
    for batch in range(args.batches):
        for subject in SUBJECTS if batch % 2 == 0 else tuple(reversed(SUBJECTS)):
            ids = [f"{PREFIX[subject]}-c{batch}-{n}" for n in range(args.concurrent)]
            seconds, cpu, busy = burst(daemons[subject], image, ids)
            results[subject]["concurrent_s"].append(seconds)
            results[subject]["concurrent_cpu_ms"].append(cpu)
            results[subject]["concurrent_host_ms"].append(busy)
    for subject, daemon in daemons.items():
        result = results[subject]
        result["daemon_rss_kb_idle"] = status_kb(daemon.pid, "VmRSS")["VmRSS"]
        with running_tasks(daemon, image, [f"{PREFIX[subject]}-one"]):
            shim = shim_of(daemon, f"{PREFIX[subject]}-one")
            result["shim_rss_kb"] = status_kb(shim, "VmRSS")["VmRSS"]
            result["shim_pss_kb"] = pss_kb(shim)
        ids = [f"{PREFIX[subject]}-t{n}" for n in range(args.tasks)]
        with running_tasks(daemon, image, ids) as seconds:
            result["tasks_start_s"] = seconds
            result["daemon_rss_kb_tasks"] = status_kb(daemon.pid, "VmRSS")["VmRSS"]
            shims = [shim_of(daemon, task) for task in ids]
            result["shims_rss_kb_tasks"] = sum(status_kb(shim, "VmRSS")["VmRSS"] for shim in shims)
            result["shims_pss_kb_tasks"] = sum(pss_kb(shim) for shim in shims)
            result["helpers_pss_kb_tasks"] = sum(pss_kb(pid) for pid in helpers_of(daemon))
            result["shims_helpers_pss_kb_tasks"] = result["shims_pss_kb_tasks"] + result["helpers_pss_kb_tasks"]
        result["median_run_rm_s"] = statistics.median(result["run_rm_s"])
        result["min_run_rm_s"] = min(result["run_rm_s"])
        result["median_run_rm_cpu_ms"] = statistics.median(result["run_rm_cpu_ms"])
        for key in ("concurrent_s", "concurrent_cpu_ms", "concurrent_host_ms"):
            result[f"median_{key}"] = statistics.median(result[key])
        print(f"{subject}: done", file=sys.stderr)
    return results


def print_table(results: dict[str, Any], args: argparse.Namespace) -> None:
    ck, cd = results["containerkit"], results["containerd"]

    def row(label: str, key: str, unit: str, scale: float = 1.0, digits: int = 0) -> tuple[str, ...]:
        ours, theirs = ck[key] * scale, cd[key] * scale
        return (label, f"{ours:.{digits}f} {unit}", f"{theirs:.{digits}f} {unit}", f"{ours / theirs:.2f}x")

    rows = [
        ("metric", "containerkit", "containerd", "ratio ck/cd"),
        row(f"run --rm, median of {args.runs}", "median_run_rm_s", "ms", 1000),
        row(f"run --rm, min of {args.runs}", "min_run_rm_s", "ms", 1000),
        row("run --rm, daemon CPU (median)", "median_run_rm_cpu_ms", "ms"),
        row("shim VmRSS (one task)", "shim_rss_kb", "MiB", 1 / 1024, 1),
        row("shim Pss (one task)", "shim_pss_kb", "MiB", 1 / 1024, 1),
        row(f"{args.concurrent} run -d at once, wall (median of {args.batches})", "median_concurrent_s", "s", 1, 2),
        row("  daemon CPU per container", "median_concurrent_cpu_ms", "ms", 1, 1),
        row("  host busy CPU per container", "median_concurrent_host_ms", "ms", 1, 1),
        row(f"{args.tasks} run -d at once, wall", "tasks_start_s", "s", 1, 2),
        row("daemon VmRSS idle", "daemon_rss_kb_idle", "MiB", 1 / 1024, 1),
        row(f"daemon VmRSS, {args.tasks} tasks", "daemon_rss_kb_tasks", "MiB", 1 / 1024, 1),
        row(f"shims VmRSS sum, {args.tasks} tasks", "shims_rss_kb_tasks", "MiB", 1 / 1024, 1),
        row(f"shims Pss sum, {args.tasks} tasks", "shims_pss_kb_tasks", "MiB", 1 / 1024, 1),
        row(f"  + fork server Pss, {args.tasks} tasks", "shims_helpers_pss_kb_tasks", "MiB", 1 / 1024, 1),
    ]
    print_columns(rows)
    print(f"\ntargets: run --rm and concurrent starts ratio <= {TARGET_RATIO}, shim RSS ratio <= {TARGET_RATIO}")
    print_load()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="measured ctr run --rm per daemon")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured ctr run --rm per daemon first")
    parser.add_argument("--concurrent", type=int, default=50, help="containers started at once")
    parser.add_argument("--batches", type=int, default=3, help="bursts of --concurrent starts per daemon")
    parser.add_argument("--tasks", type=int, default=100, help="tasks running for the memory figures")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if not running_as_root("run.py"):
        return 2
    if min(args.runs, args.concurrent, args.batches, args.tasks) < 1 or args.warmup < 0:
        parser.error("--runs, --concurrent, --batches and --tasks must be at least 1, --warmup at least 0")
    with tempfile.TemporaryDirectory(prefix="ckb-run-") as base, running_registry() as registry, ExitStack() as stack:
        image = busybox_image(registry, Path(base))
        env = python_env(args.inherit_env, Path(base) / "pycache")
        daemons = {}
        stack.callback(remove_namespace_dirs, NAMESPACE)
        for subject in SUBJECTS:
            daemon = start_daemon(subject, env)
            stack.callback(kill_leftovers, daemon.tmp)
            stack.callback(daemon.close)
            stack.callback(remove_containers, daemon, NAMESPACE)
            ctr(daemon, "images", "pull", "--plain-http", image, namespace=NAMESPACE)
            daemons[subject] = daemon
        try:
            results = measure(image, daemons, args)
        except (RuntimeError, AssertionError) as err:
            print(f"run.py: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"runs": args.runs, "warmup": args.warmup, "results": results}, indent=2))
    else:
        print_table(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
