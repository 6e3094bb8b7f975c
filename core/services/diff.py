"""containerd.services.diff.v1.Diff over a differ plugin (``walking`` unless configured otherwise).

Apply reads the layer from the request's namespace and applies it onto the given mounts; Diff writes
the layer of the changes from ``left`` to ``right`` into the namespace's content store, held by the
request's lease (``containerd-lease`` metadata) like any other write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from core.endpoint import LEASE_METADATA_KEY
from core.oci import OCI_LAYER_GZIP
from core.plugin import InitContext, Registration
from core.server import metadata_value, namespace_of
from core.services._convert import mounts_of
from core.services.images import descriptor_of, descriptor_pb

if TYPE_CHECKING:
    from core.diff import Differ


@dataclass
class DiffServiceConfig:
    """``[plugins.service.diff]``: ``differ`` is the id of the differ plugin serving the calls."""

    differ: str = "walking"


class DiffService:
    """The diff service plugin; ``differ`` is the differ it drives (usable in-process)."""

    def __init__(self, differ: Differ) -> None:
        self.differ = differ

    def register(self, server: grpc.Server) -> None:
        from core.api.containerd.services.diff.v1 import diff_pb2 as pb
        from core.api.containerd.services.diff.v1 import diff_pb2_grpc as pb_grpc

        differ = self.differ

        class Servicer(pb_grpc.DiffServicer):
            def Apply(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                applied = differ.apply(namespace, descriptor_of(request.diff), mounts_of(request.mounts))
                return pb.ApplyResponse(applied=descriptor_pb(applied))

            def Diff(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                written = differ.compare(
                    namespace,
                    mounts_of(request.left),
                    mounts_of(request.right),
                    media_type=request.media_type or OCI_LAYER_GZIP,
                    ref=request.ref,
                    labels=dict(request.labels),
                    lease=metadata_value(context, LEASE_METADATA_KEY) or None,
                )
                return pb.DiffResponse(diff=descriptor_pb(written))

        pb_grpc.add_DiffServicer_to_server(Servicer(), server)


def _init(context: InitContext) -> DiffService:
    return DiffService(context.get("differ", context.config.differ or None))


plugin = Registration(init=_init, requires=("differ",), config=DiffServiceConfig)
