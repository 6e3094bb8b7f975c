"""Content metadata: per-namespace views of the shared local content store, and its garbage-collection kind.

The backend is the real ``plugins.content_local`` store on a temporary directory.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from core.content import Info, Writer
from core.digest import Digest
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from core.gc import Collector, Resource, ResourceKind
from core.hookspecs import hookimpl, new_plugin_manager
from core.metadata import (
    ContentKind,
    ContentMetadata,
    Image,
    ImageKind,
    ImageStore,
    LeaseKind,
    LeaseResource,
    LeaseStore,
    MetadataStore,
    NamespaceStore,
)
from core.metadata.leases import LABEL_GC_EXPIRE
from core.types import Descriptor
from plugins.content_local import LocalContentStore

HELLO = b"hello, world\n"
HELLO_DIGEST = Digest.from_bytes(HELLO)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    with MetadataStore(tmp_path / "meta.db") as opened:
        yield opened


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LocalContentStore]:
    local = LocalContentStore(tmp_path / "content")
    yield local
    local.close()


@pytest.fixture
def content(store: MetadataStore, backend: LocalContentStore) -> ContentMetadata:
    return ContentMetadata(store, backend)


def commit(
    content: ContentMetadata,
    namespace: str,
    data: bytes,
    ref: str | None = None,
    labels: Mapping[str, str] | None = None,
    lease: str | None = None,
) -> Digest:
    """Write ``data`` through a fresh writer and commit it with ``labels``."""
    digest = Digest.from_bytes(data)
    with content.writer(namespace, ref or f"ref-{digest.hex[:12]}", lease=lease) as writer:
        writer.write(data)
        return writer.commit(len(data), digest, labels)


def blob_files(root: Path) -> list[Path]:
    return sorted(path for path in (root / "content" / "blobs").rglob("*") if path.is_file())


# -- visibility per namespace --------------------------------------------------------------------


def test_a_committed_blob_is_visible_in_its_namespace_only(content: ContentMetadata) -> None:
    digest = commit(content, "a", HELLO)
    assert digest == HELLO_DIGEST
    info = content.info("a", digest)
    assert (info.digest, info.size) == (digest, len(HELLO))
    with content.reader_at("a", digest) as reader:
        assert reader.read(0, 100) == HELLO
    with pytest.raises(NotFound, match=f"content digest {digest}: not found"):
        content.info("b", digest)
    with pytest.raises(NotFound):
        content.reader_at("b", Descriptor("application/octet-stream", digest, len(HELLO)))
    assert [i.digest for i in content.walk("a")] == [digest]
    assert list(content.walk("b")) == []


def test_committing_bytes_the_backend_has_is_instant_and_stores_no_second_copy(
    content: ContentMetadata, tmp_path: Path
) -> None:
    commit(content, "a", HELLO)
    files = blob_files(tmp_path)
    assert commit(content, "b", HELLO) == HELLO_DIGEST
    assert blob_files(tmp_path) == files
    assert content.info("b", HELLO_DIGEST).size == len(HELLO)
    assert content.list_statuses("b") == []


def test_a_writer_expecting_content_of_another_namespace_starts_complete(content: ContentMetadata) -> None:
    commit(content, "a", HELLO)
    with content.writer("b", "pull", expected_digest=HELLO_DIGEST) as writer:
        assert writer.offset == len(HELLO)
        assert writer.digest() == HELLO_DIGEST
        status = writer.status()
        assert (status.ref, status.offset, status.total, status.expected) == ("pull", 13, 13, HELLO_DIGEST)
        assert content.status("b", "pull").offset == len(HELLO)
        assert writer.commit(len(HELLO), HELLO_DIGEST, {"k": "v"}) == HELLO_DIGEST
    assert content.info("b", HELLO_DIGEST).labels == {"k": "v"}
    with pytest.raises(NotFound):
        content.status("b", "pull")


def test_a_shared_writer_can_still_be_rewritten_from_scratch(content: ContentMetadata) -> None:
    commit(content, "a", HELLO)
    with content.writer("b", "pull", len(HELLO), HELLO_DIGEST) as writer:
        writer.truncate(0)
        assert writer.offset == 0
        writer.write(HELLO[:5])
        assert content.status("b", "pull").offset == 5
        writer.write(HELLO[5:])
        assert writer.commit(len(HELLO), HELLO_DIGEST) == HELLO_DIGEST
    assert content.info("b", HELLO_DIGEST).size == len(HELLO)


def test_a_shared_writer_truncated_part_way_keeps_the_prefix(content: ContentMetadata) -> None:
    commit(content, "a", HELLO)
    with content.writer("b", "pull", expected_digest=HELLO_DIGEST) as writer:
        writer.truncate(5)
        assert writer.offset == 5
        writer.write(HELLO[5:])
        assert writer.commit() == HELLO_DIGEST


def test_a_shared_writer_refuses_a_contradicting_commit(content: ContentMetadata) -> None:
    commit(content, "a", HELLO)
    writer = content.writer("b", "pull", expected_digest=HELLO_DIGEST)
    with pytest.raises(FailedPrecondition, match="size validation"):
        writer.commit(3)
    with pytest.raises(NotFound):
        content.info("b", HELLO_DIGEST)
    assert [s.ref for s in content.list_statuses("b")] == ["pull"]


def test_a_shared_writer_of_another_size_writes_everything(content: ContentMetadata) -> None:
    commit(content, "a", HELLO)
    with content.writer("b", "pull", expected_size=99, expected_digest=HELLO_DIGEST) as writer:
        assert writer.offset == 0


def test_isolated_policy_makes_every_namespace_write_the_bytes(
    store: MetadataStore, backend: LocalContentStore, tmp_path: Path
) -> None:
    isolated = ContentMetadata(store, backend, shared=False)
    commit(isolated, "a", HELLO)
    with isolated.writer("b", "pull", expected_digest=HELLO_DIGEST) as writer:
        assert writer.offset == 0
        writer.write(HELLO)
        assert writer.commit(len(HELLO), HELLO_DIGEST) == HELLO_DIGEST
    assert isolated.info("b", HELLO_DIGEST).size == len(HELLO)
    assert len(blob_files(tmp_path)) == 1


def test_a_writer_for_content_the_namespace_holds_is_already_exists(content: ContentMetadata) -> None:
    commit(content, "a", HELLO)
    with pytest.raises(AlreadyExists, match=f"content {HELLO_DIGEST}: already exists"):
        content.writer("a", "again", expected_digest=HELLO_DIGEST)
    with content.writer("a", "again") as writer:  # the ref was released
        assert writer.offset == 0


def test_committing_content_the_namespace_already_holds_is_already_exists(content: ContentMetadata) -> None:
    first = content.writer("a", "one")
    second = content.writer("a", "two")
    first.write(HELLO)
    second.write(HELLO)
    assert first.commit() == HELLO_DIGEST
    with pytest.raises(AlreadyExists):
        second.commit()
    assert content.list_statuses("a") == []
    assert content.info("a", HELLO_DIGEST).size == len(HELLO)


def test_namespaces_are_created_on_first_write(store: MetadataStore, content: ContentMetadata) -> None:
    namespaces = NamespaceStore(store)
    content.writer("ingest-only", "r").close()
    assert namespaces.exists("ingest-only")
    commit(content, "with-blob", HELLO)
    assert namespaces.exists("with-blob")
    with pytest.raises(InvalidArgument):
        content.writer("bad name", "r")


def test_a_namespace_holding_blobs_cannot_be_deleted_but_ingests_do_not_count(
    store: MetadataStore, content: ContentMetadata, backend: LocalContentStore
) -> None:
    namespaces = NamespaceStore(store)
    commit(content, "busy", HELLO)
    with pytest.raises(FailedPrecondition, match=r'namespace "busy" must be empty, but it still has blobs$'):
        namespaces.delete("busy")
    ImageStore(store).create("busy", Image("i", Descriptor("application/json", HELLO_DIGEST, len(HELLO))))
    with pytest.raises(FailedPrecondition, match=r"but it still has images, blobs$"):
        namespaces.delete("busy")
    with content.writer("only-ingests", "r") as writer:
        writer.write(b"partial")
    namespaces.delete("only-ingests")
    assert content.list_statuses("only-ingests") == []


# -- info, update, walk, delete ------------------------------------------------------------------


def test_labels_and_times_are_per_namespace(content: ContentMetadata) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    commit(content, "a", HELLO, labels={"owner": "a", "empty": ""})
    time.sleep(0.002)
    commit(content, "b", HELLO, labels={"owner": "b"})
    info_a, info_b = content.info("a", HELLO_DIGEST), content.info("b", HELLO_DIGEST)
    assert info_a.labels == {"owner": "a"}
    assert info_b.labels == {"owner": "b"}
    assert before <= info_a.created_at == info_a.updated_at < info_b.created_at
    content.update("a", Info(HELLO_DIGEST, labels={"owner": "changed"}))
    assert content.info("b", HELLO_DIGEST).labels == {"owner": "b"}


def test_update_without_paths_replaces_all_labels(content: ContentMetadata) -> None:
    commit(content, "a", HELLO, labels={"x": "1", "y": "2"})
    created = content.info("a", HELLO_DIGEST)
    time.sleep(0.002)
    updated = content.update("a", Info(HELLO_DIGEST, size=999, labels={"z": "3"}))
    assert updated.labels == {"z": "3"}
    assert updated.size == len(HELLO)
    assert updated.created_at == created.created_at
    assert updated.updated_at > created.updated_at
    assert content.info("a", HELLO_DIGEST) == updated


def test_update_labels_path_replaces_and_label_paths_set_or_clear(content: ContentMetadata) -> None:
    commit(content, "a", HELLO, labels={"x": "1", "y": "2"})
    assert content.update("a", Info(HELLO_DIGEST, labels={"w": "0"}), ["labels"]).labels == {"w": "0"}
    updated = content.update(
        "a", Info(HELLO_DIGEST, labels={"w": "", "v": "5", "u": "ignored"}), ["labels.w", "labels.v"]
    )
    assert updated.labels == {"v": "5"}
    assert content.update("a", Info(HELLO_DIGEST), ["labels.v"]).labels == {}
    assert content.info("a", HELLO_DIGEST).labels == {}


def test_update_of_another_field_is_invalid_argument(content: ContentMetadata) -> None:
    commit(content, "a", HELLO, labels={"x": "1"})
    with pytest.raises(InvalidArgument, match=f'cannot update "size" field on content info "{HELLO_DIGEST}"'):
        content.update("a", Info(HELLO_DIGEST, labels={"y": "2"}), ["labels.y", "size"])
    assert content.info("a", HELLO_DIGEST).labels == {"x": "1"}


def test_update_with_an_invalid_label_changes_nothing(content: ContentMetadata) -> None:
    commit(content, "a", HELLO, labels={"x": "1"})
    with pytest.raises(InvalidArgument):
        content.update("a", Info(HELLO_DIGEST, labels={"x": "v" * 5000}))
    assert content.info("a", HELLO_DIGEST).labels == {"x": "1"}


def test_update_of_a_blob_the_namespace_does_not_hold_is_not_found(content: ContentMetadata) -> None:
    commit(content, "a", HELLO)
    with pytest.raises(NotFound):
        content.update("b", Info(HELLO_DIGEST, labels={"x": "1"}))


def test_walk_filters_on_digest_size_and_labels(content: ContentMetadata) -> None:
    one = commit(content, "a", b"one", labels={"kind": "layer", "a.b": "c"})
    two = commit(content, "a", b"two!", labels={"kind": "config"})
    three = commit(content, "a", b"three")

    def walked(*filters: str) -> list[Digest]:
        return [info.digest for info in content.walk("a", list(filters))]

    assert walked() == sorted([one, two, three])
    assert walked(f"digest=={two}") == [two]
    assert walked("size==5") == [three]
    assert walked('labels."kind"==layer') == [one]
    assert walked("labels.a.b==c") == [one]
    assert sorted(walked("labels.kind==layer", "labels.kind==config")) == sorted([one, two])
    assert walked("labels.kind") == sorted([one, two])
    with pytest.raises(InvalidArgument):
        content.walk("a", ["labels.kind=="])


def test_blob_records_are_what_walk_yields_with_times_in_nanoseconds(content: ContentMetadata) -> None:
    one = commit(content, "a", b"one", labels={"kind": "layer", "a.b": "c"})
    commit(content, "a", b"two!", labels={"kind": "config"})
    commit(content, "a", b"three")
    commit(content, "b", b"elsewhere")

    for filters in ([], ["labels.kind"], [f"digest=={one}"], ["size==5"], ["labels.kind==layer", "size==4"]):
        infos = list(content.walk("a", filters))
        records = content.blob_records("a", filters)
        assert [(d, size, labels) for d, size, _, _, labels in records] == [
            (info.digest, info.size, info.labels) for info in infos
        ]
        for (_, _, created, updated, _), info in zip(records, infos, strict=True):
            epoch = datetime(1970, 1, 1, tzinfo=UTC)
            assert epoch + timedelta(microseconds=created // 1000) == info.created_at
            assert epoch + timedelta(microseconds=updated // 1000) == info.updated_at
    records = content.blob_records("a")
    assert records[0][4] is not records[1][4]  # each record has a labels dict of its own
    assert content.blob_records("nobody") == []
    with pytest.raises(InvalidArgument):
        content.blob_records("a", ["labels.kind=="])


def test_delete_hides_the_blob_but_leaves_the_bytes_for_gc(
    content: ContentMetadata, backend: LocalContentStore
) -> None:
    commit(content, "a", HELLO)
    content.delete("a", HELLO_DIGEST)
    with pytest.raises(NotFound):
        content.info("a", HELLO_DIGEST)
    with pytest.raises(NotFound):
        content.reader_at("a", HELLO_DIGEST)
    with pytest.raises(NotFound, match="not found"):
        content.delete("a", HELLO_DIGEST)
    assert backend.info(HELLO_DIGEST).size == len(HELLO)
    removed = ContentKind(content).remove([Resource("content", "", HELLO_DIGEST)])
    assert removed == [Resource("content", "", HELLO_DIGEST)]
    with pytest.raises(NotFound):
        backend.info(HELLO_DIGEST)


def test_a_deleted_blob_comes_back_when_committed_again(content: ContentMetadata) -> None:
    commit(content, "a", HELLO, labels={"old": "1"})
    content.delete("a", HELLO_DIGEST)
    commit(content, "a", HELLO)
    assert content.info("a", HELLO_DIGEST).labels == {}


def test_invalid_digests_are_invalid_argument(content: ContentMetadata) -> None:
    for call in (content.info, content.delete, content.reader_at):
        with pytest.raises(InvalidArgument):
            call("a", "sha256:nope")


# -- writers and ingests -------------------------------------------------------------------------


def test_ingests_use_namespaced_backend_refs_and_show_local_refs(
    content: ContentMetadata, backend: LocalContentStore
) -> None:
    with content.writer("a", "layer-1", expected_size=len(HELLO)) as writer:
        assert writer.ref == "layer-1"
        writer.write(HELLO[:4])
        assert writer.status().ref == "layer-1"
    status = content.status("a", "layer-1")
    assert (status.ref, status.offset, status.total) == ("layer-1", 4, len(HELLO))
    assert [s.ref for s in content.list_statuses("a")] == ["layer-1"]
    assert [s.ref for s in backend.list_statuses()] == ["a/layer-1"]
    with pytest.raises(NotFound, match="reference layer-1: not found"):
        content.status("b", "layer-1")


def test_one_writer_per_ref_and_namespace(content: ContentMetadata) -> None:
    writer = content.writer("a", "r")
    with pytest.raises(Unavailable, match="ref r locked"):
        content.writer("a", "r")
    other = content.writer("b", "r")  # another namespace: another backend ref
    other.write(b"bbb")
    writer.write(b"aa")
    other.close()
    writer.close()
    with content.writer("a", "r") as resumed:
        assert resumed.offset == 2
    assert content.status("b", "r").offset == 3


def test_the_ref_is_released_after_commit_and_after_a_failed_commit(content: ContentMetadata) -> None:
    writer = content.writer("a", "r")
    writer.write(HELLO)
    with pytest.raises(FailedPrecondition):
        writer.commit(len(HELLO), Digest.from_bytes(b"other"))
    with pytest.raises(FailedPrecondition):
        writer.write(b"more")
    with content.writer("a", "r") as again:
        assert again.offset == len(HELLO)
        assert again.commit() == HELLO_DIGEST
    with content.writer("a", "r") as fresh:
        assert fresh.offset == 0


def test_a_commit_with_the_wrong_digest_keeps_the_ingest(content: ContentMetadata) -> None:
    with content.writer("a", "r") as writer:
        writer.write(HELLO)
        with pytest.raises(FailedPrecondition, match="unexpected commit digest"):
            writer.commit(expected=Digest.from_bytes(b"something else"))
    statuses = content.list_statuses("a")
    assert [(s.ref, s.offset) for s in statuses] == [("r", len(HELLO))]
    assert list(content.walk("a")) == []


def test_a_commit_with_the_wrong_size_keeps_the_ingest(content: ContentMetadata) -> None:
    writer = content.writer("a", "r")
    writer.write(HELLO)
    with pytest.raises(FailedPrecondition, match="size validation"):
        writer.commit(len(HELLO) + 1)
    assert content.status("a", "r").offset == len(HELLO)


def test_a_commit_with_invalid_labels_is_invalid_argument_and_keeps_the_ingest(content: ContentMetadata) -> None:
    writer = content.writer("a", "r")
    writer.write(HELLO)
    with pytest.raises(InvalidArgument):
        writer.commit(labels={"": "x"})
    assert content.status("a", "r").offset == len(HELLO)
    with pytest.raises(NotFound):
        content.info("a", HELLO_DIGEST)


def test_a_committed_writer_is_finished(content: ContentMetadata) -> None:
    writer = content.writer("a", "r")
    writer.write(HELLO)
    writer.commit()
    for call in (writer.digest, writer.status, lambda: writer.write(b"x"), lambda: writer.commit()):
        with pytest.raises(FailedPrecondition):
            call()
    writer.close()
    assert writer.ref == "r"


def test_writer_arguments_are_validated(content: ContentMetadata) -> None:
    with pytest.raises(InvalidArgument, match="ref must not be empty"):
        content.writer("a", "")
    with pytest.raises(InvalidArgument):
        content.writer("a", "r", expected_size=-1)
    with pytest.raises(InvalidArgument):
        content.writer("a", "r", expected_digest="md5:abc")
    with content.writer("a", "r"):  # nothing was left locked
        pass


def test_list_statuses_filters_on_ref(content: ContentMetadata) -> None:
    for ref in ("layer-1", "layer-2", "config"):
        content.writer("a", ref).close()
    assert [s.ref for s in content.list_statuses("a")] == ["config", "layer-1", "layer-2"]
    assert [s.ref for s in content.list_statuses("a", ["ref~=layer"])] == ["layer-1", "layer-2"]
    assert [s.ref for s in content.list_statuses("a", ["ref==config"])] == ["config"]
    with pytest.raises(InvalidArgument):
        content.list_statuses("a", ["ref=="])


def test_abort_discards_the_ingest(content: ContentMetadata, backend: LocalContentStore) -> None:
    with content.writer("a", "r") as writer:
        writer.write(b"partial")
    content.writer("b", "r").close()
    content.abort("a", "r")
    with pytest.raises(NotFound):
        content.status("a", "r")
    assert content.list_statuses("a") == []
    assert [s.ref for s in backend.list_statuses()] == ["b/r"]
    with pytest.raises(NotFound, match="reference r: not found"):
        content.abort("a", "r")


def test_abort_of_an_ingest_being_written_is_unavailable(content: ContentMetadata) -> None:
    writer = content.writer("a", "r")
    with pytest.raises(Unavailable):
        content.abort("a", "r")
    writer.close()
    content.abort("a", "r")


def test_abort_of_a_shared_ingest_never_written(content: ContentMetadata) -> None:
    commit(content, "a", HELLO)
    content.writer("b", "pull", expected_digest=HELLO_DIGEST).close()
    assert [s.offset for s in content.list_statuses("b")] == [len(HELLO)]
    content.abort("b", "pull")
    assert content.list_statuses("b") == []


def test_the_commit_holds_the_gc_lock_from_backend_commit_to_record(
    store: MetadataStore, backend: LocalContentStore
) -> None:
    class Spy(LocalContentStore):
        held: list[bool] = []

        def writer(self, ref: str, expected_size: int = 0, expected_digest: Digest | None = None) -> Writer:
            inner = super().writer(ref, expected_size, expected_digest)
            original = inner.commit

            def commit(*args: Any, **kwargs: Any) -> Digest:
                Spy.held.append(_locked_elsewhere(store.gc_lock))
                return original(*args, **kwargs)

            inner.commit = commit  # type: ignore[method-assign]
            return inner

    spy = Spy(backend.root)
    content = ContentMetadata(store, spy)
    commit(content, "a", HELLO)
    assert Spy.held == [True]
    spy.close()


def _locked_elsewhere(lock: Any) -> bool:
    """Whether another thread would block on ``lock`` now."""
    result: list[bool] = []

    def probe() -> None:
        acquired = lock.acquire(blocking=False)
        if acquired:
            lock.release()
        result.append(not acquired)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return result[0]


# -- leases --------------------------------------------------------------------------------------


def test_a_leased_writer_records_its_ingest_then_its_content(content: ContentMetadata) -> None:
    leases = content.leases
    leases.create("a", "pull")
    writer = content.writer("a", "layer", lease="pull")
    assert leases.list_resources("a", "pull") == [LeaseResource("layer", "ingests")]
    writer.write(HELLO)
    writer.commit()
    assert leases.list_resources("a", "pull") == [LeaseResource(HELLO_DIGEST, "content")]


def test_a_writer_with_an_unknown_lease_is_not_found_and_records_nothing(content: ContentMetadata) -> None:
    content.leases.create("b", "pull")  # same id, another namespace
    with pytest.raises(NotFound, match='lease "pull": not found'):
        content.writer("a", "layer", lease="pull")
    assert content.list_statuses("a") == []
    with content.writer("a", "layer"):
        pass


def test_an_already_held_blob_is_added_to_the_lease(content: ContentMetadata) -> None:
    commit(content, "a", HELLO)
    content.leases.create("a", "pull")
    with pytest.raises(AlreadyExists):
        content.writer("a", "again", expected_digest=HELLO_DIGEST, lease="pull")
    assert content.leases.list_resources("a", "pull") == [LeaseResource(HELLO_DIGEST, "content")]


def test_abort_releases_the_ingest_from_its_lease(content: ContentMetadata) -> None:
    content.leases.create("a", "pull")
    content.writer("a", "layer", lease="pull").close()
    content.abort("a", "layer")
    assert content.leases.list_resources("a", "pull") == []


def test_a_commit_after_its_lease_was_deleted_fails_as_in_containerd(content: ContentMetadata) -> None:
    content.leases.create("a", "pull")
    writer = content.writer("a", "layer", lease="pull")
    writer.write(HELLO)
    content.leases.delete("a", "pull")
    with pytest.raises(NotFound, match='lease "pull"'):
        writer.commit()
    with pytest.raises(NotFound):
        content.info("a", HELLO_DIGEST)


def test_a_shared_lease_store_may_be_passed_in(store: MetadataStore, backend: LocalContentStore) -> None:
    leases = LeaseStore(store)
    content = ContentMetadata(store, backend, leases=leases)
    assert content.leases is leases


# -- GC kind -------------------------------------------------------------------------------------


def test_content_kind_satisfies_the_protocol(content: ContentMetadata) -> None:
    kind = ContentKind(content)
    assert isinstance(kind, ResourceKind)
    assert kind.types == ("content", "ingest")


def test_roots_are_gc_root_blobs_and_unexpired_ingests(
    store: MetadataStore, backend: LocalContentStore, content: ContentMetadata
) -> None:
    rooted = commit(content, "a", b"root", labels={"containerd.io/gc.root": "2030-01-01T00:00:00Z"})
    commit(content, "a", b"plain")
    content.writer("a", "fresh").close()
    content.leases.create("a", "l")
    content.writer("a", "leased", lease="l").close()
    expired = ContentMetadata(store, backend, ingest_expiry=0)
    expired.writer("b", "stale").close()
    assert sorted(ContentKind(content).roots()) == [
        Resource("content", "a", rooted),
        Resource("ingest", "a", "fresh"),
    ]


def test_blobs_reference_their_gc_ref_labels_and_shared_ingests_their_blob(content: ContentMetadata) -> None:
    layer = commit(content, "a", b"layer")
    manifest = commit(
        content,
        "a",
        b"manifest",
        labels={
            "containerd.io/gc.ref.content.l.0": layer,
            "containerd.io/gc.ref.snapshot.overlayfs": "sha256:chain",
        },
    )
    commit(content, "b", b"layer")
    content.writer("b", "pull", expected_digest=manifest).close()
    kind = ContentKind(content)
    assert sorted(kind.references(Resource("content", "a", manifest))) == [
        Resource("content", "a", layer),
        Resource("snapshot/overlayfs", "a", "sha256:chain"),
    ]
    assert list(kind.references(Resource("content", "a", layer))) == []
    assert list(kind.references(Resource("ingest", "b", "pull"))) == [Resource("content", "b", manifest)]
    assert list(kind.references(Resource("content", "", layer))) == []


def test_all_lists_records_ingests_and_backend_leftovers(content: ContentMetadata, backend: LocalContentStore) -> None:
    digest = commit(content, "a", HELLO)
    content.writer("a", "r").close()
    leftover = backend.write_blob("direct", b"nobody records me")
    backend.writer("gone/ref").close()
    assert sorted(ContentKind(content).all()) == sorted(
        [
            Resource("content", "a", digest),
            Resource("ingest", "a", "r"),
            Resource("content", "", leftover),
            Resource("ingest", "", "gone/ref"),
        ]
    )


def test_removing_a_record_deletes_the_bytes_only_when_no_namespace_holds_them(
    content: ContentMetadata, backend: LocalContentStore
) -> None:
    commit(content, "a", HELLO)
    commit(content, "b", HELLO)
    kind = ContentKind(content)
    assert kind.remove([Resource("content", "a", HELLO_DIGEST)]) == [Resource("content", "a", HELLO_DIGEST)]
    assert backend.info(HELLO_DIGEST).size == len(HELLO)
    assert content.info("b", HELLO_DIGEST).size == len(HELLO)
    assert kind.remove([Resource("content", "b", HELLO_DIGEST)]) == [Resource("content", "b", HELLO_DIGEST)]
    with pytest.raises(NotFound):
        backend.info(HELLO_DIGEST)
    assert kind.remove([Resource("content", "b", HELLO_DIGEST)]) == []


def test_bytes_a_shared_ingest_expects_are_kept(content: ContentMetadata, backend: LocalContentStore) -> None:
    commit(content, "a", HELLO)
    content.writer("b", "pull", expected_digest=HELLO_DIGEST).close()
    ContentKind(content).remove([Resource("content", "a", HELLO_DIGEST)])
    assert backend.info(HELLO_DIGEST).size == len(HELLO)
    with content.writer("b", "pull", expected_digest=HELLO_DIGEST) as writer:
        assert writer.commit() == HELLO_DIGEST
    with content.reader_at("b", HELLO_DIGEST) as reader:
        assert reader.read(0, 100) == HELLO


def test_removing_ingests_aborts_them_but_not_while_written(
    content: ContentMetadata, backend: LocalContentStore
) -> None:
    with content.writer("a", "idle") as writer:
        writer.write(b"x")
    busy = content.writer("a", "busy")
    backend.writer("gone/ref").close()
    kind = ContentKind(content)
    removed = kind.remove(
        [Resource("ingest", "a", "idle"), Resource("ingest", "a", "busy"), Resource("ingest", "", "gone/ref")]
    )
    assert removed == [Resource("ingest", "a", "idle"), Resource("ingest", "", "gone/ref")]
    assert [s.ref for s in content.list_statuses("a")] == ["busy"]
    assert [s.ref for s in backend.list_statuses()] == ["a/busy"]
    busy.close()


# -- the whole graph, through the real collector -------------------------------------------------


class _Kinds:
    def __init__(self, *kinds: ResourceKind) -> None:
        self.kinds = list(kinds)

    @hookimpl
    def containerkit_gc_kinds(self) -> list[ResourceKind]:
        return self.kinds


def test_garbage_collection_over_images_leases_and_content(
    store: MetadataStore, backend: LocalContentStore, content: ContentMetadata
) -> None:
    images, leases = ImageStore(store), content.leases
    # ns a: image -> manifest -> (config, layer); an unreferenced blob; a gc.root blob
    layer = commit(content, "a", b"layer")
    config = commit(content, "a", b"config")
    manifest_bytes = json.dumps({"config": config, "layers": [layer]}).encode()
    manifest = commit(
        content,
        "a",
        manifest_bytes,
        labels={"containerd.io/gc.ref.content.config": config, "containerd.io/gc.ref.content.l.0": layer},
    )
    images.create("a", Image("app:1", Descriptor("application/vnd.oci.image.manifest.v1+json", manifest, 10)))
    loose = commit(content, "a", b"loose")
    pinned = commit(content, "a", b"pinned", labels={"containerd.io/gc.root": "yes"})
    # ns a: a live lease protecting an ingest and a blob; an expired lease holding another blob
    leases.create("a", "live")
    with content.writer("a", "pulling", lease="live") as writer:
        writer.write(b"half")
    held = commit(content, "a", b"held", lease="live")
    past = (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    leases.create("a", "old", {LABEL_GC_EXPIRE: past})
    stale = commit(content, "a", b"stale", lease="old")
    # ns b holds the loose bytes too (as a gc root); an unleased ingest that has expired
    commit(content, "b", b"loose", labels={"containerd.io/gc.root": "true"})
    ContentMetadata(store, backend, ingest_expiry=0).writer("b", "abandoned").close()
    # the backend has a blob nobody records
    orphan = backend.write_blob("orphan", b"orphan")

    hooks = new_plugin_manager()
    hooks.register(_Kinds(ContentKind(content), ImageKind(images), LeaseKind(leases)))
    stats = Collector(hooks, store).collect()

    assert sorted(stats.removed) == sorted(
        [
            Resource("content", "a", loose),
            Resource("content", "a", stale),
            Resource("lease", "a", "old"),
            Resource("ingest", "b", "abandoned"),
            Resource("content", "", orphan),
        ]
    )
    assert stats.errors == []
    assert {i.digest for i in content.walk("a")} == {layer, config, manifest, pinned, held}
    assert [s.ref for s in content.list_statuses("a")] == ["pulling"]
    assert content.list_statuses("b") == []
    assert [lease.id for lease in leases.list("a")] == ["live"]
    assert backend.info(loose).size == 5  # still held by namespace b
    for gone in (stale, orphan):
        with pytest.raises(NotFound):
            backend.info(gone)
    # deleting the image lets the next collection take the manifest, config and layer
    images.delete("a", "app:1")
    stats = Collector(hooks, store).collect()
    assert sorted(r.id for r in stats.removed) == sorted([manifest, config, layer])
    assert {i.digest for i in content.walk("a")} == {pinned, held}
    assert Collector(hooks, store).collect().removed == []


def test_commits_racing_collections_never_lose_a_blob(store: MetadataStore, content: ContentMetadata) -> None:
    """Namespaces commit under a lease, read and delete the same bytes while collections run: a
    commit that returned is always readable, although its bytes were unreferenced a moment before.
    (Without a lease a fresh blob is collectable at once, as in containerd.)"""
    hooks = new_plugin_manager()
    hooks.register(_Kinds(ContentKind(content), LeaseKind(content.leases)))
    collector = Collector(hooks, store)
    stop = threading.Event()
    failures: list[BaseException] = []

    def collect() -> None:
        while not stop.is_set():
            collector.collect()

    def churn(namespace: str) -> None:
        try:
            content.leases.create(namespace, "work")
            for i in range(15):
                digest = commit(content, namespace, HELLO, ref=f"r{i}", lease="work")
                with content.reader_at(namespace, digest) as reader:
                    assert reader.read(0, 100) == HELLO
                content.delete(namespace, digest)
        except BaseException as err:
            failures.append(err)

    gc_thread = threading.Thread(target=collect)
    gc_thread.start()
    workers = [threading.Thread(target=churn, args=(f"ns{n}",)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    gc_thread.join()
    assert failures == []
    for n in range(4):
        content.leases.delete(f"ns{n}", "work")
    collector.collect()
    assert list(ContentKind(content).all()) == []
