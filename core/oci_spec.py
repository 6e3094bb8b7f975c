"""OCI runtime specs as containerd builds them for ``ctr run``: the default spec and the one made from an image.

Everything here is pure except reading the rootfs' ``/etc/passwd`` and ``/etc/group`` (resolved
inside the rootfs, symlinks included, as containerd's ``fs.RootPath``) and the host's resource
limits. Specs are plain dicts in the runtime spec's JSON shape, ready for ``json.dumps``.

Defaults follow containerd 1.6's ``oci.WithDefaultSpec`` + ``WithDefaultUnixDevices`` (the
capability set, masked and read-only paths, ``noNewPrivileges``, the device cgroup allow list,
cgroups path ``/<namespace>/<id>``), plus a read-only ``cgroup`` mount and the container id as
hostname. Resource limits never ask for more than this host's hard limit, so a runtime never fails
on a limit it cannot grant. An image config is applied as ``oci.WithImageConfigArgs``: entrypoint
followed by the given args or else the image's cmd, the image's env (or the default ``PATH``) with
the given env merged over it, the working dir, and the user with its additional groups.
Refusals are :class:`~core.errors.InvalidArgument` naming what is wrong.
"""

from __future__ import annotations

import csv
import os
import resource
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.errors import InvalidArgument
from core.oci import ImageConfig

__all__ = [
    "DEFAULT_CAPABILITIES",
    "DEFAULT_PATH_ENV",
    "MASKED_PATHS",
    "OCI_VERSION",
    "READONLY_PATHS",
    "SPEC_TYPE_URL",
    "default_spec",
    "host_rlimits",
    "merge_env",
    "parse_mount",
    "resolve_user",
    "spec_from_image",
]

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
"""The type URL of a container's spec ``Any`` (its value is the spec's JSON), as containerd's typeurl registers it."""

OCI_VERSION = "1.0.2-dev"
"""The runtime spec version containerd 1.6 and Debian's runc speak."""

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
)

READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

DEFAULT_RLIMITS = (("RLIMIT_NOFILE", 1024),)
"""Soft and hard value each limit asks for (before :func:`host_rlimits` caps it)."""

_NAMESPACES = ("pid", "ipc", "uts", "mount", "network")
_NOSUID_NOEXEC_NODEV = ("nosuid", "noexec", "nodev")

# (destination, type, source, options)
_DEFAULT_MOUNTS = (
    ("/proc", "proc", "proc", _NOSUID_NOEXEC_NODEV),
    ("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
    ("/dev/pts", "devpts", "devpts", ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5")),
    ("/dev/shm", "tmpfs", "shm", (*_NOSUID_NOEXEC_NODEV, "mode=1777", "size=65536k")),
    ("/dev/mqueue", "mqueue", "mqueue", _NOSUID_NOEXEC_NODEV),
    ("/sys", "sysfs", "sysfs", (*_NOSUID_NOEXEC_NODEV, "ro")),
    ("/sys/fs/cgroup", "cgroup", "cgroup", (*_NOSUID_NOEXEC_NODEV, "relatime", "ro")),
    ("/run", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
)

# The character devices every container may use (type, major, minor; None: all minors):
# null, random, full, tty, zero, urandom, console, the pts, ptmx.
_DEFAULT_DEVICES = (
    ("c", 1, 3),
    ("c", 1, 8),
    ("c", 1, 7),
    ("c", 5, 0),
    ("c", 1, 5),
    ("c", 1, 9),
    ("c", 5, 1),
    ("c", 136, None),
    ("c", 5, 2),
)

_MAX_ID = 2**31 - 1  # runc takes uids and gids up to MaxInt32, as containerd checks


def host_rlimits(wanted: Iterable[tuple[str, int]] = DEFAULT_RLIMITS) -> list[dict[str, Any]]:
    """The OCI ``rlimits`` for ``wanted`` (name, value for soft and hard), each capped at this host's hard
    limit; names this host does not know are left out."""
    out = []
    for name, value in wanted:
        number = getattr(resource, name, None)
        if number is None:
            continue
        hard = resource.getrlimit(number)[1]
        granted = value if hard == resource.RLIM_INFINITY else min(value, hard)
        out.append({"type": name, "hard": granted, "soft": granted})
    return out


def default_spec(id: str, *, namespace: str) -> dict[str, Any]:
    """containerd's default Linux spec for container ``id`` of ``namespace`` (see the module doc); no args yet."""
    capabilities = list(DEFAULT_CAPABILITIES)
    devices: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    for kind, major, minor in _DEFAULT_DEVICES:
        device = {"allow": True, "type": kind, "major": major, "access": "rwm"}
        devices.append(device if minor is None else {**device, "minor": minor})
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [],
            "env": [DEFAULT_PATH_ENV],
            "cwd": "/",
            "capabilities": {
                "bounding": capabilities,
                "effective": list(capabilities),
                "permitted": list(capabilities),
            },
            "rlimits": host_rlimits(),
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs"},
        "hostname": id,
        "mounts": [
            {"destination": destination, "type": kind, "source": source, "options": list(options)}
            for destination, kind, source, options in _DEFAULT_MOUNTS
        ],
        "linux": {
            "resources": {"devices": devices},
            "cgroupsPath": f"/{namespace}/{id}",
            "namespaces": [{"type": kind} for kind in _NAMESPACES],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def spec_from_image(
    config: ImageConfig,
    rootfs: Path | None,
    *,
    id: str,
    namespace: str,
    args: Sequence[str] = (),
    env: Sequence[str] = (),
    mounts: Sequence[Mapping[str, Any]] = (),
    terminal: bool = False,
    cwd: str | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    """The spec ``ctr run`` makes for ``config``: :func:`default_spec`, then the image's process defaults
    overridden by ``args`` (replacing the cmd), ``env`` (``K=V`` set, a bare ``K`` unset), ``cwd`` and
    ``user`` (else the image's); ``mounts`` (OCI mount objects, see :func:`parse_mount`) are appended
    and ``terminal`` adds ``TERM=xterm``. ``rootfs`` is the image's root filesystem, for the user's
    lookup in /etc/passwd and /etc/group (None: as if it had neither).

    InvalidArgument when there is no command at all, the working directory is relative, the user or
    group is unknown, or a mount is malformed or unsupported.
    """
    spec = default_spec(id, namespace=namespace)
    process = spec["process"]
    process["args"] = [*config.entrypoint, *(args or config.cmd)]
    if not process["args"]:
        raise InvalidArgument("no command to run: the image has neither entrypoint nor cmd, so give one")
    process["env"] = merge_env(config.env or (DEFAULT_PATH_ENV,), env)
    process["cwd"] = cwd or config.working_dir or "/"
    if not process["cwd"].startswith("/"):
        raise InvalidArgument(f"working directory {process['cwd']!r} is not an absolute path")
    process["user"] = resolve_user(user if user is not None else config.user, rootfs)
    if terminal:
        process["terminal"] = True
        process["env"] = merge_env(process["env"], () if _defines(process["env"], "TERM") else ("TERM=xterm",))
    spec["mounts"] += [_checked_mount(m) for m in mounts]
    return spec


def merge_env(defaults: Iterable[str], overrides: Iterable[str]) -> list[str]:
    """``defaults`` with each ``K=V`` of ``overrides`` replacing the value of ``K`` in place or appended, and
    each bare ``K`` removing ``K`` (containerd's ``replaceOrAppendEnvValues``)."""
    merged = {entry.partition("=")[0]: entry for entry in defaults}
    for entry in overrides:
        key, sep, _ = entry.partition("=")
        if sep:
            merged[key] = entry
        else:
            merged.pop(key, None)
    return list(merged.values())


def _defines(env: Iterable[str], key: str) -> bool:
    return any(entry.partition("=")[0] == key for entry in env)


def resolve_user(user: str, rootfs: Path | None) -> dict[str, Any]:
    """The OCI ``process.user`` for an image ``USER`` value (``""`` is root) as containerd resolves it
    through ``rootfs``' /etc/passwd and /etc/group (None: a rootfs without them): ``name`` and ``uid``
    take the passwd entry's uid and gid (an unknown uid runs with gid 0), ``user:group`` takes each part
    as a number or looks its name up; ``additionalGids`` are the primary gid then the groups listing the
    uid's user name (root's when ``user`` is ``""``) as a member.

    InvalidArgument for an unknown user or group name or a malformed value.
    """
    parts = user.split(":")
    if len(parts) > 2 or (user and "" in parts):
        raise InvalidArgument(f"invalid user {user!r}: use name, uid, name:group or uid:gid")
    ids = [_numeric_id(part) for part in parts] if user else [0]
    passwd = _read_table(rootfs, "/etc/passwd", user)
    uid = ids[0]
    if uid is None:
        entry = _find(passwd, lambda fields: fields[0] == parts[0])
        if entry is None:
            raise InvalidArgument(f"unable to find user {parts[0]!r} in the image's /etc/passwd")
        uid = _entry_id(entry, 2, "/etc/passwd")
    else:
        entry = _find(passwd, lambda fields: _numeric_id(fields[2]) == uid)
    gid = _entry_id(entry, 3, "/etc/passwd") if entry is not None and user else 0
    groups = _read_table(rootfs, "/etc/group", user)
    if len(parts) == 2:
        gid = ids[1]
        if gid is None:
            group = _find(groups, lambda fields: fields[0] == parts[1])
            if group is None:
                raise InvalidArgument(f"unable to find group {parts[1]!r} in the image's /etc/group")
            gid = _entry_id(group, 2, "/etc/group")
    name = "root"  # whose additional groups: the name the uid has in /etc/passwd, root when no user is given
    if user:
        named = _find(passwd, lambda fields: _numeric_id(fields[2]) == uid)
        name = named[0] if named is not None else ""
    additional = [
        _entry_id(group, 2, "/etc/group")
        for group in groups
        if name and len(group) > 3 and group[0] != name and name in group[3].split(",")
    ]
    return {"uid": uid, "gid": gid, "additionalGids": additional if gid in additional else [gid, *additional]}


def _numeric_id(text: str) -> int | None:
    """``text`` as a uid or gid when it is one (decimal, at most MaxInt32), else None (a name)."""
    if not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value <= _MAX_ID else None


def _read_table(rootfs: Path | None, path: str, user: str) -> list[list[str]]:
    """The colon-separated entries of a passwd-like file in ``rootfs`` (none when the file or the rootfs
    is missing), blank and ``#`` lines skipped."""
    from core.diff.archive import scoped_path

    if rootfs is None:
        return []
    try:
        text = Path(scoped_path(os.fspath(rootfs), path)).read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as err:
        raise InvalidArgument(f"resolving user {user!r}: reading the image's {path}: {err.strerror}") from None
    return [line.split(":") for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _find(entries: list[list[str]], match: Callable[[list[str]], bool]) -> list[str] | None:
    """The first well-formed entry (at least name, password and id) that ``match`` accepts."""
    return next((entry for entry in entries if len(entry) > 2 and match(entry)), None)


def _entry_id(entry: list[str], field: int, path: str) -> int:
    value = _numeric_id(entry[field]) if len(entry) > field else None
    if value is None:
        raise InvalidArgument(f"the image's {path} has a malformed entry for {entry[0]!r}")
    return value


def parse_mount(text: str) -> dict[str, Any]:
    """An OCI mount from ``ctr run --mount``'s syntax: comma-separated ``type=``, ``source=``/``src=``,
    ``destination=``/``dst=`` and ``options=`` (colon-separated, e.g. ``rbind:ro``; empty ones dropped); a
    relative bind source is made absolute here, a ``type=volume`` source is a volume's name. InvalidArgument
    for anything else (see :func:`spec_from_image`'s checks)."""
    keys = {"type": "type", "source": "source", "src": "source", "destination": "destination", "dst": "destination"}
    mount: dict[str, Any] = {"type": "", "source": "", "destination": "", "options": []}
    try:
        fields = next(csv.reader([text]), [])
    except csv.Error as err:
        raise InvalidArgument(f"invalid mount {text!r}: {err}") from None
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep:
            raise InvalidArgument(f"invalid mount {text!r}: expected key=value, got {field!r}")
        if key == "options":
            mount["options"] = [option for option in value.split(":") if option]
        elif key in keys:
            mount[keys[key]] = value
        else:
            raise InvalidArgument(f"invalid mount {text!r}: key {key!r} is not supported")
    if mount["type"] == "bind" and mount["source"]:
        mount["source"] = os.path.abspath(mount["source"])
    return _checked_mount(mount)


def _checked_mount(mount: Mapping[str, Any]) -> dict[str, Any]:
    """``mount`` checked for the runtime: an absolute destination; bind mounts with an absolute source
    and ``rbind`` unless ``bind``/``rbind`` is given; volume mounts (``type=volume``, which the daemon's
    volumes service turns into binds) with a valid volume name as source and only volume mount options
    (:func:`core.volumes.bind_options`), kept as given."""
    from core.volumes import bind_options, validate_name  # deferred: it imports the metadata store

    kind, source, destination = mount.get("type", ""), mount.get("source", ""), mount.get("destination", "")
    options = list(mount.get("options") or [])
    if not kind:
        raise InvalidArgument(f"mount on {destination!r}: missing type (e.g. type=bind)")
    if not destination.startswith("/"):
        raise InvalidArgument(f"mount of {source!r}: destination {destination!r} must be an absolute path")
    if kind == "volume":
        try:
            validate_name(source)
            bind_options(options)
        except InvalidArgument as err:
            raise InvalidArgument(f"volume mount on {destination!r}: {err}") from None
    elif kind == "bind":
        if not source.startswith("/"):
            raise InvalidArgument(f"bind mount on {destination!r}: source {source!r} must be an absolute path")
        if "bind" not in options and "rbind" not in options:
            options.insert(0, "rbind")
    return {"destination": destination, "type": kind, "source": source, "options": options}
