"""Named network namespaces for containers, as ``ip netns`` keeps them: a bind mount of a namespace file
on ``/run/netns/<name>``.

A container's netns is named after its namespace and id (:func:`netns_name`), so the daemon finds it
again after a restart without a record. :func:`create_netns` and :func:`delete_netns` are idempotent
and safe to call from several threads; a netns is made by a short-lived helper thread that unshares
its network namespace, so the daemon's own namespace never changes. Errors are :class:`OSError` for
host faults, InvalidArgument for a name that cannot be a netns file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import threading
from pathlib import Path

from core.errors import InvalidArgument
from core.mount import is_mountpoint, mount_all, unmount_all
from core.types import Mount

__all__ = ["NETNS_DIR", "NETNS_PREFIX", "create_netns", "delete_netns", "list_netns", "netns_name", "netns_path"]

NETNS_DIR = Path("/run/netns")
"""Where named network namespaces live (iproute2's directory)."""
NETNS_PREFIX = "ck-"
"""The prefix of every netns containerkit names; anything else in :data:`NETNS_DIR` is not ours."""

_CLONE_NEWNET = 0x40000000
_MS_REC = 0x4000
_MS_SHARED = 0x100000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.unshare.argtypes = (ctypes.c_int,)
_lock = threading.Lock()


def netns_name(namespace: str, container_id: str) -> str:
    """The netns name of a container: ``ck-`` and the first 12 hex digits of sha256("<namespace>/<id>")."""
    digest = hashlib.sha256(f"{namespace}/{container_id}".encode()).hexdigest()
    return f"{NETNS_PREFIX}{digest[:12]}"


def netns_path(namespace: str, container_id: str) -> str:
    """The path of a container's netns file (``/run/netns/ck-...``), whether it exists or not."""
    return str(NETNS_DIR / netns_name(namespace, container_id))


def create_netns(name: str) -> str:
    """Make the named netns (a fresh network namespace with only a down loopback) and return its path.

    Idempotent: an existing netns of that name is kept and its path returned.
    """
    path = _path_of(name)
    with _lock:
        if path.exists() and is_mountpoint(path):
            return str(path)
        _shared_netns_dir()
        path.touch(mode=0o444, exist_ok=True)
        try:
            _bind_new_netns(path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return str(path)


def delete_netns(name: str) -> None:
    """Unmount and remove the named netns; nothing when it does not exist. Processes still in it keep
    the namespace alive until they end."""
    path = _path_of(name)
    with _lock:
        unmount_all(path, detach=True)
        path.unlink(missing_ok=True)


def list_netns() -> list[str]:
    """The names of every netns containerkit made (prefix :data:`NETNS_PREFIX`), sorted."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.startswith(NETNS_PREFIX))


def _path_of(name: str) -> Path:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InvalidArgument(f"invalid netns name {name!r}")
    return NETNS_DIR / name


def _shared_netns_dir() -> None:
    """Make :data:`NETNS_DIR` a shared mount (binding it onto itself first when it is not a mount), as
    ``ip netns add`` does, so unmounting a netns there reaches the copies other mount namespaces hold."""
    NETNS_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    if _propagate_shared(NETNS_DIR) == errno.EINVAL:
        mount_all([Mount("none", str(NETNS_DIR), ("rbind",))], NETNS_DIR)
        err = _propagate_shared(NETNS_DIR)
        if err:
            raise OSError(err, f"making {NETNS_DIR} a shared mount: {os.strerror(err)}", str(NETNS_DIR))


def _propagate_shared(directory: Path) -> int:
    """mount(2) MS_SHARED|MS_REC on ``directory``; the errno, 0 on success."""
    if _libc.mount(None, os.fsencode(directory), None, _MS_SHARED | _MS_REC, None) != 0:
        return ctypes.get_errno()
    return 0


def _bind_new_netns(path: Path) -> None:
    """Bind a new network namespace onto ``path``: a helper thread unshares its own and the bind keeps
    it after the thread ends."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if _libc.unshare(_CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
            mount_all([Mount("none", f"/proc/self/task/{threading.get_native_id()}/ns/net", ("bind",))], path)
        except BaseException as exc:
            failure.append(exc)

    helper = threading.Thread(target=run, name="containerkit-netns")
    helper.start()
    helper.join()
    if failure:
        raise failure[0]
