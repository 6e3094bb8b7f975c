"""Progress of a pull or push: one :class:`Progress` event per step of each blob, handed to a :data:`ProgressFn`.

Events of one blob share its ``ref`` (``layer-sha256:...``); ``offset`` grows while ``state`` is
``downloading`` or ``uploading`` and the last event of a blob is ``done``, ``exists``, ``mounted`` or
``error``. A progress function may raise (a client that went away): the operation then stops with that
error, as after any other failure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["KINDS", "STATES", "Progress", "ProgressFn", "blob_ref"]

KINDS = ("index", "manifest", "config", "layer", "image", "signature")
"""What an event is about: a blob of one of these kinds, or (``image``) the whole operation."""

STATES = ("waiting", "downloading", "exists", "uploading", "mounted", "applying", "done", "error")
"""The states a blob (or the image) goes through."""


@dataclass(frozen=True)
class Progress:
    """One event: ``ref`` (``"<kind>-<digest>"``, or the image name for the overall state), ``kind`` (one
    of :data:`KINDS`), the blob's ``digest``, its ``state`` (one of :data:`STATES`), bytes done
    (``offset``) of ``total``, and a ``message`` (an error's, for ``error``)."""

    ref: str
    kind: str
    digest: str
    state: str
    offset: int
    total: int
    message: str = ""


ProgressFn = Callable[[Progress], None]
"""Receives events; called from worker threads, so it must be cheap and thread-safe."""


def blob_ref(kind: str, digest: str) -> str:
    """The ``ref`` of a blob's events: ``"<kind>-<digest>"``."""
    return f"{kind}-{digest}"
