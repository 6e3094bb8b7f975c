"""ckctl images unpack|mount|unmount against a real containerkitd.

Images are built in Python (tests/oci_images.py) and stored in the daemon as a pull leaves them
(blobs, gc labels, image record), so the unpacking is all containerkitd's. Every mount a test makes
is unmounted before its daemon stops.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from oci_images import Layer, Layout
from test_ckctl import one_line_error
from test_ckctl_content import create_image

from core import mount as mounting
from core.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from core.cli.images import mount_lease_id

pytestmark = pytest.mark.integration

IMAGE = "example.com/test/unpack:latest"


def image_layers() -> list[Layer]:
    base = Layer().dirs("etc", "etc/app", "data").file("etc/app/a.conf", b"a\n").file("etc/hostname", b"base\n")
    base.file("data/old", b"old\n")
    change = Layer(compression="zstd").dirs("etc", "data")
    change.whiteout("etc/hostname").opaque("data").file("data/new", b"new\n", mode=0o600, uid=7, gid=8)
    return [base, change, Layer(compression="tar").dirs("etc").file("etc/motd", b"hello\n")]


def import_image(daemon: Any, directory: Path, name: str, **options: Any) -> None:
    """Build an image of :func:`image_layers` (options as Layout.add_image) and store it as ``name`` the way
    a pull does: blobs written under a lease, the manifest labelled with its children, then the record."""
    layout = Layout(directory)
    manifest = layout.add_image(name.rpartition(":")[2], image_layers(), **options)

    def blob(digest: str) -> bytes:
        return (layout.blobs / digest.partition(":")[2]).read_bytes()

    doc = json.loads(blob(manifest["digest"]))
    labels = {"containerd.io/gc.ref.content.config": doc["config"]["digest"]}
    labels |= {f"containerd.io/gc.ref.content.l.{n}": layer["digest"] for n, layer in enumerate(doc["layers"])}
    lease = daemon.ckctl("leases", "create").stdout.split()[0]
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        metadata = [("containerd-namespace", "default"), ("containerd-lease", lease)]
        for child, child_labels in [*((c, {}) for c in (doc["config"], *doc["layers"])), (manifest, labels)]:
            data = blob(child["digest"])
            commit = content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT, ref=f"import-{child['digest']}", total=len(data),
                expected=child["digest"], data=data, labels=child_labels,
            )  # fmt: skip
            try:
                list(stub.Write(iter([commit]), metadata=metadata))
            except grpc.RpcError as err:  # a layer another image stored already
                assert err.code() is grpc.StatusCode.ALREADY_EXISTS, err
    create_image(daemon, name, manifest["digest"], manifest["size"])
    daemon.ckctl("leases", "rm", lease)


@pytest.fixture
def imported(make_daemon: Any, tmp_path: Path) -> Iterator[Any]:
    """A running daemon holding IMAGE (not unpacked); mounts under tmp_path are undone before it stops."""
    daemon = make_daemon()
    import_image(daemon, tmp_path / "layout", IMAGE)
    try:
        yield daemon
    finally:
        for path in tmp_path.iterdir():
            if path.is_dir() and mounting.is_mountpoint(path):
                mounting.unmount_all(path, detach=True)


def target_dir(tmp_path: Path, name: str = "rootfs") -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def test_unpack_prints_the_chain_id_and_reuses_layers(imported: Any) -> None:
    first = imported.ckctl("images", "unpack", IMAGE).stdout
    assert first.startswith(f"{IMAGE}: sha256:") and first.endswith("(3 layers, 3 applied now)\n")
    again = imported.ckctl("images", "unpack", "--snapshotter", "overlayfs", IMAGE).stdout
    assert again == first.replace("3 applied", "0 applied")
    chain_id = first.split()[1]
    info = imported.ctr("snapshots", "--snapshotter", "overlayfs", "info", chain_id).stdout
    assert chain_id in info


def collect_garbage(daemon: Any) -> None:
    """A synchronous collection: a throwaway lease deleted with ``--sync``."""
    lease = daemon.ckctl("leases", "create").stdout.split()[0]
    daemon.ckctl("leases", "rm", "--sync", lease)


def snapshot_names(daemon: Any) -> set[str]:
    return {line.split()[0] for line in daemon.ctr("snapshots", "ls").stdout.splitlines()[1:]}


def test_unpacked_snapshots_live_as_long_as_the_image(imported: Any) -> None:
    chain_id = imported.ckctl("images", "unpack", IMAGE).stdout.split()[1]
    collect_garbage(imported)
    assert chain_id in snapshot_names(imported) and len(snapshot_names(imported)) == 3
    imported.ctr("images", "rm", "--sync", IMAGE)
    assert snapshot_names(imported) == set()


def test_mount_read_only_then_unmount_and_remove(imported: Any, tmp_path: Path) -> None:
    target = target_dir(tmp_path)
    out = imported.ckctl("images", "mount", IMAGE, str(target)).stdout.splitlines()
    assert out[0].startswith("sha256:") and out[1] == str(target)
    assert mounting.is_mountpoint(target)
    assert (target / "etc/app/a.conf").read_bytes() == b"a\n"
    assert (target / "etc/motd").read_bytes() == b"hello\n"
    assert not (target / "etc/hostname").exists() and not (target / "data/old").exists()
    new = (target / "data/new").stat()
    assert (new.st_mode & 0o777, new.st_uid, new.st_gid) == (0o600, 7, 8)
    with pytest.raises(OSError) as err:
        (target / "etc/written").write_bytes(b"x")
    assert err.value.errno == errno.EROFS

    lease = mount_lease_id(str(target))
    leases = imported.ckctl_json("leases", "ls")
    assert [entry["labels"]["containerkit.io/mount.target"] for entry in leases if entry["id"] == lease] == [
        str(target)
    ]
    assert imported.ctr("snapshots", "info", str(target)).returncode == 0

    assert imported.ckctl("images", "unmount", "--rm", str(target)).stdout == f"{target}\n"
    assert not mounting.is_mountpoint(target) and os.listdir(target) == []
    assert [entry for entry in imported.ckctl_json("leases", "ls") if entry["id"] == lease] == []
    assert imported.ctr("snapshots", "info", str(target), check=False).returncode != 0


def test_read_write_mount_keeps_changes_until_removed(
    imported: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = target_dir(tmp_path)
    monkeypatch.chdir(tmp_path)  # a relative TARGET names the same snapshot as the absolute path
    imported.ckctl("images", "mount", "--rw", IMAGE, "rootfs")
    (target / "etc/written").write_bytes(b"kept\n")
    imported.ckctl("images", "unmount", str(target))
    assert not mounting.is_mountpoint(target)
    imported.ckctl("images", "mount", "--rw", IMAGE, str(target))  # the snapshot is still there: mounted again
    assert (target / "etc/written").read_bytes() == b"kept\n"
    imported.ckctl("images", "unmount", "--rm", "rootfs")
    imported.ckctl("images", "mount", "--rw", IMAGE, str(target))
    assert not (target / "etc/written").exists()
    imported.ckctl("images", "unmount", "--rm", str(target))


def test_unmount_of_something_never_mounted_is_fine(imported: Any, tmp_path: Path) -> None:
    target = target_dir(tmp_path)
    assert imported.ckctl("images", "unmount", "--rm", str(target)).stdout == f"{target}\n"


def test_a_lying_config_is_refused_and_the_daemon_serves_on(imported: Any, tmp_path: Path) -> None:
    liar = "example.com/test/liar:latest"
    import_image(imported, tmp_path / "liar", liar, diff_ids=["sha256:" + "0" * 64] * 3)
    error = one_line_error(imported.ckctl("images", "unpack", liar, check=False))
    assert "layer 1/3" in error and "diff id mismatch" in error and "(failed precondition)" in error
    assert snapshot_names(imported) == set()
    assert "(3 layers, 3 applied now)" in imported.ckctl("images", "unpack", IMAGE).stdout


def test_mount_errors_are_one_line_and_leave_nothing_behind(imported: Any, tmp_path: Path) -> None:
    target = target_dir(tmp_path)
    missing = one_line_error(imported.ckctl("images", "mount", "example.com/nope:1", str(target), check=False))
    assert "nope" in missing and "not found" in missing
    assert imported.ckctl_json("leases", "ls") == []
    assert not mounting.is_mountpoint(target)
    nowhere = one_line_error(imported.ckctl("images", "mount", IMAGE, str(tmp_path / "absent"), check=False))
    assert "is not a directory" in nowhere
    bad_platform = one_line_error(imported.ckctl("images", "unpack", "--platform", "linux", IMAGE, check=False))
    assert "invalid platform" in bad_platform
    unknown = one_line_error(imported.ckctl("images", "unpack", "--snapshotter", "nope", IMAGE, check=False))
    assert "snapshotter not loaded: nope" in unknown
    unnamed = one_line_error(imported.ckctl("images", "unpack", "", check=False))
    assert "image name must not be empty (invalid argument)" in unnamed
