"""The default content store (plugin ``content.local``): blobs and resumable ingests as files on disk.

Usable without the daemon::

    from plugins.content_local import LocalContentStore
    store = LocalContentStore("/tmp/content")
    digest = store.write_blob("my-ref", b"hello")

See :mod:`plugins.content_local.store` for the on-disk layout and :class:`LocalContentStore` for the
choices made (locking, labels, refs).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ConfigError
from core.plugin import InitContext, Registration
from plugins.content_local.store import DEFAULT_INGEST_EXPIRY, MAX_REF_BYTES, LocalContentStore

__all__ = ["MAX_REF_BYTES", "LocalContentConfig", "LocalContentStore", "plugin"]


@dataclass
class LocalContentConfig:
    """The keys accepted in ``[plugins.content.local]``, with their defaults."""

    ingest_expiry_seconds: float = DEFAULT_INGEST_EXPIRY
    """An ingest nobody has written for this long is removed (at start-up and by ``cleanup_stale_ingests``)."""

    def __post_init__(self) -> None:
        if self.ingest_expiry_seconds <= 0:
            raise ConfigError(f"ingest_expiry_seconds must be positive, got {self.ingest_expiry_seconds}")


def init(ctx: InitContext) -> LocalContentStore:
    """Open the store in the plugin's root (created 0700) and export where that is."""
    config: LocalContentConfig = ctx.config
    ctx.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    ctx.exports["root"] = str(ctx.root)
    return LocalContentStore(ctx.root, ingest_expiry=config.ingest_expiry_seconds)


plugin = Registration(init=init, config=LocalContentConfig)
"""What the ``containerkit.content`` entry point ``local`` names."""
