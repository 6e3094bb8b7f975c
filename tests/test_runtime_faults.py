"""Faults and bad input around containers and tasks, through Debian's ``ctr`` (and gRPC where ctr cannot send
the input): a daemon killed with containers running, a shim killed, requests that must fail cleanly, and
hundreds of runs that must leave nothing behind.

containerkitd is the subject; where ctr prints the daemon's own error, containerd 1.6 (same image, same
commands) is the reference the message must match. Every container made is removed afterwards; a test that
kills a daemon or a shim SIGKILLs by pid whatever of its own might still run and unmounts what is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, field_mask_pb2
from interop import (
    Daemon,
    Place,
    _daemons,
    busybox_image,
    ctr,
    image_place,
    kill_leftovers,
    namespace_for,
    processes_naming,
)

from core.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from core.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from core.metadata.containers import SPEC_TYPE_URL

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ctr", "containerd", "docker-registry", "skopeo", "runc")),
        reason="needs Debian's containerd (ctr), runc, docker-registry and skopeo",
    ),
]

RUNNING = 20
CYCLES = 200
FD_SLACK = 8  # descriptors the daemon may hold more or fewer at any moment (gRPC's, the log's); a leak is per run
GONE_TIMEOUT_S = 30.0
UNRUNNABLE_ERROR = "runc create failed: args must not be empty: invalid argument"
UNRUNNABLE_SPEC = json.dumps({"ociVersion": "1.0.2", "process": {"cwd": "/", "args": []}, "root": {"path": "rootfs"}})


@pytest.fixture(scope="module")
def busybox(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox image's reference in the interop registry."""
    return busybox_image(registry, tmp_path_factory.mktemp("busybox"))


@pytest.fixture
def own(make_daemon: Any) -> Iterator[Any]:
    """A containerkitd of the test's own; afterwards every process started under its directory (shims and
    their containers) is SIGKILLed by pid and whatever is still mounted there unmounted."""
    daemon = make_daemon()
    yield daemon
    daemon.stop()
    kill_leftovers(daemon.dir)


def running(pid: int) -> bool:
    """True while the host process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float = GONE_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still running after {timeout}s")
        time.sleep(0.02)


def last_line(text: str) -> str:
    """The ``ctr: ...`` line that ends ctr's stderr (the lines before carry logrus times)."""
    return text.strip().splitlines()[-1] if text.strip() else ""


def grpc_stubs(daemon: Daemon) -> tuple[grpc.Channel, Any, Any]:
    """(channel, Containers stub, Tasks stub) on the daemon's socket; the caller closes the channel."""
    channel = grpc.insecure_channel(f"unix:{daemon.address}")
    return channel, containers_pb2_grpc.ContainersStub(channel), tasks_pb2_grpc.TasksStub(channel)


def ns_metadata(namespace: str) -> tuple[tuple[str, str]]:
    return (("containerd-namespace", namespace),)


def bundle_of(daemon: Any, namespace: str, task: str) -> Path:
    """The task's bundle directory (the one holding ``shim.pid``) under the daemon's state."""
    [shim_pid] = daemon.state.rglob(f"{namespace}/{task}/shim.pid")
    return shim_pid.parent


# -- the daemon killed -------------------------------------------------------------------------------------


def test_daemon_killed_with_20_running_restores_them(own: Any, busybox: str) -> None:
    """kill -9 of containerkitd with 20 containers running; one exits (code 7) while it is down. After the
    restart all others are RUNNING with the same pids, exec works in them, kill and a Wait already waiting
    work, and the one that exited meanwhile is STOPPED with its real exit status."""
    with image_place(own, busybox, namespace_for("test_daemon_killed", "faults")) as place:
        for n in range(RUNNING - 1):
            place.ctr("run", "-d", busybox, f"r{n}", "sleep", "1000")
        place.ctr("run", "-d", busybox, "leaver", "sh", "-c", "trap 'exit 7' TERM; sleep 1000 & wait")
        before = place.tasks()
        assert len(before) == RUNNING and {status for _, status in before.values()} == {"RUNNING"}
        assert own.stop(signal.SIGKILL) == -signal.SIGKILL
        os.kill(before["leaver"][0], signal.SIGTERM)
        wait_gone(before["leaver"][0])
        own.start()
        after = place.tasks()
        assert after.pop("leaver") == (before["leaver"][0], "STOPPED")
        assert after == {task: (pid, "RUNNING") for task, (pid, _) in before.items() if task != "leaver"}
        assert "task leaver exit with non-zero exit code 7" in place.ctr("tasks", "rm", "leaver").stderr
        executed = place.ctr("tasks", "exec", "--exec-id", "after", "r0", "sh", "-c", "echo alive; exit 3", check=False)
        assert (executed.returncode, executed.stdout) == (3, "alive\n")
        channel, _, tasks = grpc_stubs(own)
        with channel, ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(tasks.Wait, tasks_pb2.WaitRequest(container_id="r1"), timeout=GONE_TIMEOUT_S,
                                  metadata=ns_metadata(place.namespace))  # fmt: skip
            place.ctr("tasks", "kill", "-s", "SIGKILL", "r1")
            assert waiting.result().exit_status == 128 + signal.SIGKILL
        assert place.tasks()["r1"] == (before["r1"][0], "STOPPED")
        assert not running(before["r1"][0])


def test_daemon_restarted_keeps_its_tasks(own: Any, busybox: str) -> None:
    """A clean stop (SIGTERM) and start of containerkitd leaves running tasks running and managed: same pids,
    exec works, and a task stopped after the restart reports its exit status."""
    with image_place(own, busybox, namespace_for("test_daemon_restarted", "faults")) as place:
        place.ctr("run", "-d", busybox, "kept", "sleep", "1000")
        place.ctr("run", "-d", busybox, "ended", "sh", "-c", "trap 'exit 5' TERM; sleep 1000 & wait")
        before = place.tasks()
        own.restart()
        assert place.tasks() == before
        assert place.ctr("tasks", "exec", "--exec-id", "after", "kept", "echo", "still").stdout == "still\n"
        place.ctr("tasks", "kill", "ended")
        place.wait_status("ended", "STOPPED")
        assert "task ended exit with non-zero exit code 5" in place.ctr("tasks", "rm", "ended").stderr


# -- a shim killed -----------------------------------------------------------------------------------------


def test_shim_killed_task_stops_and_can_be_removed(own: Any, busybox: str) -> None:
    """SIGKILL of a task's shim: the task turns STOPPED (nothing hangs: every ctr call returns), ``tasks rm``
    and ``containers rm`` work, and nothing of the container is left running or mounted."""
    with image_place(own, busybox, namespace_for("test_shim_killed", "faults")) as place:
        place.ctr("run", "-d", busybox, "orphan", "sleep", "1000")
        place.ctr("run", "-d", busybox, "neighbour", "sleep", "1000")
        pid = place.tasks()["orphan"][0]
        bundle = bundle_of(own, place.namespace, "orphan")
        shim = int((bundle / "shim.pid").read_text())
        assert pid in _daemons.process_tree(shim)
        os.kill(shim, signal.SIGKILL)
        place.wait_status("orphan", "STOPPED")
        assert place.tasks()["neighbour"][1] == "RUNNING"
        place.ctr("tasks", "rm", "orphan")
        place.ctr("containers", "rm", "orphan")
        wait_gone(pid)
        assert not bundle.exists()
        assert [point for point in _daemons.mount_points() if point.startswith(str(bundle))] == []
        assert place.ctr("containers", "ls", "-q").stdout.split() == ["neighbour"]


# -- bad input: the same answer as containerd --------------------------------------------------------------


@pytest.fixture
def places(request: pytest.FixtureRequest, busybox: str, containerkitd: Any, containerd: Any) -> Iterator[list[Place]]:
    """[containerkitd's, containerd's] namespaces named after the test, one per daemon (containers of the same
    namespace and id would share a cgroup), busybox pulled in each."""
    name = request.node.originalname
    with (
        image_place(containerkitd, busybox, namespace_for(name, "ours")) as ours,
        image_place(containerd, busybox, namespace_for(name, "theirs")) as theirs,
    ):
        yield [ours, theirs]


def each(places: list[Place], *args: str) -> list[tuple[int, str, str]]:
    """(exit code, stdout, last line of stderr) of ``ctr ARGS`` in each place."""
    results = [place.ctr(*args, check=False) for place in places]
    return [(result.returncode, result.stdout, last_line(result.stderr)) for result in results]


def assert_same(places: list[Place], *args: str) -> tuple[int, str, str]:
    """``ctr ARGS`` answers the same in both daemons; returns that answer."""
    ours, theirs = each(places, *args)
    assert ours == theirs, f"ctr {' '.join(args)}\n  ours:   {ours}\n  theirs: {theirs}"
    return ours


def test_duplicate_container_id(places: list[Place]) -> None:
    """A second ``ctr run`` with an id in use fails on its snapshot (ctr prepares it first), as containerd;
    the container record itself refuses a duplicate id with AlreadyExists ``container "ID": already exists``."""
    for place in places:
        place.ctr("run", "-d", place.image, "dup", "sleep", "1000")
    assert assert_same(places, "run", "-d", places[0].image, "dup", "true") == (
        1, "", 'ctr: snapshot "dup": already exists',
    )  # fmt: skip
    answers = []
    for place in places:
        channel, containers, _ = grpc_stubs(place.daemon)
        with channel:
            existing = containers.Get(
                containers_pb2.GetContainerRequest(id="dup"), metadata=ns_metadata(place.namespace)
            )
            with pytest.raises(grpc.RpcError) as failure:
                containers.Create(containers_pb2.CreateContainerRequest(container=existing.container),
                                  metadata=ns_metadata(place.namespace))  # fmt: skip
        answers.append((failure.value.code(), failure.value.details()))
    assert answers[0] == answers[1] == (grpc.StatusCode.ALREADY_EXISTS, 'container "dup": already exists')


def test_duplicate_exec_id(places: list[Place]) -> None:
    """A second exec with an exec id in use: ``id ID: already exists``; the first one keeps running."""
    for place in places:
        place.ctr("run", "-d", place.image, "execs", "sleep", "1000")
        place.ctr("tasks", "exec", "-d", "--exec-id", "twice", "execs", "sleep", "1000")
    assert assert_same(places, "tasks", "exec", "-d", "--exec-id", "twice", "execs", "true") == (
        1, "", "ctr: id twice: already exists",
    )  # fmt: skip
    for place in places:
        assert len(place.ctr("tasks", "ps", "execs").stdout.splitlines()) == 3


def test_kill_of_a_stopped_task(places: list[Place]) -> None:
    """``ctr tasks kill`` of a task that exited: ``process already finished: not found``."""
    for place in places:
        place.ctr("run", "-d", place.image, "done", "true")
        place.wait_status("done", "STOPPED")
    assert assert_same(places, "tasks", "kill", "done") == (1, "", "ctr: process already finished: not found")


def test_delete_of_a_running_task(places: list[Place]) -> None:
    """``ctr tasks rm`` of a running task is FailedPrecondition, and ``ctr containers rm`` refuses while its
    task runs; the task keeps running."""
    for place in places:
        place.ctr("run", "-d", place.image, "busy", "sleep", "1000")
    assert assert_same(places, "tasks", "rm", "busy") == (
        1, "", "ctr: task must be stopped before deletion: running: failed precondition",
    )  # fmt: skip
    code, _, message = assert_same(places, "containers", "rm", "busy")
    assert code == 1 and message.startswith("ctr: cannot delete a non stopped container: {running 0 ")
    for place in places:
        assert place.tasks()["busy"][1] == "RUNNING"


def test_missing_snapshot(places: list[Place]) -> None:
    """A container whose snapshot was removed cannot start: ``snapshot ID does not exist: not found``."""
    for place in places:
        place.ctr("containers", "create", place.image, "bare", "true")
        place.ctr("snapshots", "rm", "bare")
    assert assert_same(places, "tasks", "start", "bare") == (1, "", "ctr: snapshot bare does not exist: not found")
    for place in places:
        assert place.tasks() == {}


def test_command_not_found(places: list[Place]) -> None:
    """A command the image does not have: the error names it (runc's words), nothing is left of the run."""
    for place in places:
        result = place.ctr("run", "--rm", place.image, "missing", "nosuchcmd", check=False)
        assert result.returncode == 1
        assert 'exec: "nosuchcmd": executable file not found in $PATH' in result.stderr
        assert place.ctr("containers", "ls", "-q").stdout == "" and place.tasks() == {}


def test_unknown_runtime(places: list[Place]) -> None:
    """``ctr run --runtime io.containerd.nosuch.v1``: the error names the runtime; nothing is left of the run."""
    for place in places:
        result = place.ctr("run", "--rm", "--runtime", "io.containerd.nosuch.v1", place.image, "alien", "true",
                           check=False)  # fmt: skip
        assert result.returncode == 1 and "io.containerd.nosuch.v1" in last_line(result.stderr)
        assert place.ctr("containers", "ls", "-q").stdout == "" and place.tasks() == {}


# -- bad input: containerkitd's own checks -----------------------------------------------------------------


def test_invalid_spec_json(containerkitd: Any, busybox: str) -> None:
    """A container whose spec is not JSON is refused at Containers.Create (InvalidArgument; containerd stores
    the bytes unread and fails only at the task); one whose spec is JSON but not a runnable OCI spec
    fails at task create with nothing left behind (no task, bundle, mount or shim)."""
    with image_place(containerkitd, busybox, namespace_for("test_invalid_spec_json", "faults")) as place:
        channel, containers, _ = grpc_stubs(containerkitd)
        with channel:
            container = containers_pb2.Container(
                id="garbled", image=busybox, runtime=containers_pb2.Container.Runtime(name="io.containerd.runc.v2"),
                spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=b'{"ociVersion": "1.0.2", "process": '),
            )  # fmt: skip
            with pytest.raises(grpc.RpcError) as failure:
                containers.Create(containers_pb2.CreateContainerRequest(container=container),
                                  metadata=ns_metadata(place.namespace))  # fmt: skip
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not valid JSON" in failure.value.details()
            place.ctr("containers", "create", busybox, "unrunnable", "true")
            container = containers_pb2.Container(
                id="unrunnable", spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=UNRUNNABLE_SPEC.encode())
            )  # fmt: skip
            containers.Update(containers_pb2.UpdateContainerRequest(
                container=container, update_mask=field_mask_pb2.FieldMask(paths=["spec"])),
                metadata=ns_metadata(place.namespace))  # fmt: skip
        result = place.ctr("tasks", "start", "unrunnable", check=False)
        assert result.returncode == 1 and last_line(result.stderr) == f"ctr: {UNRUNNABLE_ERROR}", result.stderr
        assert place.tasks() == {}
        assert list(containerkitd.state.rglob(f"{place.namespace}/unrunnable")) == []
        assert processes_naming(f"/{place.namespace}/unrunnable") == []


# -- nothing leaks -----------------------------------------------------------------------------------------


def footprint(daemon: Any, namespace: str) -> dict[str, Any]:
    """What runs would leak: mounts under the daemon's dirs, shim processes, bundle dirs of the namespace,
    the namespace's cgroups (every hierarchy) and snapshots, and the daemon's open file descriptors."""
    cgroups = sorted(str(path) for path in Path("/sys/fs/cgroup").glob(f"*/{namespace}/*") if path.is_dir())
    return {
        "mounts": [point for point in _daemons.mount_points() if point.startswith(str(daemon.dir))],
        "shims": [pid for pid in processes_naming(str(daemon.state)) if pid != daemon.process.pid],
        "bundles": sorted(str(path) for path in daemon.state.rglob(f"{namespace}/*")),
        "cgroups": cgroups,
        "snapshots": ctr(daemon, "snapshots", "ls", namespace=namespace).stdout.splitlines(),
        "fds": len(os.listdir(f"/proc/{daemon.process.pid}/fd")),
    }


def test_200_runs_leak_nothing(own: Any, busybox: str) -> None:
    """200 ``ctr run --rm`` (create, start, wait, delete each) leave no mount, shim, bundle dir or cgroup,
    and the daemon holds as many file descriptors as after the first few."""
    with image_place(own, busybox, namespace_for("test_200_runs", "faults")) as place:
        for n in range(5):  # warm up: connections, pools and caches the daemon keeps
            place.ctr("run", "--rm", busybox, f"warm{n}", "true")
        before = footprint(own, place.namespace)
        for n in range(CYCLES):
            result = place.ctr("run", "--rm", busybox, f"c{n}", "sh", "-c", f"exit {n % 3}", check=False)
            assert result.returncode == n % 3, result.stderr
        after = footprint(own, place.namespace)
        assert abs(after.pop("fds") - before.pop("fds")) <= FD_SLACK, (before, after)
        assert after == before
        assert (after["shims"], after["bundles"], after["cgroups"]) == ([], [], [])
        assert place.ctr("containers", "ls", "-q").stdout == "" and place.tasks() == {}
