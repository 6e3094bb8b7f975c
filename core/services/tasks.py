"""containerd.services.tasks.v1.Tasks over the ``runtime`` plugins: the running side of containers.

A task belongs to a container of the request's namespace and is run by the runtime the container
names: a runtime plugin's id or one of the comma-separated ``aliases`` it exports (``runc`` answers
to ``io.containerd.runc.v2``). Create takes the container's spec and, unless the request brings
rootfs mounts (``ctr`` does), the mounts of the container's snapshot; runtime options come from the
request, else from the container (``containerd.runc.v1.Options``).

As containerd's shims do, the service publishes ``/tasks/create``, ``/tasks/start``,
``/tasks/delete`` (init process), ``/tasks/exec-added``, ``/tasks/exec-started``, ``/tasks/paused``
and ``/tasks/resumed``; ``/tasks/exit`` and ``/tasks/oom`` are the runtime's to publish. Errors are
containerd's: NotFound for a missing container or task, AlreadyExists for a second task or exec id,
FailedPrecondition for a process in the wrong state (deleting a running one), NotImplemented for
Checkpoint.

When the service starts it calls ``restore()`` once on every runtime, so the tasks left running by a
previous daemon are managed again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import grpc
import pluggy

from core import filters
from core.crashpoints import crashpoint
from core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotImplementedByPlugin,
    Unavailable,
)
from core.plugin import InitContext, PluginRecord, Registration, Status
from core.runtime import CreateTaskRequest, ExitStatus, Metrics, Runtime, Stdio, Task, TaskState
from core.server import namespace_of
from core.services._convert import mounts_of, timestamp
from core.services.snapshots import mounts_pb
from core.types import Mount

if TYPE_CHECKING:
    from core.metadata.containers import Container, ContainerStore
    from core.metadata.snapshots import SnapshotMetadata

log = logging.getLogger("containerkit.services.tasks")

RUNC_OPTIONS = "containerd.runc.v1.Options"
"""The type of the runtime options ``ctr`` sends for runc (io.containerd.runc.v2)."""
PROCESS_DETAILS = "containerd.runc.v1.ProcessDetails"
"""The type of ListPids' ``info``: the exec process a pid is the main process of."""
WAIT_POLL = 1.0
"""Seconds between the checks a Wait makes that its caller is still there and the daemon not stopping."""


def runtimes_by_name(records: Iterable[PluginRecord]) -> dict[str, Runtime]:
    """Every ``ok`` runtime plugin by its id and by each of its exported ``aliases``."""
    names: dict[str, Runtime] = {}
    for record in records:
        if record.type == "runtime" and record.status is Status.OK:
            aliases = (alias.strip() for alias in record.exports.get("aliases", "").split(","))
            for name in (record.id, *aliases):
                if name:
                    names.setdefault(name, cast(Runtime, record.instance))
    return names


def runtime_options(type_url: str, value: bytes) -> dict[str, Any]:
    """The runtime options (the fields set in a ``containerd.runc.v1.Options``) carried by an Any.

    InvalidArgument for any other type or an undecodable value.
    """
    from google.protobuf.message import DecodeError

    from core.api.containerd.runc.v1 import options_pb2

    if type_url.rpartition("/")[2] != RUNC_OPTIONS:
        raise InvalidArgument(f"unsupported runtime options type {type_url!r} (expected {RUNC_OPTIONS})")
    message = options_pb2.Options()
    try:
        message.ParseFromString(value)
    except DecodeError as err:
        raise InvalidArgument(f"invalid {RUNC_OPTIONS}: {err}") from None
    return {field.name: setting for field, setting in message.ListFields()}  # all scalars: str, bool, int


def json_object(any_message: Any, what: str) -> dict[str, Any]:
    """The JSON object an Any carries (how containerd sends OCI specs); InvalidArgument otherwise."""
    if not any_message.value:
        raise InvalidArgument(f"{what} is required")
    try:
        value = json.loads(any_message.value)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgument(f"{what}: invalid JSON: {err}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def process_pb(container_id: str, state: TaskState) -> Any:
    """The ``containerd.v1.types.Process`` of a task's process (``id``: exec id, or the container id)."""
    from core.api.containerd.types.task import task_pb2

    return task_pb2.Process(
        container_id=container_id,
        id=state.exec_id or container_id,
        pid=state.pid,
        status=state.status.value,
        stdin=state.stdio.stdin,
        stdout=state.stdio.stdout,
        stderr=state.stdio.stderr,
        terminal=state.stdio.terminal,
        exit_status=state.exit_status,
        exited_at=timestamp(state.exited_at) if state.exited_at else _go_zero_time(),
    )


def _go_zero_time() -> Any:
    """The ``exited_at`` of a process that has not exited: Go's zero time (0001-01-01T00:00:00Z), which
    containerd sends there and ``ctr`` prints."""
    from google.protobuf import timestamp_pb2

    return timestamp_pb2.Timestamp(seconds=-62135596800)


def metric_pb(metrics: Metrics) -> Any:
    """The ``containerd.types.Metric`` of a task's :class:`Metrics`: ``data`` encoded as the message
    ``type_url`` names (field names as in ``data``; unknown ones ignored)."""
    from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory

    from core.api.containerd.cgroups.v2 import metrics_pb2  # noqa: F401 - registers io.containerd.cgroups.v2
    from core.api.containerd.types import metrics_pb2 as types_pb2

    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(metrics.type_url.rpartition("/")[2])
    except KeyError:
        raise NotImplementedByPlugin(
            f"task {metrics.task_id}: metrics of type {metrics.type_url!r} are unknown"
        ) from None
    data = json_format.ParseDict(
        dict(metrics.data), message_factory.GetMessageClass(descriptor)(), ignore_unknown_fields=True
    )
    return types_pb2.Metric(
        timestamp=timestamp(metrics.timestamp),
        id=metrics.task_id,
        data=any_pb2.Any(type_url=metrics.type_url, value=data.SerializeToString()),
    )


def _exec_id(request: Any) -> str | None:
    """The request's exec id, None for the init process."""
    return request.exec_id or None


def _stdio(request: Any) -> Stdio:
    return Stdio(request.stdin, request.stdout, request.stderr, request.terminal)


class TasksService:
    """The tasks service plugin over ``runtimes`` (each name a container may give, see :func:`runtimes_by_name`),
    the containers of ``containers`` and the snapshots of ``snapshots``; events go to ``events``."""

    def __init__(
        self,
        containers: ContainerStore,
        snapshots: SnapshotMetadata,
        runtimes: Mapping[str, Runtime],
        events: Any,
        hooks: pluggy.PluginManager | None = None,
    ) -> None:
        self._containers = containers
        self._snapshots = snapshots
        self._runtimes = dict(runtimes)
        self._events = events
        self._hooks = hooks
        self._stopping = threading.Event()

    @property
    def runtimes(self) -> dict[str, Runtime]:
        """Each runtime once, by the first name it answers to (its plugin id)."""
        first: dict[int, tuple[str, Runtime]] = {}
        for name, runtime in self._runtimes.items():
            first.setdefault(id(runtime), (name, runtime))
        return dict(first.values())

    def restore(self) -> None:
        """Let every runtime take over the tasks of a previous daemon (once, at start). A runtime that
        fails to restore is logged; its new tasks still work."""
        for name, runtime in self.runtimes.items():
            try:
                restored = runtime.restore()
            except Exception:
                log.exception("restoring the tasks of runtime %s failed", name)
                continue
            log.info("restored %d task(s) of runtime %s", len(restored), name)

    def stopping(self) -> None:
        """The daemon is stopping: pending Waits end (Unavailable) instead of holding the server."""
        self._stopping.set()

    # -- lookups -------------------------------------------------------------------------------

    def runtime(self, name: str) -> Runtime:
        """The runtime a container names; NotFound (``unknown runtime``) when none answers to it."""
        runtime = self._runtimes.get(name)
        if runtime is None:
            loaded = ", ".join(sorted(self._runtimes)) or "none"
            raise NotFound(f'unknown runtime "{name}": no runtime plugin has that id or alias (loaded: {loaded})')
        return runtime

    def task(self, namespace: str, container_id: str) -> Task:
        """The task of container ``container_id``; NotFound for a missing container or task."""
        runtime = self.runtime(self._containers.runtime_name(namespace, container_id))
        try:
            return runtime.get(namespace, container_id)
        except NotFound:
            raise NotFound(f"task {container_id} not found") from None

    def tasks(self, namespace: str, selectors: Sequence[str] = ()) -> Iterator[Task]:
        """The namespace's tasks of every runtime whose ``id`` and ``namespace`` pass ``selectors``
        (containerd's filters; none: all)."""
        selected = filters.parse(list(selectors)) if selectors else filters.match_all
        for runtime in self.runtimes.values():
            for task in runtime.tasks(namespace):
                if selected({"id": task.id, "namespace": namespace}):
                    yield task

    # -- operations (the wire calls, in-process) -----------------------------------------------

    def create(self, namespace: str, request: Any) -> tuple[Task, int]:
        """Create the task of a ``CreateTaskRequest``; return it and its init pid."""
        if request.HasField("checkpoint") and request.checkpoint.digest:
            raise NotImplementedByPlugin("restoring a task from a checkpoint is not supported")
        if request.runtime_path:
            raise InvalidArgument("runtime_path is not supported: choose the runtime in the container")
        container = self._containers.get(namespace, request.container_id)
        runtime = self.runtime(container.runtime_name)
        try:
            runtime.get(namespace, container.id)
        except NotFound:
            pass
        else:
            raise AlreadyExists(f"task {container.id}: already exists")
        if request.HasField("options"):
            options = runtime_options(request.options.type_url, request.options.value)
        elif container.runtime_options is not None:
            options = runtime_options(*container.runtime_options)
        else:
            options = {}
        if container.spec is None:
            raise InvalidArgument(f"container {container.id} has no spec")
        rootfs = mounts_of(request.rootfs) if request.rootfs else self._snapshot_mounts(namespace, container)
        if self._hooks is not None:
            self._hooks.hook.containerkit_task_prepare(namespace=namespace, container=container, spec=container.spec)
        try:
            task = runtime.create(
                CreateTaskRequest(namespace, container.id, container.spec, tuple(rootfs), _stdio(request), options)
            )
        except BaseException:
            self.released(namespace, container.id)
            raise
        crashpoint("tasks.create.after-shim")
        pid = task.state().pid
        self._publish_create(namespace, task, request, rootfs, pid)
        return task, pid

    def released(self, namespace: str, container_id: str) -> None:
        """Tell the ``containerkit_task_released`` hooks that the container's task is gone (errors logged)."""
        if self._hooks is None:
            return
        for implementation in self._hooks.hook.containerkit_task_released.get_hookimpls():
            try:
                implementation.function(namespace=namespace, container_id=container_id)
            except Exception:
                log.exception(
                    "releasing the task of %s/%s in plugin %s failed",
                    namespace,
                    container_id,
                    implementation.plugin_name,
                )

    def _snapshot_mounts(self, namespace: str, container: Container) -> list[Mount]:
        """The mounts of the container's snapshot (none when it has no snapshot key)."""
        if not container.snapshot_key:
            return []
        if not container.snapshotter:
            raise InvalidArgument("unable to resolve rootfs mounts without snapshotter on container: invalid argument")
        return self._snapshots.mounts(namespace, container.snapshotter, container.snapshot_key)

    def _publish_create(self, namespace: str, task: Task, request: Any, rootfs: list[Mount], pid: int) -> None:
        from core.api.containerd.events import task_pb2 as events_pb

        io = events_pb.TaskIO(
            stdin=request.stdin, stdout=request.stdout, stderr=request.stderr, terminal=request.terminal
        )
        event = events_pb.TaskCreate(container_id=task.id, bundle=task.bundle, rootfs=mounts_pb(rootfs), io=io, pid=pid)
        self._events.publish(namespace, "/tasks/create", event)

    def wait(self, task: Task, exec_id: str | None, context: grpc.ServicerContext) -> ExitStatus:
        """Wait for the process to exit while the caller is there; Unavailable if it left or the daemon stops."""
        while True:
            try:
                return task.wait(exec_id, timeout=WAIT_POLL)
            except TimeoutError:
                if self._stopping.is_set():
                    raise Unavailable("containerkitd is stopping; wait again once it is back") from None
                if not context.is_active():
                    raise Unavailable("the waiting client has gone") from None

    def register(self, server: grpc.Server) -> None:
        from google.protobuf import any_pb2, empty_pb2

        from core.api.containerd.events import task_pb2 as events_pb
        from core.api.containerd.runc.v1 import options_pb2
        from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb
        from core.api.containerd.services.tasks.v1 import tasks_pb2_grpc as pb_grpc
        from core.api.containerd.types.task import task_pb2

        service, events = self, self._events
        empty = empty_pb2.Empty()

        def task_of(request: Any, context: grpc.ServicerContext) -> Task:
            return service.task(namespace_of(context), request.container_id)

        def deleted(id: str, exited: ExitStatus) -> Any:
            return pb.DeleteResponse(
                id=id, pid=exited.pid, exit_status=exited.exit_status, exited_at=timestamp(exited.exited_at)
            )

        class Servicer(pb_grpc.TasksServicer):
            def Create(self, request: Any, context: grpc.ServicerContext) -> Any:
                task, pid = service.create(namespace_of(context), request)
                return pb.CreateTaskResponse(container_id=task.id, pid=pid)

            def Start(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace, exec_id = namespace_of(context), _exec_id(request)
                task = service.task(namespace, request.container_id)

                def started(pid: int) -> None:  # before the process's exit can be published
                    if exec_id is None:
                        events.publish(namespace, "/tasks/start", events_pb.TaskStart(container_id=task.id, pid=pid))
                    else:
                        event = events_pb.TaskExecStarted(container_id=task.id, exec_id=exec_id, pid=pid)
                        events.publish(namespace, "/tasks/exec-started", event)

                crashpoint("tasks.start.before-runc-start")
                return pb.StartResponse(pid=task.start(exec_id, started=started))

            def Delete(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                task = service.task(namespace, request.container_id)
                exited = task.delete()
                crashpoint("tasks.delete.after-runc-delete")
                service.released(namespace, task.id)
                event = events_pb.TaskDelete(
                    container_id=task.id,
                    pid=exited.pid,
                    exit_status=exited.exit_status,
                    exited_at=timestamp(exited.exited_at),
                )
                events.publish(namespace, "/tasks/delete", event)
                return deleted("", exited)

            def DeleteProcess(self, request: Any, context: grpc.ServicerContext) -> Any:
                if not request.exec_id:
                    raise InvalidArgument("exec id cannot be empty: use Delete for the task's init process")
                return deleted(request.exec_id, task_of(request, context).delete(request.exec_id))

            def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
                task = task_of(request, context)
                return pb.GetResponse(process=process_pb(task.id, task.state(_exec_id(request))))

            def List(self, request: Any, context: grpc.ServicerContext) -> Any:
                response = pb.ListTasksResponse()
                for task in service.tasks(namespace_of(context), [request.filter] if request.filter else []):
                    try:
                        response.tasks.append(process_pb(task.id, task.state()))
                    except NotFound:  # deleted meanwhile
                        continue
                return response

            def Kill(self, request: Any, context: grpc.ServicerContext) -> Any:
                task_of(request, context).kill(request.signal, all=request.all, exec_id=_exec_id(request))
                return empty

            def Exec(self, request: Any, context: grpc.ServicerContext) -> Any:
                if not request.exec_id:
                    raise InvalidArgument("exec id cannot be empty")
                namespace = namespace_of(context)
                task = service.task(namespace, request.container_id)
                task.exec(request.exec_id, json_object(request.spec, "exec process spec"), _stdio(request))
                event = events_pb.TaskExecAdded(container_id=task.id, exec_id=request.exec_id)
                events.publish(namespace, "/tasks/exec-added", event)
                return empty

            def ResizePty(self, request: Any, context: grpc.ServicerContext) -> Any:
                task_of(request, context).resize_pty(request.width, request.height, _exec_id(request))
                return empty

            def CloseIO(self, request: Any, context: grpc.ServicerContext) -> Any:
                task = task_of(request, context)
                if request.stdin:
                    task.close_io(_exec_id(request))
                return empty

            def Pause(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                task = service.task(namespace, request.container_id)
                task.pause()
                events.publish(namespace, "/tasks/paused", events_pb.TaskPaused(container_id=task.id))
                return empty

            def Resume(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                task = service.task(namespace, request.container_id)
                task.resume()
                events.publish(namespace, "/tasks/resumed", events_pb.TaskResumed(container_id=task.id))
                return empty

            def ListPids(self, request: Any, context: grpc.ServicerContext) -> Any:
                response = pb.ListPidsResponse()
                for info in task_of(request, context).pids():
                    process = task_pb2.ProcessInfo(pid=info.pid)
                    if info.exec_id:
                        details = options_pb2.ProcessDetails(exec_id=info.exec_id)
                        process.info.CopyFrom(any_pb2.Any(type_url=PROCESS_DETAILS, value=details.SerializeToString()))
                    response.processes.append(process)
                return response

            def Checkpoint(self, request: Any, context: grpc.ServicerContext) -> Any:
                task_of(request, context)
                raise NotImplementedByPlugin("checkpoint is not supported by containerkitd")

            def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
                task = task_of(request, context)
                if not request.HasField("resources"):
                    raise InvalidArgument("resources are required to update a task")
                task.update(json_object(request.resources, "resources"), dict(request.annotations))
                return empty

            def Metrics(self, request: Any, context: grpc.ServicerContext) -> Any:
                response = pb.MetricsResponse()
                for task in service.tasks(namespace_of(context), request.filters):
                    try:
                        stats = task.stats()
                    except (NotFound, FailedPrecondition):  # stopped or deleted meanwhile: no sample
                        continue
                    response.metrics.append(metric_pb(stats))
                return response

            def Wait(self, request: Any, context: grpc.ServicerContext) -> Any:
                exited = service.wait(task_of(request, context), _exec_id(request), context)
                return pb.WaitResponse(exit_status=exited.exit_status, exited_at=timestamp(exited.exited_at))

        pb_grpc.add_TasksServicer_to_server(Servicer(), server)


def _init(context: InitContext) -> TasksService:
    service = TasksService(
        context.get("service", "containers").store,
        context.get("service", "snapshots").store,
        runtimes_by_name(context.records()),
        context.events,
        context.hooks,
    )
    service.restore()
    return service


plugin = Registration(init=_init, requires=("runtime", "service.containers", "service.snapshots"))
