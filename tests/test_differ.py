"""The differ over real mounts: apply_layer's fast paths (bind, overlay upperdir) and mounted path,
compressed and hostile layers, write_diff round trips, and the walking differ over a real content store."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from test_archive import Jail, chunked, directory, fingerprint, hardlink, member, symlink, tar_of

from core.content import Info
from core.diff import LABEL_UNCOMPRESSED
from core.diff.apply import apply_layer, direct_target
from core.diff.archive import Whiteouts
from core.diff.changes import double_walk, walk
from core.diff.compression import Compression, decompress
from core.diff.walking import WalkingDiffer
from core.diff.writer import write_diff
from core.digest import Digest
from core.errors import FailedPrecondition, InvalidArgument, NotFound, NotImplementedByPlugin
from core.files import remove_tree
from core.metadata import MetadataStore
from core.metadata.content import ContentMetadata
from core.mount import temp_mount
from core.types import Descriptor, Mount
from plugins.content_local import LocalContentStore

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting and applying layers needs root")

TAR = "application/vnd.oci.image.layer.v1.tar"
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPES = {Compression.NONE: TAR, Compression.GZIP: GZIP, Compression.ZSTD: ZSTD}

BASE = tar_of(
    directory("etc"),
    member("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    member("etc/hosts", b"127.0.0.1 localhost\n", mode=0o600),
    directory("bin"),
    member("bin/busybox", b"\x7fELF" + bytes(5000), mode=0o755),
    hardlink("bin/sh", "bin/busybox"),
    directory("usr/lib", mode=0o755),
    member("usr/lib/libc.so", b"libc", mode=0o755),
    symlink("lib", "usr/lib"),
    directory("var/lib/data"),
    member("var/lib/data/x", b"x"),
    directory("opt/dir", uid=5),
    member("opt/dir/f", b"f"),
)


def bind(path: Path, *options: str) -> list[Mount]:
    return [Mount("bind", str(path), ("rbind", *options))]


@pytest.fixture
def overlay(tmp_path: Path) -> tuple[Path, Path, list[Mount]]:
    """A lower directory holding BASE, and an overlay (upper and work dirs) on top of it."""
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for path in (lower, upper, work):
        path.mkdir()
    apply_layer(chunked(BASE), TAR, bind(lower))
    options = (f"workdir={work}", f"upperdir={upper}", f"lowerdir={lower}")
    return lower, upper, [Mount("overlay", "overlay", options)]


def merged(mounts: list[Mount]) -> dict[str, tuple[Any, ...]]:
    with temp_mount(mounts) as root:
        return fingerprint(root)


# -- apply ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "compress"),
    [
        (TAR, bytes),
        (GZIP, gzip.compress),
        (ZSTD, zstandard.ZstdCompressor().compress),
        (DOCKER, gzip.compress),
        (GZIP, zstandard.ZstdCompressor().compress),  # the magic bytes decide, as containerd
        ("application/vnd.docker.image.rootfs.diff.tar", gzip.compress),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", zstandard.ZstdCompressor().compress),
    ],
)
def test_apply_returns_the_diff_id(tmp_path: Path, media_type: str, compress: Any) -> None:
    applied = apply_layer(chunked(compress(BASE), 100), media_type, bind(tmp_path))
    assert applied == Descriptor(TAR, Digest.from_bytes(BASE), len(BASE))
    assert (tmp_path / "etc/passwd").read_bytes().startswith(b"root")
    same = apply_layer(chunked(compress(BASE)), media_type, bind(tmp_path), diff_id=applied.digest)
    assert same == applied


def test_diff_id_mismatch_is_a_failed_precondition(tmp_path: Path) -> None:
    wrong = Digest.from_bytes(b"another layer")
    with pytest.raises(FailedPrecondition, match=f"diff id mismatch: got {Digest.from_bytes(BASE)}, want {wrong}"):
        apply_layer(chunked(gzip.compress(BASE)), GZIP, bind(tmp_path), diff_id=wrong)


def _gzip_corrupt(data: bytes) -> bytes:
    blob = bytearray(gzip.compress(data))
    blob[len(blob) // 2] ^= 0xFF
    return bytes(blob)


def _zstd_corrupt(data: bytes) -> bytes:
    blob = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(data))
    blob[len(blob) // 2] ^= 0xFF
    return bytes(blob)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (gzip.compress(BASE)[:-20], "truncated gzip stream"),
        (gzip.compress(BASE)[:40], "truncated gzip stream"),
        (_gzip_corrupt(BASE), "corrupt gzip stream"),
        (gzip.compress(BASE) + b"garbage!", "corrupt gzip stream"),
        (zstandard.ZstdCompressor().compress(BASE)[:-10], "truncated zstd stream"),
        (zstandard.ZstdCompressor().compress(BASE)[:30], "truncated zstd stream"),
        (_zstd_corrupt(BASE), "corrupt zstd stream"),
        (zstandard.ZstdCompressor().compress(BASE) + b"garbage!", "corrupt zstd stream"),
    ],
    ids=[
        "gzip-truncated",
        "gzip-cut",
        "gzip-corrupt",
        "gzip-trailing",
        "zstd-truncated",
        "zstd-cut",
        "zstd-corrupt",
        "zstd-trailing",
    ],
)
def test_broken_compressed_streams_are_refused(tmp_path: Path, blob: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        apply_layer(chunked(blob, 999), GZIP, bind(tmp_path))


def test_unsupported_media_type_and_read_only_mounts(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="unsupported layer media type"):
        apply_layer(chunked(BASE), "application/vnd.oci.image.config.v1+json", bind(tmp_path))
    with pytest.raises(FailedPrecondition, match="read-only"):
        apply_layer(chunked(BASE), TAR, bind(tmp_path, "ro"))
    with pytest.raises(FailedPrecondition, match="read-only"):
        apply_layer(chunked(BASE), TAR, [Mount("overlay", "overlay", (f"lowerdir={tmp_path}",))])
    assert os.listdir(tmp_path) == []


def test_fast_paths_are_chosen_from_the_mounts() -> None:
    upper = Mount("overlay", "overlay", ("workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"))
    assert direct_target([upper]) == ("/u", Whiteouts.OVERLAY, ["/l1", "/l2"])
    assert direct_target([Mount("bind", "/s", ("rw", "rbind"))]) == ("/s", Whiteouts.DELETE, [])
    aufs = Mount("aufs", "none", ("br:/u=rw:/l1=ro+wh:/l2=ro+wh", "dio", "xino=/dev/shm/aufs.xino"))
    assert direct_target([aufs]) == ("/u", Whiteouts.AUFS, ["/l1", "/l2"])
    assert direct_target([Mount("aufs", "none", ("br:/l1=ro+wh:/u=rw",))]) is None
    assert direct_target([Mount("tmpfs", "tmpfs", ())]) is None
    assert direct_target([Mount("bind", "/s", ("rbind",)), Mount("bind", "/t", ("rbind",), target="x")]) is None


OVERLAY_LAYER = tar_of(
    member("etc/.wh.passwd"),
    member(".wh.var"),
    member("opt/dir/.wh..wh..opq"),
    member("opt/dir/new", b"new"),
    member("usr/lib/libnew.so", b"new lib"),
    member("lib/through-link", b"via the lib symlink of the lower layer"),
)


def test_overlay_upperdir_fast_path(overlay: tuple[Path, Path, list[Mount]]) -> None:
    _, upper, mounts = overlay
    apply_layer(chunked(OVERLAY_LAYER), TAR, mounts)
    assert stat.S_ISCHR((upper / "etc/passwd").lstat().st_mode)
    assert os.getxattr(upper / "opt/dir", "trusted.overlay.opaque") == b"y"
    assert (upper / "opt/dir").stat().st_uid == 5, "a created parent takes the lower directory's owner"
    view = merged(mounts)
    assert "etc/passwd" not in view and "var" not in view and "var/lib/data/x" not in view
    assert "opt/dir/f" not in view and "opt/dir/new" in view
    assert "usr/lib/libnew.so" in view and "etc/hosts" in view
    # containerd resolves parents inside the upperdir only: a lower symlink is shadowed by a directory
    assert view["lib"][0] == stat.S_IFDIR and "lib/through-link" in view


def test_mounted_path_deletes_whiteouts(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    apply_layer(chunked(BASE), TAR, bind(first))
    apply_layer(chunked(BASE), TAR, bind(second))
    mounts = [*bind(first), Mount("bind", str(second), ("rbind",), target="etc")]
    layer = tar_of(member("etc/.wh.etc"), member(".wh.bin"), member("etc/new", b"into the second mount"))
    apply_layer(chunked(layer), TAR, mounts)
    assert not (second / "etc").exists() and (second / "new").read_bytes() == b"into the second mount"
    assert not (first / "bin").exists() and (first / "etc/passwd").exists(), "the first mount's etc was covered"


def hostile(outside: str) -> list[bytes]:
    """Layers that try to write outside the snapshot, ``outside`` being the place they aim at."""
    return [
        tar_of(member("../../escape", b"pwned")),
        tar_of(symlink("link", outside), member("link/secret", b"pwned"), member("link/dir/inner", b"pwned")),
        tar_of(symlink("a", "b"), symlink("b", f"../../../../../../../..{outside}/dir"), member("a/inner", b"pwned")),
        tar_of(hardlink("h", f"../../../{outside}/secret")),
        tar_of(symlink("s", outside), hardlink("h", "s/secret")),
        tar_of(symlink("f", f"{outside}/secret"), member("f", b"pwned")),
    ]


@pytest.fixture
def jail(tmp_path: Path) -> Iterator[Jail]:
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_bytes(b"secret")
    (outside / "dir" / "inner").write_bytes(b"inner")
    jailed = Jail(tmp_path / "root", outside, fingerprint(outside))
    jailed.root.mkdir()
    yield jailed
    assert jailed.untouched(), "something outside the snapshot changed"


@pytest.mark.parametrize("path", ["bind", "overlay", "mounted"])
@pytest.mark.parametrize("index", range(6))
def test_hostile_layers_write_nothing_outside(jail: Jail, tmp_path: Path, path: str, index: int) -> None:
    layer = hostile(str(jail.outside))[index]
    if path == "bind":
        mounts = bind(jail.root)
    elif path == "overlay":
        (tmp_path / "work").mkdir()
        (tmp_path / "lower").mkdir()
        options = (f"workdir={tmp_path}/work", f"upperdir={jail.root}", f"lowerdir={tmp_path}/lower")
        mounts = [Mount("overlay", "overlay", options)]
    else:
        mounts = [*bind(jail.root), Mount("tmpfs", "tmpfs", (), target="unused")]
        (jail.root / "unused").mkdir()
    with contextlib.suppress(InvalidArgument, OSError):  # refused or contained: the fixture checks outside
        apply_layer(chunked(gzip.compress(layer)), GZIP, mounts)


# -- compare ----------------------------------------------------------------------------------------


def _change(root: Path) -> None:
    """Every kind of change, made through a mounted snapshot."""
    (root / "etc/hosts").write_bytes(b"10.0.0.1 changed\n")
    (root / "etc/passwd").unlink()
    shutil.rmtree(root / "var/lib/data")
    shutil.rmtree(root / "opt/dir")
    (root / "opt/dir").mkdir(mode=0o700)
    (root / "opt/dir/new").write_bytes(b"replaces the directory")
    (root / "bin/busybox").write_bytes(b"\x7fELF new")
    (root / "new").mkdir()
    (root / "new/file").write_bytes(b"x" * 100_000)
    os.setxattr(root / "new/file", "user.origin", b"\xff\x00binary")
    os.link(root / "new/file", root / "new/link")
    os.chown(root / "etc/hosts", 33, 44)
    os.chmod(root / "usr/lib/libc.so", 0o4711)
    os.symlink("../etc/hosts", root / "new/symlink")
    os.mknod(root / "new/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(root / "new/fifo")


def _roundtrip(upper_mounts: list[Mount], lower_mounts: list[Mount], tmp_path: Path, compression: Compression) -> None:
    with temp_mount(upper_mounts) as root:
        _change(root)
    expected = merged(upper_mounts)
    out = io.BytesIO()
    diff_id = write_diff(lower_mounts, upper_mounts, compression, out.write)
    layer = out.getvalue()
    tar = b"".join(decompress([layer], Compression.DETECT))
    assert Digest.from_bytes(tar) == diff_id
    assert write_diff(lower_mounts, upper_mounts, Compression.NONE, io.BytesIO().write) == diff_id, "deterministic"
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        names = archive.getnames()
    assert "etc/.wh.passwd" in names and "var/lib/.wh.data" in names and "var/lib/data/x" not in names
    assert "etc/passwd" not in names and "usr/lib/libc.so" in names and "etc" in names
    copy = tmp_path / "copy"
    copy.mkdir()
    apply_layer(chunked(BASE), TAR, bind(copy))
    applied = apply_layer(chunked(layer, 1000), MEDIA_TYPES[compression], bind(copy))
    assert applied.digest == diff_id
    assert fingerprint(copy) == expected
    assert (copy / "new/file").stat().st_ino == (copy / "new/link").stat().st_ino


@pytest.mark.parametrize("compression", [Compression.GZIP, Compression.ZSTD, Compression.NONE])
def test_compare_overlay_upperdir_round_trip(
    overlay: tuple[Path, Path, list[Mount]], tmp_path: Path, compression: Compression
) -> None:
    lower, upper, mounts = overlay
    _roundtrip(mounts, bind(lower, "ro"), tmp_path, compression)
    assert os.getxattr(upper / "opt/dir", "trusted.overlay.opaque") == b"y", "the opaque path was exercised"


def test_compare_by_walking_both_trees(overlay: tuple[Path, Path, list[Mount]], tmp_path: Path) -> None:
    lower, _, mounts = overlay
    empty = tmp_path / "empty"
    empty.mkdir()
    # Not the overlay's own lowers: the fast path does not apply and both trees are mounted and walked.
    lower_mounts = [Mount("overlay", "overlay", (f"lowerdir={lower}:{empty}",))]
    _roundtrip(mounts, lower_mounts, tmp_path, Compression.GZIP)


def test_compare_against_nothing_adds_everything(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    apply_layer(chunked(BASE), TAR, bind(tree))
    out = io.BytesIO()
    write_diff([], bind(tree), Compression.NONE, out.write)
    copy = tmp_path / "copy"
    copy.mkdir()
    apply_layer(chunked(out.getvalue()), TAR, bind(copy))
    assert fingerprint(copy) == fingerprint(tree)


def test_compare_walks_a_tree_deeper_than_the_recursion_limit(tmp_path: Path) -> None:
    """A layer may nest directories as deep as paths allow (1500 levels here, > sys.getrecursionlimit()):
    comparing two such trees finds the one change at the bottom."""
    depth = 1500
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    try:
        for tree in (lower, upper):
            bottom = tree
            bottom.mkdir()
            for _ in range(depth):  # not mkdir(parents=True) nor os.makedirs: both recurse per level
                bottom = bottom / "d"
                bottom.mkdir()
            (bottom / "file").write_text("same")
        upper.joinpath(*["d"] * depth, "file").write_text("new!")
        changes = [(change.kind.value, change.path) for change in double_walk(str(lower), str(upper))]
        bottom_path = "/".join(["d"] * depth)
        assert ("modify", f"{bottom_path}/file") in changes
        assert len(list(walk(str(upper)))) == depth + 1
    finally:
        for tree in (lower, upper):  # pytest's clean-up (shutil.rmtree) recurses per level
            remove_tree(tree)


# -- the walking differ over a content store -----------------------------------------------------------


@pytest.fixture
def content(tmp_path: Path) -> Iterator[ContentMetadata]:
    backend = LocalContentStore(tmp_path / "content")
    with MetadataStore(tmp_path / "meta.db") as store:
        yield ContentMetadata(store, backend)
    backend.close()


def put(content: ContentMetadata, namespace: str, data: bytes, media_type: str) -> Descriptor:
    digest = Digest.from_bytes(data)
    with content.writer(namespace, f"put-{digest}") as writer:
        writer.write(data)
        writer.commit(len(data), digest)
    return Descriptor(media_type, digest, len(data))


def test_walking_differ_applies_from_the_namespace(content: ContentMetadata, tmp_path: Path) -> None:
    differ = WalkingDiffer(content)
    layer = put(content, "ns1", zstandard.ZstdCompressor().compress(BASE), ZSTD)
    applied = differ.apply("ns1", layer, bind(tmp_path), diff_id=Digest.from_bytes(BASE))
    assert applied == Descriptor(TAR, Digest.from_bytes(BASE), len(BASE))
    with pytest.raises(NotFound):
        differ.apply("ns2", layer, bind(tmp_path))


def test_walking_differ_compare_writes_a_labelled_blob(
    content: ContentMetadata, overlay: tuple[Path, Path, list[Mount]]
) -> None:
    differ = WalkingDiffer(content)
    lower, _, mounts = overlay
    with temp_mount(mounts) as root:
        _change(root)
    written = differ.compare("ns1", bind(lower, "ro"), mounts, labels={"app": "x"})
    assert written.media_type == GZIP
    info = content.info("ns1", written.digest)
    blob = _read(content, written)
    assert info.size == written.size == len(blob)
    assert info.labels == {"app": "x", LABEL_UNCOMPRESSED: str(Digest.from_bytes(gzip.decompress(blob)))}
    # Again, under a ref of our own and without the label: the existing blob gets it back.
    content.update("ns1", Info(written.digest, labels={}), ["labels"])
    again = differ.compare("ns1", bind(lower, "ro"), mounts, ref="my-diff")
    assert again == written
    assert content.info("ns1", written.digest).labels == {LABEL_UNCOMPRESSED: info.labels[LABEL_UNCOMPRESSED]}
    zstd = differ.compare("ns1", bind(lower, "ro"), mounts, media_type=ZSTD)
    assert zstd.media_type == ZSTD
    assert content.info("ns1", zstd.digest).labels[LABEL_UNCOMPRESSED] == info.labels[LABEL_UNCOMPRESSED]
    with pytest.raises(NotImplementedByPlugin, match="unsupported diff media type"):
        differ.compare("ns1", bind(lower, "ro"), mounts, media_type="application/x-tar+bzip2")
    with pytest.raises(OSError):
        differ.compare("ns1", [Mount("bind", "/nonexistent", ("rbind",))], bind(lower))
    assert content.list_statuses("ns1") == [], "a failed compare leaves no ingest behind"


def _read(content: ContentMetadata, descriptor: Descriptor) -> bytes:
    with content.reader_at("ns1", descriptor) as reader:
        return reader.read(0, reader.size)
