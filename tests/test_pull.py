"""core.distribution.pull.Puller in-process, over the real parts: sqlite metadata, the local content store, the
overlay snapshotter, the walking differ, and Debian's docker-registry (tests/interop.py) holding images built in
Python (tests/oci_images.py) and pushed with skopeo. Faults come from a proxy in front of the registry that cuts
or corrupts the bodies of chosen blobs."""

from __future__ import annotations

import http.client
import http.server
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from interop import SKOPEO, Registry, free_port, tree_differences, tree_of
from oci_images import MT_INDEX, Layer, Layout
from test_unpack import base_layer, change_layer, top_layer

from core import mount as mounting
from core import oci
from core.diff import LABEL_UNCOMPRESSED
from core.diff.walking import WalkingDiffer
from core.digest import Digest
from core.distribution.progress import Progress
from core.distribution.pull import INGEST_PREFIX, LABEL_PULL, PullOptions, Puller
from core.distribution.reference import Reference
from core.distribution.registry import RegistryClient
from core.errors import FailedPrecondition, NotFound, Unavailable
from core.metadata.content import ContentMetadata
from core.metadata.images import ImageStore
from core.metadata.leases import LeaseStore
from core.metadata.snapshots import SnapshotMetadata
from core.metadata.store import MetadataStore
from core.snapshot import Kind
from core.types import Descriptor, Platform
from core.unpack import Unpacker
from plugins.snapshot_overlay import OverlaySnapshotter

NS = "default"
SN = "overlayfs"
UMOCI = shutil.which("umoci") or "/usr/bin/umoci"


# -- a proxy in front of the registry that breaks chosen blobs ---------------------------------------------------


@dataclass
class Fault:
    """What the proxy does to the body of one blob: ``cut`` it after ``after`` bytes (the connection closes) or
    ``corrupt`` it (the same length, other bytes); ``times`` responses long (-1: always)."""

    kind: str
    after: int = 0
    times: int = -1


@dataclass
class Proxy:
    """Forwards GET and HEAD to ``upstream``; records ``(method, path, Range)`` of each request."""

    upstream: str
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.server_address[1]}"

    def blob_gets(self) -> list[tuple[str, str]]:
        """(digest, Range) of every blob GET so far."""
        return [
            (path.rsplit("/", 1)[1], rng)
            for method, path, rng in self.requests
            if "/blobs/" in path and method == "GET"
        ]

    def start(self) -> Proxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.forward()

            def do_GET(self) -> None:
                self.forward()

            def forward(self) -> None:
                proxy.requests.append((self.command, self.path, self.headers.get("Range", "")))
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range", "authorization")}
                upstream.request(self.command, self.path, headers=headers)
                answer = upstream.getresponse()
                body = answer.read()
                upstream.close()
                fault = proxy.faults.get(self.path.rsplit("/", 1)[1]) if "/blobs/" in self.path else None
                if fault is not None and fault.times != 0 and self.command == "GET":
                    fault.times -= 1
                else:
                    fault = None
                if fault is not None and fault.kind == "corrupt":
                    body = bytes(b ^ 0x5A for b in body)
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if fault is not None and fault.kind == "cut":
                    self.wfile.write(body[: fault.after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="test-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


# -- the in-process stack -----------------------------------------------------------------------------------


@dataclass
class Env:
    tmp: Path
    registry: Registry
    proxy: Proxy
    content: ContentMetadata
    snapshots: SnapshotMetadata
    leases: LeaseStore
    images: ImageStore
    unpacker: Unpacker
    puller: Puller
    layouts: int = 0

    def push(self, layers: Sequence[Layer], name: str = "pull/test", **options: Any) -> tuple[str, Layout]:
        """Build an image of ``layers`` and push it; returns its reference through the proxy and its layout."""
        self.layouts += 1
        layout = Layout(self.tmp / f"layout{self.layouts}")
        layout.add_image("latest", layers, **options)
        self.registry.push(layout.directory, "latest", name)
        return f"{self.proxy.host}/{name}:latest", layout

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
        return {i.name for i in self.snapshots.walk(namespace, SN) if i.kind is Kind.COMMITTED}

    def others(self, namespace: str = NS) -> list[str]:
        return [i.name for i in self.snapshots.walk(namespace, SN) if i.kind is not Kind.COMMITTED]

    def has(self, digest: str, namespace: str = NS) -> bool:
        try:
            self.content.info(namespace, digest)
        except NotFound:
            return False
        return True

    def tree(self, chain_id: str, namespace: str = NS) -> dict[str, Any]:
        key = f"test-view-{chain_id}"
        mounts = self.snapshots.view(namespace, SN, key, chain_id)
        try:
            with mounting.temp_mount(mounts, parent=self.tmp) as root:
                return tree_of(root)
        finally:
            self.snapshots.remove(namespace, SN, key)


@pytest.fixture(scope="module")
def proxied(registry: Registry) -> Iterator[Proxy]:
    proxy = Proxy(registry.host).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def env(tmp_path: Path, registry: Registry, proxied: Proxy) -> Iterator[Env]:
    proxied.faults.clear()
    proxied.requests.clear()
    store = MetadataStore(tmp_path / "metadata.db")
    leases = LeaseStore(store)
    from plugins.content_local import LocalContentStore

    content = ContentMetadata(store, LocalContentStore(tmp_path / "content"), leases=leases)
    overlay = OverlaySnapshotter(tmp_path / "overlay")
    snapshots = SnapshotMetadata(store, {SN: overlay}, leases=leases)
    unpacker = Unpacker(content, snapshots, WalkingDiffer(content), leases=leases, rebase_snapshotters={SN})
    images = ImageStore(store)
    puller = Puller(content, images, unpacker, leases)
    try:
        yield Env(tmp_path, registry, proxied, content, snapshots, leases, images, unpacker, puller)
    finally:
        overlay.close()


def chain_of(layout_manifest: Any, layout: Layout) -> list[Digest]:
    config = json.loads((layout.blobs / layout_manifest["config"]["digest"].split(":")[1]).read_text())
    return oci.chain_ids(config["rootfs"]["diff_ids"])


# -- tests --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rebase", [True, False], ids=["streaming", "download-then-unpack"])
def test_pull_unpacks_what_umoci_unpacks_and_labels_like_containerd(env: Env, rebase: bool) -> None:
    if not rebase:
        env.puller = Puller(env.content, env.images, Unpacker(env.content, env.snapshots, WalkingDiffer(env.content),
                            leases=env.leases), env.leases)  # fmt: skip
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
    source = {f"containerd.io/distribution.source.{env.proxy.host}": "pull/umoci"}
    refs = {"containerd.io/gc.ref.content.config": manifest["config"]["digest"]}
    refs |= {f"containerd.io/gc.ref.content.l.{n}": layer["digest"] for n, layer in enumerate(manifest["layers"])}
    assert env.content.info(NS, manifest_digest).labels == refs | source
    config_labels = env.content.info(NS, manifest["config"]["digest"]).labels
    assert config_labels == source | {f"containerd.io/gc.ref.snapshot.{SN}": chain[-1]}
    config = json.loads((layout.blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        assert env.content.info(NS, layer["digest"]).labels == source | {LABEL_UNCOMPRESSED: diff_id}
    assert {(e.kind, e.state) for e in events} >= {("layer", "downloading"), ("layer", "done"), ("image", "done")}

    bundle = env.tmp / "bundle"
    subprocess.run([UMOCI, "unpack", "--image", f"{layout.directory}:latest", str(bundle)], check=True,
                   capture_output=True)  # fmt: skip
    theirs = tree_of(bundle / "rootfs")
    ours = env.tree(chain[-1])
    assert tree_differences(ours, theirs, unstable_mtimes={".", "opt"}) == []


def test_zstd_layers_and_a_second_pull_that_fetches_no_blob(env: Env) -> None:
    layers = [Layer("zstd").dirs("a").file("a/one", b"1" * 100_000), Layer("zstd").dirs("b").file("b/two", b"2")]
    ref, layout = env.push(layers, name="pull/zstd")
    manifest, _ = env.manifest(layout)
    assert {layer["mediaType"] for layer in manifest["layers"]} == {oci.OCI_LAYER_ZSTD}
    env.pull(ref)
    chain = chain_of(manifest, layout)
    assert env.tree(chain[-1])["a/one"].size == 100_000
    gets = len(env.proxy.blob_gets())
    assert gets == 3  # config and two layers

    _, events = env.pull(ref)  # the namespace has everything: no blob fetched, nothing applied
    assert len(env.proxy.blob_gets()) == gets
    assert {e.state for e in events if e.kind == "layer"} == {"exists"}

    env.pull(ref, namespace="other")  # the store has the blobs: recorded, not fetched; unpacked again
    assert len(env.proxy.blob_gets()) == gets
    assert env.committed("other") == set(chain)


def test_a_cut_connection_is_resumed_with_a_range_request(env: Env) -> None:
    ref, layout = env.push([base_layer()], name="pull/cut")
    manifest, _ = env.manifest(layout)
    layer = manifest["layers"][0]
    env.proxy.faults[layer["digest"]] = Fault("cut", after=layer["size"] // 3, times=1)
    env.pull(ref)
    assert (layer["digest"], f"bytes={layer['size'] // 3}-") in env.proxy.blob_gets()
    assert env.committed() == set(chain_of(manifest, layout))


def test_a_failed_pull_keeps_its_lease_and_a_retry_resumes_the_ingest(env: Env) -> None:
    ref, layout = env.push([base_layer(), top_layer()], name="pull/retry")
    manifest, _ = env.manifest(layout)
    layer = manifest["layers"][0]
    cut = layer["size"] // 2
    env.proxy.faults[layer["digest"]] = Fault("cut", after=cut)
    with pytest.raises(Unavailable):
        env.pull(ref, retries=0)
    with pytest.raises(NotFound):
        env.images.get(NS, ref)
    (lease,) = env.leases.list(NS)
    assert lease.labels[LABEL_PULL] == ref
    (status,) = env.content.list_statuses(NS)
    assert status.ref == INGEST_PREFIX + layer["digest"] and status.offset == cut
    assert chain_of(manifest, layout)[0] not in env.committed() and env.others() == []

    env.proxy.faults.clear()
    env.proxy.requests.clear()
    env.pull(ref)
    assert env.proxy.blob_gets() == [(layer["digest"], f"bytes={cut}-")]  # the rest of it, and nothing else
    assert env.committed() == set(chain_of(manifest, layout))
    assert env.content.list_statuses(NS) == []
    assert [lease.id for lease in env.leases.list(NS)] == [lease.id]  # the failed pull's, expiring in a day


def test_bytes_that_do_not_match_the_digest_leave_nothing_behind(env: Env) -> None:
    ref, layout = env.push([base_layer(), top_layer()], name="pull/corrupt")
    manifest, _ = env.manifest(layout)
    bad = manifest["layers"][1]
    env.proxy.faults[bad["digest"]] = Fault("corrupt")
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


def push_index(env: Env, name: str) -> tuple[str, dict[str, str]]:
    """An index of a linux/amd64 and a linux/arm64 image pushed with skopeo --all; returns the reference through
    the proxy and {platform: manifest digest}."""
    layout = Layout(env.tmp / "multi")
    manifests = {}
    for arch in ("amd64", "arm64"):
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
    layout.manifests = [{**index, "annotations": {"org.opencontainers.image.ref.name": "multi"}}]
    layout._write_index()
    subprocess.run(
        [SKOPEO, "--insecure-policy", "copy", "--quiet", "--all", "--preserve-digests", "--dest-tls-verify=false",
         f"oci:{layout.directory}:multi", f"docker://{env.registry.host}/{name}:multi"],
        check=True, capture_output=True,
    )  # fmt: skip
    return f"{env.proxy.host}/{name}:multi", {p: m["digest"] for p, m in manifests.items()}


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


def test_no_unpack_fetches_every_blob_and_makes_no_snapshot(env: Env) -> None:
    ref, layout = env.push([base_layer(), top_layer()], name="pull/nounpack")
    image, _ = env.pull(ref, unpack=False, labels={"team": "a"})
    assert image.labels == {"team": "a"}
    manifest, _ = env.manifest(layout)
    assert all(env.has(layer["digest"]) for layer in manifest["layers"])
    assert env.committed() == set()


def test_descriptor_of_pulled_image_is_the_registry_target(env: Env) -> None:
    ref, layout = env.push([top_layer()], name="pull/target")
    _, digest = env.manifest(layout)
    env.pull(ref)
    again, _ = env.pull(f"{env.proxy.host}/pull/target@{digest}")
    assert again.target == Descriptor(oci.OCI_MANIFEST, Digest(digest), again.target.size)
