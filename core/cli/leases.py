"""ckctl leases create|ls|rm, as ``ctr leases``: a lease keeps what it holds from garbage collection
until it is removed or expires (label ``containerd.io/gc.expire``)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from core.cli.args import add_listing_arguments, for_each, parse_duration, parse_labels
from core.cli.client import Client
from core.cli.records import labels_cell, print_records, timestamp_text, when

DEFAULT_EXPIRY = "24h"  # as ctr

LEASE_COLUMNS = {
    "ID": lambda lease: lease["id"],
    "CREATED AT": lambda lease: when(lease["created_at"]),
    "LABELS": labels_cell,
}


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("leases", aliases=["lease"], help="manage leases")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    create = verbs.add_parser("create", help="create a lease and print its id")
    create.add_argument("labels", nargs="*", metavar="KEY=VALUE", help="labels of the lease")
    create.add_argument("--id", default="", help="the lease's id (default: a generated one)")
    create.add_argument(
        "--expires",
        "-x",
        default=DEFAULT_EXPIRY,
        metavar="DURATION",
        help="expire after this long, e.g. 30m or 1h30m; 0 never expires (default %(default)s, as ctr)",
    )
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeat)")
    create.set_defaults(handler=create_lease)

    ls = verbs.add_parser("ls", aliases=["list"], help="list leases (ID CREATED AT LABELS)")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="containerd filters, e.g. id==build")
    add_listing_arguments(ls, "print ids only")
    ls.set_defaults(handler=list_leases)

    rm = verbs.add_parser("rm", aliases=["remove", "delete", "del"], help="remove leases")
    rm.add_argument("ids", nargs="+", metavar="ID")
    rm.add_argument("--sync", action="store_true", help="collect garbage before returning")
    rm.set_defaults(handler=remove_leases)


def service_stub(client: Client) -> Any:
    from core.api.containerd.services.leases.v1 import leases_pb2

    return client.stub(leases_pb2, "Leases")


def lease_record(lease: Any) -> dict[str, Any]:
    """A ``leases.v1.Lease`` as the record ``ls --json`` prints."""
    return {"id": lease.id, "created_at": timestamp_text(lease.created_at), "labels": dict(lease.labels)}


def expiry_label(duration: str, now: datetime | None = None) -> dict[str, str]:
    """The ``containerd.io/gc.expire`` label for a lease that expires after ``duration`` (none for 0)."""
    from core.metadata.leases import LABEL_GC_EXPIRE  # deferred: the metadata package is slow to import

    delta = parse_duration(duration)
    if not delta:
        return {}
    expires = (now or datetime.now(UTC)) + delta
    return {LABEL_GC_EXPIRE: expires.strftime("%Y-%m-%dT%H:%M:%SZ")}


def create_lease(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.leases.v1 import leases_pb2 as pb

    # An explicit containerd.io/gc.expire label wins over --expires.
    labels = {**expiry_label(args.expires), **parse_labels([*args.labels, *args.label])}
    response = client.call(service_stub(client).Create, pb.CreateRequest(id=args.id, labels=labels))
    print(response.lease.id)
    return 0


def list_leases(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.leases.v1 import leases_pb2 as pb

    response = client.call(service_stub(client).List, pb.ListRequest(filters=args.filters))
    print_records([lease_record(lease) for lease in response.leases], LEASE_COLUMNS, args, key="id")
    return 0


def remove_leases(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.leases.v1 import leases_pb2 as pb

    stub = service_stub(client)

    def remove(lease_id: str) -> None:
        client.call(stub.Delete, pb.DeleteRequest(id=lease_id, sync=args.sync))

    for_each(args.ids, remove)
    return 0
