"""core.grpcwire.server.Server on its own: gRPC semantics as grpcio's client sees them, and hostile HTTP/2.

Covered: unary / server-streaming / client-streaming / interleaved bidi calls; invocation, initial and trailing
metadata (``-bin`` keys included); abort, set_code, generated-style UNIMPLEMENTED, unknown methods and
core.server's error mapping; 15 MiB messages both ways and the 16 MiB limit in both directions; gzip requests;
cancellation, deadlines and a client vanishing mid-message (the handler's context, callbacks, request iterator
and the open-call count); protocol violations from a raw HTTP/2 client (GOAWAY with the right code, connection
closed, server still serving); trailers-only refusals (405 / 415 / REFUSED_STREAM); a slow reader holding only
its own call; many concurrent clients; PING; ``stop`` with and without grace. The tests of what a handler
sees and sends run twice: with every call on a worker, and with the non-blocking methods answered inline (on
the I/O thread, ``Server.answer_inline``), whose responses beyond the flow-control windows a worker sends.

grpcio's client is the reference client; hostile input is written frame by frame with core.grpcwire.http2 and
core.grpcwire.hpack. Every test stops its server, removes its socket directory and waits for the threads it
started (the server's and grpcio's) to end.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import hashlib
import queue
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest

from core.config import GrpcConfig
from core.errors import NotFound
from core.grpcwire import http2
from core.grpcwire import server as server_module
from core.grpcwire.hpack import Decoder, Encoder, encode_integer
from core.grpcwire.server import Server
from core.grpcwire.status import MESSAGE_PREFIX
from core.server import MAX_MESSAGE_SIZE, new_server

SERVICE = "test.Server"
WAIT = 30.0  # generous bound on anything a test waits for; never a performance expectation
CALL_TIMEOUT = 60.0  # grpcio calls carry a deadline so that a server bug fails a test instead of hanging it
BIG_CHANNEL = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
NON_ASCII_DETAILS = "refusé: Zugriff verweigert, 拒否 ✗ 100% \u00bb"
MIB = 1 << 20


def _path(method: str) -> str:
    """The full path of one of the test service's methods."""
    return f"/{SERVICE}/{method}"


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ with position and ``seed``, so truncation or reordering shows."""
    block = bytes((i * 7 + seed) % 251 for i in range(251))
    return (block * (size // len(block) + 1))[:size]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``predicate`` until it holds; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------- the servicer


class Probe:
    """The test service: plain bytes in and out, and handlers that record what they saw in events."""

    def __init__(self) -> None:
        self.entered = threading.Event()  # a recording handler started (a draining one: got its first request)
        self.go = threading.Event()  # lets the Hold handlers return
        self.callback_ran = threading.Event()  # a recording handler's add_callback callback ran
        self.finished = threading.Event()  # a recording handler reached its end (its finally)
        self.context: grpc.ServicerContext | None = None
        self.outcome = ""  # how a draining handler's request iterator ended
        self.active_at_end: bool | None = None
        self.metadata: dict[str, Any] = {}

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """The methods, by name, as generated code would register them."""
        return {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "EchoMetadata": grpc.unary_unary_rpc_method_handler(self.echo_metadata),
            "Abort": grpc.unary_unary_rpc_method_handler(self.abort),
            "SetCode": grpc.unary_unary_rpc_method_handler(self.set_code),
            "Unimplemented": grpc.unary_unary_rpc_method_handler(self.unimplemented),
            "NotFound": grpc.unary_unary_rpc_method_handler(self.not_found),
            "Sized": grpc.unary_unary_rpc_method_handler(self.sized),
            "SizedStream": grpc.unary_stream_rpc_method_handler(self.sized_stream),
            "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
            "EchoStream": grpc.stream_stream_rpc_method_handler(self.echo_stream),
            "Endless": grpc.unary_stream_rpc_method_handler(self.endless),
            "Drain": grpc.stream_unary_rpc_method_handler(self.drain),
            "Block": grpc.unary_unary_rpc_method_handler(self.block),
            "Hold": grpc.unary_unary_rpc_method_handler(self.hold),
            "HoldStream": grpc.stream_unary_rpc_method_handler(self.hold_stream),
            "BadTrailing": grpc.unary_unary_rpc_method_handler(self.bad_trailing),
            "BadInitial": grpc.unary_unary_rpc_method_handler(self.bad_initial),
            "BadCode": grpc.unary_unary_rpc_method_handler(self.bad_code),
            "Thread": grpc.unary_unary_rpc_method_handler(self.thread),
        }

    def thread(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """The name of the thread that runs it."""
        return threading.current_thread().name.encode()

    def _record(self, context: grpc.ServicerContext) -> None:
        """Keep ``context`` and have its call's end set ``callback_ran``."""
        self.context = context
        assert context.add_callback(self.callback_ran.set)

    def bad_code(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Sets a code that is no status, then returns."""
        context.set_code("not a status")
        return request

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """The request, back."""
        return request

    def echo_metadata(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Records the invocation metadata; sends initial metadata, echoes two keys in the trailing metadata."""
        received = {item.key: item.value for item in context.invocation_metadata()}
        self.metadata = received
        context.send_initial_metadata([("initial-key", "initial value"), ("initial-bin", b"\x00\x01init\xff")])
        context.set_trailing_metadata(
            [("trailing-key", str(received.get("plain-key"))), ("echo-bin", received.get("blob-bin", b""))]
        )
        return request

    def abort(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Aborts with PERMISSION_DENIED and non-ASCII details."""
        context.abort(grpc.StatusCode.PERMISSION_DENIED, NON_ASCII_DETAILS)
        raise AssertionError("abort returned")

    def set_code(self, request: bytes, context: grpc.ServicerContext) -> None:
        """Sets NOT_FOUND and details, then returns normally."""
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("nothing here")

    def unimplemented(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """What a generated servicer base class does for a method not overridden."""
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("Method not implemented!")
        raise NotImplementedError("Method not implemented!")

    def not_found(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Raises a core.errors exception, for core.server.error_status to map."""
        raise NotFound("container c1: not found")

    def sized(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """A response of the size the request names (decimal)."""
        return pattern(int(request))

    def sized_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """``count,size`` in the request: that many responses of that size."""
        count, size = (int(part) for part in request.split(b","))
        for index in range(count):
            yield pattern(size, seed=index)

    def collect(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """The SHA-256 digests of the requests, concatenated."""
        return b"".join(hashlib.sha256(request).digest() for request in requests)

    def echo_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """Each request back as soon as it arrives."""
        yield from requests

    def endless(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """16 KiB responses until the call ends; records its end in its ``finally``."""
        self._record(context)
        try:
            index = 0
            while True:
                yield pattern(16 << 10, seed=index)
                index += 1
        finally:
            self.active_at_end = context.is_active()
            self.finished.set()

    def drain(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """Reads every request; records how the request iterator ended."""
        self._record(context)
        try:
            for _ in requests:
                self.entered.set()
            self.outcome = "ended"
        except Exception as err:
            self.outcome = f"raised {type(err).__name__}"
            raise
        finally:
            self.active_at_end = context.is_active()
            self.finished.set()
        return b"drained"

    def block(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Waits until its call's end runs its callback; records whether the context is still active."""
        self._record(context)
        self.entered.set()
        self.callback_ran.wait(WAIT)  # the call's end (its deadline) runs the callback, which wakes us
        self.active_at_end = context.is_active()
        self.finished.set()
        return b"too late"

    def hold(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Waits for ``go``."""
        self.entered.set()
        self.go.wait(WAIT)
        self.finished.set()
        return b"held"

    def hold_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """Waits for ``go`` without reading its requests."""
        self.entered.set()
        self.go.wait(WAIT)
        return b"held"

    def bad_trailing(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Sets a ``-bin`` trailing value that is a str, not bytes."""
        context.set_trailing_metadata([("x-bin", "text, not bytes")])
        return b"unsent"

    def bad_initial(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Sends a ``-bin`` initial value that is an int."""
        context.send_initial_metadata([("y-bin", 5)])
        return b"unsent"


# ---------------------------------------------------------------------------------------------- the server


@dataclass
class Served:
    """A started server on a private socket, with the probe its handlers report to."""

    server: Server
    path: str
    probe: Probe

    @property
    def address(self) -> str:
        """The server's address as grpcio takes it."""
        return f"unix:{self.path}"

    def channel(self, **kwargs: Any) -> grpc.Channel:
        """A new grpcio channel (its own connection) to the server."""
        return grpc.insecure_channel(self.address, **kwargs)

    def raw(self, settings: bytes = b"", greet: bool = True) -> RawClient:
        """A hand-driven HTTP/2 connection; ``greet`` sends the preface and ``settings`` first."""
        client = RawClient(self.path)
        if greet:
            client.send(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0, settings))
        return client

    def open_calls(self) -> int:
        """The server's count of calls not yet ended."""
        return self.server._open_calls

    def assert_serves(self) -> None:
        """A fresh grpcio client gets an answer: the server is still serving."""
        with self.channel() as channel:
            assert channel.unary_unary(_path("Echo"))(b"still here", timeout=CALL_TIMEOUT) == b"still here"


NON_BLOCKING = ("Echo", "EchoMetadata", "Abort", "SetCode", "Unimplemented", "NotFound", "Sized", "SizedStream",
                "BadTrailing", "BadInitial", "BadCode", "Thread")  # fmt: skip
"""The probe's methods that may be answered inline: none of them waits for anything."""


@contextlib.contextmanager
def serving(config: GrpcConfig | None = None, inline: Iterable[str] = ()) -> Iterator[Served]:
    """A server built by core.server.new_server with the probe's handlers, the ``inline`` ones answered on the
    I/O thread; on exit: every handler released, the server stopped, its directory removed and every thread
    started meanwhile ended."""
    threads_before = set(threading.enumerate())
    directory = Path(tempfile.mkdtemp(prefix="ck-grpcsrv-", dir="/tmp"))
    probe = Probe()
    server = new_server(config or GrpcConfig())
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, probe.handlers())])
    server.answer_inline(_path(method) for method in inline)
    path = str(directory / "sock")
    server.add_insecure_port(f"unix:{path}")
    server.start()
    try:
        yield Served(server, path, probe)
    finally:
        probe.go.set()
        probe.callback_ran.set()
        try:
            assert server.stop(None).wait(WAIT), "the server did not stop"
        finally:
            shutil.rmtree(directory, ignore_errors=True)

        def leftover() -> list[threading.Thread]:
            """Threads alive now that were not before the server started."""
            return [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]

        with contextlib.suppress(AssertionError):
            wait_until(lambda: not leftover(), "threads to end")
        assert not leftover(), f"threads left running: {[t.name for t in leftover()]}"


@pytest.fixture
def served() -> Iterator[Served]:
    """A server with the default GrpcConfig, cleaned up after the test."""
    with serving() as running:
        yield running


@pytest.fixture(params=["workers", "inline"])
def served_both(request: pytest.FixtureRequest) -> Iterator[Served]:
    """As ``served``; then again with the non-blocking methods answered inline."""
    with serving(inline=NON_BLOCKING if request.param == "inline" else ()) as running:
        yield running


# ---------------------------------------------------------------------------------------------- raw HTTP/2


class Frame(NamedTuple):
    """One HTTP/2 frame as read from the server."""

    kind: int
    flags: int
    stream_id: int
    payload: bytes


class RawClient:
    """An HTTP/2 client connection driven by hand: it sends exactly what it is told and reads frames."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)
        self.input = bytearray()
        self.decoder = Decoder()

    def __enter__(self) -> RawClient:
        """The client itself; closed on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Send ``data``; the server having closed the connection meanwhile is not an error here."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def read_frame(self) -> Frame | None:
        """The next frame, None once the server closed the connection (a socket timeout fails the test)."""
        while True:
            if len(self.input) >= 9:
                high, low, kind, flags, stream_id = http2.FRAME_HEADER.unpack_from(self.input)
                length = (high << 16) | low
                if len(self.input) >= 9 + length:
                    payload = bytes(self.input[9 : 9 + length])
                    del self.input[: 9 + length]
                    return Frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:  # a unix socket closed with our bytes unread: the same as EOF
                data = b""
            if not data:
                return None
            self.input += data

    def read_until(self, done: Callable[[Frame], bool]) -> list[Frame]:
        """Frames up to and including the first one ``done`` accepts; AssertionError if the connection ends."""
        frames = []
        while (received := self.read_frame()) is not None:
            frames.append(received)
            if done(received):
                return frames
        raise AssertionError(f"the connection ended before the awaited frame; got {frames}")

    def read_to_eof(self) -> list[Frame]:
        """Every frame until the server closes the connection."""
        frames = []
        while (received := self.read_frame()) is not None:
            frames.append(received)
        return frames

    def headers(self, received: Frame) -> dict[str, str]:
        """A HEADERS frame's fields (the server sends whole blocks, never CONTINUATIONs)."""
        assert received.kind == http2.HEADERS and received.flags & http2.END_HEADERS
        return dict(self.decoder.decode(received.payload))

    def open(
        self,
        stream_id: int,
        method: str,
        *,
        end_stream: bool = False,
        http_method: str = "POST",
        content_type: str = "application/grpc",
    ) -> None:
        """Send the request headers of a call on ``stream_id``."""
        flags = http2.END_HEADERS | (http2.END_STREAM if end_stream else 0)
        block = request_block(_path(method), http_method=http_method, content_type=content_type)
        self.send(http2.frame(http2.HEADERS, flags, stream_id, block))

    def unary(self, stream_id: int, method: str, request: bytes) -> tuple[dict[str, str], bytes, dict[str, str]]:
        """A whole unary call: (response headers, response body, trailers)."""
        self.open(stream_id, method)
        self.send(http2.frame(http2.DATA, http2.END_STREAM, stream_id, message(request)))
        return self.response(stream_id)

    def response(self, stream_id: int) -> tuple[dict[str, str], bytes, dict[str, str]]:
        """Read a call's response to its end: (headers, concatenated DATA, trailers)."""
        return self.responses([stream_id])[stream_id]

    def responses(self, stream_ids: Iterable[int]) -> dict[int, tuple[dict[str, str], bytes, dict[str, str]]]:
        """Read the responses of several calls, in whatever order their frames come, to their ends."""
        headers: dict[int, dict[str, str]] = {stream_id: {} for stream_id in stream_ids}
        bodies = {stream_id: bytearray() for stream_id in headers}
        done: dict[int, tuple[dict[str, str], bytes, dict[str, str]]] = {}
        while len(done) < len(headers):
            received = self.read_frame()
            if received is None:
                raise AssertionError(f"the connection ended before the responses; got {done}")
            stream_id = received.stream_id
            if stream_id not in headers or stream_id in done:
                continue
            if received.kind == http2.DATA:
                bodies[stream_id] += received.payload
            elif received.kind == http2.HEADERS:
                fields = self.headers(received)
                if received.flags & http2.END_STREAM:
                    done[stream_id] = (headers[stream_id], bytes(bodies[stream_id]), fields)
                else:
                    headers[stream_id] = fields
        return done


def request_block(path: str, http_method: str = "POST", content_type: str = "application/grpc") -> bytes:
    """An HPACK block of a gRPC request's headers."""
    return Encoder().encode(
        [
            (":method", http_method),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", content_type),
            ("te", "trailers"),
        ]
    )


def message(data: bytes) -> bytes:
    """``data`` as one length-prefixed, uncompressed gRPC message."""
    return MESSAGE_PREFIX.pack(0, len(data)) + data


def goaway_code(frames: Iterable[Frame]) -> int | None:
    """The error code of the first GOAWAY among ``frames``, None without one."""
    for received in frames:
        if received.kind == http2.GOAWAY:
            return int.from_bytes(received.payload[4:8], "big")
    return None


# ---------------------------------------------------------------------------------------------- 1. normal calls


def test_unary_call(served_both: Served) -> None:
    with served_both.channel() as channel:
        assert channel.unary_unary(_path("Echo"))(b"hello", timeout=CALL_TIMEOUT) == b"hello"
        assert channel.unary_unary(_path("Echo"))(b"", timeout=CALL_TIMEOUT) == b""


def test_server_streaming_call(served_both: Served) -> None:
    with served_both.channel() as channel:
        responses = list(channel.unary_stream(_path("SizedStream"))(b"5,1000", timeout=CALL_TIMEOUT))
    assert responses == [pattern(1000, seed=index) for index in range(5)]


def test_client_streaming_call(served: Served) -> None:
    requests = [pattern(size, seed=size) for size in (0, 1, 100, 70000)]
    with served.channel() as channel:
        digest = channel.stream_unary(_path("Collect"))(iter(requests), timeout=CALL_TIMEOUT)
    assert digest == b"".join(hashlib.sha256(request).digest() for request in requests)


def test_bidi_call_interleaved(served: Served) -> None:
    """Each request is sent only after the answer to the previous one arrived."""
    outgoing: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        """What the test puts in ``outgoing``, until None."""
        while (item := outgoing.get()) is not None:
            yield item

    with served.channel() as channel:
        responses = channel.stream_stream(_path("EchoStream"))(requests(), timeout=CALL_TIMEOUT)
        try:
            for index in range(10):
                outgoing.put(pattern(index * 10, seed=index))
                assert next(responses) == pattern(index * 10, seed=index)
        finally:
            outgoing.put(None)
        assert list(responses) == []
        assert responses.code() == grpc.StatusCode.OK


def test_metadata_both_ways(served_both: Served) -> None:
    blob = bytes(range(256))
    with served_both.channel() as channel:
        response, call = channel.unary_unary(_path("EchoMetadata")).with_call(
            b"meta", metadata=[("plain-key", "plain value"), ("blob-bin", blob)], timeout=CALL_TIMEOUT
        )
    assert response == b"meta"
    received = served_both.probe.metadata
    assert received["plain-key"] == "plain value"
    assert received["blob-bin"] == blob
    assert not {"content-type", "te", "grpc-timeout"} & set(received)
    assert not any(key.startswith(":") for key in received)
    initial = dict(call.initial_metadata())
    assert initial["initial-key"] == "initial value"
    assert initial["initial-bin"] == b"\x00\x01init\xff"
    trailing = dict(call.trailing_metadata())
    assert trailing["trailing-key"] == "plain value"
    assert trailing["echo-bin"] == blob


def test_abort_with_non_ascii_details(served_both: Served) -> None:
    with served_both.channel() as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(_path("Abort"))(b"", timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == NON_ASCII_DETAILS


@pytest.mark.parametrize(
    ("method", "code", "details"),
    [
        ("SetCode", grpc.StatusCode.NOT_FOUND, "nothing here"),  # set_code + set_details, then return
        ("Unimplemented", grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!"),  # as generated servicers
        ("NotFound", grpc.StatusCode.NOT_FOUND, "container c1: not found"),  # a ContainerkitError, mapped
    ],
)
def test_status_a_handler_ends_with(served_both: Served, method: str, code: grpc.StatusCode, details: str) -> None:
    with served_both.channel() as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(_path(method))(b"", timeout=CALL_TIMEOUT)
    assert (info.value.code(), info.value.details()) == (code, details)


@pytest.mark.parametrize("method", [_path("NoSuchMethod"), "/no.Such/Service"])
def test_unknown_method(served: Served, method: str) -> None:
    with served.channel() as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(method)(b"", timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert method in info.value.details()


def test_unsendable_trailing_metadata_ends_the_call(served_both: Served) -> None:
    """A ``-bin`` trailing value that is not bytes: the call still ends (INTERNAL), it does not hang."""
    with served_both.channel() as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(_path("BadTrailing"))(b"", timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "trailing metadata" in info.value.details()
    wait_until(lambda: served_both.open_calls() == 0, "the call to be counted out")


def test_unsendable_initial_metadata_fails_the_handler(served_both: Served) -> None:
    """send_initial_metadata raises in the handler; the status then goes out as a well-formed trailers-only
    response (with :status)."""
    with served_both.channel() as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(_path("BadInitial"))(b"", timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNKNOWN
    with served_both.raw() as client:
        headers, body, trailers = client.unary(1, "BadInitial", b"")
    assert (headers, body) == ({}, b"")
    assert trailers[":status"] == "200" and trailers["grpc-status"] == str(grpc.StatusCode.UNKNOWN.value[0])


# ---------------------------------------------------------------------------------------------- 2. sizes


def test_15mib_unary_both_ways(served_both: Served) -> None:
    request = pattern(15 * MIB, seed=1)
    with served_both.channel(options=BIG_CHANNEL) as channel:
        assert channel.unary_unary(_path("Echo"))(request, timeout=CALL_TIMEOUT) == request
        assert channel.unary_unary(_path("Sized"))(str(15 * MIB).encode(), timeout=CALL_TIMEOUT) == pattern(15 * MIB)


def test_15mib_streaming_both_ways(served: Served) -> None:
    requests = [pattern(15 * MIB, seed=2), pattern(15 * MIB, seed=3)]
    with served.channel(options=BIG_CHANNEL) as channel:
        echoed = list(channel.stream_stream(_path("EchoStream"))(iter(requests), timeout=CALL_TIMEOUT))
        assert len(echoed) == 2 and echoed == requests
        digest = channel.stream_unary(_path("Collect"))(iter(requests), timeout=CALL_TIMEOUT)
        assert digest == b"".join(hashlib.sha256(request).digest() for request in requests)
        streamed = list(channel.unary_stream(_path("SizedStream"))(f"2,{15 * MIB}".encode(), timeout=CALL_TIMEOUT))
        assert streamed == [pattern(15 * MIB, seed=0), pattern(15 * MIB, seed=1)]


def test_many_messages_through_the_stream_window(served: Served) -> None:
    """More request bytes than the stream window and the queued-bytes limit, in many messages."""
    requests = [pattern(64 << 10, seed=index) for index in range(200)]
    with served.channel() as channel:
        digest = channel.stream_unary(_path("Collect"))(iter(requests), timeout=CALL_TIMEOUT)
        assert digest == b"".join(hashlib.sha256(request).digest() for request in requests)
        echoed = channel.stream_stream(_path("EchoStream"))(iter(requests), timeout=CALL_TIMEOUT)
        assert list(echoed) == requests


def test_oversized_request_is_resource_exhausted(served: Served) -> None:
    too_big = pattern(17 * MIB)
    with served.channel(options=BIG_CHANNEL) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(_path("Echo"))(too_big, timeout=CALL_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert channel.unary_unary(_path("Echo"))(b"next", timeout=CALL_TIMEOUT) == b"next"
        with pytest.raises(grpc.RpcError) as info:
            channel.stream_unary(_path("Collect"))(iter([b"small", too_big]), timeout=CALL_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert channel.unary_unary(_path("Echo"))(b"after", timeout=CALL_TIMEOUT) == b"after"
    wait_until(lambda: served.open_calls() == 0, "the calls to be counted out")


def test_exactly_max_size_request_is_accepted(served: Served) -> None:
    request = pattern(MAX_MESSAGE_SIZE, seed=4)
    with served.channel(options=BIG_CHANNEL) as channel:
        assert channel.unary_unary(_path("Echo"))(request, timeout=CALL_TIMEOUT) == request


def test_oversized_response_is_resource_exhausted(served_both: Served) -> None:
    too_big = MAX_MESSAGE_SIZE + 1
    with served_both.channel(options=BIG_CHANNEL) as channel:
        with pytest.raises(grpc.RpcError) as info:
            channel.unary_unary(_path("Sized"))(str(too_big).encode(), timeout=CALL_TIMEOUT)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        responses = channel.unary_stream(_path("SizedStream"))(f"2,{too_big}".encode(), timeout=CALL_TIMEOUT)
        with pytest.raises(grpc.RpcError) as info:
            list(responses)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert channel.unary_unary(_path("Echo"))(b"next", timeout=CALL_TIMEOUT) == b"next"


# ---------------------------------------------------------------------------------------------- 3. gzip


def test_gzip_compressed_requests(served: Served) -> None:
    big = pattern(3 * MIB, seed=5)
    with served.channel(compression=grpc.Compression.Gzip, options=BIG_CHANNEL) as channel:
        assert channel.unary_unary(_path("Echo"))(b"tiny", timeout=CALL_TIMEOUT) == b"tiny"
        assert channel.unary_unary(_path("Echo"))(big, timeout=CALL_TIMEOUT) == big
        digest = channel.stream_unary(_path("Collect"))(iter([big, b"x"]), timeout=CALL_TIMEOUT)
        assert digest == hashlib.sha256(big).digest() + hashlib.sha256(b"x").digest()


@pytest.mark.parametrize(
    ("case", "status"),
    [("whole", "0"), ("truncated", "13"), ("no-trailer", "13"), ("not-gzip", "13"), ("no-grpc-encoding", "13")],
)
def test_gzip_messages_from_a_raw_client(served: Served, case: str, status: str) -> None:
    """Compressed messages are checked whole: a cut-off or corrupt one fails the call (INTERNAL)."""
    data = pattern(20000, seed=6)
    compressed = gzip.compress(data)
    payload = {
        "whole": compressed,
        "truncated": compressed[: len(compressed) // 2],
        "no-trailer": compressed[:-8],
        "not-gzip": b"certainly not gzip",
        "no-grpc-encoding": compressed,
    }[case]
    encoding = [] if case == "no-grpc-encoding" else [("grpc-encoding", "gzip")]
    with served.raw() as client:
        block = request_block(_path("Echo")) + Encoder().encode(encoding)
        client.send(http2.frame(http2.HEADERS, http2.END_HEADERS, 1, block))
        client.send(http2.frame(http2.DATA, http2.END_STREAM, 1, MESSAGE_PREFIX.pack(1, len(payload)) + payload))
        _, body, trailers = client.response(1)
        assert trailers["grpc-status"] == status
        assert body == (message(data) if status == "0" else b"")
        assert client.unary(3, "Echo", b"the connection lives on")[1] == message(b"the connection lives on")


# ---------------------------------------------------------------------------------------------- 4. cancellation


def test_client_cancels_server_stream(served: Served) -> None:
    probe = served.probe
    with served.channel() as channel:
        responses = channel.unary_stream(_path("Endless"))(b"", timeout=CALL_TIMEOUT)
        for index in range(3):
            assert next(responses) == pattern(16 << 10, seed=index)
        responses.cancel()
        assert probe.finished.wait(WAIT), "the handler's generator was not closed"
        assert probe.callback_ran.wait(WAIT)
        assert probe.context is not None and not probe.context.is_active()
        assert probe.active_at_end is False
        with pytest.raises(grpc.RpcError) as info:
            list(responses)
        assert info.value.code() == grpc.StatusCode.CANCELLED
    wait_until(lambda: served.open_calls() == 0, "the cancelled call to be counted out")
    served.assert_serves()


def test_client_cancels_client_stream(served: Served) -> None:
    probe = served.probe
    stop_sending = threading.Event()

    def requests() -> Iterator[bytes]:
        """One request, then nothing until the test lets the generator end."""
        yield b"first"
        stop_sending.wait(WAIT)

    with served.channel() as channel:
        future = channel.stream_unary(_path("Drain")).future(requests(), timeout=CALL_TIMEOUT)
        try:
            assert probe.entered.wait(WAIT)
            future.cancel()
            assert probe.finished.wait(WAIT), "the handler's request iterator did not end"
        finally:
            stop_sending.set()
        assert probe.outcome.startswith("raised") or probe.outcome == "ended"
        assert probe.callback_ran.wait(WAIT)
        assert probe.active_at_end is False
        assert future.cancelled()
    wait_until(lambda: served.open_calls() == 0, "the cancelled call to be counted out")
    served.assert_serves()


# ---------------------------------------------------------------------------------------------- 5. deadline


def test_deadline_exceeded(served: Served) -> None:
    probe = served.probe
    with served.channel() as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(_path("Block"))(b"", timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert probe.finished.wait(WAIT), "the handler was not woken by its call's end"
    assert probe.callback_ran.is_set()
    assert probe.active_at_end is False
    wait_until(lambda: served.open_calls() == 0, "the expired call to be counted out")


def test_server_enforces_deadline_itself(served: Served) -> None:
    """A raw client that never cancels gets DEADLINE_EXCEEDED from the server's own clock."""
    probe = served.probe
    with served.raw() as client:
        block = request_block(_path("Block")) + Encoder().encode([("grpc-timeout", "200m")])
        client.send(http2.frame(http2.HEADERS, http2.END_HEADERS, 1, block))
        client.send(http2.frame(http2.DATA, http2.END_STREAM, 1, message(b"")))
        _, body, trailers = client.response(1)
    assert body == b""
    assert trailers["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert probe.finished.wait(WAIT)
    assert probe.active_at_end is False
    wait_until(lambda: served.open_calls() == 0, "the expired call to be counted out")


def test_ended_calls_are_not_kept_until_their_deadline(served: Served) -> None:
    """A call that ended is let go even though its (long) deadline has not passed: neither it nor its request
    stays in memory for the rest of the hour."""

    def live_calls() -> int:
        """This server's call objects still alive."""
        gc.collect()
        calls = (thing for thing in gc.get_objects() if isinstance(thing, server_module._Call))
        return sum(call.connection.server is served.server for call in calls)

    request = pattern(MIB)
    with served.channel() as channel:
        for _ in range(5):
            assert channel.unary_unary(_path("Echo"))(request, timeout=3600) == request
    wait_until(lambda: live_calls() == 0, "the ended calls to be released")


# ---------------------------------------------------------------------------------------------- 6. disconnect


def test_client_disconnects_mid_message(served: Served) -> None:
    probe = served.probe
    with served.raw() as client:
        client.open(1, "Drain")
        client.send(http2.frame(http2.DATA, 0, 1, message(b"whole")))
        assert probe.entered.wait(WAIT)
        half = MESSAGE_PREFIX.pack(0, 100) + b"h" * 50
        client.send(http2.frame(http2.DATA, 0, 1, half))
    assert probe.finished.wait(WAIT), "the handler's request iterator did not stop"
    assert probe.outcome.startswith("raised")
    assert probe.callback_ran.wait(WAIT)
    assert probe.active_at_end is False
    wait_until(lambda: served.open_calls() == 0, "the abandoned call to be counted out")
    served.assert_serves()


# ---------------------------------------------------------------------------------------------- 7. hostile HTTP/2


def _oversized_frame() -> bytes:
    """The header of a DATA frame one byte over our 1 MiB SETTINGS_MAX_FRAME_SIZE, and a little payload."""
    length = (1 << 20) + 1
    return http2.FRAME_HEADER.pack(length >> 16, length & 0xFFFF, http2.DATA, 0, 1) + b"x" * 100


def _continuation_flood() -> bytes:
    """A HEADERS without END_HEADERS, then CONTINUATIONs that take the block past 64 KiB."""
    block = request_block(_path("Echo"))
    frames = [http2.frame(http2.HEADERS, 0, 1, block)]
    frames += [http2.frame(http2.CONTINUATION, 0, 1, b"\x00" * 16384) for _ in range(5)]
    return b"".join(frames)


def _hpack_bomb() -> bytes:
    """A header block under the 64 KiB limit that decodes into ~230 MiB of header list: one 4 KiB dynamic
    table entry, referenced ~58000 times."""
    value = b"QUFB" * 1000
    entry = b"\x40" + encode_integer(5, 7) + b"x-bin" + encode_integer(len(value), 7) + value
    return http2.frame(http2.HEADERS, http2.END_HEADERS, 1, request_block(_path("Echo")) + entry + b"\xbe" * 58000)


HOSTILE = {
    "hpack-bomb": (_hpack_bomb(), http2.ENHANCE_YOUR_CALM),
    "garbage-hpack": (http2.frame(http2.HEADERS, http2.END_HEADERS, 1, b"\x80\xff\xfe\xfd"), http2.COMPRESSION_ERROR),
    "oversized-frame": (_oversized_frame(), http2.FRAME_SIZE_ERROR),
    "continuation-flood": (_continuation_flood(), http2.ENHANCE_YOUR_CALM),
    "data-on-stream-0": (http2.frame(http2.DATA, 0, 0, message(b"x")), http2.PROTOCOL_ERROR),
    "data-on-idle-stream": (http2.frame(http2.DATA, 0, 5, message(b"x")), http2.PROTOCOL_ERROR),
    "headers-on-even-stream": (
        http2.frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 2, request_block(_path("Echo"))),
        http2.PROTOCOL_ERROR,
    ),
    "window-overflow": (
        http2.frame(http2.WINDOW_UPDATE, 0, 0, struct.pack(">I", http2.MAX_WINDOW)),
        http2.FLOW_CONTROL_ERROR,
    ),
    "push-promise": (
        http2.frame(http2.PUSH_PROMISE, http2.END_HEADERS, 1, struct.pack(">I", 2) + request_block("/")),
        http2.PROTOCOL_ERROR,
    ),
    "ping-wrong-size": (http2.frame(http2.PING, 0, 0, b"1234567"), http2.FRAME_SIZE_ERROR),
    "settings-bad-max-frame": (
        http2.frame(http2.SETTINGS, 0, 0, struct.pack(">HI", http2.SETTINGS_MAX_FRAME_SIZE, 100)),
        http2.PROTOCOL_ERROR,
    ),
    "continuation-without-headers": (
        http2.frame(http2.CONTINUATION, http2.END_HEADERS, 1, request_block(_path("Echo"))),
        http2.PROTOCOL_ERROR,
    ),
    "headers-interrupted": (
        http2.frame(http2.HEADERS, 0, 1, request_block(_path("Echo"))) + http2.frame(http2.PING, 0, 0, b"8" * 8),
        http2.PROTOCOL_ERROR,
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_protocol_violation_closes_the_connection(served: Served, case: str) -> None:
    data, code = HOSTILE[case]
    with served.raw() as client:
        client.send(data)
        frames = client.read_to_eof()
    assert goaway_code(frames) == code
    served.assert_serves()


def test_bad_preface_closes_the_connection(served: Served) -> None:
    with served.raw(greet=False) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        frames = client.read_to_eof()
    assert goaway_code(frames) == http2.PROTOCOL_ERROR
    served.assert_serves()


def test_protocol_violation_ends_open_calls(served: Served) -> None:
    """A connection torn down for a protocol error ends its calls: handler told, callbacks run."""
    probe = served.probe
    with served.raw() as client:
        client.open(1, "Drain")
        client.send(http2.frame(http2.DATA, 0, 1, message(b"first")))
        assert probe.entered.wait(WAIT)
        client.send(http2.frame(http2.PING, 0, 0, b"short"))
        assert goaway_code(client.read_to_eof()) == http2.FRAME_SIZE_ERROR
    assert probe.finished.wait(WAIT)
    assert probe.callback_ran.wait(WAIT)
    wait_until(lambda: served.open_calls() == 0, "the call to be counted out")
    served.assert_serves()


@pytest.mark.parametrize(
    ("http_method", "content_type", "http_status", "grpc_status"),
    [
        ("GET", "application/grpc", "405", grpc.StatusCode.UNIMPLEMENTED),
        ("PUT", "application/grpc", "405", grpc.StatusCode.UNIMPLEMENTED),
        ("POST", "text/plain", "415", grpc.StatusCode.UNKNOWN),
        ("POST", "application/json", "415", grpc.StatusCode.UNKNOWN),
    ],
)
def test_non_grpc_request_gets_trailers_only(
    served: Served, http_method: str, content_type: str, http_status: str, grpc_status: grpc.StatusCode
) -> None:
    with served.raw() as client:
        client.open(1, "Echo", end_stream=True, http_method=http_method, content_type=content_type)
        received = client.read_until(lambda f: f.stream_id == 1 and f.kind == http2.HEADERS)[-1]
        assert received.flags & http2.END_STREAM
        fields = client.headers(received)
        assert fields[":status"] == http_status
        assert fields["grpc-status"] == str(grpc_status.value[0])
        headers, body, trailers = client.unary(3, "Echo", b"the connection lives on")
        assert headers[":status"] == "200" and headers["content-type"] == "application/grpc"
        assert body == message(b"the connection lives on")
        assert trailers["grpc-status"] == "0"


STREAM_ERRORS: dict[str, tuple[str, list[tuple[str, str]], list[bytes], str]] = {
    # case: (method, extra request headers, frames after the HEADERS, expected in grpc-message)
    "two-messages-for-unary": (
        "Echo",
        [],
        [http2.frame(http2.DATA, http2.END_STREAM, 1, message(b"a") + message(b"b"))],
        "more than one request message",
    ),
    "no-message-for-unary": ("Echo", [], [http2.frame(http2.DATA, http2.END_STREAM, 1, b"")], "no request message"),
    "request-ends-inside-a-message": (
        "Echo",
        [],
        [http2.frame(http2.DATA, http2.END_STREAM, 1, message(b"whole")[:-2])],
        "inside a message",
    ),
    "data-after-end-stream": (
        "HoldStream",
        [],
        [http2.frame(http2.DATA, http2.END_STREAM, 1, message(b"last")), http2.frame(http2.DATA, 0, 1, b"late")],
        "DATA after the end",
    ),
    "malformed-grpc-timeout": (
        "Echo",
        [("grpc-timeout", "123456789S")],
        [http2.frame(http2.DATA, http2.END_STREAM, 1, message(b"x"))],
        "grpc-timeout",
    ),
    "undecodable-bin-header": (
        "Echo",
        [("x-bin", "QUFBA")],  # 5 characters: no base64 length
        [http2.frame(http2.DATA, http2.END_STREAM, 1, message(b"x"))],
        "binary header",
    ),
}


@pytest.mark.parametrize("case", sorted(STREAM_ERRORS))
def test_bad_request_ends_only_its_call(served: Served, case: str) -> None:
    method, extra, frames, details = STREAM_ERRORS[case]
    with served.raw() as client:
        block = request_block(_path(method)) + Encoder().encode(extra)
        client.send(http2.frame(http2.HEADERS, http2.END_HEADERS, 1, block))
        for data in frames:
            client.send(data)
        _, body, trailers = client.response(1)
        assert (body, trailers["grpc-status"]) == (b"", str(grpc.StatusCode.INTERNAL.value[0]))
        assert details in trailers["grpc-message"]
        assert client.unary(3, "Echo", b"next")[1:] == (message(b"next"), {"grpc-status": "0"})
    wait_until(lambda: served.open_calls() == 0, "the call to be counted out")


def test_padding_priority_and_request_trailers(served: Served) -> None:
    """Padded HEADERS with a priority block, padded DATA, and a request ended by a trailers block."""
    with served.raw() as client:
        block = request_block(_path("Echo"))
        padded = bytes([3]) + struct.pack(">IB", 0, 16) + block + b"\0" * 3
        client.send(http2.frame(http2.HEADERS, http2.END_HEADERS | http2.PADDED | http2.PRIORITY_FLAG, 1, padded))
        client.send(http2.frame(http2.DATA, http2.PADDED, 1, bytes([10]) + message(b"padded") + b"\0" * 10))
        trailers = Encoder().encode([("x-request-trailer", "1")])
        client.send(http2.frame(http2.HEADERS, http2.END_HEADERS | http2.END_STREAM, 1, trailers))
        assert client.response(1)[1:] == (message(b"padded"), {"grpc-status": "0"})


def test_client_overrunning_the_stream_window_is_reset(served: Served) -> None:
    """A client that ignores the stream window cannot make the server buffer without bound: the call is reset
    with FLOW_CONTROL_ERROR; the connection goes on."""
    probe = served.probe
    with served.raw() as client:
        client.open(1, "HoldStream")  # its handler never reads its requests
        assert probe.entered.wait(WAIT)
        chunk = http2.frame(http2.DATA, 0, 1, message(pattern(64 << 10)))
        client.send(chunk * 64)  # 4 MiB: four times the window
        frames = client.read_until(lambda f: f.stream_id == 1 and f.kind == http2.RST_STREAM)
        assert int.from_bytes(frames[-1].payload, "big") == http2.FLOW_CONTROL_ERROR
        trailers = [client.headers(f) for f in frames if f.stream_id == 1 and f.kind == http2.HEADERS]
        assert trailers and trailers[-1]["grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0])
        wait_until(lambda: served.open_calls() == 0, "the reset call to be counted out")
        probe.go.set()
        assert client.unary(3, "Echo", b"next")[1:] == (message(b"next"), {"grpc-status": "0"})


def test_client_that_never_reads_is_disconnected(served: Served) -> None:
    """PINGs from a client that never reads their ACKs: past the output limit the server hangs up on it."""
    pings = http2.frame(http2.PING, 0, 0, b"12345678") * 10000
    # EPIPE or ECONNRESET once the server closed the connection; 400 rounds owe it 68 MiB of ACKs, 4x its limit
    with served.raw() as client, pytest.raises((BrokenPipeError, ConnectionResetError)):
        for _ in range(400):
            client.sock.sendall(pings)
    served.assert_serves()


def test_stream_beyond_max_concurrent_is_refused() -> None:
    with serving(GrpcConfig(max_workers=8, max_concurrent_streams=2)) as served:
        with served.raw() as client:
            client.open(1, "HoldStream")
            client.open(3, "HoldStream")
            wait_until(lambda: served.open_calls() == 2, "two calls open")
            client.open(5, "HoldStream")
            reset = client.read_until(lambda f: f.kind == http2.RST_STREAM)[-1]
            assert reset.stream_id == 5
            assert int.from_bytes(reset.payload, "big") == http2.REFUSED_STREAM
            served.probe.go.set()
            for _, body, trailers in client.responses([1, 3]).values():
                assert (body, trailers["grpc-status"]) == (message(b"held"), "0")
            assert client.unary(7, "Echo", b"room again") == (
                {":status": "200", "content-type": "application/grpc"},
                message(b"room again"),
                {"grpc-status": "0"},
            )
        served.assert_serves()


def test_rapid_reset_ends_the_connection(served: Served) -> None:
    """A client that opens and resets calls as fast as it can (the "rapid reset" attack) is cut off with
    ENHANCE_YOUR_CALM once it has reset more than the server allows in a second; others are still served."""
    with served.raw() as client:
        burst = b"".join(
            http2.frame(http2.HEADERS, http2.END_HEADERS, stream_id, request_block(_path("Drain")))
            + http2.frame(http2.RST_STREAM, 0, stream_id, struct.pack(">I", http2.CANCEL))
            for stream_id in range(1, 2 * 1000, 2)
        )
        with contextlib.suppress(OSError):  # the server may close before it has read it all
            client.send(burst)
        assert goaway_code(client.read_to_eof()) == http2.ENHANCE_YOUR_CALM
    wait_until(lambda: served.open_calls() == 0, "every call counted out")
    served.assert_serves()


# ---------------------------------------------------------------------------------------------- 8. slow reader


def test_slow_reader_holds_only_its_own_call(served_both: Served) -> None:
    size = MIB
    settings = struct.pack(">HI", http2.SETTINGS_INITIAL_WINDOW_SIZE, 16)
    with served_both.raw(settings=settings) as client:
        client.open(1, "Sized")
        client.send(http2.frame(http2.DATA, http2.END_STREAM, 1, message(str(size).encode())))
        frames = client.read_until(lambda f: f.stream_id == 1 and f.kind == http2.DATA)
        assert len(frames[-1].payload) == 16  # all the window allows
        body = bytearray(frames[-1].payload)
        for index in range(3):
            with served_both.channel() as channel:
                assert channel.unary_unary(_path("Echo"))(b"%d" % index, timeout=CALL_TIMEOUT) == b"%d" % index
        grant = struct.pack(">I", 2 * size)
        client.send(http2.frame(http2.WINDOW_UPDATE, 0, 1, grant) + http2.frame(http2.WINDOW_UPDATE, 0, 0, grant))
        _, rest, trailers = client.response(1)
    body += rest
    assert trailers["grpc-status"] == "0"
    assert bytes(body) == message(pattern(size))
    wait_until(lambda: served_both.open_calls() == 0, "the call to be counted out")


def test_inline_methods_run_on_the_io_thread() -> None:
    """A method named to answer_inline runs on the server's I/O thread; the others on its workers."""
    with serving(inline=["Thread"]) as running, running.channel() as channel:
        assert channel.unary_unary(_path("Thread"))(b"", timeout=CALL_TIMEOUT) == b"grpc-io"
    with serving() as running, running.channel() as channel:
        assert channel.unary_unary(_path("Thread"))(b"", timeout=CALL_TIMEOUT).startswith(b"grpc_")


def test_inline_stream_beyond_the_window_goes_on_from_a_worker() -> None:
    """An inline server stream whose messages the client's window cannot take: the I/O thread goes on serving
    other calls, and once the client grants more, every message arrives whole and in order."""
    count, size = 3, 100_000
    settings = struct.pack(">HI", http2.SETTINGS_INITIAL_WINDOW_SIZE, 16)
    with serving(inline=NON_BLOCKING) as running, running.raw(settings=settings) as client:
        client.open(1, "SizedStream")
        client.send(http2.frame(http2.DATA, http2.END_STREAM, 1, message(f"{count},{size}".encode())))
        frames = client.read_until(lambda f: f.stream_id == 1 and f.kind == http2.DATA)
        assert len(frames[-1].payload) == 16
        body = bytearray(frames[-1].payload)
        with running.channel() as channel:
            assert channel.unary_unary(_path("Thread"))(b"", timeout=CALL_TIMEOUT) == b"grpc-io"
        grant = struct.pack(">I", 2 * count * size)
        client.send(http2.frame(http2.WINDOW_UPDATE, 0, 1, grant) + http2.frame(http2.WINDOW_UPDATE, 0, 0, grant))
        _, rest, trailers = client.response(1)
        body += rest
        assert trailers["grpc-status"] == "0"
        assert bytes(body) == b"".join(message(pattern(size, seed=index)) for index in range(count))
        wait_until(lambda: running.open_calls() == 0, "the call to be counted out")


# ---------------------------------------------------------------------------------------------- 9. many clients


def test_many_clients(served: Served) -> None:
    failures: list[str] = []

    def client(number: int) -> None:
        """50 calls on a channel of its own; failures are collected."""
        try:
            with served.channel() as channel:
                echo = channel.unary_unary(_path("Echo"))
                for index in range(50):
                    request = f"{number}:{index}".encode() * (index + 1)
                    response = echo(request, timeout=CALL_TIMEOUT)
                    if response != request:
                        failures.append(f"{number}:{index}: {response[:40]!r}")
        except Exception as err:
            failures.append(f"{number}: {err!r}")

    threads = [threading.Thread(target=client, args=(number,), name=f"client-{number}") for number in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CALL_TIMEOUT * 2)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    wait_until(lambda: served.open_calls() == 0, "every call to be counted out")


# ---------------------------------------------------------------------------------------------- 10. stop


def _refused(path: str) -> bool:
    """Whether a new connection to ``path`` is refused."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return True
    finally:
        probe.close()
    return False


def test_stop_with_grace_lets_calls_finish(served: Served) -> None:
    probe = served.probe
    with served.channel() as channel:
        future = channel.unary_unary(_path("Hold")).future(b"", timeout=CALL_TIMEOUT)
        assert probe.entered.wait(WAIT)
        stopped = served.server.stop(2)
        probe.go.set()
        assert future.result(timeout=WAIT) == b"held"
    assert stopped.wait(WAIT)
    assert served.server.stop(None) is stopped
    assert _refused(served.path)
    with served.channel() as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(_path("Echo"))(b"", timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_stop_refuses_new_connections_during_grace(served: Served) -> None:
    probe = served.probe
    with served.channel() as channel:
        future = channel.unary_unary(_path("Hold")).future(b"", timeout=CALL_TIMEOUT)
        assert probe.entered.wait(WAIT)
        stopped = served.server.stop(WAIT)
        try:
            wait_until(lambda: _refused(served.path), "new connections to be refused")
        finally:
            probe.go.set()
        assert future.result(timeout=WAIT) == b"held"
    assert stopped.wait(WAIT)


def test_stop_without_grace_cancels_calls(served: Served) -> None:
    probe = served.probe
    with served.channel() as channel:
        future = channel.unary_unary(_path("Hold")).future(b"", timeout=CALL_TIMEOUT)
        assert probe.entered.wait(WAIT)
        stopped = served.server.stop(0)
        assert stopped.wait(WAIT)
        with pytest.raises(grpc.RpcError) as info:
            future.result(timeout=WAIT)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    probe.go.set()
    assert probe.finished.wait(WAIT)
    assert served.open_calls() == 0


def test_concurrent_wakeups_are_not_lost(served: Served) -> None:
    """Threads waking the I/O thread (as workers do when their output waits for the socket) while it drains its
    wake-up socket: no wake-up is lost, so stop() still reaches it."""

    def hammer() -> None:
        """Wake the I/O thread, many times over."""
        for _ in range(20000):
            served.server._wake()

    threads = [threading.Thread(target=hammer, name=f"waker-{number}") for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert served.server.stop(None).wait(WAIT), "a wake-up was lost: the I/O thread never saw stop()"


# ---------------------------------------------------------------------------------------------- 11. ping


def test_ping_is_acknowledged(served: Served) -> None:
    with served.raw() as client:
        client.send(http2.frame(http2.PING, 0, 0, b"\x00pingme\xff"))
        ack = client.read_until(lambda f: f.kind == http2.PING)[-1]
        assert (ack.flags, ack.stream_id, ack.payload) == (http2.ACK, 0, b"\x00pingme\xff")
        client.send(http2.frame(http2.PING, http2.ACK, 0, b"12345678"))  # an ACK is not answered; nor fatal
        client.send(http2.frame(http2.PING, 0, 0, b"87654321"))
        ack = client.read_until(lambda f: f.kind == http2.PING)[-1]
        assert ack.payload == b"87654321"


def test_an_outcome_that_cannot_be_sent_still_ends_the_call(served_both: Served) -> None:
    """A handler that set a code that is no status: the call ends INTERNAL instead of staying open."""
    with served_both.channel() as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(_path("BadCode"))(b"", timeout=CALL_TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    wait_until(lambda: served_both.open_calls() == 0, "the call to be counted out")
