"""ckctl containers ls|info|rm|label, as ``ctr containers``.

``rm`` acts as ctr's: a container whose task is stopped (or only created) loses the task first, one
with a live task is refused; the container's snapshot is removed with it unless ``--keep-snapshot``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from core.cli import rpc
from core.cli.args import add_listing_arguments, for_each, label_changes
from core.cli.client import CALL_TIMEOUT_SECONDS, Client, CliError, describe_rpc_error
from core.cli.output import print_json
from core.cli.records import labels_text, print_records, timestamp_text

CONTAINER_COLUMNS = {
    "CONTAINER": lambda container: container["id"],
    "IMAGE": lambda container: container["image"] or "-",
    "RUNTIME": lambda container: container["runtime"]["name"],
}


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("containers", aliases=["container", "c"], help="manage containers")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    ls = verbs.add_parser("ls", aliases=["list"], help="list containers (CONTAINER IMAGE RUNTIME)")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="containerd filters, e.g. labels.team==infra")
    add_listing_arguments(ls, "print ids only")
    ls.set_defaults(handler=list_containers)

    info = verbs.add_parser("info", help="print a container as JSON")
    info.add_argument("id")
    info.add_argument("--spec", action="store_true", help="print only the OCI spec")
    info.set_defaults(handler=show_info)

    rm = verbs.add_parser("rm", aliases=["remove", "delete", "del"], help="remove containers and their snapshots")
    rm.add_argument("ids", nargs="+", metavar="ID")
    rm.add_argument("--keep-snapshot", action="store_true", help="keep each container's snapshot")
    rm.set_defaults(handler=remove_containers)

    label = verbs.add_parser("label", help="set labels of a container (an empty value clears one)")
    label.add_argument("id")
    label.add_argument("labels", nargs="+", metavar="KEY=VALUE")
    label.set_defaults(handler=label_container)


def service_stub(client: Client) -> Any:
    from core.api.containerd.services.containers.v1 import containers_pb2

    return client.stub(containers_pb2, "Containers")


def _pb() -> Any:
    from core.api.containerd.services.containers.v1 import containers_pb2

    return containers_pb2


def _any_record(value: Any) -> dict[str, Any]:
    return {"type_url": value.type_url, "size": len(value.value)}


def container_record(container: Any, *, spec: bool = True) -> dict[str, Any]:
    """A ``containers.v1.Container`` as ``info`` prints it (``ls --json`` leaves the spec out)."""
    runtime: dict[str, Any] = {"name": container.runtime.name}
    if container.runtime.HasField("options"):
        runtime["options"] = _any_record(container.runtime.options)
    record = {
        "id": container.id,
        "image": container.image,
        "runtime": runtime,
        "snapshotter": container.snapshotter,
        "snapshot_key": container.snapshot_key,
        "labels": dict(container.labels),
        "extensions": {name: _any_record(value) for name, value in container.extensions.items()},
        "created_at": timestamp_text(container.created_at),
        "updated_at": timestamp_text(container.updated_at),
    }
    if spec:
        record["spec_type_url"] = container.spec.type_url
        record["spec"] = _spec(container)
    return record


def _spec(container: Any) -> Any:
    """The container's spec as JSON (its raw text when it is not JSON; None without spec)."""
    if not container.HasField("spec"):
        return None
    try:
        return json.loads(container.spec.value)
    except ValueError:
        return container.spec.value.decode(errors="replace")


def _get(client: Client, id: str) -> Any:
    return client.call(service_stub(client).Get, _pb().GetContainerRequest(id=id)).container


def list_containers(client: Client, args: argparse.Namespace) -> int:
    response = client.call(service_stub(client).List, _pb().ListContainersRequest(filters=args.filters))
    records = [container_record(container, spec=False) for container in response.containers]
    print_records(records, CONTAINER_COLUMNS, args, key="id")
    return 0


def show_info(client: Client, args: argparse.Namespace) -> int:
    container = _get(client, args.id)
    print_json(_spec(container) if args.spec else container_record(container))
    return 0


def remove_containers(client: Client, args: argparse.Namespace) -> int:
    for_each(args.ids, lambda id: remove(client, id, keep_snapshot=args.keep_snapshot))
    return 0


def remove(client: Client, id: str, *, keep_snapshot: bool) -> None:
    """Delete the container ``id`` as ``ctr containers rm`` does (see the module doc)."""
    from core.api.containerd.services.snapshots.v1 import snapshots_pb2

    container = _get(client, id)
    _delete_stopped_task(client, id)
    if container.snapshot_key and not keep_snapshot:
        request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=container.snapshotter, key=container.snapshot_key)
        _ignoring_not_found(client, client.stub(snapshots_pb2, "Snapshots").Remove, request)
    client.call(service_stub(client).Delete, _pb().DeleteContainerRequest(id=id))


def _delete_stopped_task(client: Client, id: str) -> None:
    """Delete the task of container ``id`` when it is stopped or only created; CliError while it
    lives; nothing when it has none (or the daemon runs no tasks service)."""
    from core.api.containerd.services.tasks.v1 import tasks_pb2
    from core.api.containerd.types.task import task_pb2

    stub = client.stub(tasks_pb2, "Tasks")
    response = _ignoring_not_found(client, stub.Get, tasks_pb2.GetRequest(container_id=id))
    if response is None:
        return
    status = response.process.status
    if status not in (task_pb2.STOPPED, task_pb2.CREATED):
        raise CliError(f"cannot delete a non stopped container: {task_pb2.Status.Name(status).lower()}")
    client.call(stub.Delete, tasks_pb2.DeleteTaskRequest(container_id=id))


def _ignoring_not_found(client: Client, method: Any, request: Any) -> Any:
    """``client.call`` answering None for NotFound (and for a service the daemon does not run)."""
    try:
        return method(request, metadata=client.metadata(), timeout=CALL_TIMEOUT_SECONDS)
    except rpc.RpcError as err:
        if err.code() in (rpc.StatusCode.NOT_FOUND, rpc.StatusCode.UNIMPLEMENTED):
            return None
        raise CliError(describe_rpc_error(err, client.address)) from None


def label_container(client: Client, args: argparse.Namespace) -> int:
    from google.protobuf import field_mask_pb2

    pb = _pb()
    labels, paths = label_changes(args.labels)
    request = pb.UpdateContainerRequest(
        container=pb.Container(id=args.id, labels=labels), update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    print(labels_text(client.call(service_stub(client).Update, request).container.labels))
    return 0
