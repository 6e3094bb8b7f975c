"""ckctl's entry point: global options, the command table, and exit codes.

Each command module (``version``, ``plugins``, ``namespaces``, ...) adds its sub-parsers in
``add_commands`` and sets ``handler(client, args) -> int``; this module owns connecting and errors.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from core.cli import (
    containers,
    content,
    events,
    images,
    leases,
    login,
    namespaces,
    networks,
    plugins,
    run,
    snapshots,
    tasks,
    version,
    volumes,
)
from core.cli.client import Client, CliError
from core.config import DEFAULT_ADDRESS

COMMAND_MODULES = (
    version,
    plugins,
    namespaces,
    content,
    images,
    login,
    leases,
    snapshots,
    containers,
    tasks,
    run,
    networks,
    volumes,
    events,
)


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
        code = int(args.handler(client, args) or 0)
        sys.stdout.flush()  # so that a closed pipe surfaces here, not at interpreter exit
        return code
    except CliError as err:
        print(f"ckctl: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`ckctl plugins ls --json | head`): exit as a killed-by-SIGPIPE tool would,
        # without a traceback, and keep the interpreter's final flush of stdout from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
