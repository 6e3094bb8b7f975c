"""containerkit.services.unpack.v1.Unpack: unpack an image of the caller's namespace inside the daemon.

The image's layers must be in the namespace's content already (a pull or an import put them
there). The work is :class:`core.unpack.Unpacker`'s: chain-id named snapshots in the requested
snapshotter (``[plugins.service.unpack] snapshotter``, ``overlayfs``, when the request names none),
layers already unpacked reused, layers extracted in parallel where the snapshotter declares the
``rebase`` capability, and the config blob labelled so the image keeps its snapshots alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from core.plugin import InitContext, Registration, Status
from core.server import namespace_of

if TYPE_CHECKING:
    from core.metadata.images import ImageStore
    from core.unpack import Unpacker


@dataclass
class UnpackServiceConfig:
    """``[plugins.service.unpack]``: the default ``snapshotter``, and how many layers one unpack
    extracts at once (``workers``) where the snapshotter can rebase."""

    snapshotter: str = "overlayfs"
    workers: int = 4


class UnpackService:
    """The unpack service plugin; ``unpacker`` is its :class:`~core.unpack.Unpacker` (usable in-process)."""

    def __init__(self, unpacker: Unpacker, images: ImageStore, snapshotter: str) -> None:
        self.unpacker = unpacker
        self.snapshotter = snapshotter
        self._images = images

    def register(self, server: grpc.Server) -> None:
        from core.api.containerkit.services.unpack.v1 import unpack_pb2 as pb
        from core.api.containerkit.services.unpack.v1 import unpack_pb2_grpc as pb_grpc
        from core.errors import InvalidArgument
        from core.types import Platform

        service = self

        class Servicer(pb_grpc.UnpackServicer):
            def Unpack(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                if not request.image:
                    raise InvalidArgument("image name must not be empty")
                image = service._images.get(namespace, request.image)
                platform = Platform.parse(request.platform) if request.platform else None
                snapshotter = request.snapshotter or service.snapshotter
                result = service.unpacker.unpack(namespace, image.target, snapshotter, platform)
                return pb.UnpackResponse(chain_id=result.chain_id, layers=result.layers, applied=result.applied)

        pb_grpc.add_UnpackServicer_to_server(Servicer(), server)


def _init(context: InitContext) -> UnpackService:
    from core.snapshot import CAPABILITY_REBASE
    from core.unpack import Unpacker

    config: UnpackServiceConfig = context.config
    content = context.get("service", "content").store
    rebase = [
        record.id
        for record in context.records()
        if record.type == "snapshotter" and record.status is Status.OK and CAPABILITY_REBASE in record.capabilities
    ]
    unpacker = Unpacker(
        content,
        context.get("service", "snapshots").store,
        context.get("differ"),
        leases=content.leases,
        rebase_snapshotters=rebase,
        workers=config.workers,
    )
    return UnpackService(unpacker, context.get("service", "images").store, config.snapshotter)


plugin = Registration(
    init=_init,
    requires=("service.content", "service.snapshots", "service.images", "differ"),
    config=UnpackServiceConfig,
)
