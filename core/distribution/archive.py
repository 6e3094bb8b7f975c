"""Image archives: export images as an OCI image layout tar; import OCI layout tars and docker-archive tars.

Export writes ``oci-layout``, ``index.json`` and ``blobs/<algorithm>/<hex>``. ``index.json`` has one entry
per image name: the image's target with the annotations ``io.containerd.image.name`` (the full name) and
``org.opencontainers.image.ref.name`` (its tag, when it has one). The blobs are those
:func:`~core.distribution.blobs.walk` finds for the platforms asked for, each streamed from the
content store: nothing is held whole, the tar included.

Import reads the tar stream once, whatever the order of its entries. Every regular file is streamed
into the namespace's content under a temporary lease: a ``blobs/<algorithm>/<hex>`` entry must hash to
its name; other files (a docker-archive's layers and configs) are stored under the digest they hash to,
their decompressed digest (diff id) computed on the way. Only ``index.json``, ``manifest.json`` and
``oci-layout`` are read into memory, each up to :data:`~core.oci.MAX_DOCUMENT_SIZE`. Then:

- with ``index.json`` (an OCI layout, as skopeo, containerd and Docker 25+ write), each entry is an
  image, named by ``io.containerd.image.name``, else by ``org.opencontainers.image.ref.name`` (a full
  reference normalised as docker does, a bare tag appended to ``base_name``), else ``base_name``;
- with only ``manifest.json`` (a docker-archive), each entry's layers are checked against its config's
  diff ids and a Docker schema 2 manifest is built (uncompressed layers as ``...rootfs.diff.tar``,
  compressed ones as ``...tar.gzip``); it is named by its ``RepoTags`` (normalised as docker does), else
  ``base_name``.

Each image's blobs for the host's platform must be in the archive (or the namespace); they get
containerd's ``gc.ref`` labels, are unpacked into ``snapshotter`` when ``unpack``, and the image records
are created (or updated) last. Refused with InvalidArgument, with no image made: ``..`` or absolute
entry names, special files, links under ``blobs/`` (links elsewhere are docker-archive aliases,
followed within the archive only), blobs that do not match their names, documents over the size cap,
names pointing at files the archive lacks; FailedPrecondition for diff ids that do not match the
layers; NotFound when unpacking an image that has no manifest for the host's platform (import it with
``unpack=False``). On failure the lease is deleted: what was stored is left to the garbage collector.
"""

from __future__ import annotations

import json
import posixpath
import re
import secrets
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, BinaryIO

from core import oci
from core.content import Info
from core.diff.compression import Compression, decompress
from core.diff.tar import DIRECTORY, HARDLINK, REGULAR, SYMLINK, TarReader
from core.digest import Digest, Digester
from core.distribution.blobs import gc_labels, read_document, save_image, temporary_lease, walk, write_blob
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.metadata.content import ContentMetadata
from core.metadata.images import Image, ImageStore
from core.metadata.leases import LeaseResource
from core.types import Descriptor, Platform
from core.unpack import Unpacker

__all__ = ["ANNOTATION_IMAGE_NAME", "ANNOTATION_REF_NAME", "export_images", "import_archive"]

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
"""OCI index annotation: the image's reference name (containerkit writes the tag)."""
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
"""containerd's index annotation: the image's full name."""

_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
_DOCUMENTS = frozenset({"index.json", "manifest.json", "oci-layout"})
_BLOB_NAME = re.compile(r"blobs/([a-z0-9]+)/([0-9a-f]+)")
_MAX_LINKS = 8
_BLOCK = 512


# -- export ------------------------------------------------------------------------------------


def export_images(
    content: ContentMetadata,
    images: ImageStore,
    namespace: str,
    names: Sequence[str],
    out: BinaryIO,
    platforms: Sequence[Platform] | None = None,
) -> None:
    """Write the images ``names`` of ``namespace`` to ``out`` as an OCI image layout tar.

    ``platforms``: None for the host's, ``[]`` for all (see :func:`~core.distribution.blobs.walk`).
    NotFound for an unknown image or a wanted blob the namespace lacks, raised before anything is written.
    """
    entries: list[dict[str, Any]] = []
    blobs: dict[Digest, Descriptor] = {}
    for name in names:
        target = images.get(namespace, name).target
        for desc in walk(content, namespace, target, platforms):
            blobs.setdefault(desc.digest, desc)
        annotations = {**target.annotations, ANNOTATION_IMAGE_NAME: name}
        if tag := _tag(name):
            annotations[ANNOTATION_REF_NAME] = tag
        entries.append(Descriptor(target.media_type, target.digest, target.size, annotations).to_oci())
    index = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": entries}).encode()
    _write_entry(out, "oci-layout", [_LAYOUT], len(_LAYOUT))
    _write_entry(out, "index.json", [index], len(index))
    _write_entry(out, "blobs/")
    for algorithm in sorted({digest.algorithm for digest in blobs}):
        _write_entry(out, f"blobs/{algorithm}/")
    for digest in blobs:
        with content.reader_at(namespace, digest) as reader:
            _write_entry(out, f"blobs/{digest.algorithm}/{digest.hex}", reader.chunks(), reader.size)
    out.write(bytes(2 * _BLOCK))


def _tag(name: str) -> str:
    """The tag of an image name (``""`` when it has none): ``host:5000/repo:tag@digest`` -> ``tag``."""
    return name.rpartition("/")[2].partition("@")[0].partition(":")[2]


def _write_entry(out: BinaryIO, name: str, chunks: Iterable[bytes] = (), size: int = -1) -> None:
    """A directory entry (``size`` -1, ``name`` ending in ``/``) or a file of ``size`` bytes from ``chunks``."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size = (tarfile.DIRTYPE, 0o755, 0) if size < 0 else (tarfile.REGTYPE, 0o644, size)
    out.write(info.tobuf(tarfile.PAX_FORMAT))
    written = 0
    for chunk in chunks:
        out.write(chunk)
        written += len(chunk)
    if written != info.size:
        raise FailedPrecondition(f"export: {name} changed while it was written ({written} of {info.size} bytes)")
    out.write(bytes(-written % _BLOCK))


# -- import ------------------------------------------------------------------------------------


def import_archive(
    content: ContentMetadata,
    images: ImageStore,
    unpacker: Unpacker,
    namespace: str,
    chunks: Iterable[bytes],
    *,
    snapshotter: str = "overlayfs",
    unpack: bool = True,
    base_name: str = "",
    labels: Mapping[str, str] | None = None,
) -> list[Image]:
    """Import the OCI layout or docker-archive tar streamed as ``chunks`` into ``namespace`` (see the
    module doc); return the images created or updated, each with ``labels``."""
    with temporary_lease(content.leases, namespace) as lease:
        archive = _Archive(content, namespace, lease)
        archive.read(chunks)
        if "index.json" in archive.documents:
            named = archive.oci_images(base_name)
        elif "manifest.json" in archive.documents:
            named = archive.docker_images(base_name)
        else:
            raise InvalidArgument("not an image archive: it has neither index.json (OCI layout) nor manifest.json")
        targets = {target.digest: target for _, target in named}
        for target in targets.values():
            archive.keep(target)
        if unpack:
            for target in targets.values():
                unpacker.unpack(namespace, target, snapshotter)
        return [save_image(images, namespace, Image(name, target, labels or {})) for name, target in named]


@dataclass(frozen=True)
class _File:
    """A file of the archive as stored: its blob's digest and size, and (docker files) its diff id."""

    digest: Digest
    size: int
    diff_id: Digest | None = None


class _Archive:
    """One import's view of the archive: its documents, files and links, stored under ``lease``."""

    def __init__(self, content: ContentMetadata, namespace: str, lease: str) -> None:
        self._content = content
        self._namespace = namespace
        self._lease = lease
        self.documents: dict[str, bytes] = {}
        self._files: dict[str, _File] = {}
        self._links: dict[str, str] = {}

    def read(self, chunks: Iterable[bytes]) -> None:
        """Store every file of the tar stream; keep the documents and links."""
        reader = TarReader(chunks)
        for entry in reader:
            name = _member_name(entry.name)
            blob = _BLOB_NAME.fullmatch(name)
            if entry.type == DIRECTORY:
                continue
            if entry.type in (SYMLINK, HARDLINK) and blob is None and name not in _DOCUMENTS:
                relative_to = posixpath.dirname(name) if entry.type == SYMLINK else ""  # hard links: to the root
                self._links[name] = posixpath.normpath(posixpath.join(relative_to, entry.linkname))
            elif entry.type != REGULAR:
                raise InvalidArgument(f"image archive: {entry.name!r} is a link or special file, not a regular file")
            elif name in _DOCUMENTS:
                if entry.size > oci.MAX_DOCUMENT_SIZE:
                    raise InvalidArgument(
                        f"image archive: {name} has {entry.size} bytes, more than the {oci.MAX_DOCUMENT_SIZE} allowed"
                    )
                self.documents[name] = b"".join(reader.data())
            else:
                self._files[name] = self._store(name, reader.data(), entry.size, _blob_digest(name, blob))
        reader.drain()

    def _store(self, name: str, data: Iterator[memoryview], size: int, expected: Digest | None) -> _File:
        """Stream one file into the content store: verified against ``expected`` when given, else with its
        diff id computed. A blob the namespace holds already is not written again."""
        ref = f"import-{secrets.token_hex(12)}"
        try:
            writer = self._content.writer(self._namespace, ref, size, expected, lease=self._lease)
        except AlreadyExists:
            assert expected is not None
            return _File(expected, size)
        diff_id = None
        try:
            with writer:
                if expected is None:
                    digester = Digester()
                    for piece in decompress(_written(data, writer.write), Compression.DETECT):
                        digester.update(piece)
                    diff_id = digester.digest()
                elif writer.offset != size:  # else another namespace stored it: nothing to write
                    for piece in data:
                        writer.write(piece)
                digest = writer.digest()
                if expected is not None and digest != expected:
                    raise InvalidArgument(f"image archive: {name} does not match its name (its content is {digest})")
                with suppress(AlreadyExists):
                    writer.commit(size, digest)
        except BaseException:
            with suppress(NotFound):
                self._content.abort(self._namespace, ref)
            raise
        return _File(digest, size, diff_id)

    def file(self, name: str) -> _File:
        """The stored file ``name`` (links followed within the archive); InvalidArgument when there is none."""
        path = _member_name(name)
        for _ in range(_MAX_LINKS):
            if path not in self._links:
                break
            path = self._links[path]
        if (found := self._files.get(path)) is None:
            raise InvalidArgument(f"image archive: it names {name!r} but has no such file")
        return found

    def oci_images(self, base_name: str) -> list[tuple[str, Descriptor]]:
        """The images of ``index.json``: a name and a target each."""
        index = oci.parse_index(self.documents["index.json"], oci.OCI_INDEX, "index.json")
        named = []
        for position, entry in enumerate(index.manifests):
            full = entry.annotations.get(ANNOTATION_IMAGE_NAME, "")
            ref = entry.annotations.get(ANNOTATION_REF_NAME, "")
            if not full and ref and not _is_tag(ref):
                full = _normalised(ref)
            if not full and ref and base_name:
                full = f"{base_name}:{ref}"
            named.append((full or _base(base_name, f"index.json entry {position + 1}"), entry))
        return named

    def docker_images(self, base_name: str) -> list[tuple[str, Descriptor]]:
        """The images of ``manifest.json``, a Docker schema 2 manifest stored for each."""
        try:
            entries = json.loads(self.documents["manifest.json"])
        except ValueError as err:
            raise InvalidArgument(f"image archive: manifest.json is not valid JSON: {err}") from None
        if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
            raise InvalidArgument("image archive: manifest.json must be a list of objects")
        named = []
        for position, entry in enumerate(entries):
            where = f"manifest.json entry {position + 1}"
            config_name, layer_names, tags = entry.get("Config"), entry.get("Layers"), entry.get("RepoTags") or []
            if not isinstance(config_name, str) or not _strings(layer_names) or not _strings(tags):
                raise InvalidArgument(f"image archive: {where} needs 'Config' (a string) and 'Layers' (strings)")
            target = self._docker_manifest(where, config_name, layer_names)
            names = [_normalised(tag) for tag in tags] or [_base(base_name, where)]
            named += [(name, target) for name in names]
        return named

    def _docker_manifest(self, where: str, config_name: str, layer_names: list[str]) -> Descriptor:
        """Store the schema 2 manifest of one ``manifest.json`` entry after checking its diff ids."""
        config_file = self.file(config_name)
        config = Descriptor(oci.DOCKER_CONFIG, config_file.digest, config_file.size)
        diff_ids = oci.parse_config(read_document(self._content, self._namespace, config), config_name).diff_ids
        layers, found = [], []
        for name in layer_names:
            layer = self.file(name)
            media_type = oci.DOCKER_LAYER if layer.diff_id in (None, layer.digest) else oci.DOCKER_LAYER_GZIP
            layers.append(Descriptor(media_type, layer.digest, layer.size))
            found.append(layer.diff_id or layer.digest)
        if tuple(found) != diff_ids:
            raise FailedPrecondition(
                f"image archive: {where}: the diff ids of {config_name} do not match its layers"
                f" (config: {', '.join(diff_ids) or 'none'}; layers: {', '.join(found) or 'none'})"
            )
        manifest = {
            "schemaVersion": 2,
            "mediaType": oci.DOCKER_MANIFEST,
            "config": config.to_oci(),
            "layers": [layer.to_oci() for layer in layers],
        }
        return write_blob(
            self._content, self._namespace, json.dumps(manifest, indent=3).encode(), oci.DOCKER_MANIFEST,
            lease=self._lease,
        )  # fmt: skip

    def keep(self, target: Descriptor) -> None:
        """Check that the archive (or the namespace) has the image's blobs for the host's platform; hold them
        all under the lease and give the indexes and manifests their ``gc.ref`` labels."""
        try:
            blobs = walk(self._content, self._namespace, target)
        except NotFound as err:
            raise InvalidArgument(f"image archive is incomplete: {err}") from None
        for desc in blobs:
            self._content.leases.add_resource(self._namespace, self._lease, LeaseResource(desc.digest, "content"))
            if not (oci.is_index(desc.media_type) or oci.is_manifest(desc.media_type)):
                continue
            labels = gc_labels(desc.media_type, read_document(self._content, self._namespace, desc))
            if labels:
                self._content.update(self._namespace, Info(desc.digest, labels=labels), [f"labels.{k}" for k in labels])


def _written(chunks: Iterable[memoryview], write: Callable[[memoryview], object]) -> Iterator[memoryview]:
    """``chunks``, each passed to ``write`` first."""
    for chunk in chunks:
        write(chunk)
        yield chunk


def _member_name(name: str) -> str:
    """An entry's name without ``./`` and trailing ``/``; InvalidArgument for absolute or ``..`` names."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise InvalidArgument(f"image archive: entry {name!r} points outside the archive (absolute or '..' path)")
    return "/".join(parts)


def _blob_digest(name: str, match: re.Match[str] | None) -> Digest | None:
    if match is None:
        return None
    try:
        return Digest(f"{match[1]}:{match[2]}")
    except InvalidArgument as err:
        raise InvalidArgument(f"image archive: {name} is not a blob name: {err}") from None


def _is_tag(ref: str) -> bool:
    return not any(mark in ref for mark in "/:@")


def _normalised(name: str) -> str:
    from core.distribution.reference import Reference

    return str(Reference.parse(name))


def _base(base_name: str, where: str) -> str:
    if not base_name:
        raise InvalidArgument(f"image archive: {where} has no image name: give a base name (--base-name NAME)")
    return base_name


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
