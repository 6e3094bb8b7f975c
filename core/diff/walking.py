"""The ``walking`` differ plugin: applies layers from, and writes layers into, the namespaced content store.

Applying streams the blob through :func:`core.diff.apply.apply_layer`; comparing writes the layer of
:func:`core.diff.writer.write_diff` into an ingest and commits it labelled with its diff id, as
containerd's walking differ does.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING

from core.diff import LABEL_UNCOMPRESSED, Differ
from core.diff.compression import WRITTEN_MEDIA_TYPES
from core.diff.writer import write_diff
from core.digest import Digest
from core.errors import AlreadyExists, NotFound, NotImplementedByPlugin
from core.oci import OCI_LAYER_GZIP
from core.plugin import InitContext, Registration
from core.types import Descriptor, Mount

if TYPE_CHECKING:
    from core.metadata.content import ContentMetadata

__all__ = ["WalkingDiffer", "plugin"]

log = logging.getLogger("containerkit.diff")

READ_CHUNK = 1 << 20


class WalkingDiffer(Differ):
    """A :class:`~core.diff.Differ` over ``content``, the namespaced content store."""

    def __init__(self, content: ContentMetadata) -> None:
        self._content = content

    def apply(
        self,
        namespace: str,
        layer: Descriptor,
        mounts: Sequence[Mount],
        *,
        diff_id: Digest | str | None = None,
    ) -> Descriptor:
        started = time.perf_counter()
        with self._content.reader_at(namespace, layer) as reader:
            applied = self.apply_stream(namespace, layer, reader.chunks(chunk_size=READ_CHUNK), mounts, diff_id=diff_id)
        log.debug(
            "diff applied",
            extra={"d": f"{time.perf_counter() - started:.3f}s", "digest": layer.digest, "size": applied.size},
        )
        return applied

    def compare(
        self,
        namespace: str,
        lower: Sequence[Mount],
        upper: Sequence[Mount],
        *,
        media_type: str = OCI_LAYER_GZIP,
        ref: str = "",
        labels: Mapping[str, str] | None = None,
        lease: str | None = None,
    ) -> Descriptor:
        compression = WRITTEN_MEDIA_TYPES.get(media_type)
        if compression is None:
            raise NotImplementedByPlugin(f"unsupported diff media type: {media_type}")
        chosen_ref = ref or f"diff-{time.time_ns()}-{secrets.token_urlsafe(3)}"
        writer = self._content.writer(namespace, chosen_ref, lease=lease)
        try:
            if writer.offset:
                writer.truncate(0)
            diff_id = str(write_diff(lower, upper, compression, writer.write))
            digest = writer.digest()
            with suppress(AlreadyExists):  # the namespace has these bytes already
                writer.commit(0, digest, {**(labels or {}), LABEL_UNCOMPRESSED: diff_id})
        except BaseException:
            writer.close()
            if not ref:
                with suppress(NotFound):
                    self._content.abort(namespace, chosen_ref)
            raise
        info = self._content.info(namespace, digest)
        if LABEL_UNCOMPRESSED not in info.labels:  # an existing blob committed without the label
            from core.content import Info

            wanted = Info(digest, labels={LABEL_UNCOMPRESSED: diff_id})
            info = self._content.update(namespace, wanted, [f"labels.{LABEL_UNCOMPRESSED}"])
        return Descriptor(media_type, digest, info.size)


def _init(context: InitContext) -> WalkingDiffer:
    return WalkingDiffer(context.get("service", "content").store)


plugin = Registration(init=_init, requires=("service.content",))
