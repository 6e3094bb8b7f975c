"""containerkit.services.volumes.v1.Volumes over :class:`core.volumes.VolumeStore`, and volume mounts.

Volumes are per namespace, kept under ``<daemon root>/volumes``. Create and Remove publish
``/volumes/create`` and ``/volumes/delete``. The ``containerkit_adjust_spec`` hook turns every
``type: volume`` mount of a container being created or updated into a bind mount of the volume's
data directory, creating the volume (and publishing ``/volumes/create``) when it does not exist
yet, as Docker does; a bad volume name or mount option rejects the container with InvalidArgument.
The containers whose stored spec then mounts a volume keep it from being removed. At start-up,
volume directories without a record (a removal cut short by a crash) are deleted.

The service's ``store`` is the :class:`VolumeStore`, for in-process use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from core.hookspecs import hookimpl
from core.plugin import InitContext, Registration
from core.server import namespace_of
from core.services._convert import timestamp

if TYPE_CHECKING:
    from core.events import Exchange
    from core.volumes import Volume, VolumeStore


def volume_pb(volume: Volume, containers: list[str]) -> Any:
    """The ``volumes.v1.Volume`` message of ``volume``, used by ``containers``."""
    from core.api.containerkit.services.volumes.v1 import volumes_pb2 as pb

    message = pb.Volume(
        name=volume.name,
        driver=volume.driver,
        created_at=timestamp(volume.created_at),
        mountpoint=str(volume.mountpoint),
        containers=containers,
    )
    message.labels.update(volume.labels)
    return message


class VolumesService:
    """The volumes service plugin; ``store`` is its :class:`VolumeStore` (usable in-process)."""

    def __init__(self, store: VolumeStore, events: Exchange) -> None:
        self.store = store
        self._events = events

    def created(self, namespace: str, volume: Volume) -> None:
        """Publish ``/volumes/create`` for ``volume``."""
        from core.api.containerkit.services.volumes.v1 import volumes_pb2 as pb

        event = pb.VolumeCreate(name=volume.name)
        event.labels.update(volume.labels)
        self._events.publish(namespace, "/volumes/create", event)

    @hookimpl
    def containerkit_adjust_spec(self, spec: dict[str, Any], namespace: str) -> None:
        """Volume mounts become binds of the volumes' data directories (see the module doc)."""
        for volume in self.store.bind_mounts(namespace, spec):
            self.created(namespace, volume)

    def register(self, server: grpc.Server) -> None:
        from google.protobuf import empty_pb2

        from core.api.containerkit.services.volumes.v1 import volumes_pb2 as pb
        from core.api.containerkit.services.volumes.v1 import volumes_pb2_grpc as pb_grpc

        service, store, events = self, self.store, self._events

        class Servicer(pb_grpc.VolumesServicer):
            def Create(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                volume = store.create(namespace, request.name, dict(request.labels))
                service.created(namespace, volume)
                return pb.CreateVolumeResponse(volume=volume_pb(volume, []))

            def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                volume = store.get(namespace, request.name)
                users = store.users(namespace).get(volume.name, [])
                return pb.GetVolumeResponse(volume=volume_pb(volume, users))

            def List(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                users = store.users(namespace)
                volumes = store.list(namespace, list(request.filters))
                return pb.ListVolumesResponse(volumes=[volume_pb(v, users.get(v.name, [])) for v in volumes])

            def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                store.remove(namespace, request.name)
                events.publish(namespace, "/volumes/delete", pb.VolumeDelete(name=request.name))
                return empty_pb2.Empty()

        pb_grpc.add_VolumesServicer_to_server(Servicer(), server)


def _init(context: InitContext) -> VolumesService:
    from core.volumes import VolumeStore

    store = VolumeStore(context.metadata, context.daemon_root / "volumes")
    store.prune()
    return VolumesService(store, context.events)


plugin = Registration(init=_init, requires=("service.containers",))
