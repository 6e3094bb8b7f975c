"""What ckctl's commands share in reading their arguments: ``KEY=VALUE`` labels, Go-style durations,
the listing flags, and verbs applied to many positional arguments at once."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable
from datetime import timedelta

from core.cli.client import CliError

# Go's time.ParseDuration units, as ctr's flags take them.
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_labels(pairs: Iterable[str]) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a dict; ``KEY=`` means the empty value, a bare ``KEY`` means ``true`` (as ctr)."""
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        value = value if sep else "true"
        if not key:
            raise CliError(f"label {pair!r} has no key: use KEY=VALUE")
        labels[key] = value
    return labels


def label_changes(pairs: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """``KEY=VALUE`` arguments of a ``label`` verb as the labels to send and the update mask's paths:
    one ``labels.KEY`` path per key, an empty value clearing that label."""
    labels = parse_labels(pairs)
    return {key: value for key, value in labels.items() if value}, [f"labels.{key}" for key in labels]


def parse_duration(text: str) -> timedelta:
    """A Go duration (``90s``, ``30m``, ``1h30m``, ``1.5h``; ``0`` alone needs no unit) as a timedelta.

    CliError for anything else, negative durations included.
    """
    value = text.strip()
    if value == "0":
        return timedelta(0)
    seconds, position = 0.0, 0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if not value or position != len(value):
        raise CliError(f"invalid duration {text!r}: use a number with a unit (ns, us, ms, s, m, h), e.g. 30m or 1h30m")
    return timedelta(seconds=seconds)


def add_listing_arguments(parser: argparse.ArgumentParser, quiet_help: str) -> None:
    """``--json`` and ``-q``, which every listing takes (the contract)."""
    parser.add_argument("--json", action="store_true", help="print a JSON list")
    parser.add_argument("-q", "--quiet", action="store_true", help=quiet_help)


def for_each(names: Iterable[str], action: Callable[[str], None]) -> None:
    """Apply ``action`` to every name, printing each name it succeeds for (as ``ctr`` does), even after
    one fails; then raise one CliError naming each failure."""
    failures = []
    for name in names:
        try:
            action(name)
        except CliError as err:
            failures.append(f"{name}: {err}")
            continue
        print(name, flush=True)
    if failures:
        raise CliError("; ".join(failures))
