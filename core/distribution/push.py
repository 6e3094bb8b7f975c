"""Pushing an image from a namespace to a registry.

:meth:`Pusher.push` walks the image's target: for an index, the entries of the wanted platforms (given ones,
or else every entry the namespace holds); an index that loses entries that way is pushed rewritten (its
other fields kept), so its digest changes. Then, for each blob the registry lacks (``HEAD`` first), it
mounts it from another repository of the same registry the blob came from (containerd's label
``containerd.io/distribution.source.<host>=<repo,...>``) or uploads it, layers concurrently, configs with
them; then the manifests by digest, and the top document under the reference's tag (or digest). Nothing
local changes.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from core import oci
from core.digest import Digest
from core.distribution.blobs import read_document, run_all
from core.distribution.progress import Progress, ProgressFn, blob_ref
from core.distribution.pull import LABEL_DISTRIBUTION_SOURCE
from core.distribution.reference import Reference
from core.distribution.registry import RegistryClient
from core.errors import NotFound
from core.metadata.content import ContentMetadata
from core.metadata.images import ImageStore
from core.types import Descriptor, Platform

__all__ = ["Pusher"]

log = logging.getLogger("containerkit.push")

UPLOAD_READ_SIZE = 1 << 20  # bytes read from the content store per uploaded chunk


@dataclass
class _Plan:
    """What one push sends: blobs (configs, layers) by digest, then documents children first."""

    blobs: dict[Digest, tuple[str, Descriptor]] = field(default_factory=dict)  # digest -> (kind, descriptor)
    documents: list[tuple[str, Descriptor, bytes]] = field(default_factory=list)  # (kind, descriptor, bytes)


class _LocalBlob:
    """A local blob as re-iterable chunks (each iteration reads it again), reporting bytes read."""

    def __init__(
        self, content: ContentMetadata, namespace: str, desc: Descriptor, report: Callable[[int], None]
    ) -> None:
        self._content, self._namespace, self._desc, self._report = content, namespace, desc, report

    def __iter__(self) -> Iterator[bytes]:
        with self._content.reader_at(self._namespace, self._desc) as reader:
            done = 0
            for chunk in reader.chunks(0, UPLOAD_READ_SIZE):
                yield chunk
                done += len(chunk)
                self._report(done)


class Pusher:
    """Pushes images of ``images`` with their blobs from ``content``; ``workers`` blobs upload at once."""

    def __init__(self, content: ContentMetadata, images: ImageStore, *, workers: int = 4) -> None:
        self._content = content
        self._images = images
        self._workers = max(workers, 1)

    def push(
        self,
        namespace: str,
        local_name: str,
        ref: Reference,
        client: RegistryClient,
        platforms: Sequence[Platform] | None = None,
        progress: ProgressFn | None = None,
        chunk_size: int = 0,
    ) -> Descriptor:
        """Push image ``local_name`` of ``namespace`` to ``ref``; returns the descriptor the registry now has.

        ``platforms``: for an index, the entries to push (None: those the namespace holds). ``chunk_size``:
        0 for one upload request per blob, else chunked uploads. NotFound when the image, or a blob of a
        wanted entry, is missing; registry errors as :class:`~core.distribution.registry.RegistryClient`'s.
        """
        report = progress or (lambda event: None)
        image = self._images.get(namespace, local_name)
        matcher = oci.PlatformMatcher(platforms) if platforms else None
        plan = _Plan()
        top = self._plan(namespace, image.target, matcher, plan)
        if top is None:
            raise NotFound(f"image {local_name}: no manifest for platform {matcher} in namespace {namespace}")
        report(Progress(str(ref), "image", top.digest, "uploading", 0, len(plan.blobs)))
        self._send_blobs(namespace, ref, client, plan, report, chunk_size)
        for kind, desc, data in plan.documents:
            target = ref if desc.digest == top.digest else Reference(ref.domain, ref.path, digest=desc.digest)
            report(Progress(blob_ref(kind, desc.digest), kind, desc.digest, "uploading", 0, desc.size))
            client.put_manifest(target, desc.media_type, data)
            report(Progress(blob_ref(kind, desc.digest), kind, desc.digest, "done", desc.size, desc.size))
        report(Progress(str(ref), "image", top.digest, "done", len(plan.blobs), len(plan.blobs)))
        return top

    # -- what to push ------------------------------------------------------------------------------

    def _plan(
        self, namespace: str, desc: Descriptor, matcher: oci.PlatformMatcher | None, plan: _Plan
    ) -> Descriptor | None:
        """Add ``desc``'s graph to ``plan``; the descriptor to push for it (rewritten index), None to leave out."""
        if oci.is_manifest(desc.media_type):
            data = read_document(self._content, namespace, desc)
            manifest = oci.parse_manifest(data, desc.media_type, f"manifest {desc.digest}")
            plan.blobs[manifest.config.digest] = ("config", manifest.config)
            for layer in manifest.layers:
                if not layer.urls:  # foreign layers stay where their urls point
                    plan.blobs[layer.digest] = ("layer", layer)
            plan.documents.append(("manifest", desc, data))
            return desc
        if not oci.is_index(desc.media_type):
            raise NotFound(f"{desc.digest}: media type {desc.media_type!r} is not an image index or manifest")
        data = read_document(self._content, namespace, desc)
        name = f"index {desc.digest}"
        index = oci.parse_index(data, desc.media_type, name)
        entries: list[Any] = json.loads(data)["manifests"]
        kept: list[Any] = []
        for child, entry in zip(index.manifests, entries, strict=True):
            wanted = matcher is None or child.platform is None or matcher.match(child.platform)
            if not wanted or not (oci.is_index(child.media_type) or oci.is_manifest(child.media_type)):
                continue
            if matcher is None and not self._holds(namespace, child.digest):
                continue
            pushed = self._plan(namespace, child, matcher, plan)
            if pushed is not None:
                kept.append({**entry, "digest": pushed.digest, "size": pushed.size})
        if not kept:
            return None
        if kept != entries:
            data = json.dumps({**json.loads(data), "manifests": kept}, separators=(",", ":")).encode()
            desc = replace(desc, digest=Digest.from_bytes(data), size=len(data))
            log.info("%s: pushing %d of its %d entries as index %s", name, len(kept), len(entries), desc.digest)
        plan.documents.append(("index", desc, data))
        return desc

    def _holds(self, namespace: str, digest: Digest) -> bool:
        try:
            self._content.info(namespace, digest)
        except NotFound:
            return False
        return True

    # -- blobs -------------------------------------------------------------------------------------

    def _send_blobs(
        self, namespace: str, ref: Reference, client: RegistryClient, plan: _Plan, report: ProgressFn, chunk_size: int
    ) -> None:
        """Every blob of ``plan`` into the registry, ``workers`` at once, largest first (so that no big one starts
        last and runs alone); the first failure stops the rest."""
        blobs = sorted(plan.blobs.values(), key=lambda item: item[1].size, reverse=True)
        for kind, desc in blobs:
            report(Progress(blob_ref(kind, desc.digest), kind, desc.digest, "waiting", 0, desc.size))
        sends = [
            functools.partial(self._send_blob, namespace, ref, client, kind, desc, report, chunk_size)
            for kind, desc in blobs
        ]
        run_all(sends, self._workers, "push")

    def _send_blob(
        self,
        namespace: str,
        ref: Reference,
        client: RegistryClient,
        kind: str,
        desc: Descriptor,
        report: ProgressFn,
        chunk_size: int,
    ) -> None:
        """One blob: nothing when the registry has it, a mount when it can, else an upload."""
        key = blob_ref(kind, desc.digest)

        def event(state: str, offset: int, message: str = "") -> None:
            report(Progress(key, kind, desc.digest, state, offset, desc.size, message))

        try:
            if client.blob_exists(ref, desc.digest) is not None:
                event("exists", desc.size)
                return
            for source in self._sources(namespace, desc.digest, ref):
                if client.mount_blob(ref, desc.digest, source):
                    event("mounted", desc.size)
                    return
            event("uploading", 0)
            blob = _LocalBlob(self._content, namespace, desc, lambda done: event("uploading", done))
            client.upload_blob(ref, desc, blob, chunk_size=chunk_size)
            event("done", desc.size)
        except Exception as err:
            event("error", 0, str(err))
            raise

    def _sources(self, namespace: str, digest: Digest, ref: Reference) -> list[str]:
        """The other repositories of ``ref``'s registry the blob came from (its distribution-source label)."""
        labels = self._content.info(namespace, digest).labels
        repositories = labels.get(LABEL_DISTRIBUTION_SOURCE + ref.domain, "")
        return [repo for repo in repositories.split(",") if repo and repo != ref.path]
