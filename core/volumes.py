"""Named volumes: directories under the daemon's root that outlive the containers mounting them.

A volume belongs to a namespace. Its data is the directory ``<root>/<namespace>/<name>/_data``
(``root``, mode 0700, is ``<daemon root>/volumes`` in the daemon) and its record (driver ``local``, labels,
creation time) is a row of the metadata store's ``volumes`` table, which references
``namespaces(name)`` without cascade: a namespace holding volumes cannot be deleted (the message
names ``volumes``). Names are identifiers (:mod:`core.identifiers`) of at most
:data:`MAX_NAME_LENGTH` characters, so never a path (no ``/``, no ``..``).

A spec mount ``{"type": "volume", "source": NAME, ...}`` becomes a bind mount of the volume's data
directory (:meth:`VolumeStore.bind_mounts`, the volume made when missing). A container of the
namespace *uses* a volume while its stored spec mounts that volume's directory or anything under
it, whoever wrote the mount; removing a used volume is refused. Usable without the daemon:
``VolumeStore(MetadataStore(path), root)``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from core import identifiers
from core.crashpoints import crashpoint
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.files import remove_tree
from core.labels import validate_labels
from core.metadata.containers import ContainerStore
from core.metadata.namespaces import NamespaceStore
from core.metadata.store import MetadataStore, Migration, from_ns

__all__ = [
    "DRIVER",
    "MAX_NAME_LENGTH",
    "MOUNT_OPTIONS",
    "VOLUME_MIGRATIONS",
    "Volume",
    "VolumeStore",
    "bind_options",
    "validate_name",
]

log = logging.getLogger("containerkit.volumes")

DRIVER = "local"
"""The one volume driver: a directory on the daemon's filesystem."""

MAX_NAME_LENGTH = 64

MOUNT_OPTIONS = frozenset(
    {"ro", "rw", "bind", "rbind", "nosuid", "suid", "nodev", "dev", "noexec", "exec"}
    | {"private", "rprivate", "slave", "rslave", "shared", "rshared"}
)
"""The options a volume mount may carry; anything else is refused."""

DATA_DIR = "_data"

VOLUME_MIGRATIONS: tuple[Migration, ...] = (
    # 1: volumes, protecting their namespace.
    """
    CREATE TABLE volumes (
        namespace  TEXT    NOT NULL REFERENCES namespaces(name),
        name       TEXT    NOT NULL,
        driver     TEXT    NOT NULL,
        labels     TEXT    NOT NULL,  -- a JSON object of strings
        created_at INTEGER NOT NULL,  -- nanoseconds since the epoch, UTC
        PRIMARY KEY (namespace, name)
    );
    """,
)
"""The schema of component ``volumes``."""


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid volume name (an identifier of at most :data:`MAX_NAME_LENGTH`
    characters); InvalidArgument otherwise."""
    if len(name.encode()) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"volume name {name[:16]!r}... is longer than {MAX_NAME_LENGTH} characters")
    return identifiers.validate(name, "volume name")


def bind_options(options: Iterable[str]) -> list[str]:
    """The bind mount options for a volume mount's ``options``: each must be one of
    :data:`MOUNT_OPTIONS` (InvalidArgument otherwise); ``rbind`` comes first unless ``bind`` is given."""
    options = list(options)
    unknown = sorted(set(options) - MOUNT_OPTIONS)
    if unknown:
        known = ", ".join(sorted(MOUNT_OPTIONS))
        raise InvalidArgument(f"volume mount option(s) {', '.join(map(repr, unknown))} not supported; use {known}")
    return options if "bind" in options or "rbind" in options else ["rbind", *options]


@dataclass(frozen=True)
class Volume:
    """A volume's record; ``mountpoint`` is its data directory on this host."""

    name: str
    mountpoint: Path
    labels: Mapping[str, str] = field(hash=False)
    driver: str
    created_at: datetime


class VolumeStore:
    """Volumes per namespace: records in a :class:`MetadataStore`, data under ``root``.

    Every mutation is one transaction; a volume's directory exists exactly while its record does
    (a crash in between leaves a directory without record, which :meth:`prune` and a later
    :meth:`create` of that name remove, so old data never shows up in a new volume).
    """

    def __init__(self, store: MetadataStore, root: Path) -> None:
        """Use ``store`` (creating or upgrading the ``volumes`` table) and keep data under ``root``."""
        self._store = store
        self._root = Path(root)
        self._namespaces = NamespaceStore(store)
        self._containers = ContainerStore(store)
        store.migrate("volumes", VOLUME_MIGRATIONS)

    @property
    def root(self) -> Path:
        """The directory holding every namespace's volumes."""
        return self._root

    def path(self, namespace: str, name: str) -> Path:
        """The data directory of volume ``name`` of ``namespace`` (whether or not it exists).
        InvalidArgument for an invalid namespace or volume name."""
        return self._directory(namespace, name) / DATA_DIR

    def create(self, namespace: str, name: str, labels: Mapping[str, str] | None = None) -> Volume:
        """Create volume ``name`` in ``namespace`` (created if missing) with an empty data directory.

        InvalidArgument for a bad name or label; AlreadyExists when the name is taken.
        """
        volume, created = self._create(namespace, name, labels or {})
        if not created:
            raise AlreadyExists(f'volume "{name}": already exists')
        return volume

    def ensure(self, namespace: str, name: str) -> tuple[Volume, bool]:
        """Volume ``name`` of ``namespace``, created (without labels) when missing; and whether it was."""
        return self._create(namespace, name, {})

    def get(self, namespace: str, name: str) -> Volume:
        """Volume ``name`` of ``namespace``. NotFound when there is none (InvalidArgument for a bad name)."""
        directory = self._directory(namespace, name)
        with self._store.read() as conn:
            row = conn.execute(_SELECT + " AND name = ?", (namespace, name)).fetchone()
        if row is None:
            raise NotFound(f'volume "{name}" in namespace "{namespace}": not found')
        return _volume(row, directory.parent)

    def list(self, namespace: str, filters: Sequence[str] = ()) -> list[Volume]:
        """The volumes of ``namespace`` matching any of ``filters`` (fields ``name``, ``driver``,
        ``labels.<key>``), sorted by name. InvalidArgument for a malformed filter."""
        from core import filters as filter_language

        matches = filter_language.parse(list(filters))
        with self._store.read() as conn:
            rows = conn.execute(_SELECT + " ORDER BY name", (namespace,)).fetchall()
        volumes = [_volume(row, self._root / namespace) for row in rows]
        return [v for v in volumes if matches({"name": v.name, "driver": v.driver, "labels": dict(v.labels)})]

    def users(self, namespace: str) -> dict[str, list[str]]:
        """The containers of ``namespace`` using each volume, by volume name (only used volumes; ids sorted)."""
        namespace_dir = os.path.join(self._root, namespace)
        users: dict[str, list[str]] = {}
        for container in self._containers.list(namespace):
            mounts = (container.spec or {}).get("mounts") or []
            names = {_volume_under(namespace_dir, mount) for mount in mounts if isinstance(mount, dict)}
            for name in sorted(names - {None}):
                users.setdefault(name, []).append(container.id)
        return users

    def remove(self, namespace: str, name: str) -> None:
        """Delete volume ``name`` of ``namespace`` and its data.

        NotFound when there is none; FailedPrecondition, naming them, while containers of the
        namespace use it (:meth:`users`): remove those first.
        """
        directory = self._directory(namespace, name)
        with self._store.transaction() as conn:
            if conn.execute(_SELECT + " AND name = ?", (namespace, name)).fetchone() is None:
                raise NotFound(f'volume "{name}" in namespace "{namespace}": not found')
            users = self.users(namespace).get(name)
            if users:
                raise FailedPrecondition(f'volume "{name}" is in use by container(s) {", ".join(users)}')
            conn.execute("DELETE FROM volumes WHERE namespace = ? AND name = ?", (namespace, name))
        _remove_tree(directory)

    def bind_mounts(self, namespace: str, spec: dict[str, Any]) -> list[Volume]:
        """Turn every ``type: volume`` mount of ``spec`` (in place) into a bind mount of its volume's data
        directory, creating missing volumes; return the volumes created.

        InvalidArgument for a bad volume name or an option outside :data:`MOUNT_OPTIONS`, before
        anything is created.
        """
        mounts = [m for m in spec.get("mounts") or [] if isinstance(m, dict) and m.get("type") == "volume"]
        for mount in mounts:
            source = mount.get("source")
            validate_name(source if isinstance(source, str) else "")
            mount["options"] = bind_options(mount.get("options") or [])
        created = []
        for mount in mounts:
            volume, new = self.ensure(namespace, mount["source"])
            mount.update(type="bind", source=str(volume.mountpoint))
            if new:
                created.append(volume)
        return created

    def prune(self) -> list[Path]:
        """Remove the volume directories that have no record (left by a crash); return them. Not while
        volumes are being created (a new one may have its directory before its record is visible): the
        daemon prunes at start-up."""
        with self._store.read() as conn:
            known = {(ns, name) for ns, name in conn.execute("SELECT namespace, name FROM volumes")}
        orphans = [
            directory
            for namespace_dir in _subdirectories(self._root)
            for directory in _subdirectories(namespace_dir)
            if (namespace_dir.name, directory.name) not in known
        ]
        for directory in orphans:
            _remove_tree(directory)
        return orphans

    def _create(self, namespace: str, name: str, labels: Mapping[str, str]) -> tuple[Volume, bool]:
        directory = self._directory(namespace, name)
        labels = {key: value for key, value in validate_labels(labels).items() if value}
        now = time.time_ns()
        with self._store.transaction() as conn:
            row = conn.execute(_SELECT + " AND name = ?", (namespace, name)).fetchone()
            if row is not None:
                return _volume(row, directory.parent), False
            self._namespaces.ensure(namespace)
            conn.execute(
                "INSERT INTO volumes (namespace, name, driver, labels, created_at) VALUES (?, ?, ?, ?, ?)",
                (namespace, name, DRIVER, json.dumps(labels, sort_keys=True), now),
            )
            _remove_tree(directory)  # a leftover of a volume whose removal was cut short
            self._root.mkdir(mode=0o700, parents=True, exist_ok=True)  # volumes are for root's eyes only
            (directory / DATA_DIR).mkdir(parents=True)
            (directory / DATA_DIR).chmod(0o755)  # exactly, whatever the umask: what the container sees
            crashpoint("volumes.create")
        return Volume(name, directory / DATA_DIR, labels, DRIVER, from_ns(now)), True

    def _directory(self, namespace: str, name: str) -> Path:
        """``<root>/<namespace>/<name>``, both validated (so it never leaves ``root``)."""
        identifiers.validate(namespace, "namespace")
        return self._root / namespace / validate_name(name)


_SELECT = "SELECT name, driver, labels, created_at FROM volumes WHERE namespace = ?"


def _volume(row: tuple[str, str, str, int], namespace_dir: Path) -> Volume:
    name, driver, labels, created_at = row
    return Volume(name, namespace_dir / name / DATA_DIR, json.loads(labels), driver, from_ns(created_at))


def _volume_under(namespace_dir: str, mount: Mapping[str, Any]) -> str | None:
    """The name of the volume whose directory (under ``namespace_dir``) ``mount``'s source is in, if any."""
    source = mount.get("source")
    if not isinstance(source, str) or not source.startswith("/"):
        return None
    relative = os.path.relpath(os.path.normpath(source), namespace_dir)
    name = relative.split(os.sep)[0]
    return None if name in (".", "..") else name


def _subdirectories(directory: Path) -> list[Path]:
    try:
        return [entry for entry in directory.iterdir() if entry.is_dir() and not entry.is_symlink()]
    except FileNotFoundError:
        return []


def _remove_tree(directory: Path) -> None:
    """Remove ``directory`` and everything in it (nothing when absent); failures are logged, not raised
    (the record is gone already: the directory is a leftover that :meth:`VolumeStore.prune` retries)."""
    remove_tree(directory, lambda path, error: log.warning("removing %s: %s", path, error))
