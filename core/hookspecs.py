"""Cross-cutting extension points: pluggy hooks that many plugins may implement at once.

Every hook is named ``containerkit_*`` and lives in this module. A plugin implements one by
decorating a method of the instance its ``init`` returns with :data:`hookimpl`; the loader registers
every instance that initialised ``ok``, and records the plugin as ``error`` instead when one of its
implementations names no hook here or an argument its hook does not have. Implementations take only
the arguments they need.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pluggy

PROJECT = "containerkit"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def containerkit_adjust_spec(spec: dict[str, Any], namespace: str, container_id: str, labels: dict[str, str]) -> None:
    """Adjust the OCI runtime spec of a container before it is created, by mutating ``spec`` in place.

    Called once per container creation, in the daemon, after the spec was built from the image and the
    request. Implementations run in pluggy's order (last registered first); raising an exception
    rejects the container creation with that error.
    """


@hookspec
def containerkit_event(namespace: str, topic: str, event: Any) -> None:
    """Observe a lifecycle event (``/namespaces/create``, ``/tasks/exit``, ...) after it happened.

    ``event`` is the protobuf message containerd publishes for that topic. Observers cannot veto or
    change anything; an exception is logged and does not reach the publisher or other observers.
    Called on the publisher's thread: return quickly.
    """


def new_plugin_manager() -> pluggy.PluginManager:
    """A plugin manager that knows containerkit's hookspecs.

    With ``CONTAINERKIT_TRACE_HOOKS=1`` in the environment it writes every hook call, with its
    arguments and results, to stderr.
    """
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(sys.modules[__name__])
    if os.environ.get("CONTAINERKIT_TRACE_HOOKS", "0") not in ("", "0"):
        manager.trace.root.setwriter(sys.stderr.write)
        manager.enable_tracing()
    return manager
