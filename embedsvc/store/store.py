"""Durable collections of vectors: SQLite is the truth, FAISS indexes are checkpointed derived state.

Write path: validate -> one SQLite transaction (fsynced) -> apply to the in-memory index and metadata
index under the collection's write lock -> acknowledge. Start-up: load each collection's checkpoint
(index + the log position it includes) and replay the log after it; a missing or unreadable
checkpoint means a rebuild from the items table. Searches hold the read lock, so they run alongside
each other and never see half a batch.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from embedsvc.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from embedsvc.store.checkpoint import fsync_dir, read_checkpoint, write_checkpoint
from embedsvc.store.database import Database
from embedsvc.store.indexes import FaissIndex, validate_index_kind
from embedsvc.store.metadata import Filter, MetadataIndex
from embedsvc.store.models import (CollectionConfig, CollectionInfo, DeleteResult, Hit, Item, StoredItem,
                                   UpsertResult, prepare_items, prepare_queries, validate_id)
from embedsvc.store.rwlock import RWLock

log = logging.getLogger(__name__)

DEFAULT_MAX_TOP_K = 1000


class CollectionNotFound(NotFound):
    """No collection of that name."""


class ItemsNotFound(NotFound):
    """Ids asked for (strictly) are not in the collection."""


@dataclass
class _Collection:
    id: int
    config: CollectionConfig
    created_ms: int
    pooling_version: int
    index: FaissIndex
    metadata: MetadataIndex
    lock: RWLock = field(default_factory=RWLock)
    checkpoint_lsn: int = 0
    applied_lsn: int = 0
    id_of_label: dict[int, str] = field(default_factory=dict)
    label_of_id: dict[str, int] = field(default_factory=dict)

    def info(self) -> CollectionInfo:
        return CollectionInfo(self.config, len(self.label_of_id), self.created_ms, self.pooling_version,
                              self.index.trained, self.index.factory_string)


class Store:
    """All collections under one data directory."""

    def __init__(self, data_dir: str | Path, *, checkpoint_every: int = 20_000, omp_threads: int = 0,
                 max_top_k: int = DEFAULT_MAX_TOP_K):
        import faiss

        self.data_dir = Path(data_dir)
        try:
            (self.data_dir / "indexes").mkdir(parents=True, exist_ok=True)
            probe = self.data_dir / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise InvalidInput(f"data directory {self.data_dir} is not writable: {exc.strerror or exc}") from None
        if omp_threads:
            faiss.omp_set_num_threads(omp_threads)
        self.checkpoint_every = checkpoint_every
        self.max_top_k = max_top_k
        self.db = Database(self.data_dir / "store.sqlite3")
        self._registry_lock = threading.Lock()  # guards the dict of collections, not their contents
        self._collections: dict[str, _Collection] = {}
        for cid, name, config, created_ms, pooling_version in self.db.collections():
            self._collections[name] = self._open(cid, CollectionConfig.from_json(json.loads(config)),
                                                 created_ms, pooling_version)

    # -- lifecycle ----------------------------------------------------------------------------

    def _checkpoint_path(self, cid: int) -> Path:
        return self.data_dir / "indexes" / f"collection-{cid}.npz"

    def _open(self, cid: int, config: CollectionConfig, created_ms: int, pooling_version: int) -> _Collection:
        metadata = MetadataIndex()
        id_of_label, label_of_id = {}, {}
        for label, item_id, meta, _ in self.db.scan(cid, with_vectors=False):
            metadata.add(label, json.loads(meta))
            id_of_label[label], label_of_id[item_id] = item_id, label
        index, lsn = self._load_index(cid, config)
        col = _Collection(cid, config, created_ms, pooling_version, index, metadata, checkpoint_lsn=lsn,
                          applied_lsn=lsn, id_of_label=id_of_label, label_of_id=label_of_id)
        self._replay(col)
        log.info("opened collection %s: %d items, replayed to lsn %d", config.name, len(label_of_id), col.applied_lsn)
        return col

    def _load_index(self, cid: int, config: CollectionConfig) -> tuple[FaissIndex, int]:
        path = self._checkpoint_path(cid)
        try:
            loaded = read_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means: rebuild from the truth
            log.warning("checkpoint %s unreadable (%s): rebuilding from the items table", path, exc)
            loaded = None
        if loaded is not None:
            header, arrays = loaded
            if header.get("kind") == config.index and header.get("dim") == config.dim:
                return FaissIndex.from_arrays(header, arrays), int(header["lsn"])
        # No checkpoint: everything in the log is replayed onto an empty index.
        return FaissIndex(config.index, config.dim, config.metric), -1

    def _replay(self, col: _Collection) -> None:
        if col.applied_lsn < 0:  # fresh index: load every live item, then continue after the log's end
            last = self.db.last_lsn(col.id)
            self._load_all(col)
            col.applied_lsn = col.checkpoint_lsn = last
            return
        changes = self.db.changes_after(col.id, col.applied_lsn)
        if not changes:
            return
        added = [a for a, _ in changes if a is not None]
        removed = {r for _, r in changes if r is not None}
        added_set = set(added)
        # Labels added after the checkpoint were never in the index: nothing to remove for them.
        col.index.remove(np.array(sorted(removed - added_set), dtype=np.int64))
        live = [a for a in added if a not in removed and a in col.id_of_label]
        rows = self.db.items_by_label(col.id, live, with_vectors=True)
        if rows:
            labels = np.array(sorted(rows), dtype=np.int64)
            vectors = np.stack([np.frombuffer(rows[l][2], dtype=np.float32) for l in labels.tolist()])
            col.index.add(labels, vectors)
        col.applied_lsn = self.db.last_lsn(col.id)

    def _load_all(self, col: _Collection) -> None:
        labels, vectors = [], []
        for label, _, _, vector in self.db.scan(col.id, with_vectors=True):
            labels.append(label)
            vectors.append(np.frombuffer(vector, dtype=np.float32))
        if labels:
            col.index.add(np.array(labels, dtype=np.int64), np.stack(vectors))

    def checkpoint(self, name: Optional[str] = None) -> None:
        """Writes the index of one collection (or all) atomically, then trims the log it covers."""
        for col in [self._get(name)] if name else list(self._collections.values()):
            with col.lock.read():
                if col.applied_lsn == col.checkpoint_lsn and self._checkpoint_path(col.id).exists():
                    continue
                header, arrays = col.index.to_arrays()
                header["lsn"] = col.applied_lsn
                write_checkpoint(self._checkpoint_path(col.id), header, arrays)
                col.checkpoint_lsn = col.applied_lsn
            self.db.truncate_log(col.id, col.checkpoint_lsn)

    def close(self) -> None:
        self.checkpoint()
        self.db.close()

    # -- collections --------------------------------------------------------------------------

    def _get(self, name: str) -> _Collection:
        try:
            return self._collections[name]
        except KeyError:
            raise CollectionNotFound(f"collection {name!r} does not exist; ListCollections shows those that do") from None

    def create_collection(self, config: CollectionConfig) -> CollectionInfo:
        validate_index_kind(config.index, config.dim, config.metric)
        with self._registry_lock:
            if config.name in self._collections:
                raise AlreadyExists(f"collection {config.name!r} already exists; drop it first or pick another name")
            cid, created = self.db.create_collection(config.name, config.to_json())
            col = _Collection(cid, config, created, 0, FaissIndex(config.index, config.dim, config.metric),
                              MetadataIndex())
            self._collections[config.name] = col
        return col.info()

    def get_collection(self, name: str) -> CollectionInfo:
        return self._get(name).info()

    def list_collections(self) -> list[CollectionInfo]:
        return [col.info() for _, col in sorted(self._collections.items())]

    def drop_collection(self, name: str) -> int:
        with self._registry_lock:
            col = self._get(name)
            with col.lock.write():
                removed = self.db.drop_collection(col.id)
                self._collections.pop(name)
                path = self._checkpoint_path(col.id)
                if path.exists():
                    path.unlink()
                    fsync_dir(path.parent)
        return removed

    def set_pooling_state(self, name: str, state: bytes, require_empty: bool = True) -> int:
        """Stores a fitted pooling state (e.g. NetVLAD codebook); vectors of an older state must not mix."""
        col = self._get(name)
        with col.lock.write():
            if require_empty and col.label_of_id:
                raise FailedPrecondition(f"collection {name!r} holds {len(col.label_of_id)} items embedded with the "
                                         f"current pooling state; fit a new collection (or drop and recreate it)")
            col.pooling_version = self.db.set_pooling_state(col.id, state)
            return col.pooling_version

    def index_size_bytes(self, name: str) -> int:
        """Size of the collection's serialised FAISS index: what it costs in memory and on disk."""
        col = self._get(name)
        with col.lock.read():
            _, arrays = col.index.to_arrays()
        return int(sum(a.nbytes for a in arrays.values()))

    def pooling_state(self, name: str) -> Optional[bytes]:
        return self.db.pooling_state(self._get(name).id)

    # -- items --------------------------------------------------------------------------------

    def upsert(self, name: str, items: Sequence[Item], *, insert_only: bool = False,
               pooling_version: Optional[int] = None) -> UpsertResult:
        """Inserts or replaces items; durable when this returns. insert_only refuses existing ids;
        pooling_version (the version the vectors were pooled with) refuses them after a re-fit."""
        col = self._get(name)
        if not items:
            return UpsertResult(0, 0, len(col.label_of_id))
        ids, vectors, metadata = prepare_items(name, col.config, items)
        with col.lock.write():
            if pooling_version is not None and pooling_version != col.pooling_version:
                raise Aborted(f"collection {name!r} was re-fitted (pooling version {col.pooling_version}, these "
                              f"vectors were pooled with {pooling_version}); retry the request")
            if insert_only:
                existing = [i for i in ids if i in col.label_of_id]
                if existing:
                    raise AlreadyExists(f"{len(existing)} id(s) already exist in {name!r}, e.g. {existing[0]!r}; "
                                        f"use upsert to replace them")
            labels, old = self.db.upsert(col.id, ids, vectors, [json.dumps(m) for m in metadata])
            col.index.remove(np.array(list(old.values()), dtype=np.int64))
            col.index.add(labels, vectors)
            for item_id, label, meta in zip(ids, labels.tolist(), metadata):
                if item_id in old:
                    col.metadata.remove(old[item_id])
                    col.id_of_label.pop(old[item_id], None)
                col.metadata.add(label, meta)
                col.id_of_label[label], col.label_of_id[item_id] = item_id, label
            col.applied_lsn = self.db.last_lsn(col.id)
            self._maintain(col)
            count = len(col.label_of_id)
        self._maybe_checkpoint(col)
        return UpsertResult(len(ids) - len(old), len(old), count)

    def delete(self, name: str, ids: Iterable[str], *, strict: bool = False) -> DeleteResult:
        """Removes ids; missing ones are reported (strict: refused, nothing removed)."""
        col = self._get(name)
        ids = list(dict.fromkeys(validate_id(i) for i in ids))
        with col.lock.write():
            missing = [i for i in ids if i not in col.label_of_id]
            if strict and missing:
                raise ItemsNotFound(f"{len(missing)} id(s) not in {name!r}, e.g. {missing[0]!r}; nothing was deleted")
            old = self.db.delete(col.id, [i for i in ids if i in col.label_of_id])
            col.index.remove(np.array(list(old.values()), dtype=np.int64))
            for item_id, label in old.items():
                col.metadata.remove(label)
                col.id_of_label.pop(label, None)
                col.label_of_id.pop(item_id, None)
            col.applied_lsn = self.db.last_lsn(col.id)
            self._maintain(col)
        self._maybe_checkpoint(col)
        return DeleteResult(len(old), missing)

    def _maintain(self, col: _Collection) -> None:
        """Rebuilds a tombstoning index from the truth once tombstones pile up (write lock held)."""
        if col.index.needs_rebuild(len(col.label_of_id)):
            log.info("rebuilding index of %s (%d live, %d tombstones, trained at %d)", col.config.name,
                     len(col.label_of_id), len(col.index.tombstones), col.index.trained_at)
            labels, vectors = [], []
            for label, _, _, vector in self.db.scan(col.id, with_vectors=True):
                labels.append(label)
                vectors.append(np.frombuffer(vector, dtype=np.float32))
            col.index.rebuild(np.array(labels, dtype=np.int64),
                              np.stack(vectors) if vectors else np.zeros((0, col.config.dim), np.float32))

    def _maybe_checkpoint(self, col: _Collection) -> None:
        if col.applied_lsn - col.checkpoint_lsn >= self.checkpoint_every:
            self.checkpoint(col.config.name)

    def get(self, name: str, ids: Iterable[str], include_vectors: bool = False) -> tuple[list[StoredItem], list[str]]:
        col = self._get(name)
        ids = [validate_id(i) for i in ids]
        rows = self.db.items(col.id, ids, include_vectors)
        found = [StoredItem(i, json.loads(rows[i][1]),
                            np.frombuffer(rows[i][2], dtype=np.float32).copy() if include_vectors else None)
                 for i in ids if i in rows]
        return found, [i for i in ids if i not in rows]

    def vector_of(self, name: str, item_id: str) -> np.ndarray:
        items, missing = self.get(name, [item_id], include_vectors=True)
        if missing:
            raise ItemsNotFound(f"item {item_id!r} is not in collection {name!r}")
        return items[0].vector

    # -- search -------------------------------------------------------------------------------

    def search(self, name: str, queries: np.ndarray, top_k: int = 10, flt: Optional[Filter] = None,
               nprobe: int = 0, ef_search: int = 0, include_metadata: bool = False, include_vectors: bool = False,
               exclude_ids: Optional[Sequence[Optional[str]]] = None) -> list[list[Hit]]:
        """Top-k per query; `exclude_ids[i]` drops one id from query i's results ("more like this")."""
        col = self._get(name)
        queries = prepare_queries(col.config, queries, top_k, self.max_top_k)
        k = top_k + (1 if exclude_ids is not None and any(exclude_ids) else 0)
        with col.lock.read():
            allowed = None
            if flt is not None and flt.must:
                allowed = np.fromiter(col.metadata.labels(flt), dtype=np.int64)
            scores, labels = col.index.search(queries, k, allowed, nprobe, ef_search)
            results = []
            for q, (row_scores, row_labels) in enumerate(zip(scores, labels)):
                skip = exclude_ids[q] if exclude_ids is not None else None
                hits = [Hit(col.id_of_label[l], float(s)) for s, l in zip(row_scores.tolist(), row_labels.tolist())
                        if l >= 0 and l in col.id_of_label and col.id_of_label[l] != skip]
                results.append(hits[:top_k])
            if include_metadata or include_vectors:
                wanted = sorted({col.label_of_id[h.id] for hits in results for h in hits})
                rows = self.db.items_by_label(col.id, wanted, with_vectors=include_vectors) if include_vectors else {}
                for hits in results:
                    for hit in hits:
                        label = col.label_of_id[hit.id]
                        if include_metadata:
                            hit.metadata = dict(col.metadata.by_label.get(label, {}))
                        if include_vectors and label in rows:
                            hit.vector = np.frombuffer(rows[label][2], dtype=np.float32).copy()
        return results

