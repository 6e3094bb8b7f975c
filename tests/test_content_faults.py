"""Faults around the content store, driven through Debian's ``ctr`` against a real containerkitd.

Failed commits, clients and daemons killed mid-ingest, hostile digests and refs, a full disk, and
garbage collection of what images and leases stop referencing. Error lines are compared with what
containerd 1.6.20 prints for the same commands (learnt once from a real containerd on a scratch root).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_ctr_content import (
    CHUNK,
    QUIET_GC,
    SlowIngest,
    blob_path,
    blobs_on_disk,
    content_active,
    content_ls,
    ctr_bytes,
    ingest,
    make_image,
    sha256,
    wait_for,
)

from core.api.containerd.services.content.v1 import content_pb2 as pb
from core.api.containerd.services.content.v1 import content_pb2_grpc as pb_grpc
from core.metadata import MetadataStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("ctr") is None, reason="ctr (Debian's containerd package) is not installed"),
]


@pytest.fixture
def ck(make_daemon: Any) -> Any:
    """A containerkitd whose garbage collector runs only for ``--sync`` deletions (see test_ctr_content)."""
    return make_daemon(QUIET_GC)


@pytest.fixture
def slow_ingests() -> Iterator[list[SlowIngest]]:
    """Every SlowIngest a test appends is killed (by pid) afterwards, whatever happened."""
    started: list[SlowIngest] = []
    yield started
    for slow in started:
        slow.kill()


def metadata(namespace: str, lease: str | None = None) -> list[tuple[str, str]]:
    pairs = [("containerd-namespace", namespace)]
    return [*pairs, ("containerd-lease", lease)] if lease else pairs


def grpc_write(
    daemon: Any,
    ref: str,
    data: bytes,
    *,
    namespace: str = "default",
    lease: str | None = None,
    labels: dict[str, str] | None = None,
    commit: bool = True,
) -> str:
    """Write ``data`` as ingest ``ref`` through the Content API, the way a pull does (``containerd-lease``
    metadata: ctr's own commands cannot name a lease); without ``commit`` the stream ends mid-ingest."""
    digest = sha256(data)
    requests = [pb.WriteContentRequest(action=pb.WRITE, ref=ref, offset=0, data=data, total=len(data))]
    if commit:
        requests.append(
            pb.WriteContentRequest(
                action=pb.COMMIT, offset=len(data), total=len(data), expected=digest, labels=labels or {}
            )
        )
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        responses = list(pb_grpc.ContentStub(channel).Write(iter(requests), metadata=metadata(namespace, lease)))
    assert responses[-1].offset == len(data)
    if commit:
        assert responses[-1].digest == digest
    return digest


def grpc_abort(daemon: Any, ref: str, namespace: str = "default") -> None:
    """Abort an ingest (ctr 1.6 has no command for it)."""
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        pb_grpc.ContentStub(channel).Abort(pb.AbortRequest(ref=ref), metadata=metadata(namespace))


def ingest_dirs(root: Path) -> list[Path]:
    directory = root / "content.local" / "ingest"
    return sorted(directory.iterdir()) if directory.is_dir() else []


def ingest_file(daemon: Any, ref: str, path: Path, *flags: str) -> subprocess.CompletedProcess[bytes]:
    """``ctr content ingest [FLAGS] REF < path``: a seekable stdin, so that ctr resumes a partial ingest."""
    with path.open("rb") as stdin:
        return ctr_bytes(daemon, "content", "ingest", *flags, ref, stdin=stdin, check=False)


def start_killed_ingest(daemon: Any, ref: str, data: bytes, started: list[SlowIngest]) -> None:
    """Feed ``ctr content ingest REF`` with more than one chunk of ``data``, wait until the daemon holds the
    first chunk, then SIGKILL that ctr (by its pid): a client that disconnected mid-write."""
    assert len(data) > CHUNK
    slow = SlowIngest(daemon, ref)
    started.append(slow)
    slow.feed(data[: CHUNK + 1])
    wait_for(lambda: content_active(daemon).get(ref) == "1.049MB", f"ingest {ref!r} at 1 MiB")
    slow.kill()


# -- wrong expectations on commit -------------------------------------------------------------


DATA_12 = b"hello world" + bytes(1)


def failed_commit(ck: Any, source: Path, ref: str, *flags: str) -> str:
    """Ingest ``source`` with ``flags`` that do not match it: ctr fails; nothing is committed, the ingest
    stays (all 12 bytes) for a retry. Returns ctr's error line."""
    result = ingest_file(ck, ref, source, *flags)
    assert result.returncode == 1
    assert content_ls(ck) == {}
    assert blobs_on_disk(ck) == set()
    assert content_active(ck) == {ref: "12B"}
    return result.stderr.decode()


def committed_once(ck: Any, data: bytes) -> None:
    assert content_active(ck) == {}
    assert set(content_ls(ck)) == {sha256(data)}
    assert ctr_bytes(ck, "content", "get", sha256(data)).stdout == data
    assert ingest_dirs(ck.root) == []


def test_a_wrong_expected_digest_fails_the_commit_and_a_retry_succeeds(
    ck: Any, tmp_path: Path, robustness: Any
) -> None:
    source = tmp_path / "data"
    source.write_bytes(DATA_12)
    wrong = sha256(b"something else")
    error = failed_commit(ck, source, "wrong-digest", "--expected-digest", wrong)
    assert error == (
        'ctr: failed commit on ref "wrong-digest": commit failed: unexpected commit digest '
        f"{sha256(DATA_12)}, expected {wrong}: failed precondition\n"
    )
    assert ingest_file(ck, "wrong-digest", source, "--expected-digest", sha256(DATA_12)).returncode == 0
    committed_once(ck, DATA_12)
    robustness.record("faults injected")


def test_a_wrong_expected_size_fails_the_commit_and_a_retry_succeeds(ck: Any, tmp_path: Path, robustness: Any) -> None:
    source = tmp_path / "data"
    source.write_bytes(DATA_12)
    error = failed_commit(ck, source, "wrong-size", "--expected-size", "5")
    assert error == (
        'ctr: failed commit on ref "wrong-size": commit failed: "wrong-size" failed size validation: 12 != 5: '
        "failed precondition\n"
    )
    # The ingest recorded total 5: reopening it with another total is refused (containerd's local store
    # refuses too, "provided total differs from status"), and the ingest is still there afterwards.
    assert ingest_file(ck, "wrong-size", source, "--expected-size", "12").returncode == 1
    assert content_active(ck) == {"wrong-size": "12B"}
    assert ingest_file(ck, "wrong-size", source).returncode == 0  # no size expected: commits what was written
    committed_once(ck, DATA_12)
    robustness.record("faults injected")


# -- a client that disconnects mid-write ------------------------------------------------------


def test_a_killed_client_leaves_a_resumable_ingest(
    ck: Any, tmp_path: Path, slow_ingests: list[SlowIngest], robustness: Any
) -> None:
    data = os.urandom(3 * CHUNK)
    source = tmp_path / "data"
    source.write_bytes(data)

    start_killed_ingest(ck, "killed-client", data, slow_ingests)
    assert content_active(ck) == {"killed-client": "1.049MB"}  # the first chunk reached the daemon
    assert content_ls(ck) == {}

    # A second ctr with the same ref learns the offset, seeks its file there and sends only the rest.
    result = ingest_file(ck, "killed-client", source)
    assert (result.returncode, result.stderr) == (0, b"")
    assert content_active(ck) == {}
    assert content_ls(ck)[sha256(data)].size == "3.146MB"
    assert ctr_bytes(ck, "content", "get", sha256(data)).stdout == data
    assert hashlib.sha256(blob_path(ck, sha256(data)).read_bytes()).hexdigest() == sha256(data).split(":")[1]
    robustness.record("faults injected")


# -- hostile digests and refs -----------------------------------------------------------------

BAD_DIGESTS = [
    "not-a-digest",
    "sha256:../../etc/passwd",
    "sha256:" + "A" * 64,  # uppercase hex
    "SHA256:" + "a" * 64,
    "sha256:" + "a" * 63,
    "sha256:" + "../" * 21 + "a",  # 64 characters, none of them hex but the last
    "sha256:/etc/passwd" + "a" * 53,
]


@pytest.mark.parametrize(
    ("digest", "ctr_error"),
    [
        ("not-a-digest", "invalid checksum digest format"),
        ("sha256:../../etc/passwd", "invalid checksum digest length"),
        ("sha256:" + "A" * 64, "invalid checksum digest format"),
    ],
    ids=["no-algorithm", "path", "uppercase"],
)
def test_ctr_refuses_invalid_digests_as_with_containerd(ck: Any, digest: str, ctr_error: str, robustness: Any) -> None:
    # ctr parses the digest before calling: the same words as against containerd.
    for args in (("content", "get", digest), ("content", "label", digest, "a=b")):
        result = ck.ctr(*args, check=False)
        assert (result.returncode, result.stderr) == (1, f"ctr: {ctr_error}\n")
    robustness.record("hostile inputs")


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_the_content_api_answers_invalid_argument_for_invalid_digests(ck: Any, digest: str, robustness: Any) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    calls = {
        "Info": lambda stub, md: stub.Info(pb.InfoRequest(digest=digest), metadata=md),
        "Read": lambda stub, md: list(stub.Read(pb.ReadContentRequest(digest=digest), metadata=md)),
        "Delete": lambda stub, md: stub.Delete(pb.DeleteContentRequest(digest=digest), metadata=md),
        "Update": lambda stub, md: stub.Update(
            pb.UpdateRequest(info=pb.Info(digest=digest, labels={"a": "b"})), metadata=md
        ),
        "Write": lambda stub, md: list(
            stub.Write(iter([pb.WriteContentRequest(action=pb.STAT, ref="bad-expected", expected=digest)]), metadata=md)
        ),
    }
    with grpc.insecure_channel(f"unix:{ck.address}") as channel:
        stub = pb_grpc.ContentStub(channel)
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as info:
                call(stub, metadata("default"))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert f"invalid digest {digest!r}" in info.value.details(), (name, info.value.details())
    assert Path("/etc/passwd").read_bytes() == passwd
    assert content_active(ck) == {}
    assert ck.ctr("version").returncode == 0
    robustness.record("hostile inputs")


def snapshot(top: Path) -> dict[Path, tuple[int, int]]:
    """Every regular file under ``top`` with its size and mtime."""
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in top.rglob("*") if path.is_file()}


def test_refs_that_look_like_paths_stay_inside_the_ingest_folder(
    ck: Any,
    tmp_path: Path,
    slow_ingests: list[SlowIngest],
    robustness: Any,
) -> None:
    escape = f"ck-escape-{uuid.uuid4().hex}"
    ingest_root = ck.root / "content.local" / "ingest"
    refs = [
        "../../x",  # <root>/x if joined as a path
        "../../../../" + escape,  # /tmp/<escape> from <dir>/root/content.local/ingest
        "/etc/passwd",
        "/tmp/" + escape,
        "a/../../b",
        "..",
    ]
    passwd = Path("/etc/passwd").read_bytes()
    before = snapshot(ck.dir)
    bodies = {ref: os.urandom(CHUNK) + ref.encode() * 1000 for ref in refs}

    for ref in refs:  # leave each one half written, so that its files stay on disk
        start_killed_ingest(ck, ref, bodies[ref], slow_ingests)
    assert content_active(ck) == dict.fromkeys(refs, "1.049MB")

    changed = {path for path, stat in snapshot(ck.dir).items() if before.get(path) != stat}
    meta = {ck.root / name for name in ("meta.db", "meta.db-wal", "meta.db-shm")}
    assert {path for path in changed - meta if ingest_root not in path.parents} == {ck.log_path}
    folders = ingest_dirs(ck.root)
    assert len(folders) == len(refs)
    # Each folder records its backend ref, "<namespace>/<ref>"; its name is that ref's sha256.
    assert {(folder / "ref").read_text() for folder in folders} == {f"default/{ref}" for ref in refs}
    assert {folder.name for folder in folders} == {
        hashlib.sha256(f"default/{ref}".encode()).hexdigest() for ref in refs
    }
    for outside in (Path("/tmp") / escape, ck.root / "x", ck.root.parent / "b"):
        assert not outside.exists(), outside
    assert Path("/etc/passwd").read_bytes() == passwd

    for ref in refs:  # each resumes and commits as usual
        source = tmp_path / "body"
        source.write_bytes(bodies[ref])
        assert ingest_file(ck, ref, source).returncode == 0
    assert content_active(ck) == {}
    assert ingest_dirs(ck.root) == []
    assert blobs_on_disk(ck) == {sha256(body) for body in bodies.values()}
    assert Path("/etc/passwd").read_bytes() == passwd
    assert not (Path("/tmp") / escape).exists()
    robustness.record("hostile inputs")


# -- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs() -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted and removed afterwards (after the test stopped its daemon)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mountpoint = Path(tempfile.mkdtemp(prefix="ck-tmpfs-", dir="/tmp"))
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)], check=False)
        if mounted.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=True)
    finally:
        mountpoint.rmdir()


def test_a_full_disk_fails_the_ingest_cleanly_and_the_daemon_serves_on(
    make_daemon: Any, small_tmpfs: Path, robustness: Any
) -> None:
    root = small_tmpfs / "root"
    daemon = make_daemon(QUIET_GC, args=("--root", str(root)))
    try:
        daemon.ctr("version")  # the server's UUID is recorded once, on first use; do it while there is room
        big = daemon.dir / "big"
        big.write_bytes(os.urandom(16 << 20))

        result = ingest_file(daemon, "too-big", big)
        assert result.returncode == 1
        error = result.stderr.decode()
        assert error.startswith("ctr: failed to copy: ") and "no space left on device" in error, error
        assert error.count("\n") == 1

        assert content_ls(daemon) == {}
        blobs = root / "content.local" / "blobs" / "sha256"
        assert not blobs.exists() or list(blobs.iterdir()) == []
        assert "too-big" in content_active(daemon)  # what reached the disk, resumable or abortable
        assert daemon.ctr("version").returncode == 0

        grpc_abort(daemon, "too-big")
        assert content_active(daemon) == {}
        assert ingest_dirs(root) == []
        small = b"fits easily\n"
        assert ingest(daemon, "small", small) == sha256(small)
        assert set(content_ls(daemon)) == {sha256(small)}
        assert ctr_bytes(daemon, "content", "get", sha256(small)).stdout == small
    finally:
        daemon.stop()
    robustness.record("faults injected")


# -- kill -9 of the daemon mid-ingest ---------------------------------------------------------


def test_a_daemon_killed_mid_ingest_restarts_with_the_ingest_resumable(
    ck: Any, slow_ingests: list[SlowIngest], robustness: Any
) -> None:
    big = ck.dir / "big"
    data = os.urandom(200 << 20)
    big.write_bytes(data)
    digest = sha256(data)

    slow = SlowIngest(ck, "big-ingest")
    slow_ingests.append(slow)
    slow.feed(data[: 64 << 20])  # the rest never comes: the daemon dies first
    wait_for(lambda: content_active(ck).get("big-ingest", "0B").endswith("MB"), "the daemon to hold some of it")
    assert ck.stop(signal.SIGKILL) == -signal.SIGKILL
    code, err = slow.finish()
    assert code == 1 and err.startswith("ctr: "), err

    ck.start()
    assert content_ls(ck) == {}  # no partial blob
    assert blobs_on_disk(ck) == set()
    offset = content_active(ck)["big-ingest"]
    assert offset.endswith("MB") and 0 < float(offset[:-2]) < 200

    result = ingest_file(ck, "big-ingest", big)  # resumes at the recorded offset
    assert (result.returncode, result.stderr) == (0, b"")
    assert content_active(ck) == {}
    assert content_ls(ck)[digest].size == "209.7MB"
    assert hashlib.sha256(blob_path(ck, digest).read_bytes()).hexdigest() == digest.split(":")[1]
    assert ingest_dirs(ck.root) == []

    assert ck.stop() == 0, ck.log
    with MetadataStore(ck.root / "meta.db") as store:
        assert store.integrity_check() == "ok"
    robustness.record("faults injected")


def test_a_daemon_killed_mid_ingest_lets_the_ingest_be_aborted(
    ck: Any, slow_ingests: list[SlowIngest], robustness: Any
) -> None:
    start_killed_ingest(ck, "doomed", os.urandom(2 * CHUNK), slow_ingests)
    assert ck.stop(signal.SIGKILL) == -signal.SIGKILL
    ck.start()
    assert content_active(ck) == {"doomed": "1.049MB"}
    grpc_abort(ck, "doomed")
    assert content_active(ck) == {}
    assert ingest_dirs(ck.root) == []
    assert ck.stop() == 0, ck.log
    with MetadataStore(ck.root / "meta.db") as store:
        assert store.integrity_check() == "ok"
    robustness.record("faults injected")


# -- garbage collection -----------------------------------------------------------------------


def test_images_rm_sync_collects_what_only_that_image_referenced(ck: Any) -> None:
    shared_layer = "a layer both images use\n"
    first = make_image(ck, "docker.io/library/ck-gc:first", layer_text=shared_layer)
    second = make_image(ck, "docker.io/library/ck-gc:second", layer_text=shared_layer)
    assert first.layer == second.layer and first.config != second.config
    # Another namespace holds the layer too: its record keeps the bytes on disk whatever default does.
    layer_bytes = ctr_bytes(ck, "content", "get", first.layer).stdout
    ingest(ck, "keep-layer", layer_bytes, namespace="ck-keeper")
    ck.ctr("content", "label", first.layer, "containerd.io/gc.root=keep", namespace="ck-keeper")
    assert blobs_on_disk(ck) == first.blobs | second.blobs

    assert ck.ctr("images", "rm", "--sync", first.name).stdout == f"{first.name}\n"
    assert set(content_ls(ck)) == second.blobs
    assert blobs_on_disk(ck) == second.blobs
    for digest in (first.manifest, first.config):
        assert not blob_path(ck, digest).exists()

    ck.ctr("images", "rm", "--sync", second.name)
    assert content_ls(ck) == {}
    assert blobs_on_disk(ck) == {first.layer}  # held by ck-keeper
    assert set(content_ls(ck, namespace="ck-keeper")) == {first.layer}


def test_a_lease_protects_unreferenced_content_until_it_is_removed(ck: Any) -> None:
    ck.ctr("leases", "create", "--id", "ck-hold")
    held = grpc_write(ck, "held-blob", b"held by a lease\n", lease="ck-hold")
    ingest(ck, "loose-blob", b"held by nothing\n")

    ck.ctr("leases", "create", "--id", "ck-trigger")
    ck.ctr("leases", "rm", "--sync", "ck-trigger")  # a full collection before answering
    assert set(content_ls(ck)) == {held}
    assert blobs_on_disk(ck) == {held}

    assert ck.ctr("leases", "rm", "--sync", "ck-hold").stdout == "ck-hold\n"
    assert content_ls(ck) == {}
    assert blobs_on_disk(ck) == set()


GC_EVERY_SECOND = """
[plugins.gc.scheduler]
interval_seconds = 1
startup_delay_seconds = 1
delay_after_delete_seconds = 3600
"""


def test_the_scheduler_collects_the_leftovers_of_an_interrupted_pull(make_daemon: Any, robustness: Any) -> None:
    # Deletions do not trigger a collection here (delay 3600 s): only the periodic one can collect.
    daemon = make_daemon(GC_EVERY_SECOND)
    daemon.ctr("leases", "create", "--id", "ck-pull")
    layer = grpc_write(daemon, "layer-1", b"layer one\n" * 100, lease="ck-pull")
    config = grpc_write(daemon, "config", b'{"os": "linux"}', lease="ck-pull")
    labels = {"containerd.io/gc.ref.content.config": config, "containerd.io/gc.ref.content.l.0": layer}
    manifest = grpc_write(daemon, "manifest", b'{"schemaVersion": 2}', lease="ck-pull", labels=labels)
    grpc_write(daemon, "layer-2", b"half a layer", lease="ck-pull", commit=False)  # the pull stopped here

    def collections() -> int:
        return daemon.log.count("gc: marked ")

    seen = collections()
    wait_for(lambda: collections() >= seen + 2, "two periodic collections")
    assert set(content_ls(daemon)) == {layer, config, manifest}  # the lease holds them
    assert content_active(daemon) == {"layer-2": "12B"}

    # The client dies before it could create the image; its lease is removed later, without --sync.
    assert daemon.ctr("leases", "rm", "ck-pull").stdout == "ck-pull\n"
    wait_for(
        lambda: content_ls(daemon) == {} and content_active(daemon) == {},
        "the periodic collection to remove the blobs and the ingest",
        timeout=60,
    )
    assert blobs_on_disk(daemon) == set()
    assert ingest_dirs(daemon.root) == []
    robustness.record("faults injected")
