"""containerkit-cni: a third-party network driver (plugin ``network.cni``) over the standard CNI plugins.

Install it beside containerkit (``pip install examples/containerkit-cni``), restart the daemon and
select it::

    [plugins.network.cni]
    cni_bin_dir = "/usr/lib/cni"   # where bridge, host-local and loopback are
    cni_conf_dir = ""              # network configurations; empty: <plugin root>/net.d
    is_gateway = true              # CNI's isGateway: also turns on the host's ip_forward

    [plugins.service.networks]
    default_driver = "cni"

Usable without the daemon: ``CniDriver(root)`` (see :mod:`containerkit_cni.driver`). Skips, with the
reason, when a CNI binary is missing or netlink cannot be used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from containerkit_cni.driver import CNI_PLUGINS, CniDriver
from core.plugin import InitContext, Registration, SkipPlugin
from plugins.net_bridge import check_netlink

__all__ = ["CniConfig", "CniDriver", "plugin"]


@dataclass
class CniConfig:
    """The keys accepted in ``[plugins.network.cni]``, with their defaults."""

    cni_bin_dir: str = "/usr/lib/cni"
    """Where the CNI plugin binaries are (Debian's containernetworking-plugins)."""

    cni_conf_dir: str = ""
    """Where network configurations (``.conflist``) are written; empty: ``<plugin root>/net.d``."""

    mtu: int = 1500
    """The MTU of networks created without one."""

    is_gateway: bool = True
    """CNI's ``isGateway``: the bridge holds the gateway address (and the host forwards IPv4)."""


def init(ctx: InitContext) -> CniDriver:
    """Check for the CNI binaries and netlink, then open the driver in the plugin's root."""
    config: CniConfig = ctx.config
    for name in CNI_PLUGINS:
        binary = Path(config.cni_bin_dir, name)
        if not os.access(binary, os.X_OK):
            raise SkipPlugin(f"CNI plugin {binary} is missing (install containernetworking-plugins)")
    check_netlink()
    driver = CniDriver(
        ctx.root,
        bin_dir=config.cni_bin_dir,
        conf_dir=config.cni_conf_dir,
        mtu=config.mtu,
        is_gateway=config.is_gateway,
    )
    ctx.exports["conf_dir"] = str(driver.conf_dir)
    return driver


plugin = Registration(init=init, config=CniConfig)
"""What the ``containerkit.network`` entry point ``cni`` names."""
