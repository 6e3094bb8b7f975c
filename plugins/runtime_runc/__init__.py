"""The default runtime (plugin ``runtime.runc``, also answering to ``io.containerd.runc.v2``).

Each task runs under a small shim process (``shim.py``, stdlib only) detached from the daemon, which
drives runc (or a drop-in such as crun: ``binary = "crun"``) and outlives daemon restarts. Shims are
forked by a warm fork server (``forkserver.py``) rather than started as new interpreters. Usable
without the daemon::

    from plugins.runtime_runc import RuncRuntime
    runtime = RuncRuntime("/run/mykit/runc")
    runtime.restore()

Skips, with the reason, on a host without the configured runtime binary.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from core.plugin import InitContext, Registration, SkipPlugin
from plugins.runtime_runc.runtime import RuncRuntime, RuncTask

__all__ = ["ALIASES", "RuncConfig", "RuncRuntime", "RuncTask", "plugin"]

ALIASES = ("io.containerd.runc.v2",)
"""Runtime names (as containers carry them) this plugin answers to besides its id."""


@dataclass
class RuncConfig:
    """The keys accepted in ``[plugins.runtime.runc]``, with their defaults."""

    binary: str = "runc"
    """The OCI runtime binary (a name looked up in PATH, or a path); ``crun`` works as a drop-in."""

    root: str = ""
    """runc's ``--root`` (one directory per namespace below it); empty: ``<state>/.runc``."""

    shim_python: str = ""
    """The Python interpreter that runs the shims; empty: the daemon's own."""

    fork_server: bool = True
    """Fork shims from a warm fork server (one ``python -S -I`` that has imported the shim) instead of
    starting an interpreter per task; shims are still spawned whenever it cannot be used."""

    restore_timeout: float = 1.0
    """Seconds each shim has to answer when the daemon starts; silent ones count as dead."""

    restore_workers: int = 32
    """How many shims are contacted at once when the daemon starts."""


def init(ctx: InitContext) -> RuncRuntime:
    """Check the binary, open the runtime in the plugin's state directory and export its aliases."""
    config: RuncConfig = ctx.config
    binary = shutil.which(config.binary)
    if binary is None:
        raise SkipPlugin(f"runtime binary {config.binary!r} not found in PATH")
    ctx.exports["aliases"] = ",".join(ALIASES)
    ctx.exports["binary"] = binary
    return RuncRuntime(
        ctx.state,
        events=ctx.events,
        binary=config.binary,
        root=config.root,
        shim_python=config.shim_python,
        fork_server=config.fork_server,
        restore_timeout=config.restore_timeout,
        restore_workers=config.restore_workers,
    )


plugin = Registration(init=init, config=RuncConfig)
"""What the ``containerkit.runtime`` entry point ``runc`` names."""
