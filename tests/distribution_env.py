"""The in-process parts the archive, convert and signature tests run on: sqlite metadata, the local
content store, the overlay snapshotter, the walking differ, an Unpacker and a garbage collector; images
built with tests/oci_images.py and ingested as a pull would leave them."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oci_images import Layer, Layout

from core.digest import Digest
from core.distribution.blobs import gc_labels, write_blob
from core.gc import Collector
from core.hookspecs import hookimpl, new_plugin_manager
from core.metadata.content import ContentKind, ContentMetadata
from core.metadata.images import Image, ImageKind, ImageStore
from core.metadata.leases import LeaseKind, LeaseStore
from core.metadata.snapshots import SnapshotMetadata
from core.metadata.store import MetadataStore
from core.snapshot import Kind
from core.types import Descriptor
from core.unpack import Unpacker
from plugins.content_local import LocalContentStore
from plugins.snapshot_overlay import OverlaySnapshotter

NS = "default"
SN = "overlayfs"


class _Kinds:
    def __init__(self, *kinds: object) -> None:
        self.kinds = list(kinds)

    @hookimpl
    def containerkit_gc_kinds(self) -> list[Any]:
        return self.kinds


@dataclass
class Env:
    tmp: Path
    store: MetadataStore
    content: ContentMetadata
    images: ImageStore
    snapshots: SnapshotMetadata
    leases: LeaseStore
    unpacker: Unpacker
    collector: Collector
    layouts: int = 0

    def layout(self) -> Layout:
        self.layouts += 1
        return Layout(self.tmp / f"layout{self.layouts}")

    def image(self, name: str, layers: Sequence[Layer], namespace: str = NS, **options: Any) -> Image:
        """An image of ``layers`` (options as Layout.add_image) stored in ``namespace`` as a pull leaves it."""
        layout = self.layout()
        target = Descriptor.from_oci(layout.add_image("latest", layers, **options))
        self.ingest(layout, namespace)
        return self.images.create(namespace, Image(name, target))

    def ingest(self, layout: Layout, namespace: str = NS) -> None:
        """Every blob of ``layout``, documents with their gc.ref labels."""
        for path in layout.blobs.iterdir():
            data = path.read_bytes()
            media_type = _media_type(data)
            write_blob(self.content, namespace, data, media_type, labels=gc_labels(media_type, data))

    def read(self, desc: Descriptor | Digest, namespace: str = NS) -> bytes:
        with self.content.reader_at(namespace, desc) as reader:
            return reader.read(0, reader.size)

    def committed(self, namespace: str = NS) -> set[str]:
        return {i.name for i in self.snapshots.walk(namespace, SN) if i.kind is Kind.COMMITTED}

    def blobs(self, namespace: str = NS) -> set[str]:
        return {info.digest for info in self.content.walk(namespace)}

    def leftovers(self, namespace: str = NS) -> dict[str, list[Any]]:
        """What a failed operation must not leave: images, leases, ingests, active snapshots."""
        return {
            "images": self.images.list(namespace),
            "leases": self.leases.list(namespace),
            "ingests": self.content.list_statuses(namespace),
            "active": [i.name for i in self.snapshots.walk(namespace, SN) if i.kind is not Kind.COMMITTED],
        }


def _media_type(data: bytes) -> str:
    """A layout blob's media type as far as labels go: manifests and indexes say theirs."""
    try:
        doc = json.loads(data)
    except ValueError:
        return "application/octet-stream"
    return doc.get("mediaType", "application/octet-stream") if isinstance(doc, dict) else "application/octet-stream"


@contextmanager
def environment(tmp: Path) -> Iterator[Env]:
    from core.diff.walking import WalkingDiffer

    store = MetadataStore(tmp / "metadata.db")
    leases = LeaseStore(store)
    content = ContentMetadata(store, LocalContentStore(tmp / "content"), leases=leases)
    images = ImageStore(store)
    overlay = OverlaySnapshotter(tmp / "overlay")
    snapshots = SnapshotMetadata(store, {SN: overlay}, leases=leases)
    unpacker = Unpacker(content, snapshots, WalkingDiffer(content), leases=leases, rebase_snapshotters={SN})
    hooks = new_plugin_manager()
    hooks.register(_Kinds(ContentKind(content), ImageKind(images), LeaseKind(leases)), name="kinds")
    try:
        yield Env(tmp, store, content, images, snapshots, leases, unpacker, Collector(hooks, store))
    finally:
        overlay.close()
        store.close()


def run(*argv: str | Path) -> str:
    """Run a tool; its stdout (AssertionError with stderr when it fails)."""
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120)
    if result.returncode:
        raise AssertionError(f"{' '.join(map(str, argv))} failed: {result.stderr.strip()}")
    return result.stdout
