"""Crash points: named places where a test may have the daemon killed (``kill -9``) to check recovery.

Started with the env ``CONTAINERKIT_CRASH_AT=<name>``, the daemon SIGKILLs itself the first time
:func:`crashpoint` is called with that name (with ``CONTAINERKIT_CRASH_AFTER=N``, the N-th time). Both
variables are read once, at import; without them :func:`crashpoint` returns at once. The names in use
are in :data:`NAMES` (tests/test_crash_matrix.py drives each one).
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["NAMES", "crashpoint"]

NAMES = (
    "content.commit.before-rename",
    "content.commit.after-rename",
    "unpack.layer.applied",
    "unpack.before-gc-label",
    "pull.before-image-create",
    "containers.create.before-commit",
    "tasks.create.after-shim",
    "tasks.start.before-runc-start",
    "tasks.delete.after-runc-delete",
    "networks.attach.after-veth",
    "volumes.create",
)
"""Every crash point placed in the code."""

_AT = os.environ.get("CONTAINERKIT_CRASH_AT", "")
_AFTER = int(os.environ.get("CONTAINERKIT_CRASH_AFTER", "1") or "1")
_hits = 0
_lock = threading.Lock()


def crashpoint(name: str) -> None:
    """SIGKILL this process if ``name`` is the crash point chosen by the environment and this is its
    chosen hit; otherwise do nothing."""
    if not _AT or name != _AT:
        return
    global _hits
    with _lock:
        _hits += 1
        if _hits >= _AFTER:
            os.kill(os.getpid(), signal.SIGKILL)
