"""ckctl volumes create|ls|inspect|rm: named volumes of the namespace (containerkit.services.volumes.v1).

A container mounts one with ``ckctl run --mount type=volume,src=NAME,dst=/path`` (or ``ctr run
--mount``); the volume is created then if it does not exist. ``rm`` is refused while a container
of the namespace mounts the volume.
"""

from __future__ import annotations

import argparse
from typing import Any

from core.cli.args import add_listing_arguments, for_each, parse_labels
from core.cli.client import Client
from core.cli.output import print_json
from core.cli.records import labels_cell, print_records, timestamp_text, when

VOLUME_COLUMNS = {
    "NAME": lambda volume: volume["name"],
    "DRIVER": lambda volume: volume["driver"],
    "CREATED AT": lambda volume: when(volume["created_at"]),
    "CONTAINERS": lambda volume: ",".join(volume["containers"]) or "-",
    "LABELS": labels_cell,
}


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("volumes", aliases=["volume"], help="manage named volumes")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    create = verbs.add_parser("create", help="create a volume and print its name")
    create.add_argument("name")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeat)")
    create.set_defaults(handler=create_volume)

    ls = verbs.add_parser("ls", aliases=["list"], help="list volumes (NAME DRIVER CREATED AT CONTAINERS LABELS)")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="containerd filters, e.g. labels.team==infra")
    add_listing_arguments(ls, "print names only")
    ls.set_defaults(handler=list_volumes)

    inspect = verbs.add_parser("inspect", aliases=["info"], help="print a volume as JSON")
    inspect.add_argument("name")
    inspect.set_defaults(handler=inspect_volume)

    rm = verbs.add_parser("rm", aliases=["remove", "delete", "del"], help="remove volumes and their data")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(handler=remove_volumes)


def service_stub(client: Client) -> Any:
    from core.api.containerkit.services.volumes.v1 import volumes_pb2

    return client.stub(volumes_pb2, "Volumes")


def _pb() -> Any:
    from core.api.containerkit.services.volumes.v1 import volumes_pb2

    return volumes_pb2


def volume_record(volume: Any) -> dict[str, Any]:
    """A ``volumes.v1.Volume`` as ``inspect`` and ``ls --json`` print it."""
    return {
        "name": volume.name,
        "driver": volume.driver,
        "labels": dict(volume.labels),
        "created_at": timestamp_text(volume.created_at),
        "mountpoint": volume.mountpoint,
        "containers": list(volume.containers),
    }


def create_volume(client: Client, args: argparse.Namespace) -> int:
    request = _pb().CreateVolumeRequest(name=args.name, labels=parse_labels(args.label))
    print(client.call(service_stub(client).Create, request).volume.name)
    return 0


def list_volumes(client: Client, args: argparse.Namespace) -> int:
    response = client.call(service_stub(client).List, _pb().ListVolumesRequest(filters=args.filters))
    print_records([volume_record(volume) for volume in response.volumes], VOLUME_COLUMNS, args, key="name")
    return 0


def inspect_volume(client: Client, args: argparse.Namespace) -> int:
    response = client.call(service_stub(client).Get, _pb().GetVolumeRequest(name=args.name))
    print_json(volume_record(response.volume))
    return 0


def remove_volumes(client: Client, args: argparse.Namespace) -> int:
    stub, pb = service_stub(client), _pb()
    for_each(args.names, lambda name: client.call(stub.Remove, pb.RemoveVolumeRequest(name=name)))
    return 0
