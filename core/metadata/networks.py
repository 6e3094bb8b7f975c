"""Networks: per-namespace records of the networks containerkit made, the containers attached to them,
and the network namespaces it made for containers ("sandboxes").

These records are the authority on what should exist; a network driver (:mod:`core.network`) owns the
host side. A network is named within its namespace and made by one driver; its subnet may not overlap
another network's, in any namespace (they share the host's routing table). An attachment records what
the driver reported (:class:`core.network.Attachment`); a sandbox is written *before* its netns is made
and removed after it is gone, so a crash in between leaves a record to clean up from.

Tables (component ``networks``): ``networks`` references ``namespaces(name)`` without cascade (a
namespace holding networks cannot be deleted: the message names ``networks``); ``network_labels`` and
``network_options`` go with their network; ``network_attachments`` reference their network (a network
cannot be deleted while it has any); ``network_sandboxes`` stand alone.
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.identifiers import validate
from core.labels import validate_labels
from core.metadata.namespaces import NamespaceStore
from core.metadata.store import MetadataStore, Migration, from_ns
from core.network import Attachment, Network, NetworkConfig

__all__ = [
    "MAX_MTU",
    "MIN_MTU",
    "NETWORK_MIGRATIONS",
    "NetworkRecord",
    "NetworkStore",
    "Sandbox",
    "validate_config",
]

MIN_MTU = 68
"""The smallest MTU IPv4 allows."""
MAX_MTU = 65535

NETWORK_MIGRATIONS: tuple[Migration, ...] = (
    # 1: networks (protecting their namespace), their labels and options, attachments and sandboxes.
    """
    CREATE TABLE networks (
        namespace  TEXT    NOT NULL REFERENCES namespaces(name),
        name       TEXT    NOT NULL,
        driver     TEXT    NOT NULL,
        subnet     TEXT    NOT NULL,  -- CIDR, normalised
        gateway    TEXT    NOT NULL,
        mtu        INTEGER NOT NULL,
        device     TEXT    NOT NULL,  -- the driver's host interface, "" for none
        created_at INTEGER NOT NULL,  -- nanoseconds since the epoch, UTC
        PRIMARY KEY (namespace, name)
    );
    CREATE TABLE network_labels (
        namespace TEXT NOT NULL,
        network   TEXT NOT NULL,
        key       TEXT NOT NULL,
        value     TEXT NOT NULL,
        PRIMARY KEY (namespace, network, key),
        FOREIGN KEY (namespace, network) REFERENCES networks (namespace, name) ON DELETE CASCADE
    );
    CREATE TABLE network_options (
        namespace TEXT NOT NULL,
        network   TEXT NOT NULL,
        key       TEXT NOT NULL,
        value     TEXT NOT NULL,
        PRIMARY KEY (namespace, network, key),
        FOREIGN KEY (namespace, network) REFERENCES networks (namespace, name) ON DELETE CASCADE
    );
    CREATE TABLE network_attachments (
        namespace    TEXT    NOT NULL,
        network      TEXT    NOT NULL,
        container_id TEXT    NOT NULL,
        netns_path   TEXT    NOT NULL,
        ifname       TEXT    NOT NULL,
        host_ifname  TEXT    NOT NULL,
        addresses    TEXT    NOT NULL,  -- JSON list of CIDR addresses
        gateway      TEXT    NOT NULL,
        mac          TEXT    NOT NULL,
        mtu          INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        PRIMARY KEY (namespace, network, container_id),
        FOREIGN KEY (namespace, network) REFERENCES networks (namespace, name)
    );
    CREATE INDEX network_attachments_by_container ON network_attachments (namespace, container_id);
    CREATE TABLE network_sandboxes (
        namespace    TEXT    NOT NULL,
        container_id TEXT    NOT NULL,
        netns        TEXT    NOT NULL,  -- the netns name (core.netns)
        created_at   INTEGER NOT NULL,
        PRIMARY KEY (namespace, container_id)
    );
    """,
)
"""The schema of component ``networks``."""


@dataclass(frozen=True)
class NetworkRecord:
    """A network as recorded: the :class:`~core.network.Network` its ``driver`` made, and when."""

    network: Network
    driver: str
    created_at: datetime

    @property
    def name(self) -> str:
        return self.network.name

    @property
    def namespace(self) -> str:
        return self.network.namespace

    def config(self) -> NetworkConfig:
        """What to give the driver to make this network again (e.g. after a reboot)."""
        n = self.network
        return NetworkConfig(n.name, n.namespace, n.subnet, n.gateway, n.mtu, n.labels, n.options)


@dataclass(frozen=True)
class Sandbox:
    """A network namespace containerkit made for container ``container_id`` of ``namespace``."""

    namespace: str
    container_id: str
    netns: str


def validate_config(config: NetworkConfig) -> NetworkConfig:
    """``config`` checked and normalised (the subnet in canonical CIDR form, the gateway a plain address).

    InvalidArgument for an invalid name or label, a malformed subnet or one with host bits set, one
    too small to hold a gateway and a container, a gateway outside the subnet (or its network or
    broadcast address), or an MTU out of range (0 leaves it to the driver).
    """
    validate(config.name, "network name")
    validate_labels(config.labels)
    try:
        subnet = ipaddress.ip_network(config.subnet, strict=True)
    except ValueError as err:
        raise InvalidArgument(f"invalid subnet {config.subnet!r}: {err}") from None
    if subnet.num_addresses < 4:
        raise InvalidArgument(f"subnet {subnet} is too small: it needs room for a gateway and a container")
    gateway = ""
    if config.gateway:
        try:
            address = ipaddress.ip_address(config.gateway)
        except ValueError as err:
            raise InvalidArgument(f"invalid gateway {config.gateway!r}: {err}") from None
        if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
            raise InvalidArgument(f"gateway {address} is not a host address of subnet {subnet}")
        gateway = str(address)
    if config.mtu and not MIN_MTU <= config.mtu <= MAX_MTU:
        raise InvalidArgument(f"MTU {config.mtu} is out of range ({MIN_MTU}..{MAX_MTU})")
    return replace(config, subnet=str(subnet), gateway=gateway)


class NetworkStore:
    """Networks, attachments and sandboxes in a :class:`MetadataStore`. One transaction per mutation."""

    def __init__(self, store: MetadataStore) -> None:
        """Use ``store``, creating or upgrading the ``networks`` tables in it."""
        self._store = store
        self._namespaces = NamespaceStore(store)
        store.migrate("networks", NETWORK_MIGRATIONS)

    @property
    def store(self) -> MetadataStore:
        """The metadata store the networks live in."""
        return self._store

    # -- networks ------------------------------------------------------------------------------

    def check_new(self, config: NetworkConfig) -> NetworkConfig:
        """``config`` validated (:func:`validate_config`) for a network that may be created now.

        AlreadyExists when the name is taken in its namespace; FailedPrecondition when the subnet
        overlaps another network's.
        """
        config = validate_config(config)
        with self._store.read() as conn:
            _check_free(conn, config.namespace, config.name, config.subnet)
        return config

    def create(self, driver: str, network: Network) -> NetworkRecord:
        """Record ``network`` as ``driver`` made it (its namespace created if missing).

        The same errors as :meth:`check_new`, checked again in the transaction.
        """
        now = time.time_ns()
        with self._store.transaction() as conn:
            self._namespaces.ensure(network.namespace)
            _check_free(conn, network.namespace, network.name, network.subnet)
            conn.execute(
                "INSERT INTO networks (namespace, name, driver, subnet, gateway, mtu, device, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (network.namespace, network.name, driver, network.subnet, network.gateway, network.mtu,
                 network.device, now),
            )  # fmt: skip
            for table, pairs in (("network_labels", network.labels), ("network_options", network.options)):
                conn.executemany(
                    f"INSERT INTO {table} (namespace, network, key, value) VALUES (?, ?, ?, ?)",
                    [(network.namespace, network.name, key, value) for key, value in pairs.items()],
                )
        return NetworkRecord(network, driver, from_ns(now))

    def get(self, namespace: str, name: str) -> NetworkRecord:
        """The network ``name`` of ``namespace``. NotFound when there is none."""
        found = self._read(namespace, name)
        if not found:
            raise NotFound(f'network "{name}" in namespace "{namespace}": not found')
        return found[0]

    def list(self, namespace: str | None = None, filters: Sequence[str] = ()) -> list[NetworkRecord]:
        """The networks of ``namespace`` (None: of every namespace) matching any of ``filters``, sorted
        by namespace and name. Fields: ``name``, ``driver``, ``subnet``, ``labels.<key>``.
        InvalidArgument for a malformed filter."""
        from core import filters as filter_language

        matches = filter_language.parse(list(filters))
        return [record for record in self._read(namespace) if matches(_fields(record))]

    def delete(self, namespace: str, name: str) -> None:
        """Remove the network's record. NotFound when there is none; FailedPrecondition naming the
        containers while any is attached."""
        with self._store.transaction() as conn:
            attached = [
                row[0]
                for row in conn.execute(
                    "SELECT container_id FROM network_attachments WHERE namespace = ? AND network = ?"
                    " ORDER BY container_id",
                    (namespace, name),
                )
            ]
            if attached:
                raise FailedPrecondition(
                    f'network "{name}" is in use by container(s) {", ".join(attached)}: '
                    "disconnect them or delete with force"
                )
            cursor = conn.execute("DELETE FROM networks WHERE namespace = ? AND name = ?", (namespace, name))
            if cursor.rowcount == 0:
                raise NotFound(f'network "{name}" in namespace "{namespace}": not found')

    # -- attachments ---------------------------------------------------------------------------

    def add_attachment(self, namespace: str, attachment: Attachment) -> None:
        """Record ``attachment`` of ``namespace``. NotFound for an unknown network; AlreadyExists when
        the container is attached to it already."""
        a = attachment
        with self._store.transaction() as conn:
            if not conn.execute(
                "SELECT 1 FROM networks WHERE namespace = ? AND name = ?", (namespace, a.network)
            ).fetchone():
                raise NotFound(f'network "{a.network}" in namespace "{namespace}": not found')
            try:
                conn.execute(
                    "INSERT INTO network_attachments (namespace, network, container_id, netns_path, ifname,"
                    " host_ifname, addresses, gateway, mac, mtu, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (namespace, a.network, a.container_id, a.netns_path, a.ifname, a.host_ifname,
                     json.dumps(list(a.addresses)), a.gateway, a.mac, a.mtu, time.time_ns()),
                )  # fmt: skip
            except sqlite3.IntegrityError:
                raise AlreadyExists(
                    f'container "{a.container_id}" is already attached to network "{a.network}"'
                ) from None

    def remove_attachment(self, namespace: str, network: str, container_id: str) -> bool:
        """Forget the container's attachment to ``network``; whether there was one."""
        with self._store.transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM network_attachments WHERE namespace = ? AND network = ? AND container_id = ?",
                (namespace, network, container_id),
            )
        return cursor.rowcount > 0

    def attachments(self, namespace: str, *, network: str = "", container_id: str = "") -> list[Attachment]:
        """The attachments of ``namespace``, only those of ``network`` and/or ``container_id`` when
        given, in the order they were made."""
        query = f"SELECT {_ATTACHMENT_COLUMNS} FROM network_attachments WHERE namespace = ?"
        args: list[str] = [namespace]
        for column, value in (("network", network), ("container_id", container_id)):
            if value:
                query += f" AND {column} = ?"
                args.append(value)
        with self._store.read() as conn:
            rows = conn.execute(f"{query} ORDER BY created_at, network", args).fetchall()
        return [_attachment(row) for row in rows]

    # -- sandboxes -----------------------------------------------------------------------------

    def add_sandbox(self, sandbox: Sandbox) -> None:
        """Record (before making it) the netns of a container; recording it again is a no-op."""
        with self._store.transaction() as conn:
            conn.execute(
                "INSERT INTO network_sandboxes (namespace, container_id, netns, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (sandbox.namespace, sandbox.container_id, sandbox.netns, time.time_ns()),
            )

    def remove_sandbox(self, namespace: str, container_id: str) -> None:
        """Forget the container's netns (once it is gone); nothing when there is no record."""
        with self._store.transaction() as conn:
            conn.execute(
                "DELETE FROM network_sandboxes WHERE namespace = ? AND container_id = ?", (namespace, container_id)
            )

    def sandbox(self, namespace: str, container_id: str) -> Sandbox | None:
        """The container's netns record, None when it has none."""
        with self._store.read() as conn:
            row = conn.execute(
                "SELECT netns FROM network_sandboxes WHERE namespace = ? AND container_id = ?",
                (namespace, container_id),
            ).fetchone()
        return None if row is None else Sandbox(namespace, container_id, row[0])

    def sandboxes(self) -> list[Sandbox]:
        """Every recorded netns, of every namespace."""
        with self._store.read() as conn:
            rows = conn.execute("SELECT namespace, container_id, netns FROM network_sandboxes ORDER BY 1, 2")
            return [Sandbox(*row) for row in rows]

    def holders(self) -> list[tuple[str, str]]:
        """Every ``(namespace, container id)`` holding an attachment or a sandbox, sorted."""
        with self._store.read() as conn:
            rows = conn.execute(
                "SELECT namespace, container_id FROM network_attachments"
                " UNION SELECT namespace, container_id FROM network_sandboxes ORDER BY 1, 2"
            ).fetchall()
        return [(namespace, container_id) for namespace, container_id in rows]

    def _read(self, namespace: str | None, name: str | None = None) -> list[NetworkRecord]:
        where, args = "1", []
        for column, value in (("namespace", namespace), ("name", name)):
            if value is not None:
                where += f" AND {column} = ?"
                args.append(value)
        with self._store.read() as conn:
            rows = conn.execute(
                "SELECT namespace, name, driver, subnet, gateway, mtu, device, created_at FROM networks"
                f" WHERE {where} ORDER BY namespace, name",
                args,
            ).fetchall()
            pairs: dict[str, dict[tuple[str, str], dict[str, str]]] = {}
            for table in ("network_labels", "network_options"):
                found = pairs[table] = {}
                for ns, network, key, value in conn.execute(f"SELECT namespace, network, key, value FROM {table}"):
                    found.setdefault((ns, network), {})[key] = value
        records = []
        for ns, network, driver, subnet, gateway, mtu, device, created in rows:
            labels = pairs["network_labels"].get((ns, network), {})
            options = pairs["network_options"].get((ns, network), {})
            made = Network(network, ns, subnet, gateway, mtu, device, labels, options)
            records.append(NetworkRecord(made, driver, from_ns(created)))
        return records


def _check_free(conn: sqlite3.Connection, namespace: str, name: str, subnet: str) -> None:
    """AlreadyExists when ``name`` is taken in ``namespace``; FailedPrecondition when ``subnet``
    overlaps a recorded network's."""
    if conn.execute("SELECT 1 FROM networks WHERE namespace = ? AND name = ?", (namespace, name)).fetchone():
        raise AlreadyExists(f'network "{name}" in namespace "{namespace}": already exists')
    wanted = ipaddress.ip_network(subnet)
    for other_namespace, other, other_subnet in conn.execute("SELECT namespace, name, subnet FROM networks"):
        if wanted.overlaps(ipaddress.ip_network(other_subnet)):
            raise FailedPrecondition(
                f'subnet {wanted} overlaps {other_subnet} of network "{other}" in namespace "{other_namespace}"'
            )


_ATTACHMENT_COLUMNS = "network, container_id, netns_path, ifname, host_ifname, addresses, gateway, mac, mtu"


def _attachment(row: Sequence[Any]) -> Attachment:
    network, container_id, netns_path, ifname, host_ifname, addresses, gateway, mac, mtu = row
    return Attachment(network, container_id, netns_path, ifname, host_ifname, json.loads(addresses), gateway, mac, mtu)


def _fields(record: NetworkRecord) -> dict[str, Any]:
    """What filters see of a network."""
    network = record.network
    return {"name": network.name, "driver": record.driver, "subnet": network.subnet, "labels": network.labels}
