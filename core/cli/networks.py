"""ckctl networks: networks of the namespace (create|ls|inspect|rm), containers on them
(connect|disconnect|attachments) and the interfaces inside a container's network namespace
(interfaces|set-mtu|link|addr|routes|route), through containerkit.services.networks.v1."""

from __future__ import annotations

import argparse
from typing import Any

from core.cli.args import add_listing_arguments, for_each, parse_labels
from core.cli.client import Client
from core.cli.output import print_json
from core.cli.records import labels_cell, print_records, when

NETWORK_COLUMNS = {
    "NAME": lambda n: n["name"],
    "DRIVER": lambda n: n["driver"],
    "SUBNET": lambda n: n["subnet"],
    "GATEWAY": lambda n: n["gateway"],
    "MTU": lambda n: n["mtu"],
    "CREATED AT": lambda n: when(n["created_at"]),
    "LABELS": labels_cell,
}
ATTACHMENT_COLUMNS = {
    "NETWORK": lambda a: a["network"],
    "CONTAINER": lambda a: a["container_id"],
    "IFNAME": lambda a: a["ifname"],
    "ADDRESSES": lambda a: ",".join(a["addresses"]) or "-",
    "HOST IFNAME": lambda a: a["host_ifname"] or "-",
    "MAC": lambda a: a["mac"] or "-",
}
INTERFACE_COLUMNS = {
    "NAME": lambda i: i["name"],
    "KIND": lambda i: i["kind"] or "-",
    "STATE": lambda i: "up" if i["up"] else "down",
    "MTU": lambda i: i["mtu"],
    "MAC": lambda i: i["mac"] or "-",
    "ADDRESSES": lambda i: ",".join(i["addresses"]) or "-",
}
ROUTE_COLUMNS = {
    "DESTINATION": lambda r: r["destination"],
    "GATEWAY": lambda r: r["gateway"] or "-",
    "IFNAME": lambda r: r["ifname"] or "-",
    "METRIC": lambda r: r["metric"],
}


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("networks", aliases=["network", "net"], help="manage networks and interfaces")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    create = verbs.add_parser("create", help="create a network")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--subnet", required=True, metavar="CIDR", help="the network's subnet, e.g. 10.240.3.0/24")
    create.add_argument("--gateway", default="", metavar="IP", help="the gateway (default: the first address)")
    create.add_argument("--mtu", type=int, default=0, help="the MTU (default: the driver's)")
    create.add_argument("--driver", default="", help="the network driver plugin (default: the daemon's)")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeat)")
    create.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a driver option (repeat)")
    create.set_defaults(handler=create_network)

    ls = verbs.add_parser("ls", aliases=["list"], help="list networks")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="containerd filters, e.g. driver==bridge")
    add_listing_arguments(ls, "print names only")
    ls.set_defaults(handler=list_networks)

    inspect = verbs.add_parser("inspect", help="print a network and its attachments as JSON")
    inspect.add_argument("name", metavar="NAME")
    inspect.set_defaults(handler=inspect_network)

    rm = verbs.add_parser("rm", aliases=["remove", "delete", "del"], help="remove networks")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("-f", "--force", action="store_true", help="disconnect attached containers first")
    rm.set_defaults(handler=remove_networks)

    connect = verbs.add_parser("connect", help="attach a container (with a network namespace) to a network")
    connect.add_argument("name", metavar="NAME")
    connect.add_argument("container", metavar="CONTAINER")
    connect.add_argument("--ip", default="", metavar="ADDRESS", help="a fixed address (default: the driver picks)")
    connect.add_argument("--ifname", default="", help="the interface name (default: the next free ethN)")
    connect.set_defaults(handler=connect_container)

    disconnect = verbs.add_parser("disconnect", help="detach a container from a network")
    disconnect.add_argument("name", metavar="NAME")
    disconnect.add_argument("container", metavar="CONTAINER")
    disconnect.set_defaults(handler=disconnect_container)

    attachments = verbs.add_parser("attachments", help="list the containers attached to networks")
    attachments.add_argument("name", nargs="?", default="", metavar="NAME", help="only this network's")
    attachments.add_argument("--container", default="", help="only this container's")
    add_listing_arguments(attachments, "print container ids only")
    attachments.set_defaults(handler=list_attachments)

    interfaces = verbs.add_parser("interfaces", help="list the interfaces in a container's network namespace")
    interfaces.add_argument("container", metavar="CONTAINER")
    add_listing_arguments(interfaces, "print interface names only")
    interfaces.set_defaults(handler=list_interfaces)

    set_mtu = verbs.add_parser("set-mtu", help="set an interface's MTU")
    set_mtu.add_argument("container", metavar="CONTAINER")
    set_mtu.add_argument("ifname", metavar="IFNAME")
    set_mtu.add_argument("mtu", type=int, metavar="MTU")
    set_mtu.set_defaults(handler=set_interface_mtu)

    link = verbs.add_parser("link", help="bring an interface up or down")
    link.add_argument("container", metavar="CONTAINER")
    link.add_argument("ifname", metavar="IFNAME")
    link.add_argument("state", choices=("up", "down"))
    link.set_defaults(handler=set_link_state)

    addr = verbs.add_parser("addr", help="add or remove an interface address")
    addr.add_argument("action", choices=("add", "rm"))
    addr.add_argument("container", metavar="CONTAINER")
    addr.add_argument("ifname", metavar="IFNAME")
    addr.add_argument("cidr", metavar="CIDR")
    addr.set_defaults(handler=change_address)

    routes = verbs.add_parser("routes", help="list the routes in a container's network namespace")
    routes.add_argument("container", metavar="CONTAINER")
    add_listing_arguments(routes, "print destinations only")
    routes.set_defaults(handler=list_routes)

    route = verbs.add_parser("route", help="add or remove a route")
    route.add_argument("action", choices=("add", "rm"))
    route.add_argument("container", metavar="CONTAINER")
    route.add_argument("destination", metavar="DEST", help="CIDR or default")
    route.add_argument("--via", default="", metavar="GATEWAY", help="the gateway (default: on-link)")
    route.add_argument("--dev", default="", metavar="IFNAME", help="the interface")
    route.add_argument("--metric", type=int, default=0)
    route.set_defaults(handler=change_route)


def service_stub(client: Client) -> Any:
    from core.api.containerkit.services.networks.v1 import networks_pb2

    return client.stub(networks_pb2, "Networks")


def _pb() -> Any:
    from core.api.containerkit.services.networks.v1 import networks_pb2

    return networks_pb2


def record(message: Any) -> dict[str, Any]:
    """A message of the service (network, attachment, interface, route) as the JSON record ckctl prints:
    every field, by its proto name."""
    from google.protobuf import json_format

    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def create_network(client: Client, args: argparse.Namespace) -> int:
    pb = _pb()
    request = pb.CreateNetworkRequest(
        name=args.name,
        subnet=args.subnet,
        gateway=args.gateway,
        mtu=args.mtu,
        driver=args.driver,
        labels=parse_labels(args.label),
        options=parse_labels(args.option),
    )
    print(client.call(service_stub(client).Create, request).network.name)
    return 0


def list_networks(client: Client, args: argparse.Namespace) -> int:
    response = client.call(service_stub(client).List, _pb().ListNetworksRequest(filters=args.filters))
    print_records([record(n) for n in response.networks], NETWORK_COLUMNS, args, key="name")
    return 0


def inspect_network(client: Client, args: argparse.Namespace) -> int:
    pb, stub = _pb(), service_stub(client)
    network = record(client.call(stub.Get, pb.GetNetworkRequest(name=args.name)).network)
    attached = client.call(stub.ListAttachments, pb.ListAttachmentsRequest(network=args.name)).attachments
    print_json({**network, "attachments": [record(a) for a in attached]})
    return 0


def remove_networks(client: Client, args: argparse.Namespace) -> int:
    pb, stub = _pb(), service_stub(client)

    def remove(name: str) -> None:
        client.call(stub.Delete, pb.DeleteNetworkRequest(name=name, force=args.force))

    for_each(args.names, remove)
    return 0


def connect_container(client: Client, args: argparse.Namespace) -> int:
    request = _pb().AttachRequest(network=args.name, container_id=args.container, address=args.ip, ifname=args.ifname)
    attachment = client.call(service_stub(client).Attach, request).attachment
    print(f"{attachment.ifname} {','.join(attachment.addresses)}")
    return 0


def disconnect_container(client: Client, args: argparse.Namespace) -> int:
    client.call(service_stub(client).Detach, _pb().DetachRequest(network=args.name, container_id=args.container))
    return 0


def list_attachments(client: Client, args: argparse.Namespace) -> int:
    request = _pb().ListAttachmentsRequest(network=args.name, container_id=args.container)
    found = client.call(service_stub(client).ListAttachments, request).attachments
    print_records([record(a) for a in found], ATTACHMENT_COLUMNS, args, key="container_id")
    return 0


def list_interfaces(client: Client, args: argparse.Namespace) -> int:
    found = client.call(service_stub(client).Interfaces, _pb().InterfacesRequest(container_id=args.container))
    print_records([record(i) for i in found.interfaces], INTERFACE_COLUMNS, args, key="name")
    return 0


def set_interface_mtu(client: Client, args: argparse.Namespace) -> int:
    request = _pb().SetMTURequest(container_id=args.container, ifname=args.ifname, mtu=args.mtu)
    client.call(service_stub(client).SetMTU, request)
    return 0


def set_link_state(client: Client, args: argparse.Namespace) -> int:
    request = _pb().SetLinkStateRequest(container_id=args.container, ifname=args.ifname, up=args.state == "up")
    client.call(service_stub(client).SetLinkState, request)
    return 0


def change_address(client: Client, args: argparse.Namespace) -> int:
    stub = service_stub(client)
    request = _pb().AddressRequest(container_id=args.container, ifname=args.ifname, address=args.cidr)
    client.call(stub.AddAddress if args.action == "add" else stub.RemoveAddress, request)
    return 0


def list_routes(client: Client, args: argparse.Namespace) -> int:
    found = client.call(service_stub(client).Routes, _pb().RoutesRequest(container_id=args.container))
    print_records([record(r) for r in found.routes], ROUTE_COLUMNS, args, key="destination")
    return 0


def change_route(client: Client, args: argparse.Namespace) -> int:
    pb, stub = _pb(), service_stub(client)
    route = pb.Route(destination=args.destination, gateway=args.via, ifname=args.dev, metric=args.metric)
    request = pb.RouteRequest(container_id=args.container, route=route)
    client.call(stub.AddRoute if args.action == "add" else stub.RemoveRoute, request)
    return 0
