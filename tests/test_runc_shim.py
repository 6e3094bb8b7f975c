"""The runc shim (plugins/runtime_runc/shim.py) driven directly over its socket with real busybox bundles.

Each test starts its own shim on a private runc root under its temp directory and, whatever the outcome,
deletes its containers, stops the shim by pid and removes what it made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SHIM = Path(__file__).resolve().parents[1] / "plugins" / "runtime_runc" / "shim.py"
BUSYBOX = Path("/bin/busybox")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("runc") or not BUSYBOX.exists(),
    reason="needs root, runc and /bin/busybox",
)
PROCESS = {"cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}


class CallError(Exception):
    """An error answer of the shim."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Conn:
    """One connection to a shim."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")

    def send(self, method: str, **params: Any) -> None:
        self.sock.sendall(json.dumps({"method": method, "params": params}).encode() + b"\n")

    def line(self) -> dict[str, Any]:
        return json.loads(self.reader.readline())

    def call(self, method: str, **params: Any) -> Any:
        self.send(method, **params)
        answer = self.line()
        if "error" in answer:
            raise CallError(answer["error"]["code"], answer["error"]["message"])
        return answer["result"]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class Shim:
    """A shim serving one container of a fresh busybox bundle under ``base``."""

    def __init__(self, base: Path, spec: dict[str, Any], binary: str = "runc") -> None:
        self.base = base
        self.id = f"shimtest-{uuid.uuid4().hex[:12]}"
        self.bundle = base / "bundle"
        self.root = base / "runc-root"
        self.socket = str(base / "s.sock")
        self.binary = binary
        rootfs = self.bundle / "rootfs"
        (rootfs / "bin").mkdir(parents=True)
        for name in ("proc", "dev", "sys", "tmp"):
            (rootfs / name).mkdir()
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout
        for applet in applets.split():
            if applet != "busybox":
                (rootfs / "bin" / applet).symlink_to("busybox")
        spec = json.loads(json.dumps(spec))
        spec["linux"]["cgroupsPath"] = f"/{self.id}"
        (self.bundle / "config.json").write_text(json.dumps(spec))
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-S", "-I", str(SHIM), "--namespace", "test", "--id", self.id,
             "--bundle", str(self.bundle), "--socket", self.socket, "--binary", binary,
             "--runc-root", str(self.root), "--log", str(base / "shim.log")],
            cwd=self.bundle, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True, timeout=30,
        )  # fmt: skip
        self.ready_after = time.monotonic() - started
        self.pid = int((self.bundle / "shim.pid").read_text())
        self.conn = Conn(self.socket)

    def call(self, method: str, **params: Any) -> Any:
        return self.conn.call(method, **params)

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{self.pid}").exists() and "Z" not in Path(f"/proc/{self.pid}/stat").read_text().split()[2]

    def cleanup(self) -> None:
        """Kill and delete the container through the shim, shut it down, and make sure both are gone."""
        if self.alive():
            with contextlib.suppress(CallError, OSError, ValueError):
                if self.call("state")["status"] not in ("stopped", "created"):
                    self.call("kill", signal=9, all=True)
                    self.call("wait")
                self.call("delete")
            with contextlib.suppress(OSError, ValueError):
                self.call("shutdown")
            deadline = time.monotonic() + 5
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.alive():
                os.kill(self.pid, signal.SIGKILL)
        self.conn.close()
        command = [self.binary, "--root", str(self.root), "delete", "--force", self.id]
        subprocess.run(command, capture_output=True)


@pytest.fixture(scope="module")
def crun() -> None:
    """Skips where crun is not installed. On a hybrid cgroup host the shim itself hides the cgroup v2
    hierarchy from crun (which refuses hybrid mode), so crun runs here as runc does."""
    if not shutil.which("crun"):
        pytest.skip("crun is not installed")


@pytest.fixture(scope="module")
def base_spec() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["runc", "spec"], cwd=tmp, check=True)
        spec = json.loads(Path(tmp, "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["root"]["readonly"] = False
    return spec


@pytest.fixture
def make_shim(base_spec: dict[str, Any]) -> Iterator[Any]:
    shims: list[Shim] = []
    dirs: list[str] = []

    def make(*args: str, binary: str = "runc", terminal: bool = False, memory: int = 0) -> Shim:
        base = Path(tempfile.mkdtemp(prefix="ck-shim-", dir="/tmp"))
        dirs.append(str(base))
        spec = json.loads(json.dumps(base_spec))
        spec["process"]["args"] = list(args)
        spec["process"]["terminal"] = terminal
        if memory:
            spec["linux"]["resources"]["memory"] = {"limit": memory}
        shim = Shim(base, spec, binary)
        shims.append(shim)
        return shim

    yield make
    for shim in shims:
        shim.cleanup()
        assert not shim.alive()
        assert not (shim.root / shim.id).exists()
    for path in dirs:
        shutil.rmtree(path)


def fifo(path: Path) -> int:
    """Make a FIFO at ``path`` and open it for reading without blocking."""
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)


def read_all(fd: int, timeout: float = 10) -> bytes:
    """Everything written to the FIFO ``fd`` until its writers are gone."""
    os.set_blocking(fd, True)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    return data


def test_echo_through_fifo_and_file(make_shim: Any) -> None:
    shim = make_shim("sh", "-c", "echo hi; echo err >&2; exit 3")
    assert shim.call("ping") == {"pid": shim.pid}
    assert os.stat(shim.socket).st_mode & 0o777 == 0o600
    out = fifo(shim.base / "out")
    stdio = {"stdout": str(shim.base / "out"), "stderr": f"file://{shim.base}/logs/err.log", "stdin": ""}
    with pytest.raises(CallError) as refused:
        shim.call("create", stdio={**stdio, "stdout": "binary:///usr/bin/logger"})
    assert refused.value.code == "InvalidArgument"
    pid = shim.call("create", stdio=stdio)["pid"]
    assert pid > 0
    assert shim.call("state")["status"] == "created"
    assert shim.call("start")["pid"] == pid
    result = shim.call("wait")
    assert result["exit_status"] == 3
    assert result["exited_at"].endswith("Z")
    assert read_all(out) == b"hi\n"
    assert (shim.base / "logs" / "err.log").read_text() == "err\n"
    state = shim.call("state")
    assert (state["status"], state["exit_status"], state["stdio"]["stdout"]) == ("stopped", 3, stdio["stdout"])
    assert shim.call("delete") == {"exit_status": 3, "exited_at": result["exited_at"], "pid": pid}


def test_exit_status_is_code_or_128_plus_signal(make_shim: Any) -> None:
    shim = make_shim("sleep", "100")
    shim.call("create", stdio={"stdout": str(shim.base / "out.txt")})
    shim.call("start")
    with pytest.raises(CallError) as refused:
        shim.call("delete")
    assert refused.value.code == "FailedPrecondition"
    shim.call("kill", signal=9)
    assert shim.call("wait")["exit_status"] == 137
    with pytest.raises(CallError) as finished:
        shim.call("kill", signal=9)
    assert (finished.value.code, finished.value.message) == ("NotFound", "process already finished")
    assert shim.call("delete")["exit_status"] == 137
    shim.call("shutdown")
    deadline = time.monotonic() + 5
    while shim.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not shim.alive()
    assert not Path(shim.socket).exists()


def test_exec_processes(make_shim: Any) -> None:
    shim = make_shim("sleep", "100")
    shim.call("create", stdio={})
    init_pid = shim.call("start")["pid"]
    process = {"args": ["sh", "-c", "echo from-exec; exit 5"], **PROCESS}
    out = fifo(shim.base / "exec-out")
    assert shim.call("exec", exec_id="e1", process=process, stdio={"stdout": str(shim.base / "exec-out")}) == {}
    with pytest.raises(CallError) as duplicate:
        shim.call("exec", exec_id="e1", process=process, stdio={})
    assert duplicate.value.code == "AlreadyExists"
    with pytest.raises(CallError) as reserved:
        shim.call("exec", exec_id="init", process=process, stdio={})
    assert reserved.value.code == "InvalidArgument"
    assert shim.call("state", exec_id="e1")["status"] == "created"
    shim.call("start", exec_id="e1")
    assert shim.call("wait", exec_id="e1")["exit_status"] == 5
    assert read_all(out) == b"from-exec\n"
    assert json.loads((shim.bundle / "exits" / "e1.json").read_text())["exit_status"] == 5
    assert shim.call("delete", exec_id="e1")["exit_status"] == 5
    with pytest.raises(CallError) as gone:
        shim.call("state", exec_id="e1")
    assert gone.value.code == "NotFound"

    shim.call("exec", exec_id="e2", process={**process, "args": ["sleep", "100"]}, stdio={})
    exec_pid = shim.call("start", exec_id="e2")["pid"]
    pids = {p["pid"]: p["exec_id"] for p in shim.call("pids")["pids"]}
    assert pids[exec_pid] == "e2" and pids[init_pid] == ""
    shim.call("kill", exec_id="e2", signal=15)
    assert shim.call("wait", exec_id="e2")["exit_status"] == 143
    shim.call("delete", exec_id="e2")

    shim.call("exec", exec_id="e3", process={**process, "args": ["nosuch-in-exec"]}, stdio={})
    with pytest.raises(CallError) as missing:
        shim.call("start", exec_id="e3")
    assert "nosuch-in-exec" in missing.value.message


def test_exec_cycles_leak_no_fds_or_threads(make_shim: Any) -> None:
    shim = make_shim("sleep", "100")
    shim.call("create", stdio={})
    shim.call("start")

    def usage() -> tuple[int, int]:
        threads = int(Path(f"/proc/{shim.pid}/status").read_text().split("Threads:")[1].split()[0])
        return len(os.listdir(f"/proc/{shim.pid}/fd")), threads

    before = usage()
    for n in range(10):
        stdin_path, out_path = shim.base / f"in{n}", shim.base / f"out{n}"
        os.mkfifo(stdin_path)
        out = fifo(out_path)
        stdio = {"stdin": str(stdin_path), "stdout": str(out_path), "stderr": str(out_path), "terminal": n % 2 == 1}
        shim.call("exec", exec_id=f"c{n}", process={"args": ["cat"], **PROCESS}, stdio=stdio)
        shim.call("start", exec_id=f"c{n}")
        shim.call("kill", exec_id=f"c{n}", signal=9)
        assert shim.call("wait", exec_id=f"c{n}")["exit_status"] == 137
        shim.call("delete", exec_id=f"c{n}")
        read_all(out)
    time.sleep(0.2)
    assert usage() == before


def test_stdin_and_close_io(make_shim: Any) -> None:
    shim = make_shim("cat")
    stdin_path, out_path = shim.base / "in", shim.base / "out"
    os.mkfifo(stdin_path)
    out = fifo(out_path)
    shim.call("create", stdio={"stdin": str(stdin_path), "stdout": str(out_path)})
    shim.call("start")
    writer = os.open(stdin_path, os.O_WRONLY)
    os.write(writer, b"through stdin\n" * 4000)
    os.close(writer)
    shim.call("close_io")
    assert shim.call("wait")["exit_status"] == 0
    assert read_all(out) == b"through stdin\n" * 4000


def test_kill_all_pause_resume_pids_stats_update(make_shim: Any) -> None:
    shim = make_shim("sh", "-c", "sleep 100 & sleep 100 & wait")
    shim.call("create", stdio={})
    shim.call("start")
    deadline = time.monotonic() + 5
    while len(shim.call("pids")["pids"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(shim.call("pids")["pids"]) == 3
    shim.call("pause")
    assert shim.call("state")["status"] == "paused"
    with pytest.raises(CallError) as twice:
        shim.call("pause")
    assert twice.value.code == "FailedPrecondition"
    shim.call("resume")
    assert shim.call("state")["status"] == "running"
    stats = shim.call("stats")
    assert stats["pids"]["current"] == 3
    assert stats["memory"]["usage"]["usage"] > 0
    assert stats["cpu"]["usage"]["total"] > 0
    command = ["runc", "--root", str(shim.root), "events", "--stats", shim.id]
    runc = json.loads(subprocess.run(command, capture_output=True, check=True).stdout)["data"]
    assert stats["pids"] == {"current": 3, "limit": runc["pids"].get("limit", 0)}
    assert stats["memory"]["usage"]["limit"] == runc["memory"]["usage"]["limit"]
    assert sorted(stats["memory"]["raw"]) == sorted(runc["memory"]["raw"])
    shim.call("update", resources={"pids": {"limit": 50}})
    assert shim.call("stats")["pids"]["limit"] == 50
    events = Conn(shim.socket)
    events.send("events")
    shim.call("kill", signal=9, all=True)
    assert shim.call("wait")["exit_status"] == 137
    event = events.line()
    events.close()
    assert (event["topic"], event["container_id"], event["exit_status"]) == ("/tasks/exit", shim.id, 137)
    assert shim.call("pids") == {"pids": []}


def test_oom_event(make_shim: Any) -> None:
    shim = make_shim("sh", "-c", "head -c 200000000 /dev/zero | tail", memory=16 << 20)
    shim.call("create", stdio={})
    events = Conn(shim.socket)
    events.send("events")
    shim.call("start")
    assert shim.call("wait")["exit_status"] != 0
    topics = [events.line()["topic"]]
    while topics[-1] != "/tasks/exit":  # one /tasks/oom per kill the kernel made (a pipeline may see two)
        topics.append(events.line()["topic"])
    events.close()
    assert topics[0] == "/tasks/oom" and set(topics[:-1]) == {"/tasks/oom"}


@pytest.mark.parametrize("binary", ["runc", "crun"])
def test_terminal(make_shim: Any, binary: str, request: pytest.FixtureRequest) -> None:
    if binary == "crun":
        request.getfixturevalue("crun")
    shim = make_shim("sh", "-c", "sleep 0.3; stty size; tty; echo term-ok", terminal=True, binary=binary)
    out = fifo(shim.base / "out")
    shim.call("create", stdio={"stdout": str(shim.base / "out"), "terminal": True})
    shim.call("resize", width=100, height=30)
    assert shim.call("state")["terminal"] is True
    shim.call("start")
    assert shim.call("wait")["exit_status"] == 0
    assert read_all(out).replace(b"\r", b"").split(b"\n")[:3] == [b"30 100", b"/dev/pts/0", b"term-ok"]


def test_terminal_exec_with_input(make_shim: Any) -> None:
    shim = make_shim("sleep", "100")
    shim.call("create", stdio={})
    shim.call("start")
    stdin_path = shim.base / "in"
    os.mkfifo(stdin_path)
    out = fifo(shim.base / "out")
    stdio = {"stdin": str(stdin_path), "stdout": str(shim.base / "out"), "terminal": True}
    shim.call("exec", exec_id="tty", process={"args": ["sh"], **PROCESS}, stdio=stdio)
    shim.call("start", exec_id="tty")
    assert shim.call("resize", width=80, height=24) == {}  # an init without a terminal: a no-op, as containerd
    shim.call("resize", exec_id="tty", width=80, height=24)
    writer = os.open(stdin_path, os.O_WRONLY)
    os.write(writer, b"echo via-$((6 * 7)); exit 6\n")
    os.close(writer)
    assert shim.call("wait", exec_id="tty")["exit_status"] == 6
    assert b"via-42" in read_all(out)


def test_wait_from_two_connections(make_shim: Any) -> None:
    shim = make_shim("sleep", "100")
    shim.call("create", stdio={})
    shim.call("start")
    results: list[Any] = []

    def wait() -> None:
        conn = Conn(shim.socket)
        results.append(conn.call("wait"))
        conn.close()

    waiters = [threading.Thread(target=wait) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.2)
    assert results == []
    shim.call("kill", signal=9)
    for waiter in waiters:
        waiter.join(10)
    assert len(results) == 2 and results[0] == results[1] and results[0]["exit_status"] == 137


def test_delete_before_start(make_shim: Any) -> None:
    shim = make_shim("sleep", "100")
    shim.call("create", stdio={})
    shim.call("start")
    shim.call("exec", exec_id="never", process={"args": ["true"], **PROCESS}, stdio={})
    waiter = Conn(shim.socket)
    waiter.send("wait", exec_id="never")
    time.sleep(0.2)  # the wait is pending in the shim
    assert shim.call("delete", exec_id="never") == {"exit_status": 0, "exited_at": "", "pid": 0}
    assert waiter.line() == {"result": {"exit_status": 0, "exited_at": ""}}
    waiter.close()
    shim.call("kill", signal=9)
    shim.call("wait")
    shim.call("delete")

    unstarted = make_shim("sleep", "100")
    pid = unstarted.call("create", stdio={})["pid"]
    assert unstarted.call("delete")["pid"] == pid
    with pytest.raises(CallError) as gone:
        unstarted.call("state")
    assert gone.value.code == "NotFound"
    assert not Path(f"/proc/{pid}").exists()


def test_exit_record_survives_the_shim(make_shim: Any) -> None:
    shim = make_shim("sh", "-c", "exit 9")
    shim.call("create", stdio={})
    shim.call("start")
    answer = shim.call("wait")
    os.kill(shim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while shim.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    record = json.loads((shim.bundle / "exits" / "init.json").read_text())
    assert record == {**answer, "pid": record["pid"]} and record["exit_status"] == 9


@pytest.mark.parametrize("binary", ["runc", "crun"])
def test_command_not_found_names_it(make_shim: Any, binary: str, request: pytest.FixtureRequest) -> None:
    if binary == "crun":
        request.getfixturevalue("crun")
    shim = make_shim("nosuch-command", binary=binary)
    with pytest.raises(CallError) as failed:
        shim.call("create", stdio={})
    assert failed.value.code == "InvalidArgument"
    assert "nosuch-command" in failed.value.message
    with pytest.raises(CallError) as no_task:
        shim.call("state")
    assert no_task.value.code == "NotFound"


def test_crun_drop_in(make_shim: Any, crun: None) -> None:
    shim = make_shim("sh", "-c", "echo crun-hi; sleep 100", binary="crun")
    out = fifo(shim.base / "out")
    shim.call("create", stdio={"stdout": str(shim.base / "out")})
    shim.call("start")
    process = {"args": ["sh", "-c", "exit 4"], **PROCESS}
    shim.call("exec", exec_id="x", process=process, stdio={})
    shim.call("start", exec_id="x")
    assert shim.call("wait", exec_id="x")["exit_status"] == 4
    shim.call("pause")
    shim.call("resume")
    assert shim.call("stats")["pids"]["current"] == 1
    assert [p["exec_id"] for p in shim.call("pids")["pids"]] == [""]
    shim.call("update", resources={"pids": {"limit": 40}})
    assert shim.call("stats")["pids"]["limit"] == 40
    shim.call("kill", signal=9, all=True)
    assert shim.call("wait")["exit_status"] == 137
    assert read_all(out) == b"crun-hi\n"
    shim.call("delete", exec_id="x")
    shim.call("delete")
