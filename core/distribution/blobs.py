"""Store helpers shared by archives, conversion and signatures: a temporary lease, small documents read
and written whole, containerd's garbage-collection labels, the walk over an image's blobs, and saving an
image record.

Documents (indexes, manifests, configs, signature payloads) are read whole only up to
:data:`core.oci.MAX_DOCUMENT_SIZE` and checked against their descriptor; layers are never read here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from core import oci
from core.content import Info
from core.digest import Digest
from core.errors import AlreadyExists, InvalidArgument, NotFound
from core.metadata.content import ContentMetadata
from core.metadata.images import LABEL_GC_REF_CONTENT, Image, ImageStore
from core.metadata.leases import LABEL_GC_EXPIRE, LeaseStore
from core.types import Descriptor, Platform

__all__ = [
    "LEASE_EXPIRY",
    "gc_labels",
    "read_document",
    "run_all",
    "save_image",
    "temporary_lease",
    "walk",
    "write_blob",
]

LEASE_EXPIRY = timedelta(hours=24)
"""How long a temporary lease protects its blobs should the process die before deleting it."""


@contextmanager
def temporary_lease(leases: LeaseStore, namespace: str) -> Iterator[str]:
    """A lease (expiring after :data:`LEASE_EXPIRY`) for the block's work, deleted when the block ends,
    whatever the outcome: what the work left unreferenced is then the garbage collector's."""
    expires = (datetime.now(UTC) + LEASE_EXPIRY).strftime("%Y-%m-%dT%H:%M:%SZ")
    lease = leases.create(namespace, labels={LABEL_GC_EXPIRE: expires}).id
    try:
        yield lease
    finally:
        leases.delete(namespace, lease)


def read_document(content: ContentMetadata, namespace: str, desc: Descriptor) -> bytes:
    """The whole blob of ``desc``: NotFound when the namespace lacks it; InvalidArgument when it is bigger
    than :data:`~core.oci.MAX_DOCUMENT_SIZE` (refused unread) or does not match the descriptor."""
    if desc.size > oci.MAX_DOCUMENT_SIZE:
        raise InvalidArgument(
            f"{desc.media_type} {desc.digest}: {desc.size} bytes is more than the {oci.MAX_DOCUMENT_SIZE} allowed"
        )
    with content.reader_at(namespace, desc) as reader:
        data = reader.read(0, desc.size + 1)
    if len(data) != desc.size or Digest.from_bytes(data, desc.digest.algorithm) != desc.digest:
        raise InvalidArgument(f"{desc.media_type} {desc.digest}: content does not match its descriptor")
    return data


def write_blob(
    content: ContentMetadata,
    namespace: str,
    data: bytes,
    media_type: str,
    *,
    lease: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Descriptor:
    """Store the small blob ``data`` (with ``labels`` added, under ``lease``); return its descriptor.
    A blob the namespace holds already only gets the labels."""
    digest = Digest.from_bytes(data)
    labels = dict(labels or {})
    try:
        writer = content.writer(namespace, f"write-{digest}", len(data), digest, lease=lease)
    except AlreadyExists:
        if labels:
            content.update(namespace, Info(digest, labels=labels), [f"labels.{key}" for key in labels])
        return Descriptor(media_type, digest, len(data))
    with writer:
        if writer.offset != len(data):  # not shared from another namespace: write it
            writer.truncate(0)
            writer.write(data)
        writer.commit(len(data), digest, labels)
    return Descriptor(media_type, digest, len(data))


def gc_labels(media_type: str, data: bytes) -> dict[str, str]:
    """containerd's labels keeping an index's or manifest's children alive (``containerd.io/gc.ref.content.m.<i>``
    for an index's manifests, ``...config`` and ``...l.<i>`` for a manifest's blobs); ``{}`` for other blobs."""
    if oci.is_index(media_type):
        index = oci.parse_index(data, media_type)
        return {f"{LABEL_GC_REF_CONTENT}.m.{i}": child.digest for i, child in enumerate(index.manifests)}
    if oci.is_manifest(media_type):
        manifest = oci.parse_manifest(data, media_type)
        labels = {f"{LABEL_GC_REF_CONTENT}.config": manifest.config.digest}
        labels.update({f"{LABEL_GC_REF_CONTENT}.l.{i}": layer.digest for i, layer in enumerate(manifest.layers)})
        return labels
    return {}


def walk(
    content: ContentMetadata, namespace: str, target: Descriptor, platforms: Sequence[Platform] | None = None
) -> list[Descriptor]:
    """Every blob of the image ``target`` that ``platforms`` wants, parents first, each once.

    ``platforms``: None for the host's own (not those it can also run, which a pull does not fetch),
    ``[]`` for all. Wanted: the target, what a wanted manifest lists, and an index's entries for a
    wanted platform, with everything below them: NotFound names the first of those the namespace lacks.
    An index's other entries (other platforms, none given) and what they lead to are included when the
    namespace has them, skipped when not. InvalidArgument for malformed or oversized documents.
    """
    wanted = [oci.host_platform()] if platforms is None else platforms
    matcher = oci.PlatformMatcher(wanted) if wanted else None
    found: dict[Digest, Descriptor] = {}

    def visit(desc: Descriptor, required: bool) -> None:
        if desc.digest in found:
            return
        try:
            content.info(namespace, desc.digest)
        except NotFound:
            if required:
                raise NotFound(f"{desc.media_type} {desc.digest}: not found in namespace {namespace}") from None
            return
        found[desc.digest] = desc
        if oci.is_index(desc.media_type):
            index = oci.parse_index(read_document(content, namespace, desc), desc.media_type, f"index {desc.digest}")
            for child in index.manifests:
                match = matcher is None or (child.platform is not None and matcher.match(child.platform))
                visit(child, required and match)
        elif oci.is_manifest(desc.media_type):
            data = read_document(content, namespace, desc)
            manifest = oci.parse_manifest(data, desc.media_type, f"manifest {desc.digest}")
            for child in (manifest.config, *manifest.layers):
                visit(child, required)

    visit(target, True)
    return list(found.values())


def save_image(images: ImageStore, namespace: str, image: Image) -> Image:
    """Create the image record, or replace the target and labels of the one of that name; return it as stored."""
    try:
        return images.create(namespace, image)
    except AlreadyExists:
        return images.update(namespace, image)


def run_all(calls: Sequence[Callable[[], object]], workers: int, name: str) -> None:
    """Run ``calls`` on at most ``workers`` threads named ``name``-N. The first error cancels the calls
    not started yet and is raised once the started ones have ended."""
    if not calls:
        return
    with ThreadPoolExecutor(min(workers, len(calls)), thread_name_prefix=name) as pool:
        futures = [pool.submit(call) for call in calls]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
    for future in futures:
        if not future.cancelled():
            future.result()
