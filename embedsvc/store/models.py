"""The store's domain objects: collection configs and infos, items, hits."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from embedsvc.errors import InvalidInput, quoted

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
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
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            raise InvalidInput(f"collection name {quoted(self.name)} must be 1-64 characters of letters, digits, '_', '.' "
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
    # A string unique to this incarnation of the collection (a dropped and re-created name gets a new uid).
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
        raise InvalidInput(f"item id {quoted(item_id)} must be a non-empty string")
    if len(item_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise InvalidInput(f"item id of {len(item_id.encode('utf-8', 'surrogatepass'))} bytes is over the "
                           f"{MAX_ID_BYTES}-byte limit")
    try:
        item_id.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"item id {quoted(item_id)} is not valid UTF-8 (lone surrogate)") from None
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
