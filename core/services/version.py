"""containerd.services.version.v1.Version: the daemon's version and revision."""

from __future__ import annotations

from typing import Any

import grpc

from core import __version__
from core.grpcwire.server import Server
from core.plugin import InitContext, Registration
from core.server import method_paths

REVISION = "containerkit"


class VersionService:
    def register(self, server: Server) -> None:
        from core.api.containerd.services.version.v1 import version_pb2, version_pb2_grpc

        class Servicer(version_pb2_grpc.VersionServicer):
            def Version(self, request: Any, context: grpc.ServicerContext) -> Any:
                return version_pb2.VersionResponse(version=__version__, revision=REVISION)

        version_pb2_grpc.add_VersionServicer_to_server(Servicer(), server)
        server.answer_inline(method_paths(version_pb2, "Version", ["Version"]))


def _init(context: InitContext) -> VersionService:
    return VersionService()


plugin = Registration(init=_init)
