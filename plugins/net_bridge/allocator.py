"""Single-host IPv4 address allocation per network, persisted in the bridge driver's sqlite database.

A pool is one network's subnet, named by an opaque key. Every address handed out is recorded with
its owner (a container id) until released, so an address is never handed out twice; the network
and broadcast addresses and the pool's reserved ones (its gateway) are never handed out. Picking
continues after the last address handed out and wraps around, as CNI's host-local does, so a just
released address is not reused while others are free. Every method works inside the caller's
transaction (a connection of :class:`core.metadata.MetadataStore`), so an allocation commits or rolls
back together with whatever the caller records beside it.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from collections.abc import Collection
from ipaddress import IPv4Address, IPv4Network

from core.errors import AlreadyExists, InvalidArgument, Unavailable
from core.metadata import MetadataStore

__all__ = ["MIGRATIONS", "AddressAllocator"]

MIGRATIONS = (
    """
    CREATE TABLE allocations (
        pool    TEXT NOT NULL,
        address TEXT NOT NULL,
        owner   TEXT NOT NULL,
        PRIMARY KEY (pool, address)
    );
    CREATE INDEX allocations_by_owner ON allocations (pool, owner);
    CREATE TABLE allocation_cursors (
        pool TEXT NOT NULL PRIMARY KEY,
        last TEXT NOT NULL
    );
    """,
)
"""The schema of component ``net_bridge.allocator``."""


class AddressAllocator:
    """Addresses of pools, recorded in ``store`` (whose schema it migrates on construction)."""

    def __init__(self, store: MetadataStore) -> None:
        store.migrate("net_bridge.allocator", MIGRATIONS)

    def allocate(
        self,
        conn: sqlite3.Connection,
        pool: str,
        subnet: IPv4Network,
        owner: str,
        reserved: Collection[IPv4Address] = (),
        wanted: IPv4Address | None = None,
    ) -> IPv4Address:
        """Record and return an address of ``subnet`` for ``owner``: ``wanted``, or the next free one.

        InvalidArgument when ``wanted`` is not a host address of the subnet; AlreadyExists when it is
        reserved or handed out; Unavailable when no address is free.
        """
        rows = conn.execute("SELECT address FROM allocations WHERE pool = ?", (pool,))
        used = {ipaddress.IPv4Address(address) for (address,) in rows}
        used.update(reserved)
        if wanted is not None:
            if wanted not in subnet or wanted in (subnet.network_address, subnet.broadcast_address):
                raise InvalidArgument(f"address {wanted} is not a host address of subnet {subnet}")
            if wanted in used:
                raise AlreadyExists(f"address {wanted} of subnet {subnet} is in use")
            address = wanted
        else:
            address = self._next_free(conn, pool, subnet, used)
        conn.execute("INSERT INTO allocations (pool, address, owner) VALUES (?, ?, ?)", (pool, str(address), owner))
        conn.execute(
            "INSERT INTO allocation_cursors (pool, last) VALUES (?, ?)"
            " ON CONFLICT (pool) DO UPDATE SET last = excluded.last",
            (pool, str(address)),
        )
        return address

    def release(self, conn: sqlite3.Connection, pool: str, owner: str) -> None:
        """Free every address ``owner`` holds in ``pool``; nothing when it holds none."""
        conn.execute("DELETE FROM allocations WHERE pool = ? AND owner = ?", (pool, owner))

    def drop(self, conn: sqlite3.Connection, pool: str) -> None:
        """Forget ``pool`` entirely (its network is gone)."""
        conn.execute("DELETE FROM allocations WHERE pool = ?", (pool,))
        conn.execute("DELETE FROM allocation_cursors WHERE pool = ?", (pool,))

    def owners(self, conn: sqlite3.Connection, pool: str) -> dict[str, list[str]]:
        """The addresses handed out in ``pool``, by owner."""
        result: dict[str, list[str]] = {}
        for owner, address in conn.execute("SELECT owner, address FROM allocations WHERE pool = ?", (pool,)):
            result.setdefault(owner, []).append(address)
        return result

    @staticmethod
    def _next_free(conn: sqlite3.Connection, pool: str, subnet: IPv4Network, used: set[IPv4Address]) -> IPv4Address:
        first, last = int(subnet.network_address) + 1, int(subnet.broadcast_address) - 1
        row = conn.execute("SELECT last FROM allocation_cursors WHERE pool = ?", (pool,)).fetchone()
        start = int(ipaddress.IPv4Address(row[0])) + 1 if row else first
        if not first <= start <= last:
            start = first
        span = last - first + 1
        for step in range(span):
            candidate = ipaddress.IPv4Address(first + (start - first + step) % span)
            if candidate not in used:
                return candidate
        raise Unavailable(f"no free address left in subnet {subnet}")
