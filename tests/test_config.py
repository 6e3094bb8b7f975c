"""The daemon's TOML config: defaults, every key, and errors that name the file, line or key at fault."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import pytest

from core.config import LOG_LEVELS, Config, ConfigError, DebugConfig, GrpcConfig, from_table, load_config


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "config.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str | bytes) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    message = str(raised.value)
    assert str(path) in message
    return message


# -- defaults and every key ----------------------------------------------------------------------


def test_no_file_gives_the_documented_defaults():
    config = load_config(None)
    assert config == Config()
    assert config.root == Path("/var/lib/containerkit")
    assert config.state == Path("/run/containerkit")
    assert config.grpc == GrpcConfig(address="/run/containerkit/containerkit.sock", gid=0)
    assert config.debug == DebugConfig(level="info")
    assert (config.disabled_plugins, config.required_plugins, config.plugins) == ([], [], {})


def test_an_empty_file_gives_the_defaults(tmp_path: Path):
    assert load_config(write(tmp_path, "")) == Config()


def test_every_key_is_read(tmp_path: Path):
    config = load_config(
        write(
            tmp_path,
            """
            root = "/srv/ck"
            state = "relative/state"
            disabled_plugins = ["snapshotter.aufs", "bridge"]
            required_plugins = ["runtime.runc"]

            [grpc]
            address = "/tmp/ck.sock"
            gid = 1001

            [debug]
            level = "debug"

            [plugins.snapshotter.overlayfs]
            upperdir_label = true
            sizes = [1, 2]

            [plugins.content.local.nested]
            key = "value"
            """,
        )
    )
    assert config == Config(
        root=Path("/srv/ck"),
        state=Path("relative/state"),
        disabled_plugins=["snapshotter.aufs", "bridge"],
        required_plugins=["runtime.runc"],
        grpc=GrpcConfig(address="/tmp/ck.sock", gid=1001),
        debug=DebugConfig(level="debug"),
        plugins={
            "snapshotter": {"overlayfs": {"upperdir_label": True, "sizes": [1, 2]}},
            "content": {"local": {"nested": {"key": "value"}}},
        },
    )
    assert isinstance(config.root, Path) and isinstance(config.state, Path)


@pytest.mark.parametrize("level", LOG_LEVELS)
def test_every_log_level_is_accepted(tmp_path: Path, level: str):
    assert load_config(write(tmp_path, f'[debug]\nlevel = "{level}"\n')).debug.level == level


def test_a_partial_table_keeps_the_other_defaults(tmp_path: Path):
    config = load_config(write(tmp_path, "[grpc]\ngid = 5\n"))
    assert config.grpc == GrpcConfig(gid=5)


# -- errors --------------------------------------------------------------------------------------


def test_a_missing_file_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"cannot read config .*nope\.toml: No such file or directory"):
        load_config(tmp_path / "nope.toml")


def test_a_directory_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"cannot read config .*: Is a directory"):
        load_config(tmp_path)


def test_a_toml_syntax_error_names_the_line(tmp_path: Path):
    message = error_of(tmp_path, 'root = "/x"\n\nstate = \n')
    assert "is not valid TOML" in message
    assert "line 3" in message


def test_text_that_is_not_utf8_is_a_config_error(tmp_path: Path):
    assert "is not valid TOML" in error_of(tmp_path, b'root = "\xff"\n')


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("bogus = 1", "unknown key 'bogus' (known keys: debug, disabled_plugins, grpc, plugins, required_plugins"),
        ("[grpc]\nadress = 'x'", "unknown key 'grpc.adress' (known keys: address, gid, max_concurrent_streams"),
        ("[debug]\nlevle = 'info'", "unknown key 'debug.levle' (known keys: level)"),
    ],
    ids=["top-level", "grpc", "debug"],
)
def test_an_unknown_key_is_named_with_its_path(tmp_path: Path, text: str, expected: str):
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[grpc]\ngid = "0"', "grpc.gid: expected an integer, got a string ('0')"),
        ("[grpc]\ngid = true", "grpc.gid: expected an integer, got a boolean (True)"),
        ("[grpc]\ngid = 1.5", "grpc.gid: expected an integer, got a number (1.5)"),
        ("[grpc]\naddress = 5", "grpc.address: expected a string, got an integer (5)"),
        ("root = 1", "root: expected a path string, got an integer (1)"),
        ('disabled_plugins = "aufs"', "disabled_plugins: expected a list, got a string ('aufs')"),
        ('required_plugins = ["a", 1]', "required_plugins[1]: expected a string, got an integer (1)"),
        ("grpc = 1", "grpc: expected a table, got an integer (1)"),
        ('[debug]\nlevel = "loud"', "debug.level: expected one of 'debug', 'info', 'warning', 'error', got a string"),
        ("plugins = 1", "plugins: expected a table, got an integer (1)"),
        ("[plugins]\ncontent = 1", "plugins.content: expected a table, got an integer (1)"),
        ("[plugins.content]\nlocal = 1", "plugins.content.local: expected a table, got an integer (1)"),
    ],
    ids=[
        "string-for-int",
        "bool-for-int",
        "float-for-int",
        "int-for-string",
        "int-for-path",
        "string-for-list",
        "list-item",
        "scalar-for-table",
        "log-level",
        "plugins-scalar",
        "plugins-type-scalar",
        "plugin-table-scalar",
    ],
)
def test_a_mistyped_value_is_named_with_its_path_and_the_expected_type(tmp_path: Path, text: str, expected: str):
    assert expected in error_of(tmp_path, text)


# -- from_table, the validator of plugin tables --------------------------------------------------


@dataclasses.dataclass
class Inner:
    depth: int = 1


@dataclasses.dataclass
class Everything:
    name: str = "x"
    ratio: float = 0.5
    on: bool = False
    mode: Literal["fast", "safe"] = "safe"
    pair: tuple[str, ...] = ()
    limits: dict[str, int] = dataclasses.field(default_factory=dict)
    maybe: int | None = None
    raw: Any = None
    inner: Inner = dataclasses.field(default_factory=Inner)
    derived: str = dataclasses.field(init=False, default="computed")


def test_from_table_converts_every_supported_type():
    table = {
        "name": "n",
        "ratio": 2,
        "on": True,
        "mode": "fast",
        "pair": ["a", "b"],
        "limits": {"cpu": 2},
        "maybe": 3,
        "raw": {"anything": [1]},
        "inner": {"depth": 4},
    }
    built = from_table(Everything, table, "plugins.service.x")
    assert built == Everything("n", 2.0, True, "fast", ("a", "b"), {"cpu": 2}, 3, {"anything": [1]}, Inner(4))
    assert isinstance(built.ratio, float)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"ratio": True}, "p.ratio: expected a number, got a boolean (True)"),
        ({"mode": "slow"}, "p.mode: expected one of 'fast', 'safe', got a string ('slow')"),
        ({"limits": {"cpu": "2"}}, "p.limits.cpu: expected an integer, got a string ('2')"),
        ({"inner": {"depth": "deep"}}, "p.inner.depth: expected an integer, got a string ('deep')"),
        ({"inner": {"width": 1}}, "unknown key 'p.inner.width' (known keys: depth)"),
        ({"derived": "x"}, "unknown key 'p.derived'"),
        ({"maybe": "x"}, "p.maybe: expected an integer, got a string ('x')"),
    ],
    ids=["bool-for-float", "literal", "dict-value", "nested", "nested-unknown", "init-false", "optional"],
)
def test_from_table_names_the_offending_key(table: dict[str, Any], expected: str):
    with pytest.raises(ConfigError) as raised:
        from_table(Everything, table, "p")
    assert expected in str(raised.value)


def test_from_table_requires_keys_without_defaults():
    @dataclasses.dataclass
    class Needs:
        url: str

    with pytest.raises(ConfigError, match=r"missing key 'p.url'"):
        from_table(Needs, {}, "p")


def test_a_config_error_from_post_init_is_prefixed_with_the_table():
    @dataclasses.dataclass
    class Checked:
        size: int = 1

        def __post_init__(self) -> None:
            if self.size < 1:
                raise ConfigError(f"size must be positive, got {self.size}")

    with pytest.raises(ConfigError, match=r"^plugins.content.x: size must be positive, got 0$"):
        from_table(Checked, {"size": 0}, "plugins.content.x")
