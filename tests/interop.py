"""Real third parties for the interop tests and benchmarks: Debian's ``docker-registry``, containerd 1.6, ``ctr``,
``skopeo``, and a file-by-file description of unpacked trees to compare what two daemons unpacked.

Everything started here listens on 127.0.0.1 only, lives in its own temp dir, and is stopped by its pid;
anything mounted under those temp dirs is unmounted before they are removed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import termios
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import _daemons  # bench/_daemons.py: start/stop containerd, unmount leftovers
from oci_images import Layout, busybox_layer

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
SKOPEO = shutil.which("skopeo") or "/usr/bin/skopeo"
CTR = _daemons.CTR
REGISTRY_START_TIMEOUT_S = 20.0
CTR_TIMEOUT_S = 300.0
CGROUPS = Path("/sys/fs/cgroup")
CONTAINERD_RUNC_ROOT = Path("/run/containerd/runc")  # containerd-shim-runc-v2's default runc --root


class Daemon(Protocol):
    """What the helpers need of a daemon: the socket ``ctr -a`` talks to (containerkitd's or containerd's)."""

    @property
    def address(self) -> str | os.PathLike[str]: ...


def ctr(
    daemon: Daemon, *args: str, check: bool = True, namespace: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``ctr -a SOCK [-n NS] ARGS`` (text); with ``check`` an AssertionError carrying stderr when it fails."""
    ns = ["-n", namespace] if namespace else []
    argv = [CTR, "-a", str(daemon.address), *ns, *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=CTR_TIMEOUT_S, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def collect_garbage(daemon: Daemon, namespace: str) -> None:
    """A synchronous garbage collection: a throwaway lease deleted with ``--sync`` (after it nothing that
    was already unreferenced is left, and no collection scheduled before is still to run)."""
    lease = ctr(daemon, "leases", "create", namespace=namespace).stdout.strip()
    ctr(daemon, "leases", "rm", "--sync", lease, namespace=namespace)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Registry:
    """Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1, a free port, its own config and storage."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = self.directory / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> str:
        return "\n".join(
            [
                "version: 0.1",
                "log:",
                "  level: warn",
                "  accesslog:",
                "    disabled: true",
                "storage:",
                "  filesystem:",
                f"    rootdirectory: {self.directory / 'storage'}",
                "  delete:",
                "    enabled: true",
                "http:",
                f"  addr: {self.host}",
                "",
            ]
        )

    def start(self, attempts: int = 5) -> Registry:
        """Start on a free port (another one if the chosen port is taken before the registry binds it)."""
        for _ in range(attempts):
            self.port = free_port()
            config = self.directory / "config.yml"
            config.write_text(self._config())
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    [REGISTRY, "serve", str(config)], stdout=log, stderr=log, stdin=subprocess.DEVNULL
                )
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"docker-registry did not start:\n{_daemons.tail(self.log_path)}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + REGISTRY_START_TIMEOUT_S
        while time.monotonic() < deadline and self.process is not None and self.process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1) as answer:
                    return answer.status == 200
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        return False

    def push(self, layout: Path, tag: str, name: str, *, docker: bool = False) -> str:
        """``skopeo copy`` the layout's image ``tag`` to ``NAME:TAG`` here; returns the reference.

        Byte for byte, or with ``docker`` converted to a Docker schema 2 manifest and config (Docker layer
        media types; the gzip layer blobs themselves unchanged).
        """
        ref = f"{self.host}/{name}:{tag}"
        form = ["--format", "v2s2"] if docker else ["--preserve-digests"]
        subprocess.run(
            [SKOPEO, "--insecure-policy", "copy", "--quiet", *form, "--dest-tls-verify=false",
             f"oci:{layout}:{tag}", f"docker://{ref}"],
            check=True, capture_output=True, timeout=CTR_TIMEOUT_S,
        )  # fmt: skip
        return ref

    def stop(self) -> None:
        """SIGTERM by pid (SIGKILL if it lingers)."""
        if self.process is not None:
            _daemons.stop(self.process)
            self.process = None


@contextmanager
def running_registry() -> Iterator[Registry]:
    """A started :class:`Registry` in a fresh temp dir, stopped and removed afterwards."""
    registry = Registry(Path(tempfile.mkdtemp(prefix="ck-registry-", dir="/tmp")))
    try:
        yield registry.start()
    finally:
        registry.stop()
        shutil.rmtree(registry.directory, ignore_errors=True)


@contextmanager
def running_containerd() -> Iterator[_daemons.RunningDaemon]:
    """containerd 1.6 with its default config on a private root, state, socket (bench/_daemons.py), closed
    afterwards: stopped by pid, leftover mounts unmounted, temp dir removed."""
    daemon = _daemons.start_daemon("containerd")
    try:
        yield daemon
    finally:
        daemon.close()


# ------------------------------------------------------------------------------------- containers


def busybox_image(registry: Registry, directory: Path) -> str:
    """The busybox image (tests/oci_images.busybox_layer, ``PATH=/bin``, ``Cmd /bin/sh``) written as an OCI
    layout under ``directory`` and pushed to ``registry``; returns its reference."""
    layout = Layout(Path(directory) / "busybox-layout")
    layout.add_image("latest", [busybox_layer()])
    return registry.push(layout.directory, "latest", "interop/busybox")


def remove_containers(daemon: Daemon, namespace: str) -> None:
    """Every container of ``namespace`` gone with its task and snapshot: ``ctr tasks rm -f`` (SIGKILL, wait,
    delete; fails harmlessly when there is no task), then ``ctr containers rm``."""
    for container in ctr(daemon, "containers", "ls", "-q", namespace=namespace).stdout.split():
        ctr(daemon, "tasks", "rm", "-f", container, check=False, namespace=namespace)
        ctr(daemon, "containers", "rm", container, namespace=namespace)


def namespace_for(test: str, suffix: str = "") -> str:
    """A namespace named after a test function (``test_tasks_exec``, "ours" → ``tasks-exec-ours``): at most 50
    characters before the suffix, so suffixes keep two daemons' namespaces (and so their cgroups) apart."""
    name = re.sub(r"[^a-z0-9]+", "-", test.removeprefix("test_").lower()).strip("-")[:50].rstrip("-")
    return f"{name}-{suffix}" if suffix else name


def remove_namespace_dirs(namespace: str) -> None:
    """Remove what runc leaves per namespace once its containers are gone, where empty: the parent cgroup
    ``/NAMESPACE`` of every hierarchy, and containerd's runc root ``/run/containerd/runc/NAMESPACE``."""
    for directory in [*CGROUPS.glob(f"*/{namespace}"), CONTAINERD_RUNC_ROOT / namespace]:
        with contextlib.suppress(OSError):
            directory.rmdir()


@dataclass(frozen=True)
class Place:
    """A daemon and a namespace of one's own in it holding ``image``: ``ctr`` bound to both."""

    daemon: Daemon
    namespace: str
    image: str

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return ctr(self.daemon, *args, check=check, namespace=self.namespace)

    def tasks(self) -> dict[str, tuple[int, str]]:
        """``ctr tasks ls`` as {task: (pid, STATUS)}."""
        header, *rows = (line.split() for line in self.ctr("tasks", "ls").stdout.splitlines())
        assert header == ["TASK", "PID", "STATUS"]
        return {row[0]: (int(row[1]), row[2]) for row in rows}

    def wait_status(self, task: str, status: str, timeout: float = 30.0) -> None:
        """Poll ``ctr tasks ls`` until ``task`` shows ``status`` (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while (seen := self.tasks().get(task)) is None or seen[1] != status:
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task} is {seen}, not {status}, after {timeout}s")
            time.sleep(0.05)


@contextmanager
def image_place(daemon: Daemon, image: str, namespace: str) -> Iterator[Place]:
    """``ctr images pull --plain-http IMAGE`` into ``namespace``; afterwards every container there is removed
    (:func:`remove_containers`), and the namespace's empty cgroups (:func:`remove_namespace_dirs`)."""
    ctr(daemon, "images", "pull", "--plain-http", image, namespace=namespace)
    try:
        yield Place(daemon, namespace, image)
    finally:
        remove_containers(daemon, namespace)
        remove_namespace_dirs(namespace)


def processes_naming(text: str) -> list[int]:
    """Pids of the other processes whose command line holds ``text`` (a daemon's dir names its shims)."""
    wanted = text.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if wanted in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def kill_leftovers(directory: Path) -> None:
    """After a daemon on ``directory`` stopped: SIGKILL (by pid) every process naming ``directory`` (its shims)
    and their descendants (their containers), then unmount whatever is still mounted under it."""
    for pid in processes_naming(str(directory)):
        for member in _daemons.process_tree(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
    _daemons.unmount_under(directory)


@dataclass(frozen=True)
class PtyRun:
    """What a command run under a pseudo-terminal printed (both streams, as the terminal shows them)."""

    returncode: int
    output: bytes


def ctr_pty(
    daemon: Daemon,
    *args: str,
    namespace: str | None = None,
    typed: bytes = b"",
    rows: int = 24,
    columns: int = 80,
    timeout: float = CTR_TIMEOUT_S,
) -> PtyRun:
    """``ctr -a SOCK [-n NS] ARGS`` under a fresh pty (see :func:`run_pty`)."""
    ns = ["-n", namespace] if namespace else []
    return run_pty([CTR, "-a", str(daemon.address), *ns, *args], typed=typed, rows=rows, columns=columns,
                   timeout=timeout)  # fmt: skip


def run_pty(
    argv: Sequence[str],
    *,
    typed: bytes = b"",
    rows: int = 24,
    columns: int = 80,
    timeout: float = CTR_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> PtyRun:
    """``argv`` with a fresh pty of ``rows`` x ``columns`` as its stdin, stdout, stderr and controlling
    terminal; ``typed`` is written to the terminal once it has started. Reads until it exits (killed by
    pid after ``timeout``, which fails)."""
    master, slave = os.openpty()
    termios.tcsetwinsize(slave, (rows, columns))
    try:
        proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=env)
    finally:
        os.close(slave)
    try:
        if typed:
            os.write(master, typed)
        output = _read_until_hangup(master, proc, time.monotonic() + timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return PtyRun(proc.returncode, output)


def _read_until_hangup(master: int, proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    """Everything the terminal's other side writes until it hangs up (EIO once every slave fd is closed)."""
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{proc.args} still running after its timeout; printed: {b''.join(chunks)!r}")
        if not select.select([master], [], [], min(remaining, 0.5))[0]:
            if proc.poll() is not None and not select.select([master], [], [], 0.2)[0]:
                return b"".join(chunks)
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError as err:
            if err.errno != errno.EIO:
                raise
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# ------------------------------------------------------------------------------------------ trees


@dataclass(frozen=True)
class Node:
    """What a tree comparison looks at for one path (``None`` where it does not apply to the type)."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None
    sha256: str | None
    target: str | None
    xattrs: tuple[tuple[str, bytes], ...]
    rdev: tuple[int, int] | None
    mtime_ns: int | None
    links: tuple[str, ...]


KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    return tuple(sorted((name, os.getxattr(path, name, follow_symlinks=False)) for name in names))


def tree_of(root: Path) -> dict[str, Node]:
    """Every path under ``root`` (``.`` is root itself, whose mtime is the snapshotter's, not the image's).

    Symlinks are never followed; ``links`` lists the other paths sharing a non-directory's inode.
    """
    stats: dict[str, os.stat_result] = {}
    pending = [""]
    while pending:
        relative = pending.pop()
        path = os.path.join(root, relative) if relative else str(root)
        st = os.lstat(path)
        stats[relative or "."] = st
        if stat.S_ISDIR(st.st_mode):
            pending.extend(os.path.join(relative, name) for name in os.listdir(path))
    inodes: dict[tuple[int, int], list[str]] = {}
    for relative, st in stats.items():
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(relative)
    tree = {}
    for relative, st in stats.items():
        path = os.path.join(root, relative)
        kind = KINDS[stat.S_IFMT(st.st_mode)]
        group = inodes.get((st.st_dev, st.st_ino), []) if kind != "dir" else []
        tree[relative] = Node(
            kind=kind,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size if kind in ("file", "symlink") else None,
            sha256=_file_sha256(path) if kind == "file" else None,
            target=os.readlink(path) if kind == "symlink" else None,
            xattrs=_xattrs(path),
            rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
            mtime_ns=None if relative == "." else st.st_mtime_ns,
            links=tuple(sorted(p for p in group if p != relative)),
        )
    return tree


def tree_differences(
    ours: dict[str, Node], theirs: dict[str, Node], *, unstable_mtimes: Collection[str] = (), limit: int = 20
) -> list[str]:
    """Human-readable differences (at most ``limit``): paths only on one side, then field by field.

    ``unstable_mtimes``: paths whose mtime is the time of extraction (directories a layer creates
    implicitly, as parents of its entries), so not compared.
    """
    out = [f"only in ours: {p}" for p in sorted(ours.keys() - theirs.keys())]
    out += [f"only in theirs: {p}" for p in sorted(theirs.keys() - ours.keys())]
    for path in sorted(ours.keys() & theirs.keys()):
        a, b = ours[path], theirs[path]
        out += [
            f"{path}: {name} ours={getattr(a, name)!r} theirs={getattr(b, name)!r}"
            for name in Node.__dataclass_fields__
            if getattr(a, name) != getattr(b, name) and not (name == "mtime_ns" and path in unstable_mtimes)
        ]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


@contextmanager
def mounted_image(daemon: Daemon, ref: str, parent: Path, namespace: str | None = None) -> Iterator[Path]:
    """``ctr images mount REF TARGET`` (a read-only view, unpacking first if needed) on a fresh dir under
    ``parent``; afterwards ``ctr images unmount --rm`` (view and lease removed) and the dir is removed.
    ctr names the view and its lease after TARGET, the absolute path."""
    target = Path(parent) / f"mnt-{uuid.uuid4().hex[:12]}"
    target.mkdir()
    try:
        ctr(daemon, "images", "mount", ref, str(target), namespace=namespace)
        yield target
    finally:
        try:
            ctr(daemon, "images", "unmount", "--rm", str(target), namespace=namespace)
        finally:
            _daemons.unmount_under(target)
            target.rmdir()


def image_tree(daemon: Daemon, ref: str, parent: Path, namespace: str | None = None) -> dict[str, Node]:
    """The tree of ``ref`` as the daemon unpacked it, read through ``ctr images mount``."""
    with mounted_image(daemon, ref, parent, namespace) as target:
        return tree_of(target)


class Sentinel:
    """A directory outside every rootfs that hostile layers aim at; :meth:`untouched` says if it still is."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        (self.directory / "victim").write_bytes(b"original\n")
        self.before = self._state()

    def _state(self) -> tuple[dict[str, Node], int]:
        return tree_of(self.directory), os.lstat(self.directory / "victim").st_nlink

    def untouched(self) -> list[str]:
        """The differences from how it was made (empty when nothing was written or linked there)."""
        (tree, links), (tree_before, links_before) = self._state(), self.before
        changed = [] if links == links_before else [f"victim: {links} links, was {links_before}"]
        return changed + tree_differences(tree, tree_before)


SNAPSHOT_PATH = re.compile(r"/\S*?/snapshots/\d+/(fs|work)")


def normalised(text: str) -> str:
    """``ctr`` output with the daemon's snapshot paths and the times taken out, for comparing daemons."""
    text = SNAPSHOT_PATH.sub(r"SNAPSHOT/\1", text)
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "TIME", text)
