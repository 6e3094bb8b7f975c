"""Content and images benchmark: containerkitd side by side with containerd 1.6, driven by Debian's ``ctr``.

Both daemons run at once, each on its own fresh temp dir (root, state, socket) under one parent
directory (default /tmp), containerd with its defaults except for the paths. Then:

* **ingest**: one file of random data (``--size-mib``, default 1 GiB) is created once in the same
  filesystem as the daemons' roots; each run times ``ctr -a SOCK content ingest REF < file`` against
  each daemon (a fresh ref per run, the daemons taking turns at going first). During the ingest a
  thread samples the daemon's VmRSS every 50 ms; the table gives the peak over the baseline taken
  just before (and VmHWM, reset before the run through /proc/PID/clear_refs), i.e. whether memory
  stays flat while a blob streams in. Between runs the blob is removed (``ctr content rm``, then a
  synchronous garbage collection, triggered by deleting a throwaway image with ``sync``), so each
  run writes a blob the store does not have. For scale, the "floor" is this Python process copying
  the file to a new one on the same filesystem with 1 MiB reads, hashing each chunk with sha256
  and fsyncing at the end: the disk's write speed plus sha256.
* **listing**: ``--blobs`` small blobs and ``--images`` images are written into each daemon through
  the gRPC API (the same Python client code for both: Content.Write streams, ``--streams`` in
  parallel, and Images.Create, all under one lease), shaped like pulled images: each image has an
  OCI manifest, a config and ``(blobs - 2 * images) / images`` layer blobs, with the labels a pull
  leaves (``containerd.io/gc.ref.content.*`` on manifests, ``containerd.io/uncompressed`` on
  layers). Then ``ctr content ls``, ``ctr images ls`` and their ``-q`` variants are timed (median of
  ``--runs``). ``ctr images ls`` reads each image's manifest twice and its config once (size and
  platform columns), so Info and Read latency count there. The same listings also run against a third
  subject, the "python grpc floor": containerkitd's own gRPC server (``core.server.new_server``) answering
  with the bytes containerkitd answered, recorded beforehand, doing no work at all (``--no-grpc-floor``
  skips it).

Afterwards both daemons get SIGTERM by pid, anything mounted under the temp dirs is unmounted and
everything, the big file included, is removed. Must run as root (containerd needs it).

    /work/venv-ck/bin/python bench/content.py [--size-mib 1024] [--blobs 10000] [--images 1000] [--runs 3]

Numbers only: nothing here asserts on timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from _daemons import (
    CONTAINERD,
    CONTAINERKITD,
    CTR,
    PYTHON,
    SUBJECTS,
    RunningDaemon,
    cpu_ms,
    python_env,
    reset_peak_rss,
    start_daemon,
    status_kb,
)

from core.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from core.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from core.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from core.api.containerd.types import descriptor_pb2

NAMESPACE = "bench"
LEASE = "bench-content"
SAMPLE_INTERVAL_S = 0.05
CHUNK = 1 << 20
GC_WAIT_S = 60.0
MIB = 1 << 20

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def filesystem_of(path: Path) -> str:
    """``FSTYPE SOURCE (mount point)`` of the filesystem holding ``path``, by findmnt."""
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE,SOURCE,TARGET", "-T", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return f"{out[0]} on {out[1]} (mounted at {out[2]})"
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "unknown filesystem"


def code_of(env: dict[str, str] | None) -> str:
    """Where the containerkitd started with ``env`` takes its code from, and that checkout's git revision."""
    try:
        where = subprocess.run(
            [PYTHON, "-c", "import core, pathlib; print(pathlib.Path(core.__file__).parent.parent)"],
            env=env, capture_output=True, text=True, check=True, cwd="/",
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    git = ["git", "-C", where]
    rev = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if rev.returncode != 0:
        return f"{where} (not a git checkout)"
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return f"{where} @ {rev.stdout.strip()}{' + uncommitted changes' if dirty.stdout.strip() else ''}"


def ctr(daemon: RunningDaemon, *args: str, stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """Run ``ctr -a SOCK -n bench ARGS``; raise with its stderr when it fails."""
    argv = [CTR, "-a", str(daemon.address), "-n", NAMESPACE, *args]
    done = subprocess.run(argv, stdin=stdin, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"{daemon.subject}: {' '.join(argv)} exited {done.returncode}: {done.stderr.decode()}")
    return done


def timed_ctr(daemon: RunningDaemon, *args: str, stdin: Any = subprocess.DEVNULL) -> tuple[float, bytes]:
    t0 = time.perf_counter()
    done = ctr(daemon, *args, stdin=stdin)
    return time.perf_counter() - t0, done.stdout


class Client:
    """The gRPC client used against both daemons (generated stubs, namespace metadata, one lease)."""

    def __init__(self, daemon: RunningDaemon) -> None:
        self.channel = grpc.insecure_channel(
            f"unix:{daemon.address}",
            options=[("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)],
        )
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.metadata = (("containerd-namespace", NAMESPACE),)

    def with_lease(self) -> tuple[tuple[str, str], ...]:
        return (*self.metadata, ("containerd-lease", LEASE))

    def write_blob(self, ref: str, data: bytes, digest: str, labels: dict[str, str]) -> None:
        """One Content.Write stream: a single COMMIT message carrying the ref, the data and the labels."""
        request = content_pb2.WriteContentRequest(
            action=content_pb2.COMMIT, ref=ref, total=len(data), expected=digest, offset=0, data=data, labels=labels
        )
        responses = list(self.content.Write(iter([request]), metadata=self.with_lease()))
        if not responses or responses[-1].digest != digest:
            raise RuntimeError(f"write {ref}: unexpected answers {responses!r}")

    def create_image(self, name: str, media_type: str, digest: str, size: int, lease: bool = True) -> None:
        image = images_pb2.Image(
            name=name, target=descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size)
        )
        metadata = self.with_lease() if lease else self.metadata
        self.images.Create(images_pb2.CreateImageRequest(image=image), metadata=metadata)

    def collect_garbage(self) -> None:
        """Run a synchronous GC: create a throwaway image and delete it with ``sync``."""
        name = f"bench.invalid/gc-trigger-{uuid.uuid4().hex[:8]}"
        self.create_image(name, MT_MANIFEST, "sha256:" + "0" * 64, 1, lease=False)
        self.images.Delete(images_pb2.DeleteImageRequest(name=name, sync=True), metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()


# --------------------------------------------------------------------------------------------- ingest


class RssSampler:
    """Samples VmRSS of one pid every 50 ms in a thread; ``peak_kb`` is the largest sample."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                rss = status_kb(self.pid, "VmRSS")["VmRSS"]
            except (OSError, KeyError):
                return
            self.peak_kb = max(self.peak_kb, rss)
            self.samples += 1
            if self._stop.wait(SAMPLE_INTERVAL_S):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` (fsynced); return their sha256 digest."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(16 * MIB, left))
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return "sha256:" + digest.hexdigest()


def floor_copy(source: Path, target: Path) -> float:
    """Seconds to copy ``source`` to a new file ``target`` in 1 MiB chunks, sha256 on the way, fsync at the end."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    digest = hashlib.sha256()
    t0 = time.perf_counter()
    with open(source, "rb", buffering=0) as src, open(target, "wb", buffering=0) as dst:
        while n := src.readinto(buffer):
            digest.update(view[:n])
            dst.write(view[:n])
        os.fsync(dst.fileno())
    elapsed = time.perf_counter() - t0
    target.unlink()
    return elapsed


def blob_paths(daemon: RunningDaemon, hex_digest: str) -> list[Path]:
    """Where the daemon's content store keeps blob ``sha256:hex`` (any ``blobs/sha256/<hex>`` under its root)."""
    return list(daemon.root.glob(f"**/blobs/sha256/{hex_digest}"))


@dataclass
class IngestSample:
    subject: str
    seconds: float
    mb_per_s: float
    baseline_rss_kb: int
    peak_rss_kb: int  # largest 50 ms sample
    hwm_kb: int | None  # VmHWM after the run, reset before it (None if the reset was refused)
    samples: int
    daemon_cpu_s: float
    notes: list[str] = field(default_factory=list)


def ingest_once(daemon: RunningDaemon, client: Client, blob: Path, digest: str, size: int, tag: str) -> IngestSample:
    ref = f"bench-ingest-{tag}-{uuid.uuid4().hex[:12]}"
    notes: list[str] = []
    os.sync()  # start each run without dirty pages left by the one before
    baseline = status_kb(daemon.pid, "VmRSS")["VmRSS"]
    hwm_reset = reset_peak_rss(daemon.pid)
    cpu0 = cpu_ms(daemon.pid)
    with open(blob, "rb") as stdin, RssSampler(daemon.pid) as sampler:
        seconds, _ = timed_ctr(daemon, "content", "ingest", ref, stdin=stdin)
    cpu = (cpu_ms(daemon.pid) - cpu0) / 1000
    hwm = status_kb(daemon.pid, "VmHWM")["VmHWM"] if hwm_reset else None
    peak = max(sampler.peak_kb, baseline)
    # Remove the blob and make sure it is gone from disk, so the next run writes it afresh.
    try:
        ctr(daemon, "content", "rm", digest)
    except RuntimeError as err:
        notes.append(f"content rm: {err}")
    client.collect_garbage()
    hex_digest = digest.partition(":")[2]
    deadline = time.monotonic() + GC_WAIT_S
    while blob_paths(daemon, hex_digest):
        if time.monotonic() > deadline:
            notes.append(f"blob still on disk {GC_WAIT_S:.0f}s after rm + gc")
            break
        time.sleep(0.1)
    return IngestSample(daemon.subject, seconds, size / seconds / 1e6, baseline, peak, hwm, sampler.samples, cpu, notes)


# -------------------------------------------------------------------------------------------- listing


@dataclass
class Blob:
    ref: str
    data: bytes
    digest: str
    labels: dict[str, str]


@dataclass
class Dataset:
    """Blobs to write in two waves (layers and configs, then manifests) and the images naming the manifests."""

    first: list[Blob]
    manifests: list[Blob]
    images: list[tuple[str, str, int]]  # name, manifest digest, manifest size

    @property
    def blobs(self) -> int:
        return len(self.first) + len(self.manifests)


def _blob(ref: str, data: bytes, labels: dict[str, str] | None = None) -> Blob:
    return Blob(ref, data, "sha256:" + hashlib.sha256(data).hexdigest(), labels or {})


def make_dataset(blobs: int, images: int, seed: int = 1) -> Dataset:
    """``images`` pulled-looking images (manifest + config + layers) holding ``blobs`` blobs in all."""
    if images < 1 or blobs < 2 * images:
        raise ValueError(f"--blobs ({blobs}) must be at least twice --images ({images}): a manifest and a config each")
    rng = random.Random(seed)
    layers_total = blobs - 2 * images
    first: list[Blob] = []
    manifests: list[Blob] = []
    names: list[tuple[str, str, int]] = []
    for i in range(images):
        count = layers_total // images + (1 if i < layers_total % images else 0)
        layers = []
        for j in range(count):
            data = os.urandom(rng.randint(256, 4096))
            uncompressed = "sha256:" + hashlib.sha256(data + b"uncompressed").hexdigest()
            layers.append(_blob(f"layer-{i}-{j}", data, {"containerd.io/uncompressed": uncompressed}))
        config_doc = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [b.labels["containerd.io/uncompressed"] for b in layers]},
            "created": "2024-01-01T00:00:00Z",
            "history": [{"created_by": f"bench image {i}"}],
        }
        config = _blob(f"config-{i}", json.dumps(config_doc).encode())
        manifest_doc = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": config.digest, "size": len(config.data)},
            "layers": [{"mediaType": MT_LAYER, "digest": b.digest, "size": len(b.data)} for b in layers],
        }
        labels = {"containerd.io/gc.ref.content.config": config.digest}
        labels.update({f"containerd.io/gc.ref.content.l.{j}": b.digest for j, b in enumerate(layers)})
        manifest = _blob(f"manifest-{i}", json.dumps(manifest_doc, indent=3).encode(), labels)
        first += [*layers, config]
        manifests.append(manifest)
        names.append((f"bench.example/library/image-{i:05d}:latest", manifest.digest, len(manifest.data)))
    return Dataset(first, manifests, names)


def in_parallel(streams: int, items: list[Any], work: Callable[[Client, Any], None], daemon: RunningDaemon) -> None:
    """Run ``work(client, item)`` for every item, ``streams`` threads each with its own channel."""
    clients = [Client(daemon) for _ in range(streams)]
    try:
        with ThreadPoolExecutor(max_workers=streams) as pool:
            futures = [
                pool.submit(lambda c, part: [work(c, x) for x in part], clients[k], items[k::streams])
                for k in range(streams)
            ]
            for future in futures:
                future.result()
    finally:
        for client in clients:
            client.close()


def populate(daemon: RunningDaemon, dataset: Dataset, streams: int) -> dict[str, float]:
    """Write the dataset into the daemon; returns seconds for the blobs and for the images."""
    client = Client(daemon)
    try:
        client.leases.Create(leases_pb2.CreateRequest(id=LEASE), metadata=client.metadata)
    finally:
        client.close()

    def write(c: Client, blob: Blob) -> None:
        c.write_blob(blob.ref, blob.data, blob.digest, blob.labels)

    def create(c: Client, image: tuple[str, str, int]) -> None:
        c.create_image(image[0], MT_MANIFEST, image[1], image[2])

    t0 = time.perf_counter()
    in_parallel(streams, dataset.first, write, daemon)
    in_parallel(streams, dataset.manifests, write, daemon)
    t1 = time.perf_counter()
    in_parallel(streams, dataset.images, create, daemon)
    t2 = time.perf_counter()
    return {"blobs_s": t1 - t0, "images_s": t2 - t1}


LISTINGS: dict[str, tuple[tuple[str, ...], bool]] = {
    # name: (ctr arguments, whether the output has a header line)
    "content ls": (("content", "ls"), True),
    "content ls -q": (("content", "ls", "-q"), False),
    "images ls": (("images", "ls"), True),
    "images ls -q": (("images", "ls", "-q"), False),
}


def check_listing(name: str, out: bytes, dataset: Dataset, subject: str) -> None:
    args, header = LISTINGS[name]
    lines = [line for line in out.decode().splitlines() if line.strip()]
    want = (dataset.blobs if args[0] == "content" else len(dataset.images)) + header
    if len(lines) != want:
        raise RuntimeError(f"{subject}: ctr {' '.join(args)} printed {len(lines)} lines, expected {want}")
    if name == "images ls" and any(" linux/amd64 " not in line for line in lines[1:]):
        bad = next(line for line in lines[1:] if " linux/amd64 " not in line)
        raise RuntimeError(f"{subject}: ctr images ls did not resolve size/platform: {bad!r}")


# ----------------------------------------------------------------------------------------- grpc floor

FLOOR = "grpc floor"


def save_answers(daemon: RunningDaemon, path: Path) -> None:
    """Record, serialized, what containerkitd answers to the calls the listings make (Content.List, Info
    and Read of every blob, Images.List), for :func:`serve_floor`."""
    client = Client(daemon)
    md = client.metadata
    try:
        lists = [r.SerializeToString() for r in client.content.List(content_pb2.ListContentRequest(), metadata=md)]
        infos: dict[str, bytes] = {}
        reads: dict[str, list[bytes]] = {}
        for raw in lists:
            for info in content_pb2.ListContentResponse.FromString(raw).info:
                infos[info.digest] = content_pb2.InfoResponse(info=info).SerializeToString()
                request = content_pb2.ReadContentRequest(digest=info.digest)
                reads[info.digest] = [r.SerializeToString() for r in client.content.Read(request, metadata=md)]
        images = client.images.List(images_pb2.ListImagesRequest(), metadata=md).SerializeToString()
    finally:
        client.close()
    path.write_bytes(pickle.dumps({"lists": lists, "infos": infos, "reads": reads, "images": images}))


def serve_floor(address: str, answers_path: str) -> int:
    """The "grpc floor" subject: containerkitd's gRPC server (core.server.new_server, its default limits) that
    answers the listings' calls with the bytes :func:`save_answers` recorded, doing no work at all.
    Runs until SIGTERM."""
    import signal

    from core.config import GrpcConfig
    from core.server import new_server

    answers = pickle.loads(Path(answers_path).read_bytes())

    def info(request: Any, context: Any) -> bytes:
        return answers["infos"][request.digest]

    def read(request: Any, context: Any) -> Iterator[bytes]:
        yield from answers["reads"][request.digest]

    def list_content(request: Any, context: Any) -> Iterator[bytes]:
        yield from answers["lists"]

    def list_images(request: Any, context: Any) -> bytes:
        return answers["images"]

    content_calls = {
        "Info": grpc.unary_unary_rpc_method_handler(info, content_pb2.InfoRequest.FromString),
        "Read": grpc.unary_stream_rpc_method_handler(read, content_pb2.ReadContentRequest.FromString),
        "List": grpc.unary_stream_rpc_method_handler(list_content, content_pb2.ListContentRequest.FromString),
    }
    images_calls = {"List": grpc.unary_unary_rpc_method_handler(list_images, images_pb2.ListImagesRequest.FromString)}
    server = new_server(GrpcConfig())
    server.add_registered_method_handlers("containerd.services.content.v1.Content", content_calls)
    server.add_registered_method_handlers("containerd.services.images.v1.Images", images_calls)
    server.add_insecure_port(f"unix:{address}")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    print("ready", flush=True)
    server.wait_for_termination()
    return 0


def start_floor(daemon: RunningDaemon, env: dict[str, str] | None, parent: Path) -> RunningDaemon:
    """Record containerkitd's answers and start :func:`serve_floor` with them, in its own temp dir."""
    tmp = Path(tempfile.mkdtemp(prefix="ckb-floor-", dir=parent))
    answers = tmp / "answers.pickle"
    save_answers(daemon, answers)
    address, log_path = tmp / "floor.sock", tmp / "floor.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log_file:
        argv = [PYTHON, str(Path(__file__).resolve()), "--serve-floor", str(address), str(answers)]
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, cwd=tmp, env=env
        )
    floor = RunningDaemon(FLOOR, tmp, address, proc, log_path, 0.0)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()  # it says nothing more
    if line.strip() != b"ready":
        floor.close()
        raise RuntimeError(f"the grpc floor server did not start: {line!r}")
    floor.start_s = time.perf_counter() - t0
    return floor


# ------------------------------------------------------------------------------------------ reporting


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


Row = tuple[str, str, float | None, float | None, float | None]


def build_rows(results: dict[str, Any]) -> list[Row]:
    """(label, format, containerkit value, containerd value, grpc floor value or None)."""
    rows: list[Row] = []
    ingest = results.get("ingest")
    if ingest:
        s = ingest["summary"]
        for label, key, fmt in (
            (f"ingest {ingest['size_mib']} MiB: time (s, median)", "seconds", "{:.2f}"),
            ("ingest: throughput (MB/s, median)", "mb_per_s", "{:.0f}"),
            ("ingest: daemon CPU (s, median)", "daemon_cpu_s", "{:.2f}"),
            ("ingest: peak VmRSS over baseline (MB, max)", "peak_over_mb", "{:.1f}"),
            ("ingest: VmHWM over baseline (MB, max)", "hwm_over_mb", "{:.1f}"),
            ("ingest: baseline VmRSS (MB)", "baseline_mb", "{:.1f}"),
        ):
            rows.append((label, fmt, s["containerkit"][key], s["containerd"][key], None))
    listing = results.get("listing")
    if listing:
        pop = listing["populate"]
        n, m = listing["blobs"], listing["images"]
        rows.append(
            (f"populate: {n} blobs via Write, {listing['streams']} streams (s)", "{:.2f}",
             pop["containerkit"]["blobs_s"], pop["containerd"]["blobs_s"], None)
        )  # fmt: skip
        rows.append(
            (f"populate: {m} images via Create (s)", "{:.2f}", pop["containerkit"]["images_s"],
             pop["containerd"]["images_s"], None)
        )  # fmt: skip
        for name in LISTINGS:
            times = listing["times"][name]
            count = n if name.startswith("content") else m
            floor = median(times[FLOOR]) if times.get(FLOOR) else None
            rows.append(
                (f"ctr {name} ({count}) (s, median)", "{:.3f}", median(times["containerkit"]),
                 median(times["containerd"]), floor)
            )  # fmt: skip
    return rows


def print_table(results: dict[str, Any]) -> None:
    rows = build_rows(results)
    with_floor = any(row[4] is not None for row in rows)
    header: tuple[str, ...] = ("metric", "containerkit", "containerd", "ratio ck/cd")
    if with_floor:
        header += ("python grpc floor",)
    table = []
    for label, fmt, ck, cd, floor in rows:
        cells = [label, fmt.format(ck) if ck is not None else "-", fmt.format(cd) if cd is not None else "-"]
        cells.append(f"{ck / cd:.2f}x" if ck is not None and cd else "-")
        if with_floor:
            cells.append(fmt.format(floor) if floor is not None else "")
        table.append(tuple(cells))
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    info = results["setup"]
    print()
    print(f"containerkitd: {info['containerkitd']}  ({info['bytecode']}; code: {info['containerkit_code']})")
    print(f"containerd:    {info['containerd']}  (default plugins; only paths moved to the temp dir)")
    print(f"ctr:           {info['ctr']}")
    print(f"daemon roots and the ingest file: {info['dir']} on {info['filesystem']}")
    print(f"{info['runs']} runs per metric, daemons alternating who goes first; host has {info['cpus']} CPUs")
    print()
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table:
        print(line(r))
    ingest = results.get("ingest")
    if ingest:
        floor = ingest["floor"]
        print(
            f"\ningest floor (this process: copy the file with 1 MiB chunks + sha256 + fsync, same filesystem):"
            f" {floor['seconds']:.2f} s median = {floor['mb_per_s']:.0f} MB/s"
        )
        for subject in SUBJECTS:
            samples = ingest["samples"][subject]
            print(
                f"  {subject:<12} runs (s): "
                + ", ".join(f"{x['seconds']:.2f}" for x in samples)
                + f"; RSS samples per run: {min(x['samples'] for x in samples)}-{max(x['samples'] for x in samples)}"
            )
    if with_floor:
        print(
            "\npython grpc floor: containerkitd's gRPC server answering Content.List/Info/Read and Images.List with"
            " containerkitd's recorded answers, doing no work: what the daemon pays before its handlers' work"
        )
    load = results["loadavg_1min"]
    print(f"\nhost load (1-min average) {load['before']:.2f} before, {load['after']:.2f} after, {load['cpus']} CPUs")
    notes = results.get("notes") or []
    for note in notes:
        print(f"note: {note}")


def summarise_ingest(samples: dict[str, list[IngestSample]]) -> dict[str, dict[str, float]]:
    out = {}
    for subject, values in samples.items():
        out[subject] = {
            "seconds": median([s.seconds for s in values]),
            "min_seconds": min(s.seconds for s in values),
            "mb_per_s": median([s.mb_per_s for s in values]),
            "daemon_cpu_s": median([s.daemon_cpu_s for s in values]),
            "peak_over_mb": max((s.peak_rss_kb - s.baseline_rss_kb) / 1024 for s in values),
            "hwm_over_mb": max(((s.hwm_kb or 0) - s.baseline_rss_kb) / 1024 for s in values),
            "baseline_mb": median([s.baseline_rss_kb / 1024 for s in values]),
        }
    return out


def rotate(i: int, names: tuple[str, ...] = SUBJECTS) -> Iterator[str]:
    """``names`` starting with the ``i``-th (modulo): who goes first takes turns."""
    k = i % len(names)
    yield from names[k:] + names[:k]


# ---------------------------------------------------------------------------------------------- main


def run_ingest(args: argparse.Namespace, base: Path, daemons: dict[str, RunningDaemon], notes: list[str]) -> dict:
    size = args.size_mib * MIB
    blob = base / "ingest.bin"
    log(f"creating {args.size_mib} MiB of random data in {blob} ...")
    digest = make_random_file(blob, size)
    clients = {subject: Client(d) for subject, d in daemons.items()}
    floors = []
    samples: dict[str, list[IngestSample]] = {s: [] for s in SUBJECTS}
    try:
        for i in range(args.warmup + args.runs):
            measured = i >= args.warmup
            tag = f"run {i - args.warmup + 1}" if measured else "warm-up"
            for subject in rotate(i):
                sample = ingest_once(daemons[subject], clients[subject], blob, digest, size, f"{subject}-{i}")
                notes += [f"{subject} ingest {tag}: {n}" for n in sample.notes]
                if measured:
                    samples[subject].append(sample)
                base_kb = sample.baseline_rss_kb
                hwm = f" hwm +{(sample.hwm_kb - base_kb) / 1024:.1f} MB" if sample.hwm_kb else ""
                log(
                    f"{tag:>7} ingest {subject:<12} {sample.seconds:6.2f} s  {sample.mb_per_s:6.0f} MB/s"
                    f"  cpu {sample.daemon_cpu_s:5.2f} s  rss {base_kb / 1024:5.1f} MB"
                    f" peak +{(sample.peak_rss_kb - base_kb) / 1024:.1f} MB{hwm}"
                )
            if measured:
                os.sync()
                floors.append(floor_copy(blob, base / "floor.bin"))
                log(f"{tag:>7} floor  copy+sha256+fsync {floors[-1]:6.2f} s  {size / floors[-1] / 1e6:6.0f} MB/s")
    finally:
        blob.unlink(missing_ok=True)
        for client in clients.values():
            client.close()
    return {
        "size_mib": args.size_mib,
        "digest": digest,
        "summary": summarise_ingest(samples),
        "floor": {"seconds": median(floors), "mb_per_s": size / median(floors) / 1e6, "runs": floors},
        "samples": {s: [vars(x) for x in v] for s, v in samples.items()},
    }


def run_listing(
    args: argparse.Namespace, daemons: dict[str, RunningDaemon], floor: Callable[[], RunningDaemon] | None
) -> dict:
    log(f"generating {args.blobs} blobs / {args.images} images ...")
    dataset = make_dataset(args.blobs, args.images)
    populated = {}
    for subject in SUBJECTS:
        populated[subject] = populate(daemons[subject], dataset, args.streams)
        log(
            f"populated {subject:<12} blobs {populated[subject]['blobs_s']:6.2f} s"
            f"  images {populated[subject]['images_s']:6.2f} s"
        )
    servers = dict(daemons)
    if floor is not None:
        servers[FLOOR] = floor()
        log(f"started {FLOOR} (pid {servers[FLOOR].pid}) with containerkitd's recorded answers")
    subjects = tuple(servers)
    times: dict[str, dict[str, list[float]]] = {name: {s: [] for s in subjects} for name in LISTINGS}
    for i in range(args.warmup + args.runs):
        measured = i >= args.warmup
        tag = f"run {i - args.warmup + 1}" if measured else "warm-up"
        for name, (ctr_args, _) in LISTINGS.items():
            for subject in rotate(i, subjects):
                seconds, out = timed_ctr(servers[subject], *ctr_args)
                check_listing(name, out, dataset, subject)
                if measured:
                    times[name][subject].append(seconds)
                log(f"{tag:>7} ctr {name:<14} {subject:<12} {seconds:7.3f} s")
    return {
        "blobs": dataset.blobs,
        "images": len(dataset.images),
        "streams": args.streams,
        "populate": populated,
        "times": times,
    }


def run(args: argparse.Namespace, base: Path, env: dict[str, str] | None, results: dict[str, Any]) -> None:
    daemons: dict[str, RunningDaemon] = {}
    notes: list[str] = results["notes"]
    try:
        for subject in SUBJECTS:
            daemons[subject] = start_daemon(subject, env, parent=str(base))
            log(f"started {subject} (pid {daemons[subject].pid}) in {daemons[subject].start_s * 1000:.0f} ms")
        if args.size_mib > 0:
            results["ingest"] = run_ingest(args, base, daemons, notes)
        if args.blobs > 0:

            def floor() -> RunningDaemon:
                daemons[FLOOR] = start_floor(daemons["containerkit"], env, base)
                return daemons[FLOOR]

            results["listing"] = run_listing(args, daemons, None if args.no_grpc_floor else floor)
    finally:
        for subject, daemon in daemons.items():
            code = daemon.close()
            notes += [f"{subject}: {n}" for n in daemon.notes]
            if code not in (0, -15):
                notes.append(f"{subject} exited {code}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-floor"]:  # internal: the grpc floor subject (see start_floor)
        return serve_floor(argv[1], argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the ingested blob (default 1024; 0 skips)")
    parser.add_argument("--blobs", type=int, default=10000, help="blobs for the listings (default 10000; 0 skips)")
    parser.add_argument("--images", type=int, default=1000, help="images for the listings (default 1000)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each metric (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default 1)")
    parser.add_argument("--streams", type=int, default=4, help="parallel Write streams when populating (default 4)")
    parser.add_argument("--dir", default="/tmp", help="parent of the temp dirs and the ingest file (default /tmp)")
    parser.add_argument(
        "--inherit-env",
        action="store_true",
        help="run containerkitd with this environment as is (by default its bytecode is cached in a temp dir)",
    )
    parser.add_argument(
        "--no-grpc-floor",
        action="store_true",
        help="skip the listings against our gRPC server answering from memory (see the README)",
    )
    parser.add_argument(
        "--pythonpath",
        metavar="DIR",
        help="put DIR first on containerkitd's PYTHONPATH, e.g. a checkout of another revision (git worktree)"
        " to measure before/after a change; the table says which code ran",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (samples and summary) instead of a table")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("content.py: run as root (containerd needs it)", file=sys.stderr)
        return 2
    for tool in (CONTAINERD, CTR, CONTAINERKITD):
        if not Path(tool).exists():
            print(f"content.py: {tool} not found", file=sys.stderr)
            return 2
    if args.runs < 1 or args.warmup < 0 or args.streams < 1:
        parser.error("--runs and --streams must be at least 1, --warmup at least 0")
    if args.blobs > 0 and (args.images < 1 or args.blobs < 2 * args.images):
        parser.error("--blobs must be at least twice --images (each image has a manifest and a config)")

    base = Path(tempfile.mkdtemp(prefix="ckb-content-", dir=args.dir))
    pycache = base / "pycache"
    env = python_env(args.inherit_env, pycache)
    if args.pythonpath:
        env = dict(env if env is not None else os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(args.pythonpath).resolve()), env.get("PYTHONPATH")) if p
        )
    results: dict[str, Any] = {
        "setup": {
            "containerkitd": CONTAINERKITD,
            "containerkit_code": code_of(env),
            "containerd": CONTAINERD,
            "ctr": CTR,
            "dir": str(base.parent),
            "filesystem": filesystem_of(base),
            "bytecode": "environment as inherited" if args.inherit_env else "bytecode cached",
            "runs": args.runs,
            "warmup": args.warmup,
            "cpus": os.cpu_count(),
        },
        "loadavg_1min": {"before": os.getloadavg()[0]},
        "notes": [],
    }
    log(f"working in {base} ({results['setup']['filesystem']})")
    try:
        run(args, base, env, results)
    except RuntimeError as err:
        print(f"content.py: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results["loadavg_1min"].update(after=os.getloadavg()[0], cpus=os.cpu_count())
    if args.json:
        rows = build_rows(results)
        results["table"] = [
            {
                "metric": label,
                "containerkit": ck,
                "containerd": cd,
                "ratio": ck / cd if ck is not None and cd else None,
                FLOOR.replace(" ", "_"): floor,
            }
            for label, _, ck, cd, floor in rows
        ]
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
