"""containerkitd's gRPC server: gRPC over HTTP/2 (h2c with prior knowledge, as gRPC clients speak it) on unix
sockets, serving the handlers that generated ``add_*Servicer_to_server`` functions register.

Why not grpcio's server: its per-call Python machinery and thread hand-offs cost ~0.5 ms of CPU per call, and a
``ctr run`` makes ~40 calls; this server spends a third of that (the measurements are in the README).

Threads. One I/O thread runs a selector over the listening sockets and every connection: it reads and parses
frames, answers SETTINGS and PING, keeps the flow-control accounts, starts calls and hands them their request
messages, and ends the calls whose client reset them or went away or whose deadline passed. Calls run on a pool
of ``max_workers`` threads (a call holds one until it ends, streams included); a worker writes its call's
responses itself, without blocking: what the socket does not take at once waits in the connection's output
buffer, which the I/O thread flushes when the socket becomes writable. A worker sending DATA waits for the
client's flow-control window and while that buffer is over its high-water mark, so a client that stops reading
holds only its own calls' workers.

Methods a service names with :meth:`Server.answer_inline` (handlers that never block: answers from memory or a
read of local metadata) skip the pool: the I/O thread runs them as soon as their request is complete, which
saves the two thread hand-offs a call otherwise costs (most of the server's own CPU per call). Such a call
sends what the flow-control windows take at once; the rest of its responses is sent by a worker.

Handlers see a :class:`grpc.ServicerContext` (:class:`Context`); an exception they raise ends the call with the
status ``error_status`` maps it to (UNKNOWN by default), unless they set a code on the context first.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import heapq
import itertools
import logging
import os
import queue
import selectors
import socket
import struct
import threading
import time
import weakref
import zlib
from collections import deque, namedtuple
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from core.grpcwire import http2
from core.grpcwire.hpack import Decoder, Encoder, HpackError
from core.grpcwire.status import MESSAGE_PREFIX, StatusCode, parse_timeout, percent_encode

__all__ = ["Context", "Server"]

log = logging.getLogger("containerkit.grpc")

ErrorStatus = Callable[[Exception, str], tuple[Any, str]]
"""Maps an exception a handler raised, and the method's path, to (status code, details)."""

Metadatum = namedtuple("Metadatum", ("key", "value"))  # as grpcio's invocation_metadata() items

_STREAM_WINDOW = 1 << 20  # our SETTINGS_INITIAL_WINDOW_SIZE: a client may send this much per call unasked
_QUEUED_LIMIT = 1 << 20  # request bytes a call may hold unconsumed before its window stops being topped up
_CONNECTION_WINDOW = 16 << 20  # the connection's receive window (stream windows bound what is buffered)
_MAX_FRAME_RECEIVED = 1 << 20  # our SETTINGS_MAX_FRAME_SIZE
_MAX_HEADER_BLOCK = 64 << 10  # our SETTINGS_MAX_HEADER_LIST_SIZE, also the limit on a compressed header block
_OUTPUT_HIGH_WATER = 1 << 20  # buffered output above which DATA senders wait for the socket
_OUTPUT_LIMIT = 16 << 20  # buffered output above which a client that does not read is disconnected
_RECV_SIZE = 256 << 10
_RESETS_PER_SECOND = 200  # calls a client may reset in a second (a cancelled watch is one)
_RESERVED_HEADERS = frozenset(("content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"))

_RESPONSE_HEADERS = Encoder().encode([(":status", "200"), ("content-type", "application/grpc")])
_OK_FIELDS = [("grpc-status", "0")]
_OK_TRAILERS = Encoder().encode(_OK_FIELDS)


def _wire_code(code: Any) -> int:
    """The wire value of a status code given as a ``grpc.StatusCode`` or a :class:`StatusCode`."""
    value = code.value
    return int(value[0] if isinstance(value, tuple) else value)


def _status_fields(code: Any, details: str) -> list[tuple[str, str]]:
    """The ``grpc-status`` field, and ``grpc-message`` (percent-encoded) for a failure with details."""
    wire = _wire_code(code)
    fields = [("grpc-status", str(wire))]
    if details and wire:
        fields.append(("grpc-message", percent_encode(details)))
    return fields


class _ConnectionError(Exception):
    """The client broke the protocol: the connection ends with GOAWAY ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _CallEnded(Exception):
    """The call ended (cancelled, past its deadline, its connection gone) while its handler still ran."""


class _WouldWait(Exception):
    """An inline call's response does not fit the flow-control windows now: a worker is to send it."""

    def __init__(self, response: Any) -> None:
        super().__init__()
        self.response = response


class _Abort(Exception):
    """Raised by :meth:`Context.abort`: the status is on the context."""


# ---------------------------------------------------------------------------------------------- server


class Server:
    """A gRPC server on unix sockets: ``add_*Servicer_to_server`` registers on it as on a ``grpc.Server``;
    then :meth:`add_insecure_port`, :meth:`start`, and at the end :meth:`stop`.

    ``max_concurrent_streams`` calls may be open per connection (SETTINGS_MAX_CONCURRENT_STREAMS; the client
    queues the rest, and a stream beyond it is refused), messages are limited to ``max_message_size`` bytes both
    ways (RESOURCE_EXHAUSTED).
    """

    def __init__(
        self,
        *,
        max_workers: int,
        max_concurrent_streams: int,
        max_message_size: int,
        error_status: ErrorStatus | None = None,
    ) -> None:
        self.max_concurrent_streams = max_concurrent_streams
        self.max_message_size = max_message_size
        self.error_status: ErrorStatus = error_status or (lambda err, method: (StatusCode.UNKNOWN, repr(err)))
        self._methods: dict[str, Any] = {}  # "/package.Service/Method" -> grpc.RpcMethodHandler
        self._generic: list[Any] = []  # grpc.GenericRpcHandler
        self._inline: set[str] = set()  # methods the I/O thread runs itself
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="grpc")
        self._selector = selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._listeners: list[socket.socket] = []
        self.receive_buffer = memoryview(bytearray(_RECV_SIZE))  # the I/O thread's, reused by every read
        self._lock = threading.Condition()  # guards the fields below
        self._connections: set[_Connection] = set()
        self._to_flush: set[_Connection] = set()  # connections whose output waits for the socket
        self._to_close: set[_Connection] = set()  # connections a write found broken
        self._open_calls = 0
        self._woken = False
        self._stopping = False
        self._closing = False  # the grace period is over: the I/O thread closes everything and ends
        self._stopped = threading.Event()
        self._deadlines: list[tuple[float, int, weakref.ref[_Call]]] = []  # I/O thread only; weak: ended calls go
        self._sequence = itertools.count()
        self._thread = threading.Thread(target=self._run, name="grpc-io", daemon=True)

    # -- registration (the subset of grpc.Server that generated code uses) ---------------------------

    def add_generic_rpc_handlers(self, generic_handlers: Sequence[Any]) -> None:
        """Handlers asked by method (``service(handler_call_details)``) when no registered one matches."""
        self._generic.extend(generic_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Any]) -> None:
        """The handlers of ``service_name``'s methods, by method name."""
        for name, handler in method_handlers.items():
            self._methods[f"/{service_name}/{name}"] = handler

    def answer_inline(self, methods: Iterable[str]) -> None:
        """Run calls of these methods (``/package.Service/Method``, unary requests) on the I/O thread, with no
        hand-off to a worker. Only for handlers that never block: while one runs, no other call is read."""
        self._inline.update(methods)

    def handler_for(self, method: str, metadata: tuple[Metadatum, ...]) -> Any:
        handler = self._methods.get(method)
        if handler is None:
            details = _CallDetails(method, metadata)
            for generic in self._generic:
                handler = generic.service(details)
                if handler is not None:
                    break
        return handler

    # -- life cycle ---------------------------------------------------------------------------------

    def add_insecure_port(self, address: str) -> int:
        """Listen on ``unix:PATH`` (an existing socket file there is replaced); RuntimeError when it cannot."""
        if not address.startswith("unix:"):
            raise RuntimeError(f"only unix: addresses are served, not {address!r}")
        path = address.removeprefix("unix:")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(path) and not os.path.isdir(path):
                os.unlink(path)
            listener.bind(path)
            listener.listen(socket.SOMAXCONN)
        except OSError as err:
            listener.close()
            raise RuntimeError(f"cannot bind {path}: {err.strerror or err}") from None
        listener.setblocking(False)
        self._listeners.append(listener)
        return 1

    def start(self) -> None:
        self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
        for listener in self._listeners:
            self._selector.register(listener, selectors.EVENT_READ, listener)
        self._thread.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls (GOAWAY, listening sockets closed) and give the open ones ``grace`` seconds, then
        cancel what is left; the event is set once every call has ended and the connections are closed."""
        with self._lock:
            if self._stopping:
                return self._stopped
            self._stopping = True
        self._wake()
        threading.Thread(target=self._end_after, args=(grace or 0.0,), name="grpc-stop", daemon=True).start()
        return self._stopped

    def _end_after(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        with self._lock:
            while self._open_calls and (remaining := deadline - time.monotonic()) > 0:
                self._lock.wait(remaining)
            self._closing = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=False)
        self._stopped.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Wait until stopped; True when it is."""
        return self._stopped.wait(timeout)

    # -- the I/O thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        going_away = False
        try:
            while True:
                timeout = max(0.0, self._deadlines[0][0] - time.monotonic()) if self._deadlines else None
                for key, mask in self._selector.select(timeout):
                    if key.data is None:
                        self._drain_wake()
                    elif isinstance(key.data, socket.socket):
                        self._accept(key.data)
                    else:
                        connection: _Connection = key.data
                        if mask & selectors.EVENT_WRITE:
                            connection.on_writable()
                        if mask & selectors.EVENT_READ:
                            connection.on_readable()
                self._expire_deadlines()
                with self._lock:
                    to_flush, self._to_flush = self._to_flush, set()
                    to_close, self._to_close = self._to_close, set()
                    stopping, closing = self._stopping, self._closing
                for connection in to_close:
                    connection.lost("the connection broke")
                for connection in to_flush:
                    connection.watch_writable()
                if stopping and not going_away:
                    going_away = True
                    self._go_away()
                if closing:
                    break
        except Exception:
            log.exception("grpc: the I/O thread failed")
        finally:
            with self._lock:
                connections = list(self._connections)
            for connection in connections:
                connection.lost("the server stopped")
            for listener in self._listeners:
                listener.close()
            self._selector.close()

    def _go_away(self) -> None:
        """No new connections or calls: close the listening sockets, GOAWAY on every connection."""
        for listener in self._listeners:
            self._selector.unregister(listener)
            listener.close()
        self._listeners = []
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.go_away()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # out of fds and the like: the client is refused, the server goes on
                log.warning("grpc: cannot accept a connection: %s", err.strerror or err)
                return
            sock.setblocking(False)
            connection = _Connection(self, sock)
            with self._lock:
                self._connections.add(connection)
            self._selector.register(sock, selectors.EVENT_READ, connection)
            connection.greet()

    def _wake(self) -> None:
        with self._lock:
            if self._woken:
                return
            self._woken = True
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_writer.send(b"\0")

    def _drain_wake(self) -> None:
        # Drained first, then cleared: a byte sent after the clear and drained with the rest would leave _woken
        # set with nothing to read, and every later _wake() a no-op. A waker that finds the flag still set
        # changed its state before, and the loop reads the state after this.
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_reader.recv(4096):
                pass
        with self._lock:
            self._woken = False

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, ref = heapq.heappop(self._deadlines)
            if (call := ref()) is not None:  # an open call is in its connection's table, so alive
                call.end(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    # -- called by connections ----------------------------------------------------------------------

    def call_opened(self, call: _Call) -> bool:
        """Count a new call in; False when the server is stopping (the call is refused)."""
        with self._lock:
            if self._stopping:
                return False
            self._open_calls += 1
        if call.deadline is not None:
            heapq.heappush(self._deadlines, (call.deadline, next(self._sequence), weakref.ref(call)))
        return True

    def call_ended(self) -> None:
        with self._lock:
            self._open_calls -= 1
            self._lock.notify_all()

    def dispatch(self, call: _Call) -> None:
        """Run the call: here, if its method is answered inline and its request is whole, else on a worker."""
        if call.method in self._inline and not call.handler.request_streaming:
            call.inline = True
            call.run()
        else:
            self.submit(call, call.run)

    def submit(self, call: _Call, work: Callable[[], None]) -> None:
        """Have a worker do ``work`` for ``call``; the call ends UNAVAILABLE when the server is gone."""
        try:
            self._pool.submit(work)
        except RuntimeError:  # the pool is shut down
            call.end(StatusCode.UNAVAILABLE, "the server is stopping")

    def flush_later(self, connection: _Connection) -> None:
        with self._lock:
            self._to_flush.add(connection)
        self._wake()

    def close_later(self, connection: _Connection) -> None:
        with self._lock:
            self._to_close.add(connection)
        self._wake()

    def forget(self, connection: _Connection) -> None:
        """``connection`` is closed (I/O thread)."""
        with self._lock:
            self._connections.discard(connection)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connection.sock)

    def watch(self, connection: _Connection, writable: bool) -> None:
        """Watch ``connection`` for reading, and for writing too when ``writable`` (I/O thread)."""
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writable else 0)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(connection.sock, events, connection)


class _CallDetails(grpc.HandlerCallDetails):
    """What a generic handler is asked by: the method's path and the request's metadata."""

    def __init__(self, method: str, invocation_metadata: tuple[Metadatum, ...]) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


# ---------------------------------------------------------------------------------------------- connection


class _Connection:
    """One client connection. ``cond`` guards the output buffer, the flow-control windows, the table of open
    calls and every call's send-side state; the parsing state is the I/O thread's alone."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.cond = threading.Condition()
        self.output = bytearray()
        self.watching_writable = False
        self.closed = False
        self.going_away = False
        self.send_window = http2.DEFAULT_WINDOW
        self.peer_initial_window = http2.DEFAULT_WINDOW
        self.peer_max_frame = http2.DEFAULT_MAX_FRAME
        self.calls: dict[int, _Call] = {}
        # I/O thread only:
        self.input = bytearray()
        self.preface_seen = False
        self.decoder = Decoder()
        self.block = bytearray()  # a header block arriving in CONTINUATIONs
        self.block_stream = 0
        self.block_flags = 0
        self.last_stream_id = 0
        self.receive_window = _CONNECTION_WINDOW
        self.received_unacknowledged = 0
        self.resets: deque[float] = deque()  # when the client reset its latest calls (within the last second)

    def greet(self) -> None:
        """Our SETTINGS and the connection window, the first thing we send."""
        settings = struct.pack(
            ">HIHIHIHIHI",
            http2.SETTINGS_MAX_CONCURRENT_STREAMS,
            self.server.max_concurrent_streams,
            http2.SETTINGS_INITIAL_WINDOW_SIZE,
            _STREAM_WINDOW,
            http2.SETTINGS_MAX_FRAME_SIZE,
            _MAX_FRAME_RECEIVED,
            http2.SETTINGS_MAX_HEADER_LIST_SIZE,
            _MAX_HEADER_BLOCK,
            http2.SETTINGS_ENABLE_PUSH,
            0,
        )
        increment = struct.pack(">I", _CONNECTION_WINDOW - http2.DEFAULT_WINDOW)
        with self.cond:
            self.write(http2.frame(http2.SETTINGS, 0, 0, settings) + http2.frame(http2.WINDOW_UPDATE, 0, 0, increment))

    # -- output (any thread, with cond held) -------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data`` after what is buffered, as much at once as the socket takes (call with ``cond`` held).

        A client that lets more than ``_OUTPUT_LIMIT`` bytes pile up (senders of DATA wait at the high-water
        mark, so only control frames it provokes can) is disconnected."""
        if self.closed:
            return
        if self.output:
            self.output += data
        else:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.broke()
                return
            if sent < len(data):
                self.output += memoryview(data)[sent:]
        if len(self.output) > _OUTPUT_LIMIT:
            self.broke()
        elif self.output and not self.watching_writable:
            self.watching_writable = True
            self.server.flush_later(self)

    def broke(self) -> None:
        """Writing failed or must stop: nothing more is sent; the I/O thread closes the connection (``cond`` held)."""
        self.closed = True
        self.cond.notify_all()
        self.server.close_later(self)

    def on_writable(self) -> None:
        with self.cond:
            if self.output and not self.closed:
                try:
                    sent = self.sock.send(self.output)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    sent = 0
                    self.broke()
                del self.output[:sent]
            if not self.output or self.closed:
                self.watching_writable = False
                self.server.watch(self, False)
            self.cond.notify_all()

    def watch_writable(self) -> None:
        """Have the I/O thread flush the output when the socket takes more (I/O thread)."""
        if not self.closed:
            self.server.watch(self, True)

    # -- input (I/O thread) -------------------------------------------------------------------------

    def on_readable(self) -> None:
        buffer = self.server.receive_buffer
        try:
            size = self.sock.recv_into(buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self.lost(f"the connection broke: {err.strerror or err}")
            return
        if not size:
            self.lost("the client closed the connection")
            return
        self.input += buffer[:size]
        try:
            self.parse()
        except _ConnectionError as err:
            with self.cond:
                last = struct.pack(">II", self.last_stream_id, err.code)
                self.write(http2.frame(http2.GOAWAY, 0, 0, last + str(err).encode()))
            self.lost(f"protocol error: {err}")

    def parse(self) -> None:
        data = self.input
        pos = 0
        if not self.preface_seen:
            if len(data) < len(http2.PREFACE):
                if not http2.PREFACE.startswith(bytes(data)):
                    raise _ConnectionError(http2.PROTOCOL_ERROR, "not an HTTP/2 client preface")
                return
            if data[: len(http2.PREFACE)] != http2.PREFACE:
                raise _ConnectionError(http2.PROTOCOL_ERROR, "not an HTTP/2 client preface")
            self.preface_seen = True
            pos = len(http2.PREFACE)
        try:
            while len(data) - pos >= 9:
                high, low, kind, flags, stream_id = http2.FRAME_HEADER.unpack_from(data, pos)
                length = (high << 16) | low
                if length > _MAX_FRAME_RECEIVED:
                    raise _ConnectionError(http2.FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                if len(data) - pos - 9 < length:
                    break
                payload = bytes(data[pos + 9 : pos + 9 + length])
                pos += 9 + length
                self.on_frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
                if self.closed:
                    return
        finally:
            del data[:pos]

    def on_frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.block_stream and kind != http2.CONTINUATION:
            raise _ConnectionError(http2.PROTOCOL_ERROR, "a header block was interrupted")
        if kind == http2.DATA:
            self.on_data(flags, stream_id, payload)
        elif kind == http2.HEADERS:
            if stream_id == 0:
                raise _ConnectionError(http2.PROTOCOL_ERROR, "HEADERS on stream 0")
            try:
                payload = http2.unpad(flags, payload)
            except ValueError as err:
                raise _ConnectionError(http2.PROTOCOL_ERROR, str(err)) from None
            self.block_stream, self.block_flags = stream_id, flags
            self.block = bytearray(payload[5:] if flags & http2.PRIORITY_FLAG else payload)
            self.on_block_part(flags)
        elif kind == http2.CONTINUATION:
            if stream_id != self.block_stream or not stream_id:
                raise _ConnectionError(http2.PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            self.block += payload
            self.on_block_part(flags)
        elif kind == http2.RST_STREAM:
            if len(payload) != 4:
                raise _ConnectionError(http2.FRAME_SIZE_ERROR, "RST_STREAM of the wrong size")
            with self.cond:
                call = self.calls.get(stream_id)
            if call is not None:
                call.end(StatusCode.CANCELLED, "cancelled by the client", tell=False)
                self.count_reset()
        elif kind == http2.SETTINGS:
            self.on_settings(flags, stream_id, payload)
        elif kind == http2.PING:
            if len(payload) != 8 or stream_id:
                raise _ConnectionError(http2.FRAME_SIZE_ERROR, "a malformed PING")
            if not flags & http2.ACK:
                with self.cond:
                    self.write(http2.frame(http2.PING, http2.ACK, 0, payload))
        elif kind == http2.GOAWAY:
            pass  # the client opens no new calls; those open go on
        elif kind == http2.WINDOW_UPDATE:
            self.on_window_update(stream_id, payload)
        elif kind == http2.PUSH_PROMISE:
            raise _ConnectionError(http2.PROTOCOL_ERROR, "a client may not push")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks.

    def count_reset(self) -> None:
        """A call the client reset before it ended: more than ``_RESETS_PER_SECOND`` in a second is the "rapid
        reset" attack (each costs a call set-up and keeps a worker busy, while never counting against
        ``max_concurrent_streams`` for long), and ends the connection."""
        now = time.monotonic()
        self.resets.append(now)
        while self.resets[0] < now - 1.0:
            self.resets.popleft()
        if len(self.resets) > _RESETS_PER_SECOND:
            raise _ConnectionError(http2.ENHANCE_YOUR_CALM, "too many calls reset by the client")

    def on_block_part(self, flags: int) -> None:
        if len(self.block) > _MAX_HEADER_BLOCK:
            raise _ConnectionError(http2.ENHANCE_YOUR_CALM, "a header block over the limit")
        if not flags & http2.END_HEADERS:
            return
        try:
            headers = self.decoder.decode(bytes(self.block))
        except HpackError as err:
            raise _ConnectionError(http2.COMPRESSION_ERROR, f"bad header block: {err}") from None
        if sum(len(name) + len(value) + 32 for name, value in headers) > _MAX_HEADER_BLOCK:  # an HPACK bomb
            raise _ConnectionError(http2.ENHANCE_YOUR_CALM, "a header list over the limit")
        stream_id, end_stream = self.block_stream, bool(self.block_flags & http2.END_STREAM)
        self.block_stream, self.block = 0, bytearray()
        with self.cond:
            call = self.calls.get(stream_id)
        if call is not None:  # trailers ending the request side
            if not end_stream:
                raise _ConnectionError(http2.PROTOCOL_ERROR, "a second header block without END_STREAM")
            call.on_remote_end()
        elif stream_id % 2 == 0 or stream_id <= self.last_stream_id:
            raise _ConnectionError(http2.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}, which cannot open")
        else:
            self.last_stream_id = stream_id
            self.open_call(stream_id, headers, end_stream)

    def open_call(self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        pseudo: dict[str, str] = {}
        metadata: list[Metadatum] = []
        for name, value in headers:
            if name.startswith(":"):
                pseudo[name] = value
            elif name.endswith("-bin"):
                try:
                    metadata.append(Metadatum(name, base64.b64decode(value + "=" * (-len(value) % 4))))
                except ValueError:
                    return self.refuse(stream_id, StatusCode.INTERNAL, f"undecodable binary header {name}")
            elif name not in _RESERVED_HEADERS:
                metadata.append(Metadatum(name, value))
        fields = dict(headers)
        if pseudo.get(":method") != "POST":
            return self.refuse(stream_id, StatusCode.UNIMPLEMENTED, "gRPC calls are POSTs", http_status="405")
        if not fields.get("content-type", "").startswith("application/grpc"):
            return self.refuse(stream_id, StatusCode.UNKNOWN, "not a gRPC request", http_status="415")
        if self.going_away or self.closed:
            return self.reset(stream_id, http2.REFUSED_STREAM)
        with self.cond:
            crowded = len(self.calls) >= self.server.max_concurrent_streams
        if crowded:
            return self.reset(stream_id, http2.REFUSED_STREAM)
        method = pseudo.get(":path", "")
        handler = self.server.handler_for(method, tuple(metadata))
        if handler is None:
            return self.refuse(stream_id, StatusCode.UNIMPLEMENTED, f"Method not found: {method}")
        encoding = fields.get("grpc-encoding", "identity")
        if encoding not in ("identity", "gzip"):
            return self.refuse(stream_id, StatusCode.UNIMPLEMENTED, f"unsupported grpc-encoding {encoding}")
        deadline = None
        if "grpc-timeout" in fields:
            try:
                deadline = time.monotonic() + parse_timeout(fields["grpc-timeout"])
            except ValueError as err:
                return self.refuse(stream_id, StatusCode.INTERNAL, str(err))
        call = _Call(self, stream_id, method, handler, tuple(metadata), deadline, encoding == "gzip")
        with self.cond:
            self.calls[stream_id] = call
        if not self.server.call_opened(call):
            with self.cond:
                del self.calls[stream_id]
            return self.reset(stream_id, http2.REFUSED_STREAM)
        if handler.request_streaming:
            self.server.dispatch(call)
        if end_stream:
            call.on_remote_end()
        return None

    def refuse(self, stream_id: int, code: StatusCode, details: str, http_status: str = "200") -> None:
        """End a call that never opened with a trailers-only response."""
        fields = [(":status", http_status), ("content-type", "application/grpc"), *_status_fields(code, details)]
        block = Encoder().encode(fields)
        with self.cond:
            self.write(http2.frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, stream_id, block))
            self.write(http2.frame(http2.RST_STREAM, 0, stream_id, struct.pack(">I", http2.NO_ERROR)))

    def reset(self, stream_id: int, code: int) -> None:
        with self.cond:
            self.write(http2.frame(http2.RST_STREAM, 0, stream_id, struct.pack(">I", code)))

    def on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise _ConnectionError(http2.PROTOCOL_ERROR, "DATA on stream 0")
        if stream_id > self.last_stream_id:
            raise _ConnectionError(http2.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
        size = len(payload)
        self.receive_window -= size
        if self.receive_window < 0:
            raise _ConnectionError(http2.FLOW_CONTROL_ERROR, "the client overran the connection window")
        self.received_unacknowledged += size
        if self.received_unacknowledged >= _CONNECTION_WINDOW // 2:
            self.receive_window += self.received_unacknowledged
            with self.cond:
                self.write(http2.frame(http2.WINDOW_UPDATE, 0, 0, struct.pack(">I", self.received_unacknowledged)))
            self.received_unacknowledged = 0
        with self.cond:
            call = self.calls.get(stream_id)
        if call is None:
            return  # a call that ended: its late DATA only counts against the connection window
        try:
            data = http2.unpad(flags, payload)
        except ValueError as err:
            raise _ConnectionError(http2.PROTOCOL_ERROR, str(err)) from None
        call.on_data(data, size)
        if flags & http2.END_STREAM:
            call.on_remote_end()

    def on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise _ConnectionError(http2.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & http2.ACK:
            if payload:
                raise _ConnectionError(http2.FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(http2.FRAME_SIZE_ERROR, "a SETTINGS frame of the wrong size")
        with self.cond:
            for offset in range(0, len(payload), 6):
                key, value = struct.unpack_from(">HI", payload, offset)
                if key == http2.SETTINGS_INITIAL_WINDOW_SIZE:
                    if value > http2.MAX_WINDOW:
                        raise _ConnectionError(http2.FLOW_CONTROL_ERROR, "an initial window over 2^31-1")
                    for call in self.calls.values():
                        call.send_window += value - self.peer_initial_window
                    self.peer_initial_window = value
                elif key == http2.SETTINGS_MAX_FRAME_SIZE:
                    if not http2.DEFAULT_MAX_FRAME <= value <= 2**24 - 1:
                        raise _ConnectionError(http2.PROTOCOL_ERROR, f"a max frame size of {value}")
                    self.peer_max_frame = value
                elif key == http2.SETTINGS_ENABLE_PUSH and value > 1:
                    raise _ConnectionError(http2.PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
            self.write(http2.frame(http2.SETTINGS, http2.ACK, 0))
            self.cond.notify_all()

    def on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(http2.FRAME_SIZE_ERROR, "a WINDOW_UPDATE of the wrong size")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        broken = None
        with self.cond:
            if stream_id == 0:
                if increment == 0:
                    raise _ConnectionError(http2.PROTOCOL_ERROR, "a connection WINDOW_UPDATE of 0")
                self.send_window += increment
                if self.send_window > http2.MAX_WINDOW:
                    raise _ConnectionError(http2.FLOW_CONTROL_ERROR, "the connection window overflowed")
            elif (call := self.calls.get(stream_id)) is not None:
                call.send_window += increment
                if increment == 0 or call.send_window > http2.MAX_WINDOW:
                    broken = call
            self.cond.notify_all()
        if broken is not None:
            broken.end(StatusCode.INTERNAL, "a flow-control error", http2.FLOW_CONTROL_ERROR)

    # -- ending -------------------------------------------------------------------------------------

    def go_away(self) -> None:
        """The server is stopping: the client may finish its open calls but opens no more (I/O thread)."""
        self.going_away = True
        with self.cond:
            self.write(http2.frame(http2.GOAWAY, 0, 0, struct.pack(">II", self.last_stream_id, http2.NO_ERROR)))

    def lost(self, reason: str) -> None:
        """Close the connection and end its calls, which the client can no longer be told of (I/O thread)."""
        log.debug("grpc: a connection ends: %s", reason)
        with self.cond:
            if self.output and not self.closed:  # a last GOAWAY, if the socket takes it
                with contextlib.suppress(OSError):
                    self.sock.send(self.output)
            self.closed = True
            calls = list(self.calls.values())
            self.cond.notify_all()
        for call in calls:
            call.end(StatusCode.CANCELLED, reason, tell=False)
        self.server.forget(self)
        self.sock.close()


# ---------------------------------------------------------------------------------------------- call


class _Call:
    """One call: its request side as the I/O thread receives it, its response side as its handler sends it.

    It ends exactly once, by :meth:`finish` (its handler's outcome) or :meth:`end` (cancelled, past its deadline,
    its connection gone, a broken request); then its callbacks run and the server counts it out.
    """

    def __init__(
        self,
        connection: _Connection,
        stream_id: int,
        method: str,
        handler: Any,
        metadata: tuple[Metadatum, ...],
        deadline: float | None,
        gzip: bool,
    ) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self.method = method
        self.handler = handler
        self.deadline = deadline
        self.gzip = gzip
        self.context = Context(self, metadata)
        self.inline = False  # run by the I/O thread: sends only what the windows take at once
        # I/O thread only:
        self.pending = bytearray()  # request bytes not yet a whole message
        self.unary_request: bytes | None = None
        self.remote_ended = False
        # under connection.cond:
        self.send_window = connection.peer_initial_window
        self.headers_sent = False
        self.ended = False
        self.callbacks: list[Callable[[], None]] = []
        self.queued_bytes = 0  # request messages received, not yet taken by the handler
        self.unacknowledged = 0  # request bytes received, not yet given back to the stream window
        self.requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()  # None: the request side ended

    # -- request side (I/O thread) ------------------------------------------------------------------

    def on_data(self, data: bytes, size: int) -> None:
        if self.remote_ended:
            self.end(StatusCode.INTERNAL, "DATA after the end of the request", http2.STREAM_CLOSED)
            return
        with self.connection.cond:
            overrun = self.unacknowledged + size > _STREAM_WINDOW
        if overrun:  # what is buffered is bounded only while clients keep to the stream window
            self.end(StatusCode.INTERNAL, "the client overran the stream window", http2.FLOW_CONTROL_ERROR)
            return
        self.pending += data
        while len(self.pending) >= 5:
            compressed, length = MESSAGE_PREFIX.unpack_from(self.pending)
            limit = self.connection.server.max_message_size
            if length > limit:
                self.end(StatusCode.RESOURCE_EXHAUSTED, f"Received message larger than max ({length} vs. {limit})")
                return
            if len(self.pending) < 5 + length:
                break
            message = bytes(self.pending[5 : 5 + length])
            del self.pending[: 5 + length]
            if compressed:
                try:
                    message = self._decompress(message)
                except ValueError as err:
                    self.end(StatusCode.INTERNAL, str(err))
                    return
            if not self.on_message(message):
                return
        with self.connection.cond:
            if not self.ended:
                self.unacknowledged += size
                self._top_up_window()

    def _decompress(self, message: bytes) -> bytes:
        if not self.gzip:
            raise ValueError("a compressed message without grpc-encoding")
        decompressor = zlib.decompressobj(wbits=31)
        try:
            data = decompressor.decompress(message, self.connection.server.max_message_size + 1)
        except zlib.error as err:
            raise ValueError(f"a message that does not decompress: {err}") from None
        if len(data) > self.connection.server.max_message_size:
            raise ValueError("a compressed message larger than max when decompressed")
        if not decompressor.eof:
            raise ValueError("a truncated compressed message")
        return data

    def on_message(self, message: bytes) -> bool:
        """Take one request message; False when that ended the call."""
        if not self.handler.request_streaming:
            if self.unary_request is not None:
                self.end(StatusCode.INTERNAL, "more than one request message for a unary method")
                return False
            self.unary_request = message
            return True
        with self.connection.cond:
            self.queued_bytes += len(message)
        self.requests.put(message)
        return True

    def on_remote_end(self) -> None:
        if self.remote_ended:
            return
        self.remote_ended = True
        if self.pending:
            self.end(StatusCode.INTERNAL, "the request ended inside a message")
        elif self.handler.request_streaming:
            self.requests.put(None)
        elif self.unary_request is None:
            self.end(StatusCode.INTERNAL, "no request message for a unary method")
        else:
            self.connection.server.dispatch(self)

    def _top_up_window(self) -> None:
        """Give received bytes back to the stream's window while few wait unconsumed (``cond`` held)."""
        if self.unacknowledged >= _STREAM_WINDOW // 2 and self.queued_bytes < _QUEUED_LIMIT and not self.remote_ended:
            increment = struct.pack(">I", self.unacknowledged)
            self.connection.write(http2.frame(http2.WINDOW_UPDATE, 0, self.stream_id, increment))
            self.unacknowledged = 0

    def take_request(self) -> bytes | None:
        """The next request message for a streaming handler, None at the end; _CallEnded once the call ended."""
        message = self.requests.get()
        if message is None:
            self.requests.put(None)  # whoever asks again learns the same
            if self.ended:
                raise _CallEnded
            return None
        with self.connection.cond:
            self.queued_bytes -= len(message)
            self._top_up_window()
        return message

    # -- response side (a worker) -------------------------------------------------------------------

    def run(self, rest: Callable[[], None] | None = None) -> None:
        """Run the handler and send its outcome, or do the ``rest`` of an inline call (:meth:`_hand_over`); the
        call ends, whatever the handler or its outcome raise."""
        if self.ended and rest is None:  # past its deadline, or cancelled, while it waited for a worker
            return
        try:
            self._run_handler(rest)
        except Exception as err:  # an outcome that cannot be sent (a status that is not one, say)
            log.error("grpc: %s: its outcome could not be sent", self.method, exc_info=err)
            self.end(StatusCode.INTERNAL, f"the server could not send the outcome: {type(err).__name__}")

    def _run_handler(self, rest: Callable[[], None] | None) -> None:
        handler, context = self.handler, self.context
        try:
            if rest is not None:
                rest()
                return
            if handler.request_streaming:
                request: Any = _RequestIterator(self, handler.request_deserializer)
            else:
                assert self.unary_request is not None
                request = _deserialize(handler.request_deserializer, self.unary_request)
            if handler.response_streaming:
                behaviour = handler.stream_stream if handler.request_streaming else handler.unary_stream
                self._stream(iter(behaviour(request, context)), None)
            else:
                behaviour = handler.stream_unary if handler.request_streaming else handler.unary_unary
                response = behaviour(request, context)
                code, details = context.status_or(StatusCode.OK)
                if _wire_code(code) == 0 and response is None:
                    code, details = StatusCode.INTERNAL, f"{self.method} returned no response"
                self.finish(code, details, response if _wire_code(code) == 0 else None)
        except _Abort:
            self.finish(*context.status_or(StatusCode.UNKNOWN))
        except _CallEnded:
            pass
        except _CallFailed as err:
            self.finish(err.code, err.details)
        except Exception as err:
            if self.ended:
                log.debug("grpc: %s raised after its call ended: %r", self.method, err)
            elif context.has_code():
                self.finish(*context.status_or(StatusCode.UNKNOWN))
            else:
                self.finish(*self.connection.server.error_status(err, self.method))
        except BaseException:
            self.end(StatusCode.UNKNOWN, "the handler was interrupted")
            raise

    def _stream(self, responses: Iterator[Any], pending: Any) -> None:
        """Send ``pending`` (unless None) and the rest of ``responses``, close them, and finish. An inline call
        hands what does not fit the windows now, and the rest, to a worker."""
        try:
            if pending is not None:
                self.send_message(pending)
            for response in responses:
                self.send_message(response)
        except _WouldWait as wait:
            self._hand_over(functools.partial(self._stream, responses, wait.response))
            return
        except BaseException:
            _close(responses)
            raise
        _close(responses)
        self.finish(*self.context.status_or(StatusCode.OK))

    def send_message(self, response: Any) -> None:
        """Send one response message; _CallEnded when the call ended first, _WouldWait (nothing sent) when the call
        is inline and the message does not fit the windows now."""
        data = self._encode(response)
        frames: list[bytes] = []
        with self.connection.cond:
            if self.inline and not self._fits(len(data)):
                raise _WouldWait(response)
            self._headers(frames)
            self._data(data, frames)
            self.connection.write(b"".join(frames))

    def send_initial_metadata(self) -> None:
        with self.connection.cond:
            frames: list[bytes] = []
            self._headers(frames)
            self.connection.write(b"".join(frames))

    def _encode(self, response: Any) -> bytes:
        serializer = self.handler.response_serializer
        try:
            data = serializer(response) if serializer is not None else response
        except Exception as err:
            raise _CallFailed(StatusCode.INTERNAL, f"failed to serialize the response: {err}") from None
        limit = self.connection.server.max_message_size
        if len(data) > limit:
            raise _CallFailed(StatusCode.RESOURCE_EXHAUSTED, f"Sent message larger than max ({len(data)} vs. {limit})")
        return MESSAGE_PREFIX.pack(0, len(data)) + data

    def _fits(self, size: int) -> bool:
        """Whether ``size`` bytes of DATA go out now, without waiting for a window or the socket (``cond`` held)."""
        connection = self.connection
        window = min(connection.send_window, self.send_window)
        return size <= window and len(connection.output) + size <= _OUTPUT_HIGH_WATER

    def _headers(self, frames: list[bytes]) -> None:
        """The response headers, once (``cond`` held); _CallEnded when the call ended."""
        if self.ended:
            raise _CallEnded
        if not self.headers_sent:
            block = _RESPONSE_HEADERS
            if self.context.initial:
                block += Encoder().encode(_metadata_fields(self.context.initial))
            self.headers_sent = True
            frames.append(http2.frame(http2.HEADERS, http2.END_HEADERS, self.stream_id, block))

    def _data(self, data: bytes, frames: list[bytes]) -> None:
        """Append ``data`` to ``frames`` as DATA frames within the windows and the client's frame size, writing
        them out and waiting whenever the windows are spent (``cond`` held)."""
        connection = self.connection
        view = memoryview(data)
        while view:
            while True:
                if self.ended or connection.closed:
                    raise _CallEnded
                window = min(connection.send_window, self.send_window)
                if window > 0 and len(connection.output) < _OUTPUT_HIGH_WATER:
                    break
                if frames:
                    connection.write(b"".join(frames))
                    frames.clear()
                connection.cond.wait()
            budget = min(window, _OUTPUT_HIGH_WATER)
            while view and budget > 0:
                size = min(len(view), budget, connection.peer_max_frame)
                frames.append(http2.frame(http2.DATA, 0, self.stream_id, view[:size]))
                view = view[size:]
                budget -= size
                connection.send_window -= size
                self.send_window -= size
            if view:  # more to come: this part goes out before the windows and the buffer are looked at again
                connection.write(b"".join(frames))
                frames.clear()

    def finish(self, code: Any, details: str, response: Any = None) -> None:
        """End the call with its response (for a unary one), status and trailing metadata."""
        try:
            data = self._encode(response) if response is not None else None
        except _CallFailed as err:
            code, details, data = err.code, err.details, None
        try:
            trailing = _metadata_fields(self.context.trailing)
        except (TypeError, ValueError) as err:  # a -bin value not bytes: raised here, it would leave the call open
            code, details, data, trailing = StatusCode.INTERNAL, f"bad trailing metadata: {err}", None, []
        fields = _status_fields(code, details) + trailing
        frames: list[bytes] = []
        connection = self.connection
        with connection.cond:
            if data is not None and self.inline and not self._fits(len(data)):
                callbacks = None
            else:
                try:
                    if data is not None:
                        self._headers(frames)
                        self._data(data, frames)
                except _CallEnded:
                    return
                if self.ended:
                    return
                connection.write(b"".join(frames + self._closing_frames(fields, http2.NO_ERROR)))
                callbacks = self._close()
        if callbacks is None:  # an inline call's response that does not fit the windows now
            self._hand_over(functools.partial(self.finish, code, details, response))
        else:
            self._after_end(callbacks)

    def _hand_over(self, rest: Callable[[], None]) -> None:
        """Have a worker do the ``rest`` of an inline call: send what the windows could not take at once (it may
        wait for them), with the handler's errors and the call's end dealt with as on any worker."""
        self.inline = False
        self.connection.server.submit(self, functools.partial(self.run, rest))

    # -- ending from outside the handler (any thread) -----------------------------------------------

    def end(self, code: Any, details: str, reset_code: int = http2.NO_ERROR, tell: bool = True) -> None:
        """End the call now, whatever its handler does. Unless ``tell`` is False (the client reset the call or
        is gone) the client gets ``code`` and ``details``, and the stream is reset with ``reset_code`` if the
        request side is still open (NO_ERROR, as grpc-core does: a client takes any other code over the status
        in the trailers). The handler sees its context inactive; its sends and reads fail."""
        connection = self.connection
        with connection.cond:
            if self.ended:
                return
            if tell and not connection.closed:
                connection.write(b"".join(self._closing_frames(_status_fields(code, details), reset_code)))
            callbacks = self._close()
        self._after_end(callbacks)

    def _closing_frames(self, fields: list[tuple[str, str]], reset_code: int) -> list[bytes]:
        """The frames that end the stream with the trailer ``fields`` (a trailers-only response if no headers
        went out), then, while the request side is open, RST_STREAM ``reset_code``: the client need not send
        more (``cond`` held)."""
        if not self.headers_sent:
            block = _RESPONSE_HEADERS + Encoder().encode(fields)
        elif fields == _OK_FIELDS:
            block = _OK_TRAILERS
        else:
            block = Encoder().encode(fields)
        frames = [http2.frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, self.stream_id, block)]
        if not self.remote_ended:
            frames.append(http2.frame(http2.RST_STREAM, 0, self.stream_id, struct.pack(">I", reset_code)))
        return frames

    def _close(self) -> list[Callable[[], None]]:
        """Mark the call ended and out of its connection's table (``cond`` held); returns its callbacks."""
        self.ended = True
        self.connection.calls.pop(self.stream_id, None)
        self.requests.put(None)
        self.connection.cond.notify_all()
        callbacks, self.callbacks = self.callbacks, []
        return callbacks

    def _after_end(self, callbacks: list[Callable[[], None]]) -> None:
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("grpc: a termination callback of %s failed", self.method)
        self.connection.server.call_ended()


def _close(responses: Iterator[Any]) -> None:
    """Close a handler's response generator (its ``finally`` blocks run)."""
    close = getattr(responses, "close", None)
    if close is not None:
        close()


class _CallFailed(Exception):
    """The call fails with this status (a request that does not parse, a response too large)."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _deserialize(deserializer: Callable[[bytes], Any] | None, data: bytes) -> Any:
    if deserializer is None:
        return data
    try:
        return deserializer(data)
    except Exception as err:
        raise _CallFailed(StatusCode.INTERNAL, f"failed to parse the request: {err}") from None


def _metadata_fields(metadata: Sequence[tuple[str, Any]]) -> list[tuple[str, str]]:
    """Header fields for metadata: binary (``-bin``) values base64-encoded."""
    fields = []
    for key, value in metadata:
        name = key.lower()
        if name.endswith("-bin"):
            fields.append((name, base64.b64encode(value).decode("ascii").rstrip("=")))
        else:
            fields.append((name, str(value)))
    return fields


class _RequestIterator:
    """A streaming handler's requests: blocks for the next one; ends with the client's side of the call."""

    def __init__(self, call: _Call, deserializer: Callable[[bytes], Any] | None) -> None:
        self._call = call
        self._deserializer = deserializer

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        message = self._call.take_request()
        if message is None:
            raise StopIteration
        return _deserialize(self._deserializer, message)


class Context(grpc.ServicerContext):
    """What a handler gets as ``context``: grpcio's :class:`grpc.ServicerContext` (no peer identities or
    compression: the socket is a local one)."""

    def __init__(self, call: _Call, metadata: tuple[Metadatum, ...]) -> None:
        self._call = call
        self._metadata = metadata
        self._code: Any = None
        self._details = ""
        self.initial: tuple[tuple[str, Any], ...] = ()
        self.trailing: tuple[tuple[str, Any], ...] = ()

    def invocation_metadata(self) -> tuple[Metadatum, ...]:
        return self._metadata

    def peer(self) -> str:
        return "unix:"

    def peer_identities(self) -> None:
        return None

    def peer_identity_key(self) -> None:
        return None

    def auth_context(self) -> dict[str, Any]:
        return {}

    def set_compression(self, compression: Any) -> None:
        """Responses are never compressed."""

    def disable_next_message_compression(self) -> None:
        """Responses are never compressed."""

    def send_initial_metadata(self, initial_metadata: Sequence[tuple[str, Any]]) -> None:
        """Send the response headers now, with ``initial_metadata`` (ignored once the call ended)."""
        self.initial = tuple(initial_metadata)
        with contextlib.suppress(_CallEnded):
            self._call.send_initial_metadata()

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, Any]]) -> None:
        self.trailing = tuple(trailing_metadata)

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self.trailing

    def abort(self, code: Any, details: str) -> Any:
        """End the call with ``code`` (not OK) and ``details``: raises, the handler does not go on."""
        if _wire_code(code) == 0:
            raise ValueError("abort() needs a status other than OK")
        self._code, self._details = code, details or ""
        raise _Abort(details)

    def abort_with_status(self, status: Any) -> Any:
        self.set_trailing_metadata(status.trailing_metadata or ())
        self.abort(status.code, status.details)

    def set_code(self, code: Any) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> Any:
        return self._code

    def details(self) -> str:
        return self._details

    def is_active(self) -> bool:
        return not self._call.ended

    def time_remaining(self) -> float | None:
        deadline = self._call.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def cancel(self) -> None:
        self._call.end(StatusCode.CANCELLED, "cancelled by the server")

    def add_callback(self, callback: Callable[[], None]) -> bool:
        """Run ``callback`` when the call ends, however it ends; False (not registered) when it already has."""
        with self._call.connection.cond:
            if self._call.ended:
                return False
            self._call.callbacks.append(callback)
            return True

    def has_code(self) -> bool:
        """Whether the handler set a status other than OK."""
        return self._code is not None and _wire_code(self._code) != 0

    def status_or(self, default: Any) -> tuple[Any, str]:
        """The status the handler set, or ``default``; and its details."""
        return (self._code if self._code is not None else default), self._details
