"""Image references as Docker writes them (``busybox``, ``host:5000/team/app:1.0``, ``repo@sha256:...``).

:meth:`Reference.parse` applies Docker's normalisation: a first path component without ``.`` or ``:`` (and
not ``localhost``) is not a registry, so the image lives on ``docker.io``; one-component names on
``docker.io`` get ``library/``; the tag ``latest`` is filled in when neither tag nor digest is given.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from core.digest import Digest
from core.errors import InvalidArgument

__all__ = ["DOCKER_HUB", "Reference", "is_local_host"]

DOCKER_HUB = "docker.io"
"""The domain of short names; ``index.docker.io`` is an alias of it."""

DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255  # domain + "/" + path, as Docker limits it

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_HEX64 = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Reference:
    """A normalised reference: registry ``domain``, repository ``path``, and a ``tag`` and/or ``digest``."""

    domain: str
    path: str
    tag: str = ""
    digest: str = ""

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse and normalise ``text``; InvalidArgument("invalid reference \\"TEXT\\": why") when malformed."""

        def invalid(why: str) -> InvalidArgument:
            return InvalidArgument(f'invalid reference "{text}": {why}')

        if not text:
            raise invalid("empty")
        if _HEX64.fullmatch(text):
            raise invalid("cannot specify 64-byte hexadecimal strings (use sha256:<hex> with a repository)")
        rest, _, digest = text.partition("@")
        if digest:
            try:
                Digest(digest)
            except InvalidArgument as err:
                raise invalid(str(err)) from None
        name, tag = rest, ""
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:  # a ":" after the last "/" starts the tag (a ":" before it is a port)
            name, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise invalid(f"invalid tag {tag!r}")
        domain, path = _split_domain(name)
        if not _DOMAIN.fullmatch(domain):
            raise invalid(f"invalid registry host {domain!r}")
        if not path:
            raise invalid("missing repository name")
        if path.lower() != path:
            raise invalid("repository name must be lowercase")
        for component in path.split("/"):
            if not _PATH_COMPONENT.fullmatch(component):
                raise invalid(f"invalid repository path component {component!r}")
        if len(domain) + 1 + len(path) > MAX_NAME_LENGTH:
            raise invalid(f"repository name longer than {MAX_NAME_LENGTH} characters")
        return cls(domain, path, tag or ("" if digest else DEFAULT_TAG), digest)

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.repository}{tag}{digest}"

    @property
    def repository(self) -> str:
        """``domain/path``: the name without tag and digest."""
        return f"{self.domain}/{self.path}"

    @property
    def object(self) -> str:
        """What to ask the registry for: the digest when set, else the tag."""
        return self.digest or self.tag

    def with_digest(self, digest: str) -> Reference:
        """The same reference pinned to ``digest`` (validated; the tag is kept for display)."""
        return replace(self, digest=str(Digest(digest)))

    def with_tag(self, tag: str) -> Reference:
        """The same repository with ``tag`` and no digest (InvalidArgument for a malformed tag)."""
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(f"invalid tag {tag!r}")
        return replace(self, tag=tag, digest="")


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, remainder = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost" and first.lower() == first):
        domain, path = DOCKER_HUB, name
    else:
        domain, path = first, remainder
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return domain, path


def is_local_host(domain: str) -> bool:
    """Whether ``domain`` (with or without port) is this machine: ``localhost``, 127.0.0.0/8 or ``::1``.

    Such registries are spoken to over plain HTTP unless configured otherwise.
    """
    host = domain
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
