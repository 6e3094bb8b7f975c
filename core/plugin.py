"""What a plugin is: one small registration record, the context its init receives, and its result.

A plugin package exposes a :class:`Registration` as an entry point in the group
``containerkit.<type>`` (see :mod:`core.plugin_types`); the entry point's name is the plugin's id::

    [project.entry-points."containerkit.snapshotter"]
    overlayfs = "plugins.snapshot_overlay:plugin"

The loader imports it, validates ``[plugins.<type>.<id>]`` against ``config``, initialises plugins in
the order their ``requires`` impose, and records every outcome as a :class:`PluginRecord`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import FailedPrecondition

if TYPE_CHECKING:
    import pluggy

    from core.events import Exchange
    from core.metadata import MetadataStore


class SkipPlugin(Exception):
    """Raised by a plugin's init to decline running on this host; the message is the reason shown."""


@dataclass(frozen=True)
class Registration:
    """A plugin's declaration.

    ``init`` receives an :class:`InitContext` and returns the plugin instance (implementing the
    type's interface, see :mod:`core.plugin_types`), raises :class:`SkipPlugin` to decline, or raises
    anything else to fail. ``requires`` lists what must be initialised first: a type (``"content"``:
    every plugin of that type, at least one ``ok``) or one plugin (``"snapshotter.overlayfs"``); a
    plugin never waits on itself, so requiring its own type means the *other* plugins of that type.
    ``config`` is a dataclass whose fields, with their defaults, are the keys accepted in
    ``[plugins.<type>.<id>]`` (see :func:`core.config.from_table`). ``capabilities`` are free-form
    words other components act on (e.g. ``"rebase"``).
    """

    init: Callable[[InitContext], object]
    requires: tuple[str, ...] = ()
    config: type | None = None
    capabilities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("requires", "capabilities"):
            if isinstance(getattr(self, name), str):
                raise TypeError(f"Registration.{name} is a tuple of strings; got a string (missing comma?)")


class Status(enum.StrEnum):
    """A plugin's outcome; a record exists only once its plugin has one."""

    OK = "ok"
    SKIP = "skip"
    ERROR = "error"


@dataclass
class PluginRecord:
    """The outcome of loading one plugin: what ``ckctl plugins ls`` and introspection show.

    ``reason`` says why a plugin is not ``ok``; ``instance`` is set only when it is.
    """

    type: str
    id: str
    status: Status
    reason: str = ""
    package: str = ""
    requires: tuple[str, ...] = ()
    exports: dict[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    instance: object | None = None

    @property
    def name(self) -> str:
        """``<type>.<id>``, the plugin's unique name in config and messages."""
        return f"{self.type}.{self.id}"


@dataclass
class InitContext:
    """Everything a plugin's init may use.

    ``root`` and ``state`` are the plugin's own directories (``<root>/<type>.<id>``); they are not
    created for it. ``exports`` is published as-is (e.g. ``{"root": ...}``); ``capabilities`` starts
    as the registration's and may be narrowed to what this host supports.
    """

    type: str
    id: str
    root: Path
    state: Path
    config: Any
    metadata: MetadataStore
    hooks: pluggy.PluginManager
    events: Exchange
    daemon_root: Path
    exports: dict[str, str] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)
    _loaded: Mapping[str, PluginRecord] = field(default_factory=dict, repr=False)

    def get(self, type: str, id: str | None = None) -> Any:
        """The instance of plugin ``type.id``, or of the first ``ok`` plugin of ``type`` when ``id`` is
        omitted. Raises FailedPrecondition when there is no such ``ok`` plugin."""
        for record in self._loaded.values():
            if record.type == type and (id is None or record.id == id) and record.status is Status.OK:
                return record.instance
        wanted = f"{type}.{id}" if id else f"a {type} plugin"
        raise FailedPrecondition(f"{wanted} is not loaded (declare it in requires and check `ckctl plugins ls`)")

    def get_all(self, type: str) -> dict[str, Any]:
        """Every ``ok`` plugin instance of ``type``, by id."""
        return {r.id: r.instance for r in self._loaded.values() if r.type == type and r.status is Status.OK}

    def records(self) -> list[PluginRecord]:
        """The records of every plugin whose outcome is decided: during loading, those decided
        before this plugin; once loading is over, all of them in the loader's order."""
        return list(self._loaded.values())
