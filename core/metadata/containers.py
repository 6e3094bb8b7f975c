"""Containers: per-namespace records of what a task is started from (containerd's ``metadata/containers.go``).

A container names its runtime (and the runtime's options), carries an OCI spec, the image it was
made from, the snapshotter and key of its root filesystem, labels and client extensions. Records
hold no run state. Every container is a garbage-collection root: it keeps its snapshot
(``snapshot/<snapshotter>``, key ``snapshot_key``) alive, and whatever its ``containerd.io/gc.ref.*``
labels name (:class:`ContainerKind`).

The spec travels as a ``google.protobuf.Any`` whose value is the spec's JSON; the record keeps the
type URL and the JSON bytes as they came (``ctr containers info`` shows them back), or the spec's
own encoding once something changed it.

Tables (component ``containers``): ``containers`` references ``namespaces(name)`` without cascade
(a namespace holding containers cannot be deleted: the message names ``containers``);
``container_labels`` and ``container_extensions`` go with their container.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from core.crashpoints import crashpoint
from core.errors import AlreadyExists, InvalidArgument, NotFound
from core.gc import Resource
from core.identifiers import validate
from core.labels import validate_label
from core.metadata.images import label_references
from core.metadata.namespaces import NamespaceStore
from core.metadata.store import MetadataStore, Migration, from_ns
from core.types import EPOCH

__all__ = [
    "CONTAINER_MIGRATIONS",
    "SPEC_TYPE_URL",
    "AnyValue",
    "Container",
    "ContainerKind",
    "ContainerStore",
    "decode_spec",
    "encode_spec",
]

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
"""The type URL containerd's clients give an OCI spec (JSON value)."""

AnyValue = tuple[str, bytes]
"""A ``google.protobuf.Any`` as stored: its type URL and value bytes."""

UPDATABLE = ("labels", "spec", "extensions", "image", "snapshotkey")
"""The field paths a container update takes (besides ``labels.<key>`` and ``extensions.<key>``);
all of them when an update names none, as in containerd."""

CONTAINER_MIGRATIONS: tuple[Migration, ...] = (
    # 1: containers (protecting their namespace), their labels and their extensions.
    """
    CREATE TABLE containers (
        namespace            TEXT    NOT NULL REFERENCES namespaces(name),
        id                   TEXT    NOT NULL,
        image                TEXT    NOT NULL,
        runtime_name         TEXT    NOT NULL,
        runtime_options_type TEXT,  -- NULL: no options
        runtime_options      BLOB,
        spec_type            TEXT    NOT NULL,
        spec                 BLOB    NOT NULL,  -- the spec's JSON
        snapshotter          TEXT    NOT NULL,
        snapshot_key         TEXT    NOT NULL,
        sandbox              TEXT    NOT NULL,
        created_at           INTEGER NOT NULL,  -- nanoseconds since the epoch, UTC
        updated_at           INTEGER NOT NULL,
        PRIMARY KEY (namespace, id)
    );
    CREATE TABLE container_labels (
        namespace TEXT NOT NULL,
        container TEXT NOT NULL,
        key       TEXT NOT NULL,
        value     TEXT NOT NULL,
        PRIMARY KEY (namespace, container, key),
        FOREIGN KEY (namespace, container) REFERENCES containers (namespace, id) ON DELETE CASCADE
    );
    CREATE TABLE container_extensions (
        namespace TEXT NOT NULL,
        container TEXT NOT NULL,
        name      TEXT NOT NULL,
        type_url  TEXT NOT NULL,
        value     BLOB NOT NULL,
        PRIMARY KEY (namespace, container, name),
        FOREIGN KEY (namespace, container) REFERENCES containers (namespace, id) ON DELETE CASCADE
    );
    """,
)
"""The schema of component ``containers``."""


def decode_spec(value: bytes) -> dict[str, Any]:
    """The spec a spec Any's JSON ``value`` holds; InvalidArgument unless it is a JSON object."""
    try:
        spec = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgument(f"container.Spec: not valid JSON: {err}: invalid argument") from None
    if not isinstance(spec, dict):
        raise InvalidArgument("container.Spec: not a JSON object: invalid argument")
    return spec


def encode_spec(spec: Mapping[str, Any]) -> bytes:
    """The JSON value of a spec Any (compact, as Go's encoder writes it)."""
    return json.dumps(spec, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Container:
    """A container record; the store sets the timestamps.

    ``spec`` is the decoded OCI spec (None: missing, which create refuses) and ``spec_type_url`` its
    Any's type URL. ``spec_json``, when set, is the encoding of ``spec`` to store and hand back
    byte for byte (what the client sent); empty means :func:`encode_spec`.
    """

    id: str
    runtime_name: str = ""
    spec: Mapping[str, Any] | None = field(default=None, hash=False)
    spec_type_url: str = SPEC_TYPE_URL
    spec_json: bytes = field(default=b"", compare=False, repr=False)
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    image: str = ""
    runtime_options: AnyValue | None = None
    snapshotter: str = ""
    snapshot_key: str = ""
    extensions: Mapping[str, AnyValue] = field(default_factory=dict, hash=False)
    sandbox: str = ""
    created_at: datetime = EPOCH
    updated_at: datetime = EPOCH

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "extensions", dict(self.extensions))

    def spec_value(self) -> bytes:
        """The spec Any's value: ``spec_json``, or the spec encoded (``b""`` without spec)."""
        if self.spec_json or self.spec is None:
            return self.spec_json
        return encode_spec(self.spec)


class ContainerStore:
    """Containers per namespace, in a :class:`MetadataStore`. One transaction per mutation.

    Errors are those of :mod:`core.errors` with containerd's wording (``ctr`` prints them).
    """

    def __init__(self, store: MetadataStore) -> None:
        """Use ``store``, creating or upgrading the ``containers`` tables in it."""
        self._store = store
        self._namespaces = NamespaceStore(store)
        store.migrate("containers", CONTAINER_MIGRATIONS)

    @property
    def store(self) -> MetadataStore:
        """The metadata store the containers live in."""
        return self._store

    def get(self, namespace: str, id: str) -> Container:
        """The container ``id`` of ``namespace``. NotFound when there is none."""
        with self._store.read() as conn:
            container = _read(conn, namespace, id)
        if container is None:
            raise NotFound(f'container "{id}" in namespace "{namespace}": not found')
        return container

    def runtime_name(self, namespace: str, id: str) -> str:
        """The runtime name of container ``id`` of ``namespace`` (what a task lookup needs, without decoding
        the rest). NotFound when there is none."""
        with self._store.read() as conn:
            row = conn.execute(
                "SELECT runtime_name FROM containers WHERE namespace = ? AND id = ?", (namespace, id)
            ).fetchone()
        if row is None:
            raise NotFound(f'container "{id}" in namespace "{namespace}": not found')
        return str(row[0])

    def list(self, namespace: str, filters: Sequence[str] = ()) -> list[Container]:
        """The containers of ``namespace`` matching any of ``filters``, sorted by id.

        Fields: ``id``, ``image``, ``runtime.name``, ``snapshotter``, ``labels.<key>``.
        InvalidArgument for a malformed filter (worded as containerd's).
        """
        from core import filters as filter_language

        try:
            matches = filter_language.parse(list(filters))
        except InvalidArgument as err:
            # containerd's parse error ends with the code's text, and its store wraps it with it again
            raise InvalidArgument(f"{err}: invalid argument: invalid argument") from None
        with self._store.read() as conn:
            containers = _read_all(conn, namespace)
        return [c for c in containers if matches(_fields(c))]

    def create(self, namespace: str, container: Container) -> Container:
        """Store ``container`` in ``namespace`` (created if missing); return it with its timestamps.

        Labels with an empty value are dropped. InvalidArgument (``create container failed
        validation: ...``) for an invalid id, label or extension name, a missing runtime name or
        spec, or a snapshot key without snapshotter; AlreadyExists when the id is taken.
        """
        _validate(container, "create container failed validation")
        now = time.time_ns()
        with self._store.gc_lock, self._store.transaction() as conn:
            self._namespaces.ensure(namespace)
            if _read(conn, namespace, container.id) is not None:
                raise AlreadyExists(f'container "{container.id}": already exists')
            stored = _stored(container, from_ns(now), now)
            _write(conn, namespace, stored, now, insert=True)
            crashpoint("containers.create.before-commit")
        return stored

    def update(self, namespace: str, container: Container, fieldpaths: Sequence[str] = ()) -> Container:
        """Change the container ``container.id`` as containerd does; return it as stored.

        Field paths: ``labels``, ``labels.<key>`` (removed when absent or empty in ``container``),
        ``extensions``, ``extensions.<key>`` (removed when absent), ``spec``, ``image``,
        ``snapshotkey``. None given: all of these, and InvalidArgument unless ``snapshotter`` and
        ``runtime_name`` are unchanged (they are immutable). InvalidArgument for an empty id,
        another path or an invalid result; NotFound for an unknown container.
        """
        if not container.id:
            raise InvalidArgument("must specify a container id: invalid argument")
        now = time.time_ns()
        with self._store.gc_lock, self._store.transaction() as conn:
            current = _read(conn, namespace, container.id)
            if current is None:
                raise NotFound(_missing(conn, namespace, container.id, "update"))
            if not fieldpaths:
                if current.snapshotter != container.snapshotter:
                    raise InvalidArgument("container.Snapshotter field is immutable: invalid argument")
                if current.runtime_name != container.runtime_name:
                    raise InvalidArgument("container.Runtime.Name field is immutable: invalid argument")
            updated = _apply(current, container, fieldpaths or UPDATABLE)
            _validate(updated, "update failed validation")
            stored = _stored(updated, current.created_at, now)
            _write(conn, namespace, stored, now, insert=False)
        return stored

    def delete(self, namespace: str, id: str) -> None:
        """Delete the container record (its snapshot stays until nothing else keeps it). NotFound when absent."""
        with self._store.transaction() as conn:
            cursor = conn.execute("DELETE FROM containers WHERE namespace = ? AND id = ?", (namespace, id))
            if cursor.rowcount == 0:
                raise NotFound(_missing(conn, namespace, id, "delete"))


class ContainerKind:
    """The garbage collector's view of containers (type ``container``).

    Every container is a root; it references its snapshot ``("snapshot/<snapshotter>", ns, key)``
    (when it has one) and what its ``containerd.io/gc.ref.*`` labels name.
    """

    types: tuple[str, ...] = ("container",)

    def __init__(self, containers: ContainerStore) -> None:
        self._store = containers.store
        self._edges: dict[Resource, list[Resource]] = {}

    def roots(self) -> Iterable[Resource]:
        """Every container of every namespace (loads every container's edges for :meth:`references`)."""
        with self._store.read() as conn:
            rows = conn.execute(
                "SELECT namespace, id, snapshotter, snapshot_key FROM containers ORDER BY namespace, id"
            ).fetchall()
            labels: dict[tuple[str, str], dict[str, str]] = {}
            for namespace, id, key, value in conn.execute(
                "SELECT namespace, container, key, value FROM container_labels"
            ):
                labels.setdefault((namespace, id), {})[key] = value
        self._edges = {}
        for namespace, id, snapshotter, key in rows:
            snapshot = [Resource(f"snapshot/{snapshotter}", namespace, key)] if snapshotter and key else []
            held = label_references(namespace, labels.get((namespace, id), {}))
            self._edges[Resource("container", namespace, id)] = snapshot + held
        return list(self._edges)

    def references(self, resource: Resource) -> Iterable[Resource]:
        """The container's snapshot and its label references, as :meth:`roots` loaded them."""
        return self._edges.get(resource, [])

    def all(self) -> Iterable[Resource]:
        """Every container of every namespace."""
        with self._store.read() as conn:
            rows = conn.execute("SELECT namespace, id FROM containers ORDER BY namespace, id").fetchall()
        return [Resource("container", namespace, id) for namespace, id in rows]

    def remove(self, resources: Sequence[Resource]) -> list[Resource]:
        """Delete the given containers; return those that existed (never called for roots in practice)."""
        deleted = self._store.delete_each("containers", "id", [(r.namespace, r.id) for r in resources])
        return [r for r in resources if (r.namespace, r.id) in deleted]


def _validate(container: Container, context: str) -> None:
    """InvalidArgument, prefixed with ``context``, as containerd's validateContainer."""

    def invalid(message: str) -> InvalidArgument:
        return InvalidArgument(f"{context}: {message}: invalid argument")

    try:
        validate(container.id)
    except InvalidArgument as err:
        raise invalid(f"container.ID: {err}") from None
    if "" in container.extensions:
        raise invalid("container.Extension keys must not be zero-length")
    for key, value in container.labels.items():
        try:
            validate_label(key, value)
        except InvalidArgument as err:
            raise invalid(f"containers.Labels: {err}") from None
    if not container.runtime_name:
        raise invalid("container.Runtime.Name must be set")
    if container.spec is None:
        raise invalid("container.Spec must be set")
    if container.snapshot_key and not container.snapshotter:
        raise invalid("container.Snapshotter must be set if container.SnapshotKey is set")


def _apply(current: Container, given: Container, fieldpaths: Iterable[str]) -> Container:
    """``current`` with the fields ``fieldpaths`` name taken from ``given``."""
    labels, extensions = dict(current.labels), dict(current.extensions)
    changes: dict[str, Any] = {}
    for path in fieldpaths:
        if path.startswith("labels."):
            key = path.removeprefix("labels.")
            labels[key] = given.labels.get(key, "")
        elif path.startswith("extensions."):
            key = path.removeprefix("extensions.")
            extensions.pop(key, None)
            if key in given.extensions:
                extensions[key] = given.extensions[key]
        elif path == "labels":
            labels = dict(given.labels)
        elif path == "extensions":
            extensions = dict(given.extensions)
        elif path == "spec":
            changes.update(spec=given.spec, spec_type_url=given.spec_type_url, spec_json=given.spec_json)
        elif path == "image":
            changes["image"] = given.image
        elif path == "snapshotkey":
            changes["snapshot_key"] = given.snapshot_key
        else:
            raise InvalidArgument(f'cannot update "{path}" field on "{given.id}": invalid argument')
    return replace(current, labels=labels, extensions=extensions, **changes)


def _stored(container: Container, created: datetime, now: int) -> Container:
    """``container`` as the store keeps it: empty-valued labels dropped, spec encoded, timestamps set."""
    return replace(
        container,
        labels={key: value for key, value in container.labels.items() if value},
        spec_json=container.spec_value(),
        created_at=created,
        updated_at=from_ns(now),
    )


def _missing(conn: sqlite3.Connection, namespace: str, id: str, verb: str) -> str:
    """containerd's NotFound message for updating or deleting an absent container (it words the
    case of a namespace without any container differently)."""
    if conn.execute("SELECT 1 FROM containers WHERE namespace = ? LIMIT 1", (namespace,)).fetchone() is None:
        return f'cannot {verb} container "{id}" in namespace "{namespace}": not found'
    return f'container "{id}": not found' if verb == "update" else f"container {id}: not found"


_COLUMNS = (
    "id, image, runtime_name, runtime_options_type, runtime_options, spec_type, spec, snapshotter,"
    " snapshot_key, sandbox, created_at, updated_at"
)


def _write(conn: sqlite3.Connection, namespace: str, container: Container, now: int, *, insert: bool) -> None:
    """Insert the container (created and updated ``now``) or overwrite it (updated ``now``; id and
    creation time kept)."""
    options = container.runtime_options or (None, None)
    values = (
        container.image,
        container.runtime_name,
        *options,
        container.spec_type_url,
        container.spec_json,
        container.snapshotter,
        container.snapshot_key,
        container.sandbox,
    )
    if insert:
        conn.execute(
            f"INSERT INTO containers (namespace, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (namespace, container.id, *values, now, now),
        )
    else:
        conn.execute(
            "UPDATE containers SET image = ?, runtime_name = ?, runtime_options_type = ?, runtime_options = ?,"
            " spec_type = ?, spec = ?, snapshotter = ?, snapshot_key = ?, sandbox = ?, updated_at = ?"
            " WHERE namespace = ? AND id = ?",
            (*values, now, namespace, container.id),
        )
        for table in ("container_labels", "container_extensions"):
            conn.execute(f"DELETE FROM {table} WHERE namespace = ? AND container = ?", (namespace, container.id))
    conn.executemany(
        "INSERT INTO container_labels (namespace, container, key, value) VALUES (?, ?, ?, ?)",
        [(namespace, container.id, key, value) for key, value in container.labels.items()],
    )
    conn.executemany(
        "INSERT INTO container_extensions (namespace, container, name, type_url, value) VALUES (?, ?, ?, ?, ?)",
        [(namespace, container.id, name, *value) for name, value in container.extensions.items()],
    )


def _read(conn: sqlite3.Connection, namespace: str, id: str) -> Container | None:
    found = _read_all(conn, namespace, id)
    return found[0] if found else None


def _read_all(conn: sqlite3.Connection, namespace: str, id: str | None = None) -> list[Container]:
    """The containers of ``namespace`` (only ``id`` when given), sorted by id."""
    args: tuple[str, ...] = (namespace,) if id is None else (namespace, id)

    def where(column: str) -> str:
        return "namespace = ?" if id is None else f"namespace = ? AND {column} = ?"

    rows = conn.execute(f"SELECT {_COLUMNS} FROM containers WHERE {where('id')} ORDER BY id", args).fetchall()
    labels: dict[str, dict[str, str]] = {row[0]: {} for row in rows}
    for container, key, value in conn.execute(
        f"SELECT container, key, value FROM container_labels WHERE {where('container')} ORDER BY key", args
    ):
        labels[container][key] = value
    extensions: dict[str, dict[str, AnyValue]] = {row[0]: {} for row in rows}
    for container, name, type_url, value in conn.execute(
        f"SELECT container, name, type_url, value FROM container_extensions WHERE {where('container')}", args
    ):
        extensions[container][name] = (type_url, bytes(value))
    return [_container(row, labels[row[0]], extensions[row[0]]) for row in rows]


def _container(row: tuple[Any, ...], labels: dict[str, str], extensions: dict[str, AnyValue]) -> Container:
    (id, image, runtime, options_type, options, spec_type, spec, snapshotter, key, sandbox, created, updated) = row
    spec_json = bytes(spec)
    return Container(
        id=id,
        runtime_name=runtime,
        spec=decode_spec(spec_json),
        spec_type_url=spec_type,
        spec_json=spec_json,
        labels=labels,
        image=image,
        runtime_options=None if options_type is None else (options_type, bytes(options)),
        snapshotter=snapshotter,
        snapshot_key=key,
        extensions=extensions,
        sandbox=sandbox,
        created_at=from_ns(created),
        updated_at=from_ns(updated),
    )


def _fields(container: Container) -> dict[str, Any]:
    """What filters see of a container (containerd's adaptContainer, plus ``snapshotter``); empty is absent."""
    return {
        "id": container.id or None,
        "image": container.image or None,
        "runtime": {"name": container.runtime_name or None},
        "snapshotter": container.snapshotter or None,
        "labels": container.labels,
    }
