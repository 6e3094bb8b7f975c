"""RegistryClient against real registries (Debian's docker-registry, with basic and bearer-token auth) and a
faulty in-memory one: content negotiation, verification, size caps, retries, Range resume, mirrors, TLS, auth
and credential sources. Credentials never show in errors or logs."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from registry_servers import Fault, FaultyRegistry, basic_auth_registry, faulty_registry, token_registry

from core import oci
from core.digest import Digest
from core.distribution.auth import (
    Credentials,
    CredentialStore,
    default_docker_config,
    load_docker_config,
    save_docker_config,
)
from core.distribution.reference import Reference
from core.distribution.registry import MANIFEST_MEDIA_TYPES, HostConfig, RegistryClient, signature_tag
from core.errors import (
    ERRORS_BY_CODE,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from core.types import Descriptor

USER, PASSWORD = "alice", "pa55-w0rd-SECRET"
LAYER = os.urandom(3 * (1 << 20) + 12345)  # several 1 MiB read chunks and a ragged end


def client(**kwargs: object) -> RegistryClient:
    """A client with quick retries (tests wait milliseconds, not seconds)."""
    return RegistryClient(**{"backoff": 0.001, "retries": 3, **kwargs})  # type: ignore[arg-type]


def manifest_doc(config: Descriptor, layers: list[Descriptor], media_type: str = oci.OCI_MANIFEST) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": media_type, "config": config.to_oci(), "layers": [d.to_oci() for d in layers]}
    ).encode()


def blob_desc(data: bytes, media_type: str = oci.OCI_LAYER_GZIP) -> Descriptor:
    return Descriptor(media_type, Digest.from_bytes(data), len(data))


@pytest.fixture
def faulty() -> Iterator[FaultyRegistry]:
    with faulty_registry() as registry:
        yield registry


@dataclass(frozen=True)
class Image:
    """A manifest tagged ``v1`` in ``team/app`` of a faulty registry, with one layer (:data:`LAYER`)."""

    registry: FaultyRegistry
    ref: Reference
    desc: Descriptor
    data: bytes
    layer: Descriptor


@pytest.fixture
def image(faulty: FaultyRegistry) -> Image:
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    faulty.add_blob(config)
    faulty.add_blob(LAYER)
    layer = blob_desc(LAYER)
    data = manifest_doc(blob_desc(config, oci.OCI_CONFIG), [layer])
    digest = faulty.add_manifest("team/app", "v1", oci.OCI_MANIFEST, data)
    ref = Reference.parse(f"{faulty.host}/team/app:v1")
    return Image(faulty, ref, Descriptor(oci.OCI_MANIFEST, digest, len(data)), data, layer)


def path_of(ref: Reference, kind: str, obj: str) -> str:
    return f"/v2/{ref.path}/{kind}/{obj}"


# -- manifests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("media_type", MANIFEST_MEDIA_TYPES)
def test_resolve_negotiates_every_current_media_type(faulty: FaultyRegistry, media_type: str) -> None:
    doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": []}
    data = json.dumps(doc).encode()
    digest = faulty.add_manifest("x/y", "t", media_type, data)
    desc, got = client().resolve(Reference.parse(f"{faulty.host}/x/y:t"))
    assert (desc.media_type, desc.digest, desc.size, got) == (media_type, digest, len(data), data)
    accept = faulty.requests[-1][2]["Accept"]
    assert all(kind in accept for kind in MANIFEST_MEDIA_TYPES)


def test_resolve_and_fetch_by_digest(image: Image) -> None:
    ref, desc, data = image.ref, image.desc, image.data
    registry = client()
    assert registry.resolve(ref.with_digest(desc.digest)) == (desc, data)
    assert registry.fetch_manifest(ref, desc) == data


def test_media_type_from_the_document_when_the_header_is_generic(faulty: FaultyRegistry) -> None:
    data = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    faulty.add_manifest("x/y", "t", "application/json", data)
    desc, _ = client().resolve(Reference.parse(f"{faulty.host}/x/y:t"))
    assert desc.media_type == oci.OCI_INDEX


@pytest.mark.parametrize(
    ("header", "body", "message"),
    [
        (oci.DOCKER_SCHEMA1_SIGNED_MANIFEST, b"{}", "schema 1 manifests are not supported"),
        ("application/json", b'{"schemaVersion": 1, "fsLayers": []}', "schema 1 manifests are not supported"),
        ("text/html", b"<html>hello</html>", "unsupported media type text/html"),
        ("application/vnd.example+json", b'{"mediaType": "application/vnd.example+json"}', "unsupported media type"),
    ],
)
def test_resolve_refuses_schema1_and_unknown_types(
    faulty: FaultyRegistry,
    header: str,
    body: bytes,
    message: str,
    robustness: Any,
) -> None:
    faulty.add_manifest("x/y", "t", header, body)
    with pytest.raises(InvalidArgument, match=message):
        client().resolve(Reference.parse(f"{faulty.host}/x/y:t"))
    robustness.record("hostile inputs")


def test_manifest_bytes_not_matching_the_digest(image: Image, robustness: Any) -> None:
    ref, desc, data = image.ref, image.desc, image.data
    faulty = image.registry
    forged = data.replace(b"amd64", b"arm64") + b" "
    faulty.fail("GET", path_of(ref, "manifests", desc.digest), Fault(body=forged))
    with pytest.raises(FailedPrecondition, match=f"digest mismatch: got sha256:\\w+, want {desc.digest}"):
        client().resolve(ref.with_digest(desc.digest))
    faulty.fail("GET", path_of(ref, "manifests", "v1"), Fault(body=forged))
    with pytest.raises(FailedPrecondition, match="digest mismatch"):
        client().resolve(ref)  # by tag: against the registry's Docker-Content-Digest
    robustness.record("hostile inputs")


@pytest.mark.parametrize(
    "fault",
    [
        Fault(body=b"{" + b" " * (64 << 10) + b"}"),  # honest Content-Length, above the cap
        Fault(endless=True),  # never ends
    ],
    ids=["declared", "endless"],
)
def test_manifest_size_cap(image: Image, fault: Fault, robustness: Any) -> None:
    ref = image.ref
    image.registry.fail("GET", path_of(ref, "manifests", "v1"), fault)
    with pytest.raises(InvalidArgument, match=r"(exceeds|larger than) the limit of 4096"):
        client(max_manifest_size=4096).resolve(ref)
    robustness.record("hostile inputs")


def test_fetch_manifest_refuses_a_descriptor_above_the_cap_unread(
    image: Image,
    robustness: Any,
) -> None:
    ref, desc = image.ref, image.desc
    before = len(image.registry.requests)
    with pytest.raises(InvalidArgument, match="exceeds the limit"):
        client(max_manifest_size=desc.size - 1).fetch_manifest(ref, desc)
    assert len(image.registry.requests) == before
    robustness.record("hostile inputs")


def test_not_found(image: Image) -> None:
    ref, layer = image.ref, image.layer
    registry = client()
    with pytest.raises(NotFound, match="MANIFEST_UNKNOWN"):
        registry.resolve(ref.with_tag("nope"))
    missing = blob_desc(b"missing")
    with pytest.raises(NotFound, match="BLOB_UNKNOWN"):
        list(registry.fetch_blob(ref, missing))
    assert registry.blob_exists(ref, missing.digest) is None
    assert registry.blob_exists(ref, layer.digest) == layer.size


# -- retries ---------------------------------------------------------------------------------------------------


def test_429_and_5xx_are_retried_with_backoff(image: Image, robustness: Any) -> None:
    ref, desc, data = image.ref, image.desc, image.data
    faulty = image.registry
    path = path_of(ref, "manifests", "v1")
    faulty.fail("GET", path, Fault(429, {"Retry-After": "0"}), Fault(503), Fault(502))
    assert client().resolve(ref) == (desc, data)
    assert [p for m, p, _ in faulty.requests if p == path] == [path] * 4
    robustness.record("faults injected")


def test_persistent_5xx_gives_up_naming_the_status(image: Image, robustness: Any) -> None:
    ref = image.ref
    faulty = image.registry
    faulty.fail("GET", path_of(ref, "manifests", "v1"), *[Fault(503)] * 3)
    with pytest.raises(Unavailable, match="503 Service Unavailable; gave up after 3 attempts"):
        client(retries=2).resolve(ref)
    robustness.record("faults injected")


def test_unreachable_registry_is_unavailable(robustness: Any) -> None:
    with faulty_registry() as gone:
        host = gone.host
    with pytest.raises(Unavailable, match="connection failed"):
        client(retries=1).resolve(Reference.parse(f"{host}/x/y:t"))
    robustness.record("faults injected")


# -- blobs -----------------------------------------------------------------------------------------------------


def test_fetch_blob_streams_in_bounded_chunks(image: Image) -> None:
    ref, layer = image.ref, image.layer
    chunks = list(client().fetch_blob(ref, layer))
    assert b"".join(chunks) == LAYER
    assert max(len(chunk) for chunk in chunks) <= 1 << 20


def test_fetch_blob_from_an_offset_uses_range(image: Image) -> None:
    ref, layer = image.ref, image.layer
    assert b"".join(client().fetch_blob(ref, layer, 1000)) == LAYER[1000:]
    assert image.registry.requests[-1][2]["Range"] == "bytes=1000-"
    assert b"".join(client().fetch_blob(ref, layer, layer.size)) == b""
    with pytest.raises(InvalidArgument, match="outside"):
        list(client().fetch_blob(ref, layer, layer.size + 1))


def test_a_registry_ignoring_range_is_skipped_through(image: Image, robustness: Any) -> None:
    ref, layer = image.ref, image.layer
    image.registry.fail("GET", path_of(ref, "blobs", layer.digest), Fault(ignore_range=True))
    assert b"".join(client().fetch_blob(ref, layer, 1_500_000)) == LAYER[1_500_000:]
    robustness.record("hostile inputs")


def test_redirected_blobs_do_not_carry_the_credentials(image: Image, robustness: Any) -> None:
    ref, layer = image.ref, image.layer
    image.registry.credentials = {"alice": PASSWORD}
    with faulty_registry() as storage:
        storage.add_blob(LAYER)
        elsewhere = f"http://{storage.host}{path_of(ref, 'blobs', layer.digest)}"
        image.registry.fail("GET", path_of(ref, "blobs", layer.digest), Fault(307, {"Location": elsewhere}))
        data = b"".join(client(user=Credentials("alice", PASSWORD)).fetch_blob(ref, layer))
        assert data == LAYER
        assert [headers.get("Authorization") for _, _, headers in storage.requests] == [None]
    robustness.record("hostile inputs")


def test_retry_after_is_honoured(image: Image, robustness: Any) -> None:
    ref = image.ref
    image.registry.fail("GET", path_of(ref, "manifests", "v1"), Fault(429, {"Retry-After": "1"}))
    started = time.monotonic()
    client().resolve(ref)
    assert time.monotonic() - started >= 0.9
    robustness.record("faults injected")


def test_one_client_serves_many_threads(image: Image) -> None:
    ref, layer = image.ref, image.layer
    registry = client(max_connections=4)
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda offset: b"".join(registry.fetch_blob(ref, layer, offset)), range(0, 16_000, 1000))
        )
    assert results == [LAYER[offset:] for offset in range(0, 16_000, 1000)]


def test_broken_connection_resumes_with_range(image: Image, robustness: Any) -> None:
    ref, layer = image.ref, image.layer
    faulty = image.registry
    path = path_of(ref, "blobs", layer.digest)
    faulty.fail("GET", path, Fault(cut_after=1_500_000), Fault(cut_after=700_000))
    data = b"".join(client().fetch_blob(ref, layer))
    assert hashlib.sha256(data).hexdigest() == layer.digest.hex
    ranges = [headers.get("Range") for method, p, headers in faulty.requests if p == path]
    assert ranges[0] is None and len(ranges) == 3
    assert ranges[1] is not None and ranges[2] is not None
    first = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    second = int(ranges[2].removeprefix("bytes=").rstrip("-"))
    assert 0 < first <= 1_500_000 and first < second <= first + 700_000
    robustness.record("faults injected")


def test_a_connection_that_keeps_breaking_gives_up(image: Image, robustness: Any) -> None:
    ref, layer = image.ref, image.layer
    image.registry.fail("GET", path_of(ref, "blobs", layer.digest), *[Fault(cut_after=0)] * 5)
    with pytest.raises(Unavailable, match=r"connection broken at byte 0 .*gave up after 3 attempts"):
        list(client(retries=2).fetch_blob(ref, layer))
    robustness.record("faults injected")


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (Fault(body=LAYER[:1000]), "size mismatch: registry sends 1000 bytes"),  # truncated, honestly declared
        (Fault(body=LAYER + b"extra"), "size mismatch"),
        (Fault(body=LAYER + b"extra", length=len(LAYER)), None),  # declared right, body overlong: cut at the size
    ],
    ids=["truncated", "overlong", "overlong-undeclared"],
)
def test_blob_of_the_wrong_size(image: Image, fault: Fault, message: str | None, robustness: Any) -> None:
    ref, layer = image.ref, image.layer
    image.registry.fail("GET", path_of(ref, "blobs", layer.digest), fault)
    robustness.record("hostile inputs")
    if message is None:  # the registry's Content-Length governs what is read; the caller's hash checks the rest
        assert b"".join(client().fetch_blob(ref, layer)) == LAYER
        return
    with pytest.raises(FailedPrecondition, match=message):
        list(client().fetch_blob(ref, layer))


def test_blob_bytes_are_the_callers_to_verify(image: Image, robustness: Any) -> None:
    ref, layer = image.ref, image.layer
    forged = bytes(b ^ 1 for b in LAYER[:10]) + LAYER[10:]
    image.registry.fail("GET", path_of(ref, "blobs", layer.digest), Fault(body=forged))
    data = b"".join(client().fetch_blob(ref, layer))
    assert Digest.from_bytes(data) != layer.digest
    robustness.record("hostile inputs")


# -- mirrors, plain http, TLS ------------------------------------------------------------------------------------


def test_mirrors_are_tried_in_order_then_the_host(image: Image) -> None:
    ref, desc, data, layer = image.ref, image.desc, image.data, image.layer
    with faulty_registry() as empty, faulty_registry() as mirror:
        mirror.add_manifest("team/app", "v1", oci.OCI_MANIFEST, data)
        mirror.add_blob(LAYER)
        hosts = {ref.domain: HostConfig(plain_http=True, mirrors=(empty.host, f"http://{mirror.host}"))}
        registry = client(hosts=lambda host: hosts.get(host, HostConfig(plain_http=True)))
        before = len(image.registry.requests)
        assert registry.resolve(ref) == (desc, data)
        assert b"".join(registry.fetch_blob(ref, layer)) == LAYER
        assert len(image.registry.requests) == before  # all served by the mirror
        assert [m for m, p, _ in empty.requests] == ["GET", "GET"]  # asked first, 404 both times
        mirror.manifests.clear()
        assert registry.resolve(ref) == (desc, data)  # mirrors without it: the host itself
        assert len(image.registry.requests) == before + 1


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # skip_verify, on purpose
def test_tls_verified_against_the_system_or_the_configured_ca(tmp_path: Path) -> None:
    with faulty_registry(tls_dir=tmp_path) as faulty:
        data = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": []}).encode()
        faulty.add_manifest("x/y", "t", oci.OCI_INDEX, data)
        ref = Reference.parse(f"{faulty.host}/x/y:t")
        with pytest.raises(Unavailable, match=r"TLS failed .*CERTIFICATE_VERIFY_FAILED"):
            client(hosts=lambda host: HostConfig()).resolve(ref)  # not plain HTTP, yet no CA trusts it
        assert client(hosts=lambda host: HostConfig(ca_file=faulty.ca_file)).resolve(ref)[1] == data
        assert client(hosts=lambda host: HostConfig(skip_verify=True)).resolve(ref)[1] == data
        with pytest.raises(Unavailable, match="connection failed"):  # plain HTTP (local default) to HTTPS
            client(retries=0).resolve(ref)
    with pytest.raises(InvalidArgument, match=r"ca_file /nonexistent\.pem: not a readable PEM bundle"):
        client(hosts=lambda host: HostConfig(ca_file="/nonexistent.pem")).resolve(ref)


def test_tls_to_a_plain_http_registry_fails_clearly(image: Image, robustness: Any) -> None:
    ref = image.ref
    with pytest.raises(Unavailable, match=r"TLS failed .*ca_file or skip_verify"):
        client(hosts=lambda host: HostConfig()).resolve(ref)
    robustness.record("faults injected")


# -- auth ---------------------------------------------------------------------------------------------------------


def assert_secret_hidden(text: str) -> None:
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert PASSWORD not in text and token not in text


def test_basic_auth_on_docker_registry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data = b"a blob behind basic auth"
    desc = blob_desc(data)
    with basic_auth_registry({USER: PASSWORD}) as registry:
        ref = Reference.parse(f"{registry.host}/team/app:v1")
        good = client(user=Credentials(USER, PASSWORD))
        good.login(registry.host)
        good.upload_blob(ref, desc, [data])
        assert b"".join(good.fetch_blob(ref, desc)) == data
        errors = []
        for creds, message in [(Credentials(USER, "wrong-" + PASSWORD), "unauthorized: check the credentials"),
                               (None, "authentication required: no credentials")]:  # fmt: skip
            with pytest.raises(Unauthenticated, match=f"{registry.host}: {message} for {registry.host}") as info:
                client(user=creds).blob_exists(ref, desc.digest)
            errors.append(str(info.value))
        with pytest.raises(Unauthenticated):
            client(user=Credentials(USER, "wrong")).login(registry.host)
    assert_secret_hidden(" ".join(errors) + caplog.text + repr(Credentials(USER, PASSWORD)))


def test_bearer_tokens_from_a_token_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    data = b"a blob behind bearer auth"
    desc = blob_desc(data)
    with token_registry({USER: PASSWORD}, anonymous_actions=("pull",)) as registry:
        ref = Reference.parse(f"{registry.host}/team/app:v1")
        good = client(credentials=CredentialStore({registry.host: Credentials(USER, PASSWORD)}))
        good.login(registry.host)
        good.upload_blob(ref, desc, [data])
        for _ in range(3):
            assert b"".join(good.fetch_blob(ref, desc)) == data
        asked = [scopes for user, scopes in registry.server.requests]
        assert asked == [[], ["repository:team/app:pull,push"], ["repository:team/app:pull"]]  # cached per scope
        assert {user for user, _ in registry.server.requests} == {USER}
        anonymous = client()
        assert b"".join(anonymous.fetch_blob(ref, desc)) == data  # anonymous pull is granted here
        with pytest.raises(Unauthenticated, match="no credentials"):
            anonymous.upload_blob(ref, blob_desc(b"other"), [b"other"])
        with pytest.raises(Unauthenticated, match="unauthorized: check the credentials") as info:
            client(user=Credentials(USER, "bad-" + PASSWORD)).fetch_blob(ref, desc).__next__()
    assert_secret_hidden(str(info.value) + caplog.text)


def test_wrong_credentials_on_a_stub_never_leak(caplog: pytest.LogCaptureFixture, robustness: Any) -> None:
    caplog.set_level(logging.DEBUG)
    with faulty_registry({USER: "the-right-one"}) as faulty:
        with pytest.raises(Unauthenticated) as info:
            client(user=Credentials(USER, PASSWORD)).resolve(Reference.parse(f"{faulty.host}/x/y:t"))
        sent = [headers.get("Authorization", "") for _, _, headers in faulty.requests]
    assert sent[0] == "" and sent[1].startswith("Basic ")  # answered the challenge once, then gave up
    assert len(sent) == 2
    assert_secret_hidden(str(info.value) + caplog.text)
    robustness.record("hostile inputs")


# -- credential sources -------------------------------------------------------------------------------------------


def docker_config(path: Path, auths: dict[str, object]) -> Path:
    path.write_text(json.dumps({"auths": auths, "credsStore": "desktop"}))
    return path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_load_docker_config(tmp_path: Path) -> None:
    path = docker_config(
        tmp_path / "config.json",
        {
            "https://index.docker.io/v1/": {"auth": b64("hub:pw:with:colons")},
            "127.0.0.1:5000": {"username": "u", "password": "p"},
            "https://reg.example.com": {"auth": b64("r:s")},
            "helper.example.com": {},
        },
    )
    assert load_docker_config(path) == {
        "docker.io": Credentials("hub", "pw:with:colons"),
        "127.0.0.1:5000": Credentials("u", "p"),
        "reg.example.com": Credentials("r", "s"),
    }
    assert load_docker_config(tmp_path / "absent.json") == {}


@pytest.mark.parametrize(
    "text", ["[]", '{"auths": []}', '{"auths": {"h": {"auth": "bm9jb2xvbg=="}}}', '{"auths": {"h": {"auth": "!!"}}}']
)
def test_malformed_docker_config(tmp_path: Path, text: str, robustness: Any) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=f"docker config {path}: not a valid config.json") as info:
        load_docker_config(path)
    assert "bm9jb2xvbg" not in str(info.value)
    robustness.record("hostile inputs")


def test_save_docker_config_keeps_other_keys_and_is_private(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    path = docker_config(tmp_path / "d" / "config.json", {})
    save_docker_config(path, "docker.io", Credentials("hub", "pw"))
    save_docker_config(path, "127.0.0.1:5000", Credentials("u", "p"))
    doc = json.loads(path.read_text())
    assert doc["credsStore"] == "desktop"
    assert doc["auths"] == {
        "https://index.docker.io/v1/": {"auth": b64("hub:pw")},
        "127.0.0.1:5000": {"auth": b64("u:p")},
    }
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    save_docker_config(path, "index.docker.io", None)
    assert load_docker_config(path) == {"127.0.0.1:5000": Credentials("u", "p")}
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temp files left
    fresh = tmp_path / "new" / "config.json"
    save_docker_config(fresh, "h", Credentials("a", "b"))
    assert stat.S_IMODE(fresh.parent.stat().st_mode) == 0o700


def test_credential_store_order_and_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = docker_config(
        tmp_path / "config.json", {"a.example": {"auth": b64("file:1")}, "b.example": {"auth": b64("file:2")}}
    )
    store = CredentialStore({"b.example": Credentials("config", "x")}, docker_config=path)
    assert store.get("a.example") == Credentials("file", "1")
    assert store.get("b.example") == Credentials("config", "x")  # the daemon config wins over the file
    assert store.get("c.example") is None
    save_docker_config(path, "c.example", Credentials("new", "3"))
    assert store.get("c.example") == Credentials("new", "3")  # the file is read again when it changes
    path.unlink()
    assert store.get("a.example") is None
    assert "x" not in repr(Credentials("config", "x")).replace("config", "")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dc"))
    assert default_docker_config() == tmp_path / "dc" / "config.json"
    monkeypatch.delenv("DOCKER_CONFIG")
    assert default_docker_config() == Path.home() / ".docker" / "config.json"


def test_explicit_user_wins_over_the_store(faulty: FaultyRegistry) -> None:
    faulty.credentials = {"cli": "given"}
    store = CredentialStore({faulty.host: Credentials("stored", "wrong")})
    ref = Reference.parse(f"{faulty.host}/x/y:t")
    with pytest.raises(NotFound):
        client(credentials=store, user=Credentials("cli", "given")).resolve(ref)
    with pytest.raises(Unauthenticated):
        client(credentials=store).resolve(ref)


# -- misc ---------------------------------------------------------------------------------------------------------


def test_unauthenticated_maps_to_grpc_unauthenticated() -> None:
    assert grpc.StatusCode[Unauthenticated.grpc_code] is grpc.StatusCode.UNAUTHENTICATED
    assert ERRORS_BY_CODE["UNAUTHENTICATED"] is Unauthenticated


def test_signature_tag() -> None:
    assert signature_tag("sha256:" + "0f" * 32) == "sha256-" + "0f" * 32 + ".sig"
    with pytest.raises(InvalidArgument):
        signature_tag("sha256:short")
