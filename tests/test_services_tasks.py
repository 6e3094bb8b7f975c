"""The tasks service (containerd.services.tasks.v1.Tasks).

In-process first: a real gRPC server over the real container and snapshot stores and a small but
working in-memory runtime (:class:`MemoryRuntime`, a full implementation of :mod:`core.runtime`
whose processes are state machines), to pin the service's semantics: lookups, errors, events,
options and conversions. Then against a real containerkitd with the runc runtime, through ``ctr``.
"""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from interop import busybox_image, image_place

from core.api.containerd.cgroups.v2 import metrics_pb2 as cgroups_pb
from core.api.containerd.events import task_pb2 as events_pb
from core.api.containerd.runc.v1 import options_pb2
from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb
from core.api.containerd.services.tasks.v1 import tasks_pb2_grpc as pb_grpc
from core.api.containerd.types import mount_pb2
from core.api.containerd.types.task import task_pb2
from core.config import GrpcConfig
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.metadata import MetadataStore
from core.metadata.containers import Container, ContainerStore
from core.metadata.snapshots import SnapshotMetadata
from core.plugin import PluginRecord, Status
from core.runtime import (
    CreateTaskRequest,
    ExitStatus,
    Metrics,
    ProcessInfo,
    Runtime,
    Stdio,
    Task,
    TaskState,
    TaskStatus,
)
from core.server import new_server
from core.services.tasks import TasksService, runtimes_by_name
from plugins.snapshot_overlay import OverlaySnapshotter

SN = "overlayfs"
DEFAULT = [("containerd-namespace", "default")]
NO_STDIO = Stdio()
SPEC = {"ociVersion": "1.0.2", "process": {"args": ["sh"], "cwd": "/"}, "root": {"path": "rootfs"}}


def ns(name: str) -> list[tuple[str, str]]:
    return [("containerd-namespace", name)]


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


# -- an in-memory runtime ------------------------------------------------------------------------


class _Process:
    def __init__(self, pid: int, stdio: Stdio, exec_id: str | None) -> None:
        self.pid = pid
        self.stdio = stdio
        self.exec_id = exec_id
        self.status = TaskStatus.CREATED
        self.exit: ExitStatus | None = None
        self.exited = threading.Event()
        self.size: tuple[int, int] | None = None
        self.stdin_closed = False


class MemoryTask(Task):
    """A task whose processes are state machines: a signal ends a process with 128 + signal."""

    def __init__(self, runtime: MemoryRuntime, request: CreateTaskRequest) -> None:
        self._runtime = runtime
        self.request = request
        self.processes: dict[str | None, _Process] = {None: _Process(runtime.next_pid(), request.stdio, None)}
        self.resources: list[tuple[Mapping[str, Any], Mapping[str, str] | None]] = []
        self.deleted = False

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def namespace(self) -> str:
        return self.request.namespace

    @property
    def bundle(self) -> str:
        return f"/memory/{self.namespace}/{self.id}"

    def _process(self, exec_id: str | None) -> _Process:
        if self.deleted:
            raise NotFound(f"task {self.id} not found")
        process = self.processes.get(exec_id)
        if process is None:
            raise NotFound(f"process {exec_id} does not exist")
        return process

    def _exit(self, process: _Process, status: int) -> None:
        process.status = TaskStatus.STOPPED
        process.exit = ExitStatus(status, datetime.now(UTC), process.pid)
        process.exited.set()
        event = events_pb.TaskExit(
            container_id=self.id, id=process.exec_id or self.id, pid=process.pid, exit_status=status
        )
        self._runtime.events.publish(self.namespace, "/tasks/exit", event)

    def state(self, exec_id: str | None = None) -> TaskState:
        p = self._process(exec_id)
        status, exited_at = (p.exit.exit_status, p.exit.exited_at) if p.exit else (0, None)
        return TaskState(self.id, p.pid, p.status, status, exited_at, p.stdio, exec_id, self.bundle)

    def start(self, exec_id: str | None = None, *, started: Callable[[int], None] | None = None) -> int:
        process = self._process(exec_id)
        if process.status is not TaskStatus.CREATED:
            raise FailedPrecondition(f"process {exec_id or self.id} is {process.status}, not created")
        if exec_id is not None and self.processes[None].status is not TaskStatus.RUNNING:
            raise FailedPrecondition("the task is not running")
        process.status = TaskStatus.RUNNING
        if started is not None:
            started(process.pid)
        return process.pid

    def delete(self, exec_id: str | None = None) -> ExitStatus:
        process = self._process(exec_id)
        if process.status in (TaskStatus.RUNNING, TaskStatus.PAUSED):
            raise FailedPrecondition(f"cannot delete a running process {exec_id or self.id}")
        if exec_id is None and len(self.processes) > 1:
            raise FailedPrecondition("exec processes remain")
        del self.processes[exec_id]
        if exec_id is None:
            self.deleted = True
            del self._runtime.all[(self.namespace, self.id)]
        return process.exit or ExitStatus(0, datetime.now(UTC), process.pid)

    def kill(self, signal: int, *, all: bool = False, exec_id: str | None = None) -> None:
        process = self._process(exec_id)
        if process.status is TaskStatus.STOPPED:
            raise NotFound("process already finished: not found")
        alive = [p for p in self.processes.values() if p.status is not TaskStatus.STOPPED]
        for victim in alive if all or exec_id is None else [process]:  # the init process takes all with it
            self._exit(victim, 128 + signal)

    def pause(self) -> None:
        if self._process(None).status is not TaskStatus.RUNNING:
            raise FailedPrecondition("the task is not running")
        for process in self.processes.values():
            if process.status is TaskStatus.RUNNING:
                process.status = TaskStatus.PAUSED

    def resume(self) -> None:
        if self._process(None).status is not TaskStatus.PAUSED:
            raise FailedPrecondition("the task is not paused")
        for process in self.processes.values():
            if process.status is TaskStatus.PAUSED:
                process.status = TaskStatus.RUNNING

    def exec(self, exec_id: str, spec: Mapping[str, Any], stdio: Stdio = NO_STDIO) -> None:
        if exec_id in self.processes:
            raise AlreadyExists(f"id {exec_id}: already exists")
        if self._process(None).status is not TaskStatus.RUNNING:
            raise FailedPrecondition("the task is not running")
        if not spec.get("args"):
            raise InvalidArgument("args must not be empty")
        self.processes[exec_id] = _Process(self._runtime.next_pid(), stdio, exec_id)

    def resize_pty(self, width: int, height: int, exec_id: str | None = None) -> None:
        process = self._process(exec_id)
        if not process.stdio.terminal:
            raise FailedPrecondition("the process has no terminal")
        process.size = (width, height)

    def close_io(self, exec_id: str | None = None) -> None:
        self._process(exec_id).stdin_closed = True

    def pids(self) -> list[ProcessInfo]:
        return [
            ProcessInfo(p.pid, p.exec_id)
            for p in self.processes.values()
            if p.status in (TaskStatus.RUNNING, TaskStatus.PAUSED)
        ]

    def wait(self, exec_id: str | None = None, timeout: float | None = None) -> ExitStatus:
        process = self._process(exec_id)
        if not process.exited.wait(timeout):
            raise TimeoutError(f"process {exec_id or self.id} still running")
        assert process.exit is not None
        return process.exit

    def update(self, resources: Mapping[str, Any], annotations: Mapping[str, str] | None = None) -> None:
        if self._process(None).status is TaskStatus.STOPPED:
            raise FailedPrecondition("the task has stopped")
        self.resources.append((resources, annotations))

    def stats(self) -> Metrics:
        if self._process(None).status is TaskStatus.STOPPED:
            raise FailedPrecondition("the task has stopped")
        data = {
            "pids": {"current": len(self.pids()), "limit": 0},
            "cpu": {"usage_usec": 1500, "user_usec": 1000, "system_usec": 500},
            "memory": {"usage": 4096, "usage_limit": 1 << 30, "anon": 1024},
        }
        return Metrics(self.id, datetime.now(UTC), data)


class MemoryRuntime(Runtime):
    """Tasks in memory, per namespace; ``created`` keeps every request, ``restored`` counts restores."""

    _pids = itertools.count(1000)

    def __init__(self, events: Any) -> None:
        self.events = events
        self.all: dict[tuple[str, str], MemoryTask] = {}
        self.created: list[CreateTaskRequest] = []
        self.restored = 0

    def next_pid(self) -> int:
        return next(self._pids)

    def create(self, request: CreateTaskRequest) -> Task:
        if (request.namespace, request.id) in self.all:
            raise AlreadyExists(f"task {request.id}: already exists")
        unknown = set(request.options) - {"binary_name", "root"}
        if unknown:
            raise InvalidArgument(f"unsupported runc options: {', '.join(sorted(unknown))}")
        self.created.append(request)
        task = self.all[(request.namespace, request.id)] = MemoryTask(self, request)
        return task

    def get(self, namespace: str, id: str) -> Task:
        try:
            return self.all[(namespace, id)]
        except KeyError:
            raise NotFound(f"task {id} not found") from None

    def tasks(self, namespace: str | None = None) -> list[Task]:
        return [t for (n, _), t in sorted(self.all.items()) if namespace in (None, n)]

    def restore(self) -> list[Task]:
        self.restored += 1
        return self.tasks()


# -- the service in-process ----------------------------------------------------------------------


class Recorder:
    """Stands in for the event exchange."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    def publish(self, namespace: str, topic: str, event: Any) -> None:
        self.events.append((namespace, topic, event))

    def topics(self) -> list[str]:
        return [topic for _, topic, _ in self.events]


class Served:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.store = MetadataStore(directory / "meta.db")
        self.backend = OverlaySnapshotter(directory / "overlay")
        self.snapshots = SnapshotMetadata(self.store, {SN: self.backend})
        self.containers = ContainerStore(self.store)
        self.recorder = Recorder()
        self.runtime = MemoryRuntime(self.recorder)
        self.other = MemoryRuntime(self.recorder)
        runtimes = {"runc": self.runtime, "io.containerd.runc.v2": self.runtime, "other": self.other}
        self.service = TasksService(self.containers, self.snapshots, runtimes, self.recorder)
        self.server = new_server(GrpcConfig())
        self.service.register(self.server)
        self.server.add_insecure_port(f"unix:{directory / 'sock'}")
        self.server.start()
        self.channel = grpc.insecure_channel(f"unix:{directory / 'sock'}")
        self.stub = pb_grpc.TasksStub(self.channel)

    def container(self, id: str, namespace: str = "default", **fields: Any) -> Container:
        fields.setdefault("runtime_name", "io.containerd.runc.v2")
        return self.containers.create(namespace, Container(id, spec=SPEC, **fields))

    def running(self, id: str, namespace: str = "default", **fields: Any) -> None:
        """Container ``id`` with a started task."""
        self.container(id, namespace, **fields)
        self.stub.Create(pb.CreateTaskRequest(container_id=id), metadata=ns(namespace))
        self.stub.Start(pb.StartRequest(container_id=id), metadata=ns(namespace))

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()
        self.backend.close()
        self.store.close()


@pytest.fixture
def served() -> Iterator[Served]:
    directory = Path(tempfile.mkdtemp(prefix="ck-tk-", dir="/tmp"))  # short: unix socket paths are limited
    served = Served(directory)
    try:
        yield served
    finally:
        served.close()
        shutil.rmtree(directory, ignore_errors=True)


def runc_options(**fields: Any) -> any_pb2.Any:
    return any_pb2.Any(type_url="containerd.runc.v1.Options", value=options_pb2.Options(**fields).SerializeToString())


def json_any(value: Any, type_url: str = "types.containerd.io/opencontainers/runtime-spec/1/Process") -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=json.dumps(value).encode())


def test_create_start_kill_wait_delete_with_the_events_containerd_publishes(served: Served) -> None:
    stub, recorder = served.stub, served.recorder
    mounts = served.snapshots.prepare("default", SN, "c1-snap")
    served.container("c1", snapshotter=SN, snapshot_key="c1-snap")

    created = stub.Create(
        pb.CreateTaskRequest(container_id="c1", stdout="/tmp/out", stderr="/tmp/err"), metadata=DEFAULT
    )
    request = served.runtime.created[-1]
    assert (request.namespace, request.id, dict(request.spec)) == ("default", "c1", SPEC)
    assert list(request.rootfs) == mounts  # the container's snapshot, as the request brought none
    assert request.stdio == Stdio("", "/tmp/out", "/tmp/err", False) and request.options == {}
    assert created.container_id == "c1" and created.pid > 0
    process = stub.Get(pb.GetRequest(container_id="c1"), metadata=DEFAULT).process
    assert (process.id, process.pid, process.status, process.stdout) == (
        "c1",
        created.pid,
        task_pb2.CREATED,
        "/tmp/out",
    )

    started = stub.Start(pb.StartRequest(container_id="c1"), metadata=DEFAULT)
    assert started.pid == created.pid
    assert stub.Get(pb.GetRequest(container_id="c1"), metadata=DEFAULT).process.status == task_pb2.RUNNING
    assert code_of(lambda: stub.Delete(pb.DeleteTaskRequest(container_id="c1"), metadata=DEFAULT))[0] == (
        grpc.StatusCode.FAILED_PRECONDITION
    )

    stub.Kill(pb.KillRequest(container_id="c1", signal=signal.SIGTERM), metadata=DEFAULT)
    waited = stub.Wait(pb.WaitRequest(container_id="c1"), metadata=DEFAULT)
    assert waited.exit_status == 128 + signal.SIGTERM and waited.exited_at.seconds > 0
    assert code_of(lambda: stub.Kill(pb.KillRequest(container_id="c1", signal=9), metadata=DEFAULT)) == (
        grpc.StatusCode.NOT_FOUND,
        "process already finished: not found",
    )
    stopped = stub.Get(pb.GetRequest(container_id="c1"), metadata=DEFAULT).process
    assert (stopped.status, stopped.exit_status) == (task_pb2.STOPPED, 143)

    deleted = stub.Delete(pb.DeleteTaskRequest(container_id="c1"), metadata=DEFAULT)
    assert (deleted.pid, deleted.exit_status, deleted.exited_at) == (created.pid, 143, waited.exited_at)
    assert code_of(lambda: stub.Get(pb.GetRequest(container_id="c1"), metadata=DEFAULT)) == (
        grpc.StatusCode.NOT_FOUND,
        "task c1 not found",
    )

    assert recorder.topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    (_, _, create), (_, _, start), _, (_, _, delete) = recorder.events
    assert create == events_pb.TaskCreate(
        container_id="c1",
        bundle="/memory/default/c1",
        rootfs=[mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts],
        io=events_pb.TaskIO(stdout="/tmp/out", stderr="/tmp/err"),
        pid=created.pid,
    )
    assert start == events_pb.TaskStart(container_id="c1", pid=created.pid)
    assert delete == events_pb.TaskDelete(
        container_id="c1", pid=created.pid, exit_status=143, exited_at=waited.exited_at
    )
    assert {namespace for namespace, _, _ in recorder.events} == {"default"}


def test_create_takes_rootfs_stdio_terminal_and_runc_options_from_the_request(served: Served) -> None:
    served.container("c1", runtime_options=("containerd.runc.v1.Options", b""), snapshotter=SN, snapshot_key="gone")
    rootfs = [mount_pb2.Mount(type="bind", source="/srv/root", options=["rbind", "ro"])]
    served.stub.Create(
        pb.CreateTaskRequest(
            container_id="c1",
            rootfs=rootfs,
            stdin="/f/in",
            stdout="/f/out",
            terminal=True,
            options=runc_options(binary_name="crun", root="/run/crun"),
        ),
        metadata=DEFAULT,
    )
    request = served.runtime.created[-1]
    assert [(m.type, m.source, m.options) for m in request.rootfs] == [("bind", "/srv/root", ("rbind", "ro"))]
    assert request.stdio == Stdio("/f/in", "/f/out", "", True)
    assert request.options == {"binary_name": "crun", "root": "/run/crun"}


def test_create_falls_back_to_the_containers_runtime_options(served: Served) -> None:
    options = ("containerd.runc.v1.Options", options_pb2.Options(binary_name="crun").SerializeToString())
    served.container("c1", runtime_options=options)
    served.stub.Create(pb.CreateTaskRequest(container_id="c1"), metadata=DEFAULT)
    assert served.runtime.created[-1].options == {"binary_name": "crun"}
    assert served.runtime.created[-1].rootfs == ()  # no snapshot, no rootfs: the spec's root.path as it is


@pytest.mark.parametrize(
    ("fields", "request_fields", "code", "message"),
    [
        ({}, {"container_id": "nosuch"}, "NOT_FOUND", 'container "nosuch" in namespace "default": not found'),
        (
            {"runtime_name": "io.containerd.kata.v2"},
            {},
            "NOT_FOUND",
            'unknown runtime "io.containerd.kata.v2": no runtime plugin has that id or alias'
            " (loaded: io.containerd.runc.v2, other, runc)",
        ),
        ({"snapshotter": SN, "snapshot_key": "nosuch"}, {}, "NOT_FOUND", "snapshot nosuch does not exist: not found"),
        (
            {},
            {"options": any_pb2.Any(type_url="runtimeoptions.v1.Options")},
            "INVALID_ARGUMENT",
            "unsupported runtime options type 'runtimeoptions.v1.Options' (expected containerd.runc.v1.Options)",
        ),
        (
            {},
            {"options": runc_options(systemd_cgroup=True)},
            "INVALID_ARGUMENT",
            "unsupported runc options: systemd_cgroup",
        ),
        (
            {},
            {"checkpoint": {"digest": "sha256:" + "0" * 64}},
            "UNIMPLEMENTED",
            "restoring a task from a checkpoint is not supported",
        ),
    ],
    ids=["no-container", "unknown-runtime", "missing-snapshot", "options-type", "runtime-refuses", "checkpoint"],
)
def test_create_errors(
    served: Served, fields: dict[str, Any], request_fields: dict[str, Any], code: str, message: str
) -> None:
    served.container("c1", **fields)
    request = pb.CreateTaskRequest(**{"container_id": "c1", **request_fields})
    assert code_of(lambda: served.stub.Create(request, metadata=DEFAULT)) == (getattr(grpc.StatusCode, code), message)
    assert served.runtime.created == [] and served.recorder.events == []


def test_a_second_task_for_a_container_already_exists(served: Served) -> None:
    served.running("c1")
    assert code_of(lambda: served.stub.Create(pb.CreateTaskRequest(container_id="c1"), metadata=DEFAULT)) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "task c1: already exists",
    )


def test_tasks_are_per_namespace_and_listed_across_runtimes(served: Served) -> None:
    stub = served.stub
    served.running("a")
    served.running("b", runtime_name="other")
    served.running("a", namespace="team")
    listed = stub.List(pb.ListTasksRequest(), metadata=DEFAULT).tasks
    assert sorted((t.id, t.status) for t in listed) == [("a", task_pb2.RUNNING), ("b", task_pb2.RUNNING)]
    assert [t.id for t in stub.List(pb.ListTasksRequest(filter="id==b"), metadata=DEFAULT).tasks] == ["b"]
    assert [t.id for t in stub.List(pb.ListTasksRequest(), metadata=ns("team")).tasks] == ["a"]
    assert stub.List(pb.ListTasksRequest(), metadata=ns("empty")).tasks == []

    stub.Kill(pb.KillRequest(container_id="a", signal=9), metadata=ns("team"))
    assert stub.Get(pb.GetRequest(container_id="a"), metadata=DEFAULT).process.status == task_pb2.RUNNING
    assert code_of(lambda: stub.Get(pb.GetRequest(container_id="b"), metadata=ns("team")))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    served.containers.create("team", Container("b", runtime_name="other", spec=SPEC))
    assert code_of(lambda: stub.Get(pb.GetRequest(container_id="b"), metadata=ns("team"))) == (
        grpc.StatusCode.NOT_FOUND,
        "task b not found",
    )


def test_exec_processes_start_wait_and_delete_with_their_events(served: Served) -> None:
    stub, recorder = served.stub, served.recorder
    served.running("c1")
    recorder.events.clear()
    spec = {"args": ["ls"], "cwd": "/", "terminal": True}
    exec_request = pb.ExecProcessRequest(
        container_id="c1", exec_id="e1", spec=json_any(spec), stdout="/f/e1", terminal=True
    )
    stub.Exec(exec_request, metadata=DEFAULT)
    task = served.runtime.all[("default", "c1")]
    assert task.processes["e1"].stdio == Stdio("", "/f/e1", "", True)
    assert code_of(lambda: stub.Exec(exec_request, metadata=DEFAULT)) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "id e1: already exists",
    )
    for bad, message in [
        (pb.ExecProcessRequest(container_id="c1", spec=json_any(spec)), "exec id cannot be empty"),
        (pb.ExecProcessRequest(container_id="c1", exec_id="e2"), "exec process spec is required"),
        (
            pb.ExecProcessRequest(container_id="c1", exec_id="e2", spec=any_pb2.Any(value=b"{no")),
            "exec process spec: invalid JSON: Expecting property name enclosed in double quotes:"
            " line 1 column 2 (char 1)",
        ),
        (
            pb.ExecProcessRequest(container_id="c1", exec_id="e2", spec=json_any(["ls"])),
            "exec process spec: expected a JSON object, got list",
        ),
    ]:
        assert code_of(lambda bad=bad: stub.Exec(bad, metadata=DEFAULT)) == (grpc.StatusCode.INVALID_ARGUMENT, message)

    started = stub.Start(pb.StartRequest(container_id="c1", exec_id="e1"), metadata=DEFAULT)
    process = stub.Get(pb.GetRequest(container_id="c1", exec_id="e1"), metadata=DEFAULT).process
    assert (process.container_id, process.id, process.pid, process.terminal) == ("c1", "e1", started.pid, True)
    stub.ResizePty(pb.ResizePtyRequest(container_id="c1", exec_id="e1", width=120, height=40), metadata=DEFAULT)
    assert task.processes["e1"].size == (120, 40)
    no_terminal = pb.ResizePtyRequest(container_id="c1", width=1, height=1)
    assert code_of(lambda: stub.ResizePty(no_terminal, metadata=DEFAULT)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the process has no terminal",
    )
    stub.CloseIO(pb.CloseIORequest(container_id="c1", exec_id="e1"), metadata=DEFAULT)
    assert not task.processes["e1"].stdin_closed  # only when asked to close stdin
    stub.CloseIO(pb.CloseIORequest(container_id="c1", exec_id="e1", stdin=True), metadata=DEFAULT)
    assert task.processes["e1"].stdin_closed

    pids = stub.ListPids(pb.ListPidsRequest(container_id="c1"), metadata=DEFAULT).processes
    init_pid = task.processes[None].pid
    assert [p.pid for p in pids] == [init_pid, started.pid] and not pids[0].HasField("info")
    assert pids[1].info.type_url == "containerd.runc.v1.ProcessDetails"
    assert options_pb2.ProcessDetails.FromString(pids[1].info.value).exec_id == "e1"

    delete_e1 = pb.DeleteProcessRequest(container_id="c1", exec_id="e1")
    assert code_of(lambda: stub.DeleteProcess(delete_e1, metadata=DEFAULT))[0] == grpc.StatusCode.FAILED_PRECONDITION
    stub.Kill(pb.KillRequest(container_id="c1", exec_id="e1", signal=9), metadata=DEFAULT)
    assert stub.Wait(pb.WaitRequest(container_id="c1", exec_id="e1"), metadata=DEFAULT).exit_status == 137
    deleted = stub.DeleteProcess(delete_e1, metadata=DEFAULT)
    assert (deleted.id, deleted.pid, deleted.exit_status) == ("e1", started.pid, 137)
    assert code_of(lambda: stub.DeleteProcess(pb.DeleteProcessRequest(container_id="c1"), metadata=DEFAULT))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(lambda: stub.Get(pb.GetRequest(container_id="c1", exec_id="e1"), metadata=DEFAULT)) == (
        grpc.StatusCode.NOT_FOUND,
        "process e1 does not exist",
    )
    assert stub.Get(pb.GetRequest(container_id="c1"), metadata=DEFAULT).process.status == task_pb2.RUNNING

    assert recorder.topics() == ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]
    assert recorder.events[0][2] == events_pb.TaskExecAdded(container_id="c1", exec_id="e1")
    assert recorder.events[1][2] == events_pb.TaskExecStarted(container_id="c1", exec_id="e1", pid=started.pid)


def test_pause_and_resume_publish_and_show_in_the_status(served: Served) -> None:
    stub, recorder = served.stub, served.recorder
    served.running("c1")
    stub.Pause(pb.PauseTaskRequest(container_id="c1"), metadata=DEFAULT)
    assert stub.Get(pb.GetRequest(container_id="c1"), metadata=DEFAULT).process.status == task_pb2.PAUSED
    assert code_of(lambda: stub.Pause(pb.PauseTaskRequest(container_id="c1"), metadata=DEFAULT))[0] == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    stub.Resume(pb.ResumeTaskRequest(container_id="c1"), metadata=DEFAULT)
    assert stub.Get(pb.GetRequest(container_id="c1"), metadata=DEFAULT).process.status == task_pb2.RUNNING
    assert recorder.topics()[-2:] == ["/tasks/paused", "/tasks/resumed"]
    assert recorder.events[-2][2] == events_pb.TaskPaused(container_id="c1")
    assert recorder.events[-1][2] == events_pb.TaskResumed(container_id="c1")


def test_update_passes_the_resources_json_and_checkpoint_is_not_implemented(served: Served) -> None:
    stub = served.stub
    served.running("c1")
    resources = {"memory": {"limit": 1 << 26}, "cpu": {"shares": 512}}
    request = pb.UpdateTaskRequest(
        container_id="c1",
        resources=json_any(resources, "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"),
        annotations={"a": "b"},
    )
    stub.Update(request, metadata=DEFAULT)
    assert served.runtime.all[("default", "c1")].resources == [(resources, {"a": "b"})]
    assert code_of(lambda: stub.Update(pb.UpdateTaskRequest(container_id="c1"), metadata=DEFAULT)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "resources are required to update a task",
    )
    assert code_of(lambda: stub.Checkpoint(pb.CheckpointTaskRequest(container_id="c1"), metadata=DEFAULT)) == (
        grpc.StatusCode.UNIMPLEMENTED,
        "checkpoint is not supported by containerkitd",
    )
    assert code_of(lambda: stub.Checkpoint(pb.CheckpointTaskRequest(container_id="x"), metadata=DEFAULT))[0] == (
        grpc.StatusCode.NOT_FOUND
    )


def test_metrics_are_cgroups_v2_metrics_of_the_running_tasks_matching_the_filters(served: Served) -> None:
    stub = served.stub
    served.running("a")
    served.running("b")
    served.running("stopped")
    stub.Kill(pb.KillRequest(container_id="stopped", signal=9), metadata=DEFAULT)
    metrics = stub.Metrics(pb.MetricsRequest(), metadata=DEFAULT).metrics
    assert [m.id for m in metrics] == ["a", "b"]  # a stopped task has no sample
    assert metrics[0].data.type_url == "io.containerd.cgroups.v2.Metrics"
    data = cgroups_pb.Metrics.FromString(metrics[0].data.value)
    assert (data.pids.current, data.cpu.usage_usec, data.cpu.user_usec) == (1, 1500, 1000)
    assert (data.memory.usage, data.memory.usage_limit, data.memory.anon) == (4096, 1 << 30, 1024)
    assert abs(metrics[0].timestamp.seconds - time.time()) < 60
    assert [m.id for m in stub.Metrics(pb.MetricsRequest(filters=["id==b"]), metadata=DEFAULT).metrics] == ["b"]
    assert stub.Metrics(pb.MetricsRequest(), metadata=ns("team")).metrics == []
    assert code_of(lambda: stub.Metrics(pb.MetricsRequest(filters=["id=="]), metadata=DEFAULT))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


def test_wait_blocks_until_the_exit_and_ends_when_the_daemon_stops(served: Served, monkeypatch: Any) -> None:
    monkeypatch.setattr("core.services.tasks.WAIT_POLL", 0.05)
    stub = served.stub
    served.running("c1")
    served.running("c2")
    waiting = stub.Wait.future(pb.WaitRequest(container_id="c1"), metadata=DEFAULT)
    time.sleep(0.2)
    assert not waiting.done()
    stub.Kill(pb.KillRequest(container_id="c1", signal=signal.SIGKILL), metadata=DEFAULT)
    assert waiting.result(timeout=5).exit_status == 137

    pending = stub.Wait.future(pb.WaitRequest(container_id="c2"), metadata=DEFAULT)
    time.sleep(0.2)
    served.service.stopping()
    with pytest.raises(grpc.RpcError) as info:
        pending.result(timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_runtimes_are_found_by_id_and_alias_and_each_restored_once(served: Served) -> None:
    runc, other = served.runtime, served.other
    aliases = {"aliases": "io.containerd.runc.v2, io.containerd.runc.v1"}
    records = [
        PluginRecord("runtime", "runc", Status.OK, exports=aliases, instance=runc),
        PluginRecord("runtime", "other", Status.OK, instance=other),
        PluginRecord("runtime", "broken", Status.ERROR, reason="broken on purpose"),
        PluginRecord("snapshotter", "overlayfs", Status.OK, instance=served.backend),
    ]
    names = runtimes_by_name(records)
    assert names == {"runc": runc, "io.containerd.runc.v2": runc, "io.containerd.runc.v1": runc, "other": other}
    service = TasksService(served.containers, served.snapshots, names, served.recorder)
    assert service.runtimes == {"runc": runc, "other": other}
    service.restore()
    assert (runc.restored, other.restored) == (1, 1)


# -- against a real containerkitd with the runc runtime ------------------------------------------

needs_tools = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("ctr", "docker-registry", "skopeo", "runc")),
    reason="needs Debian's ctr, runc, docker-registry and skopeo",
)


@pytest.fixture(scope="module")
def busybox(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox image's reference in the interop registry."""
    return busybox_image(registry, tmp_path_factory.mktemp("busybox"))


@pytest.fixture
def place(containerkitd: Any, busybox: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """busybox pulled into a namespace of the test's own in the module's containerkitd."""
    with image_place(containerkitd, busybox, request.node.name.removeprefix("test_").replace("_", "-")) as place:
        yield place


@pytest.mark.integration
@needs_tools
def test_real_task_from_the_containers_snapshot_over_the_wire(place: Any, containerkitd: Any) -> None:
    place.ctr("containers", "create", place.image, "w1", "--", "sh", "-c", "echo hello from w1; exec sleep 300")
    out = containerkitd.dir / "w1.out"
    metadata = ns(place.namespace)
    with grpc.insecure_channel(f"unix:{containerkitd.address}") as channel:
        stub = pb_grpc.TasksStub(channel)
        created = stub.Create(pb.CreateTaskRequest(container_id="w1", stdout=str(out)), metadata=metadata)
        assert stub.Start(pb.StartRequest(container_id="w1"), metadata=metadata).pid == created.pid
        process = stub.Get(pb.GetRequest(container_id="w1"), metadata=metadata).process
        assert (process.status, process.pid, process.stdout) == (task_pb2.RUNNING, created.pid, str(out))
        deadline = time.monotonic() + 10
        while "hello" not in (out.read_text() if out.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert out.read_text() == "hello from w1\n"
        assert created.pid in [
            p.pid for p in stub.ListPids(pb.ListPidsRequest(container_id="w1"), metadata=metadata).processes
        ]

        spec = {"args": ["sh", "-c", "exit 3"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}}
        stub.Exec(pb.ExecProcessRequest(container_id="w1", exec_id="e1", spec=json_any(spec)), metadata=metadata)
        stub.Start(pb.StartRequest(container_id="w1", exec_id="e1"), metadata=metadata)
        assert stub.Wait(pb.WaitRequest(container_id="w1", exec_id="e1"), metadata=metadata).exit_status == 3
        assert (
            stub.DeleteProcess(pb.DeleteProcessRequest(container_id="w1", exec_id="e1"), metadata=metadata).exit_status
            == 3
        )

        limit = json_any(
            {"memory": {"limit": 64 << 20}}, "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
        )
        stub.Update(pb.UpdateTaskRequest(container_id="w1", resources=limit), metadata=metadata)
        (metric,) = stub.Metrics(pb.MetricsRequest(filters=["id==w1"]), metadata=metadata).metrics
        data = cgroups_pb.Metrics.FromString(metric.data.value)
        assert metric.data.type_url == "io.containerd.cgroups.v2.Metrics"
        assert data.pids.current >= 1 and data.memory.usage > 0 and data.memory.usage_limit == 64 << 20

        assert code_of(lambda: stub.Delete(pb.DeleteTaskRequest(container_id="w1"), metadata=metadata))[0] == (
            grpc.StatusCode.FAILED_PRECONDITION
        )
        stub.Kill(pb.KillRequest(container_id="w1", signal=signal.SIGKILL), metadata=metadata)
        assert stub.Wait(pb.WaitRequest(container_id="w1"), metadata=metadata).exit_status == 137
        assert stub.Delete(pb.DeleteTaskRequest(container_id="w1"), metadata=metadata).exit_status == 137
        assert stub.List(pb.ListTasksRequest(), metadata=metadata).tasks == []


@pytest.mark.integration
@needs_tools
def test_ctr_names_an_unknown_runtime(place: Any) -> None:
    place.ctr("containers", "create", "--runtime", "io.containerd.nosuch.v1", place.image, "u1", "true")
    started = place.ctr("tasks", "start", "u1", check=False)
    assert started.returncode != 0
    assert 'unknown runtime "io.containerd.nosuch.v1": no runtime plugin has that id or alias' in started.stderr
    assert place.tasks() == {}


@pytest.mark.integration
@needs_tools
def test_tasks_come_back_after_a_daemon_restart(make_daemon: Any, busybox: str) -> None:
    daemon = make_daemon()
    with image_place(daemon, busybox, "restart") as place:
        place.ctr("run", "-d", place.image, "r1", "sleep", "300")
        pid, status = place.tasks()["r1"]
        assert status == "RUNNING"
        daemon.restart()
        assert place.tasks() == {"r1": (pid, "RUNNING")}
        assert "restored 1 task(s) of runtime runc" in daemon.log
        assert place.ctr("tasks", "exec", "--exec-id", "e1", "r1", "echo", "still here").stdout == "still here\n"
        place.ctr("tasks", "kill", "-s", "SIGKILL", "r1")
        place.wait_status("r1", "STOPPED")
        place.ctr("tasks", "rm", "r1")
        assert place.tasks() == {}


@pytest.mark.integration
@needs_tools
def test_ctr_checkpoint_is_not_supported_and_leaves_the_task_running(place: Any) -> None:
    place.ctr("run", "-d", place.image, "k1", "sleep", "300")
    checkpoint = place.ctr("tasks", "checkpoint", "k1", check=False)
    assert checkpoint.returncode != 0 and "checkpoint is not supported by containerkitd" in checkpoint.stderr
    assert place.tasks()["k1"][1] == "RUNNING"
