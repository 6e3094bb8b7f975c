"""Value types that pass between plugins: mounts, platforms, descriptors, and the zero timestamp.

All are frozen dataclasses: build a changed copy with :func:`dataclasses.replace`. Mapping fields
(labels, annotations) are copied into a fresh ``dict`` on construction and must be treated as
read-only; they take part in equality but not in hashing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from core.digest import Digest
from core.errors import InvalidArgument

__all__ = ["EPOCH", "Descriptor", "Mount", "Platform"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
"""The zero timestamp: the default of ``created_at``/``updated_at`` in values built by callers."""


def _tuple_of_str(value: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError(f"{what} must be a sequence of strings, not a string")
    return tuple(value)


@dataclass(frozen=True)
class Mount:
    """One mount to perform: what a snapshotter returns and a runtime (or ``mount(8)``) performs.

    ``type`` is the filesystem type (``overlay``, ``bind``, ``tmpfs``...), ``source`` the device or
    path, ``options`` fstab-style options in order (``ro``, ``rbind``, ``lowerdir=...``).
    ``target`` is relative to where the list is mounted; ``""`` (snapshotters always) means that
    place itself. Lists of mounts are performed in order, onto the same target.
    """

    type: str
    source: str
    options: tuple[str, ...] = ()
    target: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _tuple_of_str(self.options, "Mount.options"))

    @property
    def readonly(self) -> bool:
        """Whether the options ask for a read-only mount."""
        return "ro" in self.options

    def format_options(self) -> str:
        """The options as ``mount -o`` takes them: comma-separated, ``""`` when there are none."""
        return ",".join(self.options)


@dataclass(frozen=True)
class Platform:
    """An OCI platform: ``linux/amd64``, ``linux/arm64/v8``. Matching and normalisation live elsewhere."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "os_features", _tuple_of_str(self.os_features, "Platform.os_features"))

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)

    @classmethod
    def parse(cls, value: str) -> Platform:
        """Parse ``os/arch[/variant]`` exactly; InvalidArgument otherwise (no defaults are guessed)."""
        parts = value.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgument(f"invalid platform {value!r}: expected 'os/architecture[/variant]', e.g. linux/amd64")
        return cls(*(part.lower() for part in parts))

    def to_oci(self) -> dict[str, Any]:
        """The OCI image-spec JSON object (``os``, ``architecture``, ``variant``, ``os.version``...)."""
        out: dict[str, Any] = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            out["os.version"] = self.os_version
        if self.os_features:
            out["os.features"] = list(self.os_features)
        if self.variant:
            out["variant"] = self.variant
        return out

    @classmethod
    def from_oci(cls, data: Mapping[str, Any]) -> Platform:
        """Read an OCI platform object; InvalidArgument when ``os`` or ``architecture`` is missing or malformed."""
        features = data.get("os.features") or ()
        if not isinstance(features, list | tuple) or not all(isinstance(f, str) for f in features):
            raise InvalidArgument(f"invalid platform object {dict(data)!r}: os.features must be a list of strings")
        try:
            return cls(
                os=str(data["os"]),
                architecture=str(data["architecture"]),
                variant=str(data.get("variant", "")),
                os_version=str(data.get("os.version", "")),
                os_features=tuple(features),
            )
        except (KeyError, TypeError) as err:
            raise InvalidArgument(f"invalid platform object {dict(data)!r}: needs 'os' and 'architecture'") from err


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and size, and optional hints.

    Construction validates: ``digest`` goes through :class:`~core.digest.Digest` and ``size`` must
    be >= 0, else :class:`~core.errors.InvalidArgument`.
    """

    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict, hash=False)
    urls: tuple[str, ...] = ()
    platform: Platform | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", Digest(self.digest))
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise InvalidArgument(f"invalid size {self.size!r} for {self.digest}: must be an integer >= 0")
        object.__setattr__(self, "annotations", dict(self.annotations))
        object.__setattr__(self, "urls", _tuple_of_str(self.urls, "Descriptor.urls"))

    def to_oci(self) -> dict[str, Any]:
        """The OCI JSON object (``mediaType``, ``digest``, ``size``, then the optional keys if set)."""
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_oci()
        return out

    @classmethod
    def from_oci(cls, data: Mapping[str, Any]) -> Descriptor:
        """Read an OCI descriptor object; InvalidArgument when a required key is missing or malformed."""
        try:
            media_type, digest, size = data["mediaType"], data["digest"], data["size"]
        except KeyError as err:
            raise InvalidArgument(f"invalid descriptor: missing {err.args[0]!r}") from err
        except TypeError as err:
            raise InvalidArgument(f"invalid descriptor: expected an object, got {type(data).__name__}") from err
        annotations, urls, platform = data.get("annotations") or {}, data.get("urls") or [], data.get("platform")
        if not isinstance(media_type, str):
            raise InvalidArgument(f"invalid descriptor: mediaType must be a string, got {media_type!r}")
        if not isinstance(annotations, Mapping) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in annotations.items()
        ):
            raise InvalidArgument("invalid descriptor: annotations must map strings to strings")
        if not isinstance(urls, list) or not all(isinstance(url, str) for url in urls):
            raise InvalidArgument("invalid descriptor: urls must be a list of strings")
        if platform is not None and not isinstance(platform, Mapping):
            raise InvalidArgument(f"invalid descriptor: platform must be an object, got {type(platform).__name__}")
        return cls(
            media_type=media_type,
            digest=digest,
            size=size,
            annotations=dict(annotations),
            urls=tuple(urls),
            platform=Platform.from_oci(platform) if platform else None,
        )
