"""The server's store, opened without the model stack's imports: `embedsvc serve` opens it first, so its
collections load in the background while torch and the rest of the server are imported."""

from __future__ import annotations

from embedsvc.service.config import ServerConfig
from embedsvc.service.cpu import usable_cpus
from embedsvc.store import VectorStore, open_store


def open_server_store(config: ServerConfig) -> VectorStore:
    """The configured back end; a local store returns once its directory is open and loads collections in a
    thread (requests to one still loading get UNAVAILABLE)."""
    return open_store(config.store_backend, data_dir=config.data_dir, milvus_uri=config.milvus_uri,
                      milvus_token=config.milvus_token, milvus_db=config.milvus_db,
                      checkpoint_every=config.checkpoint_every, omp_threads=config.faiss_threads or usable_cpus(),
                      max_top_k=config.max_top_k, background_load=True, progress_seconds=config.load_progress_seconds)
