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
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from core.gc import ResourceKind
    from core.metadata.containers import Container

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


@hookspec
def containerkit_task_prepare(namespace: str, container: Container, spec: Mapping[str, Any]) -> None:
    """Prepare the host for a container's task just before the runtime creates it (e.g. make the
    network namespace the spec names and attach the container's networks).

    Called by the tasks service, in the daemon, on the creating call's thread; ``spec`` is the decoded
    spec the runtime will get (read it, do not change it). Raising rejects the task creation with that
    error (a :class:`~core.errors.ContainerkitError` keeps its code); an implementation that raises
    undoes its own work first. Every successful call is later matched by
    :func:`containerkit_task_released`, also when the runtime's create fails.
    """


@hookspec
def containerkit_task_released(namespace: str, container_id: str) -> None:
    """The container's task is gone (deleted, its create failed, or it was not found again after a
    daemon restart): release what :func:`containerkit_task_prepare` made for it.

    Must be idempotent and must not fail for a container that was never prepared; an exception is
    logged and does not reach the caller or other implementations.
    """


@hookspec
def containerkit_gc_kinds() -> list[ResourceKind]:
    """Contribute the resource kinds this plugin owns to garbage collection.

    Called by the collector (:class:`core.gc.Collector`) at the start of every collection, in the
    daemon; return a list of :class:`core.gc.ResourceKind` (possibly empty). Each resource type
    (``"content"``, ``"snapshot/overlayfs"``, ...) must be owned by exactly one kind across all
    implementations: when two kinds claim the same type the collection is refused with
    FailedPrecondition and removes nothing, since neither kind alone can be trusted to know every
    reference. An exception here also aborts the collection before anything is removed.
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
