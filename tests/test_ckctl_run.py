"""ckctl run and ckctl tasks against a real containerkitd running runc.

Two images built from tests/oci_images.busybox_layer are pushed to the interop registry and pulled
with ``ctr images pull --plain-http`` into each test's own namespace: ``busybox`` (``PATH=/bin``,
``Cmd /bin/sh``) and ``app`` (user ``app`` of the image's /etc/passwd, working dir /home/app,
entrypoint ``sh -c``). Every container a test leaves is removed afterwards with its task and
snapshot, and the test checks that ``run --rm`` itself left nothing.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CKCTL, RunningDaemon
from interop import remove_namespace_dirs
from oci_images import Layer, Layout, busybox_layer

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("ctr", "runc", "docker-registry", "skopeo")),
    reason="needs runc, Debian's ctr, docker-registry and skopeo",
)

TIMEOUT = 60.0
APP_PASSWD = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
APP_GROUP = b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n"


@pytest.fixture(scope="module")
def images(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{"busybox": REF, "app": REF} in the interop registry."""
    layout = Layout(tmp_path_factory.mktemp("run-images") / "layout")
    base = busybox_layer()
    layout.add_image("busybox", [base])
    app = Layer().dirs("home", "home/app").file("etc/passwd", APP_PASSWD).file("etc/group", APP_GROUP)
    config = {"Env": ["PATH=/bin", "FROM_IMAGE=yes"], "User": "app", "WorkingDir": "/home/app"}
    layout.add_image("app", [base, app], config={**config, "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["id"]})
    return {tag: registry.push(layout.directory, tag, "ckctl-run/images") for tag in ("busybox", "app")}


class Place:
    """One test's namespace on the shared daemon, with both images pulled; ``ckctl`` runs in it."""

    def __init__(self, daemon: RunningDaemon, namespace: str, images: dict[str, str]) -> None:
        self.daemon, self.namespace, self.images = daemon, namespace, images
        for ref in images.values():
            daemon.ctr("images", "pull", "--plain-http", ref, namespace=namespace)

    @property
    def busybox(self) -> str:
        return self.images["busybox"]

    @property
    def app(self) -> str:
        return self.images["app"]

    def ckctl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.argv, *args], capture_output=True, text=True, timeout=TIMEOUT, input=input or ""
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"ckctl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    @property
    def argv(self) -> list[str]:
        return [*CKCTL, "-a", self.daemon.address, "-n", self.namespace]

    def json(self, *args: str) -> Any:
        return json.loads(self.ckctl(*args, "--json").stdout)

    def containers(self) -> list[str]:
        return self.ckctl("containers", "ls", "-q").stdout.split()

    def tasks(self) -> dict[str, dict[str, Any]]:
        return {task["id"]: task for task in self.json("tasks", "ls")}

    def active_snapshots(self) -> list[str]:
        return [s["name"] for s in self.json("snapshots", "ls") if s["kind"] != "committed"]

    def wait_status(self, task: str, status: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.tasks()[task]["status"] != status:
            assert time.monotonic() < deadline, f"task {task} never became {status}: {self.tasks()}"
            time.sleep(0.05)

    def clean(self) -> None:
        for container in self.containers():
            self.ckctl("tasks", "rm", "-f", container, check=False)
            self.ckctl("containers", "rm", container)


@pytest.fixture
def place(request: pytest.FixtureRequest, containerkitd: RunningDaemon, images: dict[str, str]) -> Iterator[Place]:
    namespace = re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower())[:55].strip("-")
    place = Place(containerkitd, f"run-{namespace}", images)
    yield place
    place.clean()
    remove_namespace_dirs(place.namespace)  # runc removes each container's cgroup, not the namespace's


def assert_nothing_left(place: Place) -> None:
    assert place.containers() == []
    assert place.tasks() == {}
    assert place.active_snapshots() == []


def test_run_prints_output_and_passes_the_exit_code(place: Place) -> None:
    result = place.ckctl("run", "--rm", place.busybox, "c1", "sh", "-c", "echo out; echo err >&2; exit 7", check=False)
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "err\n")
    assert_nothing_left(place)


def test_all_output_arrives_before_ckctl_exits(place: Place) -> None:
    result = place.ckctl("run", "--rm", place.busybox, "big", "sh", "-c", "seq 1 200000; seq 1 1000 >&2")
    assert result.stdout.splitlines() == [str(n) for n in range(1, 200001)]
    assert result.stderr.splitlines() == [str(n) for n in range(1, 1001)]


def test_run_without_rm_keeps_the_container_and_snapshot_not_the_task(place: Place) -> None:
    assert place.ckctl("run", place.busybox, "kept", "true").stdout == ""
    assert place.containers() == ["kept"]
    assert place.tasks() == {}
    assert place.active_snapshots() == ["kept"]


def test_stdin_reaches_the_container(place: Place) -> None:
    result = place.ckctl("run", "--rm", place.busybox, "cat", "cat", input="hello\nworld\n")
    assert result.stdout == "hello\nworld\n"


def test_image_config_env_user_and_cwd(place: Place) -> None:
    script = "id; pwd; echo $FROM_IMAGE $GIVEN"
    result = place.ckctl("run", "--rm", "--env", "GIVEN=1", place.app, "app1", script)
    uid, cwd, env = result.stdout.splitlines()
    assert uid.startswith("uid=1000(app) gid=1000(app)") and "50(staff)" in uid
    assert (cwd, env) == ("/home/app", "yes 1")
    overridden = place.ckctl("run", "--rm", "--user", "root", "--cwd", "/tmp", place.app, "app2", "id -u; pwd")
    assert overridden.stdout == "0\n/tmp\n"
    assert place.ckctl("run", "--rm", place.app, "app3").stdout.startswith("uid=1000(app)")  # the image's cmd


def test_bind_mount_read_only(place: Place, tmp_path: Path) -> None:
    (tmp_path / "hello").write_text("from the host\n")
    mount = f"type=bind,src={tmp_path},dst=/data,options=ro"
    script = "cat /data/hello; touch /data/new 2>/dev/null && echo writable || echo read-only"
    result = place.ckctl("run", "--rm", "--mount", mount, place.busybox, "m1", "sh", "-c", script)
    assert result.stdout == "from the host\nread-only\n"
    assert not (tmp_path / "new").exists()


def test_detached_then_tasks_verbs(place: Place) -> None:
    result = place.ckctl("run", "-d", place.busybox, "d1", "sh", "-c", "sleep 1000")
    assert (result.stdout, result.stderr) == ("", "")
    task = place.tasks()["d1"]
    assert task["status"] == "RUNNING" and task["pid"] > 0
    assert place.ckctl("tasks", "ls", "-q").stdout.split() == ["d1"]
    assert place.ckctl("tasks", "ls").stdout.split()[:6] == ["TASK", "PID", "STATUS", "d1", str(task["pid"]), "RUNNING"]
    assert task["pid"] in [p["pid"] for p in place.json("tasks", "ps", "d1")]

    place.ckctl("tasks", "pause", "d1")
    assert place.tasks()["d1"]["status"] == "PAUSED"
    place.ckctl("tasks", "resume", "d1")
    assert place.tasks()["d1"]["status"] == "RUNNING"

    execd = place.ckctl("tasks", "exec", "--exec-id", "e1", "d1", "sh", "-c", "echo in there; exit 3", check=False)
    assert (execd.returncode, execd.stdout) == (3, "in there\n")
    place.ckctl("tasks", "exec", "-d", "--exec-id", "e2", "d1", "sleep", "1000")
    assert "e2" in [p["exec_id"] for p in place.json("tasks", "ps", "d1")]
    place.ckctl("tasks", "kill", "--exec-id", "e2", "-s", "9", "d1")
    place.ckctl("tasks", "rm", "-f", "--exec-id", "e2", "d1")
    assert [p["exec_id"] for p in place.json("tasks", "ps", "d1")] == [""]

    metrics = json.loads(place.ckctl("tasks", "metrics", "--format", "json", "d1").stdout)
    assert metrics["pids"]["current"] >= 1
    assert "pids.current" in place.ckctl("tasks", "metrics", "d1").stdout

    place.ckctl("tasks", "kill", "-s", "KILL", "d1")
    place.wait_status("d1", "STOPPED")
    assert place.ckctl("tasks", "rm", "d1").stdout == "d1\n"
    assert place.tasks() == {}
    place.ckctl("containers", "rm", "d1")
    assert_nothing_left(place)


def test_tasks_rm_force_kills_a_running_task(place: Place) -> None:
    place.ckctl("run", "-d", place.busybox, "f1", "sleep", "1000")
    refused = place.ckctl("tasks", "rm", "f1", check=False)
    assert refused.returncode != 0 and "f1" in refused.stderr
    place.ckctl("tasks", "rm", "-f", "f1")
    assert place.tasks() == {}


@pytest.mark.parametrize("name", ["TERM", "INT"])
def test_signals_are_forwarded_to_the_container(place: Place, name: str) -> None:
    script = f'trap "echo got {name}; exit 42" {name}; echo ready; while true; do sleep 0.05; done'
    proc = subprocess.Popen(
        [*place.argv, "run", "--rm", place.busybox, "s1", "sh", "-c", script],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.Signals[f"SIG{name}"])
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, out, err) == (42, f"got {name}\n".encode(), b"")
    assert_nothing_left(place)


def test_tty_under_a_pty(place: Place, tmp_path: Path) -> None:
    """The container's terminal has ckctl's size from the start and follows it (SIGWINCH), typed input
    reaches it, and ckctl's terminal is itself again afterwards."""
    resized = 'until [ "$(stty size)" = "40 120" ]; do sleep 0.05; done; echo resized'
    script = f"stty size; read line; echo got $line; {resized}; tty"
    pid, master = ckctl_in_pty(place, tmp_path, "run", "--rm", "-t", place.busybox, "t1", "sh", "-c", script)
    try:
        output = _read_until(master, b"33 101", pid)
        os.write(master, b"hello\r")
        output += _read_until(master, b"got hello", pid)
        termios.tcsetwinsize(master, (40, 120))  # the kernel tells ckctl, the foreground process, by SIGWINCH
        output += _read_until(master, None, pid)
        after = termios.tcgetattr(master)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(master)
    text = output.decode(errors="replace").replace("\r", "")
    assert "33 101\n" in text and "got hello\n" in text and "resized\n/dev/pts/" in text
    assert os.waitstatus_to_exitcode(status) == 0
    assert after == _fresh_terminal_modes()  # raw mode undone
    assert_nothing_left(place)


def test_exec_with_a_tty(place: Place, tmp_path: Path) -> None:
    place.ckctl("run", "-d", place.busybox, "x1", "sleep", "1000")
    command = ("tasks", "exec", "-t", "--exec-id", "sh", "x1", "sh", "-c", "stty size; tty")
    pid, master = ckctl_in_pty(place, tmp_path, *command)
    try:
        output = _read_until(master, None, pid)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(master)
    assert output.replace(b"\r", b"").startswith(b"33 101\n/dev/pts/")
    assert os.waitstatus_to_exitcode(status) == 0
    place.ckctl("tasks", "exec", "--exec-id", "sh", "x1", "true")  # the id is free again: the process was deleted


def ckctl_in_pty(place: Place, tmp_path: Path, *args: str) -> tuple[int, int]:
    """``ckctl ARGS`` started with a new 33x101 pty as its terminal; its pid and the pty's master side. Its
    FIFOs go under ``tmp_path``, should it be killed."""
    pid, master = pty.fork()
    if pid == 0:
        try:
            termios.tcsetwinsize(0, (33, 101))
            os.environ["TMPDIR"] = str(tmp_path)
            os.execv(CKCTL[0], [*place.argv, *args])
        finally:
            os._exit(127)
    return pid, master


def _fresh_terminal_modes() -> list[Any]:
    """The termios modes a new pty starts with (as pty.fork's was before ckctl made it raw)."""
    master, slave = os.openpty()
    try:
        return termios.tcgetattr(slave)
    finally:
        os.close(master)
        os.close(slave)


def _read_until(master: int, wanted: bytes | None, pid: int) -> bytes:
    """What the terminal shows until ``wanted`` appears (None: until the other side hangs up)."""
    data = b""
    deadline = time.monotonic() + TIMEOUT
    while wanted is None or wanted not in data:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"terminal showed only {data!r}")
        if not select.select([master], [], [], 0.5)[0]:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every slave fd closed
            break
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("{busybox}", "nf", "nosuch-command"), "nosuch-command"),
        (("--user", "mallory", "{busybox}", "nu", "id"), "unable to find user 'mallory'"),
        (("--mount", "type=volume,src=../v,dst=/v", "{busybox}", "nv", "true"), 'volume name "../v" must match'),
        (("-d", "--rm", "{busybox}", "dr", "true"), "cannot be used together"),
        (("docker.io/library/missing:latest", "ni", "true"), "not found"),
    ],
    ids=["command-not-found", "unknown-user", "volume", "rm-and-detach", "unknown-image"],
)
def test_errors_are_one_clear_line_and_leave_nothing(place: Place, args: tuple[str, ...], message: str) -> None:
    result = place.ckctl("run", "--rm", *(arg.format(busybox=place.busybox) for arg in args), check=False)
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.startswith("ckctl: ") and result.stderr.count("\n") == 1 and message in result.stderr
    assert_nothing_left(place)
