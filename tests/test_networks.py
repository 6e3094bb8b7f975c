"""The networks service (core.services.networks), ckctl networks and ckctl run --net, against real containers.

First the hooks in-process: the tasks service calls ``containerkit_task_prepare`` before the runtime's
create and ``containerkit_task_released`` after a task's delete or a failed create, and the networks
service's implementations make, attach and release a container's netns (with the bridge driver). Then a real
containerkitd with the bridge driver and runc: busybox containers (tests/oci_images.busybox_layer,
pushed to the interop registry) ping and ``nc`` each other on a network, the host reaches them
through the gateway, a container on another network cannot; attachments survive a daemon restart and
are released at start-up when the task died while the daemon was down; bad input gets clear errors.

Subnets are /24s in 10.240.0.0/12 with a random part, names carry a random suffix, and every test
checks that no bridge, veth or netns it made is left (``ip -o link``, ``ip netns``).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import RunningDaemon
from interop import _daemons, busybox_image, kill_leftovers, remove_namespace_dirs
from test_services_tasks import DEFAULT, SPEC, Served, runc_options
from test_services_tasks import served as served  # the fixture, shared

from core.api.containerd.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from core.config import GrpcConfig
from core.errors import NotFound, Unavailable
from core.hookspecs import hookimpl, new_plugin_manager
from core.metadata.containers import Container
from core.metadata.networks import NetworkStore
from core.netns import create_netns, delete_netns, netns_name, netns_path
from core.network import NetworkConfig
from core.server import new_server
from core.services.networks import NetworksService, network_namespace
from core.services.tasks import TasksService

LABEL = "containerkit.io/networks"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(t) is None for t in ("ctr", "runc", "docker-registry", "skopeo", "ip")),
    reason="needs root, runc, ip, Debian's ctr, docker-registry and skopeo",
)


def host_links() -> set[str]:
    """The names of the host's links (``ip -o link``; ``veth@peer`` as ``veth``)."""
    lines = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout.splitlines()
    return {line.split(":")[1].strip().split("@")[0] for line in lines}


def host_netns() -> set[str]:
    """The names ``ip netns`` lists."""
    lines = subprocess.run(["ip", "netns"], capture_output=True, text=True, check=True).stdout.splitlines()
    return {line.split()[0] for line in lines if line.strip()}


def subnets(count: int) -> list[str]:
    """``count`` consecutive /24s in 10.240.0.0/12, at a random place."""
    second, third = random.randrange(240, 256), random.randrange(0, 256 - count)
    return [f"10.{second}.{third + n}.0/24" for n in range(count)]


# -- the hooks, in-process -------------------------------------------------------------------------


class HookRecorder:
    """Records the task hooks' calls in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    @hookimpl
    def containerkit_task_prepare(self, namespace: str, container: Any, spec: Any) -> None:
        self.calls.append(("prepare", namespace, container.id))

    @hookimpl
    def containerkit_task_released(self, namespace: str, container_id: str) -> None:
        self.calls.append(("released", namespace, container_id))


def test_prepare_comes_before_the_runtime_create_and_released_after_delete_or_a_failed_create(served: Served) -> None:
    hooks = new_plugin_manager()
    recorder = HookRecorder()
    hooks.register(recorder)
    runtimes = {"io.containerd.runc.v2": served.runtime}
    service = TasksService(served.containers, served.snapshots, runtimes, served.recorder, hooks)
    server = new_server(GrpcConfig())
    service.register(server)
    server.add_insecure_port(f"unix:{served.directory / 'hooked'}")
    server.start()
    try:
        with grpc.insecure_channel(f"unix:{served.directory / 'hooked'}") as channel:
            stub = tasks_pb2_grpc.TasksStub(channel)
            served.container("ok")
            stub.Create(tasks_pb2.CreateTaskRequest(container_id="ok"), metadata=DEFAULT)
            assert recorder.calls == [("prepare", "default", "ok")]
            assert [request.id for request in served.runtime.created] == ["ok"]
            stub.Delete(tasks_pb2.DeleteTaskRequest(container_id="ok"), metadata=DEFAULT)
            assert recorder.calls[1:] == [("released", "default", "ok")]

            served.container("bad")  # the in-memory runtime refuses runc options it does not know
            with pytest.raises(grpc.RpcError, match="unsupported runc options"):
                request = tasks_pb2.CreateTaskRequest(container_id="bad", options=runc_options(criu_path="x"))
                stub.Create(request, metadata=DEFAULT)
            assert recorder.calls[2:] == [("prepare", "default", "bad"), ("released", "default", "bad")]
    finally:
        server.stop(None).wait()


def test_the_hooks_make_attach_and_release_a_containers_netns(served: Served, tmp_path: Path) -> None:
    from plugins.net_bridge import BridgeDriver

    driver = BridgeDriver(tmp_path / "bridge")
    service = NetworksService(
        NetworkStore(served.store), {"bridge": driver}, served.containers, served.service, served.recorder, "bridge"
    )
    big_subnet, tiny_subnet = subnets(2)
    big, tiny = f"n{uuid.uuid4().hex[:8]}", f"n{uuid.uuid4().hex[:8]}"
    service.create(NetworkConfig(big, "default", big_subnet))
    service.create(NetworkConfig(tiny, "default", tiny_subnet.replace(".0/24", ".0/30")))  # one container fits

    def container(id: str, networks: str) -> Container:
        spec, labels = json.loads(json.dumps(SPEC)), {LABEL: networks}
        service.containerkit_adjust_spec(spec=spec, namespace="default", container_id=id, labels=labels)
        assert network_namespace(spec) == {"type": "network", "path": netns_path("default", id)}
        return served.containers.create("default", Container(id, "io.containerd.runc.v2", spec=spec, labels=labels))

    try:
        with pytest.raises(NotFound, match='network "nowhere"'):
            container("h0", f"{big},nowhere")
        h1, h2 = container("h1", f"{big},{tiny}"), container("h2", f"{big},{tiny}")
        service.containerkit_task_prepare(namespace="default", container=h1, spec=h1.spec)
        attached = service.store.attachments("default", container_id="h1")
        assert [(a.network, a.ifname) for a in attached] == [(big, "eth0"), (tiny, "eth1")]
        assert netns_name("default", "h1") in host_netns()
        assert {i.name for i in driver.interfaces(netns_path("default", "h1"))} == {"lo", "eth0", "eth1"}

        with pytest.raises(Unavailable):  # the tiny network is full: h2's eth0 on the big one is undone
            service.containerkit_task_prepare(namespace="default", container=h2, spec=h2.spec)
        assert service.store.attachments("default", container_id="h2") == []
        assert netns_name("default", "h2") not in host_netns()

        service.containerkit_task_released(namespace="default", container_id="h1")
        service.containerkit_task_released(namespace="default", container_id="h1")  # idempotent
        assert service.store.attachments("default") == [] and netns_name("default", "h1") not in host_netns()
        topics = served.recorder.topics()
        assert topics[:2] == ["/networks/create"] * 2 and topics[-2:] == ["/networks/detach"] * 2
        assert topics.count("/networks/attach") == topics.count("/networks/detach") == 3
    finally:
        for name in (big, tiny):
            service.delete("default", name, force=True)
        driver.close()
    assert served.recorder.topics()[-2:] == ["/networks/delete"] * 2


# -- a real daemon ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busybox(registry: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    return busybox_image(registry, tmp_path_factory.mktemp("networks-images"))


class Place:
    """One test's daemon and namespace with the busybox image; remembers every name it made, for the
    leftover check."""

    def __init__(self, daemon: RunningDaemon, image: str) -> None:
        self.daemon, self.image = daemon, image
        self.namespace = f"net-{uuid.uuid4().hex[:8]}"
        self.containers: set[str] = set()
        self.links: set[str] = set()
        daemon.ctr("images", "pull", "--plain-http", image, namespace=self.namespace)

    def ck(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.daemon.ckctl(*args, check=check, namespace=self.namespace)

    def json(self, *args: str) -> Any:
        return json.loads(self.ck(*args, "--json").stdout)

    def network(self, subnet: str, *options: str) -> str:
        name = f"n{uuid.uuid4().hex[:8]}"
        self.ck("networks", "create", name, "--subnet", subnet, *options)
        self.links.add(json.loads(self.ck("networks", "inspect", name).stdout)["device"])
        return name

    def run(self, id: str, networks: list[str], *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        self.containers.add(id)
        nets = [arg for network in networks for arg in ("--net", network)]
        result = self.ck("run", "-d", *nets, self.image, id, *command, check=check)
        self.links.update(a["host_ifname"] for a in self.attachments(id))
        return result

    def attachments(self, container: str = "") -> list[dict[str, Any]]:
        return self.json("networks", "attachments", "--container", container)

    def address(self, container: str, network: str) -> str:
        (found,) = [a for a in self.attachments(container) if a["network"] == network]
        return str(found["addresses"][0].split("/")[0])

    def exec(self, container: str, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        exec_id = f"x{uuid.uuid4().hex[:8]}"
        return self.ck("tasks", "exec", "--exec-id", exec_id, container, *command, check=check)

    def reaches(self, source: str, address: str) -> bool:
        return self.exec(source, "ping", "-c", "1", "-W", "2", address, check=False).returncode == 0

    def fetch(self, source: str, address: str, port: int = 8080) -> str:
        return self.exec(source, "nc", "-w", "3", address, str(port), check=False).stdout.strip()

    def task_pid(self, container: str) -> int:
        return int(next(t["pid"] for t in self.json("tasks", "ls") if t["id"] == container))

    def remove_all(self) -> None:
        """Every container (with its task) and network of the place."""
        containers = self.ck("containers", "ls", "-q").stdout.split()
        if containers:
            self.ck("tasks", "rm", "-f", *containers, check=False)
            self.ck("containers", "rm", *containers)
        networks = self.ck("networks", "ls", "-q").stdout.split()
        if networks:
            self.ck("networks", "rm", "--force", *networks)

    def leftovers(self) -> set[str]:
        """The links and netns this place made that still exist."""
        made_netns = {netns_name(self.namespace, container) for container in self.containers}
        return (self.links & host_links()) | (made_netns & host_netns())


@pytest.fixture
def place(make_daemon: Any, busybox: str) -> Iterator[Place]:
    daemon: RunningDaemon = make_daemon()
    place = Place(daemon, busybox)
    try:
        yield place
        if daemon.process is not None:
            place.remove_all()
            assert place.leftovers() == set()
    finally:
        if daemon.process is not None:
            daemon.stop()
        kill_leftovers(daemon.dir)
        _daemons.unmount_under(daemon.dir)
        for name in {netns_name(place.namespace, container) for container in place.containers} & host_netns():
            delete_netns(name)
        remove_namespace_dirs(place.namespace)


def serve(reply: str) -> tuple[str, ...]:
    """A container's command: answer every connection on port 8080 with ``reply``."""
    return ("nc", "-ll", "-p", "8080", "-e", "/bin/echo", reply)


def test_containers_on_a_network_reach_each_other_and_the_host_but_not_another_network(place: Place) -> None:
    front_subnet, back_subnet = subnets(2)
    front, back = place.network(front_subnet), place.network(back_subnet, "--mtu", "1400")
    place.run("c1", [front], *serve("c1"))
    place.run("c2", [front], *serve("c2"))
    place.run("c3", [back], *serve("c3"))
    c1, c2, c3 = place.address("c1", front), place.address("c2", front), place.address("c3", back)

    assert place.reaches("c1", c2) and place.reaches("c2", c1)
    assert place.fetch("c1", c2) == "c2" and place.fetch("c2", c1) == "c1"
    assert not place.reaches("c3", c1) and not place.reaches("c1", c3)
    assert place.fetch("c3", c1) == ""
    with socket.create_connection((c1, 8080), timeout=5) as connection:  # the host, through the gateway
        assert connection.recv(64).strip() == b"c1"

    interfaces = {i["name"]: i for i in place.json("networks", "interfaces", "c3")}
    assert set(interfaces) == {"lo", "eth0"} and interfaces["eth0"]["mtu"] == 1400 and interfaces["eth0"]["up"]
    front_prefix, back_prefix = front_subnet[:-5], back_subnet[:-5]  # "10.x.y"
    place.ck("networks", "set-mtu", "c1", "eth0", "1280")
    place.ck("networks", "addr", "add", "c1", "eth0", f"{front_prefix}.200/24")
    inside = place.exec("c1", "ip", "addr", "show", "eth0").stdout
    assert "mtu 1280" in inside and f"{front_prefix}.200/24" in inside
    assert place.reaches("c2", f"{front_prefix}.200")
    place.ck("networks", "addr", "rm", "c1", "eth0", f"{front_prefix}.200/24")
    assert f"{front_prefix}.200/24" not in place.exec("c1", "ip", "addr", "show", "eth0").stdout

    place.ck("networks", "route", "add", "c1", "10.239.0.0/16", "--via", f"{front_prefix}.1")
    routes = [(r["destination"], r["gateway"]) for r in place.json("networks", "routes", "c1")]
    assert {("default", f"{front_prefix}.1"), ("10.239.0.0/16", f"{front_prefix}.1")} <= set(routes)
    assert "10.239.0.0/16 via" in place.exec("c1", "ip", "route").stdout
    place.ck("networks", "route", "rm", "c1", "10.239.0.0/16", "--via", f"{front_prefix}.1")
    assert "10.239.0.0/16" not in place.exec("c1", "ip", "route").stdout
    place.ck("networks", "link", "c2", "eth0", "down")
    assert not {i["name"]: i for i in place.json("networks", "interfaces", "c2")}["eth0"]["up"]
    place.ck("networks", "link", "c2", "eth0", "up")

    # a second network joined while running (at a fixed address), then left again
    place.ck("networks", "connect", back, "c1", "--ip", f"{back_prefix}.77")
    assert place.address("c1", back) == f"{back_prefix}.77"
    assert place.reaches("c1", c3) and place.fetch("c3", f"{back_prefix}.77") == "c1"
    assert {a["ifname"] for a in place.attachments("c1")} == {"eth0", "eth1"}
    place.links.update(a["host_ifname"] for a in place.attachments("c1"))
    place.ck("networks", "disconnect", back, "c1")
    assert not place.reaches("c1", c3)

    place.ck("tasks", "rm", "-f", "c1")
    assert place.attachments("c1") == [] and netns_name(place.namespace, "c1") not in host_netns()


def test_attachments_are_known_again_after_a_daemon_restart(place: Place) -> None:
    (subnet,) = subnets(1)
    network = place.network(subnet)
    place.run("c1", [network], *serve("c1"))
    place.run("c2", [network], *serve("c2"))
    before = place.attachments()
    place.daemon.restart()
    assert place.attachments() == before
    assert [n["name"] for n in place.json("networks", "ls")] == [network]
    assert place.fetch("c2", place.address("c1", network)) == "c1"
    with pytest.raises(AssertionError, match="in use by container\\(s\\) c1, c2"):
        place.ck("networks", "rm", network)


def test_a_task_that_ended_while_the_daemon_was_down_is_released_at_start_up(place: Place) -> None:
    (subnet,) = subnets(1)
    network = place.network(subnet)
    place.run("c1", [network], *serve("c1"))
    place.run("c2", [network], *serve("c2"))
    pid = place.task_pid("c1")
    shim = parent_of(pid)
    assert place.daemon.stop(signal.SIGKILL) != 0
    for victim in (pid, shim):  # the task ends, and so does its shim, while no daemon watches
        os.kill(victim, signal.SIGKILL)
    place.daemon.start()

    assert [a["container_id"] for a in place.attachments()] == ["c2"]
    assert netns_name(place.namespace, "c1") not in host_netns()
    assert netns_name(place.namespace, "c2") in host_netns()
    assert place.fetch("c2", place.address("c2", network)) == "c2"


def parent_of(pid: int) -> int:
    """The parent pid of ``pid`` (a container's init: its shim)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def test_leftovers_without_records_are_removed_at_start_up(place: Place) -> None:
    from plugins.net_bridge import BridgeDriver

    (kept, stray) = subnets(2)
    network = place.network(kept)
    place.run("c1", [network], "sleep", "600")
    place.containers.add("idle")
    place.daemon.ctr("containers", "create", place.image, "idle", namespace=place.namespace)
    place.daemon.stop()

    create_netns(netns_name(place.namespace, "idle"))  # a netns of one of our containers, but no record
    driver = BridgeDriver(place.daemon.root / "network.bridge")
    try:
        made = driver.create(NetworkConfig(f"s{uuid.uuid4().hex[:8]}", place.namespace, stray))
    finally:
        driver.close()
    place.links.add(made.device)
    assert made.device in host_links()
    place.daemon.start()

    assert netns_name(place.namespace, "idle") not in host_netns()
    assert made.device not in host_links()
    assert [a["container_id"] for a in place.attachments()] == ["c1"]  # the live task keeps its network


def test_the_label_works_from_ctr_and_a_failed_runtime_create_leaves_nothing(place: Place) -> None:
    (subnet,) = subnets(1)
    network = place.network(subnet)
    place.containers.update({"viactr", "broken"})
    ctr, labelled = place.daemon.ctr, ("--label", f"{LABEL}={network}")
    ctr("run", "-d", *labelled, place.image, "viactr", *serve("viactr"), namespace=place.namespace)
    assert place.fetch("viactr", place.address("viactr", network)) == "viactr"

    runc = ("--runc-binary", "/bin/false")
    failed = ctr("run", "-d", *runc, *labelled, place.image, "broken", "sh", check=False, namespace=place.namespace)
    assert failed.returncode != 0
    assert place.attachments("broken") == []
    assert netns_name(place.namespace, "broken") not in host_netns()
    spec = json.loads(place.ck("containers", "info", "--spec", "broken").stdout)
    assert {"type": "network", "path": netns_path(place.namespace, "broken")} in spec["linux"]["namespaces"]


def test_bad_input_gets_clear_errors_and_leaves_nothing_half_made(place: Place) -> None:
    main, other, tiny = subnets(3)
    tiny = tiny.replace(".0/24", ".0/30")  # room for the gateway and one container
    errors = {
        ("networks", "create", "bad", "--subnet", "10.240.0.1/33"): "invalid subnet",
        ("networks", "create", "bad", "--subnet", main.replace(".0/24", ".1/24")): "has host bits set",
        (
            "networks",
            "create",
            "bad",
            "--subnet",
            main,
            "--gateway",
            other.replace(".0/24", ".1"),
        ): "not a host address",
        ("networks", "create", "x" * 80, "--subnet", main): "greater than maximum length",
        ("networks", "create", "bad", "--subnet", main, "--mtu", "20"): "out of range",
        ("networks", "create", "bad", "--subnet", main, "--driver", "nope"): 'network driver "nope" is not loaded',
    }
    for args, message in errors.items():
        result = place.ck(*args, check=False)
        assert result.returncode == 1 and message in result.stderr, (args, result.stderr)
    network = place.network(main)
    overlap = place.ck("networks", "create", "bad", "--subnet", main.replace(".0/24", ".128/25"), check=False)
    assert "overlaps" in overlap.stderr and "(failed precondition)" in overlap.stderr
    assert place.ck("networks", "create", network, "--subnet", other, check=False).stderr.endswith("(already exists)\n")
    assert [n["name"] for n in place.json("networks", "ls")] == [network]

    unknown = place.ck("run", "-d", "--net", "nowhere", place.image, "c0", "sleep", "60", check=False)
    assert unknown.returncode == 1 and 'network "nowhere"' in unknown.stderr and "(not found)" in unknown.stderr

    place.run("c1", [network], "sleep", "600")
    twice = place.ck("networks", "connect", network, "c1", check=False)
    assert "already attached" in twice.stderr and "(already exists)" in twice.stderr
    in_use = place.ck("networks", "rm", network, check=False)
    assert "in use by container(s) c1" in in_use.stderr and "(failed precondition)" in in_use.stderr
    place.containers.add("idle")
    place.daemon.ctr("containers", "create", place.image, "idle", namespace=place.namespace)
    no_netns = place.ck("networks", "connect", network, "idle", check=False)
    assert "has no running task" in no_netns.stderr and "(failed precondition)" in no_netns.stderr

    small = place.network(tiny)
    place.run("t1", [small], "sleep", "600")
    exhausted = place.run("t2", [small], "sleep", "600", check=False)
    assert exhausted.returncode == 1 and "(unavailable)" in exhausted.stderr, exhausted.stderr
    assert place.attachments("t2") == [] and netns_name(place.namespace, "t2") not in host_netns()

    delete_netns(netns_name(place.namespace, "c1"))  # the netns vanishes underneath
    vanished = place.ck("networks", "connect", small, "c1", check=False)
    assert "has vanished" in vanished.stderr and "(not found)" in vanished.stderr
    place.ck("tasks", "rm", "-f", "c1")
    assert place.attachments("c1") == []

    forced = place.ck("networks", "rm", "--force", small)
    assert forced.returncode == 0 and place.attachments() == []


def test_a_networked_container_runs_attached_with_rm(place: Place) -> None:
    (subnet,) = subnets(1)
    network = place.network(subnet)
    place.containers.add("once")
    result = place.ck("run", "--rm", "--net", network, place.image, "once", "ip", "-o", "-4", "addr", "show", "eth0")
    assert subnet.rsplit(".", 1)[0] in result.stdout
    assert place.attachments() == [] and netns_name(place.namespace, "once") not in host_netns()
