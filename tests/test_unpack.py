"""core.unpack.Unpacker in-process, over the real parts: sqlite metadata, the local content store, the
overlay snapshotter and the walking differ. Images are built in Python (tests/oci_images.py) and their
blobs ingested into the namespace's content, as a pull would leave them."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from interop import tree_differences, tree_of
from oci_images import Layer, Layout

from core import mount as mounting
from core import oci
from core.diff import LABEL_UNCOMPRESSED
from core.digest import Digest
from core.errors import FailedPrecondition, InvalidArgument, NotFound
from core.metadata.content import ContentMetadata
from core.metadata.leases import LeaseStore
from core.metadata.snapshots import SnapshotMetadata
from core.metadata.store import MetadataStore
from core.snapshot import Kind
from core.types import Descriptor, Platform
from core.unpack import Unpacker, UnpackResult
from plugins.content_local import LocalContentStore
from plugins.snapshot_overlay import OverlaySnapshotter

NS = "default"
SN = "overlayfs"


@dataclass
class Env:
    tmp: Path
    content: ContentMetadata
    snapshots: SnapshotMetadata
    leases: LeaseStore
    unpacker: Unpacker
    layouts: int = 0

    def image(self, layers: Sequence[Layer], namespace: str = NS, **options: Any) -> Descriptor:
        """Build an image of ``layers`` (options as Layout.add_image) and ingest its blobs into ``namespace``."""
        self.layouts += 1
        layout = Layout(self.tmp / f"layout{self.layouts}")
        manifest = Descriptor.from_oci(layout.add_image("latest", layers, **options))
        self.ingest(layout, namespace)
        return manifest

    def ingest(self, layout: Layout, namespace: str = NS) -> None:
        for path in layout.blobs.iterdir():
            self.put(path.read_bytes(), namespace)

    def put(self, data: bytes, namespace: str = NS) -> Digest:
        digest = Digest.from_bytes(data)
        if any(info.digest == digest for info in self.content.walk(namespace)):
            return digest
        with self.content.writer(namespace, f"test-{digest}", len(data), digest) as writer:
            if writer.offset < len(data):  # another namespace may have the blob already: nothing to write
                writer.write(data)
            writer.commit(len(data), digest)
        return digest

    def read(self, desc: Descriptor, namespace: str = NS) -> bytes:
        with self.content.reader_at(namespace, desc) as reader:
            return reader.read(0, reader.size)

    def resolve(self, target: Descriptor, namespace: str = NS) -> oci.ResolvedImage:
        return oci.resolve_image(lambda desc: self.read(desc, namespace), target)

    def committed(self, namespace: str = NS) -> dict[str, str]:
        """Committed snapshot name -> parent."""
        return {i.name: i.parent for i in self.snapshots.walk(namespace, SN) if i.kind is Kind.COMMITTED}

    def others(self, namespace: str = NS) -> list[str]:
        """Active snapshots and views (an unpack must leave none)."""
        return [i.name for i in self.snapshots.walk(namespace, SN) if i.kind is not Kind.COMMITTED]

    def tree(self, chain_id: str, namespace: str = NS) -> dict[str, Any]:
        """The file tree of committed snapshot ``chain_id``, read through a mounted view."""
        key = f"test-view-{chain_id}"
        mounts = self.snapshots.view(namespace, SN, key, chain_id)
        try:
            with mounting.temp_mount(mounts, parent=self.tmp) as root:
                return tree_of(root)
        finally:
            self.snapshots.remove(namespace, SN, key)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    from core.diff.walking import WalkingDiffer

    store = MetadataStore(tmp_path / "metadata.db")
    leases = LeaseStore(store)
    content = ContentMetadata(store, LocalContentStore(tmp_path / "content"), leases=leases)
    overlay = OverlaySnapshotter(tmp_path / "overlay")
    snapshots = SnapshotMetadata(store, {SN: overlay}, leases=leases)
    unpacker = Unpacker(content, snapshots, WalkingDiffer(content), leases=leases, rebase_snapshotters={SN})
    try:
        yield Env(tmp_path, content, snapshots, leases, unpacker)
    finally:
        overlay.close()


def base_layer() -> Layer:
    layer = Layer().dirs("bin", "etc", "etc/conf.d", "var", "var/lib", "usr")
    layer.file("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755)
    layer.file("etc/hostname", b"base\n").file("etc/conf.d/a.conf", b"a=1\n").file("etc/conf.d/b.conf", b"b=2\n")
    layer.file("var/lib/state", b"old state\n", uid=1000, gid=1000, mode=0o600)
    return layer.symlink("usr/bin", "../bin")


def change_layer() -> Layer:
    """Deletes a file (whiteout), replaces a directory (opaque), adds a hardlink and xattrs, and a new dir."""
    layer = Layer(compression="zstd").dirs("etc", "etc/conf.d", "var", "opt")
    layer.whiteout("etc/hostname")
    layer.opaque("etc/conf.d").file("etc/conf.d/c.conf", b"c=3\n")
    layer.file("opt/data", b"data\n").hardlink("opt/data-link", "opt/data")
    layer.file("opt/tagged", b"tagged\n", xattrs={"user.origin": "change"})
    return layer.whiteout("var/lib")


def top_layer() -> Layer:
    layer = Layer(compression="tar").dirs("etc", "var")
    return layer.file("etc/hostname", b"top\n", mode=0o640).dir("var/lib", mode=0o700)


def test_unpack_commits_one_snapshot_per_layer_named_by_chain_id(env: Env) -> None:
    target = env.image([base_layer(), change_layer(), top_layer()])
    result = env.unpacker.unpack(NS, target, SN)

    image = env.resolve(target)
    chain = oci.chain_ids(image.config.diff_ids)
    assert (result.chain_id, result.layers, result.applied) == (chain[-1], 3, 3)
    assert env.committed() == {chain[0]: "", chain[1]: chain[0], chain[2]: chain[1]}
    assert env.others() == []
    assert env.leases.list(NS) == []  # the temporary lease is gone
    assert env.snapshots.stat(NS, SN, chain[2]).labels["containerd.io/snapshot.ref"] == chain[2]
    config_labels = env.content.info(NS, image.manifest.config.digest).labels
    assert config_labels == {f"containerd.io/gc.ref.snapshot.{SN}": chain[-1]}
    for blob, diff_id in zip(image.manifest.layers, image.config.diff_ids, strict=True):
        assert env.content.info(NS, blob.digest).labels[LABEL_UNCOMPRESSED] == diff_id


@pytest.mark.parametrize("rebase", [False, True], ids=["sequential", "parallel"])
def test_whiteouts_opaque_dirs_and_metadata_come_out_right(env: Env, rebase: bool) -> None:
    result = env.unpacker.unpack(NS, env.image([base_layer(), change_layer(), top_layer()]), SN, rebase=rebase)
    tree = env.tree(result.chain_id)
    assert "etc/conf.d/a.conf" not in tree and "etc/conf.d/b.conf" not in tree  # opaque: replaced
    assert tree["etc/conf.d/c.conf"].size == 4
    assert tree["etc/hostname"].mode == 0o640 and tree["etc/hostname"].size == 4  # deleted, then added again
    assert tree["var/lib"].kind == "dir" and tree["var/lib"].mode == 0o700
    assert "var/lib/state" not in tree  # the whole directory was whited out below
    assert tree["opt/data"].links == ("opt/data-link",)
    assert tree["usr/bin"].target == "../bin" and tree["bin/tool"].mode == 0o755
    assert not [path for path in tree if ".wh." in path]
    assert all(node.kind != "char" for node in tree.values())  # no overlay whiteout devices show through


@pytest.mark.parametrize("rebase", [False, True], ids=["sequential", "parallel"])
def test_xattrs_of_files_are_applied(env: Env, rebase: bool) -> None:
    layer = Layer().dir("opt", xattrs={"user.kind": "dir"}).file("opt/f", b"f\n", xattrs={"user.kind": "file"})
    tree = env.tree(env.unpacker.unpack(NS, env.image([base_layer(), layer]), SN, rebase=rebase).chain_id)
    assert dict(tree["opt"].xattrs)["user.kind"] == b"dir"
    assert dict(tree["opt/f"].xattrs)["user.kind"] == b"file"


def test_parallel_and_sequential_unpacks_give_identical_trees(env: Env) -> None:
    layers = [base_layer(), change_layer(), top_layer(), Layer().dirs("etc").whiteout("etc/conf.d")]
    sequential = env.unpacker.unpack("seq", env.image(layers, "seq"), SN, rebase=False)
    parallel = env.unpacker.unpack("par", env.image(layers, "par"), SN, rebase=True)
    assert sequential == parallel
    ours, theirs = env.tree(sequential.chain_id, "seq"), env.tree(parallel.chain_id, "par")
    assert tree_differences(ours, theirs) == []
    assert "etc/conf.d" not in ours


def test_layers_already_unpacked_are_reused(env: Env) -> None:
    shared = [base_layer(), change_layer()]
    first = env.unpacker.unpack(NS, env.image(shared), SN)
    assert (first.layers, first.applied) == (2, 2)
    again = env.unpacker.unpack(NS, env.image(shared), SN)
    assert again == UnpackResult(first.chain_id, 2, 0)
    extended = env.unpacker.unpack(NS, env.image([*shared, top_layer()]), SN, rebase=False)
    assert (extended.layers, extended.applied) == (3, 1)
    assert env.committed()[extended.chain_id] == first.chain_id
    assert len(env.committed()) == 3


@pytest.mark.parametrize("rebase", [False, True], ids=["sequential", "parallel"])
def test_diff_id_mismatch_is_a_clear_error_and_commits_nothing_for_that_layer(env: Env, rebase: bool) -> None:
    layers = [base_layer(), change_layer(), top_layer()]
    real = [Digest.from_bytes(layer.tar()) for layer in layers]
    lie = Digest.from_bytes(b"not the layer")
    target = env.image(layers, diff_ids=[real[0], lie, real[2]])
    with pytest.raises(FailedPrecondition) as err:
        env.unpacker.unpack(NS, target, SN, rebase=rebase)
    message = str(err.value)
    assert "layer 2/3" in message and f"diff id mismatch: got {real[1]}, want {lie}" in message
    chain = oci.chain_ids([real[0], lie, real[2]])
    assert chain[1] not in env.committed() and chain[2] not in env.committed()
    assert set(env.committed()) <= {chain[0]}
    assert env.others() == []
    assert env.leases.list(NS) == []


def test_corrupt_layer_is_refused_and_leaves_no_active_snapshot(env: Env) -> None:
    broken = Layer(mangle=lambda blob: blob[: len(blob) // 2]).file("big", bytes(range(256)) * 512)
    with pytest.raises(Exception, match="layer 2/2"):
        env.unpacker.unpack(NS, env.image([base_layer(), broken]), SN)
    assert env.others() == []


def test_an_image_of_128_layers_unpacks_and_mounts(env: Env) -> None:
    layers = [Layer().dir("layers").file(f"layers/{n:03}", f"{n}\n".encode()) for n in range(128)]
    result = env.unpacker.unpack(NS, env.image(layers), SN)
    assert (result.layers, result.applied) == (128, 128)
    tree = env.tree(result.chain_id)
    assert sorted(path for path in tree if path.startswith("layers/")) == [f"layers/{n:03}" for n in range(128)]


def test_concurrent_unpacks_of_one_image_agree(env: Env) -> None:
    target = env.image([base_layer(), change_layer(), top_layer()])
    results: list[Any] = []

    def unpack(rebase: bool) -> None:
        results.append(env.unpacker.unpack(NS, target, SN, rebase=rebase))

    threads = [threading.Thread(target=unpack, args=(n % 2 == 0,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len({r.chain_id for r in results}) == 1
    assert len(env.committed()) == 3 and env.others() == []


def test_the_platform_is_picked_from_an_index(env: Env) -> None:
    amd64 = env.image([base_layer()])
    arm64 = env.image([top_layer()])
    entries = [
        Descriptor(amd64.media_type, amd64.digest, amd64.size, platform=Platform("linux", "amd64")),
        Descriptor(arm64.media_type, arm64.digest, arm64.size, platform=Platform("linux", "arm64", "v8")),
    ]
    index = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [e.to_oci() for e in entries]})
    digest = env.put(index.encode())
    target = Descriptor(oci.OCI_INDEX, digest, len(index))
    on_arm = env.unpacker.unpack(NS, target, SN, Platform("linux", "arm64"))
    assert on_arm.chain_id == Digest.from_bytes(top_layer().tar())
    on_amd = env.unpacker.unpack(NS, target, SN, Platform("linux", "amd64"))
    assert on_amd.chain_id == Digest.from_bytes(base_layer().tar())
    with pytest.raises(NotFound, match="no manifest for platform linux/riscv64"):
        env.unpacker.unpack(NS, target, SN, Platform("linux", "riscv64"))


def manifest_blob(env: Env, doc: Any, media_type: str = oci.OCI_MANIFEST) -> Descriptor:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return Descriptor(media_type, env.put(data), len(data))


def test_malformed_documents_are_clear_errors(env: Env) -> None:
    layer = Layer().file("a", b"a")
    blob = Descriptor(oci.OCI_LAYER_GZIP, env.put(b"not really a layer"), 18)
    good_config = manifest_blob(env, {"rootfs": {"type": "layers", "diff_ids": [Digest.from_bytes(layer.tar())]}})
    config = Descriptor(oci.OCI_CONFIG, good_config.digest, good_config.size)
    bad_config = manifest_blob(env, {"architecture": "amd64", "os": "linux"})
    cases = [
        (manifest_blob(env, b"{"), "not valid JSON"),
        (manifest_blob(env, {"schemaVersion": 1, "fsLayers": []}), "schema 1 manifests are not supported"),
        (manifest_blob(env, {"schemaVersion": 2, "layers": []}), "missing 'config'"),
        (
            manifest_blob(env, {"schemaVersion": 2, "config": {**bad_config.to_oci(), "mediaType": oci.OCI_CONFIG}}),
            "missing 'rootfs' object",
        ),
        (
            manifest_blob(env, {"schemaVersion": 2, "config": config.to_oci(), "layers": [blob.to_oci()] * 2}),
            "the manifest has 2 layers but the config lists 1 diff ids",
        ),
        (
            manifest_blob(env, {"schemaVersion": 2, "config": config.to_oci(), "layers": [config.to_oci()]}),
            "layer 1 has media type 'application/vnd.oci.image.config.v1+json', not a layer",
        ),
    ]
    for target, message in cases:
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            env.unpacker.unpack(NS, target, SN)
    assert env.committed() == {} and env.others() == [] and env.leases.list(NS) == []


def test_missing_blobs_and_unknown_snapshotters(env: Env) -> None:
    target = env.image([base_layer(), top_layer()])
    with pytest.raises(InvalidArgument, match="snapshotter not loaded: nope"):
        env.unpacker.unpack(NS, target, "nope")
    env.content.delete(NS, env.resolve(target).manifest.layers[1].digest)
    with pytest.raises(NotFound, match="not found"):
        env.unpacker.unpack(NS, target, SN)
    assert env.others() == [] and env.leases.list(NS) == []
