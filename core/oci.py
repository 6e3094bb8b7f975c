"""OCI and Docker image documents: media types, parsing, platform matching and chain ids.

Everything here works on bytes and :class:`~core.types.Descriptor` values; nothing touches a store.
Parsing is strict where a wrong document would mislead (wrong kind, missing or mistyped fields,
schema 1) and lenient where containerd is (unknown fields, a missing ``schemaVersion``). Every
refusal is an :class:`~core.errors.InvalidArgument` that names the document and what is wrong.

Platforms follow containerd's ``platforms`` package: :func:`normalize` spells architectures one way
(``x86_64`` -> ``amd64``, ``aarch64``/``arm64/v8`` -> ``arm64``, ``arm`` -> ``arm/v7``...), and
:func:`only` matches a platform and those it can run (``amd64`` runs ``386``, ``arm64`` runs
``arm/v8`` down to ``arm/v5``), preferring them in that order.
"""

from __future__ import annotations

import hashlib
import json
import platform as host
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.digest import Digest
from core.errors import InvalidArgument, NotFound
from core.types import Descriptor, Platform

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER",
    "DOCKER_LAYER_FOREIGN",
    "DOCKER_LAYER_FOREIGN_GZIP",
    "DOCKER_LAYER_GZIP",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "DOCKER_SCHEMA1_MANIFEST",
    "DOCKER_SCHEMA1_SIGNED_MANIFEST",
    "MAX_DOCUMENT_SIZE",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_NONDISTRIBUTABLE",
    "OCI_LAYER_NONDISTRIBUTABLE_GZIP",
    "OCI_LAYER_NONDISTRIBUTABLE_ZSTD",
    "OCI_LAYER_ZSTD",
    "OCI_MANIFEST",
    "ImageConfig",
    "Index",
    "Manifest",
    "PlatformMatcher",
    "ResolvedImage",
    "chain_ids",
    "host_platform",
    "is_config",
    "is_index",
    "is_layer",
    "is_manifest",
    "normalize",
    "only",
    "parse_config",
    "parse_index",
    "parse_manifest",
    "resolve_image",
]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
OCI_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDISTRIBUTABLE_GZIP = OCI_LAYER_NONDISTRIBUTABLE + "+gzip"
OCI_LAYER_NONDISTRIBUTABLE_ZSTD = OCI_LAYER_NONDISTRIBUTABLE + "+zstd"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = DOCKER_LAYER + ".gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_LAYER_FOREIGN_GZIP = DOCKER_LAYER_FOREIGN + ".gzip"
DOCKER_SCHEMA1_MANIFEST = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED_MANIFEST = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MAX_DOCUMENT_SIZE = 8 << 20
"""Largest index, manifest or config (bytes) read into memory; bigger ones are refused unread."""

_INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
_CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
_SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1_MANIFEST, DOCKER_SCHEMA1_SIGNED_MANIFEST})
_DOCKER_LAYER_TYPES = frozenset({DOCKER_LAYER, DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN, DOCKER_LAYER_FOREIGN_GZIP})
_SCHEMA1_REFUSAL = "schema 1 manifests are not supported (push the image again with a current client)"


def is_index(media_type: str) -> bool:
    """An OCI index or a Docker manifest list."""
    return media_type in _INDEX_TYPES


def is_manifest(media_type: str) -> bool:
    """An OCI or Docker schema 2 image manifest (never schema 1)."""
    return media_type in _MANIFEST_TYPES


def is_config(media_type: str) -> bool:
    """An OCI or Docker image config."""
    return media_type in _CONFIG_TYPES


def is_layer(media_type: str) -> bool:
    """A layer media type, compressed or not, distributable or not (``+suffixes`` allowed, as containerd)."""
    return media_type.startswith("application/vnd.oci.image.layer.") or media_type.partition("+")[0] in (
        _DOCKER_LAYER_TYPES
    )


# -- documents ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Index:
    """An OCI index or Docker manifest list: the ``manifests`` it points at, each maybe with a platform."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Manifest:
    """An OCI or Docker schema 2 image manifest: one ``config`` blob and the ``layers``, bottom first.

    ``subject`` is the manifest this one refers to (OCI 1.1 artifacts such as signatures), if any.
    """

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    subject: Descriptor | None = None


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config containerkit acts on.

    ``diff_ids`` are the digests of the uncompressed layers, bottom first; ``platform`` comes from
    ``os``/``architecture``/``variant`` (fields may be ``""`` when the config omits them). The
    process defaults (``entrypoint``, ``cmd``, ``env``, ``working_dir``, ``user``) are those of the
    config's ``config`` object, empty when absent.
    """

    diff_ids: tuple[Digest, ...]
    platform: Platform
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""


def parse_index(data: bytes | str, media_type: str = "", name: str = "index") -> Index:
    """Parse an index (``media_type`` is the descriptor's, ``""`` when unknown; ``name`` is for messages).

    InvalidArgument for malformed JSON, a schema 1 document, a manifest instead of an index, or a
    missing or malformed ``manifests`` list.
    """
    doc = _document(data, media_type, name)
    if "config" in doc or "layers" in doc or doc.get("mediaType") in _MANIFEST_TYPES:
        raise InvalidArgument(f"{name}: expected an index but found a manifest")
    return Index(
        media_type=_media_type(doc, media_type, OCI_INDEX),
        manifests=tuple(_descriptors(doc, "manifests", name)),
        annotations=_string_map(doc, "annotations", name),
    )


def parse_manifest(data: bytes | str, media_type: str = "", name: str = "manifest") -> Manifest:
    """Parse an image manifest (arguments as :func:`parse_index`).

    InvalidArgument for malformed JSON, a schema 1 document, an index instead of a manifest, a
    missing or malformed ``config``, or malformed ``layers``.
    """
    doc = _document(data, media_type, name)
    if "manifests" in doc or doc.get("mediaType") in _INDEX_TYPES:
        raise InvalidArgument(f"{name}: expected a manifest but found an index")
    if "config" not in doc:
        raise InvalidArgument(f"{name}: missing 'config'")
    subject = doc.get("subject")
    return Manifest(
        media_type=_media_type(doc, media_type, OCI_MANIFEST),
        config=_descriptor(doc["config"], f"{name}: config"),
        layers=tuple(_descriptors(doc, "layers", name)),
        annotations=_string_map(doc, "annotations", name),
        subject=_descriptor(subject, f"{name}: subject") if subject is not None else None,
    )


def parse_config(data: bytes | str, name: str = "image config") -> ImageConfig:
    """Parse an image config. InvalidArgument for malformed JSON or fields, or a missing ``rootfs.diff_ids``."""
    doc = _json_object(data, name)
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict):
        raise InvalidArgument(f"{name}: missing 'rootfs' object")
    if rootfs.get("type", "layers") != "layers":
        raise InvalidArgument(f"{name}: rootfs type {rootfs.get('type')!r} is not supported (expected 'layers')")
    raw_ids = rootfs.get("diff_ids")
    if not isinstance(raw_ids, list):
        raise InvalidArgument(f"{name}: 'rootfs.diff_ids' must be a list of digests")
    diff_ids = []
    for position, value in enumerate(raw_ids):
        try:
            diff_ids.append(Digest(value))
        except InvalidArgument as err:
            raise InvalidArgument(f"{name}: rootfs.diff_ids[{position}]: {err}") from None
    process = doc.get("config")
    process = {} if process is None else process
    if not isinstance(process, dict):
        raise InvalidArgument(f"{name}: 'config' must be an object")
    return ImageConfig(
        diff_ids=tuple(diff_ids),
        platform=Platform(
            os=_string(doc, "os", name),
            architecture=_string(doc, "architecture", name),
            variant=_string(doc, "variant", name),
            os_version=_string(doc, "os.version", name),
            os_features=_strings(doc, "os.features", name),
        ),
        entrypoint=_strings(process, "Entrypoint", f"{name}: config"),
        cmd=_strings(process, "Cmd", f"{name}: config"),
        env=_strings(process, "Env", f"{name}: config"),
        working_dir=_string(process, "WorkingDir", f"{name}: config"),
        user=_string(process, "User", f"{name}: config"),
    )


def _json_object(data: bytes | str, name: str) -> dict[str, Any]:
    if len(data) > MAX_DOCUMENT_SIZE:
        raise InvalidArgument(f"{name}: {len(data)} bytes is more than the {MAX_DOCUMENT_SIZE} bytes allowed")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # RecursionError: nested too deeply
        raise InvalidArgument(f"{name}: not valid JSON: {err}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{name}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _document(data: bytes | str, media_type: str, name: str) -> dict[str, Any]:
    """The JSON object of an index or manifest, refusing schema 1 (by media type or by content)."""
    if media_type in _SCHEMA1_TYPES:
        raise InvalidArgument(f"{name}: {_SCHEMA1_REFUSAL}")
    doc = _json_object(data, name)
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise InvalidArgument(f"{name}: 'mediaType' must be a string")
    version = doc.get("schemaVersion", 2)
    if version == 1 or "fsLayers" in doc or declared in _SCHEMA1_TYPES:
        raise InvalidArgument(f"{name}: {_SCHEMA1_REFUSAL}")
    if version != 2:
        raise InvalidArgument(f"{name}: unsupported schemaVersion {version!r} (expected 2)")
    return doc


def _media_type(doc: Mapping[str, Any], given: str, default: str) -> str:
    return given or doc.get("mediaType") or default


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where}: expected a descriptor object")
    try:
        return Descriptor.from_oci(value)
    except InvalidArgument as err:
        raise InvalidArgument(f"{where}: {err}") from None


def _descriptors(doc: Mapping[str, Any], key: str, name: str) -> list[Descriptor]:
    values = doc.get(key)
    if values is None:
        return []
    if not isinstance(values, list):
        raise InvalidArgument(f"{name}: {key!r} must be a list of descriptors")
    return [_descriptor(value, f"{name}: {key}[{position}]") for position, value in enumerate(values)]


def _string(doc: Mapping[str, Any], key: str, name: str) -> str:
    value = doc.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"{name}: {key!r} must be a string")
    return value


def _strings(doc: Mapping[str, Any], key: str, name: str) -> tuple[str, ...]:
    values = doc.get(key)
    if values is None:
        return ()
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise InvalidArgument(f"{name}: {key!r} must be a list of strings")
    return tuple(values)


def _string_map(doc: Mapping[str, Any], key: str, name: str) -> dict[str, str]:
    values = doc.get(key)
    if values is None:
        return {}
    if not isinstance(values, dict) or not all(isinstance(value, str) for value in values.values()):
        raise InvalidArgument(f"{name}: {key!r} must map strings to strings")
    return dict(values)


# -- platforms ---------------------------------------------------------------------------------


def normalize(platform: Platform) -> Platform:
    """``platform`` in containerd's canonical spelling (lowercase; ``macos`` -> ``darwin``;
    ``x86_64``/``x86-64`` -> ``amd64`` (``v1`` dropped); ``i386`` -> ``386``; ``aarch64`` -> ``arm64``
    (``v8``/``8`` dropped); ``armhf`` -> ``arm/v7``, ``armel`` -> ``arm/v6``; ``arm`` gets ``v7`` when
    it has no variant, ``N`` becomes ``vN``)."""
    os_name = platform.os.lower()
    if os_name == "macos":
        os_name = "darwin"
    arch, variant = platform.architecture.lower(), platform.variant.lower()
    if arch == "i386":
        arch, variant = "386", ""
    elif arch in ("x86_64", "x86-64", "amd64"):
        arch = "amd64"
        variant = "" if variant == "v1" else variant
    elif arch in ("aarch64", "arm64"):
        arch = "arm64"
        variant = "" if variant in ("8", "v8") else variant
    elif arch == "armhf":
        arch, variant = "arm", "v7"
    elif arch == "armel":
        arch, variant = "arm", "v6"
    elif arch == "arm":
        if variant in ("", "7"):
            variant = "v7"
        elif variant in ("5", "6", "8"):
            variant = "v" + variant
    return Platform(os_name, arch, variant, platform.os_version, platform.os_features)


def host_platform() -> Platform:
    """The platform of this host, normalised (``linux/amd64``, ``linux/arm64``, ``linux/arm/v7``...)."""
    os_name = "linux" if sys.platform.startswith("linux") else sys.platform
    machine = host.machine().lower()
    variant = _arm_variant() if machine.startswith(("arm", "aarch64")) else ""
    if machine.startswith("armv"):  # armv7l, armv6l: the kernel's name for 32-bit arm
        machine = "arm"
    return normalize(Platform(os_name, machine, variant))


def _arm_variant() -> str:
    """The ARM variant from /proc/cpuinfo's ``CPU architecture`` (``8`` -> ``v8``...); ``""`` when unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, sep, value = line.partition(":")
                if sep and key.strip().lower() == "cpu architecture":
                    value = value.strip().lower()
                    return "v8" if value in ("8", "aarch64") else f"v{value[:1]}" if value[:1].isdigit() else ""
    except OSError:
        pass
    return ""


class PlatformMatcher:
    """Matches platforms against an ordered list of wanted ones (all normalised first); earlier is better.

    Only ``os``, ``architecture`` and ``variant`` take part, as in containerd.
    """

    def __init__(self, wanted: Sequence[Platform]) -> None:
        self._wanted = [_key(normalize(p)) for p in wanted]

    def rank(self, platform: Platform) -> int | None:
        """The position of the first wanted platform that ``platform`` matches; None when none does."""
        key = _key(normalize(platform))
        for position, wanted in enumerate(self._wanted):
            if key == wanted:
                return position
        return None

    def match(self, platform: Platform) -> bool:
        """Whether ``platform`` is one of the wanted ones."""
        return self.rank(platform) is not None

    def __str__(self) -> str:
        return ", ".join("/".join(part for part in key if part) for key in self._wanted)


def only(platform: Platform | None = None) -> PlatformMatcher:
    """A matcher for ``platform`` (default: :func:`host_platform`) and what it can also run, best first:
    ``amd64/vN`` then lower ``vN`` then ``386``; ``arm/vN`` down to ``arm/v5``; ``arm64`` then ``arm/v8``..."""
    return PlatformMatcher(_compatible(normalize(platform or host_platform())))


def _compatible(platform: Platform) -> list[Platform]:
    out = [platform]
    arch, variant = platform.architecture, platform.variant

    def same(architecture: str, variant: str = "") -> Platform:
        return Platform(platform.os, architecture, variant, platform.os_version, platform.os_features)

    if arch == "amd64":
        level = _variant_number(variant)
        out += [same("amd64", f"v{n}") for n in range(level - 1, 0, -1)] if level > 1 else []
        out.append(same("386"))
    elif arch == "arm":
        level = _variant_number(variant)
        out += [same("arm", f"v{n}") for n in range(level - 1, 4, -1)] if level > 5 else []
    elif arch == "arm64":
        out += _compatible(same("arm", variant or "v8"))
    return out


def _variant_number(variant: str) -> int:
    digits = variant.removeprefix("v")
    return int(digits) if digits.isdigit() else 0


def _key(platform: Platform) -> tuple[str, str, str]:
    return (platform.os, platform.architecture, platform.variant)


# -- resolution --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedImage:
    """What an image target resolves to for one platform: the manifest's descriptor, the manifest and its config."""

    manifest_descriptor: Descriptor
    manifest: Manifest
    config: ImageConfig


def resolve_image(
    read: Callable[[Descriptor], bytes], target: Descriptor, matcher: PlatformMatcher | None = None
) -> ResolvedImage:
    """Walk from ``target`` (index, manifest list or manifest) to the manifest for ``matcher``'s best
    platform (default: :func:`only` the host's) and parse its config. ``read`` returns a blob's bytes.

    As containerd: in an index, entries whose platform does not match are skipped and the best-ranked
    one wins (entries without a platform come last, nested indexes are followed, other artifacts are
    ignored); a manifest listed without a platform must match by its config's platform; a manifest
    given as ``target`` is taken whatever its platform. Blobs larger than :data:`MAX_DOCUMENT_SIZE` or
    whose bytes do not match their descriptor are refused. InvalidArgument for malformed, schema 1 or
    non-image documents; NotFound when no manifest matches.
    """
    matcher = matcher or only()
    found = _resolve(read, target, matcher, listed=False)
    if found is None:
        raise NotFound(f"no manifest for platform {matcher} in image {target.digest}")
    return found


def _resolve(
    read: Callable[[Descriptor], bytes], desc: Descriptor, matcher: PlatformMatcher, listed: bool
) -> ResolvedImage | None:
    """The image ``desc`` leads to, or None when nothing matches; ``listed``: ``desc`` came from an index."""
    name = f"{_kind(desc.media_type)} {desc.digest}"
    if is_index(desc.media_type):
        index = parse_index(_read_document(read, desc, name), desc.media_type, name)
        ranked = []
        for position, candidate in enumerate(index.manifests):
            kind = candidate.media_type
            if not (is_index(kind) or is_manifest(kind) or kind in _SCHEMA1_TYPES):
                continue  # attestations, signatures and other artifacts listed beside the images
            rank = matcher.rank(candidate.platform) if candidate.platform is not None else sys.maxsize
            if rank is not None:
                ranked.append((rank, position, candidate))
        for _, _, candidate in sorted(ranked, key=lambda item: item[:2]):
            if (found := _resolve(read, candidate, matcher, listed=True)) is not None:
                return found
        return None
    if is_manifest(desc.media_type):
        manifest = parse_manifest(_read_document(read, desc, name), desc.media_type, name)
        if not is_config(manifest.config.media_type):
            raise InvalidArgument(f"{name}: not an image (config media type {manifest.config.media_type!r})")
        config_name = f"image config {manifest.config.digest}"
        config = parse_config(_read_document(read, manifest.config, config_name), config_name)
        if listed and desc.platform is None and not matcher.match(config.platform):
            return None
        return ResolvedImage(desc, manifest, config)
    if desc.media_type in _SCHEMA1_TYPES:
        raise InvalidArgument(f"{name}: {_SCHEMA1_REFUSAL}")
    raise InvalidArgument(f"{desc.digest}: media type {desc.media_type!r} is not an image index or manifest")


def _kind(media_type: str) -> str:
    return "index" if is_index(media_type) else "manifest"


def _read_document(read: Callable[[Descriptor], bytes], desc: Descriptor, name: str) -> bytes:
    if desc.size > MAX_DOCUMENT_SIZE:
        raise InvalidArgument(f"{name}: {desc.size} bytes is more than the {MAX_DOCUMENT_SIZE} bytes allowed")
    data = read(desc)
    if len(data) != desc.size or Digest.from_bytes(data, desc.digest.algorithm) != desc.digest:
        raise InvalidArgument(f"{name}: content does not match its descriptor (size or digest differ)")
    return data


# -- chain ids ---------------------------------------------------------------------------------


def chain_ids(diff_ids: Sequence[Digest | str]) -> list[Digest]:
    """The chain id of each layer stack, bottom first: the first is the first diff id, each next one
    ``sha256("<previous chain id> <diff id>")`` (the OCI image spec's ChainID)."""
    out: list[Digest] = []
    for diff_id in diff_ids:
        diff_id = Digest(diff_id)
        if not out:
            out.append(diff_id)
        else:
            out.append(Digest("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest()))
    return out
