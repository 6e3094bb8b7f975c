"""How ckctl prints listings: a rich table for people, ``--json`` for programs, ``-q`` for ids."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

MIN_PIPE_WIDTH = 200  # never wrap cells into extra lines when stdout is not a terminal


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A borderless table in ``ctr``'s layout (upper-case headers, aligned columns)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else MIN_PIPE_WIDTH, highlight=False, soft_wrap=False)
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column.upper(), overflow="fold")
    for row in rows:
        table.add_row(*(str(cell) for cell in row))
    console.print(table)


def print_listing(
    items: Sequence[dict[str, Any]], columns: Sequence[str], *, as_json: bool, quiet: bool, key: str
) -> None:
    """Print ``items`` as JSON, as one ``key`` per line (quiet), or as a table of ``columns``."""
    if as_json:
        print_json(list(items))
    elif quiet:
        for item in items:
            print(item[key])
    else:
        print_table(columns, [[_cell(item.get(column, "")) for column in columns] for item in items])


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)
