"""Debian's ``ctr containers`` and ``ctr events`` against containerkitd, side by side with containerd 1.6.

Both daemons pull the same busybox image (tests/oci_images.py, pushed to the interop registry); the
same ``ctr containers`` session (create, ls, info, label, rm and their errors) must print the same
in both, and ``ctr events`` must show the same events for it.
"""

from __future__ import annotations

import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from interop import CTR, collect_garbage, ctr, normalised
from oci_images import Layout, busybox_layer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ctr", "containerd", "docker-registry", "skopeo")),
        reason="needs Debian's containerd (ctr), docker-registry and skopeo",
    ),
]

EVENT_TIMEOUT = 30.0


def pushed_busybox(registry: Any, directory: Path) -> str:
    """Push a busybox image (built in ``directory``) to the interop ``registry``; its reference."""
    layout = Layout(directory)
    layout.add_image("latest", [busybox_layer()])
    return str(registry.push(layout.directory, "latest", "interop/busybox"))


@pytest.fixture(scope="module")
def busybox(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The reference of a busybox image in the interop registry."""
    return pushed_busybox(registry, tmp_path_factory.mktemp("layout"))


@pytest.fixture
def both(containerkitd: Any, containerd: Any) -> tuple[Any, Any]:
    """(containerkitd, containerd): ours first."""
    return containerkitd, containerd


def pulled(daemon: Any, ref: str, namespace: str) -> None:
    ctr(daemon, "images", "pull", "--plain-http", ref, namespace=namespace)
    collect_garbage(daemon, namespace)


def transcript(daemon: Any, ref: str, namespace: str) -> list[tuple[str, int, str, str]]:
    """The same ``ctr containers`` session against ``daemon``: each command with its exit code and outputs."""
    lines: list[tuple[str, int, str, str]] = []

    def run(*args: str) -> None:
        result = ctr(daemon, *args, check=False, namespace=namespace)
        stdout = result.stdout
        if args[:2] == ("containers", "label"):  # ctr prints the labels in Go's map order
            stdout = ",".join(sorted(stdout.strip().split(","))) + "\n"
        lines.append((" ".join(args), result.returncode, normalised(stdout), normalised(_message(result.stderr))))

    run("containers", "create", ref, "c1")
    run("containers", "create", "--label", "team=infra", "--env", "A=1", ref, "c2", "echo", "hi")
    run("containers", "ls")
    run("containers", "ls", "-q")
    run("containers", "ls", "labels.team==infra")
    run("containers", "ls", "id~=^c1$", "id==c2")
    run("containers", "info", "c1")
    run("containers", "info", "--spec", "c2")
    run("containers", "label", "c1", "a=b", "tier=db")
    run("containers", "label", "c1", "a=")
    run("containers", "info", "c1")
    collect_garbage(daemon, namespace)  # the containers keep their snapshots
    run("snapshots", "ls")
    for failing in (
        ("containers", "create", ref, "c1"),
        ("containers", "create", ref, "bad id"),
        ("containers", "info", "missing"),
        ("containers", "label", "missing", "a=b"),
        ("containers", "rm", "missing"),
        ("containers", "ls", "id=="),
    ):
        run(*failing)
    run("containers", "rm", "--keep-snapshot", "c1")
    run("containers", "rm", "c2")
    run("containers", "ls")
    collect_garbage(daemon, namespace)  # nothing keeps the kept snapshot any more
    run("snapshots", "ls")
    return lines


def _message(stderr: str) -> str:
    """ctr's error output without its log lines' times."""
    return "\n".join(line.partition(" level=")[2] or line for line in stderr.splitlines())


def test_ctr_containers_session_prints_what_containerd_prints(both: tuple[Any, Any], busybox: str) -> None:
    namespace = "ctr-containers"
    for daemon in both:
        pulled(daemon, busybox, namespace)
    ours, theirs = (transcript(daemon, busybox, namespace) for daemon in both)
    assert [(o, t) for o, t in zip(ours, theirs, strict=True) if o != t] == []
    outcomes = {command: (code, stdout) for command, code, stdout, _ in ours}
    assert outcomes["containers ls -q"] == (0, "c1\nc2\n")
    assert outcomes["containers label c1 a="] == (0, "io.containerd.image.config.stop-signal=SIGTERM,tier=db\n")
    assert '"A=1"' in outcomes["containers info --spec c2"][1]


def test_a_namespace_holding_containers_cannot_be_removed(containerkitd: Any, busybox: str) -> None:
    namespace = "ctr-busy"
    pulled(containerkitd, busybox, namespace)
    ctr(containerkitd, "containers", "create", busybox, "c1", namespace=namespace)
    refused = ctr(containerkitd, "namespaces", "rm", namespace, check=False)
    assert refused.returncode == 1
    held = 'images, blobs, containers, snapshots on "overlayfs" snapshotter'  # containerd's words and order
    assert f'namespace "{namespace}" must be empty, but it still has {held}: failed precondition' in refused.stderr
    ctr(containerkitd, "containers", "rm", "c1", namespace=namespace)


class EventWatch:
    """An events client (``ctr events``, ``ckctl events``) running as ``argv``; its lines as they come."""

    def __init__(self, argv: Sequence[str]) -> None:
        self._process = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(line.rstrip("\n"))

    def next(self, timeout: float = EVENT_TIMEOUT) -> str:
        """The next line; queue.Empty after ``timeout`` seconds without one."""
        return self._lines.get(timeout=timeout)

    def drain(self, quiet: float = 0.3) -> None:
        """Forget the lines that come until none has come for ``quiet`` seconds."""
        with suppress(queue.Empty):
            while True:
                self.next(timeout=quiet)

    def stop(self) -> None:
        """Terminate the client by pid and wait for it."""
        self._process.terminate()
        self._process.wait(10)
        self._reader.join(10)


@contextmanager
def watching(argv: Sequence[str], probe: Callable[[], object]) -> Iterator[EventWatch]:
    """An :class:`EventWatch` of ``argv`` once it receives events: ``probe()`` (which must publish
    one it shows) is repeated until a line comes; the probes' lines are then drained."""
    watch = EventWatch(argv)
    try:
        deadline = time.monotonic() + EVENT_TIMEOUT
        while True:
            probe()
            try:
                watch.next(timeout=0.2)
                break
            except queue.Empty:
                assert time.monotonic() < deadline, "the events client never received anything"
        watch.drain()
        yield watch
    finally:
        watch.stop()


def event_lines(daemon: Any, ref: str, namespace: str) -> list[str]:
    """What ``ctr events`` shows (namespace, topic, event JSON) for a container's create, label and rm."""
    pulled(daemon, ref, namespace)
    argv = [CTR, "-a", str(daemon.address), "events", f"namespace=={namespace}"]
    with watching(argv, lambda: ctr(daemon, "namespaces", "label", namespace, "probe=1", namespace=namespace)) as watch:
        ctr(daemon, "containers", "create", ref, "evented", namespace=namespace)
        ctr(daemon, "containers", "label", "evented", "k=v", namespace=namespace)
        ctr(daemon, "containers", "rm", "evented", namespace=namespace)
        lines = []
        while not lines or "/containers/delete" not in lines[-1]:
            lines.append(watch.next())
    # ctr prints Go's time (2024-01-01 10:00:00.123456789 +0000 UTC) first
    return [line.split(" ", 4)[4] for line in lines]


def test_ctr_events_shows_the_lifecycle_of_a_container_as_containerd(both: tuple[Any, Any], busybox: str) -> None:
    namespace = "ctr-events"
    ours, theirs = (event_lines(daemon, busybox, namespace) for daemon in both)
    assert ours == theirs
    assert [line.split(" ")[1] for line in ours] == [
        "/snapshot/prepare",
        "/containers/create",
        "/containers/update",
        "/snapshot/remove",
        "/containers/delete",
    ]
