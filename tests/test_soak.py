"""Soak: concurrent clients (``ckctl`` and Debian's ``ctr``) in three namespaces of one containerkitd for
SOAK_SECONDS (60, or ``CONTAINERKIT_SOAK_SECONDS``): runs, detached runs with execs, kills and deletes, pulls
and image removals, content writes and removals, snapshot prepares and removals.

Every operation must succeed. Afterwards, with everything the soak made removed and garbage collected, what
the daemon holds is back within :data:`LIMITS` of the baseline taken after a warm-up round: open fds, RSS,
mounts under its directory, processes naming it (shims and containers) and the namespaces' cgroups.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CKCTL, RunningDaemon
from daemon_usage import MIB, Usage, usage
from interop import CTR, busybox_image, collect_garbage, remove_namespace_dirs
from oci_images import Layer, Layout, busybox_layer

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("ctr", "runc", "docker-registry", "skopeo")),
    reason="needs runc, Debian's ctr, docker-registry and skopeo",
)

SOAK_SECONDS = float(os.environ.get("CONTAINERKIT_SOAK_SECONDS", "60"))
NAMESPACES = ["soak-a", "soak-b", "soak-c"]
CALL_TIMEOUT_S = 120.0
GC_ROOT = "containerd.io/gc.root=soak"  # what the soak writes is kept from garbage collection until it removes it
LIMITS = Usage(fds=16, rss=64 * MIB, threads=64, mounts=0, processes=0, cgroups=0)
"""How far above the baseline each count may end: idle gRPC workers stay (threads), Python keeps freed
memory (RSS); mounts, shims, containers and cgroups must all be gone."""


class Client:
    """One soak client in one namespace: runs operations, counts them and the calls they make (each a
    ``ckctl`` or ``ctr`` process), keeps the failures."""

    def __init__(self, daemon: RunningDaemon, namespace: str, name: str, images: dict[str, str]) -> None:
        self.daemon, self.namespace, self.name, self.images = daemon, namespace, name, images
        self.done = 0
        self.calls = 0
        self.failed_calls = 0
        self.failures: list[str] = []
        self._serial = 0

    def ckctl(self, *args: str, stdin: bytes = b"") -> str:
        return self._run([*CKCTL, "-a", self.daemon.address, "-n", self.namespace, *args], stdin)

    def ctr(self, *args: str, stdin: bytes = b"") -> str:
        return self._run([CTR, "-a", self.daemon.address, "-n", self.namespace, *args], stdin)

    def _run(self, argv: list[str], stdin: bytes) -> str:
        self.calls += 1
        try:
            result = subprocess.run(argv, input=stdin, capture_output=True, timeout=CALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.failed_calls += 1
            raise
        if result.returncode != 0:
            self.failed_calls += 1
            raise AssertionError(f"{' '.join(argv[2:])}: exit {result.returncode}: {result.stderr.decode().strip()}")
        return result.stdout.decode()

    def unique(self, what: str) -> str:
        self._serial += 1
        return f"{self.name}-{what}-{self._serial}"

    def operate(self, operation: Callable[[Client], None]) -> None:
        """Run one operation; a failure is kept (with what failed), not raised."""
        try:
            operation(self)
        except (AssertionError, subprocess.TimeoutExpired) as err:
            self.failures.append(f"{self.namespace}/{self.name} {operation.__name__}: {err}")
        self.done += 1


# ---------------------------------------------------------------------------------------------- operations


def run_rm(client: Client) -> None:
    """``ckctl run --rm``: the output comes back and nothing is left."""
    assert client.ckctl("run", "--rm", client.images["busybox"], client.unique("run"), "echo", "ok") == "ok\n"


def detached_exec_kill(client: Client) -> None:
    """``ctr run -d``, ``ckctl tasks exec`` and ``ctr tasks exec``, then ``ctr tasks rm -f`` and
    ``ckctl containers rm``."""
    container = client.unique("task")
    client.ctr("run", "-d", client.images["busybox"], container, "sleep", "600")
    try:
        assert client.ckctl("tasks", "exec", "--exec-id", "e1", container, "echo", "one") == "one\n"
        assert client.ctr("tasks", "exec", "--exec-id", "e2", container, "echo", "two") == "two\n"
    finally:
        client.ctr("tasks", "rm", "-f", container)
        client.ckctl("containers", "rm", container)


def pull_remove(client: Client) -> None:
    """Pull the client's own image with ``ctr``, remove it with ``ckctl``; then the other way round."""
    ref = client.images[client.name]
    client.ctr("images", "pull", "--plain-http", ref)
    client.ckctl("images", "rm", ref)
    client.ckctl("images", "pull", "--plain-http", ref)
    client.ctr("images", "rm", ref)


def content_write_remove(client: Client) -> None:
    """``ckctl content ingest`` a gc-rooted blob, read it back with ``ckctl content get``, ``ctr content rm`` it."""
    data = client.unique("blob").encode() * 1000
    digest = client.ckctl("content", "ingest", client.unique("ingest"), "--label", GC_ROOT, stdin=data).strip()
    assert client.ckctl("content", "get", digest).encode() == data
    client.ctr("content", "rm", digest)


def snapshot_prepare_remove(client: Client) -> None:
    """``ckctl snapshots prepare`` an empty gc-rooted active snapshot, ``ctr snapshots rm`` it."""
    key = client.unique("snap")
    client.ckctl("snapshots", "prepare", key, "--label", GC_ROOT)
    client.ctr("snapshots", "rm", key)


RUNNER = [run_rm, detached_exec_kill]
STORE = [pull_remove, content_write_remove, snapshot_prepare_remove]


# ---------------------------------------------------------------------------------------------------- test


@pytest.fixture(scope="module")
def images(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """{"busybox": REF} and, per store client, an image of its own on top of busybox."""
    directory = tmp_path_factory.mktemp("soak")
    refs = {"busybox": busybox_image(registry, directory)}
    layout = Layout(directory / "own")
    for namespace in NAMESPACES:
        tag = f"store-{namespace}"
        layout.add_image(tag, [busybox_layer(), Layer().file("owner", tag.encode())])
        refs[tag] = registry.push(layout.directory, tag, "soak/own")
    return refs


@pytest.fixture
def soak_daemon(make_daemon: Any) -> Iterator[RunningDaemon]:
    """A daemon whose soak namespaces are emptied of containers and cgroups afterwards."""
    daemon = make_daemon()
    yield daemon
    for namespace in NAMESPACES:
        for container in daemon.ctr("containers", "ls", "-q", namespace=namespace, check=False).stdout.split():
            daemon.ctr("tasks", "rm", "-f", container, namespace=namespace, check=False)
            daemon.ctr("containers", "rm", container, namespace=namespace, check=False)
        remove_namespace_dirs(namespace)


def clients_for(daemon: RunningDaemon, images: dict[str, str]) -> list[tuple[Client, list[Callable[[Client], None]]]]:
    """Per namespace a runner (runs, execs, kills, deletes) and a store client (pulls, content, snapshots)."""
    clients = []
    for namespace in NAMESPACES:
        daemon.ctr("images", "pull", "--plain-http", images["busybox"], namespace=namespace)
        clients.append((Client(daemon, namespace, "runner", images), RUNNER))
        own = {**images, "store": images[f"store-{namespace}"]}
        clients.append((Client(daemon, namespace, "store", own), STORE))
    return clients


def soak(clients: list[tuple[Client, list[Callable[[Client], None]]]], deadline: float) -> None:
    """Every client in a thread of its own, cycling through its operations until ``deadline`` (each at
    least once)."""

    def work(client: Client, operations: list[Callable[[Client], None]]) -> None:
        for operation in operations:
            client.operate(operation)
        while time.monotonic() < deadline:
            client.operate(operations[client.done % len(operations)])

    threads = [threading.Thread(target=work, args=pair) for pair in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def settled_usage(daemon: RunningDaemon) -> Usage:
    """What the daemon holds once garbage is collected in every soak namespace."""
    for namespace in NAMESPACES:
        collect_garbage(daemon, namespace)
    assert daemon.process is not None
    return usage(daemon.process.pid, Path(daemon.dir), NAMESPACES)


def test_soak_leaves_nothing_behind(soak_daemon: RunningDaemon, images: dict[str, str], robustness: Any):
    """Concurrent clients in three namespaces for SOAK_SECONDS: no operation fails, and the daemon's fds, RSS,
    mounts, shims and cgroups end within LIMITS of the baseline taken after a warm-up round."""
    daemon = soak_daemon
    clients = clients_for(daemon, images)
    soak(clients, deadline=0.0)  # the warm-up round: each operation once per client
    assert not [failure for client, _ in clients for failure in client.failures]
    baseline = settled_usage(daemon)

    soak(clients, deadline=time.monotonic() + SOAK_SECONDS)
    failures = [failure for client, _ in clients for failure in client.failures]
    calls = sum(client.calls for client, _ in clients)
    robustness.record("soak operations", calls, calls - sum(client.failed_calls for client, _ in clients))
    assert not failures, "\n".join(failures)

    for namespace in NAMESPACES:
        assert daemon.ckctl("containers", "ls", "-q", namespace=namespace).stdout.split() == []
    after = settled_usage(daemon)
    leaks = after.excess(baseline, LIMITS)
    robustness.record("leaks found", len(leaks))
    done = sum(client.done for client, _ in clients)
    print(f"soak: {done} operations, {calls} calls; baseline {baseline}; after {after}")
    assert not leaks, f"above baseline + limits (baseline, now): {leaks}"
