"""ckctl tasks ls|kill|ps|pause|resume|metrics|exec|rm, as ``ctr tasks``; and what ``run`` shares with
``exec``: a process attached to this terminal through FIFOs (:class:`Stdio`, :func:`attach`).

A task is the running side of a container and has its id; ``--exec-id`` names one of its exec
processes instead of the init process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import signal
import sys
import tempfile
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from typing import Any

from core.cli.args import add_listing_arguments, for_each
from core.cli.client import Client, CliError
from core.cli.output import print_json, print_table
from core.cli.records import print_records

TASK_COLUMNS = {
    "TASK": lambda task: task["id"],
    "PID": lambda task: task["pid"],
    "STATUS": lambda task: task["status"],
}
SIGNAL_CHECK_SECONDS = 0.1
"""How often the main thread, waiting for the process, runs the signal handlers Python has queued."""
FORWARDED_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
"""What ``run`` and ``exec`` pass on to the process they attached to (ctr passes every catchable signal)."""
OUTPUT_GRACE_SECONDS = 2.0
"""How long output may keep arriving once the process exited (its last writes travel through the shim)."""
METRICS = (
    ("pids", ("current", "limit")),
    ("cpu", ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec")),
    ("memory", ("usage", "usage_limit", "swap_usage", "swap_limit")),
)
"""The cgroup v2 metrics ``tasks metrics`` shows (group, fields), as ctr."""
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("tasks", aliases=["task", "t"], help="manage tasks (running containers)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    ls = verbs.add_parser("ls", aliases=["list"], help="list tasks (TASK PID STATUS)")
    add_listing_arguments(ls, "print task ids only")
    ls.set_defaults(handler=list_tasks)

    kill = verbs.add_parser("kill", help="signal a task's process (default SIGTERM)")
    kill.add_argument("-s", "--signal", default="SIGTERM", type=parse_signal, help="name or number")
    kill.add_argument("-a", "--all", action="store_true", help="signal every process of the task")
    kill.add_argument("--exec-id", default="", help="signal this exec process instead of the init process")
    kill.add_argument("id", metavar="ID")
    kill.set_defaults(handler=kill_task)

    ps = verbs.add_parser("ps", help="list a task's processes (PID INFO)")
    ps.add_argument("--json", action="store_true", help="print a JSON list")
    ps.add_argument("id", metavar="ID")
    ps.set_defaults(handler=list_processes)

    for verb, what, handler in (("pause", "freeze a task", pause_task), ("resume", "thaw a paused task", resume_task)):
        command = verbs.add_parser(verb, help=what)
        command.add_argument("id", metavar="ID")
        command.set_defaults(handler=handler)

    metrics = verbs.add_parser("metrics", aliases=["metric"], help="one sample of a task's cgroup metrics")
    metrics.add_argument("--format", choices=("table", "json"), default="table")
    metrics.add_argument("id", metavar="ID")
    metrics.set_defaults(handler=show_metrics)

    exec_ = verbs.add_parser("exec", help="run another process in a task and wait for it")
    exec_.add_argument("--exec-id", required=True, help="the new process's id (unique in the task)")
    exec_.add_argument("-t", "--tty", action="store_true", help="give the process a terminal")
    exec_.add_argument("-d", "--detach", action="store_true", help="start it and return")
    exec_.add_argument("--cwd", default="", help="working directory (default: the container's)")
    exec_.add_argument("id", metavar="ID")
    exec_.add_argument("args", nargs=argparse.REMAINDER, metavar="CMD [ARG...]")
    exec_.set_defaults(handler=exec_process)

    rm = verbs.add_parser("rm", aliases=["remove", "delete", "del"], help="delete stopped tasks")
    rm.add_argument("-f", "--force", action="store_true", help="kill the process first (SIGKILL) and wait")
    rm.add_argument("--exec-id", default="", help="delete this exec process of the one ID instead")
    rm.add_argument("ids", nargs="+", metavar="ID")
    rm.set_defaults(handler=remove_tasks)


def parse_signal(text: str) -> int:
    """A signal given as ``SIGKILL``, ``KILL``, ``kill`` or ``9``."""
    if text.isdigit():
        number = int(text)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = text.upper()
        with contextlib.suppress(KeyError):
            return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    raise argparse.ArgumentTypeError(f"invalid signal {text!r}")


def service_stub(client: Client) -> Any:
    from core.api.containerd.services.tasks.v1 import tasks_pb2

    return client.stub(tasks_pb2, "Tasks")


def unpack_any(value: Any, message: Any) -> bool:
    """Decode the ``google.protobuf.Any`` ``value`` into ``message`` when it holds that type; containerd's
    type URLs are often the bare type name, which ``Any.Unpack`` does not accept."""
    if value.type_url.rpartition("/")[2] != message.DESCRIPTOR.full_name:
        return False
    message.ParseFromString(value.value)
    return True


def message_record(message: Any) -> dict[str, Any]:
    """The fields a protobuf ``message`` has set, by name, numbers as numbers (as ctr prints metrics)."""
    record = {}
    for field, value in message.ListFields():
        repeated = field.is_repeated
        if field.type == field.TYPE_MESSAGE:
            value = [message_record(item) for item in value] if repeated else message_record(value)
        elif repeated:
            value = list(value)
        record[field.name] = value
    return record


def task_record(process: Any) -> dict[str, Any]:
    """A ``containerd.v1.types.Process`` as ``ls --json`` prints it."""
    from core.api.containerd.types.task import task_pb2

    return {"id": process.id, "pid": process.pid, "status": task_pb2.Status.Name(process.status)}


def list_tasks(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb

    tasks = client.call(service_stub(client).List, pb.ListTasksRequest()).tasks
    print_records([task_record(task) for task in tasks], TASK_COLUMNS, args, key="id")
    return 0


def kill_task(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb

    if args.all and args.exec_id:
        raise CliError("give --exec-id or --all, not both")
    request = pb.KillRequest(container_id=args.id, exec_id=args.exec_id, signal=args.signal, all=args.all)
    client.call(service_stub(client).Kill, request)
    return 0


def list_processes(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.runc.v1 import options_pb2
    from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb

    processes = []
    for info in client.call(service_stub(client).ListPids, pb.ListPidsRequest(container_id=args.id)).processes:
        details = options_pb2.ProcessDetails()
        processes.append({"pid": info.pid, "exec_id": details.exec_id if unpack_any(info.info, details) else ""})
    if args.json:
        print_json(processes)
    else:
        print_table(("PID", "INFO"), [(process["pid"], process["exec_id"] or "-") for process in processes])
    return 0


def pause_task(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb

    client.call(service_stub(client).Pause, pb.PauseTaskRequest(container_id=args.id))
    return 0


def resume_task(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb

    client.call(service_stub(client).Resume, pb.ResumeTaskRequest(container_id=args.id))
    return 0


def show_metrics(client: Client, args: argparse.Namespace) -> int:
    """As ``ctr tasks metrics``: the cgroup v2 sample as a METRIC VALUE table or as JSON."""
    from core.api.containerd.cgroups.v2 import metrics_pb2
    from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb
    from core.cli.records import timestamp_text

    request = pb.MetricsRequest(filters=[f"id=={args.id}"])
    found = client.call(service_stub(client).Metrics, request).metrics
    if not found:
        raise CliError(f"no metrics for task {args.id!r}")
    metric = found[0]
    data = metrics_pb2.Metrics()
    if not unpack_any(metric.data, data):
        raise CliError(f"cannot decode metrics of type {metric.data.type_url!r}")
    if args.format == "json":
        print_json(message_record(data))
        return 0
    print_table(("ID", "TIMESTAMP"), [(metric.id, timestamp_text(metric.timestamp))])
    print()
    rows = [(f"{group}.{name}", getattr(getattr(data, group), name)) for group, names in METRICS for name in names]
    print_table(("METRIC", "VALUE"), rows)
    return 0


def exec_process(client: Client, args: argparse.Namespace) -> int:
    """As ``ctr tasks exec``: the container's process spec with CMD ARG... (and ``--cwd``, ``-t``), run
    attached (exit code passed through, the process deleted after) or detached (``-d``)."""
    from google.protobuf import any_pb2

    from core.api.containerd.services.containers.v1 import containers_pb2
    from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb

    if not args.args:
        raise CliError("give the command to run after the container id")
    stub = service_stub(client)
    containers = client.stub(containers_pb2, "Containers")
    container = client.call(containers.Get, containers_pb2.GetContainerRequest(id=args.id)).container
    try:
        process = json.loads(container.spec.value)["process"]
    except (ValueError, KeyError, TypeError):
        raise CliError(f"container {args.id!r} has no OCI process spec to exec from") from None
    process.update(args=args.args, terminal=args.tty)
    if args.tty:
        set_console_size(process)
    if args.cwd:
        process["cwd"] = args.cwd
    spec = any_pb2.Any(type_url=PROCESS_TYPE_URL, value=json.dumps(process).encode())

    def exec_request(stdio: Stdio | None) -> Any:
        fields = stdio.fields() if stdio is not None else {}
        return pb.ExecProcessRequest(container_id=args.id, exec_id=args.exec_id, spec=spec, **fields)

    if args.detach:
        client.call(stub.Exec, exec_request(None))
        client.call(stub.Start, pb.StartRequest(container_id=args.id, exec_id=args.exec_id))
        return 0
    with Stdio(args.tty) as stdio:
        client.call(stub.Exec, exec_request(stdio))
        try:
            return attach(client, args.id, args.exec_id, stdio)
        finally:
            request = pb.DeleteProcessRequest(container_id=args.id, exec_id=args.exec_id)
            with contextlib.suppress(CliError):  # the first error is the one to report
                client.call(stub.DeleteProcess, request)


def remove_tasks(client: Client, args: argparse.Namespace) -> int:
    """As ``ctr tasks rm``: delete each task (``-f``: SIGKILL every process first and wait for the end),
    or with ``--exec-id`` one exec process of the single ID; prints each id deleted."""
    from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb

    if args.exec_id and len(args.ids) != 1:
        raise CliError("--exec-id takes exactly one task id")
    stub = service_stub(client)

    def remove(id: str) -> None:
        if args.force:
            kill = pb.KillRequest(container_id=id, exec_id=args.exec_id, signal=signal.SIGKILL, all=not args.exec_id)
            with contextlib.suppress(CliError):  # already stopped: nothing to kill
                client.call(stub.Kill, kill)
                client.call(stub.Wait, pb.WaitRequest(container_id=id, exec_id=args.exec_id), timeout=None)
        if args.exec_id:
            client.call(stub.DeleteProcess, pb.DeleteProcessRequest(container_id=id, exec_id=args.exec_id))
        else:
            client.call(stub.Delete, pb.DeleteTaskRequest(container_id=id))

    for_each(args.ids, remove)
    return 0


# -- an attached process ---------------------------------------------------------------------------


class Stdio:
    """FIFOs in a private directory for one process's stdin, stdout and (without a terminal) stderr,
    and the copying between them and ckctl's own standard streams.

    Every FIFO is opened here before the process exists, so nothing blocks: stdin read-write, the
    outputs read-only and non-blocking (they see end of file once the process's side is closed).
    Used as a context manager, which removes the directory and closes what is safe to close.
    """

    def __init__(self, terminal: bool) -> None:
        self.terminal = terminal
        self.directory = tempfile.mkdtemp(prefix="ckctl-io-")
        self.paths = {name: os.path.join(self.directory, name) for name in ("stdin", "stdout", "stderr")}
        if terminal:
            del self.paths["stderr"]
        for path in self.paths.values():
            os.mkfifo(path, 0o600)
        self.stdin = os.open(self.paths["stdin"], os.O_RDWR | os.O_CLOEXEC)
        outputs = {"stdout": sys.stdout.fileno(), "stderr": sys.stderr.fileno()}
        self.outputs = {
            os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC): outputs[name]
            for name, path in self.paths.items()
            if name != "stdin"
        }
        self.wake_reader, self.wake_writer = os.pipe2(os.O_CLOEXEC)
        self.copier = threading.Thread(target=self._copy_outputs, name="ckctl-stdout", daemon=True)
        self.feeder: threading.Thread | None = None

    def fields(self) -> dict[str, Any]:
        """The stdio fields of a CreateTaskRequest or ExecProcessRequest."""
        return {**self.paths, "terminal": self.terminal}

    def start(self, close_stdin: Callable[[], None]) -> None:
        """Start copying; ``close_stdin`` is called once ckctl's stdin reaches its end (after the FIFO closed)."""
        self.copier.start()
        self.feeder = threading.Thread(target=self._feed_stdin, args=(close_stdin,), name="ckctl-stdin", daemon=True)
        self.feeder.start()

    def finish(self, grace: float = OUTPUT_GRACE_SECONDS) -> None:
        """Wait up to ``grace`` seconds for the outputs to end, then copy what is left and stop."""
        if self.copier.is_alive():
            self.copier.join(grace)
            os.write(self.wake_writer, b"x")
            self.copier.join()

    def _copy_outputs(self) -> None:
        pending = dict(self.outputs)
        while pending:
            ready = select.select([*pending, self.wake_reader], [], [])[0]
            woken = self.wake_reader in ready
            for fd in [fd for fd in ready if fd in pending]:
                if not _copy_available(fd, pending[fd]):
                    del pending[fd]
            if woken:
                return

    def _feed_stdin(self, close_stdin: Callable[[], None]) -> None:
        with contextlib.suppress(OSError):
            while data := os.read(sys.stdin.fileno(), 65536):
                _write_all(self.stdin, data)
        os.close(self.stdin)
        self.stdin = -1
        with contextlib.suppress(CliError):
            close_stdin()

    def __enter__(self) -> Stdio:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.copier.is_alive():  # never started copying, or an error came between
            os.write(self.wake_writer, b"x")
            self.copier.join()
        for fd in (*self.outputs, self.wake_reader, self.wake_writer):
            os.close(fd)
        if self.feeder is None and self.stdin >= 0:  # a running feeder may still write to it
            os.close(self.stdin)
        shutil.rmtree(self.directory, ignore_errors=True)


def _copy_available(source: int, target: int) -> bool:
    """Copy what ``source`` has now to ``target`` (whose failures drop the data); False at end of file."""
    while True:
        try:
            data = os.read(source, 65536)
        except BlockingIOError:
            return True
        if not data:
            return False
        with contextlib.suppress(OSError):
            _write_all(target, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def set_console_size(process: dict[str, Any]) -> None:
    """Give an OCI ``process`` the size of ckctl's terminal, so it starts with the right one (nothing when
    stdin is no terminal)."""
    with contextlib.suppress(OSError):
        rows, columns = termios.tcgetwinsize(sys.stdin.fileno())
        process["consoleSize"] = {"height": rows, "width": columns}


def attach(client: Client, container_id: str, exec_id: str, stdio: Stdio) -> int:
    """Start the created process ``exec_id`` ("" the init process) of task ``container_id`` and stay with
    it until it exits: stdio copied, the :data:`FORWARDED_SIGNALS` sent on to it, and with a terminal
    ckctl's tty in raw mode (restored after) and its size passed on at each SIGWINCH (the first one is
    in the process spec, see :func:`set_console_size`).
    Returns the process's exit status; its output is complete when this returns."""
    from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb

    stub = service_stub(client)
    outcome: list[Any] = []
    done = threading.Event()

    def wait() -> None:
        try:
            request = pb.WaitRequest(container_id=container_id, exec_id=exec_id)
            outcome.append(client.call(stub.Wait, request, timeout=None))
        except CliError as err:
            outcome.append(err)
        done.set()

    def forward(number: int, _frame: object) -> None:
        request = pb.KillRequest(container_id=container_id, exec_id=exec_id, signal=number)
        with contextlib.suppress(CliError):  # it may have exited meanwhile
            client.call(stub.Kill, request)

    def resize(*_: object) -> None:
        with contextlib.suppress(OSError, CliError):
            rows, columns = termios.tcgetwinsize(sys.stdin.fileno())
            request = pb.ResizePtyRequest(container_id=container_id, exec_id=exec_id, width=columns, height=rows)
            client.call(stub.ResizePty, request)

    handlers = {number: forward for number in FORWARDED_SIGNALS}
    if stdio.terminal:
        handlers[signal.SIGWINCH] = resize
    close = pb.CloseIORequest(container_id=container_id, exec_id=exec_id, stdin=True)
    threading.Thread(target=wait, name="ckctl-wait", daemon=True).start()  # before Start: no exit is missed
    with _raw_terminal(stdio.terminal), _signal_handlers(handlers):
        client.call(stub.Start, pb.StartRequest(container_id=container_id, exec_id=exec_id))
        stdio.start(lambda: client.call(stub.CloseIO, close))
        # Not one blocking wait: a signal the kernel hands to another thread (gRPC's) only sets a flag
        # that the main thread checks when it runs, so the forwarding handler would never run.
        while not done.wait(SIGNAL_CHECK_SECONDS):
            pass
    stdio.finish()
    result = outcome[0]
    if isinstance(result, CliError):
        raise result
    return int(result.exit_status)


@contextlib.contextmanager
def _raw_terminal(wanted: bool) -> Iterator[None]:
    """ckctl's stdin in raw mode while inside, when ``wanted`` and stdin is a terminal; restored after."""
    fd = sys.stdin.fileno()
    if not wanted or not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _signal_handlers(handlers: dict[int, Callable[[int, Any], None]]) -> Iterator[None]:
    saved = {number: signal.signal(number, handler) for number, handler in handlers.items()}
    try:
        yield
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)
