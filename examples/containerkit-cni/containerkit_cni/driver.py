"""CniDriver: containerkit networks made by the standard CNI plugin binaries, called as a runtime calls them.

A network is a CNI network configuration list (``<conf_dir>/<cni name>.conflist``, one ``bridge``
plugin with ``host-local`` IPAM) that also carries containerkit's record of it under the top-level
key ``containerkit`` (CNI ignores unknown keys); its CNI name and bridge are ``ck-``/``cni-`` and 10
hex digits of sha256("<namespace>/<name>"). Attaching runs the ``bridge`` plugin with
``CNI_COMMAND=ADD`` (the network config on stdin, ``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_CONTAINERID``,
``CNI_PATH`` in the environment; a fixed address as ``CNI_ARGS=IgnoreUnknown=1;IP=...``) and the ``loopback`` plugin;
detaching runs ``DEL``. The CNI result becomes the :class:`Attachment`, kept as
``<root>/attachments/<cni name>/<container id>.json``. host-local keeps its allocations under
``<root>/ipam``. The bridge plugin creates the bridge on the first ADD and never removes it, so
:meth:`CniDriver.delete` removes it through netlink. Interface management inside a netns comes from
:class:`plugins.net_bridge.NetnsInterfaces`.

With ``is_gateway`` (CNI's ``isGateway``) the bridge holds the gateway address so the host reaches its
containers, and the bridge plugin turns on ``net.ipv4.ip_forward`` of the netns it runs in (the
host's): the host then routes between networks. Without it the containers of a network reach each
other only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from core import identifiers
from core.errors import (
    AlreadyExists,
    ContainerkitError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from core.network import Attachment, Network, NetworkConfig, NetworkDriver
from plugins.net_bridge import NetnsInterfaces
from plugins.net_bridge.netlink import (
    check_host_routes,
    check_ifname,
    check_mtu,
    find_index,
    host_route,
    netlink_errors,
    remove_link,
)

__all__ = ["CNI_PLUGINS", "CniDriver"]

CNI_VERSION = "1.0.0"
CNI_PLUGINS = ("bridge", "host-local", "loopback")
"""The CNI binaries the driver calls, all of which must be in its ``bin_dir``."""
_CALL_TIMEOUT = 60.0
_MAX_PREFIXLEN = 30


class CniDriver(NetnsInterfaces, NetworkDriver):
    """A network driver over the CNI ``bridge`` + ``host-local`` plugins in ``bin_dir``.

    Network configurations go to ``conf_dir`` (default ``<root>/net.d``); ``mtu`` is the default of
    networks created without one; ``is_gateway`` is CNI's ``isGateway`` (see the module docstring).
    Thread-safe: every call holds one lock.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        bin_dir: Path | str = "/usr/lib/cni",
        conf_dir: Path | str = "",
        mtu: int = 1500,
        is_gateway: bool = True,
    ) -> None:
        self.root = Path(root)
        self.bin_dir = Path(bin_dir)
        self.conf_dir = Path(conf_dir) if conf_dir else self.root / "net.d"
        self._mtu = check_mtu(mtu)
        self._is_gateway = is_gateway
        self._lock = threading.Lock()
        for directory in (self.root, self.conf_dir, self.root / "attachments", self.root / "ipam"):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- networks ------------------------------------------------------------------------------

    def create(self, config: NetworkConfig) -> Network:
        """Write the network's CNI configuration; see :meth:`NetworkDriver.create`. Takes no options;
        IPv4 subnets of at most /30."""
        identifiers.validate(config.namespace, "namespace")
        identifiers.validate(config.name, "network name")
        subnet = _subnet(config.subnet)
        gateway = _host_address(subnet, config.gateway, "gateway") if config.gateway else subnet.network_address + 1
        if config.options:
            raise InvalidArgument(f"unknown option(s) {', '.join(sorted(config.options))}: the cni driver takes none")
        digest = hashlib.sha256(f"{config.namespace}/{config.name}".encode()).hexdigest()[:10]
        network = Network(
            name=config.name,
            namespace=config.namespace,
            subnet=str(subnet),
            gateway=str(gateway),
            mtu=check_mtu(config.mtu or self._mtu),
            device=f"cni-{digest}",
            labels=config.labels,
        )
        with self._lock:
            if self._conflist(network).exists():
                raise AlreadyExists(f"network {network.name} exists in namespace {network.namespace}")
            for other in self._networks():
                if ipaddress.IPv4Network(other.subnet).overlaps(subnet):
                    raise FailedPrecondition(f"subnet {subnet} overlaps {other.subnet} of network {other.name}")
            with host_route() as ipr:
                check_host_routes(ipr, subnet)
            _write_json(self._conflist(network), self._conflist_of(network))
        return network

    def delete(self, network: Network) -> None:
        """Remove the bridge, host-local's records and the configuration; see :meth:`NetworkDriver.delete`."""
        with self._lock:
            record = self._record(network)
            attached = sorted(self._live_attachments(record))
            if attached:
                raise FailedPrecondition(
                    f"network {record.name} has containers attached: {', '.join(attached)}; detach them first"
                )
            index = find_index(record.device)
            if index is not None:
                with host_route() as ipr, netlink_errors(f"removing bridge {record.device}"):
                    ipr.link("del", index=index)
            shutil.rmtree(self.root / "ipam" / _cni_name(record), ignore_errors=True)
            shutil.rmtree(self._attachment_dir(record), ignore_errors=True)
            self._conflist(record).unlink()

    def networks(self) -> list[Network]:
        """Every network whose configuration is in ``conf_dir``."""
        with self._lock:
            return self._networks()

    # -- attachments ---------------------------------------------------------------------------

    def attach(
        self,
        network: Network,
        container_id: str,
        netns_path: str,
        address: str | None = None,
        ifname: str = "eth0",
    ) -> Attachment:
        """CNI ADD of the bridge plugin (then loopback); see :meth:`NetworkDriver.attach`."""
        identifiers.validate(container_id, "container id")
        check_ifname(ifname)
        with self._lock:
            record = self._record(network)
            path = self._attachment_path(record, container_id)
            if path.exists():
                raise AlreadyExists(f"container {container_id} is attached to network {record.name} already")
            if not os.path.exists(netns_path):
                raise NotFound(f"netns {netns_path} does not exist")
            cni_args = f"IgnoreUnknown=1;IP={self._wanted(record, address)}" if address is not None else ""
            call = _Call(self.bin_dir, container_id, netns_path, ifname)
            try:
                result = call.run("bridge", "ADD", self._plugin_conf(record), cni_args)
                call.run("loopback", "ADD", {"cniVersion": CNI_VERSION, "name": "lo", "type": "loopback"}, ifname="lo")
                attachment = _attachment_of(record, container_id, netns_path, ifname, result)
            except BaseException:
                call.run("bridge", "DEL", self._plugin_conf(record), check=False)
                raise
            _write_json(path, dataclasses.asdict(attachment))
        return attachment

    def detach(self, network: Network, container_id: str, netns_path: str) -> None:
        """CNI DEL of the bridge plugin; see :meth:`NetworkDriver.detach` (a vanished netns is fine)."""
        with self._lock:
            record = self._record(network)
            self._release(record, container_id)

    def attachments(self, network: Network) -> list[Attachment]:
        """The containers attached, by id; one whose veth vanished (its netns went) is released."""
        with self._lock:
            live = self._live_attachments(self._record(network))
        return [live[key] for key in sorted(live)]

    # -- internals -----------------------------------------------------------------------------

    def _conflist(self, network: Network) -> Path:
        return self.conf_dir / f"{_cni_name(network)}.conflist"

    def _attachment_dir(self, network: Network) -> Path:
        return self.root / "attachments" / _cni_name(network)

    def _attachment_path(self, network: Network, container_id: str) -> Path:
        return self._attachment_dir(network) / f"{container_id}.json"

    def _conflist_of(self, network: Network) -> dict[str, Any]:
        """The CNI configuration list of ``network``, with containerkit's record beside the plugins."""
        bridge = {
            "type": "bridge",
            "bridge": network.device,
            "isGateway": self._is_gateway,
            "ipMasq": False,
            "mtu": network.mtu,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": network.subnet, "gateway": network.gateway}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(self.root / "ipam"),
            },
        }
        return {
            "cniVersion": CNI_VERSION,
            "name": _cni_name(network),
            "plugins": [bridge],
            "containerkit": dataclasses.asdict(network),
        }

    def _plugin_conf(self, network: Network) -> dict[str, Any]:
        """The bridge plugin's stdin: its entry of the list with ``cniVersion`` and ``name``, as libcni passes it."""
        conflist = json.loads(self._conflist(network).read_text())
        return {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **conflist["plugins"][0]}

    def _networks(self) -> list[Network]:
        found = []
        for path in sorted(self.conf_dir.glob("*.conflist")):
            record = json.loads(path.read_text()).get("containerkit")
            if record is not None:
                found.append(Network(**record))
        return sorted(found, key=lambda n: (n.namespace, n.name))

    def _record(self, network: Network) -> Network:
        for record in self._networks():
            if (record.namespace, record.name) == (network.namespace, network.name):
                return record
        raise NotFound(f"network {network.name} does not exist in namespace {network.namespace}")

    def _attachments(self, network: Network) -> list[Attachment]:
        paths = sorted(self._attachment_dir(network).glob("*.json"))
        return [Attachment(**json.loads(path.read_text())) for path in paths]

    def _live_attachments(self, network: Network) -> dict[str, Attachment]:
        """The attachments whose host veth exists, by container id; the others are released."""
        live = {}
        for attachment in self._attachments(network):
            if find_index(attachment.host_ifname) is not None:
                live[attachment.container_id] = attachment
            else:
                self._release(network, attachment.container_id)
        return live

    def _release(self, network: Network, container_id: str) -> None:
        """CNI DEL of a recorded attachment and forget it; nothing when there is no record."""
        path = self._attachment_path(network, container_id)
        try:
            attachment = Attachment(**json.loads(path.read_text()))
        except FileNotFoundError:
            return
        netns = attachment.netns_path if os.path.exists(attachment.netns_path) else ""
        _Call(self.bin_dir, container_id, netns, attachment.ifname).run("bridge", "DEL", self._plugin_conf(network))
        if not netns:  # the kernel tears a vanished netns's veth pair down in its own time: do it now
            with host_route() as ipr:
                remove_link(ipr, attachment.host_ifname)
        path.unlink()

    def _wanted(self, network: Network, address: str) -> str:
        """The plain address asked for; InvalidArgument outside the subnet, AlreadyExists when taken."""
        subnet = ipaddress.IPv4Network(network.subnet)
        wanted = _host_address(subnet, address.split("/")[0], "address")
        taken = {a.split("/")[0] for attachment in self._attachments(network) for a in attachment.addresses}
        if str(wanted) in taken | {network.gateway}:
            raise AlreadyExists(f"address {wanted} of subnet {subnet} is in use")
        return str(wanted)


@dataclasses.dataclass
class _Call:
    """The CNI environment of one container's calls: who, where, which interface."""

    bin_dir: Path
    container_id: str
    netns: str
    ifname: str

    def run(
        self,
        plugin: str,
        command: str,
        conf: dict[str, Any],
        cni_args: str = "",
        *,
        ifname: str = "",
        check: bool = True,
    ) -> dict[str, Any]:
        """Run CNI ``plugin`` with ``command``; its result (``{}`` for none). With ``check``, a failure
        raises the error its CNI error code and message mean."""
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": self.container_id,
            "CNI_NETNS": self.netns,
            "CNI_IFNAME": ifname or self.ifname,
            "CNI_PATH": str(self.bin_dir),
            "CNI_ARGS": cni_args,
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        done = subprocess.run(
            [str(self.bin_dir / plugin)],
            input=json.dumps(conf).encode(),
            env=env,
            capture_output=True,
            timeout=_CALL_TIMEOUT,
            check=False,
        )
        if done.returncode != 0 and check:
            raise _cni_error(plugin, command, done.stdout, done.stderr)
        return json.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else {}


def _cni_error(plugin: str, command: str, stdout: bytes, stderr: bytes) -> ContainerkitError:
    """The error a CNI failure means: the CNI error object's ``msg`` (and ``details``) in the message."""
    try:
        error = json.loads(stdout)
        code, text = int(error.get("code", 0)), f"{error.get('msg', '')} {error.get('details', '')}".strip()
    except (ValueError, AttributeError):
        code, text = 0, (stdout + stderr).decode(errors="replace").strip()
    message = f"CNI {plugin} {command} failed: {text}"
    if code == 11 or "no IP addresses available" in text:
        return Unavailable(message)
    if "already exists" in text or "has been allocated" in text or "not available" in text:
        return AlreadyExists(message)
    if code in (4, 7):
        return InvalidArgument(message)
    return FailedPrecondition(message)


def _attachment_of(
    network: Network, container_id: str, netns_path: str, ifname: str, result: dict[str, Any]
) -> Attachment:
    """The attachment a CNI ADD result describes: the sandbox interface, the host veth, the addresses."""
    interfaces = result.get("interfaces", [])
    inside = next(i for i in interfaces if i.get("sandbox"))
    host = next(i for i in interfaces if not i.get("sandbox") and i["name"] != network.device)
    ips = result.get("ips", [])
    return Attachment(
        network=network.name,
        container_id=container_id,
        netns_path=netns_path,
        ifname=ifname,
        host_ifname=host["name"],
        addresses=tuple(ip["address"] for ip in ips),
        gateway=next((ip["gateway"] for ip in ips if ip.get("gateway")), ""),
        mac=inside.get("mac", ""),
        mtu=network.mtu,
    )


def _cni_name(network: Network) -> str:
    """The CNI network name (also host-local's directory), ``ck-`` and the bridge's hash."""
    return "ck-" + network.device.removeprefix("cni-")


def _subnet(text: str) -> ipaddress.IPv4Network:
    try:
        subnet = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"invalid subnet {text!r}: {exc} (an IPv4 CIDR such as 10.88.0.0/16)") from exc
    if "/" not in text or subnet.prefixlen > _MAX_PREFIXLEN:
        raise InvalidArgument(f"invalid subnet {text!r}: a CIDR of at most /{_MAX_PREFIXLEN}")
    return subnet


def _host_address(subnet: ipaddress.IPv4Network, text: str, what: str) -> ipaddress.IPv4Address:
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise InvalidArgument(f"invalid {what} {text!r}: {exc}") from exc
    if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
        raise InvalidArgument(f"{what} {text} is not a host address of subnet {subnet}")
    return address


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed over it)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(temporary, path)
