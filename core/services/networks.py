"""containerkit.services.networks.v1.Networks: networks per namespace over the ``network`` driver plugins,
and the network side of a container's task.

Networks are recorded in :class:`core.metadata.networks.NetworkStore` and made on the host by a driver
(``[plugins.service.networks] default_driver``, ``bridge``, unless the request names one). A container
whose label ``containerkit.io/networks`` names networks (``front,back=10.240.7.9``: a fixed address
after ``=``) gets, through the hooks:

- ``containerkit_adjust_spec``: its spec's network namespace pointed at ``/run/netns/ck-...``
  (:func:`core.netns.netns_path`), the networks checked to exist;
- ``containerkit_task_prepare``: that netns made and attached to each network in order as ``eth0``,
  ``eth1``...; on failure everything made is undone;
- ``containerkit_task_released``: every attachment of the container detached and the netns removed.

At start-up (after the tasks service restored its tasks) the service reconciles: a recorded network
missing on the host is made again (a reboot), a driver network without record is removed, attachments
and netns of containers without a live task are released (the task died while the daemon was down), a
driver attachment without record is detached, and a ``ck-*`` netns named for one of this daemon's
containers but without record is removed (other netns are left alone: another containerkitd may own
them). Events: ``/networks/create``, ``/networks/delete``, ``/networks/attach``, ``/networks/detach``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from core.crashpoints import crashpoint
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.hookspecs import hookimpl
from core.identifiers import validate
from core.netns import NETNS_DIR, create_netns, delete_netns, list_netns, netns_name, netns_path
from core.network import NETWORKS_LABEL, Attachment, Interface, Network, NetworkConfig, NetworkDriver, Route
from core.plugin import InitContext, Registration
from core.runtime import TaskStatus
from core.server import namespace_of
from core.services._convert import timestamp

if TYPE_CHECKING:
    from core.metadata.containers import Container, ContainerStore
    from core.metadata.networks import NetworkRecord, NetworkStore
    from core.services.tasks import TasksService

log = logging.getLogger("containerkit.services.networks")


@dataclass
class NetworksServiceConfig:
    """``[plugins.service.networks]``: the driver a network is made by when the request names none."""

    default_driver: str = "bridge"


def requested_networks(labels: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """The networks the :data:`NETWORKS_LABEL` of ``labels`` asks for, in order, each with its fixed
    address (None: the driver picks). InvalidArgument for an invalid name or address, or a network
    named twice."""
    wanted: dict[str, str | None] = {}
    for item in labels.get(NETWORKS_LABEL, "").split(","):
        name, sep, address = (part.strip() for part in item.partition("="))
        if not name and not sep:
            continue
        validate(name, f"network name in label {NETWORKS_LABEL}")
        if name in wanted:
            raise InvalidArgument(f"label {NETWORKS_LABEL} names network {name!r} twice")
        if sep:
            try:
                ipaddress.ip_interface(address)
            except ValueError:
                raise InvalidArgument(f"label {NETWORKS_LABEL}: invalid address {address!r} for {name}") from None
        wanted[name] = address if sep else None
    return list(wanted.items())


def network_namespace(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The spec's ``linux.namespaces`` entry of type ``network``; None when the container shares the host's."""
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    return next((entry for entry in namespaces if entry.get("type") == "network"), None)


class NetworksService:
    """The networks service plugin (usable in-process): networks in ``store``, made by ``drivers`` (by
    plugin id); containers and their tasks looked up in ``containers`` and ``tasks``."""

    def __init__(
        self,
        store: NetworkStore,
        drivers: Mapping[str, NetworkDriver],
        containers: ContainerStore,
        tasks: TasksService,
        events: Any,
        default_driver: str,
    ) -> None:
        self.store = store
        self.default_driver = default_driver
        self._drivers = dict(drivers)
        self._containers = containers
        self._tasks = tasks
        self._events = events
        self._lock = threading.RLock()  # one change of networks or attachments at a time

    def driver(self, name: str) -> NetworkDriver:
        """The network driver plugin ``name``; NotFound when none of that id is loaded."""
        driver = self._drivers.get(name)
        if driver is None:
            loaded = ", ".join(sorted(self._drivers)) or "none"
            raise NotFound(f'network driver "{name}" is not loaded (loaded: {loaded})')
        return driver

    # -- networks ------------------------------------------------------------------------------

    def create(self, config: NetworkConfig, driver: str = "") -> NetworkRecord:
        """Make the network with ``driver`` (default: :attr:`default_driver`) and record it.

        Errors of :meth:`NetworkStore.check_new` and of the driver's ``create``; nothing is left on failure.
        """
        name = driver or self.default_driver
        backend = self.driver(name)
        with self._lock:
            network = backend.create(self.store.check_new(config))
            try:
                record = self.store.create(name, network)
            except BaseException:
                _remove_from_host(backend, network)
                raise
        event = _pb().NetworkCreate(name=network.name, driver=name, subnet=network.subnet, gateway=network.gateway)
        self._events.publish(network.namespace, "/networks/create", event)
        return record

    def delete(self, namespace: str, name: str, force: bool = False) -> None:
        """Remove the network. NotFound when unknown; FailedPrecondition naming the attached containers
        unless ``force``, which detaches them first."""
        with self._lock:
            record = self.store.get(namespace, name)
            driver = self.driver(record.driver)
            if force:
                for attachment in self.store.attachments(namespace, network=name):
                    self._detach(namespace, record, attachment)
            self.store.delete(namespace, name)
            _remove_from_host(driver, record.network)
        self._events.publish(namespace, "/networks/delete", _pb().NetworkDelete(name=name))

    # -- attachments ---------------------------------------------------------------------------

    def attach(
        self, namespace: str, network: str, container_id: str, address: str | None = None, ifname: str = ""
    ) -> Attachment:
        """Connect the container's netns to ``network`` (as ``ifname``, default the next free ``ethN``).

        The container needs a netns: its sandbox (made when its task was prepared) or its running
        task's own. NotFound for an unknown network or container, or a netns that vanished;
        FailedPrecondition when it has none; AlreadyExists when it is attached already; the driver's
        errors otherwise.
        """
        container = self._containers.get(namespace, container_id)
        with self._lock:
            return self._attach(namespace, network, container.id, self.netns_of(namespace, container), address, ifname)

    def detach(self, namespace: str, network: str, container_id: str) -> None:
        """Disconnect the container from ``network``. NotFound when it is not attached to it."""
        with self._lock:
            record = self.store.get(namespace, network)
            found = self.store.attachments(namespace, network=network, container_id=container_id)
            if not found:
                raise NotFound(f'container "{container_id}" is not attached to network "{network}"')
            self._detach(namespace, record, found[0])

    def netns_of(self, namespace: str, container: Container) -> str:
        """The path of the container's network namespace: its sandbox, else its running task's.

        NotFound when the sandbox's netns vanished; FailedPrecondition when the container has neither
        or shares the host's network namespace.
        """
        sandbox = self.store.sandbox(namespace, container.id)
        if sandbox is not None:
            path = str(NETNS_DIR / sandbox.netns)
            if not os.path.exists(path):
                raise NotFound(f"the network namespace {path} of container {container.id} has vanished")
            return path
        try:
            state = self._tasks.task(namespace, container.id).state()
        except NotFound:
            state = None
        if state is None or state.status is TaskStatus.STOPPED or not state.pid:
            raise FailedPrecondition(
                f"container {container.id} has no running task, so no network namespace: start it first"
                f" (or give it the label {NETWORKS_LABEL})"
            )
        entry = network_namespace(container.spec or {})
        if entry is None:
            raise FailedPrecondition(f"container {container.id} shares the host's network namespace")
        return str(entry.get("path") or f"/proc/{state.pid}/ns/net")

    def interface_target(self, namespace: str, container_id: str) -> tuple[NetworkDriver, str]:
        """The driver to manage the container's interfaces with (that of its first attachment, else the
        default) and the path of its netns (see :meth:`netns_of`)."""
        container = self._containers.get(namespace, container_id)
        attachments = self.store.attachments(namespace, container_id=container_id)
        driver = self.store.get(namespace, attachments[0].network).driver if attachments else self.default_driver
        return self.driver(driver), self.netns_of(namespace, container)

    def _attach(
        self, namespace: str, network: str, container_id: str, netns: str, address: str | None, ifname: str
    ) -> Attachment:
        record = self.store.get(namespace, network)
        driver = self.driver(record.driver)
        attached = self.store.attachments(namespace, container_id=container_id)
        if any(a.network == network for a in attached):
            raise AlreadyExists(f'container "{container_id}" is already attached to network "{network}"')
        taken = {a.ifname for a in attached}
        ifname = ifname or next(f"eth{n}" for n in range(len(taken) + 1) if f"eth{n}" not in taken)
        attachment = driver.attach(record.network, container_id, netns, address, ifname)
        crashpoint("networks.attach.after-veth")
        try:
            self.store.add_attachment(namespace, attachment)
        except BaseException:
            driver.detach(record.network, container_id, netns)
            raise
        event = _pb().NetworkAttach(
            network=network, container_id=container_id, ifname=attachment.ifname, addresses=attachment.addresses
        )
        self._events.publish(namespace, "/networks/attach", event)
        return attachment

    def _detach(self, namespace: str, record: NetworkRecord, attachment: Attachment) -> None:
        try:
            self.driver(record.driver).detach(record.network, attachment.container_id, attachment.netns_path)
        except NotFound:
            if record.driver not in self._drivers:
                raise
            log.info("network %s/%s is gone from the host already", namespace, record.name)
        self.store.remove_attachment(namespace, record.name, attachment.container_id)
        event = _pb().NetworkDetach(network=record.name, container_id=attachment.container_id)
        self._events.publish(namespace, "/networks/detach", event)

    # -- the task's life (hooks) ---------------------------------------------------------------

    @hookimpl
    def containerkit_adjust_spec(
        self, spec: dict[str, Any], namespace: str, container_id: str, labels: dict[str, str]
    ) -> None:
        """A container asking for networks gets its network namespace at :func:`core.netns.netns_path`
        (NotFound for a network that does not exist)."""
        wanted = requested_networks(labels)
        if not wanted:
            return
        for name, _ in wanted:
            self.store.get(namespace, name)
        entry = network_namespace(spec)
        if entry is None:
            entry = {"type": "network"}
            spec.setdefault("linux", {}).setdefault("namespaces", []).append(entry)
        entry["path"] = netns_path(namespace, container_id)

    @hookimpl
    def containerkit_task_prepare(self, namespace: str, container: Container, spec: Mapping[str, Any]) -> None:
        """Make the container's netns and attach it to the networks its label names, in order; undone
        on failure. FailedPrecondition when the spec does not use that netns (made without this service)."""
        wanted = requested_networks(container.labels)
        if not wanted:
            return
        path = netns_path(namespace, container.id)
        if (network_namespace(spec) or {}).get("path") != path:
            raise FailedPrecondition(
                f"container {container.id} asks for networks but its spec's network namespace is not {path}"
                " (it was created while the networks service was not loaded): create it again"
            )
        with self._lock:
            try:
                self._make_sandbox(namespace, container.id)
                attached = {a.network for a in self.store.attachments(namespace, container_id=container.id)}
                for network, address in wanted:
                    if network not in attached:
                        self._attach(namespace, network, container.id, path, address, "")
            except BaseException:
                self.release(namespace, container.id)
                raise

    @hookimpl
    def containerkit_task_released(self, namespace: str, container_id: str) -> None:
        """Detach the container from every network and remove its netns (idempotent)."""
        self.release(namespace, container_id)

    def release(self, namespace: str, container_id: str) -> None:
        """Detach every attachment of the container and remove the netns made for it. An attachment
        that fails to detach stays recorded (the next start-up retries) and its error is raised after
        the rest was released."""
        failures: list[Exception] = []
        with self._lock:
            for attachment in self.store.attachments(namespace, container_id=container_id):
                try:
                    self._detach(namespace, self.store.get(namespace, attachment.network), attachment)
                except Exception as err:
                    log.warning("detaching %s/%s from %s failed: %s", namespace, container_id, attachment.network, err)
                    failures.append(err)
            sandbox = self.store.sandbox(namespace, container_id)
            if sandbox is not None:
                delete_netns(sandbox.netns)
                self.store.remove_sandbox(namespace, container_id)
        if failures:
            raise failures[0]

    def _make_sandbox(self, namespace: str, container_id: str) -> None:
        """Record, then make, the container's netns (recorded first, so a crash leaves a trace)."""
        from core.metadata.networks import Sandbox

        name = netns_name(namespace, container_id)
        self.store.add_sandbox(Sandbox(namespace, container_id, name))
        create_netns(name)

    # -- start-up ------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """Bring the host in line with the records (see the module doc); each step's failure is logged."""
        with self._lock:
            for step in (self._reconcile_networks, self._release_dead, self._remove_stray_netns):
                try:
                    step()
                except Exception:
                    log.exception("reconciling networks: %s failed", step.__name__)

    def _reconcile_networks(self) -> None:
        records = {(r.namespace, r.name): r for r in self.store.list()}
        for driver_name, driver in self._drivers.items():
            present = set()
            for network in driver.networks():
                key = (network.namespace, network.name)
                record = records.get(key)
                if record is None or record.driver != driver_name:
                    log.info("removing network %s/%s of driver %s: no record", *key, driver_name)
                    _logged(_remove_from_host, driver, network)
                    continue
                present.add(key)
                recorded = {a.container_id for a in self.store.attachments(network.namespace, network=network.name)}
                for stray in driver.attachments(network):
                    if stray.container_id not in recorded:
                        log.info("detaching %s from network %s/%s: no record", stray.container_id, *key)
                        _logged(driver.detach, network, stray.container_id, stray.netns_path)
            for key, record in records.items():
                if record.driver == driver_name and key not in present:
                    log.info("making network %s/%s again: recorded but missing on the host", *key)
                    _logged(driver.create, record.config())

    def _release_dead(self) -> None:
        for namespace, container_id in self.store.holders():
            if not self._task_alive(namespace, container_id):
                log.info("releasing the networks of %s/%s: its task is gone", namespace, container_id)
                _logged(self.release, namespace, container_id)

    def _remove_stray_netns(self) -> None:
        from core.metadata.namespaces import NamespaceStore

        recorded = {sandbox.netns for sandbox in self.store.sandboxes()}
        ours = {
            netns_name(namespace, container.id)
            for namespace, _ in NamespaceStore(self.store.store).list()
            for container in self._containers.list(namespace)
        }
        for name in list_netns():
            if name in ours and name not in recorded:
                log.info("removing netns %s: no record", name)
                _logged(delete_netns, name)

    def _task_alive(self, namespace: str, container_id: str) -> bool:
        try:
            return self._tasks.task(namespace, container_id).state().status is not TaskStatus.STOPPED
        except NotFound:
            return False

    # -- the wire ------------------------------------------------------------------------------

    def register(self, server: grpc.Server) -> None:
        from google.protobuf import empty_pb2

        from core.api.containerkit.services.networks.v1 import networks_pb2_grpc as pb_grpc

        service, pb, empty = self, _pb(), empty_pb2.Empty()

        def on_interfaces(request: Any, context: grpc.ServicerContext, act: Callable[[NetworkDriver, str], Any]) -> Any:
            driver, netns = service.interface_target(namespace_of(context), request.container_id)
            act(driver, netns)
            return empty

        class Servicer(pb_grpc.NetworksServicer):
            def Create(self, request: Any, context: grpc.ServicerContext) -> Any:
                config = NetworkConfig(
                    request.name,
                    namespace_of(context),
                    request.subnet,
                    request.gateway,
                    request.mtu,
                    dict(request.labels),
                    dict(request.options),
                )
                return pb.CreateNetworkResponse(network=network_pb(service.create(config, request.driver)))

            def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
                return pb.GetNetworkResponse(network=network_pb(service.store.get(namespace_of(context), request.name)))

            def List(self, request: Any, context: grpc.ServicerContext) -> Any:
                records = service.store.list(namespace_of(context), list(request.filters))
                return pb.ListNetworksResponse(networks=[network_pb(record) for record in records])

            def Delete(self, request: Any, context: grpc.ServicerContext) -> Any:
                service.delete(namespace_of(context), request.name, request.force)
                return empty

            def Attach(self, request: Any, context: grpc.ServicerContext) -> Any:
                attachment = service.attach(
                    namespace_of(context),
                    request.network,
                    request.container_id,
                    request.address or None,
                    request.ifname,
                )
                return pb.AttachResponse(attachment=attachment_pb(attachment))

            def Detach(self, request: Any, context: grpc.ServicerContext) -> Any:
                service.detach(namespace_of(context), request.network, request.container_id)
                return empty

            def ListAttachments(self, request: Any, context: grpc.ServicerContext) -> Any:
                found = service.store.attachments(
                    namespace_of(context), network=request.network, container_id=request.container_id
                )
                return pb.ListAttachmentsResponse(attachments=[attachment_pb(a) for a in found])

            def Interfaces(self, request: Any, context: grpc.ServicerContext) -> Any:
                driver, netns = service.interface_target(namespace_of(context), request.container_id)
                return pb.InterfacesResponse(interfaces=[interface_pb(i) for i in driver.interfaces(netns)])

            def SetMTU(self, request: Any, context: grpc.ServicerContext) -> Any:
                return on_interfaces(request, context, lambda d, netns: d.set_mtu(netns, request.ifname, request.mtu))

            def SetLinkState(self, request: Any, context: grpc.ServicerContext) -> Any:
                def act(driver: NetworkDriver, netns: str) -> None:
                    (driver.set_up if request.up else driver.set_down)(netns, request.ifname)

                return on_interfaces(request, context, act)

            def AddAddress(self, request: Any, context: grpc.ServicerContext) -> Any:
                return on_interfaces(request, context, lambda d, n: d.add_address(n, request.ifname, request.address))

            def RemoveAddress(self, request: Any, context: grpc.ServicerContext) -> Any:
                return on_interfaces(
                    request, context, lambda d, n: d.remove_address(n, request.ifname, request.address)
                )

            def Routes(self, request: Any, context: grpc.ServicerContext) -> Any:
                driver, netns = service.interface_target(namespace_of(context), request.container_id)
                return pb.RoutesResponse(routes=[route_pb(route) for route in driver.routes(netns)])

            def AddRoute(self, request: Any, context: grpc.ServicerContext) -> Any:
                return on_interfaces(request, context, lambda d, n: d.add_route(n, route_of(request.route)))

            def RemoveRoute(self, request: Any, context: grpc.ServicerContext) -> Any:
                return on_interfaces(request, context, lambda d, n: d.remove_route(n, route_of(request.route)))

        pb_grpc.add_NetworksServicer_to_server(Servicer(), server)


def network_pb(record: NetworkRecord) -> Any:
    """The ``networks.v1.Network`` message of a record."""
    n = record.network
    return _pb().Network(
        name=n.name,
        driver=record.driver,
        subnet=n.subnet,
        gateway=n.gateway,
        mtu=n.mtu,
        device=n.device,
        labels=n.labels,
        options=n.options,
        created_at=timestamp(record.created_at),
    )


def attachment_pb(a: Attachment) -> Any:
    """The ``networks.v1.Attachment`` message of an attachment."""
    return _pb().Attachment(
        network=a.network,
        container_id=a.container_id,
        netns_path=a.netns_path,
        ifname=a.ifname,
        host_ifname=a.host_ifname,
        addresses=a.addresses,
        gateway=a.gateway,
        mac=a.mac,
        mtu=a.mtu,
    )


def interface_pb(i: Interface) -> Any:
    """The ``networks.v1.Interface`` message of an interface."""
    return _pb().Interface(
        name=i.name, index=i.index, mac=i.mac, mtu=i.mtu, up=i.up, addresses=i.addresses, kind=i.kind
    )


def route_pb(route: Route) -> Any:
    """The ``networks.v1.Route`` message of a route."""
    return _pb().Route(destination=route.destination, gateway=route.gateway, ifname=route.ifname, metric=route.metric)


def route_of(message: Any) -> Route:
    """The :class:`Route` a ``networks.v1.Route`` message describes; InvalidArgument without destination."""
    if not message.destination:
        raise InvalidArgument("a route needs a destination (CIDR or default)")
    return Route(message.destination, message.gateway, message.ifname, message.metric)


def _pb() -> Any:
    """The service's message module (imported on first use)."""
    from core.api.containerkit.services.networks.v1 import networks_pb2

    return networks_pb2


def _remove_from_host(driver: NetworkDriver, network: Network) -> None:
    """Remove ``network`` from the host with whatever the driver still has attached to it; nothing when
    the driver does not know it."""
    try:
        for attachment in driver.attachments(network):
            driver.detach(network, attachment.container_id, attachment.netns_path)
        driver.delete(network)
    except NotFound:
        pass


def _logged(action: Callable[..., Any], *args: Any) -> None:
    """Run ``action(*args)`` during reconciliation: a failure is logged and the reconciliation goes on."""
    try:
        action(*args)
    except Exception:
        log.exception("reconciling networks: %s%r failed", getattr(action, "__name__", action), args)


def _init(context: InitContext) -> NetworksService:
    from core.metadata.networks import NetworkStore

    config: NetworksServiceConfig = context.config
    service = NetworksService(
        NetworkStore(context.metadata),
        context.get_all("network"),
        context.get("service", "containers").store,
        context.get("service", "tasks"),
        context.events,
        config.default_driver,
    )
    service.reconcile()
    return service


plugin = Registration(
    init=_init,
    requires=("network", "service.containers", "service.tasks"),
    config=NetworksServiceConfig,
)
