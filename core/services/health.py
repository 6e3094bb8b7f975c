"""grpc.health.v1.Health: SERVING while the daemon runs, NOT_SERVING once it begins to stop."""

from __future__ import annotations

import grpc

from core.plugin import InitContext, Registration


class HealthService:
    def __init__(self) -> None:
        from grpc_health.v1 import health

        self._servicer = health.HealthServicer()

    def register(self, server: grpc.Server) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    def close(self) -> None:
        self._servicer.enter_graceful_shutdown()


def _init(context: InitContext) -> HealthService:
    return HealthService()


plugin = Registration(init=_init)
