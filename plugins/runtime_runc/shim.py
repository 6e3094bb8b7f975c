"""Per-task shim: drives runc (or crun) for one container and serves newline-delimited JSON on a unix socket.

Run as ``python3 -S -I shim.py --namespace NS --id ID --bundle DIR --socket SOCK --binary runc
--runc-root ROOT [--log FILE]`` (:func:`main`), or forked ready-made by the fork server (``forkserver.py``,
:func:`serve_forked`). Standalone and stdlib-only (it imports nothing from containerkit) so that it starts
fast and stays small. The process detaches (run as a program it forks; the parent exits 0 once the socket
listens), writes ``<bundle>/shim.pid``, becomes a child subreaper and reaps every child.

Each request line ``{"method": M, "params": {...}}`` gets one line ``{"result": R}`` or ``{"error":
{"code": C, "message": TEXT}}``; ``events`` instead streams ``{"topic": ...}`` lines until the client
closes the connection. Process exits are written to ``<bundle>/exits/<exec_id or init>.json`` (atomically)
before any waiter is answered.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # importing typing would cost 0.7 MB of RSS; annotations are never evaluated here
    from typing import Any

CHUNK = 65536


class ShimError(Exception):
    """A request failure carrying its protocol error ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def timestamp() -> str:
    """Now as RFC 3339 UTC with nanoseconds."""
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


def exit_code(status: int) -> int:
    """A wait status as an exit status: the code, or 128 + the signal."""
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def is_fifo(path: str) -> bool:
    """Whether ``path`` is a FIFO."""
    return os.stat(path).st_mode & 0o170000 == 0o010000


def copy(src: int, dst: int, close: int = -1) -> None:
    """Copy ``src`` to ``dst`` until end of file or an error, then close ``close``."""
    try:
        while data := os.read(src, CHUNK):
            while data:
                data = data[os.write(dst, data) :]
    except OSError:
        pass
    if close >= 0:
        os.close(close)


def pump(src: int, dst: int, wake: int, owned: tuple[int, ...]) -> None:
    """Copy the FIFO ``src`` to ``dst`` until ``wake`` is signalled (what ``src`` holds by then is still
    copied) or an error; then close ``owned``."""
    poller = select.poll()
    poller.register(src, select.POLLIN)
    poller.register(wake, select.POLLIN)
    os.set_blocking(src, False)
    try:
        stopping = False
        while not stopping:
            stopping = any(fd == wake for fd, _ in poller.poll())
            with contextlib.suppress(BlockingIOError):
                while data := os.read(src, CHUNK):
                    while data:
                        data = data[os.write(dst, data) :]
    except OSError:
        pass
    for fd in owned:
        os.close(fd)


def open_input(path: str) -> tuple[int, int]:
    """The fd to give a process as stdin for ``path`` and the FIFO to copy into it (-1 when ``path`` is a
    regular file, given directly, or empty: /dev/null)."""
    if "://" in path:
        raise ShimError("InvalidArgument", f"unsupported stdin {path!r} (FIFO or file path only)")
    if path and is_fifo(path):
        return os.open(os.devnull, os.O_RDONLY), os.open(path, os.O_RDWR)
    return os.open(path or os.devnull, os.O_RDONLY), -1


def open_output(path: str) -> int:
    """An fd writing to ``path``: a FIFO opened O_RDWR (never blocks), else a file appended to
    (``file://PATH`` too); /dev/null when ``path`` is empty."""
    if not path:
        return os.open(os.devnull, os.O_WRONLY)
    if path.startswith("file://"):
        path = path[len("file://") :]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    elif "://" in path:
        raise ShimError("InvalidArgument", f"unsupported stdio URI {path!r} (FIFO, file path or file:// only)")
    if os.path.exists(path) and is_fifo(path):
        return os.open(path, os.O_RDWR)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)


def cgroup_dirs(pid: int) -> dict[str, str]:
    """The directories of ``pid``'s cgroups: v1 controller name -> directory, "" -> its cgroup2 directory."""
    mounts: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            kind, options = fields[fields.index("-") + 1], fields[fields.index("-") + 3]
            if kind == "cgroup2":
                mounts[""] = (fields[3], fields[4])
            elif kind == "cgroup":
                mounts.update(dict.fromkeys(options.split(","), (fields[3], fields[4])))
    dirs = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                if name in mounts:
                    root, point = mounts[name]
                    dirs[name] = point + (path[len(root) :] if root != "/" and path.startswith(root) else path)
    return dirs


def cgroup_read(directory: str | None, name: str) -> str:
    """The stripped content of a cgroup file, "" when it (or the controller) is missing."""
    try:
        with open(os.path.join(directory or "/nonexistent", name)) as f:
            return f.read().strip()
    except OSError:
        return ""


def cgroup_table(directory: str | None, name: str) -> dict[str, int]:
    """A flat-keyed cgroup file (``key value`` lines) as a dict."""
    return {k: int(v) for k, v in (line.split() for line in cgroup_read(directory, name).splitlines())}


def cgroup_number(directory: str | None, name: str, unlimited: int = 2**64 - 1) -> int:
    """A single-value cgroup file, "max" as ``unlimited`` (runc: 2**64 - 1 for memory, 0 for pids)."""
    value = cgroup_read(directory, name)
    return unlimited if value == "max" else int(value or 0)


def cgroup_stats(dirs: dict[str, str]) -> dict[str, Any]:
    """cpu, memory and pids statistics of the cgroups ``dirs`` in runc's ``events --stats`` shape."""
    if "memory" not in dirs and "" in dirs:
        unified = dirs[""]
        cpu, memory = cgroup_table(unified, "cpu.stat"), cgroup_table(unified, "memory.stat")
        usage = {"total": cpu.get("usage_usec", 0) * 1000, "kernel": cpu.get("system_usec", 0) * 1000}
        usage["user"] = cpu.get("user_usec", 0) * 1000
        throttled = cpu.get("throttled_usec", 0) * 1000
        mem = {
            "usage": cgroup_number(unified, "memory.current"),
            "limit": cgroup_number(unified, "memory.max"),
            "failcnt": cgroup_table(unified, "memory.events").get("max", 0),
        }
        swap = {
            "usage": cgroup_number(unified, "memory.swap.current"),
            "limit": cgroup_number(unified, "memory.swap.max"),
        }
        cache, pids = memory.get("file", 0), unified
    else:
        acct, memory_dir = dirs.get("cpuacct"), dirs.get("memory")
        cpu, memory = cgroup_table(dirs.get("cpu"), "cpu.stat"), cgroup_table(memory_dir, "memory.stat")
        ticks = cgroup_table(acct, "cpuacct.stat")  # USER_HZ (100) ticks
        usage = {"total": cgroup_number(acct, "cpuacct.usage"), "kernel": ticks.get("system", 0) * 10**7}
        usage["user"] = ticks.get("user", 0) * 10**7
        usage["percpu"] = [int(v) for v in cgroup_read(acct, "cpuacct.usage_percpu").split()]
        throttled = cpu.get("throttled_time", 0)

        def entry(prefix: str) -> dict[str, int]:
            names = {
                "usage": "usage_in_bytes",
                "max": "max_usage_in_bytes",
                "limit": "limit_in_bytes",
                "failcnt": "failcnt",
            }
            return {k: cgroup_number(memory_dir, f"{prefix}.{v}") for k, v in names.items()}

        mem, swap, cache, pids = entry("memory"), entry("memory.memsw"), memory.get("cache", 0), dirs.get("pids")
    return {
        "cpu": {
            "usage": usage,
            "throttling": {
                "periods": cpu.get("nr_periods", 0),
                "throttled_periods": cpu.get("nr_throttled", 0),
                "throttled_time": throttled,
            },
        },
        "memory": {"cache": cache, "usage": mem, "swap": swap, "raw": memory},
        "pids": {"current": cgroup_number(pids, "pids.current"), "limit": cgroup_number(pids, "pids.max", 0)},
    }


class Process:
    """The init process (``exec_id`` "") or an exec process, and the fds the shim holds for it."""

    def __init__(self, exec_id: str, stdio: dict[str, Any], spec: dict[str, Any] | None = None) -> None:
        self.exec_id = exec_id
        self.stdio = {k: stdio.get(k) or "" for k in ("stdin", "stdout", "stderr")}
        self.terminal = bool(stdio.get("terminal"))
        self.spec = spec
        self.pid = 0
        self.status = "created"
        self.exit: dict[str, Any] | None = None
        self.console = -1
        self.stdin_wake = -1
        self.threads: list[threading.Thread] = []

    def state(self) -> dict[str, Any]:
        """This process in the shape of the ``state`` result."""
        exit = self.exit or {"exit_status": 0, "exited_at": ""}
        return {
            "pid": self.pid,
            "status": "created" if self.status == "starting" else self.status,
            "exit_status": exit["exit_status"],
            "exited_at": exit["exited_at"],
            "stdio": {**self.stdio, "terminal": self.terminal},
            "terminal": self.terminal,
        }

    def spawn(self, target: Any, *args: Any) -> None:
        """Run ``target(*args)`` on a copier thread of this process."""
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self.threads.append(thread)

    def close_stdin(self) -> None:
        """Stop copying stdin once what was written is passed on (the process then sees end of file
        unless it has a terminal). Idempotent."""
        if self.stdin_wake >= 0:
            os.eventfd_write(self.stdin_wake, 1)


class Shim:
    """The state of one task and the handlers of every protocol method."""

    def __init__(self, args: dict[str, str]) -> None:
        self.id = args["id"]
        self.bundle = args["bundle"]
        self.binary = args.get("binary") or "runc"
        self.root = args.get("runc-root") or ""
        self.socket_path = args["socket"]
        self.cond = threading.Condition()
        self.procs: dict[str, Process] = {}
        self.unclaimed: dict[int, tuple[int, str, float]] = {}
        self.watched: dict[int, Process] = {}
        self.subscribers: list[socket.socket] = []
        self.cgroups: dict[str, str] = {}
        self.oom_kills = 0
        self.oom_announced = 0  # 1 while an OOM was published before oom_kill counted it
        self.deleted = False
        self.counter = 0
        self.epoll = select.epoll()
        self.oom_fds = (-1, -1)

    # -- children -------------------------------------------------------------------------------------

    def reap_loop(self, wake: int) -> None:
        """Reap children on every SIGCHLD (woken through ``wake``) and watch memory.events for OOM kills."""
        self.epoll.register(wake, select.EPOLLIN)
        while True:
            for fd, _ in self.epoll.poll():
                if fd == wake:
                    os.read(wake, 4096)
                    self.reap()
                else:
                    self.check_oom()

    def reap(self) -> None:
        """Collect every exited child: a claimed process's exit is handled, any other one kept for its claimant."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code, at = exit_code(status), timestamp()
            with self.cond:
                proc = self.watched.pop(pid, None)
                if proc is None:
                    now = time.monotonic()
                    self.unclaimed = {p: e for p, e in self.unclaimed.items() if now - e[2] < 60}
                    self.unclaimed[pid] = (code, at, now)
                    self.cond.notify_all()
                    continue
            threading.Thread(target=self.exited, args=(proc, code, at), daemon=True).start()

    def claim(self, proc: Process, pid: int, since: float) -> None:
        """Watch ``pid`` as ``proc``'s; handle at once an exit reaped after ``since``."""
        with self.cond:
            proc.pid = pid
            early = self.unclaimed.pop(pid, None)
            if early is None or early[2] < since:
                self.watched[pid] = proc
                return
        self.exited(proc, early[0], early[1])

    def exited(self, proc: Process, code: int, at: str) -> None:
        """Record ``proc``'s exit in the bundle, then wake its waiters and tell the event subscribers."""
        proc.close_stdin()
        for thread in proc.threads:
            thread.join(2.0)
        if not any(t.is_alive() for t in proc.threads):
            for fd in (proc.console, proc.stdin_wake):
                if fd >= 0:
                    os.close(fd)
            proc.console = proc.stdin_wake = -1
        record = {"exit_status": code, "exited_at": at, "pid": proc.pid}
        try:
            self.write_exit(proc.exec_id or "init", record)
        except OSError as err:  # the waiters must still be answered
            print(f"shim {self.id}: cannot record the exit of {proc.exec_id or 'init'}: {err}", file=sys.stderr)
        with self.cond:
            proc.exit, proc.status = record, "stopped"
            if not proc.exec_id and self.oom_fds[0] >= 0:
                self.check_oom()  # an OOM that killed the init may be signalled but not yet read
                self.epoll.unregister(self.oom_fds[0])
            self.cond.notify_all()
        self.publish({"topic": "/tasks/exit", "container_id": self.id, "id": proc.exec_id or self.id, **record})

    def write_exit(self, name: str, record: dict[str, Any]) -> None:
        """Write ``<bundle>/exits/<name>.json`` atomically (temporary file, rename). Not fsynced: the record
        must outlive the shim and the daemon, not the host (whose reboot ends the container too), and an
        fsync on a busy disk would delay every waiter by milliseconds."""
        directory = os.path.join(self.bundle, "exits")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f)
        os.rename(path + ".tmp", path)

    # -- runc -----------------------------------------------------------------------------------------

    def runc(self, *args: str, stdio: tuple[int, int, int] | None = None, capture: bool = False) -> str:
        """Run ``BINARY [--root R] --log L --log-format json ARGS`` with ``stdio`` (default /dev/null) and return
        its standard output if ``capture``. A failure raises InvalidArgument with the runtime's own error."""
        with self.cond:
            self.counter += 1
            log = os.path.join(self.bundle, f".runc-{self.counter}.log")
        root = ["--root", self.root] if self.root else []
        argv = [self.binary, *root, "--log", log, "--log-format", "json", *args]
        null = os.open(os.devnull, os.O_RDWR)
        fds = list(stdio or (null, null, null))
        reader = -1
        if capture:
            reader, fds[1] = os.pipe()
        actions = [(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in enumerate(fds)]
        try:
            with self.cond:  # the reaper stores the new child's exit only after the stale entry of its pid is gone
                pid = os.posix_spawnp(
                    self.binary,
                    argv,
                    os.environ,
                    file_actions=actions,
                    setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                    setsigmask=(),
                )
                self.unclaimed.pop(pid, None)
        except OSError as err:
            if capture:
                os.close(reader)
            raise ShimError("InvalidArgument", f"cannot run {self.binary}: {err.strerror}") from None
        finally:
            os.close(null)
            if capture:
                os.close(fds[1])
        out = b""
        if capture:
            with os.fdopen(reader, "rb") as r:
                out = r.read()
        with self.cond:
            while pid not in self.unclaimed:
                self.cond.wait()
            code = self.unclaimed.pop(pid)[0]
        message = ""
        try:
            with open(log, "rb") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if entry.get("level") == "error":
                        message = str(entry.get("msg", "")).strip()
            os.unlink(log)
        except OSError:
            pass
        if code:
            raise ShimError("InvalidArgument", message or f"{self.binary} {args[0]} exited with status {code}")
        return out.decode(errors="replace")

    def launch(self, proc: Process, command: list[str]) -> None:
        """Run runc ``create``/``exec`` for ``proc`` with its stdio (or a terminal) and claim its pid."""
        done: list[int] = []  # fds to close once runc has passed them on
        listener: socket.socket | None = None
        try:
            for name in ("stdout", "stderr"):
                done.append(open_output(proc.stdio[name]))
            stdin, feed = open_input(proc.stdio["stdin"])
            done += [stdin, feed]
            if feed >= 0 and not proc.terminal:
                stdin, writer = os.pipe()
                done += [stdin, writer]
            pid_file = os.path.join(self.bundle, f".exec-{proc.exec_id}.pid" if proc.exec_id else "init.pid")
            args = [*command, "--pid-file", pid_file]
            if proc.terminal:
                with self.cond:
                    self.counter += 1
                    console_path = f"{self.socket_path}.c{self.counter}"
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listener.bind(console_path)
                listener.listen(1)
                args += ["--console-socket", console_path]
            since = time.monotonic()
            self.runc(*args, self.id, stdio=(stdin, done[0], done[1]))
            with open(pid_file) as f:
                pid = int(f.read().strip())
            if proc.exec_id:
                os.unlink(pid_file)
            if listener is not None:
                listener.settimeout(10)
                conn, _ = listener.accept()
                with conn:
                    _, fds, _, _ = socket.recv_fds(conn, 1024, 1)
                proc.console = fds[0]
                out = os.dup(done[0])
                proc.spawn(copy, proc.console, out, out)
            if feed >= 0:
                done.remove(feed)
                if proc.console >= 0:
                    target, owned = proc.console, (feed,)
                else:
                    done.remove(writer)
                    target, owned = writer, (feed, writer)
                proc.stdin_wake = os.eventfd(0, os.EFD_CLOEXEC)
                proc.spawn(pump, feed, target, proc.stdin_wake, owned)
            self.claim(proc, pid, since)
        finally:
            if listener is not None:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(console_path)
            for fd in done:
                if fd >= 0:
                    os.close(fd)

    # -- events ---------------------------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        """Send ``event`` as a line to every ``events`` connection; dropped connections are forgotten."""
        line = (json.dumps(event) + "\n").encode()
        with self.cond:
            subscribers = list(self.subscribers)
        for conn in subscribers:
            try:
                conn.sendall(line)
            except OSError:
                with self.cond:
                    if conn in self.subscribers:
                        self.subscribers.remove(conn)

    def watch_oom(self) -> None:
        """Get woken by the kernel on OOM kills in the task's memory cgroup: cgroup2 ``memory.events``
        polls with POLLPRI on change; v1 ``memory.oom_control`` signals an eventfd registered in
        ``cgroup.event_control``."""
        opened: list[int] = []
        try:
            if "memory" in self.cgroups:
                opened.append(os.open(os.path.join(self.cgroups["memory"], "memory.oom_control"), os.O_RDONLY))
                opened.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
                counter, event = opened
                with open(os.path.join(self.cgroups["memory"], "cgroup.event_control"), "w") as f:
                    f.write(f"{event} {counter}")
                self.epoll.register(event, select.EPOLLIN)
            elif "" in self.cgroups:
                opened.append(os.open(os.path.join(self.cgroups[""], "memory.events"), os.O_RDONLY))
                counter = event = opened[0]
                self.epoll.register(event, select.EPOLLPRI | select.EPOLLERR)
            else:
                return
        except OSError:
            for fd in opened:
                os.close(fd)
            return
        self.oom_fds = (event, counter)

    def check_oom(self) -> None:
        """Publish ``/tasks/oom`` for an OOM the kernel signalled: on cgroup v1 every eventfd
        notification of a cgroup still there (it fires as the OOM starts, before ``oom_kill`` counts
        it, as containerd's v1 watcher reads it); on v2 when ``memory.events``' oom_kill grew."""
        event, counter = self.oom_fds
        if event < 0:
            return
        notified = False
        try:
            if event != counter:
                notified = int.from_bytes(os.read(event, 8), "little") > 0
            os.lseek(counter, 0, os.SEEK_SET)
            fields = dict(line.split()[:2] for line in os.read(counter, 4096).decode().splitlines())
        except BlockingIOError:
            return  # no notification pending
        except (OSError, ValueError):
            return  # the cgroup is gone: its removal woke us, not an OOM
        kills = int(fields.get("oom_kill", 0))
        if kills > self.oom_kills:  # one event per kill, less the one announced early
            fresh = kills - self.oom_kills - self.oom_announced
            self.oom_kills, self.oom_announced = kills, 0
            if fresh > 0:
                self.publish({"topic": "/tasks/oom", "container_id": self.id})
        elif notified and not self.oom_announced:  # v1: the OOM is under way, its kill not counted yet
            self.oom_announced = 1
            self.publish({"topic": "/tasks/oom", "container_id": self.id})

    # -- methods --------------------------------------------------------------------------------------

    def process(self, params: dict[str, Any]) -> Process:
        """The process ``params["exec_id"]`` names ("" or missing: init). NotFound if there is none."""
        exec_id = params.get("exec_id") or ""
        proc = self.procs.get(exec_id)
        if proc is None:
            raise ShimError("NotFound", f"process {exec_id or self.id!r} not found")
        return proc

    def init(self) -> Process:
        """The init process. NotFound before ``create`` and after ``delete``."""
        return self.process({})

    def do_create(self, params: dict[str, Any]) -> dict[str, Any]:
        """``runc create`` the container with ``params["stdio"]``; its init process is left created."""
        with self.cond:
            if "" in self.procs or self.deleted:
                raise ShimError("AlreadyExists", f"task {self.id} already created")
            proc = self.procs[""] = Process("", params.get("stdio") or {})
        try:
            self.launch(proc, ["create", "--bundle", self.bundle])
        except BaseException:
            with contextlib.suppress(ShimError):  # runc may have made the container before the failure
                self.runc("delete", "--force", self.id)
            with self.cond:
                del self.procs[""]
            raise
        with contextlib.suppress(OSError, ValueError):
            self.cgroups = cgroup_dirs(proc.pid)
        self.watch_oom()
        return {"pid": proc.pid}

    def do_start(self, params: dict[str, Any]) -> dict[str, Any]:
        """Start the created init (``runc start``) or exec process (``runc exec --detach``)."""
        proc = self.process(params)
        init = self.init()
        with self.cond:
            if proc.status != "created":
                raise ShimError(
                    "FailedPrecondition", f"process {proc.exec_id or self.id} is {proc.status}, not created"
                )
            if proc.exec_id and init.status != "running":
                raise ShimError("FailedPrecondition", f"task {self.id} is {init.status}, not running")
            proc.status = "starting"
        try:
            if proc.exec_id:
                spec_path = os.path.join(self.bundle, f".exec-{proc.exec_id}.json")
                with open(spec_path, "w") as f:
                    json.dump(proc.spec, f)
                try:
                    self.launch(proc, ["exec", "--detach", "--process", spec_path])
                finally:
                    os.unlink(spec_path)
            else:
                self.runc("start", self.id)
        except BaseException:
            with self.cond:
                if proc.status == "starting":
                    proc.status = "created"
            raise
        with self.cond:
            if proc.status == "starting":
                proc.status = "running"
        return {"pid": proc.pid}

    def do_exec(self, params: dict[str, Any]) -> dict[str, Any]:
        """Add exec process ``exec_id`` (OCI ``process``, ``stdio``), created; ``start`` runs it."""
        exec_id = params.get("exec_id") or ""
        spec = params.get("process")
        if not exec_id or "/" in exec_id or exec_id == "init" or not isinstance(spec, dict):
            raise ShimError("InvalidArgument", f"exec needs a valid exec_id (not {exec_id!r}) and a process object")
        stdio = params.get("stdio") or {}
        with self.cond:
            if exec_id in self.procs:
                raise ShimError("AlreadyExists", f"id {exec_id}")  # containerd's words
            if self.init().status != "running":
                raise ShimError("FailedPrecondition", f"task {self.id} is not running")
            self.procs[exec_id] = Process(exec_id, stdio, {**spec, "terminal": bool(stdio.get("terminal"))})
        return {}

    def do_state(self, params: dict[str, Any]) -> dict[str, Any]:
        """The process's pid, status, exit and stdio."""
        with self.cond:
            return self.process(params).state()

    def do_wait(self, params: dict[str, Any]) -> dict[str, Any]:
        """Block until the process has exited; its exit status and time."""
        proc = self.process(params)
        with self.cond:
            while proc.exit is None:
                self.cond.wait()
            return {k: proc.exit[k] for k in ("exit_status", "exited_at")}

    def do_kill(self, params: dict[str, Any]) -> dict[str, Any]:
        """Signal the process, or with ``all`` every process of the container. NotFound once it has exited."""
        proc = self.process(params)
        sig, all = int(params.get("signal", signal.SIGTERM)), bool(params.get("all"))
        if proc.exec_id:
            if proc.exit is not None or not proc.pid:
                raise ShimError("NotFound", "process already finished")
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                raise ShimError("NotFound", "process already finished") from None
            return {}
        if proc.exit is not None and not all:
            raise ShimError("NotFound", "process already finished")
        try:
            self.runc("kill", *(["--all"] if all else []), self.id, str(sig))
        except ShimError as err:
            text = str(err).lower()
            if "not running" in text or "no such process" in text or "does not exist" in text:
                raise ShimError("NotFound", "process already finished") from None
            raise ShimError("FailedPrecondition", str(err)) from None
        return {}

    def pause_resume(self, command: str, before: str, after: str) -> dict[str, Any]:
        """Run ``runc pause``/``resume`` when the init is ``before``; it is ``after`` then."""
        init = self.init()
        with self.cond:
            if init.status != before:
                raise ShimError("FailedPrecondition", f"task {self.id} is {init.status}, not {before}")
        self.fail_as("FailedPrecondition", command, self.id)
        with self.cond:
            if init.status == before:
                init.status = after
        return {}

    def fail_as(self, code: str, *args: str, capture: bool = False) -> str:
        """:meth:`runc`, its failure reported with ``code``."""
        try:
            return self.runc(*args, capture=capture)
        except ShimError as err:
            raise ShimError(code, str(err)) from None

    def do_pause(self, params: dict[str, Any]) -> dict[str, Any]:
        """Freeze the running container."""
        return self.pause_resume("pause", "running", "paused")

    def do_resume(self, params: dict[str, Any]) -> dict[str, Any]:
        """Thaw the paused container."""
        return self.pause_resume("resume", "paused", "running")

    def do_pids(self, params: dict[str, Any]) -> dict[str, Any]:
        """The container's processes (``runc ps``), exec processes' main pids with their exec id."""
        if self.init().exit is not None:
            return {"pids": []}
        pids = json.loads(self.fail_as("FailedPrecondition", "ps", "--format", "json", self.id, capture=True) or "[]")
        with self.cond:
            execs = {p.pid: p.exec_id for p in self.procs.values() if p.exec_id and p.exit is None}
        return {"pids": [{"pid": pid, "exec_id": execs.get(pid, "")} for pid in pids or ()]}

    def do_resize(self, params: dict[str, Any]) -> dict[str, Any]:
        """Set the size of the process's terminal. Without one (never had, or closed at its exit) a no-op
        for the init process, as containerd's, and FailedPrecondition for an exec process."""
        import errno
        import fcntl
        import struct
        import termios

        proc = self.process(params)
        size = struct.pack("HHHH", int(params.get("height") or 0), int(params.get("width") or 0), 0, 0)
        try:
            if proc.console < 0:
                raise OSError(errno.EBADF, "no terminal")
            fcntl.ioctl(proc.console, termios.TIOCSWINSZ, size)
        except OSError as err:  # also a terminal closed at the process's exit while this call ran
            if err.errno not in (errno.EBADF, errno.EIO, errno.ENOTTY):
                raise
            if proc.exec_id:
                raise ShimError("FailedPrecondition", f"process {proc.exec_id} has no terminal") from None
        return {}

    def do_close_io(self, params: dict[str, Any]) -> dict[str, Any]:
        """Close the process's stdin once what was written to it is passed on."""
        self.process(params).close_stdin()
        return {}

    def running_init(self) -> Process:
        """The init process; FailedPrecondition unless it is running or paused."""
        init = self.init()
        if init.exit is not None or init.status == "created":
            raise ShimError("FailedPrecondition", f"task {self.id} is {init.status}")
        return init

    def do_update(self, params: dict[str, Any]) -> dict[str, Any]:
        """Apply OCI ``linux.resources`` to the running container (``runc update --resources``)."""
        self.running_init()
        path = os.path.join(self.bundle, ".resources.json")
        with open(path, "w") as f:
            json.dump(params.get("resources") or {}, f)
        try:
            self.runc("update", "--resources", path, self.id)
        finally:
            os.unlink(path)
        return {}

    def do_stats(self, params: dict[str, Any]) -> dict[str, Any]:
        """The task's cgroup statistics shaped as the ``data`` of ``runc events --stats`` (crun has no
        ``events``, so the shim reads the cgroup files itself, v1 or v2)."""
        self.running_init()
        return cgroup_stats(self.cgroups)

    def do_delete(self, params: dict[str, Any]) -> dict[str, Any]:
        """Forget a process that is not running; for the init also ``runc delete`` the container."""
        proc = self.process(params)
        with self.cond:
            if proc.status in ("running", "paused", "starting"):
                raise ShimError("FailedPrecondition", f"process {proc.exec_id or self.id} is {proc.status}")
            if not proc.exec_id and any(
                p.exit is None and p.status != "created" for p in self.procs.values() if p.exec_id
            ):
                raise ShimError("FailedPrecondition", f"task {self.id} still has running exec processes")
        if not proc.exec_id:
            self.fail_as("FailedPrecondition", "delete", "--force", self.id)
            with self.cond:
                deadline = time.monotonic() + 5
                while proc.pid and proc.exit is None and self.cond.wait(max(0, deadline - time.monotonic())):
                    pass
        with self.cond:
            if self.procs.get(proc.exec_id) is not proc:
                raise ShimError("NotFound", f"process {proc.exec_id or self.id!r} not found")
            removed = list(self.procs.values()) if not proc.exec_id else [proc]
            for gone in removed:
                del self.procs[gone.exec_id]
                if gone.exit is None:  # never started: its waiters get the zero status delete reports
                    gone.exit = {"exit_status": 0, "exited_at": "", "pid": gone.pid}
            self.cond.notify_all()
            if not proc.exec_id:
                self.deleted = True
                for fd in set(self.oom_fds) - {-1}:
                    os.close(fd)
                self.oom_fds = (-1, -1)
        return {"exit_status": proc.exit["exit_status"], "exited_at": proc.exit["exited_at"], "pid": proc.pid}

    def do_ping(self, params: dict[str, Any]) -> dict[str, Any]:
        """The shim's pid."""
        return {"pid": os.getpid()}

    # -- serving --------------------------------------------------------------------------------------

    def serve(self, conn: socket.socket) -> None:
        """Answer the requests of one connection, one line each, until it closes or asks for events."""
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                method = ""
                try:
                    request = json.loads(line)
                    method = request.get("method", "")
                    params = request.get("params") or {}
                    if method == "events":
                        with self.cond:
                            self.subscribers.append(conn)
                        lines.read()  # until the client closes
                        with self.cond:
                            self.subscribers.remove(conn)
                        return
                    if method == "shutdown":
                        conn.sendall(b'{"result": {}}\n')
                        if self.deleted or "" not in self.procs:
                            self.exit_now()
                        continue
                    handler = getattr(self, f"do_{method}", None)
                    if handler is None:
                        raise ShimError("InvalidArgument", f"unknown method {method!r}")
                    response: dict[str, Any] = {"result": handler(params)}
                except ShimError as err:
                    response = {"error": {"code": err.code, "message": str(err)}}
                except (ValueError, TypeError, AttributeError) as err:
                    response = {"error": {"code": "InvalidArgument", "message": f"bad {method or 'request'}: {err}"}}
                except Exception as err:
                    response = {"error": {"code": "Internal", "message": f"{method}: {err!r}"}}
                try:
                    conn.sendall((json.dumps(response) + "\n").encode())
                except OSError:
                    return

    def exit_now(self) -> None:
        """Remove the socket and exit at once."""
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
        os._exit(0)

    def run(self, ready: int, process: tuple[int, Any]) -> None:
        """Serve forever in a ``process`` made by :func:`prepare`; write the shim's pid and a newline to
        ``ready`` (and close it) once the socket listens."""
        wake, libc = process
        if os.path.basename(self.binary) == "crun" and _hybrid_cgroups():
            _hide_unified_hierarchy(libc)
        with open(os.path.join(self.bundle, "shim.pid"), "w") as f:
            f.write(str(os.getpid()))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        os.makedirs(os.path.dirname(self.socket_path) or ".", exist_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        server.bind(self.socket_path)
        os.umask(old)
        server.listen(128)
        os.write(ready, f"{os.getpid()}\n".encode())
        os.close(ready)
        threading.Thread(target=self.reap_loop, args=(wake,), daemon=True).start()  # before any request
        while True:
            conn, _ = server.accept()
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()


def _hybrid_cgroups() -> bool:
    """Whether the host mixes cgroup v1 hierarchies with a v2 one at /sys/fs/cgroup/unified (systemd's
    "hybrid" layout), which crun refuses ("cgroups in hybrid mode not supported")."""
    with open("/proc/self/mountinfo") as mountinfo:
        points = {line.split(" - ", 1)[0].split()[4]: line.split(" - ", 1)[1].split()[0] for line in mountinfo}
    return points.get("/sys/fs/cgroup") == "tmpfs" and points.get("/sys/fs/cgroup/unified") == "cgroup2"


def _hide_unified_hierarchy(libc: Any) -> None:
    """Move this shim (and so the runtime and containers it starts) into a private mount namespace
    without /sys/fs/cgroup/unified: crun then sees a plain cgroup v1 host, as runc treats this one.
    The host's mounts are untouched; the bundle's rootfs, mounted before the shim started, is kept."""
    import ctypes

    clone_newns, ms_rec, ms_private, mnt_detach = 0x00020000, 0x4000, 0x40000, 2
    if libc.unshare(clone_newns) or libc.mount(None, b"/", None, ms_rec | ms_private, None):
        sys.exit(f"shim: cannot make a private mount namespace for crun: {os.strerror(ctypes.get_errno())}")
    if libc.umount2(b"/sys/fs/cgroup/unified", mnt_detach):
        sys.exit(f"shim: cannot hide the cgroup v2 hierarchy from crun: {os.strerror(ctypes.get_errno())}")


def prepare() -> tuple[int, Any]:
    """Set up the process for any task: SIGCHLD wakes the reaper through a pipe (its read end is returned,
    with libc), and the shim is a child subreaper (the container processes become its children)."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(36, 1, 0, 0, 0):  # PR_SET_CHILD_SUBREAPER
        sys.exit(f"shim: cannot become a child subreaper: {os.strerror(ctypes.get_errno())}")
    return wake_r, libc


def parse(argv: list[str]) -> dict[str, str]:
    """``--key value`` arguments as a dict (exits naming the missing ones); stderr goes to ``--log``; the
    working directory becomes the bundle."""
    args = {argv[i][2:]: argv[i + 1] for i in range(0, len(argv) - 1, 2) if argv[i].startswith("--")}
    missing = [k for k in ("id", "bundle", "socket") if not args.get(k)]
    if missing:
        sys.exit(f"shim: missing --{' --'.join(missing)}")
    if args.get("log"):
        fd = os.open(args["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        os.dup2(fd, 2)
        os.close(fd)
    os.chdir(args["bundle"])
    return args


def main(argv: list[str]) -> None:
    """Run as a program: parse the arguments, detach (fork; the parent exits 0 once the socket listens,
    1 if the shim failed first), and serve."""
    args = parse(argv)
    ready_r, ready_w = os.pipe()
    if os.fork():
        os.close(ready_w)
        ok = os.read(ready_r, 64)
        os._exit(0 if ok else 1)
    os.close(ready_r)
    with contextlib.suppress(OSError):
        os.setsid()
    Shim(args).run(ready_w, prepare())


def serve_forked(argv: list[str], ready: int, process: tuple[int, Any]) -> None:
    """Serve in a process the fork server (``forkserver.py``) has detached and set up (:func:`prepare`) ahead of
    the task: parse and serve; the pid goes to ``ready`` once the socket listens."""
    Shim(parse(argv)).run(ready, process)


if __name__ == "__main__":
    main(sys.argv[1:])
