"""Conversions shared by the core's gRPC services and ckctl (no gRPC imports): timestamps, field masks, mounts."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from core.types import EPOCH, Mount


def timestamp(when: datetime | None) -> Any:
    """A ``google.protobuf.Timestamp`` for ``when`` (naive datetimes are taken as UTC)."""
    from google.protobuf import timestamp_pb2

    if when is None or when == EPOCH:
        return timestamp_pb2.Timestamp()
    since = (when if when.tzinfo else when.replace(tzinfo=UTC)) - EPOCH  # exact: no float on the way
    return timestamp_pb2.Timestamp(seconds=since.days * 86400 + since.seconds, nanos=since.microseconds * 1000)


def datetime_of(stamp: Any) -> datetime:
    """The aware UTC datetime of a ``google.protobuf.Timestamp`` (EPOCH when unset)."""
    if not stamp.seconds and not stamp.nanos:
        return EPOCH
    value: datetime = stamp.ToDatetime(tzinfo=UTC)
    return value


def mask_paths(request: Any) -> list[str]:
    """The paths of a request's ``update_mask`` (``[]`` when absent)."""
    return list(request.update_mask.paths) if request.HasField("update_mask") else []


def mounts_of(messages: Iterable[Any]) -> list[Mount]:
    """The :class:`Mount` list of ``containerd.types.Mount`` messages."""
    return [Mount(m.type, m.source, tuple(m.options), m.target) for m in messages]
