"""The store's domain objects, shared by every back end: collection configs and infos, items, search options,
hits, and the errors only a store raises."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from embedsvc.errors import Aborted, FailedPrecondition, InvalidInput, NotFound, quoted
from embedsvc.store.metadata import Filter


class CollectionNotFound(NotFound):
    """No collection of that name."""


class ItemsNotFound(NotFound):
    """Ids asked for (strictly) are not in the collection."""


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
    # sha256 of the model's weights file when the collection was created: content is embedded only while
    # the model name loads these weights. "" = not recorded (vector-only, random weights, older collections).
    weights: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.fullmatch(self.name):
            raise InvalidInput(
                f"collection name {quoted(self.name)} must be 1-64 characters of letters, digits, '_', '.' "
                f"or '-', starting with a letter or digit"
            )
        if not isinstance(self.dim, int) or not 1 <= self.dim <= 65536:
            raise InvalidInput(f"collection dimension must be 1..65536, got {self.dim}")

    def check_weights(self, loaded_sha256: str) -> None:
        """Refuses to embed for this collection with other weights than its vectors came from: vectors of two
        weight sets live in unrelated spaces, and searches over a mix return wrong neighbours, not errors."""
        if self.weights and self.weights != loaded_sha256:
            now = f"weights sha256 {loaded_sha256[:12]}" if loaded_sha256 else "random weights"
            raise FailedPrecondition(
                f"collection {quoted(self.name)} holds vectors of model {quoted(self.model)} with weights sha256 "
                f"{self.weights[:12]}, but {quoted(self.model)} now loads {now}; its new vectors would not match "
                f"the stored ones. Point the model name at the original weights again (models file), or create "
                f"a new collection and re-index into it"
            )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "model": self.model,
            "pooling": self.pooling,
            "pooling_params": dict(self.pooling_params),
            "metric": self.metric,
            "index": self.index,
            **({"weights": self.weights} if self.weights else {}),
        }

    @classmethod
    def from_json(cls, data: dict) -> CollectionConfig:
        """Keys a later version added are ignored, so a data directory or Milvus catalogue it wrote still opens
        here (without what those keys guard)."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


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
    # Why the collection cannot serve ("" when it can): its searches and writes get FAILED_PRECONDITION. Its
    # config may then be a stand-in (a catalogue row that cannot be read): check before acting on it.
    unavailable: str = ""

    def check_usable(self) -> None:
        """Refuses an unavailable collection before its config (dimension, model) is acted on."""
        if self.unavailable:
            raise unavailable_error(self.config.name, self.unavailable)


def unavailable_error(name: str, reason: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"collection {quoted(name)} is unavailable: {reason}; its items are kept (Get reads them); drop and "
        f"re-create it to serve again"
    )


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
    vector: np.ndarray | None = None


@dataclass
class Hit:
    id: str
    score: float
    metadata: dict[str, Any] | None = None
    vector: np.ndarray | None = None


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
    if isinstance(item_id, str) and item_id.isascii() and 0 < len(item_id) <= MAX_ID_BYTES:
        return item_id  # the usual case, decided without encoding it
    if not isinstance(item_id, str) or not item_id:
        raise InvalidInput(f"item id {quoted(item_id)} must be a non-empty string")
    if len(item_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise InvalidInput(
            f"item id of {len(item_id.encode('utf-8', 'surrogatepass'))} bytes is over the {MAX_ID_BYTES}-byte limit"
        )
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


# Inner-product collections: vectors (and queries) of at most this norm keep every score finite in
# float32 (|q.x| <= |q||x| <= 1e36 < 3.4e38).
MAX_INNER_PRODUCT_NORM = 1e18
MAX_NPROBE = 65_536
MAX_EF_SEARCH = 32_768


@dataclass(frozen=True)
class SearchOptions:
    """How a search runs, the same for each of its queries (a per-query id to leave out travels beside them)."""

    # Hits per query, 1..the store's max_top_k.
    top_k: int = 10
    # Conditions every hit's metadata meets; None (or no conditions) for all items.
    filter: Filter | None = None
    # IVF lists probed and HNSW candidate list size; 0 = the collection's default.
    nprobe: int = 0
    ef_search: int = 0
    # Return each hit's metadata, its stored vector.
    include_metadata: bool = False
    include_vectors: bool = False


DEFAULT_SEARCH = SearchOptions()  # frozen: one shared default for every `search(..., options=...)`


def check_incarnation(name: str, current: str, expected: str | None) -> None:
    """Writes computed for a collection carry its uid: a dropped and re-created name must not receive them."""
    if expected is not None and expected != current:
        raise Aborted(
            f"collection {quoted(name)} was dropped and re-created while this request was computed; "
            f"nothing was stored: retry"
        )


def prepare_items(name: str, config: CollectionConfig, items) -> tuple[list[str], np.ndarray, list[dict]]:
    """Validated (ids, vectors, metadata) of an upsert batch, as every back end stores them: a repeated id
    keeps its last item, cosine vectors are normalised (so inner product is the cosine). Messages naming
    an item are made only when it is wrong (making one per item was a third of a bulk upsert's cost here)."""
    from embedsvc.store.metadata import validate_metadata

    latest: dict[str, Item] = {}
    for item in items:
        latest[validate_id(item.id)] = item  # a repeated id in one batch: the last one wins
    ids = list(latest)
    arrays = [np.asarray(latest[i].vector) for i in ids]
    for item_id, array in zip(ids, arrays):
        if array.size != config.dim:
            raise InvalidInput(
                f"item {quoted(item_id)} has a vector of dimension {array.size}; collection "
                f"{quoted(name)} holds vectors of dimension {config.dim}"
            )
    vectors = validate_vectors(np.stack([np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays]), config.dim)
    vectors = prepare_vectors(vectors, config.metric, lambda row: _item_name(ids[row]))
    metadata = [validate_metadata(latest[i].metadata, functools.partial(_item_name, i)) for i in ids]
    return ids, vectors, metadata


def _item_name(item_id: str) -> str:
    return f"item {quoted(item_id)}"


def prepare_queries(config: CollectionConfig, queries, options: SearchOptions, max_top_k: int) -> np.ndarray:
    """Validated query matrix (normalised for cosine) after checking top_k and the search params."""
    top_k, nprobe, ef_search = options.top_k, options.nprobe, options.ef_search
    if not isinstance(top_k, int) or not 1 <= top_k <= max_top_k:
        raise InvalidInput(f"top_k must be between 1 and {max_top_k}, got {top_k}")
    if not 0 <= nprobe <= MAX_NPROBE or not 0 <= ef_search <= MAX_EF_SEARCH:
        raise InvalidInput(
            f"search params: nprobe must be 0..{MAX_NPROBE} and ef_search 0..{MAX_EF_SEARCH} "
            f"(0 = the collection's default), got {nprobe} and {ef_search}"
        )
    queries = validate_vectors(queries, config.dim, "query")
    return prepare_vectors(queries, config.metric, lambda row: f"query {row}")


def prepare_vectors(vectors: np.ndarray, metric: str, name_of: Callable[[int], str]) -> np.ndarray:
    """Cosine: unit vectors, normalised in float64 so that no finite float32 input overflows or
    underflows (only an exact zero vector has no direction). Inner product: norms bounded so that
    no score can overflow float32. `name_of(row)` names a row in an error message."""
    wide = vectors.astype(np.float64)  # one float64 copy, normalised in place (bulk upserts spend their time here)
    norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))[:, None]
    if metric == "cosine":
        zero = np.flatnonzero(norms[:, 0] == 0)
        if len(zero):
            raise InvalidInput(
                f"{name_of(int(zero[0]))} is a zero vector, which has no direction for cosine similarity"
            )
        wide /= norms
        return wide.astype(np.float32)
    big = np.flatnonzero(norms[:, 0] > MAX_INNER_PRODUCT_NORM)
    if len(big):
        raise InvalidInput(
            f"{name_of(int(big[0]))} has norm {norms[big[0], 0]:.3g}, over {MAX_INNER_PRODUCT_NORM:.0e}: "
            f"inner products of such vectors overflow float32; scale the vectors down"
        )
    return vectors
