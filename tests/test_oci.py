"""core.oci: media types, document parsing with clear errors, platform matching, resolution and chain ids."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from core import oci
from core.digest import Digest
from core.errors import InvalidArgument, NotFound
from core.types import Descriptor, Platform

DIFF_A = Digest.from_bytes(b"layer a")
DIFF_B = Digest.from_bytes(b"layer b")
CFG = {"mediaType": "x", "digest": DIFF_A, "size": 1}


def config_doc(os: str = "linux", arch: str = "amd64", **extra: Any) -> dict[str, Any]:
    return {"os": os, "architecture": arch, "rootfs": {"type": "layers", "diff_ids": [DIFF_A, DIFF_B]}, **extra}


class Blobs:
    """An in-memory content provider: ``add`` returns the descriptor, ``read`` serves it (and counts)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.reads: list[str] = []

    def add(self, doc: Any, media_type: str, platform: Platform | None = None) -> Descriptor:
        raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        digest = Digest.from_bytes(raw)
        self.data[digest] = raw
        return Descriptor(media_type, digest, len(raw), platform=platform)

    def read(self, desc: Descriptor) -> bytes:
        self.reads.append(desc.digest)
        return self.data[desc.digest]

    def image(self, os: str = "linux", arch: str = "amd64", variant: str = "", docker: bool = False) -> Descriptor:
        """A manifest (OCI or Docker) whose config names the platform; the layers are not stored."""
        config = self.add(config_doc(os, arch, variant=variant), oci.DOCKER_CONFIG if docker else oci.OCI_CONFIG)
        layer_type = oci.DOCKER_LAYER_GZIP if docker else oci.OCI_LAYER_GZIP
        manifest = {
            "schemaVersion": 2,
            "mediaType": oci.DOCKER_MANIFEST if docker else oci.OCI_MANIFEST,
            "config": config.to_oci(),
            "layers": [Descriptor(layer_type, d, 10).to_oci() for d in (DIFF_A, DIFF_B)],
        }
        return self.add(manifest, oci.DOCKER_MANIFEST if docker else oci.OCI_MANIFEST)

    def index(self, entries: list[Descriptor], docker: bool = False) -> Descriptor:
        media_type = oci.DOCKER_MANIFEST_LIST if docker else oci.OCI_INDEX
        doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": [e.to_oci() for e in entries]}
        return self.add(doc, media_type)


# -- media types ---------------------------------------------------------------------------------


def test_media_type_classes() -> None:
    assert oci.is_index(oci.OCI_INDEX) and oci.is_index(oci.DOCKER_MANIFEST_LIST)
    assert oci.is_manifest(oci.OCI_MANIFEST) and oci.is_manifest(oci.DOCKER_MANIFEST)
    assert not oci.is_manifest(oci.DOCKER_SCHEMA1_SIGNED_MANIFEST)
    assert oci.is_config(oci.OCI_CONFIG) and oci.is_config(oci.DOCKER_CONFIG)
    for layer in (
        oci.OCI_LAYER,
        oci.OCI_LAYER_GZIP,
        oci.OCI_LAYER_ZSTD,
        oci.OCI_LAYER_NONDISTRIBUTABLE_GZIP,
        oci.DOCKER_LAYER,
        oci.DOCKER_LAYER_GZIP,
        oci.DOCKER_LAYER_FOREIGN_GZIP,
        oci.OCI_LAYER_GZIP + "+encrypted",
    ):
        assert oci.is_layer(layer), layer
    assert not oci.is_layer(oci.OCI_CONFIG) and not oci.is_layer(oci.OCI_MANIFEST)


# -- parsing -------------------------------------------------------------------------------------


def test_parse_manifest_reads_config_layers_annotations_and_subject() -> None:
    config = Descriptor(oci.OCI_CONFIG, DIFF_A, 3)
    layer = Descriptor(oci.OCI_LAYER_GZIP, DIFF_B, 5, annotations={"a": "b"})
    doc = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": config.to_oci(),
        "layers": [layer.to_oci()],
        "annotations": {"org.opencontainers.image.ref.name": "v1"},
        "subject": config.to_oci(),
        "unknownField": True,
    }
    manifest = oci.parse_manifest(json.dumps(doc))
    annotations = {"org.opencontainers.image.ref.name": "v1"}
    assert manifest == oci.Manifest(oci.OCI_MANIFEST, config, (layer,), annotations, subject=config)


def test_parse_manifest_media_type_comes_from_the_descriptor_or_the_document() -> None:
    doc = {"schemaVersion": 2, "config": Descriptor(oci.DOCKER_CONFIG, DIFF_A, 3).to_oci()}
    assert oci.parse_manifest(json.dumps(doc)).media_type == oci.OCI_MANIFEST
    assert oci.parse_manifest(json.dumps(doc), oci.DOCKER_MANIFEST).media_type == oci.DOCKER_MANIFEST
    assert oci.parse_manifest(json.dumps(doc)).layers == ()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b"{not json", "manifest sha256:x: not valid JSON"),
        (b"\xff\xfe", "manifest sha256:x: not valid JSON"),
        (b"[1, 2]", "expected a JSON object, got list"),
        ({"schemaVersion": 2, "layers": []}, "missing 'config'"),
        ({"schemaVersion": 2, "config": "sha256:abc"}, "config: expected a descriptor object"),
        ({"schemaVersion": 2, "config": {"mediaType": "x", "size": 1}}, "config: invalid descriptor: missing 'digest'"),
        ({"schemaVersion": 2, "config": {**CFG, "digest": "sha256:zz"}}, "config: invalid digest"),
        ({"schemaVersion": 2, "config": {**CFG, "size": -1}}, "config: invalid size -1"),
        ({"schemaVersion": 2, "config": {**CFG, "mediaType": 5}}, "descriptor: mediaType must be a"),
        ({"schemaVersion": 2, "config": {**CFG, "annotations": ["x"]}}, "descriptor: annotations must map"),
        ({"schemaVersion": 2, "config": {**CFG, "urls": 1}}, "descriptor: urls must be a list"),
        ({"schemaVersion": 2, "config": {**CFG, "platform": "linux"}}, "descriptor: platform must be an"),
        ({"schemaVersion": 2, "config": CFG, "layers": {}}, "'layers' must be a list"),
        ({"schemaVersion": 2, "config": CFG, "layers": [{}]}, "layers[0]: invalid descriptor"),
        ({"schemaVersion": 3, "config": CFG}, "unsupported schemaVersion 3"),
        ({"schemaVersion": 2, "manifests": []}, "expected a manifest but found an index"),
        ({"schemaVersion": 2, "mediaType": oci.OCI_INDEX}, "expected a manifest but found an index"),
        ({"schemaVersion": 2, "mediaType": 7}, "'mediaType' must be a string"),
        ({"schemaVersion": 2, "mediaType": ["x"]}, "'mediaType' must be a string"),
        ({"schemaVersion": [2], "config": CFG}, "unsupported schemaVersion [2]"),
        ({"schemaVersion": 2, "config": CFG, "annotations": {"a": 1}}, "'annotations' must map"),
    ],
)  # fmt: skip
def test_malformed_manifests_are_refused_clearly(doc: Any, message: str) -> None:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(InvalidArgument) as err:
        oci.parse_manifest(raw, oci.OCI_MANIFEST, name="manifest sha256:x")
    assert message in str(err.value)
    assert str(err.value).startswith("manifest sha256:x")


@pytest.mark.parametrize(
    ("doc", "media_type"),
    [
        ({"schemaVersion": 1, "name": "library/busybox", "fsLayers": [{"blobSum": DIFF_A}]}, ""),
        ({"name": "library/busybox", "fsLayers": []}, oci.OCI_MANIFEST),
        ({"schemaVersion": 2, "config": {}}, oci.DOCKER_SCHEMA1_SIGNED_MANIFEST),
        ({"schemaVersion": 2, "mediaType": oci.DOCKER_SCHEMA1_MANIFEST}, ""),
    ],
)
def test_schema1_is_refused(doc: dict[str, Any], media_type: str) -> None:
    for parse in (oci.parse_manifest, oci.parse_index):
        with pytest.raises(InvalidArgument, match="schema 1 manifests are not supported"):
            parse(json.dumps(doc), media_type)


def test_parse_index_and_its_errors() -> None:
    entry = Descriptor(oci.OCI_MANIFEST, DIFF_A, 3, platform=Platform("linux", "arm64", "v8"))
    index = oci.parse_index(json.dumps({"schemaVersion": 2, "manifests": [entry.to_oci()]}), oci.DOCKER_MANIFEST_LIST)
    assert index == oci.Index(oci.DOCKER_MANIFEST_LIST, (entry,))
    assert oci.parse_index(b'{"schemaVersion": 2}').manifests == ()
    with pytest.raises(InvalidArgument, match="index: expected an index but found a manifest"):
        oci.parse_index(json.dumps({"schemaVersion": 2, "config": entry.to_oci()}))
    with pytest.raises(InvalidArgument, match=r"manifests\[0\]: invalid platform object"):
        oci.parse_index(json.dumps({"manifests": [{**entry.to_oci(), "platform": {"os": "linux"}}]}))


def test_parse_config_reads_diff_ids_platform_and_process_defaults() -> None:
    doc = config_doc(
        "Linux",
        "arm",
        variant="v7",
        config={"Entrypoint": ["/bin/sh", "-c"], "Cmd": None, "Env": ["PATH=/bin"], "WorkingDir": "/w", "User": "1:2"},
        history=[{"created_by": "x"}],
    )
    config = oci.parse_config(json.dumps(doc))
    assert config.diff_ids == (DIFF_A, DIFF_B)
    assert config.platform == Platform("Linux", "arm", "v7")
    assert (config.entrypoint, config.cmd, config.env) == (("/bin/sh", "-c"), (), ("PATH=/bin",))
    assert (config.working_dir, config.user) == ("/w", "1:2")
    bare = oci.parse_config(json.dumps({"rootfs": {"diff_ids": []}}))
    assert bare == oci.ImageConfig((), Platform("", ""))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"os": "linux"}, "missing 'rootfs' object"),
        ({"rootfs": {"type": "layers"}}, "'rootfs.diff_ids' must be a list of digests"),
        ({"rootfs": {"type": "squash", "diff_ids": []}}, "rootfs type 'squash' is not supported"),
        ({"rootfs": {"diff_ids": ["sha256:nothex"]}}, "rootfs.diff_ids[0]: invalid digest"),
        ({"rootfs": {"diff_ids": []}, "os": 5}, "'os' must be a string"),
        ({"rootfs": {"diff_ids": []}, "config": []}, "'config' must be an object"),
        ({"rootfs": {"diff_ids": []}, "config": {"Env": "A=B"}}, "'Env' must be a list of strings"),
        ({"rootfs": {"diff_ids": []}, "config": {"Cmd": ["ok", 1]}}, "'Cmd' must be a list of strings"),
        ({"rootfs": {"diff_ids": []}, "config": {"User": 0}}, "'User' must be a string"),
    ],
)
def test_malformed_configs_are_refused_clearly(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        oci.parse_config(json.dumps(doc), name="image config sha256:c")
    assert str(err.value).startswith("image config sha256:c: ")
    assert message in str(err.value)


def test_oversized_documents_are_refused_unparsed() -> None:
    with pytest.raises(InvalidArgument, match=r"more than the \d+ bytes allowed"):
        oci.parse_config(b" " * (oci.MAX_DOCUMENT_SIZE + 1))


# -- platforms -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("linux/x86_64", "linux/amd64"),
        ("linux/x86-64/v1", "linux/amd64"),
        ("linux/amd64/v3", "linux/amd64/v3"),
        ("linux/i386", "linux/386"),
        ("linux/aarch64", "linux/arm64"),
        ("linux/arm64/v8", "linux/arm64"),
        ("linux/arm64/8", "linux/arm64"),
        ("linux/arm", "linux/arm/v7"),
        ("linux/arm/7", "linux/arm/v7"),
        ("linux/arm/6", "linux/arm/v6"),
        ("linux/armhf", "linux/arm/v7"),
        ("linux/armel", "linux/arm/v6"),
        ("macos/arm64", "darwin/arm64"),
        ("Linux/AMD64", "linux/amd64"),
    ],
)
def test_normalize(given: str, normal: str) -> None:
    parts = given.split("/")
    assert str(oci.normalize(Platform(*parts))) == normal


def test_host_platform_is_normalised_linux() -> None:
    platform = oci.host_platform()
    assert platform.os == "linux"
    assert oci.normalize(platform) == platform
    assert oci.only().match(platform)


def test_only_matches_what_the_platform_runs_best_first() -> None:
    amd64 = oci.only(Platform("linux", "x86_64"))
    assert amd64.match(Platform("linux", "amd64")) and amd64.match(Platform("linux", "386"))
    assert not amd64.match(Platform("linux", "arm64")) and not amd64.match(Platform("windows", "amd64"))
    assert amd64.rank(Platform("linux", "amd64")) < amd64.rank(Platform("linux", "i386"))

    v3 = oci.only(Platform("linux", "amd64", "v3"))
    assert [v3.rank(Platform("linux", "amd64", v)) for v in ("v3", "v2", "", "v4")] == [0, 1, 2, None]

    arm64 = oci.only(Platform("linux", "aarch64"))
    for variant, rank in (("v8", 1), ("v7", 2), ("v6", 3), ("v5", 4)):
        assert arm64.rank(Platform("linux", "arm", variant)) == rank
    assert arm64.rank(Platform("linux", "arm64", "v8")) == 0

    armv6 = oci.only(Platform("linux", "arm", "v6"))
    assert armv6.match(Platform("linux", "arm", "v5")) and not armv6.match(Platform("linux", "arm", "v7"))
    assert str(armv6) == "linux/arm/v6, linux/arm/v5"


# -- resolution ----------------------------------------------------------------------------------


def test_resolve_a_manifest_directly_whatever_its_platform() -> None:
    blobs = Blobs()
    target = blobs.image("linux", "s390x", docker=True)
    resolved = oci.resolve_image(blobs.read, target, oci.only(Platform("linux", "amd64")))
    assert resolved.manifest_descriptor == target
    assert resolved.manifest.media_type == oci.DOCKER_MANIFEST
    assert resolved.config.diff_ids == (DIFF_A, DIFF_B)
    assert len(resolved.manifest.layers) == 2


def test_resolve_picks_the_best_platform_of_an_index() -> None:
    blobs = Blobs()
    arm = Platform("linux", "arm", "v7")
    entries = [
        blobs.image("linux", "arm", "v7"),
        blobs.image("linux", "arm", "v6"),
        blobs.image("linux", "arm64"),
        blobs.image("windows", "amd64"),
    ]
    platforms = [arm, Platform("linux", "arm", "v6"), Platform("linux", "arm64", "v8"), Platform("windows", "amd64")]
    listed = [Descriptor(e.media_type, e.digest, e.size, platform=p) for e, p in zip(entries, platforms, strict=True)]
    target = blobs.index(listed)
    assert oci.resolve_image(blobs.read, target, oci.only(arm)).manifest_descriptor == listed[0]
    assert (
        oci.resolve_image(blobs.read, target, oci.only(Platform("linux", "arm", "v6"))).config.platform.variant == "v6"
    )
    # arm64 prefers its own manifest even though arm/v7 comes first in the index
    assert oci.resolve_image(blobs.read, target, oci.only(Platform("linux", "arm64"))).manifest_descriptor == listed[2]
    # only the chosen manifest and its config are read besides the index
    blobs.reads.clear()
    oci.resolve_image(blobs.read, target, oci.only(Platform("windows", "amd64")))
    assert len(blobs.reads) == 3
    with pytest.raises(NotFound, match="no manifest for platform linux/riscv64 in image sha256:"):
        oci.resolve_image(blobs.read, target, oci.only(Platform("linux", "riscv64")))


def test_resolve_checks_the_config_of_unlabelled_entries_and_follows_nested_indexes() -> None:
    blobs = Blobs()
    arm64, amd64 = blobs.image("linux", "arm64"), blobs.image("linux", "amd64", docker=True)
    signature = blobs.add({"schemaVersion": 2}, "application/vnd.dev.cosign.simplesigning.v1+json")
    inner = blobs.index([arm64, amd64], docker=True)  # entries without platforms
    target = blobs.index([signature, inner])
    resolved = oci.resolve_image(blobs.read, target, oci.only(Platform("linux", "amd64")))
    assert resolved.manifest_descriptor == amd64
    assert oci.resolve_image(blobs.read, target, oci.only(Platform("linux", "arm64"))).manifest_descriptor == arm64


def test_resolve_refuses_bad_documents() -> None:
    blobs = Blobs()
    good = blobs.image()
    tampered = Descriptor(good.media_type, good.digest, good.size + 1)
    with pytest.raises(InvalidArgument, match="does not match its descriptor"):
        oci.resolve_image(blobs.read, tampered)
    schema1 = blobs.add({"schemaVersion": 1, "fsLayers": []}, oci.DOCKER_SCHEMA1_SIGNED_MANIFEST)
    with pytest.raises(InvalidArgument, match="schema 1 manifests are not supported"):
        oci.resolve_image(blobs.read, schema1)
    with pytest.raises(InvalidArgument, match="schema 1 manifests are not supported"):
        oci.resolve_image(blobs.read, blobs.index([schema1]))
    with pytest.raises(InvalidArgument, match="is not an image index or manifest"):
        oci.resolve_image(blobs.read, Descriptor(oci.OCI_CONFIG, good.digest, good.size))
    artifact = blobs.add(
        {"schemaVersion": 2, "config": Descriptor("application/vnd.example+json", DIFF_A, 1).to_oci()}, oci.OCI_MANIFEST
    )
    with pytest.raises(InvalidArgument, match=r"not an image \(config media type 'application/vnd.example"):
        oci.resolve_image(blobs.read, artifact)
    huge = Descriptor(oci.OCI_MANIFEST, good.digest, oci.MAX_DOCUMENT_SIZE + 1)
    with pytest.raises(InvalidArgument, match="bytes allowed"):
        oci.resolve_image(blobs.read, huge)
    broken_config = blobs.add(
        {"schemaVersion": 2, "config": blobs.add(b"{", oci.OCI_CONFIG).to_oci()}, oci.OCI_MANIFEST
    )
    with pytest.raises(InvalidArgument, match=r"image config sha256:\w+: not valid JSON"):
        oci.resolve_image(blobs.read, broken_config)


# -- chain ids -----------------------------------------------------------------------------------


def test_chain_ids() -> None:
    assert oci.chain_ids([]) == []
    chain = oci.chain_ids([DIFF_A, DIFF_B, DIFF_A])
    assert chain[0] == DIFF_A
    assert chain[1] == "sha256:" + hashlib.sha256(f"{DIFF_A} {DIFF_B}".encode()).hexdigest()
    assert chain[2] == "sha256:" + hashlib.sha256(f"{chain[1]} {DIFF_A}".encode()).hexdigest()
    with pytest.raises(InvalidArgument):
        oci.chain_ids(["nope"])
