"""containerd.services.snapshots.v1.Snapshots over :class:`core.metadata.snapshots.SnapshotMetadata`.

Every call names its snapshotter (any ``snapshotter`` plugin that loaded ``ok``) and acts on the
snapshots of the request's namespace. As in containerd: Prepare, Commit and Remove publish
``/snapshot/prepare``, ``/snapshot/commit`` and ``/snapshot/remove`` (View publishes nothing);
List streams batches of 100; the request's lease (``containerd-lease`` metadata) holds what
Prepare, View and Commit create. Remove drops the record and schedules a garbage collection, which
removes the backend snapshot.

The service's ``store`` is the :class:`SnapshotMetadata`, for in-process use (diff, unpack).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from core.endpoint import LEASE_METADATA_KEY
from core.hookspecs import hookimpl
from core.plugin import InitContext, Registration
from core.server import metadata_value, namespace_of
from core.services._convert import mask_paths, timestamp
from core.snapshot import Info, Kind
from core.types import Mount

if TYPE_CHECKING:
    from core.metadata.snapshots import SnapshotMetadata

LIST_BATCH = 100  # infos per ListSnapshotsResponse, as containerd


def mounts_pb(mounts: Iterable[Mount]) -> list[Any]:
    """``containerd.types.Mount`` messages of ``mounts``."""
    from core.api.containerd.types import mount_pb2

    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options) for m in mounts]


def info_pb(info: Info) -> Any:
    """The ``snapshots.v1.Info`` message of ``info``."""
    from core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb

    message = pb.Info(
        name=info.name,
        parent=info.parent,
        kind=info.kind.value,
        created_at=timestamp(info.created_at),
        updated_at=timestamp(info.updated_at),
    )
    if info.labels:
        message.labels.update(info.labels)
    return message


def info_of(message: Any) -> Info:
    """The :class:`Info` of a ``snapshots.v1.Info`` message (a kind other than active or view is
    committed, as containerd reads it; only name and labels matter to an update)."""
    kind = Kind(message.kind) if message.kind in (Kind.ACTIVE.value, Kind.VIEW.value) else Kind.COMMITTED
    return Info(kind, message.name, message.parent, dict(message.labels))


class SnapshotsService:
    """The snapshots service plugin; ``store`` is its :class:`SnapshotMetadata` (usable in-process)."""

    def __init__(self, store: SnapshotMetadata, events: Any, gc: Any) -> None:
        self.store = store
        self._events = events
        self._gc = gc

    @hookimpl
    def containerkit_gc_kinds(self) -> list[Any]:
        """The GC's view of each snapshotter's snapshots (see :class:`core.metadata.snapshots.SnapshotKind`)."""
        from core.metadata.snapshots import SnapshotKind

        return [SnapshotKind(self.store, name) for name in self.store.snapshotters]

    def register(self, server: grpc.Server) -> None:
        from google.protobuf import empty_pb2

        from core.api.containerd.events import snapshot_pb2 as events_pb
        from core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
        from core.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc

        service, store, events = self, self.store, self._events

        def lease_of(context: grpc.ServicerContext) -> str | None:
            return metadata_value(context, LEASE_METADATA_KEY) or None

        class Servicer(pb_grpc.SnapshotsServicer):
            def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                mounts = store.prepare(
                    namespace, request.snapshotter, request.key, request.parent, dict(request.labels), lease_of(context)
                )
                events.publish(
                    namespace, "/snapshot/prepare", events_pb.SnapshotPrepare(key=request.key, parent=request.parent)
                )
                return pb.PrepareSnapshotResponse(mounts=mounts_pb(mounts))

            def View(self, request: Any, context: grpc.ServicerContext) -> Any:
                mounts = store.view(
                    namespace_of(context),
                    request.snapshotter,
                    request.key,
                    request.parent,
                    dict(request.labels),
                    lease_of(context),
                )
                return pb.ViewSnapshotResponse(mounts=mounts_pb(mounts))

            def Mounts(self, request: Any, context: grpc.ServicerContext) -> Any:
                mounts = store.mounts(namespace_of(context), request.snapshotter, request.key)
                return pb.MountsResponse(mounts=mounts_pb(mounts))

            def Commit(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                store.commit(
                    namespace, request.snapshotter, request.name, request.key, dict(request.labels), lease_of(context)
                )
                events.publish(
                    namespace, "/snapshot/commit", events_pb.SnapshotCommit(key=request.key, name=request.name)
                )
                return empty_pb2.Empty()

            def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                store.remove(namespace, request.snapshotter, request.key, lease_of(context))
                events.publish(namespace, "/snapshot/remove", events_pb.SnapshotRemove(key=request.key))
                service._gc.schedule()
                return empty_pb2.Empty()

            def Stat(self, request: Any, context: grpc.ServicerContext) -> Any:
                info = store.stat(namespace_of(context), request.snapshotter, request.key)
                return pb.StatSnapshotResponse(info=info_pb(info))

            def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
                info = info_of(request.info)
                updated = store.update(namespace_of(context), request.snapshotter, info, mask_paths(request))
                return pb.UpdateSnapshotResponse(info=info_pb(updated))

            def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                infos = list(store.walk(namespace_of(context), request.snapshotter, list(request.filters)))
                for start in range(0, len(infos), LIST_BATCH):
                    yield pb.ListSnapshotsResponse(info=[info_pb(info) for info in infos[start : start + LIST_BATCH]])

            def Usage(self, request: Any, context: grpc.ServicerContext) -> Any:
                usage = store.usage(namespace_of(context), request.snapshotter, request.key)
                return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

            def Cleanup(self, request: Any, context: grpc.ServicerContext) -> Any:
                store.cleanup(request.snapshotter)
                return empty_pb2.Empty()

        pb_grpc.add_SnapshotsServicer_to_server(Servicer(), server)


def _init(context: InitContext) -> SnapshotsService:
    from core.metadata.snapshots import SnapshotMetadata

    store = SnapshotMetadata(context.metadata, context.get_all("snapshotter"))
    return SnapshotsService(store, context.events, context.get("gc"))


plugin = Registration(init=_init, requires=("snapshotter", "gc"))
