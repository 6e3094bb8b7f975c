"""ckctl content ls|get|rm|label|ingest|active|abort, as ``ctr content``.

``get`` and ``ingest`` stream: a blob goes to stdout, and stdin into the store, one chunk at a time,
whatever its size. ``ingest`` resumes like ``ctr content ingest``: the stream's first message (STAT)
tells how much of the ingest REF is already written; a seekable stdin (a file) continues from there,
anything else (a pipe) starts the ingest over. It prints the digest of the committed blob.

A committed blob that nothing references (an image, a lease, a ``containerd.io/gc.root`` label) is
removed by the next garbage collection, as in containerd: ``ingest --lease ID`` writes under a lease.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
from collections.abc import Iterator
from typing import IO, Any

from core.cli import rpc
from core.cli.args import add_listing_arguments, for_each, label_changes, parse_labels
from core.cli.client import CALL_TIMEOUT_SECONDS, Client, CliError
from core.cli.records import age, human_size, labels_cell, labels_text, print_records, timestamp_text

CHUNK_SIZE = 1 << 20  # bytes per WriteContentRequest, as the daemon sends them back on Read

BLOB_COLUMNS = {
    "DIGEST": lambda blob: blob["digest"],
    "SIZE": lambda blob: human_size(blob["size"]),
    "AGE": lambda blob: age(blob["created_at"]),
    "LABELS": labels_cell,
}


def _ingest_size(ingest: dict[str, Any]) -> str:
    written = human_size(ingest["offset"])
    return f"{written}/{human_size(ingest['total'])}" if ingest["total"] else written


INGEST_COLUMNS = {
    "REF": lambda ingest: ingest["ref"],
    "SIZE": _ingest_size,
    "AGE": lambda ingest: age(ingest["started_at"]),
}


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("content", help="manage blobs in the content store")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    ls = verbs.add_parser("ls", aliases=["list"], help="list blobs (DIGEST SIZE AGE LABELS)")
    ls.add_argument("filters", nargs="*", metavar="FILTER", help="containerd filters, e.g. labels.team==infra")
    add_listing_arguments(ls, "print digests only")
    ls.set_defaults(handler=list_blobs)

    get = verbs.add_parser("get", help="write a blob to stdout")
    get.add_argument("digest")
    get.set_defaults(handler=get_blob)

    rm = verbs.add_parser("rm", aliases=["remove", "delete", "del"], help="remove blobs from the namespace")
    rm.add_argument("digests", nargs="+", metavar="DIGEST")
    rm.set_defaults(handler=remove_blobs)

    label = verbs.add_parser("label", help="set labels of a blob (an empty value clears one)")
    label.add_argument("digest")
    label.add_argument("labels", nargs="+", metavar="KEY=VALUE")
    label.set_defaults(handler=label_blob)

    ingest = verbs.add_parser("ingest", help="write stdin into the store under REF; prints the digest")
    ingest.add_argument("ref")
    ingest.add_argument("--expected-digest", default="", metavar="DIGEST", help="fail the commit unless it is this")
    ingest.add_argument("--expected-size", type=_size, default=0, metavar="N", help="fail the commit unless N bytes")
    ingest.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="label the blob (repeat)")
    ingest.add_argument("--lease", default="", metavar="ID", help="write under this lease (keeps the blob from GC)")
    ingest.set_defaults(handler=ingest_blob)

    active = verbs.add_parser("active", help="list unfinished ingests (REF SIZE AGE)")
    active.add_argument("filters", nargs="*", metavar="FILTER", help="containerd filters, e.g. ref~=layer")
    add_listing_arguments(active, "print refs only")
    active.set_defaults(handler=list_ingests)

    abort = verbs.add_parser("abort", help="discard unfinished ingests")
    abort.add_argument("refs", nargs="+", metavar="REF")
    abort.set_defaults(handler=abort_ingests)


def _size(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        size = -1
    if size < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes")
    return size


def service_stub(client: Client) -> Any:
    from core.api.containerd.services.content.v1 import content_pb2

    return client.stub(content_pb2, "Content")


def blob_record(info: Any) -> dict[str, Any]:
    """A ``content.v1.Info`` as the record ``ls --json`` prints (size in bytes, times in RFC 3339)."""
    return {
        "digest": info.digest,
        "size": info.size,
        "created_at": timestamp_text(info.created_at),
        "updated_at": timestamp_text(info.updated_at),
        "labels": dict(info.labels),
    }


def ingest_record(status: Any) -> dict[str, Any]:
    """A ``content.v1.Status`` as the record ``active --json`` prints."""
    return {
        "ref": status.ref,
        "offset": status.offset,
        "total": status.total,
        "expected": status.expected,
        "started_at": timestamp_text(status.started_at),
        "updated_at": timestamp_text(status.updated_at),
    }


def list_blobs(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.content.v1 import content_pb2 as pb

    stub = service_stub(client)
    request = pb.ListContentRequest(filters=args.filters)
    with client.stream_errors():
        responses = stub.List(request, metadata=client.metadata(), timeout=CALL_TIMEOUT_SECONDS)
        blobs = [blob_record(info) for response in responses for info in response.info]
    print_records(blobs, BLOB_COLUMNS, args, key="digest")
    return 0


def get_blob(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.content.v1 import content_pb2 as pb

    stub = service_stub(client)
    out = sys.stdout.buffer
    with client.stream_errors():
        for response in stub.Read(pb.ReadContentRequest(digest=args.digest), metadata=client.metadata()):
            out.write(response.data)
    out.flush()
    return 0


def remove_blobs(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.content.v1 import content_pb2 as pb

    stub = service_stub(client)

    def remove(digest: str) -> None:
        client.call(stub.Delete, pb.DeleteContentRequest(digest=digest))

    for_each(args.digests, remove)
    return 0


def label_blob(client: Client, args: argparse.Namespace) -> int:
    from google.protobuf import field_mask_pb2

    from core.api.containerd.services.content.v1 import content_pb2 as pb

    labels, paths = label_changes(args.labels)
    request = pb.UpdateRequest(
        info=pb.Info(digest=args.digest, labels=labels), update_mask=field_mask_pb2.FieldMask(paths=paths)
    )
    print(labels_text(client.call(service_stub(client).Update, request).info.labels))
    return 0


def list_ingests(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.content.v1 import content_pb2 as pb

    response = client.call(service_stub(client).ListStatuses, pb.ListStatusesRequest(filters=args.filters))
    print_records([ingest_record(s) for s in response.statuses], INGEST_COLUMNS, args, key="ref")
    return 0


def abort_ingests(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.content.v1 import content_pb2 as pb

    stub = service_stub(client)

    def abort(ref: str) -> None:
        client.call(stub.Abort, pb.AbortRequest(ref=ref))

    for_each(args.refs, abort)
    return 0


def ingest_blob(client: Client, args: argparse.Namespace) -> int:
    with client.stream_errors():
        print(_ingest(client, args, sys.stdin.buffer, parse_labels(args.label)))
    return 0


def _ingest(client: Client, args: argparse.Namespace, source: IO[bytes], labels: dict[str, str]) -> str:
    """Stream ``source`` into the ingest ``args.ref`` and commit it; return the blob's digest.

    The requests are produced on gRPC's sending thread, reading ``source`` as flow control allows,
    so a blob of any size passes through a bounded amount of memory. The first request is a STAT; the
    rest wait until its answer has settled where to start (see :func:`_resume_offset`). As with ctr,
    a blob the namespace has already (ALREADY_EXISTS, at the STAT for ``--expected-digest`` or at the
    commit) is a success.
    """
    from core.api.containerd.services.content.v1 import content_pb2 as pb

    start: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    read_error: list[OSError] = []
    expected, total = args.expected_digest, args.expected_size

    def requests() -> Iterator[Any]:
        yield pb.WriteContentRequest(action=pb.STAT, ref=args.ref, total=total, expected=expected)
        offset = start.get()
        if offset is None:
            return
        try:
            while chunk := source.read(CHUNK_SIZE):
                yield pb.WriteContentRequest(action=pb.WRITE, offset=offset, data=chunk)
                offset += len(chunk)
        except OSError as err:
            read_error.append(err)
            return  # ending the stream without a commit keeps the ingest, to be resumed
        yield pb.WriteContentRequest(action=pb.COMMIT, offset=offset, total=total, expected=expected, labels=labels)

    call = service_stub(client).Write(requests(), metadata=client.metadata(args.lease))
    written = ""  # the digest of what the ingest holds, as the latest answer tells it
    last = None
    try:
        status = next(call, None)
        if status is None:
            raise CliError(f"ingest {args.ref}: the daemon ended the write stream at once")
        written = status.digest
        start.put(_resume_offset(source, status.offset))
        for last in call:
            written = last.digest
    except rpc.RpcError as err:
        if err.code() is not rpc.StatusCode.ALREADY_EXISTS or not (expected or written):
            raise
        return str(expected or written)
    finally:
        start.put(None)  # unblocks the sending thread if the answer to STAT never came
        call.cancel()
    if read_error:
        raise CliError(f"reading stdin: {read_error[0].strerror or read_error[0]} (ingest {args.ref} kept)")
    if last is None or last.action != pb.COMMIT:
        raise CliError(f"ingest {args.ref}: the write stream ended before the commit")
    return str(last.digest)


def _resume_offset(source: IO[bytes], written: int) -> int:
    """Where to continue an ingest that already holds ``written`` bytes: there, when ``source`` can
    seek to it (a file at least that long), else 0 (the daemon then starts the ingest over)."""
    if written <= 0:
        return 0
    try:
        if source.seekable() and os.fstat(source.fileno()).st_size >= written:
            source.seek(written)
            return written
    except (OSError, ValueError):
        pass
    return 0
