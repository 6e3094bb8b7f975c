"""core.distribution.signature over the real parts (tests/distribution_env.py) and Debian's docker-registry:
Ed25519 and ECDSA P-256 signatures made and verified, a tampered signature, a wrong key and a signature
moved to another image refused, signatures pushed to and fetched from a registry, and the pull policy."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from distribution_env import NS, Env, environment, run
from interop import SKOPEO, Registry
from oci_images import Layer

from core import oci
from core.content import Info
from core.digest import Digest
from core.distribution import signature
from core.distribution.blobs import gc_labels, write_blob
from core.distribution.reference import Reference
from core.distribution.registry import RegistryClient
from core.errors import FailedPrecondition, InvalidArgument
from core.metadata.images import Image
from core.types import Descriptor


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with environment(tmp_path) as built:
        yield built


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path


PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def write_keys(directory: Path, name: str, key: PrivateKey, password: bytes | None = None) -> KeyPair:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return KeyPair(private, public)


@pytest.fixture
def ed(tmp_path: Path) -> KeyPair:
    return write_keys(tmp_path, "ed", ed25519.Ed25519PrivateKey.generate())


@pytest.fixture
def p256(tmp_path: Path) -> KeyPair:
    return write_keys(tmp_path, "p256", ec.generate_private_key(ec.SECP256R1()))


def app(env: Env, name: str = "example.com/app:v1", content: bytes = b"app\n") -> Image:
    return env.image(name, [Layer().file("app", content)])


def test_sign_and_verify_with_ed25519_and_ecdsa_p256(env: Env, ed: KeyPair, p256: KeyPair) -> None:
    image = app(env)
    by_ed = signature.sign(env.content, env.images, NS, image.name, ed.private)
    by_p256 = signature.sign(env.content, env.images, NS, image.name, p256.private)

    assert by_ed.key_id == signature.key_id(signature.load_public_key(ed.public))
    assert signature.verify(env.content, env.images, NS, image.name, [ed.public]) == [by_ed]
    assert signature.verify(env.content, env.images, NS, image.name, [ed.public, p256.public]) in (
        [by_ed, by_p256],
        [by_p256, by_ed],
    )
    artifact = json.loads(env.read(by_ed.descriptor))
    assert artifact["artifactType"] == signature.ARTIFACT_TYPE
    assert artifact["subject"]["digest"] == image.target.digest
    assert artifact["config"] == {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2,
                                  "digest": str(Digest.from_bytes(b"{}"))}  # fmt: skip
    [layer] = artifact["layers"]
    payload = json.loads(env.read(Digest(layer["digest"])))
    assert payload["critical"] == {
        "image": {"docker-manifest-digest": image.target.digest},
        "type": "containerkit signature",
    }
    labels = env.content.info(NS, image.target.digest).labels
    assert labels[f"{signature.LABEL_SIGNATURE}{by_ed.key_id}"] == by_ed.descriptor.digest
    # The signatures live as long as the image.
    env.collector.collect()
    assert signature.verify(env.content, env.images, NS, image.name, [p256.public]) == [by_p256]
    assert env.leftovers()["leases"] == []


def test_a_wrong_key_fails_verification(env: Env, ed: KeyPair, p256: KeyPair) -> None:
    image = app(env)
    signature.sign(env.content, env.images, NS, image.name, ed.private)
    with pytest.raises(FailedPrecondition, match="not made by one of the given keys"):
        signature.verify(env.content, env.images, NS, image.name, [p256.public])


def test_an_unsigned_image_fails_verification(env: Env, ed: KeyPair) -> None:
    image = app(env)
    with pytest.raises(FailedPrecondition, match="it has no signatures"):
        signature.verify(env.content, env.images, NS, image.name, [ed.public])


def tamper(
    env: Env, image: Image, artifact: Descriptor, *, payload: bytes | None = None, sig: bytes | None = None
) -> None:
    """Replace the image's signature artifact by one with another ``payload`` or signature ``sig``."""
    doc = json.loads(env.read(artifact))
    layer = doc["layers"][0]
    if payload is not None:
        stored = write_blob(env.content, NS, payload, signature.PAYLOAD_MEDIA_TYPE)
        layer["digest"], layer["size"] = stored.digest, stored.size
    if sig is not None:
        layer["annotations"][signature.ANNOTATION_SIGNATURE] = base64.b64encode(sig).decode()
    data = json.dumps(doc).encode()
    forged = write_blob(env.content, NS, data, oci.OCI_MANIFEST, labels=gc_labels(oci.OCI_MANIFEST, data))
    key = f"{signature.LABEL_SIGNATURE}{layer['annotations'][signature.ANNOTATION_KEY_ID]}"
    env.content.update(NS, Info(image.target.digest, labels={key: forged.digest}), [f"labels.{key}"])


def test_a_tampered_payload_or_signature_fails_verification(env: Env, ed: KeyPair) -> None:
    image = app(env)
    signed = signature.sign(env.content, env.images, NS, image.name, ed.private)
    layer = json.loads(env.read(signed.descriptor))["layers"][0]
    original = env.read(Digest(layer["digest"]))

    tamper(
        env, image, signed.descriptor, payload=original.replace(b"containerkit signature", b"containerkit signaturE")
    )
    with pytest.raises(FailedPrecondition, match="does not match its payload"):
        signature.verify(env.content, env.images, NS, image.name, [ed.public])

    flipped = bytearray(base64.b64decode(layer["annotations"][signature.ANNOTATION_SIGNATURE]))
    flipped[0] ^= 1
    tamper(env, image, signed.descriptor, sig=bytes(flipped))
    with pytest.raises(FailedPrecondition, match="does not match its payload"):
        signature.verify(env.content, env.images, NS, image.name, [ed.public])


def test_a_signature_moved_to_another_image_fails_verification(env: Env, ed: KeyPair) -> None:
    signed_image, other = app(env), app(env, "example.com/other:v1", b"other\n")
    signed = signature.sign(env.content, env.images, NS, signed_image.name, ed.private)
    key = f"{signature.LABEL_SIGNATURE}{signed.key_id}"
    env.content.update(NS, Info(other.target.digest, labels={key: signed.descriptor.digest}), [f"labels.{key}"])
    with pytest.raises(FailedPrecondition, match="does not refer to the image"):
        signature.verify(env.content, env.images, NS, other.name, [ed.public])


def test_unsupported_or_unreadable_keys_are_refused(env: Env, tmp_path: Path) -> None:
    image = app(env)
    rsa_keys = write_keys(tmp_path, "rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    locked = write_keys(tmp_path, "locked", ed25519.Ed25519PrivateKey.generate(), password=b"secret")
    p384 = write_keys(tmp_path, "p384", ec.generate_private_key(ec.SECP384R1()))
    for path, message in [
        (rsa_keys.private, "only Ed25519 and ECDSA P-256"),
        (p384.private, "only Ed25519 and ECDSA P-256"),
        (locked.private, "unencrypted PEM private key"),
        (tmp_path / "missing.key", "No such file"),
        (rsa_keys.public, "unencrypted PEM private key"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            signature.sign(env.content, env.images, NS, image.name, path)
    with pytest.raises(InvalidArgument, match="only Ed25519 and ECDSA P-256"):
        signature.verify(env.content, env.images, NS, image.name, [rsa_keys.public])
    with pytest.raises(InvalidArgument, match="not a PEM public key"):
        signature.verify(env.content, env.images, NS, image.name, [locked.private])
    with pytest.raises(InvalidArgument, match="at least one public key"):
        signature.verify(env.content, env.images, NS, image.name, [])


@dataclass(frozen=True)
class Rule:
    prefix: str
    keys: list[str]


def test_policy_longest_prefix_decides_and_enforce_refuses_unsigned_pulls(env: Env, ed: KeyPair) -> None:
    policy = signature.SignaturePolicy(
        [Rule("127.0.0.1:5000/", [str(ed.public)]), Rule("127.0.0.1:5000/open/", []), Rule("docker.io/", ["x.pub"])]
    )
    assert policy.keys_for("127.0.0.1:5000/signed/app:v1") == (str(ed.public),)
    assert policy.keys_for("127.0.0.1:5000/open/app:v1") == ()
    assert policy.keys_for("quay.io/app:v1") == ()

    image = app(env)
    assert signature.enforce(policy, env.content, NS, "127.0.0.1:5000/open/app:v1", image.target) == []
    with pytest.raises(FailedPrecondition, match=r"signature policy refuses 127\.0\.0\.1:5000/signed/app:v1"):
        signature.enforce(policy, env.content, NS, "127.0.0.1:5000/signed/app:v1", image.target)
    signed = signature.sign(env.content, env.images, NS, image.name, ed.private)
    assert signature.enforce(policy, env.content, NS, "127.0.0.1:5000/signed/app:v1", image.target) == [signed]


def test_signatures_are_pushed_to_and_fetched_from_a_registry(
    env: Env, ed: KeyPair, p256: KeyPair, registry: Registry
) -> None:
    layout = env.layout()
    target = Descriptor.from_oci(layout.add_image("v1", [Layer().file("app", b"app\n")]))
    ref = Reference.parse(registry.push(layout.directory, "v1", "signed/app"))
    env.ingest(layout)
    image = env.images.create(NS, Image(str(ref), target))
    client = RegistryClient()

    assert signature.push_signatures(client, ref, target, env.content, NS) == 0
    assert signature.fetch_signatures(client, ref, target, env.content, "other") == []
    signature.sign(env.content, env.images, NS, image.name, ed.private)
    signature.sign(env.content, env.images, NS, image.name, p256.private)
    assert signature.push_signatures(client, ref, target, env.content, NS) == 2

    tag = f"sha256-{target.digest.hex}.sig"
    raw = json.loads(run(SKOPEO, "inspect", "--raw", "--tls-verify=false", f"docker://{ref.repository}:{tag}"))
    assert raw["artifactType"] == signature.ARTIFACT_TYPE and len(raw["layers"]) == 2

    # Another namespace that has the image's manifest fetches the signatures and verifies them.
    write_blob(env.content, "other", env.read(target), target.media_type)
    [fetched] = signature.fetch_signatures(client, ref, target, env.content, "other")
    assert fetched.digest == Digest.from_bytes(json.dumps(raw, indent=2).encode())
    valid = signature.verify_target(env.content, "other", target, [ed.public, p256.public])
    assert sorted(s.key_id for s in valid) == sorted(
        signature.key_id(signature.load_public_key(path)) for path in (ed.public, p256.public)
    )
    assert env.leftovers("other")["leases"] == []
