"""Resource limits of a real containerkitd: a client that stalls its streams does not stall the others, one
client's concurrency is bounded (``[grpc] max_concurrent_streams`` calls per connection, ``max_workers`` in
all), and large manifests and many-layer images are pulled and run within bounded memory.

No timing assertions: "not stalled" means "answers at all within :data:`ANSWER_S`".
"""

from __future__ import annotations

import queue
import shutil
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import RunningDaemon
from daemon_usage import MIB, peak_rss, reset_peak_rss, rss
from google.protobuf import empty_pb2
from interop import remove_namespace_dirs
from oci_images import Layer, Layout, busybox_layer
from registry_servers import faulty_registry

from core.api.containerd.services.content.v1 import content_pb2 as pb
from core.api.containerd.services.content.v1 import content_pb2_grpc as pb_grpc
from core.api.containerd.services.version.v1 import version_pb2_grpc
from core.config import ConfigError, GrpcConfig
from core.digest import Digest

pytestmark = pytest.mark.integration

ANSWER_S = 30.0  # "answers at all": generous, never a timing assertion
NAMESPACE = "limits"
NS = [("containerd-namespace", NAMESPACE)]
ROOT_LABEL = {"containerd.io/gc.root": "limits"}
BIG_BLOB = 64 * MIB  # far beyond the flow-control windows: a reader that stops consuming stalls the sender
SMALL_LIMITS = "[grpc]\nmax_workers = 8\nmax_concurrent_streams = 4\n"
LAYERS = 200
MANIFEST_SIZE = (4 << 20) - 4096  # just under the 4 MiB manifest cap
PULL_MEMORY_LIMIT = 96 * MIB  # peak RSS growth allowed while pulling and running either image


def connection(daemon: RunningDaemon) -> grpc.Channel:
    """A channel with a connection of its own (not shared through grpc's global subchannel pool)."""
    return grpc.insecure_channel(f"unix:{daemon.address}", options=[("grpc.use_local_subchannel_pool", 1)])


class Writer:
    """One content Write stream driven message by message, so that it can be left stalled mid-way."""

    def __init__(self, stub: pb_grpc.ContentStub) -> None:
        self._requests: queue.Queue[pb.WriteContentRequest | None] = queue.Queue()
        self.call = stub.Write(iter(self._requests.get, None), metadata=NS)

    def send(self, **fields: Any) -> pb.WriteContentResponse:
        self._requests.put(pb.WriteContentRequest(**fields))
        return next(self.call)

    def write(self, data: bytes, offset: int = 0, chunk: int = 4 * MIB) -> int:
        """Send ``data`` at ``offset`` in WRITE messages of ``chunk`` bytes; returns the new offset."""
        for start in range(0, len(data), chunk):
            response = self.send(action=pb.WRITE, offset=offset + start, data=data[start : start + chunk])
        return response.offset

    def close(self) -> None:
        self._requests.put(None)


def write_blob(stub: pb_grpc.ContentStub, ref: str, data: bytes) -> str:
    """Write ``data`` as a gc-rooted blob through one stream; returns its digest."""
    writer, expected = Writer(stub), Digest.from_bytes(data)
    writer.send(action=pb.STAT, ref=ref, total=len(data), expected=expected)
    writer.write(data)
    writer.send(action=pb.COMMIT, offset=len(data), total=len(data), expected=expected, labels=ROOT_LABEL)
    writer.close()
    return expected


def read_all(stub: pb_grpc.ContentStub, digest: str, size: int = 0) -> bytes:
    request = pb.ReadContentRequest(digest=digest, size=size)
    return b"".join(r.data for r in stub.Read(request, metadata=NS, timeout=ANSWER_S))


def assert_answers(daemon: RunningDaemon, digest: str) -> int:
    """Another client, on a connection of its own, gets every kind of answer within ANSWER_S: unary calls,
    a listing stream, a read, a whole write; and so do ``ckctl`` and ``ctr`` in processes of their own.
    Returns how many calls that is."""
    with connection(daemon) as channel:
        content = pb_grpc.ContentStub(channel)
        assert version_pb2_grpc.VersionStub(channel).Version(empty_pb2.Empty(), timeout=ANSWER_S).version
        assert content.Info(pb.InfoRequest(digest=digest), metadata=NS, timeout=ANSWER_S).info.size == BIG_BLOB
        assert any(r.info for r in content.List(pb.ListContentRequest(), metadata=NS, timeout=ANSWER_S))
        assert len(read_all(content, digest, size=1000)) == 1000
        small = b"written while another client stalls"
        assert write_blob(content, "other-client", small) == Digest.from_bytes(small)
    daemon.ckctl("version")
    daemon.ctr("version")
    return 7


@pytest.mark.parametrize(
    ("config", "stalled"),
    [("", 48), (SMALL_LIMITS, 24)],
    ids=["defaults-48-streams", "8-workers-24-streams"],
)
def test_stalled_streams_do_not_stall_other_clients(make_daemon: Any, robustness: Any, config: str, stalled: int):
    """One client opens more Reads of a big blob than there are workers and never consumes them; another
    leaves a Write stalled mid-way. Others still get answers; once released, the stalled calls finish."""
    daemon = make_daemon(config)
    data = bytes(range(256)) * (BIG_BLOB // 256)
    other = data[1:] + data[:1]  # a second blob, written by the stalled writer
    with connection(daemon) as hog, connection(daemon) as slow:
        digest = write_blob(pb_grpc.ContentStub(hog), "big", data)
        request, hogging = pb.ReadContentRequest(digest=digest), pb_grpc.ContentStub(hog)
        reads = [hogging.Read(request, metadata=NS) for _ in range(stalled)]
        writer, half, expected = Writer(pb_grpc.ContentStub(slow)), len(other) // 2, Digest.from_bytes(other)
        writer.send(action=pb.STAT, ref="stalled", total=len(other), expected=expected)
        assert writer.write(other[:half]) == half

        calls = assert_answers(daemon, digest)

        # Released: all but the first and the last reads cancelled, those two (the last was queued behind
        # the per-connection limit) read to the end; the stalled write goes on where it stopped and commits.
        for read in reads[1:-1]:
            read.cancel()
        for read in (reads[-1], reads[0]):
            assert Digest.from_bytes(b"".join(r.data for r in read)) == digest
        writer.write(other[half:], half)
        done = writer.send(action=pb.COMMIT, offset=len(other), total=len(other), expected=expected)
        writer.close()
        assert done.digest == expected
    robustness.record("faults injected", stalled + 1)
    robustness.record("soak operations", calls)


def test_limits_are_validated() -> None:
    """A per-connection limit that would let one client hold every worker is refused."""
    for bad in ({"max_workers": 0}, {"max_workers": 8, "max_concurrent_streams": 8}, {"max_concurrent_streams": 0}):
        with pytest.raises(ConfigError, match="max_"):
            GrpcConfig(**bad)
    assert GrpcConfig(max_workers=2, max_concurrent_streams=1).max_concurrent_streams == 1


# ------------------------------------------------------------------------------------------------ memory


@pytest.fixture
def place(make_daemon: Any) -> Iterator[RunningDaemon]:
    """A daemon whose namespace ``limits`` is cleaned of containers and cgroups afterwards."""
    daemon = make_daemon()
    yield daemon
    for container in daemon.ckctl("containers", "ls", "-q", namespace=NAMESPACE, check=False).stdout.split():
        daemon.ckctl("tasks", "rm", "-f", container, namespace=NAMESPACE, check=False)
        daemon.ckctl("containers", "rm", container, namespace=NAMESPACE, check=False)
    remove_namespace_dirs(NAMESPACE)


@pytest.fixture(scope="module")
def big_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Images served by an in-memory registry: "small" (busybox), "layers" (busybox and LAYERS - 1 more
    layers of one file each) and "manifest" (busybox with a manifest of MANIFEST_SIZE bytes)."""
    layout = Layout(tmp_path_factory.mktemp("limits") / "layout")
    base = busybox_layer()
    images = {
        "small": layout.add_image("small", [base]),
        "layers": layout.add_image(
            "layers", [base, *(Layer().file(f"layer-{n:03}", b"%d\n" % n) for n in range(1, LAYERS))]
        ),
    }
    unpadded = layout.add_image("manifest", [base], annotations={"padding": ""})["size"]
    images["manifest"] = layout.add_image("manifest", [base], annotations={"padding": "x" * (MANIFEST_SIZE - unpadded)})
    assert images["manifest"]["size"] == MANIFEST_SIZE
    with faulty_registry() as registry:
        for blob in layout.blobs.iterdir():
            registry.add_blob(blob.read_bytes())
        for tag, descriptor in images.items():
            manifest = (layout.blobs / descriptor["digest"].split(":")[1]).read_bytes()
            registry.add_manifest("limits/big", tag, descriptor["mediaType"], manifest)
        yield {tag: f"{registry.host}/limits/big:{tag}" for tag in images}


@pytest.mark.skipif(shutil.which("runc") is None, reason="needs runc")
@pytest.mark.parametrize("image", ["layers", "manifest"])
def test_big_images_pull_and_run_in_bounded_memory(
    place: RunningDaemon, big_images: dict[str, str], robustness: Any, image: str
):
    """A 200-layer image and one with a manifest just under the 4 MiB cap pull and run, and the daemon's
    peak RSS grows by less than PULL_MEMORY_LIMIT over its RSS after a warm-up pull and run."""
    daemon, pid = place, place.process.pid
    daemon.ckctl("images", "pull", "--plain-http", big_images["small"], namespace=NAMESPACE)
    daemon.ckctl("run", "--rm", big_images["small"], "warm-up", "true", namespace=NAMESPACE)
    baseline = rss(pid)
    reset_peak_rss(pid)
    daemon.ckctl("images", "pull", "--plain-http", big_images[image], namespace=NAMESPACE)
    probe = ["cat", f"/layer-{LAYERS - 1:03}"] if image == "layers" else ["true"]
    result = daemon.ckctl("run", "--rm", big_images[image], "big", *probe, namespace=NAMESPACE)
    assert result.stdout == (f"{LAYERS - 1}\n" if image == "layers" else "")
    growth = peak_rss(pid) - baseline
    print(f"{image}: baseline {baseline // MIB} MiB, peak growth {growth // MIB} MiB")
    assert growth < PULL_MEMORY_LIMIT, f"peak RSS grew by {growth // MIB} MiB pulling and running {image}"
    robustness.record("soak operations", 4)
