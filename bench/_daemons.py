"""Helpers shared by the benchmarks: start containerkitd / containerd on private temp dirs, probe and
measure them, stop them by pid and clean up after them.

Both daemons get the same treatment: fresh ``root``/``state``/socket under a temp dir, a Version
probe with the same client code, SIGTERM by pid, lazy unmount of anything left under the temp dir.
containerd runs with its default config except for the paths (see :func:`containerd_config`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import empty_pb2

from core.api.containerd.services.version.v1 import version_pb2_grpc
from core.mount import mount_points, unmount

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CONTAINERKITD = shutil.which("containerkitd", path=str(Path(PYTHON).parent)) or str(
    Path(PYTHON).parent / "containerkitd"
)
CONTAINERD = shutil.which("containerd") or "/usr/bin/containerd"
CTR = shutil.which("ctr") or "/usr/bin/ctr"

SUBJECTS = ("containerkit", "containerd")

POLL_INTERVAL_S = 0.002
CALL_DEADLINE_S = 0.5
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


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


def status_kb(pid: int, *fields: str) -> dict[str, int]:
    """Fields of /proc/PID/status given in kB (``VmRSS``, ``VmHWM``, ...) for one process."""
    wanted = set(fields)
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in wanted:
                out[key] = int(rest.split()[0])
    return out


def memory_kb(pid: int) -> tuple[int, int, int, int]:
    """(VmRSS, VmHWM, Pss) summed over pid and its descendants, and the number of processes."""
    rss = hwm = pss = 0
    pids = process_tree(pid)
    for p in pids:
        try:
            values = status_kb(p, "VmRSS", "VmHWM")
            rss += values.get("VmRSS", 0)
            hwm += values.get("VmHWM", 0)
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss, hwm, pss, len(pids)


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (``5`` into /proc/PID/clear_refs); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


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


def unmount_under(base: Path) -> list[str]:
    """Lazily unmount every mount point at or under base, deepest first; returns what was unmounted."""
    prefix = str(base).rstrip("/") + "/"
    done: list[str] = []
    for _ in range(10):  # stacked mounts: repeat until nothing is left
        points = {point for point in mount_points() if point == str(base) or point.startswith(prefix)}
        if not points:
            break
        for point in sorted(points, key=len, reverse=True):
            try:
                unmount(point, detach=True)
            except OSError as err:
                print(f"warning: umount {point}: {err.strerror}", file=sys.stderr)
            else:
                done.append(point)
    return done


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every side-by-side benchmark takes: ``--inherit-env`` and ``--json``."""
    parser.add_argument("--inherit-env", action="store_true", help="run containerkitd with this environment as is")
    parser.add_argument("--json", action="store_true", help="print JSON (every sample) instead of a table")


def running_as_root(script: str) -> bool:
    """Whether this runs as root, as containerd needs; says so on stderr (naming ``script``) when not."""
    if os.geteuid() == 0:
        return True
    print(f"{script}: run as root (containerd needs it)", file=sys.stderr)
    return False


def print_load() -> None:
    """The host's 1-minute load average and CPU count, printed under a table: a busy host skews every figure."""
    print(f"load average (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


def print_columns(rows: Sequence[Sequence[str]]) -> None:
    """Print ``rows`` (the first is the header) as left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def cleanup(tmp: Path, notes: list[str]) -> None:
    """Unmount anything under ``tmp``, then remove it."""
    unmounted = unmount_under(tmp)
    if unmounted:
        notes.append(f"unmounted {len(unmounted)} mount(s) under {tmp}")
    shutil.rmtree(tmp, ignore_errors=True)


def tail(path: Path, lines: int = 15) -> str:
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


def daemon_argv(subject: str, tmp: Path, extra: Sequence[str] = ()) -> tuple[list[str], Path]:
    """The command line starting ``subject`` ("containerkit" or "containerd") on ``tmp``, and its socket.

    For containerd this writes ``tmp/config.toml`` first.
    """
    if subject == "containerkit":
        address = tmp / "ck.sock"
        argv = [CONTAINERKITD, "--root", f"{tmp}/root", "--state", f"{tmp}/state", "--address", str(address)]
    elif subject == "containerd":
        address = tmp / "c.sock"
        (tmp / "config.toml").write_text(containerd_config(tmp))
        argv = [CONTAINERD, "--root", f"{tmp}/root", "--state", f"{tmp}/state", "--address", str(address),
                "--config", f"{tmp}/config.toml"]  # fmt: skip
    else:
        raise ValueError(f"unknown subject {subject!r}")
    return [*argv, *extra], address


def python_env(inherit: bool, pycache: Path) -> dict[str, str] | None:
    """The environment for the Python subjects.

    An installed package has its bytecode compiled; a checkout run with PYTHONDONTWRITEBYTECODE=1 (as
    CI and sandboxes often set) recompiles every repo module at each start, which is not what users
    see. So by default bytecode goes to a private PYTHONPYCACHEPREFIX (nothing is written into the
    repo). Returns None (inherit) when ``inherit``.
    """
    if inherit:
        return None
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


@dataclass
class RunningDaemon:
    """A daemon started by :func:`start_daemon`: its process, socket and private temp dir."""

    subject: str
    tmp: Path
    address: Path
    proc: subprocess.Popen
    log_path: Path
    start_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def root(self) -> Path:
        return self.tmp / "root"

    def close(self) -> int | None:
        """Stop it by pid (SIGTERM), unmount and remove its temp dir; returns its exit code."""
        try:
            code = stop(self.proc)
        finally:
            cleanup(self.tmp, self.notes)
        if code not in (0, -signal.SIGTERM):
            self.notes.append(f"exit code {code} on SIGTERM")
        return code


def start_daemon(subject: str, env: dict[str, str] | None = None, parent: str = "/tmp") -> RunningDaemon:
    """Start ``subject`` on a fresh temp dir under ``parent`` and wait for its first Version answer.

    ``env`` applies to containerkitd only (containerd always inherits). On failure everything is
    cleaned up and RuntimeError says why, with the end of the daemon's log.
    """
    tmp = Path(tempfile.mkdtemp(prefix="ckb-", dir=parent))
    log_path = tmp / "daemon.log"
    proc = None
    try:
        argv, address = daemon_argv(subject, tmp)
        with open(log_path, "wb") as log:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=tmp,
                env=env if subject == "containerkit" else None,
            )
        try:
            elapsed, _ = wait_for_version(address, proc, t0)
        except (TimeoutError, RuntimeError) as err:
            raise RuntimeError(f"{subject}: {err}\n--- {log_path} ---\n{tail(log_path)}") from None
        return RunningDaemon(subject, tmp, address, proc, log_path, elapsed)
    except BaseException:
        if proc is not None:
            stop(proc)
        cleanup(tmp, [])
        raise
