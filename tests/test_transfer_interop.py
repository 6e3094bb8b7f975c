"""What ckctl moves, real third parties read, and the other way round: ``skopeo`` inspects what ``ckctl images
push`` sent (same digests) and what ``ckctl images export`` wrote, ``umoci`` unpacks the export, and ``ckctl
images import`` takes what ``skopeo`` wrote as an OCI archive and as a docker-archive (the imports run).

All through a real containerkitd and Debian's docker-registry on 127.0.0.1; each test in its own namespace.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CKCTL, RunningDaemon
from interop import SKOPEO, Registry, remove_namespace_dirs
from oci_images import Layout, busybox_layer

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("runc", "docker-registry", "skopeo", "umoci")),
    reason="needs runc, docker-registry, skopeo and umoci",
)

TIMEOUT = 120.0


def skopeo(*args: str) -> str:
    result = subprocess.run(
        [SKOPEO, "--insecure-policy", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 0, f"skopeo {' '.join(args)}: {result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def busybox(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = Layout(tmp_path_factory.mktemp("interop-images") / "layout")
    layout.add_image("busybox", [busybox_layer()])
    return registry.push(layout.directory, "busybox", "transfer-interop/images")


class Place:
    """A namespace of one's own on the module's daemon, the busybox image pulled into it with ckctl."""

    def __init__(self, daemon: RunningDaemon, namespace: str, image: str) -> None:
        self.daemon, self.namespace, self.image = daemon, namespace, image

    def ckctl(self, *args: str) -> str:
        return self.daemon.ckctl(*args, namespace=self.namespace).stdout

    def digest(self, name: str) -> str:
        return json.loads(self.ckctl("images", "inspect", name))["target"]["digest"]

    def blob(self, digest: str) -> bytes:
        argv = [*CKCTL, "-a", self.daemon.address, "-n", self.namespace, "content", "get", digest]
        return subprocess.run(argv, capture_output=True, timeout=TIMEOUT, check=True).stdout


@pytest.fixture
def place(request: pytest.FixtureRequest, containerkitd: RunningDaemon, busybox: str) -> Iterator[Place]:
    namespace = "xi-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower())[:50].strip("-")
    place = Place(containerkitd, namespace, busybox)
    place.ckctl("images", "pull", busybox)
    yield place
    for container in place.ckctl("containers", "ls", "-q").split():
        containerkitd.ckctl("tasks", "rm", "-f", container, check=False, namespace=namespace)
        place.ckctl("containers", "rm", container)
    remove_namespace_dirs(namespace)


def test_skopeo_inspects_what_ckctl_pushed(place: Place, registry: Registry) -> None:
    target = f"{registry.host}/transfer-interop/pushed:1"
    place.ckctl("images", "push", target, place.image)
    digest = place.digest(place.image)
    inspected = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{target}"))
    assert inspected["Digest"] == digest
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{target}").encode()
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == digest
    manifest = json.loads(place.blob(digest))
    assert inspected["Layers"] == [layer["digest"] for layer in manifest["layers"]]
    config = json.loads(skopeo("inspect", "--config", "--raw", "--tls-verify=false", f"docker://{target}"))
    assert config["rootfs"]["diff_ids"] == json.loads(place.blob(manifest["config"]["digest"]))["rootfs"]["diff_ids"]


def test_skopeo_reads_and_umoci_unpacks_an_export(place: Place, tmp_path: Path) -> None:
    archive = tmp_path / "export.tar"
    place.ckctl("images", "export", str(archive), place.image)
    inspected = json.loads(skopeo("inspect", f"oci-archive:{archive}"))
    assert inspected["Digest"] == place.digest(place.image)

    layout = tmp_path / "layout"
    with tarfile.open(archive) as tar:
        tar.extractall(layout, filter="data")
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"]["io.containerd.image.name"] == place.image
    tag = entry["annotations"]["org.opencontainers.image.ref.name"]
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)],
        capture_output=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    assert (bundle / "rootfs" / "bin" / "busybox").is_file()
    assert (bundle / "rootfs" / "bin" / "sh").is_symlink()


@pytest.mark.parametrize("transport", ["oci-archive", "docker-archive"])
def test_ckctl_imports_what_skopeo_wrote(place: Place, registry: Registry, tmp_path: Path, transport: str) -> None:
    archive = tmp_path / f"{transport}.tar"
    name = f"{registry.host}/transfer-interop/from-skopeo:{transport}"
    skopeo("copy", "--quiet", "--src-tls-verify=false", f"docker://{place.image}", f"{transport}:{archive}:{name}")
    imported = [line.split() for line in place.ckctl("images", "import", str(archive)).splitlines()]
    assert imported, "the import named no image"
    image = imported[0][0]
    assert place.digest(image) == imported[0][1]
    if transport == "oci-archive":
        assert imported[0][1] == place.digest(place.image)  # the manifest travelled unchanged
    run = place.ckctl("run", "--rm", image, "c1", "echo", transport)
    assert run == f"{transport}\n"
