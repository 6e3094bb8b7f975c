"""Pull benchmark: ``ctr images pull --plain-http`` of a 256 MiB image of 9 layers from a local registry,
containerkitd beside containerd 1.6, gzip and zstd layers.

The image is built once (tests/oci_images.py): 9 layers of 64, 48, 40, 32, 24, 20, 14, 10 and 4 MiB of
file data (files of 4 KiB to 8 MiB, each half random bytes, half text that compresses about 4:1), in two
variants with the same tar streams: gzip (level 6) and zstd (level 3) blobs. Both are pushed with skopeo
to Debian's docker-registry on 127.0.0.1 (tests/interop.py). Then, ``--runs`` times, for each variant
and each daemon (taking turns at going first), a daemon is started on a fresh temp dir
(bench/_daemons.py), ``sync`` runs, and ``ctr -a SOCK -n bench images pull --plain-http REF`` is
timed until it returns: ctr fetches the blobs from the registry and writes them into the daemon's
content store (Content.Write), then unpacks the layers one by one through the daemon's snapshots
(Prepare/Commit) and diff (Apply) services. The daemon's CPU time (all threads) for the pull is
recorded too. The daemon is then stopped by pid, its mounts undone, its temp dir removed.

    /work/venv-ck/bin/python bench/pull.py [--runs 3] [--warmup 1] [--variants gzip,zstd] [--dir /tmp] [--json]

Numbers only: nothing here asserts on timing. Target from the issue: containerkit at most 0.8x
containerd's time. Must run as root (containerd needs it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _daemons import (
    REPO,
    SUBJECTS,
    add_output_arguments,
    cpu_ms,
    print_columns,
    print_load,
    python_env,
    running_as_root,
    start_daemon,
)

sys.path.insert(0, str(REPO / "tests"))

from interop import Registry, ctr, running_registry  # tests/interop.py
from oci_images import Layer, Layout  # tests/oci_images.py

NAMESPACE = "bench"
LAYER_MIB = (64, 48, 40, 32, 24, 20, 14, 10, 4)
FILE_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20)
FILE_WEIGHTS = (30, 25, 20, 12, 8, 3, 2)
TARGET_RATIO = 0.8
MIB = 1 << 20
WORDS = (b"the", b"of", b"layer", b"image", b"snapshot", b"content", b"blob", b"digest", b"overlay", b"mount", b"a")


def text_block(rng: random.Random, size: int) -> bytes:
    """Space-separated words from a small vocabulary: compresses about 4:1, as text and code do."""
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(WORDS, k=4096)) + b"\n"
    return bytes(out[:size])


def bench_layers(compression: str, seed: int = 256) -> Iterator[Layer]:
    """The 9 layers, made one at a time (so only one is in memory); the same tars for every compression."""
    rng = random.Random(seed)
    text = text_block(rng, 8 * MIB)
    for index, mib in enumerate(LAYER_MIB):
        layer = Layer(compression).dir(f"layer{index}")
        remaining, count = mib * MIB, 0
        while remaining > 0:
            size = min(remaining, rng.choices(FILE_SIZES, FILE_WEIGHTS)[0])
            start = rng.randrange(len(text) - size // 2 + 1)
            data = rng.randbytes(size - size // 2) + text[start : start + size // 2]
            layer.file(f"layer{index}/{count // 100:02}/file{count:05}", data, mode=0o644)
            remaining, count = remaining - size, count + 1
        yield layer


def push_images(registry: Registry, directory: Path, variants: list[str]) -> dict[str, tuple[str, int]]:
    """Build each variant into one OCI layout and push it; returns {variant: (reference, compressed bytes)}."""
    layout = Layout(directory)
    refs = {}
    for variant in variants:
        t0 = time.perf_counter()
        manifest = layout.add_image(variant, bench_layers(variant))
        blob = json.loads((layout.blobs / manifest["digest"].split(":")[1]).read_bytes())
        size = sum(layer["size"] for layer in blob["layers"])
        refs[variant] = (registry.push(directory, variant, "bench/pull"), size)
        print(f"built and pushed {variant}: {size / MIB:.0f} MiB of blobs in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)  # fmt: skip
    return refs


def pull_once(subject: str, ref: str, env: dict[str, str] | None, parent: str) -> tuple[float, float]:
    """Start ``subject`` fresh, pull ``ref`` with ctr (then check it unpacked every layer); returns
    (seconds, daemon CPU ms)."""
    daemon = start_daemon(subject, env, parent)
    try:
        os.sync()
        cpu0, t0 = cpu_ms(daemon.pid), time.perf_counter()
        try:
            ctr(daemon, "images", "pull", "--plain-http", ref, namespace=NAMESPACE)
            seconds, cpu = time.perf_counter() - t0, cpu_ms(daemon.pid) - cpu0
            snapshots = ctr(daemon, "snapshots", "ls", namespace=NAMESPACE).stdout.splitlines()[1:]
        except AssertionError as err:
            raise RuntimeError(f"{subject}: {err}") from None
        if len(snapshots) != len(LAYER_MIB):
            raise RuntimeError(f"{subject}: {len(snapshots)} snapshots after the pull, not {len(LAYER_MIB)}")
        return seconds, cpu
    finally:
        daemon.close()


def measure(refs: dict[str, tuple[str, int]], args: argparse.Namespace, env: dict[str, str] | None) -> dict[str, Any]:
    samples: dict[str, dict[str, dict[str, list[float]]]] = {
        v: {s: {"seconds": [], "cpu_ms": []} for s in SUBJECTS} for v in refs
    }
    for run in range(args.warmup + args.runs):
        for variant, (ref, _) in refs.items():
            for subject in SUBJECTS if run % 2 == 0 else tuple(reversed(SUBJECTS)):
                seconds, cpu = pull_once(subject, ref, env, args.dir)
                label = "warm-up" if run < args.warmup else f"run {run - args.warmup + 1}"
                print(f"{label}: {variant} {subject} {seconds:.2f} s (daemon CPU {cpu / 1000:.2f} s)", file=sys.stderr)
                if run >= args.warmup:
                    samples[variant][subject]["seconds"].append(seconds)
                    samples[variant][subject]["cpu_ms"].append(cpu)
    return {
        variant: {
            "compressed_mib": refs[variant][1] / MIB,
            **{
                subject: {
                    **values,
                    "median_s": statistics.median(values["seconds"]),
                    "min_s": min(values["seconds"]),
                    "median_cpu_s": statistics.median(values["cpu_ms"]) / 1000,
                }
                for subject, values in per_subject.items()
            },
        }
        for variant, per_subject in samples.items()
    }


def print_table(results: dict[str, Any], runs: int) -> None:
    header = ("variant", "containerkit median (min)", "containerd median (min)", "ratio ck/cd", "daemon CPU ck / cd")
    rows = [header]
    for variant, result in results.items():
        ck, cd = result["containerkit"], result["containerd"]
        rows.append(
            (
                f"{variant} ({result['compressed_mib']:.0f} MiB blobs, {sum(LAYER_MIB)} MiB data)",
                f"{ck['median_s']:.2f} s ({ck['min_s']:.2f})",
                f"{cd['median_s']:.2f} s ({cd['min_s']:.2f})",
                f"{ck['median_s'] / cd['median_s']:.2f}x",
                f"{ck['median_cpu_s']:.2f} s / {cd['median_cpu_s']:.2f} s",
            )
        )
    print_columns(rows)
    print(f"\n{runs} runs per variant and daemon, fresh roots; target ratio <= {TARGET_RATIO}")
    print_load()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="measured pulls per variant and daemon (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    parser.add_argument("--variants", default="gzip,zstd", help="layer compressions to pull (default gzip,zstd)")
    parser.add_argument("--dir", default="/tmp", help="parent of the daemons' temp dirs (default /tmp)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if not running_as_root("pull.py"):
        return 2
    if args.runs < 1 or args.warmup < 0 or not set(variants) <= {"gzip", "zstd", "tar"}:
        parser.error("--runs must be at least 1, --warmup at least 0, --variants from gzip, zstd, tar")
    with tempfile.TemporaryDirectory(prefix="ckb-pull-", dir=args.dir) as base, running_registry() as registry:
        env = python_env(args.inherit_env, Path(base) / "pycache")
        refs = push_images(registry, Path(base) / "layout", variants)
        try:
            results = measure(refs, args, env)
        except RuntimeError as err:
            print(f"pull.py: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"runs": args.runs, "warmup": args.warmup, "results": results}, indent=2))
    else:
        print_table(results, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
