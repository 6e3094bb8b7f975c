"""Metadata: the one sqlite database of containerkit (:class:`MetadataStore`) and the namespaces in it."""

from core.metadata.namespaces import NamespaceStore
from core.metadata.store import CORE_MIGRATIONS, MetadataStore, Migration

__all__ = ["CORE_MIGRATIONS", "MetadataStore", "Migration", "NamespaceStore"]
