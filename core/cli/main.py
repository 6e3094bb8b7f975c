"""ckctl's entry point: global options, the command table, and exit codes.

Each command module (``version``, ``plugins``, ``namespaces``, ...) adds its sub-parsers in
``add_commands`` and sets ``handler(client, args) -> int``; this module owns connecting and errors.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from core.cli.client import Client, CliError
from core.endpoint import DEFAULT_ADDRESS

COMMANDS: dict[str, tuple[str, ...]] = {
    "version": ("version",),
    "plugins": ("plugins",),
    "namespaces": ("namespaces", "namespace", "ns"),
    "content": ("content",),
    "images": ("images", "image", "i"),
    "login": ("login", "logout"),
    "leases": ("leases", "lease"),
    "snapshots": ("snapshots", "snapshot"),
    "containers": ("containers", "container", "c"),
    "tasks": ("tasks", "task", "t"),
    "run": ("run",),
    "networks": ("networks", "network", "net"),
    "volumes": ("volumes", "volume"),
    "events": ("events", "event"),
}
"""Each command module of :mod:`core.cli` (in help order) and the command names (aliases included) its
``add_commands`` registers. Only the module a command line names is imported: a ckctl call does not pay
for every other command's imports."""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """ckctl's parser: with ``argv``, only the command it names (every command when it names none)."""
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
    for module in _command_modules(argv):
        importlib.import_module(f"core.cli.{module}").add_commands(commands)
    return parser


def _command_modules(argv: Sequence[str] | None) -> list[str]:
    """The module the command line's command belongs to, or every module (no argv, or no known command)."""
    if argv is not None:
        globals_only = argparse.ArgumentParser(add_help=False)
        globals_only.add_argument("--address", "-a")
        globals_only.add_argument("--namespace", "-n")
        _, rest = globals_only.parse_known_args(argv)
        if rest and not rest[0].startswith("-"):
            for module, names in COMMANDS.items():
                if rest[0] in names:
                    return [module]
    return list(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
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


def run() -> NoReturn:
    """The ``ckctl`` command: :func:`main`, then exit at once: nothing is left to clean up by then, and tearing
    down the interpreter (protobuf's modules, the channel's threads) would only add to a short command's time."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # the reader went away: as main() answers a closed pipe
            code = code or 128 + signal.SIGPIPE
    os._exit(code)


if __name__ == "__main__":
    run()
