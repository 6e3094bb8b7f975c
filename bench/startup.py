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
import ctypes
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from core.api.containerd.services.version.v1 import version_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CONTAINERKITD = shutil.which("containerkitd", path=str(Path(PYTHON).parent)) or str(
    Path(PYTHON).parent / "containerkitd"
)
CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"

# Target from the issue: containerkitd within this much of the Python floor.
TARGET_START_OVER_FLOOR_MS = 100.0
TARGET_RSS_OVER_FLOOR_MB = 20.0

POLL_INTERVAL_S = 0.002
CALL_DEADLINE_S = 0.5
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0

FLOOR_CODE = "import grpc, sys, time; sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(3600)"

MNT_DETACH = 2

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


def wait_for_version(address: Path, proc: subprocess.Popen, t0: float) -> tuple[float, int]:
    """Poll until a Version call on ``unix:address`` is answered; returns (seconds since t0, attempts).

    A fresh channel per attempt, so gRPC's reconnect backoff never enters the measurement.
    Identical for both daemons.
    """
    attempts = 0
    target = f"unix:{address}"
    while True:
        now = time.perf_counter()
        if now - t0 > START_TIMEOUT_S:
            raise TimeoutError(f"no Version answer on {address} within {START_TIMEOUT_S:.0f}s")
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} before answering")
        if address.exists() and _accepts(address):
            attempts += 1
            channel = grpc.insecure_channel(target)
            try:
                version_pb2_grpc.VersionStub(channel).Version(empty_pb2.Empty(), timeout=CALL_DEADLINE_S)
                return time.perf_counter() - t0, attempts
            except grpc.RpcError:
                pass
            finally:
                channel.close()
        time.sleep(POLL_INTERVAL_S)


def _accepts(address: Path) -> bool:
    """A cheap AF_UNIX connect, so a gRPC channel is only built once something listens."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(address))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def wait_for_line(proc: subprocess.Popen, t0: float) -> float:
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - t0
    if line.strip() != b"ready":
        raise RuntimeError(f"floor process said {line!r} (exit {proc.poll()})")
    return elapsed


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (by /proc/*/stat ppid)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, ()))
    return tree


def cpu_ms(pid: int) -> float:
    """CPU time (ms) run so far by all threads of pid, from /proc/PID/task/*/schedstat (ns)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e6


def memory_kb(pid: int) -> tuple[int, int, int, int]:
    """(VmRSS, VmHWM, Pss) summed over pid and its descendants, and the number of processes."""
    rss = hwm = pss = 0
    pids = process_tree(pid)
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm += int(line.split()[1])
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, hwm, pss, len(pids)


# ------------------------------------------------------------------------------------------- lifecycle


def stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM by pid, wait; SIGKILL (by pid) only if it does not go."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def _unescape_mount(path: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and path[i + 1 : i + 4].isdigit() and len(path[i + 1 : i + 4]) == 3:
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def unmount_under(base: Path) -> list[str]:
    """Lazily unmount every mount point at or under base, deepest first; returns what was unmounted."""
    prefix = str(base).rstrip("/") + "/"
    libc = ctypes.CDLL(None, use_errno=True)
    done: list[str] = []
    for _ in range(10):  # stacked mounts: repeat until nothing is left
        points = []
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                point = _unescape_mount(line.split()[1])
                if point == str(base) or point.startswith(prefix):
                    points.append(point)
        if not points:
            break
        for point in sorted(points, key=len, reverse=True):
            if libc.umount2(os.fsencode(point), MNT_DETACH) == 0:
                done.append(point)
            else:
                err = ctypes.get_errno()
                print(f"warning: umount {point}: {os.strerror(err)}", file=sys.stderr)
    return done


def cleanup(tmp: Path, notes: list[str]) -> None:
    unmounted = unmount_under(tmp)
    if unmounted:
        notes.append(f"unmounted {len(unmounted)} mount(s) under {tmp}")
    shutil.rmtree(tmp, ignore_errors=True)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def containerd_config(tmp: Path) -> str:
    """containerd's defaults (cri included) with every path it would otherwise take moved under tmp."""
    return "\n".join(
        [
            "version = 2",
            f'root = "{tmp}/root"',
            f'state = "{tmp}/state"',
            "[grpc]",
            f'  address = "{tmp}/c.sock"',
            "[ttrpc]",
            f'  address = "{tmp}/c.sock.ttrpc"',
            "[debug]",
            '  address = ""',
            # The opt plugin would otherwise create /opt/containerd; keep it in the temp dir too.
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{tmp}/opt"',
            "",
        ]
    )


def run_daemon(subject: str, idle_s: float) -> Sample:
    tmp = Path(tempfile.mkdtemp(prefix="ckb-", dir="/tmp"))
    notes: list[str] = []
    log_path = tmp / "daemon.log"
    if subject == "containerkit":
        address = tmp / "ck.sock"
        argv = [CONTAINERKITD, "--root", f"{tmp}/root", "--state", f"{tmp}/state", "--address", str(address)]
    else:
        address = tmp / "c.sock"
        (tmp / "config.toml").write_text(containerd_config(tmp))
        argv = [CONTAINERD, "--root", f"{tmp}/root", "--state", f"{tmp}/state", "--address", str(address),
                "--config", f"{tmp}/config.toml"]  # fmt: skip
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


def python_env(inherit: bool, pycache: Path) -> dict[str, str] | None:
    """The environment for the Python subjects.

    An installed package has its bytecode compiled; a checkout run with PYTHONDONTWRITEBYTECODE=1 (as
    CI and sandboxes often set) recompiles every repo module at each start, which is not what users
    see. So by default bytecode goes to a private PYTHONPYCACHEPREFIX (nothing is written into the
    repo) and the warm-up round fills it. Applies to the floor too.
    """
    if inherit:
        return None
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


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
