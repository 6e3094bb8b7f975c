"""containerd's filter language, shared by every List/Subscribe request that takes ``filters``.

A filter string is selectors joined by ``,`` (all must match); a list of strings is OR'ed, and an
empty list, or any empty string in it, matches everything. The grammar, as containerd's scanner
accepts it::

    selectors := selector ("," selector)*
    selector  := fieldpath [operator value]     -- no operator: the field is present
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_]+ | '"' ... '"'
    operator  := "==" | "!=" | "~="
    value     := quoted | a run of printable characters other than whitespace and ","
                 (its first character may not be a quote, ".", "," or one of "=!~")
    quoted    := '"' ... '"' with Go escapes; after "~=" also /.../ or |...|

Whitespace may come before a field, an operator or a value, nowhere else (containerd rejects
``a ,b`` and a trailing blank). ``~=`` uses Python's ``re.search``: unanchored like Go's RE2
``MatchString`` and close enough for the usual patterns, but RE2-only syntax (``\\pL``, ``\\z``) is
rejected and lookarounds or backreferences are accepted. containerd compiles the pattern lazily and
a bad one silently matches nothing; here it is an ``InvalidArgument`` when parsing.

An absent field compares as ``""`` for ``!=`` and ``~=``, as in containerd, so ``name!=x`` matches
objects with no name. Error positions count characters, where containerd counts bytes.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.errors import InvalidArgument

__all__ = ["Filter", "match_all", "parse"]

Filter = Callable[[Mapping[str, Any]], bool]

_QUOTES = '"/|'
_OPERATOR_CHARS = "=!~"
_OPERATORS = ("==", "!=", "~=")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_HEX_WIDTH = {"x": 2, "u": 4, "U": 8}
_COLLECTIONS = (list, tuple, set, frozenset)


def match_all(fields: Mapping[str, Any]) -> bool:
    """The filter that every object passes (what an empty filter list means)."""
    return True


def parse(filters: Sequence[str] | str) -> Filter:
    """Compile one filter string, or several to be OR'ed, into a predicate over a fields mapping.

    The mapping is walked along each fieldpath; see ``_lookup``. Raises ``InvalidArgument`` for a
    malformed filter or regular expression.
    """
    if isinstance(filters, str):
        filters = [filters]
    alternatives = [_Parser(text).selectors() for text in filters if text]
    if not filters or len(alternatives) < len(filters):
        return match_all
    return lambda fields: any(all(selector(fields) for selector in each) for each in alternatives)


def _lookup(fields: Mapping[str, Any], path: tuple[str, ...]) -> list[str] | None:
    """The string value(s) at ``path``, or None when the field is absent.

    Mappings are walked one component at a time until one holds no further mapping (a leaf map such
    as labels); there the remaining components, joined by ".", form a single key, so
    ``labels.a.b`` finds the label "a.b" as containerd's adaptors do. A None value is absent; a
    list or set yields its elements (empty: absent); other scalars compare as text.
    """
    node: Any = fields
    rest = path
    while isinstance(node, Mapping):
        if not any(isinstance(value, Mapping) for value in node.values()):
            node, rest = node.get(".".join(rest)), ()
        elif rest:
            node, rest = node.get(rest[0]), rest[1:]
        else:
            return None
    if rest or node is None:
        return None
    items = node if isinstance(node, _COLLECTIONS) else [node]
    return [_text(item) for item in items] or None


def _text(value: Any) -> str:
    """``value`` as filters compare it: booleans spelled as in Go, everything else by ``str``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class _Selector:
    """One ``fieldpath[operator value]`` test."""

    path: tuple[str, ...]
    operator: str | None = None  # None: the field is present
    value: str = ""
    pattern: re.Pattern[str] | None = None  # set for "~="

    def __call__(self, fields: Mapping[str, Any]) -> bool:
        found = _lookup(fields, self.path)
        if self.operator is None:
            return found is not None
        if self.operator == "==":
            return found is not None and self.value in found
        candidates = found or [""]  # absent compares as "", as in containerd
        if self.pattern is not None:
            return any(self.pattern.search(candidate) for candidate in candidates)
        return self.value not in candidates


@dataclass(frozen=True)
class _Token:
    kind: str  # "field", "value", "quoted", "separator", "operator", "eof" or "other"
    pos: int
    text: str = ""
    unquoted: str | None = None  # a quoted token's decoded text; None if an escape is out of range


def _is_space(char: str) -> bool:
    """Go's ``unicode.IsSpace``: Python's ``isspace`` minus the ASCII separators 0x1c-0x1f."""
    return char.isspace() and not "\x1c" <= char <= "\x1f"


def _is_field_char(char: str) -> bool:
    return char == "_" or (char.isascii() and char.isalnum())


def _is_value_char(char: str) -> bool:
    """Printable (a letter, mark, number, punctuation or symbol) and neither whitespace nor ","."""
    return char != "," and not _is_space(char) and unicodedata.category(char)[0] in "LMNPS"


class _Parser:
    """Recursive descent over one filter string, with containerd's tokens and error messages."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def selectors(self) -> list[_Selector]:
        found = [self._selector()]
        while char := self.text[self.pos : self.pos + 1]:
            if char != ",":
                raise self._error(self.pos, f"unexpected input: {char}")
            self.pos += 1
            found.append(self._selector())
        return found

    def _selector(self) -> _Selector:
        path = self._fieldpath()
        if self.text[self.pos : self.pos + 1] in ("", ","):
            return _Selector(path)
        operator = self._operator()
        token = self._scan(value=True)
        if token.kind == "value":
            value = token.text
        elif token.kind == "quoted":
            value = self._unquote(token, any_quote=operator == "~=")
        else:
            raise self._error(token.pos, "expected value or quoted")
        if operator != "~=":
            return _Selector(path, operator, value)
        try:
            return _Selector(path, operator, value, re.compile(value))
        except (re.error, OverflowError, RecursionError) as exc:  # a repeat count too large, nesting too deep
            raise self._error(token.pos, f"invalid regular expression: {exc}") from None

    def _fieldpath(self) -> tuple[str, ...]:
        fields = [self._field()]
        while self.text[self.pos : self.pos + 1] == ".":
            self.pos += 1
            fields.append(self._field())
        return tuple(fields)

    def _field(self) -> str:
        token = self._scan(value=False)
        if token.kind == "field":
            return token.text
        if token.kind == "quoted":
            return self._unquote(token, any_quote=False)
        raise self._error(token.pos, "expected field or quoted")

    def _operator(self) -> str:
        token = self._scan(value=False)
        if token.kind != "operator":
            raise self._error(token.pos, 'expected an operator ("=="|"!="|"~=")')
        if token.text not in _OPERATORS:
            raise self._error(token.pos, f'unsupported operator "{token.text}"')
        return token.text

    def _unquote(self, token: _Token, any_quote: bool) -> str:
        if not any_quote and token.text[0] != '"':
            raise self._error(token.pos, "invalid quote encountered")
        if token.unquoted is None:
            raise self._error(token.pos, "unquoting failed: quote syntax error")
        return token.unquoted

    def _scan(self, value: bool) -> _Token:
        """Skip whitespace and read one token; ``value`` is set where a value is expected."""
        self._skip(_is_space)
        start = self.pos
        char = self.text[start : start + 1]
        if not char:
            return _Token("eof", start)
        if char == "\0":
            raise self._error(start, "unexpected null")
        if char in _QUOTES:
            return self._quoted()
        self.pos += 1
        if char in ",.":
            kind = "separator"
        elif char in _OPERATOR_CHARS:
            kind = "operator"
            self._skip(lambda c: c in _OPERATOR_CHARS)
        elif value:
            kind = "value"
            self._skip(_is_value_char)
        elif _is_field_char(char):
            kind = "field"
            self._skip(_is_field_char)
        else:
            kind = "other"
        return _Token(kind, start, self.text[start : self.pos])

    def _skip(self, wanted: Callable[[str], bool]) -> None:
        while self.pos < len(self.text) and wanted(self.text[self.pos]):
            self.pos += 1

    def _quoted(self) -> _Token:
        """Read the literal opening at ``self.pos``, decoding Go escapes (``\\xNN`` is a raw byte)."""
        text, start = self.text, self.pos
        quote = text[start]
        decoded = bytearray()
        in_range = True
        i = start + 1
        while (char := text[i : i + 1]) != quote:
            if char in ("", "\n"):
                raise self._error(start, "quoted literal not terminated")
            if char == "\0":
                raise self._error(start, "unexpected null")
            i += 1
            if char != "\\":
                decoded += char.encode()
                continue
            escape = text[i : i + 1]
            if escape in _SIMPLE_ESCAPES or escape == quote:
                decoded += _SIMPLE_ESCAPES.get(escape, escape).encode()
                i += 1
                continue
            if escape in _HEX_WIDTH:
                i += 1
                width, digit_set = _HEX_WIDTH[escape], string.hexdigits
            elif escape and escape in string.octdigits:
                width, digit_set = 3, string.octdigits
            else:
                raise self._error(start, "illegal escape sequence")
            digits = text[i : i + width]
            if len(digits) < width or not all(digit in digit_set for digit in digits):
                raise self._error(start, "illegal numeric escape sequence")
            i += width
            code = int(digits, 16 if escape in _HEX_WIDTH else 8)
            if escape in "uU" and code <= 0x10FFFF:
                decoded += ("\ufffd" if 0xD800 <= code <= 0xDFFF else chr(code)).encode()
            elif escape not in "uU" and code <= 0xFF:  # \xNN and \ooo are single bytes
                decoded.append(code)
            else:
                in_range = False
        self.pos = i + 1
        unquoted = decoded.decode("utf-8", "surrogateescape") if in_range else None
        return _Token("quoted", start, text[start : self.pos], unquoted)

    def _error(self, pos: int, message: str) -> InvalidArgument:
        text = self.text
        where = f"{text[:pos]} >|{text[pos]}|< {text[pos + 1 :]}" if pos < len(text) else text
        return InvalidArgument(f"filters: parse error: [{where}]: {message}")
