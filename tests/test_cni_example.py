"""The third-party CNI network driver (examples/containerkit-cni), installed separately.

The package is pip-installed (from a temporary copy, no build output in the repo) with ``--target``
into a temporary directory, which is put on ``sys.path`` to use the driver as a library, and on
``PYTHONPATH`` for a containerkitd (started by test_networks' ``place`` fixture through this module's
``make_daemon``) that then lists ``network.cni`` and, with ``[plugins.service.networks] default_driver =
"cni"``, puts busybox containers on a CNI network where they reach each other. The CNI bridge plugin
runs with ``isGateway`` off here, so it never turns on the host's IP forwarding (other tests count on
networks being isolated). Every test checks that no bridge, veth or netns it made remains.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RunningDaemon
from netns_traffic import (
    NetnsPool,
    host_forwards,
    host_links,
    ip_lines,
    made_netns,
    nc_roundtrip,
    netns_pool,
    ping,
    random_subnet,
    unique,
)
from test_networks import Place, serve
from test_networks import busybox as busybox  # the fixtures, shared
from test_networks import place as place

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from core.network import Network, NetworkConfig

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "containerkit-cni"
PACKAGE = "containerkit-cni 0.1.0"
PIP_ENV = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
CNI_BIN = Path("/usr/lib/cni")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all((CNI_BIN / name).exists() for name in ("bridge", "host-local", "loopback")),
    reason="needs root and Debian's containernetworking-plugins in /usr/lib/cni",
)


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """The package installed with ``pip --target`` into a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="ck-cni-") as tmp:
        copy, target = Path(tmp) / "src", Path(tmp) / "site"
        shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
        done = subprocess.run(
            [*pip, "--target", str(target), str(copy)], capture_output=True, text=True, env=PIP_ENV, timeout=300
        )
        assert done.returncode == 0, f"pip install failed:\n{done.stdout}{done.stderr}"
        yield target


@pytest.fixture
def cni(installed: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The installed ``containerkit_cni`` module, imported from the install directory."""
    monkeypatch.syspath_prepend(str(installed))
    importlib.invalidate_caches()
    module = importlib.import_module("containerkit_cni")
    assert Path(module.__file__).is_relative_to(installed)
    return module


@pytest.fixture
def netns() -> Iterator[NetnsPool]:
    with netns_pool() as pool:
        yield pool


@pytest.fixture
def driver(cni: Any, tmp_path: Path) -> Iterator[Any]:
    """A CniDriver on a temporary root; afterwards every network is emptied and deleted, and none of
    its bridges or veths, nor any test netns, remains."""
    links_before, netns_before = host_links(), made_netns()
    opened = cni.CniDriver(tmp_path / "cni", is_gateway=False)
    made: set[str] = set()
    yield opened
    for network in opened.networks():
        made.add(network.device)
        for attachment in opened.attachments(network):
            made.add(attachment.host_ifname)
            opened.detach(network, attachment.container_id, attachment.netns_path)
        opened.delete(network)
    assert made & host_links() == set()
    assert {name for name in host_links() - links_before if name.startswith("cni-")} == set()
    assert made_netns() - netns_before == set()


def make_network(driver: Any, prefixlen: int = 24) -> Network:
    for _ in range(10):
        try:
            return driver.create(NetworkConfig(unique("cni-"), "default", random_subnet(prefixlen)))
        except FailedPrecondition:
            continue
    raise AssertionError("no free random subnet in 10.240.0.0/12")


def ip_of(attachment: Any) -> str:
    return str(attachment.addresses[0].split("/")[0])


# -- the driver as a library ----------------------------------------------------------------------


def test_containers_on_a_cni_network_reach_each_other_with_ping_and_nc(driver: Any, netns: NetnsPool):
    network = make_network(driver)
    a, b = netns.new(), netns.new()
    att_a = driver.attach(network, "a", netns.path(a))
    att_b = driver.attach(network, "b", netns.path(b), address=str(ipaddress.IPv4Network(network.subnet)[77]))
    assert ip_of(att_b).endswith(".77") and att_a.gateway == network.gateway
    assert ping(a, ip_of(att_b)) and ping(b, ip_of(att_a))
    assert nc_roundtrip(b, a, ip_of(att_b), 7201).startswith("hello-")
    assert nc_roundtrip(a, b, ip_of(att_a), 7202).startswith("hello-")
    assert f"master {network.device}" in ip_lines(None, "link", "show", att_a.host_ifname)
    assert "LOOPBACK,UP" in ip_lines(a, "link", "show", "lo")  # the loopback plugin ran
    assert not host_forwards()
    assert [x.container_id for x in driver.attachments(network)] == ["a", "b"]
    driver.set_mtu(netns.path(a), "eth0", 1300)  # interface management from plugins.net_bridge
    assert "mtu 1300" in ip_lines(a, "link", "show", "eth0")


def test_cni_driver_errors_follow_the_network_interface(driver: Any, netns: NetnsPool):
    network = make_network(driver, prefixlen=30)  # gateway + one address
    inside = ipaddress.IPv4Network(network.subnet)
    with pytest.raises(FailedPrecondition, match="overlaps"):
        driver.create(NetworkConfig(unique("cni-"), "default", str(inside.supernet(new_prefix=24))))
    with pytest.raises(AlreadyExists):
        driver.create(NetworkConfig(network.name, "default", random_subnet()))
    for subnet in ("nonsense", "10.240.0.1/24", "10.240.0.0/31"):
        with pytest.raises(InvalidArgument):
            driver.create(NetworkConfig(unique("cni-"), "default", subnet))
    path, other = netns.path(netns.new()), netns.path(netns.new())
    with pytest.raises(NotFound):
        driver.attach(network, "c", netns.path(unique("hnet-missing-")))
    with pytest.raises(InvalidArgument):
        driver.attach(network, "c", path, address="10.9.9.9")
    with pytest.raises(AlreadyExists):
        driver.attach(network, "c", path, address=network.gateway)
    first = driver.attach(network, "c", path)
    with pytest.raises(AlreadyExists):
        driver.attach(network, "c", other)
    with pytest.raises(Unavailable):
        driver.attach(network, "d", other)
    assert "eth0" not in ip_lines(Path(other).name, "link")  # nothing half-made
    with pytest.raises(FailedPrecondition, match="attached"):
        driver.delete(network)
    driver.detach(network, "c", first.netns_path)
    driver.detach(network, "c", first.netns_path)  # idempotent
    assert driver.attach(network, "d", other).addresses == first.addresses
    ghost = Network("ghost", "default", "10.240.0.0/24", "10.240.0.1", 1500)
    with pytest.raises(NotFound):
        driver.attachments(ghost)


# -- installed into a daemon ------------------------------------------------------------------------

DAEMON_CONFIG = """\
required_plugins = ["network.cni"]

[plugins.network.cni]
is_gateway = false

[plugins.service.networks]
default_driver = "cni"
"""


@pytest.fixture
def make_daemon(make_daemon: Any, installed: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """conftest's make_daemon, for daemons that find the installed package (on PYTHONPATH) and make
    networks with it; test_networks' ``place`` fixture starts its daemon through this one."""
    monkeypatch.setenv("PYTHONPATH", str(installed))

    def make(config: str = "", *args: Any, **kwargs: Any) -> RunningDaemon:
        return make_daemon(DAEMON_CONFIG + config, *args, **kwargs)

    return make


def test_the_installed_driver_is_listed_and_puts_containers_on_a_cni_network(place: Place):
    rows = {row["name"]: row for row in place.daemon.ckctl_json("plugins", "ls")}
    row = rows["network.cni"]
    assert (row["status"], row["reason"], row["package"]) == ("ok", "", PACKAGE)
    network = place.network(random_subnet())
    inspected = json.loads(place.ck("networks", "inspect", network).stdout)
    assert inspected["driver"] == "cni" and inspected["device"].startswith("cni-")
    place.run("c1", [network], *serve("c1"))
    place.run("c2", [network], *serve("c2"))
    c1, c2 = place.address("c1", network), place.address("c2", network)
    assert place.reaches("c1", c2) and place.reaches("c2", c1)
    assert place.fetch("c1", c2) == "c2" and place.fetch("c2", c1) == "c1"
    assert all(a["host_ifname"].startswith("veth") for a in place.attachments())
    assert not host_forwards()
