"""ckctl's gRPC client: gRPC over one HTTP/2 connection (h2c, prior knowledge) on the daemon's unix socket.

grpcio costs a short-lived ckctl ~100 ms of start-up, more than the work of most commands, so ckctl speaks
gRPC itself: a :class:`Channel` whose ``unary_unary`` / ``unary_stream`` / ``stream_unary`` / ``stream_stream``
callables behave as grpcio's do for what ckctl uses (metadata, timeouts, ``cancel()``, :class:`RpcError` with
``code()`` and ``details()``), and :func:`stub` to build a service's stub from its ``*_pb2`` descriptor.

A channel is thread-safe: one reader thread takes frames off the connection and hands them to the streams
they belong to; writers share one lock. It answers the server's PINGs and SETTINGS, opens our receive windows
wide and tops them up as responses are consumed, and sends within the server's flow-control windows and
frame size. A lost connection or a GOAWAY fails the calls it cuts off with UNAVAILABLE; the next call
connects again.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from core.grpcwire import http2
from core.grpcwire.hpack import Decoder, Encoder, HpackError
from core.grpcwire.status import MESSAGE_PREFIX, StatusCode, percent_decode, timeout_header

__all__ = ["Channel", "RpcError", "StatusCode", "stub"]


class RpcError(Exception):
    """A call that ended with a status other than OK: its :meth:`code` and :meth:`details`."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(code, details)
        self._code = code
        self._details = details

    def code(self) -> StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return f"{self._details} ({self._code.name})"


_WINDOW_TOP_UP = 1 << 24  # consumed bytes that trigger a WINDOW_UPDATE
_HTTP_STATUS_CODES = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}


def _status_of(headers: list[tuple[str, str]]) -> RpcError | None:
    """The call's outcome from its trailers (or trailers-only response): None for OK."""
    fields = dict(headers)
    if "grpc-status" not in fields:
        http = fields.get(":status", "")
        if http and http != "200":
            code = _HTTP_STATUS_CODES.get(int(http) if http.isdigit() else 0, StatusCode.UNKNOWN)
            return RpcError(code, f"Received http2 header with status: {http}")
        return RpcError(StatusCode.INTERNAL, "the server ended the call without a grpc-status")
    try:
        code = StatusCode(int(fields["grpc-status"]))
    except ValueError:
        code = StatusCode.UNKNOWN
    if code is StatusCode.OK:
        return None
    return RpcError(code, percent_decode(fields.get("grpc-message", "")))


class _Stream:
    """One call's HTTP/2 stream: what the reader thread hands over (``events``) and its send window."""

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.send_window = send_window
        self.sent_end = False  # our side is ended (END_STREAM sent)
        self.closed = False  # nothing more may be sent: the stream is over (ended by both sides, or reset)
        self.unacknowledged = 0  # bytes received and consumed but not yet given back to its window


class _ConnectionLost(Exception):
    """The connection cannot go on (end of file, protocol error): the message says why."""


class _Connection:
    """One HTTP/2 connection to the unix socket ``path``; raises OSError when it cannot connect.

    Lock order: ``write_lock`` before ``state``; nothing writes to the socket while holding ``state``.
    """

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.write_lock = threading.Lock()
        self.state = threading.Condition()  # guards the fields below and the streams' windows and flags
        self.streams: dict[int, _Stream] = {}
        self.next_id = 1
        self.usable = True  # False after a GOAWAY or once the connection is lost: no new streams
        self.failure_details = ""  # why the connection is lost
        self.send_window = http2.DEFAULT_WINDOW
        self.peer_initial_window = http2.DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self.peer_max_streams = 2**31
        self.unacknowledged = 0  # connection-level bytes received but not yet given back
        self.encoder = Encoder()
        settings = struct.pack(
            ">HIHI", http2.SETTINGS_ENABLE_PUSH, 0, http2.SETTINGS_INITIAL_WINDOW_SIZE, http2.MAX_WINDOW
        )
        increment = struct.pack(">I", http2.MAX_WINDOW - http2.DEFAULT_WINDOW)
        self.write(
            http2.PREFACE
            + http2.frame(http2.SETTINGS, 0, 0, settings)
            + http2.frame(http2.WINDOW_UPDATE, 0, 0, increment)
        )
        threading.Thread(target=self._read_loop, name="ckctl-rpc-reader", daemon=True).start()

    # -- writing ------------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data`` whole; RpcError UNAVAILABLE (and every open call failed) when the connection is lost."""
        try:
            with self.write_lock:
                self.sock.sendall(data)
        except OSError as err:
            raise self._lose(f"Socket closed ({err.strerror or err})") from None

    def open_stream(self, headers: list[tuple[str, str]]) -> _Stream:
        """A new stream with its HEADERS sent (split into CONTINUATIONs as the frame size asks; our side stays
        open), once fewer than the server's MAX_CONCURRENT_STREAMS are open. RpcError UNAVAILABLE when the
        connection is no longer usable."""
        while True:
            with self.state:
                while self.usable and len(self.streams) >= self.peer_max_streams:
                    self.state.wait()
            with self.write_lock:  # stream ids must reach the wire in order
                with self.state:
                    if not self.usable:
                        raise RpcError(StatusCode.UNAVAILABLE, self.failure_details or "the server is going away")
                    if len(self.streams) >= self.peer_max_streams:
                        continue
                    stream = _Stream(self.next_id, self.peer_initial_window)
                    self.next_id += 2
                    self.streams[stream.id] = stream
                    size = self.peer_max_frame
                block = self.encoder.encode(headers)
                chunks = [block[i : i + size] for i in range(0, len(block), size)] or [b""]
                frames = [
                    http2.frame(
                        http2.CONTINUATION if i else http2.HEADERS,
                        http2.END_HEADERS if i == len(chunks) - 1 else 0,
                        stream.id,
                        c,
                    )
                    for i, c in enumerate(chunks)
                ]
                try:
                    self.sock.sendall(b"".join(frames))
                except OSError as err:
                    failure = f"Socket closed ({err.strerror or err})"
                else:
                    return stream
            raise self._lose(failure)

    def send_data(self, stream: _Stream, data: bytes, end_stream: bool) -> bool:
        """Send ``data`` on ``stream`` within the flow-control windows and the server's frame size, waiting
        for window as needed (and ending our side with ``end_stream``); False when the stream is over first."""
        view = memoryview(data)
        while True:
            with self.state:
                while not stream.closed and view and (self.send_window <= 0 or stream.send_window <= 0):
                    self.state.wait()
            # The frame is sized and written under the write lock, as the SETTINGS ACK is (_on_settings): a frame
            # sized by the windows before a SETTINGS change never reaches the wire after its ACK.
            try:
                with self.write_lock:
                    with self.state:
                        if stream.closed:
                            return False
                        size = min(len(view), self.send_window, stream.send_window, self.peer_max_frame)
                        if view and size <= 0:
                            continue  # a SETTINGS change took the window meanwhile: wait again
                        self.send_window -= size
                        stream.send_window -= size
                        last = size == len(view)
                        stream.sent_end = last and end_stream
                    frame = http2.frame(
                        http2.DATA, http2.END_STREAM if stream.sent_end else 0, stream.id, bytes(view[:size])
                    )
                    self.sock.sendall(frame)
            except OSError as err:
                raise self._lose(f"Socket closed ({err.strerror or err})") from None
            view = view[size:]
            if last:
                return True

    def reset(self, stream: _Stream, code: int = http2.CANCEL) -> None:
        """End ``stream`` from our side with RST_STREAM (nothing when it is already over)."""
        with self.state:
            if stream.closed:
                return
            self._forget(stream)
        with contextlib.suppress(RpcError):
            self.write(http2.frame(http2.RST_STREAM, 0, stream.id, struct.pack(">I", code)))

    def consumed(self, stream: _Stream | None, size: int) -> None:
        """Give ``size`` bytes of ``stream``'s received DATA (of no open stream: None) back to the windows,
        in large increments."""
        updates = b""
        with self.state:
            self.unacknowledged += size
            if self.unacknowledged >= _WINDOW_TOP_UP:
                updates += http2.frame(http2.WINDOW_UPDATE, 0, 0, struct.pack(">I", self.unacknowledged))
                self.unacknowledged = 0
            if stream is not None and not stream.closed:
                stream.unacknowledged += size
                if stream.unacknowledged >= _WINDOW_TOP_UP:
                    updates += http2.frame(http2.WINDOW_UPDATE, 0, stream.id, struct.pack(">I", stream.unacknowledged))
                    stream.unacknowledged = 0
        if updates:
            with contextlib.suppress(RpcError):  # the calls learn of a lost connection from the reader
                self.write(updates)

    def _forget(self, stream: _Stream) -> None:
        """Mark ``stream`` over and no longer open (call with ``state`` held)."""
        stream.closed = True
        self.streams.pop(stream.id, None)
        self.state.notify_all()

    def close(self) -> None:
        """Close the socket; the reader then fails the calls still open."""
        with self.state:
            self.usable = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    # -- reading ------------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        decoder = Decoder()
        buffer = bytearray()
        block = bytearray()  # a header block arriving in CONTINUATIONs
        block_stream, block_flags = 0, 0
        try:
            while True:
                while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                    data = self.sock.recv(1 << 20)
                    if not data:
                        raise _ConnectionLost("Socket closed")
                    buffer += data
                length = int.from_bytes(buffer[:3], "big")
                kind, flags, stream_id = buffer[3], buffer[4], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
                payload = bytes(buffer[9 : 9 + length])
                del buffer[: 9 + length]
                if block_stream and kind != http2.CONTINUATION:
                    raise _ConnectionLost("protocol error: a header block was interrupted")
                if kind == http2.DATA:
                    self._on_data(flags, stream_id, payload)
                elif kind == http2.HEADERS or (kind == http2.CONTINUATION and block_stream):
                    if kind == http2.HEADERS:
                        block_stream, block_flags = stream_id, flags
                        payload = http2.unpad(flags, payload)[5 if flags & http2.PRIORITY_FLAG else 0 :]
                    block += payload
                    if flags & http2.END_HEADERS:
                        headers = decoder.decode(bytes(block))
                        block.clear()
                        self._on_headers(block_stream, bool(block_flags & http2.END_STREAM), headers)
                        block_stream = 0
                elif kind == http2.RST_STREAM:
                    self._on_reset(stream_id, int.from_bytes(payload[:4], "big"))
                elif kind == http2.SETTINGS and not flags & http2.ACK:
                    self._on_settings(payload)
                elif kind == http2.PING and not flags & http2.ACK:
                    self.write(http2.frame(http2.PING, http2.ACK, 0, payload))
                elif kind == http2.GOAWAY:
                    self._on_goaway(int.from_bytes(payload[:4], "big") & 0x7FFFFFFF, payload[8:])
                elif kind == http2.WINDOW_UPDATE:
                    self._on_window_update(stream_id, int.from_bytes(payload[:4], "big") & 0x7FFFFFFF)
        except _ConnectionLost as err:
            self._lose(str(err))
        except HpackError as err:
            self._lose(f"protocol error: bad header block: {err}")
        except ValueError as err:  # bad padding
            self._lose(f"protocol error: {err}")
        except OSError as err:
            self._lose(f"Socket closed ({err.strerror or err})")
        except RpcError:
            pass  # a write failed: the connection is already marked lost

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        with self.state:
            stream = self.streams.get(stream_id)
        if stream is None:  # a stream we gave up: its bytes still count against the connection window
            self.consumed(None, len(payload))
            return
        stream.events.put(("data", (http2.unpad(flags, payload), len(payload))))
        if flags & http2.END_STREAM:
            stream.events.put(("end", None))
            self._remote_ended(stream)

    def _on_headers(self, stream_id: int, end_stream: bool, headers: list[tuple[str, str]]) -> None:
        with self.state:
            stream = self.streams.get(stream_id)
        if stream is not None:
            stream.events.put(("headers", (headers, end_stream)))
            if end_stream:
                self._remote_ended(stream)

    def _remote_ended(self, stream: _Stream) -> None:
        """The server ended ``stream``: it is over; our side too (RST_STREAM NO_ERROR when still open)."""
        with self.state:
            still_sending = not stream.sent_end
            self._forget(stream)
        if still_sending:
            with contextlib.suppress(RpcError):
                self.write(http2.frame(http2.RST_STREAM, 0, stream.id, struct.pack(">I", http2.NO_ERROR)))

    def _on_reset(self, stream_id: int, code: int) -> None:
        with self.state:
            stream = self.streams.get(stream_id)
            if stream is None:
                return
            self._forget(stream)
        status = {
            http2.NO_ERROR: StatusCode.INTERNAL,
            http2.REFUSED_STREAM: StatusCode.UNAVAILABLE,
            http2.CANCEL: StatusCode.CANCELLED,
        }
        error = RpcError(status.get(code, StatusCode.INTERNAL), f"Received RST_STREAM with error code {code}")
        stream.events.put(("error", error))

    def _on_settings(self, payload: bytes) -> None:
        """Apply the server's SETTINGS and acknowledge them, under the write lock (see :meth:`send_data`): the
        server holds our DATA to the new windows once it has our ACK."""
        try:
            with self.write_lock:
                with self.state:
                    for offset in range(0, len(payload) - 5, 6):
                        key, value = struct.unpack_from(">HI", payload, offset)
                        if key == http2.SETTINGS_INITIAL_WINDOW_SIZE:
                            for stream in self.streams.values():
                                stream.send_window += value - self.peer_initial_window
                            self.peer_initial_window = value
                        elif key == http2.SETTINGS_MAX_FRAME_SIZE:
                            self.peer_max_frame = value
                        elif key == http2.SETTINGS_MAX_CONCURRENT_STREAMS:
                            self.peer_max_streams = value
                    self.state.notify_all()
                self.sock.sendall(http2.frame(http2.SETTINGS, http2.ACK, 0))
        except OSError as err:
            raise self._lose(f"Socket closed ({err.strerror or err})") from None

    def _on_goaway(self, last_stream_id: int, debug: bytes) -> None:
        """No new streams; those above ``last_stream_id`` were not processed and fail UNAVAILABLE."""
        details = f"the server went away: {debug.decode(errors='replace')}"
        with self.state:
            self.usable = False
            cut = [stream for stream_id, stream in self.streams.items() if stream_id > last_stream_id]
            for stream in cut:
                self._forget(stream)
        for stream in cut:
            stream.events.put(("error", RpcError(StatusCode.UNAVAILABLE, details)))

    def _on_window_update(self, stream_id: int, increment: int) -> None:
        with self.state:
            if stream_id == 0:
                self.send_window += increment
            elif stream_id in self.streams:
                self.streams[stream_id].send_window += increment
            self.state.notify_all()

    def _lose(self, message: str) -> RpcError:
        """The connection is gone: every open call fails UNAVAILABLE with ``message`` (the first reason
        given wins); returns such an error."""
        with self.state:
            self.usable = False
            self.failure_details = self.failure_details or message
            lost = list(self.streams.values())
            for stream in lost:
                self._forget(stream)
        for stream in lost:
            stream.events.put(("error", RpcError(StatusCode.UNAVAILABLE, self.failure_details)))
        return RpcError(StatusCode.UNAVAILABLE, self.failure_details)


class _Call:
    """One call in progress: sends its requests and reads its responses (an iterator of messages)."""

    def __init__(
        self,
        channel: Channel,
        path: str,
        serializer: Callable[[Any], bytes],
        deserializer: Callable[[bytes], Any],
        metadata: Iterable[tuple[str, str]] | None,
        timeout: float | None,
    ) -> None:
        self._deserializer = deserializer
        self._serializer = serializer
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._buffer = bytearray()
        self._error: RpcError | None = None
        self._done = False
        self._headers_seen = False
        self._headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
            ("user-agent", "containerkit-ckctl"),
        ]
        if timeout is not None:
            self._headers.append(("grpc-timeout", timeout_header(timeout)))
        self._headers += [(key.lower(), value) for key, value in metadata or ()]
        self._connection = channel._connection()
        self._stream: _Stream | None = None

    def start(self, request: Any) -> None:
        """Open the stream and send ``request`` as the whole request side (a unary request)."""
        self._stream = self._connection.open_stream(self._headers)
        self._connection.send_data(self._stream, self._message(request), end_stream=True)

    def start_streaming(self, requests: Iterator[Any]) -> None:
        """Open the stream and send ``requests`` from a thread of their own, then end our side."""
        self._stream = self._connection.open_stream(self._headers)
        threading.Thread(target=self._send_all, args=(requests,), name="ckctl-rpc-sender", daemon=True).start()

    def _message(self, request: Any) -> bytes:
        data = self._serializer(request)
        return MESSAGE_PREFIX.pack(0, len(data)) + data

    def _send_all(self, requests: Iterator[Any]) -> None:
        assert self._stream is not None
        stream = self._stream
        try:
            for request in requests:
                if not self._connection.send_data(stream, self._message(request), end_stream=False):
                    return
            self._connection.send_data(stream, b"", end_stream=True)
        except RpcError:
            return  # the connection is lost: the reader fails the call
        except Exception:
            self._connection.reset(stream)
            stream.events.put(("error", RpcError(StatusCode.UNKNOWN, "Exception iterating requests!")))

    def cancel(self) -> bool:
        """Cancel the call (RST_STREAM CANCEL) unless it is over; True when it was cancelled."""
        if self._done or self._stream is None:
            return False
        self._connection.reset(self._stream)
        self._stream.events.put(("error", RpcError(StatusCode.CANCELLED, "Locally cancelled by application!")))
        return True

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        """The next response; StopIteration at a successful end, RpcError for any other."""
        while True:
            if self._error is not None:
                raise self._error
            message = self._take_message()
            if message is not None:
                return self._deserializer(message)
            if self._done:
                if self._buffer:
                    self._fail(RpcError(StatusCode.INTERNAL, "the call ended inside a message"))
                    continue
                raise StopIteration
            self._handle(self._next_event())

    def _take_message(self) -> bytes | None:
        if len(self._buffer) < 5:
            return None
        compressed, length = MESSAGE_PREFIX.unpack_from(self._buffer)
        if compressed:
            self._fail(RpcError(StatusCode.INTERNAL, "the server sent a compressed message"))
            return None
        if len(self._buffer) < 5 + length:
            return None
        message = bytes(self._buffer[5 : 5 + length])
        del self._buffer[: 5 + length]
        return message

    def _next_event(self) -> tuple[str, Any]:
        assert self._stream is not None
        while True:
            wait = 1.0 if self._deadline is None else min(1.0, self._deadline - time.monotonic())
            if wait <= 0:
                self._connection.reset(self._stream)
                return ("error", RpcError(StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            try:  # a bounded wait: the main thread still runs signal handlers (Ctrl-C) promptly
                return self._stream.events.get(timeout=wait)
            except queue.Empty:
                continue

    def _handle(self, event: tuple[str, Any]) -> None:
        kind, value = event
        assert self._stream is not None
        if kind == "data":
            data, size = value
            self._buffer += data
            self._connection.consumed(self._stream, size)
        elif kind == "headers":
            headers, end_stream = value
            if end_stream or self._headers_seen:  # trailers, or a trailers-only response
                self._done = True
                error = _status_of(headers)
                if error is not None:
                    self._fail(error)
            else:
                self._headers_seen = True
                status = dict(headers).get(":status")
                if status != "200":
                    self._fail(_status_of(headers) or RpcError(StatusCode.UNKNOWN, "bad response headers"))
        elif kind == "end":
            self._fail(RpcError(StatusCode.INTERNAL, "the server ended the call without trailers"))
        elif kind == "error":
            self._fail(value)

    def _fail(self, error: RpcError) -> None:
        if self._error is None:
            self._error = error
            self._done = True
            if self._stream is not None:
                self._connection.reset(self._stream)

    def unary_response(self) -> Any:
        """The one response of a call that answers with one (RpcError otherwise)."""
        responses = list(self)
        if len(responses) != 1:
            raise RpcError(StatusCode.INTERNAL, f"expected one response, received {len(responses)}")
        return responses[0]


class Channel:
    """A gRPC channel to the unix socket ``address`` (a path, or ``unix:PATH``); connects at once (OSError
    when it cannot) and again, on the next call, after the connection was lost."""

    def __init__(self, address: str) -> None:
        self._path = address.removeprefix("unix:")
        self._lock = threading.Lock()
        self._current: _Connection | None = _Connection(self._path)

    def _connection(self) -> _Connection:
        """The usable connection, reconnecting when the last one was lost; RpcError UNAVAILABLE on failure."""
        with self._lock:
            if self._current is None or not self._current.usable:
                if self._current is not None:
                    self._current.close()
                try:
                    self._current = _Connection(self._path)
                except OSError as err:
                    reason = err.strerror or str(err)
                    raise RpcError(
                        StatusCode.UNAVAILABLE,
                        f"failed to connect to all addresses; last error: unix:{self._path}: {reason}",
                    ) from None
            return self._current

    def unary_unary(
        self, path: str, request_serializer: Callable[[Any], bytes], response_deserializer: Callable[[bytes], Any]
    ) -> Callable[..., Any]:
        """``(request, metadata=None, timeout=None) -> response``."""
        return self.multi_callable(
            path, request_serializer, response_deserializer, stream_request=False, stream_response=False
        )

    def unary_stream(
        self, path: str, request_serializer: Callable[[Any], bytes], response_deserializer: Callable[[bytes], Any]
    ) -> Callable[..., Any]:
        """``(request, metadata=None, timeout=None) -> responses`` (an iterator with ``cancel()``)."""
        return self.multi_callable(
            path, request_serializer, response_deserializer, stream_request=False, stream_response=True
        )

    def stream_unary(
        self, path: str, request_serializer: Callable[[Any], bytes], response_deserializer: Callable[[bytes], Any]
    ) -> Callable[..., Any]:
        """``(requests, metadata=None, timeout=None) -> response``; ``requests`` is read on a thread of its own."""
        return self.multi_callable(
            path, request_serializer, response_deserializer, stream_request=True, stream_response=False
        )

    def stream_stream(
        self, path: str, request_serializer: Callable[[Any], bytes], response_deserializer: Callable[[bytes], Any]
    ) -> Callable[..., Any]:
        """``(requests, metadata=None, timeout=None) -> responses`` (an iterator with ``cancel()``);
        ``requests`` is read on a thread of its own, so requests and responses interleave."""
        return self.multi_callable(
            path, request_serializer, response_deserializer, stream_request=True, stream_response=True
        )

    def multi_callable(
        self,
        path: str,
        serializer: Callable[[Any], bytes],
        deserializer: Callable[[bytes], Any],
        *,
        stream_request: bool,
        stream_response: bool,
    ) -> Callable[..., Any]:
        """The callable for method ``path``: it takes a request (an iterable of them with ``stream_request``),
        ``metadata`` and ``timeout``, and returns the response (an iterator of them with ``stream_response``)."""

        def call(request: Any, metadata: Iterable[tuple[str, str]] | None = None, timeout: float | None = None) -> Any:
            rpc = _Call(self, path, serializer, deserializer, metadata, timeout)
            if stream_request:
                rpc.start_streaming(iter(request))
            else:
                rpc.start(request)
            if stream_response:
                return rpc
            try:
                return rpc.unary_response()
            finally:
                rpc.cancel()  # a call left while waiting (Ctrl-C) is reset, and its request thread stops

        return call

    def close(self) -> None:
        """Close the connection; calls still open fail UNAVAILABLE."""
        with self._lock:
            if self._current is not None:
                self._current.close()
                self._current = None


def stub(module: Any, service_name: str, channel: Channel) -> Any:
    """A stub for the service ``service_name`` declared in the ``*_pb2`` ``module``: an object with one
    callable per method (named as in the proto), of the kind its streaming flags ask for."""
    from google.protobuf import message_factory

    service = module.DESCRIPTOR.services_by_name[service_name]
    methods: dict[str, Callable[..., Any]] = {}
    for method in service.methods:
        response = message_factory.GetMessageClass(method.output_type)
        methods[method.name] = channel.multi_callable(
            f"/{service.full_name}/{method.name}",
            _serialize,
            response.FromString,
            stream_request=method.client_streaming,
            stream_response=method.server_streaming,
        )
    return types.SimpleNamespace(**methods)


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data
