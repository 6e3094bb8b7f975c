"""ckctl version: client and server versions and the server's UUID."""

from __future__ import annotations

import argparse
from typing import Any

from core import __version__
from core.cli.client import Client
from core.cli.output import print_json


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("version", help="print the client and server versions")
    parser.add_argument("--json", action="store_true", help="print as JSON")
    parser.set_defaults(handler=run)


def run(client: Client, args: argparse.Namespace) -> int:
    from google.protobuf import empty_pb2

    from core.api.containerd.services.introspection.v1 import introspection_pb2
    from core.api.containerd.services.version.v1 import version_pb2

    server = client.call(client.stub(version_pb2, "Version").Version, empty_pb2.Empty())
    info = client.call(client.stub(introspection_pb2, "Introspection").Server, empty_pb2.Empty())
    result = {
        "client": {"version": __version__},
        "server": {"version": server.version, "revision": server.revision, "uuid": info.uuid},
    }
    if args.json:
        print_json(result)
    else:
        print(f"Client:\n  Version:  {__version__}\n\nServer:\n  Version:  {server.version}")
        print(f"  Revision: {server.revision}\n  UUID:     {info.uuid}")
    return 0
