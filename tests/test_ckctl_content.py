"""ckctl content|images|leases against a real containerkitd, and the argument and formatting helpers
those commands share.

Blobs that must outlive the test's next step are labelled ``containerd.io/gc.root`` or written under a
lease: the daemon's garbage collector removes unreferenced content, as containerd's does.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import CKCTL
from test_ckctl import one_line_error, table

from core.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from core.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from core.api.containerd.types import descriptor_pb2
from core.cli.args import label_changes, parse_duration
from core.cli.client import CliError
from core.cli.leases import expiry_label
from core.cli.records import age, human_size
from core.digest import Digest

integration = pytest.mark.integration

ROOT = "containerd.io/gc.root=test"  # keeps a blob through every garbage collection
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MIB = 1 << 20


def binary_blob(size: int = 3 * MIB, seed: int = 0) -> bytes:
    """``size`` bytes covering every byte value, NULs included, different for each ``seed``."""
    pattern = bytes((i * 7 + seed) % 256 for i in range(256 * 3 + 1))
    return (pattern * (size // len(pattern) + 1))[:size]


def ckctl_bytes(
    daemon: Any, *args: str, stdin: bytes | Path = b"", namespace: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ckctl with ``stdin`` (bytes through a pipe, or a file opened as stdin); output decoded."""
    ns = ["-n", namespace] if namespace else []
    command = [*CKCTL, "-a", daemon.address, *ns, *args]
    if isinstance(stdin, Path):
        with stdin.open("rb") as source:
            result = subprocess.run(command, stdin=source, capture_output=True, timeout=60)
    else:
        result = subprocess.run(command, input=stdin, capture_output=True, timeout=60)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(), result.stderr.decode())


def ingest(daemon: Any, ref: str, data: bytes, *options: str, namespace: str | None = None) -> str:
    """``ckctl content ingest`` of ``data``; returns the printed digest, checked against the data."""
    result = ckctl_bytes(daemon, "content", "ingest", ref, *options, stdin=data, namespace=namespace)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{Digest.from_bytes(data)}\n"
    return result.stdout.strip()


def get_blob(daemon: Any, digest: str, namespace: str | None = None) -> subprocess.CompletedProcess[bytes]:
    ns = ["-n", namespace] if namespace else []
    return subprocess.run(
        [*CKCTL, "-a", daemon.address, *ns, "content", "get", digest], capture_output=True, timeout=60
    )


def create_image(daemon: Any, name: str, digest: str, size: int, namespace: str = "default") -> None:
    """An image record made through the Images API (pulls do this; ckctl has no verb for it)."""
    target = descriptor_pb2.Descriptor(media_type=MANIFEST_TYPE, digest=digest, size=size)
    request = images_pb2.CreateImageRequest(image=images_pb2.Image(name=name, target=target))
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        images_pb2_grpc.ImagesStub(channel).Create(request, metadata=[("containerd-namespace", namespace)])


def start_ingest(daemon: Any, ref: str, data: bytes) -> None:
    """Write ``data`` into ingest ``ref`` through the Write API and end the stream without committing."""
    requests = [
        content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref),
        content_pb2.WriteContentRequest(action=content_pb2.WRITE, offset=0, data=data),
    ]
    with grpc.insecure_channel(f"unix:{daemon.address}") as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        responses = list(stub.Write(iter(requests), metadata=[("containerd-namespace", "default")]))
    assert responses[-1].offset == len(data)


def digests(daemon: Any, namespace: str | None = None) -> list[str]:
    return daemon.ckctl("content", "ls", "-q", namespace=namespace).stdout.splitlines()


# -- content ---------------------------------------------------------------------------------


@integration
def test_content_ingest_ls_get_label_rm_roundtrip(daemon: Any) -> None:
    data = binary_blob()
    assert b"\0" in data and len(data) == 3 * MIB
    digest = ingest(daemon, "roundtrip", data, "--label", ROOT, "--label", "team=infra")

    (row,) = table(daemon.ckctl("content", "ls").stdout)
    assert (row["DIGEST"], row["SIZE"]) == (digest, "3.0 MiB")
    assert row["LABELS"] == "containerd.io/gc.root=test,team=infra"
    assert row["AGE"] in ("Less than a second", "1 second") or row["AGE"].endswith("seconds")
    (blob,) = daemon.ckctl_json("content", "ls")
    assert {k: blob[k] for k in ("digest", "size", "labels")} == {
        "digest": digest,
        "size": len(data),
        "labels": {"containerd.io/gc.root": "test", "team": "infra"},
    }
    assert datetime.fromisoformat(blob["created_at"]) <= datetime.now(UTC)
    assert digests(daemon) == [digest]
    assert daemon.ckctl("content", "ls", "-q", "labels.team==infra").stdout == f"{digest}\n"
    assert daemon.ckctl("content", "ls", "-q", "labels.team==other").stdout == ""

    got = get_blob(daemon, digest)
    assert got.returncode == 0 and got.stderr == b""
    assert got.stdout == data

    assert daemon.ckctl("content", "label", digest, "team=build", "tier=1").stdout == (
        "containerd.io/gc.root=test,team=build,tier=1\n"
    )
    assert daemon.ckctl("content", "label", digest, "team=").stdout == "containerd.io/gc.root=test,tier=1\n"
    (blob,) = daemon.ckctl_json("content", "ls")
    assert blob["labels"] == {"containerd.io/gc.root": "test", "tier": "1"}

    assert daemon.ckctl("content", "rm", digest).stdout == f"{digest}\n"
    assert digests(daemon) == []
    assert "not found" in one_line_error(daemon.ckctl("content", "get", digest, check=False))


@integration
def test_empty_blob_roundtrip(daemon: Any) -> None:
    digest = ingest(daemon, "empty", b"", "--label", ROOT)
    assert get_blob(daemon, digest).stdout == b""
    assert daemon.ckctl_json("content", "ls")[0]["size"] == 0


@integration
def test_ingest_with_wrong_expected_digest_fails_and_keeps_the_ingest_until_abort(daemon: Any) -> None:
    data = binary_blob(100_000)
    wrong = str(Digest.from_bytes(b"something else"))
    result = ckctl_bytes(daemon, "content", "ingest", "bad", "--expected-digest", wrong, stdin=data)
    line = one_line_error(result)
    assert wrong in line and "failed precondition" in line

    (active,) = daemon.ckctl_json("content", "active")
    assert (active["ref"], active["offset"]) == ("bad", len(data))
    assert daemon.ckctl("content", "active", "-q").stdout == "bad\n"
    (row,) = table(daemon.ckctl("content", "active").stdout)
    assert (row["REF"], row["SIZE"]) == ("bad", "97.7 KiB")
    assert digests(daemon) == []

    assert daemon.ckctl("content", "abort", "bad").stdout == "bad\n"
    assert daemon.ckctl_json("content", "active") == []
    assert "not found" in one_line_error(daemon.ckctl("content", "abort", "bad", check=False))


@integration
def test_ingest_with_wrong_expected_size_fails(daemon: Any) -> None:
    result = ckctl_bytes(daemon, "content", "ingest", "short", "--expected-size", "10", stdin=b"12345")
    assert "size" in one_line_error(result)
    assert daemon.ckctl("content", "active", "-q").stdout == "short\n"
    ingest(daemon, "right-size", b"12345", "--expected-size", "5", "--label", ROOT)


@integration
def test_ingest_resumes_from_a_seekable_stdin_and_restarts_from_a_pipe(daemon: Any, tmp_path: Path) -> None:
    held, given = binary_blob(MIB + 5, seed=1), binary_blob(2 * MIB, seed=2)
    source = tmp_path / "blob"
    source.write_bytes(given)

    # A file: the ingest keeps the bytes it holds and takes the rest of the file after them.
    start_ingest(daemon, "resume", held)
    result = ckctl_bytes(daemon, "content", "ingest", "resume", "--label", ROOT, stdin=source)
    assert result.returncode == 0, result.stderr
    mixed = held + given[len(held) :]
    assert result.stdout == f"{Digest.from_bytes(mixed)}\n"
    assert get_blob(daemon, result.stdout.strip()).stdout == mixed

    # A pipe cannot skip what was written: the ingest starts over with what comes in.
    start_ingest(daemon, "restart", held)
    assert ingest(daemon, "restart", given, "--label", ROOT) == Digest.from_bytes(given)
    assert daemon.ckctl_json("content", "active") == []


@integration
def test_ingest_of_a_blob_the_namespace_has_succeeds(daemon: Any) -> None:
    data = b"already here\n"
    digest = ingest(daemon, "first", data, "--label", ROOT)
    assert ingest(daemon, "second", data) == digest
    assert ingest(daemon, "third", data, "--expected-digest", digest) == digest
    assert daemon.ckctl_json("content", "active") == []
    assert digests(daemon) == [digest]


@integration
def test_ingest_under_a_lease(daemon: Any) -> None:
    daemon.ckctl("leases", "create", "--id", "hold")
    digest = ingest(daemon, "leased", b"held by a lease\n", "--lease", "hold")
    assert digests(daemon) == [digest]
    line = one_line_error(ckctl_bytes(daemon, "content", "ingest", "x", "--lease", "nosuch", stdin=b"x"))
    assert "nosuch" in line and "not found" in line


@integration
def test_content_is_isolated_by_namespace(daemon: Any) -> None:
    digest = ingest(daemon, "mine", b"other's blob\n", "--label", ROOT, namespace="other")
    assert digests(daemon, namespace="other") == [digest]
    assert get_blob(daemon, digest, namespace="other").stdout == b"other's blob\n"
    assert digests(daemon) == []
    assert "not found" in one_line_error(daemon.ckctl("content", "get", digest, check=False))
    assert "not found" in one_line_error(daemon.ckctl("content", "rm", digest, check=False))
    assert "not found" in one_line_error(daemon.ckctl("content", "label", digest, "a=b", check=False))

    ckctl_bytes(daemon, "content", "ingest", "pending", "--expected-size", "99", stdin=b"x", namespace="other")
    assert daemon.ckctl("content", "active", "-q", namespace="other").stdout == "pending\n"
    assert daemon.ckctl("content", "active", "-q").stdout == ""
    assert "not found" in one_line_error(daemon.ckctl("content", "abort", "pending", check=False))


@integration
def test_content_rm_goes_on_after_a_missing_digest(daemon: Any) -> None:
    first = ingest(daemon, "a", b"first\n", "--label", ROOT)
    second = ingest(daemon, "b", b"second\n", "--label", ROOT)
    missing = str(Digest.from_bytes(b"never written"))
    result = daemon.ckctl("content", "rm", first, missing, second, check=False)
    assert result.returncode == 1
    assert result.stdout == f"{first}\n{second}\n"
    assert result.stderr.count("\n") == 1 and missing in result.stderr and "not found" in result.stderr
    assert digests(daemon) == []


@integration
@pytest.mark.parametrize("verb", [("get",), ("rm",), ("label",)])
def test_missing_and_invalid_digests_are_one_line_errors(daemon: Any, verb: tuple[str, ...]) -> None:
    extra = ["k=v"] if verb == ("label",) else []
    missing = str(Digest.from_bytes(b"not in the store"))
    assert "not found" in one_line_error(daemon.ckctl("content", *verb, missing, *extra, check=False))
    line = one_line_error(daemon.ckctl("content", *verb, "sha256:nothex", *extra, check=False))
    assert "invalid digest" in line and "invalid argument" in line


@integration
def test_invalid_expected_digest_is_a_one_line_error(daemon: Any) -> None:
    result = ckctl_bytes(daemon, "content", "ingest", "r", "--expected-digest", "md5:abc", stdin=b"x")
    assert "invalid argument" in one_line_error(result)


# -- images ----------------------------------------------------------------------------------


@integration
def test_images_tag_ls_label_inspect_rm(daemon: Any) -> None:
    digest = ingest(daemon, "manifest", b'{"schemaVersion": 2}', "--label", ROOT)
    create_image(daemon, "docker.io/library/app:1", digest, 20)

    assert daemon.ckctl("images", "tag", "docker.io/library/app:1", "app:2", "app:3").stdout == "app:2\napp:3\n"
    assert daemon.ckctl("images", "ls", "-q").stdout == "app:2\napp:3\ndocker.io/library/app:1\n"
    rows = table(daemon.ckctl("images", "ls").stdout)
    assert [row["REF"] for row in rows] == ["app:2", "app:3", "docker.io/library/app:1"]
    assert {(row["TYPE"], row["DIGEST"], row["SIZE"], row["LABELS"]) for row in rows} == {
        (MANIFEST_TYPE, digest, "20.0 B", "-")
    }

    assert daemon.ckctl("images", "label", "app:2", "team=web", "tier=1").stdout == "team=web,tier=1\n"
    assert daemon.ckctl("images", "label", "app:2", "tier=").stdout == "team=web\n"
    assert daemon.ckctl("images", "ls", "-q", "labels.team==web").stdout == "app:2\n"
    record = json.loads(daemon.ckctl("images", "inspect", "app:2").stdout)
    assert {k: record[k] for k in ("name", "labels", "target")} == {
        "name": "app:2",
        "labels": {"team": "web"},
        "target": {"media_type": MANIFEST_TYPE, "digest": digest, "size": 20, "annotations": {}},
    }
    assert record["created_at"] <= record["updated_at"]
    names = [image["name"] for image in daemon.ckctl_json("images", "ls")]
    assert names == ["app:2", "app:3", "docker.io/library/app:1"]

    # A tag copies the target and the labels; an existing name needs --force.
    assert "already exists" in one_line_error(daemon.ckctl("images", "tag", "app:2", "app:3", check=False))
    daemon.ckctl("images", "tag", "--force", "app:2", "app:3")
    assert json.loads(daemon.ckctl("images", "inspect", "app:3").stdout)["labels"] == {"team": "web"}
    assert "not found" in one_line_error(daemon.ckctl("images", "tag", "nosuch", "x", check=False))

    result = daemon.ckctl("images", "rm", "app:2", "nosuch", "app:3", check=False)
    assert result.returncode == 1 and result.stdout == "app:2\napp:3\n"
    assert result.stderr.count("\n") == 1 and "nosuch" in result.stderr
    assert daemon.ckctl("images", "ls", "-q").stdout == "docker.io/library/app:1\n"
    assert "not found" in one_line_error(daemon.ckctl("images", "inspect", "app:2", check=False))


@integration
def test_images_label_of_a_missing_image_is_not_found(daemon: Any) -> None:
    assert "not found" in one_line_error(daemon.ckctl("images", "label", "nosuch", "a=b", check=False))


@integration
def test_images_rm_sync_collects_the_target_at_once(daemon: Any) -> None:
    daemon.ckctl("leases", "create", "--id", "pull")
    digest = ingest(daemon, "manifest", b'{"schemaVersion": 2, "layers": []}', "--lease", "pull")
    create_image(daemon, "app:1", digest, 34)
    daemon.ckctl("leases", "rm", "--sync", "pull")
    assert digests(daemon) == [digest]  # the image holds it
    assert daemon.ckctl("images", "rm", "--sync", "app:1").stdout == "app:1\n"
    assert digests(daemon) == []


@integration
def test_images_are_isolated_by_namespace(daemon: Any) -> None:
    digest = ingest(daemon, "m", b"{}", "--label", ROOT, namespace="other")
    create_image(daemon, "app:1", digest, 2, namespace="other")
    assert daemon.ckctl("images", "ls", "-q", namespace="other").stdout == "app:1\n"
    assert daemon.ckctl("images", "ls", "-q").stdout == ""
    assert daemon.ckctl_json("images", "ls") == []
    assert "not found" in one_line_error(daemon.ckctl("images", "rm", "app:1", check=False))


# -- leases ----------------------------------------------------------------------------------


@integration
def test_leases_create_ls_rm(daemon: Any) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    assert daemon.ckctl("leases", "create", "--id", "build", "--expires", "1h", "team=ci").stdout == "build\n"
    assert daemon.ckctl("leases", "create", "--id", "forever", "--expires", "0", "--label", "k=v").stdout == "forever\n"
    generated = daemon.ckctl("leases", "create").stdout.strip()
    assert generated and generated not in ("build", "forever")

    leases = {lease["id"]: lease for lease in daemon.ckctl_json("leases", "ls")}
    assert sorted(leases) == sorted(["build", "forever", generated])
    assert leases["forever"]["labels"] == {"k": "v"}
    build = leases["build"]["labels"]
    assert build["team"] == "ci"
    expires = datetime.fromisoformat(build["containerd.io/gc.expire"])
    assert before + timedelta(hours=1) <= expires <= datetime.now(UTC) + timedelta(hours=1)
    default_expiry = datetime.fromisoformat(leases[generated]["labels"]["containerd.io/gc.expire"])
    assert before + timedelta(hours=24) <= default_expiry <= datetime.now(UTC) + timedelta(hours=24)
    assert datetime.fromisoformat(leases["build"]["created_at"]) >= before

    assert daemon.ckctl("leases", "ls", "-q").stdout.splitlines() == sorted(leases)
    assert daemon.ckctl("leases", "ls", "-q", "id==build").stdout == "build\n"
    rows = {row["ID"]: row for row in table(daemon.ckctl("leases", "ls").stdout.replace("CREATED AT", "CREATED_AT"))}
    assert rows["forever"]["LABELS"] == "k=v"
    assert datetime.fromisoformat(rows["build"]["CREATED_AT"]) >= before

    assert "already exists" in one_line_error(daemon.ckctl("leases", "create", "--id", "build", check=False))
    assert "invalid duration" in one_line_error(daemon.ckctl("leases", "create", "--expires", "soon", check=False))

    result = daemon.ckctl("leases", "rm", "build", "nosuch", "forever", check=False)
    assert result.returncode == 1 and result.stdout == "build\nforever\n"
    assert result.stderr.count("\n") == 1 and "nosuch" in result.stderr
    assert daemon.ckctl("leases", "rm", "--sync", generated).stdout == f"{generated}\n"
    assert daemon.ckctl_json("leases", "ls") == []


@integration
def test_leases_are_isolated_by_namespace(daemon: Any) -> None:
    daemon.ckctl("leases", "create", "--id", "theirs", namespace="other")
    assert daemon.ckctl("leases", "ls", "-q", namespace="other").stdout == "theirs\n"
    assert daemon.ckctl("leases", "ls", "-q").stdout == ""
    assert "not found" in one_line_error(daemon.ckctl("leases", "rm", "theirs", check=False))


# -- shared helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("90s", 90), ("30m", 1800), ("1h30m", 5400), ("1.5h", 5400), ("250ms", 0.25), ("2h0m1s", 7201)],
)
def test_parse_duration_reads_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "1", "h", "-1h", "1d", "1h 30m", "1hm"])
def test_parse_duration_rejects_anything_else(text: str) -> None:
    with pytest.raises(CliError, match="invalid duration"):
        parse_duration(text)


def test_expiry_label_is_rfc3339_after_the_duration() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, 500, tzinfo=UTC)
    assert expiry_label("1h30m", now) == {"containerd.io/gc.expire": "2024-05-01T13:30:00Z"}
    assert expiry_label("0", now) == {}


def test_label_changes_clear_empty_values_through_the_mask() -> None:
    assert label_changes(["a=1", "b=", "c"]) == ({"a": "1", "c": "true"}, ["labels.a", "labels.b", "labels.c"])
    with pytest.raises(CliError, match="no key"):
        label_changes(["=v"])


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0.0 B"), (20, "20.0 B"), (1023, "1023.0 B"), (1024, "1.0 KiB"), (100_000, "97.7 KiB"), (3 * MIB, "3.0 MiB")],
)
def test_human_size_as_ctr(size: int, text: str) -> None:
    assert human_size(size) == text


@pytest.mark.parametrize(
    ("elapsed", "text"),
    [
        (timedelta(milliseconds=300), "Less than a second"),
        (timedelta(seconds=1), "1 second"),
        (timedelta(seconds=42), "42 seconds"),
        (timedelta(seconds=90), "About a minute"),
        (timedelta(minutes=59), "59 minutes"),
        (timedelta(minutes=70), "About an hour"),
        (timedelta(hours=30), "30 hours"),
        (timedelta(days=5), "5 days"),
        (timedelta(days=30), "4 weeks"),
        (timedelta(days=90), "3 months"),
        (timedelta(days=800), "2 years"),
    ],
)
def test_age_as_ctr(elapsed: timedelta, text: str) -> None:
    now = datetime(2024, 5, 1, tzinfo=UTC)
    assert age((now - elapsed).isoformat(), now) == text
    assert age("") == "-"
