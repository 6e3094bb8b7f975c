"""The bridge network driver: a Linux bridge per network, a veth pair per attachment, all through netlink.

Host side: a network is a bridge ``<prefix><10 hex of sha256("<namespace>/<name>")>`` holding the
gateway address (so the host reaches its containers, and the subnet's route is the kernel's connected
route), up, with the network's MTU. An attachment is a veth pair: the host end
``ckv<12 hex of sha256("<namespace>/<network>/<container>")>`` on the bridge, the peer created right
inside the container's netns under its final name (``eth0``...), with the MTU, a MAC derived from its
address (``02:42:`` and the address's four bytes, as Docker does), its address, up, a
default route via the gateway (unless the netns has one already: a container's second network adds
none, and its attachment's ``gateway`` is ``""``), and loopback up. No firewall rules and no host routes are added.
Networks are isolated from each other even on a host that forwards IPv4: every bridge has its own
``net.ipv4.conf.<bridge>.forwarding`` set to 0, so the host never routes what arrives from a container
(it still answers it: the gateway address is the host's own).

State: ``<root>/bridge.db`` (a :class:`core.metadata.MetadataStore` file) records networks,
attachments and the address allocations (:mod:`plugins.net_bridge.allocator`). Every mutation runs
under one lock and one transaction; a failure rolls the records back and removes what it made on the
host, so nothing is half-made. On construction the host is brought in line with the records: missing
bridges are recreated (after a reboot) and recorded veths put back on them, attachments whose veth or netns is
gone are released, veths on our bridges that no record knows (a crash mid-attach) are removed. IPv4 only.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import ipaddress
import json
import os
import sqlite3
import threading
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetlinkError

from core import identifiers
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.metadata import MetadataStore
from core.network import Attachment, Network, NetworkConfig, NetworkDriver
from plugins.net_bridge.allocator import AddressAllocator
from plugins.net_bridge.netlink import (
    MAX_IFNAME,
    NetnsInterfaces,
    check_host_routes,
    check_ifname,
    check_mtu,
    find_index,
    host_route,
    index_of,
    netlink_errors,
    netns_route,
    open_netns,
    remove_link,
)

__all__ = ["DEFAULT_MTU", "MIGRATIONS", "VETH_PREFIX", "BridgeDriver", "bridge_name", "veth_name"]

DEFAULT_MTU = 1500
VETH_PREFIX = "ckv"
"""Host ends of veth pairs: this and 12 hex digits (15 characters, Linux's limit)."""
_BRIDGE_HASH = 10
_MAX_PREFIXLEN = 30  # a gateway and at least one container
_LOOPBACK_INDEX = 1  # "lo" has index 1 in every netns

MIGRATIONS = (
    """
    CREATE TABLE networks (
        namespace TEXT    NOT NULL,
        name      TEXT    NOT NULL,
        subnet    TEXT    NOT NULL,
        gateway   TEXT    NOT NULL,
        mtu       INTEGER NOT NULL,
        device    TEXT    NOT NULL UNIQUE,
        labels    TEXT    NOT NULL,  -- JSON object
        options   TEXT    NOT NULL,  -- JSON object
        PRIMARY KEY (namespace, name)
    );
    CREATE TABLE attachments (
        namespace    TEXT    NOT NULL,
        network      TEXT    NOT NULL,
        container_id TEXT    NOT NULL,
        netns_path   TEXT    NOT NULL,
        ifname       TEXT    NOT NULL,
        host_ifname  TEXT    NOT NULL UNIQUE,
        addresses    TEXT    NOT NULL,  -- JSON list of CIDR strings
        gateway      TEXT    NOT NULL,
        mac          TEXT    NOT NULL,
        mtu          INTEGER NOT NULL,
        PRIMARY KEY (namespace, network, container_id),
        FOREIGN KEY (namespace, network) REFERENCES networks (namespace, name) ON DELETE CASCADE
    );
    """,
)
"""The schema of component ``net_bridge``."""

_NETWORK_COLUMNS = "namespace, name, subnet, gateway, mtu, device, labels, options"
_ATTACHMENT_COLUMNS = "network, container_id, netns_path, ifname, host_ifname, addresses, gateway, mac, mtu"


class BridgeDriver(NetnsInterfaces, NetworkDriver):
    """The ``bridge`` network driver, usable as a library: ``BridgeDriver(Path("/tmp/br"))``.

    ``mtu`` is the default of networks created without one; ``bridge_prefix`` starts every bridge
    name (at most 5 characters, so names fit Linux's 15); ``hairpin`` lets a container reach itself
    through the bridge (hairpin mode on every port). Needs CAP_NET_ADMIN; thread-safe.
    """

    def __init__(
        self, root: Path | str, *, mtu: int = DEFAULT_MTU, bridge_prefix: str = "ck-", hairpin: bool = False
    ) -> None:
        check_mtu(mtu)
        if len(bridge_prefix) + _BRIDGE_HASH > MAX_IFNAME:
            raise InvalidArgument(f"bridge prefix {bridge_prefix!r} is longer than {MAX_IFNAME - _BRIDGE_HASH}")
        check_ifname(bridge_prefix + "0" * _BRIDGE_HASH)
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._mtu = mtu
        self._prefix = bridge_prefix
        self._hairpin = hairpin
        self._lock = threading.RLock()
        self._store = MetadataStore(self.root / "bridge.db")
        try:
            self._store.migrate("net_bridge", MIGRATIONS)
            self._allocator = AddressAllocator(self._store)
            self._restore()
        except BaseException:
            self._store.close()
            raise

    # -- networks ------------------------------------------------------------------------------

    def create(self, config: NetworkConfig) -> Network:
        """Make the bridge with the gateway address; see :meth:`NetworkDriver.create`. The bridge driver
        takes no options; the subnet must be IPv4 with a prefix of at most /30."""
        identifiers.validate(config.namespace, "namespace")
        identifiers.validate(config.name, "network name")
        subnet = _subnet(config.subnet)
        gateway = _gateway(subnet, config.gateway)
        if config.options:
            raise InvalidArgument(
                f"unknown option(s) {', '.join(sorted(config.options))}: the bridge driver takes none"
            )
        network = Network(
            name=config.name,
            namespace=config.namespace,
            subnet=str(subnet),
            gateway=str(gateway),
            mtu=check_mtu(config.mtu or self._mtu),
            device=bridge_name(self._prefix, config.namespace, config.name),
            labels=config.labels,
        )
        with self._lock, self._store.transaction() as conn:
            if _select_network(conn, config.namespace, config.name) is not None:
                raise AlreadyExists(f"network {config.name} exists in namespace {config.namespace}")
            for other in _select_networks(conn):
                if ipaddress.IPv4Network(other.subnet).overlaps(subnet):
                    raise FailedPrecondition(
                        f"subnet {subnet} overlaps {other.subnet} of network {other.name} (namespace {other.namespace})"
                    )
            with host_route() as ipr:
                check_host_routes(ipr, subnet)
                if find_index(network.device) is not None:
                    raise FailedPrecondition(
                        f"device {network.device} exists on the host but is no network of this driver ({self.root})"
                    )
                conn.execute(
                    f"INSERT INTO networks ({_NETWORK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        network.namespace,
                        network.name,
                        network.subnet,
                        network.gateway,
                        network.mtu,
                        network.device,
                        json.dumps(dict(network.labels)),
                        json.dumps(dict(network.options)),
                    ),
                )
                try:
                    _make_bridge(ipr, network)
                except BaseException:
                    remove_link(ipr, network.device)
                    raise
        return network

    def delete(self, network: Network) -> None:
        """Remove the bridge and forget the network; see :meth:`NetworkDriver.delete`."""
        with self._lock, self._store.transaction() as conn, host_route() as ipr:
            record = self._record(conn, network)
            attached = sorted(self._live_attachments(conn, record))
            if attached:
                raise FailedPrecondition(
                    f"network {record.name} has containers attached: {', '.join(attached)}; detach them first"
                )
            conn.execute("DELETE FROM networks WHERE namespace = ? AND name = ?", (record.namespace, record.name))
            self._allocator.drop(conn, _pool(record))
            remove_link(ipr, record.device)

    def networks(self) -> list[Network]:
        """Every network this driver made (their bridges are on the host: :meth:`__init__` restores them)."""
        with self._store.read() as conn:
            return _select_networks(conn)

    # -- attachments ---------------------------------------------------------------------------

    def attach(
        self,
        network: Network,
        container_id: str,
        netns_path: str,
        address: str | None = None,
        ifname: str = "eth0",
    ) -> Attachment:
        """Plumb a veth pair into the netns; see :meth:`NetworkDriver.attach`."""
        identifiers.validate(container_id, "container id")
        check_ifname(ifname)
        with self._lock, self._store.transaction() as conn, open_netns(netns_path) as fd:
            record = self._record(conn, network)
            if _select_attachment(conn, record, container_id) is not None:
                raise AlreadyExists(f"container {container_id} is attached to network {record.name} already")
            subnet = ipaddress.IPv4Network(record.subnet)
            gateway = ipaddress.IPv4Address(record.gateway)
            ip = self._allocator.allocate(
                conn, _pool(record), subnet, container_id, reserved=(gateway,), wanted=_wanted(address, subnet)
            )
            attachment = Attachment(
                network=record.name,
                container_id=container_id,
                netns_path=netns_path,
                ifname=ifname,
                host_ifname=veth_name(record.namespace, record.name, container_id),
                addresses=(f"{ip}/{subnet.prefixlen}",),
                gateway=record.gateway,
                mac=_mac_of(ip),
                mtu=record.mtu,
            )
            attachment = self._plumb(record, attachment, fd)
            conn.execute(
                f"INSERT INTO attachments (namespace, {_ATTACHMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (record.namespace, *_attachment_row(attachment)),
            )
        return attachment

    def detach(self, network: Network, container_id: str, netns_path: str) -> None:
        """Remove the veth pair (its peer goes with it) and release the address; see :meth:`NetworkDriver.detach`."""
        with self._lock, self._store.transaction() as conn:
            record = self._record(conn, network)
            found = _select_attachment(conn, record, container_id)
            host_ifname = found.host_ifname if found else veth_name(record.namespace, record.name, container_id)
            with host_route() as ipr:
                remove_link(ipr, host_ifname)
            self._forget(conn, record, container_id)

    def attachments(self, network: Network) -> list[Attachment]:
        """The containers attached, by id; an attachment whose veth vanished (its netns was destroyed)
        is released on the way."""
        with self._lock, self._store.transaction() as conn:
            record = self._record(conn, network)
            live = self._live_attachments(conn, record)
        return [live[key] for key in sorted(live)]

    # -- life cycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database; networks and attachments stay on the host and in the records."""
        self._store.close()

    # -- internals -----------------------------------------------------------------------------

    def _record(self, conn: sqlite3.Connection, network: Network) -> Network:
        record = _select_network(conn, network.namespace, network.name)
        if record is None:
            raise NotFound(f"network {network.name} does not exist in namespace {network.namespace}")
        return record

    def _forget(self, conn: sqlite3.Connection, record: Network, container_id: str) -> None:
        conn.execute(
            "DELETE FROM attachments WHERE namespace = ? AND network = ? AND container_id = ?",
            (record.namespace, record.name, container_id),
        )
        self._allocator.release(conn, _pool(record), container_id)

    def _live_attachments(self, conn: sqlite3.Connection, record: Network) -> dict[str, Attachment]:
        """The attachments of ``record`` whose host veth exists and whose netns is still there, by container id;
        the others are released. The veth of a netns that is gone is removed now: the kernel removes it too, but
        in its own time (a namespace is torn down asynchronously), so it could still be seen a moment later."""
        live = {}
        for attachment in _select_attachments(conn, record):
            veth = find_index(attachment.host_ifname) is not None
            if veth and os.path.exists(attachment.netns_path):
                live[attachment.container_id] = attachment
                continue
            if veth:
                with host_route() as ipr:
                    remove_link(ipr, attachment.host_ifname)
            self._forget(conn, record, attachment.container_id)
        return live

    def _plumb(self, record: Network, attachment: Attachment, fd: int) -> Attachment:
        """Make the veth pair of ``attachment`` and configure its peer in the netns of ``fd``; return it,
        without gateway when the netns had a default route already. On failure the pair is removed
        again (which removes the peer too)."""
        where = f"netns {attachment.netns_path}"
        with host_route() as host, netns_route(attachment.netns_path, fd) as inner:
            bridge = find_index(record.device)
            if bridge is None:
                raise FailedPrecondition(
                    f"bridge {record.device} of network {record.name} vanished; restart to restore it"
                )
            remove_link(host, attachment.host_ifname)  # a leftover of a crash, never recorded
            try:
                try:
                    host.link(
                        "add",
                        ifname=attachment.host_ifname,
                        kind="veth",
                        mtu=attachment.mtu,
                        master=bridge,
                        state="up",
                        peer={
                            "ifname": attachment.ifname,
                            "net_ns_fd": fd,
                            "mtu": attachment.mtu,
                            "address": attachment.mac,
                        },
                    )
                except NetlinkError as exc:
                    if exc.code == errno.EEXIST:  # not the host end: it was removed just before
                        raise AlreadyExists(f"interface {attachment.ifname} exists in {where}") from exc
                    raise
                with netlink_errors(f"configuring veth {attachment.host_ifname} and {attachment.ifname} in {where}"):
                    if self._hairpin:
                        host.brport("set", index=index_of(attachment.host_ifname), mode=1)
                    index = index_of(attachment.ifname, (attachment.netns_path, fd))
                    address = ipaddress.IPv4Interface(attachment.addresses[0])
                    inner.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen)
                    inner.link("set", index=index, state="up")
                    inner.link("set", index=_LOOPBACK_INDEX, state="up")
                    gateway = _add_default_route(inner, index, attachment.gateway)
            except BaseException:
                remove_link(host, attachment.host_ifname)
                raise
        return dataclasses.replace(attachment, gateway=gateway)

    def _restore(self) -> None:
        """Bring the host in line with the records (see the module docstring)."""
        with self._lock, self._store.transaction() as conn, host_route() as ipr:
            records = _select_networks(conn)
            bridges = set()
            for record in records:
                index = find_index(record.device)
                bridge = _make_bridge(ipr, record) if index is None else index
                bridges.add(bridge)
                for attachment in self._live_attachments(conn, record).values():
                    with netlink_errors(f"putting {attachment.host_ifname} back on {record.device}"):
                        ipr.link("set", index=index_of(attachment.host_ifname), master=bridge, state="up")
            known = {row[0] for row in conn.execute("SELECT host_ifname FROM attachments")}
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                if link.get_attr("IFLA_MASTER") in bridges and name.startswith(VETH_PREFIX) and name not in known:
                    remove_link(ipr, name)


def _hex(text: str, digits: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:digits]


def bridge_name(prefix: str, namespace: str, network: str) -> str:
    """The bridge of ``network``: ``prefix`` and 10 hex digits of sha256("<namespace>/<network>")."""
    return prefix + _hex(f"{namespace}/{network}", _BRIDGE_HASH)


def veth_name(namespace: str, network: str, container_id: str) -> str:
    """The host end of a container's veth: ``ckv`` and 12 hex digits of sha256("<namespace>/<network>/<id>")."""
    return VETH_PREFIX + _hex(f"{namespace}/{network}/{container_id}", MAX_IFNAME - len(VETH_PREFIX))


def _mac_of(ip: IPv4Address) -> str:
    """The MAC of a container's interface: locally administered ``02:42`` and the four bytes of its
    address (as Docker does), so an address handed out again keeps its MAC and neighbours' ARP caches
    stay right."""
    return "02:42:" + ":".join(f"{byte:02x}" for byte in ip.packed)


def _pool(record: Network) -> str:
    return f"{record.namespace}/{record.name}"


def _subnet(text: str) -> IPv4Network:
    """An IPv4 subnet of at least 4 addresses; InvalidArgument otherwise (also for host bits set)."""
    try:
        subnet = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"invalid subnet {text!r}: {exc}") from exc
    if not isinstance(subnet, IPv4Network) or "/" not in text:
        raise InvalidArgument(f"invalid subnet {text!r}: the bridge driver takes an IPv4 CIDR such as 10.88.0.0/16")
    if subnet.prefixlen > _MAX_PREFIXLEN:
        raise InvalidArgument(f"subnet {text} is too small: at most /{_MAX_PREFIXLEN} (a gateway and a container)")
    return subnet


def _gateway(subnet: IPv4Network, text: str) -> IPv4Address:
    """The gateway given (a host address of ``subnet``) or the subnet's first address."""
    if not text:
        return subnet.network_address + 1
    try:
        gateway = ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise InvalidArgument(f"invalid gateway {text!r}: {exc}") from exc
    if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
        raise InvalidArgument(f"gateway {text} is not a host address of subnet {subnet}")
    return gateway


def _wanted(address: str | None, subnet: IPv4Network) -> IPv4Address | None:
    """The address asked for (CIDR with the subnet's prefix, or plain), None for any."""
    if address is None:
        return None
    try:
        interface = ipaddress.IPv4Interface(address)
    except ValueError as exc:
        raise InvalidArgument(f"invalid address {address!r}: {exc}") from exc
    if "/" in address and interface.network.prefixlen != subnet.prefixlen:
        raise InvalidArgument(f"address {address} does not have the prefix of subnet {subnet}")
    return interface.ip


def _make_bridge(ipr: IPRoute, network: Network) -> int:
    """Create the bridge of ``network``, up, with its MTU and the gateway address; return its index."""
    prefixlen = ipaddress.IPv4Network(network.subnet).prefixlen
    with netlink_errors(f"creating bridge {network.device} for network {network.name}"):
        ipr.link("add", ifname=network.device, kind="bridge", mtu=network.mtu, state="up")
        index = index_of(network.device)
        _stop_forwarding(network.device)
        ipr.addr("add", index=index, address=network.gateway, prefixlen=prefixlen)
    return index


def _stop_forwarding(device: str) -> None:
    """Make the host route nothing that arrives on ``device`` (IPv4 forwarding off for that interface)."""
    with open(f"/proc/sys/net/ipv4/conf/{device}/forwarding", "w") as sysctl:
        sysctl.write("0")


def _add_default_route(ipr: IPRoute, index: int, gateway: str) -> str:
    """Add the default route via ``gateway`` on interface ``index`` and return ``gateway``; return ``""``
    when the netns has a default route already (its first network's: a second network adds none)."""
    try:
        ipr.route("add", dst="0.0.0.0/0", gateway=gateway, oif=index)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
        return ""
    return gateway


def _network_of(row: tuple[Any, ...]) -> Network:
    namespace, name, subnet, gateway, mtu, device, labels, options = row
    return Network(name, namespace, subnet, gateway, mtu, device, json.loads(labels), json.loads(options))


def _select_network(conn: sqlite3.Connection, namespace: str, name: str) -> Network | None:
    row = conn.execute(
        f"SELECT {_NETWORK_COLUMNS} FROM networks WHERE namespace = ? AND name = ?", (namespace, name)
    ).fetchone()
    return _network_of(row) if row else None


def _select_networks(conn: sqlite3.Connection) -> list[Network]:
    return [
        _network_of(row) for row in conn.execute(f"SELECT {_NETWORK_COLUMNS} FROM networks ORDER BY namespace, name")
    ]


def _attachment_of(row: tuple[Any, ...]) -> Attachment:
    network, container_id, netns_path, ifname, host_ifname, addresses, gateway, mac, mtu = row
    return Attachment(network, container_id, netns_path, ifname, host_ifname, json.loads(addresses), gateway, mac, mtu)


def _attachment_row(attachment: Attachment) -> tuple[object, ...]:
    return (
        attachment.network,
        attachment.container_id,
        attachment.netns_path,
        attachment.ifname,
        attachment.host_ifname,
        json.dumps(list(attachment.addresses)),
        attachment.gateway,
        attachment.mac,
        attachment.mtu,
    )


def _select_attachment(conn: sqlite3.Connection, record: Network, container_id: str) -> Attachment | None:
    row = conn.execute(
        f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments WHERE namespace = ? AND network = ? AND container_id = ?",
        (record.namespace, record.name, container_id),
    ).fetchone()
    return _attachment_of(row) if row else None


def _select_attachments(conn: sqlite3.Connection, record: Network) -> list[Attachment]:
    return [
        _attachment_of(row)
        for row in conn.execute(
            f"SELECT {_ATTACHMENT_COLUMNS} FROM attachments WHERE namespace = ? AND network = ? ORDER BY container_id",
            (record.namespace, record.name),
        )
    ]
