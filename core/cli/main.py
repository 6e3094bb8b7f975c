"""ckctl's entry point: global options, the command table, and exit codes.

Each command module (``version``, ``plugins``, ``namespaces``, ...) adds its sub-parsers in
``add_commands`` and sets ``handler(client, args) -> int``; this module owns connecting and errors.
"""

from __future__ import annotations

import argparse
import os
import sys

from core.cli import namespaces, plugins, version
from core.cli.client import Client, CliError
from core.config import DEFAULT_ADDRESS

COMMAND_MODULES = (version, plugins, namespaces)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckctl", description="Administer containerkitd (ctr's verbs).")
    parser.add_argument(
        "--address",
        "-a",
        default=os.environ.get("CONTAINERKIT_ADDRESS", DEFAULT_ADDRESS),
        help="daemon socket (env CONTAINERKIT_ADDRESS; default %(default)s)",
    )
    parser.add_argument(
        "--namespace",
        "-n",
        default=os.environ.get("CONTAINERKIT_NAMESPACE") or "default",
        help="namespace to act in (env CONTAINERKIT_NAMESPACE; default %(default)s)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = Client(args.address, args.namespace)
    try:
        return int(args.handler(client, args) or 0)
    except CliError as err:
        print(f"ckctl: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
