"""The diff service (containerd.services.diff.v1.Diff) against a real containerkitd: Apply onto mounts,
Diff into the content store, and errors that leave the daemon serving."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_archive import chunked, directory, member, symlink, tar_of
from test_services_content import code_of, read_all, write_blob

from core.api.containerd.services.content.v1 import content_pb2
from core.api.containerd.services.content.v1 import content_pb2_grpc as content_grpc
from core.api.containerd.services.diff.v1 import diff_pb2 as pb
from core.api.containerd.services.diff.v1 import diff_pb2_grpc as pb_grpc
from core.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from core.api.containerd.types import descriptor_pb2, mount_pb2
from core.diff.compression import Compression, decompress
from core.digest import Digest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="applying layers needs root"),
]

DEFAULT = [("containerd-namespace", "default")]
GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER = tar_of(
    directory("etc", mode=0o750),
    member("etc/hostname", b"containerkit\n", uid=7),
    symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
    member("bin/tool", os.urandom(300_000), mode=0o755),
)


@pytest.fixture
def stubs(daemon: Any) -> Iterator[tuple[pb_grpc.DiffStub, content_grpc.ContentStub, Any]]:
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        yield pb_grpc.DiffStub(channel), content_grpc.ContentStub(channel), leases_pb2_grpc.LeasesStub(channel)


def bind(path: Path, *options: str) -> mount_pb2.Mount:
    return mount_pb2.Mount(type="bind", source=str(path), options=["rbind", *options])


def descriptor(data: bytes, media_type: str) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(media_type=media_type, digest=Digest.from_bytes(data), size=len(data))


def test_apply_onto_a_bind_mount(stubs: Any, tmp_path: Path) -> None:
    diff, content, _ = stubs
    blob = gzip.compress(LAYER)
    write_blob(content, "layer", blob, chunk=1 << 20)
    request = pb.ApplyRequest(diff=descriptor(blob, GZIP), mounts=[bind(tmp_path, "rw")])
    applied = diff.Apply(request, metadata=DEFAULT).applied
    assert (applied.media_type, applied.digest, applied.size) == (TAR, Digest.from_bytes(LAYER), len(LAYER))
    assert (tmp_path / "etc/hostname").read_bytes() == b"containerkit\n"
    assert (tmp_path / "etc/hostname").stat().st_uid == 7
    assert os.readlink(tmp_path / "etc/localtime") == "/usr/share/zoneinfo/UTC"


def test_apply_errors_leave_the_daemon_serving(stubs: Any, tmp_path: Path) -> None:
    diff, content, _ = stubs
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    hostile = tar_of(member("../../outside/pwned", b"pwned"))  # aims at tmp_path/outside
    write_blob(content, "hostile", hostile, chunk=1 << 20)
    truncated = gzip.compress(LAYER)[:-100]
    write_blob(content, "truncated", truncated, chunk=1 << 20)

    def apply(data: bytes, media_type: str, mounts: list[Any], metadata: Any = DEFAULT) -> Any:
        request = pb.ApplyRequest(diff=descriptor(data, media_type), mounts=mounts)
        return lambda: diff.Apply(request, metadata=metadata)

    assert apply(hostile, TAR, [bind(root)])().applied.digest == Digest.from_bytes(hostile)
    assert (root / "outside/pwned").read_bytes() == b"pwned", "contained: .. stops at the root, as containerd"
    assert code_of(apply(truncated, GZIP, [bind(root)])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(apply(hostile, "application/json", [bind(root)])) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(apply(b"not stored", TAR, [bind(root)])) == grpc.StatusCode.NOT_FOUND
    other = [("containerd-namespace", "other")]
    assert code_of(apply(hostile, TAR, [bind(root)], other)) == grpc.StatusCode.NOT_FOUND
    assert code_of(apply(hostile, TAR, [bind(root)], [])) == grpc.StatusCode.FAILED_PRECONDITION
    assert code_of(apply(hostile, TAR, [bind(root, "ro")])) == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:
        apply(truncated, GZIP, [bind(root)])()
    assert "truncated gzip stream" in (info.value.details() or "")
    assert os.listdir(outside) == []
    write_blob(content, "layer", LAYER, chunk=1 << 20)
    assert apply(LAYER, TAR, [bind(root)])().applied.digest == Digest.from_bytes(LAYER)


def test_diff_writes_a_labelled_layer_held_by_the_lease(stubs: Any, tmp_path: Path) -> None:
    diff, content, leases = stubs
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    write_blob(content, "layer", LAYER, chunk=1 << 20)
    diff.Apply(pb.ApplyRequest(diff=descriptor(LAYER, TAR), mounts=[bind(upper)]), metadata=DEFAULT)
    leases.Create(leases_pb2.CreateRequest(id="diff-lease"), metadata=DEFAULT)
    metadata = [*DEFAULT, ("containerd-lease", "diff-lease")]
    request = pb.DiffRequest(left=[bind(lower, "ro")], right=[bind(upper, "ro")], labels={"k": "v"})
    written = diff.Diff(request, metadata=metadata).diff
    assert written.media_type == GZIP
    blob = read_all(content, written.digest)
    assert Digest.from_bytes(blob) == written.digest and written.size == len(blob)
    tar = b"".join(decompress(chunked(blob), Compression.DETECT))
    info = content.Info(content_pb2.InfoRequest(digest=written.digest), metadata=DEFAULT).info
    assert dict(info.labels) == {"k": "v", "containerd.io/uncompressed": Digest.from_bytes(tar)}
    held = leases.ListResources(leases_pb2.ListResourcesRequest(id="diff-lease"), metadata=DEFAULT).resources
    assert [(r.id, r.type) for r in held] == [(written.digest, "content")]
    unsupported = pb.DiffRequest(left=[bind(lower)], right=[bind(upper)], media_type="application/x-rar")
    assert code_of(lambda: diff.Diff(unsupported, metadata=DEFAULT)) == grpc.StatusCode.UNIMPLEMENTED
