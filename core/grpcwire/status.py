"""gRPC over HTTP/2 (the "PROTOCOL-HTTP2" spec of grpc/grpc) as both sides of containerkit speak it: status
codes, the length-prefixed message framing, ``grpc-timeout`` and the percent-encoded ``grpc-message``."""

from __future__ import annotations

import enum
import struct

__all__ = [
    "MESSAGE_PREFIX",
    "StatusCode",
    "parse_timeout",
    "percent_decode",
    "percent_encode",
    "timeout_header",
]

MESSAGE_PREFIX = struct.Struct(">BI")  # compressed flag, length


class StatusCode(enum.Enum):
    """gRPC's status codes, by the names grpcio uses; the value is the code on the wire."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


_TIMEOUT_UNITS = (("n", 1e9), ("u", 1e6), ("m", 1e3), ("S", 1.0), ("M", 1 / 60), ("H", 1 / 3600))
_SECONDS_PER_UNIT = {unit: 1 / per_second for unit, per_second in _TIMEOUT_UNITS}


def timeout_header(seconds: float) -> str:
    """A ``grpc-timeout`` value: at most 8 digits, in the finest unit that fits."""
    for unit, per_second in _TIMEOUT_UNITS:
        value = max(0, int(seconds * per_second))
        if value < 10**8:
            return f"{value}{unit}"
    return "99999999H"


def parse_timeout(value: str) -> float:
    """Seconds of a ``grpc-timeout`` value (1-8 digits and a unit); ValueError when malformed."""
    digits, unit = value[:-1], value[-1:]
    if not 1 <= len(digits) <= 8 or not digits.isascii() or not digits.isdigit() or unit not in _SECONDS_PER_UNIT:
        raise ValueError(f"malformed grpc-timeout {value!r}")
    return int(digits) * _SECONDS_PER_UNIT[unit]


# grpc-message: printable ASCII but '%' is sent as is, every other octet of the UTF-8 text as %XX.
_UNRESERVED = frozenset(range(0x20, 0x7F)) - {0x25}


def percent_encode(text: str) -> str:
    """A ``grpc-message`` value for ``text``."""
    raw = text.encode("utf-8", "replace")
    if all(octet in _UNRESERVED for octet in raw):
        return text
    return "".join(chr(octet) if octet in _UNRESERVED else f"%{octet:02X}" for octet in raw)


def percent_decode(text: str) -> str:
    """A ``grpc-message`` as sent: percent-encoded UTF-8 (invalid sequences replaced)."""
    if "%" not in text:
        return text
    raw = text.encode("latin-1", "replace")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25 and i + 2 < len(raw) and _is_hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)
