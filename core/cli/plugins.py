"""ckctl plugins ls: the microkernel's record of every plugin (type, id, package, status, reason)."""

from __future__ import annotations

import argparse
from typing import Any

from core.cli.client import Client
from core.cli.output import print_listing
from core.plugin_types import by_wire_type

# The introspection service marks skipped plugins and exports the package; see core.services.introspection.
SKIP_SUFFIX = ": skip plugin"
PACKAGE_EXPORT = "containerkit.package"
COLUMNS = ("type", "id", "package", "status", "reason")


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("plugins", help="list plugins and their status")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    ls = verbs.add_parser("ls", aliases=["list"], help="one row per plugin")
    ls.add_argument("filters", nargs="*", help="containerd filters, e.g. type==io.containerd.snapshotter.v1")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.add_argument("-q", "--quiet", action="store_true", help="print type.id only")
    ls.set_defaults(handler=list_plugins)


def _short_type(wire_type: str) -> str:
    plugin_type = by_wire_type(wire_type)
    return plugin_type.name if plugin_type else wire_type


def plugin_row(plugin: Any) -> dict[str, Any]:
    """One plugin message as the record ``--json`` prints."""
    exports = dict(plugin.exports)
    status, reason = "ok", ""
    if plugin.HasField("init_err"):
        message = plugin.init_err.message
        status = "skip" if message.endswith(SKIP_SUFFIX) else "error"
        reason = message.removesuffix(SKIP_SUFFIX)
    short = _short_type(plugin.type)
    return {
        "type": short,
        "id": plugin.id,
        "name": f"{short}.{plugin.id}",
        "package": exports.pop(PACKAGE_EXPORT, ""),
        "status": status,
        "reason": reason,
        "requires": list(plugin.requires),
        "capabilities": list(plugin.capabilities),
        "exports": exports,
    }


def list_plugins(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.introspection.v1 import introspection_pb2

    stub = client.stub(introspection_pb2, "Introspection")
    response = client.call(stub.Plugins, introspection_pb2.PluginsRequest(filters=args.filters))
    rows = [plugin_row(p) for p in response.plugins]
    print_listing(rows, COLUMNS, as_json=args.json, quiet=args.quiet, key="name")
    return 0
