"""ckctl's connection to the daemon: a gRPC channel on the unix socket that tags every call with the
namespace, and errors turned into one-line messages."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from core.server import LEASE_METADATA_KEY, NAMESPACE_METADATA_KEY

CALL_TIMEOUT_SECONDS = 30.0


class CliError(Exception):
    """A failure to report as ``ckctl: <message>`` with a non-zero exit."""


class Client:
    """A connection to containerkitd at ``address``, acting in ``namespace``."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._channel: grpc.Channel | None = None

    @property
    def channel(self) -> grpc.Channel:
        """The gRPC channel, opened on first use after checking that the socket accepts connections."""
        if self._channel is None:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.address)
            except OSError as err:
                raise CliError(f"cannot reach containerkitd at {self.address}: {err.strerror or err}") from None
            finally:
                probe.close()
            self._channel = grpc.insecure_channel(f"unix:{self.address}")
        return self._channel

    def metadata(self, lease: str = "") -> list[tuple[str, str]]:
        """The call metadata: the namespace, and the ``lease`` to create things under when given."""
        metadata = [(NAMESPACE_METADATA_KEY, self.namespace)]
        return [*metadata, (LEASE_METADATA_KEY, lease)] if lease else metadata

    @contextlib.contextmanager
    def stream_errors(self) -> Iterator[None]:
        """For streaming calls, which fail while their responses are read: a gRPC error raised inside
        becomes a CliError as :meth:`call` reports it."""
        try:
            yield
        except grpc.RpcError as err:
            raise CliError(describe_rpc_error(err, self.address)) from None

    def call(
        self,
        method: Callable[..., Any],
        request: Any,
        *,
        namespaced: bool = True,
        lease: str = "",
        timeout: float | None = CALL_TIMEOUT_SECONDS,
    ) -> Any:
        """Invoke a unary stub method (under ``lease`` if given; ``timeout`` None waits as long as it
        takes); a gRPC error becomes a CliError carrying the daemon's message."""
        metadata = self.metadata(lease) if namespaced else []
        with self.stream_errors():
            return method(request, metadata=metadata, timeout=timeout)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


def describe_rpc_error(err: grpc.RpcError, address: str) -> str:
    code = err.code() if isinstance(err, grpc.Call) else None
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    if code is grpc.StatusCode.UNAVAILABLE and "connect" in (details or "").lower():
        return f"cannot reach containerkitd at {address}: {details}"
    name = code.name.lower().replace("_", " ") if code else "error"
    return f"{details} ({name})"
