"""The leases service (containerd.services.leases.v1.Leases) against a real containerkitd."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from core.api.containerd.services.leases.v1 import leases_pb2 as pb
from core.api.containerd.services.leases.v1 import leases_pb2_grpc as pb_grpc
from core.digest import Digest

pytestmark = pytest.mark.integration

DEFAULT = [("containerd-namespace", "default")]


@pytest.fixture
def leases(daemon: Any) -> Iterator[pb_grpc.LeasesStub]:
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        yield pb_grpc.LeasesStub(channel)


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_create_list_resources_delete(leases: pb_grpc.LeasesStub) -> None:
    lease = leases.Create(pb.CreateRequest(id="build-1", labels={"owner": "me"}), metadata=DEFAULT).lease
    assert (lease.id, dict(lease.labels)) == ("build-1", {"owner": "me"})
    assert lease.created_at.seconds > 0
    assert code_of(lambda: leases.Create(pb.CreateRequest(id="build-1"), metadata=DEFAULT)) == (
        grpc.StatusCode.ALREADY_EXISTS
    )
    generated = leases.Create(pb.CreateRequest(), metadata=DEFAULT).lease
    assert generated.id and generated.id != "build-1"

    def ids(*filters: str) -> list[str]:
        return sorted(x.id for x in leases.List(pb.ListRequest(filters=list(filters)), metadata=DEFAULT).leases)

    assert ids() == sorted(["build-1", generated.id])
    assert ids("labels.owner==me") == ["build-1"]
    assert ids("id==nope") == []

    digest = Digest.from_bytes(b"leased")
    blob = pb.Resource(id=digest, type="content")
    ingest = pb.Resource(id="some-ref", type="ingests")
    for resource in (blob, ingest):
        leases.AddResource(pb.AddResourceRequest(id="build-1", resource=resource), metadata=DEFAULT)

    def resources() -> list[tuple[str, str]]:
        listed = leases.ListResources(pb.ListResourcesRequest(id="build-1"), metadata=DEFAULT).resources
        return sorted((r.type, r.id) for r in listed)

    assert resources() == [("content", digest), ("ingests", "some-ref")]
    leases.DeleteResource(pb.DeleteResourceRequest(id="build-1", resource=ingest), metadata=DEFAULT)
    assert resources() == [("content", digest)]
    unknown = pb.AddResourceRequest(id="no-such-lease", resource=blob)
    assert code_of(lambda: leases.AddResource(unknown, metadata=DEFAULT)) == grpc.StatusCode.NOT_FOUND

    leases.Delete(pb.DeleteRequest(id="build-1"), metadata=DEFAULT)
    leases.Delete(pb.DeleteRequest(id=generated.id, sync=True), metadata=DEFAULT)
    assert ids() == []
    assert code_of(lambda: leases.Delete(pb.DeleteRequest(id="build-1"), metadata=DEFAULT)) == (
        grpc.StatusCode.NOT_FOUND
    )


def test_a_path_like_lease_id_is_taken_as_it_is(leases: pb_grpc.LeasesStub) -> None:
    """``ctr images mount`` names its lease after the mount target, which containerd accepts."""
    created = leases.Create(pb.CreateRequest(id="/tmp/mnt target"), metadata=DEFAULT)
    assert created.lease.id == "/tmp/mnt target"


def test_leases_are_per_namespace(leases: pb_grpc.LeasesStub) -> None:
    leases.Create(pb.CreateRequest(id="mine"), metadata=[("containerd-namespace", "team-a")])
    other = [("containerd-namespace", "team-b")]
    assert leases.List(pb.ListRequest(), metadata=other).leases == []
    assert code_of(lambda: leases.Delete(pb.DeleteRequest(id="mine"), metadata=other)) == grpc.StatusCode.NOT_FOUND
