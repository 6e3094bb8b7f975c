"""core.distribution.convert over the real parts (tests/distribution_env.py): layers recompressed to zstd
or gzip, diff ids and config unchanged, the converted image unpacks onto the same snapshots and skopeo
reads its export; bad input refused with nothing made."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from distribution_env import NS, Env, environment, run
from interop import SKOPEO
from oci_images import MT_INDEX, Layer

from core import oci
from core.diff import LABEL_UNCOMPRESSED
from core.diff.compression import Compression, decompress
from core.digest import Digest
from core.distribution.archive import export_images
from core.distribution.blobs import write_blob
from core.distribution.convert import convert_image
from core.errors import FailedPrecondition, InvalidArgument, NotFound
from core.metadata.images import Image

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with environment(tmp_path) as built:
        yield built


def layers() -> list[Layer]:
    first = Layer().dirs("etc", "bin").file("etc/hostname", b"base\n").file("bin/tool", b"x" * 300_000, mode=0o755)
    second = Layer(compression="tar").dirs("etc").file("etc/hostname", b"top\n")
    third = Layer(compression="zstd").file("z", b"already zstd\n")
    return [first, second, third]


def manifest_of(env: Env, image: Image) -> dict:
    return json.loads(env.read(image.target))


def test_convert_to_zstd_recompresses_layers_and_keeps_diff_ids(env: Env) -> None:
    source = env.image("example.com/app:v1", layers(), config={"Cmd": ["/bin/sh"]})
    env.images.update(NS, Image(source.name, source.target, {"team": "a"}))
    before = manifest_of(env, source)

    converted = convert_image(env.content, env.images, NS, source.name, "example.com/app:zstd", compression="zstd")

    assert converted.name == "example.com/app:zstd" and converted.labels == {"team": "a"}
    after = manifest_of(env, converted)
    assert after["mediaType"] == converted.target.media_type == oci.OCI_MANIFEST
    assert after["config"] == {**before["config"], "mediaType": oci.OCI_CONFIG}  # the same config blob
    assert [layer["mediaType"] for layer in after["layers"]] == [oci.OCI_LAYER_ZSTD] * 3
    assert after["layers"][2] == before["layers"][2]  # already zstd: kept as it is
    diff_ids = oci.parse_config(env.read(Digest(before["config"]["digest"]))).diff_ids
    for layer, diff_id in zip(after["layers"], diff_ids, strict=True):
        blob = env.read(Digest(layer["digest"]))
        assert blob.startswith(ZSTD_MAGIC)
        assert Digest.from_bytes(b"".join(decompress([blob], Compression.ZSTD))) == diff_id
    assert env.content.info(NS, after["layers"][0]["digest"]).labels[LABEL_UNCOMPRESSED] == diff_ids[0]
    assert env.leftovers()["leases"] == [] and env.leftovers()["ingests"] == []

    # The same snapshots serve both images, and the garbage collector keeps every blob.
    first = env.unpacker.unpack(NS, source.target, "overlayfs")
    second = env.unpacker.unpack(NS, converted.target, "overlayfs")
    assert (second.chain_id, second.applied) == (first.chain_id, 0)
    blobs = env.blobs()
    env.collector.collect()
    assert env.blobs() == blobs


def test_convert_in_place_to_gzip_at_a_level(env: Env) -> None:
    source = env.image("example.com/app:v1", layers())
    converted = convert_image(env.content, env.images, NS, source.name, source.name, compression="gzip", level=1)
    assert env.images.get(NS, source.name).target == converted.target != source.target
    after = manifest_of(env, converted)
    assert [layer["mediaType"] for layer in after["layers"]] == [oci.OCI_LAYER_GZIP] * 3
    assert all(env.read(Digest(layer["digest"]))[:2] == b"\x1f\x8b" for layer in after["layers"])


def test_converted_index_keeps_held_manifests_and_skopeo_reads_the_export(env: Env) -> None:
    layout = env.layout()
    amd64 = layout.add_image("amd64", layers()[:2])
    env.ingest(layout)
    absent = {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + "b" * 64, "size": 100}
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {**amd64, "platform": {"os": "linux", "architecture": oci.host_platform().architecture}},
            {**absent, "platform": {"os": "linux", "architecture": "s390x"}},
        ],
    }
    target = write_blob(env.content, NS, json.dumps(index).encode(), MT_INDEX)
    env.images.create(NS, Image("example.com/multi:v1", target))

    converted = convert_image(env.content, env.images, NS, "example.com/multi:v1", "example.com/multi:zstd",
                              compression="zstd")  # fmt: skip

    new_index = json.loads(env.read(converted.target))
    assert converted.target.media_type == oci.OCI_INDEX
    [entry] = new_index["manifests"]
    assert entry["platform"] == index["manifests"][0]["platform"]
    archive = env.tmp / "zstd.tar"
    with archive.open("wb") as out:
        export_images(env.content, env.images, NS, [converted.name], out)
    inspected = json.loads(run(SKOPEO, "inspect", "--raw", f"oci-archive:{archive}"))
    assert inspected == new_index


def test_a_layer_not_matching_its_diff_id_fails_the_conversion(env: Env) -> None:
    real = Layer().file("a", b"a")
    source = env.image("example.com/liar:v1", [real], diff_ids=["sha256:" + "c" * 64])
    with pytest.raises(FailedPrecondition, match="diff id mismatch"):
        convert_image(env.content, env.images, NS, source.name, "example.com/liar:zstd", compression="zstd")
    assert [image.name for image in env.images.list(NS)] == [source.name]
    assert env.leftovers()["leases"] == [] and env.leftovers()["ingests"] == []


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"compression": "lz4"}, InvalidArgument, "lz4"),
        ({"compression": "zstd", "level": 40}, InvalidArgument, "out of range"),
    ],
)
def test_bad_options_are_refused(env: Env, options: dict, error: type[Exception], message: str) -> None:
    source = env.image("example.com/app:v1", layers()[:1])
    with pytest.raises(error, match=message):
        convert_image(env.content, env.images, NS, source.name, "example.com/app:new", **options)
    assert len(env.images.list(NS)) == 1


def test_unknown_image_is_not_found(env: Env) -> None:
    with pytest.raises(NotFound):
        convert_image(env.content, env.images, NS, "example.com/none:v1", "x:1", compression="zstd")


def test_zstd_level_changes_the_output(env: Env) -> None:
    source = env.image("example.com/app:v1", layers()[:1])
    fast = convert_image(env.content, env.images, NS, source.name, "a:1", compression="zstd", level=1)
    best = convert_image(env.content, env.images, NS, source.name, "a:19", compression="zstd", level=19)
    fast_layer, best_layer = manifest_of(env, fast)["layers"][0], manifest_of(env, best)["layers"][0]
    assert fast_layer["digest"] != best_layer["digest"]
    assert fast_layer["size"] > best_layer["size"]
