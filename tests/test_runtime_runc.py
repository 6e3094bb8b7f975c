"""The runc runtime plugin: its shim client against an in-test shim speaking the protocol, and the
runtime in-process with real runc/crun, the real shim and a busybox rootfs bind-mounted per task.

Every test deletes its tasks; the fixtures stop any shim left by its pid, unmount and remove the state.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from core.events import Exchange, Subscription
from core.hookspecs import new_plugin_manager
from core.mount import mount_points, unmount_all
from core.runtime import UNKNOWN_EXIT_STATUS, CreateTaskRequest, Stdio, TaskStatus
from core.types import Mount
from plugins.runtime_runc import RuncConfig, RuncRuntime, init
from plugins.runtime_runc.client import ShimClient, ShimError, ShimGone, Watcher, spawn_shim
from plugins.runtime_runc.forkserver import SPARE_MARK, Unusable
from plugins.runtime_runc.runtime import SHIM, metrics_from_runc

# -- the client against a fake shim ---------------------------------------------------------------------

Handler = Callable[[dict[str, Any]], Any]


class Lines(list):  # type: ignore[type-arg]
    """A handler's answer sent as raw lines (an ``events`` stream), the connection then held open."""


class FakeShim:
    """A unix socket server speaking the shim protocol; ``handlers[method](params)`` returns the result,
    raises ``KeyError(code)`` for an error line, returns ``HANG``/``DROP`` to stall or close, or
    :class:`Lines` to stream."""

    HANG = object()
    DROP = object()

    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self.connections = 0
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(64)
        self.release = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                request = json.loads(line)
                try:
                    result = self.handlers[request["method"]](request["params"])
                except KeyError as err:
                    conn.sendall(json.dumps({"error": {"code": err.args[0], "message": "boom"}}).encode() + b"\n")
                    continue
                if isinstance(result, Lines):
                    conn.sendall(b"".join(json.dumps(line).encode() + b"\n" for line in result))
                if result is self.HANG or isinstance(result, Lines):
                    self.release.wait()
                    return
                if result is self.DROP:
                    return
                conn.sendall(json.dumps({"result": result}).encode() + b"\n")

    def close(self) -> None:
        self.release.set()
        self.server.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ck-rt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(sockdir: Path) -> Iterator[Callable[[dict[str, Handler]], FakeShim]]:
    shims: list[FakeShim] = []

    def make(handlers: dict[str, Handler]) -> FakeShim:
        shims.append(FakeShim(str(sockdir / f"{len(shims)}.sock"), handlers))
        return shims[-1]

    yield make
    for shim in shims:
        shim.close()


def error(code: str) -> Handler:
    def handler(params: dict[str, Any]) -> Any:
        raise KeyError(code)

    return handler


def test_client_results_errors_and_pooling(fake: Any) -> None:
    shim = fake(
        {
            "ping": lambda p: {"pid": 42},
            "echo": lambda p: p,
            **{code: error(code) for code in ("NotFound", "AlreadyExists", "InvalidArgument")},
            **{code: error(code) for code in ("FailedPrecondition", "Unavailable", "Internal", "Weird")},
        }
    )
    client = ShimClient(shim.path)
    assert client.ping(1.0) == 42
    assert client.call("echo", {"a": [1, "x"]}) == {"a": [1, "x"]}
    raised = {"NotFound": NotFound, "AlreadyExists": AlreadyExists, "InvalidArgument": InvalidArgument}
    raised |= {"FailedPrecondition": FailedPrecondition, "Unavailable": Unavailable}
    raised |= {"Internal": ShimError, "Weird": ShimError}
    for code, cls in raised.items():
        with pytest.raises(cls, match="boom"):
            client.call(code)
    before = shim.connections
    for _ in range(5):
        client.call("echo")
    assert shim.connections == before  # one pooled connection serves calls in sequence
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(client.call("echo", {"n": 1}))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [{"n": 1}] * 8
    client.close()


def test_client_gone_and_timeouts(fake: Any, sockdir: Path) -> None:
    with pytest.raises(ShimGone, match="not running"):
        ShimClient(str(sockdir / "missing.sock")).call("ping")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sockdir / "dead.sock"))
    dead.close()  # the file stays, nobody listens: connection refused
    with pytest.raises(ShimGone):
        ShimClient(str(sockdir / "dead.sock")).ping(1.0)
    shim = fake({"hang": lambda p: FakeShim.HANG, "drop": lambda p: FakeShim.DROP, "ok": lambda p: {}})
    client = ShimClient(shim.path, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"did not answer hang within 0\.3s") as timed_out:
        client.call("hang")
    assert not isinstance(timed_out.value, ShimGone) and time.monotonic() - started < 2
    with pytest.raises(ShimGone, match="closed the connection during drop"):
        client.call("drop")
    assert client.call("ok") == {}  # a failed connection is never reused


def test_watcher_lines_close_and_shutdown(fake: Any) -> None:
    shim = fake(
        {"wait": lambda p: {"exit_status": 3}, "hang": lambda p: FakeShim.HANG, "drop": lambda p: FakeShim.DROP}
    )
    watcher = Watcher()
    got: list[Any] = []
    done = threading.Event()
    closed = threading.Event()

    def on_line(message: dict[str, Any]) -> bool:
        got.append(message)
        done.set()
        return False

    watcher.watch(shim.path, "wait", {}, on_line, closed.set)
    assert done.wait(5) and got == [{"result": {"exit_status": 3}}] and not closed.is_set()
    watcher.watch(shim.path, "drop", {}, on_line, closed.set)
    assert closed.wait(5)
    closed.clear()
    watcher.watch(shim.path, "hang", {}, on_line, closed.set)
    watcher.close()  # drops the hanging request without calling anything
    assert not closed.is_set()
    watcher.close()


def test_restore_adopts_a_live_shim_and_publishes_its_events(fake: Any, sockdir: Path) -> None:
    """restore() against an in-test shim: processes found through state/pids/exit records, a wait held
    per running process, TaskOOM from the events stream, TaskExit when a wait returns."""
    hooks = new_plugin_manager()
    events = Exchange(hooks)
    subscription = events.subscribe()
    runtime = RuncRuntime(sockdir / "state", events=events)
    try:
        bundle = runtime.bundle_path("ns1", "web")
        (bundle / "exits").mkdir(parents=True)
        (bundle / "runtime.json").write_text(json.dumps({"binary": "/bin/true", "runc_root": str(sockdir)}))
        exited = {"exit_status": 2, "exited_at": "2026-01-02T03:04:05.5Z", "pid": 77}
        (bundle / "exits" / "old.json").write_text(json.dumps(exited))
        runtime.socket_path("ns1", "web").parent.mkdir(parents=True)
        finish = threading.Event()
        states = {"": {"pid": 10, "status": "running"}, "e1": {"pid": 11, "status": "running"}}
        states["old"] = {**exited, "status": "stopped"}

        def state(params: dict[str, Any]) -> Any:
            if params["exec_id"] not in states:
                raise KeyError("NotFound")
            return states[params["exec_id"]]

        def wait(params: dict[str, Any]) -> Any:
            if params["exec_id"] != "e1":
                return FakeShim.HANG
            finish.wait(10)
            return {"exit_status": 9, "exited_at": "2026-01-02T03:04:06Z"}

        shim = FakeShim(
            str(runtime.socket_path("ns1", "web")),
            {
                "ping": lambda p: {"pid": os.getpid()},
                "state": state,
                "pids": lambda p: {"pids": [{"pid": 10, "exec_id": ""}, {"pid": 11, "exec_id": "e1"}]},
                "events": lambda p: Lines([{"topic": "/tasks/exit"}, {"topic": "/tasks/oom", "container_id": "web"}]),
                "wait": wait,
            },
        )
        [task] = runtime.restore()
        assert (task.namespace, task.id, task.state("e1").status) == ("ns1", "web", TaskStatus.RUNNING)
        old = task.wait("old", timeout=1)
        assert (old.exit_status, old.pid, old.exited_at.microsecond) == (2, 77, 500000)
        envelope = subscription.get(5)
        assert envelope is not None and (envelope.namespace, envelope.topic) == ("ns1", "/tasks/oom")
        assert envelope.event.container_id == "web"
        finish.set()
        assert task.wait("e1", timeout=5).exit_status == 9
        envelope = subscription.get(5)
        assert envelope is not None and envelope.topic == "/tasks/exit"
        assert (envelope.event.container_id, envelope.event.id, envelope.event.pid, envelope.event.exit_status) == (
            "web",
            "e1",
            11,
            9,
        )
        with pytest.raises(TimeoutError):
            task.wait(timeout=0.1)
        shim.close()
    finally:
        runtime.close()


def test_spawn_failure_names_the_log(sockdir: Path) -> None:
    log = sockdir / "shim.log"
    with pytest.raises(ShimError, match=r"exited with status 3.*broken shim"):
        spawn_shim(["sh", "-c", "echo broken shim >&2; exit 3"], sockdir, log, 5.0)
    with pytest.raises(ShimError, match="did not serve"):
        spawn_shim(["sleep", "30"], sockdir, log, 0.3)


def test_metrics_from_runc_v1_and_v2_shapes() -> None:
    v1 = {
        "cpu": {"usage": {"total": 5_000_000, "user": 3_000_000, "kernel": 2_000_000}, "throttling": {"periods": 4}},
        "memory": {"usage": {"usage": 4096, "limit": 8192}, "raw": {"rss": 100, "cache": 200, "pgfault": 7}},
        "pids": {"current": 2, "limit": 50},
    }
    metrics = metrics_from_runc(v1)
    assert metrics["cpu"] == {
        "usage_usec": 5000,
        "user_usec": 3000,
        "system_usec": 2000,
        "nr_periods": 4,
        "nr_throttled": 0,
        "throttled_usec": 0,
    }
    assert metrics["pids"] == {"current": 2, "limit": 50}
    assert metrics["memory"] == {
        "anon": 100,
        "file": 200,
        "pgfault": 7,
        "usage": 4096,
        "usage_limit": 8192,
        "swap_usage": 0,
        "swap_limit": 0,
    }
    assert metrics_from_runc({"memory": {"raw": {"anon": 9, "file_mapped": 1}}})["memory"]["anon"] == 9


def test_plugin_skips_without_its_binary(tmp_path: Path) -> None:
    from core.plugin import InitContext, SkipPlugin

    hooks = new_plugin_manager()
    ctx = InitContext(
        type="runtime",
        id="runc",
        root=tmp_path / "root",
        state=tmp_path / "state",
        config=RuncConfig(binary="no-such-runtime"),
        metadata=None,  # type: ignore[arg-type]
        hooks=hooks,
        events=Exchange(hooks),
        daemon_root=tmp_path,
    )
    with pytest.raises(SkipPlugin, match="no-such-runtime"):
        init(ctx)
    ctx.config = RuncConfig()
    runtime = init(ctx)
    try:
        assert ctx.exports["aliases"] == "io.containerd.runc.v2" and runtime.tasks() == []
    finally:
        runtime.close()


# -- the runtime with real runc, the real shim and busybox ---------------------------------------------

needs_real = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("runc") or not SHIM.exists() or not Path("/usr/bin/busybox").exists(),
    reason="needs root, runc, busybox and plugins/runtime_runc/shim.py",
)
NO_STDIO = Stdio()
CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SYS_CHROOT"]


@pytest.fixture(scope="module")
def rootfs() -> Iterator[Path]:
    """A directory with Debian's static busybox as /bin/busybox and a symlink per applet; at the end, the
    tests' parent cgroup goes too (runc removes a container's cgroup, not its parent)."""
    path = Path(tempfile.mkdtemp(prefix="ck-rootfs-", dir="/tmp"))
    for name in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (path / name).mkdir()
    shutil.copy2("/usr/bin/busybox", path / "bin" / "busybox")
    applets = subprocess.run(["/usr/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout
    for applet in applets.split():
        if applet != "busybox":
            (path / "bin" / applet).symlink_to("busybox")
    yield path
    shutil.rmtree(path, ignore_errors=True)
    for parent in Path("/sys/fs/cgroup").glob("*/containerkit-test"):
        with contextlib.suppress(OSError):
            parent.rmdir()


def spec(id: str, *args: str, terminal: bool = False) -> dict[str, Any]:
    """A small OCI spec running ``args`` in the busybox rootfs."""
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {key: CAPS for key in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
        },
        "root": {"path": "/nonexistent"},  # replaced by the runtime: the rootfs mounts go to the bundle
        "hostname": id,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
        ],
        "linux": {
            "namespaces": [{"type": kind} for kind in ("pid", "ipc", "uts", "mount")],
            "cgroupsPath": f"/containerkit-test/{id}",
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        },
    }


class Harness:
    """A runtime on a private state directory, the events it publishes, and cleanup of everything."""

    def __init__(self, rootfs: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ck-rs-", dir="/tmp"))
        self.rootfs = rootfs
        self.hooks = new_plugin_manager()
        self.events = Exchange(self.hooks)
        self.subscription: Subscription = self.events.subscribe()
        self.runtimes: list[RuncRuntime] = []
        self.runtime = self.open()

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def open(self, **options: Any) -> RuncRuntime:
        """A new RuncRuntime on this state directory (as a restarted daemon makes)."""
        runtime = RuncRuntime(self.state, events=self.events, **options)
        self.runtimes.append(runtime)
        return runtime

    def create(
        self, id: str, *args: str, stdio: Stdio = NO_STDIO, runtime: RuncRuntime | None = None, **kw: Any
    ) -> Any:
        request = CreateTaskRequest(
            "testns",
            id,
            spec(id, *args, terminal=stdio.terminal),
            (Mount("bind", str(self.rootfs), ("rbind",)),),
            stdio,
            **kw,
        )
        return (runtime or self.runtime).create(request)

    def exits(self, timeout: float = 5.0) -> list[Any]:
        """The /tasks/exit events published so far (waiting up to ``timeout`` for the first)."""
        found = []
        while (envelope := self.subscription.get(timeout)) is not None:
            if envelope.topic == "/tasks/exit":
                found.append(envelope.event)
            timeout = 0.2
        return found

    def assert_clean(self) -> None:
        """No mount, bundle, socket or shim process of this runtime left."""
        assert not [m for m in mount_points() if m.startswith(str(self.dir))]
        assert not list(self.state.glob("*/*/config.json"))
        assert not list((self.state / ".s").glob("*.sock"))
        assert not running_shims(self.state)

    def cleanup(self) -> None:
        for runtime in self.runtimes:
            runtime.close()
        for pid_file in self.state.glob("*/*/shim.pid"):
            with_pid(pid_file, lambda pid: os.kill(pid, signal.SIGKILL))
        for bundle in self.state.glob("[!.]*/*"):
            settings = json.loads((bundle / "runtime.json").read_text()) if (bundle / "runtime.json").exists() else {}
            if settings:
                runc = [settings["binary"], "--root", settings["runc_root"], "delete", "--force", bundle.name]
                subprocess.run(runc, capture_output=True, check=False)
            unmount_all(bundle / "rootfs", detach=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def with_pid(pid_file: Path, action: Callable[[int], None]) -> None:
    with contextlib.suppress(OSError, ValueError):
        action(int(pid_file.read_text()))


def running_shims(state: Path) -> dict[int, str]:
    """The command lines of the running shims of the runtime on ``state`` (forked or spawned, each names
    its bundle below it), by pid; a zombie counts as gone."""
    found = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_text() if entry.name.isdigit() else ""
            if f"--bundle\0{state}/" in cmdline and alive(int(entry.name)):
                found[int(entry.name)] = cmdline
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def harness(rootfs: Path) -> Iterator[Harness]:
    h = Harness(rootfs)
    yield h
    h.cleanup()


def read_until(path: Path, expected: str, timeout: float = 10.0) -> str:
    """Read the FIFO or file at ``path`` until ``expected`` appears."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while expected.encode() not in data and time.monotonic() < deadline:
            select.select([fd], [], [], 0.1)
            with contextlib.suppress(BlockingIOError):
                data += os.read(fd, 65536)
            if path.is_file() and expected.encode() not in data:
                time.sleep(0.05)
    finally:
        os.close(fd)
    return data.decode(errors="replace")


@needs_real
def test_lifecycle_files_and_exit_event(harness: Harness) -> None:
    out = harness.dir / "out.log"
    task = harness.create(
        "life", "sh", "-c", "echo hello; echo oops >&2; exit 3", stdio=Stdio(stdout=str(out), stderr=str(out))
    )
    bundle = Path(task.bundle)
    assert bundle == harness.state / "testns" / "life"
    assert json.loads((bundle / "config.json").read_text())["root"]["path"] == "rootfs"
    assert str(bundle / "rootfs") in mount_points()
    created = task.state()
    assert created.status is TaskStatus.CREATED and created.pid > 0 and created.stdio.stdout == str(out)
    shim_pid = int((bundle / "shim.pid").read_text())
    assert task.start() == created.pid
    exit = task.wait(timeout=10)
    assert exit.exit_status == 3 and exit.pid == created.pid
    [event] = harness.exits()
    assert (event.container_id, event.id, event.pid, event.exit_status) == ("life", "life", created.pid, 3)
    stopped = task.state()
    assert stopped.status is TaskStatus.STOPPED and stopped.exit_status == 3 and stopped.exited_at == exit.exited_at
    assert read_until(out, "oops") == "hello\noops\n"
    with pytest.raises(NotFound, match="process already finished"):
        task.kill(signal.SIGTERM)
    assert task.pids() == []
    with pytest.raises(FailedPrecondition):
        task.stats()
    assert task.delete().exit_status == 3
    assert not bundle.exists() and not alive(shim_pid)
    harness.assert_clean()
    with pytest.raises(NotFound):
        harness.runtime.get("testns", "life")
    with pytest.raises(NotFound):
        task.state()
    assert harness.runtime.tasks() == []


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: [0] is the state, [1] the parent, [3] the session."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def proc_status(pid: int, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith(f"{key}:"))  # fmt: skip


def spares_of(zygote: int, timeout: float = 10.0) -> list[int]:
    """The spare shims the zygote ``zygote`` has forked (their command line: the spare mark and its pid),
    waiting up to ``timeout`` for one that is still being forked."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                words = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
                if words[:2] == [SPARE_MARK.encode(), str(zygote).encode()] and alive(int(entry.name)):
                    found.append(int(entry.name))
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


@needs_real
def test_forked_shim_is_detached_and_found_by_its_bundle(harness: Harness) -> None:
    """A shim forked by the fork server is reparented away from the zygote and the daemon, in a session of
    its own that it does not lead, in its bundle, holds only its own fds and names its bundle and socket on
    its command line; the zygote (and the spare shim it keeps) names no state directory and exits with the
    runtime."""
    task = harness.create("forked", "sleep", "300")
    bundle = Path(task.bundle)
    shim = int((bundle / "shim.pid").read_text())
    zygote = harness.runtime.fork_server.pid
    assert zygote and zygote != shim
    parent, session = int(proc_stat(shim)[1]), int(proc_stat(shim)[3])
    assert parent not in (zygote, os.getpid()) and session not in (shim, os.getsid(0), os.getsid(zygote))
    assert os.readlink(f"/proc/{shim}/cwd") == str(bundle)
    assert os.readlink(f"/proc/{shim}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{shim}/fd/2") == str(bundle / "shim.log")
    zygote_fds = {os.readlink(f"/proc/{zygote}/fd/{fd}") for fd in os.listdir(f"/proc/{zygote}/fd")}
    shim_fds = {os.readlink(f"/proc/{shim}/fd/{fd}") for fd in os.listdir(f"/proc/{shim}/fd")}
    assert not shim_fds & {link for link in zygote_fds if link.startswith("socket:")}
    assert int(proc_status(shim, "SigBlk"), 16) == 0
    cmdline = Path(f"/proc/{shim}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    assert cmdline[:4] == [os.fsencode(sys.executable), b"-S", b"-I", os.fsencode(SHIM)]
    assert os.fsencode(bundle) in cmdline and os.fsencode(harness.runtime.socket_path("testns", "forked")) in cmdline
    assert running_shims(harness.state).keys() == {shim}
    assert str(harness.dir).encode() not in Path(f"/proc/{zygote}/cmdline").read_bytes()
    spares = spares_of(zygote)
    assert len(spares) == 1 and spares[0] != shim  # the next shim waits, forked and set up
    task.kill(signal.SIGKILL)
    task.wait(timeout=10)
    task.delete()
    harness.assert_clean()
    harness.runtime.close()
    assert not alive(zygote)
    deadline = time.monotonic() + 10
    while alive(spares[0]) and time.monotonic() < deadline:
        time.sleep(0.02)  # the spare leaves once the daemon's end of their socket is closed
    assert not alive(spares[0])


@needs_real
def test_request_lost_with_a_dying_spare_is_sent_again(harness: Harness) -> None:
    """A request handed to a spare that dies before taking it (it closes the ready pipe without a word) goes
    to the next spare: the task starts, nothing is reported as a shim that exited before serving."""
    fork_server = harness.runtime.fork_server
    harness.create("warm", "true").delete()
    zygote = fork_server.pid
    [stopped] = spares_of(zygote)
    os.kill(stopped, signal.SIGSTOP)  # the request waits in its socket, untaken
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        creating = pool.submit(harness.create, "lost", "true")
        deadline = time.monotonic() + 10
        while stopped in (found := spares_of(zygote)) and len(found) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)  # the zygote forks the next spare once it has passed the request on
        os.kill(stopped, signal.SIGKILL)
        task = creating.result(timeout=30)
    assert task.start() > 0
    assert task.wait(timeout=10).exit_status == 0
    task.delete()
    harness.assert_clean()


@needs_real
def test_fork_server_restarts_and_spawning_stands_in(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A zygote or spare shim killed is replaced; when the fork server cannot be used (or is off) the shim is
    spawned as a new interpreter, and either way the task runs."""
    fork_server = harness.runtime.fork_server
    first = harness.create("one", "true")
    first.delete()
    killed = fork_server.pid
    os.kill(killed, signal.SIGKILL)
    for id in ("two", "three"):  # the spare it left may serve one more; then there is a new zygote
        harness.create(id, "true").delete()
    assert fork_server.pid not in (0, killed)
    [spare] = spares_of(fork_server.pid)
    os.kill(spare, signal.SIGKILL)
    harness.create("four", "true").delete()  # a dead spare is replaced

    def unusable(*args: Any) -> int:
        raise Unusable("off for the test")

    monkeypatch.setattr(fork_server, "spawn", unusable)
    spawned = harness.create("spawned", "sh", "-c", "exit 4")
    shim = int((Path(spawned.bundle) / "shim.pid").read_text())
    assert b"\0-c\0" in Path(f"/proc/{shim}/cmdline").read_bytes()
    spawned.start()
    assert spawned.wait(timeout=10).exit_status == 4
    spawned.delete()
    without = harness.open(fork_server=False)
    assert without.fork_server is None
    task = harness.create("unforked", "sh", "-c", "exit 5", runtime=without)
    task.start()
    assert task.wait(timeout=10).exit_status == 5
    task.delete()
    broken = harness.open()
    broken.fork_server.python = "/bin/true"  # starts, but never says it is ready
    for n in range(2):  # the second create does not try again so soon
        task = harness.create(f"five{n}", "true", runtime=broken)
        assert task.start() > 0 and broken.fork_server.pid == 0
        task.wait(timeout=10)
        task.delete()
    harness.assert_clean()


@needs_real
def test_exec_pids_kill_and_delete_rules(harness: Harness) -> None:
    task = harness.create("execs", "sleep", "300")
    with pytest.raises(FailedPrecondition):
        task.exec("early", {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}})
    init_pid = task.start()
    assert task.state().status is TaskStatus.RUNNING
    assert [t.id for t in harness.runtime.tasks("testns")] == ["execs"] and harness.runtime.tasks("other") == []
    out = harness.dir / "exec.out"
    process = {
        "args": ["sh", "-c", "echo from-exec; exit 5"],
        "cwd": "/",
        "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0},
    }
    task.exec("e1", process, Stdio(stdout=str(out)))
    assert task.state("e1").status is TaskStatus.CREATED
    with pytest.raises(AlreadyExists):
        task.exec("e1", process)
    with pytest.raises(InvalidArgument):
        task.exec("bad id", process)
    task.start("e1")
    assert task.wait("e1", timeout=10).exit_status == 5
    assert read_until(out, "from-exec") == "from-exec\n"
    [event] = harness.exits()
    assert (event.container_id, event.id, event.exit_status) == ("execs", "e1", 5)
    assert task.delete("e1").exit_status == 5
    with pytest.raises(NotFound):
        task.state("e1")
    task.exec("e2", {**process, "args": ["sleep", "300"]})
    e2_pid = task.start("e2")
    pids = {p.pid: p.exec_id for p in task.pids()}
    assert pids[init_pid] is None and pids[e2_pid] == "e2"
    with pytest.raises(TimeoutError):
        task.wait("e2", timeout=0.2)
    with pytest.raises(FailedPrecondition):
        task.delete("e2")
    with pytest.raises(FailedPrecondition):
        task.delete()
    task.kill(signal.SIGKILL, exec_id="e2")
    assert task.wait("e2", timeout=10).exit_status == 137
    task.delete("e2")
    with pytest.raises(NotFound):
        task.wait("nosuch")
    task.kill(signal.SIGKILL, all=True)
    assert task.wait(timeout=10).exit_status == 137
    task.delete()
    harness.assert_clean()


@needs_real
def test_pause_resume_stats_update(harness: Harness) -> None:
    task = harness.create("ctl", "sleep", "300")
    with pytest.raises(FailedPrecondition):
        task.pause()
    task.start()
    task.pause()
    assert task.state().status is TaskStatus.PAUSED
    with pytest.raises(FailedPrecondition):
        task.pause()
    task.resume()
    assert task.state().status is TaskStatus.RUNNING
    with pytest.raises(FailedPrecondition):
        task.resume()
    metrics = task.stats()
    assert metrics.task_id == "ctl" and metrics.type_url == "io.containerd.cgroups.v2.Metrics"
    assert set(metrics.data) == {"pids", "cpu", "memory"}
    assert metrics.data["pids"]["current"] == 1 and metrics.data["memory"]["usage"] > 0
    task.update({"pids": {"limit": 77}})
    limits = [
        Path("/sys/fs/cgroup/pids/containerkit-test/ctl/pids.max"),
        Path("/sys/fs/cgroup/containerkit-test/ctl/pids.max"),
    ]
    assert [p.read_text().strip() for p in limits if p.exists()] == ["77"]
    task.kill(signal.SIGKILL)
    task.wait(timeout=10)
    with pytest.raises(FailedPrecondition):
        task.update({"pids": {"limit": 10}})
    task.delete()
    harness.assert_clean()


@needs_real
def test_fifos_stdin_close_io_and_terminal(harness: Harness) -> None:
    fifos = {name: harness.dir / name for name in ("in", "out", "err")}
    for fifo in fifos.values():
        os.mkfifo(fifo)
    readers = [os.open(fifos[name], os.O_RDONLY | os.O_NONBLOCK) for name in ("out", "err")]  # as ctr does
    task = harness.create(
        "pipes", "sh", "-c", "cat; echo to-err >&2", stdio=Stdio(str(fifos["in"]), str(fifos["out"]), str(fifos["err"]))
    )
    task.start()
    writer = os.open(fifos["in"], os.O_WRONLY)
    os.write(writer, b"ping\n")
    os.close(writer)
    assert "ping" in read_until(fifos["out"], "ping")
    task.close_io()
    task.close_io()
    assert task.wait(timeout=10).exit_status == 0
    assert "to-err" in read_until(fifos["err"], "to-err")
    task.resize_pty(80, 24)  # the init process has no terminal: a no-op, as containerd's
    task.delete()

    tty_out = harness.dir / "tty"
    os.mkfifo(tty_out)
    readers.append(os.open(tty_out, os.O_RDONLY | os.O_NONBLOCK))
    tty = harness.create(
        "tty", "sh", "-c", "sleep 0.5; tty; stty size", stdio=Stdio(stdout=str(tty_out), terminal=True)
    )
    assert tty.state().stdio.terminal
    tty.start()
    tty.resize_pty(100, 31)
    output = read_until(tty_out, "31 100")
    assert "/dev/pts/0" in output and "31 100" in output
    assert tty.wait(timeout=10).exit_status == 0
    tty.resize_pty(80, 24)  # after its exit (ctr -t may resize that late): a no-op for init, as containerd's
    tty.delete()
    for reader in readers:
        os.close(reader)
    harness.assert_clean()


@needs_real
def test_memory_limit_and_runc_root_option(harness: Harness) -> None:
    """Killed by its memory limit: /tasks/oom, then exit 137 and its /tasks/exit; runc's state under the
    ``root`` option."""
    root = harness.dir / "altroot"
    limited = {
        **spec("oom", "tail", "/dev/zero"),
        "linux": {**spec("oom")["linux"], "resources": {"memory": {"limit": 16 << 20}}},
    }
    request = CreateTaskRequest(
        "testns",
        "oom",
        limited,
        (Mount("bind", str(harness.rootfs), ("rbind",)),),
        options={"binary_name": "runc", "root": str(root)},
    )
    task = harness.runtime.create(request)
    assert (root / "testns" / "oom" / "state.json").exists()
    task.start()
    assert task.wait(timeout=20).exit_status == 137
    topics = []
    while (envelope := harness.subscription.get(2.0)) is not None:
        topics.append((envelope.topic, envelope.event.container_id))
    assert topics[-1] == ("/tasks/exit", "oom") and set(topics[:-1]) == {("/tasks/oom", "oom")}
    task.delete()
    assert not (root / "testns" / "oom").exists()
    harness.assert_clean()


@needs_real
def test_concurrent_tasks(harness: Harness) -> None:
    """Tasks created, started, waited for and deleted from many threads at once; no fd of theirs stays open."""
    harness.runtime.restore()  # as at a daemon's start: the fork server's socket is open from then on
    fds = len(os.listdir("/proc/self/fd"))
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            task = harness.create(f"c{n}", "sh", "-c", f"exit {n}")
            task.start()
            assert task.wait(timeout=30).exit_status == n
            assert task.delete().exit_status == n
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted((e.container_id, e.exit_status) for e in harness.exits()) == sorted((f"c{n}", n) for n in range(8))
    deadline = time.monotonic() + 5
    while len(os.listdir("/proc/self/fd")) > fds and time.monotonic() < deadline:
        time.sleep(0.05)  # the watcher drops a connection once the shim has exited
    assert len(os.listdir("/proc/self/fd")) <= fds
    harness.assert_clean()


@needs_real
def test_errors_leave_nothing_behind(harness: Harness) -> None:
    runtime = harness.runtime
    task = harness.create("dup", "true")
    with pytest.raises(AlreadyExists):
        harness.create("dup", "true")
    task.delete()
    for bad, kw in [
        ("bad id", {}),
        ("opt", {"options": {"nosuch": 1}}),
        ("systemd", {"options": {"systemd_cgroup": True}}),
        ("binary", {"options": {"binary_name": "no-such-runc"}}),
    ]:
        with pytest.raises(InvalidArgument):
            harness.create(bad, "true", **kw)
    with pytest.raises(InvalidArgument, match="nosuch-command"):
        harness.create("notfound", "nosuch-command")
    bad_mount = CreateTaskRequest("testns", "mnt", spec("mnt", "true"), (Mount("bind", "/no/such/dir", ("rbind",)),))
    with pytest.raises(InvalidArgument, match="/no/such/dir"):
        runtime.create(bad_mount)
    assert runtime.tasks() == [] and not list(harness.state.glob("testns/*"))
    harness.assert_clean()


@needs_real
def test_crun_drop_in(harness: Harness) -> None:
    if not shutil.which("crun"):
        pytest.skip("crun is not installed")
    runtime = harness.open(binary="crun")
    out = harness.dir / "crun.out"
    task = harness.create("crun", "sh", "-c", "echo crun-ok; exit 4", stdio=Stdio(stdout=str(out)), runtime=runtime)
    assert json.loads((Path(task.bundle) / "runtime.json").read_text())["binary"].endswith("crun")
    task.start()
    assert task.wait(timeout=10).exit_status == 4
    assert read_until(out, "crun-ok") == "crun-ok\n"
    task.delete()
    harness.assert_clean()


@needs_real
def test_restore_live_exited_and_dead_shims(harness: Harness) -> None:
    tasks = {name: harness.create(name, "sleep", "300") for name in ("live", "exited", "dead")}
    pids = {name: task.start() for name, task in tasks.items()}
    created = harness.create("created", "true")
    harness.runtime.close()  # the daemon goes away; the tasks keep running
    assert all(alive(pid) for pid in pids.values())
    os.kill(pids["exited"], signal.SIGKILL)  # exits while nobody watches
    dead_shim = int((harness.state / "testns" / "dead" / "shim.pid").read_text())
    os.kill(dead_shim, signal.SIGKILL)
    time.sleep(0.3)

    runtime = harness.open()
    started = time.monotonic()
    restored = {t.id: t for t in runtime.restore()}
    assert time.monotonic() - started < 5
    assert set(restored) == {"live", "exited", "dead", "created"}
    assert restored["live"].state().status is TaskStatus.RUNNING
    assert restored["created"].state().status is TaskStatus.CREATED
    exited = restored["exited"].state()
    assert (exited.status, exited.exit_status) == (TaskStatus.STOPPED, 137)
    assert restored["exited"].wait(timeout=5).exit_status == 137
    dead = restored["dead"].state()
    assert (dead.status, dead.exit_status) == (TaskStatus.STOPPED, UNKNOWN_EXIT_STATUS)
    assert restored["dead"].wait(timeout=5).exit_status == UNKNOWN_EXIT_STATUS
    with pytest.raises(NotFound):
        restored["dead"].kill(signal.SIGTERM)
    assert restored["dead"].pids() == []

    live = restored["live"]
    out = harness.dir / "restored.out"
    live.exec(
        "after",
        {"args": ["echo", "exec-after-restore"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
        Stdio(stdout=str(out)),
    )
    live.start("after")
    assert live.wait("after", timeout=10).exit_status == 0
    assert read_until(out, "exec-after-restore")
    harness.exits()
    live.kill(signal.SIGKILL)
    assert live.wait(timeout=10).exit_status == 137
    assert [(e.id, e.exit_status) for e in harness.exits()] == [("live", 137)]
    for task in restored.values():
        task.delete()
    assert not alive(pids["dead"])  # the orphaned container went with runc delete --force
    assert created is not None and runtime.tasks() == []
    harness.assert_clean()


@needs_real
def test_restore_hundred_dead_shims_fast(harness: Harness) -> None:
    sockets = harness.state / ".s"
    sockets.mkdir(parents=True)
    runtime = harness.runtime
    hung = None
    for n in range(101):
        id = f"dead{n}"
        bundle = runtime.bundle_path("many", id)
        (bundle / "rootfs").mkdir(parents=True)
        (bundle / "runtime.json").write_text(json.dumps({"binary": "/bin/true", "runc_root": str(harness.dir)}))
        if n % 2:
            (bundle / "exits").mkdir()
            record = {"exit_status": n, "exited_at": "2026-01-02T03:04:05.123456789Z", "pid": 1000 + n}
            (bundle / "exits" / "init.json").write_text(json.dumps(record))
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(runtime.socket_path("many", id)))
        if n == 100:
            server.listen(1)  # accepts connections but never answers
            hung = server
        else:
            server.close()
    fresh = harness.open(restore_timeout=0.5)
    started = time.monotonic()
    restored = fresh.restore()
    elapsed = time.monotonic() - started
    assert len(restored) == 101 and elapsed < 3, elapsed
    for task in restored:
        n = int(task.id[4:])
        state = task.state()
        assert state.status is TaskStatus.STOPPED
        assert state.exit_status == (n if n % 2 else UNKNOWN_EXIT_STATUS), task.id
        if n % 2:
            assert state.pid == 1000 + n and state.exited_at is not None and state.exited_at.year == 2026
    started = time.monotonic()
    for task in restored:
        task.delete()
    assert time.monotonic() - started < 10
    assert hung is not None
    hung.close()
    assert fresh.tasks() == [] and not list(harness.state.glob("many/*"))
    harness.assert_clean()
