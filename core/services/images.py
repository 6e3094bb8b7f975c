"""containerd.services.images.v1.Images over :class:`core.metadata.images.ImageStore`.

Image records are per namespace. Create, Update and Delete publish ``/images/create``,
``/images/update`` and ``/images/delete``. Deleting an image only drops the record: the content it
pointed at goes at the next garbage collection, which Delete schedules, or runs before answering
when the request asks for ``sync``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from core.errors import InvalidArgument
from core.grpcwire.server import Server
from core.hookspecs import hookimpl
from core.plugin import InitContext, Registration
from core.server import method_paths, namespace_of
from core.services._convert import datetime_of, mask_paths, timestamp
from core.types import Descriptor

if TYPE_CHECKING:
    from core.metadata.images import Image, ImageStore


def descriptor_pb(descriptor: Descriptor) -> Any:
    """The ``containerd.types.Descriptor`` message of ``descriptor``."""
    from core.api.containerd.types import descriptor_pb2

    message = descriptor_pb2.Descriptor(
        media_type=descriptor.media_type, digest=str(descriptor.digest), size=descriptor.size
    )
    if descriptor.annotations:  # a map filled by keyword goes through a slow generic update(), even when empty
        message.annotations.update(descriptor.annotations)
    return message


def image_pb(image: Image) -> Any:
    """The ``containerd.services.images.v1.Image`` message of ``image``."""
    from core.api.containerd.services.images.v1 import images_pb2

    message = images_pb2.Image(
        name=image.name,
        target=descriptor_pb(image.target),
        created_at=timestamp(image.created_at),
        updated_at=timestamp(image.updated_at),
    )
    if image.labels:  # as in descriptor_pb: no generic update() of an empty map
        message.labels.update(image.labels)
    return message


def descriptor_of(message: Any) -> Descriptor:
    """The :class:`Descriptor` of a ``containerd.types.Descriptor`` message (InvalidArgument if bad)."""
    return Descriptor(
        media_type=message.media_type,
        digest=message.digest,
        size=message.size,
        annotations=dict(message.annotations),
    )


class ImagesService:
    """The images service plugin; ``store`` is its :class:`ImageStore` (usable in-process)."""

    def __init__(self, store: ImageStore, events: Any, gc: Any) -> None:
        self.store = store
        self._events = events
        self._gc = gc

    @hookimpl
    def containerkit_gc_kinds(self) -> list[Any]:
        """The GC's view of images: every image is a root referencing its target (see :mod:`core.gc`)."""
        from core.metadata.images import ImageKind

        return [ImageKind(self.store)]

    def register(self, server: Server) -> None:
        from google.protobuf import empty_pb2

        from core.api.containerd.events import image_pb2 as events_pb
        from core.api.containerd.services.images.v1 import images_pb2 as pb
        from core.api.containerd.services.images.v1 import images_pb2_grpc as pb_grpc

        service, store, events = self, self.store, self._events

        class Servicer(pb_grpc.ImagesServicer):
            def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
                return pb.GetImageResponse(image=image_pb(store.get(namespace_of(context), request.name)))

            def List(self, request: Any, context: grpc.ServicerContext) -> Any:
                images = store.list(namespace_of(context), list(request.filters))
                return pb.ListImagesResponse(images=[image_pb(image) for image in images])

            def Create(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                created = store.create(namespace, service._image_of(namespace, request.image, ()))
                events.publish(
                    namespace, "/images/create", events_pb.ImageCreate(name=created.name, labels=dict(created.labels))
                )
                return pb.CreateImageResponse(image=image_pb(created))

            def Update(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                paths = mask_paths(request)
                updated = store.update(namespace, service._image_of(namespace, request.image, paths), paths)
                events.publish(
                    namespace, "/images/update", events_pb.ImageUpdate(name=updated.name, labels=dict(updated.labels))
                )
                return pb.UpdateImageResponse(image=image_pb(updated))

            def Delete(self, request: Any, context: grpc.ServicerContext) -> Any:
                namespace = namespace_of(context)
                store.delete(namespace, request.name)
                events.publish(namespace, "/images/delete", events_pb.ImageDelete(name=request.name))
                if request.sync:
                    service._gc.collect_now()
                else:
                    service._gc.schedule()
                return empty_pb2.Empty()

        pb_grpc.add_ImagesServicer_to_server(Servicer(), server)
        server.answer_inline(method_paths(pb, "Images", ["Get"]))

    def _image_of(self, namespace: str, message: Any, paths: list[str]) -> Image:
        """The :class:`Image` a Create/Update request describes.

        An update whose mask does not touch the target may omit it: the stored one is used then.
        """
        from core.metadata.images import Image

        if not message.name:
            raise InvalidArgument("Image.Name: empty: an image needs a name")
        target = message.target
        touches_target = not paths or any(p == "target" or p.startswith("target.") for p in paths)
        if not target.digest and not touches_target:
            current = self.store.get(namespace, message.name)  # NotFound for an unknown image, as containerd
            stored = current.target  # keep the request's annotations: "annotations.<key>" paths read them
            kept = Descriptor(stored.media_type, stored.digest, stored.size, dict(target.annotations))
            return Image(name=message.name, target=kept, labels=dict(message.labels))
        return Image(
            name=message.name,
            target=descriptor_of(target),
            labels=dict(message.labels),
            created_at=datetime_of(message.created_at),
            updated_at=datetime_of(message.updated_at),
        )


def _init(context: InitContext) -> ImagesService:
    from core.metadata.images import ImageStore

    return ImagesService(ImageStore(context.metadata), context.events, context.get("gc"))


plugin = Registration(init=_init, requires=("gc",))
