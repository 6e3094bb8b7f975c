"""Talking to a task's shim (``plugins/runtime_runc/shim.py``): spawning it, calling it, watching it.

The protocol is newline-delimited JSON over the shim's unix socket: one request line
``{"method": M, "params": {...}}`` answered by one line ``{"result": R}`` or ``{"error": {"code": C,
"message": TEXT}}``. Several requests may follow each other on one connection and many connections
may be open at once.

- :class:`ShimClient` makes calls; idle connections are pooled so concurrent callers each get their own.
- :class:`Watcher` holds the long-lived requests (``wait``, ``events``) of every shim on one thread.
- :func:`spawn_shim` starts a shim as a new interpreter (when the fork server cannot) and waits until it serves.

A shim that cannot be reached (no socket, connection refused or dropped) raises :class:`ShimGone`;
one that does not answer in time raises plain :class:`~core.errors.Unavailable`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.errors import (
    AlreadyExists,
    ContainerkitError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

__all__ = ["ShimClient", "ShimError", "ShimGone", "Watcher", "connect", "spawn_shim", "tail"]

log = logging.getLogger("containerkit.runtime.runc")

DEFAULT_TIMEOUT = 30.0
"""Seconds a call may take before :class:`Unavailable` (runc itself can be slow on a loaded host)."""

_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})


class ShimError(ContainerkitError):
    """The shim failed internally (its ``Internal`` code)."""

    grpc_code = "INTERNAL"


class ShimGone(Unavailable):
    """The shim is not running: its socket is missing, refuses connections or dropped the request."""


_ERRORS: dict[str, type[ContainerkitError]] = {
    "NotFound": NotFound,
    "AlreadyExists": AlreadyExists,
    "InvalidArgument": InvalidArgument,
    "FailedPrecondition": FailedPrecondition,
    "Unavailable": Unavailable,
    "Internal": ShimError,
}


def _request(method: str, params: Mapping[str, Any] | None) -> bytes:
    return json.dumps({"method": method, "params": dict(params or {})}).encode() + b"\n"


def _decode_response(line: bytes, method: str) -> Any:
    """The ``result`` of one response line; its ``error`` raised as the matching core.errors class."""
    try:
        response = json.loads(line)
        error = response.get("error")
    except (ValueError, AttributeError):
        raise ShimError(f"shim answered {method} with an invalid line: {line[:200]!r}") from None
    if error is None:
        return response.get("result")
    code, message = error.get("code", "Internal"), error.get("message", "")
    raise _ERRORS.get(code, ShimError)(message or f"shim {method} failed ({code})")


class _Connection:
    """One connected socket with a line reader."""

    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.reader = self.sock.makefile("rb")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def connect(path: str | os.PathLike[str], method: str, timeout: float) -> _Connection:
    """A new connection to the shim at ``path`` (for ``method``, named in errors): :class:`ShimGone`
    when nothing listens there, :class:`Unavailable` when it does not accept within ``timeout``."""
    path = os.fspath(path)
    try:
        return _Connection(path, timeout)
    except TimeoutError:
        raise Unavailable(f"shim {path} did not accept a connection for {method} within {timeout:g}s") from None
    except OSError as err:
        if err.errno in _GONE_ERRNOS:
            raise ShimGone(f"shim {path} is not running ({err.strerror})") from None
        raise


class ShimClient:
    """Calls to the shim listening on ``path``. Thread-safe: concurrent calls each take a connection of their own
    (idle ones are pooled)."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()

    def call(self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Send one request and return its result.

        Raises the shim's error as core.errors, :class:`ShimGone` when the shim is not there,
        :class:`Unavailable` when it does not answer within ``timeout`` (default: the client's).
        """
        limit = self.timeout if timeout is None else timeout
        request = _request(method, params)
        with self._lock:
            pooled = self._idle.pop() if self._idle else None
        if pooled is not None:
            try:
                return self._exchange(pooled, request, method, limit)
            except ShimGone:
                pass  # the shim may have closed an idle connection: retry once on a fresh one
        return self._exchange(connect(self.path, method, limit), request, method, limit)

    def ping(self, timeout: float) -> int:
        """The shim's pid, asked within ``timeout`` seconds on a fresh connection."""
        connection = connect(self.path, "ping", timeout)
        return int(self._exchange(connection, _request("ping", None), "ping", timeout)["pid"])

    def close(self) -> None:
        """Close the idle connections (calls in flight finish on theirs). The client stays usable."""
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def _exchange(self, connection: _Connection, request: bytes, method: str, timeout: float) -> Any:
        """Send and read one response; the connection returns to the pool only after a complete answer."""
        try:
            connection.sock.settimeout(timeout)
            connection.sock.sendall(request)
            line = connection.reader.readline()
        except TimeoutError:
            connection.close()
            raise Unavailable(f"shim {self.path} did not answer {method} within {timeout:g}s") from None
        except OSError as err:
            connection.close()
            if err.errno in _GONE_ERRNOS:
                raise ShimGone(f"shim {self.path} dropped {method} ({err.strerror})") from None
            raise
        if not line.endswith(b"\n"):
            connection.close()
            raise ShimGone(f"shim {self.path} closed the connection during {method}")
        with self._lock:
            self._idle.append(connection)
        return _decode_response(line, method)


LineHandler = Callable[[dict[str, Any]], bool]
"""Called with each line a watched connection receives; returns whether to keep watching it."""


class _Watched:
    def __init__(self, sock: socket.socket, on_line: LineHandler, on_close: Callable[[], None]) -> None:
        self.sock = sock
        self.on_line = on_line
        self.on_close = on_close
        self.buffer = b""


class Watcher:
    """Long-lived requests (``wait``, ``events``) of every shim, multiplexed on one thread.

    :meth:`watch` sends the request on a new connection; each line received goes to ``on_line``
    (decoded JSON) until it returns False; ``on_close`` is called if the shim closes the connection
    first (it died). Callbacks run on the watcher thread and must not block. :meth:`close` drops
    every connection without calling anything.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._pending: list[_Watched] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="runc-shim-watcher", daemon=True)
        self._thread.start()

    def watch(
        self,
        path: str | os.PathLike[str],
        method: str,
        params: Mapping[str, Any],
        on_line: LineHandler,
        on_close: Callable[[], None],
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Connect to the shim at ``path`` and send the request. Raises as :meth:`ShimClient.call` does
        when the shim cannot be reached."""
        connection = connect(path, method, timeout)
        connection.reader.close()
        sock = connection.sock
        try:
            sock.sendall(_request(method, params))
        except OSError as err:
            sock.close()
            raise ShimGone(f"shim {path} dropped {method} ({err.strerror})") from None
        sock.setblocking(False)
        with self._lock:
            if self._closed:
                sock.close()
                return
            self._pending.append(_Watched(sock, on_line, on_close))
        self._wake_w.send(b"x")

    def close(self) -> None:
        """Stop the thread and close every watched connection. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake_w.send(b"x")
        self._thread.join()
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        for watched in self._pending:
            watched.sock.close()
        self._selector.close()
        self._wake_w.close()

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.fileobj is self._wake_r:
                    self._wake_r.recv(4096)
                else:
                    self._receive(key.data)
            with self._lock:
                if self._closed:
                    return
                pending, self._pending = self._pending, []
            for watched in pending:
                self._selector.register(watched.sock, selectors.EVENT_READ, watched)

    def _receive(self, watched: _Watched) -> None:
        try:
            data = watched.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(watched)
            self._callback(watched.on_close)
            return
        watched.buffer += data
        while b"\n" in watched.buffer:
            line, watched.buffer = watched.buffer.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("shim sent an invalid line: %r", line[:200])
                continue
            if not self._callback(watched.on_line, message):
                self._drop(watched)
                return

    def _drop(self, watched: _Watched) -> None:
        self._selector.unregister(watched.sock)
        watched.sock.close()

    @staticmethod
    def _callback(function: Callable[..., Any], *args: Any) -> Any:
        """Run a callback; one that raises is logged and stops nothing but its own connection."""
        try:
            return function(*args)
        except Exception:
            log.exception("shim watch callback failed")
            return False


def spawn_shim(command: Sequence[str], cwd: Path, log_path: Path, timeout: float) -> None:
    """Run the shim launcher ``command`` in its own session and return once it exited 0: the shim it forked
    into the background serves its socket then.

    Raises :class:`ShimError` (with the tail of ``log_path``) if it exits otherwise or runs for longer than
    ``timeout`` seconds (then it is killed).
    """
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True
        )
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise ShimError(f"shim did not serve within {timeout:g}s: {tail(log_path)}") from None
    if code:
        raise ShimError(f"shim exited with status {code} before serving: {tail(log_path)}")


def tail(path: Path, limit: int = 2000) -> str:
    """The end of the log at ``path`` (for error messages)."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text[-limit:] or "(empty log)"
