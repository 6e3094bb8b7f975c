"""The bridge network driver (plugins/net_bridge) on the real host: bridges, veths, addresses, routes.

Every test makes its own netns (``hnet-...``), networks with unique names in random subnets of
10.240.0.0/12 and a driver whose bridges are named ``hnt-...``; traffic is busybox ``ping`` and ``nc``
between those netns and the host's end of the bridges. An autouse fixture compares ``ip -o link`` and
``ip netns`` before and after each test: nothing a test made may remain.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from socket import AF_INET
from typing import Any

import pytest
from netns_traffic import (
    TEST_SUPERNET,
    NetnsPool,
    host_links,
    ip_lines,
    made_netns,
    nc_roundtrip,
    netns_pool,
    ping,
    random_subnet,
    unique,
)
from pyroute2 import IPRoute

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from core.metadata import MetadataStore
from core.network import Attachment, Network, NetworkConfig, NetworkDriver, Route
from plugins.net_bridge import AddressAllocator, BridgeDriver, check_netlink
from plugins.net_bridge.driver import veth_name
from plugins.net_bridge.netlink import MAIN_TABLE

PREFIX = "hnt-"
NAMESPACE = "default"


class TrackedDriver(BridgeDriver):
    """A BridgeDriver that remembers every host veth name an attach may have made, to check leftovers."""

    veths: set[str]

    def attach(self, network: Network, container_id: str, *args: Any, **kwargs: Any) -> Attachment:
        self.veths.add(veth_name(network.namespace, network.name, container_id))
        return super().attach(network, container_id, *args, **kwargs)


def open_driver(root: Path, veths: set[str], **options: Any) -> TrackedDriver:
    driver = TrackedDriver(root, bridge_prefix=PREFIX, **options)
    driver.veths = veths
    return driver


def clean_up(driver: BridgeDriver) -> None:
    """Detach everything and delete every network of ``driver``, then close it."""
    for network in driver.networks():
        for attachment in driver.attachments(network):
            driver.detach(network, attachment.container_id, attachment.netns_path)
        driver.delete(network)
    driver.close()


@pytest.fixture
def veths() -> set[str]:
    return set()


@pytest.fixture(autouse=True)
def no_leftovers(veths: set[str]) -> Iterator[None]:
    """Nothing this test made (bridges ``hnt-*``, the veths of its attaches, netns ``hnet-*``) remains."""
    links_before, netns_before = host_links(), made_netns()
    yield
    new_links = host_links() - links_before
    assert {name for name in new_links if name.startswith(PREFIX) or name in veths} == set()
    assert made_netns() - netns_before == set()


@pytest.fixture
def driver(tmp_path: Path, veths: set[str]) -> Iterator[TrackedDriver]:
    opened = open_driver(tmp_path / "bridge", veths)
    try:
        yield opened
    finally:
        clean_up(opened)


@pytest.fixture
def netns() -> Iterator[NetnsPool]:
    with netns_pool() as pool:
        yield pool


def make_network(driver: BridgeDriver, prefixlen: int = 24, **fields: Any) -> Network:
    """A network with a unique name in a random free subnet (another test may hold the first pick)."""
    for _ in range(10):
        try:
            return driver.create(NetworkConfig(unique("net-"), NAMESPACE, random_subnet(prefixlen), **fields))
        except FailedPrecondition:
            continue
    raise AssertionError("no free random subnet in 10.240.0.0/12")


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def ip_of(attachment: Attachment) -> str:
    return attachment.addresses[0].split("/")[0]


# -- traffic ------------------------------------------------------------------------------------


def test_two_containers_reach_each_other_with_ping_and_nc_both_ways(driver: TrackedDriver, netns: NetnsPool):
    network = make_network(driver)
    a, b = netns.new(), netns.new()
    att_a = driver.attach(network, "a", netns.path(a))
    att_b = driver.attach(network, "b", netns.path(b))
    assert att_a.addresses != att_b.addresses
    assert ping(a, ip_of(att_b)) and ping(b, ip_of(att_a))
    assert nc_roundtrip(b, a, ip_of(att_b), 7101).startswith("hello-")
    assert nc_roundtrip(a, b, ip_of(att_a), 7102).startswith("hello-")


def test_inside_the_container_eth0_has_address_mtu_default_route_and_lo(driver: TrackedDriver, netns: NetnsPool):
    network = make_network(driver, mtu=1400)
    name = netns.new()
    attachment = driver.attach(network, "c", netns.path(name))
    assert attachment.ifname == "eth0" and attachment.mtu == 1400 and attachment.gateway == network.gateway
    assert len(attachment.host_ifname) <= 15 and len(network.device) <= 15
    links = ip_lines(name, "link")
    assert "eth0" in links and "mtu 1400" in links and attachment.mac in links
    assert f"inet {attachment.addresses[0]}" in ip_lines(name, "addr", "show", "eth0")
    assert f"default via {network.gateway} dev eth0" in ip_lines(name, "route")
    assert "LOOPBACK,UP" in ip_lines(name, "link", "show", "lo")
    assert ping(name, "127.0.0.1")
    host_side = ip_lines(None, "link", "show", attachment.host_ifname)
    assert f"master {network.device}" in host_side and "mtu 1400" in host_side
    assert f"inet {network.gateway}/24" in ip_lines(None, "addr", "show", network.device)


def test_a_container_on_another_network_cannot_reach_them(driver: TrackedDriver, netns: NetnsPool):
    front, back = make_network(driver), make_network(driver)
    for bridge in (front.device, back.device):  # isolated also where the host forwards: never routed from a bridge
        assert Path(f"/proc/sys/net/ipv4/conf/{bridge}/forwarding").read_text().strip() == "0"
    a, b, other = netns.new(), netns.new(), netns.new()
    att_a = driver.attach(front, "a", netns.path(a))
    driver.attach(front, "b", netns.path(b))
    att_other = driver.attach(back, "other", netns.path(other))
    assert ping(other, back.gateway)  # its own network works
    assert not ping(other, ip_of(att_a), attempts=1)
    assert not ping(a, ip_of(att_other), attempts=1)
    assert nc_roundtrip(a, other, ip_of(att_a), 7103, attempts=1) == ""


def test_the_host_reaches_a_container_through_the_gateway(driver: TrackedDriver, netns: NetnsPool):
    network = make_network(driver)
    name = netns.new()
    attachment = driver.attach(network, "c", netns.path(name))
    assert f"dev {network.device}" in ip_lines(None, "route", "get", ip_of(attachment))
    assert ping(None, ip_of(attachment))
    assert ping(name, network.gateway)
    assert nc_roundtrip(name, None, ip_of(attachment), 7104).startswith("hello-")


def test_hairpin_mode_is_set_on_ports_when_configured(tmp_path: Path, veths: set[str], netns: NetnsPool):
    driver = open_driver(tmp_path / "bridge", veths, hairpin=True)
    try:
        attachment = driver.attach(make_network(driver), "c", netns.path(netns.new()))
        assert "hairpin on" in ip_lines(None, "-d", "link", "show", attachment.host_ifname)
    finally:
        clean_up(driver)


# -- interface management ------------------------------------------------------------------------


def test_mtu_link_state_address_and_route_changes_are_visible_inside(driver: TrackedDriver, netns: NetnsPool):
    network = make_network(driver)
    name = netns.new()
    path = netns.path(name)
    driver.attach(network, "c", path)

    driver.set_mtu(path, "eth0", 1280)
    assert "mtu 1280" in ip_lines(name, "link", "show", "eth0")
    assert {i.name: i.mtu for i in driver.interfaces(path)}["eth0"] == 1280

    extra = str(ipaddress.IPv4Network(network.subnet)[200]) + "/24"
    driver.add_address(path, "eth0", extra)
    assert f"inet {extra}" in ip_lines(name, "addr", "show", "eth0")
    assert extra in {i.name: i.addresses for i in driver.interfaces(path)}["eth0"]
    with pytest.raises(AlreadyExists):
        driver.add_address(path, "eth0", extra)
    driver.remove_address(path, "eth0", extra)
    assert f"inet {extra}" not in ip_lines(name, "addr", "show", "eth0")
    with pytest.raises(NotFound):
        driver.remove_address(path, "eth0", extra)

    route = Route("10.255.255.0/24", network.gateway, "eth0", 7)
    driver.add_route(path, route)
    assert f"10.255.255.0/24 via {network.gateway} dev eth0 proto static metric 7" in ip_lines(name, "route")
    assert route in driver.routes(path)
    with pytest.raises(AlreadyExists):
        driver.add_route(path, route)
    driver.remove_route(path, route)
    assert "10.255.255.0/24" not in ip_lines(name, "route")
    with pytest.raises(NotFound):
        driver.remove_route(path, route)
    assert Route("default", network.gateway, "eth0", 0) in driver.routes(path)

    driver.set_down(path, "eth0")
    assert not {i.name: i.up for i in driver.interfaces(path)}["eth0"]
    assert ",UP" not in ip_lines(name, "link", "show", "eth0")
    driver.set_up(path, "eth0")
    driver.set_up(path, "eth0")  # a no-op
    assert {i.name: i.up for i in driver.interfaces(path)}["eth0"]
    driver.add_route(path, Route("default", network.gateway, "eth0", 0))  # went with the link
    assert ping(name, network.gateway)


def test_interface_management_rejects_bad_input(driver: TrackedDriver, netns: NetnsPool, tmp_path: Path):
    network = make_network(driver)
    path = netns.path(netns.new())
    driver.attach(network, "c", path)
    missing = netns.path(unique("hnet-missing-"))
    for call in (driver.interfaces, driver.routes):
        with pytest.raises(NotFound):
            call(missing)
    not_netns = tmp_path / "plain-file"
    not_netns.write_text("")
    with pytest.raises(InvalidArgument, match="not a network namespace"):
        driver.interfaces(str(not_netns))
    with pytest.raises(NotFound):
        driver.set_mtu(path, "eth9", 1400)
    for mtu in (0, 67, 65536):
        with pytest.raises(InvalidArgument):
            driver.set_mtu(path, "eth0", mtu)
    with pytest.raises(InvalidArgument):
        driver.add_address(path, "eth0", "10.240.0.5")  # not CIDR
    with pytest.raises(InvalidArgument):
        driver.add_address(path, "eth0", "10.240.0.300/24")
    with pytest.raises(FailedPrecondition):
        driver.add_route(path, Route("10.254.0.0/16", "192.168.254.1", "", 0))  # gateway not on a link
    with pytest.raises(NotFound):
        driver.add_route(path, Route("10.254.0.0/16", network.gateway, "eth9", 0))
    with pytest.raises(InvalidArgument):
        driver.add_route(path, Route("10.254.0.1/16", network.gateway))


# -- bad input to networks and attachments --------------------------------------------------------


@pytest.mark.parametrize(
    "subnet", ["", "nonsense", "10.240.0.0/33", "10.240.1.1/24", "10.240.0.0/31", "fd00:ab::/64", "10.240.0.0"]
)
def test_invalid_subnets_are_refused(driver: TrackedDriver, subnet: str):
    with pytest.raises(InvalidArgument):
        driver.create(NetworkConfig(unique("net-"), NAMESPACE, subnet))
    assert driver.networks() == []


def test_overlapping_subnets_are_refused(driver: TrackedDriver):
    network = make_network(driver, prefixlen=24)
    inner = str(next(ipaddress.IPv4Network(network.subnet).subnets(new_prefix=25)))
    with pytest.raises(FailedPrecondition, match=network.name):
        driver.create(NetworkConfig(unique("net-"), "other-namespace", inner))
    outer = str(ipaddress.IPv4Network(network.subnet).supernet(new_prefix=20))
    with pytest.raises(FailedPrecondition):
        driver.create(NetworkConfig(unique("net-"), NAMESPACE, outer))
    with IPRoute() as ipr:
        routes = [f"{r.get_attr('RTA_DST')}/{r['dst_len']}" for r in ipr.get_routes(family=AF_INET, table=MAIN_TABLE)]
    host_routes = [r for r in routes if not r.endswith("/0") and not TEST_SUPERNET.overlaps(ipaddress.IPv4Network(r))]
    if host_routes:  # e.g. the subnet of the host's own eth0
        taken = host_routes[0]
        with pytest.raises(FailedPrecondition, match="host route"):
            driver.create(NetworkConfig(unique("net-"), NAMESPACE, taken))
    assert [n.name for n in driver.networks()] == [network.name]


def test_gateways_outside_the_subnet_and_other_bad_configs_are_refused(driver: TrackedDriver):
    subnet = ipaddress.IPv4Network(random_subnet())
    bad: list[tuple[dict[str, Any], str]] = [
        ({"gateway": str(subnet.network_address + 256)}, "not a host address"),
        ({"gateway": str(subnet.network_address)}, "not a host address"),
        ({"gateway": str(subnet.broadcast_address)}, "not a host address"),
        ({"gateway": "gateway"}, "invalid gateway"),
        ({"mtu": 67}, "MTU"),
        ({"mtu": 70000}, "MTU"),
        ({"options": {"isolate": "yes"}}, "unknown option"),
    ]
    for fields, message in bad:
        with pytest.raises(InvalidArgument, match=message):
            driver.create(NetworkConfig(unique("net-"), NAMESPACE, str(subnet), **fields))
    for name, namespace in (("n" * 77, NAMESPACE), ("bad/name", NAMESPACE), ("", NAMESPACE), ("ok", "bad ns")):
        with pytest.raises(InvalidArgument):
            driver.create(NetworkConfig(name, namespace, str(subnet)))
    assert driver.networks() == []
    assert driver.create(NetworkConfig("n" * 76, NAMESPACE, str(subnet), gateway=str(subnet[9]))).gateway == str(
        subnet[9]
    )


def test_too_long_names_and_prefixes_are_refused(driver: TrackedDriver, netns: NetnsPool, tmp_path: Path):
    network = make_network(driver)
    path = netns.path(netns.new())
    for ifname in ("eth0123456789012", "", "eth/0", "eth 0"):
        with pytest.raises(InvalidArgument):
            driver.attach(network, "c", path, ifname=ifname)
    with pytest.raises(InvalidArgument):
        driver.attach(network, "c" * 77, path)
    with pytest.raises(InvalidArgument, match="prefix"):
        BridgeDriver(tmp_path / "other", bridge_prefix="toolong")
    assert driver.attach(network, "c", path, ifname="e" * 15).ifname == "e" * 15


def test_attaching_twice_and_duplicates_are_refused_and_leave_nothing(driver: TrackedDriver, netns: NetnsPool):
    network, second = make_network(driver), make_network(driver)
    name, other = netns.new(), netns.new()
    first = driver.attach(network, "c", netns.path(name))
    with pytest.raises(AlreadyExists, match="attached"):
        driver.attach(network, "c", netns.path(other))
    with pytest.raises(AlreadyExists, match="in use"):
        driver.attach(network, "d", netns.path(other), address=first.addresses[0])
    with pytest.raises(AlreadyExists, match="in use"):
        driver.attach(network, "d", netns.path(other), address=network.gateway)
    with pytest.raises(AlreadyExists, match="eth0 exists"):
        driver.attach(second, "c", netns.path(name))  # eth0 taken by the first network
    assert veth_name(NAMESPACE, second.name, "c") not in host_links()
    assert driver.attachments(second) == []
    assert [a.container_id for a in driver.attachments(network)] == ["c"]
    assert ping(name, network.gateway)
    # the failed attach released its address: the next one gets the same
    on_second = driver.attach(second, "d", netns.path(other))
    assert on_second.addresses == (str(ipaddress.IPv4Network(second.subnet)[2]) + "/24",)
    eth1 = driver.attach(second, "c", netns.path(name), ifname="eth1")
    assert (eth1.ifname, eth1.gateway) == ("eth1", "")  # the first network keeps the default route
    assert f"default via {network.gateway} dev eth0" in ip_lines(name, "route")
    assert ping(name, ip_of(on_second))


def test_addresses_given_are_checked_against_the_subnet(driver: TrackedDriver, netns: NetnsPool):
    network = make_network(driver)
    subnet = ipaddress.IPv4Network(network.subnet)
    path = netns.path(netns.new())
    for address in (str(subnet.network_address + 300), f"{subnet[9]}/16", str(subnet.broadcast_address), "x"):
        with pytest.raises(InvalidArgument):
            driver.attach(network, "c", path, address=address)
    assert driver.attach(network, "c", path, address=f"{subnet[9]}/24").addresses == (f"{subnet[9]}/24",)
    assert driver.attach(network, "d", netns.path(netns.new()), address=str(subnet[10])).addresses == (
        f"{subnet[10]}/24",
    )


def test_unknown_networks_and_missing_netns_are_not_found(driver: TrackedDriver, netns: NetnsPool):
    ghost = Network(unique("ghost-"), NAMESPACE, "10.240.0.0/24", "10.240.0.1", 1500)
    path = netns.path(netns.new())
    for call in (
        lambda: driver.attach(ghost, "c", path),
        lambda: driver.detach(ghost, "c", path),
        lambda: driver.attachments(ghost),
        lambda: driver.delete(ghost),
    ):
        with pytest.raises(NotFound):
            call()
    network = make_network(driver)
    with pytest.raises(NotFound, match="netns"):
        driver.attach(network, "c", netns.path(unique("hnet-missing-")))
    assert driver.attachments(network) == []


def test_a_netns_that_vanished_underneath_is_released(driver: TrackedDriver, netns: NetnsPool):
    network = make_network(driver, prefixlen=30)  # room for one container
    doomed = netns.new()
    attachment = driver.attach(network, "doomed", netns.path(doomed))
    netns.close()  # the container's netns goes away, taking the veth pair with it (asynchronously)
    wait_for(lambda: attachment.host_ifname not in host_links())
    assert driver.attachments(network) == []  # noticed and released
    driver.detach(network, "doomed", attachment.netns_path)  # still fine: idempotent
    driver.detach(network, "doomed", attachment.netns_path)
    assert driver.attach(network, "next", netns.path(netns.new())).addresses == attachment.addresses


def test_an_exhausted_pool_is_unavailable_and_leaves_nothing(driver: TrackedDriver, netns: NetnsPool):
    network = make_network(driver, prefixlen=30)  # gateway + one address
    first = driver.attach(network, "first", netns.path(netns.new()))
    late = netns.new()
    with pytest.raises(Unavailable, match="no free address"):
        driver.attach(network, "late", netns.path(late))
    assert veth_name(NAMESPACE, network.name, "late") not in host_links()
    assert "eth0" not in ip_lines(late, "link")
    driver.detach(network, "first", first.netns_path)
    assert driver.attach(network, "late", netns.path(late)).addresses == first.addresses


def test_deleting_a_network_in_use_is_refused(driver: TrackedDriver, netns: NetnsPool):
    network = make_network(driver)
    path = netns.path(netns.new())
    driver.attach(network, "busy", path)
    with pytest.raises(FailedPrecondition, match="busy"):
        driver.delete(network)
    assert network.device in host_links()
    driver.detach(network, "busy", path)
    driver.delete(network)
    assert network.device not in host_links()
    with pytest.raises(NotFound):
        driver.delete(network)


def test_create_returns_defaults_and_refuses_duplicates(driver: TrackedDriver):
    subnet = ipaddress.IPv4Network(random_subnet())
    name = unique("net-")
    network = driver.create(NetworkConfig(name, NAMESPACE, str(subnet), labels={"k": "v"}))
    assert (network.gateway, network.mtu, network.labels) == (str(subnet[1]), 1500, {"k": "v"})
    assert network.device.startswith(PREFIX) and len(network.device) == len(PREFIX) + 10
    with pytest.raises(AlreadyExists):
        driver.create(NetworkConfig(name, NAMESPACE, random_subnet()))
    assert driver.networks() == [network]
    assert "mtu 1500" in ip_lines(None, "link", "show", network.device)


# -- persistence, restart, threads --------------------------------------------------------------


def test_records_survive_a_restart_and_the_host_is_restored(tmp_path: Path, veths: set[str], netns: NetnsPool):
    root = tmp_path / "bridge"
    driver = open_driver(root, veths)
    try:
        network = make_network(driver)
        kept = driver.attach(network, "kept", netns.path(netns.new()))
        gone = driver.attach(network, "gone", netns.path(netns.new()))
    finally:
        driver.close()
    # while "down": the bridge vanishes (a reboot), a container's netns goes, a veth leaks onto a bridge
    with IPRoute() as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=network.device)[0])
    netns.remove(Path(gone.netns_path).name)
    driver = open_driver(root, veths)
    try:
        assert driver.networks() == [network]
        assert f"inet {network.gateway}/24" in ip_lines(None, "addr", "show", network.device)
        assert driver.attachments(network) == [kept]  # put back on the new bridge
        assert f"master {network.device}" in ip_lines(None, "link", "show", kept.host_ifname)
        assert ping(Path(kept.netns_path).name, network.gateway)
        again = driver.attach(network, "again", netns.path(netns.new()))
        assert again.addresses[0] not in {kept.addresses[0], gone.addresses[0]}  # the cursor persisted
    finally:
        clean_up(driver)


def test_an_attachment_whose_netns_is_gone_is_released_while_the_kernel_still_tears_it_down(
    tmp_path: Path, veths: set[str], netns: NetnsPool
):
    """The netns's name is gone but the namespace not yet (the kernel tears one down asynchronously; here an fd
    holds it), so its veth still exists: at start the attachment is released and its host veth removed."""
    root = tmp_path / "bridge"
    driver = open_driver(root, veths)
    try:
        network = make_network(driver)
        gone = driver.attach(network, "gone", netns.path(netns.new()))
    finally:
        driver.close()
    holder = os.open(gone.netns_path, os.O_RDONLY)
    try:
        netns.remove(Path(gone.netns_path).name)
        assert gone.host_ifname in host_links()  # the namespace lives on while the fd holds it
        driver = open_driver(root, veths)
        try:
            assert driver.attachments(network) == []
            assert gone.host_ifname not in host_links()
            again = driver.attach(network, "gone", netns.path(netns.new()))  # the id is free again
            assert driver.attachments(network) == [again]
        finally:
            clean_up(driver)
    finally:
        os.close(holder)


def test_a_veth_leaked_onto_a_bridge_is_removed_at_start(tmp_path: Path, veths: set[str], netns: NetnsPool):
    root = tmp_path / "bridge"
    driver = open_driver(root, veths)
    network = make_network(driver)
    kept = driver.attach(network, "kept", netns.path(netns.new()))
    driver.close()
    leaked = veth_name(NAMESPACE, network.name, "leaked")
    veths.add(leaked)
    with IPRoute() as ipr:
        bridge = ipr.link_lookup(ifname=network.device)[0]
        ipr.link("add", ifname=leaked, kind="veth", peer=unique("hnt-p"), master=bridge)
    driver = open_driver(root, veths)
    try:
        assert leaked not in host_links()
        assert driver.attachments(network) == [kept]
    finally:
        clean_up(driver)


def test_concurrent_attaches_and_detaches_are_consistent(driver: TrackedDriver, netns: NetnsPool):
    network = make_network(driver)
    paths = {f"c{n}": netns.path(netns.new()) for n in range(8)}
    results: dict[str, Attachment] = {}
    errors: list[BaseException] = []

    def each(call: Any) -> None:
        def run(cid: str) -> None:
            try:
                call(cid)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(cid,)) for cid in paths]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []

    each(lambda cid: results.__setitem__(cid, driver.attach(network, cid, paths[cid])))
    assert len({a.addresses for a in results.values()}) == 8
    assert sorted(a.container_id for a in driver.attachments(network)) == sorted(paths)
    each(lambda cid: driver.detach(network, cid, paths[cid]))
    assert driver.attachments(network) == []


def test_the_allocator_hands_out_each_address_once_and_wraps(tmp_path: Path):
    store = MetadataStore(tmp_path / "alloc.db")
    allocator = AddressAllocator(store)
    subnet = ipaddress.IPv4Network("10.240.0.0/29")  # hosts .1 to .6
    gateway = subnet[1]
    try:
        with store.transaction() as conn:
            got = [allocator.allocate(conn, "p", subnet, f"o{n}", (gateway,)) for n in range(5)]
            assert [str(a) for a in got] == [f"10.240.0.{n}" for n in range(2, 7)]
            with pytest.raises(Unavailable):
                allocator.allocate(conn, "p", subnet, "o9", (gateway,))
            allocator.release(conn, "p", "o1")
            assert str(allocator.allocate(conn, "p", subnet, "o9", (gateway,))) == "10.240.0.3"
            allocator.release(conn, "p", "o2")
            allocator.release(conn, "p", "o3")
            assert str(allocator.allocate(conn, "p", subnet, "o10", (gateway,))) == "10.240.0.4"  # after the last
            assert allocator.owners(conn, "p")["o10"] == ["10.240.0.4"]
            allocator.drop(conn, "p")
            assert allocator.owners(conn, "p") == {}
    finally:
        store.close()


# -- the plugin --------------------------------------------------------------------------------


def test_the_plugin_is_ok_in_the_daemon(make_daemon: Any):
    check_netlink()  # root here: no SkipPlugin
    daemon = make_daemon()
    rows = {row["name"]: row for row in daemon.ckctl_json("plugins", "ls")}
    row = rows["network.bridge"]
    assert (row["type"], row["id"], row["status"], row["reason"]) == ("network", "bridge", "ok", "")


def test_the_plugin_skips_without_cap_net_admin():
    probe = "from plugins.net_bridge import check_netlink\ncheck_netlink()"
    without = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]  # root, minus CAP_NET_ADMIN
    done = subprocess.run([*without, sys.executable, "-c", probe], capture_output=True, text=True, cwd="/")
    assert done.returncode != 0 and "SkipPlugin: CAP_NET_ADMIN is missing" in done.stderr, done.stderr


def test_every_optional_method_is_implemented():
    optional = ("set_mtu", "set_up", "set_down", "add_address", "remove_address", "routes", "add_route", "remove_route")
    assert [m for m in optional if getattr(BridgeDriver, m) is getattr(NetworkDriver, m)] == []
