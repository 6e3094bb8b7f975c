"""Hostile image layers pulled with Debian's ``ctr`` into containerkitd and, for reference, into containerd 1.6.

Each case is an image whose top layer (sometimes two) tries to escape the rootfs or to break the
unpacker: ``..`` and absolute entry names, writes through symlinks pointing outside (also a chain of
them, also planted by a lower layer), hardlinks to targets outside, device nodes, absurd header sizes,
truncated and corrupt gzip/zstd/tar streams, whiteouts naming ``..``, and a config whose diff id does not
match the layer. The images aim at a sentinel directory outside every rootfs. For each case:

* both daemons refuse the pull, or both accept it and unpack the same tree (file by file);
* after a refusal no half-made snapshot is left: the snapshot listings of both daemons agree;
* the sentinel is untouched, and containerkitd still answers.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from interop import Sentinel, collect_garbage, ctr, image_tree, tree_differences
from oci_images import Layer, Layout, sha256

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ctr", "containerd", "docker-registry", "skopeo")),
        reason="needs Debian's containerd (ctr), docker-registry and skopeo",
    ),
]

UP = "../" * 24  # from any snapshot directory, far enough up to reach /
PAYLOAD = bytes(range(256)) * 1024  # 256 KiB, so a truncated or flipped stream breaks inside the data


def base_layer() -> Layer:
    return Layer("gzip").dirs("etc", "tmp", "var").file("etc/hostname", b"hostile\n")


def size_header(name: str, size_field: bytes) -> bytes:
    """A ustar header for a regular file ``name`` whose 12-byte size field is ``size_field`` verbatim."""
    header = bytearray(tarfile.TarInfo(name).tobuf(tarfile.USTAR_FORMAT))
    header[124:136] = size_field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def flip(start: float, count: int = 64) -> Callable[[bytes], bytes]:
    """Invert ``count`` bytes at fraction ``start`` of a blob (negative: from the end)."""

    def mangle(blob: bytes) -> bytes:
        at = int(len(blob) * start) if start >= 0 else len(blob) + int(start)
        return blob[:at] + bytes(b ^ 0xFF for b in blob[at : at + count]) + blob[at + count :]

    return mangle


def truncate(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


def data_layer(compression: str, mangle: Callable[[bytes], bytes] | None = None) -> Layer:
    return Layer(compression, mangle).dir("data").file("data/payload", PAYLOAD).file("data/after", b"after\n")


def pax_size_info(name: str, size: str) -> tarfile.TarInfo:
    """A regular file header whose PAX ``size`` record is ``size`` (no data follows)."""
    info = Layer.info(name, tarfile.REGTYPE, 0o644, 0, 0, 0)
    info.pax_headers["size"] = size
    return info


@dataclass
class Case:
    """Layers on top of :func:`base_layer`, built for a sentinel at ``/SENTINEL`` (the path without its leading
    slash), and optionally a config diff id list that lies."""

    layers: Callable[[str], list[Layer]]
    lie_about_diff_id: bool = False


CASES: dict[str, Case] = {
    "dotdot": Case(lambda s: [Layer().file(f"{UP}{s}/victim", b"pwned").file(f"../{s}/new", b"pwned")]),
    "dotdot-inside-name": Case(lambda s: [Layer().dir("etc").file(f"etc/../../../{UP}{s}/victim", b"pwned")]),
    "dotdot-dir": Case(lambda s: [Layer().dir(f"{UP}{s}/newdir").file(f"{UP}{s}/newdir/f", b"pwned")]),
    "absolute": Case(lambda s: [Layer().file(f"/{s}/victim", b"pwned").dir(f"/{s}/newdir")]),
    "symlink-out-absolute": Case(lambda s: [Layer().symlink("escape", f"/{s}").file("escape/victim", b"pwned")]),
    "symlink-out-relative": Case(lambda s: [Layer().symlink("escape", f"{UP}{s}").file("escape/new", b"pwned")]),
    "symlink-chain": Case(
        lambda s: [
            Layer()
            .dir("etc")
            .symlink("one", "etc/two")
            .symlink("etc/two", "../three")
            .symlink("three", f"/{s}")
            .file("one/victim", b"pwned")
            .file("one/new", b"pwned")
        ]
    ),
    "symlink-from-lower-layer": Case(
        lambda s: [
            Layer().symlink("escape", f"/{s}").symlink("esc2", f"{UP}{s}"),
            Layer().file("escape/victim", b"pwned").dir("esc2").file("esc2/new", b"pwned"),
        ]
    ),
    "symlink-then-file-same-name": Case(
        lambda s: [Layer().symlink("victim-link", f"/{s}/victim").file("victim-link", b"pwned", mode=0o777)]
    ),
    "symlink-loop": Case(lambda s: [Layer().symlink("loop1", "loop2").symlink("loop2", "loop1").file("loop1/x", b"x")]),
    "hardlink-out-absolute": Case(lambda s: [Layer().hardlink("hl", f"/{s}/victim")]),
    "hardlink-out-relative": Case(lambda s: [Layer().hardlink("hl", f"{UP}{s}/victim")]),
    "hardlink-through-symlink": Case(
        lambda s: [Layer().symlink("escape", f"/{s}").hardlink("hl", "escape/victim").hardlink("hl2", "escape")]
    ),
    "hardlink-to-lower-layer": Case(lambda s: [Layer().hardlink("hostname-link", "etc/hostname")]),
    "whiteout-dotdot": Case(lambda s: [Layer().dir("etc").file("etc/.wh...", b"")]),
    "whiteout-outside": Case(lambda s: [Layer().file(f"{UP}{s}/.wh.victim", b"").whiteout(f"/{s}/victim")]),
    "device-nodes": Case(
        lambda s: [
            Layer()
            .dir("dev")
            .device("dev/mem", "char", 1, 1)
            .device("dev/sda", "block", 8, 0)
            .device("dev/kmsg", "char", 1, 11, mode=0o666, uid=1000)
            .device("dev/fifo", "fifo", 0, 0, mode=0o620)
        ]
    ),
    "device-outside": Case(
        lambda s: [Layer().device(f"{UP}{s}/device", "char", 1, 3).device(f"/{s}/dev2", "block", 8, 0)]
    ),
    "absurd-size-octal": Case(lambda s: [Layer().raw(size_header("big", b"77777777777\0") + PAYLOAD)]),
    "absurd-size-base256": Case(lambda s: [Layer().raw(size_header("big", b"\x80" + (1 << 62).to_bytes(11, "big")))]),
    "negative-size": Case(lambda s: [Layer().raw(size_header("neg", b"\xff" * 12) + PAYLOAD)]),
    "absurd-size-pax": Case(lambda s: [Layer().add(pax_size_info("big", "99999999999999999999999"))]),
    "truncated-gzip": Case(lambda s: [data_layer("gzip", truncate)]),
    "corrupt-gzip": Case(lambda s: [data_layer("gzip", flip(0.5))]),
    "gzip-bad-crc": Case(lambda s: [data_layer("gzip", flip(-8, 4))]),
    "truncated-zstd": Case(lambda s: [data_layer("zstd", truncate)]),
    "corrupt-zstd": Case(lambda s: [data_layer("zstd", flip(0.5))]),
    "truncated-tar": Case(lambda s: [data_layer("tar", truncate)]),
    "garbage-as-gzip": Case(lambda s: [data_layer("gzip", lambda blob: PAYLOAD)]),
    "garbage-as-tar": Case(lambda s: [data_layer("tar", lambda blob: PAYLOAD[7:])]),
    "diff-id-mismatch": Case(lambda s: [data_layer("gzip")], lie_about_diff_id=True),
}


@pytest.fixture(scope="module")
def sentinel() -> Iterator[Sentinel]:
    """The directory every case aims at, outside every daemon's root."""
    directory = Path(tempfile.mkdtemp(prefix="ck-sentinel-", dir="/tmp"))
    try:
        yield Sentinel(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def hostile_images(registry: Any, sentinel: Sentinel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every case pushed to the registry as ``hostile:<case>``: {case: reference}."""
    layout = Layout(tmp_path_factory.mktemp("hostile-layout"))
    target = str(sentinel.directory).lstrip("/")
    refs = {}
    for name, case in CASES.items():
        layers = [base_layer(), *case.layers(target)]
        diff_ids = [sha256(layer.tar()) for layer in layers]
        if case.lie_about_diff_id:
            diff_ids[-1] = sha256(b"not this layer")
        layout.add_image(name, layers, diff_ids=diff_ids)
        refs[name] = registry.push(layout.directory, name, "interop/hostile")
    return refs


def snapshot_rows(daemon: Any, namespace: str) -> list[str]:
    """``ctr snapshots ls`` rows (KEY PARENT KIND), sorted, once garbage is collected (what a failed pull
    left unreferenced goes at the next collection, whenever that is)."""
    collect_garbage(daemon, namespace)
    return sorted(
        " ".join(line.split()) for line in ctr(daemon, "snapshots", "ls", namespace=namespace).stdout.splitlines()[1:]
    )


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_layer(containerkitd: Any, containerd: Any, hostile_images: dict[str, str], sentinel: Sentinel,
                       case: str, tmp_path: Path, robustness: Any) -> None:  # fmt: skip
    """Both daemons refuse the image, or both unpack the same tree; nothing outside changes; ours serves on."""
    ref, namespace = hostile_images[case], f"hostile-{case}"
    pulls = {name: ctr(daemon, "images", "pull", "--plain-http", ref, check=False, namespace=namespace)
             for name, daemon in (("ours", containerkitd), ("theirs", containerd))}  # fmt: skip
    assert sentinel.untouched() == []
    ctr(containerkitd, "version")
    robustness.record("hostile inputs")
    refused = {name: result.returncode != 0 for name, result in pulls.items()}
    stderr = {name: result.stderr.strip().splitlines()[-1:] for name, result in pulls.items()}
    assert refused["ours"] == refused["theirs"], f"containerd refused: {refused['theirs']}; stderr: {stderr}"
    assert snapshot_rows(containerkitd, namespace) == snapshot_rows(containerd, namespace)
    if refused["ours"]:
        assert stderr["ours"], "containerkitd refused without saying why"
        return
    trees = [image_tree(daemon, ref, tmp_path, namespace) for daemon in (containerkitd, containerd)]
    assert sentinel.untouched() == []
    unstable = [path for path, node in trees[1].items() if node.kind == "dir"]  # implicit parents: mtime = now
    differences = tree_differences(*trees, unstable_mtimes=unstable)
    assert not differences, "containerkitd's tree differs from containerd's:\n" + "\n".join(differences)
