"""The plugin loader: selection, configuration, ordering, initialisation, hooks and shutdown.

Plugins here are in-memory stevedore ``Extension`` objects around real ``Registration`` records,
loaded against a real metadata store, pluggy manager and event exchange; the tests for discovery
build real (tiny) distributions on ``sys.path``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from stevedore.extension import Extension

from core.config import Config, ConfigError
from core.errors import FailedPrecondition
from core.events import Exchange
from core.hookspecs import hookimpl, new_plugin_manager
from core.loader import PluginLoader, RequiredPluginError, discover
from core.metadata import MetadataStore
from core.plugin import InitContext, PluginRecord, Registration, SkipPlugin, Status
from core.plugin_types import PLUGIN_TYPES

Calls = list[str]


class Recorder:
    """A plugin instance that notes when it is closed."""

    def __init__(self, name: str, calls: Calls) -> None:
        self.name = name
        self.calls = calls

    def close(self) -> None:
        self.calls.append(f"close {self.name}")


def instance_class(type_name: str) -> type[Recorder]:
    """A Recorder implementing the interface of ``type_name`` (every abstract method a stub)."""
    interface = PLUGIN_TYPES[type_name].interface
    if interface is None:
        return Recorder
    stubs = {name: lambda *a, **k: None for name in interface.__abstractmethods__}
    return type(f"Fake{interface.__name__}", (Recorder, interface), stubs)


def registration(
    name: str,
    calls: Calls,
    *,
    requires: tuple[str, ...] = (),
    config: type | None = None,
    capabilities: tuple[str, ...] = (),
    init: Callable[[InitContext], object] | None = None,
) -> Registration:
    """A plugin ``type.id`` whose init notes ``init type.id`` in ``calls``, then runs ``init`` if given."""

    def default_init(context: InitContext) -> object:
        calls.append(f"init {name}")
        if init is not None:
            return init(context)
        return instance_class(context.type)(name, calls)

    return Registration(init=default_init, requires=requires, config=config, capabilities=capabilities)


def extensions(*plugins: tuple[str, Any]) -> dict[str, list[Extension]]:
    """``extensions=`` for the loader from ``("type.id", plugin)`` pairs."""
    by_type: dict[str, list[Extension]] = {}
    for name, plugin in plugins:
        type_name, plugin_id = name.split(".", 1)
        by_type.setdefault(type_name, []).append(Extension(plugin_id, None, plugin, None))
    return by_type


@dataclasses.dataclass
class World:
    """What a loader runs against, all real, under one temporary directory."""

    tmp: Path
    metadata: MetadataStore
    calls: Calls = dataclasses.field(default_factory=list)
    loaders: list[PluginLoader] = dataclasses.field(default_factory=list)

    def loader(
        self,
        *plugins: tuple[str, Any],
        extensions_: dict[str, list[Extension]] | None = None,
        discovered: bool = False,
        **config: Any,
    ) -> PluginLoader:
        """A loader over ``plugins`` (or ``extensions_``), or over installed entry points if ``discovered``."""
        hooks = new_plugin_manager()
        loader = PluginLoader(
            Config(root=self.tmp / "root", state=self.tmp / "state", **config),
            metadata=self.metadata,
            hooks=hooks,
            events=Exchange(hooks),
            extensions=None if discovered else extensions_ or extensions(*plugins),
        )
        self.loaders.append(loader)
        return loader

    def load(self, *plugins: tuple[str, Any], **config: Any) -> dict[str, PluginRecord]:
        return self.loader(*plugins, **config).load()

    def plugin(self, name: str, **kwargs: Any) -> tuple[str, Registration]:
        return name, registration(name, self.calls, **kwargs)

    @property
    def inits(self) -> list[str]:
        return [call.removeprefix("init ") for call in self.calls if call.startswith("init ")]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    metadata = MetadataStore(tmp_path / "meta.db")
    world = World(tmp_path, metadata)
    yield world
    for loader in world.loaders:
        loader.close()
    metadata.close()


def outcome(records: dict[str, PluginRecord], name: str) -> tuple[str, str]:
    return str(records[name].status), records[name].reason


def raising(err: BaseException) -> Callable[[InitContext], object]:
    def init(context: InitContext) -> object:
        raise err

    return init


# -- initialisation order ------------------------------------------------------------------------


def test_a_plugin_initialises_after_every_plugin_of_a_type_it_requires(world: World):
    records = world.load(
        world.plugin("service.a", requires=("content",)),
        world.plugin("content.y"),
        world.plugin("content.x"),
    )
    assert world.inits == ["content.x", "content.y", "service.a"]
    assert all(r.status is Status.OK for r in records.values())


def test_a_plugin_initialises_after_the_one_plugin_it_names(world: World):
    world.load(world.plugin("service.a", requires=("service.z",)), world.plugin("service.z"))
    assert world.inits == ["service.z", "service.a"]


def test_independent_plugins_initialise_in_name_order_level_by_level(world: World):
    world.load(
        world.plugin("service.c"),
        world.plugin("service.b", requires=("service.c",)),
        world.plugin("service.a", requires=("service.b",)),
        world.plugin("content.z"),
    )
    assert world.inits == ["content.z", "service.c", "service.b", "service.a"]


def test_records_list_initialised_plugins_in_init_order_then_the_rest(world: World):
    records = world.load(
        world.plugin("service.a", requires=("service.b",)),
        world.plugin("service.b"),
        ("service.broken", None),
        world.plugin("service.off"),
        disabled_plugins=["service.off"],
    )
    assert list(records) == ["service.b", "service.a", "service.broken", "service.off"]


def test_a_plugin_requiring_itself_or_its_own_type_is_not_a_cycle(world: World):
    records = world.load(
        world.plugin("snapshotter.stacked", requires=("snapshotter", "snapshotter.stacked")),
        world.plugin("snapshotter.plain"),
        world.plugin("service.alone", requires=("service",)),
    )
    assert world.inits == ["service.alone", "snapshotter.plain", "snapshotter.stacked"]
    assert {str(r.status) for r in records.values()} == {"ok"}


# -- requirements --------------------------------------------------------------------------------


@pytest.mark.parametrize("requirement", ["content.nope", "network"])
def test_a_missing_requirement_errors_that_plugin_only(world: World, requirement: str):
    records = world.load(world.plugin("service.a", requires=(requirement,)), world.plugin("service.b"))
    assert outcome(records, "service.a") == ("error", f"requires {requirement}, which is not installed")
    assert outcome(records, "service.b") == ("ok", "")
    assert world.inits == ["service.b"]


@pytest.mark.parametrize(
    ("init", "why"),
    [
        (raising(SkipPlugin("no aufs here")), "service.dep is skip: no aufs here"),
        (raising(OSError("disk on fire")), "service.dep is error: OSError: disk on fire"),
    ],
    ids=["skipped", "failed"],
)
def test_a_requirement_that_is_not_ok_errors_the_dependent_with_why(world: World, init: Any, why: str):
    records = world.load(
        world.plugin("service.dep", init=init), world.plugin("service.user", requires=("service.dep",))
    )
    assert outcome(records, "service.user") == ("error", f"requires service.dep, which is not ok ({why})")
    assert "service.user" not in world.inits


def test_a_requirement_that_is_disabled_errors_the_dependent(world: World):
    records = world.load(
        world.plugin("service.dep"),
        world.plugin("service.user", requires=("service.dep",)),
        disabled_plugins=["service.dep"],
    )
    assert outcome(records, "service.user") == (
        "error",
        "requires service.dep, which is not ok (service.dep is skip: disabled by config (disabled_plugins))",
    )


def test_a_type_requirement_is_met_when_one_provider_is_ok(world: World):
    records = world.load(
        world.plugin("content.bad", init=raising(RuntimeError("nope"))),
        world.plugin("content.good"),
        world.plugin("service.user", requires=("content",)),
    )
    assert outcome(records, "service.user") == ("ok", "")
    assert world.inits == ["content.bad", "content.good", "service.user"]


def test_a_type_requirement_with_no_ok_provider_names_each(world: World):
    records = world.load(
        world.plugin("content.bad", init=raising(RuntimeError("nope"))),
        world.plugin("content.off"),
        world.plugin("service.user", requires=("content",)),
        disabled_plugins=["off"],
    )
    assert outcome(records, "service.user") == (
        "error",
        "requires content, which is not ok "
        "(content.bad is error: RuntimeError: nope; content.off is skip: disabled by config (disabled_plugins))",
    )


def test_a_dependency_cycle_errors_its_plugins_and_their_dependents_only(world: World):
    records = world.load(
        world.plugin("service.a", requires=("service.b",)),
        world.plugin("service.b", requires=("service.a",)),
        world.plugin("service.c", requires=("service.a",)),
        world.plugin("service.d"),
    )
    cycle = "dependency cycle: service.a -> service.b -> service.a"
    assert outcome(records, "service.a") == ("error", cycle)
    assert outcome(records, "service.b") == ("error", cycle)
    assert outcome(records, "service.c") == (
        "error",
        f"requires service.a, which is not ok (service.a is error: {cycle})",
    )
    assert outcome(records, "service.d") == ("ok", "")
    assert world.inits == ["service.d"]


def test_a_cycle_reached_through_a_plugin_outside_it_names_only_its_members(world: World):
    records = world.load(
        world.plugin("service.a", requires=("service.x",)),
        world.plugin("service.x", requires=("service.y",)),
        world.plugin("service.y", requires=("service.z",)),
        world.plugin("service.z", requires=("service.x",)),
    )
    cycle = "dependency cycle: service.x -> service.y -> service.z -> service.x"
    assert [outcome(records, n) for n in ("service.x", "service.y", "service.z")] == [("error", cycle)] * 3
    assert records["service.a"].reason.startswith("requires service.x, which is not ok (service.x is error: ")


# -- what init does ------------------------------------------------------------------------------


def test_init_raising_skip_plugin_records_skip_with_its_reason(world: World):
    records = world.load(world.plugin("service.a", init=raising(SkipPlugin("aufs is not in /proc/filesystems"))))
    assert outcome(records, "service.a") == ("skip", "aufs is not in /proc/filesystems")
    assert records["service.a"].instance is None


def test_init_raising_records_the_error_and_loading_continues(world: World, caplog: pytest.LogCaptureFixture):
    records = world.load(
        world.plugin("service.a", init=raising(ValueError("bad things"))),
        world.plugin("service.b"),
    )
    assert outcome(records, "service.a") == ("error", "ValueError: bad things")
    assert outcome(records, "service.b") == ("ok", "")
    assert "plugin service.a failed to initialise" in caplog.text


def test_an_exception_without_a_message_is_named_by_its_type(world: World):
    records = world.load(world.plugin("service.a", init=raising(RuntimeError())))
    assert outcome(records, "service.a") == ("error", "RuntimeError")


def test_init_returning_none_is_an_error(world: World):
    records = world.load(world.plugin("service.a", init=lambda context: None))
    assert outcome(records, "service.a") == ("error", "TypeError: init returned NoneType, not the plugin instance")


def test_an_instance_not_implementing_its_type_interface_is_an_error_and_closed(world: World):
    records = world.load(world.plugin("content.a", init=lambda context: Recorder("content.a", world.calls)))
    assert outcome(records, "content.a") == (
        "error",
        "TypeError: init returned Recorder, not a core.content.ContentStore",
    )
    assert world.calls == ["init content.a", "close content.a"]


def test_an_ok_record_carries_the_instance_requires_and_package(world: World):
    records = world.load(world.plugin("service.a", requires=("content",)), world.plugin("content.b"))
    record = records["service.a"]
    assert isinstance(record.instance, Recorder) and record.instance.name == "service.a"
    assert record.requires == ("content",)
    assert record.package == ""  # in-memory extensions come from no distribution


# -- entry points that are not plugins ------------------------------------------------------------


def test_a_plugin_whose_import_failed_is_an_error_with_the_import_message(world: World):
    reason = "import of broken_mod:plugin failed: ImportError: no module named zzz"
    records = world.load(world.plugin("service.ok"), extensions_={"service": [Extension("broken", None, None, reason)]})
    assert outcome(records, "service.broken") == ("error", reason)


def test_an_entry_point_that_is_not_a_registration_is_an_error(world: World):
    records = world.load(("service.odd", lambda context: object()))
    assert outcome(records, "service.odd") == ("error", "odd is not a core.plugin.Registration (got function)")


def test_registration_refuses_a_string_for_requires():
    with pytest.raises(TypeError, match=r"requires is a tuple of strings"):
        Registration(init=lambda context: None, requires="content")  # type: ignore[arg-type]


# -- disabled_plugins ----------------------------------------------------------------------------


@pytest.mark.parametrize("selector", ["service.a", "a"])
def test_a_disabled_plugin_is_skipped_and_never_initialised(world: World, selector: str):
    records = world.load(world.plugin("service.a"), world.plugin("service.b"), disabled_plugins=[selector])
    assert outcome(records, "service.a") == ("skip", "disabled by config (disabled_plugins)")
    assert world.inits == ["service.b"]


def test_disabling_by_type_and_id_leaves_the_same_id_of_another_type(world: World):
    records = world.load(world.plugin("service.a"), world.plugin("content.a"), disabled_plugins=["content.a"])
    assert outcome(records, "service.a") == ("ok", "")
    assert outcome(records, "content.a")[0] == "skip"


def test_disabling_an_uninstalled_plugin_only_warns(world: World, caplog: pytest.LogCaptureFixture):
    records = world.load(world.plugin("service.a"), disabled_plugins=["content.nope"])
    assert outcome(records, "service.a") == ("ok", "")
    assert "disabled_plugins names 'content.nope', which is not installed" in caplog.text


def test_disabled_wins_over_an_import_failure(world: World):
    broken = Extension("broken", None, None, "import of x:plugin failed: ImportError: nope")
    records = world.load(extensions_={"service": [broken]}, disabled_plugins=["broken"])
    assert outcome(records, "service.broken") == ("skip", "disabled by config (disabled_plugins)")


# -- required_plugins ----------------------------------------------------------------------------


def test_a_required_plugin_that_is_ok_lets_loading_succeed(world: World):
    records = world.load(world.plugin("service.a"), required_plugins=["service.a"])
    assert outcome(records, "service.a") == ("ok", "")


@pytest.mark.parametrize("selector", ["service.bad", "bad"])
def test_a_required_plugin_not_ok_raises_naming_it_and_closes_what_started(world: World, selector: str):
    loader = world.loader(
        world.plugin("service.a"),
        world.plugin("service.bad", init=raising(RuntimeError("broken"))),
        world.plugin("service.c", requires=("service.a",)),
        required_plugins=[selector],
    )
    with pytest.raises(RequiredPluginError, match=r"required plugin service.bad is error: RuntimeError: broken"):
        loader.load()
    assert world.calls[-2:] == ["close service.c", "close service.a"]


def test_every_required_plugin_not_ok_is_named(world: World):
    loader = world.loader(
        world.plugin("service.a", init=raising(SkipPlugin("not here"))),
        world.plugin("service.b", init=raising(RuntimeError("broken"))),
        required_plugins=["service.a", "service.b"],
    )
    with pytest.raises(RequiredPluginError) as raised:
        loader.load()
    assert "service.a is skip: not here" in str(raised.value)
    assert "service.b is error: RuntimeError: broken" in str(raised.value)


def test_a_required_plugin_that_is_not_installed_is_a_config_error(world: World):
    loader = world.loader(world.plugin("service.a"), required_plugins=["content.memory"])
    with pytest.raises(ConfigError, match=r"required_plugins names 'content.memory', which is not installed"):
        loader.load()
    assert world.calls == []


# -- per-plugin configuration --------------------------------------------------------------------


@dataclasses.dataclass
class SizeConfig:
    max_bytes: int = 1024
    path: Path = Path("/tmp/x")
    tags: list[str] = dataclasses.field(default_factory=list)


def configured(world: World, **kwargs: Any) -> tuple[str, Registration]:
    """``content.mem``, a plugin taking SizeConfig, whose instance keeps its ``ctx.config``."""

    def init(context: InitContext) -> object:
        instance = instance_class("content")("content.mem", world.calls)
        instance.config = context.config  # type: ignore[attr-defined]
        return instance

    return world.plugin("content.mem", config=SizeConfig, init=init, **kwargs)


def test_a_plugin_without_a_table_gets_its_config_defaults(world: World):
    records = world.load(configured(world))
    assert records["content.mem"].instance.config == SizeConfig()  # type: ignore[attr-defined]


def test_a_plugin_table_is_converted_into_the_plugin_config(world: World):
    table = {"max_bytes": 7, "path": "/srv/x", "tags": ["a", "b"]}
    records = world.load(configured(world), plugins={"content": {"mem": table}})
    assert records["content.mem"].instance.config == SizeConfig(7, Path("/srv/x"), ["a", "b"])  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"bogus": 1}, "unknown key 'plugins.content.mem.bogus' (known keys: max_bytes, path, tags)"),
        ({"max_bytes": "big"}, "plugins.content.mem.max_bytes: expected an integer, got a string ('big')"),
        ({"max_bytes": True}, "plugins.content.mem.max_bytes: expected an integer, got a boolean (True)"),
        ({"tags": ["a", 1]}, "plugins.content.mem.tags[1]: expected a string, got an integer (1)"),
    ],
    ids=["unknown-key", "string-for-int", "bool-for-int", "list-item"],
)
def test_an_invalid_plugin_table_is_a_config_error_and_nothing_initialises(
    world: World, table: dict[str, Any], message: str
):
    loader = world.loader(configured(world), world.plugin("service.a"), plugins={"content": {"mem": table}})
    with pytest.raises(ConfigError) as raised:
        loader.load()
    assert str(raised.value) == message
    assert world.calls == []


def test_a_table_for_a_plugin_that_takes_no_config_is_a_config_error(world: World):
    loader = world.loader(world.plugin("service.a"), plugins={"service": {"a": {"x": 1}}})
    with pytest.raises(ConfigError, match=r"\[plugins.service.a\]: this plugin takes no configuration \(got x\)"):
        loader.load()


def test_a_table_for_an_uninstalled_plugin_or_unknown_type_is_a_config_error(world: World):
    loader = world.loader(
        world.plugin("service.a"),
        plugins={"service": {"nope": {}}, "gadget": {"x": {}}},
    )
    with pytest.raises(ConfigError) as raised:
        loader.load()
    message = str(raised.value)
    assert "[plugins.service.nope]: no such plugin is installed (installed: service.a)" in message
    types = "runtime, snapshotter, content, network, differ, gc, service"
    assert f"[plugins.gadget]: unknown plugin type (types: {types})" in message


def test_a_table_for_a_disabled_plugin_is_accepted_unchecked(world: World):
    records = world.load(
        configured(world), plugins={"content": {"mem": {"bogus": 1}}}, disabled_plugins=["content.mem"]
    )
    assert outcome(records, "content.mem")[0] == "skip"


def test_a_config_without_default_is_a_required_key(world: World):
    @dataclasses.dataclass
    class Needs:
        url: str

    loader = world.loader(world.plugin("service.a", config=Needs))
    with pytest.raises(ConfigError, match=r"missing key 'plugins.service.a.url'"):
        loader.load()
    records = world.load(world.plugin("service.a", config=Needs), plugins={"service": {"a": {"url": "x"}}})
    assert outcome(records, "service.a") == ("ok", "")


def test_an_unusable_config_declaration_errors_that_plugin_only(world: World):
    class NotADataclass:
        pass

    records = world.load(world.plugin("service.a", config=NotADataclass), world.plugin("service.b"))
    status, reason = outcome(records, "service.a")
    assert status == "error"
    assert reason.startswith("its declared config is unusable: TypeError: ")
    assert world.inits == ["service.b"]


# -- the init context ----------------------------------------------------------------------------


def test_the_context_gives_the_plugin_its_own_directories(world: World):
    seen: dict[str, Any] = {}

    def init(context: InitContext) -> object:
        seen.update(root=context.root, state=context.state, daemon_root=context.daemon_root, type=context.type)
        seen.update(id=context.id, metadata=context.metadata)
        return Recorder("service.a", world.calls)

    world.load(world.plugin("service.a", init=init))
    assert seen == {
        "root": world.tmp / "root" / "service.a",
        "state": world.tmp / "state" / "service.a",
        "daemon_root": world.tmp / "root",
        "type": "service",
        "id": "a",
        "metadata": world.metadata,
    }
    assert not seen["root"].exists()  # not created for it


def test_context_get_finds_ok_plugins_by_type_and_id(world: World):
    found: dict[str, Any] = {}

    def init(context: InitContext) -> object:
        found["first"] = context.get("content").name
        found["named"] = context.get("content", "y").name
        found["all"] = sorted(context.get_all("content"))
        with pytest.raises(FailedPrecondition, match=r"content.bad is not loaded"):
            context.get("content", "bad")
        with pytest.raises(FailedPrecondition, match=r"a network plugin is not loaded"):
            context.get("network")
        return Recorder("service.user", world.calls)

    records = world.load(
        world.plugin("content.x"),
        world.plugin("content.y"),
        world.plugin("content.bad", init=raising(RuntimeError("x"))),
        world.plugin("service.user", requires=("content",), init=init),
    )
    assert outcome(records, "service.user") == ("ok", "")
    assert found == {"first": "content.x", "named": "content.y", "all": ["x", "y"]}


def test_context_records_show_decided_plugins_during_init_and_all_of_them_after(world: World):
    contexts: list[InitContext] = []
    during: list[list[tuple[str, str]]] = []

    def init(context: InitContext) -> object:
        contexts.append(context)
        during.append([(r.name, str(r.status)) for r in context.records()])
        return Recorder("service.b", world.calls)

    records = world.load(
        world.plugin("service.a"),
        world.plugin("service.b", requires=("service.a",), init=init),
        world.plugin("service.c", requires=("service.b",)),
        world.plugin("service.off"),
        disabled_plugins=["off"],
    )
    assert during == [[("service.off", "skip"), ("service.a", "ok")]]
    assert contexts[0].records() == list(records.values())


def test_exports_and_narrowed_capabilities_are_published(world: World):
    def init(context: InitContext) -> object:
        assert context.capabilities == ["rebase", "remap-ids"]
        context.capabilities.remove("remap-ids")
        context.exports["root"] = str(context.root)
        return instance_class("snapshotter")("snapshotter.s", world.calls)

    records = world.load(world.plugin("snapshotter.s", capabilities=("rebase", "remap-ids"), init=init))
    assert records["snapshotter.s"].capabilities == ("rebase",)
    assert records["snapshotter.s"].exports == {"root": str(world.tmp / "root" / "snapshotter.s")}


def test_a_plugin_that_did_not_start_shows_its_declared_capabilities(world: World):
    records = world.load(world.plugin("snapshotter.s", capabilities=("rebase",), init=raising(SkipPlugin("no"))))
    assert records["snapshotter.s"].capabilities == ("rebase",)
    assert records["snapshotter.s"].exports == {}


# -- hooks ---------------------------------------------------------------------------------------


class SpecAdjuster(Recorder):
    @hookimpl
    def containerkit_adjust_spec(self, spec: dict[str, Any], container_id: str) -> None:
        spec.setdefault("adjusted_by", []).append((self.name, container_id))


class WrongArgument(Recorder):
    @hookimpl
    def containerkit_adjust_spec(self, specification: dict[str, Any]) -> None:
        raise AssertionError("never called")


class UnknownHook(Recorder):
    @hookimpl
    def containerkit_adjust_specs(self, spec: dict[str, Any]) -> None:
        raise AssertionError("never called")


def adjust(loader: PluginLoader) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    loader.hooks.hook.containerkit_adjust_spec(spec=spec, namespace="default", container_id="c1", labels={})
    return spec


def test_hook_implementations_of_an_ok_plugin_are_called(world: World):
    loader = world.loader(world.plugin("service.a", init=lambda context: SpecAdjuster("service.a", world.calls)))
    loader.load()
    assert adjust(loader) == {"adjusted_by": [("service.a", "c1")]}


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (WrongArgument, "PluginValidationError: Plugin 'service.bad' for hook 'containerkit_adjust_spec'"),
        (UnknownHook, "TypeError: implements containerkit_adjust_specs, which core.hookspecs does not declare"),
    ],
    ids=["wrong-argument", "unknown-hook"],
)
def test_an_invalid_hook_implementation_errors_that_plugin_and_closes_it(world: World, cls: type, reason: str):
    loader = world.loader(
        world.plugin("service.bad", init=lambda context: cls("service.bad", world.calls)),
        world.plugin("service.good", init=lambda context: SpecAdjuster("service.good", world.calls)),
    )
    records = loader.load()
    status, why = outcome(records, "service.bad")
    assert status == "error" and why.startswith(reason) and "\n" not in why
    assert "close service.bad" in world.calls
    assert loader.hooks.get_plugin("service.bad") is None
    assert adjust(loader) == {"adjusted_by": [("service.good", "c1")]}


def test_close_unregisters_hooks(world: World):
    loader = world.loader(world.plugin("service.a", init=lambda context: SpecAdjuster("service.a", world.calls)))
    loader.load()
    loader.close()
    assert adjust(loader) == {}
    assert loader.hooks.get_plugins() == set()


def test_an_instance_returned_by_two_plugins_is_registered_and_closed_once(world: World):
    records = world.load(
        world.plugin("runtime.runc"),
        world.plugin(
            "runtime.io.containerd.runc.v2", requires=("runtime.runc",), init=lambda c: c.get("runtime", "runc")
        ),
    )
    assert outcome(records, "runtime.io.containerd.runc.v2") == ("ok", "")
    assert records["runtime.io.containerd.runc.v2"].instance is records["runtime.runc"].instance
    world.loaders[-1].close()
    assert world.calls.count("close runtime.runc") == 1


# -- close ---------------------------------------------------------------------------------------


def test_close_closes_started_plugins_in_reverse_init_order_once(world: World):
    loader = world.loader(
        world.plugin("service.a"),
        world.plugin("service.b", requires=("service.a",)),
        world.plugin("service.c", requires=("service.b",)),
        world.plugin("service.skipped", init=raising(SkipPlugin("no"))),
    )
    loader.load()
    loader.close()
    loader.close()
    assert [c for c in world.calls if c.startswith("close")] == [
        "close service.c",
        "close service.b",
        "close service.a",
    ]


def test_a_failing_close_is_logged_and_the_others_still_close(world: World, caplog: pytest.LogCaptureFixture):
    class FailingClose(Recorder):
        def close(self) -> None:
            raise OSError("stuck mount")

    loader = world.loader(
        world.plugin("service.a"),
        world.plugin("service.b", requires=("service.a",), init=lambda context: FailingClose("b", world.calls)),
    )
    loader.load()
    with caplog.at_level(logging.ERROR, logger="containerkit.plugins"):
        loader.close()
    assert world.calls[-1] == "close service.a"
    assert "closing plugin service.b failed" in caplog.text


def test_an_instance_without_close_is_fine(world: World):
    loader = world.loader(world.plugin("service.a", init=lambda context: object()))
    assert outcome(loader.load(), "service.a") == ("ok", "")
    loader.close()


# -- packages and discovery ------------------------------------------------------------------------


def distribution(
    where: Path, name: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]
) -> importlib.metadata.Distribution:
    """A minimal installed distribution ``name 1.0`` under ``where`` (a sys.path entry)."""
    info = where / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines))
    for module, source in modules.items():
        (where / f"{module}.py").write_text(source)
    return importlib.metadata.PathDistribution(info)


def test_one_id_provided_by_two_packages_is_an_error_naming_both(world: World, tmp_path: Path):
    exts = []
    for package in ("pkg-one", "pkg-two"):
        dist = distribution(tmp_path / package, package, {"containerkit.service": {"dup": "m:plugin"}}, {})
        (entry_point,) = dist.entry_points
        exts.append(Extension("dup", entry_point, registration("service.dup", world.calls), None))
    exts.append(Extension("other", None, registration("service.other", world.calls), None))
    records = world.load(extensions_={"service": exts})
    assert outcome(records, "service.dup") == (
        "error",
        "provided by more than one package (pkg-one 1.0, pkg-two 1.0); uninstall all but one",
    )
    assert records["service.dup"].package == "pkg-one 1.0, pkg-two 1.0"
    assert world.inits == ["service.other"]


GOOD = """
from core.plugin import Registration

class Service:
    def close(self):
        pass

plugin = Registration(init=lambda context: Service())
"""


Install = Callable[[str, dict[str, dict[str, str]], dict[str, str]], None]


@pytest.fixture
def on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Install:
    """Installs distributions (with their modules) into a sys.path entry that lasts for this test."""
    where = tmp_path / "site"
    monkeypatch.syspath_prepend(str(where))

    def install(name: str, entry_points: dict[str, dict[str, str]], modules: dict[str, str]) -> None:
        distribution(where, name, entry_points, modules)
        importlib.invalidate_caches()

    return install


def test_discover_imports_plugins_reports_import_failures_and_skips_unwanted_ones(on_path: Install):
    suffix = uuid.uuid4().hex[:8]
    group = f"containerkit.test{suffix}"
    good, bad, unwanted = f"ck_good_{suffix}", f"ck_bad_{suffix}", f"ck_unwanted_{suffix}"
    on_path(
        f"ck-test-{suffix}",
        {group: {"good": f"{good}:plugin", "bad": f"{bad}:plugin", "unwanted": f"{unwanted}:plugin"}},
        {good: GOOD, bad: "raise ImportError('needs libfoo')\n", unwanted: "raise SystemExit('imported!')\n"},
    )
    found = {e.name: e for e in discover(group, skip={"unwanted"})}
    assert isinstance(found["good"].plugin, Registration)
    assert found["good"].entry_point.dist.name.startswith("ck-test-")
    assert (found["bad"].plugin, found["bad"].obj) == (
        None,
        f"import of {bad}:plugin failed: ImportError: needs libfoo",
    )
    assert (found["unwanted"].plugin, found["unwanted"].obj) == (None, None)
    assert unwanted not in sys.modules


def test_discover_sees_a_package_installed_after_an_earlier_discovery(on_path: Install):
    suffix = uuid.uuid4().hex[:8]
    group = f"containerkit.test{suffix}"
    assert discover(group) == []
    on_path(f"ck-late-{suffix}", {group: {"late": "not_imported:plugin"}}, {})
    assert [e.name for e in discover(group, skip={"late"})] == ["late"]


def test_the_loader_never_imports_a_disabled_plugin(world: World, on_path: Install):
    suffix = uuid.uuid4().hex[:8]
    off, good = f"ck_off_{suffix}", f"ck_on_{suffix}"
    on_path(
        f"ck-disabled-{suffix}",
        {"containerkit.service": {f"off-{suffix}": f"{off}:plugin", f"on-{suffix}": f"{good}:plugin"}},
        {off: "raise SystemExit('imported!')\n", good: GOOD},
    )
    records = world.load(discovered=True, disabled_plugins=[f"service.off-{suffix}"])
    assert outcome(records, f"service.off-{suffix}") == ("skip", "disabled by config (disabled_plugins)")
    assert records[f"service.off-{suffix}"].package.startswith("ck-disabled-")
    assert outcome(records, f"service.on-{suffix}") == ("ok", "")
    assert off not in sys.modules
