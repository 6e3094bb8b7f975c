"""Per-call benchmark: the daemon's CPU for one gRPC call, method by method, containerkitd beside containerd 1.6.

Each daemon starts on a fresh temp dir (bench/_daemons.py), pulls the busybox image (tests/oci_images.py, pushed
with skopeo to Debian's docker-registry on 127.0.0.1) and runs one container (``ctr run -d ... sleep``), so that
every method below has something real to answer. Then one grpcio client (the same for both, in this process)
makes each call ``--calls`` times in a row after ``--warmup`` unmeasured ones, and the daemon's CPU (user +
system, all its threads, from /proc/PID/task/*/schedstat) over those calls is divided by their number:

- ``Version``: the server's own cost (the handler does nothing);
- the calls a ``ctr run`` makes most (``Content.Info`` and ``Content.Read`` of the image's manifest, twenty
  per run between them; ``Containers.Get``, ``Tasks.Get``, ``Images.Get``, ``Namespaces.Get``,
  ``Snapshots.Mounts``).

A call is one after the other, so this is the CPU each costs, not throughput under load (``bench/run.py``
measures concurrent starts). Afterwards the container is removed and both daemons get SIGTERM by pid; their
temp dirs are unmounted and removed.

    /work/venv-ck/bin/python bench/calls.py [--calls 500] [--warmup 50] [--json] [--inherit-env]

Numbers only: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
from _daemons import (
    REPO,
    SUBJECTS,
    RunningDaemon,
    add_output_arguments,
    cpu_ms,
    print_columns,
    print_load,
    python_env,
    running_as_root,
    start_daemon,
)
from google.protobuf import empty_pb2

from core.api.containerd.services.containers.v1 import containers_pb2, containers_pb2_grpc
from core.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from core.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from core.api.containerd.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
from core.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from core.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from core.api.containerd.services.version.v1 import version_pb2_grpc

sys.path.insert(0, str(REPO / "tests"))

from interop import busybox_image, ctr, kill_leftovers, remove_containers, running_registry  # tests/interop.py

NAMESPACE = "bench"
CONTAINER = "calls"
SNAPSHOTTER = "overlayfs"


def calls_to(channel: grpc.Channel, image: str) -> dict[str, Callable[[], Any]]:
    """The measured calls, by name, against the daemon behind ``channel`` (which holds ``image`` and runs the
    container ``CONTAINER``)."""
    metadata = (("containerd-namespace", NAMESPACE),)
    images = images_pb2_grpc.ImagesStub(channel)
    content = content_pb2_grpc.ContentStub(channel)
    manifest = images.Get(images_pb2.GetImageRequest(name=image), metadata=metadata).image.target.digest
    containers = containers_pb2_grpc.ContainersStub(channel)
    tasks = tasks_pb2_grpc.TasksStub(channel)
    namespaces = namespace_pb2_grpc.NamespacesStub(channel)
    snapshots = snapshots_pb2_grpc.SnapshotsStub(channel)
    version = version_pb2_grpc.VersionStub(channel)
    return {
        "Version": lambda: version.Version(empty_pb2.Empty()),
        "Namespaces.Get": lambda: namespaces.Get(namespace_pb2.GetNamespaceRequest(name=NAMESPACE), metadata=metadata),
        "Images.Get": lambda: images.Get(images_pb2.GetImageRequest(name=image), metadata=metadata),
        "Content.Info": lambda: content.Info(content_pb2.InfoRequest(digest=manifest), metadata=metadata),
        "Content.Read": lambda: list(content.Read(content_pb2.ReadContentRequest(digest=manifest), metadata=metadata)),
        "Containers.Get": lambda: containers.Get(containers_pb2.GetContainerRequest(id=CONTAINER), metadata=metadata),
        "Tasks.Get": lambda: tasks.Get(tasks_pb2.GetRequest(container_id=CONTAINER), metadata=metadata),
        "Snapshots.Mounts": lambda: snapshots.Mounts(
            snapshots_pb2.MountsRequest(snapshotter=SNAPSHOTTER, key=CONTAINER), metadata=metadata
        ),
    }


def measure(daemon: RunningDaemon, image: str, args: argparse.Namespace) -> dict[str, float]:
    """Microseconds of daemon CPU per call, by call name."""
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        results = {}
        for name, call in calls_to(channel, image).items():
            for _ in range(args.warmup):
                call()
            before = cpu_ms(daemon.pid)
            for _ in range(args.calls):
                call()
            results[name] = (cpu_ms(daemon.pid) - before) * 1000 / args.calls
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="measured calls of each kind per daemon")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured calls of each kind first")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if not running_as_root("calls.py"):
        return 2
    if args.calls < 1 or args.warmup < 0:
        parser.error("--calls must be at least 1 and --warmup at least 0")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ckb-calls-") as base, running_registry() as registry:
        image = busybox_image(registry, Path(base))
        env = python_env(args.inherit_env, Path(base) / "pycache")
        for subject in SUBJECTS:
            with ExitStack() as stack:
                daemon = start_daemon(subject, env)
                stack.callback(kill_leftovers, daemon.tmp)
                stack.callback(daemon.close)
                stack.callback(remove_containers, daemon, NAMESPACE)
                ctr(daemon, "images", "pull", "--plain-http", image, namespace=NAMESPACE)
                ctr(daemon, "run", "-d", image, CONTAINER, "sleep", "1000", namespace=NAMESPACE)
                results[subject] = measure(daemon, image, args)
    if args.json:
        print(json.dumps({"calls": args.calls, "warmup": args.warmup, "us_per_call": results}, indent=2))
        return 0
    ck, cd = results["containerkit"], results["containerd"]
    rows = [("daemon CPU per call (us)", "containerkit", "containerd", "ratio ck/cd")]
    rows += [(name, f"{ck[name]:.0f}", f"{cd[name]:.0f}", f"{ck[name] / cd[name]:.2f}x") for name in ck]
    print_columns(rows)
    print(f"\n{args.calls} calls of each kind, one after the other, after {args.warmup} unmeasured")
    print_load()
    return 0


if __name__ == "__main__":
    sys.exit(main())
