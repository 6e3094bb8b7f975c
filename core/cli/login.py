"""ckctl login|logout: registry credentials, checked by the daemon against the registry and kept in this
client's docker ``config.json`` (``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``), from where
``ckctl images pull|push`` send them when no ``--user`` is given."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import getpass
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.cli.client import Client, CliError
from core.errors import ContainerkitError


def add_commands(commands: Any) -> None:
    login = commands.add_parser("login", help="check credentials against a registry and store them")
    login.add_argument("--user", "-u", default="", help="user name (prompted for on a terminal when omitted)")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    login.add_argument("--plain-http", action="store_true", help="talk plain HTTP to the registry")
    login.add_argument("host", metavar="HOST", help="registry host[:port]")
    login.set_defaults(handler=log_in)

    logout = commands.add_parser("logout", help="forget the stored credentials of a registry")
    logout.add_argument("host", metavar="HOST", help="registry host[:port]")
    logout.set_defaults(handler=log_out)


@contextlib.contextmanager
def local_errors() -> Iterator[None]:
    """Errors of the distribution library run here (a bad reference, a malformed config.json) as CliError."""
    try:
        yield
    except ContainerkitError as err:
        raise CliError(str(err)) from None


def user_credentials(user: str, password_stdin: bool = False) -> tuple[str, str]:
    """``USER[:PASS]`` as (user, password). A ``:PASS`` is hidden from ``ps`` at once (:func:`hide_from_ps`);
    without it the password is read from stdin (``password_stdin``) or prompted for on a terminal."""
    name, sep, password = user.partition(":")
    if not name:
        raise CliError(f"--user {user!r} has no user name: use USER[:PASS]")
    if sep:
        hide_from_ps(password)
        return name, password
    if password_stdin:
        return name, sys.stdin.readline().rstrip("\r\n")
    return name, prompt_password(f"Password for {name}: ")


def hide_from_ps(password: str) -> None:
    """Overwrite ``password`` with ``*`` in this process's command line, where ``ps`` and /proc/PID/cmdline read
    it: every argument ending in ``:PASSWORD`` (``--user USER:PASS``). Until this runs, ckctl's start-up, the
    password is visible to local users: ``--password-stdin`` never shows it."""
    try:
        # proc(5) fields 48 and 49 (arg_start, arg_end); the split drops "pid (comm" whatever comm holds.
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])
    except (OSError, IndexError, ValueError):
        return
    secret = b":" + os.fsencode(password) + b"\0"
    arguments = ctypes.string_at(start, end - start)
    found = arguments.find(secret)
    while password and found >= 0:
        ctypes.memset(start + found + 1, ord("*"), len(secret) - 2)
        found = arguments.find(secret, found + len(secret))


def prompt_password(prompt: str) -> str:
    """A password typed on the terminal (not echoed); CliError when stdin is not a terminal."""
    if not sys.stdin.isatty():
        raise CliError("no password given and stdin is not a terminal: use USER:PASS or --password-stdin")
    return getpass.getpass(prompt)


def stored_credentials(host: str) -> tuple[str, str]:
    """The (user, password) stored for ``host`` by ``ckctl login``; ("", "") when there are none."""
    from core.distribution.auth import default_docker_config, load_docker_config

    with local_errors():
        found = load_docker_config(default_docker_config()).get(host)
    return (found.username, found.password) if found else ("", "")


def log_in(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerkit.services.transfer.v1 import transfer_pb2 as pb
    from core.cli.images import transfer_stub
    from core.distribution.auth import Credentials, default_docker_config, save_docker_config

    user = args.user
    if not user:
        if not sys.stdin.isatty():
            raise CliError("no user name given and stdin is not a terminal: use --user")
        user = input("Username: ")
    password = sys.stdin.readline().rstrip("\r\n") if args.password_stdin else prompt_password("Password: ")
    request = pb.LoginRequest(host=args.host, username=user, password=password, plain_http=args.plain_http)
    client.call(transfer_stub(client).Login, request)
    with local_errors():
        save_docker_config(default_docker_config(), args.host, Credentials(user, password))
    print("Login Succeeded")
    return 0


def log_out(client: Client, args: argparse.Namespace) -> int:
    from core.distribution.auth import default_docker_config, save_docker_config

    with local_errors():
        save_docker_config(default_docker_config(), args.host, None)
    print(f"Removed login credentials for {args.host}")
    return 0
