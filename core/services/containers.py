"""containerd.services.containers.v1.Containers over :class:`core.metadata.containers.ContainerStore`.

Container records are per namespace. Create, Update and Delete publish ``/containers/create``,
``/containers/update`` and ``/containers/delete``, as containerd; Delete schedules a garbage
collection (the container's snapshot may be unreferenced now). ListStream sends one container
per message. Create, and an Update that sets the spec, first run the ``containerkit_adjust_spec``
hook on the decoded spec and store what the hook leaves (the bytes the client sent when it changed
nothing). A hook raising a :class:`ContainerkitError` rejects the call with that error; any other
exception rejects it as InvalidArgument.

The service's ``store`` is the :class:`ContainerStore`, for in-process use (tasks, ckctl run).
Containers are GC roots (:class:`core.metadata.containers.ContainerKind`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc

from core.errors import ContainerkitError, InvalidArgument
from core.grpcwire.server import Server
from core.hookspecs import hookimpl
from core.plugin import InitContext, Registration
from core.server import method_paths, namespace_of
from core.services._convert import mask_paths, timestamp

if TYPE_CHECKING:
    import pluggy

    from core.metadata.containers import AnyValue, Container, ContainerStore


def any_pb(value: AnyValue) -> Any:
    """The ``google.protobuf.Any`` of a stored (type URL, bytes) pair."""
    from google.protobuf import any_pb2

    return any_pb2.Any(type_url=value[0], value=value[1])


def container_pb(container: Container) -> Any:
    """The ``containers.v1.Container`` message of ``container``."""
    from core.api.containerd.services.containers.v1 import containers_pb2 as pb

    runtime = pb.Container.Runtime(name=container.runtime_name)
    if container.runtime_options is not None:
        runtime.options.CopyFrom(any_pb(container.runtime_options))
    message = pb.Container(
        id=container.id,
        image=container.image,
        runtime=runtime,
        snapshotter=container.snapshotter,
        snapshot_key=container.snapshot_key,
        sandbox=container.sandbox,
        created_at=timestamp(container.created_at),
        updated_at=timestamp(container.updated_at),
    )
    if container.spec is not None:
        message.spec.type_url = container.spec_type_url
        message.spec.value = container.spec_value()
    if container.labels:  # a map filled by keyword goes through a slow generic update(), even when empty
        message.labels.update(container.labels)
    for name, value in container.extensions.items():
        message.extensions[name].CopyFrom(any_pb(value))
    return message


def container_of(message: Any) -> Container:
    """The :class:`Container` a ``containers.v1.Container`` message describes (timestamps ignored).

    InvalidArgument when its spec is set but is not a JSON object.
    """
    from core.metadata.containers import Container, decode_spec

    spec = decode_spec(message.spec.value) if message.HasField("spec") else None
    options = message.runtime.options if message.runtime.HasField("options") else None
    return Container(
        id=message.id,
        runtime_name=message.runtime.name,
        spec=spec,
        spec_type_url=message.spec.type_url,
        spec_json=message.spec.value,
        labels=dict(message.labels),
        image=message.image,
        runtime_options=None if options is None else (options.type_url, options.value),
        snapshotter=message.snapshotter,
        snapshot_key=message.snapshot_key,
        extensions={name: (value.type_url, value.value) for name, value in message.extensions.items()},
        sandbox=message.sandbox,
    )


def adjusted(hooks: pluggy.PluginManager, namespace: str, container: Container) -> Container:
    """``container`` with its spec as the ``containerkit_adjust_spec`` hooks leave it (``spec_json``
    kept only when they changed nothing). A hook's non-containerkit exception becomes InvalidArgument."""
    if container.spec is None:
        return container
    spec = copy.deepcopy(dict(container.spec))
    try:
        hooks.hook.containerkit_adjust_spec(
            spec=spec, namespace=namespace, container_id=container.id, labels=dict(container.labels)
        )
    except ContainerkitError:
        raise
    except Exception as err:
        raise InvalidArgument(f"adjusting the spec of container {container.id!r} failed: {err}") from err
    if spec == container.spec:
        return container
    return replace(container, spec=spec, spec_json=b"")


class ContainersService:
    """The containers service plugin; ``store`` is its :class:`ContainerStore` (usable in-process)."""

    def __init__(self, store: ContainerStore, events: Any, hooks: pluggy.PluginManager, gc: Any) -> None:
        self.store = store
        self._events = events
        self._hooks = hooks
        self._gc = gc

    @hookimpl
    def containerkit_gc_kinds(self) -> list[Any]:
        """The GC's view of containers: every container is a root keeping its snapshot (see :mod:`core.gc`)."""
        from core.metadata.containers import ContainerKind

        return [ContainerKind(self.store)]

    def register(self, server: Server) -> None:
        from google.protobuf import empty_pb2

        from core.api.containerd.events import container_pb2 as events_pb
        from core.api.containerd.services.containers.v1 import containers_pb2 as pb
        from core.api.containerd.services.containers.v1 import containers_pb2_grpc as pb_grpc

        store, events, hooks, gc = self.store, self._events, self._hooks, self._gc

        def listed(request: Any, context: grpc.ServicerContext) -> list[Any]:
            return [container_pb(c) for c in store.list(namespace_of(context), list(request.filters))]

        class Servicer(pb_grpc.ContainersServicer):
            def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
                container = store.get(namespace_of(context), request.id)
                return pb.GetContainerResponse(container=container_pb(container))

            def List(self, request: Any, context: grpc.ServicerContext) -> Any:
                return pb.ListContainersResponse(containers=listed(request, context))

            def ListStream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                for message in listed(request, context):
                    yield pb.ListContainerMessage(container=message)

            def Create(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                created = container_pb(
                    store.create(namespace, adjusted(hooks, namespace, container_of(request.container)))
                )
                event = events_pb.ContainerCreate(
                    id=created.id,
                    image=created.image,
                    runtime=events_pb.ContainerCreate.Runtime(name=created.runtime.name),
                )
                if created.runtime.HasField("options"):
                    event.runtime.options.CopyFrom(created.runtime.options)
                events.publish(namespace, "/containers/create", event)
                return pb.CreateContainerResponse(container=created)

            def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
                if not request.container.id:
                    raise InvalidArgument("Container.ID required")
                namespace = namespace_of(context)
                paths = mask_paths(request)
                container = container_of(request.container)
                if not paths or "spec" in paths:
                    container = adjusted(hooks, namespace, container)
                updated = container_pb(store.update(namespace, container, paths))
                event = events_pb.ContainerUpdate(id=updated.id, image=updated.image, snapshot_key=updated.snapshot_key)
                event.labels.update(updated.labels)
                events.publish(namespace, "/containers/update", event)
                return pb.UpdateContainerResponse(container=updated)

            def Delete(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                store.delete(namespace, request.id)
                events.publish(namespace, "/containers/delete", events_pb.ContainerDelete(id=request.id))
                gc.schedule()  # its snapshot may be unreferenced now
                return empty_pb2.Empty()

        pb_grpc.add_ContainersServicer_to_server(Servicer(), server)
        server.answer_inline(method_paths(pb, "Containers", ["Get"]))


def _init(context: InitContext) -> ContainersService:
    from core.metadata.containers import ContainerStore

    return ContainersService(ContainerStore(context.metadata), context.events, context.hooks, context.get("gc"))


plugin = Registration(init=_init, requires=("gc",))
