"""The ``runtime`` plugin type: creates and drives tasks, the running side of containers (containerd's runtime v2).

A :class:`Runtime` creates :class:`Task` objects and finds them again; everything done to a running
container goes through its Task. A task has one *init* process (``exec_id=None``) and any number of
*exec* processes added with :meth:`Task.exec`, each addressed by its ``exec_id``.

Life cycle of a process: ``create``/``exec`` -> CREATED -> ``start`` -> RUNNING (<-> PAUSED via
``pause``/``resume``) -> exits -> STOPPED -> ``delete`` -> gone. Deleting the init process deletes the
task: unmounts its rootfs, removes its bundle and drops it from :meth:`Runtime.tasks`.

Contract for every implementation:

- Tasks outlive the daemon: :meth:`Runtime.close` never stops them, and :meth:`Runtime.restore`
  takes them over after a restart (live restore).
- Nothing blocks on a dead task: if the process supervising a task (a shim) is gone, the task
  reports STOPPED with :data:`UNKNOWN_EXIT_STATUS` (or UNKNOWN) and ``wait``/``delete`` return.
- The runtime publishes what only it observes on the event exchange it gets at init:
  ``/tasks/exit`` for every process exit (waited for or not) and ``/tasks/oom``. Events for
  requested operations (create, start, delete...) are the tasks service's to publish.
- Methods may be called concurrently from several threads; ``wait`` may block a thread.
- Errors come from :mod:`core.errors`. NotFound also for an ``exec_id`` the task does not know.
  ``OSError`` escapes only for genuine host faults.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from core.errors import NotImplementedByPlugin
from core.types import Mount

__all__ = [
    "UNKNOWN_EXIT_STATUS",
    "CreateTaskRequest",
    "ExitStatus",
    "Metrics",
    "ProcessInfo",
    "Runtime",
    "Stdio",
    "Task",
    "TaskState",
    "TaskStatus",
]

UNKNOWN_EXIT_STATUS = 255
"""The exit status reported when a process's real one was lost (its supervisor died)."""


class TaskStatus(enum.Enum):
    """A process's status; values are the wire enum's (``containerd.v1.types.Status``)."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Stdio:
    """Where a process's standard streams go: paths of FIFOs or files, or ``file://``/``binary://``
    URIs (containerd's logging URIs); ``""`` means none. With ``terminal`` the process gets a pty and
    ``stderr`` is unused."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass(frozen=True)
class CreateTaskRequest:
    """What :meth:`Runtime.create` needs.

    ``spec`` is the OCI runtime spec (``config.json`` as a dict); the runtime writes it into a bundle
    directory it owns. ``rootfs`` is mounted, in order, at the bundle's ``rootfs`` before the
    container is created; when empty, ``spec["root"]["path"]`` is used as it is. ``options`` are
    runtime-specific (for runc: ``binary_name``, ``systemd_cgroup``, ``root``...); unknown keys are
    InvalidArgument.
    """

    namespace: str
    id: str
    spec: Mapping[str, Any] = field(hash=False)
    rootfs: tuple[Mount, ...] = ()
    stdio: Stdio = Stdio()
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rootfs", tuple(self.rootfs))


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: ``exit_status`` (128 + signal when killed) at ``exited_at``."""

    exit_status: int
    exited_at: datetime
    pid: int = 0


@dataclass(frozen=True)
class TaskState:
    """A snapshot of one process of a task (the init process when ``exec_id`` is None).

    ``pid`` is 0 until the process exists; ``exit_status`` and ``exited_at`` are meaningful only when
    ``status`` is STOPPED (``exited_at`` is None before).
    """

    id: str
    pid: int
    status: TaskStatus
    exit_status: int = 0
    exited_at: datetime | None = None
    stdio: Stdio = Stdio()
    exec_id: str | None = None
    bundle: str = ""


@dataclass(frozen=True)
class ProcessInfo:
    """A process inside a task's container; ``exec_id`` is set when it is an exec process's main pid."""

    pid: int
    exec_id: str | None = None


@dataclass(frozen=True)
class Metrics:
    """Resource usage of a task at ``timestamp``.

    ``data`` is the cgroup statistics as a dict shaped like the protobuf message ``type_url`` names
    (field names in snake_case), so the tasks service can encode it for ``ctr tasks metrics``.
    """

    task_id: str
    timestamp: datetime
    data: Mapping[str, Any] = field(default_factory=dict, hash=False)
    type_url: str = "io.containerd.cgroups.v2.Metrics"


class Task(ABC):
    """A container's running side, created by :meth:`Runtime.create` or found by :meth:`Runtime.get`.

    After the task is deleted every method raises NotFound.
    """

    @property
    @abstractmethod
    def id(self) -> str:
        """The task's id (its container's id)."""

    @property
    @abstractmethod
    def namespace(self) -> str:
        """The namespace the task belongs to."""

    @property
    @abstractmethod
    def bundle(self) -> str:
        """Path of the OCI bundle directory the runtime made for the task."""

    @abstractmethod
    def state(self, exec_id: str | None = None) -> TaskState:
        """The current :class:`TaskState` of the init process or of ``exec_id``. Never blocks on a dead shim."""

    @abstractmethod
    def start(self, exec_id: str | None = None, *, started: Callable[[int], None] | None = None) -> int:
        """Start the created init process or exec process; return its pid.

        ``started``, when given, is called with the pid once the process runs and before its
        ``/tasks/exit`` can be published: a caller publishing the start event there keeps containerd's
        order (start before exit) even for a process that ends at once. FailedPrecondition unless the
        process is CREATED; starting an exec process also needs the task RUNNING.
        """

    @abstractmethod
    def delete(self, exec_id: str | None = None) -> ExitStatus:
        """Release a process that is not running (CREATED or STOPPED) and return how it ended.

        For the init process this deletes the whole task (rootfs unmounted, bundle removed) and
        needs every exec process gone. FailedPrecondition while the process is RUNNING or PAUSED
        (kill it and wait first) or, for the init process, while exec processes remain.
        """

    @abstractmethod
    def kill(self, signal: int, *, all: bool = False, exec_id: str | None = None) -> None:
        """Send ``signal`` to the process, or with ``all`` to every process in the container.

        NotFound when the process has already exited (containerd's "process already finished").
        """

    @abstractmethod
    def pause(self) -> None:
        """Freeze every process of the task. FailedPrecondition unless the task is RUNNING."""

    @abstractmethod
    def resume(self) -> None:
        """Thaw a paused task. FailedPrecondition unless the task is PAUSED."""

    @abstractmethod
    def exec(self, exec_id: str, spec: Mapping[str, Any], stdio: Stdio = Stdio()) -> None:
        """Add process ``exec_id`` (an OCI process spec dict) to the task, CREATED; :meth:`start` runs it.

        AlreadyExists when ``exec_id`` is in use; FailedPrecondition unless the task is RUNNING;
        InvalidArgument for an invalid id or spec.
        """

    @abstractmethod
    def resize_pty(self, width: int, height: int, exec_id: str | None = None) -> None:
        """Resize the process's terminal. Without one, a no-op for the init process (as containerd: a
        client resizing while the task exits must not fail) and FailedPrecondition for an exec process."""

    @abstractmethod
    def close_io(self, exec_id: str | None = None) -> None:
        """Close the process's stdin (the process sees end of file). Idempotent."""

    @abstractmethod
    def pids(self) -> list[ProcessInfo]:
        """Every process in the task's container. Empty once it has stopped."""

    @abstractmethod
    def wait(self, exec_id: str | None = None, timeout: float | None = None) -> ExitStatus:
        """Block until the process has exited and return how; at once if it already has.

        Any number of callers may wait. ``TimeoutError`` after ``timeout`` seconds (the process
        keeps running). Returns :data:`UNKNOWN_EXIT_STATUS` rather than hang when the shim died.
        """

    @abstractmethod
    def update(self, resources: Mapping[str, Any], annotations: Mapping[str, str] | None = None) -> None:
        """Apply new limits (an OCI ``linux.resources`` dict) to the running task.

        FailedPrecondition when the task has stopped; InvalidArgument for invalid resources.
        """

    @abstractmethod
    def stats(self) -> Metrics:
        """Current resource usage. FailedPrecondition when the task has stopped."""

    def checkpoint(self, path: str, options: Mapping[str, Any] | None = None) -> None:
        """Checkpoint the task into directory ``path`` (CRIU). Default: NotImplementedByPlugin."""
        raise NotImplementedByPlugin("checkpoint is not supported by this runtime")


class Runtime(ABC):
    """A runtime plugin (wire type ``io.containerd.runtime.v2``): the task manager."""

    @abstractmethod
    def create(self, request: CreateTaskRequest) -> Task:
        """Create the task, its init process CREATED (not started).

        AlreadyExists when ``(namespace, id)`` has a task; InvalidArgument for an invalid id, spec,
        mount or option. On failure nothing is left behind (no mounts, bundle or process).
        """

    @abstractmethod
    def get(self, namespace: str, id: str) -> Task:
        """The task ``id`` of ``namespace``. NotFound when there is none."""

    @abstractmethod
    def tasks(self, namespace: str | None = None) -> list[Task]:
        """Every task of ``namespace`` (all namespaces when None), stopped ones included until deleted."""

    @abstractmethod
    def restore(self) -> list[Task]:
        """Take over the tasks left by a previous daemon; called once, before any other method.

        Tasks whose shim is alive are managed again as they are; those whose shim died are
        reported STOPPED with :data:`UNKNOWN_EXIT_STATUS` (or UNKNOWN) and must still be deleted.
        Returns every task found; never hangs on an unresponsive shim.
        """

    def close(self) -> None:  # noqa: B027 - optional, a no-op by default
        """Drop connections to shims at daemon shutdown; tasks keep running. Idempotent. Default: nothing."""
