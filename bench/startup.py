"""Daemon startup benchmark: containerkitd side by side with containerd, plus the Python floor.

For each run, in alternating order, it starts

* ``containerkitd --root T/root --state T/state --address T/ck.sock``
* ``containerd --root T/root --state T/state --address T/c.sock --config T/config.toml``, the config
  being containerd's defaults with only the paths moved under T (so it cannot touch a system containerd)
* the "Python floor": the same interpreter doing ``import grpc`` and printing a line

and measures, with the same client code for both daemons:

* start: from ``Popen`` to the first answered ``containerd.services.version.v1.Version/Version`` call
  (the floor: from ``Popen`` to its line on stdout, i.e. interpreter + ``import grpc``)
* idle memory: VmRSS / VmHWM / Pss of the process (plus any children) ~2 s after the first answer

Each daemon gets fresh temp dirs under /tmp, is stopped by pid with SIGTERM, anything mounted under
its dirs is unmounted, and the dirs are removed. Must run as root (containerd needs it).

    /work/venv-ck/bin/python bench/startup.py [--runs N] [--idle SECONDS] [--json]

Numbers only: nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _daemons import (
    CONTAINERD,
    CONTAINERKITD,
    PYTHON,
    cleanup,
    cpu_ms,
    daemon_argv,
    memory_kb,
    python_env,
    stop,
    wait_for_version,
)
from _daemons import tail as _tail

# Target from the issue: containerkitd within this much of the Python floor.
TARGET_START_OVER_FLOOR_MS = 100.0
TARGET_RSS_OVER_FLOOR_MB = 20.0

FLOOR_CODE = "import grpc, sys, time; sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(3600)"

# Environment for the Python subjects (containerkitd and the floor); set up in main().
PY_ENV: dict[str, str] | None = None


@dataclass
class Sample:
    subject: str
    start_ms: float
    cpu_ms: float  # CPU time the subject used up to its first answer (all threads): leaves out run-queue waits
    rss_kb: int
    hwm_kb: int
    pss_kb: int
    processes: int
    attempts: int = 0
    self_reported_ms: float | None = None  # containerd's own "successfully booted in" figure
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- probes


def wait_for_line(proc: subprocess.Popen, t0: float) -> float:
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - t0
    if line.strip() != b"ready":
        raise RuntimeError(f"floor process said {line!r} (exit {proc.poll()})")
    return elapsed


# ------------------------------------------------------------------------------------------- lifecycle


def run_daemon(subject: str, idle_s: float) -> Sample:
    tmp = Path(tempfile.mkdtemp(prefix="ckb-", dir="/tmp"))
    notes: list[str] = []
    log_path = tmp / "daemon.log"
    argv, address = daemon_argv(subject, tmp)
    proc = None
    try:
        with open(log_path, "wb") as log:
            t0 = time.perf_counter()
            env = PY_ENV if subject == "containerkit" else None
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=tmp, env=env)
            try:
                elapsed, attempts = wait_for_version(address, proc, t0)
                cpu = cpu_ms(proc.pid)
            except (TimeoutError, RuntimeError) as err:
                raise RuntimeError(f"{subject}: {err}\n--- {log_path} ---\n{_tail(log_path)}") from None
            time.sleep(idle_s)
            rss, hwm, pss, nproc = memory_kb(proc.pid)
            code = stop(proc)
        if code not in (0, -signal.SIGTERM):
            notes.append(f"exit code {code} on SIGTERM")
        sample = Sample(subject, elapsed * 1000, cpu, rss, hwm, pss, nproc, attempts, code, notes)
        booted = re.search(r"successfully booted in ([0-9.]+)s", log_path.read_text(errors="replace"))
        if booted:
            sample.self_reported_ms = float(booted.group(1)) * 1000
        return sample
    finally:
        if proc is not None:
            stop(proc)
        cleanup(tmp, notes)


def run_floor(idle_s: float) -> Sample:
    t0 = time.perf_counter()
    proc = subprocess.Popen([PYTHON, "-c", FLOOR_CODE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            cwd="/tmp", env=PY_ENV)  # fmt: skip
    try:
        elapsed = wait_for_line(proc, t0)
        cpu = cpu_ms(proc.pid)
        time.sleep(idle_s)
        rss, hwm, pss, nproc = memory_kb(proc.pid)
    finally:
        code = stop(proc)
        proc.stdout.close()
    return Sample("python+grpc floor", elapsed * 1000, cpu, rss, hwm, pss, nproc, exit_code=code)


# ------------------------------------------------------------------------------------------- reporting


def summarise(samples: list[Sample]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    metrics = [("start_ms", 1.0), ("cpu_ms", 1.0), ("rss_kb", 1 / 1024), ("hwm_kb", 1 / 1024), ("pss_kb", 1 / 1024)]
    if samples and all(s.self_reported_ms is not None for s in samples):
        metrics.append(("self_reported_ms", 1.0))
    for metric, scale in metrics:
        values = [getattr(s, metric) * scale for s in samples]
        out[metric.replace("_kb", "_mb")] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return out


def installed_plugins() -> dict[str, list[str]]:
    """The containerkit entry points installed right now (the daemon imports all of them at start)."""
    from core.plugin_types import PLUGIN_TYPES

    return {
        t.group: sorted(f"{e.name}={e.value}" for e in importlib.metadata.entry_points(group=t.group))
        for t in PLUGIN_TYPES.values()
    }


def print_table(summary: dict[str, dict], args: argparse.Namespace, plugins: dict[str, list[str]]) -> None:
    ck, cd, fl = summary["containerkit"], summary["containerd"], summary["floor"]
    rows = [
        ("start -> first Version answer (ms)", "start_ms", "{:.1f}"),
        ("CPU time used by then (ms)", "cpu_ms", "{:.1f}"),
        (f"idle VmRSS after {args.idle:g}s (MB)", "rss_mb", "{:.1f}"),
        ("peak VmHWM (MB)", "hwm_mb", "{:.1f}"),
        ("idle Pss (MB)", "pss_mb", "{:.1f}"),
    ]
    header = ("metric", "containerkit median (min)", "containerd median (min)", "ratio ck/cd (median)")
    table = []
    for label, key, fmt in rows:
        a, b = ck[key], cd[key]
        table.append(
            (
                label,
                f"{fmt.format(a['median'])} ({fmt.format(a['min'])})",
                f"{fmt.format(b['median'])} ({fmt.format(b['min'])})",
                f"{a['median'] / b['median']:.2f}x" if b["median"] else "-",
            )
        )
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(4)]

    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    print(f"\n{args.runs} runs each (+{args.warmup} warm-up), rotating order")
    env = "environment as inherited" if args.inherit_env else "bytecode cached"
    print(f"  containerkitd: {CONTAINERKITD}  ({env})")
    print(f"  containerd:    {CONTAINERD}  (default plugins incl. cri; only paths moved to the temp dir)")
    counts = ", ".join(f"{group.split('.', 1)[1]} {len(names)}" for group, names in plugins.items())
    print(f"  installed containerkit plugins: {counts}")
    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table:
        print(line(r))
    if "self_reported_ms" in cd:
        print(
            f"\ncontainerd's own log says 'booted in' {cd['self_reported_ms']['median']:.1f} ms median"
            " (its timer starts after exec and Go runtime init, and stops before the first answer)"
        )

    d_start = ck["start_ms"]["median"] - fl["start_ms"]["median"]
    d_rss = ck["rss_mb"]["median"] - fl["rss_mb"]["median"]
    d_cpu = ck["cpu_ms"]["median"] - fl["cpu_ms"]["median"]
    print("\nPython floor (same interpreter and environment: `import grpc`, print a line, sleep):")
    print(f"  start to import done: {fl['start_ms']['median']:.1f} ms median ({fl['start_ms']['min']:.1f} min)")
    print(f"  CPU time by then:     {fl['cpu_ms']['median']:.1f} ms median ({fl['cpu_ms']['min']:.1f} min)")
    print(f"  idle VmRSS:           {fl['rss_mb']['median']:.1f} MB median ({fl['rss_mb']['min']:.1f} min)")
    ok_t = "ok" if d_start <= TARGET_START_OVER_FLOOR_MS else "OVER TARGET"
    ok_m = "ok" if d_rss <= TARGET_RSS_OVER_FLOOR_MB else "OVER TARGET"
    print("containerkit over the floor (medians):")
    print(f"  start: {d_start:+.1f} ms   (target <= +{TARGET_START_OVER_FLOOR_MS:.0f} ms)  {ok_t}")
    print(f"  CPU:   {d_cpu:+.1f} ms   (same budget; CPU time leaves out run-queue waits)")
    print(f"  RSS:   {d_rss:+.1f} MB   (target <= +{TARGET_RSS_OVER_FLOOR_MB:.0f} MB)  {ok_m}")


def main(argv: list[str] | None = None) -> int:
    global PY_ENV
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs of each subject (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds after the first answer before reading RSS")
    parser.add_argument(
        "--inherit-env",
        action="store_true",
        help="run the Python subjects with this environment as is (by default bytecode is cached, see python_env)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (samples and summary) instead of a table")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("startup.py: run as root (containerd needs it)", file=sys.stderr)
        return 2
    if not Path(CONTAINERD).exists():
        print(f"startup.py: {CONTAINERD} not found (Debian package containerd)", file=sys.stderr)
        return 2
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.warmup < 1 and not args.inherit_env:
        print("startup.py: note: without a warm-up round the first runs compile bytecode", file=sys.stderr)

    load_before = os.getloadavg()[0]
    plugins = installed_plugins()
    pycache = Path(tempfile.mkdtemp(prefix="ckb-pyc-", dir="/tmp"))
    PY_ENV = python_env(args.inherit_env, pycache)
    subjects = {
        "containerkit": lambda: run_daemon("containerkit", args.idle),
        "containerd": lambda: run_daemon("containerd", args.idle),
        "floor": lambda: run_floor(args.idle),
    }
    samples: dict[str, list[Sample]] = {name: [] for name in subjects}
    names = list(subjects)
    try:
        for i in range(args.warmup + args.runs):
            order = names[i % 3 :] + names[: i % 3]  # rotate who goes first
            measured = i >= args.warmup
            for name in order:
                sample = subjects[name]()
                if measured:
                    samples[name].append(sample)
                tag = f"run {i - args.warmup + 1}" if measured else "warm-up"
                print(
                    f"{tag:>7} {name:<13} start {sample.start_ms:7.1f} ms  cpu {sample.cpu_ms:6.1f} ms"
                    f"  rss {sample.rss_kb / 1024:5.1f} MB  hwm {sample.hwm_kb / 1024:5.1f} MB  n {sample.processes}"
                    + (f"  [{'; '.join(sample.notes)}]" if sample.notes else ""),
                    file=sys.stderr,
                    flush=True,
                )
    except RuntimeError as err:
        print(f"startup.py: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(pycache, ignore_errors=True)

    summary = {name: summarise(s) for name, s in samples.items()}
    load = {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()}
    if args.json:
        ck, fl = summary["containerkit"], summary["floor"]
        result = {
            "runs": args.runs,
            "warmup": args.warmup,
            "idle_seconds": args.idle,
            "bytecode_cached": not args.inherit_env,
            "containerkitd": CONTAINERKITD,
            "containerd": CONTAINERD,
            "installed_plugins": plugins,
            "loadavg_1min": load,
            "summary": summary,
            "ratio": {
                key: ck[key]["median"] / summary["containerd"][key]["median"]
                for key in ("start_ms", "cpu_ms", "rss_mb", "hwm_mb", "pss_mb")
            },
            "over_floor": {
                "start_ms": ck["start_ms"]["median"] - fl["start_ms"]["median"],
                "cpu_ms": ck["cpu_ms"]["median"] - fl["cpu_ms"]["median"],
                "rss_mb": ck["rss_mb"]["median"] - fl["rss_mb"]["median"],
                "target_start_ms": TARGET_START_OVER_FLOOR_MS,
                "target_rss_mb": TARGET_RSS_OVER_FLOOR_MB,
            },
            "samples": {name: [asdict(x) for x in s] for name, s in samples.items()},
        }
        print(json.dumps(result, indent=2))
    else:
        print_table(summary, args, plugins)
        busy = max(load["before"], load["after"]) > 0.5 * (load["cpus"] or 1)
        print(
            f"\nhost load (1-min average) {load['before']:.2f} before, {load['after']:.2f} after, {load['cpus']} CPUs"
            + ("; the host was busy: compare the minima and the CPU-time rows, not only the medians" if busy else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
