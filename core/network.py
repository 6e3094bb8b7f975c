"""The ``network`` plugin type: host networks and the interfaces that attach containers to them.

A :class:`NetworkDriver` makes networks on the host (the bridge driver: a Linux bridge with a
subnet and a gateway address) and attaches containers to them by putting an interface into the
container's network namespace, given as the path of a netns file (``/proc/<pid>/ns/net`` or
``/run/netns/<name>``). Addresses are strings: ``10.88.0.2/16`` for an interface address
(CIDR), ``10.88.0.1`` for a plain address.

Contract for every implementation:

- The metadata layer records networks per namespace and is the authority on what should exist;
  the driver owns the host side (devices, addresses, routes, its own allocation records) and
  reports it through :meth:`NetworkDriver.networks`, so the two can be reconciled after a restart.
- IP allocation is single-host: within a network's subnet, by the driver, unless given.
- Methods may be called concurrently from several threads.
- Errors come from :mod:`core.errors`: InvalidArgument for a malformed name, address, subnet or
  MTU; NotFound for an unknown network, netns, interface, address or route; AlreadyExists for a
  duplicate; FailedPrecondition when the host's state forbids it (overlap, in use); Unavailable
  for exhausted addresses. ``OSError`` (e.g. ``PermissionError`` without CAP_NET_ADMIN) escapes for
  genuine host faults.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field

from core.errors import NotImplementedByPlugin

__all__ = ["NETWORKS_LABEL", "Attachment", "Interface", "Network", "NetworkConfig", "NetworkDriver", "Route"]

NETWORKS_LABEL = "containerkit.io/networks"
"""The container label naming the networks its task joins: ``NAME[=ADDRESS]`` items, comma-separated."""


@dataclass(frozen=True)
class NetworkConfig:
    """What to create: ``subnet`` in CIDR; ``gateway`` ``""`` for the subnet's first address; ``mtu``
    0 for the driver's default (1500); ``options`` are driver-specific (unknown keys: InvalidArgument)."""

    name: str
    namespace: str
    subnet: str
    gateway: str = ""
    mtu: int = 0
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    options: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "options", dict(self.options))


@dataclass(frozen=True)
class Network:
    """A network as it exists on the host, every default resolved; ``device`` is its host interface
    (the bridge), ``""`` when the driver has none."""

    name: str
    namespace: str
    subnet: str
    gateway: str
    mtu: int
    device: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    options: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "options", dict(self.options))


@dataclass(frozen=True)
class Attachment:
    """A container's connection to a network: ``ifname`` inside its netns, ``host_ifname`` the peer
    on the host, ``addresses`` in CIDR, ``gateway`` its default route (``""`` for none)."""

    network: str
    container_id: str
    netns_path: str
    ifname: str
    host_ifname: str
    addresses: tuple[str, ...]
    gateway: str
    mac: str
    mtu: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(self.addresses))


@dataclass(frozen=True)
class Interface:
    """A network interface as a netns shows it; ``kind`` is the link type (``veth``, ``bridge``,
    ``loopback``...), ``addresses`` in CIDR."""

    name: str
    index: int
    mac: str
    mtu: int
    up: bool
    addresses: tuple[str, ...] = ()
    kind: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "addresses", tuple(self.addresses))


@dataclass(frozen=True)
class Route:
    """A route: ``destination`` in CIDR or ``default``; ``gateway`` ``""`` for an on-link route."""

    destination: str
    gateway: str = ""
    ifname: str = ""
    metric: int = 0


class NetworkDriver(ABC):
    """A network driver plugin (wire type ``containerkit.network.v1``)."""

    # -- networks ------------------------------------------------------------------------------

    @abstractmethod
    def create(self, config: NetworkConfig) -> Network:
        """Make the network on the host and return it with defaults resolved.

        AlreadyExists when ``(namespace, name)`` exists for this driver; FailedPrecondition when the
        subnet overlaps another network or a host route; InvalidArgument for a malformed subnet, a
        gateway outside it, an MTU out of range or an unknown option.
        """

    @abstractmethod
    def delete(self, network: Network) -> None:
        """Remove the network from the host. NotFound when it does not exist; FailedPrecondition
        while containers are attached (detach them first)."""

    @abstractmethod
    def networks(self) -> list[Network]:
        """Every network of this driver that exists on the host, in every namespace."""

    # -- attachments ---------------------------------------------------------------------------

    @abstractmethod
    def attach(
        self,
        network: Network,
        container_id: str,
        netns_path: str,
        address: str | None = None,
        ifname: str = "eth0",
    ) -> Attachment:
        """Connect the netns to the network as ``ifname``, up, with an address and a default route.

        ``address`` (CIDR or plain, within the subnet) is picked by the driver when None.
        NotFound for an unknown network or netns; AlreadyExists when the container is attached to
        this network already, ``address`` is in use or ``ifname`` exists in the netns;
        InvalidArgument for an address outside the subnet; Unavailable when no address is free.
        On failure nothing is left behind.
        """

    @abstractmethod
    def detach(self, network: Network, container_id: str, netns_path: str) -> None:
        """Disconnect the container and release its address. Idempotent, so cleanup always works:
        a missing attachment or a netns that no longer exists is not an error. NotFound only for an
        unknown network."""

    @abstractmethod
    def attachments(self, network: Network) -> list[Attachment]:
        """The containers attached to the network. NotFound for an unknown network."""

    # -- interfaces inside a netns -------------------------------------------------------------

    @abstractmethod
    def interfaces(self, netns_path: str) -> list[Interface]:
        """The interfaces of the netns, loopback included. NotFound when the netns does not exist."""

    def set_mtu(self, netns_path: str, ifname: str, mtu: int) -> None:
        """Set the interface's MTU. NotFound for an unknown netns or interface; InvalidArgument for an
        MTU out of range. Optional: default NotImplementedByPlugin (as for every method below)."""
        raise NotImplementedByPlugin("set_mtu is not supported by this network driver")

    def set_up(self, netns_path: str, ifname: str) -> None:
        """Bring the interface up (a no-op when it is). NotFound for an unknown netns or interface."""
        raise NotImplementedByPlugin("set_up is not supported by this network driver")

    def set_down(self, netns_path: str, ifname: str) -> None:
        """Bring the interface down (a no-op when it is). NotFound for an unknown netns or interface."""
        raise NotImplementedByPlugin("set_down is not supported by this network driver")

    def add_address(self, netns_path: str, ifname: str, address: str) -> None:
        """Add ``address`` (CIDR) to the interface. AlreadyExists when it has it; NotFound for an
        unknown netns or interface."""
        raise NotImplementedByPlugin("add_address is not supported by this network driver")

    def remove_address(self, netns_path: str, ifname: str, address: str) -> None:
        """Remove ``address`` (CIDR) from the interface. NotFound when it does not have it."""
        raise NotImplementedByPlugin("remove_address is not supported by this network driver")

    def routes(self, netns_path: str) -> list[Route]:
        """The main routing table of the netns. NotFound when the netns does not exist."""
        raise NotImplementedByPlugin("routes is not supported by this network driver")

    def add_route(self, netns_path: str, route: Route) -> None:
        """Add ``route``. AlreadyExists when an equal route exists; NotFound for an unknown netns or
        ``route.ifname``; FailedPrecondition when the gateway is unreachable."""
        raise NotImplementedByPlugin("add_route is not supported by this network driver")

    def remove_route(self, netns_path: str, route: Route) -> None:
        """Remove ``route``. NotFound when no such route exists."""
        raise NotImplementedByPlugin("remove_route is not supported by this network driver")

    # -- life cycle ----------------------------------------------------------------------------

    def close(self) -> None:  # noqa: B027 - optional, a no-op by default
        """Release the driver's resources at shutdown; networks and attachments persist. Default: nothing."""
