"""Leases: named, per-namespace holds that keep content, ingests and snapshots from garbage collection.

Semantics of containerd's ``metadata/leases.go``. A lease references resources of three types,
spelled as containerd's API spells them: ``content`` (id: a digest), ``ingests`` (id: an ingest ref)
and ``snapshots/<snapshotter>`` (id: a snapshot key). Every unexpired lease is a garbage-collection
root that keeps its resources alive; a lease expires at the RFC 3339 time in its label
``containerd.io/gc.expire``, after which the collector deletes it (and, with it, its hold).

Tables (component ``leases``): ``leases``, ``lease_labels``, ``lease_resources``. They go with
their namespace (``ON DELETE CASCADE``): as in containerd, leases never keep a namespace from
being deleted. Other components (the content metadata) record resources through :class:`LeaseStore`,
which is the one owner of these tables.
"""

from __future__ import annotations

import logging
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

from core.digest import Digest
from core.errors import AlreadyExists, InvalidArgument, NotFound, NotImplementedByPlugin
from core.gc import Resource
from core.labels import validate_labels
from core.metadata.namespaces import NamespaceStore
from core.metadata.store import MetadataStore, Migration, from_ns
from core.types import EPOCH

__all__ = [
    "LABEL_GC_EXPIRE",
    "LEASE_MIGRATIONS",
    "Lease",
    "LeaseKind",
    "LeaseResource",
    "LeaseStore",
    "parse_rfc3339",
]

log = logging.getLogger("containerkit.metadata.leases")

LABEL_GC_EXPIRE = "containerd.io/gc.expire"
"""Label holding a lease's expiry time (RFC 3339); once it has passed, the lease is no GC root."""

LEASE_MIGRATIONS: tuple[Migration, ...] = (
    # 1: leases, their labels and the resources they hold (all go with the namespace).
    """
    CREATE TABLE leases (
        namespace  TEXT    NOT NULL REFERENCES namespaces(name) ON DELETE CASCADE,
        id         TEXT    NOT NULL,
        created_at INTEGER NOT NULL,  -- nanoseconds since the epoch, UTC
        PRIMARY KEY (namespace, id)
    );
    CREATE TABLE lease_labels (
        namespace TEXT NOT NULL,
        lease     TEXT NOT NULL,
        key       TEXT NOT NULL,
        value     TEXT NOT NULL,
        PRIMARY KEY (namespace, lease, key),
        FOREIGN KEY (namespace, lease) REFERENCES leases (namespace, id) ON DELETE CASCADE
    );
    CREATE TABLE lease_resources (
        namespace TEXT NOT NULL,
        lease     TEXT NOT NULL,
        type      TEXT NOT NULL,  -- content | ingests | snapshots/<snapshotter>
        id        TEXT NOT NULL,  -- digest | ingest ref | snapshot key
        PRIMARY KEY (namespace, lease, type, id),
        FOREIGN KEY (namespace, lease) REFERENCES leases (namespace, id) ON DELETE CASCADE
    );
    """,
)
"""The schema of component ``leases``."""


@dataclass(frozen=True)
class Lease:
    """A lease: its ``id``, when it was created, and its labels (``containerd.io/gc.expire``...)."""

    id: str
    created_at: datetime = EPOCH
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels))

    @property
    def expires_at(self) -> datetime | None:
        """The time of label ``containerd.io/gc.expire``; None without it or when it does not parse."""
        value = self.labels.get(LABEL_GC_EXPIRE)
        if value is None:
            return None
        try:
            return parse_rfc3339(value)
        except InvalidArgument:
            return None


@dataclass(frozen=True)
class LeaseResource:
    """A resource held by a lease: ``type`` ``content``, ``ingests`` or ``snapshots/<snapshotter>``, and its ``id``."""

    id: str
    type: str


class LeaseStore:
    """Leases and their resources, per namespace, in a :class:`MetadataStore`. One transaction per mutation.

    Mutations called inside an open transaction on the same thread join it; the content metadata
    relies on that to record a writer's ingest and commit in its own transaction.
    """

    def __init__(self, store: MetadataStore) -> None:
        """Use ``store``, creating or upgrading the ``leases`` tables in it."""
        self._store = store
        self._namespaces = NamespaceStore(store)
        store.migrate("leases", LEASE_MIGRATIONS)

    @property
    def store(self) -> MetadataStore:
        """The metadata store the leases live in."""
        return self._store

    def create(self, namespace: str, id: str = "", labels: Mapping[str, str] | None = None) -> Lease:
        """Create a lease in ``namespace`` (created if missing) and return it.

        An empty ``id`` gets a generated unique one (``<nanoseconds>-<random hex>``); any other id is
        taken as it is, as containerd does (``ctr`` uses ids like ``929647489-dna_`` and mount paths).
        Labels with an empty value are dropped. InvalidArgument for an invalid namespace or label, or a
        ``containerd.io/gc.expire`` label that is not an RFC 3339 time; AlreadyExists when the id
        is taken in the namespace.
        """
        lease_id = id or _generate_id()
        stored = {key: value for key, value in validate_labels(labels or {}).items() if value}
        if LABEL_GC_EXPIRE in stored:
            parse_rfc3339(stored[LABEL_GC_EXPIRE], what=f"label {LABEL_GC_EXPIRE}")
        now = time.time_ns()
        # Under gc_lock: a lease born between the collector's mark and sweep would be swept unmarked.
        with self._store.gc_lock, self._store.transaction() as conn:
            self._namespaces.ensure(namespace)
            try:
                conn.execute(
                    "INSERT INTO leases (namespace, id, created_at) VALUES (?, ?, ?)", (namespace, lease_id, now)
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f'lease "{lease_id}": already exists') from None
            conn.executemany(
                "INSERT INTO lease_labels (namespace, lease, key, value) VALUES (?, ?, ?, ?)",
                [(namespace, lease_id, key, value) for key, value in stored.items()],
            )
        return Lease(lease_id, from_ns(now), stored)

    def get(self, namespace: str, id: str) -> Lease:
        """The lease ``id`` of ``namespace``. NotFound when there is none."""
        with self._store.read() as conn:
            row = conn.execute(
                "SELECT created_at FROM leases WHERE namespace = ? AND id = ?", (namespace, id)
            ).fetchone()
            if row is None:
                raise NotFound(f'lease "{id}": not found')
            return Lease(id, from_ns(row[0]), _labels(conn, namespace, id))

    def list(self, namespace: str, filters: Sequence[str] = ()) -> list[Lease]:
        """The leases of ``namespace`` matching ``filters`` (fields ``id``, ``labels.<key>``), sorted by id.

        InvalidArgument for a malformed filter.
        """
        from core import filters as filter_language

        matches = filter_language.parse(list(filters))
        with self._store.read() as conn:
            rows = conn.execute(
                "SELECT id, created_at FROM leases WHERE namespace = ? ORDER BY id", (namespace,)
            ).fetchall()
            labels: dict[str, dict[str, str]] = {lease_id: {} for lease_id, _ in rows}
            for lease_id, key, value in conn.execute(
                "SELECT lease, key, value FROM lease_labels WHERE namespace = ?", (namespace,)
            ):
                labels[lease_id][key] = value
        leases = [Lease(lease_id, from_ns(created), labels[lease_id]) for lease_id, created in rows]
        return [lease for lease in leases if matches({"id": lease.id, "labels": lease.labels})]

    def delete(self, namespace: str, id: str) -> None:
        """Delete the lease and its hold on its resources (the collector may then remove them).

        NotFound when there is no such lease.
        """
        with self._store.transaction() as conn:
            cursor = conn.execute("DELETE FROM leases WHERE namespace = ? AND id = ?", (namespace, id))
            if cursor.rowcount == 0:
                raise NotFound(f'lease "{id}": not found')

    def add_resource(self, namespace: str, lease_id: str, resource: LeaseResource) -> None:
        """Make the lease hold ``resource``; adding one it already holds is a no-op.

        NotFound for an unknown lease; InvalidArgument for a malformed resource (a ``content`` id
        that is no digest, ``snapshots`` without a snapshotter...); NotImplementedByPlugin for a
        type other than ``content``, ``ingests`` and ``snapshots/<snapshotter>``.
        """
        type_, resource_id = _check_resource(resource)
        with self._store.gc_lock, self._store.transaction() as conn:
            _require_lease(conn, namespace, lease_id)
            conn.execute(
                "INSERT INTO lease_resources (namespace, lease, type, id) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (namespace, lease_id, type_, resource_id),
            )

    def delete_resource(self, namespace: str, lease_id: str, resource: LeaseResource) -> None:
        """Release the lease's hold on ``resource``; a resource the lease does not hold is a no-op.

        NotFound for an unknown lease; the resource is validated as in :meth:`add_resource`.
        """
        type_, resource_id = _check_resource(resource)
        with self._store.transaction() as conn:
            _require_lease(conn, namespace, lease_id)
            conn.execute(
                "DELETE FROM lease_resources WHERE namespace = ? AND lease = ? AND type = ? AND id = ?",
                (namespace, lease_id, type_, resource_id),
            )

    def list_resources(self, namespace: str, lease_id: str) -> list[LeaseResource]:
        """The resources the lease holds, sorted by type then id. NotFound for an unknown lease."""
        with self._store.read() as conn:
            _require_lease(conn, namespace, lease_id)
            rows = conn.execute(
                "SELECT id, type FROM lease_resources WHERE namespace = ? AND lease = ? ORDER BY type, id",
                (namespace, lease_id),
            ).fetchall()
        return [LeaseResource(resource_id, type_) for resource_id, type_ in rows]


class LeaseKind:
    """The garbage collector's view of leases (type ``lease``).

    Roots: every lease whose ``containerd.io/gc.expire`` has not passed (a lease without the label,
    or with one that does not parse, never expires; the latter is logged). A lease references what
    it holds: ``content`` -> ``("content", ns, digest)``, ``ingests`` -> ``("ingest", ns, ref)``,
    ``snapshots/<sn>`` -> ``("snapshot/<sn>", ns, key)``. Every lease is a sweep candidate, so
    expired ones are deleted.
    """

    types: tuple[str, ...] = ("lease",)

    def __init__(self, leases: LeaseStore) -> None:
        self._leases = leases
        self._store = leases.store

    def roots(self) -> Iterable[Resource]:
        """Every unexpired lease."""
        now = datetime.now(UTC)
        with self._store.read() as conn:
            rows = conn.execute("SELECT namespace, id FROM leases ORDER BY namespace, id").fetchall()
            expiries = dict(
                ((namespace, lease_id), value)
                for namespace, lease_id, value in conn.execute(
                    "SELECT namespace, lease, value FROM lease_labels WHERE key = ?", (LABEL_GC_EXPIRE,)
                )
            )
        roots = []
        for namespace, lease_id in rows:
            value = expiries.get((namespace, lease_id))
            if value is not None:
                try:
                    if parse_rfc3339(value) < now:
                        continue  # expired: not a root, so the sweep deletes it
                except InvalidArgument:
                    log.info("lease %s in namespace %s: ignoring invalid expiration %r", lease_id, namespace, value)
            roots.append(Resource("lease", namespace, lease_id))
        return roots

    def references(self, resource: Resource) -> Iterable[Resource]:
        """What the lease holds, as GC resources."""
        if resource.type != "lease":
            return []
        with self._store.read() as conn:
            rows = conn.execute(
                "SELECT type, id FROM lease_resources WHERE namespace = ? AND lease = ? ORDER BY type, id",
                (resource.namespace, resource.id),
            ).fetchall()
        out = []
        for type_, resource_id in rows:
            if type_ == "content":
                out.append(Resource("content", resource.namespace, resource_id))
            elif type_ == "ingests":
                out.append(Resource("ingest", resource.namespace, resource_id))
            elif type_.startswith("snapshots/"):
                out.append(Resource(f"snapshot/{type_.partition('/')[2]}", resource.namespace, resource_id))
        return out

    def all(self) -> Iterable[Resource]:
        """Every lease of every namespace."""
        with self._store.read() as conn:
            rows = conn.execute("SELECT namespace, id FROM leases ORDER BY namespace, id").fetchall()
        return [Resource("lease", namespace, lease_id) for namespace, lease_id in rows]

    def remove(self, resources: Sequence[Resource]) -> list[Resource]:
        """Delete the given leases; return those that existed. A failure is logged and skipped."""
        wanted = [r for r in resources if r.type == "lease"]
        deleted = self._store.delete_each("leases", "id", [(r.namespace, r.id) for r in wanted])
        return [r for r in wanted if (r.namespace, r.id) in deleted]


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:(Z)|([+-])(\d{2}):(\d{2}))", re.ASCII
)


def parse_rfc3339(value: str, what: str = "time") -> datetime:
    """Parse an RFC 3339 timestamp as Go's ``time.RFC3339`` does (``2006-01-02T15:04:05Z07:00``,
    optional fraction); return an aware datetime (fraction cut to microseconds).

    InvalidArgument naming ``what`` for anything else.
    """
    match = _RFC3339.fullmatch(value)
    if match is None:
        raise InvalidArgument(f"invalid {what} {value!r}: expected an RFC 3339 time such as 2024-05-01T12:00:00Z")
    year, month, day, hour, minute, second, fraction, zulu, sign, off_hours, off_minutes = match.groups()
    try:
        if zulu:
            tz: timezone = UTC
        else:
            offset = timedelta(hours=int(off_hours), minutes=int(off_minutes))
            tz = timezone(-offset if sign == "-" else offset)
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "0").ljust(6, "0")[:6]),
            tzinfo=tz,
        )
    except ValueError as err:
        raise InvalidArgument(f"invalid {what} {value!r}: {err}") from None


def _generate_id() -> str:
    """A unique lease id, valid as an identifier: nanoseconds since the epoch and 6 random hex digits."""
    return f"{time.time_ns()}-{secrets.token_hex(3)}"


def _check_resource(resource: LeaseResource) -> tuple[str, str]:
    """``(type, id)`` of a valid resource (a content id normalised as a digest); errors as containerd's."""
    type_, resource_id = resource.type, resource.id
    keys = type_.split("/")
    if keys[0] in ("content", "ingests"):
        if len(keys) != 1:
            raise InvalidArgument(f"invalid resource type {type_}")
        if keys[0] == "content":
            try:
                resource_id = str(Digest(resource_id))
            except InvalidArgument as err:
                raise InvalidArgument(f"invalid content resource id {resource_id}: {err}") from None
    elif keys[0] == "snapshots":
        if len(keys) != 2 or not keys[1]:
            raise InvalidArgument(f"invalid snapshot resource type {type_}")
    else:
        raise NotImplementedByPlugin(f"resource type {type_} not supported yet")
    if not resource_id:
        raise InvalidArgument(f"resource id of type {type_} must not be empty")
    return type_, resource_id


def _require_lease(conn: sqlite3.Connection, namespace: str, lease_id: str) -> None:
    if conn.execute("SELECT 1 FROM leases WHERE namespace = ? AND id = ?", (namespace, lease_id)).fetchone() is None:
        raise NotFound(f'lease "{lease_id}": not found')


def _labels(conn: sqlite3.Connection, namespace: str, lease_id: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT key, value FROM lease_labels WHERE namespace = ? AND lease = ? ORDER BY key", (namespace, lease_id)
    ).fetchall()
    return dict(rows)
