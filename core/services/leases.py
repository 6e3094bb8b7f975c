"""containerd.services.leases.v1.Leases over :class:`core.metadata.leases.LeaseStore`.

A lease keeps the resources it lists (``content`` by digest, ``ingests`` by ref,
``snapshots/<snapshotter>`` by key) from garbage collection until it is deleted or expires (label
``containerd.io/gc.expire``). Deleting a lease schedules a collection, or runs one before answering
when the request asks for ``sync``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from core.hookspecs import hookimpl
from core.plugin import InitContext, Registration
from core.server import namespace_of
from core.services._convert import timestamp

if TYPE_CHECKING:
    from core.metadata.leases import Lease, LeaseStore


class LeasesService:
    """The leases service plugin; ``store`` is its :class:`LeaseStore` (usable in-process)."""

    def __init__(self, store: LeaseStore, gc: Any) -> None:
        self.store = store
        self._gc = gc

    @hookimpl
    def containerkit_gc_kinds(self) -> list[Any]:
        """The GC's view of leases: unexpired ones are roots referencing their resources."""
        from core.metadata.leases import LeaseKind

        return [LeaseKind(self.store)]

    def register(self, server: grpc.Server) -> None:
        from google.protobuf import empty_pb2

        from core.api.containerd.services.leases.v1 import leases_pb2 as pb
        from core.api.containerd.services.leases.v1 import leases_pb2_grpc as pb_grpc
        from core.metadata.leases import LeaseResource

        service, store = self, self.store

        def lease_pb(lease: Lease) -> Any:
            return pb.Lease(id=lease.id, created_at=timestamp(lease.created_at), labels=dict(lease.labels))

        def resource_of(message: Any) -> LeaseResource:
            return LeaseResource(id=message.id, type=message.type)

        class Servicer(pb_grpc.LeasesServicer):
            def Create(self, request: Any, context: grpc.ServicerContext) -> Any:
                lease = store.create(namespace_of(context), request.id, dict(request.labels))
                return pb.CreateResponse(lease=lease_pb(lease))

            def Delete(self, request: Any, context: grpc.ServicerContext) -> Any:
                store.delete(namespace_of(context), request.id)
                if request.sync:
                    service._gc.collect_now()
                else:
                    service._gc.schedule()
                return empty_pb2.Empty()

            def List(self, request: Any, context: grpc.ServicerContext) -> Any:
                leases = store.list(namespace_of(context), list(request.filters))
                return pb.ListResponse(leases=[lease_pb(lease) for lease in leases])

            def AddResource(self, request: Any, context: grpc.ServicerContext) -> Any:
                store.add_resource(namespace_of(context), request.id, resource_of(request.resource))
                return empty_pb2.Empty()

            def DeleteResource(self, request: Any, context: grpc.ServicerContext) -> Any:
                store.delete_resource(namespace_of(context), request.id, resource_of(request.resource))
                service._gc.schedule()
                return empty_pb2.Empty()

            def ListResources(self, request: Any, context: grpc.ServicerContext) -> Any:
                resources = store.list_resources(namespace_of(context), request.id)
                return pb.ListResourcesResponse(resources=[pb.Resource(id=r.id, type=r.type) for r in resources])

        pb_grpc.add_LeasesServicer_to_server(Servicer(), server)


def _init(context: InitContext) -> LeasesService:
    from core.metadata.leases import LeaseStore

    return LeasesService(LeaseStore(context.metadata), context.get("gc"))


plugin = Registration(init=_init, requires=("gc",))
