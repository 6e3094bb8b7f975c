"""The ``differ`` plugin type: applies layers onto snapshot mounts and makes layers from two mounts
(containerd's ``diff.Applier`` and ``diff.Comparer``).

The building blocks are usable without a plugin or a content store: :func:`core.diff.apply.apply_layer`
applies a layer given as chunks of bytes, :func:`core.diff.writer.write_diff` writes one to any sink,
and :mod:`core.diff.archive` extracts a tar stream into a directory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence

from core.digest import Digest
from core.oci import OCI_LAYER_GZIP
from core.types import Descriptor, Mount

__all__ = ["LABEL_UNCOMPRESSED", "Differ"]

LABEL_UNCOMPRESSED = "containerd.io/uncompressed"
"""Content label of a compressed layer: the digest of its uncompressed tar (its diff id)."""


class Differ(ABC):
    """A differ plugin (wire type ``io.containerd.differ.v1``). Methods may be called concurrently.

    Errors come from :mod:`core.errors`: InvalidArgument for an unsupported media type or a corrupt,
    truncated or hostile layer; NotFound when the namespace lacks the blob; FailedPrecondition for
    read-only mounts or a diff id mismatch. OSError escapes for I/O faults (a full disk...).
    """

    @abstractmethod
    def apply(
        self,
        namespace: str,
        layer: Descriptor,
        mounts: Sequence[Mount],
        *,
        diff_id: Digest | str | None = None,
    ) -> Descriptor:
        """Apply the layer blob (read from the namespace's content) onto ``mounts``; return the applied
        descriptor: media type ``application/vnd.oci.image.layer.v1.tar``, digest = the diff id,
        size = the uncompressed size.

        ``diff_id``, when given, is checked once the layer is applied: FailedPrecondition
        ("... diff id mismatch: got X, want Y") when it differs. On any error the mounts hold a
        partly applied layer: the caller discards the snapshot.
        """

    def apply_stream(
        self,
        namespace: str,
        layer: Descriptor,
        chunks: Iterable[bytes],
        mounts: Sequence[Mount],
        *,
        diff_id: Digest | str | None = None,
    ) -> Descriptor:
        """Apply the layer described by ``layer`` whose blob bytes are ``chunks`` (as they arrive,
        e.g. from a registry: nothing is read from the content store) onto ``mounts``.

        Same result and errors as :meth:`apply` (NotFound aside); errors raised by ``chunks`` pass
        through. Nothing checks that ``chunks`` are the blob of ``layer``: the caller verifies its
        digest and commits the snapshot only once it has. The default applies with
        :func:`core.diff.apply.apply_layer`; ``namespace`` is for plugins that need it.
        """
        from core.diff.apply import apply_layer

        return apply_layer(chunks, layer.media_type, mounts, diff_id=diff_id)

    @abstractmethod
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
        """Write the changes from ``lower`` to ``upper`` as a layer of ``media_type`` into the
        namespace's content store (under ingest ``ref``, a unique one when empty, held by ``lease``),
        with ``labels`` plus :data:`LABEL_UNCOMPRESSED`; return the layer's descriptor.

        NotImplementedByPlugin for a media type it cannot write (tar, tar+gzip and tar+zstd, OCI or
        Docker, are written by the walking differ).
        """
