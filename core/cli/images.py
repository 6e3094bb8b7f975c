"""ckctl images ls|rm|label|tag|inspect, as ``ctr images``: the namespace's image records (a name
pointing at a target descriptor). Pulling, pushing, export and import come with the distribution work."""

from __future__ import annotations

import argparse
import json
from typing import Any

from core.cli.args import add_listing_arguments, for_each, label_changes
from core.cli.client import Client
from core.cli.output import print_json
from core.cli.records import human_size, labels_cell, labels_text, print_records, timestamp_text

IMAGE_COLUMNS = {
    "REF": lambda image: image["name"],
    "TYPE": lambda image: image["target"]["media_type"],
    "DIGEST": lambda image: image["target"]["digest"],
    "SIZE": lambda image: human_size(image["target"]["size"]),
    "LABELS": labels_cell,
}


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("images", aliases=["image", "i"], help="manage images")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    ls = verbs.add_parser("ls", aliases=["list"], help="list images (REF TYPE DIGEST SIZE LABELS)")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="containerd filters, e.g. name~=alpine")
    add_listing_arguments(ls, "print names only")
    ls.set_defaults(handler=list_images)

    rm = verbs.add_parser("rm", aliases=["remove", "delete", "del"], help="remove images")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("--sync", action="store_true", help="collect garbage before returning")
    rm.set_defaults(handler=remove_images)

    label = verbs.add_parser("label", help="set labels of an image (an empty value clears one)")
    label.add_argument("name")
    label.add_argument("labels", nargs="+", metavar="KEY=VALUE")
    label.set_defaults(handler=label_image)

    tag = verbs.add_parser("tag", help="name SOURCE's target (and labels) again as each TARGET")
    tag.add_argument("source")
    tag.add_argument("targets", nargs="+", metavar="TARGET")
    tag.add_argument("--force", action="store_true", help="replace a TARGET that exists")
    tag.set_defaults(handler=tag_image)

    inspect = verbs.add_parser("inspect", help="print an image record as JSON")
    inspect.add_argument("name")
    inspect.set_defaults(handler=inspect_image)


def _stub(client: Client) -> Any:
    from core.api.containerd.services.images.v1 import images_pb2_grpc

    return images_pb2_grpc.ImagesStub(client.channel)


def image_record(image: Any) -> dict[str, Any]:
    """An ``images.v1.Image`` as the record ``ls --json`` and ``inspect`` print."""
    target = image.target
    return {
        "name": image.name,
        "target": {
            "media_type": target.media_type,
            "digest": target.digest,
            "size": target.size,
            "annotations": dict(target.annotations),
        },
        "labels": dict(image.labels),
        "created_at": timestamp_text(image.created_at),
        "updated_at": timestamp_text(image.updated_at),
    }


def _get(client: Client, name: str) -> Any:
    from core.api.containerd.services.images.v1 import images_pb2 as pb

    return client.call(_stub(client).Get, pb.GetImageRequest(name=name)).image


def list_images(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.images.v1 import images_pb2 as pb

    response = client.call(_stub(client).List, pb.ListImagesRequest(filters=args.filters))
    print_records([image_record(image) for image in response.images], IMAGE_COLUMNS, args, key="name")
    return 0


def remove_images(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.images.v1 import images_pb2 as pb

    stub = _stub(client)

    def remove(name: str) -> None:
        client.call(stub.Delete, pb.DeleteImageRequest(name=name, sync=args.sync))

    for_each(args.names, remove)
    return 0


def label_image(client: Client, args: argparse.Namespace) -> int:
    from google.protobuf import field_mask_pb2

    from core.api.containerd.services.images.v1 import images_pb2 as pb

    labels, paths = label_changes(args.labels)
    request = pb.UpdateImageRequest(
        image=pb.Image(name=args.name, labels=labels), update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    print(labels_text(client.call(_stub(client).Update, request).image.labels))
    return 0


def tag_image(client: Client, args: argparse.Namespace) -> int:
    from google.protobuf import field_mask_pb2

    from core.api.containerd.services.images.v1 import images_pb2 as pb

    stub = _stub(client)
    source = _get(client, args.source)

    def tag(name: str) -> None:
        image = pb.Image(name=name, target=source.target, labels=source.labels)
        if args.force and _exists(client, name):
            mask = field_mask_pb2.FieldMask(paths=["target", "labels"])
            client.call(stub.Update, pb.UpdateImageRequest(image=image, update_mask=mask))
        else:
            client.call(stub.Create, pb.CreateImageRequest(image=image))

    for_each(args.targets, tag)
    return 0


def _exists(client: Client, name: str) -> bool:
    from core.api.containerd.services.images.v1 import images_pb2 as pb

    # A filter, not Get: a missing image is an answer here, not an error.
    request = pb.ListImagesRequest(filters=[f"name=={json.dumps(name)}"])
    return bool(client.call(_stub(client).List, request).images)


def inspect_image(client: Client, args: argparse.Namespace) -> int:
    print_json(image_record(_get(client, args.name)))
    return 0
