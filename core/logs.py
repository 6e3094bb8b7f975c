"""Structured logs on stderr, one logfmt line per record (``time=... level=... msg=... key=value``)."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else passed through ``extra=`` is printed as a field.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t\\'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        fields = [f"time={when}", f"level={record.levelname.lower()}", f"msg={_quote(record.getMessage())}"]
        fields.append(f"logger={record.name}")
        fields.extend(f"{k}={_quote(v)}" for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info:
            fields.append(f"error={_quote(self.formatException(record.exc_info))}")
        return " ".join(fields)


QUIET_LIBRARIES = ("pyroute2", "urllib3")
"""Libraries whose debug output (every netlink message, every HTTP connection) would drown the
daemon's: they log at WARNING and above whatever the daemon's level."""


def setup(level: str) -> None:
    """Send every ``containerkit`` logger (and plugins' own) to stderr at ``level``; the
    :data:`QUIET_LIBRARIES` at WARNING at most."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for library in QUIET_LIBRARIES:
        logging.getLogger(library).setLevel(max(logging.WARNING, root.level))
