"""Debian's ``ctr`` pulling, unpacking and mounting images through containerkitd, beside containerd 1.6.

The images are built here (tests/oci_images.py) and pushed with skopeo to a real Debian docker-registry
on 127.0.0.1; each test pulls them with ``ctr images pull --plain-http`` into containerkitd and into a
real containerd, each in a namespace of its own, and compares what the two did: the unpacked trees
file by file (tests/interop.py), the listings, the snapshot commands' outputs and errors.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import struct
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from interop import Node, collect_garbage, ctr, image_tree, mounted_image, normalised, tree_differences
from oci_images import Layer, Layout, busybox_layer, sha256

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ctr", "containerd", "docker-registry", "skopeo")),
        reason="needs Debian's containerd (ctr), docker-registry and skopeo",
    ),
]

# security.capability v2 (VFS_CAP_REVISION_2 | effective): cap_net_bind_service permitted, nothing inheritable.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
BIG = hashlib.shake_256(b"big").digest(3 << 20)  # 3 MiB, incompressible
LONG_NAME = "usr/share/" + "a-rather-long-file-name-" * 8  # past the 100 bytes of a ustar name

# Which compression each of the four layers of the "rich" image gets, per variant.
VARIANTS = {
    "mixed": ("gzip", "zstd", "tar", "gzip"),
    "gzip": ("gzip",) * 4,
    "zstd": ("zstd",) * 4,
    "tar": ("tar",) * 4,
}
# Directories the last layer creates implicitly (as parents of an entry): their mtime is the extraction time.
IMPLICIT_DIRS = ("usr", "usr/share", "usr/share/implicit")


def rich_layers(compressions: Sequence[str]) -> list[Layer]:
    """busybox, then a layer adding every kind of entry, one deleting and replacing, one re-adding."""
    base, add, delete, readd = compressions
    adds = (
        Layer(add)
        .dirs("dev", "etc", "opt", "usr", "usr/bin", "var")
        .dir("usr/share", mode=0o751, uid=7, gid=8, xattrs={"user.dir": "share"})
        .dir("etc/app", mode=0o750, uid=1000, gid=1000, mtime="1650000000.123456789")
        .file("etc/app/config.json", b'{"a": 1}\n', mode=0o640, uid=1000, gid=1000)
        .file("etc/app/conf", b"a file that becomes a directory\n")
        .dir("etc/app/dir-becomes-file")
        .file("etc/app/dir-becomes-file/inner", b"inner\n")
        .file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755)
        .hardlink("usr/bin/tool-link", "usr/bin/tool")
        .hardlink("usr/bin/tool-link2", "usr/bin/tool")
        .file("usr/bin/suid", b"suid\n", mode=0o4755)
        .file("usr/bin/sgid", b"sgid\n", mode=0o2755, gid=50)
        .file("usr/bin/capable", b"cap\n", mode=0o755, xattrs={"security.capability": CAPABILITY})
        .symlink("usr/bin/abs-link", "/bin/busybox")
        .symlink("usr/bin/rel-link", "../../bin/busybox")
        .symlink("usr/bin/dangling", "/nonexistent/target", uid=3, gid=4)
        .file("usr/share/big.bin", BIG)
        .file("usr/share/empty", b"")
        .file(LONG_NAME, b"long\n")
        .file("usr/share/ünïcödé ☃ name.txt", b"utf-8 name\n")
        .file("usr/share/xattrs", b"x\n", xattrs={"user.comment": "hello", "trusted.note": "t"})
        .file("usr/share/mtime-ns", b"t\n", mtime="1234567890.987654321")
        .file("usr/share/owned", b"o\n", mode=0o600, uid=65534, gid=65534)
        .device("dev/null-ish", "char", 1, 3, mode=0o666)
        .device("dev/loop-ish", "block", 7, 0, mode=0o660, gid=6)
        .device("dev/pipe", "fifo", 0, 0)
        .dir("var/sticky", mode=0o1777)
        .dirs("opt/tree", "opt/tree/sub")
        .file("opt/tree/old", b"old\n")
        .file("opt/tree/sub/deep", b"deep\n")
        .dir("var/gone")
        .file("var/gone/a", b"a\n")
        .file("var/gone/b", b"b\n")
        .file("var/delete-me", b"bye\n")
    )
    deletes = (
        Layer(delete)
        .dirs("bin", "dev", "etc", "opt", "usr", "usr/bin", "var")
        .dir("etc/app", mode=0o750, uid=1000, gid=1000, mtime="1650000000.123456789")
        .whiteout("var/delete-me")
        .whiteout("var/gone")
        .whiteout("dev/pipe")
        .whiteout("usr/bin/tool-link")
        .whiteout("bin/vi")
        .dir("opt/tree", mode=0o700)
        .opaque("opt/tree")
        .file("opt/tree/new", b"new\n")
        .dir("etc/app/conf")
        .file("etc/app/conf/inside", b"now a directory\n")
        .file("etc/app/dir-becomes-file", b"now a file\n")
        .file("etc/app/config.json", b'{"a": 2}\n', mode=0o600)
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        .symlink("bin/ls", "/bin/busybox")
        .file("bin/cat", b'#!/bin/sh\nexec busybox cat "$@"\n', mode=0o755)
        .dir("usr/share", mode=0o711, uid=7, gid=8, xattrs={"user.dir": "share-2"})
    )
    readds = (
        Layer(readd)
        .dir("var")
        .dir("var/gone", mode=0o700)
        .file("var/gone/c", b"c\n")
        .file("var/delete-me", b"back\n")
        .file("usr/share/implicit/added", b"parents implicit\n")
    )
    return [busybox_layer(base), adds, deletes, readds]


# Paths the rich image must (not) have once unpacked: checks that the builder's layers do what they say.
ABSENT = ("var/gone/a", "var/gone/b", "opt/tree/old", "opt/tree/sub", "dev/pipe", "usr/bin/tool-link", "bin/vi",
          "etc/app/conf/.wh..wh..opq", "opt/tree/.wh..wh..opq", "var/.wh.delete-me")  # fmt: skip
PRESENT = {
    "var/gone/c": "file",
    "var/delete-me": "file",
    "opt/tree/new": "file",
    "etc/app/conf": "dir",
    "etc/app/dir-becomes-file": "file",
    "bin/ls": "symlink",
    "bin/cat": "file",
    "bin/sh": "symlink",
    "usr/bin/tool-link2": "file",
    "dev/null-ish": "char",
    "dev/loop-ish": "block",
    "usr/share/implicit/added": "file",
    LONG_NAME: "file",
}


def many_layers(count: int) -> list[Layer]:
    """busybox plus ``count - 1`` small layers, each adding one file (and deleting its predecessor's twin)."""
    layers = [busybox_layer("gzip")]
    for n in range(1, count):
        layer = Layer("gzip").dir("layers").file(f"layers/{n:03}", f"layer {n}\n".encode())
        if n > 1:
            layer.file(f"layers/twin-{n:03}", b"twin\n").whiteout(f"layers/twin-{n - 1:03}")
        layers.append(layer)
    return layers


@pytest.fixture(scope="module")
def images(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The test images pushed to the registry: {variant: reference}, plus ``docker`` and ``many``."""
    layout = Layout(tmp_path_factory.mktemp("layout"))
    refs = {}
    for variant, compressions in VARIANTS.items():
        layout.add_image(variant, rich_layers(compressions))
        refs[variant] = registry.push(layout.directory, variant, "interop/rich")
    refs["docker"] = registry.push(layout.directory, "gzip", "interop/rich-docker", docker=True)
    layout.add_image("many", many_layers(128))
    refs["many"] = registry.push(layout.directory, "many", "interop/many")
    return refs


@pytest.fixture
def both(containerkitd: Any, containerd: Any) -> tuple[Any, Any]:
    """(containerkitd, containerd): ours first."""
    return containerkitd, containerd


def pull(daemon: Any, ref: str, namespace: str) -> None:
    """``ctr images pull --plain-http``, then a synchronous garbage collection: the end of a pull schedules
    one in both daemons, which would otherwise run at some point during the test and take unlabelled
    snapshots (views) with it."""
    ctr(daemon, "images", "pull", "--plain-http", ref, namespace=namespace)
    collect_garbage(daemon, namespace)


def assert_same_trees(ours: dict[str, Node], theirs: dict[str, Node], unstable: Sequence[str] = ()) -> None:
    differences = tree_differences(ours, theirs, unstable_mtimes=unstable)
    assert not differences, "the trees differ (ours = the first):\n" + "\n".join(differences)


# -- the unpacked tree -------------------------------------------------------------------------------------


def test_rich_image_as_containerd_unpacks_it(containerd: Any, images: dict[str, str], tmp_path: Path) -> None:
    """The reference first: containerd alone unpacks the rich image as the builder meant it (whiteouts,
    opaque directories, replacements, kinds, modes, owners, xattrs, devices, nanosecond mtimes)."""
    pull(containerd, images["mixed"], "reference")
    tree = image_tree(containerd, images["mixed"], tmp_path, "reference")
    assert [path for path in ABSENT if path in tree] == []
    assert {path: tree[path].kind for path in PRESENT if path in tree} == PRESENT
    assert tree["usr/share/big.bin"].sha256 == hashlib.sha256(BIG).hexdigest()
    assert tree["usr/bin/tool"].links == ("usr/bin/tool-link2",)
    assert tree["usr/bin/suid"].mode == 0o4755 and tree["var/sticky"].mode == 0o1777
    assert tree["usr/bin/capable"].xattrs == (("security.capability", CAPABILITY),)
    assert tree["usr/share"].mode == 0o711 and (tree["usr/share"].uid, tree["usr/share"].gid) == (7, 8)
    assert tree["usr/share/mtime-ns"].mtime_ns == 1_234_567_890_987_654_321
    assert tree["dev/loop-ish"].rdev == (7, 0) and tree["dev/null-ish"].rdev == (1, 3)
    assert tree["usr/share/implicit"].mode == 0o755
    assert (tree["var/gone"].mode, tree["opt/tree"].mode) == (0o700, 0o700)


@pytest.mark.parametrize("variant", [*VARIANTS, "docker"])
def test_pulled_tree_equals_containerds(both: tuple[Any, Any], images: dict[str, str], variant: str,
                                        tmp_path: Path) -> None:  # fmt: skip
    """``ctr images pull`` then ``ctr images mount``: the same tree from both daemons, file by file (OCI
    layers compressed each way, and the gzip image as a Docker schema 2 image)."""
    namespace = f"tree-{variant}"
    trees = []
    for daemon in both:
        pull(daemon, images[variant], namespace)
        trees.append(image_tree(daemon, images[variant], tmp_path, namespace))
    assert_same_trees(*trees, unstable=IMPLICIT_DIRS)


def test_128_layers_mount(both: tuple[Any, Any], images: dict[str, str], tmp_path: Path) -> None:
    """An image of 128 layers: more lowerdirs than one page of mount options holds."""
    trees = []
    for daemon in both:
        pull(daemon, images["many"], "many")
        trees.append(image_tree(daemon, images["many"], tmp_path, "many"))
    assert_same_trees(*trees)
    assert sorted(p for p in trees[0] if p.startswith("layers/twin")) == ["layers/twin-127"]
    assert len([p for p in trees[0] if p.startswith("layers/")]) == 128


# -- listings ------------------------------------------------------------------------------------------------


def test_images_and_snapshots_ls(both: tuple[Any, Any], images: dict[str, str]) -> None:
    """``ctr images ls`` prints the same table; the committed snapshots are the same chain ids, same parents."""
    outputs = []
    for daemon in both:
        pull(daemon, images["gzip"], "listings")
        pull(daemon, images["zstd"], "listings")
        snapshots = ctr(daemon, "snapshots", "ls", namespace="listings").stdout.splitlines()
        outputs.append((ctr(daemon, "images", "ls", namespace="listings").stdout, snapshots[0], sorted(snapshots[1:])))
    assert outputs[0] == outputs[1]
    assert len(outputs[0][2]) == 4  # the two variants differ only in compression: same diff ids, same snapshots


# -- ctr snapshots -------------------------------------------------------------------------------------------


def chain_id(layers: Sequence[Layer]) -> str:
    chain = ""
    for layer in layers:
        diff_id = sha256(layer.tar())
        chain = diff_id if not chain else "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


@contextmanager
def mounted_line(line: str, target: Path) -> Iterator[Path]:
    """Run a ``mount -t TYPE SOURCE TARGET -o OPTIONS`` line printed by ``ctr snapshots mounts`` with mount(8),
    onto ``target`` (made if missing); unmounted afterwards."""
    argv = shlex.split(line)
    argv[4] = str(target)
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(argv, check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_snapshot_commands(both: tuple[Any, Any], images: dict[str, str], tmp_path: Path) -> None:
    """prepare / mounts / commit / view / info / usage / ls / label / rm, and their errors: the same outputs
    from both. The mounts ``ctr snapshots mounts`` prints are mounted with mount(8) and written through."""
    image_top = chain_id(rich_layers(VARIANTS["gzip"]))
    transcripts = []
    for daemon in both:
        pull(daemon, images["gzip"], "snapcmds")
        transcript: list[tuple[str, int, str, str]] = []

        def run(*args: str, daemon: Any = daemon, transcript: list = transcript) -> str:
            result = ctr(daemon, "snapshots", *args, check=False, namespace="snapcmds")
            out, err = normalised(result.stdout), normalised(result.stderr)
            if args[0] == "label":  # Go prints the label map in random order
                out = ",".join(sorted(out.strip().split(",")))
            transcript.append((" ".join(args), result.returncode, out, err))
            return result.stdout.strip()

        run("prepare", "scratch")  # no parent: a bind mount
        with mounted_line(run("mounts", "/target", "scratch"), tmp_path / "scratch") as upper:
            (upper / "hello").write_text("hello\n")
        run("commit", "scratch-1", "scratch")
        run("prepare", "work", image_top)  # on the image: an overlay
        with mounted_line(run("mounts", "/target", "work"), tmp_path / "work") as work:
            (work / "etc" / "added").write_text("added\n")
            (work / "var" / "delete-me").unlink()
        run("usage", "-b", "work")
        run("commit", "layer-1", "work")
        run("view", "view-1", "layer-1")
        with mounted_line(run("mounts", "/target", "view-1"), tmp_path / "view") as view:
            assert (view / "etc" / "added").read_text() == "added\n" and not (view / "var" / "delete-me").exists()
        run("view", "view-0", "scratch-1")  # a view of one layer: a read-only bind
        run("mounts", "/target", "view-0")
        run("info", "layer-1")
        run("info", "view-1")
        run("usage", "-b", "layer-1")
        run("usage", "-b", "scratch-1")
        run("ls")
        run("label", "layer-1", "test=1")
        run("info", "layer-1")
        for failing in (("rm", "layer-1"), ("rm", "missing"), ("commit", "layer-1", "view-1"),
                        ("prepare", "work-2", "missing"), ("prepare", "layer-1"), ("info", "missing")):  # fmt: skip
            run(*failing)
        run("rm", "view-1", "layer-1", "view-0", "scratch-1")
        run("ls")
        transcripts.append(transcript)
    ours, theirs = transcripts
    mismatches = [
        f"$ ctr snapshots {a[0]}\n  ours:   {a[1:]}\n  theirs: {b[1:]}"
        for a, b in zip(ours, theirs, strict=True)
        if a != b
    ]
    assert not mismatches, "\n".join(mismatches)


def test_images_mount_rw(both: tuple[Any, Any], images: dict[str, str], tmp_path: Path) -> None:
    """``ctr images mount --rw``: writes land in an active snapshot keyed by the target path (a lease of
    that name too), which ``ctr images unmount --rm`` removes with its lease."""
    listings = []
    target = tmp_path / "rw"  # the same for both: it names the snapshot and the lease
    target.mkdir()
    for daemon in both:
        pull(daemon, images["zstd"], "rw")
        ctr(daemon, "images", "mount", "--rw", images["zstd"], str(target), namespace="rw")
        try:
            (target / "etc" / "written").write_text("rw\n")
            assert (target / "etc" / "written").read_text() == "rw\n"
        finally:
            ctr(daemon, "images", "unmount", str(target), namespace="rw")
        active = [line.split() for line in ctr(daemon, "snapshots", "ls", namespace="rw").stdout.splitlines()[1:]]
        leases = ctr(daemon, "leases", "ls", "-q", namespace="rw").stdout.split()
        ctr(daemon, "images", "unmount", "--rm", str(target), namespace="rw")
        after = ctr(daemon, "snapshots", "ls", namespace="rw").stdout.splitlines()[1:]
        listings.append(([row[2] for row in active if row[0] == str(target)], leases, len(after)))
    assert listings[0] == listings[1]
    assert listings[0][:2] == (["Active"], [str(target)])


# -- removal and garbage collection --------------------------------------------------------------------------


def test_images_rm_sync_collects(make_daemon: Any, containerd: Any, images: dict[str, str], tmp_path: Path) -> None:
    """``ctr images rm --sync``: the image's blobs and snapshots are gone when the command returns,
    from the listings and (containerkitd) from disk."""
    ours = make_daemon()
    for daemon in (ours, containerd):
        pull(daemon, images["mixed"], "gc")
        with mounted_image(daemon, images["mixed"], tmp_path, "gc"):
            pass
        assert ctr(daemon, "content", "ls", "-q", namespace="gc").stdout.split()
        assert len(ctr(daemon, "snapshots", "ls", namespace="gc").stdout.splitlines()) == 5
        ctr(daemon, "images", "rm", "--sync", images["mixed"], namespace="gc")
        assert ctr(daemon, "content", "ls", "-q", namespace="gc").stdout.split() == []
        assert ctr(daemon, "snapshots", "ls", namespace="gc").stdout.splitlines()[1:] == []
        assert ctr(daemon, "images", "ls", "-q", namespace="gc").stdout.split() == []
    blobs = [p for p in (ours.root / "content.local" / "blobs" / "sha256").iterdir()]
    assert blobs == []
    snapshot_dirs = [p for p in ours.root.rglob("snapshots/*") if p.is_dir() and p.name.isdigit()]
    assert snapshot_dirs == []


def test_info_json_shape(both: tuple[Any, Any], images: dict[str, str]) -> None:
    """``ctr snapshots info`` of an unpacked layer: same JSON keys and values but times."""
    infos = []
    for daemon in both:
        pull(daemon, images["tar"], "info")
        info = json.loads(
            ctr(daemon, "snapshots", "info", chain_id(rich_layers(VARIANTS["tar"])), namespace="info").stdout
        )
        infos.append({key: value for key, value in info.items() if key not in ("Created", "Updated")})
    assert infos[0] == infos[1]


def test_unpacked_image_survives_restart(make_daemon: Any, images: dict[str, str], tmp_path: Path) -> None:
    """After a restart the image mounts from the snapshots already there: same tree, nothing unpacked again."""
    ours = make_daemon()
    pull(ours, images["mixed"], "restart")
    before = image_tree(ours, images["mixed"], tmp_path, "restart")
    snapshots = ctr(ours, "snapshots", "ls", namespace="restart").stdout
    ours.restart()
    assert ctr(ours, "snapshots", "ls", namespace="restart").stdout == snapshots
    assert_same_trees(image_tree(ours, images["mixed"], tmp_path, "restart"), before)


# -- a full disk ---------------------------------------------------------------------------------------------


def test_a_full_snapshot_disk_fails_the_pull_clearly_and_a_retry_with_space_succeeds(
    make_daemon: Any, images: dict[str, str], tmp_path: Path
) -> None:
    """The overlay snapshotter on a 3 MiB tmpfs: busybox fits, the rich image's 3 MiB file does not. The
    pull fails with "No space left on device", leaves no active snapshot, and the daemon serves on; with
    the tmpfs grown, the same pull completes and the tree is whole."""
    from core.mount import mount_all, unmount_all
    from core.types import Mount

    small = tmp_path / "small"
    small.mkdir()
    mount_all([Mount("tmpfs", "tmpfs", ("size=3m", "mode=0700"))], small)
    daemon = None
    try:
        # GC held off: ctr drops its pull lease on failure, and a collection right after it could take the
        # committed busybox snapshot before the listing below looks (the race once lost under CI load).
        quiet_gc = "[plugins.gc.scheduler]\ndelay_after_delete_seconds = 3600.0\nstartup_delay_seconds = 3600.0\n"
        daemon = make_daemon(f'[plugins.snapshotter.overlayfs]\nroot_path = "{small}/overlay"\n{quiet_gc}')
        failed = ctr(daemon, "images", "pull", "--plain-http", images["gzip"], check=False, namespace="full")
        assert failed.returncode != 0 and "No space left on device" in failed.stderr, failed.stderr
        assert "Traceback" not in daemon.log
        kinds = [line.split()[-1] for line in ctr(daemon, "snapshots", "ls", namespace="full").stdout.splitlines()[1:]]
        assert kinds and set(kinds) == {"Committed"}  # busybox made it; nothing half-applied is left
        mount_all([Mount("tmpfs", "tmpfs", ("remount", "size=64m"))], small)
        pull(daemon, images["gzip"], "full")
        tree = image_tree(daemon, images["gzip"], tmp_path, "full")
        assert tree["usr/share/big.bin"].sha256 == hashlib.sha256(BIG).hexdigest()
    finally:
        if daemon is not None:
            daemon.stop()
        unmount_all(small, detach=True)
