"""Registry credentials: per call, from the daemon config, and from Docker-style ``config.json`` files.

Lookup order in :meth:`CredentialStore.get`: the daemon config's hosts, then the docker config file (re-read
when it changes). Explicit per-call credentials win over both; the registry client applies that rule.
Passwords never appear in a ``repr``, a log line or an error message.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.distribution.reference import DOCKER_HUB
from core.errors import InvalidArgument

__all__ = ["CredentialStore", "Credentials", "default_docker_config", "load_docker_config", "save_docker_config"]

# How Docker names Docker Hub in config.json; any of them means docker.io.
_HUB_ALIASES = frozenset({DOCKER_HUB, "index.docker.io", "registry-1.docker.io"})
_HUB_CONFIG_KEY = "https://index.docker.io/v1/"


@dataclass(frozen=True)
class Credentials:
    """A username and password (or token); ``repr`` hides the password."""

    username: str
    password: str = field(repr=False)


def canonical_host(key: str) -> str:
    """A config.json ``auths`` key (``https://host:5000/v1/``, ``host``) as the registry host (``docker.io``
    for Docker Hub's aliases)."""
    host = key.split("://", 1)[-1].split("/", 1)[0].lower()
    return DOCKER_HUB if host in _HUB_ALIASES else host


def default_docker_config() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json`` (as docker and skopeo look)."""
    directory = os.environ.get("DOCKER_CONFIG")
    return Path(directory) / "config.json" if directory else Path.home() / ".docker" / "config.json"


def load_docker_config(path: str | os.PathLike[str]) -> dict[str, Credentials]:
    """The ``auths`` of a docker config file as {canonical host: Credentials}; {} when the file is absent.

    An entry holds ``auth`` (base64 of ``user:password``) or ``username``/``password``; entries with neither
    (credential helpers) are skipped. InvalidArgument for a malformed file (the message names the file only).
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    try:
        entries = _auths(json.loads(text) if text.strip() else {}).items()
        found = {canonical_host(key): _entry_credentials(entry) for key, entry in entries}
    except (ValueError, TypeError) as err:
        raise _invalid(path, err) from None
    return {host: creds for host, creds in found.items() if creds is not None}


def _invalid(path: str | os.PathLike[str], err: Exception) -> InvalidArgument:
    """The error for a malformed docker config: it names the file and the fault, never the file's content."""
    return InvalidArgument(f"docker config {path}: not a valid config.json ({err})")


def _auths(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise TypeError("top level is not an object")
    auths = doc.get("auths", {})
    if not isinstance(auths, dict):
        raise TypeError("auths is not an object")
    return auths


def _entry_credentials(entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        raise TypeError("an auths entry is not an object")
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError("an auth entry is not base64 of user:password") from None
        if not sep:
            raise ValueError("an auth entry is not base64 of user:password")
        return Credentials(user, password)
    if entry.get("username"):
        return Credentials(str(entry["username"]), str(entry.get("password", "")))
    return None


def save_docker_config(path: str | os.PathLike[str], host: str, creds: Credentials | None) -> None:
    """Store ``creds`` for ``host`` in the docker config file (remove the entry when None), keeping every
    other key. Written atomically with mode 0600; the directory is created (0700) when missing."""
    target = Path(path)
    try:
        doc = json.loads(target.read_text() or "{}")
        auths = _auths(doc)
    except FileNotFoundError:
        doc, auths = {}, {}
    except (ValueError, TypeError) as err:
        raise _invalid(path, err) from None
    wanted = canonical_host(host)
    for key in [key for key in auths if canonical_host(key) == wanted]:
        del auths[key]
    if creds is not None:
        token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        auths[_HUB_CONFIG_KEY if wanted == DOCKER_HUB else wanted] = {"auth": token}
    doc["auths"] = auths
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".config.json.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(doc, out, indent="\t")
            out.write("\n")
        os.replace(temp, target)
    except BaseException:
        os.unlink(temp)
        raise


class CredentialStore:
    """Credentials per registry host: the daemon config's ``config_hosts`` first, then ``docker_config``
    (a path; its content is re-read whenever the file's mtime or size changes). Thread-safe."""

    def __init__(
        self, config_hosts: Mapping[str, Credentials] | None = None, docker_config: Path | None = None
    ) -> None:
        self._config_hosts = {canonical_host(host): creds for host, creds in (config_hosts or {}).items()}
        self._docker_config = docker_config
        self._lock = threading.Lock()
        self._file_key: tuple[int, int] | None = None
        self._file_hosts: dict[str, Credentials] = {}

    def get(self, host: str) -> Credentials | None:
        """The credentials for ``host`` (``docker.io`` and its aliases are one host), or None."""
        wanted = canonical_host(host)
        if wanted in self._config_hosts:
            return self._config_hosts[wanted]
        return self._from_file().get(wanted)

    def _from_file(self) -> dict[str, Credentials]:
        if self._docker_config is None:
            return {}
        with self._lock:
            try:
                st = self._docker_config.stat()
                key: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                key = None
            if key != self._file_key:
                self._file_hosts = load_docker_config(self._docker_config) if key is not None else {}
                self._file_key = key
            return self._file_hosts
