"""The content service (containerd.services.content.v1.Content) against a real containerkitd."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from core.api.containerd.services.content.v1 import content_pb2 as pb
from core.api.containerd.services.content.v1 import content_pb2_grpc as pb_grpc
from core.digest import Digest

pytestmark = pytest.mark.integration

DEFAULT = [("containerd-namespace", "default")]
ROOT_LABEL = {"containerd.io/gc.root": "test"}  # keeps a blob through any garbage collection


def ns(name: str) -> list[tuple[str, str]]:
    return [("containerd-namespace", name)]


@pytest.fixture
def content(daemon: Any) -> Iterator[pb_grpc.ContentStub]:
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        yield pb_grpc.ContentStub(channel)


class Session:
    """One Write stream driven message by message: ``send`` a request, get its response."""

    def __init__(self, stub: pb_grpc.ContentStub, metadata: list[tuple[str, str]] = DEFAULT) -> None:
        self._requests: queue.Queue[pb.WriteContentRequest | None] = queue.Queue()
        self.call = stub.Write(iter(self._requests.get, None), metadata=metadata)

    def send(self, **fields: Any) -> pb.WriteContentResponse:
        self._requests.put(pb.WriteContentRequest(**fields))
        return next(self.call)

    def close(self) -> None:
        self._requests.put(None)


def write_blob(stub: pb_grpc.ContentStub, ref: str, data: bytes, metadata=DEFAULT, chunk: int = 3, labels=None) -> str:
    session = Session(stub, metadata)
    expected = Digest.from_bytes(data)
    status = session.send(action=pb.STAT, ref=ref, total=len(data), expected=expected)
    assert status.offset == 0
    offset = 0
    while offset < len(data):
        response = session.send(action=pb.WRITE, offset=offset, data=data[offset : offset + chunk])
        offset += len(data[offset : offset + chunk])
        assert response.offset == offset
    committed = session.send(action=pb.COMMIT, offset=offset, total=len(data), expected=expected, labels=labels)
    assert committed.digest == expected
    session.close()
    return expected


def read_all(stub: pb_grpc.ContentStub, digest: str, offset: int = 0, size: int = 0, metadata=DEFAULT) -> bytes:
    request = pb.ReadContentRequest(digest=digest, offset=offset, size=size)
    return b"".join(r.data for r in stub.Read(request, metadata=metadata))


def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_write_in_chunks_commit_info_read_list_delete(content: pb_grpc.ContentStub) -> None:
    data = b"hello, content store\n" * 5
    digest = write_blob(content, "ref-1", data, labels={"k": "v"})

    info = content.Info(pb.InfoRequest(digest=digest), metadata=DEFAULT).info
    assert (info.digest, info.size, dict(info.labels)) == (digest, len(data), {"k": "v"})
    assert info.created_at.seconds > 0

    assert read_all(content, digest) == data
    assert read_all(content, digest, offset=7) == data[7:]
    assert read_all(content, digest, offset=7, size=5) == data[7:12]
    assert read_all(content, digest, offset=len(data)) == b""
    assert code_of(lambda: read_all(content, digest, offset=len(data) + 1)) == grpc.StatusCode.OUT_OF_RANGE

    listed = [i for r in content.List(pb.ListContentRequest(), metadata=DEFAULT) for i in r.info]
    assert [(i.digest, i.size) for i in listed] == [(digest, len(data))]
    assert content.ListStatuses(pb.ListStatusesRequest(), metadata=DEFAULT).statuses == []

    content.Delete(pb.DeleteContentRequest(digest=digest), metadata=DEFAULT)
    assert code_of(lambda: content.Info(pb.InfoRequest(digest=digest), metadata=DEFAULT)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: read_all(content, digest)) == grpc.StatusCode.NOT_FOUND
    again = pb.DeleteContentRequest(digest=digest)
    assert code_of(lambda: content.Delete(again, metadata=DEFAULT)) == grpc.StatusCode.NOT_FOUND


def test_list_sends_batches_of_100_infos_equal_to_what_info_answers(content: pb_grpc.ContentStub) -> None:
    listing = ns("listing")
    digests = sorted(
        write_blob(content, f"list-{i}", b"blob %d" % i, listing, chunk=64, labels={**ROOT_LABEL, "n": str(i)})
        for i in range(205)
    )
    responses = list(content.List(pb.ListContentRequest(), metadata=listing))
    assert [len(r.info) for r in responses] == [100, 100, 5]
    listed = [info for response in responses for info in response.info]
    assert [info.digest for info in listed] == digests
    for info in listed[:3] + listed[-3:]:
        assert info == content.Info(pb.InfoRequest(digest=info.digest), metadata=listing).info
        assert info.labels["n"] and info.created_at.seconds > 0
    filtered = [
        i for r in content.List(pb.ListContentRequest(filters=["labels.n==7"]), metadata=listing) for i in r.info
    ]
    assert [info.labels["n"] for info in filtered] == ["7"]


def test_large_blob_is_read_in_one_mib_chunks(content: pb_grpc.ContentStub) -> None:
    data = bytes(range(256)) * (10 * 1024 + 3)  # ~2.5 MiB
    session = Session(content)
    session.send(action=pb.STAT, ref="big")
    for start in range(0, len(data), 1 << 20):
        session.send(action=pb.WRITE, offset=start, data=data[start : start + (1 << 20)])
    digest = session.send(action=pb.COMMIT, offset=len(data), labels=ROOT_LABEL).digest
    session.close()
    assert digest == Digest.from_bytes(data)
    chunks = list(content.Read(pb.ReadContentRequest(digest=digest), metadata=DEFAULT))
    assert [c.offset for c in chunks] == [0, 1 << 20, 2 << 20]
    assert b"".join(c.data for c in chunks) == data


def test_update_labels_with_field_mask(content: pb_grpc.ContentStub) -> None:
    from google.protobuf import field_mask_pb2

    digest = write_blob(content, "labels", b"labelled", labels={"a": "1", "b": "2", **ROOT_LABEL})

    def update(labels: dict[str, str], *paths: str) -> dict[str, str]:
        mask = field_mask_pb2.FieldMask(paths=list(paths)) if paths else None
        request = pb.UpdateRequest(info=pb.Info(digest=digest, labels=labels), update_mask=mask)
        return dict(content.Update(request, metadata=DEFAULT).info.labels)

    assert update({"a": "10", "b": "ignored"}, "labels.a") == {"a": "10", "b": "2", **ROOT_LABEL}
    assert update({}, "labels.b") == {"a": "10", **ROOT_LABEL}
    assert update({"c": "3", **ROOT_LABEL}, "labels") == {"c": "3", **ROOT_LABEL}
    info = content.Info(pb.InfoRequest(digest=digest), metadata=DEFAULT).info
    assert dict(info.labels) == {"c": "3", **ROOT_LABEL}
    bad = pb.UpdateRequest(info=pb.Info(digest="sha256:nothex"))
    assert code_of(lambda: content.Update(bad, metadata=DEFAULT)) == grpc.StatusCode.INVALID_ARGUMENT


def _wait_for_offset(stub: pb_grpc.ContentStub, ref: str, offset: int) -> pb.Status:
    deadline = time.monotonic() + 10
    while True:
        status = stub.Status(pb.StatusRequest(ref=ref), metadata=DEFAULT).status
        if status.offset == offset or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def _resume(stub: pb_grpc.ContentStub, ref: str) -> tuple[Session, pb.WriteContentResponse]:
    """A new stream on ``ref``, retried while the server has not yet released the broken one."""
    deadline = time.monotonic() + 10
    while True:
        session = Session(stub)
        try:
            return session, session.send(action=pb.STAT, ref=ref)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_client_disconnecting_mid_write_leaves_a_resumable_ingest(content: pb_grpc.ContentStub) -> None:
    data = b"0123456789" * 1000
    expected = Digest.from_bytes(data)
    session = Session(content)
    session.send(action=pb.STAT, ref="resumable", total=len(data), expected=expected)
    assert session.send(action=pb.WRITE, offset=0, data=data[:4000]).offset == 4000
    session.call.cancel()  # the client goes away without committing or closing

    status = _wait_for_offset(content, "resumable", 4000)
    assert (status.ref, status.offset, status.total) == ("resumable", 4000, len(data))

    resumed, stat = _resume(content, "resumable")
    assert (stat.offset, stat.total) == (4000, len(data))
    assert stat.digest == Digest.from_bytes(data[:4000])
    assert resumed.send(action=pb.WRITE, offset=4000, data=data[4000:]).offset == len(data)
    committed = resumed.send(action=pb.COMMIT, offset=len(data), total=len(data), expected=expected)
    resumed.close()
    assert (committed.action, committed.offset, committed.digest) == (pb.COMMIT, len(data), expected)
    assert read_all(content, expected) == data
    assert content.ListStatuses(pb.ListStatusesRequest(), metadata=DEFAULT).statuses == []


def test_write_at_offset_zero_restarts_and_elsewhere_is_out_of_range(content: pb_grpc.ContentStub) -> None:
    session = Session(content)
    session.send(action=pb.STAT, ref="restart")
    assert session.send(action=pb.WRITE, data=b"garbage").offset == 7
    restarted = session.send(action=pb.WRITE, offset=0, data=b"good")
    assert (restarted.offset, restarted.digest) == (4, Digest.from_bytes(b"good"))
    with pytest.raises(grpc.RpcError) as info:
        session.send(action=pb.WRITE, offset=2, data=b"x")
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert _wait_for_offset(content, "restart", 4).offset == 4  # the ingest survives the failed stream


def test_wrong_expected_digest_on_commit_is_failed_precondition_and_ingest_stays(
    content: pb_grpc.ContentStub,
) -> None:
    data = b"some bytes"
    session = Session(content)
    session.send(action=pb.STAT, ref="wrong")
    session.send(action=pb.WRITE, offset=0, data=data)
    with pytest.raises(grpc.RpcError) as info:
        session.send(action=pb.COMMIT, offset=len(data), expected=Digest.from_bytes(b"other bytes"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    statuses = content.ListStatuses(pb.ListStatusesRequest(), metadata=DEFAULT).statuses
    assert [(s.ref, s.offset) for s in statuses] == [("wrong", len(data))]
    filtered = content.ListStatuses(pb.ListStatusesRequest(filters=["ref==nope"]), metadata=DEFAULT)
    assert filtered.statuses == []

    content.Abort(pb.AbortRequest(ref="wrong"), metadata=DEFAULT)
    assert content.ListStatuses(pb.ListStatusesRequest(), metadata=DEFAULT).statuses == []
    missing = pb.StatusRequest(ref="wrong")
    assert code_of(lambda: content.Status(missing, metadata=DEFAULT)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: content.Abort(pb.AbortRequest(ref="wrong"), metadata=DEFAULT)) == grpc.StatusCode.NOT_FOUND


def test_second_writer_on_the_same_ref_is_unavailable(content: pb_grpc.ContentStub) -> None:
    first = Session(content)
    first.send(action=pb.STAT, ref="busy")
    first.send(action=pb.WRITE, offset=0, data=b"abc")
    second = Session(content)
    with pytest.raises(grpc.RpcError) as info:
        second.send(action=pb.STAT, ref="busy")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert first.send(action=pb.COMMIT, offset=3).digest == Digest.from_bytes(b"abc")
    first.close()


def test_writing_content_the_namespace_has_is_already_exists(content: pb_grpc.ContentStub) -> None:
    data = b"present"
    digest = write_blob(content, "first", data, labels=ROOT_LABEL)
    session = Session(content)
    with pytest.raises(grpc.RpcError) as info:
        session.send(action=pb.STAT, ref="second", expected=digest, total=len(data))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert content.ListStatuses(pb.ListStatusesRequest(), metadata=DEFAULT).statuses == []


def test_first_message_without_ref_is_invalid(content: pb_grpc.ContentStub) -> None:
    session = Session(content)
    with pytest.raises(grpc.RpcError) as info:
        session.send(action=pb.STAT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_namespaces_see_only_their_own_content_and_ingests(content: pb_grpc.ContentStub) -> None:
    data = b"shared bytes"
    digest = write_blob(content, "in-a", data, metadata=ns("team-a"), labels=ROOT_LABEL)

    info_b = pb.InfoRequest(digest=digest)
    assert code_of(lambda: content.Info(info_b, metadata=ns("team-b"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: read_all(content, digest, metadata=ns("team-b"))) == grpc.StatusCode.NOT_FOUND
    assert [r for r in content.List(pb.ListContentRequest(), metadata=ns("team-b"))] == []

    session = Session(content, ns("team-a"))
    session.send(action=pb.STAT, ref="pending")
    session.send(action=pb.WRITE, data=b"half")
    session.close()
    statuses_a = content.ListStatuses(pb.ListStatusesRequest(), metadata=ns("team-a")).statuses
    assert [s.ref for s in statuses_a] == ["pending"]
    assert content.ListStatuses(pb.ListStatusesRequest(), metadata=ns("team-b")).statuses == []
    missing = pb.StatusRequest(ref="pending")
    assert code_of(lambda: content.Status(missing, metadata=ns("team-b"))) == grpc.StatusCode.NOT_FOUND

    # team-b writing bytes the store already has (shared policy, as containerd): the ingest starts
    # complete and the commit just records the blob for team-b; deleting it leaves team-a's.
    session = Session(content, ns("team-b"))
    stat = session.send(action=pb.STAT, ref="in-b", total=len(data), expected=digest)
    assert stat.offset == len(data)
    committed = session.send(action=pb.COMMIT, offset=len(data), total=len(data), expected=digest, labels=ROOT_LABEL)
    assert committed.digest == digest
    session.close()
    assert read_all(content, digest, metadata=ns("team-b")) == data
    content.Delete(pb.DeleteContentRequest(digest=digest), metadata=ns("team-b"))
    assert read_all(content, digest, metadata=ns("team-a")) == data


def test_requests_without_namespace_are_failed_precondition(content: pb_grpc.ContentStub) -> None:
    assert code_of(lambda: list(content.List(pb.ListContentRequest()))) == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("local", [True, False])
def test_read_is_answered_inline_only_over_a_backend_that_reads_locally(local: bool) -> None:
    """Info (metadata) always runs on the server's I/O thread; Read only when the backend's reads never wait on
    anything but a local disk (a remote backend's would stall every other call)."""
    from unittest import mock

    from core.config import GrpcConfig
    from core.content import ContentStore
    from core.server import new_server
    from core.services.content import ContentService

    backend = mock.Mock(spec=ContentStore, reads_locally=local)
    server = new_server(GrpcConfig())
    ContentService(mock.Mock(), backend, mock.Mock(), mock.Mock()).register(server)
    inline = {path for path in server._inline if path.startswith("/containerd.services.content.v1.Content/")}
    paths = {"/containerd.services.content.v1.Content/Info", "/containerd.services.content.v1.Content/Read"}
    assert inline == (paths if local else paths - {"/containerd.services.content.v1.Content/Read"})
