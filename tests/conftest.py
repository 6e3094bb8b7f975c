"""Shared fixtures: a real containerkitd on a private root and socket, and the clients to drive it.

Every daemon a test starts is stopped by its pid and its temporary directories removed, whatever
the test's outcome.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 20.0


def console_script(name: str, module: str) -> list[str]:
    """The installed console script, or ``python -m module`` when the package is not installed."""
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


CONTAINERKITD = console_script("containerkitd", "core.daemon")
CKCTL = console_script("ckctl", "core.cli.main")


class RunningDaemon:
    """A containerkitd subprocess with its own root, state and socket (under a short /tmp path)."""

    def __init__(self, config: str = "", args: Sequence[str] = ()) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ck-", dir="/tmp"))
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.address = str(self.dir / "ck.sock")
        self.config_path = self.dir / "config.toml"
        self.config_path.write_text(config)
        self.log_path = self.dir / "daemon.log"
        self.extra_args = list(args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        return [
            *CONTAINERKITD,
            "--config", str(self.config_path),
            "--root", str(self.root),
            "--state", str(self.state),
            "--address", self.address,
            "--log-level", "debug",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, wait: bool = True) -> RunningDaemon:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"containerkitd exited with {self.process.returncode}:\n{self.log}")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.address)
                return
            except OSError:
                time.sleep(0.02)
            finally:
                probe.close()
        raise AssertionError(f"containerkitd did not serve {self.address} within {STARTUP_TIMEOUT}s:\n{self.log}")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the daemon by pid and wait for it; returns its exit code. A daemon still running after
        ``timeout`` has its thread stacks dumped into its log (SIGUSR1) before it is killed (-9)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGUSR1)
                time.sleep(1)
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def restart(self) -> None:
        assert self.stop() == 0, self.log
        self.start()

    def ckctl(self, *args: str, check: bool = True, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``ckctl -a SOCK [-n NS] ARGS`` and return the completed process (text)."""
        ns = ["-n", namespace] if namespace else []
        result = subprocess.run([*CKCTL, "-a", self.address, *ns, *args], capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"ckctl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def ckctl_json(self, *args: str, namespace: str | None = None) -> Any:
        return json.loads(self.ckctl(*args, "--json", namespace=namespace).stdout)

    def ctr(self, *args: str, check: bool = True, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run Debian's ``ctr -a SOCK [-n NS] ARGS`` against this daemon."""
        ns = ["-n", namespace] if namespace else []
        result = subprocess.run(["ctr", "-a", self.address, *ns, *args], capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def cleanup(self) -> None:
        self.stop(signal.SIGKILL if self.process and self.process.poll() is None else signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def make_daemon() -> Iterator[Any]:
    """Factory: ``make_daemon(config_toml="", args=(), start=True)`` → a RunningDaemon, cleaned up after."""
    daemons: list[RunningDaemon] = []

    def make(config: str = "", args: Sequence[str] = (), start: bool = True) -> RunningDaemon:
        daemon = RunningDaemon(config, args)
        daemons.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in daemons:
        daemon.cleanup()


@pytest.fixture
def daemon(make_daemon: Any) -> RunningDaemon:
    """A running containerkitd with the default config."""
    return make_daemon()


# -- interop (tests/interop.py): a real docker registry and a real containerd, one each per session ----------


@pytest.fixture(scope="session")
def registry() -> Iterator[Any]:
    """Debian's docker-registry on 127.0.0.1 and a free port (an ``interop.Registry``), stopped by pid."""
    from interop import running_registry

    with running_registry() as running:
        yield running


@pytest.fixture(scope="session")
def containerd() -> Iterator[Any]:
    """containerd 1.6 on a private root, state and socket; stopped by pid, leftover mounts unmounted."""
    from interop import running_containerd

    with running_containerd() as running:
        yield running


@pytest.fixture(scope="module")
def containerkitd() -> Iterator[RunningDaemon]:
    """A containerkitd shared by one module's tests (each test keeps to a namespace of its own)."""
    from interop import _daemons

    daemon = RunningDaemon().start()
    try:
        yield daemon
    finally:
        daemon.stop()
        _daemons.unmount_under(daemon.dir)
        daemon.cleanup()


@pytest.fixture
def robustness() -> Any:
    """The run's robustness tally (tests/robustness.py): ``robustness.record(category, tried, contained)``."""
    from robustness import TALLY

    return TALLY


def pytest_sessionfinish(session: Any) -> None:
    """Under pytest-xdist, a worker hands its robustness tally to the controller."""
    from robustness import TALLY

    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["robustness"] = TALLY.counts()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller: add a finished worker's robustness tally to the run's."""
    from robustness import TALLY

    counts = getattr(node, "workeroutput", {}).get("robustness")
    if counts:
        TALLY.merge(counts)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the robustness tally (faults, hostile inputs, soak operations, leaks) at the end of the run."""
    from robustness import TALLY

    if any(TALLY.tried.values()):
        terminalreporter.section("robustness")
        for line in TALLY.lines():
            terminalreporter.write_line(line)
