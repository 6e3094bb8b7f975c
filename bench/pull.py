"""Pull benchmark: a 256 MiB image of 9 layers pulled from a local registry, gzip and zstd layers, three ways:
``ckctl images pull`` (containerkitd pulls and unpacks inside the daemon, through its transfer service),
``ctr images pull`` against containerkitd, and ``ctr images pull`` against containerd 1.6.

The image is built once (tests/oci_images.py): 9 layers of 64, 48, 40, 32, 24, 20, 14, 10 and 4 MiB of
file data (files of 4 KiB to 8 MiB, each half random bytes, half text that compresses about 4:1), in two
variants with the same tar streams: gzip (level 6) and zstd (level 3) blobs. Both are pushed with skopeo
to Debian's docker-registry on 127.0.0.1 (tests/interop.py). Then, ``--runs`` times, for each variant
and each way (taking turns at going first), a daemon is started on a fresh temp dir (bench/_daemons.py),
``sync`` runs, its peak RSS is reset, and the pull is timed until the client returns:

- ``ckctl``: ``ckctl -a SOCK -n bench images pull --plain-http REF``: one Transfer.Pull call; the daemon
  fetches the layers concurrently and applies each while it downloads (core/distribution/pull.py);
- ``ctr``: ``ctr -a SOCK -n bench images pull --plain-http REF`` against containerkitd: ctr fetches the
  blobs and writes them into the daemon's content store (Content.Write), then unpacks the layers one by
  one through the daemon's snapshots (Prepare/Commit) and diff (Apply) services;
- ``containerd``: the same ctr command against containerd.

The daemon's CPU time (all threads, ended ones included) and peak RSS (VmHWM, reset before the pull) are
recorded too: the RSS shows whether memory stays flat while 256 MiB stream through. The daemon is then
stopped by pid, its mounts undone, its temp dir removed.

    /work/venv-ck/bin/python bench/pull.py [--runs 3] [--warmup 1] [--variants gzip,zstd] [--ways ckctl,ctr,containerd]
        [--dir /tmp] [--json]

Numbers only: nothing here asserts on timing. Targets from the issues: ``ckctl`` at most 0.7x
containerd's time, ``ctr`` against containerkitd at most 0.8x. Must run as root (containerd needs it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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

sys.path.insert(0, str(REPO / "tests"))

from interop import CTR_TIMEOUT_S, Registry, ctr, running_registry  # tests/interop.py
from oci_images import Layer, Layout  # tests/oci_images.py

NAMESPACE = "bench"
LAYER_MIB = (64, 48, 40, 32, 24, 20, 14, 10, 4)
FILE_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20)
FILE_WEIGHTS = (30, 25, 20, 12, 8, 3, 2)
WAYS = {"ckctl": "containerkit", "ctr": "containerkit", "containerd": "containerd"}
"""Each way of pulling, and the daemon it pulls into."""
TARGET_RATIOS = {"ckctl": 0.7, "ctr": 0.8}
CKCTL = Path(sys.executable).parent / "ckctl"
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


def process_cpu_ms(pid: int) -> float:
    """CPU time (ms) used so far by process ``pid``, its ended threads included (utime + stime of
    /proc/PID/stat; a pull's worker threads are gone by the time it returns, so the per-thread schedstat
    sum of _daemons.cpu_ms would miss their work)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def pull_command(way: str, daemon: RunningDaemon, ref: str, env: dict[str, str] | None) -> None:
    """Pull ``ref`` into ``daemon`` the ``way`` given (ckctl with the daemon's ``env``: its bytecode cache, as
    an installed ckctl has one); AssertionError (with stderr) when the client fails."""
    if way != "ckctl":
        ctr(daemon, "images", "pull", "--plain-http", ref, namespace=NAMESPACE)
        return
    argv = [str(CKCTL), "-a", str(daemon.address), "-n", NAMESPACE, "images", "pull", "--plain-http", ref]
    result = subprocess.run(
        argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=CTR_TIMEOUT_S, env=env
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


def pull_once(way: str, ref: str, env: dict[str, str] | None, parent: str) -> tuple[float, float, float, float]:
    """Start ``way``'s daemon fresh, pull ``ref`` (then check it unpacked every layer); returns (seconds,
    daemon CPU ms, daemon RSS before the pull and peak RSS during it, both in MiB)."""
    subject = WAYS[way]
    daemon = start_daemon(subject, env, parent)
    try:
        os.sync()
        rss_before = status_kb(daemon.pid, "VmRSS")["VmRSS"] / 1024
        if not reset_peak_rss(daemon.pid):
            raise RuntimeError(f"{way}: cannot reset the peak RSS of pid {daemon.pid}")
        cpu0, t0 = process_cpu_ms(daemon.pid), time.perf_counter()
        try:
            pull_command(way, daemon, ref, env)
            seconds, cpu = time.perf_counter() - t0, process_cpu_ms(daemon.pid) - cpu0
            peak = status_kb(daemon.pid, "VmHWM")["VmHWM"] / 1024
            snapshots = ctr(daemon, "snapshots", "ls", namespace=NAMESPACE).stdout.splitlines()[1:]
        except AssertionError as err:
            raise RuntimeError(f"{way}: {err}") from None
        if len(snapshots) != len(LAYER_MIB):
            raise RuntimeError(f"{way}: {len(snapshots)} snapshots after the pull, not {len(LAYER_MIB)}")
        return seconds, cpu, rss_before, peak
    finally:
        daemon.close()


SAMPLES = ("seconds", "cpu_ms", "rss_before_mib", "rss_peak_mib")


def measure(
    refs: dict[str, tuple[str, int]], ways: list[str], args: argparse.Namespace, env: dict[str, str] | None
) -> dict[str, Any]:
    samples: dict[str, dict[str, dict[str, list[float]]]] = {
        v: {w: {name: [] for name in SAMPLES} for w in ways} for v in refs
    }
    for run in range(args.warmup + args.runs):
        for variant, (ref, _) in refs.items():
            for way in ways if run % 2 == 0 else list(reversed(ways)):
                measured = pull_once(way, ref, env, args.dir)
                seconds, cpu, _, peak = measured
                label = "warm-up" if run < args.warmup else f"run {run - args.warmup + 1}"
                details = f"daemon CPU {cpu / 1000:.2f} s, peak RSS {peak:.0f} MiB"
                print(f"{label}: {variant} {way} {seconds:.2f} s ({details})", file=sys.stderr)
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
                    "median_cpu_s": statistics.median(values["cpu_ms"]) / 1000,
                    "max_rss_before_mib": max(values["rss_before_mib"]),
                    "max_rss_peak_mib": max(values["rss_peak_mib"]),
                }
                for way, values in per_way.items()
            },
        }
        for variant, per_way in samples.items()
    }


def print_table(results: dict[str, Any], ways: list[str], runs: int) -> None:
    header = ["variant", "way", "median (min)", "ratio to containerd", "daemon CPU", "daemon RSS idle -> peak"]
    rows = [header]
    for variant, result in results.items():
        for way in ways:
            values = result[way]
            ratio = f"{values['median_s'] / result['containerd']['median_s']:.2f}x" if "containerd" in result else "-"
            rows.append(
                [
                    f"{variant} ({result['compressed_mib']:.0f} MiB blobs, {sum(LAYER_MIB)} MiB data)",
                    way,
                    f"{values['median_s']:.2f} s ({values['min_s']:.2f})",
                    ratio if way != "containerd" else "",
                    f"{values['median_cpu_s']:.2f} s",
                    f"{values['max_rss_before_mib']:.0f} -> {values['max_rss_peak_mib']:.0f} MiB",
                ]
            )
    print_columns(rows)
    targets = ", ".join(f"{way} <= {ratio}x" for way, ratio in TARGET_RATIOS.items() if way in ways)
    print(f"\n{runs} runs per variant and way, fresh roots; targets: {targets}")
    print_load()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="measured pulls per variant and way (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    parser.add_argument("--variants", default="gzip,zstd", help="layer compressions to pull (default gzip,zstd)")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"ways of pulling (default {','.join(WAYS)})")
    parser.add_argument("--dir", default="/tmp", help="parent of the daemons' temp dirs (default /tmp)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    variants, ways = args.variants.split(","), args.ways.split(",")
    if not running_as_root("pull.py"):
        return 2
    if args.runs < 1 or args.warmup < 0 or not set(variants) <= {"gzip", "zstd", "tar"} or not set(ways) <= set(WAYS):
        parser.error(f"--runs >= 1, --warmup >= 0, --variants from gzip, zstd, tar, --ways from {', '.join(WAYS)}")
    with tempfile.TemporaryDirectory(prefix="ckb-pull-", dir=args.dir) as base, running_registry() as registry:
        env = python_env(args.inherit_env, Path(base) / "pycache")
        refs = push_images(registry, Path(base) / "layout", variants)
        try:
            results = measure(refs, ways, args, env)
        except RuntimeError as err:
            print(f"pull.py: {err}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"runs": args.runs, "warmup": args.warmup, "results": results}, indent=2))
    else:
        print_table(results, ways, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
