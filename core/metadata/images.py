"""Images: per-namespace names for a target descriptor (a manifest or an index), with labels.

Semantics of containerd's ``metadata/images.go``. An image stores its name, the target's media
type, digest, size and annotations (other descriptor fields are not kept, as in containerd), its
labels and its creation and update times. Every image is a garbage-collection root: it keeps its
target blob alive, and whatever its ``containerd.io/gc.ref.*`` labels name.

Tables (component ``images``): ``images`` references ``namespaces(name)`` without cascade, so a
namespace holding images cannot be deleted (``namespace "x" must be empty, but it still has
images``); ``image_labels`` goes with its image.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from core.errors import AlreadyExists, InvalidArgument, NotFound
from core.gc import Resource
from core.labels import validate_labels
from core.metadata.namespaces import NamespaceStore
from core.metadata.store import MetadataStore, Migration, from_ns
from core.types import EPOCH, Descriptor

__all__ = ["IMAGE_MIGRATIONS", "Image", "ImageKind", "ImageStore", "label_references"]


LABEL_GC_ROOT = "containerd.io/gc.root"
"""A blob (or snapshot) with this label is a garbage-collection root, whatever its value."""
LABEL_GC_REF_CONTENT = "containerd.io/gc.ref.content"
"""Label (alone or followed by ``.name`` / ``/name``) whose value is the digest of a blob the object keeps alive."""
LABEL_GC_REF_SNAPSHOT = "containerd.io/gc.ref.snapshot."
"""Label prefix ``...snapshot.<snapshotter>[/name]`` whose value is the key of a snapshot the object keeps alive."""

IMAGE_MIGRATIONS: tuple[Migration, ...] = (
    # 1: images (protecting their namespace) and their labels.
    """
    CREATE TABLE images (
        namespace   TEXT    NOT NULL REFERENCES namespaces(name),
        name        TEXT    NOT NULL,
        media_type  TEXT    NOT NULL,
        digest      TEXT    NOT NULL,
        size        INTEGER NOT NULL,
        annotations TEXT    NOT NULL DEFAULT '{}',  -- JSON object of the target's annotations
        created_at  INTEGER NOT NULL,  -- nanoseconds since the epoch, UTC
        updated_at  INTEGER NOT NULL,
        PRIMARY KEY (namespace, name)
    );
    CREATE TABLE image_labels (
        namespace TEXT NOT NULL,
        image     TEXT NOT NULL,
        key       TEXT NOT NULL,
        value     TEXT NOT NULL,
        PRIMARY KEY (namespace, image, key),
        FOREIGN KEY (namespace, image) REFERENCES images (namespace, name) ON DELETE CASCADE ON UPDATE CASCADE
    );
    """,
)
"""The schema of component ``images``."""


def migrate(store: MetadataStore) -> None:
    """Create or upgrade the ``images`` tables in ``store`` (what :class:`ImageStore` does when built)."""
    store.migrate("images", IMAGE_MIGRATIONS)


@dataclass(frozen=True)
class Image:
    """An image: a ``name`` for a ``target`` descriptor, with labels and timestamps (set by the store)."""

    name: str
    target: Descriptor
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    created_at: datetime = EPOCH
    updated_at: datetime = EPOCH

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels))


class ImageStore:
    """Images per namespace, in a :class:`MetadataStore`. One transaction per mutation."""

    def __init__(self, store: MetadataStore) -> None:
        """Use ``store``, creating or upgrading the ``images`` tables in it."""
        self._store = store
        self._namespaces = NamespaceStore(store)
        migrate(store)

    @property
    def store(self) -> MetadataStore:
        """The metadata store the images live in."""
        return self._store

    def get(self, namespace: str, name: str) -> Image:
        """The image ``name`` of ``namespace``. NotFound when there is none."""
        with self._store.read() as conn:
            image = _read(conn, namespace, name)
        if image is None:
            raise NotFound(f'image "{name}": not found')
        return image

    def list(self, namespace: str, filters: Sequence[str] = ()) -> list[Image]:
        """The images of ``namespace`` matching ``filters``, sorted by name.

        Fields: ``name``, ``target.digest``, ``target.mediatype``, ``labels.<key>``,
        ``annotations.<key>`` (the target's). InvalidArgument for a malformed filter.
        """
        from core import filters as filter_language

        matches = filter_language.parse(list(filters))
        with self._store.read() as conn:
            rows = conn.execute(
                "SELECT name, media_type, digest, size, annotations, created_at, updated_at FROM images"
                " WHERE namespace = ? ORDER BY name",
                (namespace,),
            ).fetchall()
            labels: dict[str, dict[str, str]] = {row[0]: {} for row in rows}
            for image, key, value in conn.execute(
                "SELECT image, key, value FROM image_labels WHERE namespace = ? ORDER BY image, key", (namespace,)
            ):
                labels[image][key] = value
        images = [_image(row, labels[row[0]]) for row in rows]
        if matches is filter_language.match_all:  # no filters: skip building each image's fields
            return images
        return [image for image in images if matches(_fields(image))]

    def create(self, namespace: str, image: Image) -> Image:
        """Store ``image`` in ``namespace`` (created if missing); return it with its timestamps.

        Labels and annotations with an empty value are dropped. InvalidArgument for an invalid
        namespace, an empty name, an invalid label, or a target without media type or with a size
        of 0; AlreadyExists when the name is taken.
        """
        image = _validated(image)
        now = time.time_ns()
        with self._store.gc_lock, self._store.transaction() as conn:
            self._namespaces.ensure(namespace)
            if _read(conn, namespace, image.name) is not None:
                raise AlreadyExists(f'image "{image.name}": already exists')
            _write(conn, namespace, image, now, insert=True)
        return Image(image.name, image.target, image.labels, from_ns(now), from_ns(now))

    def update(self, namespace: str, image: Image, fieldpaths: Sequence[str] = ()) -> Image:
        """Change the image named ``image.name``; return it as stored.

        Field paths, as containerd: ``labels`` (replace all), ``labels.<key>`` (set one, removed when
        absent or empty in ``image.labels``), ``target`` (the whole descriptor), ``annotations``
        (the target's, all), ``annotations.<key>`` (one). None given: replace target and labels.
        InvalidArgument for an empty name, another field path or an invalid result; NotFound for
        an unknown image.
        """
        if not image.name:
            raise InvalidArgument("image name is required for update")
        now = time.time_ns()
        with self._store.gc_lock, self._store.transaction() as conn:
            current = _read(conn, namespace, image.name)
            if current is None:
                raise NotFound(f'image "{image.name}": not found')
            if fieldpaths:
                target, labels = current.target, dict(current.labels)
                annotations = dict(target.annotations)
                for path in fieldpaths:
                    if path.startswith("labels."):
                        key = path.removeprefix("labels.")
                        labels[key] = image.labels.get(key, "")
                    elif path.startswith("annotations."):
                        key = path.removeprefix("annotations.")
                        annotations[key] = image.target.annotations.get(key, "")
                    elif path == "labels":
                        labels = dict(image.labels)
                    elif path == "target":
                        target = image.target
                        annotations = dict(image.target.annotations)
                    elif path == "annotations":
                        annotations = dict(image.target.annotations)
                    else:
                        raise InvalidArgument(f'cannot update "{path}" field on image "{image.name}"')
                target = Descriptor(target.media_type, target.digest, target.size, annotations)
                updated = Image(image.name, target, labels)
            else:
                updated = image
            updated = _validated(updated)
            _write(conn, namespace, updated, now, insert=False)
        return Image(updated.name, updated.target, updated.labels, current.created_at, from_ns(now))

    def delete(self, namespace: str, name: str) -> None:
        """Delete the image (not its content: the collector removes what nothing references any more).

        NotFound when there is no such image.
        """
        with self._store.transaction() as conn:
            cursor = conn.execute("DELETE FROM images WHERE namespace = ? AND name = ?", (namespace, name))
            if cursor.rowcount == 0:
                raise NotFound(f'image "{name}": not found')


class ImageKind:
    """The garbage collector's view of images (type ``image``).

    Every image is a root; it references its target blob ``("content", ns, digest)`` and what its
    ``containerd.io/gc.ref.*`` labels name. :meth:`all` lists every image for completeness; being
    roots, they are never swept.
    """

    types: tuple[str, ...] = ("image",)

    def __init__(self, images: ImageStore) -> None:
        self._store = images.store

    def roots(self) -> Iterable[Resource]:
        """Every image of every namespace."""
        return self.all()

    def references(self, resource: Resource) -> Iterable[Resource]:
        """The image's target blob and its label references."""
        if resource.type != "image":
            return []
        with self._store.read() as conn:
            row = conn.execute(
                "SELECT digest FROM images WHERE namespace = ? AND name = ?", (resource.namespace, resource.id)
            ).fetchone()
            if row is None:
                return []
            labels = dict(
                conn.execute(
                    "SELECT key, value FROM image_labels WHERE namespace = ? AND image = ?",
                    (resource.namespace, resource.id),
                ).fetchall()
            )
        return [Resource("content", resource.namespace, row[0]), *label_references(resource.namespace, labels)]

    def all(self) -> Iterable[Resource]:
        """Every image of every namespace."""
        with self._store.read() as conn:
            rows = conn.execute("SELECT namespace, name FROM images ORDER BY namespace, name").fetchall()
        return [Resource("image", namespace, name) for namespace, name in rows]

    def remove(self, resources: Sequence[Resource]) -> list[Resource]:
        """Delete the given images; return those that existed (never called for roots in practice)."""
        wanted = [r for r in resources if r.type == "image"]
        deleted = self._store.delete_each("images", "name", [(r.namespace, r.id) for r in wanted])
        return [r for r in wanted if (r.namespace, r.id) in deleted]


def label_references(namespace: str, labels: Mapping[str, str]) -> list[Resource]:
    """The GC references that ``labels`` of an object in ``namespace`` make, as containerd reads them.

    ``containerd.io/gc.ref.content`` and ``containerd.io/gc.ref.content.<any>`` (or ``/<any>``) ->
    ``("content", namespace, value)``; ``containerd.io/gc.ref.snapshot.<snapshotter>[/<any>]`` ->
    ``("snapshot/<snapshotter>", namespace, value)``. Values are not checked (a bad one is a dead edge).
    """
    out = []
    for key, value in sorted(labels.items()):
        if key.startswith(LABEL_GC_REF_CONTENT):
            rest = key[len(LABEL_GC_REF_CONTENT) :]
            if rest == "" or rest[0] in "./":
                out.append(Resource("content", namespace, value))
        elif key.startswith(LABEL_GC_REF_SNAPSHOT):
            snapshotter = key[len(LABEL_GC_REF_SNAPSHOT) :].partition("/")[0]
            if snapshotter:
                out.append(Resource(f"snapshot/{snapshotter}", namespace, value))
    return out


def _validated(image: Image) -> Image:
    """``image`` with empty-valued labels and annotations dropped; InvalidArgument as containerd's validateImage."""
    if not image.name:
        raise InvalidArgument("image name must not be empty")
    labels = validate_labels(image.labels)
    target = image.target
    if target.size <= 0:
        raise InvalidArgument("Target.Size must be greater than zero")
    if not target.media_type:
        raise InvalidArgument("Target.MediaType must be set")
    annotations = {key: value for key, value in target.annotations.items() if value}
    return Image(
        image.name,
        Descriptor(target.media_type, target.digest, target.size, annotations),
        {key: value for key, value in labels.items() if value},
    )


def _write(conn: sqlite3.Connection, namespace: str, image: Image, now: int, *, insert: bool) -> None:
    """Insert the image (created and updated ``now``) or overwrite its target and labels (updated ``now``)."""
    target = image.target
    values = (target.media_type, str(target.digest), target.size, json.dumps(dict(target.annotations), sort_keys=True))
    if insert:
        conn.execute(
            "INSERT INTO images (namespace, name, media_type, digest, size, annotations, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (namespace, image.name, *values, now, now),
        )
    else:
        conn.execute(
            "UPDATE images SET media_type = ?, digest = ?, size = ?, annotations = ?, updated_at = ?"
            " WHERE namespace = ? AND name = ?",
            (*values, now, namespace, image.name),
        )
        conn.execute("DELETE FROM image_labels WHERE namespace = ? AND image = ?", (namespace, image.name))
    conn.executemany(
        "INSERT INTO image_labels (namespace, image, key, value) VALUES (?, ?, ?, ?)",
        [(namespace, image.name, key, value) for key, value in image.labels.items()],
    )


def _read(conn: sqlite3.Connection, namespace: str, name: str) -> Image | None:
    row = conn.execute(
        "SELECT name, media_type, digest, size, annotations, created_at, updated_at FROM images"
        " WHERE namespace = ? AND name = ?",
        (namespace, name),
    ).fetchone()
    if row is None:
        return None
    labels = conn.execute(
        "SELECT key, value FROM image_labels WHERE namespace = ? AND image = ? ORDER BY key", (namespace, name)
    ).fetchall()
    return _image(row, dict(labels))


def _image(row: tuple[Any, ...], labels: dict[str, str]) -> Image:
    name, media_type, digest, size, annotations, created, updated = row
    target = Descriptor(media_type, digest, size, {} if annotations == "{}" else json.loads(annotations))
    return Image(name, target, labels, from_ns(created), from_ns(updated))


def _fields(image: Image) -> dict[str, Any]:
    """What filters see of an image (containerd's adaptImage)."""
    return {
        "name": image.name,
        "target": {"digest": str(image.target.digest), "mediatype": image.target.media_type},
        "labels": image.labels,
        "annotations": image.target.annotations,
    }
