"""The gRPC side of the daemon: the service-plugin contract, error mapping and request context.

A plugin of type ``service`` returns an object with ``register(server)`` that adds its servicers to
the :class:`grpc.Server`. Handlers raise :mod:`core.errors` exceptions; :class:`ErrorMapping` turns
them into the status codes containerd uses, so no handler deals with gRPC codes itself.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from core import identifiers
from core.endpoint import NAMESPACE_METADATA_KEY
from core.errors import ContainerkitError, FailedPrecondition

if TYPE_CHECKING:
    from core.config import GrpcConfig

log = logging.getLogger("containerkit.grpc")

MAX_MESSAGE_SIZE = 16 << 20  # containerd's default for both directions


class GrpcService(Protocol):
    """What a ``service`` plugin's instance provides.

    Optionally it also has ``stopping()``, called once when the daemon begins to stop: the server
    already refuses new calls and gives in-flight ones a grace period, so a service whose calls never
    end by themselves (watches, event streams) ends them here. ``close()`` follows after the server stopped.
    """

    def register(self, server: grpc.Server) -> None:
        """Add this service's servicers to ``server`` (called once, before the server starts)."""


def new_server(config: GrpcConfig) -> grpc.Server:
    """The daemon's gRPC server, limited as ``config`` says: ``max_workers`` threads serve calls, and one
    connection may have at most ``max_concurrent_streams`` calls open (its client queues the rest), so no
    single client, however many calls it stalls, holds every worker."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc"),
        interceptors=[ErrorMapping()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
            ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
            ("grpc.max_concurrent_streams", config.max_concurrent_streams),
            # Count a stream against the limit while it is open, as HTTP/2 does, not until its call is freed:
            # otherwise a client that cancels a call and starts the next one it queued gets REFUSED_STREAM.
            ("grpc.http.overload_protection", 0),
        ],
    )


def metadata_value(context: grpc.ServicerContext, key: str) -> str | None:
    """The first value of a request metadata key, or None."""
    for item in context.invocation_metadata() or ():
        if item.key == key:
            return str(item.value)
    return None


def namespace_of(context: grpc.ServicerContext) -> str:
    """The tenant of a request, from the ``containerd-namespace`` metadata, validated.

    Raises FailedPrecondition when it is absent (as containerd does) and InvalidArgument when bad.
    """
    namespace = metadata_value(context, NAMESPACE_METADATA_KEY)
    if not namespace:
        raise FailedPrecondition("namespace is required: pass it as containerd-namespace metadata (ctr -n, ckctl -n)")
    return identifiers.validate(namespace, "namespace")


def _abort(context: grpc.ServicerContext, err: Exception, method: str) -> None:
    if isinstance(err, ContainerkitError):
        context.abort(getattr(grpc.StatusCode, err.grpc_code), str(err))
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        # A full disk is the operator's to fix, not a bug: say so without a traceback or internal paths.
        log.warning("%s: %s", method, err.strerror)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, err.strerror or os.strerror(err.errno))
    log.error("unexpected error in %s", method, exc_info=err)
    context.abort(grpc.StatusCode.UNKNOWN, f"{type(err).__name__}: {err}")


def _wrap_unary(behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behaviour(request, context)
        except Exception as err:
            if _is_abort(err, context):
                raise
            _abort(context, err, method)

    return handler


def _wrap_streaming(behaviour: Callable[..., Iterator[Any]], method: str) -> Callable[..., Iterator[Any]]:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behaviour(request, context)
        except Exception as err:
            if _is_abort(err, context):
                raise
            _abort(context, err, method)

    return handler


def _is_abort(err: Exception, context: grpc.ServicerContext) -> bool:
    # grpc's context.abort records the status on the context, then raises a bare Exception (grpc 1.85;
    # older versions raised a class private to grpc._server): either way the status is already set.
    if type(err).__module__.startswith("grpc"):
        return True
    return type(err) is Exception and not err.args and context.code() not in (None, grpc.StatusCode.OK)


class ErrorMapping(grpc.ServerInterceptor):
    """Maps :class:`ContainerkitError` to its gRPC status and any other exception to UNKNOWN (logged)."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        kinds = {
            (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler, _wrap_unary),
            (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler, _wrap_streaming),
            (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler, _wrap_unary),
            (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler, _wrap_streaming),
        }
        attribute, make, wrap = kinds[(handler.request_streaming, handler.response_streaming)]
        return make(
            wrap(getattr(handler, attribute), method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
