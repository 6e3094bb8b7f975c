"""ckctl's connection to the daemon: a gRPC channel (:mod:`core.cli.rpc`) on the unix socket that tags every
call with the namespace, and errors turned into one-line messages."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from core.cli import rpc
from core.endpoint import LEASE_METADATA_KEY, NAMESPACE_METADATA_KEY

CALL_TIMEOUT_SECONDS = 30.0


class CliError(Exception):
    """A failure to report as ``ckctl: <message>`` with a non-zero exit."""


class Client:
    """A connection to containerkitd at ``address``, acting in ``namespace``."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self._channel: rpc.Channel | None = None
        self._stubs: dict[tuple[str, str], Any] = {}

    @property
    def channel(self) -> rpc.Channel:
        """The gRPC channel, connected on first use (CliError when the socket accepts no connection)."""
        if self._channel is None:
            try:
                self._channel = rpc.Channel(self.address)
            except OSError as err:
                raise CliError(f"cannot reach containerkitd at {self.address}: {err.strerror or err}") from None
        return self._channel

    def stub(self, module: Any, service: str) -> Any:
        """The stub of ``service`` as declared in the ``*_pb2`` ``module`` (see :func:`rpc.stub`), built once."""
        key = (module.__name__, service)
        if key not in self._stubs:
            self._stubs[key] = rpc.stub(module, service, self.channel)
        return self._stubs[key]

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
        except rpc.RpcError as err:
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


def describe_rpc_error(err: rpc.RpcError, address: str) -> str:
    """The one-line message of a failed call: ``<details> (<code in words>)``, or that the daemon is not
    reachable."""
    code, details = err.code(), err.details()
    if code is rpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        return f"cannot reach containerkitd at {address}: {details}"
    return f"{details} ({code.name.lower().replace('_', ' ')})"
