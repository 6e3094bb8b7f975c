"""The runc runtime: every task runs under its own shim process, detached from the daemon.

Layout under the runtime's state directory::

    <state>/<namespace>/<id>/     the task's OCI bundle: config.json, rootfs/ (the rootfs mounts),
                                  runtime.json (binary, runc root), and the shim's shim.pid, shim.log
                                  and exits/<exec id or "init">.json (exit records)
    <state>/.s/<16 hex>.sock      the shim's socket (short: unix socket paths are limited to 107 bytes)
    <state>/.runc/<namespace>/    runc's own state (``--root``) unless configured otherwise

Hidden names (starting with a dot) can never be namespaces or ids, so they never collide with bundles.
The runtime watches every started process through one ``wait`` request held open on the
:class:`~plugins.runtime_runc.client.Watcher` and publishes ``/tasks/exit`` when it returns, and
``/tasks/oom`` from the shim's ``events`` stream. A shim found dead makes its task STOPPED with the
exit it recorded, or :data:`~core.runtime.UNKNOWN_EXIT_STATUS`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import identifiers
from core.errors import AlreadyExists, ContainerkitError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from core.mount import mount_all, unmount_all
from core.runtime import (
    UNKNOWN_EXIT_STATUS,
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
from core.types import Mount
from plugins.runtime_runc.client import ShimClient, ShimError, ShimGone, Watcher, spawn_shim, tail
from plugins.runtime_runc.forkserver import ForkServer, Unusable

if TYPE_CHECKING:
    from core.events import Exchange

__all__ = ["RuncRuntime", "RuncTask", "metrics_from_runc"]

log = logging.getLogger("containerkit.runtime.runc")

SHIM = Path(__file__).with_name("shim.py")
_LAUNCH_SHIM = f"import sys; sys.path.insert(0, {str(SHIM.parent)!r}); import shim; shim.main(sys.argv[1:])"
"""``python -S -I -c`` program that runs the shim as an imported module: its bytecode is cached in
``__pycache__`` after the first task (a script given by path is compiled on every start, ~20 ms)."""
SPAWN_TIMEOUT = 20.0
START_REPORT_TIMEOUT = 5.0
"""Longest an exit event waits for the start call of its process to report the pid."""
SHUTDOWN_TIMEOUT = 5.0
_SETTINGS = "runtime.json"
_INIT = "init"
_STATUS = {
    "created": TaskStatus.CREATED,
    "running": TaskStatus.RUNNING,
    "paused": TaskStatus.PAUSED,
    "pausing": TaskStatus.PAUSING,
    "stopped": TaskStatus.STOPPED,
}
_NO_STDIO = Stdio()
_OPTIONS: dict[str, type] = {"binary_name": str, "root": str, "systemd_cgroup": bool}


def _timestamp(value: str) -> datetime | None:
    """An RFC 3339 time from the shim (nanoseconds are cut to microseconds); None for ``""``."""
    return datetime.fromisoformat(value) if value else None


def _exit(record: Mapping[str, Any], pid: int = 0) -> ExitStatus:
    """An :class:`ExitStatus` from the shim's ``{exit_status, exited_at, pid}``."""
    return ExitStatus(
        int(record["exit_status"]),
        _timestamp(record.get("exited_at") or "") or datetime.now(UTC),
        int(record.get("pid") or pid),
    )


@dataclass(frozen=True)
class _Settings:
    """What a bundle needs to be driven again after a restart (its ``runtime.json``)."""

    binary: str
    runc_root: str

    def save(self, bundle: Path) -> None:
        (bundle / _SETTINGS).write_text(json.dumps({"binary": self.binary, "runc_root": self.runc_root}))

    @classmethod
    def load(cls, bundle: Path) -> _Settings:
        data = json.loads((bundle / _SETTINGS).read_text())
        return cls(data["binary"], data["runc_root"])


@dataclass
class _Process:
    """The runtime's record of one process: its pid and, once known, how it ended."""

    pid: int = 0
    watched: bool = False
    exit: ExitStatus | None = None
    done: threading.Event = field(default_factory=threading.Event)
    starting: threading.Event | None = None
    """Set once a start call has reported the pid (or failed): the exit is published only after that."""


class RuncTask(Task):
    """A task driven through its shim. Created by :class:`RuncRuntime`, never directly."""

    def __init__(self, runtime: RuncRuntime, namespace: str, id: str, settings: _Settings) -> None:
        self._runtime = runtime
        self._namespace = namespace
        self._id = id
        self._bundle = runtime.bundle_path(namespace, id)
        self._socket = runtime.socket_path(namespace, id)
        self._settings = settings
        self._client = ShimClient(self._socket)
        self._processes: dict[str | None, _Process] = {None: _Process()}
        self._lock = threading.Lock()
        self._delete_lock = threading.Lock()
        self._shim_pid = 0
        self._gone_at: datetime | None = None
        self._closing = False
        self._deleted = False

    @property
    def id(self) -> str:
        return self._id

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def bundle(self) -> str:
        return str(self._bundle)

    # -- the Task interface ------------------------------------------------------------------------------

    def state(self, exec_id: str | None = None) -> TaskState:
        try:
            result = self._call("state", exec_id, if_gone=ShimGone)
        except ShimGone:
            exit = self._process(exec_id, ask=False).exit or self._lost_exit(exec_id)
            return TaskState(
                self._id,
                exit.pid,
                TaskStatus.STOPPED,
                exit.exit_status,
                exit.exited_at,
                exec_id=exec_id,
                bundle=self.bundle,
            )
        stdio = result.get("stdio") or {}
        return TaskState(
            id=self._id,
            pid=int(result.get("pid") or 0),
            status=_STATUS.get(result.get("status", ""), TaskStatus.UNKNOWN),
            exit_status=int(result.get("exit_status") or 0),
            exited_at=_timestamp(result.get("exited_at") or ""),
            stdio=Stdio(
                stdin=stdio.get("stdin", ""),
                stdout=stdio.get("stdout", ""),
                stderr=stdio.get("stderr", ""),
                terminal=bool(result.get("terminal") or stdio.get("terminal")),
            ),
            exec_id=exec_id,
            bundle=self.bundle,
        )

    def start(self, exec_id: str | None = None, *, started: Callable[[int], None] | None = None) -> int:
        process = self._record(exec_id)
        process.starting = reported = threading.Event()
        try:
            pid = int(self._call("start", exec_id)["pid"])
            process.pid = pid
            if started is not None:
                started(pid)
        finally:
            reported.set()
        self._watch(exec_id, process)
        return pid

    def delete(self, exec_id: str | None = None) -> ExitStatus:
        if exec_id is not None:
            return self._delete_exec(exec_id)
        with self._delete_lock:
            try:
                exit = _exit(self._call("delete", None, if_gone=ShimGone), self._processes[None].pid)
            except ShimGone:
                exit = self._processes[None].exit or self._lost_exit(None)
            self._closing = True
            gone = self._gone_at is not None
            exiting, stale = self._shutdown_shim()
            self._runtime.teardown(self._namespace, self._id, self._settings, stale, force=gone, exiting=exiting)
            self._deleted = True
            self._client.close()
            self._runtime.forget(self)
        return exit

    def kill(self, signal: int, *, all: bool = False, exec_id: str | None = None) -> None:
        self._call("kill", exec_id, signal=int(signal), all=all, if_gone=NotFound)

    def pause(self) -> None:
        self._call("pause", None)

    def resume(self) -> None:
        self._call("resume", None)

    def exec(self, exec_id: str, spec: Mapping[str, Any], stdio: Stdio = _NO_STDIO) -> None:
        identifiers.validate(exec_id, "exec id")
        self._call("exec", exec_id, process=_json_safe(spec, "process spec"), stdio=_stdio(stdio))
        self._record(exec_id)

    def resize_pty(self, width: int, height: int, exec_id: str | None = None) -> None:
        self._call("resize", exec_id, width=int(width), height=int(height))

    def close_io(self, exec_id: str | None = None) -> None:
        with contextlib.suppress(ShimGone):  # a gone shim has nothing left to close
            self._call("close_io", exec_id, if_gone=ShimGone)

    def pids(self) -> list[ProcessInfo]:
        try:
            result = self._call("pids", None, if_gone=ShimGone)
        except ShimGone:
            return []
        return [ProcessInfo(int(p["pid"]), p.get("exec_id") or None) for p in result.get("pids") or ()]

    def wait(self, exec_id: str | None = None, timeout: float | None = None) -> ExitStatus:
        process = self._process(exec_id, ask=True)
        if process.exit is None and self._gone_at is None:
            self._watch(exec_id, process)
        if not process.done.wait(timeout):
            name = f"process {exec_id!r} of task {self._id!r}" if exec_id else f"task {self._id!r}"
            raise TimeoutError(f"{name} still running after {timeout:g}s")
        assert process.exit is not None
        return process.exit

    def update(self, resources: Mapping[str, Any], annotations: Mapping[str, str] | None = None) -> None:
        self._call("update", None, resources=_json_safe(resources, "resources"))

    def stats(self) -> Metrics:
        data = self._call("stats", None)
        return Metrics(self._id, datetime.now(UTC), metrics_from_runc(data or {}))

    # -- shim plumbing -----------------------------------------------------------------------------------

    def _call(
        self, method: str, exec_id: str | None, *, if_gone: type[ContainerkitError] = FailedPrecondition, **params: Any
    ) -> Any:
        """Call the shim about the process ``exec_id`` (None: the init process). When the shim is gone
        (now or before), raise ``if_gone``; NotFound once the task is deleted."""
        if self._deleted:
            raise NotFound(f"task {self._id!r} not found (deleted)")
        if self._gone_at is None:
            try:
                return self._client.call(method, {"exec_id": exec_id or "", **params})
            except ShimGone:
                self.shim_died()
        if if_gone is NotFound:
            raise NotFound("process already finished")
        raise if_gone(f"task {self._id!r}: its shim is gone, the task has stopped")

    def _record(self, exec_id: str | None) -> _Process:
        """The record of ``exec_id``, added if new."""
        with self._lock:
            return self._processes.setdefault(exec_id, _Process())

    def _process(self, exec_id: str | None, *, ask: bool) -> _Process:
        """The record of ``exec_id``. With ``ask``, one unknown here but known to a live shim (after a
        restore) is added; NotFound otherwise."""
        with self._lock:
            process = self._processes.get(exec_id)
        if process is not None:
            return process
        if ask and self._gone_at is None:
            self.state(exec_id)  # NotFound when the shim does not know it either
            return self._record(exec_id)
        raise NotFound(f"process {exec_id!r} of task {self._id!r} not found")

    def _delete_exec(self, exec_id: str) -> ExitStatus:
        try:
            exit = _exit(self._call("delete", exec_id, if_gone=ShimGone))
        except ShimGone:
            exit = self._process(exec_id, ask=False).exit or self._lost_exit(exec_id)
        with self._lock:
            self._processes.pop(exec_id, None)
        return exit

    def _watch(self, exec_id: str | None, process: _Process) -> None:
        """Hold a ``wait`` for the process on the runtime's watcher (once)."""
        with self._lock:
            if process.watched:
                return
            process.watched = True

        def on_line(message: dict[str, Any]) -> bool:
            if "result" in message:
                self._resolve(exec_id, process, _exit(message["result"], process.pid))
            else:
                log.warning("shim of task %s: wait for %s failed: %s", self._id, exec_id or _INIT, message)
                self._resolve(exec_id, process, self._lost_exit(exec_id))
            return False

        try:
            self._runtime.watcher.watch(self._socket, "wait", {"exec_id": exec_id or ""}, on_line, self.shim_died)
        except ShimGone:
            self.shim_died()

    def watch_events(self) -> None:
        """Follow the shim's ``events`` stream for ``/tasks/oom`` (a shim without it is merely not followed)."""

        def on_line(message: dict[str, Any]) -> bool:
            if "error" in message:
                log.debug("shim of task %s streams no events: %s", self._id, message["error"])
                return False
            if message.get("topic") == "/tasks/oom":
                self._runtime.publish_oom(self._namespace, self._id)
            return True

        try:
            self._runtime.watcher.watch(self._socket, "events", {}, on_line, self.shim_died)
        except ShimGone:
            self.shim_died()

    def _resolve(self, exec_id: str | None, process: _Process, exit: ExitStatus, publish: bool = True) -> None:
        """Record how a process ended (first answer wins), publish ``/tasks/exit``, release its waiters."""
        with self._lock:
            if process.exit is not None:
                return
            process.exit = exit
        if publish:
            if process.starting is not None:  # an exit that beat its start's answer waits for it
                process.starting.wait(START_REPORT_TIMEOUT)
            self._runtime.publish_exit(self._namespace, self._id, exec_id, exit)
        process.done.set()

    def shim_died(self, *, publish: bool = True) -> None:
        """The shim is gone: every process still unresolved ends with its recorded or an unknown exit."""
        with self._lock:
            if self._gone_at is not None or self._closing or self._runtime.closed:
                return
            self._gone_at = datetime.now(UTC)
            processes = list(self._processes.items())
        log.info("shim of task %s/%s is gone", self._namespace, self._id)
        for exec_id, process in processes:
            self._resolve(exec_id, process, self._lost_exit(exec_id), publish=publish and process.watched)

    def _lost_exit(self, exec_id: str | None) -> ExitStatus:
        """The exit the shim recorded in the bundle for ``exec_id``, or an unknown one."""
        try:
            record = json.loads((self._bundle / "exits" / f"{exec_id or _INIT}.json").read_text())
            return _exit(record)
        except (OSError, ValueError, KeyError, TypeError):
            with self._lock:
                process = self._processes.get(exec_id)
            return ExitStatus(UNKNOWN_EXIT_STATUS, self._gone_at or datetime.now(UTC), process.pid if process else 0)

    def _shutdown_shim(self) -> tuple[int, int]:
        """Ask a live shim to exit: (its pid, to await), or (0, the pid of a stale shim still around, to kill)."""
        if self._gone_at is not None or not self._shim_pid:
            return 0, _stale_shim_pid(self._bundle, self._socket)
        try:
            self._client.call("shutdown", {}, timeout=SHUTDOWN_TIMEOUT)
        except (ContainerkitError, OSError) as err:
            log.warning("shim of task %s did not shut down: %s", self._id, err)
        return self._shim_pid, 0

    def launch(self, stdio: Stdio) -> None:
        """Start the task's shim in its ready bundle and create the init process."""
        self._socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._socket.unlink(missing_ok=True)
        Path(self._settings.runc_root).mkdir(mode=0o711, parents=True, exist_ok=True)
        args = [
            "--namespace", self._namespace,
            "--id", self._id,
            "--bundle", self.bundle,
            "--socket", str(self._socket),
            "--binary", self._settings.binary,
            "--runc-root", self._settings.runc_root,
            "--log", str(self._bundle / "shim.log"),
        ]  # fmt: skip
        self._shim_pid = self._runtime.start_shim(self._bundle, args)
        self.watch_events()
        init = self._record(None)
        init.pid = int(self._call("create", None, stdio=_stdio(stdio))["pid"])
        self._watch(None, init)

    def discard(self) -> None:
        """Remove all of a task whose creation failed: its shim, runc container, mounts and bundle."""
        self._closing = True
        exiting, stale = self._shutdown_shim()
        self._runtime.teardown(
            self._namespace, self._id, self._settings, stale, force=bool(self._shim_pid), exiting=exiting
        )

    def disconnect(self) -> None:
        """Close the idle connections to the shim (the daemon is stopping)."""
        self._client.close()

    def adopt(self, timeout: float) -> None:
        """Find the shim of a restored task and take its processes over; mark it gone if it does not answer."""
        try:
            self._shim_pid = self._client.ping(timeout)
            init = self._client.call("state", {"exec_id": ""}, timeout=timeout)
        except (ContainerkitError, OSError, ValueError) as err:
            if not isinstance(err, Unavailable):
                log.warning("shim of task %s/%s is unusable: %s", self._namespace, self._id, err)
            self.shim_died(publish=False)
            return
        self._adopt_process(None, init)
        try:
            pids = self._client.call("pids", {}, timeout=timeout).get("pids") or ()
        except ContainerkitError:
            pids = ()  # stopped: only exited execs remain, found through their exit records
        exits = self._bundle / "exits"
        exec_ids = {p.get("exec_id") for p in pids} | {p.stem for p in exits.glob("*.json")}
        for exec_id in sorted(e for e in exec_ids if e and e != _INIT):
            try:
                self._adopt_process(exec_id, self._client.call("state", {"exec_id": exec_id}, timeout=timeout))
            except (ContainerkitError, OSError):
                continue  # deleted (its record is stale) or the shim stopped answering: wait() will tell
        self.watch_events()

    def _adopt_process(self, exec_id: str | None, state: Mapping[str, Any]) -> None:
        process = self._record(exec_id)
        process.pid = int(state.get("pid") or 0)
        if state.get("status") == "stopped":
            self._resolve(exec_id, process, _exit(state, process.pid), publish=False)
        else:
            self._watch(exec_id, process)


class RuncRuntime(Runtime):
    """Tasks under runc (or a drop-in such as crun) through per-task shims. Usable without the daemon::

        runtime = RuncRuntime(Path("/run/mykit/runc"))
        task = runtime.create(CreateTaskRequest("default", "web", spec, rootfs=mounts))

    ``events`` receives ``/tasks/exit`` and ``/tasks/oom``; ``root`` is runc's ``--root`` (a directory
    per namespace below it; default ``<state>/.runc``).
    """

    def __init__(
        self,
        state: str | os.PathLike[str],
        *,
        events: Exchange | None = None,
        binary: str = "runc",
        root: str = "",
        shim_python: str = "",
        fork_server: bool = True,
        restore_timeout: float = 1.0,
        restore_workers: int = 32,
    ) -> None:
        self.state = Path(state).absolute()
        self.events = events
        self.binary = binary
        self.root = Path(root) if root else self.state / ".runc"
        self.shim_python = shim_python or sys.executable
        self.restore_timeout = restore_timeout
        self.restore_workers = restore_workers
        self.watcher = Watcher()
        self.fork_server = ForkServer(self.shim_python, str(SHIM.parent)) if fork_server else None
        self.closed = False
        self._tasks: dict[tuple[str, str], RuncTask] = {}
        self._reserved: set[tuple[str, str]] = set()
        self._binaries: dict[str, str] = {}
        self._fork_error = ""
        self._lock = threading.Lock()

    def bundle_path(self, namespace: str, id: str) -> Path:
        """Where the bundle of task ``namespace/id`` lives."""
        return self.state / namespace / id

    def socket_path(self, namespace: str, id: str) -> Path:
        """The shim socket of task ``namespace/id`` (a short path, whatever the ids' lengths)."""
        return self.state / ".s" / f"{hashlib.sha256(f'{namespace}/{id}'.encode()).hexdigest()[:16]}.sock"

    # -- the Runtime interface ---------------------------------------------------------------------------

    def create(self, request: CreateTaskRequest) -> RuncTask:
        ns = identifiers.validate(request.namespace, "namespace")
        id = identifiers.validate(request.id, "task id")
        settings = self._settings(ns, request.options)
        spec = dict(_json_safe(request.spec, "spec", check=False))
        if request.rootfs:
            spec["root"] = {**(spec.get("root") or {}), "path": "rootfs"}
        config = _json_text(spec, "spec")
        key = (ns, id)
        with self._lock:
            if key in self._tasks or key in self._reserved or self.bundle_path(ns, id).exists():
                raise AlreadyExists(f"task {id!r} in namespace {ns!r}: already exists")
            self._reserved.add(key)
        task = RuncTask(self, ns, id, settings)
        try:
            try:
                self._make_bundle(task.bundle, config, request.rootfs, settings)
                task.launch(request.stdio)
            except BaseException:
                task.discard()
                raise
            with self._lock:
                self._tasks[key] = task
        finally:
            with self._lock:
                self._reserved.discard(key)
        return task

    def get(self, namespace: str, id: str) -> RuncTask:
        with self._lock:
            task = self._tasks.get((namespace, id))
        if task is None:
            raise NotFound(f"task {id!r} not found in namespace {namespace!r}")
        return task

    def tasks(self, namespace: str | None = None) -> list[Task]:
        with self._lock:
            return [t for (ns, _), t in sorted(self._tasks.items()) if namespace is None or ns == namespace]

    def restore(self) -> list[Task]:
        if self.fork_server is not None:
            self.fork_server.start()  # warm before the first create
        found: list[tuple[str, str, _Settings]] = []
        for ns_dir in sorted(self.state.iterdir()) if self.state.is_dir() else ():
            if ns_dir.name.startswith(".") or not ns_dir.is_dir():
                continue
            for bundle in sorted(ns_dir.iterdir()):
                if bundle.name.startswith(".") or not bundle.is_dir():
                    continue
                try:
                    found.append((ns_dir.name, bundle.name, _Settings.load(bundle)))
                except (OSError, ValueError, KeyError):
                    log.warning("removing %s: not a complete bundle (a create interrupted by a crash)", bundle)
                    self.teardown(ns_dir.name, bundle.name, None, _stale_shim_pid(bundle, None))
        tasks = [RuncTask(self, ns, id, settings) for ns, id, settings in found]
        if tasks:
            workers = max(1, self.restore_workers)
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="runc-restore") as pool:
                list(pool.map(lambda task: task.adopt(self.restore_timeout), tasks))
        with self._lock:
            for task in tasks:
                self._tasks[(task.namespace, task.id)] = task
        return list(tasks)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.watcher.close()
        if self.fork_server is not None:
            self.fork_server.close()
        with self._lock:
            tasks = list(self._tasks.values())
        for task in tasks:
            task.disconnect()

    # -- for tasks ---------------------------------------------------------------------------------------

    def start_shim(self, bundle: Path, args: list[str]) -> int:
        """Start a shim with ``args`` for ``bundle`` (forked by the zygote; spawned when it is off or unusable)
        and return its pid once its socket listens. ShimError (with its log) if it fails first."""
        if self.fork_server is not None:
            shim_log = bundle / "shim.log"
            title = [self.shim_python, "-S", "-I", str(SHIM), *args]
            try:
                pid = self.fork_server.spawn(args, title, str(shim_log), SPAWN_TIMEOUT)
            except Unusable as err:
                if str(err) != self._fork_error:  # once per kind of failure, not for every task
                    self._fork_error = str(err)
                    log.warning("%s: shims are spawned as new interpreters meanwhile", err)
            except TimeoutError:
                raise ShimError(f"shim did not serve within {SPAWN_TIMEOUT:g}s: {tail(shim_log)}") from None
            else:
                self._fork_error = ""
                if not pid:
                    raise ShimError(f"shim exited before serving: {tail(shim_log)}")
                return pid
        command = [self.shim_python, "-S", "-I", "-c", _LAUNCH_SHIM, *args]
        spawn_shim(command, bundle, bundle / "shim-start.log", SPAWN_TIMEOUT)
        return int((bundle / "shim.pid").read_text())

    def teardown(
        self, ns: str, id: str, settings: _Settings | None, stale_shim: int, *, force: bool = False, exiting: int = 0
    ) -> None:
        """Remove what a task leaves on the host: the shim ``stale_shim`` (a pid, 0: none), with ``force`` the
        runc container (``runc delete --force``), the rootfs mounts, the bundle, the socket; the shim
        ``exiting`` (asked to exit) is waited for last, while the rest is removed, and killed if it is slow."""
        bundle = self.bundle_path(ns, id)
        if stale_shim:
            _kill(stale_shim)
        if settings is not None and force:
            self._runc_delete(id, settings)
        rootfs = bundle / "rootfs"
        try:
            unmount_all(rootfs)
        except OSError:
            unmount_all(rootfs, detach=True)
        shutil.rmtree(bundle, ignore_errors=True)
        if exiting and not _await_exit(exiting, SHUTDOWN_TIMEOUT):
            _kill(exiting)
        self.socket_path(ns, id).unlink(missing_ok=True)

    def publish_exit(self, ns: str, id: str, exec_id: str | None, exit: ExitStatus) -> None:
        """Publish ``/tasks/exit`` (containerd's TaskExit) for a process of task ``ns/id``."""
        task_pb2 = _task_events()
        if self.events is None or task_pb2 is None:
            return
        message = task_pb2.TaskExit(
            container_id=id, id=exec_id or id, pid=exit.pid, exit_status=exit.exit_status & 0xFFFFFFFF
        )
        message.exited_at.FromDatetime(exit.exited_at)
        self.events.publish(ns, "/tasks/exit", message)

    def publish_oom(self, ns: str, id: str) -> None:
        """Publish ``/tasks/oom`` (containerd's TaskOOM) for task ``ns/id``."""
        task_pb2 = _task_events()
        if self.events is not None and task_pb2 is not None:
            self.events.publish(ns, "/tasks/oom", task_pb2.TaskOOM(container_id=id))

    def forget(self, task: RuncTask) -> None:
        """Drop a deleted task from the task list."""
        with self._lock:
            if self._tasks.get((task.namespace, task.id)) is task:
                del self._tasks[(task.namespace, task.id)]

    # -- internals ---------------------------------------------------------------------------------------

    def _settings(self, ns: str, options: Mapping[str, Any]) -> _Settings:
        """Binary and runc root for a new task of namespace ``ns``, from the config and the request's options."""
        for key, value in options.items():
            if key not in _OPTIONS:
                raise InvalidArgument(f"unknown runc option {key!r} (known: {', '.join(_OPTIONS)})")
            if not isinstance(value, _OPTIONS[key]):
                raise InvalidArgument(f"runc option {key!r} must be a {_OPTIONS[key].__name__}")
        if options.get("systemd_cgroup"):
            raise InvalidArgument("runc option systemd_cgroup is not supported (cgroupfs only)")
        name = options.get("binary_name") or self.binary
        binary = self._binary(name)
        if binary is None:
            raise InvalidArgument(f"runtime binary {name!r} not found in PATH")
        return _Settings(binary, os.path.join(os.path.abspath(options.get("root") or self.root), ns))

    def _binary(self, name: str) -> str | None:
        """The path of the runtime binary ``name`` (looked up in PATH once; again if it is no longer there)."""
        path = self._binaries.get(name)
        if path is None or not os.access(path, os.X_OK):
            path = shutil.which(name)
            if path is not None:
                self._binaries[name] = path
        return path

    def _make_bundle(self, path: str, config: str, rootfs: Sequence[Mount], settings: _Settings) -> None:
        """The bundle directory with config.json (``config``), runtime.json and ``rootfs`` mounted
        (InvalidArgument if it fails)."""
        bundle = Path(path)
        bundle.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
        bundle.mkdir(mode=0o711)
        (bundle / "rootfs").mkdir(mode=0o711)
        (bundle / "config.json").write_text(config)
        settings.save(bundle)
        if rootfs:
            try:
                mount_all(rootfs, bundle / "rootfs")
            except OSError as err:
                raise InvalidArgument(f"rootfs of task {bundle.name!r}: {err}") from None

    def _runc_delete(self, id: str, settings: _Settings) -> None:
        """``runc delete --force`` the container, in case a shim died or a create failed half-way."""
        command = [settings.binary, "--root", settings.runc_root, "delete", "--force", id]
        try:
            subprocess.run(command, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.warning("%s failed: %s", " ".join(command), err)


def metrics_from_runc(stats: Mapping[str, Any]) -> dict[str, Any]:
    """``runc events --stats`` data as the cgroups v2 ``Metrics`` message (snake_case dict)."""
    cpu, memory, pids = stats.get("cpu") or {}, stats.get("memory") or {}, stats.get("pids") or {}
    usage, throttling = cpu.get("usage") or {}, cpu.get("throttling") or {}
    raw = memory.get("raw") or {}
    mem = {name: int(raw[name]) for name in _V2_MEMORY if name in raw}
    mem |= {name: int(raw[key]) for key, name in _V1_MEMORY.items() if key in raw}
    mem["usage"] = int((memory.get("usage") or {}).get("usage", 0))
    mem["usage_limit"] = int((memory.get("usage") or {}).get("limit", 0))
    mem["swap_usage"] = int((memory.get("swap") or {}).get("usage", 0))
    mem["swap_limit"] = int((memory.get("swap") or {}).get("limit", 0))
    return {
        "pids": {"current": int(pids.get("current", 0)), "limit": int(pids.get("limit", 0))},
        "cpu": {
            "usage_usec": int(usage.get("total", 0)) // 1000,
            "user_usec": int(usage.get("user", 0)) // 1000,
            "system_usec": int(usage.get("kernel", 0)) // 1000,
            "nr_periods": int(throttling.get("periods", 0)),
            "nr_throttled": int(throttling.get("throttled_periods", 0)),
            "throttled_usec": int(throttling.get("throttled_time", 0)) // 1000,
        },
        "memory": mem,
    }


_V2_MEMORY = (
    *("anon", "file", "kernel_stack", "slab", "sock", "shmem", "file_mapped", "file_dirty", "file_writeback"),
    *("inactive_anon", "active_anon", "inactive_file", "active_file", "unevictable", "pgfault", "pgmajfault"),
)
"""Fields of the v2 MemoryStat named as in runc's raw stats on a cgroup v2 host."""

_V1_MEMORY = {
    "rss": "anon",
    "cache": "file",
    "mapped_file": "file_mapped",
    "dirty": "file_dirty",
    "writeback": "file_writeback",
}
"""runc's raw stats names on a cgroup v1 host -> v2 MemoryStat fields."""


def _stdio(stdio: Stdio) -> dict[str, Any]:
    return {"stdin": stdio.stdin, "stdout": stdio.stdout, "stderr": stdio.stderr, "terminal": stdio.terminal}


def _json_safe(value: Mapping[str, Any], what: str, *, check: bool = True) -> Mapping[str, Any]:
    """``value`` if it is a mapping that (with ``check``) encodes as JSON; InvalidArgument otherwise."""
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must be a JSON object, not {type(value).__name__}")
    if check:
        _json_text(value, what)
    return value


def _json_text(value: Mapping[str, Any], what: str) -> str:
    """``value`` as JSON text; InvalidArgument if it cannot be encoded."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"{what} is not valid JSON: {err}") from None


@functools.cache
def _task_events() -> Any:
    """The generated ``containerd.events`` task messages (imported on first use), or None without them."""
    try:
        from core.api.containerd.events import task_pb2
    except ImportError:
        return None
    return task_pb2


def _await_exit(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` ended within ``timeout`` seconds (reaped if it is our child)."""
    if pid <= 0:
        return True
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ended = bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)
    if ended:
        with contextlib.suppress(ChildProcessError):  # not ours: its parent reaps it
            os.waitpid(pid, os.WNOHANG)
    return ended


def _stale_shim_pid(bundle: Path, socket_path: Path | None) -> int:
    """The pid in ``bundle/shim.pid`` if that process is still a shim of this bundle, else 0."""
    try:
        pid = int((bundle / "shim.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return 0
    marks = {os.fsencode(bundle), *((os.fsencode(socket_path),) if socket_path else ())}
    return pid if marks & set(cmdline) else 0


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _await_exit(pid, SHUTDOWN_TIMEOUT)
