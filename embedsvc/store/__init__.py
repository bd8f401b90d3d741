"""Durable vector collections: one interface (VectorStore), a local back end (SQLite as the source of truth,
FAISS indexes as checkpointed derived state) and a Milvus one (embedsvc.store.milvus, imported on demand)."""

from embedsvc.store.base import VectorStore
from embedsvc.store.factory import open_store, open_store_at
from embedsvc.store.indexes import INDEX_PRESETS, BruteForceIndex, FaissIndex, VectorIndex
from embedsvc.store.local import LocalStore
from embedsvc.store.metadata import Condition, Filter
from embedsvc.store.models import (
    CollectionConfig,
    CollectionInfo,
    CollectionNotFound,
    DeleteResult,
    Hit,
    Item,
    ItemsNotFound,
    SearchOptions,
    StoredItem,
    UpsertResult,
)

__all__ = [
    "INDEX_PRESETS",
    "BruteForceIndex",
    "CollectionConfig",
    "CollectionInfo",
    "CollectionNotFound",
    "Condition",
    "DeleteResult",
    "FaissIndex",
    "Filter",
    "Hit",
    "Item",
    "ItemsNotFound",
    "LocalStore",
    "SearchOptions",
    "StoredItem",
    "UpsertResult",
    "VectorIndex",
    "VectorStore",
    "open_store",
    "open_store_at",
]
