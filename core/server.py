"""The gRPC side of the daemon: the service-plugin contract, error mapping and request context.

A plugin of type ``service`` returns an object with ``register(server)`` that adds its servicers to the
daemon's server (:class:`core.grpcwire.server.Server`) with the generated ``add_*Servicer_to_server``
functions, as to a ``grpc.Server``. Handlers raise :mod:`core.errors` exceptions; :func:`error_status` turns
them into the status codes containerd uses, so no handler deals with gRPC codes itself.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import grpc

from core import identifiers
from core.endpoint import NAMESPACE_METADATA_KEY
from core.errors import ContainerkitError, FailedPrecondition
from core.grpcwire.server import Server

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

    def register(self, server: Server) -> None:
        """Add this service's servicers to ``server`` (called once, before the server starts), and name the
        methods whose handlers never block (:meth:`Server.answer_inline`)."""


def new_server(config: GrpcConfig) -> Server:
    """The daemon's gRPC server, limited as ``config`` says: ``max_workers`` threads serve calls, and one
    connection may have at most ``max_concurrent_streams`` calls open (its client queues the rest), so no
    single client, however many calls it stalls, holds every worker."""
    return Server(
        max_workers=config.max_workers,
        max_concurrent_streams=config.max_concurrent_streams,
        max_message_size=MAX_MESSAGE_SIZE,
        error_status=error_status,
    )


def method_paths(pb: ModuleType, service: str, methods: Iterable[str]) -> list[str]:
    """The paths (``/package.Service/Method``) of ``service``'s ``methods`` as the generated ``*_pb2`` module ``pb``
    declares them, for :meth:`Server.answer_inline`; KeyError for a service or method it lacks."""
    descriptor = pb.DESCRIPTOR.services_by_name[service]
    return [f"/{descriptor.full_name}/{descriptor.methods_by_name[method].name}" for method in methods]


def error_status(err: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The status a handler's exception ends its call with: a :class:`ContainerkitError`'s own code, a full
    disk RESOURCE_EXHAUSTED (the operator's to fix: no traceback, no internal paths), anything else UNKNOWN
    (a bug: logged with its traceback)."""
    if isinstance(err, ContainerkitError):
        return getattr(grpc.StatusCode, err.grpc_code), str(err)
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        log.warning("%s: %s", method, err.strerror)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, err.strerror or os.strerror(err.errno)
    log.error("unexpected error in %s", method, exc_info=err)
    return grpc.StatusCode.UNKNOWN, f"{type(err).__name__}: {err}"


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
