"""Helpers for network tests: netns the tests own, unique subnets and names, real traffic with busybox.

Traffic stays on this machine: every address is in a subnet of 10.240.0.0/12 picked at random per
test, between netns the tests create (named ``hnet-...``, never ``ck-...``, so no daemon's garbage
collection takes them) and the host's bridges. ``ip netns exec`` and busybox (busybox-static) are
used by tests only; the drivers under test never shell out.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from core.netns import NETNS_DIR, create_netns, delete_netns

BUSYBOX = "/usr/bin/busybox"
TEST_SUPERNET = ipaddress.IPv4Network("10.240.0.0/12")
NETNS_TEST_PREFIX = "hnet-"


def unique(prefix: str) -> str:
    """``prefix`` and 8 random hex digits: a name no other run uses."""
    return f"{prefix}{secrets.token_hex(4)}"


def random_subnet(prefixlen: int = 24) -> str:
    """A random subnet of :data:`TEST_SUPERNET` with ``prefixlen``."""
    index = secrets.randbelow(1 << (prefixlen - TEST_SUPERNET.prefixlen))
    start = int(TEST_SUPERNET.network_address) + (index << (TEST_SUPERNET.max_prefixlen - prefixlen))
    return str(ipaddress.IPv4Network((start, prefixlen)))


def host_forwards() -> bool:
    """Whether the host forwards IPv4 (then networks are routed to each other, as any host routes)."""
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        return f.read().strip() != "0"


def run(*argv: str, timeout: float = 10.0, check: bool = True, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run ``argv``; with ``check`` assert it succeeded, showing its output otherwise."""
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
    return result


def in_netns(netns: str | None, *argv: str) -> list[str]:
    """``argv`` to run in the netns named ``netns`` (``None``: the host's)."""
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def ping(netns: str | None, address: str, attempts: int = 3) -> bool:
    """Whether a ping from ``netns`` to ``address`` gets an answer within a second, in up to ``attempts``
    tries: a new bridge port forwards once the kernel's link watch has seen its carrier, which may take
    up to a second on a busy host. Expecting no answer, one attempt is enough."""
    command = in_netns(netns, BUSYBOX, "ping", "-c1", "-W1", address)
    return any(run(*command, check=False).returncode == 0 for _ in range(attempts))


def nc_roundtrip(server: str | None, client: str | None, address: str, port: int, attempts: int = 50) -> str:
    """Run an echo server (``nc -ll -p port -e cat``, listening again after each connection) in ``server``,
    send a line to ``address:port`` from ``client`` and return the line that came back (``""`` when no
    connection was made in ``attempts`` tries)."""
    message = unique("hello-")
    listener = subprocess.Popen(in_netns(server, BUSYBOX, "nc", "-ll", "-p", str(port), "-e", "/bin/cat"))
    try:
        for _ in range(attempts):
            sent = run(*in_netns(client, BUSYBOX, "nc", "-w", "2", address, str(port)), check=False, stdin=message)
            if sent.returncode == 0 and sent.stdout:
                return sent.stdout.strip()
            time.sleep(0.05)
        return ""
    finally:
        listener.kill()
        listener.wait()


def ip_lines(netns: str | None, *args: str) -> str:
    """``ip -o ARGS`` in ``netns``, its output."""
    return run(*in_netns(netns, "ip", "-o", *args)).stdout


def host_links() -> set[str]:
    """The names of the host's network interfaces (``ip -o link``)."""
    return {line.split(":")[1].strip().split("@")[0] for line in ip_lines(None, "link").splitlines()}


def made_netns() -> set[str]:
    """The names of the netns tests made (``ip netns``, :data:`NETNS_TEST_PREFIX`)."""
    names = run("ip", "netns").stdout.split()
    return {name for name in names if name.startswith(NETNS_TEST_PREFIX)}


class NetnsPool:
    """Named netns made on demand (``new()`` returns the name; the file is ``path(name)``), all deleted
    by :meth:`close`."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def new(self) -> str:
        name = unique(NETNS_TEST_PREFIX)
        create_netns(name)
        self.names.append(name)
        return name

    @staticmethod
    def path(name: str) -> str:
        return os.fspath(NETNS_DIR / name)

    def remove(self, name: str) -> None:
        """Delete one netns of the pool now."""
        delete_netns(name)
        self.names.remove(name)

    def close(self) -> None:
        for name in list(self.names):
            self.remove(name)


@contextmanager
def netns_pool() -> Iterator[NetnsPool]:
    """A :class:`NetnsPool` whose netns are deleted afterwards, whatever happens."""
    pool = NetnsPool()
    try:
        yield pool
    finally:
        pool.close()
