"""Debian's ``ctr`` running containers through containerkitd, with containerd 1.6 as the reference.

The busybox image (tests/oci_images.py) is pushed to a real docker-registry on 127.0.0.1 and pulled with
``ctr images pull --plain-http`` into each daemon, one namespace per test. Most tests run once per daemon
(``[containerkitd]`` and ``[containerd]``: the same assertions hold for both); the others compare the two.
Every container a test makes is removed afterwards with its task and snapshot (tests/interop.py).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from interop import CTR, Daemon, Place, busybox_image, ctr_pty, image_place, kill_leftovers, namespace_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ctr", "containerd", "docker-registry", "skopeo", "runc")),
        reason="needs Debian's containerd (ctr), runc, docker-registry and skopeo",
    ),
]

SUBJECTS = ("containerkitd", "containerd")
RUNTIME = "io.containerd.runc.v2"
EVENT_LINE = re.compile(r"^(?P<time>.+?) (?P<namespace>\S+) (?P<topic>/\S+) (?P<event>.*)$")
EVENTS_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def busybox(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox image's reference in the interop registry."""
    return busybox_image(registry, tmp_path_factory.mktemp("busybox"))


@pytest.fixture(params=SUBJECTS)
def place(request: pytest.FixtureRequest, busybox: str) -> Iterator[Place]:
    """Each daemon in turn, with busybox pulled into the test's own namespace."""
    namespace = namespace_for(request.node.originalname, request.param)
    with image_place(request.getfixturevalue(request.param), busybox, namespace) as place:
        yield place


@pytest.fixture
def places(request: pytest.FixtureRequest, busybox: str, containerkitd: Any, containerd: Any) -> Iterator[list[Place]]:
    """[containerkitd's, containerd's] places with the same namespace, for the tests that compare outputs (they
    start no task: containers of the same namespace and id would share a cgroup)."""
    namespace = namespace_for(request.node.originalname)
    with image_place(containerkitd, busybox, namespace) as ours, image_place(containerd, busybox, namespace) as theirs:
        yield [ours, theirs]


def cmdline(pid: int) -> list[str]:
    """The host process's argv (empty once it is gone or a zombie)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]
    except OSError:
        return []


def ps(place: Place, task: str) -> dict[int, str]:
    """``ctr tasks ps TASK`` as {pid: INFO}."""
    header, *rows = (line.split(None, 1) for line in place.ctr("tasks", "ps", task).stdout.splitlines())
    assert header == ["PID", "INFO"]
    return {int(row[0]): row[1].strip() for row in rows}


def snapshot_keys(place: Place) -> list[str]:
    return [line.split()[0] for line in place.ctr("snapshots", "ls").stdout.splitlines()[1:]]


# -- run ---------------------------------------------------------------------------------------------------


def test_run_rm_prints_output_and_passes_exit_code(place: Place) -> None:
    """``ctr run --rm``: the container's stdout and stderr on ctr's, its exit code as ctr's; then nothing of
    it is left (container, task, snapshot)."""
    result = place.ctr("run", "--rm", place.image, "hello", "sh", "-c", "echo out; echo err >&2; exit 3", check=False)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert place.ctr("containers", "ls", "-q").stdout == ""
    assert place.tasks() == {}
    assert "hello" not in snapshot_keys(place)


def test_run_rm_process_defaults(place: Place) -> None:
    """The image's Env, user root, cwd ``/``; the hostname is the host's (ctr's spec sets none, as containerd's
    default spec)."""
    result = place.ctr("run", "--rm", place.image, "env", "sh", "-c", 'echo "$PATH $(id -u) $(hostname) $PWD"')
    assert result.stdout == f"/bin 0 {os.uname().nodename} /\n"


def test_run_detached_is_listed_running(place: Place) -> None:
    """``ctr run -d`` prints nothing and leaves the task RUNNING: listed by ``tasks ls`` with the pid of the
    host process, by ``containers ls`` with its image and runtime, and ``tasks ps`` shows that pid."""
    result = place.ctr("run", "-d", place.image, "detached", "sleep", "1000")
    assert (result.stdout, result.stderr) == ("", "")
    pid, status = place.tasks()["detached"]
    assert status == "RUNNING" and cmdline(pid) == ["sleep", "1000"]
    rows = [line.split() for line in place.ctr("containers", "ls").stdout.splitlines()]
    assert rows == [["CONTAINER", "IMAGE", "RUNTIME"], ["detached", place.image, RUNTIME]]
    assert ps(place, "detached") == {pid: "-"}


def test_run_tty_under_a_pty(place: Place) -> None:
    """``ctr run -t`` from a terminal: the container's stdio is a pty with TERM=xterm, its exit code is ctr's.
    The process lingers a moment before it exits: under load, real containerd once lost all the output of one
    that exited at once (the reference side of this test, in CI)."""
    run = ctr_pty(place.daemon, "run", "-t", "--rm", place.image, "tty", "sh", "-c",
                  "tty; echo $TERM; sleep 0.2; exit 5", namespace=place.namespace)  # fmt: skip
    assert run.returncode == 5
    assert run.output.replace(b"\r", b"").splitlines() == [b"/dev/pts/0", b"xterm"]


def test_run_tty_interactive_shell(place: Place) -> None:
    """What is typed on the terminal reaches the container's shell; ``exit 4`` ends the run with code 4."""
    run = ctr_pty(place.daemon, "run", "-t", "--rm", place.image, "shell", "sh", namespace=place.namespace,
                  typed=b"echo ty''ped; exit 4\n")  # fmt: skip
    assert run.returncode == 4
    assert b"typed" in run.output.replace(b"\r", b"").splitlines()


# -- tasks -------------------------------------------------------------------------------------------------


def test_tasks_exec(place: Place) -> None:
    """``ctr tasks exec``: output and exit code of the process; ``-d`` leaves it running, listed by
    ``tasks ps`` under its exec id."""
    place.ctr("run", "-d", place.image, "execs", "sleep", "1000")
    result = place.ctr("tasks", "exec", "--exec-id", "once", "execs", "sh", "-c", "echo exec; exit 4", check=False)
    assert (result.returncode, result.stdout, result.stderr) == (4, "exec\n", "")
    place.ctr("tasks", "exec", "-d", "--exec-id", "bg", "execs", "sleep", "100")
    processes = ps(place, "execs")
    init = place.tasks()["execs"][0]
    assert processes.pop(init) == "-"
    [(pid, info)] = processes.items()
    assert "ExecID:bg" in info and cmdline(pid) == ["sleep", "100"]


def test_tasks_exec_tty_under_a_pty(place: Place) -> None:
    """``ctr tasks exec -t`` from a 40x100 terminal: the exec process gets a pty of its own, which ctr sizes
    as its terminal; its exit code is ctr's. (It waits for the size: containerd too refuses to resize an exec
    process that has already exited, and ctr would print that.)"""
    place.ctr("run", "-d", place.image, "host", "sleep", "1000")
    script = 'until [ "$(stty size 2>/dev/null)" = "40 100" ]; do sleep 0.05; done; tty; exit 6'
    run = ctr_pty(place.daemon, "tasks", "exec", "-t", "--exec-id", "term", "host", "sh", "-c", script,
                  namespace=place.namespace, rows=40, columns=100, timeout=60)  # fmt: skip
    assert run.returncode == 6
    assert run.output.replace(b"\r", b"").splitlines() == [b"/dev/pts/0"]


def test_tasks_pause_resume(place: Place) -> None:
    """``ctr tasks pause`` freezes the task (PAUSED), ``ctr tasks resume`` thaws it (RUNNING)."""
    place.ctr("run", "-d", place.image, "pausing", "sleep", "1000")
    place.ctr("tasks", "pause", "pausing")
    assert place.tasks()["pausing"][1] == "PAUSED"
    place.ctr("tasks", "resume", "pausing")
    assert place.tasks()["pausing"][1] == "RUNNING"


def test_tasks_metrics(place: Place) -> None:
    """``ctr tasks metrics``: a table naming the task, then the cgroup's figures; pids.current is the number
    of processes ``tasks ps`` lists."""
    place.ctr("run", "-d", place.image, "measured", "sleep", "1000")
    place.ctr("tasks", "exec", "-d", "--exec-id", "second", "measured", "sleep", "1000")
    lines = [line.split() for line in place.ctr("tasks", "metrics", "measured").stdout.splitlines() if line.strip()]
    assert lines[0] == ["ID", "TIMESTAMP"] and lines[1][0] == "measured"
    assert lines[2] == ["METRIC", "VALUE"]
    values = {line[0]: line[1] for line in lines[3:]}
    assert int(values["pids.current"]) == len(ps(place, "measured")) == 2
    assert any(int(values.get(name, 0)) > 0 for name in ("memory.usage", "memory.usage_in_bytes"))
    as_json = json.loads(place.ctr("tasks", "metrics", "--format", "json", "measured").stdout)
    assert as_json["pids"]["current"] == 2


def test_tasks_kill_then_rm(place: Place) -> None:
    """``ctr tasks kill`` sends SIGTERM (trapped: exit 9), the task turns STOPPED, ``tasks rm`` warns of the exit
    code and removes the task; the container stays until ``containers rm``, which takes its snapshot too."""
    place.ctr("run", "-d", place.image, "killed", "sh", "-c", "trap 'exit 9' TERM; sleep 1000 & wait")
    place.ctr("tasks", "kill", "killed")
    place.wait_status("killed", "STOPPED")
    result = place.ctr("tasks", "rm", "killed")
    assert "task killed exit with non-zero exit code 9" in result.stderr
    assert place.tasks() == {}
    assert place.ctr("containers", "ls", "-q").stdout.split() == ["killed"]
    place.ctr("containers", "rm", "killed")
    assert place.ctr("containers", "ls", "-q").stdout == ""
    assert "killed" not in snapshot_keys(place)


def test_tasks_kill_all_with_sigkill(place: Place) -> None:
    """``ctr tasks kill -a -s SIGKILL``: every process of the task dies, the init's status is 128 + 9."""
    place.ctr("run", "-d", place.image, "everyone", "sleep", "1000")
    place.ctr("tasks", "exec", "-d", "--exec-id", "other", "everyone", "sleep", "1000")
    pids = list(ps(place, "everyone"))
    place.ctr("tasks", "kill", "-a", "-s", "SIGKILL", "everyone")
    place.wait_status("everyone", "STOPPED")
    assert "exit with non-zero exit code 137" in place.ctr("tasks", "rm", "everyone").stderr
    assert [pid for pid in pids if cmdline(pid)] == []


# -- containers --------------------------------------------------------------------------------------------


def test_containers_info_equals_containerds(places: list[Place]) -> None:
    """``ctr containers info``: the same record from both daemons (the spec ctr made, runtime, image,
    snapshot key and snapshotter, labels), times aside; ``containers rm`` of a container without a task."""
    infos = []
    for place in places:
        place.ctr("containers", "create", "--label", "purpose=info", place.image, "described", "sleep", "1")
        info = json.loads(place.ctr("containers", "info", "described").stdout)
        assert info.pop("CreatedAt") and info.pop("UpdatedAt")
        infos.append(info)
        place.ctr("containers", "rm", "described")
        assert place.ctr("containers", "ls", "-q").stdout == ""
    ours, theirs = infos
    assert ours == theirs


# -- events ------------------------------------------------------------------------------------------------


class EventLog:
    """``ctr events`` running in the background (its own process); :meth:`until` reads what it printed."""

    def __init__(self, daemon: Daemon) -> None:
        self.process = subprocess.Popen([CTR, "-a", str(daemon.address), "events"], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)  # fmt: skip
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def events(self, namespace: str) -> list[tuple[str, dict[str, Any]]]:
        """(topic, event) of every line printed for ``namespace`` so far."""
        with self.changed:
            matches = [EVENT_LINE.match(line) for line in self.lines]
        return [(m["topic"], json.loads(m["event"] or "{}")) for m in matches if m and m["namespace"] == namespace]

    def until(self, namespace: str, topic: str, timeout: float = EVENTS_TIMEOUT_S) -> list[tuple[str, dict[str, Any]]]:
        """The events of ``namespace`` once one with ``topic`` came (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while topic not in (t for t, _ in self.events(namespace)):
                if not self.changed.wait(deadline - time.monotonic()) and time.monotonic() > deadline:
                    raise AssertionError(f"no {topic} event within {timeout}s; printed: {self.lines}")
        return self.events(namespace)

    def subscribed(self, place: Place) -> None:
        """Return once the subscription is live: label the namespace until ``/namespaces/update`` shows."""
        deadline = time.monotonic() + EVENTS_TIMEOUT_S
        for attempt in itertools.count():
            place.ctr("namespaces", "label", place.namespace, f"probe={attempt}")
            try:
                self.until(place.namespace, "/namespaces/update", timeout=0.2)
                return
            except AssertionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise

    def close(self) -> None:
        """SIGTERM by pid."""
        self.process.terminate()
        self.process.wait(10)
        self.reader.join(10)


@contextmanager
def event_log(daemon: Daemon) -> Iterator[EventLog]:
    log = EventLog(daemon)
    try:
        yield log
    finally:
        log.close()


def test_events_show_the_lifecycle_of_a_run(place: Place) -> None:
    """``ctr events`` in another process sees a ``ctr run --rm`` as containerd reports one: container create,
    task create, start, exit (with the exit status), task delete, container delete."""
    with event_log(place.daemon) as log:
        log.subscribed(place)
        place.ctr("run", "--rm", place.image, "watched", "sh", "-c", "exit 3", check=False)
        events = [(t, e) for t, e in log.until(place.namespace, "/containers/delete") if t.split("/")[1] in
                  ("containers", "tasks")]  # fmt: skip
    assert [topic for topic, _ in events] == [
        "/containers/create", "/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete", "/containers/delete",
    ]  # fmt: skip
    by_topic = dict(events)
    assert by_topic["/containers/create"]["id"] == "watched"
    assert by_topic["/containers/create"]["runtime"]["name"] == RUNTIME
    pid = by_topic["/tasks/start"]["pid"]
    assert by_topic["/tasks/create"]["pid"] == pid and by_topic["/tasks/create"]["container_id"] == "watched"
    exit_event = by_topic["/tasks/exit"]
    assert {key: exit_event.get(key) for key in ("container_id", "id", "pid", "exit_status")} == {
        "container_id": "watched", "id": "watched", "pid": pid, "exit_status": 3,
    }  # fmt: skip
    assert by_topic["/tasks/delete"]["exit_status"] == 3 and by_topic["/tasks/delete"]["pid"] == pid
    assert by_topic["/containers/delete"] == {"id": "watched"}


def test_events_of_exec_pause_resume_and_kill(place: Place) -> None:
    """The task events of a detached container's life: an exec (added, started, its exit under its exec id),
    pause, resume, a SIGKILL (exit 137), the task's delete, in that order, as containerd publishes them."""
    place.ctr("run", "-d", place.image, "lived", "sleep", "1000")
    with event_log(place.daemon) as log:
        log.subscribed(place)
        place.ctr("tasks", "exec", "--exec-id", "probe", "lived", "sh", "-c", "exit 2", check=False)
        place.ctr("tasks", "pause", "lived")
        place.ctr("tasks", "resume", "lived")
        place.ctr("tasks", "kill", "-s", "SIGKILL", "lived")
        place.wait_status("lived", "STOPPED")
        place.ctr("tasks", "rm", "lived")
        events = [(t, e) for t, e in log.until(place.namespace, "/tasks/delete") if t.startswith("/tasks/")]
    assert [(topic, event.get("exec_id") or event.get("id"), event.get("exit_status")) for topic, event in events] == [
        ("/tasks/exec-added", "probe", None),
        ("/tasks/exec-started", "probe", None),
        ("/tasks/exit", "probe", 2),
        ("/tasks/paused", None, None),
        ("/tasks/resumed", None, None),
        ("/tasks/exit", "lived", 137),
        ("/tasks/delete", None, 137),
    ]
    assert {event["container_id"] for _, event in events} == {"lived"}


# -- crun --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("crun") is None, reason="needs Debian's crun")
def test_crun_as_a_drop_in(make_daemon: Any, busybox: str) -> None:
    """``[plugins.runtime.runc] binary = "crun"``: ctr runs containers the same way, and crun (its state file
    ``status``, which runc does not write) is what holds them, exec included. (On this host's hybrid cgroups,
    v1 controllers plus one on the v2 hierarchy, crun alone refuses to run anything: the shim hides the v2
    hierarchy from it.)"""
    daemon = make_daemon('[plugins.runtime.runc]\nbinary = "crun"\n')
    try:
        with image_place(daemon, busybox, namespace_for("test_crun_as_a_drop_in")) as place:
            result = place.ctr("run", "--rm", busybox, "once", "sh", "-c", "echo crun; exit 6", check=False)
            assert (result.returncode, result.stdout, result.stderr) == (6, "crun\n", "")
            place.ctr("run", "-d", busybox, "held", "sleep", "1000")
            pid, status = place.tasks()["held"]
            assert status == "RUNNING"
            [root] = {path.parent.parent for path in daemon.state.rglob("held/status")}
            state = json.loads(subprocess.run(["crun", "--root", str(root), "state", "held"], check=True,
                                              capture_output=True, text=True).stdout)  # fmt: skip
            assert (state["status"], state["pid"]) == ("running", pid)
            executed = place.ctr("tasks", "exec", "--exec-id", "e", "held", "sh", "-c", "echo in; exit 2", check=False)
            assert (executed.returncode, executed.stdout) == (2, "in\n")
    finally:
        daemon.stop()
        kill_leftovers(daemon.dir)
