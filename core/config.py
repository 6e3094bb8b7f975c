"""The daemon's TOML configuration, and the one validator that checks it and every plugin's table.

A config is a dataclass tree. :func:`from_table` builds one from a parsed TOML table, naming the
offending key (with its TOML path) when a key is unknown or a value has the wrong type, so that a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from core.endpoint import DEFAULT_ADDRESS

DEFAULT_ROOT = Path("/var/lib/containerkit")
DEFAULT_STATE = Path("/run/containerkit")
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: tuple[str, ...] = typing.get_args(LogLevel)


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file, key or line at fault."""


@dataclass
class GrpcConfig:
    """The ``[grpc]`` table: where the API socket lives, who may use it, and how much one client may hold.

    ``max_workers`` threads serve calls (a call holds one until it ends, streams included); one connection
    may have at most ``max_concurrent_streams`` calls open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS:
    the client queues the rest), so a client that stalls its streams cannot hold every worker.
    """

    address: str = DEFAULT_ADDRESS
    gid: int = 0
    max_workers: int = 128
    max_concurrent_streams: int = 32

    def __post_init__(self) -> None:
        if self.max_workers < 1:
            raise ConfigError(f"max_workers must be at least 1, got {self.max_workers}")
        if not 1 <= self.max_concurrent_streams < self.max_workers:
            raise ConfigError(
                f"max_concurrent_streams must be at least 1 and less than max_workers ({self.max_workers}), "
                f"got {self.max_concurrent_streams}"
            )


@dataclass
class DebugConfig:
    """The ``[debug]`` table."""

    level: LogLevel = "info"


@dataclass
class Config:
    """The whole daemon configuration. ``plugins`` holds the raw ``[plugins.<type>.<id>]`` tables;
    the loader validates each against the plugin's own declared config."""

    root: Path = DEFAULT_ROOT
    state: Path = DEFAULT_STATE
    disabled_plugins: list[str] = field(default_factory=list)
    required_plugins: list[str] = field(default_factory=list)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    plugins: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)


def load_config(path: Path | None) -> Config:
    """Read and validate the TOML file at ``path``; ``None`` gives the defaults.

    Raises :class:`ConfigError` for a missing or unreadable file, a TOML syntax error (with line and
    column), text that is not UTF-8, and any unknown key or mistyped value.
    """
    if path is None:
        return Config()
    import tomllib  # only when there is a file: keeps it off the default start-up path

    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    try:
        table = tomllib.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # TOMLDecodeError, a huge integer, deep nesting
        last_line = len(data.splitlines()) or 1
        where = f" (line {last_line})" if "end of document" in str(err) else ""
        raise ConfigError(f"config {path} is not valid TOML: {err}{where}") from None
    try:
        return from_table(Config, table)
    except ConfigError as err:
        raise ConfigError(f"config {path}: {err}") from None


T = TypeVar("T")


def from_table(cls: type[T], table: dict[str, Any], where: str = "") -> T:
    """Build the dataclass ``cls`` from ``table``, checking every key and value type.

    ``where`` is the TOML path of ``table`` (``plugins.snapshotter.overlayfs``), used in messages.
    Missing keys take the dataclass defaults; a field without a default is a required key. Supported
    field types: str, int, float, bool, Path, Any, Literal[...], nested dataclasses, ``list[T]``,
    ``tuple[T, ...]``, ``dict[str, T]`` and ``T | None``. ``cls.__post_init__`` may raise ConfigError.
    """
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
    names = {f.name for f in fields}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(f"unknown key {_join(where, key)!r} (known keys: {', '.join(sorted(names)) or 'none'})")
        values[key] = _convert(hints[key], value, _join(where, key))
    for f in fields:
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing key {_join(where, f.name)!r}")
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{where + ': ' if where else ''}{err}") from None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, path)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {_kind(value)}")
        return from_table(hint, value, path)  # type: ignore[arg-type]
    if origin is Literal:
        if not any(type(value) is type(allowed) and value == allowed for allowed in args):
            raise ConfigError(f"{path}: expected one of {', '.join(map(repr, args))}, got {_kind(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_kind(value)}")
        return origin(_convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {_kind(value)}")
        return {k: _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a path string, got {_kind(value)}")
        return Path(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
        raise ConfigError(f"{path}: expected {_NAMES.get(hint, hint.__name__)}, got {_kind(value)}")
    return value


_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a table"}


def _kind(value: Any) -> str:
    return f"{_NAMES.get(type(value), type(value).__name__)} ({value!r})"
