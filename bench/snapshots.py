"""Snapshot benchmark: prepare + commit of an empty snapshot through the snapshots gRPC API, containerkitd
beside containerd 1.6.

Both daemons run at once, each on a fresh temp dir (bench/_daemons.py). The same Python client (the
generated ``containerd.services.snapshots.v1`` stubs, namespace ``bench``, snapshotter ``overlayfs``)
then does, ``--runs`` times per daemon, the daemons taking turns: ``Prepare(active-N, parent "")``
followed by ``Commit(committed-N, active-N)``, labelled ``containerd.io/gc.root`` as ``ctr snapshots``
labels them (so no garbage collection runs in between). Each operation is timed on its own and both
together; the daemon's CPU time (all threads) over all runs is divided by the number of runs. The first
``--warmup`` runs are not counted. Both daemons are stopped by pid afterwards, anything mounted under
their temp dirs is unmounted, the dirs removed. Must run as root (containerd needs it).

    /work/venv-ck/bin/python bench/snapshots.py [--runs 200] [--warmup 20] [--json]

Numbers only: nothing here asserts on timing. Target: containerkit no slower than containerd (ratio <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from _daemons import (
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

from core.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc

NAMESPACE = "bench"
SNAPSHOTTER = "overlayfs"
TARGET_RATIO = 1.0
METRICS = ("prepare", "commit", "prepare+commit")


class Client:
    """Prepare and commit on one daemon's snapshots service, timing each call."""

    def __init__(self, daemon: RunningDaemon) -> None:
        self.daemon = daemon
        self.channel = grpc.insecure_channel(f"unix:{daemon.address}")
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self.metadata = (("containerd-namespace", NAMESPACE),)
        self.labels = {"containerd.io/gc.root": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def prepare_commit(self, n: int) -> tuple[float, float]:
        """Seconds taken by Prepare(active-n) and by Commit(committed-n, active-n)."""
        t0 = time.perf_counter()
        self.stub.Prepare(
            snapshots_pb2.PrepareSnapshotRequest(snapshotter=SNAPSHOTTER, key=f"active-{n}", labels=self.labels),
            metadata=self.metadata,
        )
        t1 = time.perf_counter()
        self.stub.Commit(
            snapshots_pb2.CommitSnapshotRequest(
                snapshotter=SNAPSHOTTER, name=f"committed-{n}", key=f"active-{n}", labels=self.labels
            ),
            metadata=self.metadata,
        )
        return t1 - t0, time.perf_counter() - t1

    def close(self) -> None:
        self.channel.close()


def measure(clients: dict[str, Client], runs: int, warmup: int) -> dict[str, Any]:
    """Per subject: the samples (ms) of each metric and the CPU time (ms) per prepare+commit."""
    samples: dict[str, dict[str, list[float]]] = {s: {m: [] for m in METRICS} for s in clients}
    cpu_before: dict[str, float] = {}
    for n in range(warmup + runs):
        if n == warmup:
            cpu_before = {s: cpu_ms(c.daemon.pid) for s, c in clients.items()}
        order = list(clients) if n % 2 == 0 else list(reversed(clients))
        for subject in order:
            prepare, commit = clients[subject].prepare_commit(n)
            if n >= warmup:
                for metric, seconds in zip(METRICS, (prepare, commit, prepare + commit), strict=True):
                    samples[subject][metric].append(seconds * 1000)
    return {
        subject: {
            "samples_ms": samples[subject],
            "median_ms": {m: statistics.median(v) for m, v in samples[subject].items()},
            "min_ms": {m: min(v) for m, v in samples[subject].items()},
            "cpu_ms_per_run": (cpu_ms(clients[subject].daemon.pid) - cpu_before[subject]) / runs,
        }
        for subject in clients
    }


def print_table(results: dict[str, Any], runs: int) -> None:
    ck, cd = results["containerkit"], results["containerd"]
    rows = [("metric (ms)", "containerkit median (min)", "containerd median (min)", "ratio ck/cd")]
    for metric in METRICS:
        a, b = ck["median_ms"][metric], cd["median_ms"][metric]
        rows.append(
            (metric, f"{a:.3f} ({ck['min_ms'][metric]:.3f})", f"{b:.3f} ({cd['min_ms'][metric]:.3f})", f"{a / b:.2f}x")
        )
    a, b = ck["cpu_ms_per_run"], cd["cpu_ms_per_run"]
    rows.append(("daemon CPU per prepare+commit", f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}x"))
    print_columns(rows)
    ratio = ck["median_ms"]["prepare+commit"] / cd["median_ms"]["prepare+commit"]
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    print(f"\n{runs} runs per daemon; target ratio <= {TARGET_RATIO:.1f}: {verdict} ({ratio:.2f}x)")
    print_load()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="measured prepare+commit per daemon (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured runs first (default 20)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if not running_as_root("snapshots.py"):
        return 2
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1, --warmup at least 0")
    with tempfile.TemporaryDirectory(prefix="ckb-snapshots-") as pycache:
        env = python_env(args.inherit_env, Path(pycache))
        daemons: list[RunningDaemon] = []
        clients: dict[str, Client] = {}
        try:
            for subject in SUBJECTS:
                daemons.append(start_daemon(subject, env))
                clients[subject] = Client(daemons[-1])
            results = measure(clients, args.runs, args.warmup)
        except (RuntimeError, grpc.RpcError) as err:
            print(f"snapshots.py: {err}", file=sys.stderr)
            return 1
        finally:
            for client in clients.values():
                client.close()
            for daemon in daemons:
                daemon.close()
    if args.json:
        print(json.dumps({"runs": args.runs, "warmup": args.warmup, "results": results}, indent=2))
    else:
        print_table(results, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
