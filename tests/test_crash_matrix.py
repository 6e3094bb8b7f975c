"""The crash matrix: containerkitd SIGKILLed at each crash point (core/crashpoints.py), restarted, checked.

For every point a daemon of its own is started with ``CONTAINERKIT_CRASH_AT=<point>``, the operation that
passes the point is driven with ckctl (a pull from the session registry, ``ckctl run``, a volume create)
until the daemon dies by SIGKILL there; it is restarted without the variable and must hold:

- every sqlite database under its root passes ``PRAGMA integrity_check``;
- every blob file in the content store hashes to its name (no partial blob is visible);
- mounts, netns, veths, shims and cgroups exist exactly for the tasks the daemon lists as live;
- after a garbage collection, the blobs on disk are exactly those the namespace lists (a blob whose
  record the crash prevented is collected) and every ingest on disk is listed as active;
- the interrupted operation, retried (after removing what a half-done ``ckctl run`` made, as a user
  would), succeeds, resuming from what the crashed one kept under its lease;
- the leases the interrupted operation left all expire (``containerd.io/gc.expire``); once they are gone
  (as their expiry would), a garbage collection leaves no blob, ingest or snapshot that nothing
  references, and no snapshot directory on disk without its record;
- a container running before the crash is still RUNNING and managed (kill and wait work).

Each case records one fault injected (contained when every check held) in the robustness tally.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from interop import (
    _daemons,
    busybox_image,
    collect_garbage,
    ctr,
    kill_leftovers,
    processes_naming,
    remove_containers,
    remove_namespace_dirs,
)

from core.crashpoints import NAMES
from core.netns import delete_netns, list_netns, netns_name
from plugins.net_bridge.driver import veth_name

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0
        or any(shutil.which(tool) is None for tool in ("ctr", "runc", "docker-registry", "skopeo", "ip")),
        reason="needs root, runc, ip, Debian's ctr, docker-registry and skopeo",
    ),
]

NETWORK = "crashnet"
SUBNET = "10.247.{}.0/24"
DEATH_TIMEOUT_S = 60.0
GC_EXPIRE = "containerd.io/gc.expire"
CGROUPS = Path("/sys/fs/cgroup")


@pytest.fixture(scope="module")
def busybox(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox image's reference in the session registry (shared by every case)."""
    return busybox_image(registry, tmp_path_factory.mktemp("busybox"))


@dataclass
class Case:
    """A daemon crashed at ``point`` in namespace ``ns``: the containers ``live`` that must survive it."""

    point: str
    daemon: Any
    ns: str
    image: str
    live: list[str] = field(default_factory=list)
    networked: bool = False

    def ckctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.daemon.ckctl(*args, check=check, namespace=self.ns)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ctr`` in the case's namespace (for listings: it starts in milliseconds, ckctl in a second)."""
        return ctr(self.daemon, *args, check=check, namespace=self.ns)

    def ids(self, *args: str) -> set[str]:
        """The ids ``ctr ARGS -q`` lists."""
        return set(self.ctr(*args, "-q").stdout.split())

    def rows(self, *args: str) -> list[list[str]]:
        """The rows (split in words) of the table ``ctr ARGS`` prints, without the header."""
        return [line.split() for line in self.ctr(*args).stdout.splitlines()[1:]]

    def run(self, id: str, *, attached: bool = False) -> subprocess.CompletedProcess[str]:
        """``ckctl run`` a container on the network: detached running ``sleep``, or attached running ``true``
        with ``--rm``."""
        command = ["--rm", self.image, id, "true"] if attached else ["-d", self.image, id, "sleep", "600"]
        return self.ckctl("run", "--net", NETWORK, *command, check=False)

    def tasks(self) -> dict[str, str]:
        """``ctr tasks ls`` as {task: STATUS}."""
        return {row[0]: row[2] for row in self.rows("tasks", "ls")}


# -- what each point's operation is ------------------------------------------------------------------------


def setup_running(case: Case) -> None:
    """The image pulled, a network made and a container ``keeper`` running on it before the crash."""
    assert pull(case).returncode == 0
    case.ckctl("networks", "create", NETWORK, "--subnet", SUBNET.format(NAMES.index(case.point)))
    case.networked = True
    assert case.run("keeper").returncode == 0
    case.live.append("keeper")


def nothing(case: Case) -> None:
    """No set-up: a fresh daemon."""


def pull(case: Case) -> subprocess.CompletedProcess[str]:
    """``ckctl images pull`` the busybox image (the daemon's own pull: fetch, unpack, image create)."""
    return case.ckctl("images", "pull", "--plain-http", case.image, check=False)


def run_detached(case: Case) -> subprocess.CompletedProcess[str]:
    return case.run("victim")


def run_removed(case: Case) -> subprocess.CompletedProcess[str]:
    return case.run("victim", attached=True)


def create_volume(case: Case) -> subprocess.CompletedProcess[str]:
    return case.ckctl("volumes", "create", "vol", check=False)


def pulled(case: Case) -> None:
    assert case.ids("images", "ls") == {case.image}
    assert [row[-1] for row in case.rows("snapshots", "ls")].count("Committed") == 1  # busybox: one layer


def victim_running(case: Case) -> None:
    assert case.tasks()["victim"] == "RUNNING"
    case.live.append("victim")


def victim_gone(case: Case) -> None:
    assert "victim" not in case.ids("containers", "ls")


def volume_made(case: Case) -> None:
    [volume] = case.daemon.ckctl_json("volumes", "ls", namespace=case.ns)
    assert volume["name"] == "vol" and Path(volume["mountpoint"]).is_dir()


@dataclass(frozen=True)
class Point:
    """How to reach a crash point: ``setup`` before, ``operation`` (the one crashed and retried), and
    ``retried`` checking the retry's outcome; the setup passes the point ``after - 1`` times."""

    setup: Callable[[Case], None]
    operation: Callable[[Case], subprocess.CompletedProcess[str]]
    retried: Callable[[Case], None]
    after: int = 1


POINTS = {
    "content.commit.before-rename": Point(nothing, pull, pulled, after=3),
    "content.commit.after-rename": Point(nothing, pull, pulled, after=3),
    "unpack.layer.applied": Point(nothing, pull, pulled),
    "unpack.before-gc-label": Point(nothing, pull, pulled),
    "pull.before-image-create": Point(nothing, pull, pulled),
    "containers.create.before-commit": Point(setup_running, run_detached, victim_running, after=2),
    "tasks.create.after-shim": Point(setup_running, run_detached, victim_running, after=2),
    "tasks.start.before-runc-start": Point(setup_running, run_detached, victim_running, after=2),
    "tasks.delete.after-runc-delete": Point(setup_running, run_removed, victim_gone),
    "networks.attach.after-veth": Point(setup_running, run_detached, victim_running, after=2),
    "volumes.create": Point(nothing, create_volume, volume_made),
}


def test_every_crash_point_is_in_the_matrix() -> None:
    assert sorted(POINTS) == sorted(NAMES)


@pytest.mark.parametrize(
    ("env", "printed", "code"),
    [
        ({}, "1 2 3", 0),
        ({"CONTAINERKIT_CRASH_AT": "other"}, "1 2 3", 0),
        ({"CONTAINERKIT_CRASH_AT": "here"}, "", -9),
        ({"CONTAINERKIT_CRASH_AT": "here", "CONTAINERKIT_CRASH_AFTER": "3"}, "1 2", -9),
    ],
)
def test_crashpoint_kills_at_the_chosen_hit_only(env: dict[str, str], printed: str, code: int) -> None:
    """A process armed at ``here`` (on the N-th hit) dies by SIGKILL there; otherwise nothing happens."""
    program = (
        "from core.crashpoints import crashpoint\nfor n in (1, 2, 3):\n    crashpoint('here')\n    print(n, flush=True)"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERKIT_CRASH")} | env
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environment)
    assert (done.stdout.split(), done.returncode) == (printed.split(), code)


# -- the invariants ----------------------------------------------------------------------------------------


def check_databases(root: Path) -> None:
    """Every sqlite database under ``root`` passes ``PRAGMA integrity_check``."""
    databases = [path for path in root.rglob("*.db") if path.read_bytes()[:16] == b"SQLite format 3\x00"]
    assert databases
    for path in databases:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], path


def check_blobs(root: Path) -> None:
    """Every committed blob file hashes to its name."""
    for blob in root.rglob("blobs/sha256/*"):
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"partial blob {blob}"


def drop_leftover_leases(case: Case) -> None:
    """The leases the interrupted operation left expire; remove them (as expiry would) and collect."""
    leases = case.rows("leases", "ls")
    for lease in leases:
        assert GC_EXPIRE in " ".join(lease), f"lease {lease[0]} left behind never expires"
    if leases:
        case.ctr("leases", "rm", *(lease[0] for lease in leases))
    collect_garbage(case.daemon, case.ns)


def check_content(case: Case) -> None:
    """The blobs on disk are exactly those the namespace's content lists (after a collection), and no
    ingest is left that ``content active`` does not show."""
    on_disk = {f"sha256:{blob.name}" for blob in case.daemon.root.rglob("blobs/sha256/*")}
    assert on_disk == {row[0] for row in case.rows("content", "ls")}, on_disk
    ingests = [path for path in case.daemon.root.rglob("ingest/*") if path.is_dir()]
    assert len(ingests) == len(case.rows("content", "active")), ingests


def check_snapshots(case: Case) -> None:
    """Active snapshots are containers' rootfs, committed ones an image's layers; none else on disk."""
    containers = case.ids("containers", "ls")
    snapshots = case.rows("snapshots", "ls")
    active = {row[0] for row in snapshots if row[-1] == "Active"}
    committed = [row[0] for row in snapshots if row[-1] == "Committed"]
    assert active <= containers, f"orphaned active snapshots {active - containers}"
    assert len(committed) == (1 if case.ids("images", "ls") else 0), committed
    [store] = case.daemon.root.glob("*overlay*/snapshots")
    assert len(list(store.iterdir())) == len(snapshots), sorted(os.listdir(store))


def check_host(case: Case) -> None:
    """Mounts, netns, veths, shims and cgroups exist exactly for the live tasks."""
    live = {id for id, status in case.tasks().items() if status != "STOPPED"}
    candidates = case.ids("containers", "ls") | {"keeper", "victim"}
    mounts = {point for point in _daemons.mount_points() if point.startswith(str(case.daemon.dir))}
    assert {Path(point).parent.name for point in mounts} == live, mounts
    assert all(point.endswith("/rootfs") for point in mounts), mounts
    netns = {netns_name(case.ns, id) for id in candidates} & set(list_netns())
    assert netns == {netns_name(case.ns, id) for id in live}, netns
    links = host_links()
    assert {id for id in candidates if veth_name(case.ns, NETWORK, id) in links} == live
    shims = [pid for pid in processes_naming(str(case.daemon.state)) if pid != case.daemon.process.pid]
    assert len(shims) == len(case.tasks()), shims
    cgroups = {path.name for path in CGROUPS.glob(f"*/{case.ns}/*") if path.is_dir()}
    assert cgroups <= live, cgroups


def host_links() -> set[str]:
    lines = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout.splitlines()
    return {line.split(":")[1].strip().split("@")[0] for line in lines}


def check_managed(case: Case) -> None:
    """The containers running before the crash still run, and kill + wait work on them."""
    tasks = case.tasks()
    for id in case.live:
        assert tasks[id] == "RUNNING", tasks
    for id in case.live:
        case.ctr("tasks", "kill", "-s", "KILL", id)
        case.ctr("tasks", "rm", "-f", id)
        assert id not in case.tasks()


def remove_half_made(case: Case) -> None:
    """What the interrupted ``ckctl run`` made removed, as a user would before running it again: the
    container with its task and snapshot, or the snapshot it prepared for a container never made."""
    if "victim" in case.ids("containers", "ls"):
        case.ctr("tasks", "rm", "-f", "victim", check=False)
        case.ctr("containers", "rm", "victim")
    elif any(row[0] == "victim" for row in case.rows("snapshots", "ls")):
        case.ctr("snapshots", "rm", "victim")


# -- the matrix --------------------------------------------------------------------------------------------


@pytest.fixture
def case(request: pytest.FixtureRequest, make_daemon: Any, busybox: str) -> Iterator[Case]:
    """A daemon of its own armed at the point; afterwards its containers, network, shims, mounts, netns
    and cgroups are removed (by pid, by name)."""
    point: str = request.param
    daemon = make_daemon(start=False)
    ns = "crash-" + point.replace(".", "-")
    crashed = Case(point, daemon, ns, busybox)
    try:
        yield crashed
    finally:
        if crashed.networked and (daemon.process is None or daemon.process.poll() is not None):
            daemon.process = None
            with suppress(AssertionError):
                daemon.start()  # unarmed, to remove the network's bridge and veths
        if daemon.process is not None and daemon.process.poll() is None:
            if crashed.networked:
                with suppress(AssertionError):
                    remove_containers(daemon, ns)
                daemon.ckctl("networks", "rm", NETWORK, check=False, namespace=ns)
            daemon.stop()
        kill_leftovers(daemon.dir)
        for id in ("keeper", "victim"):
            with suppress(OSError):
                delete_netns(netns_name(ns, id))
        remove_namespace_dirs(ns)


@pytest.mark.parametrize("case", sorted(POINTS), indirect=True)
def test_crash_at(case: Case, robustness: Any) -> None:
    """Killed at the point, restarted: every invariant holds and the operation retried succeeds."""
    point = POINTS[case.point]
    contained = 0
    try:
        armed = {"CONTAINERKIT_CRASH_AT": case.point, "CONTAINERKIT_CRASH_AFTER": str(point.after)}
        with mock.patch.dict(os.environ, armed):
            case.daemon.start()
        point.setup(case)
        point.operation(case)
        assert case.daemon.process.wait(DEATH_TIMEOUT_S) == -9, case.daemon.log
        case.daemon.process = None
        case.daemon.start()
        check_databases(case.daemon.root)
        check_blobs(case.daemon.root)
        check_host(case)
        collect_garbage(case.daemon, case.ns)
        check_content(case)
        remove_half_made(case)
        retry = point.operation(case)
        assert retry.returncode == 0, retry.stderr
        point.retried(case)
        drop_leftover_leases(case)
        check_content(case)
        check_snapshots(case)
        check_host(case)
        check_managed(case)
        contained = 1
    finally:
        robustness.record("faults injected", 1, contained)
