"""The images service (containerd.services.images.v1.Images) against a real containerkitd."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from core.api.containerd.services.images.v1 import images_pb2 as pb
from core.api.containerd.services.images.v1 import images_pb2_grpc as pb_grpc
from core.api.containerd.types import descriptor_pb2
from core.digest import Digest

pytestmark = pytest.mark.integration

DEFAULT = [("containerd-namespace", "default")]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


@pytest.fixture
def images(daemon: Any) -> Iterator[pb_grpc.ImagesStub]:
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        yield pb_grpc.ImagesStub(channel)


def target(data: bytes, media_type: str = MANIFEST) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(media_type=media_type, digest=Digest.from_bytes(data), size=len(data))


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_create_get_list_update_delete(images: pb_grpc.ImagesStub) -> None:
    first = pb.Image(name="docker.io/library/a:1", labels={"team": "x"}, target=target(b"a"))
    created = images.Create(pb.CreateImageRequest(image=first), metadata=DEFAULT).image
    assert (created.name, dict(created.labels), created.target) == (first.name, {"team": "x"}, first.target)
    assert created.created_at.seconds > 0 and created.updated_at.seconds > 0
    again = pb.CreateImageRequest(image=first)
    assert code_of(lambda: images.Create(again, metadata=DEFAULT)) == grpc.StatusCode.ALREADY_EXISTS

    second = pb.Image(name="docker.io/library/b:2", target=target(b"b", INDEX))
    images.Create(pb.CreateImageRequest(image=second), metadata=DEFAULT)

    got = images.Get(pb.GetImageRequest(name=first.name), metadata=DEFAULT).image
    assert got == created
    missing = pb.GetImageRequest(name="nope")
    assert code_of(lambda: images.Get(missing, metadata=DEFAULT)) == grpc.StatusCode.NOT_FOUND

    def names(*filters: str) -> list[str]:
        listed = images.List(pb.ListImagesRequest(filters=list(filters)), metadata=DEFAULT).images
        return sorted(image.name for image in listed)

    assert names() == [first.name, second.name]
    assert names("labels.team==x") == [first.name]
    assert names(f"target.mediatype=={INDEX}") == [second.name]
    assert names("name~=b:2$", "labels.team==x") == [first.name, second.name]

    # Update one label (the request may omit the target when the mask does not touch it).
    mask = field_mask_pb2.FieldMask(paths=["labels.env"])
    request = pb.UpdateImageRequest(image=pb.Image(name=first.name, labels={"env": "prod"}), update_mask=mask)
    updated = images.Update(request, metadata=DEFAULT).image
    assert dict(updated.labels) == {"team": "x", "env": "prod"}
    assert updated.target == first.target

    # Without a mask: labels and target are replaced.
    replacement = pb.Image(name=first.name, labels={"only": "this"}, target=target(b"a2"))
    updated = images.Update(pb.UpdateImageRequest(image=replacement), metadata=DEFAULT).image
    assert (dict(updated.labels), updated.target) == ({"only": "this"}, replacement.target)

    images.Delete(pb.DeleteImageRequest(name=first.name), metadata=DEFAULT)
    assert names() == [second.name]
    images.Delete(pb.DeleteImageRequest(name=second.name, sync=True), metadata=DEFAULT)
    assert names() == []
    gone = pb.DeleteImageRequest(name=first.name)
    assert code_of(lambda: images.Delete(gone, metadata=DEFAULT)) == grpc.StatusCode.NOT_FOUND


def test_invalid_images_are_refused(images: pb_grpc.ImagesStub) -> None:
    for image in (
        pb.Image(name="", target=target(b"x")),
        pb.Image(name="no-target"),
        pb.Image(name="bad-digest", target=descriptor_pb2.Descriptor(media_type=MANIFEST, digest="sha256:x")),
    ):
        request = pb.CreateImageRequest(image=image)
        assert code_of(lambda r=request: images.Create(r, metadata=DEFAULT)) == grpc.StatusCode.INVALID_ARGUMENT


def test_images_are_per_namespace(images: pb_grpc.ImagesStub) -> None:
    image = pb.Image(name="shared-name", target=target(b"s"))
    images.Create(pb.CreateImageRequest(image=image), metadata=[("containerd-namespace", "team-a")])
    other = [("containerd-namespace", "team-b")]
    assert images.List(pb.ListImagesRequest(), metadata=other).images == []
    assert code_of(lambda: images.Get(pb.GetImageRequest(name="shared-name"), metadata=other)) == (
        grpc.StatusCode.NOT_FOUND
    )
    images.Create(pb.CreateImageRequest(image=image), metadata=other)  # the same name is free there
