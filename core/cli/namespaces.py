"""ckctl namespaces create|ls|rm|label, as ``ctr namespaces``."""

from __future__ import annotations

import argparse
from typing import Any

from core.cli.args import for_each, parse_labels
from core.cli.client import Client
from core.cli.output import print_listing


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("namespaces", aliases=["namespace", "ns"], help="manage namespaces")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    create = verbs.add_parser("create", aliases=["c"], help="create a namespace")
    create.add_argument("name")
    create.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    create.set_defaults(handler=create_namespace)

    ls = verbs.add_parser("ls", aliases=["list"], help="list namespaces")
    ls.add_argument("filters", nargs="*", help="containerd filters, e.g. labels.team==infra")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.add_argument("-q", "--quiet", action="store_true", help="print names only")
    ls.set_defaults(handler=list_namespaces)

    rm = verbs.add_parser("rm", aliases=["remove"], help="remove empty namespaces")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(handler=remove_namespaces)

    label = verbs.add_parser("label", help="set labels (an empty value clears one)")
    label.add_argument("name")
    label.add_argument("labels", nargs="+", metavar="KEY=VALUE")
    label.set_defaults(handler=label_namespace)


def service_stub(client: Client) -> Any:
    from core.api.containerd.services.namespaces.v1 import namespace_pb2

    return client.stub(namespace_pb2, "Namespaces")


def create_namespace(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.namespaces.v1 import namespace_pb2 as pb

    namespace = pb.Namespace(name=args.name, labels=parse_labels(args.labels))
    client.call(service_stub(client).Create, pb.CreateNamespaceRequest(namespace=namespace))
    return 0


def list_namespaces(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.namespaces.v1 import namespace_pb2 as pb

    stub = service_stub(client)
    items: list[dict[str, Any]] = []
    for filter_ in args.filters or [""]:
        response = client.call(stub.List, pb.ListNamespacesRequest(filter=filter_))
        items.extend({"name": ns.name, "labels": dict(ns.labels)} for ns in response.namespaces)
    unique = {item["name"]: item for item in items}
    print_listing(
        sorted(unique.values(), key=lambda i: i["name"]),
        ("name", "labels"),
        as_json=args.json,
        quiet=args.quiet,
        key="name",
    )
    return 0


def remove_namespaces(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.namespaces.v1 import namespace_pb2 as pb

    stub = service_stub(client)
    for_each(args.names, lambda name: client.call(stub.Delete, pb.DeleteNamespaceRequest(name=name)))
    return 0


def label_namespace(client: Client, args: argparse.Namespace) -> int:
    from google.protobuf import field_mask_pb2

    from core.api.containerd.services.namespaces.v1 import namespace_pb2 as pb

    labels = parse_labels(args.labels)
    namespace = pb.Namespace(name=args.name, labels={k: v for k, v in labels.items() if v})
    mask = field_mask_pb2.FieldMask(paths=[f"labels.{key}" for key in labels])
    client.call(service_stub(client).Update, pb.UpdateNamespaceRequest(namespace=namespace, update_mask=mask))
    return 0
