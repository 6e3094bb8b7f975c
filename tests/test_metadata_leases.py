"""Leases in the metadata store: containerd's semantics, per namespace, and their garbage-collection kind."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from core.errors import AlreadyExists, InvalidArgument, NotFound, NotImplementedByPlugin
from core.gc import Resource, ResourceKind
from core.identifiers import validate
from core.metadata import LeaseKind, LeaseResource, LeaseStore, MetadataStore, NamespaceStore
from core.metadata.leases import LABEL_GC_EXPIRE, parse_rfc3339

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    with MetadataStore(tmp_path / "meta.db") as opened:
        yield opened


@pytest.fixture
def leases(store: MetadataStore) -> LeaseStore:
    return LeaseStore(store)


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- create, list, delete ------------------------------------------------------------------------


def test_create_returns_the_lease_with_its_creation_time_and_labels(leases: LeaseStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    lease = leases.create("default", "pull-1", {"app": "ctr"})
    assert lease.id == "pull-1"
    assert lease.labels == {"app": "ctr"}
    assert before <= lease.created_at <= datetime.now(UTC)
    assert leases.list("default") == [lease]
    assert leases.get("default", "pull-1") == lease


def test_create_makes_the_namespace(store: MetadataStore, leases: LeaseStore) -> None:
    leases.create("fresh", "l")
    assert NamespaceStore(store).exists("fresh")


def test_an_empty_id_gets_a_generated_unique_valid_identifier(leases: LeaseStore) -> None:
    ids = {leases.create("default").id for _ in range(50)}
    assert len(ids) == 50
    for lease_id in ids:
        assert validate(lease_id) == lease_id
    assert sorted(lease.id for lease in leases.list("default")) == sorted(ids)


def test_creating_an_existing_id_is_already_exists(leases: LeaseStore) -> None:
    leases.create("default", "l")
    with pytest.raises(AlreadyExists, match='lease "l": already exists'):
        leases.create("default", "l")


@pytest.mark.parametrize("odd", ["929647489-dna_", "/tmp/mnt/target", "a b", "-x", "a" * 300])
def test_any_non_empty_id_is_accepted_as_containerd_does(leases: LeaseStore, odd: str) -> None:
    assert leases.create("default", odd).id == odd
    assert [lease.id for lease in leases.list("default")] == [odd]


def test_invalid_namespace_is_invalid_argument(leases: LeaseStore) -> None:
    with pytest.raises(InvalidArgument):
        leases.create("not a namespace", "l")


def test_labels_are_validated_and_empty_values_dropped(leases: LeaseStore) -> None:
    with pytest.raises(InvalidArgument):
        leases.create("default", "l", {"": "v"})
    with pytest.raises(InvalidArgument):
        leases.create("default", "l", {"k": "v" * 5000})
    lease = leases.create("default", "l", {"k": "v", "gone": ""})
    assert lease.labels == {"k": "v"}
    assert leases.get("default", "l").labels == {"k": "v"}


@pytest.mark.parametrize(
    "bad", ["tomorrow", "2024-01-01", "2024-01-01T00:00:00", "2024-13-01T00:00:00Z", "2024-01-01 00:00:00Z", "24h"]
)
def test_a_malformed_expiry_label_is_invalid_argument(leases: LeaseStore, bad: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(LABEL_GC_EXPIRE)):
        leases.create("default", "l", {LABEL_GC_EXPIRE: bad})
    assert leases.list("default") == []


def test_a_valid_expiry_is_exposed(leases: LeaseStore) -> None:
    lease = leases.create("default", "l", {LABEL_GC_EXPIRE: "2030-01-02T03:04:05Z"})
    assert lease.expires_at == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert leases.create("default", "m").expires_at is None


def test_leases_are_per_namespace(leases: LeaseStore) -> None:
    leases.create("a", "same")
    leases.create("b", "same", {"in": "b"})
    assert [lease.labels for lease in leases.list("b")] == [{"in": "b"}]
    leases.delete("a", "same")
    assert leases.list("a") == []
    assert [lease.id for lease in leases.list("b")] == ["same"]
    with pytest.raises(NotFound):
        leases.get("a", "same")


def test_list_filters_on_id_and_labels(leases: LeaseStore) -> None:
    leases.create("default", "one", {"kind": "pull"})
    leases.create("default", "two", {"kind": "build", "x.y": "z"})
    leases.create("default", "three")
    assert [lease.id for lease in leases.list("default", ["id==two"])] == ["two"]
    assert [lease.id for lease in leases.list("default", ['labels."kind"==pull'])] == ["one"]
    assert [lease.id for lease in leases.list("default", ["labels.kind"])] == ["one", "two"]
    assert [lease.id for lease in leases.list("default", ["labels.x.y==z"])] == ["two"]
    assert [lease.id for lease in leases.list("default", ["id==one", "id==three"])] == ["one", "three"]
    assert len(leases.list("default", [])) == 3
    with pytest.raises(InvalidArgument):
        leases.list("default", ["id=="])


def test_creating_a_lease_waits_for_a_running_collection(store: MetadataStore, leases: LeaseStore) -> None:
    done = threading.Event()
    with store.gc_lock:  # what the collector holds from mark to sweep
        thread = threading.Thread(target=lambda: (leases.create("default", "l"), done.set()))
        thread.start()
        assert not done.wait(0.2)
    thread.join()
    assert [lease.id for lease in leases.list("default")] == ["l"]


def test_deleting_an_unknown_lease_is_not_found(leases: LeaseStore) -> None:
    with pytest.raises(NotFound, match='lease "nope": not found'):
        leases.delete("default", "nope")


def test_a_namespace_holding_only_leases_can_be_deleted(store: MetadataStore, leases: LeaseStore) -> None:
    leases.create("temp", "l", {"k": "v"})
    leases.add_resource("temp", "l", LeaseResource(DIGEST, "content"))
    NamespaceStore(store).delete("temp")
    assert leases.list("temp") == []
    with store.read() as conn:
        assert conn.execute("SELECT count(*) FROM lease_resources").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM lease_labels").fetchone() == (0,)


# -- resources -----------------------------------------------------------------------------------


def test_resources_are_added_once_and_listed_by_type(leases: LeaseStore) -> None:
    leases.create("default", "l")
    for resource in (
        LeaseResource("snap-1", "snapshots/overlayfs"),
        LeaseResource("ref-1", "ingests"),
        LeaseResource(DIGEST, "content"),
        LeaseResource(DIGEST, "content"),
    ):
        leases.add_resource("default", "l", resource)
    assert leases.list_resources("default", "l") == [
        LeaseResource(DIGEST, "content"),
        LeaseResource("ref-1", "ingests"),
        LeaseResource("snap-1", "snapshots/overlayfs"),
    ]


def test_deleting_a_resource_releases_it_and_an_absent_one_is_fine(leases: LeaseStore) -> None:
    leases.create("default", "l")
    leases.add_resource("default", "l", LeaseResource("ref-1", "ingests"))
    leases.delete_resource("default", "l", LeaseResource("ref-1", "ingests"))
    leases.delete_resource("default", "l", LeaseResource("ref-1", "ingests"))
    leases.delete_resource("default", "l", LeaseResource("never", "snapshots/overlayfs"))
    assert leases.list_resources("default", "l") == []


def test_resources_of_an_unknown_lease_are_not_found(leases: LeaseStore) -> None:
    leases.create("other", "l")
    resource = LeaseResource("ref", "ingests")
    with pytest.raises(NotFound, match='lease "l": not found'):
        leases.add_resource("default", "l", resource)
    with pytest.raises(NotFound):
        leases.delete_resource("default", "l", resource)
    with pytest.raises(NotFound):
        leases.list_resources("default", "l")


@pytest.mark.parametrize(
    ("resource", "error"),
    [
        (LeaseResource("not-a-digest", "content"), InvalidArgument),
        (LeaseResource(DIGEST, "content/x"), InvalidArgument),
        (LeaseResource("ref", "ingests/x"), InvalidArgument),
        (LeaseResource("key", "snapshots"), InvalidArgument),
        (LeaseResource("key", "snapshots/"), InvalidArgument),
        (LeaseResource("key", "snapshots/a/b"), InvalidArgument),
        (LeaseResource("", "ingests"), InvalidArgument),
        (LeaseResource("c1", "containers"), NotImplementedByPlugin),
    ],
)
def test_malformed_resources_are_refused(leases: LeaseStore, resource: LeaseResource, error: type[Exception]) -> None:
    leases.create("default", "l")
    with pytest.raises(error):
        leases.add_resource("default", "l", resource)
    assert leases.list_resources("default", "l") == []


def test_deleting_a_lease_drops_its_resources(store: MetadataStore, leases: LeaseStore) -> None:
    leases.create("default", "l")
    leases.add_resource("default", "l", LeaseResource("ref", "ingests"))
    leases.delete("default", "l")
    leases.create("default", "l")
    assert leases.list_resources("default", "l") == []


# -- RFC 3339 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00.5Z", datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)),
        ("2024-05-01T12:00:00.123456789Z", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T07:30:00-04:30", datetime(2024, 5, 1, 12, tzinfo=UTC)),
    ],
)
def test_rfc3339_parses_as_go_does(text: str, expected: datetime) -> None:
    parsed = parse_rfc3339(text)
    assert parsed == expected
    assert parsed.tzinfo is not None


@pytest.mark.parametrize(
    "text", ["2024-05-01T12:00:00z", "2024-05-01t12:00:00Z", "2024-05-01T12:00Z", "2024-02-30T00:00:00Z"]
)
def test_rfc3339_rejects_what_go_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_rfc3339(text)


def test_rfc3339_keeps_the_offset() -> None:
    assert parse_rfc3339("2024-05-01T14:00:00+02:00").utcoffset() == timedelta(hours=2)
    assert parse_rfc3339("2024-05-01T14:00:00+02:00").tzinfo == timezone(timedelta(hours=2))


# -- the GC kind ---------------------------------------------------------------------------------


def test_lease_kind_satisfies_the_protocol(leases: LeaseStore) -> None:
    kind = LeaseKind(leases)
    assert isinstance(kind, ResourceKind)
    assert kind.types == ("lease",)


def test_unexpired_leases_are_roots_and_expired_ones_are_not(leases: LeaseStore) -> None:
    now = datetime.now(UTC)
    leases.create("a", "forever")
    leases.create("a", "later", {LABEL_GC_EXPIRE: _rfc3339(now + timedelta(hours=1))})
    leases.create("b", "gone", {LABEL_GC_EXPIRE: _rfc3339(now - timedelta(seconds=5))})
    kind = LeaseKind(leases)
    assert sorted(kind.roots()) == [Resource("lease", "a", "forever"), Resource("lease", "a", "later")]
    assert sorted(kind.all()) == [
        Resource("lease", "a", "forever"),
        Resource("lease", "a", "later"),
        Resource("lease", "b", "gone"),
    ]


def test_an_unparsable_stored_expiry_keeps_the_lease_a_root(store: MetadataStore, leases: LeaseStore) -> None:
    leases.create("a", "odd")
    with store.transaction() as conn:  # written by something older or by hand: containerd ignores it
        conn.execute("INSERT INTO lease_labels VALUES ('a', 'odd', ?, 'soon')", (LABEL_GC_EXPIRE,))
    assert list(LeaseKind(leases).roots()) == [Resource("lease", "a", "odd")]


def test_a_lease_references_what_it_holds(leases: LeaseStore) -> None:
    leases.create("a", "l")
    leases.add_resource("a", "l", LeaseResource(DIGEST, "content"))
    leases.add_resource("a", "l", LeaseResource("pull-ref", "ingests"))
    leases.add_resource("a", "l", LeaseResource("layer-1", "snapshots/overlayfs"))
    leases.create("b", "l")
    kind = LeaseKind(leases)
    assert sorted(kind.references(Resource("lease", "a", "l"))) == [
        Resource("content", "a", DIGEST),
        Resource("ingest", "a", "pull-ref"),
        Resource("snapshot/overlayfs", "a", "layer-1"),
    ]
    assert list(kind.references(Resource("lease", "b", "l"))) == []
    assert list(kind.references(Resource("lease", "a", "missing"))) == []


def test_removing_leases_deletes_them_and_reports_only_existing_ones(leases: LeaseStore) -> None:
    leases.create("a", "l1")
    leases.create("a", "l2")
    kind = LeaseKind(leases)
    removed = kind.remove([Resource("lease", "a", "l1"), Resource("lease", "a", "never")])
    assert removed == [Resource("lease", "a", "l1")]
    assert [lease.id for lease in leases.list("a")] == ["l2"]
