"""The networks' records (core.metadata.networks): validation, uniqueness, overlap, attachments, sandboxes."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.metadata import MetadataStore, NamespaceStore
from core.metadata.networks import NetworkStore, Sandbox, validate_config
from core.network import Attachment, Network, NetworkConfig


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NetworkStore]:
    with MetadataStore(tmp_path / "meta.db") as metadata:
        yield NetworkStore(metadata)


def made(
    name: str, subnet: str, namespace: str = "default", labels: Mapping[str, str] = {}, options: Mapping[str, str] = {}
) -> Network:
    """A network as a driver would report it (gateway the first address)."""
    gateway = subnet.rsplit(".", 1)[0] + ".1"
    return Network(name, namespace, subnet, gateway, 1500, f"ck-{name}", labels, options)


def attachment(network: str, container: str, address: str = "10.240.1.2/24") -> Attachment:
    return Attachment(
        network, container, f"/run/netns/{container}", "eth0", f"ckv{container}", (address,), "", "", 1500
    )


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (NetworkConfig("front", "default", "10.240.1.0/33"), "invalid subnet"),
        (NetworkConfig("front", "default", "not-a-subnet"), "invalid subnet"),
        (NetworkConfig("front", "default", "10.240.1.1/24"), "has host bits set"),
        (NetworkConfig("front", "default", "10.240.1.0/31"), "too small"),
        (NetworkConfig("front", "default", "10.240.1.0/24", gateway="10.240.2.1"), "not a host address"),
        (NetworkConfig("front", "default", "10.240.1.0/24", gateway="10.240.1.255"), "not a host address"),
        (NetworkConfig("front", "default", "10.240.1.0/24", gateway="nope"), "invalid gateway"),
        (NetworkConfig("front", "default", "10.240.1.0/24", mtu=67), "MTU 67 is out of range"),
        (NetworkConfig("front", "default", "10.240.1.0/24", mtu=70000), "MTU 70000 is out of range"),
        (NetworkConfig("x" * 77, "default", "10.240.1.0/24"), "greater than maximum length"),
        (NetworkConfig("a/b", "default", "10.240.1.0/24"), "must match"),
        (NetworkConfig("front", "default", "10.240.1.0/24", labels={"": "v"}), "label key"),
    ],
)
def test_invalid_configs_are_refused(config: NetworkConfig, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_config(config)


def test_a_valid_config_is_normalised() -> None:
    config = validate_config(NetworkConfig("front", "default", "10.240.1.0/24", gateway="10.240.1.254", mtu=9000))
    assert (config.subnet, config.gateway, config.mtu) == ("10.240.1.0/24", "10.240.1.254", 9000)


def test_create_get_list_delete(store: NetworkStore) -> None:
    record = store.create("bridge", made("front", "10.240.1.0/24", labels={"team": "a"}, options={"k": "v"}))
    assert (record.name, record.namespace, record.driver) == ("front", "default", "bridge")
    assert store.get("default", "front") == record
    store.create("bridge", made("back", "10.240.2.0/24"))
    store.create("bridge", made("front", "10.240.3.0/24", namespace="other"))
    assert [r.name for r in store.list("default")] == ["back", "front"]
    assert [(r.namespace, r.name) for r in store.list()] == [
        ("default", "back"),
        ("default", "front"),
        ("other", "front"),
    ]
    assert [r.name for r in store.list("default", ["labels.team==a"])] == ["front"]
    assert store.get("default", "front").network.options == {"k": "v"}
    assert record.config() == NetworkConfig(
        "front", "default", "10.240.1.0/24", "10.240.1.1", 1500, {"team": "a"}, {"k": "v"}
    )
    store.delete("default", "front")
    with pytest.raises(NotFound, match='network "front" in namespace "default": not found'):
        store.get("default", "front")
    with pytest.raises(NotFound):
        store.delete("default", "front")


def test_names_are_unique_per_namespace_and_subnets_may_not_overlap_anywhere(store: NetworkStore) -> None:
    store.create("bridge", made("front", "10.240.1.0/24"))
    with pytest.raises(AlreadyExists, match="already exists"):
        store.check_new(NetworkConfig("front", "default", "10.240.9.0/24"))
    with pytest.raises(AlreadyExists):
        store.create("bridge", made("front", "10.240.9.0/24"))
    for subnet in ("10.240.1.128/25", "10.240.0.0/16"):
        with pytest.raises(
            FailedPrecondition, match=re.escape('overlaps 10.240.1.0/24 of network "front" in namespace "default"')
        ):
            store.check_new(NetworkConfig("other", "elsewhere", subnet))
    assert store.check_new(NetworkConfig("front", "elsewhere", "10.240.2.0/24")).subnet == "10.240.2.0/24"


def test_a_network_with_attachments_is_not_deleted_and_keeps_its_namespace(store: NetworkStore) -> None:
    store.create("bridge", made("front", "10.240.1.0/24"))
    store.add_attachment("default", attachment("front", "web"))
    store.add_attachment("default", attachment("front", "db", "10.240.1.3/24"))
    with pytest.raises(AlreadyExists, match='"web" is already attached to network "front"'):
        store.add_attachment("default", attachment("front", "web"))
    with pytest.raises(NotFound):
        store.add_attachment("default", attachment("nowhere", "web"))
    with pytest.raises(FailedPrecondition, match="in use by container\\(s\\) db, web"):
        store.delete("default", "front")
    with pytest.raises(FailedPrecondition, match="still has networks"):
        NamespaceStore(store.store).delete("default")
    assert store.attachments("default", container_id="web") == [attachment("front", "web")]
    assert [a.container_id for a in store.attachments("default", network="front")] == ["web", "db"]
    assert store.remove_attachment("default", "front", "web")
    assert not store.remove_attachment("default", "front", "web")
    store.remove_attachment("default", "front", "db")
    store.delete("default", "front")
    NamespaceStore(store.store).delete("default")


def test_sandboxes_and_holders(store: NetworkStore) -> None:
    store.create("bridge", made("front", "10.240.1.0/24"))
    store.add_sandbox(Sandbox("default", "web", "ck-0123456789ab"))
    store.add_sandbox(Sandbox("default", "web", "ck-0123456789ab"))  # again: a no-op
    store.add_attachment("default", attachment("front", "db"))
    assert store.sandbox("default", "web") == Sandbox("default", "web", "ck-0123456789ab")
    assert store.sandbox("default", "db") is None
    assert store.sandboxes() == [Sandbox("default", "web", "ck-0123456789ab")]
    assert store.holders() == [("default", "db"), ("default", "web")]
    store.remove_sandbox("default", "web")
    store.remove_sandbox("default", "web")
    assert store.holders() == [("default", "db")]


def test_records_survive_reopening(tmp_path: Path) -> None:
    with MetadataStore(tmp_path / "meta.db") as metadata:
        store = NetworkStore(metadata)
        store.create("bridge", made("front", "10.240.1.0/24"))
        store.add_attachment("default", attachment("front", "web"))
    with MetadataStore(tmp_path / "meta.db") as metadata:
        store = NetworkStore(metadata)
        assert store.get("default", "front").network == made("front", "10.240.1.0/24")
        assert store.attachments("default") == [attachment("front", "web")]
