"""Images in the metadata store: containerd's semantics, per namespace, and their garbage-collection kind."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.gc import Resource, ResourceKind
from core.metadata import Image, ImageKind, ImageStore, MetadataStore, NamespaceStore
from core.metadata.images import label_references
from core.types import EPOCH, Descriptor, Platform

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
D1 = "sha256:" + "11" * 32
D2 = "sha256:" + "22" * 32
D3 = "sha256:" + "33" * 32


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    with MetadataStore(tmp_path / "meta.db") as opened:
        yield opened


@pytest.fixture
def images(store: MetadataStore) -> ImageStore:
    return ImageStore(store)


def image(name: str = "docker.io/library/alpine:3", digest: str = D1, **kwargs: object) -> Image:
    target = Descriptor(MANIFEST, digest, 512, kwargs.pop("annotations", {}))  # type: ignore[arg-type]
    return Image(name, target, **kwargs)  # type: ignore[arg-type]


# -- create, get, list, delete -------------------------------------------------------------------


def test_create_stores_the_image_with_timestamps(images: ImageStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    created = images.create("default", image(labels={"a": "b"}, annotations={"org.opencontainers.x": "y"}))
    assert created.name == "docker.io/library/alpine:3"
    assert created.target == Descriptor(MANIFEST, D1, 512, {"org.opencontainers.x": "y"})
    assert created.labels == {"a": "b"}
    assert before <= created.created_at == created.updated_at <= datetime.now(UTC)
    assert images.get("default", created.name) == created
    assert images.list("default") == [created]


def test_create_makes_the_namespace(store: MetadataStore, images: ImageStore) -> None:
    images.create("fresh", image())
    assert NamespaceStore(store).exists("fresh")


def test_only_media_type_digest_size_and_annotations_of_the_target_are_kept(images: ImageStore) -> None:
    target = Descriptor(INDEX, D2, 99, {"k": "v"}, urls=("https://x",), platform=Platform("linux", "amd64"))
    stored = images.create("default", Image("i", target))
    assert stored.target == Descriptor(INDEX, D2, 99, {"k": "v"})
    assert images.get("default", "i").target == Descriptor(INDEX, D2, 99, {"k": "v"})


def test_empty_label_and_annotation_values_are_dropped(images: ImageStore) -> None:
    stored = images.create("default", image(labels={"a": "1", "b": ""}, annotations={"x": "", "y": "2"}))
    assert stored.labels == {"a": "1"}
    assert stored.target.annotations == {"y": "2"}
    assert images.get("default", stored.name) == stored


def test_creating_an_existing_name_is_already_exists(images: ImageStore) -> None:
    images.create("default", image())
    with pytest.raises(AlreadyExists, match=re.escape('image "docker.io/library/alpine:3": already exists')):
        images.create("default", image(digest=D2))
    assert images.get("default", image().name).target.digest == D1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (Image("", Descriptor(MANIFEST, D1, 1)), "image name must not be empty"),
        (Image("i", Descriptor(MANIFEST, D1, 0)), "Target.Size must be greater than zero"),
        (Image("i", Descriptor("", D1, 1)), "Target.MediaType must be set"),
        (Image("i", Descriptor(MANIFEST, D1, 1), {"": "v"}), "label key must not be empty"),
    ],
)
def test_invalid_images_are_invalid_argument(images: ImageStore, bad: Image, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        images.create("default", bad)
    assert images.list("default") == []


def test_images_are_per_namespace(images: ImageStore) -> None:
    images.create("a", image(digest=D1))
    images.create("b", image(digest=D2))
    assert images.get("a", image().name).target.digest == D1
    assert images.get("b", image().name).target.digest == D2
    images.delete("a", image().name)
    with pytest.raises(NotFound):
        images.get("a", image().name)
    assert [i.target.digest for i in images.list("b")] == [D2]
    assert images.list("c") == []


def test_creating_an_image_waits_for_a_running_collection(store: MetadataStore, images: ImageStore) -> None:
    done = threading.Event()
    with store.gc_lock:  # what the collector holds from mark to sweep
        thread = threading.Thread(target=lambda: (images.create("default", image()), done.set()))
        thread.start()
        assert not done.wait(0.2)
    thread.join()
    assert [i.name for i in images.list("default")] == [image().name]


def test_get_and_delete_of_an_unknown_image_are_not_found(images: ImageStore) -> None:
    with pytest.raises(NotFound, match='image "nope": not found'):
        images.get("default", "nope")
    with pytest.raises(NotFound, match='image "nope": not found'):
        images.delete("default", "nope")


def test_list_is_sorted_by_name(images: ImageStore) -> None:
    for name in ("c", "a", "b"):
        images.create("default", image(name))
    assert [i.name for i in images.list("default")] == ["a", "b", "c"]


def test_list_filters_as_containerd(images: ImageStore) -> None:
    images.create("default", image("docker.io/library/alpine:3", D1, labels={"env": "prod"}))
    images.create("default", Image("docker.io/library/busybox:1", Descriptor(INDEX, D2, 10, {"anno": "v"})))
    images.create("default", image("quay.io/x:y", D3, labels={"env": "dev", "a.b": "c"}))

    def names(*filters: str) -> list[str]:
        return [i.name for i in images.list("default", list(filters))]

    assert names("name==quay.io/x:y") == ["quay.io/x:y"]
    assert names("name~=docker.io") == ["docker.io/library/alpine:3", "docker.io/library/busybox:1"]
    assert names(f"target.digest=={D2}") == ["docker.io/library/busybox:1"]
    assert names(f'target.mediatype=="{INDEX}"') == ["docker.io/library/busybox:1"]
    assert names("labels.env==prod") == ["docker.io/library/alpine:3"]
    assert names('labels."env"!=prod') == ["docker.io/library/busybox:1", "quay.io/x:y"]
    assert names("labels.a.b==c") == ["quay.io/x:y"]
    assert names("annotations.anno") == ["docker.io/library/busybox:1"]
    assert names("labels.env==dev", "name~=alpine") == ["docker.io/library/alpine:3", "quay.io/x:y"]
    assert names("labels.env==dev,name~=alpine") == []
    with pytest.raises(InvalidArgument):
        images.list("default", ["name=="])


def test_a_namespace_holding_images_cannot_be_deleted(store: MetadataStore, images: ImageStore) -> None:
    images.create("busy", image())
    with pytest.raises(FailedPrecondition, match='namespace "busy" must be empty, but it still has images'):
        NamespaceStore(store).delete("busy")
    images.delete("busy", image().name)
    NamespaceStore(store).delete("busy")


# -- update --------------------------------------------------------------------------------------


@pytest.fixture
def stored(images: ImageStore) -> Image:
    return images.create("default", image("img", D1, labels={"keep": "1", "drop": "2"}, annotations={"a": "1"}))


def _update(images: ImageStore, changed: Image, *paths: str) -> Image:
    updated = images.update("default", changed, list(paths))
    assert images.get("default", changed.name) == updated
    return updated


def test_update_without_paths_replaces_target_and_labels(images: ImageStore, stored: Image) -> None:
    time.sleep(0.002)
    updated = _update(images, Image("img", Descriptor(INDEX, D2, 7), {"new": "x"}))
    assert updated.target == Descriptor(INDEX, D2, 7)
    assert updated.labels == {"new": "x"}
    assert updated.created_at == stored.created_at
    assert updated.updated_at > stored.updated_at


def test_update_labels_replaces_every_label_only(images: ImageStore, stored: Image) -> None:
    updated = _update(images, Image("img", Descriptor(INDEX, D2, 7), {"only": "this"}), "labels")
    assert updated.labels == {"only": "this"}
    assert updated.target == stored.target


def test_update_one_label_sets_or_removes_it(images: ImageStore, stored: Image) -> None:
    updated = _update(
        images, replace(stored, labels={"drop": "", "new": "n", "other": "ignored"}), "labels.drop", "labels.new"
    )
    assert updated.labels == {"keep": "1", "new": "n"}
    updated = _update(images, replace(stored, labels={}), "labels.keep")
    assert updated.labels == {"new": "n"}


def test_update_target_replaces_the_whole_descriptor(images: ImageStore, stored: Image) -> None:
    updated = _update(images, Image("img", Descriptor(INDEX, D3, 3, {"b": "2"}), {"x": "y"}), "target")
    assert updated.target == Descriptor(INDEX, D3, 3, {"b": "2"})
    assert updated.labels == stored.labels


def test_update_annotations_whole_or_one(images: ImageStore, stored: Image) -> None:
    changed = Image("img", Descriptor(INDEX, D3, 3, {"b": "2", "c": "3"}))
    updated = _update(images, changed, "annotations")
    assert updated.target == Descriptor(MANIFEST, D1, 512, {"b": "2", "c": "3"})
    updated = _update(images, Image("img", Descriptor(INDEX, D3, 3, {"d": "4"})), "annotations.d", "annotations.b")
    assert updated.target.annotations == {"c": "3", "d": "4"}


def test_update_of_an_unknown_field_is_invalid_argument(images: ImageStore, stored: Image) -> None:
    with pytest.raises(InvalidArgument, match='cannot update "name" field on image "img"'):
        images.update("default", stored, ["labels", "name"])
    assert images.get("default", "img") == stored


def test_update_validates_the_result(images: ImageStore, stored: Image) -> None:
    with pytest.raises(InvalidArgument, match=r"Target\.Size"):
        images.update("default", Image("img", Descriptor(MANIFEST, D1, 0)), ["target"])
    with pytest.raises(InvalidArgument):
        images.update("default", replace(stored, labels={"": "x"}), ["labels"])
    assert images.get("default", "img") == stored


def test_update_needs_a_name_and_an_existing_image(images: ImageStore, stored: Image) -> None:
    with pytest.raises(InvalidArgument, match="image name is required for update"):
        images.update("default", replace(stored, name=""))
    with pytest.raises(NotFound, match='image "other": not found'):
        images.update("default", replace(stored, name="other"))
    with pytest.raises(NotFound):
        images.update("elsewhere", stored)


def test_update_ignores_the_timestamps_given(images: ImageStore, stored: Image) -> None:
    updated = images.update("default", replace(stored, created_at=EPOCH, updated_at=EPOCH), ["labels"])
    assert updated.created_at == stored.created_at


# -- GC ------------------------------------------------------------------------------------------


def test_label_references_follow_containerds_prefixes() -> None:
    labels = {
        "containerd.io/gc.ref.content": D1,
        "containerd.io/gc.ref.content.config": D2,
        "containerd.io/gc.ref.content.l.0": D3,
        "containerd.io/gc.ref.content/m": "sha256:m",
        "containerd.io/gc.ref.contentx": "ignored",
        "containerd.io/gc.ref.snapshot.overlayfs": "key-1",
        "containerd.io/gc.ref.snapshot.native/extra": "key-2",
        "containerd.io/gc.ref.snapshot.": "ignored",
        "containerd.io/gc.root": "x",
        "other": D1,
    }
    assert sorted(label_references("ns", labels)) == sorted(
        [
            Resource("content", "ns", D1),
            Resource("content", "ns", D2),
            Resource("content", "ns", D3),
            Resource("content", "ns", "sha256:m"),
            Resource("snapshot/overlayfs", "ns", "key-1"),
            Resource("snapshot/native", "ns", "key-2"),
        ]
    )


def test_every_image_is_a_root_referencing_its_target_and_label_refs(images: ImageStore) -> None:
    images.create("a", image("one", D1, labels={"containerd.io/gc.ref.content.extra": D2}))
    images.create("b", image("two", D3))
    kind = ImageKind(images)
    assert isinstance(kind, ResourceKind)
    assert kind.types == ("image",)
    assert sorted(kind.roots()) == [Resource("image", "a", "one"), Resource("image", "b", "two")]
    assert sorted(kind.all()) == sorted(kind.roots())
    assert sorted(kind.references(Resource("image", "a", "one"))) == [
        Resource("content", "a", D1),
        Resource("content", "a", D2),
    ]
    assert list(kind.references(Resource("image", "b", "two"))) == [Resource("content", "b", D3)]
    assert list(kind.references(Resource("image", "a", "gone"))) == []


def test_image_kind_remove_deletes_images(images: ImageStore) -> None:
    images.create("a", image("one"))
    kind = ImageKind(images)
    assert kind.remove([Resource("image", "a", "one"), Resource("image", "a", "never")]) == [
        Resource("image", "a", "one")
    ]
    assert images.list("a") == []
