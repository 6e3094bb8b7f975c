"""containerd.services.version.v1.Version: the daemon's version and revision."""

from __future__ import annotations

from typing import Any

import grpc

from core import __version__
from core.plugin import InitContext, Registration

REVISION = "containerkit"


class VersionService:
    def register(self, server: grpc.Server) -> None:
        from core.api.containerd.services.version.v1 import version_pb2, version_pb2_grpc

        class Servicer(version_pb2_grpc.VersionServicer):
            def Version(self, request: Any, context: grpc.ServicerContext) -> Any:
                return version_pb2.VersionResponse(version=__version__, revision=REVISION)

        version_pb2_grpc.add_VersionServicer_to_server(Servicer(), server)


def _init(context: InitContext) -> VersionService:
    return VersionService()


plugin = Registration(init=_init)
