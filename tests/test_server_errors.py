"""core.server.error_status with the daemon's server: core errors become their gRPC codes; a handler's own
context.abort is kept."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from core.config import GrpcConfig
from core.errors import NotFound, OutOfRange
from core.server import new_server


def _raise(err: Exception) -> Callable[[Any, grpc.ServicerContext], Any]:
    def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
        raise err

    return behaviour


def _abort(request: Any, context: grpc.ServicerContext) -> Any:
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")


def _abort_streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
    yield b"first"
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "enough")


HANDLERS = {
    "NotFound": grpc.unary_unary_rpc_method_handler(_raise(NotFound("gone"))),
    "OutOfRange": grpc.unary_unary_rpc_method_handler(_raise(OutOfRange("past the end"))),
    "Bug": grpc.unary_unary_rpc_method_handler(_raise(KeyError("oops"))),
    "Abort": grpc.unary_unary_rpc_method_handler(_abort),
    "AbortStreaming": grpc.unary_stream_rpc_method_handler(_abort_streaming),
}


@pytest.fixture
def channel() -> Iterator[grpc.Channel]:
    directory = Path(tempfile.mkdtemp(prefix="ck-err-", dir="/tmp"))
    server = new_server(GrpcConfig())
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Errors", HANDLERS)])
    server.add_insecure_port(f"unix:{directory / 'sock'}")
    server.start()
    try:
        with grpc.insecure_channel(f"unix:{directory / 'sock'}") as chan:
            yield chan
    finally:
        server.stop(None).wait()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize(
    ("method", "code", "details"),
    [
        ("NotFound", grpc.StatusCode.NOT_FOUND, "gone"),
        ("OutOfRange", grpc.StatusCode.OUT_OF_RANGE, "past the end"),
        ("Bug", grpc.StatusCode.UNKNOWN, "KeyError: 'oops'"),
        ("Abort", grpc.StatusCode.PERMISSION_DENIED, "no"),
    ],
)
def test_unary_errors_map_to_codes(channel: grpc.Channel, method: str, code: grpc.StatusCode, details: str) -> None:
    call = channel.unary_unary(f"/test.Errors/{method}")
    with pytest.raises(grpc.RpcError) as info:
        call(b"")
    assert (info.value.code(), info.value.details()) == (code, details)


def test_streaming_abort_keeps_its_code(channel: grpc.Channel) -> None:
    responses = channel.unary_stream("/test.Errors/AbortStreaming")(b"")
    assert next(responses) == b"first"
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "enough")
