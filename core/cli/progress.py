"""How ckctl shows a transfer's progress events (``containerkit.services.transfer.v1.ProgressEvent``):
live rich progress bars, one per blob, on a terminal; plain lines otherwise, one per state change and at
most one a second per blob while its bytes move (``layer-sha256:0123456789ab… downloading 12.0 MiB/64.0 MiB``).
Events of kind ``image`` (the whole operation's state; the last one names the image's digest) are printed as
lines, every one, in both modes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from core.cli.records import human_size

PLAIN_INTERVAL_SECONDS = 1.0
SHORT_DIGEST_HEX = 12
COMPLETE_STATES = frozenset({"done", "exists", "mounted"})

Render = Callable[[Any], None]


def short_ref(ref: str) -> str:
    """``layer-sha256:<64 hex>`` as ``layer-sha256:<12 hex>…``; other refs unchanged."""
    head, sep, hexdigits = ref.rpartition(":")
    if sep and len(hexdigits) > SHORT_DIGEST_HEX and head.endswith(("sha256", "sha512")):
        return f"{head}:{hexdigits[:SHORT_DIGEST_HEX]}…"
    return ref


def event_line(event: Any) -> str:
    """One plain line for ``event``: its short ref, state, bytes (a blob's, when it has a size) and message."""
    parts = [short_ref(event.ref), event.state]
    if event.total and event.kind != "image":
        parts.append(f"{human_size(event.offset)}/{human_size(event.total)}")
    if event.message:
        parts.append(event.message)
    return " ".join(parts)


class PlainProgress:
    """Lines on ``out``: every state change, and byte progress at most every ``interval`` seconds per ref."""

    def __init__(self, out: TextIO, interval: float = PLAIN_INTERVAL_SECONDS) -> None:
        self._out = out
        self._interval = interval
        self._last: dict[str, tuple[str, float]] = {}  # ref -> (state, when printed)

    def __call__(self, event: Any) -> None:
        now = time.monotonic()
        state, printed = self._last.get(event.ref, ("", -self._interval))
        if event.kind != "image" and event.state == state and now - printed < self._interval:
            return
        self._last[event.ref] = (event.state, now)
        print(event_line(event), file=self._out, flush=True)


class RichProgress:
    """A live ``rich.progress.Progress`` on ``out``: a bar per blob with bytes, speed and state."""

    def __init__(self, out: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TextColumn("{task.fields[state]}"),
            console=Console(file=out),
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def __call__(self, event: Any) -> None:
        if event.kind == "image":
            self._progress.console.print(event_line(event), highlight=False)
            return
        total = event.total or None
        completed = event.total if event.state in COMPLETE_STATES else event.offset
        task = self._tasks.get(event.ref)
        if task is None:
            self._tasks[event.ref] = self._progress.add_task(
                short_ref(event.ref), total=total, completed=completed, state=event.state
            )
        else:
            self._progress.update(task, total=total, completed=completed, state=event.state)


@contextmanager
def progress_renderer(out: TextIO | None = None) -> Iterator[Render]:
    """A renderer for progress events on ``out`` (stdout by default): rich bars when it is a terminal,
    plain lines otherwise. Bars stop (and stay as last drawn) when the block ends."""
    stream = out or sys.stdout
    if not stream.isatty():
        yield PlainProgress(stream)
        return
    with RichProgress(stream) as rich:
        yield rich
