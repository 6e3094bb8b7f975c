"""containerd.services.namespaces.v1.Namespaces, over the metadata store's namespaces.

Semantics follow containerd, which clients rely on: Get of a namespace that does not exist answers
with no labels (``ctr`` reads the default namespace's labels at connect time), setting a label
creates the namespace, and only an empty namespace can be deleted.
"""

from __future__ import annotations

from typing import Any

import grpc

from core.endpoint import NAMESPACE_METADATA_KEY
from core.errors import InvalidArgument
from core.grpcwire.server import Server
from core.metadata import NamespaceStore
from core.plugin import InitContext, Registration
from core.server import metadata_value, method_paths


class NamespacesService:
    def __init__(self, context: InitContext) -> None:
        self._store = NamespaceStore(context.metadata)
        self._events = context.events

    def register(self, server: Server) -> None:
        from google.protobuf import empty_pb2

        from core.api.containerd.events import namespace_pb2 as events_pb
        from core.api.containerd.services.namespaces.v1 import namespace_pb2 as pb
        from core.api.containerd.services.namespaces.v1 import namespace_pb2_grpc as pb_grpc

        store, events = self._store, self._events

        def publish(grpc_context: grpc.ServicerContext, topic: str, event: Any) -> None:
            namespace = metadata_value(grpc_context, NAMESPACE_METADATA_KEY) or event.name
            events.publish(namespace, topic, event)

        class Servicer(pb_grpc.NamespacesServicer):
            def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = pb.Namespace(name=request.name, labels=store.labels(request.name))
                return pb.GetNamespaceResponse(namespace=namespace)

            def List(self, request: Any, context: grpc.ServicerContext) -> Any:
                from core import filters  # first listing pays the import, not start-up

                matcher = filters.parse([request.filter])
                found = [pb.Namespace(name=name, labels=labels) for name, labels in store.list()]
                matching = [ns for ns in found if matcher({"name": ns.name, "labels": dict(ns.labels)})]
                return pb.ListNamespacesResponse(namespaces=matching)

            def Create(self, request: Any, context: grpc.ServicerContext) -> Any:
                name, labels = request.namespace.name, dict(request.namespace.labels)
                # containerd sets each label after creating, so an empty value sets nothing (`ctr ns create x k=`).
                labels = {key: value for key, value in labels.items() if value}
                store.create(name, labels)
                publish(context, "/namespaces/create", events_pb.NamespaceCreate(name=name, labels=labels))
                return pb.CreateNamespaceResponse(namespace=request.namespace)

            def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
                name, labels = request.namespace.name, dict(request.namespace.labels)
                paths = list(request.update_mask.paths)
                if paths:
                    for path in paths:
                        if not path.startswith("labels."):
                            raise InvalidArgument(f'cannot update "{path}" field')
                    keys = [path.removeprefix("labels.") for path in paths]
                    store.set_labels(name, {key: labels.get(key, "") for key in keys})
                else:
                    store.replace_labels(name, labels)
                updated = pb.Namespace(name=name, labels=store.labels(name))
                publish(
                    context, "/namespaces/update", events_pb.NamespaceUpdate(name=name, labels=dict(updated.labels))
                )
                return pb.UpdateNamespaceResponse(namespace=updated)

            def Delete(self, request: Any, context: grpc.ServicerContext) -> Any:
                store.delete(request.name)
                publish(context, "/namespaces/delete", events_pb.NamespaceDelete(name=request.name))
                return empty_pb2.Empty()

        pb_grpc.add_NamespacesServicer_to_server(Servicer(), server)
        server.answer_inline(method_paths(pb, "Namespaces", ["Get"]))


def _init(context: InitContext) -> NamespacesService:
    return NamespacesService(context)


plugin = Registration(init=_init)
