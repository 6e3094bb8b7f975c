"""Wire messages as ckctl prints them: timestamps, ages and sizes (as ctr shows them), and listings
whose table cells are derived from the JSON record (a size in bytes in JSON, ``3.0 MiB`` in the table)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from core.cli.output import print_listing, print_table

SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")

Cell = Callable[[dict[str, Any]], object]


def is_set(stamp: Any) -> bool:
    """Whether a ``google.protobuf.Timestamp`` holds a time (the zero one means "unset")."""
    return bool(stamp.seconds or stamp.nanos)


def timestamp_text(stamp: Any) -> str:
    """A ``google.protobuf.Timestamp`` as RFC 3339 in UTC, to the nanosecond it carries; ``""`` when unset."""
    return str(stamp.ToJsonString()) if is_set(stamp) else ""


def when(text: str) -> str:
    """An RFC 3339 time from :func:`timestamp_text` to the second, as ``ctr`` shows times; ``-`` when unset."""
    if not text:
        return "-"
    return datetime.fromisoformat(text).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(text: str, now: datetime | None = None) -> str:
    """How long ago an RFC 3339 time was, in the words of ``ctr`` (go-units' HumanDuration); ``-`` when unset."""
    if not text:
        return "-"
    elapsed = ((now or datetime.now(UTC)) - datetime.fromisoformat(text)).total_seconds()
    seconds = int(elapsed)
    if seconds < 1:
        return "Less than a second"
    if seconds == 1:
        return "1 second"
    if seconds < 60:
        return f"{seconds} seconds"
    minutes = seconds // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(elapsed / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // (24 * 7)} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // (24 * 30)} months"
    return f"{int(elapsed // 3600) // (24 * 365)} years"


def human_size(size: int) -> str:
    """A byte count in binary units with one decimal, as ``ctr`` prints sizes (``3.0 MiB``, ``120.0 B``)."""
    value, unit = float(size), 0
    while value >= 1024 and unit < len(SIZE_UNITS) - 1:
        value /= 1024
        unit += 1
    return f"{value:.1f} {SIZE_UNITS[unit]}"


def labels_text(labels: Mapping[str, str]) -> str:
    """Labels as ``k=v,k2=v2`` (sorted by key)."""
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def labels_cell(record: Mapping[str, Any]) -> str:
    """A record's ``labels`` for a table cell: ``-`` when there are none, as ``ctr``."""
    return labels_text(record["labels"]) or "-"


def print_records(
    records: Sequence[dict[str, Any]], columns: Mapping[str, Cell], args: argparse.Namespace, *, key: str
) -> None:
    """Print ``records`` as JSON (``--json``), one ``key`` per line (``-q``), or as a table with one
    column per entry of ``columns`` (header → the cell of a record)."""
    if args.json or args.quiet:
        print_listing(records, (), as_json=args.json, quiet=args.quiet, key=key)
    else:
        print_table(list(columns), [[cell(record) for cell in columns.values()] for record in records])
