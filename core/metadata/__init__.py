"""Metadata: the one sqlite database of containerkit (:class:`MetadataStore`) and what it records.

Namespaces, and per namespace: the blobs it holds of the shared content store and its ingests
(:class:`ContentMetadata`), images (:class:`ImageStore`) and leases (:class:`LeaseStore`), with the
garbage collector's view of each (:class:`ContentKind`, :class:`ImageKind`, :class:`LeaseKind`).
"""

from core.metadata.content import ContentKind, ContentMetadata
from core.metadata.images import Image, ImageKind, ImageStore
from core.metadata.leases import Lease, LeaseKind, LeaseResource, LeaseStore
from core.metadata.namespaces import NamespaceStore
from core.metadata.store import CORE_MIGRATIONS, MetadataStore, Migration

__all__ = [
    "CORE_MIGRATIONS",
    "ContentKind",
    "ContentMetadata",
    "Image",
    "ImageKind",
    "ImageStore",
    "Lease",
    "LeaseKind",
    "LeaseResource",
    "LeaseStore",
    "MetadataStore",
    "Migration",
    "NamespaceStore",
]
