"""Recompressing an image's layers (``ckctl images convert --compression zstd|gzip``; containerd's
``ctr images convert --oci --zstd``).

Every layer of every image manifest the namespace holds is decompressed and compressed again as
``application/vnd.oci.image.layer.v1.tar+zstd`` (or ``+gzip``), streaming (a layer is never held whole;
layers of a manifest are converted in parallel); a layer that already has the wanted media type is
kept as it is. The decompressed stream of each layer must match the config's diff id, which stays the
same: the config blob is reused unchanged and the unpacked snapshots (named by chain id) serve both
images. The new manifests, and the new index for an index, always have OCI media types (Docker has no
zstd layer type); an index keeps the image manifests the namespace holds (converted) and drops other
entries. Blobs get containerd's ``gc.ref`` labels and layers ``containerd.io/uncompressed``; all is
written under a temporary lease and the image record (source's labels) is created or updated last.
"""

from __future__ import annotations

import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

from core import oci
from core.diff import LABEL_UNCOMPRESSED
from core.diff.compression import Compression, compressor, decompress, media_type_compression
from core.digest import Digest, Digester
from core.distribution.blobs import gc_labels, read_document, save_image, temporary_lease, write_blob
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.metadata.content import ContentMetadata
from core.metadata.images import Image, ImageStore
from core.types import Descriptor

__all__ = ["COMPRESSIONS", "convert_image"]

COMPRESSIONS: dict[str, tuple[Compression, str]] = {
    "zstd": (Compression.ZSTD, oci.OCI_LAYER_ZSTD),
    "gzip": (Compression.GZIP, oci.OCI_LAYER_GZIP),
}
"""The compressions an image converts to, and the layer media type each writes."""

WORKERS = 4
"""Layers of a manifest converted at once."""


def convert_image(
    content: ContentMetadata,
    images: ImageStore,
    namespace: str,
    source: str,
    target: str,
    *,
    compression: str,
    level: int | None = None,
) -> Image:
    """Write the image ``target`` (created, or replaced) as ``source`` with its layers recompressed by
    ``compression`` (``zstd`` or ``gzip``) at ``level`` (the compressor's default when None).

    InvalidArgument for another compression, a level out of range, or malformed documents; NotFound for
    an unknown image, a missing blob, or an index with no image manifest held here; FailedPrecondition
    when a layer does not match its diff id.
    """
    if compression not in COMPRESSIONS:
        raise InvalidArgument(f"compression {compression!r} is not supported: use {' or '.join(COMPRESSIONS)}")
    compressor(COMPRESSIONS[compression][0], level)  # refuse a bad level before any work
    image = images.get(namespace, source)
    with temporary_lease(content.leases, namespace) as lease:
        converted = _Converter(content, namespace, lease, compression, level).convert(image.target)
        return save_image(images, namespace, Image(target, converted, image.labels))


class _Converter:
    """One conversion's writes, all under ``lease``."""

    def __init__(
        self, content: ContentMetadata, namespace: str, lease: str, compression: str, level: int | None
    ) -> None:
        self._content = content
        self._namespace = namespace
        self._lease = lease
        self._compression, self._media_type = COMPRESSIONS[compression]
        self._level = level

    def convert(self, desc: Descriptor) -> Descriptor:
        """The converted counterpart of an index or manifest (same annotations and platform)."""
        data = read_document(self._content, self._namespace, desc)
        if oci.is_index(desc.media_type):
            index = oci.parse_index(data, desc.media_type, f"index {desc.digest}")
            children = [self.convert(child) for child in index.manifests if self._held_image(child)]
            if not children:
                raise NotFound(f"index {desc.digest}: none of its image manifests is held in {self._namespace}")
            doc: dict[str, Any] = {
                "schemaVersion": 2,
                "mediaType": oci.OCI_INDEX,
                "manifests": [child.to_oci() for child in children],
            }
            annotations = index.annotations
        elif oci.is_manifest(desc.media_type):
            manifest = oci.parse_manifest(data, desc.media_type, f"manifest {desc.digest}")
            doc = self._manifest(desc, manifest)
            annotations = manifest.annotations
        else:
            raise InvalidArgument(f"{desc.digest}: media type {desc.media_type!r} is not an image index or manifest")
        if annotations:
            doc["annotations"] = dict(annotations)
        encoded = json.dumps(doc, indent=2).encode()
        labels = gc_labels(doc["mediaType"], encoded)
        written = write_blob(
            self._content, self._namespace, encoded, doc["mediaType"], lease=self._lease, labels=labels
        )
        return Descriptor(written.media_type, written.digest, written.size, desc.annotations, platform=desc.platform)

    def _held_image(self, desc: Descriptor) -> bool:
        if not (oci.is_index(desc.media_type) or oci.is_manifest(desc.media_type)):
            return False
        try:
            self._content.info(self._namespace, desc.digest)
        except NotFound:
            return False
        return True

    def _manifest(self, desc: Descriptor, manifest: oci.Manifest) -> dict[str, Any]:
        """The converted manifest document (its layers converted and stored)."""
        if not oci.is_config(manifest.config.media_type):
            raise InvalidArgument(f"manifest {desc.digest} is not an image (config {manifest.config.media_type!r})")
        config_name = f"image config {manifest.config.digest}"
        config = oci.parse_config(read_document(self._content, self._namespace, manifest.config), config_name)
        if len(config.diff_ids) != len(manifest.layers):
            raise InvalidArgument(
                f"manifest {desc.digest}: {len(manifest.layers)} layers but {len(config.diff_ids)} diff ids"
            )
        with ThreadPoolExecutor(WORKERS, thread_name_prefix="convert") as pool:
            layers = list(pool.map(self._layer, manifest.layers, config.diff_ids))
        return {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": Descriptor(oci.OCI_CONFIG, manifest.config.digest, manifest.config.size).to_oci(),
            "layers": [layer.to_oci() for layer in layers],
        }

    def _layer(self, layer: Descriptor, diff_id: Digest) -> Descriptor:
        """The layer recompressed and stored (or kept when it has the wanted media type already)."""
        if layer.media_type == self._media_type:
            return Descriptor(layer.media_type, layer.digest, layer.size, layer.annotations)
        source = media_type_compression(layer.media_type)
        compress, flush = compressor(self._compression, self._level)
        ref = f"convert-{secrets.token_hex(12)}"
        try:
            with self._content.writer(self._namespace, ref, lease=self._lease) as writer:
                uncompressed = Digester(diff_id.algorithm)
                with self._content.reader_at(self._namespace, layer) as reader:
                    for piece in decompress(reader.chunks(), source):
                        uncompressed.update(piece)
                        if out := compress(piece):
                            writer.write(out)
                writer.write(flush())
                if uncompressed.digest() != diff_id:
                    raise FailedPrecondition(
                        f"layer {layer.digest}: diff id mismatch: got {uncompressed.digest()}, want {diff_id}"
                    )
                digest, size = writer.digest(), writer.offset
                with suppress(AlreadyExists):
                    writer.commit(size, digest, {LABEL_UNCOMPRESSED: diff_id})
        except BaseException:
            with suppress(NotFound):
                self._content.abort(self._namespace, ref)
            raise
        return Descriptor(self._media_type, digest, size, layer.annotations)
