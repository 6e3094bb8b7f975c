"""The ``snapshotter`` plugin type: layered filesystems handed out as mounts (containerd's ``snapshots.Snapshotter``).

A snapshot is *committed* (immutable, usable as a parent), *active* (read-write, from
:meth:`~Snapshotter.prepare`, may be committed) or a *view* (read-only, from
:meth:`~Snapshotter.view`, never committed). Snapshots form a tree through their parents; one
key space holds all three kinds, so a key or name is used by at most one snapshot.

Contract for every implementation:

- Snapshotters are namespace-unaware. The metadata layer maps each namespace's keys to unique
  snapshotter keys, keeps per-namespace labels and references and drives garbage collection; a
  snapshotter used as a library just sees opaque keys.
- The snapshotter only hands out :class:`~core.types.Mount` lists; mounting and unmounting them is
  the caller's job, and mounts must be unmounted before the snapshot is committed or removed.
- Methods may be called concurrently from several threads.
- Errors come from :mod:`core.errors`; InvalidArgument for an empty key or name everywhere.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from core.errors import InvalidArgument, NotImplementedByPlugin
from core.types import EPOCH, Mount

__all__ = ["CAPABILITY_REBASE", "LABEL_REBASE", "Info", "Kind", "Snapshotter", "Usage"]

CAPABILITY_REBASE = "rebase"
"""Registration capability of a snapshotter that implements :meth:`Snapshotter.rebase`."""

LABEL_REBASE = "containerkit.io/snapshot/rebase"
"""Label on a parentless :meth:`~Snapshotter.prepare` that will end in :meth:`~Snapshotter.rebase`:
the snapshotter returns mounts shaped like those of a snapshot with parents (an overlay over an
empty lower, for overlayfs), so a differ records deletions as the snapshotter's whiteouts."""


class Kind(enum.Enum):
    """The kind of a snapshot; values are the wire enum's (``containerd.services.snapshots.v1.Kind``)."""

    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str) -> Kind:
        """``view``, ``active`` or ``committed``, any case; InvalidArgument otherwise."""
        try:
            return cls[value.upper()]
        except KeyError:
            raise InvalidArgument(f"unknown snapshot kind {value!r} (expected view, active or committed)") from None


@dataclass(frozen=True)
class Info:
    """A snapshot. ``parent`` is ``""`` for none. For :meth:`Snapshotter.update` only ``name`` and ``labels`` count."""

    kind: Kind
    name: str
    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    created_at: datetime = EPOCH
    updated_at: datetime = EPOCH

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels))


@dataclass(frozen=True)
class Usage:
    """Resources a snapshot uses on its own, excluding its parents: bytes and inodes."""

    size: int = 0
    inodes: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.size + other.size, self.inodes + other.inodes)


class Snapshotter(ABC):
    """A snapshotter plugin (wire type ``io.containerd.snapshotter.v1``)."""

    @abstractmethod
    def stat(self, key: str) -> Info:
        """The :class:`Info` of the snapshot with this key or name, of any kind. NotFound when absent."""

    @abstractmethod
    def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change the labels of snapshot ``info.name``; return the updated Info.

        Only labels are mutable. Field paths: ``labels`` replaces all labels, ``labels.<key>`` sets
        one (removes it when ``info.labels`` lacks the key or maps it to ``""``); none given means
        ``labels``. NotFound for an unknown snapshot; InvalidArgument for any other field path
        (kind, parent and name are immutable) or an invalid label.
        """

    @abstractmethod
    def usage(self, key: str) -> Usage:
        """Disk usage of the snapshot alone. Fixed once committed; for an active snapshot it is
        computed on demand and may take time proportional to its size. NotFound when absent."""

    @abstractmethod
    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active snapshot or view, as :meth:`prepare`/:meth:`view` returned them.

        NotFound when absent; FailedPrecondition for a committed snapshot (it has no mounts).
        """

    @abstractmethod
    def prepare(self, key: str, parent: str = "", labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create the active snapshot ``key`` on top of committed ``parent`` (``""``: empty); return its mounts.

        Mounting them yields the parent's content; changes are captured until :meth:`commit`, and
        the snapshot lives until :meth:`commit` or :meth:`remove`. AlreadyExists when ``key`` is taken;
        NotFound when ``parent`` does not exist; InvalidArgument when ``parent`` is not committed or
        a label is invalid.
        """

    @abstractmethod
    def view(self, key: str, parent: str, labels: Mapping[str, str] | None = None) -> list[Mount]:
        """Create the read-only view ``key`` of committed ``parent``; return its mounts.

        Like :meth:`prepare` with the same errors, except that the mounts are read-only (writes are
        refused or discarded) and the view can never be committed; :meth:`remove` releases it.
        """

    @abstractmethod
    def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Capture active snapshot ``key`` as committed snapshot ``name`` with ``key``'s parent.

        On success ``key`` no longer exists and ``name`` carries ``labels`` (the active snapshot's
        labels are not carried over). NotFound when ``key`` is absent; FailedPrecondition when it
        is a view or committed; AlreadyExists when ``name`` is taken.
        """

    def rebase(self, name: str, key: str, parent: str, labels: Mapping[str, str] | None = None) -> None:
        """Commit active snapshot ``key``, prepared without a parent and with :data:`LABEL_REBASE`, as
        ``name`` on top of committed ``parent`` (``""``: none); errors as :meth:`commit`, plus NotFound
        for a missing parent and InvalidArgument when ``key`` has a parent or ``parent`` is not committed.

        Lets layers unpack in parallel. Only snapshotters whose registration declares
        :data:`CAPABILITY_REBASE` implement it; the default raises NotImplementedByPlugin.
        """
        raise NotImplementedByPlugin(f"{type(self).__name__} cannot rebase snapshots")

    @abstractmethod
    def remove(self, key: str) -> None:
        """Remove the snapshot (any kind) and its data. NotFound when absent; FailedPrecondition
        while other snapshots have it as parent (remove those first)."""

    @abstractmethod
    def walk(self, filters: Sequence[str] = ()) -> Iterator[Info]:
        """Every snapshot matching any of ``filters`` (containerd filter expressions over ``name``,
        ``parent``, ``kind`` and ``labels.<key>``; all when none), in no particular order.
        InvalidArgument for a malformed filter."""

    def cleanup(self) -> None:  # noqa: B027 - optional, a no-op by default
        """Reclaim space left by removed snapshots (called after garbage collection). Default: nothing."""

    def close(self) -> None:  # noqa: B027 - optional, a no-op by default
        """Release the snapshotter's resources at shutdown; snapshots persist. Idempotent. Default: nothing."""
