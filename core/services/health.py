"""grpc.health.v1.Health: SERVING while the daemon runs; NOT_SERVING once it begins to stop, which
also ends every Watch stream so none holds up the shutdown.

The overall server is the empty service name (the only one List shows); any other name is unknown (NOT_FOUND
for Check, SERVICE_UNKNOWN for Watch), as the gRPC health protocol prescribes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc

from core.plugin import InitContext, Registration

WATCH_POLL_SECONDS = 1.0  # how often a Watch notices a client that went away


class HealthService:
    def __init__(self) -> None:
        self._serving = True
        self._changed = threading.Condition()

    def register(self, server: grpc.Server) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        service = self
        response = health_pb2.HealthCheckResponse

        class Servicer(health_pb2_grpc.HealthServicer):
            def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
                if request.service:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
                return response(status=response.SERVING if service._serving else response.NOT_SERVING)

            def List(self, request: Any, context: grpc.ServicerContext) -> Any:
                """The one service known here: the overall server (the empty name)."""
                overall = self.Check(health_pb2.HealthCheckRequest(), context)
                return health_pb2.HealthListResponse(statuses={"": overall})

            def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                if request.service:
                    yield response(status=response.SERVICE_UNKNOWN)
                    return
                yield response(status=response.SERVING if service._serving else response.NOT_SERVING)
                with service._changed:
                    while service._serving and context.is_active():
                        service._changed.wait(WATCH_POLL_SECONDS)
                if not service._serving:
                    yield response(status=response.NOT_SERVING)

        health_pb2_grpc.add_HealthServicer_to_server(Servicer(), server)

    def stopping(self) -> None:
        """Report NOT_SERVING and end every Watch stream (each gets NOT_SERVING first)."""
        with self._changed:
            self._serving = False
            self._changed.notify_all()

    close = stopping


def _init(context: InitContext) -> HealthService:
    return HealthService()


plugin = Registration(init=_init)
