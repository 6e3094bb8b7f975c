"""containerd.services.introspection.v1.Introspection: the plugin records and the server's UUID.

Skipped plugins carry an ``init_err`` whose message ends in ``skip plugin`` (what ``ctr plugins ls``
looks for to print ``skip``); failed ones carry the reason with code UNKNOWN. The providing package
is exported under ``containerkit.package``.
"""

from __future__ import annotations

from typing import Any

import grpc

from core.plugin import InitContext, PluginRecord, Registration, Status
from core.plugin_types import PLUGIN_TYPES

SKIP_MARKER = "skip plugin"
PACKAGE_EXPORT = "containerkit.package"


def wire_type(type_name: str) -> str:
    """The type string containerd clients expect for one of our plugin types."""
    plugin_type = PLUGIN_TYPES.get(type_name)
    return plugin_type.wire_type if plugin_type else type_name


def plugin_fields(record: PluginRecord) -> dict[str, Any]:
    """The fields a filter over plugins can name (containerd's: type, id, capabilities...)."""
    return {
        "type": wire_type(record.type),
        "id": record.id,
        "capabilities": list(record.capabilities),
        "exports": record.exports,
        "status": str(record.status),
    }


class IntrospectionService:
    def __init__(self, context: InitContext) -> None:
        self._context = context

    def register(self, server: grpc.Server) -> None:
        from core.api.containerd.services.introspection.v1 import introspection_pb2 as pb
        from core.api.containerd.services.introspection.v1 import introspection_pb2_grpc as pb_grpc
        from core.api.google.rpc import status_pb2

        context = self._context

        def to_message(record: PluginRecord) -> Any:
            message = pb.Plugin(
                type=wire_type(record.type),
                id=record.id,
                requires=[wire_type(r.split(".", 1)[0]) + r[len(r.split(".", 1)[0]) :] for r in record.requires],
                exports={**record.exports, PACKAGE_EXPORT: record.package},
                capabilities=list(record.capabilities),
            )
            if record.status is Status.SKIP:
                message.init_err.CopyFrom(status_pb2.Status(code=2, message=f"{record.reason}: {SKIP_MARKER}"))
            elif record.status is Status.ERROR:
                message.init_err.CopyFrom(status_pb2.Status(code=2, message=record.reason))
            return message

        class Servicer(pb_grpc.IntrospectionServicer):
            def Plugins(self, request: Any, grpc_context: grpc.ServicerContext) -> Any:
                from core import filters  # first listing pays the import, not start-up

                matcher = filters.parse(request.filters)
                records = [r for r in context.records() if matcher(plugin_fields(r))]
                return pb.PluginsResponse(plugins=[to_message(r) for r in records])

            def Server(self, request: Any, grpc_context: grpc.ServicerContext) -> Any:
                return pb.ServerResponse(uuid=context.metadata.server_uuid())

        pb_grpc.add_IntrospectionServicer_to_server(Servicer(), server)


def _init(context: InitContext) -> IntrospectionService:
    return IntrospectionService(context)


plugin = Registration(init=_init)
