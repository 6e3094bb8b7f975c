"""Access (issue 8): who may use the socket, namespaces enforced on every call, credentials kept out of argv
and logs, registry TLS verified by default.

The namespace test is a table: one probe per rpc of every service the daemon serves (enumerated from the
generated descriptors under core/api, plus grpc.health), each sent from namespace B naming what namespace A
holds, then again without a namespace. B must get NotFound, empty listings or its own objects, never A's;
without a namespace every tenant call is refused as containerd refuses it (FAILED_PRECONDITION). A's
objects are compared before and after: no probe may touch them.
"""

from __future__ import annotations

import base64
import errno
import functools
import grp
import hashlib
import importlib
import io
import json
import os
import pwd
import random
import signal
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import CKCTL, RunningDaemon
from google.protobuf import any_pb2, empty_pb2, json_format, message, message_factory
from google.protobuf.descriptor import MethodDescriptor
from interop import _daemons, busybox_image, kill_leftovers, remove_namespace_dirs
from oci_images import Layer, Layout
from registry_servers import Fault, FaultyRegistry, faulty_registry
from test_ckctl_transfer import write_keys

from core.netns import delete_netns, list_netns, netns_name

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs containers and creates users: needs root")

A, B = "access-a", "access-b"
ALPHA = "alpha-7d1f"
"""Prefix of every name in namespace A: no listing or answer in B may hold it (but B's own namesakes)."""
MARKER = "a-only-c0ffee5ec7e7"
"""The label value (and blob data) of A's objects: nothing B gets back may hold it."""
LABEL = "access.test/secret"
SNAPSHOTTER = "overlayfs"
STREAM_SECONDS = 1.0  # how long an endless stream (Subscribe, Watch) is read before the probe hangs up
CALL_TIMEOUT = 30.0
PROBE_SCRIPT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as err:
    print("refused", err.errno)
    sys.exit(0)
s.sendall(b"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
frame = s.recv(9)
print("served" if len(frame) == 9 and frame[3] == 4 else "garbled")
"""


# -- the services, enumerated ---------------------------------------------------------------------------------


@functools.cache
def service_methods() -> dict[str, MethodDescriptor]:
    """Every rpc of every service the daemon registers, by ``Service/Method``: the services declared in the
    generated descriptors under core/api, and grpc.health.v1."""
    from grpc_health.v1 import health_pb2

    api = Path(__file__).resolve().parent.parent / "core" / "api"
    modules = [health_pb2]
    for path in sorted(api.rglob("*_pb2.py")):
        modules.append(importlib.import_module(".".join(path.relative_to(api.parent.parent).with_suffix("").parts)))
    return {
        f"{service.full_name}/{method.name}": method
        for module in modules
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


@dataclass
class Outcome:
    """What one call gave: its status code, the responses received, the error details."""

    code: grpc.StatusCode
    responses: list[message.Message]
    details: str

    def mentions(self, *texts: str) -> bool:
        """Whether any response or the error details hold one of ``texts``."""
        blob = b"".join(r.SerializeToString() for r in self.responses) + self.details.encode()
        return any(text.encode() in blob for text in texts)


Request = dict[str, Any] | message.Message


def invoke(
    channel: grpc.Channel,
    method: MethodDescriptor,
    requests: list[Request],
    namespace: str | None,
    timeout: float = CALL_TIMEOUT,
) -> Outcome:
    """Call ``method`` (any of the four kinds) with ``requests`` (one unless client-streaming), as ``namespace``
    (no ``containerd-namespace`` metadata when None), for at most ``timeout`` seconds."""
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    messages = [r if isinstance(r, message.Message) else json_format.ParseDict(r, request_class()) for r in requests]
    factory = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    call = factory(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    metadata = [("containerd-namespace", namespace)] if namespace else []
    argument = iter(messages) if method.client_streaming else messages[0]
    responses: list[message.Message] = []
    try:
        if method.server_streaming:
            responses.extend(call(argument, timeout=timeout, metadata=metadata))
        else:
            responses.append(call(argument, timeout=timeout, metadata=metadata))
    except grpc.RpcError as err:
        return Outcome(err.code(), responses, err.details() or "")
    return Outcome(grpc.StatusCode.OK, responses, "")


def call(channel: grpc.Channel, name: str, request: Request | list[Request], namespace: str) -> Outcome:
    """``Service/Method`` by its short name (``Content/Info``) as ``namespace``."""
    methods = {key.rsplit(".", 1)[-1]: method for key, method in service_methods().items()}
    return invoke(channel, methods[name], request if isinstance(request, list) else [request], namespace)


def ok(channel: grpc.Channel, name: str, request: Request | list[Request], namespace: str) -> list[Any]:
    """The responses of a :func:`call` that must succeed."""
    outcome = call(channel, name, request, namespace)
    assert outcome.code is grpc.StatusCode.OK, f"{name} as {namespace}: {outcome.code} {outcome.details}"
    return outcome.responses


# -- namespace A's objects --------------------------------------------------------------------------------------


@dataclass
class World:
    """What namespace A holds (and the few things of B's own the probes use)."""

    channel: grpc.Channel
    image: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    layer: dict[str, Any] = field(default_factory=dict)
    blob: str = ""  # a blob only A ever wrote (its data holds MARKER)
    ingest: str = f"{ALPHA}-ingest"  # an ingest A left half-written
    lease: str = f"{ALPHA}-lease"
    committed: str = f"{ALPHA}-committed"
    active: str = f"{ALPHA}-active"
    container: str = f"{ALPHA}-ctr"
    container_record: Any = None
    network: str = f"{ALPHA}-net"
    subnet_b: str = ""  # for B's namesake network
    registry: str = ""  # an empty registry (tests/registry_servers.FaultyRegistry)
    volume: str = f"{ALPHA}-vol"
    mountpoint: str = ""
    scratch_mounts: list[dict[str, Any]] = field(default_factory=list)  # B's own empty active snapshot
    small_archive: bytes = b""  # an OCI archive B imports as its own
    key: str = ""
    public_key: str = ""

    def ok(self, name: str, request: Request | list[Request], namespace: str = A) -> list[Any]:
        """The responses of a call that must succeed (see :func:`ok`)."""
        return ok(self.channel, name, request, namespace)

    def state_of_a(self) -> dict[str, Any]:
        """Everything A holds, serialized per listing (images, ..., lease resources, ingests, interfaces, tasks)."""
        listings = {
            "images": ("Images/List", {}),
            "containers": ("Containers/List", {}),
            "leases": ("Leases/List", {}),
            "resources": ("Leases/ListResources", {"id": self.lease}),
            "snapshots": ("Snapshots/List", {"snapshotter": SNAPSHOTTER}),
            "content": ("Content/List", {}),
            "ingests": ("Content/ListStatuses", {}),
            "networks": ("Networks/List", {}),
            "attachments": ("Networks/ListAttachments", {}),
            "interfaces": ("Networks/Interfaces", {"container_id": self.container}),
            "volumes": ("Volumes/List", {}),
            "tasks": ("Tasks/List", {}),
        }
        return {
            key: [r.SerializeToString(deterministic=True) for r in self.ok(name, request)]
            for key, (name, request) in listings.items()
        }


def build_world(daemon: RunningDaemon, channel: grpc.Channel, busybox_ref: str, tmp: Path, subnet: str) -> World:
    """Fill namespace A: an image, a private blob, a half-written ingest, a lease, snapshots, a network, a
    volume and a running container attached to both. B gets an empty scratch snapshot of its own."""
    world = World(channel)
    labels, root = {LABEL: MARKER}, {"containerd.io/gc.root": "1"}
    world.image = busybox_ref
    daemon.ckctl("images", "pull", "--label", f"{LABEL}={MARKER}", busybox_ref, namespace=A)
    [image] = world.ok("Images/Get", {"name": busybox_ref})
    world.manifest = json_format.MessageToDict(image.image.target, preserving_proto_field_name=True)
    manifest = json.loads(b"".join(r.data for r in world.ok("Content/Read", {"digest": image.image.target.digest})))
    layer = manifest["layers"][0]
    world.layer = {"media_type": layer["mediaType"], "digest": layer["digest"], "size": layer["size"]}

    data = f"{MARKER} {random.random()}".encode()
    world.blob = "sha256:" + hashlib.sha256(data).hexdigest()
    world.ok("Leases/Create", {"id": world.lease, "labels": labels})
    world.ok("Leases/AddResource", {"id": world.lease, "resource": {"id": world.blob, "type": "content"}})
    write = {"ref": f"{ALPHA}-blob", "total": len(data), "expected": world.blob, "labels": labels}
    world.ok("Content/Write", [{**write, "action": "COMMIT", "data": base64.b64encode(data).decode()}])
    world.ok("Content/Write", [{"action": "WRITE", "ref": world.ingest, "data": base64.b64encode(data).decode()}])

    world.ok("Snapshots/Prepare", {"snapshotter": SNAPSHOTTER, "key": f"{ALPHA}-work", "labels": {**labels, **root}})
    world.ok("Snapshots/Commit", {"snapshotter": SNAPSHOTTER, "name": world.committed, "key": f"{ALPHA}-work"})
    world.ok(
        "Snapshots/Prepare",
        {"snapshotter": SNAPSHOTTER, "key": world.active, "parent": world.committed, "labels": {**labels, **root}},
    )
    [prepared] = world.ok("Snapshots/Prepare", {"snapshotter": SNAPSHOTTER, "key": "b-scratch", "labels": root}, B)
    world.scratch_mounts = [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in prepared.mounts]

    world.ok("Networks/Create", {"name": world.network, "subnet": subnet, "labels": labels})
    [volume] = world.ok("Volumes/Create", {"name": world.volume, "labels": labels})
    world.mountpoint = volume.volume.mountpoint
    mount = f"type=volume,src={world.volume},dst=/data"
    daemon.ckctl(
        "run", "-d", "--net", world.network, "--mount", mount, busybox_ref, world.container, "sleep", "600", namespace=A
    )
    update = {"container": {"id": world.container, "labels": labels}, "update_mask": f"labels.{LABEL}"}
    world.ok("Containers/Update", update)
    [got] = world.ok("Containers/Get", {"id": world.container})
    world.container_record = got.container

    layout = Layout(tmp / "small-layout")
    layout.add_image("small", [Layer().dirs("etc").file("etc/hello", b"hello\n")])
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add(layout.directory, arcname=".")
    world.small_archive = archive.getvalue()
    world.key, world.public_key = (str(path) for path in write_keys(tmp, "probe"))
    return world


# -- the table ---------------------------------------------------------------------------------------------------


Expect = Callable[[World, Outcome], bool]


def refused(*codes: grpc.StatusCode) -> Expect:
    """The call fails with one of ``codes`` (default NOT_FOUND)."""
    wanted = codes or (grpc.StatusCode.NOT_FOUND,)
    return lambda world, outcome: outcome.code in wanted


def clean(world: World, outcome: Outcome) -> bool:
    """The call succeeds and nothing in its answer is A's: no A name, label value or private blob."""
    return outcome.code is grpc.StatusCode.OK and not outcome.mentions(ALPHA, MARKER, world.blob)


def own(world: World, outcome: Outcome) -> bool:
    """B made its own namesake of an A object: success, and none of A's labels or data in the answer."""
    return outcome.code is grpc.StatusCode.OK and not outcome.mentions(MARKER, world.blob)


def clean_or(*codes: grpc.StatusCode) -> Expect:
    """Either :func:`clean` or refused with one of ``codes``."""
    return lambda world, outcome: outcome.code in codes or clean(world, outcome)


def answers(*codes: grpc.StatusCode) -> Expect:
    """A host-wide call (no tenant, as in containerd): it ends with one of ``codes``."""
    return lambda world, outcome: outcome.code in codes


OK, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND
PRECONDITION, INVALID = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
OPEN = grpc.StatusCode.DEADLINE_EXCEEDED  # an endless stream still open when the probe hung up


def volume_apart(world: World, outcome: Outcome) -> bool:
    """B's namesake volume is its own: not A's directory."""
    return own(world, outcome) and outcome.responses[0].volume.mountpoint not in ("", world.mountpoint)


def any_of(type_url: str, value: bytes) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=value)


def exec_request(world: World) -> Request:
    from core.api.containerd.services.tasks.v1 import tasks_pb2

    process = json.dumps({"args": ["/bin/true"], "cwd": "/", "env": ["PATH=/bin"]}).encode()
    spec = any_of("types.containerd.io/opencontainers/runtime-spec/1/Process", process)
    return tasks_pb2.ExecProcessRequest(container_id=world.container, exec_id="probe", spec=spec)


def thief_container(world: World) -> Request:
    """B's container naming A's image and A's container snapshot."""
    from core.api.containerd.services.containers.v1 import containers_pb2

    record = world.container_record
    thief = containers_pb2.Container(
        id="b-thief",
        image=record.image,
        runtime=record.runtime,
        spec=record.spec,
        snapshotter=record.snapshotter,
        snapshot_key=record.snapshot_key,
    )
    return containers_pb2.CreateContainerRequest(container=thief)


def event(topic: str, namespace: str = "") -> Request:
    from core.api.containerd.services.events.v1 import events_pb2

    payload = any_of("type.googleapis.com/google.protobuf.Empty", empty_pb2.Empty().SerializeToString())
    if not namespace:
        return events_pb2.PublishRequest(topic=topic, event=payload)
    envelope = events_pb2.Envelope(namespace=namespace, topic=topic, event=payload)
    envelope.timestamp.GetCurrentTime()
    return events_pb2.ForwardRequest(envelope=envelope)


def labels_update(kind: str, key: str, name: str) -> Callable[[World], Request]:
    """An Update request of ``kind`` (its message field) setting a probe label on ``name``."""
    return lambda world: {kind: {key: name, "labels": {"probe": "b"}}, "update_mask": "labels.probe"}


@dataclass(frozen=True)
class Probe:
    """One rpc's probe: the request(s) from B, what B must get, whether the call needs a tenant."""

    method: str
    request: Callable[[World], Request | list[Request]]
    expect: Expect
    tenant: bool = True
    seconds: float = CALL_TIMEOUT  # STREAM_SECONDS for an endless stream


W = World
SNAP = {"snapshotter": SNAPSHOTTER}
TRANSFER = "containerkit.services.transfer.v1.Transfer"
NETWORKS = "containerkit.services.networks.v1.Networks"
V1 = "containerd.services"

# In call order: B's own pointers (an image record at A's manifest, a lease naming A's blob, a container on
# A's snapshot key) come before the probes that try to reach A's data through them.
PROBES: tuple[Probe, ...] = (
    Probe("grpc.health.v1.Health/Check", lambda w: {}, answers(OK), tenant=False),
    Probe("grpc.health.v1.Health/Watch", lambda w: {}, answers(OPEN), tenant=False, seconds=STREAM_SECONDS),
    Probe("grpc.health.v1.Health/List", lambda w: {}, answers(OK), tenant=False),
    Probe(f"{V1}.version.v1.Version/Version", lambda w: {}, answers(OK), tenant=False),
    Probe(f"{V1}.introspection.v1.Introspection/Plugins", lambda w: {}, answers(OK), tenant=False),
    Probe(f"{V1}.introspection.v1.Introspection/Server", lambda w: {}, answers(OK), tenant=False),
    # namespaces are the admin view: host-wide in containerd too; A cannot be deleted while it holds objects
    Probe(f"{V1}.namespaces.v1.Namespaces/Get", lambda w: {"name": A}, answers(OK), tenant=False),
    Probe(f"{V1}.namespaces.v1.Namespaces/List", lambda w: {}, answers(OK), tenant=False),
    Probe(
        f"{V1}.namespaces.v1.Namespaces/Create",
        lambda w: {"namespace": {"name": A}},
        answers(grpc.StatusCode.ALREADY_EXISTS),
        tenant=False,
    ),
    Probe(f"{V1}.namespaces.v1.Namespaces/Update", labels_update("namespace", "name", B), answers(OK), tenant=False),
    Probe(f"{V1}.namespaces.v1.Namespaces/Delete", lambda w: {"name": A}, answers(PRECONDITION), tenant=False),
    # images
    Probe(f"{V1}.images.v1.Images/Get", lambda w: {"name": w.image}, refused()),
    Probe(f"{V1}.images.v1.Images/List", lambda w: {}, clean),
    Probe(f"{V1}.images.v1.Images/Update", lambda w: labels_update("image", "name", w.image)(w), refused()),
    Probe(f"{V1}.images.v1.Images/Delete", lambda w: {"name": w.image, "sync": True}, refused()),
    Probe(
        f"{V1}.images.v1.Images/Create",
        lambda w: {"image": {"name": "b-pointer", "target": w.manifest}},
        clean_or(NOT_FOUND, PRECONDITION),
    ),
    # leases
    Probe(f"{V1}.leases.v1.Leases/List", lambda w: {}, clean),
    Probe(f"{V1}.leases.v1.Leases/ListResources", lambda w: {"id": w.lease}, refused()),
    Probe(
        f"{V1}.leases.v1.Leases/DeleteResource",
        lambda w: {"id": w.lease, "resource": {"id": w.blob, "type": "content"}},
        refused(),
    ),
    Probe(f"{V1}.leases.v1.Leases/Delete", lambda w: {"id": w.lease}, refused()),
    Probe(f"{V1}.leases.v1.Leases/Create", lambda w: {"id": "b-lease"}, clean),
    Probe(
        f"{V1}.leases.v1.Leases/AddResource",
        lambda w: {"id": "b-lease", "resource": {"id": w.blob, "type": "content"}},
        clean_or(NOT_FOUND),
    ),
    # content: A's private blob, A's manifest (B's image and lease point at them), A's half-written ingest
    Probe(f"{V1}.content.v1.Content/Info", lambda w: {"digest": w.blob}, refused()),
    Probe(f"{V1}.content.v1.Content/Read", lambda w: {"digest": w.manifest["digest"]}, refused()),
    Probe(f"{V1}.content.v1.Content/List", lambda w: {}, clean),
    Probe(
        f"{V1}.content.v1.Content/Update",
        lambda w: {"info": {"digest": w.blob, "labels": {"probe": "b"}}, "update_mask": "labels.probe"},
        refused(),
    ),
    Probe(f"{V1}.content.v1.Content/Status", lambda w: {"ref": w.ingest}, refused()),
    Probe(f"{V1}.content.v1.Content/ListStatuses", lambda w: {}, clean),
    Probe(f"{V1}.content.v1.Content/Write", lambda w: [{"action": "STAT", "ref": w.ingest}], clean_or(NOT_FOUND)),
    # B's Write above opened B's own ingest under A's ref: Abort ends that one (A's is compared at the end)
    Probe(f"{V1}.content.v1.Content/Abort", lambda w: {"ref": w.ingest}, clean_or(NOT_FOUND)),
    Probe(f"{V1}.content.v1.Content/Delete", lambda w: {"digest": w.blob}, refused()),
    # snapshots
    Probe(f"{V1}.snapshots.v1.Snapshots/Prepare", lambda w: {**SNAP, "key": "b-1", "parent": w.committed}, refused()),
    Probe(f"{V1}.snapshots.v1.Snapshots/View", lambda w: {**SNAP, "key": "b-2", "parent": w.committed}, refused()),
    Probe(f"{V1}.snapshots.v1.Snapshots/Mounts", lambda w: {**SNAP, "key": w.active}, refused()),
    Probe(f"{V1}.snapshots.v1.Snapshots/Commit", lambda w: {**SNAP, "name": "b-3", "key": w.active}, refused()),
    Probe(f"{V1}.snapshots.v1.Snapshots/Stat", lambda w: {**SNAP, "key": w.committed}, refused()),
    Probe(
        f"{V1}.snapshots.v1.Snapshots/Update",
        lambda w: {**SNAP, **labels_update("info", "name", w.active)(w)},
        refused(),
    ),
    Probe(f"{V1}.snapshots.v1.Snapshots/Usage", lambda w: {**SNAP, "key": w.active}, refused()),
    Probe(f"{V1}.snapshots.v1.Snapshots/Remove", lambda w: {**SNAP, "key": w.committed}, refused()),
    Probe(f"{V1}.snapshots.v1.Snapshots/List", lambda w: SNAP, clean),
    # host-wide upkeep of the snapshotter's own directories: containerd does not ask for a namespace either
    Probe(f"{V1}.snapshots.v1.Snapshots/Cleanup", lambda w: SNAP, clean, tenant=False),
    # diff: A's layer into B's own snapshot; a diff of B's own written under A's ingest ref
    Probe(f"{V1}.diff.v1.Diff/Apply", lambda w: {"diff": w.layer, "mounts": w.scratch_mounts}, refused()),
    Probe(
        f"{V1}.diff.v1.Diff/Diff",
        lambda w: {"left": w.scratch_mounts, "right": w.scratch_mounts, "ref": w.ingest},
        clean,
    ),
    # containers
    Probe(f"{V1}.containers.v1.Containers/Get", lambda w: {"id": w.container}, refused()),
    Probe(f"{V1}.containers.v1.Containers/List", lambda w: {}, clean),
    Probe(f"{V1}.containers.v1.Containers/ListStream", lambda w: {}, clean),
    Probe(
        f"{V1}.containers.v1.Containers/Update",
        lambda w: labels_update("container", "id", w.container)(w),
        refused(),
    ),
    Probe(f"{V1}.containers.v1.Containers/Delete", lambda w: {"id": w.container}, refused()),
    Probe(f"{V1}.containers.v1.Containers/Create", thief_container, own),
    # tasks: B's container on A's snapshot key gets no rootfs; A's task is out of reach
    Probe(f"{V1}.tasks.v1.Tasks/Create", lambda w: {"container_id": "b-thief"}, refused(NOT_FOUND, PRECONDITION)),
    Probe(f"{V1}.tasks.v1.Tasks/Get", lambda w: {"container_id": w.container}, refused()),
    Probe(f"{V1}.tasks.v1.Tasks/List", lambda w: {}, clean),
    Probe(f"{V1}.tasks.v1.Tasks/ListPids", lambda w: {"container_id": w.container}, refused()),
    Probe(f"{V1}.tasks.v1.Tasks/Metrics", lambda w: {"filters": [f"id=={w.container}"]}, clean),
    Probe(f"{V1}.tasks.v1.Tasks/Exec", exec_request, refused()),
    Probe(
        f"{V1}.tasks.v1.Tasks/ResizePty",
        lambda w: {"container_id": w.container, "width": 80, "height": 24},
        refused(),
    ),
    Probe(f"{V1}.tasks.v1.Tasks/CloseIO", lambda w: {"container_id": w.container, "stdin": True}, refused()),
    Probe(f"{V1}.tasks.v1.Tasks/Pause", lambda w: {"container_id": w.container}, refused()),
    Probe(f"{V1}.tasks.v1.Tasks/Resume", lambda w: {"container_id": w.container}, refused()),
    Probe(f"{V1}.tasks.v1.Tasks/Checkpoint", lambda w: {"container_id": w.container}, refused()),
    Probe(f"{V1}.tasks.v1.Tasks/Update", lambda w: {"container_id": w.container}, refused()),
    Probe(f"{V1}.tasks.v1.Tasks/Start", lambda w: {"container_id": w.container}, refused()),
    Probe(f"{V1}.tasks.v1.Tasks/Kill", lambda w: {"container_id": w.container, "signal": 9, "all": True}, refused()),
    Probe(f"{V1}.tasks.v1.Tasks/Wait", lambda w: {"container_id": w.container}, refused()),
    Probe(
        f"{V1}.tasks.v1.Tasks/DeleteProcess",
        lambda w: {"container_id": w.container, "exec_id": "probe"},
        refused(),
    ),
    Probe(f"{V1}.tasks.v1.Tasks/Delete", lambda w: {"container_id": w.container}, refused()),
    # events: a host-wide stream in containerd (the envelope names the namespace); Forward is the shims' way in
    Probe(f"{V1}.events.v1.Events/Publish", lambda w: event("/access/probe"), answers(OK)),
    Probe(f"{V1}.events.v1.Events/Forward", lambda w: event("/access/probe", B), answers(OK), tenant=False),
    Probe(
        f"{V1}.events.v1.Events/Subscribe",
        lambda w: {"filters": ["topic~=access"]},
        answers(OPEN),
        tenant=False,
        seconds=STREAM_SECONDS,
    ),
    # unpack, transfer: through B's image record at A's manifest
    Probe("containerkit.services.unpack.v1.Unpack/Unpack", lambda w: {"image": "b-pointer", **SNAP}, refused()),
    Probe(f"{TRANSFER}/Export", lambda w: {"names": ["b-pointer"]}, refused()),
    Probe(f"{TRANSFER}/Push", lambda w: {"ref": f"{w.registry}/access/x:1", "local_name": "b-pointer"}, refused()),
    Probe(
        f"{TRANSFER}/Convert", lambda w: {"source": "b-pointer", "target": "b-zstd", "compression": "zstd"}, refused()
    ),
    Probe(f"{TRANSFER}/Sign", lambda w: {"name": "b-pointer", "key_path": w.key}, refused()),
    Probe(
        f"{TRANSFER}/Verify",
        lambda w: {"name": "b-pointer", "public_key_paths": [w.public_key]},
        refused(NOT_FOUND, PRECONDITION),
    ),
    Probe(f"{TRANSFER}/Pull", lambda w: {"ref": f"{w.registry}/access/none:1"}, refused()),
    Probe(
        f"{TRANSFER}/Import",
        lambda w: [{"options": {"base_name": "b-import"}}, {"data": base64.b64encode(w.small_archive).decode()}],
        clean,
    ),
    Probe(f"{TRANSFER}/Login", lambda w: {"host": w.registry, "username": "b"}, answers(OK), tenant=False),
    # networks: A's network and A's container's interfaces
    Probe(f"{NETWORKS}/Get", lambda w: {"name": w.network}, refused()),
    Probe(f"{NETWORKS}/List", lambda w: {}, clean),
    Probe(f"{NETWORKS}/ListAttachments", lambda w: {"container_id": w.container}, clean),
    Probe(f"{NETWORKS}/Attach", lambda w: {"network": w.network, "container_id": w.container}, refused()),
    Probe(f"{NETWORKS}/Detach", lambda w: {"network": w.network, "container_id": w.container}, refused()),
    Probe(f"{NETWORKS}/Interfaces", lambda w: {"container_id": w.container}, refused()),
    Probe(f"{NETWORKS}/Routes", lambda w: {"container_id": w.container}, refused()),
    Probe(f"{NETWORKS}/SetMTU", lambda w: {"container_id": w.container, "ifname": "eth0", "mtu": 1280}, refused()),
    Probe(f"{NETWORKS}/SetLinkState", lambda w: {"container_id": w.container, "ifname": "eth0"}, refused()),
    Probe(
        f"{NETWORKS}/AddAddress",
        lambda w: {"container_id": w.container, "ifname": "eth0", "address": "10.9.9.9/24"},
        refused(),
    ),
    Probe(
        f"{NETWORKS}/RemoveAddress",
        lambda w: {"container_id": w.container, "ifname": "eth0", "address": "10.9.9.9/24"},
        refused(),
    ),
    Probe(
        f"{NETWORKS}/AddRoute",
        lambda w: {"container_id": w.container, "route": {"destination": "10.99.0.0/16"}},
        refused(),
    ),
    Probe(
        f"{NETWORKS}/RemoveRoute",
        lambda w: {"container_id": w.container, "route": {"destination": "default"}},
        refused(),
    ),
    Probe(f"{NETWORKS}/Delete", lambda w: {"name": w.network, "force": True}, refused()),
    Probe(f"{NETWORKS}/Create", lambda w: {"name": w.network, "subnet": w.subnet_b}, own),
    # volumes
    Probe("containerkit.services.volumes.v1.Volumes/Get", lambda w: {"name": w.volume}, refused()),
    Probe("containerkit.services.volumes.v1.Volumes/List", lambda w: {}, clean),
    Probe("containerkit.services.volumes.v1.Volumes/Remove", lambda w: {"name": w.volume}, refused()),
    Probe("containerkit.services.volumes.v1.Volumes/Create", lambda w: {"name": w.volume}, volume_apart),
)


def test_every_rpc_has_a_probe() -> None:
    """A new rpc (or service) fails here until the table above probes it."""
    names = [probe.method for probe in PROBES]
    assert len(names) == len(set(names)), "one probe per rpc"
    assert sorted(set(service_methods()) - set(names)) == []
    assert sorted(set(names) - set(service_methods())) == []


def two_subnets() -> tuple[str, str]:
    """Two adjacent /24s in 10.240.0.0/12, at a random place (so that parallel runs rarely collide)."""
    second, third = random.randrange(240, 256), random.randrange(0, 255)
    return f"10.{second}.{third}.0/24", f"10.{second}.{third + 1}.0/24"


def empty_namespace(channel: grpc.Channel, namespace: str) -> None:
    """Remove the namespace's tasks (SIGKILL), containers and networks: what lives outside the daemon's root."""
    for task in ok(channel, "Tasks/List", {}, namespace)[0].tasks:
        call(channel, "Tasks/Kill", {"container_id": task.id, "signal": signal.SIGKILL, "all": True}, namespace)
        call(channel, "Tasks/Wait", {"container_id": task.id}, namespace)
        call(channel, "Tasks/Delete", {"container_id": task.id}, namespace)
    for container in ok(channel, "Containers/List", {}, namespace)[0].containers:
        call(channel, "Containers/Delete", {"id": container.id}, namespace)
    for network in ok(channel, "Networks/List", {}, namespace)[0].networks:
        call(channel, "Networks/Delete", {"name": network.name, "force": True}, namespace)


@pytest.fixture
def shared_daemon(make_daemon: Any) -> Iterator[RunningDaemon]:
    """A daemon whose namespaces A and B are emptied, and whose netns and cgroups are removed, afterwards."""
    daemon: RunningDaemon = make_daemon()
    try:
        yield daemon
    finally:
        if daemon.process is not None:
            with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
                for namespace in (A, B):
                    empty_namespace(channel, namespace)
        daemon.stop()
        kill_leftovers(daemon.dir)
        _daemons.unmount_under(daemon.dir)
        for namespace in (A, B):
            if (name := netns_name(namespace, f"{ALPHA}-ctr")) in list_netns():
                delete_netns(name)
            remove_namespace_dirs(namespace)


def test_namespace_b_never_reaches_namespace_a(
    shared_daemon: RunningDaemon, registry: Any, tmp_path: Path, robustness: Any
) -> None:
    """Every rpc from B naming A's objects: refused, empty or B's own; without a namespace: refused as
    containerd refuses; A's objects the same before and after."""
    methods = service_methods()
    subnet_a, subnet_b = two_subnets()
    with grpc.insecure_channel(f"unix:{shared_daemon.address}") as channel, faulty_registry() as empty:
        world = build_world(shared_daemon, channel, busybox_image(registry, tmp_path), tmp_path, subnet_a)
        world.subnet_b, world.registry = subnet_b, empty.host
        before = world.state_of_a()
        failures = []
        for probe in PROBES:
            requests = probe.request(world)
            requests = requests if isinstance(requests, list) else [requests]
            as_b = invoke(channel, methods[probe.method], requests, B, probe.seconds)
            if not probe.expect(world, as_b):
                failures.append(f"{probe.method} from {B}: {as_b.code.name} {as_b.details!r} {as_b.responses!r:.300}")
            bare = invoke(channel, methods[probe.method], requests, None, probe.seconds)
            wanted = PRECONDITION if probe.tenant else as_b.code
            if bare.code is not wanted or (probe.tenant and "namespace" not in bare.details):
                failures.append(f"{probe.method} without namespace: {bare.code.name} {bare.details!r}, not {wanted}")
        after = world.state_of_a()
    robustness.record("hostile inputs", 2 * len(PROBES), 2 * len(PROBES) - len(failures))
    assert failures == [], "\n".join(failures)
    assert after == before


# -- the socket ---------------------------------------------------------------------------------------------------


@pytest.fixture
def users() -> Iterator[tuple[str, str, int]]:
    """A temporary system group and two temporary system users, (outsider, member of the group, group's gid);
    all removed afterwards."""
    suffix = os.urandom(3).hex()
    group, outsider, member = f"ckacc-{suffix}", f"ckout-{suffix}", f"ckmem-{suffix}"
    add_user = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
    subprocess.run(["groupadd", "--system", group], check=True)
    try:
        subprocess.run([*add_user, outsider], check=True)
        subprocess.run([*add_user, "--groups", group, member], check=True)
        yield outsider, member, grp.getgrnam(group).gr_gid
    finally:
        for user in (outsider, member):
            subprocess.run(["userdel", user], capture_output=True, check=False)
        subprocess.run(["groupdel", group], capture_output=True, check=False)


def connect_as(user: str, address: str) -> str:
    """What a process of ``user`` (with its groups) gets from the socket: "served" (an HTTP/2 SETTINGS frame
    answered its preface) or "refused ERRNO"."""
    entry = pwd.getpwnam(user)
    result = subprocess.run(
        ["/usr/bin/python3", "-c", PROBE_SCRIPT, address],
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=os.getgrouplist(user, entry.pw_gid),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


def test_the_socket_is_root_owned_0660_and_only_its_group_gets_in(
    make_daemon: Any, users: tuple[str, str, int], robustness: Any
) -> None:
    """0660 root:root by default; ``[grpc] gid`` hands the group to the socket: its members connect, others
    are refused by the kernel before the daemon reads a byte."""
    outsider, member, gid = users
    default = os.stat(make_daemon().address)
    assert (stat.S_IMODE(default.st_mode), default.st_uid, default.st_gid) == (0o660, 0, 0)

    daemon = make_daemon(f"[grpc]\ngid = {gid}\n", start=False)
    daemon.dir.chmod(0o711)  # the users may reach the socket file; its own mode decides
    daemon.start()
    info = os.stat(daemon.address)
    assert stat.S_ISSOCK(info.st_mode) and (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o660, 0, gid)
    outsider_got, member_got = connect_as(outsider, daemon.address), connect_as(member, daemon.address)
    robustness.record("hostile inputs", 1, int(outsider_got == f"refused {errno.EACCES}"))
    assert outsider_got == f"refused {errno.EACCES}"
    assert member_got == "served"


# -- credentials and TLS ----------------------------------------------------------------------------------------


def serve_image(faulty: FaultyRegistry, directory: Path, name: str) -> str:
    """A one-small-layer image served by ``faulty`` as ``name:latest``; returns the layer's digest."""
    layout = Layout(directory / name.replace("/", "-"))
    descriptor = layout.add_image("latest", [Layer().dirs("etc").file("etc/hello", b"hello\n")])
    for blob in layout.blobs.iterdir():
        faulty.add_blob(blob.read_bytes())
    manifest = (layout.blobs / descriptor["digest"].split(":")[1]).read_bytes()
    faulty.add_manifest(name, "latest", descriptor["mediaType"], manifest)
    return json.loads(manifest)["layers"][0]["digest"]


def test_credentials_stay_out_of_ps_errors_and_debug_logs(make_daemon: Any, tmp_path: Path, robustness: Any) -> None:
    """``--user USER:PASS`` is hidden from ps while the pull runs; --password-stdin never shows it; neither
    the daemon's debug log, nor an error message, nor the plugin listing holds a password (the request's or
    the daemon's own from its config)."""
    secret = f"S3cret-{os.urandom(6).hex()}"
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path / "docker")}
    seen: list[bytes] = []
    with faulty_registry({"probe": secret}) as faulty:
        daemon: RunningDaemon = make_daemon(
            f'[plugins.service.transfer.registries."{faulty.host}"]\nusername = "probe"\npassword = "{secret}"\n'
        )
        layer = serve_image(faulty, tmp_path, "access/stall")
        serve_image(faulty, tmp_path, "access/ok")
        # Stalled for a while, then it goes on (its pull ends, and so does its hold on the blob's ingest).
        faulty.fail("GET", f"/v2/access/stall/blobs/{layer}", Fault(stall=5.0))
        ckctl = [*CKCTL, "-a", daemon.address, "-n", "creds"]
        argv = [
            *ckctl,
            "images",
            "pull",
            "--no-unpack",
            "--user",
            f"probe:{secret}",
            f"{faulty.host}/access/stall:latest",
        ]
        pull = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            deadline = time.monotonic() + 60
            while not any(path.endswith(layer) for _, path, _ in faulty.requests):  # stalled on the layer now
                assert pull.poll() is None and time.monotonic() < deadline, "the pull did not reach the layer"
                time.sleep(0.05)
            seen.append(Path(f"/proc/{pull.pid}/cmdline").read_bytes())
            ps = ["ps", "-ww", "-o", "args=", "-p", str(pull.pid)]
            seen.append(subprocess.run(ps, capture_output=True, check=True).stdout)
        finally:
            pull.kill()
            pull.wait()

        def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run([*ckctl, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60)

        wrong = run("login", "--user", "probe", "--password-stdin", faulty.host, stdin=f"not-{secret}\n")
        right = run("login", "--user", "probe", "--password-stdin", faulty.host, stdin=f"{secret}\n")
        stdin_pull = run(
            "images",
            "pull",
            "--no-unpack",
            "--user",
            "probe",
            "--password-stdin",
            f"{faulty.host}/access/ok:latest",
            stdin=f"{secret}\n",
        )
        missing = run("images", "pull", "--user", f"probe:{secret}", f"{faulty.host}/access/none:latest")
        plugins = run("plugins", "ls", "--json")
    assert b"probe:***" in seen[0] and all(secret.encode() not in text for text in seen)
    assert wrong.returncode != 0 and right.stdout == "Login Succeeded\n" and stdin_pull.returncode == 0
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1
    basic = base64.b64encode(f"probe:{secret}".encode()).decode()
    outputs = [wrong.stderr, right.stderr, stdin_pull.stderr, stdin_pull.stdout, missing.stderr, plugins.stdout]
    outputs.append(daemon.log)
    leaks = [text for text in outputs if secret in text or basic in text]
    robustness.record("hostile inputs", 6 + len(outputs), 6 + len(outputs) - len(leaks))
    assert "level=debug" in daemon.log
    assert leaks == []


def test_registry_tls_is_verified_unless_configured_otherwise(
    make_daemon: Any, tmp_path: Path, robustness: Any
) -> None:
    """A registry with a self-signed certificate is refused with a clear error; ``ca_file`` (trust that
    certificate) or ``skip_verify`` (trust any) let the pull through."""
    with faulty_registry(tls_dir=tmp_path) as faulty:
        serve_image(faulty, tmp_path, "access/tls")
        port = faulty.host.rsplit(":", 1)[1]
        hosts = {faulty.host: "", f"localhost:{port}": "skip_verify = true\n"}
        table = "".join(
            f'[plugins.service.transfer.registries."{host}"]\nplain_http = false\n{extra}'
            for host, extra in hosts.items()
        )
        daemon: RunningDaemon = make_daemon(table)
        refused = daemon.ckctl("images", "pull", "--no-unpack", f"{faulty.host}/access/tls:latest", check=False)
        skipped = daemon.ckctl("images", "pull", "--no-unpack", f"localhost:{port}/access/tls:latest", check=False)
        daemon.stop()
        daemon.config_path.write_text(
            f'[plugins.service.transfer.registries."{faulty.host}"]\nplain_http = false\nca_file = "{faulty.ca_file}"\n'
        )
        daemon.start()
        trusted = daemon.ckctl("images", "pull", "--no-unpack", f"{faulty.host}/access/tls:latest", check=False)
    robustness.record("hostile inputs", 1, int(refused.returncode != 0))
    assert refused.returncode != 0 and refused.stderr.count("\n") == 1
    assert "TLS failed" in refused.stderr and "ca_file or skip_verify" in refused.stderr
    assert skipped.returncode == 0, skipped.stderr
    assert trusted.returncode == 0, trusted.stderr
