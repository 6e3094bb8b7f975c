"""The microkernel's plugin loader: discover, select, configure, order and initialise plugins.

Discovery goes through stevedore over the entry-point groups of :data:`core.plugin_types.PLUGIN_TYPES`.
stevedore's own entry-point cache is keyed on directory mtimes packed as 32-bit floats (about two
minutes of resolution), so a package reinstalled with different entry points can go unseen; the
loader therefore lists entry points fresh from ``importlib.metadata`` at every start and lets
stevedore do the importing and failure reporting. A disabled plugin is never imported.

Every outcome is a :class:`~core.plugin.PluginRecord`; a plugin gets its record once its outcome is
decided, so no record is ever "pending". Only configuration mistakes (:class:`~core.config.ConfigError`)
and a failed plugin named in ``required_plugins`` (:class:`RequiredPluginError`) stop the daemon;
anything else a plugin does wrong is recorded.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stevedore.extension import Extension, ExtensionManager
from stevedore.named import NamedExtensionManager

from core.config import Config, ConfigError, from_table
from core.plugin import InitContext, PluginRecord, Registration, SkipPlugin, Status
from core.plugin_types import PLUGIN_TYPES

if TYPE_CHECKING:
    import pluggy

    from core.events import Exchange
    from core.metadata import MetadataStore

log = logging.getLogger("containerkit.plugins")


class RequiredPluginError(Exception):
    """A plugin listed in ``required_plugins`` did not initialise ``ok``."""


class _Importer(NamedExtensionManager):
    """stevedore's importer over entry points the caller listed fresh (not its cache, see module doc)."""

    def __init__(
        self,
        group: str,
        entry_points: list[importlib.metadata.EntryPoint],
        names: list[str],
        on_failure: Callable[[ExtensionManager, importlib.metadata.EntryPoint, BaseException], None],
    ) -> None:
        self._fresh = entry_points
        super().__init__(group, names, on_load_failure_callback=on_failure, on_missing_entrypoints_callback=None)

    def list_entry_points(self) -> list[importlib.metadata.EntryPoint]:
        return self._fresh


def discover(
    group: str, skip: Collection[str] = (), installed: importlib.metadata.EntryPoints | None = None
) -> list[Extension]:
    """One Extension per entry point of ``group``, its plugin imported unless its name is in ``skip``.

    ``installed`` is every entry point of the environment, listed once by a caller that discovers
    several groups (listing costs a scan of all installed distributions); by default it is listed here.
    A plugin whose import raises comes back with ``plugin=None`` and the error in ``obj``; a skipped
    one with ``plugin`` and ``obj`` both None.
    """
    entry_points = list((installed or importlib.metadata.entry_points()).select(group=group))
    failed: list[Extension] = []

    def on_failure(_manager: ExtensionManager, entry_point: importlib.metadata.EntryPoint, err: BaseException) -> None:
        failed.append(
            Extension(entry_point.name, entry_point, None, f"import of {entry_point.value} failed: {_describe(err)}")
        )

    imported = _Importer(group, entry_points, [ep.name for ep in entry_points if ep.name not in skip], on_failure)
    skipped = [Extension(ep.name, ep, None, None) for ep in entry_points if ep.name in skip]
    return [*imported, *failed, *skipped]


def _describe(err: BaseException) -> str:
    """``ExcType: message`` on one line (a record's reason is one row of ``ckctl plugins ls``)."""
    message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _package_of(extension: Extension, known: dict[int, str]) -> str:
    """``"<distribution> <version>"`` of the extension's entry point (``""`` when unknown).

    ``known`` caches the answer per distribution object (the entry points of one listing share
    them): each ``dist.name``/``dist.version`` access parses the distribution's METADATA again.
    """
    dist = getattr(extension.entry_point, "dist", None)
    if dist is None:
        return ""
    if (package := known.get(id(dist))) is None:
        metadata = dist.metadata
        package = known[id(dist)] = f"{metadata['Name']} {metadata['Version']}"
    return package


def _matches(selector: str, plugin_type: str, plugin_id: str) -> bool:
    """``selector`` names a plugin as ``type.id`` or by its bare ``id`` (then of any type)."""
    return selector in (f"{plugin_type}.{plugin_id}", plugin_id)


def _close(name: str, instance: object) -> None:
    close = getattr(instance, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("closing plugin %s failed", name)


@dataclass(frozen=True)
class _Candidate:
    """An installed, importable plugin whose outcome is not decided yet."""

    type: str
    id: str
    package: str
    registration: Registration

    @property
    def name(self) -> str:
        return f"{self.type}.{self.id}"


class PluginLoader:
    """Loads the plugins a config selects and keeps them until :meth:`close`.

    ``extensions`` maps a plugin type to its already-loaded stevedore extensions; tests pass
    in-memory ``Extension`` objects here, the daemon leaves it to :func:`discover`.
    """

    def __init__(
        self,
        config: Config,
        *,
        metadata: MetadataStore,
        hooks: pluggy.PluginManager,
        events: Exchange,
        extensions: Mapping[str, Iterable[Extension]] | None = None,
    ) -> None:
        self.config = config
        self.metadata = metadata
        self.hooks = hooks
        self.events = events
        self._extensions = extensions
        self.records: dict[str, PluginRecord] = {}
        self._candidates: dict[str, _Candidate] = {}
        self._configs: dict[str, Any] = {}
        self._started: list[tuple[str, object]] = []
        self._packages: dict[int, str] = {}

    def load(self) -> dict[str, PluginRecord]:
        """Discover and initialise; returns the records of the plugins that reached initialisation,
        in that order, then the others (disabled, not importable, invalid, in a dependency cycle).

        Raises ConfigError, initialising nothing, for a plugin named in config that is not installed
        or an invalid plugin table; raises RequiredPluginError, after closing what was started, when
        a required plugin is not ``ok``.
        """
        self._discover()
        self._configure()
        order = self._order()
        for name in order:
            self._init(self._candidates[name])
        ordered = {name: self.records[name] for name in dict.fromkeys([*order, *self.records])}
        self.records.clear()  # in place: init contexts hold this mapping
        self.records.update(ordered)
        try:
            self._check_required()
        except RequiredPluginError:
            self.close()
            raise
        return self.records

    def close(self) -> None:
        """Unregister the hooks of and close every started plugin, in reverse initialisation order.
        A failing close is logged, not raised; calling this again does nothing."""
        while self._started:
            name, instance = self._started.pop()
            self.hooks.unregister(name=name)
            _close(name, instance)

    def _discover(self) -> None:
        disabled = self.config.disabled_plugins
        installed = importlib.metadata.entry_points() if self._extensions is None else None
        for plugin_type in PLUGIN_TYPES.values():
            by_id: dict[str, list[Extension]] = {}
            for extension in self._extensions_of(plugin_type.name, plugin_type.group, installed):
                by_id.setdefault(extension.name, []).append(extension)
            for plugin_id, extensions in by_id.items():
                self._classify(plugin_type.name, plugin_id, extensions)
        for selector in disabled:
            if not any(_matches(selector, r.type, r.id) for r in self.records.values()):
                log.warning("disabled_plugins names %r, which is not installed", selector)

    def _extensions_of(
        self, type_name: str, group: str, installed: importlib.metadata.EntryPoints | None
    ) -> list[Extension]:
        if self._extensions is not None:
            return list(self._extensions.get(type_name, ()))
        disabled = self.config.disabled_plugins
        skip = {*disabled, *(s.removeprefix(f"{type_name}.") for s in disabled)}
        return discover(group, skip, installed)

    def _classify(self, type_name: str, plugin_id: str, extensions: list[Extension]) -> None:
        """Record the outcome of a plugin that cannot be initialised, or make it a candidate."""
        package = ", ".join(_package_of(extension, self._packages) for extension in extensions)
        plugin = extensions[0].plugin
        if any(_matches(selector, type_name, plugin_id) for selector in self.config.disabled_plugins):
            status, reason = Status.SKIP, "disabled by config (disabled_plugins)"
        elif len(extensions) > 1:
            status, reason = Status.ERROR, f"provided by more than one package ({package}); uninstall all but one"
        elif plugin is None:
            status, reason = Status.ERROR, str(extensions[0].obj)
        elif not isinstance(plugin, Registration):
            target = getattr(extensions[0].entry_point, "value", plugin_id)
            status, reason = Status.ERROR, f"{target} is not a core.plugin.Registration (got {type(plugin).__name__})"
        else:
            candidate = _Candidate(type_name, plugin_id, package, plugin)
            self._candidates[candidate.name] = candidate
            return
        record = PluginRecord(type=type_name, id=plugin_id, package=package, status=status, reason=reason)
        self.records[record.name] = record

    def _configure(self) -> None:
        """Check that config names only installed plugins and build every candidate's config.

        Raises one ConfigError listing every mistake. A candidate whose declared config cannot be
        built at all (a bug in the plugin) is recorded as ``error``.
        """
        installed = {**self.records, **self._candidates}
        known = ", ".join(sorted(installed)) or "none"
        problems: list[str] = []
        for selector in self.config.required_plugins:
            if not any(_matches(selector, p.type, p.id) for p in installed.values()):
                problems.append(f"required_plugins names {selector!r}, which is not installed (installed: {known})")
        for type_name, tables in self.config.plugins.items():
            if type_name not in PLUGIN_TYPES:
                problems.append(f"[plugins.{type_name}]: unknown plugin type (types: {', '.join(PLUGIN_TYPES)})")
                continue
            for plugin_id in tables:
                if f"{type_name}.{plugin_id}" not in installed:
                    problems.append(
                        f"[plugins.{type_name}.{plugin_id}]: no such plugin is installed (installed: {known})"
                    )
        for candidate in list(self._candidates.values()):
            table = self.config.plugins.get(candidate.type, {}).get(candidate.id, {})
            try:
                self._configs[candidate.name] = _plugin_config(
                    candidate.registration, table, f"plugins.{candidate.name}"
                )
            except ConfigError as err:
                problems.append(str(err))
            except Exception as err:
                self._settle(candidate, Status.ERROR, f"its declared config is unusable: {_describe(err)}")
        if problems:
            raise ConfigError("; ".join(problems))

    def _providers(self, requirement: str) -> list[str]:
        """The names of the installed plugins a requirement (``type`` or ``type.id``) points at."""
        installed = {**self.records, **self._candidates}
        if requirement in installed:
            return [requirement]
        return sorted(name for name, plugin in installed.items() if plugin.type == requirement)

    def _order(self) -> list[str]:
        """The candidates in initialisation order; those in a dependency cycle are recorded as ``error``."""
        pending = {
            name: {p for req in c.registration.requires for p in self._providers(req)} - {name}
            for name, c in self._candidates.items()
        }
        order: list[str] = []
        while pending:
            leaving = sorted(name for name, deps in pending.items() if not deps & pending.keys())
            order.extend(leaving)
            if not leaving:
                leaving = _cycle(min(pending), pending)
                reason = f"dependency cycle: {' -> '.join([*leaving, leaving[0]])}"
                for name in leaving:
                    self._settle(self._candidates[name], Status.ERROR, reason)
            for name in leaving:
                del pending[name]
        return order

    def _unmet_requirement(self, candidate: _Candidate) -> str | None:
        """Why a candidate cannot be initialised: a requirement with no provider, or whose providers
        (other than the candidate itself, all decided by now) are none ``ok``."""
        for requirement in candidate.registration.requires:
            providers = self._providers(requirement)
            if not providers:
                return f"requires {requirement}, which is not installed"
            others = [self.records[name] for name in providers if name != candidate.name]
            if others and not any(p.status is Status.OK for p in others):
                why = "; ".join(f"{p.name} is {p.status}: {p.reason}" for p in others)
                return f"requires {requirement}, which is not ok ({why})"
        return None

    def _init(self, candidate: _Candidate) -> None:
        unmet = self._unmet_requirement(candidate)
        if unmet:
            self._settle(candidate, Status.ERROR, unmet)
            return
        root, state = Path(self.config.root).absolute(), Path(self.config.state).absolute()
        context = InitContext(
            type=candidate.type,
            id=candidate.id,
            root=root / candidate.name,
            state=state / candidate.name,
            config=self._configs[candidate.name],
            metadata=self.metadata,
            hooks=self.hooks,
            events=self.events,
            daemon_root=root,
            capabilities=list(candidate.registration.capabilities),
            _loaded=self.records,
        )
        instance = None
        try:
            instance = candidate.registration.init(context)
            self._start(candidate, instance)
        except SkipPlugin as skip:
            log.info("plugin %s skipped: %s", candidate.name, skip)
            self._settle(candidate, Status.SKIP, str(skip))
            return
        except Exception as err:
            log.error("plugin %s failed to initialise: %s", candidate.name, _describe(err), exc_info=True)
            if not self._is_started(instance):
                _close(candidate.name, instance)
            self._settle(candidate, Status.ERROR, _describe(err))
            return
        log.debug("plugin %s initialised", candidate.name)
        self._settle(
            candidate,
            Status.OK,
            instance=instance,
            exports=dict(context.exports),
            capabilities=tuple(context.capabilities),
        )

    def _start(self, candidate: _Candidate, instance: object) -> None:
        """Check ``instance`` against its type's interface and register its hooks. An instance that
        another plugin returned before (an alias) is neither registered nor closed twice."""
        interface = PLUGIN_TYPES[candidate.type].interface
        if instance is None or (interface is not None and not isinstance(instance, interface)):
            wanted = f"a {interface.__module__}.{interface.__qualname__}" if interface else "the plugin instance"
            raise TypeError(f"init returned {type(instance).__name__}, not {wanted}")
        if self._is_started(instance):
            return
        self.hooks.register(instance, name=candidate.name)
        unknown = sorted(c.name for c in self.hooks.get_hookcallers(instance) or () if not c.has_spec())
        if unknown:
            self.hooks.unregister(name=candidate.name)
            raise TypeError(f"implements {', '.join(unknown)}, which core.hookspecs does not declare")
        self._started.append((candidate.name, instance))

    def _is_started(self, instance: object) -> bool:
        return any(instance is started for _, started in self._started)

    def _settle(self, candidate: _Candidate, status: Status, reason: str = "", **outcome: Any) -> None:
        """Record a candidate's outcome (``outcome``: further PluginRecord fields); it is a candidate no more."""
        del self._candidates[candidate.name]
        outcome.setdefault("capabilities", candidate.registration.capabilities)
        self.records[candidate.name] = PluginRecord(
            type=candidate.type,
            id=candidate.id,
            package=candidate.package,
            requires=candidate.registration.requires,
            status=status,
            reason=reason,
            **outcome,
        )

    def _check_required(self) -> None:
        failed = [
            f"{r.name} is {r.status}: {r.reason}"
            for r in self.records.values()
            if r.status is not Status.OK and any(_matches(s, r.type, r.id) for s in self.config.required_plugins)
        ]
        if failed:
            raise RequiredPluginError(f"required plugin {'; '.join(failed)}")


def _plugin_config(registration: Registration, table: dict[str, Any], where: str) -> Any:
    """The plugin's config built from its table (defaults where absent), or None if it takes none."""
    if registration.config is None:
        if table:
            raise ConfigError(f"[{where}]: this plugin takes no configuration (got {', '.join(table)})")
        return None
    return from_table(registration.config, table, where)


def _cycle(start: str, pending: Mapping[str, set[str]]) -> list[str]:
    """A dependency cycle reached from ``start``, where every pending plugin waits on another."""
    path = [start]
    while (following := min(pending[path[-1]] & pending.keys())) not in path:
        path.append(following)
    return path[path.index(following) :]
