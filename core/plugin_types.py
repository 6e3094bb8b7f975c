"""The plugin types the microkernel knows: their interface, wire name and entry-point group.

A plugin of type ``<name>`` is an entry point in the group ``containerkit.<name>`` whose instance
implements that type's interface (see :mod:`core.plugin`). Interfaces are imported on first use of
:attr:`PluginType.interface`, so importing this module stays cheap (``ckctl`` needs only the names).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["PLUGIN_TYPES", "PluginType", "by_wire_type"]


@dataclass(frozen=True)
class PluginType:
    """One plugin type. ``interface_ref`` is ``"module:Class"``, or None for types without a
    Python interface (a gRPC service registers its servicer itself)."""

    name: str
    interface_ref: str | None
    wire_type: str
    doc: str

    @property
    def interface(self) -> type | None:
        """The abstract class every plugin of this type implements (imported on first access)."""
        if self.interface_ref is None:
            return None
        module, _, attr = self.interface_ref.partition(":")
        interface: type = getattr(importlib.import_module(module), attr)
        return interface

    @property
    def group(self) -> str:
        """The entry-point group plugins of this type are published in."""
        return f"containerkit.{self.name}"


PLUGIN_TYPES: dict[str, PluginType] = {
    plugin_type.name: plugin_type
    for plugin_type in (
        PluginType(
            "runtime",
            "core.runtime:Runtime",
            "io.containerd.runtime.v2",
            "Creates and drives tasks (the running side of containers), e.g. runc.",
        ),
        PluginType(
            "snapshotter",
            "core.snapshot:Snapshotter",
            "io.containerd.snapshotter.v1",
            "Layered filesystems handed out as mounts, e.g. overlayfs.",
        ),
        PluginType(
            "content",
            "core.content:ContentStore",
            "io.containerd.content.v1",
            "Content-addressed blob store with resumable ingests.",
        ),
        PluginType(
            "network",
            "core.network:NetworkDriver",
            "containerkit.network.v1",
            "Host networks and container attachments, e.g. a Linux bridge.",
        ),
        PluginType(
            "differ",
            "core.diff:Differ",
            "io.containerd.differ.v1",
            "Applies layers onto snapshot mounts and makes layers from two mounts, e.g. the walking differ.",
        ),
        PluginType(
            "gc",
            "core.gc:GarbageCollector",
            "io.containerd.gc.v1",
            "Garbage collection: removes what no image, lease or label keeps alive.",
        ),
        PluginType(
            "service",
            None,
            "io.containerd.grpc.v1",
            "A gRPC service served on the daemon's socket.",
        ),
    )
}
"""Every known plugin type, by name."""


def by_wire_type(wire_type: str) -> PluginType | None:
    """The plugin type whose containerd-style name is ``wire_type`` (``io.containerd.content.v1``), if any."""
    for plugin_type in PLUGIN_TYPES.values():
        if plugin_type.wire_type == wire_type:
            return plugin_type
    return None
