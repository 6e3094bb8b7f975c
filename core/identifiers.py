"""Validation of object names (namespaces, containers, snapshots, leases...), as containerd's ``identifiers``.

An identifier is 1 to 76 characters: ASCII letters and digits in runs separated by a single ``.``,
``_`` or ``-``; it can neither start nor end with a separator. This keeps names safe as path
components and in the places containerd's clients expect them.
"""

from __future__ import annotations

import re

from core.errors import InvalidArgument

__all__ = ["MAX_LENGTH", "PATTERN", "validate"]

MAX_LENGTH = 76
"""Maximum length of an identifier (counted in UTF-8 bytes, like Go; valid identifiers are ASCII)."""

PATTERN = re.compile(r"^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$")
"""The identifier grammar; its ``pattern`` is what error messages quote, exactly as containerd does."""


def validate(name: str, what: str = "identifier") -> str:
    """Return ``name`` if it is a valid identifier; raise :class:`InvalidArgument` otherwise.

    ``what`` names the value in the message (``identifier`` by default, giving containerd's exact
    wording: ``identifier "a b" must match ^[A-Za-z0-9]+(?:[._-](?:[A-Za-z0-9]+))*$``).
    """
    if not name:
        raise InvalidArgument(f"{what} must not be empty")
    if len(name.encode()) > MAX_LENGTH:  # bytes, as Go's len(); only ASCII can pass anyway
        raise InvalidArgument(f"{what} {_quote(name)} greater than maximum length ({MAX_LENGTH} characters)")
    # fullmatch, not match: ``$`` would also accept a trailing newline.
    if not name.isascii() or PATTERN.fullmatch(name) is None:
        raise InvalidArgument(f"{what} {_quote(name)} must match {PATTERN.pattern}")
    return name


def _quote(value: str) -> str:
    """Quote ``value`` as Go's ``%q`` does: double quotes, printable characters kept, the rest escaped."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}
