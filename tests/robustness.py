"""The robustness tally printed at the end of a test run (issue 8's report).

Tests that inject faults, feed hostile input, run soak operations or look for leaks record what they
did through the ``robustness`` fixture; ``pytest_terminal_summary`` in conftest prints one table:

    category              tried  contained
    faults injected          12         12
    hostile inputs          140        140
    soak operations        2400       2400
    leaks found               0          -

``contained`` counts the cases that ended as they should (the fault survived, the input refused
cleanly, the operation succeeded); a test asserts on its own outcome, the tally only reports it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

CATEGORIES = ("faults injected", "hostile inputs", "soak operations", "leaks found")


@dataclass
class Tally:
    """Counts per category: ``tried`` and ``contained`` (thread-safe)."""

    tried: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    contained: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, category: str, tried: int = 1, contained: int | None = None) -> None:
        """Add ``tried`` cases of ``category`` of which ``contained`` (default: all) ended as they should.
        For "leaks found", ``tried`` is the number of leaks found."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown robustness category {category!r} (known: {', '.join(CATEGORIES)})")
        with self._lock:
            self.tried[category] += tried
            self.contained[category] += tried if contained is None else contained

    def counts(self) -> dict[str, dict[str, int]]:
        """The counts as plain data (what a pytest-xdist worker sends to the controller)."""
        with self._lock:
            return {"tried": dict(self.tried), "contained": dict(self.contained)}

    def merge(self, counts: dict[str, dict[str, int]]) -> None:
        """Add another tally's :meth:`counts` (a worker's, in the controller)."""
        with self._lock:
            for category in CATEGORIES:
                self.tried[category] += counts["tried"].get(category, 0)
                self.contained[category] += counts["contained"].get(category, 0)

    def lines(self) -> list[str]:
        """The table, one line per category, for the terminal summary."""
        rows = [("category", "tried", "contained")]
        for category in CATEGORIES:
            contained = "-" if category == "leaks found" else str(self.contained[category])
            rows.append((category, str(self.tried[category]), contained))
        return [f"{name:<20} {tried:>8} {contained:>10}" for name, tried, contained in rows]


TALLY = Tally()
"""The run's tally: one per pytest process; under pytest-xdist the workers' are merged into the controller's."""
