"""A warm fork server ("zygote") for shims: one ``python -S -I`` process that has imported the shim forks
a detached shim per task on request, so no task waits for an interpreter to start and import (~60 ms).

Stdlib-only, both ends in one module: the zygote runs it as ``forkserver`` (``python -S -I -c``, the
shim's directory on ``sys.path``), the daemon imports it as ``plugins.runtime_runc.forkserver`` for
:class:`ForkServer`.

Protocol, over a ``SOCK_SEQPACKET`` socket pair (the zygote's end is the fd its command line names): the
zygote first sends ``ok CAPACITY`` (the bytes of command line its shims can show); then each request is
one message, the JSON ``{"argv": shim arguments, "title": command line, "log": output file, "umask": the
daemon's}`` with the write end of a pipe attached.

The zygote keeps one spare shim forked ahead of the next request, so no task waits for the fork and
the set-up: the child starts a new session and forks again (the spare is reparented away from the zygote
and the daemon, to init or the nearest subreaper), closes every other descriptor, resets its signal mask
and handlers and sets itself up (:func:`shim.prepare`), then waits on a socket pair of its own. The
zygote passes it the next request and forks the next spare at once (in a burst, requests so go to spares
still setting up, in parallel). The spare takes the daemon's umask, shows ``title`` as its
``/proc/PID/cmdline`` (written over the zygote's padded one, so it is found by its bundle as a spawned
shim is) and runs :func:`shim.serve_forked`, which writes its pid and a newline to the pipe once its
socket listens; the pipe closes without a line if it fails first. The spare writes :data:`TAKEN` to the pipe
before anything else, so a request lost with a spare that died meanwhile is told from a shim that failed.
The zygote exits when the daemon's end closes (the daemon stopped or died), and its spare with it.
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
if TYPE_CHECKING:  # as in shim.py: the zygote imports neither typing nor subprocess, its shims would carry them
    import subprocess
    from collections.abc import Sequence

TITLE_ROOM = 4096
"""Bytes of command line the zygote reserves for its shims (a shim's is ~300 + 4 x the state path)."""
_MARK = "containerkit-shim-zygote"
SPARE_MARK = "containerkit-shim-spare"
"""The command line of a spare shim is this mark and its zygote's pid."""
_HELLO_TIMEOUT = 20.0
_RETRY_AFTER = 30.0
"""Seconds after a zygote failed to start before another is tried (shims are spawned meanwhile)."""
_CLOSE_TIMEOUT = 2.0
_SEND_TIMEOUT = 5.0
TAKEN = b"+"
"""What a spare writes to the ready pipe first, on taking a request: a pipe that closes without it means
the spare (or the zygote) died before, and nothing was started."""


class Unusable(Exception):
    """The zygote cannot fork this shim (not running, failed to start, died): spawn it the usual way."""


# -- the zygote ---------------------------------------------------------------------------------------------


def _argv_area() -> tuple[int, int]:
    """Where this process's command line lies in its memory (``arg_start``, ``arg_end`` of /proc/self/stat)."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[45]), int(fields[46])  # fields 48 and 49; fields[0] is field 3


def serve(fd: int) -> None:
    """The zygote's loop on its end ``fd`` of the socket pair: hand each request to the spare shim and fork
    the next spare, until the daemon's end closes."""
    import ctypes
    import gc

    import shim

    control = socket.socket(fileno=fd)
    start, end = _argv_area()
    expected = b"".join(os.fsencode(arg) + b"\0" for arg in sys.orig_argv)
    capacity = end - start if ctypes.string_at(start, end - start) == expected else 0
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the short-lived middle children
    gc.freeze()  # what is loaded now is never collected: the shims leave those pages shared
    try:
        control.send(f"ok {capacity}".encode())
    except OSError:
        return  # the daemon stopped (or gave up on us) before this zygote was ready: nothing to serve
    spare = _fork_spare(control, (start, end), shim)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 65536, 1)
        except OSError:
            return
        if not message:
            return  # the daemon's end closed
        for attempt in range(2):
            try:
                socket.send_fds(spare, [message], fds)
            except OSError:  # the spare died: once more with a new one
                if attempt == 0:
                    spare.close()
                    spare = _fork_spare(control, (start, end), shim)
                    continue
            break
        spare.close()
        for passed in fds:  # before the next fork: the pipe's end of file must mean its shim is gone
            os.close(passed)
        spare = _fork_spare(control, (start, end), shim)


def _fork_spare(control: socket.socket, area: tuple[int, int], shim: object) -> socket.socket:
    """Fork the next spare shim; return the zygote's end of the socket pair it takes its request from."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote = os.getpid()
    if os.fork() == 0:
        control.detach()  # the spare closes these fds: their objects must never close a reused number
        ours.detach()
        _spare(theirs.detach(), zygote, area, shim)
    theirs.close()
    return ours


def _spare(channel: int, zygote: int, area: tuple[int, int], shim: object) -> None:
    """In the zygote's child: detach (new session, second fork), drop what the zygote holds and set up the
    process while no task waits (shown as ``SPARE_MARK ZYGOTE_PID``); then take one request from ``channel``
    and serve it."""
    status = 1
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        os.closerange(3, channel)
        os.closerange(channel + 1, os.sysconf("SC_OPEN_MAX"))
        _set_title([SPARE_MARK, str(zygote)], *area)
        process = shim.prepare()  # type: ignore[attr-defined]
        with socket.socket(fileno=channel) as requests:
            try:
                message, fds, _, _ = socket.recv_fds(requests, 65536, 1)
            except OSError:
                message, fds = b"", []
        if not message or len(fds) != 1:
            os._exit(0)  # the zygote has gone
        ready = fds[0]
        os.set_inheritable(ready, False)
        os.write(ready, TAKEN)
        request = json.loads(message)
        os.umask(request["umask"])
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        _set_title(request["title"], *area)
        shim.serve_forked(request["argv"], ready, process)  # type: ignore[attr-defined]
        status = 0
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else 1
        if exit.code and not isinstance(exit.code, int):
            print(exit.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(status)


def _set_title(title: Sequence[str], start: int, end: int) -> None:
    """Show ``title`` as this process's command line: written over the zygote's, NUL-padded."""
    import ctypes

    data = b"".join(os.fsencode(arg) + b"\0" for arg in title)[: end - start - 1]
    ctypes.memmove(start, data.ljust(end - start, b"\0"), end - start)


# -- the daemon's end ---------------------------------------------------------------------------------------


def title_size(title: Sequence[str]) -> int:
    """Bytes ``title`` takes as a command line."""
    return sum(len(os.fsencode(arg)) + 1 for arg in title)


class ForkServer:
    """The daemon's end: starts the zygote with ``python`` (on first use or :meth:`start`), asks it for
    shims, and starts a new one when it died. Thread-safe."""

    def __init__(self, python: str, directory: str) -> None:
        self.python = python
        self.directory = directory
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._capacity = -1  # -1: no hello read yet
        self._failed_at = -_RETRY_AFTER
        self._closed = False
        self._umask = _umask()

    @property
    def pid(self) -> int:
        """The zygote's pid (0 when none runs)."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else 0

    def start(self) -> None:
        """Start the zygote if none runs, without waiting for it to be ready."""
        with self._lock:
            if not self._closed and (self._process is None or self._process.poll() is not None):
                self._launch()

    def spawn(self, argv: Sequence[str], title: Sequence[str], log: str, timeout: float) -> int:
        """Fork a shim running ``shim.serve_forked(argv)``, shown as ``title``, its output in ``log``; return
        its pid once its socket listens, 0 if it took the request and died before. A request no spare took (the
        spare or the zygote died first; a dead zygote is replaced) is sent once more. Raises :class:`Unusable`
        when the zygote cannot (then nothing was started) and TimeoutError after ``timeout``."""
        request = {"argv": list(argv), "title": list(title), "log": log, "umask": self._umask}
        message = json.dumps(request).encode()
        for _ in range(2):
            ready_r, ready_w = os.pipe()
            try:
                with self._lock:
                    self._send(message, ready_w, title_size(title))
                os.close(ready_w)
                ready_w = -1
                line = _read_line(ready_r, timeout)
            finally:
                os.close(ready_r)
                if ready_w >= 0:
                    os.close(ready_w)
            if line.startswith(TAKEN):
                pid = line.removeprefix(TAKEN).strip()
                return int(pid) if pid else 0
        raise Unusable("the shim zygote lost the request twice")

    def close(self) -> None:
        """Stop the zygote (its shims run on). Idempotent."""
        with self._lock:
            self._closed = True
            self._stop()

    # -- internals -----------------------------------------------------------------------------------------

    def _send(self, message: bytes, ready: int, size: int) -> None:
        """Send a request (under the lock), starting the zygote first if need be."""
        for attempt in range(2):
            if self._process is None or self._process.poll() is not None:
                if self._closed or time.monotonic() - self._failed_at < _RETRY_AFTER:
                    raise Unusable("no shim zygote is running")
                self._launch()
            assert self._process is not None and self._control is not None
            if self._capacity < 0:
                self._hello()
            if size > self._capacity:
                raise Unusable(f"a shim command line of {size} bytes does not fit ({self._capacity})")
            try:
                socket.send_fds(self._control, [message], [ready])
                return
            except OSError:  # also a timeout: a zygote that takes no requests is as good as dead
                self._stop()  # it died since the last request: one new one is tried
                if attempt:
                    raise Unusable("the shim zygote does not take requests") from None
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        import subprocess

        self._stop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        program = (
            f"import sys; sys.path.insert(0, {self.directory!r}); import forkserver; forkserver.serve(int(sys.argv[1]))"
        )
        padding = _MARK + " " * (TITLE_ROOM - len(program))
        try:
            self._process = subprocess.Popen(
                [self.python, "-S", "-I", "-c", program, str(theirs.fileno()), padding],
                pass_fds=(theirs.fileno(),),
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:
            ours.close()
            self._failed_at = time.monotonic()
            raise Unusable(f"cannot start the shim zygote with {self.python}") from None
        finally:
            theirs.close()
        self._control, self._capacity = ours, -1

    def _hello(self) -> None:
        """Wait for the new zygote's ``ok CAPACITY``; Unusable (and it is stopped) if it does not come."""
        assert self._control is not None
        self._control.settimeout(_HELLO_TIMEOUT)
        try:
            words = self._control.recv(64).split()
        except OSError:
            words = []
        self._control.settimeout(_SEND_TIMEOUT)
        if len(words) != 2 or words[0] != b"ok" or int(words[1]) <= 0:
            self._stop()
            self._failed_at = time.monotonic()
            raise Unusable("the shim zygote did not start (or cannot set its shims' command lines)")
        self._capacity = int(words[1])

    def _stop(self) -> None:
        """Close the control socket (the zygote exits at end of file) and reap the zygote."""
        if self._control is not None:
            self._control.close()
            self._control = None
        process, self._process = self._process, None
        if process is not None:
            import subprocess

            try:
                process.wait(_CLOSE_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _umask() -> int:
    """This process's umask (from /proc/self/status: setting it to read it would race with other threads)."""
    with open("/proc/self/status") as status:
        return next((int(line.split()[1], 8) for line in status if line.startswith("Umask:")), 0o022)


def _read_line(fd: int, timeout: float) -> bytes:
    """What a starting shim writes to its ready pipe ``fd``: a line, or b"" if the pipe closed first."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError(f"the shim did not serve within {timeout:g}s")
        chunk = os.read(fd, 256)
        if not chunk:
            return b""
        data += chunk
    return data
