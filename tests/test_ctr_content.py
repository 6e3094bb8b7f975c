"""Debian's ``ctr`` (containerd 1.6) driving the content store, images and leases of containerkitd.

The expected outputs are what containerd 1.6.20 prints for the same commands, learnt once from a real
containerd on a scratch root (tab-padded ``content ls``/``active`` tables, space-padded ``images ls`` and
``leases ls`` tables, the error lines); containerd itself is not needed to run these tests. Go prints
label maps in random order, so labels are compared as sets.

The daemons here keep the garbage collector quiet (``QUIET_GC``): blobs ingested by ``ctr content
ingest`` hold no lease, so any collection removes them. containerd collects on start, after 100
mutations and for ``--sync`` deletions; containerkit also collects shortly after every deletion and
every five minutes. A test that lists what it ingested must not race either, so only ``--sync``
deletions collect here; ``tests/test_content_faults.py`` covers the scheduler itself.
"""

from __future__ import annotations

import calendar
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from core.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from core.api.containerd.types import descriptor_pb2

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("ctr") is None, reason="ctr (Debian's containerd package) is not installed"),
]

QUIET_GC = """
[plugins.gc.scheduler]
interval_seconds = 0
startup_delay_seconds = 3600
delay_after_delete_seconds = 3600
"""

CONTENT_HEADER = ["DIGEST", "SIZE", "AGE", "LABELS"]
ACTIVE_HEADER = ["REF", "SIZE", "AGE"]
IMAGES_HEADER = ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"]
LEASES_HEADER = ["ID", "CREATED AT", "LABELS"]
RECENT = re.compile(r"Less than a second|\d+ seconds?")  # go-units HumanDuration of a fresh object
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CHUNK = 1 << 20  # ctr content ingest sends nothing until it has read this much (or EOF)


@pytest.fixture
def ck(make_daemon: Any) -> Any:
    """A containerkitd whose garbage collector runs only for ``--sync`` deletions."""
    return make_daemon(QUIET_GC)


# -- helpers (tests/test_content_faults.py uses them too) -------------------------------------


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def ctr_bytes(
    daemon: Any, *args: str, stdin: bytes | Any = None, namespace: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """``ctr -a SOCK [-n NS] ARGS`` with binary stdin (bytes, or an open file: seekable, so ctr can resume)."""
    ns = ["-n", namespace] if namespace else []
    feed = (
        {"input": stdin} if isinstance(stdin, bytes) else {"stdin": stdin if stdin is not None else subprocess.DEVNULL}
    )
    result = subprocess.run(["ctr", "-a", daemon.address, *ns, *args], capture_output=True, timeout=120, **feed)
    if check and result.returncode != 0:
        raise AssertionError(f"ctr {' '.join(args)} failed ({result.returncode}): {result.stderr.decode()}")
    return result


def ingest(daemon: Any, ref: str, data: bytes, *flags: str, namespace: str | None = None) -> str:
    """``ctr content ingest [FLAGS] REF < data``; returns the digest of ``data``. ctr prints nothing."""
    result = ctr_bytes(daemon, "content", "ingest", *flags, ref, stdin=data, namespace=namespace)
    assert result.stdout == b"", result.stdout
    return sha256(data)


def tab_table(output: str, header: Sequence[str]) -> list[list[str]]:
    """A tabwriter table padded with tabs (``content ls``, ``content active``): the rows after ``header``."""
    lines = [[cell for cell in line.split("\t") if cell] for line in output.splitlines() if line.strip()]
    assert lines and lines[0] == list(header), output
    return lines[1:]


def space_table(output: str, header: Sequence[str]) -> list[list[str]]:
    """A tabwriter table padded with spaces (``images ls``, ``leases ls``): cells cut at the header's columns
    (cells such as ``721.0 B`` hold spaces themselves)."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines, output
    title = lines[0]
    starts, position = [], 0
    for name in header:
        position = title.index(name, position)
        starts.append(position)
        position += len(name)
    assert title.split() == " ".join(header).split(), output
    bounds = [*starts[1:], None]
    return [[line[start:end].strip() for start, end in zip(starts, bounds, strict=True)] for line in lines[1:]]


@dataclass
class Blob:
    size: str
    age: str
    labels: set[str]


def content_ls(daemon: Any, namespace: str | None = None) -> dict[str, Blob]:
    """``ctr content ls`` as {digest: Blob}; labels ``-`` is the empty set."""
    out = daemon.ctr("content", "ls", namespace=namespace).stdout
    listed = {}
    for row in tab_table(out, CONTENT_HEADER):
        assert len(row) == 4, out
        digest, size, age, labels = row
        listed[digest] = Blob(size, age, set() if labels == "-" else set(labels.split(",")))
    return listed


def content_active(daemon: Any, namespace: str | None = None) -> dict[str, str]:
    """``ctr content active`` as {ref: size}."""
    out = daemon.ctr("content", "active", namespace=namespace).stdout
    active = {}
    for row in tab_table(out, ACTIVE_HEADER):
        assert len(row) == 3 and RECENT.fullmatch(row[2]), out
        active[row[0]] = row[1]
    return active


def blob_path(daemon: Any, digest: str) -> Path:
    """Where the local content store keeps the blob on disk."""
    algorithm, hex_digest = digest.split(":")
    return daemon.root / "content.local" / "blobs" / algorithm / hex_digest


def blobs_on_disk(daemon: Any) -> set[str]:
    directory = daemon.root / "content.local" / "blobs" / "sha256"
    return {f"sha256:{p.name}" for p in directory.iterdir()} if directory.is_dir() else set()


def wait_for(condition: Any, what: str, timeout: float = 30.0) -> Any:
    """Poll ``condition()`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


class SlowIngest:
    """``ctr content ingest REF`` reading a pipe this test feeds: part now, the rest (or a kill) later."""

    def __init__(self, daemon: Any, ref: str, namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        self.process = subprocess.Popen(
            ["ctr", "-a", daemon.address, *ns, "content", "ingest", ref],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def feed(self, data: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def finish(self, data: bytes = b"") -> tuple[int, str]:
        """Send the rest and EOF; returns ctr's exit code and stderr."""
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        _, err = self.process.communicate(timeout=60)  # closes stdin: EOF
        return self.process.returncode, err.decode()

    def kill(self) -> None:
        """SIGKILL this ctr (by its pid) unless it has exited, and reap it."""
        if self.process.returncode is None:
            self.process.kill()
            self.process.communicate(timeout=60)


@pytest.fixture
def slow_ingests() -> Iterator[list[SlowIngest]]:
    """Every SlowIngest a test appends is killed (by pid) afterwards, whatever happened."""
    started: list[SlowIngest] = []
    yield started
    for ingest_process in started:
        ingest_process.kill()


@dataclass
class BuiltImage:
    name: str
    manifest: str
    config: str
    layer: str
    total_size: int  # manifest + config + layer bytes: what ``ctr images ls`` shows as SIZE

    @property
    def blobs(self) -> set[str]:
        return {self.manifest, self.config, self.layer}


def make_image(daemon: Any, name: str, *, namespace: str = "default", layer_text: str | None = None) -> BuiltImage:
    """An OCI image: layer and config ingested with ``ctr content ingest``, the manifest labelled with
    ``containerd.io/gc.ref.content.*`` (as a pull labels it) by ``ctr content label``, and the image record
    created through the Images gRPC API (ctr has no command that creates one from scratch)."""
    tar_bytes = io.BytesIO()
    text = (layer_text if layer_text is not None else f"layer of {name}\n").encode()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        member = tarfile.TarInfo("hello.txt")
        member.size = len(text)
        tar.addfile(member, io.BytesIO(text))
    layer = gzip.compress(tar_bytes.getvalue(), mtime=0)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar_bytes.getvalue())]},
            "config": {"Cmd": ["/hello"], "Labels": {"image": name}},
        }
    ).encode()
    layer_digest = ingest(daemon, f"layer-{sha256(layer)}", layer, namespace=namespace)
    config_digest = ingest(daemon, f"config-{sha256(config)}", config, namespace=namespace)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": len(layer)}
            ],
        }
    ).encode()
    manifest_digest = ingest(daemon, f"manifest-{sha256(manifest)}", manifest, namespace=namespace)
    daemon.ctr(
        "content",
        "label",
        manifest_digest,
        f"containerd.io/gc.ref.content.config={config_digest}",
        f"containerd.io/gc.ref.content.l.0={layer_digest}",
        namespace=namespace,
    )
    target = descriptor_pb2.Descriptor(media_type=MANIFEST_TYPE, digest=manifest_digest, size=len(manifest))
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        images_pb2_grpc.ImagesStub(channel).Create(
            images_pb2.CreateImageRequest(image=images_pb2.Image(name=name, target=target)),
            metadata=[("containerd-namespace", namespace)],
        )
    return BuiltImage(name, manifest_digest, config_digest, layer_digest, len(manifest) + len(config) + len(layer))


def images_ls(daemon: Any, namespace: str | None = None) -> dict[str, list[str]]:
    """``ctr images ls`` as {ref: [type, digest, size, platforms, labels]}."""
    out = daemon.ctr("images", "ls", namespace=namespace).stdout
    return {row[0]: row[1:] for row in space_table(out, IMAGES_HEADER)}


def leases_ls(daemon: Any, namespace: str | None = None) -> dict[str, tuple[str, set[str]]]:
    """``ctr leases ls`` as {id: (created at, labels)}."""
    out = daemon.ctr("leases", "ls", namespace=namespace).stdout
    listed = {}
    for lease_id, created, labels in space_table(out, LEASES_HEADER):
        assert RFC3339.fullmatch(created), out
        listed[lease_id] = (created, set(labels.split(",")) if labels else set())
    return listed


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


# -- content ingest / ls / get / label / rm ---------------------------------------------------


def test_content_ls_on_a_fresh_daemon_prints_only_the_header(ck: Any) -> None:
    assert ck.ctr("content", "ls").stdout == "DIGEST\tSIZE\tAGE\tLABELS\n"
    assert ck.ctr("content", "ls", "-q").stdout == ""
    assert ck.ctr("content", "active").stdout == "REF\tSIZE\tAGE\t\n"


def test_content_ingest_from_stdin_then_ls_and_get_as_containerd(ck: Any) -> None:
    text = b"hello world\n"
    random_bytes = bytes(range(256)) * 12  # 3072 bytes
    text_digest = ingest(ck, "ingest-text", text)
    random_digest = ingest(ck, "ingest-random", random_bytes)
    assert text_digest == "sha256:a948904f2f0f479b8f8197694b30184b0d2ed1c1cd2a1ec0fb85d299a192a447"

    listed = content_ls(ck)
    assert set(listed) == {text_digest, random_digest}
    # Sizes in go-units HumanSize (decimal, 4 significant digits), as containerd prints them.
    assert (listed[text_digest].size, listed[text_digest].labels) == ("12B", set())
    assert (listed[random_digest].size, listed[random_digest].labels) == ("3.072kB", set())
    assert all(RECENT.fullmatch(blob.age) for blob in listed.values())
    assert ck.ctr("content", "ls", "-q").stdout.split() == sorted([text_digest, random_digest])

    assert ctr_bytes(ck, "content", "get", text_digest).stdout == text
    assert ctr_bytes(ck, "content", "get", random_digest).stdout == random_bytes
    assert blob_path(ck, random_digest).read_bytes() == random_bytes
    assert content_active(ck) == {}  # committed ingests are gone


def test_ingesting_bytes_already_stored_adds_no_second_copy(ck: Any) -> None:
    data = b"stored once\n"
    digest = ingest(ck, "first", data)
    assert ingest(ck, "second", data) == digest
    assert ingest(ck, "third", data, "--expected-digest", digest, "--expected-size", str(len(data))) == digest
    assert list(content_ls(ck)) == [digest]
    assert blobs_on_disk(ck) == {digest}
    assert content_active(ck) == {}


def test_content_get_of_a_missing_blob_is_not_found(ck: Any) -> None:
    missing = sha256(b"never ingested")
    result = ck.ctr("content", "get", missing, check=False)
    assert result.returncode == 1
    assert result.stderr == f"ctr: content digest {missing}: not found\n"


def test_content_label_sets_replaces_and_clears_labels(ck: Any) -> None:
    digest = ingest(ck, "to-label", b"label me\n")
    result = ck.ctr("content", "label", digest, "foo=bar", "baz=qux")
    assert set(result.stdout.strip().split(",")) == {"foo=bar", "baz=qux"}
    assert content_ls(ck)[digest].labels == {"foo=bar", "baz=qux"}

    # A bare key sets "true", as containerd's ctr does; no label at all prints the current ones.
    assert set(ck.ctr("content", "label", digest, "foo").stdout.strip().split(",")) == {"foo=true", "baz=qux"}
    assert set(ck.ctr("content", "label", digest).stdout.strip().split(",")) == {"foo=true", "baz=qux"}
    assert content_ls(ck)[digest].labels == {"foo=true", "baz=qux"}

    # An empty value removes the label.
    assert ck.ctr("content", "label", digest, "foo=").stdout.strip() == "baz=qux"
    ck.ctr("content", "label", digest, "baz=")
    assert content_ls(ck)[digest].labels == set()


def test_content_label_of_a_missing_blob_is_not_found(ck: Any) -> None:
    missing = "sha256:" + "0" * 64
    result = ck.ctr("content", "label", missing, "a=b", check=False)
    assert result.returncode == 1
    assert result.stderr == f"ctr: content digest {missing}: not found\n"


def test_content_rm_prints_the_digest_and_a_missing_one_is_silent(ck: Any) -> None:
    keep = ingest(ck, "keep", b"keep me\n")
    gone = ingest(ck, "gone", b"remove me\n")
    assert ck.ctr("content", "rm", gone).stdout == f"{gone}\n"
    assert set(content_ls(ck)) == {keep}
    # containerd's ctr skips blobs that are not found: nothing printed, exit 0.
    again = ck.ctr("content", "rm", gone)
    assert (again.stdout, again.stderr) == ("", "")
    assert ck.ctr("content", "get", gone, check=False).returncode == 1


def test_content_active_lists_an_ingest_in_progress_with_its_offset(ck: Any, slow_ingests: list[SlowIngest]) -> None:
    data = b"a" * CHUNK + b"b" * 5000
    slow = SlowIngest(ck, "slow-ingest")
    slow_ingests.append(slow)
    slow.feed(data)  # ctr sends the first 1 MiB; the rest waits for more input or EOF

    active = wait_for(lambda: content_active(ck).get("slow-ingest") == "1.049MB" and content_active(ck), "the ingest")
    assert active == {"slow-ingest": "1.049MB"}
    assert content_active(ck, namespace="other-ns") == {}
    result = ck.ctr("content", "active", "ref==nomatch")
    assert result.stdout == "REF\tSIZE\tAGE\t\n"
    assert sha256(data) not in content_ls(ck)

    code, err = slow.finish(b"c" * 10)
    assert (code, err) == (0, "")
    assert content_active(ck) == {}
    digest = sha256(data + b"c" * 10)
    assert content_ls(ck)[digest].size == "1.054MB"
    assert ctr_bytes(ck, "content", "get", digest).stdout == data + b"c" * 10


def test_content_active_rejects_a_malformed_filter_as_containerd(ck: Any) -> None:
    result = ck.ctr("content", "active", "slow.*", check=False)
    assert result.returncode == 1
    assert result.stderr == "ctr: filters: parse error: [slow. >|*|< ]: expected field or quoted: invalid argument\n"


# -- images -----------------------------------------------------------------------------------


def test_images_ls_shows_an_image_built_from_ingested_blobs(ck: Any) -> None:
    assert ck.ctr("images", "ls").stdout.split() == IMAGES_HEADER
    image = make_image(ck, "docker.io/library/ck-test:one", layer_text="layer of test:one\n")
    listed = images_ls(ck)
    # SIZE is what ctr adds up from the manifest, its config and layers, read back through the daemon
    # (containerd printed "721.0 B" for an image of the same shape); PLATFORMS comes from the config.
    assert image.total_size < 1024
    assert listed == {image.name: [MANIFEST_TYPE, image.manifest, f"{image.total_size}.0 B", "linux/amd64", "-"]}
    assert ck.ctr("images", "ls", "-q").stdout == f"{image.name}\n"
    labels = content_ls(ck)[image.manifest].labels
    assert labels == {
        f"containerd.io/gc.ref.content.config={image.config}",
        f"containerd.io/gc.ref.content.l.0={image.layer}",
    }


def test_images_label_sets_and_clears_labels(ck: Any) -> None:
    image = make_image(ck, "docker.io/library/ck-label:1")
    assert ck.ctr("images", "label", image.name, "foo=bar").stdout == "foo=bar\n"
    assert images_ls(ck)[image.name][-1] == "foo=bar"
    assert ck.ctr("images", "label", image.name, "foo").stdout == "foo=true\n"
    assert images_ls(ck)[image.name][-1] == "foo=true"
    ck.ctr("images", "label", image.name, "foo=")
    assert images_ls(ck)[image.name][-1] == "-"
    assert images_ls(ck)[image.name][:2] == [MANIFEST_TYPE, image.manifest]


def test_images_label_of_a_missing_image_is_not_found(ck: Any) -> None:
    result = ck.ctr("images", "label", "docker.io/library/missing:x", "a=b", check=False)
    assert result.returncode == 1
    assert result.stderr == 'ctr: image "docker.io/library/missing:x": not found\n'


def test_an_image_update_by_field_path_keeps_the_target_and_sets_one_annotation(ck: Any) -> None:
    """What ``ctr images label`` sends (a name, labels and ``labels.<key>`` paths, no target) and its
    sibling ``annotations.<key>``: the stored target stays, the named annotation comes from the request."""
    from google.protobuf import field_mask_pb2

    image = make_image(ck, "docker.io/library/ck-annotate:1")
    request_target = descriptor_pb2.Descriptor(annotations={"org.example/a": "1", "org.example/b": "ignored"})
    mask = field_mask_pb2.FieldMask(paths=["annotations.org.example/a", "labels.k"])
    with grpc.insecure_channel(f"unix:{ck.address}") as channel:
        updated = (
            images_pb2_grpc.ImagesStub(channel)
            .Update(
                images_pb2.UpdateImageRequest(
                    image=images_pb2.Image(name=image.name, target=request_target, labels={"k": "v"}), update_mask=mask
                ),
                metadata=[("containerd-namespace", "default")],
            )
            .image
        )
    assert (updated.target.digest, updated.target.media_type) == (image.manifest, MANIFEST_TYPE)
    assert dict(updated.target.annotations) == {"org.example/a": "1"}
    assert dict(updated.labels) == {"k": "v"}
    assert images_ls(ck)[image.name][-1] == "k=v"


def test_images_tag_and_rm(ck: Any) -> None:
    image = make_image(ck, "docker.io/library/ck-tag:one")
    assert (
        ck.ctr("images", "tag", image.name, "docker.io/library/ck-tag:two").stdout == "docker.io/library/ck-tag:two\n"
    )
    listed = images_ls(ck)
    assert set(listed) == {image.name, "docker.io/library/ck-tag:two"}
    assert listed["docker.io/library/ck-tag:two"][1] == image.manifest

    assert ck.ctr("images", "rm", "docker.io/library/ck-tag:two").stdout == "docker.io/library/ck-tag:two\n"
    assert set(images_ls(ck)) == {image.name}
    assert image.blobs <= set(content_ls(ck))  # still referenced by the image left

    # A missing image: a warning on stderr, exit 0 (containerd's ctr goes on with the others).
    result = ck.ctr("images", "rm", "docker.io/library/missing:x")
    assert result.stdout == ""
    assert 'level=warning msg="docker.io/library/missing:x: image not found"' in result.stderr


# -- leases -----------------------------------------------------------------------------------


def test_leases_create_ls_rm_as_containerd(ck: Any) -> None:
    assert ck.ctr("leases", "ls").stdout.split() == ["ID", "CREATED", "AT", "LABELS"]

    generated = ck.ctr("leases", "create").stdout.strip()
    assert generated and "\n" not in generated
    assert ck.ctr("leases", "create", "--id", "ck-lease").stdout == "ck-lease\n"
    assert ck.ctr("leases", "create", "--id", "ck-expiring", "--expires", "1h").stdout == "ck-expiring\n"
    assert (
        ck.ctr("leases", "create", "--id", "ck-labelled", "--expires", "0", "foo=bar", "a=b").stdout == "ck-labelled\n"
    )

    listed = leases_ls(ck)
    assert set(listed) == {generated, "ck-lease", "ck-expiring", "ck-labelled"}
    assert ck.ctr("leases", "ls", "-q").stdout.split() == sorted(listed)
    assert listed["ck-labelled"][1] == {"a=b", "foo=bar"}
    # --expires (default 24h) is the label containerd.io/gc.expire = creation time + duration, RFC 3339.
    for lease_id, hours in ((generated, 24), ("ck-lease", 24), ("ck-expiring", 1)):
        created, labels = listed[lease_id]
        (label,) = labels
        key, _, expires = label.partition("=")
        assert key == "containerd.io/gc.expire" and RFC3339.fullmatch(expires)
        created_s = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
        expires_s = calendar.timegm(time.strptime(expires, "%Y-%m-%dT%H:%M:%SZ"))
        assert abs(expires_s - created_s - hours * 3600) <= 2

    assert ck.ctr("leases", "rm", "ck-lease").stdout == "ck-lease\n"
    assert ck.ctr("leases", "rm", "--sync", "ck-expiring").stdout == "ck-expiring\n"
    assert ck.ctr("leases", "rm", "ck-labelled", generated).stdout == f"ck-labelled\n{generated}\n"
    assert leases_ls(ck) == {}


def test_leases_create_existing_and_rm_missing_fail_as_containerd(ck: Any) -> None:
    ck.ctr("leases", "create", "--id", "ck-dup")
    result = ck.ctr("leases", "create", "--id", "ck-dup", check=False)
    assert (result.returncode, result.stderr) == (1, 'ctr: lease "ck-dup": already exists\n')
    ck.ctr("leases", "rm", "ck-dup")
    result = ck.ctr("leases", "rm", "ck-dup", check=False)
    assert (result.returncode, result.stderr) == (1, 'ctr: lease "ck-dup": not found\n')


# -- namespaces isolate content, images and leases --------------------------------------------


def test_another_namespace_sees_none_of_the_content(ck: Any) -> None:
    data = b"only in default\n"
    digest = ingest(ck, "shared-ref", data)

    assert ck.ctr("content", "ls", namespace="ck-other").stdout == "DIGEST\tSIZE\tAGE\tLABELS\n"
    for args in (("content", "get", digest), ("content", "label", digest, "a=b")):
        result = ck.ctr(*args, check=False, namespace="ck-other")
        assert (result.returncode, result.stderr) == (1, f"ctr: content digest {digest}: not found\n")
    assert ck.ctr("content", "rm", digest, namespace="ck-other").stdout == ""  # not found there: skipped
    assert list(content_ls(ck)) == [digest]
    assert content_ls(ck)[digest].labels == set()

    # The same ref in another namespace is another ingest; the same bytes are one blob on disk, and
    # each namespace holds its own record (and labels) of it.
    other_digest = ingest(ck, "shared-ref", data, namespace="ck-other")
    assert other_digest == digest
    ck.ctr("content", "label", digest, "who=other", namespace="ck-other")
    assert content_ls(ck, namespace="ck-other")[digest].labels == {"who=other"}
    assert content_ls(ck)[digest].labels == set()
    assert blobs_on_disk(ck) == {digest}

    ck.ctr("content", "rm", digest, namespace="ck-other")
    assert content_ls(ck, namespace="ck-other") == {}
    assert ctr_bytes(ck, "content", "get", digest).stdout == data


def test_another_namespace_sees_none_of_the_images(ck: Any) -> None:
    image = make_image(ck, "docker.io/library/ck-iso:1")
    assert images_ls(ck, namespace="ck-other") == {}
    result = ck.ctr("images", "label", image.name, "a=b", check=False, namespace="ck-other")
    assert (result.returncode, result.stderr) == (1, f'ctr: image "{image.name}": not found\n')
    result = ck.ctr("images", "rm", image.name, namespace="ck-other")
    assert "image not found" in result.stderr
    assert set(images_ls(ck)) == {image.name}
    assert images_ls(ck)[image.name][-1] == "-"


def test_another_namespace_sees_none_of_the_leases(ck: Any) -> None:
    ck.ctr("leases", "create", "--id", "ck-iso-lease")
    assert leases_ls(ck, namespace="ck-other") == {}
    result = ck.ctr("leases", "rm", "ck-iso-lease", check=False, namespace="ck-other")
    assert (result.returncode, result.stderr) == (1, 'ctr: lease "ck-iso-lease": not found\n')
    # The same id in another namespace is another lease.
    ck.ctr("leases", "create", "--id", "ck-iso-lease", namespace="ck-other")
    ck.ctr("leases", "rm", "ck-iso-lease", namespace="ck-other")
    assert set(leases_ls(ck)) == {"ck-iso-lease"}


def test_namespaces_rm_refuses_a_namespace_holding_images_and_blobs(ck: Any) -> None:
    image = make_image(ck, "docker.io/library/ck-ns:1", namespace="ck-busy")
    result = ck.ctr("namespaces", "rm", "ck-busy", check=False)
    assert result.returncode == 1
    assert last_line(result.stderr) == (
        'ctr: unable to delete ck-busy: namespace "ck-busy" must be empty, but it still has images, blobs: '
        "failed precondition"
    )
    assert set(images_ls(ck, namespace="ck-busy")) == {image.name}

    assert ck.ctr("images", "rm", "--sync", image.name, namespace="ck-busy").stdout == f"{image.name}\n"
    assert content_ls(ck, namespace="ck-busy") == {}  # collected: nothing else referenced them
    assert ck.ctr("namespaces", "rm", "ck-busy").stdout == "ck-busy\n"
    assert "ck-busy" not in ck.ctr("namespaces", "ls", "-q").stdout.split()


def test_namespaces_rm_refuses_a_namespace_holding_only_blobs(ck: Any) -> None:
    digest = ingest(ck, "blob-only", b"only a blob\n", namespace="ck-blobs")
    result = ck.ctr("namespaces", "rm", "ck-blobs", check=False)
    assert result.returncode == 1
    assert last_line(result.stderr) == (
        'ctr: unable to delete ck-blobs: namespace "ck-blobs" must be empty, but it still has blobs: '
        "failed precondition"
    )
    ck.ctr("content", "rm", digest, namespace="ck-blobs")
    assert ck.ctr("namespaces", "rm", "ck-blobs").stdout == "ck-blobs\n"
