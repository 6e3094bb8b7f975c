"""Image signatures: sign an image's target (manifest or index) digest with an Ed25519 or ECDSA P-256 key
(the ``cryptography`` library), verify with public keys, move signatures to and from registries, and the
pull policy that requires them.

A signature is an OCI 1.1 artifact: an image manifest with ``artifactType`` :data:`ARTIFACT_TYPE`, the
empty config (``application/vnd.oci.empty.v1+json``, ``{}``), ``subject`` = the signed target, and one
layer per signature: the payload JSON (:data:`PAYLOAD_MEDIA_TYPE`,
``{"critical": {"image": {"docker-manifest-digest": "<digest>"}, "type": "containerkit signature"},
"optional": {"created": "<RFC 3339>"}}``) annotated with :data:`ANNOTATION_SIGNATURE` (base64 of the
signature over the payload bytes: Ed25519, or ECDSA P-256 with SHA-256 in DER) and
:data:`ANNOTATION_KEY_ID` (:func:`key_id` of the signing key).

Locally the artifact's blobs are in the namespace's content and the target blob carries the label
``containerd.io/gc.ref.content.signature.<key id>`` = the artifact's digest (keeping it alive with the
image; a new signature by the same key replaces the old one). In a registry the artifact is stored under
the tag ``sha256-<hex>.sig`` of the image's repository (registries without the referrers API, such as
distribution 2.8, keep it so); a pushed artifact holds every local signature of the target.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from core import oci
from core.content import Info
from core.digest import Digest
from core.distribution.blobs import gc_labels, read_document, temporary_lease, write_blob
from core.distribution.registry import RegistryClient, signature_tag
from core.errors import FailedPrecondition, InvalidArgument, NotFound
from core.metadata.content import ContentMetadata
from core.metadata.images import ImageStore
from core.types import Descriptor

if TYPE_CHECKING:
    from core.distribution.reference import Reference

__all__ = [
    "ANNOTATION_KEY_ID",
    "ANNOTATION_SIGNATURE",
    "ARTIFACT_TYPE",
    "LABEL_SIGNATURE",
    "PAYLOAD_MEDIA_TYPE",
    "Signature",
    "SignaturePolicy",
    "enforce",
    "fetch_signatures",
    "key_id",
    "load_private_key",
    "load_public_key",
    "push_signatures",
    "sign",
    "sign_target",
    "signatures",
    "verify",
    "verify_target",
]

log = logging.getLogger("containerkit.signature")

ARTIFACT_TYPE = "application/vnd.containerkit.signature.v1+json"
PAYLOAD_MEDIA_TYPE = "application/vnd.containerkit.signature.payload.v1+json"
ANNOTATION_SIGNATURE = "dev.containerkit.signature"
ANNOTATION_KEY_ID = "dev.containerkit.key-id"
LABEL_SIGNATURE = "containerd.io/gc.ref.content.signature."
PAYLOAD_TYPE = "containerkit signature"
EMPTY = b"{}"
EMPTY_DESCRIPTOR = Descriptor("application/vnd.oci.empty.v1+json", Digest.from_bytes(EMPTY), len(EMPTY))

PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey
KeyPath = str | PathLike[str]


@dataclass(frozen=True)
class Signature:
    """A signature of an image: the signing key's id and the artifact manifest that holds it."""

    key_id: str
    descriptor: Descriptor


# -- keys --------------------------------------------------------------------------------------


def load_private_key(path: KeyPath) -> PrivateKey:
    """The unencrypted PEM Ed25519 or ECDSA P-256 private key in ``path``; InvalidArgument otherwise."""
    try:
        key = serialization.load_pem_private_key(_read_key(path), password=None)
    except (ValueError, TypeError) as err:
        raise InvalidArgument(f"key {path}: not an unencrypted PEM private key ({err})") from None
    if isinstance(key, Ed25519PrivateKey) or (isinstance(key, ec.EllipticCurvePrivateKey) and _p256(key.curve)):
        return key
    raise _unsupported(path)


def load_public_key(path: KeyPath) -> PublicKey:
    """The PEM Ed25519 or ECDSA P-256 public key in ``path``; InvalidArgument otherwise."""
    try:
        key = serialization.load_pem_public_key(_read_key(path))
    except ValueError as err:
        raise InvalidArgument(f"key {path}: not a PEM public key ({err})") from None
    if isinstance(key, Ed25519PublicKey) or (isinstance(key, ec.EllipticCurvePublicKey) and _p256(key.curve)):
        return key
    raise _unsupported(path)


def _read_key(path: KeyPath) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise InvalidArgument(f"key {path}: {err.strerror}") from None


def _p256(curve: ec.EllipticCurve) -> bool:
    return isinstance(curve, ec.SECP256R1)


def _unsupported(path: KeyPath) -> InvalidArgument:
    return InvalidArgument(f"key {path}: only Ed25519 and ECDSA P-256 keys are supported")


def key_id(key: PublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the key's DER SubjectPublicKeyInfo."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def _signed(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        return key.sign(data)
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def _valid(key: PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        if isinstance(key, Ed25519PublicKey):
            key.verify(signature, data)
        else:
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# -- local -------------------------------------------------------------------------------------


def sign(content: ContentMetadata, images: ImageStore, namespace: str, name: str, key_path: KeyPath) -> Signature:
    """Sign the target of image ``name`` with the private key in ``key_path`` (see :func:`sign_target`)."""
    return sign_target(content, namespace, images.get(namespace, name).target, load_private_key(key_path))


def sign_target(content: ContentMetadata, namespace: str, target: Descriptor, key: PrivateKey) -> Signature:
    """Store a signature artifact for ``target`` (a blob of the namespace) signed by ``key``; return it."""
    kid = key_id(key.public_key())
    payload = json.dumps(
        {
            "critical": {"image": {"docker-manifest-digest": str(target.digest)}, "type": PAYLOAD_TYPE},
            "optional": {"created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")},
        }
    ).encode()
    annotations = {ANNOTATION_SIGNATURE: base64.b64encode(_signed(key, payload)).decode(), ANNOTATION_KEY_ID: kid}
    with temporary_lease(content.leases, namespace) as lease:
        layer = write_blob(content, namespace, payload, PAYLOAD_MEDIA_TYPE, lease=lease)
        artifact = _store_artifact(content, namespace, target, [replace(layer, annotations=annotations)], lease)
    return Signature(kid, artifact)


def signatures(content: ContentMetadata, namespace: str, target: Descriptor) -> list[Descriptor]:
    """The signature artifacts the namespace holds for ``target`` (none when it lacks the blob)."""
    try:
        labels = content.info(namespace, target.digest).labels
    except NotFound:
        return []
    digests = sorted({value for key, value in labels.items() if key.startswith(LABEL_SIGNATURE)})
    found = []
    for digest in digests:
        try:
            found.append(Descriptor(oci.OCI_MANIFEST, digest, content.info(namespace, digest).size))
        except NotFound:
            continue  # removed by hand: nothing to verify
    return found


def verify(
    content: ContentMetadata, images: ImageStore, namespace: str, name: str, public_keys: Sequence[KeyPath]
) -> list[Signature]:
    """The valid signatures of image ``name`` by ``public_keys`` (see :func:`verify_target`)."""
    return verify_target(content, namespace, images.get(namespace, name).target, public_keys)


def verify_target(
    content: ContentMetadata, namespace: str, target: Descriptor, public_keys: Sequence[KeyPath]
) -> list[Signature]:
    """The signatures of ``target`` held locally that one of ``public_keys`` made and that sign it.

    FailedPrecondition when there is none, saying why each signature failed (another key, a signature
    that does not match its payload, a payload or subject naming another image); InvalidArgument for an
    unreadable key.
    """
    if not public_keys:
        raise InvalidArgument("verify needs at least one public key")
    keys = {key_id(key): key for key in map(load_public_key, public_keys)}
    valid: list[Signature] = []
    problems: list[str] = []
    for artifact in signatures(content, namespace, target):
        manifest = oci.parse_manifest(read_document(content, namespace, artifact), artifact.media_type)
        if manifest.subject is None or manifest.subject.digest != target.digest:
            problems.append(f"artifact {artifact.digest} does not refer to the image")
            continue
        for layer in manifest.layers:
            if layer.media_type != PAYLOAD_MEDIA_TYPE:
                continue
            kid = layer.annotations.get(ANNOTATION_KEY_ID, "")
            problem = _problem(keys.get(kid), layer, read_document(content, namespace, layer), target.digest)
            if problem:
                problems.append(f"signature by key {kid or '(no key id)'}: {problem}")
            else:
                valid.append(Signature(kid, artifact))
    if not valid:
        why = "; ".join(problems) or "it has no signatures"
        raise FailedPrecondition(f"image {target.digest}: no valid signature by the given keys ({why})")
    return valid


def _problem(key: PublicKey | None, layer: Descriptor, payload: bytes, digest: Digest) -> str:
    """Why the signature ``layer`` (its ``payload`` read) is not a valid one of ``digest`` by ``key``; "" when it is."""
    if key is None:
        return "not made by one of the given keys"
    try:
        signature = base64.b64decode(layer.annotations.get(ANNOTATION_SIGNATURE, ""), validate=True)
    except binascii.Error:
        return "the signature annotation is not base64"
    if not _valid(key, signature, payload):
        return "the signature does not match its payload (tampered or made by another key)"
    try:
        critical = json.loads(payload)["critical"]
        signed, kind = critical["image"]["docker-manifest-digest"], critical["type"]
    except (ValueError, KeyError, TypeError):
        return "the payload is not a containerkit signature payload"
    if kind != PAYLOAD_TYPE or signed != digest:
        return f"the payload signs {signed!r} ({kind!r}), not this image"
    return ""


def _artifact(target: Descriptor, layers: Iterable[Descriptor]) -> bytes:
    """The artifact manifest for ``target`` holding the signature ``layers``."""
    doc = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": EMPTY_DESCRIPTOR.to_oci(),
        "layers": [layer.to_oci() for layer in layers],
        "subject": Descriptor(target.media_type, target.digest, target.size).to_oci(),
    }
    return json.dumps(doc, indent=2).encode()


def _store_artifact(
    content: ContentMetadata, namespace: str, target: Descriptor, layers: Sequence[Descriptor], lease: str
) -> Descriptor:
    """Store the artifact of ``layers`` (their blobs stored already) and label ``target`` with it."""
    write_blob(content, namespace, EMPTY, EMPTY_DESCRIPTOR.media_type, lease=lease)
    data = _artifact(target, layers)
    artifact = write_blob(
        content, namespace, data, oci.OCI_MANIFEST, lease=lease, labels=gc_labels(oci.OCI_MANIFEST, data)
    )
    labels = {f"{LABEL_SIGNATURE}{layer.annotations.get(ANNOTATION_KEY_ID, '')}": artifact.digest for layer in layers}
    content.update(namespace, Info(target.digest, labels=labels), [f"labels.{key}" for key in labels])
    return artifact


# -- registries --------------------------------------------------------------------------------


def fetch_signatures(
    client: RegistryClient,
    ref: Reference,
    target: Descriptor,
    content: ContentMetadata,
    namespace: str,
    *,
    lease: str | None = None,
) -> list[Descriptor]:
    """Fetch the signature artifact of ``target`` (a blob the namespace holds already) from ``ref``'s
    repository into the namespace, under ``lease`` (a temporary one when None); return it, or ``[]``
    when the registry has none. Only payload layers are stored; FailedPrecondition for a blob that does
    not match its digest, InvalidArgument for malformed or oversized documents.
    """
    location = ref.with_tag(signature_tag(target.digest))
    try:
        found, data = client.resolve(location)
    except NotFound:
        return []
    manifest = oci.parse_manifest(data, found.media_type, f"signature artifact {found.digest}")
    layers = [layer for layer in manifest.layers if layer.media_type == PAYLOAD_MEDIA_TYPE]
    if manifest.subject is None or manifest.subject.digest != target.digest or not layers:
        log.warning("%s: %s holds no signatures of %s", location, found.digest, target.digest)
        return []
    with nullcontext(lease) if lease else temporary_lease(content.leases, namespace) as held:
        for layer in layers:
            write_blob(content, namespace, _fetch_small(client, location, layer), layer.media_type, lease=held)
        return [_store_artifact(content, namespace, target, layers, held)]


def _fetch_small(client: RegistryClient, ref: Reference, desc: Descriptor) -> bytes:
    if desc.size > oci.MAX_DOCUMENT_SIZE:
        raise InvalidArgument(f"{desc.media_type} {desc.digest}: {desc.size} bytes is more than allowed")
    data = b"".join(client.fetch_blob(ref, desc))
    if (got := Digest.from_bytes(data, desc.digest.algorithm)) != desc.digest:
        raise FailedPrecondition(f"digest mismatch: got {got}, want {desc.digest}")
    return data


def push_signatures(
    client: RegistryClient, ref: Reference, target: Descriptor, content: ContentMetadata, namespace: str
) -> int:
    """Push every local signature of ``target`` as one artifact under its signature tag in ``ref``'s
    repository (replacing what the tag held); return how many signatures it holds (0: nothing pushed)."""
    layers: list[Descriptor] = []
    for artifact in signatures(content, namespace, target):
        manifest = oci.parse_manifest(read_document(content, namespace, artifact), artifact.media_type)
        layers += [layer for layer in manifest.layers if layer.media_type == PAYLOAD_MEDIA_TYPE and layer not in layers]
    if not layers:
        return 0
    location = ref.with_tag(signature_tag(target.digest))
    for blob in (EMPTY_DESCRIPTOR, *layers):
        if client.blob_exists(location, blob.digest) is None:
            data = EMPTY if blob == EMPTY_DESCRIPTOR else read_document(content, namespace, blob)
            client.upload_blob(location, blob, [data])
    client.put_manifest(location, oci.OCI_MANIFEST, _artifact(target, layers))
    return len(layers)


# -- policy ------------------------------------------------------------------------------------


class PolicyRule(Protocol):
    """A policy rule as configured (``[[plugins.service.transfer.policy]]``)."""

    prefix: str
    keys: Sequence[str]


class SignaturePolicy:
    """Which pulls need a signature by which keys: the rule with the longest ``prefix`` of the reference
    (``str(Reference)``, e.g. ``127.0.0.1:5000/signed/app:v1``) decides; a rule without keys exempts."""

    def __init__(self, rules: Iterable[PolicyRule]) -> None:
        self._rules = sorted(((rule.prefix, tuple(rule.keys)) for rule in rules), key=lambda r: -len(r[0]))

    def keys_for(self, ref: str) -> tuple[str, ...]:
        """The public keys one of which must have signed ``ref``; ``()`` when none is required."""
        for prefix, keys in self._rules:
            if ref.startswith(prefix):
                return keys
        return ()


def enforce(
    policy: SignaturePolicy, content: ContentMetadata, namespace: str, ref: str, target: Descriptor
) -> list[Signature]:
    """Check the pull of ``ref`` (whose ``target`` and signatures are in the namespace's content) against
    ``policy``: the valid signatures, ``[]`` when none is required; FailedPrecondition when refused."""
    keys = policy.keys_for(ref)
    if not keys:
        return []
    try:
        return verify_target(content, namespace, target, keys)
    except FailedPrecondition as err:
        raise FailedPrecondition(f"signature policy refuses {ref}: {err}") from None
