"""grpc.health.v1.Health: SERVING while the daemon runs, NOT_SERVING once it begins to stop (Watch streams then end)."""

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

    def stopping(self) -> None:
        """Report NOT_SERVING, then end every Watch stream (each gets NOT_SERVING first) so none holds up the stop."""
        self._servicer.enter_graceful_shutdown()
        # grpc_health keeps no public handle on its watchers; a None response is how it ends one.
        with self._servicer._lock:
            watchers = [send for sends in self._servicer._send_response_callbacks.values() for send in sends]
        for send in watchers:
            send(None)

    def close(self) -> None:
        self._servicer.enter_graceful_shutdown()


def _init(context: InitContext) -> HealthService:
    return HealthService()


plugin = Registration(init=_init)
