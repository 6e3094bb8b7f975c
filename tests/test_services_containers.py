"""The containers service in-process over a real gRPC server and store: containerd's v1 calls, the events
it publishes, the spec hook on Create and Update, and its GC kind."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, field_mask_pb2
from test_services_events import DEFAULT, Recorder

from core.api.containerd.events import container_pb2 as events_pb
from core.api.containerd.services.containers.v1 import containers_pb2 as pb
from core.api.containerd.services.containers.v1 import containers_pb2_grpc as pb_grpc
from core.config import GrpcConfig
from core.errors import NotFound
from core.hookspecs import hookimpl, new_plugin_manager
from core.metadata import MetadataStore
from core.metadata.containers import SPEC_TYPE_URL, ContainerStore
from core.server import new_server
from core.services.containers import ContainersService

SPEC = b'{"ociVersion":"1.0.2-dev", "process": {"env": ["A=1"]}, "zz": 1}'  # not as Python would encode it
OPTIONS = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x12\x04runc")


class SpecHook:
    """A ``containerkit_adjust_spec`` implementation doing what a test sets in ``action``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, str]]] = []
        self.action: Any = None

    @hookimpl
    def containerkit_adjust_spec(
        self, spec: dict[str, Any], namespace: str, container_id: str, labels: dict[str, str]
    ) -> None:
        self.calls.append((namespace, container_id, labels))
        if self.action is not None:
            self.action(spec)


@pytest.fixture
def served() -> Iterator[tuple[Any, Recorder, SpecHook, ContainersService]]:
    directory = Path(tempfile.mkdtemp(prefix="ck-svc-", dir="/tmp"))
    store = MetadataStore(directory / "meta.db")
    recorder, hook, hooks = Recorder(), SpecHook(), new_plugin_manager()
    hooks.register(hook)
    service = ContainersService(ContainerStore(store), recorder, hooks, recorder)
    server = new_server(GrpcConfig())
    service.register(server)
    server.add_insecure_port(f"unix:{directory / 'sock'}")
    server.start()
    channel = grpc.insecure_channel(f"unix:{directory / 'sock'}")
    try:
        yield pb_grpc.ContainersStub(channel), recorder, hook, service
    finally:
        channel.close()
        server.stop(None).wait()
        store.close()
        shutil.rmtree(directory, ignore_errors=True)


def message(id: str = "c1", **fields: Any) -> Any:
    """A complete ``Container`` message; ``fields`` replace its defaults."""
    defaults: dict[str, Any] = {
        "image": "docker.io/library/busybox:latest",
        "runtime": pb.Container.Runtime(name="io.containerd.runc.v2", options=OPTIONS),
        "spec": any_pb2.Any(type_url=SPEC_TYPE_URL, value=SPEC),
        "snapshotter": "overlayfs",
        "snapshot_key": id,
        "labels": {"team": "infra"},
    }
    return pb.Container(id=id, **{**defaults, **fields})


def code_and_details(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value.code(), raised.value.details()


def test_create_get_list_and_stream_keep_every_field_and_the_spec_bytes(served: Any) -> None:
    stub, recorder, hook, _ = served
    given = message()
    given.extensions["ext"].CopyFrom(any_pb2.Any(type_url="example.Ext", value=b"\x01"))
    created = stub.Create(pb.CreateContainerRequest(container=given), metadata=DEFAULT).container
    assert created.created_at.seconds > 0 and created.created_at == created.updated_at
    fetched = stub.Get(pb.GetContainerRequest(id="c1"), metadata=DEFAULT).container
    assert fetched == created
    expected = pb.Container()
    expected.CopyFrom(given)
    expected.created_at.CopyFrom(created.created_at)
    expected.updated_at.CopyFrom(created.updated_at)
    assert fetched == expected  # spec type URL and bytes, runtime options, extensions as sent
    stub.Create(pb.CreateContainerRequest(container=message("c0", image="", labels={})), metadata=DEFAULT)
    listed = stub.List(pb.ListContainersRequest(filters=["labels.team==infra"]), metadata=DEFAULT).containers
    assert [c.id for c in listed] == ["c1"]
    streamed = [m.container.id for m in stub.ListStream(pb.ListContainersRequest(), metadata=DEFAULT)]
    assert streamed == ["c0", "c1"]
    assert hook.calls == [("default", "c1", {"team": "infra"}), ("default", "c0", {})]
    create = events_pb.ContainerCreate(
        id="c1",
        image="docker.io/library/busybox:latest",
        runtime=events_pb.ContainerCreate.Runtime(name="io.containerd.runc.v2", options=OPTIONS),
    )
    assert recorder.events[0] == ("default", "/containers/create", create)


def test_errors_are_containerds(served: Any) -> None:
    stub, recorder, _, _ = served
    stub.Create(pb.CreateContainerRequest(container=message()), metadata=DEFAULT)
    cases = {
        "duplicate": (stub.Create, pb.CreateContainerRequest(container=message())),
        "no spec": (stub.Create, pb.CreateContainerRequest(container=pb.Container(id="x", runtime={"name": "r"}))),
        "bad spec": (stub.Create, pb.CreateContainerRequest(container=message("y", spec=any_pb2.Any(value=b"{")))),
        "missing": (stub.Get, pb.GetContainerRequest(id="x")),
        "no id": (stub.Update, pb.UpdateContainerRequest(container=pb.Container())),
        "gone": (stub.Delete, pb.DeleteContainerRequest(id="x")),
    }
    outcomes = {
        name: code_and_details(lambda c=call, r=request: c(r, metadata=DEFAULT))
        for name, (call, request) in cases.items()
    }
    assert outcomes == {
        "duplicate": (grpc.StatusCode.ALREADY_EXISTS, 'container "c1": already exists'),
        "no spec": (
            grpc.StatusCode.INVALID_ARGUMENT,
            "create container failed validation: container.Spec must be set: invalid argument",
        ),
        "bad spec": (
            grpc.StatusCode.INVALID_ARGUMENT,
            "container.Spec: not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2"
            " (char 1): invalid argument",
        ),
        "missing": (grpc.StatusCode.NOT_FOUND, 'container "x" in namespace "default": not found'),
        "no id": (grpc.StatusCode.INVALID_ARGUMENT, "Container.ID required"),
        "gone": (grpc.StatusCode.NOT_FOUND, "container x: not found"),
    }
    assert [topic for _, topic, _ in recorder.events] == ["/containers/create"]
    assert recorder.gc_calls == []


def test_update_publishes_the_result_and_runs_the_hook_only_for_the_spec(served: Any) -> None:
    stub, recorder, hook, _ = served
    stub.Create(pb.CreateContainerRequest(container=message()), metadata=DEFAULT)
    hook.calls.clear()
    mask = field_mask_pb2.FieldMask(paths=["labels.tier", "snapshotkey"])
    request = pb.UpdateContainerRequest(container=pb.Container(id="c1", labels={"tier": "db"}), update_mask=mask)
    updated = stub.Update(request, metadata=DEFAULT).container
    assert dict(updated.labels) == {"team": "infra", "tier": "db"} and updated.snapshot_key == ""
    assert updated.spec.value == SPEC and hook.calls == []
    assert recorder.events[-1] == (
        "default",
        "/containers/update",
        events_pb.ContainerUpdate(
            id="c1", image="docker.io/library/busybox:latest", labels={"team": "infra", "tier": "db"}
        ),
    )

    hook.action = lambda spec: spec["process"]["env"].append("HOOKED=1")
    full = stub.Update(pb.UpdateContainerRequest(container=message(labels={"x": "1"})), metadata=DEFAULT).container
    assert hook.calls == [("default", "c1", {"x": "1"})]  # a full update replaces the labels
    assert full.spec.type_url == SPEC_TYPE_URL
    assert json.loads(full.spec.value)["process"]["env"] == ["A=1", "HOOKED=1"]


def test_create_stores_what_the_hook_leaves_and_its_errors_reject_the_call(served: Any) -> None:
    stub, recorder, hook, service = served

    def adjust(spec: dict[str, Any]) -> None:
        spec["hostname"] = "adjusted"

    hook.action = adjust
    created = stub.Create(pb.CreateContainerRequest(container=message()), metadata=DEFAULT).container
    assert json.loads(created.spec.value) == {**json.loads(SPEC), "hostname": "adjusted"}
    assert service.store.get("default", "c1").spec["hostname"] == "adjusted"

    def refuse(spec: dict[str, Any]) -> None:
        raise ValueError("no privileged containers here")

    def missing(spec: dict[str, Any]) -> None:
        raise NotFound("seccomp profile x: not found")

    for action, expected in (
        (
            refuse,
            (
                grpc.StatusCode.INVALID_ARGUMENT,
                "adjusting the spec of container 'c2' failed: no privileged containers here",
            ),
        ),
        (missing, (grpc.StatusCode.NOT_FOUND, "seccomp profile x: not found")),
    ):
        hook.action = action
        assert (
            code_and_details(lambda: stub.Create(pb.CreateContainerRequest(container=message("c2")), metadata=DEFAULT))
            == expected
        )
    assert [c.id for c in service.store.list("default")] == ["c1"]
    assert len(recorder.events) == 1


def test_delete_publishes_and_schedules_a_collection(served: Any) -> None:
    stub, recorder, _, service = served
    stub.Create(pb.CreateContainerRequest(container=message()), metadata=DEFAULT)
    stub.Delete(pb.DeleteContainerRequest(id="c1"), metadata=DEFAULT)
    assert recorder.events[-1] == ("default", "/containers/delete", events_pb.ContainerDelete(id="c1"))
    assert recorder.gc_calls == ["schedule"]
    assert [kind.types for kind in service.containerkit_gc_kinds()] == [("container",)]
