"""Opens the configured store back end: the local data directory, or a Milvus deployment."""

from __future__ import annotations

from embedsvc.errors import InvalidInput
from embedsvc.store.base import VectorStore

BACKENDS = ("local", "milvus")
# What `embedsvc index --local` takes as a Milvus location instead of a directory.
MILVUS_SCHEMES = ("milvus://", "http://", "https://", "tcp://")


def open_store(
    backend: str = "local",
    *,
    data_dir: str = "embedsvc-data",
    milvus_uri: str = "",
    milvus_token: str = "",
    milvus_db: str = "",
    checkpoint_every: int = 20_000,
    omp_threads: int = 0,
    max_top_k: int = 1000,
    background_load: bool = False,
    progress_seconds: float = 5.0,
) -> VectorStore:
    """The store for one server: `local` keeps SQLite + FAISS under data_dir; `milvus` keeps nothing locally.
    `background_load` (local): collections load in a thread, see LocalStore."""
    if backend == "local":
        from embedsvc.store.local import LocalStore

        return LocalStore(
            data_dir,
            checkpoint_every=checkpoint_every,
            omp_threads=omp_threads,
            max_top_k=max_top_k,
            background_load=background_load,
            progress_seconds=progress_seconds,
        )
    if backend == "milvus":
        from embedsvc.store.milvus import MilvusStore

        return MilvusStore(milvus_uri, token=milvus_token, db_name=milvus_db, max_top_k=max_top_k)
    raise InvalidInput(f"unknown store_backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def is_milvus_location(location: str) -> bool:
    return location.startswith(MILVUS_SCHEMES)


def open_store_at(location: str) -> VectorStore:
    """A data directory, or a Milvus URI (`milvus:///path/file.db` for Milvus Lite, `http://host:19530`)."""
    if is_milvus_location(location):
        return open_store("milvus", milvus_uri=location)
    return open_store("local", data_dir=location)
