"""ckctl containers and ckctl events against a real containerkitd: every verb, listings in each format,
errors as one line, and events of other services as they happen."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import CKCTL
from google.protobuf import any_pb2
from interop import ctr, remove_namespace_dirs
from test_ckctl import one_line_error, table
from test_ctr_containers import pushed_busybox, watching

from core.api.containerd.services.containers.v1 import containers_pb2 as pb
from core.api.containerd.services.containers.v1 import containers_pb2_grpc as pb_grpc
from core.metadata.containers import SPEC_TYPE_URL

pytestmark = pytest.mark.integration

SPEC = {"ociVersion": "1.0.2-dev", "process": {"args": ["sh"]}}


@pytest.fixture
def containers(daemon: Any) -> Iterator[Any]:
    """A Containers stub on the daemon's socket."""
    channel = grpc.insecure_channel(f"unix:{daemon.address}")
    try:
        yield pb_grpc.ContainersStub(channel)
    finally:
        channel.close()


def create(stub: Any, id: str, namespace: str = "default", **fields: Any) -> None:
    spec = any_pb2.Any(type_url=SPEC_TYPE_URL, value=json.dumps(SPEC).encode())
    container = pb.Container(id=id, runtime=pb.Container.Runtime(name="io.containerd.runc.v2"), spec=spec, **fields)
    stub.Create(pb.CreateContainerRequest(container=container), metadata=[("containerd-namespace", namespace)])


def test_ls_info_and_label_in_each_format(daemon: Any, containers: Any) -> None:
    create(containers, "web", image="docker.io/library/nginx:latest", labels={"tier": "front"})
    create(containers, "bare")
    assert table(daemon.ckctl("containers", "ls").stdout) == [
        {"CONTAINER": "bare", "IMAGE": "-", "RUNTIME": "io.containerd.runc.v2"},
        {"CONTAINER": "web", "IMAGE": "docker.io/library/nginx:latest", "RUNTIME": "io.containerd.runc.v2"},
    ]
    assert daemon.ckctl("containers", "ls", "-q", "labels.tier==front").stdout == "web\n"
    (record,) = daemon.ckctl_json("containers", "ls", "id==web")
    assert (record["id"], record["labels"], record["runtime"]) == ("web", {"tier": "front"}, {
        "name": "io.containerd.runc.v2"
    })  # fmt: skip
    assert "spec" not in record and record["created_at"].endswith("Z")

    info = json.loads(daemon.ckctl("containers", "info", "web").stdout)
    assert (info["spec"], info["spec_type_url"], info["image"]) == (
        SPEC,
        SPEC_TYPE_URL,
        "docker.io/library/nginx:latest",
    )
    assert json.loads(daemon.ckctl("containers", "info", "--spec", "bare").stdout) == SPEC

    assert daemon.ckctl("containers", "label", "web", "team=infra", "tier=").stdout == "team=infra\n"
    assert daemon.ckctl_json("containers", "ls", "labels.team==infra")[0]["id"] == "web"
    assert daemon.ckctl("containers", "ls", namespace="other").stdout.splitlines() == ["CONTAINER  IMAGE  RUNTIME"]


def test_rm_removes_the_snapshot_unless_kept_and_errors_are_one_line(daemon: Any, containers: Any) -> None:
    for key in ("one", "two"):
        daemon.ckctl("snapshots", "prepare", key)
        create(containers, key, snapshotter="overlayfs", snapshot_key=key)
    assert daemon.ckctl("containers", "rm", "one").stdout == "one\n"
    assert daemon.ckctl("containers", "rm", "--keep-snapshot", "two").stdout == "two\n"
    assert daemon.ckctl("snapshots", "ls", "-q").stdout == "two\n"
    assert daemon.ckctl_json("containers", "ls") == []

    error = one_line_error(daemon.ckctl("containers", "rm", "missing", check=False))
    assert error == 'ckctl: missing: container "missing" in namespace "default": not found (not found)'
    error = one_line_error(daemon.ckctl("containers", "info", "missing", check=False))
    assert error == 'ckctl: container "missing" in namespace "default": not found (not found)'
    error = one_line_error(daemon.ckctl("containers", "ls", "id==", check=False))
    assert error.startswith("ckctl: filters: parse error: [id==]: expected value or quoted")


def test_events_shows_what_the_services_publish(daemon: Any, containers: Any) -> None:
    argv = [*CKCTL, "-a", daemon.address, "events", "namespace==watched"]
    with watching(
        argv, lambda: daemon.ckctl("namespaces", "label", "watched", "probe=1", namespace="watched")
    ) as watch:
        create(containers, "c1", namespace="watched", image="busybox")
        daemon.ckctl("containers", "rm", "c1", namespace="watched")
        lines = [watch.next().split(" ", 3) for _ in range(2)]
    assert [line[1:] for line in lines] == [
        ["watched", "/containers/create", '{"id":"c1","image":"busybox","runtime":{"name":"io.containerd.runc.v2"}}'],
        ["watched", "/containers/delete", '{"id":"c1"}'],
    ]
    assert lines[0][0].endswith("Z")


def test_events_with_a_bad_filter_is_one_line_error(daemon: Any) -> None:
    error = one_line_error(daemon.ckctl("events", "topic==", check=False))
    assert error.startswith("ckctl: filters: parse error: [topic==]") and error.endswith("(invalid argument)")


@pytest.mark.skipif(shutil.which("runc") is None or shutil.which("ctr") is None, reason="needs runc and ctr")
def test_rm_refuses_a_live_task_and_deletes_a_stopped_one_as_ctr(
    containerkitd: Any, registry: Any, tmp_path: Path
) -> None:
    namespace = "ckctl-rm"
    busybox = pushed_busybox(registry, tmp_path)
    ctr(containerkitd, "images", "pull", "--plain-http", busybox, namespace=namespace)
    ctr(containerkitd, "run", "-d", busybox, "sleeper", "sleep", "100", namespace=namespace)
    try:
        refused = containerkitd.ckctl("containers", "rm", "sleeper", check=False, namespace=namespace)
        assert one_line_error(refused) == "ckctl: sleeper: cannot delete a non stopped container: running"
        ctr(containerkitd, "tasks", "kill", "-s", "KILL", "sleeper", namespace=namespace)
        deadline = time.monotonic() + 20
        while "STOPPED" not in ctr(containerkitd, "tasks", "ls", namespace=namespace).stdout:
            assert time.monotonic() < deadline, "the killed task never stopped"
            time.sleep(0.05)
        assert containerkitd.ckctl("containers", "rm", "sleeper", namespace=namespace).stdout == "sleeper\n"
        assert containerkitd.ckctl("containers", "ls", "-q", namespace=namespace).stdout == ""
        assert ctr(containerkitd, "tasks", "ls", "-q", namespace=namespace).stdout == ""
    finally:
        ctr(containerkitd, "tasks", "rm", "-f", "sleeper", check=False, namespace=namespace)
        ctr(containerkitd, "containers", "rm", "sleeper", check=False, namespace=namespace)
        remove_namespace_dirs(namespace)
