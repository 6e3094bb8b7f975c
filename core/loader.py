"""The microkernel's plugin loader: discover, select, configure, order and initialise plugins.

Discovery goes through stevedore over the entry-point groups of :data:`core.plugin_types.PLUGIN_TYPES`.
stevedore's own entry-point cache is keyed on directory mtimes packed as 32-bit floats (about two
minutes of resolution), so a package reinstalled with different entry points can go unseen; the
loader therefore lists entry points fresh from ``importlib.metadata`` at every start and lets
stevedore do the importing and failure reporting.

Every outcome is a :class:`~core.plugin.PluginRecord`. Only configuration mistakes
(:class:`~core.config.ConfigError`) and a failed plugin named in ``required_plugins``
(:class:`RequiredPluginError`) stop the daemon; anything else a plugin does wrong is recorded.
"""

from __future__ import annotations

import importlib.metadata
import logging
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from stevedore.extension import Extension, ExtensionManager

from core.config import Config, ConfigError, from_table
from core.plugin import InitContext, PluginRecord, Registration, SkipPlugin, Status
from core.plugin_types import PLUGIN_TYPES

log = logging.getLogger("containerkit.plugins")


class RequiredPluginError(Exception):
    """A plugin listed in ``required_plugins`` is missing or did not initialise ``ok``."""


class _FreshEntryPoints(ExtensionManager):
    """stevedore's manager, listing entry points without its mtime-keyed cache (see module doc)."""

    def list_entry_points(self) -> list[importlib.metadata.EntryPoint]:
        return list(importlib.metadata.entry_points(group=self.namespace))


def discover(group: str) -> list[Extension]:
    """Import every plugin of an entry-point group. A plugin whose import raises comes back as an
    Extension with ``plugin=None`` and the formatted error in ``obj``."""
    failures: dict[str, str] = {}

    def on_failure(_manager: ExtensionManager, entry_point: importlib.metadata.EntryPoint, err: BaseException) -> None:
        failures[entry_point.name] = f"import of {entry_point.value} failed: {_describe(err)}"

    manager = _FreshEntryPoints(group, on_load_failure_callback=on_failure)
    extensions = list(manager)
    for entry_point in manager.list_entry_points():
        if entry_point.name in failures:
            extensions.append(Extension(entry_point.name, entry_point, None, failures.pop(entry_point.name)))
    return extensions


def _describe(err: BaseException) -> str:
    return "".join(traceback.format_exception_only(err)).strip().splitlines()[-1]


def _package_of(extension: Extension) -> str:
    dist = getattr(extension.entry_point, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else ""


def _matches(selector: str, record: PluginRecord) -> bool:
    """``selector`` names a plugin as ``type.id`` or, where unambiguous, as a bare ``id``."""
    return selector in (record.name, record.id)


class PluginLoader:
    """Loads the plugins a config selects and keeps them until :meth:`close`.

    ``extensions`` maps a plugin type to its already-loaded stevedore extensions; tests pass
    ``ExtensionManager.make_test_instance`` results here, the daemon leaves it to discovery.
    """

    def __init__(
        self,
        config: Config,
        *,
        metadata: Any,
        hooks: Any,
        events: Any,
        extensions: Mapping[str, Iterable[Extension]] | None = None,
    ) -> None:
        self.config = config
        self.metadata = metadata
        self.hooks = hooks
        self.events = events
        self._extensions = extensions
        self.records: dict[str, PluginRecord] = {}
        self._registrations: dict[str, Registration] = {}
        self._configs: dict[str, Any] = {}

    def load(self) -> dict[str, PluginRecord]:
        """Discover and initialise; returns the records in initialisation order.

        Raises ConfigError for an unknown plugin named in config or an invalid plugin table, and
        RequiredPluginError when a required plugin is not ``ok`` (after closing what was started).
        """
        self._discover()
        self._check_config()
        order = self._order()
        for name in order:
            self._init(self.records[name])
        # Records of plugins never initialised (skipped, failed on import) follow the initialised ones.
        self.records = {name: self.records[name] for name in [*order, *(n for n in self.records if n not in order)]}
        try:
            self._check_required()
        except RequiredPluginError:
            self.close()
            raise
        return self.records

    def _discover(self) -> None:
        disabled = self.config.disabled_plugins
        for plugin_type in PLUGIN_TYPES.values():
            if self._extensions is not None:
                extensions = list(self._extensions.get(plugin_type.name, ()))
            else:
                extensions = discover(plugin_type.group)
            for extension in extensions:
                record = PluginRecord(type=plugin_type.name, id=extension.name, package=_package_of(extension))
                if record.name in self.records:
                    first = self.records[record.name]
                    first.status, first.reason = (
                        Status.ERROR,
                        f"id {record.id!r} is provided twice ({first.package}, {record.package})",
                    )
                    self._registrations.pop(record.name, None)
                    continue
                self.records[record.name] = record
                if any(_matches(selector, record) for selector in disabled):
                    record.status, record.reason = Status.SKIP, "disabled by config (disabled_plugins)"
                elif extension.plugin is None:
                    record.reason = str(extension.obj)
                elif not isinstance(extension.plugin, Registration):
                    record.reason = f"entry point {extension.entry_point_target} is not a core.plugin.Registration"
                else:
                    self._registrations[record.name] = extension.plugin
                    record.requires = extension.plugin.requires
                    record.capabilities = extension.plugin.capabilities
        for selector in disabled:
            if not any(_matches(selector, r) for r in self.records.values()):
                log.warning("disabled_plugins names %r, which is not installed", selector)

    def _check_config(self) -> None:
        problems: list[str] = []
        known = ", ".join(sorted(self.records)) or "none"
        for selector in self.config.required_plugins:
            if not any(_matches(selector, r) for r in self.records.values()):
                problems.append(f"required_plugins names {selector!r}, which is not installed (installed: {known})")
        for type_name, tables in self.config.plugins.items():
            if type_name not in PLUGIN_TYPES:
                problems.append(f"[plugins.{type_name}]: unknown plugin type (types: {', '.join(PLUGIN_TYPES)})")
                continue
            for plugin_id in tables:
                if f"{type_name}.{plugin_id}" not in self.records:
                    problems.append(
                        f"[plugins.{type_name}.{plugin_id}]: no such plugin is installed (installed: {known})"
                    )
        for name, registration in self._registrations.items():
            record = self.records[name]
            table = self.config.plugins.get(record.type, {}).get(record.id, {})
            try:
                self._configs[name] = self._plugin_config(registration, table, f"plugins.{name}")
            except ConfigError as err:
                problems.append(str(err))
        if problems:
            raise ConfigError("; ".join(problems))

    @staticmethod
    def _plugin_config(registration: Registration, table: dict[str, Any], where: str) -> Any:
        if registration.config is None:
            if table:
                raise ConfigError(f"[{where}]: this plugin takes no configuration (got {', '.join(table)})")
            return None
        return from_table(registration.config, table, where)

    def _providers(self, requirement: str) -> list[str]:
        """The plugin names a requirement points at."""
        if requirement in self.records:
            return [requirement]
        return [name for name, record in self.records.items() if record.type == requirement]

    def _order(self) -> list[str]:
        """Initialisation order over the loadable plugins; plugins in a dependency cycle get ``error``."""
        pending = {name: self._dependencies(name) for name in self._registrations}
        order: list[str] = []
        while pending:
            ready = sorted(name for name, deps in pending.items() if not deps & pending.keys())
            if not ready:
                for name in pending:
                    record = self.records[name]
                    record.status, record.reason = Status.ERROR, f"dependency cycle: {self._cycle_from(name, pending)}"
                break
            for name in ready:
                order.append(name)
                del pending[name]
        return order

    def _dependencies(self, name: str) -> set[str]:
        return {provider for req in self.records[name].requires for provider in self._providers(req)} - {name}

    def _cycle_from(self, start: str, pending: Mapping[str, set[str]]) -> str:
        path = [start]
        while True:
            nxt = sorted(pending[path[-1]] & pending.keys())[0]
            if nxt in path:
                return " -> ".join([*path[path.index(nxt) :], nxt])
            path.append(nxt)

    def _unmet_requirement(self, record: PluginRecord) -> str | None:
        for requirement in record.requires:
            providers = [self.records[n] for n in self._providers(requirement) if n != record.name]
            if not providers:
                return f"requires {requirement}, which is not installed"
            if not any(p.status is Status.OK for p in providers):
                why = "; ".join(f"{p.name} is {p.status}: {p.reason}" for p in providers)
                return f"requires {requirement}, which is not ok ({why})"
        return None

    def _init(self, record: PluginRecord) -> None:
        unmet = self._unmet_requirement(record)
        if unmet:
            record.status, record.reason = Status.ERROR, unmet
            return
        registration = self._registrations[record.name]
        context = InitContext(
            type=record.type,
            id=record.id,
            root=Path(self.config.root) / record.name,
            state=Path(self.config.state) / record.name,
            config=self._configs[record.name],
            metadata=self.metadata,
            hooks=self.hooks,
            events=self.events,
            daemon_root=Path(self.config.root),
            capabilities=list(registration.capabilities),
            _loaded=self.records,
        )
        try:
            instance = registration.init(context)
            if instance is None:
                raise TypeError(f"init of {record.name} returned None instead of the plugin instance")
            self.hooks.register(instance, name=record.name)
        except SkipPlugin as skip:
            record.status, record.reason = Status.SKIP, str(skip)
            log.info("plugin %s skipped: %s", record.name, skip)
            return
        except Exception as err:
            record.status, record.reason = Status.ERROR, _describe(err)
            log.error("plugin %s failed to initialise: %s", record.name, record.reason, exc_info=True)
            return
        record.status, record.reason, record.instance = Status.OK, "", instance
        record.exports, record.capabilities = dict(context.exports), tuple(context.capabilities)
        log.debug("plugin %s initialised", record.name)

    def _check_required(self) -> None:
        for selector in self.config.required_plugins:
            for record in self.records.values():
                if _matches(selector, record) and record.status is not Status.OK:
                    raise RequiredPluginError(f"required plugin {record.name} is {record.status}: {record.reason}")

    def close(self) -> None:
        """Close the initialised plugins in reverse order; a failing close is logged, not raised."""
        for record in reversed(list(self.records.values())):
            if record.status is not Status.OK or record.instance is None:
                continue
            close = getattr(record.instance, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing plugin %s failed", record.name)
            self.hooks.unregister(name=record.name)
            record.instance = None
