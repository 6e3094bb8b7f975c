"""core.distribution.archive over the real parts (tests/distribution_env.py): export to an OCI layout tar that
skopeo and umoci read, import of what skopeo writes (oci-archive and docker-archive), and hostile archives,
each refused with nothing half-made."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distribution_env import NS, Env, environment, run
from interop import SKOPEO
from oci_images import MT_INDEX, Layer, compress, sha256

from core import oci
from core.digest import Digest
from core.distribution.archive import export_images, import_archive
from core.distribution.blobs import write_blob
from core.errors import FailedPrecondition, InvalidArgument, NotFound
from core.metadata.images import Image
from core.types import Descriptor, Platform

UMOCI = "/usr/bin/umoci"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with environment(tmp_path) as built:
        yield built


def base() -> Layer:
    return Layer().dirs("etc", "bin").file("etc/hostname", b"base\n").file("bin/tool", b"#!/bin/sh\n", mode=0o755)


def top() -> Layer:
    return Layer().dirs("etc").file("etc/hostname", b"top\n").whiteout("bin/tool")  # gzip: umoci 0.4 has no zstd


def export(env: Env, names: list[str], namespace: str = NS, **options: Any) -> Path:
    path = env.tmp / f"export-{len(list(env.tmp.iterdir()))}.tar"
    with path.open("wb") as out:
        export_images(env.content, env.images, namespace, names, out, **options)
    return path


def chunks_of(path: Path, size: int = 65536) -> Iterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(size):
            yield chunk


def do_import(env: Env, path: Path, namespace: str = NS, **options: Any) -> list[Image]:
    return import_archive(env.content, env.images, env.unpacker, namespace, chunks_of(path), **options)


def chain_of(env: Env, target: Descriptor, namespace: str = NS) -> str:
    image = oci.resolve_image(lambda desc: env.read(desc, namespace), target)
    return oci.chain_ids(image.config.diff_ids)[-1]


def test_export_writes_an_oci_layout_that_skopeo_and_umoci_read(env: Env) -> None:
    image = env.image("example.com/app:v1", [base(), top()])
    archive = export(env, ["example.com/app:v1"])

    inspected = json.loads(run(SKOPEO, "inspect", f"oci-archive:{archive}"))
    assert inspected["Digest"] == image.target.digest
    manifest = json.loads(env.read(image.target))
    assert inspected["Layers"] == [layer["digest"] for layer in manifest["layers"]]

    with tarfile.open(archive) as tar:
        names = tar.getnames()
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        tar.extractall(env.tmp / "layout", filter="data")
    assert names[:2] == ["oci-layout", "index.json"]
    assert index["manifests"][0]["annotations"] == {
        "io.containerd.image.name": "example.com/app:v1",
        "org.opencontainers.image.ref.name": "v1",
    }
    run(UMOCI, "unpack", "--image", f"{env.tmp / 'layout'}:v1", env.tmp / "bundle")
    rootfs = env.tmp / "bundle" / "rootfs"
    assert (rootfs / "etc" / "hostname").read_text() == "top\n"
    assert not (rootfs / "bin" / "tool").exists()


def test_export_then_import_round_trips_several_images_into_another_namespace(env: Env) -> None:
    first = env.image("example.com/app:v1", [base(), top()])
    second = env.image("example.com/other@sha256:" + "a" * 64, [base()])
    archive = export(env, [first.name, second.name])

    imported = do_import(env, archive, "other", labels={"origin": "archive"})

    assert [(i.name, i.target.digest, i.labels) for i in imported] == [
        (first.name, first.target.digest, {"origin": "archive"}),
        (second.name, second.target.digest, {"origin": "archive"}),
    ]
    assert {i.name for i in env.images.list("other")} == {first.name, second.name}
    assert chain_of(env, first.target, "other") in env.committed("other")
    assert chain_of(env, second.target, "other") in env.committed("other")
    assert env.leftovers("other") == {"images": env.images.list("other"), "leases": [], "ingests": [], "active": []}
    # The gc.ref labels keep every blob alive with the image.
    before = env.blobs("other")
    env.collector.collect()
    assert env.blobs("other") == before


def test_export_refuses_a_missing_blob_before_writing_anything(env: Env) -> None:
    image = env.image("example.com/app:v1", [base()])
    layer = json.loads(env.read(image.target))["layers"][0]["digest"]
    env.content.delete(NS, layer)
    out = io.BytesIO()
    with pytest.raises(NotFound, match=layer):
        export_images(env.content, env.images, NS, [image.name], out)
    assert out.getvalue() == b""


def other_layer(env: Env, manifest: str) -> str:
    return json.loads(env.read(Digest(manifest)))["layers"][0]["digest"]


def multi_platform(env: Env) -> Image:
    """An index of a host-platform image (held whole), an s390x one whose layer is missing and a 386 one
    missing altogether."""
    absent = {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:" + "d" * 64, "size": 10}
    layout = env.layout()
    host = layout.add_image("host", [base()])
    other = layout.add_image("other", [top()])
    env.ingest(layout)
    env.content.delete(NS, other_layer(env, other["digest"]))
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {**host, "platform": {"os": "linux", "architecture": oci.host_platform().architecture}},
            {**other, "platform": {"os": "linux", "architecture": "s390x"}},
            {**absent, "platform": {"os": "linux", "architecture": "386"}},  # an amd64 host runs it: not pulled
        ],
    }
    target = write_blob(env.content, NS, json.dumps(index).encode(), MT_INDEX)
    return env.images.create(NS, Image("example.com/multi:v1", target))


def test_export_skips_other_platforms_missing_blobs_but_all_platforms_needs_them(env: Env) -> None:
    image = multi_platform(env)
    index = json.loads(env.read(image.target))
    host, other = index["manifests"][0]["digest"], index["manifests"][1]["digest"]
    with tarfile.open(export(env, [image.name])) as tar:
        blobs = {"sha256:" + name.rpartition("/")[2] for name in tar.getnames() if name.startswith("blobs/sha256/")}
    assert {image.target.digest, host, other} <= blobs  # the s390x manifest is there: it goes along
    assert other_layer(env, other) not in blobs
    with pytest.raises(NotFound):
        export(env, [image.name], platforms=[])
    with pytest.raises(NotFound):
        export(env, [image.name], platforms=[Platform("linux", "s390x")])


def skopeo_layout(env: Env) -> tuple[Path, str]:
    layout = env.layout()
    manifest = layout.add_image("latest", [base(), Layer().file("b", b"y")])
    return layout.directory, manifest["digest"]


def test_import_takes_what_skopeo_writes_as_oci_archive(env: Env) -> None:
    directory, digest = skopeo_layout(env)
    archive = env.tmp / "skopeo-oci.tar"
    run(SKOPEO, "--insecure-policy", "copy", "-q", f"oci:{directory}:latest", f"oci-archive:{archive}")

    with pytest.raises(InvalidArgument, match="base name"):
        do_import(env, archive)
    assert env.leftovers()["images"] == [] and env.leftovers()["leases"] == []

    [image] = do_import(env, archive, base_name="example.com/imported:v2")
    assert (image.name, image.target.digest) == ("example.com/imported:v2", digest)
    assert chain_of(env, image.target) in env.committed()
    labels = env.content.info(NS, digest).labels
    assert sorted(labels) == [
        "containerd.io/gc.ref.content.config",
        "containerd.io/gc.ref.content.l.0",
        "containerd.io/gc.ref.content.l.1",
    ]


def test_import_names_tag_only_entries_after_the_base_name(env: Env) -> None:
    directory, digest = skopeo_layout(env)
    archive = env.tmp / "tagged.tar"
    run(SKOPEO, "--insecure-policy", "copy", "-q", f"oci:{directory}:latest", f"oci-archive:{archive}:v3")
    [image] = do_import(env, archive, base_name="example.com/base", unpack=False)
    assert (image.name, image.target.digest) == ("example.com/base:v3", digest)
    assert env.committed() == set()


def test_import_takes_a_skopeo_docker_archive(env: Env) -> None:
    directory, _ = skopeo_layout(env)
    archive = env.tmp / "docker.tar"
    run(
        SKOPEO, "--insecure-policy", "copy", "-q", f"oci:{directory}:latest", f"docker-archive:{archive}:example/app:v1"
    )

    [image] = do_import(env, archive)

    assert image.name == "docker.io/example/app:v1"
    assert image.target.media_type == oci.DOCKER_MANIFEST
    manifest = json.loads(env.read(image.target))
    assert [layer["mediaType"] for layer in manifest["layers"]] == [oci.DOCKER_LAYER] * 2
    assert chain_of(env, image.target) in env.committed()
    assert env.leftovers()["leases"] == []


def rewrite(source: Path, dest: Path, change: dict[str, bytes | None]) -> Path:
    """``source`` tar with the files in ``change`` replaced (None: removed), in the same order."""
    with tarfile.open(source) as src, tarfile.open(dest, "w") as out:
        for member in src.getmembers():
            if member.name in change:
                data = change[member.name]
                if data is None:
                    continue
                member.size = len(data)
                out.addfile(member, io.BytesIO(data))
            else:
                out.addfile(member, src.extractfile(member) if member.isfile() else None)
    return dest


def test_import_follows_docker_archive_layer_links_within_the_archive(env: Env) -> None:
    directory, _ = skopeo_layout(env)
    archive = env.tmp / "docker.tar"
    run(
        SKOPEO, "--insecure-policy", "copy", "-q", f"oci:{directory}:latest", f"docker-archive:{archive}:example/app:v1"
    )
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        links = {m.linkname.removeprefix("../"): m.name for m in tar.getmembers() if m.issym()}
    manifest[0]["Layers"] = [links[name] for name in manifest[0]["Layers"]]  # <id>/layer.tar, as docker save
    legacy = rewrite(archive, env.tmp / "legacy.tar", {"manifest.json": json.dumps(manifest).encode()})

    [image] = do_import(env, legacy)
    assert chain_of(env, image.target) in env.committed()


# -- hostile archives --------------------------------------------------------------------------


def tar_of(*entries: tuple[str, bytes | str], raw_sizes: dict[str, int] | None = None) -> bytes:
    """A tar of ``(name, data)`` files; data given as a str is a symlink target."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def exported(env: Env) -> dict[str, bytes]:
    """The files of a good export of a one-layer image (then removed from the namespace)."""
    image = env.image("example.com/app:v1", [base()])
    with tarfile.open(export(env, [image.name])) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    env.images.delete(NS, image.name)
    for digest in env.blobs():
        env.content.delete(NS, digest)
    return files


def index_for(desc: dict[str, Any]) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "manifests": [{**desc, "annotations": {"io.containerd.image.name": "x:1"}}]}
    ).encode()


def hostile(kind: str, env: Env) -> bytes:
    files = exported(env)
    entries: list[tuple[str, bytes | str]] = list(files.items())
    blob = next(name for name in files if name.startswith("blobs/"))
    if kind == "dotdot":
        entries.insert(0, ("blobs/../../escape", b"x"))
    elif kind == "absolute":
        entries.insert(0, ("/etc/evil", b"x"))
    elif kind == "symlinked blob":
        entries = [(name, "../../etc/passwd" if name == blob else data) for name, data in entries]
    elif kind == "blob not matching its name":
        entries = [(name, data + b" " if name == blob else data) for name, data in entries]
    elif kind == "index pointing at a missing blob":
        index = index_for({"mediaType": oci.OCI_MANIFEST, "digest": sha256(b"absent"), "size": 6})
        entries = [(name, index if name == "index.json" else data) for name, data in entries]
    elif kind == "oversized manifest":  # in the archive, but more than a manifest may be
        big = b"{" + b" " * (9 << 20) + b"}"
        index = index_for({"mediaType": oci.OCI_MANIFEST, "digest": sha256(big), "size": len(big)})
        entries = [(name, index if name == "index.json" else data) for name, data in entries]
        entries.append((f"blobs/sha256/{sha256(big).split(':')[1]}", big))
    elif kind == "docker diff ids":
        rootfs = {"type": "layers", "diff_ids": [sha256(b"other")]}
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": rootfs}).encode()
        manifest = [{"Config": "c.json", "RepoTags": ["example/app:v1"], "Layers": ["l/layer.tar"]}]
        layer = Layer().file("a", b"a").tar()
        entries = [("l/layer.tar", layer), ("c.json", config), ("manifest.json", json.dumps(manifest).encode())]
    return tar_of(*entries)


def oversized_index() -> bytes:
    """An index.json whose header claims 9 MiB (and no data follows: it must be refused unread)."""
    info = tarfile.TarInfo("index.json")
    info.size = 9 << 20
    return info.tobuf(tarfile.PAX_FORMAT)


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("dotdot", InvalidArgument, "outside the archive"),
        ("absolute", InvalidArgument, "outside the archive"),
        ("symlinked blob", InvalidArgument, "not a regular file"),
        ("blob not matching its name", InvalidArgument, "does not match its name"),
        ("index pointing at a missing blob", InvalidArgument, "incomplete"),
        ("oversized manifest", InvalidArgument, "more than"),
        ("oversized index.json", InvalidArgument, "index.json has 9437184 bytes"),
        ("docker diff ids", FailedPrecondition, "diff ids of c.json do not match its layers"),
    ],
)
def test_hostile_archives_are_refused_with_nothing_half_made(
    env: Env,
    kind: str,
    error: type[Exception],
    message: str,
    robustness: Any,
) -> None:
    data = oversized_index() if kind == "oversized index.json" else hostile(kind, env)
    with pytest.raises(error, match=message):
        import_archive(
            env.content, env.images, env.unpacker, NS, [data[i : i + 4096] for i in range(0, len(data), 4096)]
        )
    assert env.leftovers() == {"images": [], "leases": [], "ingests": [], "active": []}
    assert env.committed() == set()
    env.collector.collect()
    assert env.blobs() == set()  # what was stored went with the lease
    assert not (Path("/etc/evil").exists() or (env.tmp.parent / "escape").exists())
    robustness.record("hostile inputs")


def test_an_archive_without_index_or_manifest_is_refused(env: Env, robustness: Any) -> None:
    data = tar_of(("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'))
    with pytest.raises(InvalidArgument, match=r"neither index\.json"):
        import_archive(env.content, env.images, env.unpacker, NS, [data])
    assert env.leftovers()["leases"] == []
    robustness.record("hostile inputs")


def test_import_takes_gzip_layers_in_a_docker_archive(env: Env) -> None:
    layer = Layer().dirs("etc").file("etc/motd", b"hi\n")
    rootfs = {"type": "layers", "diff_ids": [sha256(layer.tar())]}
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": rootfs}).encode()
    manifest = [{"Config": "c.json", "RepoTags": [], "Layers": ["l/layer.tar"]}]
    blob = compress(layer.tar(), "gzip")
    data = tar_of(("l/layer.tar", blob), ("c.json", config), ("manifest.json", json.dumps(manifest).encode()))

    [image] = import_archive(env.content, env.images, env.unpacker, NS, [data], base_name="example.com/gz:v1")

    assert image.name == "example.com/gz:v1"
    [layer_desc] = json.loads(env.read(image.target))["layers"]
    assert layer_desc["mediaType"] == oci.DOCKER_LAYER_GZIP
    assert chain_of(env, image.target) in env.committed()
