"""Netlink through pyroute2, in the host's or a container's network namespace, and the optional
interface-management half of :class:`core.network.NetworkDriver` built on it.

A netns is given as the path of its file (``/run/netns/NAME``, ``/proc/PID/ns/net``). A netlink
socket belongs to the netns it was created in, so :func:`netns_route` creates its socket after
``setns(2)`` of the calling thread only (and back), which is cheap and leaves every other thread of
the process where it was; :func:`find_index` looks an interface up the same way, with
``if_nametoindex(3)`` (an ioctl) instead of decoding a netlink reply. Usable by any driver whose
containers live in netns files:
:class:`NetnsInterfaces` gives it ``interfaces``, ``set_mtu``... without a device model of its own.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from pyroute2 import IPRoute, NetlinkError
from pyroute2 import netns as pyroute2_netns

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.network import Interface, Route

__all__ = [
    "MAIN_TABLE",
    "MAX_IFNAME",
    "MAX_MTU",
    "MIN_MTU",
    "NetnsInterfaces",
    "check_host_routes",
    "check_ifname",
    "check_mtu",
    "find_index",
    "host_route",
    "index_of",
    "netlink_errors",
    "netns_route",
    "open_netns",
]

MAX_IFNAME = 15
"""Linux's limit on an interface name (IFNAMSIZ - 1)."""
MIN_MTU = 68
"""The smallest MTU IPv4 allows."""
MAX_MTU = 65535
"""The largest MTU of a bridge or veth."""

_NETLINK_ROUTE = 0
MAIN_TABLE = 254
"""The kernel's main routing table."""
_UNICAST = 1
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8

_ERRORS = {
    errno.EEXIST: AlreadyExists,
    errno.ENODEV: NotFound,
    errno.ENOENT: NotFound,
    errno.ESRCH: NotFound,
    errno.EADDRNOTAVAIL: NotFound,
    errno.EINVAL: InvalidArgument,
    errno.ERANGE: InvalidArgument,
    errno.ENETUNREACH: FailedPrecondition,
    errno.EHOSTUNREACH: FailedPrecondition,
}


@contextmanager
def netlink_errors(what: str) -> Iterator[None]:
    """Turn a :class:`NetlinkError` into the error of :mod:`core.errors` its errno means (EEXIST:
    AlreadyExists, ENODEV/ESRCH/EADDRNOTAVAIL: NotFound, EINVAL: InvalidArgument, ENETUNREACH:
    FailedPrecondition), anything else into :class:`OSError`; the message starts with ``what``."""
    try:
        yield
    except NetlinkError as exc:
        message = f"{what}: {os.strerror(exc.code)}"
        error = _ERRORS.get(exc.code)
        if error is None:
            raise OSError(exc.code, message) from exc
        raise error(message) from exc


def check_ifname(ifname: str) -> str:
    """Return ``ifname`` if Linux accepts it as an interface name; InvalidArgument otherwise."""
    if (
        not ifname
        or len(ifname.encode()) > MAX_IFNAME
        or ifname in (".", "..")
        or any(c in ifname for c in "/: \t\n\0")
    ):
        raise InvalidArgument(f"invalid interface name {ifname!r}: 1 to {MAX_IFNAME} characters, no '/', ':' or spaces")
    return ifname


def check_mtu(mtu: int) -> int:
    """Return ``mtu`` if it lies in [:data:`MIN_MTU`, :data:`MAX_MTU`]; InvalidArgument otherwise."""
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not MIN_MTU <= mtu <= MAX_MTU:
        raise InvalidArgument(f"MTU {mtu!r} out of range [{MIN_MTU}, {MAX_MTU}]")
    return mtu


@contextmanager
def open_netns(path: str) -> Iterator[int]:
    """A read-only fd of the netns file at ``path``, closed afterwards; NotFound when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise NotFound(f"netns {path} does not exist") from exc
    try:
        yield fd
    finally:
        os.close(fd)


@contextmanager
def host_route() -> Iterator[IPRoute]:
    """An IPRoute in the calling thread's netns (the host's), closed afterwards."""
    with IPRoute() as ipr:
        yield ipr


@contextmanager
def netns_route(path: str, fd: int | None = None) -> Iterator[IPRoute]:
    """An IPRoute in the netns at ``path`` (or of its already open ``fd``), closed afterwards.

    NotFound when the netns does not exist, InvalidArgument when ``path`` is not a netns file.
    """
    if fd is None:
        with open_netns(path) as opened, netns_route(path, opened) as ipr:
            yield ipr
        return
    with IPRoute(fileno=_socket_in(path, fd)) as ipr:
        yield ipr


@contextmanager
def _entered(path: str, fd: int) -> Iterator[None]:
    """The calling thread in the netns of ``fd`` (the file at ``path``) for the block, then back where it
    was; InvalidArgument when ``fd`` is no netns."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            pyroute2_netns.setns(fd)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise InvalidArgument(f"{path} is not a network namespace") from exc
            raise
        try:
            yield
        finally:
            pyroute2_netns.setns(own)
    finally:
        os.close(own)


def _socket_in(path: str, fd: int) -> int:
    """A netlink route socket (its fd) made in the netns of ``fd``."""
    with _entered(path, fd):
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE).detach()


def check_host_routes(ipr: IPRoute, subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    """FailedPrecondition when a route of the host's main table (the default route aside) overlaps ``subnet``."""
    for route in ipr.get_routes(family=socket.AF_INET if subnet.version == 4 else socket.AF_INET6, table=MAIN_TABLE):
        if route["dst_len"] == 0:
            continue
        destination = ipaddress.ip_network(f"{route.get_attr('RTA_DST')}/{route['dst_len']}", strict=False)
        if destination.overlaps(subnet):
            raise FailedPrecondition(f"subnet {subnet} overlaps the host route to {destination}")


def find_index(ifname: str, netns: tuple[str, int] | None = None) -> int | None:
    """The index of interface ``ifname`` in the calling thread's netns, or in ``netns`` (its path and an
    open fd); None when there is none. An ioctl, not a netlink dump."""
    try:
        if netns is None:
            return socket.if_nametoindex(ifname)
        with _entered(*netns):
            return socket.if_nametoindex(ifname)
    except OSError as exc:
        if exc.errno in (None, errno.ENODEV):  # if_nametoindex's "no interface with this name" has no errno
            return None
        raise


def remove_link(ipr: IPRoute, ifname: str) -> None:
    """Delete the host interface ``ifname``; nothing when there is none."""
    index = find_index(ifname)
    if index is not None:
        with suppress(NotFound), netlink_errors(f"removing {ifname}"):
            ipr.link("del", index=index)


def index_of(ifname: str, netns: tuple[str, int] | None = None) -> int:
    """:func:`find_index`, raising NotFound (naming the netns, or the host) when there is no such interface."""
    index = find_index(ifname, netns)
    if index is None:
        raise NotFound(f"no interface {ifname!r} in {f'netns {netns[0]}' if netns else 'the host'}")
    return index


def _cidr(address: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if "/" not in address:
        raise InvalidArgument(f"address {address!r} must be in CIDR form (ADDRESS/PREFIX)")
    try:
        return ipaddress.ip_interface(address)
    except ValueError as exc:
        raise InvalidArgument(f"invalid address {address!r}: {exc}") from exc


def _route_fields(netns: tuple[str, int], route: Route) -> dict[str, object]:
    """The pyroute2 arguments of ``route``; InvalidArgument for a malformed one, NotFound for its ifname."""
    try:
        gateway = ipaddress.ip_address(route.gateway) if route.gateway else None
        destination = None if route.destination == "default" else ipaddress.ip_network(route.destination, strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"invalid route {route}: {exc}") from exc
    if destination is None and gateway is None and not route.ifname:
        raise InvalidArgument("a default route needs a gateway or an interface")
    family_of = destination or gateway
    family = socket.AF_INET6 if family_of is not None and family_of.version == 6 else socket.AF_INET
    if gateway is not None and destination is not None and gateway.version != destination.version:
        raise InvalidArgument(f"route {route}: gateway and destination are of different IP versions")
    if route.metric < 0:
        raise InvalidArgument(f"route metric {route.metric} is negative")
    fields: dict[str, object] = {"family": family, "table": MAIN_TABLE, "priority": route.metric}
    fields["dst"] = (
        str(destination) if destination is not None else ("::/0" if family == socket.AF_INET6 else "0.0.0.0/0")
    )
    if gateway is not None:
        fields["gateway"] = str(gateway)
    if route.ifname:
        fields["oif"] = index_of(route.ifname, netns)
    return fields


class NetnsInterfaces:
    """The interface-management methods of :class:`core.network.NetworkDriver` (``interfaces``,
    ``set_mtu``, ``set_up``, ``set_down``, ``add_address``, ``remove_address``, ``routes``,
    ``add_route``, ``remove_route``) for any netns file, through netlink; a mixin for drivers.

    Errors as the interface states: NotFound for a missing netns, interface, address or route;
    AlreadyExists for a duplicate; InvalidArgument for malformed input; FailedPrecondition for an
    unreachable gateway.
    """

    def interfaces(self, netns_path: str) -> list[Interface]:
        """The interfaces of the netns, loopback included, by index."""
        with netns_route(netns_path) as ipr, netlink_errors(f"listing interfaces of netns {netns_path}"):
            links = ipr.get_links()
            addresses: dict[int, list[str]] = {}
            for addr in ipr.get_addr():
                cidr = f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}"
                addresses.setdefault(addr["index"], []).append(cidr)
        result = []
        for link in links:
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            result.append(
                Interface(
                    name=link.get_attr("IFLA_IFNAME"),
                    index=link["index"],
                    mac=link.get_attr("IFLA_ADDRESS") or "",
                    mtu=link.get_attr("IFLA_MTU"),
                    up=bool(link["flags"] & _IFF_UP),
                    addresses=tuple(addresses.get(link["index"], ())),
                    kind=kind or ("loopback" if link["flags"] & _IFF_LOOPBACK else ""),
                )
            )
        return sorted(result, key=lambda interface: interface.index)

    def set_mtu(self, netns_path: str, ifname: str, mtu: int) -> None:
        """Set the MTU of ``ifname``; InvalidArgument outside [68, 65535] or above what the device takes."""
        check_mtu(mtu)
        self._set_link(netns_path, ifname, f"setting the MTU of {ifname} to {mtu}", mtu=mtu)

    def set_up(self, netns_path: str, ifname: str) -> None:
        """Bring ``ifname`` up (a no-op when it is)."""
        self._set_link(netns_path, ifname, f"bringing {ifname} up", state="up")

    def set_down(self, netns_path: str, ifname: str) -> None:
        """Bring ``ifname`` down (a no-op when it is)."""
        self._set_link(netns_path, ifname, f"bringing {ifname} down", state="down")

    def add_address(self, netns_path: str, ifname: str, address: str) -> None:
        """Add ``address`` (CIDR) to ``ifname``; AlreadyExists when it has it."""
        self._address("add", netns_path, ifname, address)

    def remove_address(self, netns_path: str, ifname: str, address: str) -> None:
        """Remove ``address`` (CIDR) from ``ifname``; NotFound when it does not have it."""
        self._address("del", netns_path, ifname, address)

    def routes(self, netns_path: str) -> list[Route]:
        """The unicast routes of the main table (IPv4, then IPv6)."""
        result = []
        with netns_route(netns_path) as ipr, netlink_errors(f"listing routes of netns {netns_path}"):
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            for family in (socket.AF_INET, socket.AF_INET6):
                for msg in ipr.get_routes(family=family, table=MAIN_TABLE):
                    if msg["type"] != _UNICAST:
                        continue
                    dst = msg.get_attr("RTA_DST")
                    result.append(
                        Route(
                            destination=f"{dst}/{msg['dst_len']}" if dst else "default",
                            gateway=msg.get_attr("RTA_GATEWAY") or "",
                            ifname=names.get(msg.get_attr("RTA_OIF"), ""),
                            metric=msg.get_attr("RTA_PRIORITY") or 0,
                        )
                    )
        return result

    def add_route(self, netns_path: str, route: Route) -> None:
        """Add ``route`` to the main table; AlreadyExists for the same destination and metric."""
        self._route("add", netns_path, route)

    def remove_route(self, netns_path: str, route: Route) -> None:
        """Remove ``route`` from the main table; NotFound when there is no such route."""
        self._route("del", netns_path, route)

    def _set_link(self, netns_path: str, ifname: str, what: str, **changes: object) -> None:
        with open_netns(netns_path) as fd, netns_route(netns_path, fd) as ipr:
            index = index_of(ifname, (netns_path, fd))
            with netlink_errors(what):
                ipr.link("set", index=index, **changes)

    def _address(self, command: str, netns_path: str, ifname: str, address: str) -> None:
        cidr = _cidr(address)
        with open_netns(netns_path) as fd, netns_route(netns_path, fd) as ipr:
            index = index_of(ifname, (netns_path, fd))
            verb = "adding" if command == "add" else "removing"
            with netlink_errors(f"{verb} {address} on {ifname} in netns {netns_path}"):
                ipr.addr(command, index=index, address=str(cidr.ip), prefixlen=cidr.network.prefixlen)

    def _route(self, command: str, netns_path: str, route: Route) -> None:
        with open_netns(netns_path) as fd, netns_route(netns_path, fd) as ipr:
            fields = _route_fields((netns_path, fd), route)
            verb = "adding" if command == "add" else "removing"
            with netlink_errors(f"{verb} route {route.destination} in netns {netns_path}"):
                ipr.route(command, **fields)
