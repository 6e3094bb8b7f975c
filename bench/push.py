"""Push benchmark: the 256 MiB, 9-layer image of bench/pull.py (gzip and zstd layers) pushed from a daemon to a
local registry, three ways: ``ckctl images push`` (containerkitd uploads the blobs itself, through its transfer
service), ``ctr images push`` against containerkitd, and ``ctr images push`` against containerd 1.6.

The image is built once, as bench/pull.py builds it, and pushed with skopeo to a first docker-registry on
127.0.0.1 (the source). One containerkitd and one containerd are started on fresh temp dirs
(bench/_daemons.py) and pull every variant from the source (``ckctl images pull`` and ``ctr images pull``).
Then, ``--runs`` times, for each variant and each way (taking turns at going first), ``sync`` runs, the
daemon's peak RSS is reset, and two pushes are timed until the client returns, both to a second
docker-registry on 127.0.0.1 (the target; another host than the source, so no blob can be mounted across
repositories):

- **fresh**: to a repository never used before (``bench/push-WAY-VARIANT-RUN``): the registry lacks every
  blob there, so every layer and the config are uploaded;
- **again**: the same push once more: every blob exists (``HEAD``), only the manifest is put;
- **client version**: the same client's ``version`` against the same daemon: its start-up and one call, the
  floor under any push made that way (ckctl is Python importing grpc, ctr a Go binary). The table also gives
  each way's fresh push less its client's version (per run, then the median): the push without the
  client's start-up.

ckctl runs with the same bytecode cache as containerkitd (bench/_daemons.py ``python_env``), as an installed
ckctl would.

The ways:

- ``ckctl``: ``ckctl -a SOCK -n bench images push --plain-http REF LOCAL``: one Transfer.Push call; the
  daemon reads its blobs and uploads them concurrently (core/distribution/push.py);
- ``ctr``: ``ctr -a SOCK -n bench images push --plain-http REF LOCAL`` against containerkitd: ctr reads the
  blobs through the daemon's content service (Content.Read) and uploads them itself;
- ``containerd``: the same ctr command against containerd.

After each push the target's manifest digest is checked against the source's. Recorded per push: wall time,
the daemon's CPU time, the client's CPU time (ctr does the uploading in the ctr ways) and the daemon's RSS
before the push and its peak during it. The daemons are stopped by pid at the end, their mounts undone and
temp dirs removed; the registries are stopped and their storage removed.

    /work/venv-ck/bin/python bench/push.py [--runs 3] [--warmup 1] [--variants gzip,zstd]
        [--ways ckctl,ctr,containerd] [--dir /tmp] [--json]

Numbers only: nothing here asserts on timing. Target from issue 6: ``ckctl`` no slower than containerd
(ratio <= 1.0). Must run as root (containerd needs it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _daemons import (
    REPO,
    RunningDaemon,
    add_output_arguments,
    print_columns,
    print_load,
    python_env,
    reset_peak_rss,
    running_as_root,
    start_daemon,
    status_kb,
)
from pull import CKCTL, LAYER_MIB, MIB, NAMESPACE, WAYS, process_cpu_ms, pull_command, push_images

sys.path.insert(0, str(REPO / "tests"))

from interop import CTR, Registry, running_registry  # tests/interop.py

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
TARGET_RATIO = 1.0
"""ckctl's push time over containerd's that issue 6 asks for at most."""
SAMPLES = (
    "seconds",
    "again_seconds",
    "floor_seconds",
    "daemon_cpu_ms",
    "client_cpu_ms",
    "rss_before_mib",
    "rss_peak_mib",
)


def manifest_digest(host: str, repository: str, tag: str) -> str:
    """The digest registry ``host`` (plain HTTP) names for ``repository:tag`` (a ``HEAD`` of the manifest)."""
    request = urllib.request.Request(
        f"http://{host}/v2/{repository}/manifests/{tag}", method="HEAD", headers={"Accept": OCI_MANIFEST}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.headers["Docker-Content-Digest"]


def run_client(argv: list[str], env: dict[str, str] | None) -> float:
    """Run a client to the end; returns its CPU time (ms). RuntimeError with its stderr when it fails."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            message = err.read().decode(errors="replace").strip()
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {message}")
    return (usage.ru_utime + usage.ru_stime) * 1000


def client_argv(way: str, daemon: RunningDaemon, *args: str) -> list[str]:
    """The ``way``'s client (ckctl or ctr) on ``daemon``'s socket and the bench namespace, with ``args``."""
    return [str(CKCTL) if way == "ckctl" else CTR, "-a", str(daemon.address), "-n", NAMESPACE, *args]


def push_once(
    way: str,
    daemon: RunningDaemon,
    local: str,
    target: Registry,
    repository: str,
    want: str,
    env: dict[str, str] | None,
) -> list[float]:
    """Push ``local`` to a fresh ``repository`` of ``target``, then again; checks the digest the target has;
    then times the client's ``version`` (its start-up and one call: the floor under any push of that way).

    Returns the SAMPLES (CPU and RSS of the first, fresh push).
    """
    ref = f"{target.host}/{repository}:latest"
    argv = client_argv(way, daemon, "images", "push", "--plain-http", ref, local)
    os.sync()
    before = status_kb(daemon.pid, "VmRSS")["VmRSS"] / 1024
    if not reset_peak_rss(daemon.pid):
        raise RuntimeError(f"{way}: cannot reset the peak RSS of pid {daemon.pid}")
    cpu0, t0 = process_cpu_ms(daemon.pid), time.perf_counter()
    client_cpu = run_client(argv, env)
    seconds, cpu = time.perf_counter() - t0, process_cpu_ms(daemon.pid) - cpu0
    peak = status_kb(daemon.pid, "VmHWM")["VmHWM"] / 1024
    got = manifest_digest(target.host, repository, "latest")
    if got != want:
        raise RuntimeError(f"{way}: {ref} has manifest {got}, not {want}")
    t0 = time.perf_counter()
    run_client(argv, env)
    t1 = time.perf_counter()
    run_client(client_argv(way, daemon, "version"), env)
    return [seconds, t1 - t0, time.perf_counter() - t1, cpu, client_cpu, before, peak]


def prepare(subjects: set[str], refs: dict[str, tuple[str, int]], env: dict[str, str] | None, parent: str,
            stack: contextlib.ExitStack) -> dict[str, RunningDaemon]:  # fmt: skip
    """Start each subject's daemon (closed by ``stack``) and pull every variant into it."""
    daemons = {}
    for subject in sorted(subjects):
        daemon = start_daemon(subject, env, parent)
        stack.callback(daemon.close)
        for ref, _ in refs.values():
            t0 = time.perf_counter()
            try:
                pull_command("ckctl" if subject == "containerkit" else "containerd", daemon, ref, env)
            except AssertionError as err:
                raise RuntimeError(f"{subject}: {err}") from None
            print(f"pulled {ref} into {subject} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        daemons[subject] = daemon
    return daemons


def measure(
    refs: dict[str, tuple[str, int]],
    ways: list[str],
    args: argparse.Namespace,
    env: dict[str, str] | None,
    source: Registry,
    target: Registry,
) -> dict[str, Any]:
    """Every push of every run, variant and way, and their medians; the shape of ``--json``'s ``results``."""
    samples = {v: {w: {name: [] for name in SAMPLES} for w in ways} for v in refs}
    digests = {v: manifest_digest(source.host, "bench/pull", v) for v in refs}
    with contextlib.ExitStack() as stack:
        daemons = prepare({WAYS[way] for way in ways}, refs, env, args.dir, stack)
        for run in range(args.warmup + args.runs):
            for variant, (local, _) in refs.items():
                for way in ways if run % 2 == 0 else list(reversed(ways)):
                    repository = f"bench/push-{way}-{variant}-{run}"
                    daemon = daemons[WAYS[way]]
                    measured = push_once(way, daemon, local, target, repository, digests[variant], env)
                    seconds, again, floor, daemon_cpu, client_cpu, _, peak = measured
                    label = "warm-up" if run < args.warmup else f"run {run - args.warmup + 1}"
                    print(f"{label}: {variant} {way} {seconds:.2f} s, again {again:.2f} s, version {floor:.2f} s "
                          f"(daemon CPU {daemon_cpu / 1000:.2f} s, client CPU {client_cpu / 1000:.2f} s, "
                          f"peak RSS {peak:.0f} MiB)", file=sys.stderr)  # fmt: skip
                    if run >= args.warmup:
                        for name, value in zip(SAMPLES, measured, strict=True):
                            samples[variant][way][name].append(value)
    return {
        variant: {
            "compressed_mib": refs[variant][1] / MIB,
            **{
                way: {
                    **values,
                    "median_s": statistics.median(values["seconds"]),
                    "min_s": min(values["seconds"]),
                    "median_again_s": statistics.median(values["again_seconds"]),
                    "min_again_s": min(values["again_seconds"]),
                    "median_floor_s": statistics.median(values["floor_seconds"]),
                    "median_over_floor_s": statistics.median(
                        [push - floor for push, floor in zip(values["seconds"], values["floor_seconds"], strict=True)]
                    ),
                    "median_daemon_cpu_s": statistics.median(values["daemon_cpu_ms"]) / 1000,
                    "median_client_cpu_s": statistics.median(values["client_cpu_ms"]) / 1000,
                    "max_rss_before_mib": max(values["rss_before_mib"]),
                    "max_rss_peak_mib": max(values["rss_peak_mib"]),
                }
                for way, values in per_way.items()
            },
        }
        for variant, per_way in samples.items()
    }


def ratio(result: dict[str, Any], way: str, key: str) -> str:
    """``way``'s median ``key`` over containerd's, or "" for containerd itself (or without it)."""
    if way == "containerd" or "containerd" not in result:
        return ""
    return f"{result[way][key] / result['containerd'][key]:.2f}x"


def print_table(results: dict[str, Any], ways: list[str], runs: int) -> None:
    header = ["variant", "way", "fresh repo: median (min)", "ratio", "again: median (min)", "ratio", "client version",
              "fresh - version", "ratio", "daemon CPU", "client CPU", "daemon RSS before -> peak"]  # fmt: skip
    rows = [header]
    for variant, result in results.items():
        for way in ways:
            values = result[way]
            rows.append(
                [
                    f"{variant} ({result['compressed_mib']:.0f} MiB blobs, {sum(LAYER_MIB)} MiB data)",
                    way,
                    f"{values['median_s']:.2f} s ({values['min_s']:.2f})",
                    ratio(result, way, "median_s"),
                    f"{values['median_again_s']:.3f} s ({values['min_again_s']:.3f})",
                    ratio(result, way, "median_again_s"),
                    f"{values['median_floor_s']:.3f} s",
                    f"{values['median_over_floor_s']:.2f} s",
                    ratio(result, way, "median_over_floor_s"),
                    f"{values['median_daemon_cpu_s']:.2f} s",
                    f"{values['median_client_cpu_s']:.2f} s",
                    f"{values['max_rss_before_mib']:.0f} -> {values['max_rss_peak_mib']:.0f} MiB",
                ]
            )
    print_columns(rows)
    print(f"\n{runs} runs per variant and way; ratios to containerd; target: ckctl <= {TARGET_RATIO}x")
    print_load()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="measured pushes per variant and way (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    parser.add_argument("--variants", default="gzip,zstd", help="layer compressions to push (default gzip,zstd)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"ways of pushing (default {','.join(WAYS)})")
    parser.add_argument("--dir", default="/tmp", help="parent of the daemons' temp dirs (default /tmp)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    variants, ways = args.variants.split(","), args.ways.split(",")
    if not running_as_root("push.py"):
        return 2
    if args.runs < 1 or args.warmup < 0 or not set(variants) <= {"gzip", "zstd", "tar"} or not set(ways) <= set(WAYS):
        parser.error(f"--runs >= 1, --warmup >= 0, --variants from gzip, zstd, tar, --ways from {', '.join(WAYS)}")
    with (
        tempfile.TemporaryDirectory(prefix="ckb-push-", dir=args.dir) as base,
        running_registry() as source,
        running_registry() as target,
    ):
        env = python_env(args.inherit_env, Path(base) / "pycache")
        refs = push_images(source, Path(base) / "layout", variants)
        try:
            results = measure(refs, ways, args, env, source, target)
        except RuntimeError as err:
            print(f"push.py: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"runs": args.runs, "warmup": args.warmup, "results": results}, indent=2))
    else:
        print_table(results, ways, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
