"""core.distribution.pull.Puller in-process, over the real parts: sqlite metadata, the local content store, the
overlay snapshotter, the walking differ, and Debian's docker-registry (tests/interop.py) holding images built in
Python (tests/oci_images.py) and pushed with skopeo; and, where requests are counted or answers spoiled, the
in-memory FaultyRegistry of tests/registry_servers.py serving the same layouts."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningDaemon
from interop import SKOPEO, Registry, busybox_image, remove_namespace_dirs, tree_differences, tree_of
from oci_images import MT_INDEX, MT_MANIFEST, Layer, Layout
from registry_servers import Fault, FaultyRegistry, faulty_registry
from test_unpack import Env as UnpackEnv
from test_unpack import base_layer, change_layer, top_layer
from test_unpack import env as unpack_env  # noqa: F401 - test_unpack's fixture, which env builds on

from core import oci
from core.diff import LABEL_UNCOMPRESSED
from core.diff.walking import WalkingDiffer
from core.digest import Digest
from core.distribution.progress import Progress
from core.distribution.pull import INGEST_PREFIX, LABEL_PULL, Puller, PullOptions
from core.distribution.reference import Reference
from core.distribution.registry import RegistryClient
from core.errors import FailedPrecondition, NotFound, Unavailable
from core.metadata.content import ContentMetadata
from core.metadata.images import ImageStore
from core.metadata.leases import LeaseStore
from core.types import Descriptor, Platform
from core.unpack import Unpacker

NS = "default"
SN = "overlayfs"
UMOCI = shutil.which("umoci") or "/usr/bin/umoci"


# -- the in-process stack -----------------------------------------------------------------------------------


@dataclass
class Env:
    """tests/test_unpack.py's in-process stack (``stack``: content, overlay snapshots, unpacker), with images, a
    Puller, the docker-registry and a faulty registry."""

    stack: UnpackEnv
    registry: Registry
    faulty: FaultyRegistry
    images: ImageStore
    puller: Puller

    @property
    def content(self) -> ContentMetadata:
        return self.stack.content

    @property
    def leases(self) -> LeaseStore:
        return self.stack.leases

    def layout(self, layers: Sequence[Layer], **options: Any) -> Layout:
        """A new layout holding an image of ``layers`` tagged ``latest`` (options as Layout.add_image)."""
        self.stack.layouts += 1
        layout = Layout(self.stack.tmp / f"layout{self.stack.layouts}")
        layout.add_image("latest", layers, **options)
        return layout

    def push(self, layers: Sequence[Layer], name: str, **options: Any) -> tuple[str, Layout]:
        """Build an image of ``layers`` and push it to the docker-registry; returns its reference and layout."""
        layout = self.layout(layers, **options)
        return self.registry.push(layout.directory, "latest", name), layout

    def serve(self, layers: Sequence[Layer], name: str, **options: Any) -> tuple[str, Layout]:
        """Build an image of ``layers`` and serve it from the faulty registry; returns its reference and layout."""
        layout = self.layout(layers, **options)
        for blob in layout.blobs.iterdir():
            self.faulty.add_blob(blob.read_bytes())
        _, digest = self.manifest(layout)
        self.faulty.add_manifest(name, "latest", MT_MANIFEST, (layout.blobs / digest.split(":")[1]).read_bytes())
        return f"{self.faulty.host}/{name}:latest", layout

    def blob_gets(self) -> list[tuple[str, str]]:
        """(digest, Range) of every blob GET the faulty registry answered so far."""
        return [
            (path.rsplit("/", 1)[1], headers.get("Range", ""))
            for method, path, headers in self.faulty.requests
            if method == "GET" and "/blobs/sha256:" in path
        ]

    def spoil(self, name: str, digest: str, *faults: Fault) -> None:
        self.faulty.fail("GET", f"/v2/{name}/blobs/{digest}", *faults)

    def pull(self, ref: str, namespace: str = NS, retries: int = 4, **options: Any) -> Any:
        client = RegistryClient(retries=retries, backoff=0.01)
        events: list[Progress] = []
        image = self.puller.pull(namespace, Reference.parse(ref), client, PullOptions(**options), events.append)
        return image, events

    def manifest(self, layout: Layout, tag: str = "latest") -> Any:
        index = json.loads((layout.directory / "index.json").read_text())
        entry = next(m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        return json.loads((layout.blobs / entry["digest"].split(":")[1]).read_text()), entry["digest"]

    def committed(self, namespace: str = NS) -> set[str]:
        return set(self.stack.committed(namespace))

    def others(self, namespace: str = NS) -> list[str]:
        return self.stack.others(namespace)

    def has(self, digest: str, namespace: str = NS) -> bool:
        try:
            self.content.info(namespace, digest)
        except NotFound:
            return False
        return True

    def tree(self, chain_id: str, namespace: str = NS) -> dict[str, Any]:
        return self.stack.tree(chain_id, namespace)


@pytest.fixture
def env(unpack_env: UnpackEnv, registry: Registry) -> Iterator[Env]:  # noqa: F811 - the imported fixture
    images = ImageStore(unpack_env.content.store)
    puller = Puller(unpack_env.content, images, unpack_env.unpacker, unpack_env.leases)
    with faulty_registry() as faulty:
        yield Env(unpack_env, registry, faulty, images, puller)


def chain_of(layout_manifest: Any, layout: Layout) -> list[Digest]:
    config = json.loads((layout.blobs / layout_manifest["config"]["digest"].split(":")[1]).read_text())
    return oci.chain_ids(config["rootfs"]["diff_ids"])


# -- tests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rebase", [True, False], ids=["streaming", "download-then-unpack"])
def test_pull_unpacks_what_umoci_unpacks_and_labels_like_containerd(env: Env, rebase: bool) -> None:
    if not rebase:
        unpacker = Unpacker(env.content, env.stack.snapshots, WalkingDiffer(env.content), leases=env.leases)
        env.puller = Puller(env.content, env.images, unpacker, env.leases)
    layers = [base_layer(), change_layer(), top_layer()]
    layers[1].compression = "gzip"  # umoci 0.4 cannot read zstd
    ref, layout = env.push(layers, name="pull/umoci")
    image, events = env.pull(ref)

    manifest, manifest_digest = env.manifest(layout)
    chain = chain_of(manifest, layout)
    assert image.name == ref and image.target.digest == manifest_digest
    assert env.images.get(NS, ref).target.media_type == oci.OCI_MANIFEST
    assert env.committed() == set(chain) and env.others() == []
    assert env.leases.list(NS) == []  # the pull's lease is gone once the image is recorded
    assert env.content.list_statuses(NS) == []
    source = {f"containerd.io/distribution.source.{env.registry.host}": "pull/umoci"}
    refs = {"containerd.io/gc.ref.content.config": manifest["config"]["digest"]}
    refs |= {f"containerd.io/gc.ref.content.l.{n}": layer["digest"] for n, layer in enumerate(manifest["layers"])}
    assert env.content.info(NS, manifest_digest).labels == refs | source
    config_labels = env.content.info(NS, manifest["config"]["digest"]).labels
    assert config_labels == source | {f"containerd.io/gc.ref.snapshot.{SN}": chain[-1]}
    config = json.loads((layout.blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        assert env.content.info(NS, layer["digest"]).labels == source | {LABEL_UNCOMPRESSED: diff_id}
    assert {(e.kind, e.state) for e in events} >= {("layer", "downloading"), ("layer", "done"), ("image", "done")}

    bundle = env.stack.tmp / "bundle"
    subprocess.run([UMOCI, "unpack", "--image", f"{layout.directory}:latest", str(bundle)], check=True,
                   capture_output=True)  # fmt: skip
    theirs = tree_of(bundle / "rootfs")
    ours = env.tree(chain[-1])
    assert tree_differences(ours, theirs, unstable_mtimes={".", "opt"}) == []


def test_zstd_layers_and_a_second_pull_that_fetches_no_blob(env: Env) -> None:
    layers = [Layer("zstd").dirs("a").file("a/one", b"1" * 100_000), Layer("zstd").dirs("b").file("b/two", b"2")]
    ref, layout = env.serve(layers, name="pull/zstd")
    manifest, _ = env.manifest(layout)
    assert {layer["mediaType"] for layer in manifest["layers"]} == {oci.OCI_LAYER_ZSTD}
    env.pull(ref)
    chain = chain_of(manifest, layout)
    assert env.tree(chain[-1])["a/one"].size == 100_000
    gets = len(env.blob_gets())
    assert gets == 3  # config and two layers

    _, events = env.pull(ref)  # the namespace has everything: no blob fetched, nothing applied
    assert len(env.blob_gets()) == gets
    assert {e.state for e in events if e.kind == "layer"} == {"exists"}

    env.pull(ref, namespace="other")  # the store has the blobs: recorded, not fetched; unpacked again
    assert len(env.blob_gets()) == gets
    assert env.committed("other") == set(chain)


def test_a_cut_connection_is_resumed_with_a_range_request(env: Env) -> None:
    ref, layout = env.serve([base_layer()], name="pull/cut")
    manifest, _ = env.manifest(layout)
    layer = manifest["layers"][0]
    env.spoil("pull/cut", layer["digest"], Fault(cut_after=layer["size"] // 3))
    env.pull(ref)
    assert (layer["digest"], f"bytes={layer['size'] // 3}-") in env.blob_gets()
    assert env.committed() == set(chain_of(manifest, layout))


def test_a_failed_pull_keeps_its_lease_and_a_retry_resumes_the_ingest(env: Env) -> None:
    ref, layout = env.serve([base_layer(), top_layer()], name="pull/retry")
    manifest, _ = env.manifest(layout)
    layer = manifest["layers"][0]
    cut = layer["size"] // 2
    env.spoil("pull/retry", layer["digest"], Fault(cut_after=cut))
    with pytest.raises(Unavailable):
        env.pull(ref, retries=0)
    with pytest.raises(NotFound):
        env.images.get(NS, ref)
    (lease,) = env.leases.list(NS)
    assert lease.labels[LABEL_PULL] == ref
    (status,) = env.content.list_statuses(NS)
    assert status.ref == INGEST_PREFIX + layer["digest"] and status.offset == cut
    assert chain_of(manifest, layout)[0] not in env.committed() and env.others() == []

    env.faulty.requests.clear()
    env.pull(ref)
    assert env.blob_gets() == [(layer["digest"], f"bytes={cut}-")]  # the rest of it, and nothing else
    assert env.committed() == set(chain_of(manifest, layout))
    assert env.content.list_statuses(NS) == []
    assert [lease.id for lease in env.leases.list(NS)] == [lease.id]  # the failed pull's, expiring in a day


def test_a_resumed_ingest_of_wrong_bytes_is_fetched_again_whole(env: Env) -> None:
    ref, layout = env.serve([base_layer()], name="pull/badprefix")
    manifest, _ = env.manifest(layout)
    layer = manifest["layers"][0]
    with env.content.writer(NS, INGEST_PREFIX + layer["digest"], layer["size"], layer["digest"]) as writer:
        writer.write(b"\0" * (layer["size"] // 2))  # left by an earlier pull from a registry that lied
    env.pull(ref)
    assert [rng for digest, rng in env.blob_gets() if digest == layer["digest"]] == [f"bytes={layer['size'] // 2}-", ""]
    assert env.committed() == set(chain_of(manifest, layout)) and env.content.list_statuses(NS) == []


def test_bytes_that_do_not_match_the_digest_leave_nothing_behind(env: Env) -> None:
    ref, layout = env.serve([base_layer(), top_layer()], name="pull/corrupt")
    manifest, _ = env.manifest(layout)
    bad = manifest["layers"][1]
    real = (layout.blobs / bad["digest"].split(":")[1]).read_bytes()
    env.spoil("pull/corrupt", bad["digest"], Fault(body=bytes(b ^ 0x5A for b in real)))
    with pytest.raises(FailedPrecondition, match=f"digest mismatch: got sha256:[0-9a-f]{{64}}, want {bad['digest']}"):
        env.pull(ref)
    with pytest.raises(NotFound):
        env.images.get(NS, ref)
    chain = chain_of(manifest, layout)
    assert chain[1] not in env.committed() and env.others() == []
    assert not env.has(bad["digest"]) and env.content.list_statuses(NS) == []  # the bad bytes are gone


def test_a_layer_whose_diff_id_is_not_the_configs_commits_no_snapshot(env: Env) -> None:
    lie = str(Digest.from_bytes(b"not the layer"))
    base = base_layer()
    ref, layout = env.push([base, top_layer()], name="pull/diffid", diff_ids=[str(Digest.from_bytes(base.tar())), lie])
    with pytest.raises(FailedPrecondition, match="diff id mismatch"):
        env.pull(ref)
    with pytest.raises(NotFound):
        env.images.get(NS, ref)
    manifest, _ = env.manifest(layout)
    assert oci.chain_ids([str(Digest.from_bytes(base.tar())), lie])[1] not in env.committed()
    assert env.others() == [] and not env.has(manifest["layers"][1]["digest"])


def push_index(env: Env, name: str, archs: Sequence[str] = ("amd64", "arm64")) -> tuple[str, dict[str, str]]:
    """An index of a linux image per architecture in ``archs`` pushed with skopeo --all; returns its reference
    and {platform: manifest digest}."""
    layout = Layout(env.stack.tmp / name.replace("/", "-"))
    manifests = {}
    for arch in archs:
        desc = layout.add_image(arch, [Layer().dirs("etc").file("etc/arch", arch.encode())])
        manifest = json.loads((layout.blobs / desc["digest"].split(":")[1]).read_text())
        config = json.loads((layout.blobs / manifest["config"]["digest"].split(":")[1]).read_text())
        config["architecture"] = arch
        manifest["config"] = layout.blob(json.dumps(config).encode(), manifest["config"]["mediaType"])
        desc = layout.blob(json.dumps(manifest).encode(), oci.OCI_MANIFEST)
        manifests[f"linux/{arch}"] = {**desc, "platform": {"os": "linux", "architecture": arch}}
    index = layout.blob(
        json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": list(manifests.values())}).encode(),
        MT_INDEX,
    )
    entry = {**index, "annotations": {"org.opencontainers.image.ref.name": "multi"}}
    (layout.directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    subprocess.run(
        [SKOPEO, "--insecure-policy", "copy", "--quiet", "--all", "--preserve-digests", "--dest-tls-verify=false",
         f"oci:{layout.directory}:multi", f"docker://{env.registry.host}/{name}:multi"],
        check=True, capture_output=True,
    )  # fmt: skip
    return f"{env.registry.host}/{name}:multi", {p: m["digest"] for p, m in manifests.items()}


@pytest.mark.skipif(oci.host_platform() != Platform("linux", "amd64"), reason="the index has an amd64 image")
def test_platforms_host_one_or_all(env: Env) -> None:
    ref, manifests = push_index(env, "pull/multi")
    image, _ = env.pull(ref)
    assert image.target.media_type == oci.OCI_INDEX
    index_labels = env.content.info(NS, image.target.digest).labels
    assert index_labels["containerd.io/gc.ref.content.m.0"] == manifests["linux/amd64"]
    assert "containerd.io/gc.ref.content.m.1" not in index_labels
    assert not env.has(manifests["linux/arm64"])
    assert len(env.committed()) == 1

    env.pull(ref, namespace="arm", platforms=[Platform("linux", "arm64")])
    assert not env.has(manifests["linux/amd64"], "arm") and env.has(manifests["linux/arm64"], "arm")
    (arm_top,) = env.committed("arm")
    assert env.tree(arm_top, "arm")["etc/arch"].sha256 is not None

    image, _ = env.pull(ref, namespace="all", platforms=[])
    labels = env.content.info("all", image.target.digest).labels
    assert {labels["containerd.io/gc.ref.content.m.0"], labels["containerd.io/gc.ref.content.m.1"]} == set(
        manifests.values()
    )
    assert env.has(manifests["linux/arm64"], "all") and env.has(manifests["linux/amd64"], "all")
    assert env.committed("all") == env.committed()  # the host's platform unpacked only


def test_a_refusing_verify_hook_leaves_no_image(env: Env) -> None:
    ref, _ = env.serve([top_layer()], name="pull/refused")
    seen = []

    def refuse(reference: Reference, target: Descriptor) -> None:
        seen.append((str(reference), target.media_type))
        raise FailedPrecondition("no valid signature")

    with pytest.raises(FailedPrecondition, match="no valid signature"):
        env.pull(ref, verify=refuse)
    assert seen == [(ref, oci.OCI_MANIFEST)]
    with pytest.raises(NotFound):
        env.images.get(NS, ref)
    assert len(env.leases.list(NS)) == 1  # everything fetched waits there for a retry
    fetched = len(env.blob_gets())
    env.pull(ref)
    assert len(env.blob_gets()) == fetched


def test_an_index_without_the_hosts_platform(env: Env) -> None:
    ref, manifests = push_index(env, "pull/foreign", archs=("riscv64",))
    with pytest.raises(NotFound, match="no manifest for platform"):
        env.pull(ref)
    with pytest.raises(NotFound):
        env.images.get(NS, ref)
    image, _ = env.pull(ref, platforms=[])  # all platforms: fetched, nothing to unpack for this host
    assert env.has(manifests["linux/riscv64"]) and env.images.get(NS, ref) == image
    assert env.committed() == set()


def test_no_unpack_fetches_every_blob_and_makes_no_snapshot(env: Env) -> None:
    ref, layout = env.push([base_layer(), top_layer()], name="pull/nounpack")
    image, _ = env.pull(ref, unpack=False, labels={"team": "a"})
    assert image.labels == {"team": "a"}
    manifest, _ = env.manifest(layout)
    assert all(env.has(layer["digest"]) for layer in manifest["layers"])
    assert env.committed() == set()


def test_a_pull_by_digest_targets_that_manifest(env: Env) -> None:
    ref, layout = env.push([top_layer()], name="pull/target")
    _, digest = env.manifest(layout)
    env.pull(ref)
    again, _ = env.pull(f"{env.registry.host}/pull/target@{digest}")
    assert again.target == Descriptor(oci.OCI_MANIFEST, Digest(digest), again.target.size)
    assert env.images.get(NS, ref).target == again.target


def test_docker_schema2_images_are_pulled_and_unpacked(env: Env) -> None:
    layout = env.layout([base_layer(), Layer().dirs("etc").file("etc/docker", b"yes\n")])
    ref = env.registry.push(layout.directory, "latest", "pull/docker", docker=True)
    image, _ = env.pull(ref)
    assert image.target.media_type == oci.DOCKER_MANIFEST
    manifest, _ = env.manifest(layout)
    assert env.committed() == set(chain_of(manifest, layout))


def test_concurrent_pulls_of_one_image_share_the_work(env: Env) -> None:
    ref, layout = env.serve([base_layer(), top_layer()], name="pull/twice")
    with ThreadPoolExecutor(2) as pool:
        images = list(pool.map(lambda _: env.pull(ref)[0], range(2)))
    assert images[0].target == images[1].target
    manifest, _ = env.manifest(layout)
    assert env.committed() == set(chain_of(manifest, layout)) and env.others() == []
    layer_gets = [digest for digest, _ in env.blob_gets() if digest != manifest["config"]["digest"]]
    assert sorted(layer_gets) == sorted(layer["digest"] for layer in manifest["layers"])  # each fetched once
    assert env.leases.list(NS) == [] and env.content.list_statuses(NS) == []


def test_an_image_pulled_by_the_daemon_runs(containerkitd: RunningDaemon, registry: Registry, tmp_path: Path) -> None:
    ref = busybox_image(registry, tmp_path)
    namespace = "pull-runs"
    try:
        pulled = containerkitd.ckctl("images", "pull", "--plain-http", ref, namespace=namespace)
        assert "done" in pulled.stdout + pulled.stderr
        run = containerkitd.ckctl("run", "--rm", ref, "pulled", "sh", "-c", "echo ran from $(ls /bin/busybox)",
                                  namespace=namespace)  # fmt: skip
        assert run.stdout == "ran from /bin/busybox\n"
    finally:
        remove_namespace_dirs(namespace)
