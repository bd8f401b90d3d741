"""The store's domain objects: collection configs and infos, items, hits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from embedsvc.errors import InvalidInput

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_ID_BYTES = 512


@dataclass(frozen=True)
class CollectionConfig:
    """What a collection is bound to; fixed at creation."""

    # Unique name: 1-64 characters of [A-Za-z0-9_.-], starting with a letter or digit.
    name: str
    # Vector dimension.
    dim: int
    # Model registry name, or "" for a vector-only collection.
    model: str = ""
    # Pooling registry name ("" for vector-only).
    pooling: str = ""
    # Pooling parameters as strings (canonical form, defaults resolved).
    pooling_params: dict[str, str] = field(default_factory=dict)
    # "cosine" (vectors normalised on the way in) or "inner_product".
    metric: str = "cosine"
    # Index preset ("flat", "ivf", "hnsw", "ivfpq") or FAISS factory string.
    index: str = "flat"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise InvalidInput(f"collection name {self.name!r} must be 1-64 characters of letters, digits, '_', '.' "
                               f"or '-', starting with a letter or digit")
        if not isinstance(self.dim, int) or not 1 <= self.dim <= 65536:
            raise InvalidInput(f"collection dimension must be 1..65536, got {self.dim}")

    def to_json(self) -> dict:
        return {"name": self.name, "dim": self.dim, "model": self.model, "pooling": self.pooling,
                "pooling_params": dict(self.pooling_params), "metric": self.metric, "index": self.index}

    @classmethod
    def from_json(cls, data: dict) -> "CollectionConfig":
        return cls(**data)


@dataclass(frozen=True)
class CollectionInfo:
    config: CollectionConfig
    # Live items.
    count: int
    # Creation time, Unix ms.
    created_ms: int
    # Version of the fitted pooling state; 0 when none.
    pooling_version: int
    # Whether the FAISS index is trained (approximate); False means exact search for now.
    index_trained: bool
    # The FAISS factory string in use.
    index_factory: str
    # Unique to this incarnation of the collection: a dropped and re-created name gets a new uid.
    uid: str = ""


@dataclass
class Item:
    """An item to store: id, vector (already pooled), metadata."""

    id: str
    vector: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class StoredItem:
    id: str
    metadata: dict[str, Any]
    vector: Optional[np.ndarray] = None


@dataclass
class Hit:
    id: str
    score: float
    metadata: Optional[dict[str, Any]] = None
    vector: Optional[np.ndarray] = None


@dataclass(frozen=True)
class UpsertResult:
    inserted: int
    replaced: int
    count: int


@dataclass(frozen=True)
class DeleteResult:
    deleted: int
    missing: list[str]


def validate_id(item_id: Any) -> str:
    if not isinstance(item_id, str) or not item_id:
        raise InvalidInput(f"item id {item_id!r} must be a non-empty string")
    if len(item_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise InvalidInput(f"item id of {len(item_id.encode('utf-8', 'surrogatepass'))} bytes is over the "
                           f"{MAX_ID_BYTES}-byte limit")
    try:
        item_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"item id {item_id!r} is not valid UTF-8 (lone surrogate)") from None
    return item_id


def validate_vectors(vectors: np.ndarray, dim: int, what: str = "vector") -> np.ndarray:
    """[N, dim] finite float32, or a typed error saying which row is wrong."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        got = array.shape[-1] if array.ndim else 0
        raise InvalidInput(f"{what} has dimension {got}; this collection's vectors have dimension {dim}")
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise InvalidInput(f"{what} {int(np.flatnonzero(bad)[0])} contains NaN or infinity; values must be finite")
    return np.ascontiguousarray(array)


def prepare_items(name: str, config: CollectionConfig, items) -> tuple[list[str], np.ndarray, list[dict]]:
    """Validated (ids, vectors, metadata) of an upsert batch, as every back end stores them: a repeated id
    keeps its last item, cosine vectors are normalised (so inner product is the cosine)."""
    from embedsvc.store.metadata import validate_metadata

    latest: dict[str, Item] = {}
    for item in items:
        latest[validate_id(item.id)] = item  # a repeated id in one batch: the last one wins
    ids = list(latest)
    for item_id, item in latest.items():
        size = np.asarray(item.vector).size
        if size != config.dim:
            raise InvalidInput(f"item {item_id!r} has a vector of dimension {size}; collection {name!r} holds "
                               f"vectors of dimension {config.dim}")
    vectors = validate_vectors(np.stack([np.asarray(latest[i].vector, dtype=np.float32).reshape(-1) for i in ids]),
                               config.dim)
    if config.metric == "cosine":
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        if (norms == 0).any():
            raise InvalidInput(f"item {ids[int(np.flatnonzero(norms[:, 0] == 0)[0])]!r} has a zero vector, "
                               f"which has no direction for cosine similarity")
        vectors = vectors / norms
    metadata = [validate_metadata(latest[i].metadata, f"item {i!r}") for i in ids]
    return ids, vectors, metadata


def prepare_queries(config: CollectionConfig, queries, top_k: int, max_top_k: int) -> np.ndarray:
    """Validated query matrix (normalised for cosine) after checking top_k, as every back end searches."""
    if not isinstance(top_k, int) or not 1 <= top_k <= max_top_k:
        raise InvalidInput(f"top_k must be between 1 and {max_top_k}, got {top_k}")
    queries = validate_vectors(queries, config.dim, "query")
    if config.metric == "cosine":
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    return queries
