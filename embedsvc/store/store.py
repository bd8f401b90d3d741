"""Durable collections of vectors: SQLite is the truth, FAISS indexes are checkpointed derived state.

One process at a time owns a data directory (an exclusive OS lock, see lock.py). Write path: validate
-> one SQLite transaction (fsynced; the pooling version the vectors were made with is checked in it)
-> apply to the in-memory index and metadata index under the collection's write lock -> acknowledge.
Checkpoints run in a background thread, one at a time per collection, never on the write path: a
failed checkpoint is logged and retried and never changes the outcome of a committed write.
Start-up: each checkpoint must belong to this store (its UUID), this collection (id and creation
time), this index type, and after the log replay hold exactly the live items of the items table; a
checkpoint that fails any check, or fails to load or replay, is replaced by a rebuild from the items
table. A collection whose index cannot even be rebuilt is marked unavailable (its searches and writes
get FAILED_PRECONDITION) while every other collection serves. Searches hold the read lock, so they run
alongside each other and never see half a batch.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from embedsvc.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound, quoted
from embedsvc.store.checkpoint import fsync_dir, is_temporary, read_checkpoint, write_checkpoint
from embedsvc.store.database import Database
from embedsvc.store.indexes import FaissIndex, validate_index_kind
from embedsvc.store.lock import DataDirLock
from embedsvc.store.metadata import Filter, MetadataIndex
from embedsvc.store.models import (CollectionConfig, CollectionInfo, DeleteResult, Hit, Item, StoredItem,
                                   UpsertResult, check_incarnation, prepare_items, prepare_queries, validate_id)
from embedsvc.store.rwlock import RWLock

log = logging.getLogger(__name__)

DEFAULT_MAX_TOP_K = 1000
CHECKPOINT_RETRY_SECONDS = 30.0
_CHECKPOINT_FILE = re.compile(r"collection-(\d+)\.npz")


class CollectionNotFound(NotFound):
    """No collection of that name."""


class ItemsNotFound(NotFound):
    """Ids asked for (strictly) are not in the collection."""


MAX_CACHED_FILTERS = 64  # per collection


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
    # Unique to this incarnation (store UUID + collection id): a re-created name gets a new one.
    uid: str = ""
    # Set (under the write lock) once the collection is dropped; a request that raced the drop sees it.
    dropped: bool = False
    # Why the collection cannot serve (its index could not be loaded nor rebuilt); None when it can.
    unavailable: Optional[str] = None
    # One checkpoint at a time; taken before `lock`.
    checkpoint_lock: threading.Lock = field(default_factory=threading.Lock)
    # Filter -> its index Selection, for repeated filters (a tenant, a category); emptied by every write.
    selections: dict = field(default_factory=dict)

    def selection(self, flt: Filter):
        """Called with the read lock held: readers may fill the cache side by side (they compute the same
        value); every write, holding the write lock, empties it (Store._apply)."""
        key = repr(flt.must)
        found = self.selections.get(key)
        if found is None:
            if len(self.selections) >= MAX_CACHED_FILTERS:
                self.selections.clear()
            found = self.index.select(np.fromiter(self.metadata.labels(flt), dtype=np.int64))
            self.selections[key] = found
        return found

    def info(self) -> CollectionInfo:
        trained = self.index.trained if self.index is not None else False
        factory = self.index.factory_string if self.index is not None else ""
        return CollectionInfo(self.config, len(self.label_of_id), self.created_ms, self.pooling_version,
                              trained, factory, self.uid)

    def check_usable(self) -> None:
        """Called with the collection's lock held: refuses a dropped or unavailable collection."""
        if self.dropped:
            raise CollectionNotFound(f"collection {quoted(self.config.name)} was dropped while the request ran")
        if self.unavailable:
            raise FailedPrecondition(f"collection {quoted(self.config.name)} is unavailable: {self.unavailable}; its "
                                     f"items are kept (Get reads them); drop and re-create it to serve again")


class Store:
    """All collections under one data directory, owned by this process alone."""

    def __init__(self, data_dir: str | Path, *, checkpoint_every: int = 20_000, omp_threads: int = 0,
                 max_top_k: int = DEFAULT_MAX_TOP_K):
        self.data_dir = Path(data_dir)
        try:
            (self.data_dir / "indexes").mkdir(parents=True, exist_ok=True)
            probe = self.data_dir / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise InvalidInput(f"data directory {self.data_dir} is not writable: {exc.strerror or exc}") from None
        self._dir_lock = DataDirLock(self.data_dir)
        try:
            self.db = Database(self.data_dir / "store.sqlite3")
        except BaseException:
            self._dir_lock.release()
            raise
        self.omp_threads = omp_threads
        self._use_faiss_threads()
        self.checkpoint_every = checkpoint_every
        self.max_top_k = max_top_k
        self._registry_lock = threading.Lock()  # guards the dict of collections, not their contents
        self._collections: dict[str, _Collection] = {}
        rows = self.db.collections()
        self._remove_stray_files({cid for cid, *_ in rows})
        for cid, name, config, created_ms, pooling_version in rows:
            self._collections[name] = self._open(cid, config, created_ms, pooling_version)
        self._checkpointer = _Checkpointer(self)
        self._closed = False
        for col in self._collections.values():
            self._maybe_checkpoint(col)

    def _use_faiss_threads(self) -> None:
        """Applies `omp_threads` to the calling thread (searches, writes, start-up). OpenMP keeps the setting per
        thread, and FAISS runs in whichever thread calls it (the server's store pool): set once at start-up, it
        held for the opening thread only, and searches ran on every core."""
        import faiss

        if self.omp_threads and faiss.omp_get_max_threads() != self.omp_threads:
            faiss.omp_set_num_threads(self.omp_threads)

    # -- lifecycle ----------------------------------------------------------------------------

    def _checkpoint_path(self, cid: int) -> Path:
        return self.data_dir / "indexes" / f"collection-{cid}.npz"

    def _remove_stray_files(self, live_ids: set[int]) -> None:
        """Temporary files of writes that died before their rename, and checkpoints of dropped collections."""
        for path in (self.data_dir / "indexes").iterdir():
            match = _CHECKPOINT_FILE.fullmatch(path.name)
            if is_temporary(path) or (match and int(match.group(1)) not in live_ids):
                log.info("removing stray file %s", path)
                path.unlink(missing_ok=True)

    def _open(self, cid: int, config_json: str, created_ms: int, pooling_version: int) -> _Collection:
        config = CollectionConfig.from_json(json.loads(config_json))
        col = _Collection(cid, config, created_ms, pooling_version, None, MetadataIndex(),
                          uid=f"{self.db.uuid}-{cid}")
        for label, item_id, meta, _ in self.db.scan(cid, with_vectors=False):
            col.metadata.add(label, json.loads(meta))
            col.id_of_label[label], col.label_of_id[item_id] = item_id, label
        reason = self._load_checkpoint(col)  # None: loaded; "": there is none; else why it is unusable
        if reason is not None:
            if reason:
                log.warning("collection %s: %s; rebuilding its index from the items table", config.name, reason)
            try:
                self._rebuild(col)
            except Exception as exc:  # noqa: BLE001 - one broken collection must not keep the others offline
                col.unavailable = f"its index could not be rebuilt ({type(exc).__name__}: {exc})"
                log.error("collection %s is unavailable: %s", config.name, col.unavailable)
                return col
        log.info("opened collection %s: %d items, replayed to lsn %d", config.name, len(col.label_of_id),
                 col.applied_lsn)
        return col

    def _load_checkpoint(self, col: _Collection) -> Optional[str]:
        """Loads the collection's checkpoint and replays the log after it; returns why it was unusable."""
        path = self._checkpoint_path(col.id)
        try:
            loaded = read_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means: rebuild from the truth
            return f"checkpoint {path.name} is unreadable ({type(exc).__name__}: {exc})"
        if loaded is None:
            return ""
        header, arrays = loaded
        expected = {"store_uuid": self.db.uuid, "collection_id": col.id, "created_ms": col.created_ms,
                    "kind": col.config.index, "dim": col.config.dim, "metric": col.config.metric}
        wrong = [key for key, value in expected.items() if header.get(key) != value]
        if wrong or not isinstance(header.get("lsn"), int):
            return f"checkpoint {path.name} belongs to another store, collection or index ({', '.join(wrong) or 'lsn'})"
        try:
            col.index = FaissIndex.from_arrays(header, arrays)
            col.applied_lsn = col.checkpoint_lsn = header["lsn"]
            self._replay(col)
        except Exception as exc:  # noqa: BLE001
            return f"checkpoint {path.name} could not be loaded or replayed ({type(exc).__name__}: {exc})"
        if len(col.index) != len(col.label_of_id):
            return (f"checkpoint {path.name} holds {len(col.index)} vectors after the log replay but the items table "
                    f"{len(col.label_of_id)}")
        return None

    def _rebuild(self, col: _Collection) -> None:
        """A fresh index of every live item; the log is covered up to its end."""
        col.index = FaissIndex(col.config.index, col.config.dim, col.config.metric)
        last = self.db.last_lsn(col.id)
        self._load_all(col)
        col.applied_lsn, col.checkpoint_lsn = last, -1  # -1: checkpoint soon

    def _replay(self, col: _Collection) -> None:
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
            self._checkpoint_one(col)

    def _checkpoint_one(self, col: _Collection) -> None:
        path = self._checkpoint_path(col.id)
        with col.checkpoint_lock:
            if col.dropped or col.unavailable or col.index is None:
                return
            with col.lock.read():  # a consistent snapshot; the file is written outside the lock
                if col.applied_lsn == col.checkpoint_lsn and path.exists():
                    return
                header, arrays = col.index.to_arrays()
                lsn = col.applied_lsn
                header.update(lsn=lsn, store_uuid=self.db.uuid, collection_id=col.id, created_ms=col.created_ms,
                              count=len(col.index))
            write_checkpoint(path, header, arrays)
            col.checkpoint_lsn = lsn
            self.db.truncate_log(col.id, lsn)

    def close(self, checkpoint: bool = True) -> None:
        """Stops the checkpointer, checkpoints every collection (unless told not to), releases the lock."""
        if self._closed:
            return
        self._closed = True
        self._checkpointer.stop()
        if checkpoint:
            for col in list(self._collections.values()):
                try:
                    self._checkpoint_one(col)
                except Exception as exc:  # noqa: BLE001 - the log still covers it: replayed at the next start
                    log.warning("checkpoint of %s failed at shutdown (%s); the log will be replayed on start",
                                col.config.name, exc)
        self.db.close()
        self._dir_lock.release()

    # -- collections --------------------------------------------------------------------------

    def _get(self, name: str) -> _Collection:
        try:
            return self._collections[name]
        except KeyError:
            raise CollectionNotFound(f"collection {quoted(name)} does not exist; ListCollections shows those that do") from None

    def create_collection(self, config: CollectionConfig) -> CollectionInfo:
        validate_index_kind(config.index, config.dim, config.metric)
        with self._registry_lock:
            if config.name in self._collections:
                raise AlreadyExists(f"collection {quoted(config.name)} already exists; drop it first or pick another name")
            index = FaissIndex(config.index, config.dim, config.metric)
            cid, created = self.db.create_collection(config.name, config.to_json())
            col = _Collection(cid, config, created, 0, index, MetadataIndex(), uid=f"{self.db.uuid}-{cid}")
            self._collections[config.name] = col
        return col.info()

    def get_collection(self, name: str) -> CollectionInfo:
        return self._get(name).info()

    def list_collections(self) -> list[CollectionInfo]:
        return [col.info() for _, col in sorted(self._collections.items())]

    def drop_collection(self, name: str) -> int:
        with self._registry_lock:
            col = self._get(name)
            with col.checkpoint_lock, col.lock.write():
                removed = self.db.drop_collection(col.id)
                col.dropped = True
                self._collections.pop(name)
                path = self._checkpoint_path(col.id)
                if path.exists():
                    path.unlink()
                    fsync_dir(path.parent)
        return removed

    def set_pooling_state(self, name: str, state: bytes, require_empty: bool = True,
                          uid: Optional[str] = None) -> int:
        """Stores a fitted pooling state (e.g. NetVLAD codebook); vectors of an older state must not mix."""
        col = self._get(name)
        with col.lock.write():
            col.check_usable()
            check_incarnation(name, col.uid, uid)
            if require_empty and col.label_of_id:
                raise FailedPrecondition(f"collection {quoted(name)} holds {len(col.label_of_id)} items embedded with the "
                                         f"current pooling state; fit a new collection (or drop and recreate it)")
            col.pooling_version = self.db.set_pooling_state(col.id, state)
            return col.pooling_version

    def index_size_bytes(self, name: str) -> int:
        """Size of the collection's serialised FAISS index: what it costs in memory and on disk."""
        col = self._get(name)
        with col.lock.read():
            col.check_usable()
            _, arrays = col.index.to_arrays()
        return int(sum(a.nbytes for a in arrays.values()))

    def pooling_state(self, name: str) -> Optional[bytes]:
        return self.db.pooling_state(self._get(name).id)

    # -- items --------------------------------------------------------------------------------

    def upsert(self, name: str, items: Sequence[Item], *, insert_only: bool = False,
               pooling_version: Optional[int] = None, uid: Optional[str] = None,
               thumbnails: Optional[dict[str, tuple[str, bytes]]] = None) -> UpsertResult:
        """Inserts or replaces items; durable when this returns. insert_only refuses existing ids.

        Vectors the caller computed with a collection's pooling pass the `uid` and `pooling_version` they
        were computed for: if the collection was re-created or re-fitted since, nothing is stored (Aborted).
        `thumbnails` {id: (media type, bytes)}: small images for display, stored with the items.
        """
        self._use_faiss_threads()
        col = self._get(name)
        check_incarnation(name, col.uid, uid)
        if not items:
            return UpsertResult(0, 0, len(col.label_of_id))
        ids, vectors, metadata = prepare_items(name, col.config, items)
        with col.lock.write():
            col.check_usable()
            if insert_only:
                existing = [i for i in ids if i in col.label_of_id]
                if existing:
                    raise AlreadyExists(f"{len(existing)} id(s) already exist in {quoted(name)}, e.g. {quoted(existing[0])}; "
                                        f"use upsert to replace them")
            wanted = set(ids)
            kept = {i: t for i, t in (thumbnails or {}).items() if i in wanted}
            labels, old = self.db.upsert(col.id, ids, vectors, [json.dumps(m) for m in metadata], pooling_version,
                                         kept)
            self._apply(col, lambda: self._apply_upsert(col, ids, labels, old, vectors, metadata))
            count = len(col.label_of_id)
        self._maybe_checkpoint(col)
        return UpsertResult(len(ids) - len(old), len(old), count)

    def _apply_upsert(self, col: _Collection, ids, labels, old, vectors, metadata) -> None:
        for item_id, label, meta in zip(ids, labels.tolist(), metadata):
            if item_id in old:
                col.metadata.remove(old[item_id])
                col.id_of_label.pop(old[item_id], None)
            col.metadata.add(label, meta)
            col.id_of_label[label], col.label_of_id[item_id] = item_id, label
        col.index.remove(np.array(list(old.values()), dtype=np.int64))
        col.index.add(labels, vectors)

    def _apply(self, col: _Collection, change) -> None:
        """Applies a committed change to the in-memory state (write lock held). The change is durable
        whatever happens here: if applying it fails, the index is rebuilt from the items table, and if
        even that fails the collection is marked unavailable; the caller's write still succeeded."""
        col.selections.clear()  # every in-memory change comes through here: no prepared filter outlives it
        try:
            change()
            col.applied_lsn = self.db.last_lsn(col.id)
            self._maintain(col)
        except Exception as exc:  # noqa: BLE001
            log.exception("collection %s: applying a committed write to the index failed; rebuilding it",
                          col.config.name)
            try:
                self._reload(col)
            except Exception as again:  # noqa: BLE001
                col.unavailable = f"its index failed ({type(exc).__name__}: {exc}) and could not be rebuilt ({again})"
                log.error("collection %s is unavailable: %s", col.config.name, col.unavailable)

    def _reload(self, col: _Collection) -> None:
        """In-memory state anew from the items table (write lock held)."""
        col.metadata, col.id_of_label, col.label_of_id = MetadataIndex(), {}, {}
        for label, item_id, meta, _ in self.db.scan(col.id, with_vectors=False):
            col.metadata.add(label, json.loads(meta))
            col.id_of_label[label], col.label_of_id[item_id] = item_id, label
        self._rebuild(col)

    def delete(self, name: str, ids: Iterable[str], *, strict: bool = False) -> DeleteResult:
        """Removes ids; missing ones are reported (strict: refused, nothing removed)."""
        self._use_faiss_threads()
        col = self._get(name)
        ids = list(dict.fromkeys(validate_id(i) for i in ids))
        with col.lock.write():
            col.check_usable()
            missing = [i for i in ids if i not in col.label_of_id]
            if strict and missing:
                raise ItemsNotFound(f"{len(missing)} id(s) not in {quoted(name)}, e.g. {quoted(missing[0])}; nothing was deleted")
            old = self.db.delete(col.id, [i for i in ids if i in col.label_of_id])

            def change() -> None:
                for item_id, label in old.items():
                    col.metadata.remove(label)
                    col.id_of_label.pop(label, None)
                    col.label_of_id.pop(item_id, None)
                col.index.remove(np.array(list(old.values()), dtype=np.int64))

            self._apply(col, change)
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
        """Asks the background checkpointer; never checkpoints on the caller's (write) path."""
        if col.checkpoint_lsn < 0 or col.applied_lsn - col.checkpoint_lsn >= self.checkpoint_every:
            self._checkpointer.request(col)

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
            raise ItemsNotFound(f"item {quoted(item_id)} is not in collection {quoted(name)}")
        return items[0].vector

    def thumbnail(self, name: str, item_id: str) -> tuple[str, bytes]:
        """(media type, bytes) of an item's stored thumbnail."""
        col = self._get(name)
        found = self.db.thumbnail(col.id, validate_id(item_id))
        if found is None:
            where = "has no thumbnail" if item_id in col.label_of_id else "is not in the collection"
            raise ItemsNotFound(f"item {quoted(item_id)} of {quoted(name)} {where}")
        return found

    # -- search -------------------------------------------------------------------------------

    def missing_keys(self, name: str, keys: Sequence[str]) -> list[str]:
        """The keys no live item holds, in the order given."""
        col = self._get(name)
        with col.lock.read():
            return [key for key in keys if not col.metadata.holds_key(key)]

    def search(self, name: str, queries: np.ndarray, top_k: int = 10, flt: Optional[Filter] = None,
               nprobe: int = 0, ef_search: int = 0, include_metadata: bool = False, include_vectors: bool = False,
               exclude_ids: Optional[Sequence[Optional[str]]] = None) -> list[list[Hit]]:
        """Top-k per query; `exclude_ids[i]` drops one id from query i's results ("more like this")."""
        self._use_faiss_threads()
        col = self._get(name)
        queries = prepare_queries(col.config, queries, top_k, self.max_top_k, nprobe, ef_search)
        k = top_k + (1 if exclude_ids is not None and any(exclude_ids) else 0)
        with col.lock.read():
            col.check_usable()
            allowed = col.selection(flt) if flt is not None and flt.must else None
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




class _Checkpointer:
    """One background thread writes checkpoints that writers ask for; failures are retried later."""

    def __init__(self, store: Store):
        self.store = store
        self._pending: dict[str, _Collection] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)
        self._thread.start()

    def request(self, col: _Collection) -> None:
        with self._cond:
            self._pending[col.uid] = col
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch, self._pending = list(self._pending.values()), {}
            failed = []
            for col in batch:
                try:
                    self.store._checkpoint_one(col)
                except Exception as exc:  # noqa: BLE001 - the log still holds every change: nothing is lost
                    log.warning("checkpoint of %s failed (%s: %s); retrying in %.0f s", col.config.name,
                                type(exc).__name__, exc, CHECKPOINT_RETRY_SECONDS)
                    failed.append(col)
            if failed:
                with self._cond:
                    self._cond.wait(CHECKPOINT_RETRY_SECONDS)
                    for col in failed:
                        self._pending.setdefault(col.uid, col)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
