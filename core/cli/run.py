"""ckctl run, as ``ctr run``: a container from an image, its task started and (unless ``-d``) attached.

The image is unpacked for the snapshotter, an active snapshot keyed by the container id is
prepared on its top layer, and the OCI spec is built here from the image config
(:func:`core.oci_spec.spec_from_image`); the user and its groups are looked up in the image's
/etc/passwd and /etc/group by mounting that snapshot read-only on this host for a moment (as
containerd). The container record is created under a short-lived lease, so garbage collection
cannot take the snapshot in between. Attached, the exit status of the container's process is
ckctl's; ``--rm`` then deletes the container and its snapshot too (the task is always deleted).
``--net`` names the networks in the container's label ``containerkit.io/networks``: the daemon's networks
service gives the task a network namespace attached to them (:mod:`core.services.networks`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.cli import containers as containers_cli
from core.cli import content as content_cli
from core.cli import images as images_cli
from core.cli import leases as lease_cli
from core.cli import snapshots as snapshot_cli
from core.cli import tasks as tasks_cli
from core.cli.client import Client, CliError
from core.errors import ContainerkitError
from core.types import Mount

if TYPE_CHECKING:
    from core.oci import ImageConfig

DEFAULT_RUNTIME = "io.containerd.runc.v2"
LEASE_EXPIRY = "24h"  # as containerd's client leases: long enough for any run, collected if ckctl dies


def add_commands(commands: Any) -> None:
    run = commands.add_parser("run", help="run a container from an image: ckctl run [OPTIONS] IMAGE ID [CMD ARG...]")
    run.add_argument("--rm", action="store_true", help="delete the container and its snapshot once it exits")
    run.add_argument("-d", "--detach", action="store_true", help="start it and return (prints nothing)")
    run.add_argument("-t", "--tty", action="store_true", help="give the container a terminal")
    run.add_argument("--env", action="append", default=[], metavar="K=V", help="set a variable (a bare K unsets it)")
    run.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="SPEC",
        help="type=bind,src=PATH,dst=PATH[,options=ro] (repeat)",
    )
    run.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="NAME[=ADDRESS]",
        help="join this network, with a fixed address if given (repeat; label containerkit.io/networks)",
    )
    run.add_argument(
        "--snapshotter",
        default=os.environ.get("CONTAINERKIT_SNAPSHOTTER") or snapshot_cli.DEFAULT_SNAPSHOTTER,
        help="snapshotter for the rootfs (env CONTAINERKIT_SNAPSHOTTER; default %(default)s)",
    )
    run.add_argument("--runtime", default=DEFAULT_RUNTIME, help="runtime name (default %(default)s)")
    run.add_argument("-u", "--user", default=None, help="name, uid, name:group or uid:gid (default: the image's)")
    run.add_argument("--cwd", default=None, help="working directory (default: the image's)")
    run.add_argument("--platform", default="", help="os/arch[/variant] to pick from an index (default: the host's)")
    run.add_argument("image", metavar="IMAGE")
    run.add_argument("id", metavar="ID")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="CMD [ARG...]")
    run.set_defaults(handler=run_container)


def run_container(client: Client, args: argparse.Namespace) -> int:
    """As ``ctr run`` (see the module doc); the container's exit status when attached, else 0."""
    from core import oci_spec

    if args.rm and args.detach:
        raise CliError("--rm and -d cannot be used together")
    try:
        mounts = [oci_spec.parse_mount(text) for text in args.mount]
    except ContainerkitError as err:
        raise CliError(str(err)) from None
    chain_id = images_cli.unpack(client, args.image, args.snapshotter, args.platform).chain_id
    config = _image_config(client, args.image, args.platform)
    _create_container(client, args, chain_id, config, mounts)
    try:
        if args.detach:
            _start_detached(client, args.id)
            return 0
        return _run_attached(client, args.id, args.tty)
    finally:
        if args.rm:
            with contextlib.suppress(CliError):  # the first error is the one to report
                containers_cli.remove(client, args.id, keep_snapshot=False)


def _image_config(client: Client, name: str, platform: str) -> ImageConfig:
    """The :class:`~core.oci.ImageConfig` of image ``name`` for ``platform`` ("" the host's), read from the
    content store."""
    from core import oci
    from core.api.containerd.services.content.v1 import content_pb2
    from core.types import Descriptor, Platform

    stub = content_cli.service_stub(client)

    def read(descriptor: Descriptor) -> bytes:
        request = content_pb2.ReadContentRequest(digest=descriptor.digest)
        with client.stream_errors():
            return b"".join(chunk.data for chunk in stub.Read(request, metadata=client.metadata()))

    target = images_cli.get_image(client, name).target
    try:
        matcher = oci.only(Platform.parse(platform)) if platform else None
        return oci.resolve_image(read, Descriptor(target.media_type, target.digest, target.size), matcher).config
    except ContainerkitError as err:
        raise CliError(f"image {name}: {err}") from None


def _create_container(
    client: Client, args: argparse.Namespace, chain_id: str, config: ImageConfig, mounts: Sequence[dict[str, Any]]
) -> None:
    """Prepare the snapshot ``args.id`` on ``chain_id`` and create the container with the spec for ``config``,
    both under a lease of their own (deleted after); the snapshot is removed again if the container is not
    created."""
    from google.protobuf import any_pb2

    from core import oci_spec
    from core.api.containerd.services.containers.v1 import containers_pb2
    from core.api.containerd.services.leases.v1 import leases_pb2
    from core.api.containerd.services.snapshots.v1 import snapshots_pb2
    from core.services._convert import mounts_of

    leases, snapshots = lease_cli.service_stub(client), snapshot_cli.service_stub(client)
    lease = f"ckctl-run-{uuid.uuid4().hex}"
    client.call(leases.Create, leases_pb2.CreateRequest(id=lease, labels=lease_cli.expiry_label(LEASE_EXPIRY)))
    try:
        prepare = snapshots_pb2.PrepareSnapshotRequest(snapshotter=args.snapshotter, key=args.id, parent=chain_id)
        rootfs = mounts_of(client.call(snapshots.Prepare, prepare, lease=lease).mounts)
        try:
            spec = _spec(client, args, config, mounts, rootfs)
            container = containers_pb2.Container(
                id=args.id,
                image=args.image,
                runtime=containers_pb2.Container.Runtime(name=args.runtime),
                spec=any_pb2.Any(type_url=oci_spec.SPEC_TYPE_URL, value=json.dumps(spec).encode()),
                snapshotter=args.snapshotter,
                snapshot_key=args.id,
                labels=_labels(args),
            )
            stub = client.stub(containers_pb2, "Containers")
            client.call(stub.Create, containers_pb2.CreateContainerRequest(container=container))
        except BaseException:
            remove = snapshots_pb2.RemoveSnapshotRequest(snapshotter=args.snapshotter, key=args.id)
            with contextlib.suppress(CliError):  # the first error is the one to report
                client.call(snapshots.Remove, remove)
            raise
    finally:
        with contextlib.suppress(CliError):
            client.call(leases.Delete, leases_pb2.DeleteRequest(id=lease))


def _labels(args: argparse.Namespace) -> dict[str, str]:
    """The container's labels: :data:`~core.network.NETWORKS_LABEL` naming the ``--net`` networks."""
    from core.network import NETWORKS_LABEL

    return {NETWORKS_LABEL: ",".join(args.net)} if args.net else {}


def _spec(
    client: Client,
    args: argparse.Namespace,
    config: ImageConfig,
    mounts: Sequence[dict[str, Any]],
    rootfs: Sequence[Mount],
) -> dict[str, Any]:
    """The container's OCI spec, with the rootfs mounted for the while to look the user and its groups up."""
    from core import oci_spec

    try:
        with _mounted_readonly(rootfs) as root:
            spec = oci_spec.spec_from_image(
                config,
                root,
                id=args.id,
                namespace=client.namespace,
                args=args.args,
                env=args.env,
                mounts=mounts,
                terminal=args.tty,
                cwd=args.cwd,
                user=args.user,
            )
    except ContainerkitError as err:
        raise CliError(str(err)) from None
    if args.tty:
        tasks_cli.set_console_size(spec["process"])
    return spec


@contextlib.contextmanager
def _mounted_readonly(mounts: Sequence[Mount]) -> Iterator[Path]:
    """``mounts`` on a temporary directory for reading, a lone overlay read-only (containerd's
    ``tryReadonlyMounts``: the snapshot is still an active one)."""
    from core.mount import temp_mount

    if len(mounts) == 1 and mounts[0].type == "overlay":
        mounts = [Mount(mounts[0].type, mounts[0].source, (*mounts[0].options, "ro"), mounts[0].target)]
    try:
        with temp_mount(mounts, prefix="ckctl-rootfs-") as root:
            yield root
    except OSError as err:
        raise CliError(f"mounting the container's rootfs to resolve its user: {err}") from None


def _start_detached(client: Client, id: str) -> None:
    """Create and start the task with no stdio (its output goes nowhere, as nobody reads it)."""
    from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb

    stub = tasks_cli.service_stub(client)
    client.call(stub.Create, pb.CreateTaskRequest(container_id=id))
    client.call(stub.Start, pb.StartRequest(container_id=id))


def _run_attached(client: Client, id: str, terminal: bool) -> int:
    """Create the task on FIFOs, run it attached, delete it; its exit status."""
    from core.api.containerd.services.tasks.v1 import tasks_pb2 as pb

    stub = tasks_cli.service_stub(client)
    with tasks_cli.Stdio(terminal) as stdio:
        client.call(stub.Create, pb.CreateTaskRequest(container_id=id, **stdio.fields()))
        try:
            return tasks_cli.attach(client, id, "", stdio)
        finally:
            with contextlib.suppress(CliError):  # the first error is the one to report
                client.call(stub.Delete, pb.DeleteTaskRequest(container_id=id))
