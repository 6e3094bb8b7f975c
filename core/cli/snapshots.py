"""ckctl snapshots ls|info|rm|usage|prepare|view|commit|mounts|tree|label, as ``ctr snapshots``.

Every verb acts on one snapshotter (``--snapshotter``, default ``overlayfs``). As with ctr, the
snapshots that ``prepare`` and ``commit`` create carry a ``containerd.io/gc.root`` label, so garbage
collection keeps them until they are removed; so do those of ``view`` here (ctr leaves views to
the next collection).
"""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from typing import Any

from core.cli.args import add_listing_arguments, for_each, label_changes, parse_labels
from core.cli.client import Client
from core.cli.output import print_json
from core.cli.records import human_size, labels_text, print_records, timestamp_text

DEFAULT_SNAPSHOTTER = "overlayfs"
GC_ROOT = "containerd.io/gc.root"
KINDS = {1: "view", 2: "active", 3: "committed"}  # snapshots.v1.Kind

SNAPSHOT_COLUMNS = {
    "KEY": lambda snapshot: snapshot["name"],
    "PARENT": lambda snapshot: snapshot["parent"],
    "KIND": lambda snapshot: snapshot["kind"],
}
USAGE_COLUMNS = {
    "KEY": lambda usage: usage["name"],
    "SIZE": lambda usage: human_size(usage["size"]),
    "INODES": lambda usage: usage["inodes"],
}


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("snapshots", aliases=["snapshot"], help="manage snapshots")
    parser.add_argument(
        "--snapshotter",
        default=os.environ.get("CONTAINERKIT_SNAPSHOTTER") or DEFAULT_SNAPSHOTTER,
        help="snapshotter to act on (env CONTAINERKIT_SNAPSHOTTER; default %(default)s)",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    ls = verbs.add_parser("ls", aliases=["list"], help="list snapshots (KEY PARENT KIND)")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="containerd filters, e.g. kind==committed")
    add_listing_arguments(ls, "print keys only")
    ls.set_defaults(handler=list_snapshots)

    info = verbs.add_parser("info", help="print a snapshot as JSON")
    info.add_argument("key")
    info.set_defaults(handler=show_info)

    rm = verbs.add_parser("rm", aliases=["remove", "delete", "del"], help="remove snapshots (children first)")
    rm.add_argument("keys", nargs="+", metavar="KEY")
    rm.set_defaults(handler=remove_snapshots)

    usage = verbs.add_parser("usage", help="disk usage of snapshots, excluding parents (KEY SIZE INODES)")
    usage.add_argument("keys", nargs="*", metavar="KEY", help="default: every snapshot")
    add_listing_arguments(usage, "print keys only")
    usage.set_defaults(handler=show_usage)

    for verb, help_text in (
        ("prepare", "create an active snapshot KEY on committed PARENT (none: empty)"),
        ("view", "create a read-only view KEY of committed PARENT"),
    ):
        creator = verbs.add_parser(verb, help=help_text)
        creator.add_argument("key")
        creator.add_argument("parent", nargs="?", default="")
        creator.add_argument("-t", "--target", default="", metavar="PATH", help="print mount commands for PATH")
        creator.add_argument("--mounts", action="store_true", help="print the mounts as JSON")
        _add_label_option(creator)
        creator.set_defaults(handler=create_snapshot)

    commit = verbs.add_parser("commit", help="commit active snapshot KEY as NAME")
    commit.add_argument("name")
    commit.add_argument("key")
    _add_label_option(commit)
    commit.set_defaults(handler=commit_snapshot)

    mounts = verbs.add_parser("mounts", aliases=["mount", "m"], help="print the mount commands of KEY onto TARGET")
    mounts.add_argument("target")
    mounts.add_argument("key")
    mounts.add_argument("--json", action="store_true", help="print the mounts as JSON")
    mounts.set_defaults(handler=show_mounts)

    tree = verbs.add_parser("tree", help="print the snapshots as a tree of parents and children")
    tree.set_defaults(handler=show_tree)

    label = verbs.add_parser("label", help="set labels of a snapshot (an empty value clears one)")
    label.add_argument("key")
    label.add_argument("labels", nargs="+", metavar="KEY=VALUE")
    label.set_defaults(handler=label_snapshot)


def _add_label_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a label (repeat)")


def service_stub(client: Client) -> Any:
    from core.api.containerd.services.snapshots.v1 import snapshots_pb2

    return client.stub(snapshots_pb2, "Snapshots")


def _pb() -> Any:
    from core.api.containerd.services.snapshots.v1 import snapshots_pb2

    return snapshots_pb2


def snapshot_record(info: Any) -> dict[str, Any]:
    """A ``snapshots.v1.Info`` as the record ``ls --json`` and ``info`` print."""
    return {
        "name": info.name,
        "parent": info.parent,
        "kind": KINDS.get(info.kind, "unknown"),
        "labels": dict(info.labels),
        "created_at": timestamp_text(info.created_at),
        "updated_at": timestamp_text(info.updated_at),
    }


def mount_record(mount: Any) -> dict[str, Any]:
    """A ``containerd.types.Mount`` as ``--mounts`` and ``mounts --json`` print it."""
    return {"type": mount.type, "source": mount.source, "target": mount.target, "options": list(mount.options)}


def _listed(client: Client, snapshotter: str, filters: list[str]) -> list[Any]:
    """Every Info of the streamed List (read inside the call, so a failure is reported as a CliError)."""
    request = _pb().ListSnapshotsRequest(snapshotter=snapshotter, filters=filters)

    def read_all(request: Any, **options: Any) -> list[Any]:
        return [info for response in service_stub(client).List(request, **options) for info in response.info]

    result: list[Any] = client.call(read_all, request)
    return result


def _labels(args: argparse.Namespace) -> dict[str, str]:
    """``--label`` values over a ``containerd.io/gc.root`` label of now, as ctr sets it."""
    return {GC_ROOT: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), **parse_labels(args.label)}


def _print_mounts(target: str, mounts: Any) -> None:
    for mount in mounts:
        print(f"mount -t {mount.type} {mount.source} {target} -o {','.join(mount.options)}")


def list_snapshots(client: Client, args: argparse.Namespace) -> int:
    records = [snapshot_record(info) for info in _listed(client, args.snapshotter, args.filters)]
    print_records(records, SNAPSHOT_COLUMNS, args, key="name")
    return 0


def show_info(client: Client, args: argparse.Namespace) -> int:
    request = _pb().StatSnapshotRequest(snapshotter=args.snapshotter, key=args.key)
    print_json(snapshot_record(client.call(service_stub(client).Stat, request).info))
    return 0


def remove_snapshots(client: Client, args: argparse.Namespace) -> int:
    stub, pb = service_stub(client), _pb()

    def remove(key: str) -> None:
        client.call(stub.Remove, pb.RemoveSnapshotRequest(snapshotter=args.snapshotter, key=key))

    for_each(args.keys, remove)
    return 0


def show_usage(client: Client, args: argparse.Namespace) -> int:
    stub, pb = service_stub(client), _pb()
    keys = args.keys or [info.name for info in _listed(client, args.snapshotter, [])]
    records = []
    for key in keys:
        usage = client.call(stub.Usage, pb.UsageRequest(snapshotter=args.snapshotter, key=key))
        records.append({"name": key, "size": usage.size, "inodes": usage.inodes})
    print_records(records, USAGE_COLUMNS, args, key="name")
    return 0


def create_snapshot(client: Client, args: argparse.Namespace) -> int:
    stub, pb = service_stub(client), _pb()
    fields = {"snapshotter": args.snapshotter, "key": args.key, "parent": args.parent, "labels": _labels(args)}
    if args.verb == "prepare":
        mounts = client.call(stub.Prepare, pb.PrepareSnapshotRequest(**fields)).mounts
    else:
        mounts = client.call(stub.View, pb.ViewSnapshotRequest(**fields)).mounts
    if args.target:
        _print_mounts(args.target, mounts)
    if args.mounts:
        print_json([mount_record(mount) for mount in mounts])
    return 0


def commit_snapshot(client: Client, args: argparse.Namespace) -> int:
    request = _pb().CommitSnapshotRequest(
        snapshotter=args.snapshotter, name=args.name, key=args.key, labels=_labels(args)
    )
    client.call(service_stub(client).Commit, request)
    return 0


def show_mounts(client: Client, args: argparse.Namespace) -> int:
    request = _pb().MountsRequest(snapshotter=args.snapshotter, key=args.key)
    mounts = client.call(service_stub(client).Mounts, request).mounts
    if args.json:
        print_json([mount_record(mount) for mount in mounts])
    else:
        _print_mounts(args.target, mounts)
    return 0


def show_tree(client: Client, args: argparse.Namespace) -> int:
    """Each snapshot without parent, then its children indented below it (``\\_``), as ``ctr snapshots tree``."""
    children: dict[str, list[str]] = {}
    for info in _listed(client, args.snapshotter, []):
        children.setdefault(info.parent, []).append(info.name)
        children.setdefault(info.name, [])

    def show(name: str, level: int) -> None:
        branch = "  " * level + ("\\_" if level else "")
        print(f"{branch} {name}")
        for child in children[name]:
            show(child, level + 1)

    for name in children.get("", []):
        show(name, 0)
    return 0


def label_snapshot(client: Client, args: argparse.Namespace) -> int:
    from google.protobuf import field_mask_pb2

    pb = _pb()
    labels, paths = label_changes(args.labels)
    request = pb.UpdateSnapshotRequest(
        snapshotter=args.snapshotter,
        info=pb.Info(name=args.key, labels=labels),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )
    print(labels_text(client.call(service_stub(client).Update, request).info.labels))
    return 0
