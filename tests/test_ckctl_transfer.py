"""ckctl images pull|push|export|import|convert|sign|verify and ckctl login|logout, end to end through a real
containerkitd and its transfer service, against Debian's docker-registry on 127.0.0.1 (one without auth, one
with htpasswd basic auth from tests/registry_servers.py).

Each test keeps to a namespace of its own on the module's daemon; containers are removed with their tasks,
and every ckctl runs with DOCKER_CONFIG pointing into the test's temp dir (never the real ~/.docker).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import CKCTL, RunningDaemon
from interop import Registry, remove_namespace_dirs, run_pty
from oci_images import Layer, Layout, busybox_layer
from registry_servers import BasicAuthRegistry, basic_auth_registry

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("runc", "docker-registry", "skopeo", "htpasswd")),
    reason="needs runc, docker-registry, skopeo and htpasswd",
)

TIMEOUT = 120.0
USER, PASSWORD = "tester", "s3cret-Pa55word"
PLAIN_LINE = re.compile(r"^\S+ (waiting|downloading|exists|uploading|mounted|applying|done|error)( .*)?$")
BIG = hashlib.shake_256(b"transfer-big").digest(64 << 20)  # incompressible: the download takes a while


@pytest.fixture(scope="module")
def auth_registry() -> Iterator[BasicAuthRegistry]:
    """docker-registry with htpasswd basic auth for USER:PASSWORD."""
    with basic_auth_registry({USER: PASSWORD}) as registry:
        yield registry


@pytest.fixture(scope="module")
def images(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{"busybox": REF, "big": REF} in the interop registry; ``big`` has a 64 MiB incompressible layer (pulled
    by one test only: the store has a blob once any namespace pulled it)."""
    layout = Layout(tmp_path_factory.mktemp("transfer-images") / "layout")
    base = busybox_layer()
    layout.add_image("busybox", [base])
    layout.add_image("big", [base, Layer().dirs("data").file("data/big", BIG)])
    return {tag: registry.push(layout.directory, tag, "transfer/images") for tag in ("busybox", "big")}


class Place:
    """One test's namespace on the module's daemon; ckctl runs there with DOCKER_CONFIG in the test's dir."""

    def __init__(self, daemon: RunningDaemon, namespace: str, docker_config: Path) -> None:
        self.daemon, self.namespace = daemon, namespace
        self.env = {**os.environ, "DOCKER_CONFIG": str(docker_config)}

    def argv(self, namespace: str | None = None) -> list[str]:
        return [*CKCTL, "-a", self.daemon.address, "-n", namespace or self.namespace]

    def ckctl(
        self, *args: str, check: bool = True, input: bytes = b"", namespace: str | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(
            [*self.argv(namespace), *args], input=input, capture_output=True, timeout=TIMEOUT, env=self.env
        )
        if check and result.returncode != 0:
            raise AssertionError(f"ckctl {' '.join(args)} failed ({result.returncode}): {result.stderr.decode()}")
        return result

    def text(self, *args: str, input: bytes = b"", namespace: str | None = None) -> str:
        return self.ckctl(*args, input=input, namespace=namespace).stdout.decode()

    def images(self, namespace: str | None = None) -> dict[str, str]:
        """{name: target digest}."""
        listing = json.loads(self.text("images", "ls", "--json", namespace=namespace))
        return {image["name"]: image["target"]["digest"] for image in listing}

    def run(self, image: str, *command: str, namespace: str | None = None) -> str:
        return self.text("run", "--rm", image, "c1", *command, namespace=namespace)

    def leases(self) -> list[dict[str, Any]]:
        return json.loads(self.text("leases", "ls", "--json"))

    def clean(self, *namespaces: str) -> None:
        for namespace in (self.namespace, *namespaces):
            for container in self.text("containers", "ls", "-q", namespace=namespace).split():
                self.ckctl("tasks", "rm", "-f", container, check=False, namespace=namespace)
                self.ckctl("containers", "rm", container, namespace=namespace)
            remove_namespace_dirs(namespace)


@pytest.fixture
def place(request: pytest.FixtureRequest, containerkitd: RunningDaemon, tmp_path: Path) -> Iterator[Place]:
    namespace = re.sub(r"[^a-z0-9]+", "-", request.node.name.removeprefix("test_").lower())[:50].strip("-")
    place = Place(containerkitd, f"xfer-{namespace}", tmp_path / "docker")
    yield place
    place.clean(place.namespace + "-2")


# -- pull ------------------------------------------------------------------------------------------------


def test_pull_then_run(place: Place, images: dict[str, str]) -> None:
    """A pull (plain lines when piped) makes an unpacked image ``run --rm`` starts at once."""
    out = place.text("images", "pull", images["busybox"]).splitlines()
    assert all(PLAIN_LINE.match(line) for line in out), out
    assert any(re.match(r"^layer-sha256:[0-9a-f]{12}… ", line) for line in out), out
    digest = place.images()[images["busybox"]]
    assert out[-1] == f"{images['busybox']} done {digest}"
    assert place.run(images["busybox"], "echo", "hello from a pulled image") == "hello from a pulled image\n"
    assert place.leases() == []  # the pull's lease went with its success


def test_pull_no_unpack_plain_http_and_labels(place: Place, images: dict[str, str]) -> None:
    pull = ["images", "pull", "--plain-http", "--no-unpack", "--all-platforms", "--label", "team=infra"]
    place.ckctl(*pull, images["busybox"])
    record = json.loads(place.text("images", "inspect", images["busybox"]))
    assert record["labels"]["team"] == "infra"
    assert json.loads(place.text("snapshots", "ls", "--json")) == []


def test_pull_progress_under_a_terminal_draws_bars(place: Place, images: dict[str, str]) -> None:
    run = run_pty([*place.argv(), "images", "pull", images["busybox"]], columns=120, env=place.env)
    assert run.returncode == 0, run.output
    output = run.output.decode(errors="replace")
    assert "\x1b[" in output  # a live display, redrawn in place
    assert "━" in output  # rich's bars
    assert re.search(r"layer-sha256:[0-9a-f]{12}…", output)
    assert re.search(r"[\d,.]+/[\d,.]+ KiB", output)
    digest = place.images()[images["busybox"]]
    text = " ".join(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output).split())  # as read: no codes, one space
    assert f"{images['busybox']} done {digest}" in text, output


def test_plain_progress_prints_state_changes_and_a_line_a_second_per_blob() -> None:
    from core.api.containerkit.services.transfer.v1.transfer_pb2 import ProgressEvent
    from core.cli.progress import PlainProgress

    out = io.StringIO()
    render = PlainProgress(out, interval=3600)
    layer = "layer-sha256:" + "ab" * 32
    for offset in (0, 1 << 20, 2 << 20):
        render(ProgressEvent(ref=layer, kind="layer", state="downloading", offset=offset, total=4 << 20))
    render(ProgressEvent(ref=layer, kind="layer", state="done", offset=4 << 20, total=4 << 20))
    render(ProgressEvent(ref="host/app:1", kind="image", state="done", message="sha256:00"))
    render(ProgressEvent(ref="host/app:1", kind="image", state="done", message="sha256:00"))
    assert out.getvalue().splitlines() == [
        "layer-sha256:abababababab… downloading 0.0 B/4.0 MiB",
        "layer-sha256:abababababab… done 4.0 MiB/4.0 MiB",
        "host/app:1 done sha256:00",
        "host/app:1 done sha256:00",
    ]


def test_pull_errors_are_one_line_and_leave_nothing(place: Place, registry: Registry) -> None:
    result = place.ckctl("images", "pull", f"{registry.host}/transfer/absent:1", check=False)
    assert result.returncode != 0
    assert result.stderr.decode().startswith("ckctl: ") and result.stderr.decode().count("\n") == 1
    assert "not found" in result.stderr.decode().lower()
    result = place.ckctl("images", "pull", "Not A Reference", check=False)
    assert result.returncode != 0 and "invalid reference" in result.stderr.decode()
    assert place.images() == {}


def test_a_client_gone_mid_pull_cancels_it_and_a_retry_resumes(place: Place, images: dict[str, str]) -> None:
    from core.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
    from core.api.containerkit.services.transfer.v1 import transfer_pb2, transfer_pb2_grpc

    metadata = [("containerd-namespace", place.namespace)]
    channel = grpc.insecure_channel(f"unix:{place.daemon.address}")
    try:
        call = transfer_pb2_grpc.TransferStub(channel).Pull(
            transfer_pb2.PullRequest(ref=images["big"]), metadata=metadata
        )
        for event in call:
            if event.kind == "layer" and event.state == "downloading" and event.offset > 0:
                break
        else:
            pytest.fail("the pull ended before a layer was downloading")
        # The daemon answers other calls while the pull streams.
        listing = images_pb2_grpc.ImagesStub(channel).List(images_pb2.ListImagesRequest(), metadata=metadata)
        call.cancel()
        assert list(listing.images) == []
    finally:
        channel.close()
    time.sleep(3)  # far longer than the rest of the pull would take if it went on
    assert place.images() == {}, "a cancelled pull created its image"
    assert place.leases(), "the cancelled pull's lease is gone: a retry could not resume"
    place.ckctl("images", "pull", images["big"])
    assert images["big"] in place.images()
    assert place.run(images["big"], "wc", "-c", "/data/big").split()[0] == str(len(BIG))


# -- push ------------------------------------------------------------------------------------------------


def test_push_then_pull_elsewhere(place: Place, images: dict[str, str], registry: Registry) -> None:
    place.ckctl("images", "pull", images["busybox"])
    target = f"{registry.host}/transfer/pushed:{place.namespace}"
    out = place.text("images", "push", target, images["busybox"]).splitlines()
    assert all(PLAIN_LINE.match(line) for line in out), out
    digest = place.images()[images["busybox"]]
    assert out[-1] == f"{target} done {digest}"
    other = place.namespace + "-2"
    place.ckctl("images", "pull", target, namespace=other)
    assert place.images(other)[target] == digest


def test_convert_to_zstd_push_pull_and_run(place: Place, images: dict[str, str], registry: Registry) -> None:
    place.ckctl("images", "pull", images["busybox"])
    converted = f"{registry.host}/transfer/zstd:{place.namespace}"
    name, digest = place.text("images", "convert", "--compression", "zstd", images["busybox"], converted).split()
    assert name == converted and digest != place.images()[images["busybox"]]
    place.ckctl("images", "push", converted)
    other = place.namespace + "-2"
    place.ckctl("images", "pull", converted, namespace=other)
    assert place.images(other)[converted] == digest
    assert place.run(converted, "echo", "zstd", namespace=other) == "zstd\n"


def test_push_with_compression_pushes_a_zstd_copy(place: Place, images: dict[str, str], registry: Registry) -> None:
    place.ckctl("images", "pull", images["busybox"])
    target = f"{registry.host}/transfer/pushed-zstd:{place.namespace}"
    place.ckctl("images", "push", "--compression", "zstd", target, images["busybox"])
    assert set(place.images()) == {images["busybox"]}  # the temporary copy is gone
    other = place.namespace + "-2"
    place.ckctl("images", "pull", target, namespace=other)
    assert place.run(target, "echo", "ok", namespace=other) == "ok\n"


# -- export / import -------------------------------------------------------------------------------------


def test_export_import_round_trip_through_stdout_and_stdin(place: Place, images: dict[str, str]) -> None:
    place.ckctl("images", "pull", images["busybox"])
    archive = place.ckctl("images", "export", "-", images["busybox"]).stdout
    other = place.namespace + "-2"
    out = place.ckctl("images", "import", "-", input=archive, namespace=other).stdout.decode()
    digest = place.images()[images["busybox"]]
    assert out.split() == [images["busybox"], digest]
    assert place.images(other) == {images["busybox"]: digest}
    assert place.run(images["busybox"], "echo", "imported", namespace=other) == "imported\n"


def test_export_to_a_file_and_failures(place: Place, images: dict[str, str], tmp_path: Path) -> None:
    place.ckctl("images", "pull", images["busybox"])
    archive = tmp_path / "out.tar"
    place.ckctl("images", "export", str(archive), images["busybox"])
    assert place.ckctl("images", "export", "-", images["busybox"]).stdout == archive.read_bytes()
    missing = tmp_path / "missing.tar"
    result = place.ckctl("images", "export", str(missing), "no/such:image", check=False)
    assert result.returncode != 0 and "not found" in result.stderr.decode().lower()
    assert not missing.exists()
    result = place.ckctl("images", "import", str(tmp_path / "absent.tar"), check=False)
    assert result.returncode != 0 and "cannot read" in result.stderr.decode()
    result = place.ckctl("images", "import", "-", input=b"not a tar" * 1000, check=False)
    assert result.returncode != 0 and result.stderr.decode().count("\n") == 1
    assert list(place.images()) == [images["busybox"]]


# -- sign / verify ---------------------------------------------------------------------------------------


def write_keys(directory: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def test_sign_then_verify(place: Place, images: dict[str, str], tmp_path: Path) -> None:
    place.ckctl("images", "pull", images["busybox"])
    private, public = write_keys(tmp_path, "good")
    _, other = write_keys(tmp_path, "other")
    assert "signed by key" in place.text("images", "sign", "--key", str(private), images["busybox"])
    assert "valid signature" in place.text("images", "verify", "--key", str(public), images["busybox"])
    result = place.ckctl("images", "verify", "--key", str(other), images["busybox"], check=False)
    assert result.returncode != 0 and result.stderr.decode().count("\n") == 1


def test_a_signature_policy_refuses_unsigned_pulls(
    make_daemon: Any, images: dict[str, str], registry: Registry, tmp_path: Path
) -> None:
    """Signatures travel with push and pull; the daemon's policy admits a pull only with a valid one."""
    private, public = write_keys(tmp_path, "release")
    prefix = f"{registry.host}/signed/"
    daemon = make_daemon(f'[[plugins.service.transfer.policy]]\nprefix = "{prefix}"\nkeys = ["{public}"]\n')
    target = f"{prefix}app:{tmp_path.name}"
    daemon.ckctl("images", "pull", images["busybox"], namespace="a")  # outside the prefix: no signature needed
    daemon.ckctl("images", "tag", images["busybox"], target, namespace="a")
    daemon.ckctl("images", "push", target, namespace="a")

    refused = daemon.ckctl("images", "pull", target, check=False, namespace="b")
    assert refused.returncode != 0 and "signature policy refuses" in refused.stderr
    assert daemon.ckctl("images", "ls", "-q", namespace="b").stdout == ""

    daemon.ckctl("images", "sign", "--key", str(private), target, namespace="a")
    daemon.ckctl("images", "push", target, namespace="a")  # now with its signature
    daemon.ckctl("images", "pull", target, namespace="b")
    assert "valid signature" in daemon.ckctl("images", "verify", "--key", str(public), target, namespace="b").stdout


# -- login / logout --------------------------------------------------------------------------------------


def test_login_push_pull_logout(place: Place, images: dict[str, str], auth_registry: BasicAuthRegistry) -> None:
    config = Path(place.env["DOCKER_CONFIG"]) / "config.json"
    host = auth_registry.host
    wrong = place.ckctl("login", "--user", USER, "--password-stdin", host, input=b"wrong-password\n", check=False)
    assert wrong.returncode != 0 and "unauthorized" in wrong.stderr.decode().lower()
    assert "wrong-password" not in wrong.stderr.decode() and not config.exists()

    assert place.text("login", "--user", USER, "--password-stdin", host, input=PASSWORD.encode() + b"\n") == (
        "Login Succeeded\n"
    )
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert host in json.loads(config.read_text())["auths"]

    place.ckctl("images", "pull", images["busybox"])
    target = f"{host}/private/busybox:1"
    place.ckctl("images", "push", target, images["busybox"])  # the stored credentials
    other = place.namespace + "-2"
    place.ckctl("images", "pull", target, namespace=other)

    assert place.text("logout", host) == f"Removed login credentials for {host}\n"
    assert host not in json.loads(config.read_text())["auths"]
    place.ckctl("images", "rm", target, namespace=other)
    refused = place.ckctl("images", "pull", target, check=False, namespace=other)
    assert refused.returncode != 0 and refused.stderr.decode().endswith("(unauthenticated)\n")


def test_the_daemon_config_credentials_serve_pulls(
    make_daemon: Any, place: Place, images: dict[str, str], auth_registry: BasicAuthRegistry
) -> None:
    """``[plugins.service.transfer.registries."HOST"]`` credentials are the daemon's own: no --user needed."""
    host = auth_registry.host
    target = f"{host}/config/busybox:1"
    place.ckctl("images", "pull", images["busybox"])
    place.ckctl("images", "push", "--user", f"{USER}:{PASSWORD}", target, images["busybox"])
    table = f'[plugins.service.transfer.registries."{host}"]\nusername = "{USER}"\npassword = "{PASSWORD}"\n'
    daemon = make_daemon(table)
    daemon.ckctl("images", "pull", target, namespace="a")
    assert daemon.ckctl("images", "ls", "-q", namespace="a").stdout == f"{target}\n"
    assert PASSWORD not in daemon.log


def test_a_user_without_password_needs_a_terminal(place: Place, auth_registry: BasicAuthRegistry) -> None:
    result = place.ckctl("images", "pull", "--user", USER, f"{auth_registry.host}/x/y:1", check=False)
    assert result.returncode != 0 and "stdin is not a terminal" in result.stderr.decode()


def test_wrong_user_credentials_are_never_echoed(
    place: Place, images: dict[str, str], auth_registry: BasicAuthRegistry
) -> None:
    secret = "Very-Secret-Not-It"
    result = place.ckctl("images", "pull", "--user", f"{USER}:{secret}", f"{auth_registry.host}/x/y:1", check=False)
    assert result.returncode != 0
    assert secret not in result.stderr.decode()
    assert secret not in place.daemon.log
    assert PASSWORD not in place.daemon.log
