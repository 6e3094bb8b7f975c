"""The default network driver (plugin ``network.bridge``): a Linux bridge per network, veth pairs into
container netns, addresses from a persisted per-network allocator; netlink only, through pyroute2.

Usable without the daemon::

    from plugins.net_bridge import BridgeDriver
    from core.network import NetworkConfig
    driver = BridgeDriver("/tmp/bridge")
    network = driver.create(NetworkConfig("front", "default", "10.88.0.0/24"))
    attachment = driver.attach(network, "web", "/run/netns/web")

Skips, with the reason, on a host where netlink cannot be used or the process lacks CAP_NET_ADMIN.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.plugin import InitContext, Registration, SkipPlugin
from plugins.net_bridge.allocator import AddressAllocator
from plugins.net_bridge.driver import DEFAULT_MTU, BridgeDriver
from plugins.net_bridge.netlink import NetnsInterfaces, host_route

__all__ = ["AddressAllocator", "BridgeConfig", "BridgeDriver", "NetnsInterfaces", "check_netlink", "plugin"]

_CAP_NET_ADMIN = 12


@dataclass
class BridgeConfig:
    """The keys accepted in ``[plugins.network.bridge]``, with their defaults."""

    mtu: int = DEFAULT_MTU
    """The MTU of networks created without one."""

    bridge_prefix: str = "ck-"
    """The start of every bridge name (at most 5 characters); the rest is a hash of namespace/name."""

    hairpin: bool = False
    """Hairpin mode on every bridge port: a container may reach itself through the bridge."""


def check_netlink() -> None:
    """Raise SkipPlugin unless this process holds CAP_NET_ADMIN and can talk rtnetlink."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:") and not int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1:
            raise SkipPlugin("CAP_NET_ADMIN is missing: the bridge driver creates bridges and veth pairs")
    try:
        with host_route() as ipr:
            ipr.get_links()
    except OSError as exc:
        raise SkipPlugin(f"rtnetlink is not usable: {exc}") from exc


def init(ctx: InitContext) -> BridgeDriver:
    """Check the host, open the driver in the plugin's root and export where its database is."""
    config: BridgeConfig = ctx.config
    check_netlink()
    driver = BridgeDriver(ctx.root, mtu=config.mtu, bridge_prefix=config.bridge_prefix, hairpin=config.hairpin)
    ctx.exports["root"] = str(ctx.root)
    return driver


plugin = Registration(init=init, config=BridgeConfig)
"""What the ``containerkit.network`` entry point ``bridge`` names."""
