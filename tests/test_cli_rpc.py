"""ckctl's own gRPC client (core.cli.rpc) against a real grpcio server on a unix socket, and ckctl never
importing grpcio.

The server's methods take and return raw bytes (identity serializers), except the containerd Version service
that :func:`rpc.stub` is checked with. Run as a script (``python test_cli_rpc.py SOCKET``), this file serves the
same methods until killed: the test of a server that goes away mid-call kills it.
"""

from __future__ import annotations

import ast
import hashlib
import json
import queue
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

from core.cli import rpc

CHUNK = 1 << 20
BIG = 70  # chunks of CHUNK bytes: more than 64 MiB each way, far beyond any initial flow-control window
REPO = Path(__file__).resolve().parent.parent


def _chunk(index: int) -> bytes:
    return struct.pack(">I", index) * (CHUNK // 4)


class Handlers:
    """The test service ``test.T``; records what the server saw for the tests to check."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def echo(self, request: bytes, context: Any) -> bytes:
        return request

    def metadata(self, request: bytes, context: Any) -> bytes:
        seen = {item.key: item.value for item in context.invocation_metadata() if item.key.startswith("x-")}
        return json.dumps({"metadata": seen, "deadline": context.time_remaining()}).encode()

    def fail(self, request: bytes, context: Any) -> bytes:
        code, _, message = request.decode().partition(":")
        context.abort(getattr(__import__("grpc").StatusCode, code), message)

    def fail_after_one(self, request: bytes, context: Any) -> Iterator[bytes]:
        yield b"first"
        context.abort(__import__("grpc").StatusCode.NOT_FOUND, request.decode())

    def sleep(self, request: bytes, context: Any) -> bytes:
        time.sleep(float(request))
        return b"slept"

    def download(self, request: bytes, context: Any) -> Iterator[bytes]:
        for index in range(int(request)):
            yield _chunk(index)

    def upload(self, requests: Iterator[bytes], context: Any) -> bytes:
        digest, count = hashlib.sha256(), 0
        for request in requests:
            digest.update(request)
            count += 1
        return f"{count} {digest.hexdigest()}".encode()

    def chat(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for request in requests:
            yield request.upper()

    def forever(self, request: bytes, context: Any) -> Iterator[bytes]:
        context.add_callback(self.cancelled.set)
        yield b"started"
        while context.is_active():
            time.sleep(0.01)

    def version(self, request: Any, context: Any) -> Any:
        from core.api.containerd.services.version.v1 import version_pb2

        return version_pb2.VersionResponse(version="9.9", revision="test")


def start_server(path: str, handlers: Handlers) -> Any:
    """A grpcio server of ``handlers`` on the unix socket ``path``, started."""
    import grpc
    from google.protobuf import empty_pb2

    from core.api.containerd.services.version.v1 import version_pb2

    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    methods = {
        "Echo": unary(handlers.echo),
        "Metadata": unary(handlers.metadata),
        "Fail": unary(handlers.fail),
        "FailAfterOne": stream(handlers.fail_after_one),
        "Sleep": unary(handlers.sleep),
        "Download": stream(handlers.download),
        "Upload": grpc.stream_unary_rpc_method_handler(handlers.upload),
        "Chat": grpc.stream_stream_rpc_method_handler(handlers.chat),
        "Forever": stream(handlers.forever),
    }
    version = unary(
        handlers.version,
        request_deserializer=empty_pb2.Empty.FromString,
        response_serializer=version_pb2.VersionResponse.SerializeToString,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=40))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("test.T", methods),
            grpc.method_handlers_generic_handler("containerd.services.version.v1.Version", {"Version": version}),
        )
    )
    server.add_insecure_port(f"unix:{path}")
    server.start()
    return server


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, Handlers]]:
    with tempfile.TemporaryDirectory(prefix="rpc-", dir="/tmp") as tmp:
        path = f"{tmp}/s.sock"
        handlers = Handlers()
        server = start_server(path, handlers)
        try:
            yield path, handlers
        finally:
            server.stop(None)


@pytest.fixture
def channel(served: tuple[str, Handlers]) -> Iterator[rpc.Channel]:
    channel = rpc.Channel(served[0])
    yield channel
    channel.close()


def _bytes() -> tuple[Any, Any]:
    return (lambda b: b), (lambda b: b)


def unary(channel: rpc.Channel, method: str) -> Any:
    return channel.unary_unary(f"/test.T/{method}", *_bytes())


def test_unary_call_round_trips_bytes(channel: rpc.Channel) -> None:
    assert unary(channel, "Echo")(b"hello") == b"hello"
    assert unary(channel, "Echo")(b"") == b""
    big = bytes(range(256)) * 4000  # > one frame and > the server's initial window: split and flow-controlled
    assert unary(channel, "Echo")(big, timeout=10) == big


def test_metadata_and_timeout_reach_the_server(channel: rpc.Channel) -> None:
    answer = json.loads(unary(channel, "Metadata")(b"", metadata=[("x-one", "1"), ("X-Two", "zwei")], timeout=20))
    assert answer["metadata"] == {"x-one": "1", "x-two": "zwei"}
    assert 15 < answer["deadline"] <= 20


def test_error_has_the_status_and_message_including_non_ascii(channel: rpc.Channel) -> None:
    for code, message in (("NOT_FOUND", "no such thing"), ("INVALID_ARGUMENT", "ungültig: ☃ 100% %41")):
        with pytest.raises(rpc.RpcError) as caught:
            unary(channel, "Fail")(f"{code}:{message}".encode())
        assert caught.value.code() is rpc.StatusCode[code] and caught.value.details() == message
        assert message in str(caught.value)


def test_error_after_a_streamed_response_comes_from_the_trailers(channel: rpc.Channel) -> None:
    responses = channel.unary_stream("/test.T/FailAfterOne", *_bytes())(b"gone")
    assert next(responses) == b"first"
    with pytest.raises(rpc.RpcError) as caught:
        next(responses)
    assert (caught.value.code(), caught.value.details()) == (rpc.StatusCode.NOT_FOUND, "gone")


def test_unknown_method_is_unimplemented(channel: rpc.Channel) -> None:
    with pytest.raises(rpc.RpcError) as caught:
        unary(channel, "NoSuchMethod")(b"")
    assert caught.value.code() is rpc.StatusCode.UNIMPLEMENTED


def test_timeout_is_deadline_exceeded(channel: rpc.Channel) -> None:
    began = time.monotonic()
    with pytest.raises(rpc.RpcError) as caught:
        unary(channel, "Sleep")(b"3", timeout=0.3)
    assert caught.value.code() is rpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - began < 2
    assert unary(channel, "Echo")(b"still fine") == b"still fine"


def test_large_server_stream_is_received_whole(channel: rpc.Channel) -> None:
    responses = channel.unary_stream("/test.T/Download", *_bytes())(str(BIG).encode(), timeout=120)
    count = 0
    for index, response in enumerate(responses):
        assert response == _chunk(index)
        count += 1
    assert count == BIG


def test_large_client_stream_is_sent_whole(channel: rpc.Channel) -> None:
    upload = channel.stream_unary("/test.T/Upload", *_bytes())
    expected = hashlib.sha256(b"".join(_chunk(i) for i in range(BIG))).hexdigest()
    assert upload((_chunk(i) for i in range(BIG)), timeout=120) == f"{BIG} {expected}".encode()
    assert upload(iter(()), timeout=10) == f"0 {hashlib.sha256().hexdigest()}".encode()


def test_bidi_stream_interleaves_requests_and_responses(channel: rpc.Channel) -> None:
    outgoing: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def requests() -> Iterator[bytes]:
        while (item := outgoing.get()) is not None:
            yield item

    responses = channel.stream_stream("/test.T/Chat", *_bytes())(requests(), timeout=20)
    for word in (b"one", b"two", b"three"):
        outgoing.put(word)  # the next request only goes once the answer to this one came back
        assert next(responses) == word.upper()
    outgoing.put(None)
    assert list(responses) == []


def test_a_failing_request_iterator_fails_the_call(channel: rpc.Channel) -> None:
    def requests() -> Iterator[bytes]:
        yield b"a"
        raise OSError("disk on fire")

    with pytest.raises(rpc.RpcError) as caught:
        channel.stream_unary("/test.T/Upload", *_bytes())(requests(), timeout=10)
    assert caught.value.code() is rpc.StatusCode.UNKNOWN


def test_cancel_ends_a_stream_on_both_sides(channel: rpc.Channel, served: tuple[str, Handlers]) -> None:
    handlers = served[1]
    handlers.cancelled.clear()
    responses = channel.unary_stream("/test.T/Forever", *_bytes())(b"")
    assert next(responses) == b"started"
    assert responses.cancel() is True
    with pytest.raises(rpc.RpcError) as caught:
        next(responses)
    assert caught.value.code() is rpc.StatusCode.CANCELLED
    assert handlers.cancelled.wait(10), "the server never saw the cancellation"
    assert responses.cancel() is False


def test_cancel_from_another_thread_wakes_the_reader(channel: rpc.Channel) -> None:
    responses = channel.unary_stream("/test.T/Forever", *_bytes())(b"")
    assert next(responses) == b"started"
    threading.Timer(0.2, responses.cancel).start()
    with pytest.raises(rpc.RpcError) as caught:
        next(responses)
    assert caught.value.code() is rpc.StatusCode.CANCELLED


def test_ctrl_c_interrupts_a_call_waiting_for_responses(served: tuple[str, Handlers]) -> None:
    code = (
        "from core.cli import rpc\n"
        f"responses = rpc.Channel({served[0]!r}).unary_stream('/test.T/Forever', bytes, bytes)(b'')\n"
        "print(next(responses).decode(), flush=True)\n"
        "try:\n"
        "    next(responses)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
    )
    waiting = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert waiting.stdout is not None and waiting.stdout.readline() == "started\n"
        time.sleep(0.2)
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(10) == 0 and waiting.stdout.read() == "interrupted\n"
    finally:
        waiting.kill()
        waiting.wait()


def test_many_threads_share_one_channel(channel: rpc.Channel) -> None:
    download = channel.unary_stream("/test.T/Download", *_bytes())
    echo = unary(channel, "Echo")
    errors: list[BaseException] = []

    def calls(worker: int) -> None:
        try:
            for call in range(25):
                payload = f"{worker}-{call}".encode() * (1 + call * 100)
                assert echo(payload, timeout=30) == payload
            assert sum(1 for _ in download(b"5", timeout=60)) == 5
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=calls, args=(worker,)) for worker in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[0]


def test_stub_is_built_from_the_service_descriptor(channel: rpc.Channel) -> None:
    from google.protobuf import empty_pb2

    from core.api.containerd.services.content.v1 import content_pb2
    from core.api.containerd.services.version.v1 import version_pb2

    answer = rpc.stub(version_pb2, "Version", channel).Version(empty_pb2.Empty(), timeout=10)
    assert (type(answer), answer.version, answer.revision) == (version_pb2.VersionResponse, "9.9", "test")
    content = rpc.stub(content_pb2, "Content", channel)
    methods = {m.name for m in content_pb2.DESCRIPTOR.services_by_name["Content"].methods}
    assert methods <= set(vars(content)) and {"Read", "Write", "List", "Info"} <= methods


def test_server_going_away_mid_call_is_unavailable_and_the_channel_reconnects() -> None:
    with tempfile.TemporaryDirectory(prefix="rpc-", dir="/tmp") as tmp:
        path = f"{tmp}/s.sock"
        server = _serve_in_process(path)
        try:
            channel = rpc.Channel(path)
            responses = channel.unary_stream("/test.T/Forever", *_bytes())(b"")
            assert next(responses) == b"started"
            server.send_signal(signal.SIGKILL)
            server.wait()
            with pytest.raises(rpc.RpcError) as caught:
                next(responses)
            assert caught.value.code() is rpc.StatusCode.UNAVAILABLE
            with pytest.raises(rpc.RpcError) as caught:
                unary(channel, "Echo")(b"nobody")
            assert caught.value.code() is rpc.StatusCode.UNAVAILABLE and "connect" in caught.value.details()
            Path(path).unlink(missing_ok=True)
            server = _serve_in_process(path)
            assert unary(channel, "Echo")(b"again", timeout=10) == b"again"
            channel.close()
        finally:
            server.kill()
            server.wait()


def _serve_in_process(path: str) -> subprocess.Popen[bytes]:
    """This file as a server on ``path`` in a process of its own, once it listens."""
    server = subprocess.Popen([sys.executable, __file__, path])
    deadline = time.monotonic() + 20
    while not _accepts(path):  # not the file's existence: it is there from bind(), before listen()
        assert server.poll() is None and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    return server


def _accepts(path: str) -> bool:
    """Whether something listens on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def test_no_socket_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        rpc.Channel(str(tmp_path / "none.sock"))


# -- ckctl never imports grpcio -------------------------------------------------------------------


def _ckctl_imports() -> list[str]:
    """Every module the ckctl sources (core/cli/*.py) import, at module level or within functions."""
    names: set[str] = set()
    for source in (REPO / "core" / "cli").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
                names.add(node.module)
    return sorted(names)


def test_nothing_ckctl_imports_loads_grpc() -> None:
    grpcio = [name for name in _ckctl_imports() if name.startswith("grpc") or name.split(".")[-1].endswith("_pb2_grpc")]
    assert not grpcio
    code = (
        "import importlib, sys\n"
        "from core.cli import main\n"
        "main.build_parser()\n"
        f"for name in {_ckctl_imports()!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        pass  # a name imported from a module, not a module\n"
        "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert loaded.stdout.strip() == "[]", loaded.stderr


@pytest.mark.integration
def test_ckctl_commands_against_a_daemon_do_not_load_grpc(daemon: Any) -> None:
    code = (
        "import sys\n"
        "from core.cli import main\n"
        "for command in (['version'], ['images', 'ls'], ['plugins', 'ls'], ['events', 'nosuch==']):\n"
        f"    main.main(['-a', {daemon.address!r}, *command])\n"
        "print('grpc' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.splitlines()[-1] == "False", result.stdout + result.stderr
    assert "Server:" in result.stdout


if __name__ == "__main__":
    start_server(sys.argv[1], Handlers())
    threading.Event().wait()
