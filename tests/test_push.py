"""Pusher: images from a namespace's content to a real docker-registry, read back with skopeo (digests match);
existing blobs skipped, cross-repository mounts, chunked uploads, multi-platform indexes trimmed to what is
local, and a faulty registry's 429/5xx and lost answers retried, then clear errors. Credentials never leak."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from interop import SKOPEO, Registry
from oci_images import MT_INDEX, Layer, Layout, busybox_layer
from registry_servers import Fault, FaultyRegistry, basic_auth_registry, faulty_registry

from core.content import Info
from core.digest import Digest
from core.distribution.auth import Credentials
from core.distribution.blobs import write_blob
from core.distribution.progress import Progress
from core.distribution.pull import LABEL_DISTRIBUTION_SOURCE
from core.distribution.push import Pusher
from core.distribution.reference import Reference
from core.distribution.registry import RegistryClient
from core.errors import NotFound, Unauthenticated, Unavailable
from core.metadata.content import ContentMetadata
from core.metadata.images import Image, ImageStore
from core.metadata.leases import LeaseStore
from core.metadata.store import MetadataStore
from core.types import Descriptor, Platform
from plugins.content_local import LocalContentStore

NS = "push-tests"
PASSWORD = "push-pa55word-SECRET"


@dataclass
class Local:
    """A namespace's content and images, and the layout directory its images were built in."""

    content: ContentMetadata
    images: ImageStore
    layout: Layout

    def add(self, name: str, descriptor: dict[str, Any], *, skip: tuple[str, ...] = ()) -> Descriptor:
        """Store the layout's blobs (but those in ``skip``) and make image ``name`` of ``descriptor``."""
        for blob in self.layout.blobs.iterdir():
            if f"sha256:{blob.name}" not in skip:
                write_blob(self.content, NS, blob.read_bytes(), "application/octet-stream")
        target = Descriptor(descriptor["mediaType"], descriptor["digest"], descriptor["size"])
        self.images.create(NS, Image(name, target))
        return target

    def manifest(self, desc: Descriptor | dict[str, Any]) -> dict[str, Any]:
        digest = desc.digest if isinstance(desc, Descriptor) else desc["digest"]
        return json.loads((self.layout.blobs / digest.split(":")[1]).read_bytes())


@pytest.fixture
def local(tmp_path: Path) -> Local:
    store = MetadataStore(tmp_path / "metadata.db")
    content = ContentMetadata(store, LocalContentStore(tmp_path / "content"), leases=LeaseStore(store))
    return Local(content, ImageStore(store), Layout(tmp_path / "layout"))


def two_layer_image(local: Local, tag: str = "latest") -> dict[str, Any]:
    noise = Layer("gzip").file("noise", os.urandom(2 << 20))  # incompressible: a 2 MiB blob
    return local.layout.add_image(tag, [busybox_layer(), noise])


def client(**kwargs: Any) -> RegistryClient:
    return RegistryClient(**{"backoff": 0.001, "retries": 3, **kwargs})


def skopeo_inspect(ref: str, *, raw: bool = False) -> Any:
    argv = [SKOPEO, "inspect", "--tls-verify=false", *(["--raw"] if raw else []), f"docker://{ref}"]
    return json.loads(subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout)


class Events(list[Progress]):
    def final(self) -> dict[str, str]:
        """The last state of each blob (by its progress ref)."""
        return {event.ref: event.state for event in self if event.kind not in ("image",)}


def push(
    local: Local, name: str, ref: Reference, registry: RegistryClient | None = None, **kwargs: Any
) -> tuple[Descriptor, Events]:
    """Pusher.push into NS's image ``name``; the descriptor pushed and the progress events."""
    events = Events()
    pusher = Pusher(local.content, local.images)
    return pusher.push(NS, name, ref, registry or client(), progress=events.append, **kwargs), events


# -- against docker-registry ----------------------------------------------------------------------------------


def test_push_reads_back_with_skopeo(local: Local, registry: Registry) -> None:
    descriptor = two_layer_image(local)
    target = local.add("app:latest", descriptor)
    ref = Reference.parse(f"{registry.host}/push/app:v1")
    pushed, events = push(local, "app:latest", ref)
    assert pushed == target
    seen = skopeo_inspect(str(ref))
    manifest = local.manifest(descriptor)
    assert seen["Digest"] == target.digest
    assert seen["Layers"] == [layer["digest"] for layer in manifest["layers"]]
    assert skopeo_inspect(str(ref), raw=True) == manifest
    blobs = [manifest["config"], *manifest["layers"]]
    assert events.final() == {
        **{f"{'config' if b is blobs[0] else 'layer'}-{b['digest']}": "done" for b in blobs},
        f"manifest-{target.digest}": "done",
    }
    uploads = [
        e.offset for e in events if e.ref == f"layer-{manifest['layers'][1]['digest']}" and e.state == "uploading"
    ]
    assert uploads[0] == 0 and uploads[-1] == manifest["layers"][1]["size"] and uploads == sorted(uploads)
    assert (events[0].kind, events[0].state, events[-1].kind, events[-1].state) == (
        "image",
        "uploading",
        "image",
        "done",
    )

    _, again = push(local, "app:latest", ref.with_tag("v2"))  # the registry has every blob now
    assert {state for key, state in again.final().items() if not key.startswith("manifest")} == {"exists"}
    assert skopeo_inspect(str(ref.with_tag("v2")))["Digest"] == target.digest


def test_cross_repository_mount(local: Local, registry: Registry) -> None:
    descriptor = two_layer_image(local)
    local.add("app:latest", descriptor)
    source = Reference.parse(f"{registry.host}/push/source:v1")
    push(local, "app:latest", source)
    manifest = local.manifest(descriptor)
    blobs = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    label = LABEL_DISTRIBUTION_SOURCE + registry.host
    for digest in blobs:  # as a pull from push/source would have labelled them
        local.content.update(NS, Info(Digest(digest), labels={label: "other/gone,push/source"}), [f"labels.{label}"])
    target = Reference.parse(f"{registry.host}/push/mounted:v1")
    _, events = push(local, "app:latest", target)
    assert {state for key, state in events.final().items() if not key.startswith("manifest")} == {"mounted"}
    assert skopeo_inspect(str(target))["Layers"] == blobs[1:]


@pytest.mark.parametrize("chunk_size", [64 << 10, 3 << 20])
def test_chunked_upload(local: Local, registry: Registry, chunk_size: int) -> None:
    descriptor = two_layer_image(local, tag=f"c{chunk_size}")
    target = local.add("app:chunked", descriptor)
    ref = Reference.parse(f"{registry.host}/push/chunked-{chunk_size}:v1")
    pushed, _ = push(local, "app:chunked", ref, chunk_size=chunk_size)
    assert pushed == target
    assert skopeo_inspect(str(ref))["Digest"] == target.digest


def multi_platform(local: Local) -> tuple[Descriptor, dict[str, Any], dict[str, Any]]:
    """An index of two manifests (linux/amd64, linux/arm64) in the layout: (index, amd64 entry, arm64 entry)."""
    amd64 = local.layout.add_image("amd64", [busybox_layer()])
    arm64 = local.layout.add_image("arm64", [Layer("gzip").file("arm", b"arm64 only\n")])
    entries = [
        {**amd64, "platform": {"architecture": "amd64", "os": "linux"}},
        {**arm64, "platform": {"architecture": "arm64", "os": "linux"}},
    ]
    index = local.layout.blob(
        json.dumps({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}).encode(), MT_INDEX
    )
    return Descriptor(MT_INDEX, index["digest"], index["size"]), entries[0], entries[1]


def test_index_pushed_whole_when_every_platform_is_local(local: Local, registry: Registry) -> None:
    index, _, _ = multi_platform(local)
    local.add("multi:all", index.to_oci())
    ref = Reference.parse(f"{registry.host}/push/multi:all")
    pushed, _ = push(local, "multi:all", ref)
    assert pushed == index
    assert skopeo_inspect(str(ref), raw=True) == local.manifest(index)


def test_index_trimmed_to_local_or_given_platforms(local: Local, registry: Registry) -> None:
    index, amd64, arm64 = multi_platform(local)
    arm_only = {arm64["digest"], *(layer["digest"] for layer in local.manifest(arm64)["layers"])}
    local.add("multi:some", index.to_oci(), skip=tuple(arm_only))  # as after a pull of the host's platform
    ref = Reference.parse(f"{registry.host}/push/multi:some")
    pushed, _ = push(local, "multi:some", ref)
    raw = skopeo_inspect(str(ref), raw=True)
    assert [entry["digest"] for entry in raw["manifests"]] == [amd64["digest"]]
    assert raw["manifests"][0]["platform"] == amd64["platform"]
    assert pushed.digest != index.digest and pushed.digest == Digest.from_bytes(
        json.dumps(raw, separators=(",", ":")).encode()
    )

    pushed_amd64, _ = push(local, "multi:some", ref.with_tag("amd64"), platforms=[Platform("linux", "amd64")])
    assert pushed_amd64 == pushed
    with pytest.raises(NotFound, match=arm64["digest"]):  # asked for a platform whose blobs are not here
        push(local, "multi:some", ref.with_tag("arm64"), platforms=[Platform("linux", "arm64")])
    with pytest.raises(NotFound, match="no manifest for platform linux/s390x"):
        push(local, "multi:some", ref.with_tag("s390x"), platforms=[Platform("linux", "s390x")])


def test_unknown_image_is_not_found(local: Local, registry: Registry) -> None:
    with pytest.raises(NotFound):
        push(local, "nope:latest", Reference.parse(f"{registry.host}/push/nope:v1"))


def test_wrong_credentials(local: Local, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    local.add("app:latest", two_layer_image(local))
    with basic_auth_registry({"bob": PASSWORD}) as registry:
        ref = Reference.parse(f"{registry.host}/push/app:v1")
        with pytest.raises(Unauthenticated, match=f"unauthorized: check the credentials for {registry.host}") as info:
            push(local, "app:latest", ref, client(user=Credentials("bob", "not-" + PASSWORD)))
        pushed, _ = push(local, "app:latest", ref, client(user=Credentials("bob", PASSWORD)))
    assert PASSWORD not in str(info.value) + caplog.text
    assert pushed.digest == local.images.get(NS, "app:latest").target.digest


# -- against the faulty registry ------------------------------------------------------------------------------


@pytest.fixture
def faulty() -> Iterator[FaultyRegistry]:
    with faulty_registry() as registry:
        yield registry


def test_429_and_5xx_are_retried_during_push(local: Local, faulty: FaultyRegistry) -> None:
    descriptor = two_layer_image(local)
    target = local.add("app:latest", descriptor)
    manifest = local.manifest(descriptor)
    noise = manifest["layers"][1]
    faulty.fail("POST", "/v2/push/app/blobs/uploads/", Fault(429, {"Retry-After": "0"}), Fault(503))
    faulty.fail("HEAD", f"/v2/push/app/blobs/{noise['digest']}", Fault(500))
    faulty.fail("PUT", "/v2/push/app/manifests/v1", Fault(502), Fault(504))
    pushed, _ = push(local, "app:latest", Reference.parse(f"{faulty.host}/push/app:v1"))
    assert pushed == target
    for blob in [manifest["config"], *manifest["layers"]]:
        assert Digest.from_bytes(faulty.blobs[blob["digest"]]) == blob["digest"]
    assert json.loads(faulty.manifests[("push/app", "v1")][1]) == local.manifest(descriptor)


def test_chunked_upload_resumes_after_lost_answers_and_5xx(local: Local, faulty: FaultyRegistry) -> None:
    descriptor = two_layer_image(local)
    target = local.add("app:latest", descriptor)
    uploads = "/v2/push/app/blobs/uploads/"
    faulty.fail("PATCH", uploads, Fault(cut_after=0), Fault(503), Fault(cut_after=0))
    pushed, _ = push(local, "app:latest", Reference.parse(f"{faulty.host}/push/app:v1"), chunk_size=256 << 10)
    assert pushed == target
    for blob in [local.manifest(descriptor)["config"], *local.manifest(descriptor)["layers"]]:
        assert Digest.from_bytes(faulty.blobs[blob["digest"]]) == blob["digest"]
    asked = [method for method, path, _ in faulty.requests if path.startswith(uploads) and method == "GET"]
    assert len(asked) == 3  # after each failure: how much do you hold?


def test_monolithic_upload_is_retried_only_when_the_chunks_can_be_read_again(faulty: FaultyRegistry) -> None:
    data = os.urandom(100_000)
    desc = Descriptor("application/octet-stream", Digest.from_bytes(data), len(data))
    ref = Reference.parse(f"{faulty.host}/push/blob:v1")
    faulty.fail("PUT", "/v2/push/blob/blobs/uploads/", Fault(503))
    with pytest.raises(Unavailable, match=r"503 Service Unavailable; gave up after 1 attempt$"):
        client().upload_blob(ref, desc, iter([data[:50_000], data[50_000:]]))
    faulty.fail("PUT", "/v2/push/blob/blobs/uploads/", Fault(503), Fault(cut_after=0))
    client().upload_blob(ref, desc, [data[:50_000], data[50_000:]])
    assert faulty.blobs[desc.digest] == data


def test_persistent_5xx_fails_clearly_with_an_error_event(local: Local, faulty: FaultyRegistry) -> None:
    descriptor = two_layer_image(local)
    local.add("app:latest", descriptor)
    noise = local.manifest(descriptor)["layers"][1]
    faulty.fail("HEAD", f"/v2/push/app/blobs/{noise['digest']}", *[Fault(503)] * 10)
    events = Events()
    with pytest.raises(Unavailable, match=r"503 Service Unavailable; gave up after 4 attempts"):
        Pusher(local.content, local.images).push(
            NS, "app:latest", Reference.parse(f"{faulty.host}/push/app:v1"), client(), progress=events.append
        )
    assert events.final()[f"layer-{noise['digest']}"] == "error"
    assert ("push/app", "v1") not in faulty.manifests  # no manifest without its blobs
