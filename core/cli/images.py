"""ckctl images ls|rm|label|tag|inspect|unpack|mount|unmount|pull|push|export|import|convert|sign|verify, as
``ctr images``: the namespace's image records (a name pointing at a target descriptor), unpacking them into
snapshots, mounting an image's root filesystem on this host, and moving images between the daemon and
registries or archive files through the daemon's transfer service (progress shown by :mod:`core.cli.progress`)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, BinaryIO

from core.cli import leases as lease_cli
from core.cli import snapshots as snapshot_cli
from core.cli.args import add_listing_arguments, for_each, label_changes, parse_labels
from core.cli.client import Client, CliError
from core.cli.login import local_errors, stored_credentials, user_credentials
from core.cli.output import print_json
from core.cli.records import human_size, labels_cell, labels_text, print_records, timestamp_text

IMAGE_COLUMNS = {
    "REF": lambda image: image["name"],
    "TYPE": lambda image: image["target"]["media_type"],
    "DIGEST": lambda image: image["target"]["digest"],
    "SIZE": lambda image: human_size(image["target"]["size"]),
    "LABELS": labels_cell,
}

COMPRESSIONS = ("zstd", "gzip")
IMPORT_CHUNK_SIZE = 1 << 20

LABEL_MOUNT_TARGET = "containerkit.io/mount.target"
"""Label of a lease made by ``ckctl images mount``: the absolute path the snapshot is mounted at."""


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("images", aliases=["image", "i"], help="manage images")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    ls = verbs.add_parser("ls", aliases=["list"], help="list images (REF TYPE DIGEST SIZE LABELS)")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="containerd filters, e.g. name~=alpine")
    add_listing_arguments(ls, "print names only")
    ls.set_defaults(handler=list_images)

    rm = verbs.add_parser("rm", aliases=["remove", "delete", "del"], help="remove images")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.add_argument("--sync", action="store_true", help="collect garbage before returning")
    rm.set_defaults(handler=remove_images)

    label = verbs.add_parser("label", help="set labels of an image (an empty value clears one)")
    label.add_argument("name")
    label.add_argument("labels", nargs="+", metavar="KEY=VALUE")
    label.set_defaults(handler=label_image)

    tag = verbs.add_parser("tag", help="name SOURCE's target (and labels) again as each TARGET")
    tag.add_argument("source")
    tag.add_argument("targets", nargs="+", metavar="TARGET")
    tag.add_argument("--force", action="store_true", help="replace a TARGET that exists")
    tag.set_defaults(handler=tag_image)

    inspect = verbs.add_parser("inspect", help="print an image record as JSON")
    inspect.add_argument("name")
    inspect.set_defaults(handler=inspect_image)

    unpack = verbs.add_parser("unpack", help="unpack an image's layers (in the content store) into snapshots")
    _add_snapshotter_argument(unpack, default="", what="the daemon's default, overlayfs")
    _add_platform_argument(unpack)
    unpack.add_argument("name", metavar="REF")
    unpack.set_defaults(handler=unpack_image)

    mount = verbs.add_parser("mount", help="unpack an image if needed and mount its root filesystem at TARGET")
    _add_snapshotter_argument(mount)
    _add_platform_argument(mount)
    mount.add_argument("--rw", action="store_true", help="mount read-write (an active snapshot) instead of a view")
    mount.add_argument("name", metavar="REF")
    mount.add_argument("target", metavar="TARGET", help="an existing directory")
    mount.set_defaults(handler=mount_image)

    unmount = verbs.add_parser("unmount", aliases=["umount"], help="unmount what images mount put at TARGET")
    _add_snapshotter_argument(unmount)
    unmount.add_argument("--rm", action="store_true", help="also remove the snapshot and its lease")
    unmount.add_argument("target", metavar="TARGET")
    unmount.set_defaults(handler=unmount_image)

    pull = verbs.add_parser("pull", help="fetch an image from a registry and unpack it, showing progress")
    _add_registry_arguments(pull)
    _add_platforms_argument(pull)
    pull.add_argument("--all-platforms", action="store_true", help="fetch every platform (unpack the host's)")
    _add_snapshotter_argument(pull, default="", what="the daemon's default, overlayfs")
    pull.add_argument("--no-unpack", action="store_true", help="fetch only, do not unpack")
    pull.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label the image")
    pull.add_argument("--signatures", action="store_true", help="also fetch the image's signatures")
    pull.add_argument("--max-concurrent-downloads", type=int, default=0, metavar="N", help="layers fetched at once")
    pull.add_argument("ref", metavar="REF")
    pull.set_defaults(handler=pull_image)

    push = verbs.add_parser("push", help="send a local image (LOCAL_REF, default REF) to a registry as REF")
    _add_registry_arguments(push)
    _add_platforms_argument(push)
    push.add_argument("--compression", choices=COMPRESSIONS, default="", help="recompress the layers first")
    push.add_argument("--chunk-size", type=int, default=0, metavar="BYTES", help="upload blobs in chunks")
    push.add_argument("ref", metavar="REF")
    push.add_argument("local_ref", metavar="LOCAL_REF", nargs="?", default="")
    push.set_defaults(handler=push_image)

    export = verbs.add_parser("export", help="write images as an OCI image layout tar (FILE - for stdout)")
    _add_platforms_argument(export)
    export.add_argument("file", metavar="FILE")
    export.add_argument("refs", metavar="REF", nargs="+")
    export.set_defaults(handler=export_images)

    import_ = verbs.add_parser("import", help="import an OCI layout or docker-archive tar (FILE - for stdin)")
    import_.add_argument("--base-name", default="", help="name for images the archive leaves unnamed")
    _add_snapshotter_argument(import_, default="", what="the daemon's default, overlayfs")
    import_.add_argument("--no-unpack", action="store_true", help="import only, do not unpack")
    import_.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label the images")
    import_.add_argument("file", metavar="FILE")
    import_.set_defaults(handler=import_images)

    convert = verbs.add_parser("convert", help="recompress an image's layers into a new image")
    convert.add_argument("--compression", choices=COMPRESSIONS, required=True)
    convert.add_argument("--level", type=int, default=0, help="compression level (default: the codec's)")
    convert.add_argument("source", metavar="SRC")
    convert.add_argument("target", metavar="DST")
    convert.set_defaults(handler=convert_image)

    sign = verbs.add_parser("sign", help="sign an image's manifest with a private key (PEM)")
    sign.add_argument("--key", required=True, help="PEM private key (Ed25519 or ECDSA P-256)")
    sign.add_argument("name", metavar="REF")
    sign.set_defaults(handler=sign_image)

    verify = verbs.add_parser("verify", help="check an image's signatures against public keys (PEM)")
    verify.add_argument("--key", action="append", required=True, help="PEM public key (repeatable)")
    verify.add_argument("name", metavar="REF")
    verify.set_defaults(handler=verify_image)


def _add_snapshotter_argument(parser: argparse.ArgumentParser, default: str = "overlayfs", what: str = "") -> None:
    parser.add_argument("--snapshotter", default=default, help=f"snapshotter to use (default: {what or default})")


def _add_platform_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--platform", default="", help="os/arch[/variant] to pick from an index (default: the host's)")


def _add_registry_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plain-http", action="store_true", help="talk plain HTTP to the registry")
    parser.add_argument(
        "--user",
        "-u",
        default="",
        metavar="USER[:PASS]",
        help="credentials (default: those ckctl login stored); a PASS here is visible to ps until ckctl starts up",
    )
    parser.add_argument("--password-stdin", action="store_true", help="read the --user's password from stdin")


def _add_platforms_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--platform", action="append", default=[], help="os/arch[/variant] (repeatable; default: the host's)"
    )


def service_stub(client: Client) -> Any:
    from core.api.containerd.services.images.v1 import images_pb2

    return client.stub(images_pb2, "Images")


def image_record(image: Any) -> dict[str, Any]:
    """An ``images.v1.Image`` as the record ``ls --json`` and ``inspect`` print."""
    target = image.target
    return {
        "name": image.name,
        "target": {
            "media_type": target.media_type,
            "digest": target.digest,
            "size": target.size,
            "annotations": dict(target.annotations),
        },
        "labels": dict(image.labels),
        "created_at": timestamp_text(image.created_at),
        "updated_at": timestamp_text(image.updated_at),
    }


def get_image(client: Client, name: str) -> Any:
    from core.api.containerd.services.images.v1 import images_pb2 as pb

    return client.call(service_stub(client).Get, pb.GetImageRequest(name=name)).image


def list_images(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.images.v1 import images_pb2 as pb

    response = client.call(service_stub(client).List, pb.ListImagesRequest(filters=args.filters))
    print_records([image_record(image) for image in response.images], IMAGE_COLUMNS, args, key="name")
    return 0


def remove_images(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.images.v1 import images_pb2 as pb

    stub = service_stub(client)

    def remove(name: str) -> None:
        client.call(stub.Delete, pb.DeleteImageRequest(name=name, sync=args.sync))

    for_each(args.names, remove)
    return 0


def label_image(client: Client, args: argparse.Namespace) -> int:
    from google.protobuf import field_mask_pb2

    from core.api.containerd.services.images.v1 import images_pb2 as pb

    labels, paths = label_changes(args.labels)
    request = pb.UpdateImageRequest(
        image=pb.Image(name=args.name, labels=labels), update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    print(labels_text(client.call(service_stub(client).Update, request).image.labels))
    return 0


def tag_image(client: Client, args: argparse.Namespace) -> int:
    from google.protobuf import field_mask_pb2

    from core.api.containerd.services.images.v1 import images_pb2 as pb

    stub = service_stub(client)
    source = get_image(client, args.source)

    def tag(name: str) -> None:
        image = pb.Image(name=name, target=source.target, labels=source.labels)
        if args.force and _exists(client, name):
            mask = field_mask_pb2.FieldMask(paths=["target", "labels"])
            client.call(stub.Update, pb.UpdateImageRequest(image=image, update_mask=mask))
        else:
            client.call(stub.Create, pb.CreateImageRequest(image=image))

    for_each(args.targets, tag)
    return 0


def _exists(client: Client, name: str) -> bool:
    from core.api.containerd.services.images.v1 import images_pb2 as pb

    # A filter, not Get: a missing image is an answer here, not an error.
    request = pb.ListImagesRequest(filters=[f"name=={json.dumps(name)}"])
    return bool(client.call(service_stub(client).List, request).images)


def inspect_image(client: Client, args: argparse.Namespace) -> int:
    print_json(image_record(get_image(client, args.name)))
    return 0


def unpack(client: Client, name: str, snapshotter: str, platform: str) -> Any:
    from core.api.containerkit.services.unpack.v1 import unpack_pb2 as pb

    request = pb.UnpackRequest(image=name, snapshotter=snapshotter, platform=platform)
    return client.call(client.stub(pb, "Unpack").Unpack, request)


def unpack_image(client: Client, args: argparse.Namespace) -> int:
    result = unpack(client, args.name, args.snapshotter, args.platform)
    print(f"{args.name}: {result.chain_id} ({result.layers} layers, {result.applied} applied now)")
    return 0


def mount_lease_id(target: str) -> str:
    """The id of the lease that keeps the snapshot mounted at absolute path ``target``: lease ids must be
    identifiers, so it is derived from the path (which the lease's labels name)."""
    return "ckctl-mount-" + hashlib.sha256(target.encode()).hexdigest()[:32]


def mount_image(client: Client, args: argparse.Namespace) -> int:
    """As ``ctr images mount``: the snapshot is keyed by TARGET's absolute path, held by a lease
    (expiring in 24 hours) created for it, and mounted here; prints the chain id, then TARGET."""
    from core import mount as mounting
    from core.api.containerd.services.leases.v1 import leases_pb2
    from core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
    from core.metadata.images import LABEL_GC_REF_SNAPSHOT
    from core.services._convert import mounts_of

    target = os.path.abspath(args.target)
    if not os.path.isdir(target):
        raise CliError(f"mount target {target} is not a directory")
    snapshots, leases = snapshot_cli.service_stub(client), lease_cli.service_stub(client)
    lease = mount_lease_id(target)
    made_lease = made_snapshot = False
    if not _lease_exists(client, lease):
        labels = {
            **lease_cli.expiry_label("24h"),
            LABEL_GC_REF_SNAPSHOT + args.snapshotter: target,
            LABEL_MOUNT_TARGET: target,
        }
        client.call(leases.Create, leases_pb2.CreateRequest(id=lease, labels=labels))
        made_lease = True
    try:
        # The lease holds the key before the snapshot exists, so no collection can come between.
        resource = leases_pb2.Resource(id=target, type=f"snapshots/{args.snapshotter}")
        client.call(leases.AddResource, leases_pb2.AddResourceRequest(id=lease, resource=resource))
        chain_id = unpack(client, args.name, args.snapshotter, args.platform).chain_id
        print(chain_id, flush=True)
        mounts = _probe(client, snapshots.Mounts, pb.MountsRequest(snapshotter=args.snapshotter, key=target))
        if mounts is None:
            create, message = (
                (snapshots.Prepare, pb.PrepareSnapshotRequest) if args.rw else (snapshots.View, pb.ViewSnapshotRequest)
            )
            mounts = client.call(create, message(snapshotter=args.snapshotter, key=target, parent=chain_id))
            made_snapshot = True
        try:
            mounting.mount_all(mounts_of(mounts.mounts), target)
        except OSError as err:
            raise CliError(f"mounting {args.name} at {target}: {err}") from None
    except BaseException:
        with contextlib.suppress(CliError):  # the first error is the one to report
            if made_snapshot:
                client.call(snapshots.Remove, pb.RemoveSnapshotRequest(snapshotter=args.snapshotter, key=target))
            if made_lease:
                client.call(leases.Delete, leases_pb2.DeleteRequest(id=lease))
        raise
    print(target)
    return 0


def unmount_image(client: Client, args: argparse.Namespace) -> int:
    """As ``ctr images unmount``: unmount everything at TARGET; with ``--rm`` also delete the lease and
    the snapshot that ``images mount`` made for it (absent ones are fine). Prints TARGET."""
    from core import mount as mounting
    from core.api.containerd.services.leases.v1 import leases_pb2
    from core.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb

    target = os.path.abspath(args.target)
    try:
        mounting.unmount_all(target)
    except OSError as err:
        raise CliError(f"unmounting {target}: {err}") from None
    if args.rm:
        lease = mount_lease_id(target)
        if _lease_exists(client, lease):
            client.call(lease_cli.service_stub(client).Delete, leases_pb2.DeleteRequest(id=lease))
        snapshots = snapshot_cli.service_stub(client)
        if _probe(client, snapshots.Stat, pb.StatSnapshotRequest(snapshotter=args.snapshotter, key=target)):
            client.call(snapshots.Remove, pb.RemoveSnapshotRequest(snapshotter=args.snapshotter, key=target))
    print(target)
    return 0


def _lease_exists(client: Client, lease: str) -> bool:
    from core.api.containerd.services.leases.v1 import leases_pb2

    request = leases_pb2.ListRequest(filters=[f"id=={json.dumps(lease)}"])
    return bool(client.call(lease_cli.service_stub(client).List, request).leases)


def _probe(client: Client, method: Any, request: Any) -> Any | None:
    """The answer of a call that fails when its snapshot does not exist (as it should), or None then."""
    try:
        return client.call(method, request)
    except CliError:
        return None


def transfer_stub(client: Client) -> Any:
    from core.api.containerkit.services.transfer.v1 import transfer_pb2

    return client.stub(transfer_pb2, "Transfer")


def registry_credentials(args: argparse.Namespace) -> tuple[str, str]:
    """``--user USER[:PASS]`` (``--password-stdin``) when given, else what ``ckctl login`` stored for the
    registry of ``args.ref``."""
    from core.distribution.reference import Reference

    if args.password_stdin and ":" in args.user:
        raise CliError("--password-stdin and --user USER:PASS are exclusive: give --user USER")
    if args.user:
        return user_credentials(args.user, args.password_stdin)
    if args.password_stdin:
        raise CliError("--password-stdin needs --user USER")
    with local_errors():
        domain = Reference.parse(args.ref).domain
    return stored_credentials(domain)


def follow_progress(client: Client, events: Iterator[Any]) -> Any:
    """Render a Pull or Push progress stream as it comes; return the image its last event carries."""
    from core.cli.progress import progress_renderer

    image = None
    with client.stream_errors(), progress_renderer() as render:
        for event in events:
            render(event)
            if event.HasField("image"):
                image = event.image
    if image is None:
        raise CliError("the transfer ended without an image")
    return image


def pull_image(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerkit.services.transfer.v1 import transfer_pb2 as pb

    username, password = registry_credentials(args)
    request = pb.PullRequest(
        ref=args.ref,
        platforms=["all"] if args.all_platforms else args.platform,
        snapshotter=args.snapshotter,
        skip_unpack=args.no_unpack,
        plain_http=args.plain_http,
        username=username,
        password=password,
        labels=parse_labels(args.label),
        max_concurrent=args.max_concurrent_downloads,
        signatures=args.signatures,
    )
    follow_progress(client, transfer_stub(client).Pull(request, metadata=client.metadata()))
    return 0


def push_image(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerkit.services.transfer.v1 import transfer_pb2 as pb

    username, password = registry_credentials(args)
    request = pb.PushRequest(
        ref=args.ref,
        local_name=args.local_ref,
        platforms=args.platform,
        plain_http=args.plain_http,
        username=username,
        password=password,
        chunk_size=args.chunk_size,
        compression=args.compression,
    )
    follow_progress(client, transfer_stub(client).Push(request, metadata=client.metadata()))
    return 0


def export_images(client: Client, args: argparse.Namespace) -> int:
    """Stream the archive into FILE (removed again when the export fails) or stdout."""
    from core.api.containerkit.services.transfer.v1 import transfer_pb2 as pb

    chunks = transfer_stub(client).Export(
        pb.ExportRequest(names=args.refs, platforms=args.platform), metadata=client.metadata()
    )
    if args.file == "-":
        _write_chunks(client, chunks, sys.stdout.buffer)
        return 0
    try:
        with open(args.file, "wb") as out:
            _write_chunks(client, chunks, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(args.file)
        raise
    return 0


def _write_chunks(client: Client, chunks: Iterator[Any], out: BinaryIO) -> None:
    with client.stream_errors():
        for chunk in chunks:
            out.write(chunk.data)
    out.flush()


def import_images(client: Client, args: argparse.Namespace) -> int:
    """Send FILE (or stdin) in chunks after the options; print each imported image's name and digest."""
    from core.api.containerkit.services.transfer.v1 import transfer_pb2 as pb

    options = pb.ImportOptions(
        snapshotter=args.snapshotter,
        skip_unpack=args.no_unpack,
        base_name=args.base_name,
        labels=parse_labels(args.label),
    )

    def requests(source: BinaryIO) -> Iterator[Any]:
        yield pb.ImportChunk(options=options)
        while data := source.read(IMPORT_CHUNK_SIZE):
            yield pb.ImportChunk(data=data)

    with _input(args.file) as source:
        response = client.call(transfer_stub(client).Import, requests(source), timeout=None)
    for image in response.images:
        print(f"{image.name} {image.target.digest}")
    return 0


@contextlib.contextmanager
def _input(path: str) -> Iterator[BinaryIO]:
    """The file at ``path`` opened for reading (stdin's bytes for ``-``); CliError when it cannot be."""
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        source = open(path, "rb")  # noqa: SIM115 - closed below, after the error translation
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror or err}") from None
    with source:
        yield source


def convert_image(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerkit.services.transfer.v1 import transfer_pb2 as pb

    request = pb.ConvertRequest(source=args.source, target=args.target, compression=args.compression, level=args.level)
    image = client.call(transfer_stub(client).Convert, request, timeout=None).image
    print(f"{image.name} {image.target.digest}")
    return 0


def sign_image(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerkit.services.transfer.v1 import transfer_pb2 as pb

    request = pb.SignRequest(name=args.name, key_path=_key_path(args.key))
    response = client.call(transfer_stub(client).Sign, request)
    print(f"{args.name}: signed by key {response.key_id} ({response.signature.digest})")
    return 0


def verify_image(client: Client, args: argparse.Namespace) -> int:
    """Print each valid signature; fails (the daemon's FAILED_PRECONDITION) when there is none."""
    from core.api.containerkit.services.transfer.v1 import transfer_pb2 as pb

    request = pb.VerifyRequest(name=args.name, public_key_paths=[_key_path(path) for path in args.key])
    for signature in client.call(transfer_stub(client).Verify, request).signatures:
        print(f"{args.name}: valid signature by key {signature.key_id} ({signature.artifact.digest})")
    return 0


def _key_path(path: str) -> str:
    """The absolute path of a key file (the daemon, on this host, reads it); CliError when it is not a file."""
    if not os.path.isfile(path):
        raise CliError(f"key {path}: no such file")
    return os.path.abspath(path)
