"""Durable vector collections: SQLite as the source of truth, FAISS indexes as checkpointed derived state."""

from embedsvc.store.indexes import INDEX_PRESETS, BruteForceIndex, FaissIndex, VectorIndex
from embedsvc.store.metadata import Condition, Filter
from embedsvc.store.models import (CollectionConfig, CollectionInfo, DeleteResult, Hit, Item, StoredItem,
                                   UpsertResult)
from embedsvc.store.store import CollectionNotFound, ItemsNotFound, Store

__all__ = ["INDEX_PRESETS", "BruteForceIndex", "CollectionConfig", "CollectionInfo", "CollectionNotFound", "Condition",
           "DeleteResult", "FaissIndex", "Filter", "Hit", "Item", "ItemsNotFound", "Store", "StoredItem",
           "UpsertResult", "VectorIndex"]
