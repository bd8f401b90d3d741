"""The store interface the engine and jobs use; `LocalStore` (local.py) and `MilvusStore` (milvus.py) implement it.

Both back ends raise the same domain errors (CollectionNotFound, AlreadyExists, InvalidInput,
FailedPrecondition, ItemsNotFound, Aborted), so a request gets the same status whichever serves it;
tests/test_backend_congruence.py drives both with the same operations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from embedsvc.store.models import (
    DEFAULT_SEARCH,
    CollectionConfig,
    CollectionInfo,
    DeleteResult,
    Hit,
    Item,
    SearchOptions,
    StoredItem,
    UpsertResult,
)


@runtime_checkable
class VectorStore(Protocol):
    """Named collections of (id, vector, metadata) with filtered top-k search."""

    def create_collection(self, config: CollectionConfig) -> CollectionInfo: ...

    def get_collection(self, name: str) -> CollectionInfo: ...

    def list_collections(self) -> list[CollectionInfo]: ...

    def drop_collection(self, name: str) -> int: ...

    def set_pooling_state(self, name: str, state: bytes, require_empty: bool = True, uid: str | None = None) -> int:
        """`uid`: the collection incarnation the state was fitted for; if it was dropped and re-created
        since, nothing is stored (Aborted)."""

    def pooling_state(self, name: str) -> bytes | None: ...

    def index_size_bytes(self, name: str) -> int: ...

    def upsert(
        self,
        name: str,
        items: Sequence[Item],
        *,
        insert_only: bool = False,
        pooling_version: int | None = None,
        uid: str | None = None,
        thumbnails: dict[str, tuple[str, bytes]] | None = None,
    ) -> UpsertResult:
        """`uid` / `pooling_version`: the collection incarnation and pooling state the vectors were computed
        for; if either changed, nothing is stored (Aborted)."""

    def thumbnail(self, name: str, item_id: str) -> tuple[str, bytes]: ...

    def delete(self, name: str, ids: Iterable[str], *, strict: bool = False) -> DeleteResult: ...

    def get(
        self, name: str, ids: Iterable[str], include_vectors: bool = False
    ) -> tuple[list[StoredItem], list[str]]: ...

    def vector_of(self, name: str, item_id: str) -> np.ndarray: ...

    def search(
        self,
        name: str,
        queries: np.ndarray,
        options: SearchOptions = DEFAULT_SEARCH,
        exclude_ids: Sequence[str | None] | None = None,
    ) -> list[list[Hit]]:
        """Hits per query row, best first; `exclude_ids[i]` leaves one id out of query i's hits."""

    def missing_keys(self, name: str, keys: Sequence[str]) -> list[str]:
        """The metadata keys no live item holds, in the order given: why a filter on them matched nothing."""

    def checkpoint(self, name: str | None = None) -> None: ...

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Blocks until every collection present at start-up can serve (False on timeout); until then requests to
        one still loading get Unavailable."""

    def close(self) -> None: ...
