"""Durable collections of vectors: SQLite and the vector files are the truth, indexes and columns are
checkpointed derived state.

One process at a time owns a data directory (an exclusive OS lock, see lock.py). Write path: validate
-> one SQLite transaction (fsynced; the pooling version the vectors were made with is checked in it) that
first appends the vectors to the collection's vector file (vectors.py; synced while the transaction inserts
its rows, and on disk before it commits), then commits ids, labels, metadata and the log -> apply to the
in-memory index, ids and metadata columns under the collection's write lock -> acknowledge. Flat collections
search their vector file in place (memory-mapped): no copy of the vectors is made at start-up or by
checkpoints. Checkpoints run in a background thread, one at a time per collection, never on the write path: a
failed checkpoint is logged and retried and never changes the outcome of a committed write. A checkpoint holds
the ids and metadata in columns and, for index types other than flat, the FAISS index (streamed to and from
the file).
Start-up: each checkpoint must belong to this store (its UUID), this collection (id and creation time),
this index type, and after the log replay hold exactly as many items as the items table; a checkpoint that
fails any check, or fails to load or replay, is replaced by a rebuild from the items table and the vector
file. A collection whose index cannot even be rebuilt is marked unavailable (its searches and writes get
FAILED_PRECONDITION) while every other collection serves. Searches hold the read lock, so they run
alongside each other and never see half a batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from embedsvc.errors import AlreadyExists, FailedPrecondition, InvalidInput, Unavailable, quoted
from embedsvc.store.checkpoint import CheckpointReader, fsync_dir, is_temporary, read_checkpoint, write_checkpoint
from embedsvc.store.database import Database, DatabaseDamaged
from embedsvc.store.indexes import FaissIndex, FileFlatIndex, file_backed, train_sample, validate_index_kind
from embedsvc.store.lock import DataDirLock
from embedsvc.store.metadata import Filter, MetadataIndex
from embedsvc.store.models import (
    DEFAULT_SEARCH,
    NAME_PATTERN,
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
    check_incarnation,
    prepare_items,
    prepare_queries,
    unavailable_error,
    validate_id,
)
from embedsvc.store.rwlock import RWLock
from embedsvc.store.vectors import VECTOR_FILE, Layout, VectorFile, VectorFileError, remove_generations

log = logging.getLogger(__name__)

DEFAULT_MAX_TOP_K = 1000
CHECKPOINT_RETRY_SECONDS = 30.0
# A checkpoint is due after checkpoint_every changes, and no sooner than this share of the collection's
# items: checkpoints of a growing collection cost O(n) each, so their total stays linear in its size.
CHECKPOINT_SHARE = 0.25
# Compact a vector file once its dead rows (replaced, deleted) outnumber both this and its live rows.
COMPACT_MIN_DEAD = 10_000
CHECKPOINT_FORMAT = 2  # 1: the whole FAISS index serialised in the .npz, ids and metadata read from SQLite
FILL_CHUNK = 65_536  # vectors added to a rebuilt index at a time (bounded extra memory)
PROGRESS_SECONDS = 5.0  # a long replay or rebuild logs a progress line this often
_CHECKPOINT_FILE = re.compile(r"collection-(\d+)\.npz")


class CollectionLoading(Unavailable):
    """The collection is still being loaded after a start-up (the store loads in the background)."""


class _LoadCancelled(Exception):
    """The store closed while a collection was loading."""


MAX_CACHED_FILTERS = 64  # per collection

Index = FaissIndex | FileFlatIndex


_NONE = np.array(None, dtype=object)  # compared with an object array element by element: where labels hold no id


class _Ids:
    """id <-> label of the live items: an object array indexed by label one way, a dict the other.

    The dict is made on demand (`label_of`, or `build` from the start-up loader once the collection serves):
    hashing a million ids took seconds of a restart, and searches need only the array. Changes take `_lock`,
    so a change never interleaves with the dict's making; searches read the array without it."""

    def __init__(self) -> None:
        self.by_label = np.empty(0, dtype=object)
        self._label_of: dict[str, int] | None = {}  # None until made
        self._count = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._count

    def defer(self) -> None:
        """From now until `build`, the dict is not kept (a start-up fills the array first)."""
        self._label_of = None

    @property
    def label_of(self) -> dict[str, int]:
        found = self._label_of
        if found is None:
            found = self.build()
        return found

    def build(self) -> dict[str, int]:
        """Makes the id -> label dict if it is not made yet. ValueError if two live labels hold one id."""
        with self._lock:
            if self._label_of is None:
                labels = self.live_labels()
                made = dict(zip(self.by_label[labels].tolist(), labels.tolist()))
                if len(made) != len(labels):
                    raise ValueError(f"{len(labels) - len(made)} id(s) are held by two labels each")
                self._label_of = made
            return self._label_of

    def reserve(self, top: int, exact: bool = False) -> None:
        """Room for labels below `top` (`exact`: no more, e.g. a checkpoint's known size)."""
        if top > len(self.by_label):
            grown = np.empty(top if exact else max(top, 1024, int(len(self.by_label) * 1.5)), dtype=object)
            grown[: len(self.by_label)] = self.by_label
            self.by_label = grown

    def add(self, labels: Sequence[int], ids: Sequence[str]) -> None:
        """Labels are new (not live); their ids are not live under other labels."""
        if not len(labels):
            return
        with self._lock:
            self.reserve(int(max(labels)) + 1)
            if self._label_of is not None:
                self._label_of.update(zip(ids, labels))
            self.by_label[np.asarray(labels, dtype=np.int64)] = np.asarray(ids, dtype=object)
            self._count += len(labels)

    def remove(self, ids: Iterable[str]) -> list[int]:
        """Labels the ids had (they are gone now)."""
        label_of = self.label_of
        with self._lock:
            labels = [label_of.pop(i) for i in ids]
            self.by_label[labels] = None
            self._count -= len(labels)
        return labels

    def remove_labels(self, labels: np.ndarray) -> None:
        """Removes the live ones among these labels (the dict need not be made)."""
        with self._lock:
            labels = np.asarray(labels, dtype=np.int64)
            labels = labels[labels < len(self.by_label)]
            held = self.by_label[labels]
            live = labels[np.not_equal(held, _NONE)]
            if self._label_of is not None:
                for item_id in self.by_label[live].tolist():
                    self._label_of.pop(item_id, None)
            self.by_label[live] = None
            self._count -= len(live)

    def id_of(self, label: int) -> str | None:
        return self.by_label[label] if 0 <= label < len(self.by_label) else None

    def live_labels(self) -> np.ndarray:
        if self._label_of is None:
            return np.flatnonzero(np.not_equal(self.by_label, _NONE)).astype(np.int64)
        labels = np.fromiter(self._label_of.values(), dtype=np.int64, count=len(self._label_of))
        labels.sort()
        return labels


def _unreadable_config(config_json: str, name: str) -> tuple[CollectionConfig | None, str]:
    """A collection's config from its catalogue row (named `name`), or None and why the row cannot be read (a
    damaged row makes that collection unavailable, not the data directory unopenable). A row that is JSON but
    holds a value of the wrong type or an unknown metric or index type is as unreadable: served, it searched
    with other semantics than the collection was made for, or broke ListCollections for every collection."""
    try:
        config = CollectionConfig.from_json(json.loads(config_json))
        wrong = [key for key in _CONFIG_TEXT if not isinstance(getattr(config, key), str)]
        wrong += ["dim"] if type(config.dim) is not int else []  # true passes the config's own check
        params = config.pooling_params
        if not isinstance(params, dict) or not all(isinstance(v, str) for kv in params.items() for v in kv):
            wrong.append("pooling_params")
        if wrong:
            raise TypeError(f"{', '.join(wrong)} hold(s) a value of the wrong type")
        validate_index_kind(config.index, config.dim, config.metric)
    except (ValueError, TypeError, AttributeError, InvalidInput) as exc:
        return None, f"its configuration in the catalogue (store.sqlite3) cannot be read ({type(exc).__name__}: {exc})"
    if config.name != name:  # the row's name is the collection's: unique, and what requests name
        log.warning("collection %s: its configuration names it %s; serving it as %s", name, config.name, name)
        config = dataclasses.replace(config, name=name)
    return config, ""


_CONFIG_TEXT = ("name", "model", "pooling", "metric", "index", "weights")  # the config's fields that are text


@dataclass
class _Collection:
    id: int
    config: CollectionConfig
    created_ms: int
    pooling_version: int
    index: Index | None
    metadata: MetadataIndex
    vectors: VectorFile | None = None
    lock: RWLock = field(default_factory=RWLock)
    checkpoint_lsn: int = 0
    applied_lsn: int = 0
    ids: _Ids = field(default_factory=_Ids)
    # Unique to this incarnation (store UUID + collection id): a re-created name gets a new one.
    uid: str = ""
    # Set (under the write lock) once the collection is dropped; a request that raced the drop sees it.
    dropped: bool = False
    # Why the collection cannot serve (its index could not be loaded nor rebuilt); None when it can.
    unavailable: str | None = None
    # One checkpoint at a time; taken before `lock`.
    checkpoint_lock: threading.Lock = field(default_factory=threading.Lock)
    # Filter -> its index Selection, for repeated filters (a tenant, a category); emptied by every write.
    selections: dict = field(default_factory=dict)
    # Set until the start-up load of this collection finished (successfully or not); requests meanwhile get
    # CollectionLoading. `progress` tells how far the load is, `stored` what the items table holds.
    loading: bool = False
    progress: _Progress | None = None
    stored: int = 0

    def selection(self, flt: Filter):
        """Called with the read lock held: readers may fill the cache side by side (they compute the same
        value); every write, holding the write lock, empties it (LocalStore._apply)."""
        key = repr(flt.must)
        found = self.selections.get(key)
        if found is None:
            if len(self.selections) >= MAX_CACHED_FILTERS:
                self.selections.clear()
            assert self.index is not None  # the caller ran check_usable
            found = self.index.select(self.metadata.labels(flt))
            self.selections[key] = found
        return found

    def info(self) -> CollectionInfo:
        trained = self.index.trained if self.index is not None else False
        factory = self.index.factory_string if self.index is not None else ""
        count = self.stored if self.loading else len(self.ids)
        return CollectionInfo(
            self.config,
            count,
            self.created_ms,
            self.pooling_version,
            trained,
            factory,
            self.uid,
            self.unavailable or "",
        )

    def check_loaded(self) -> None:
        """Refuses, without waiting for any lock, a request to a collection still loading at start-up."""
        if self.loading:
            progress = self.progress
            where = f" ({progress.state()})" if progress is not None else ""
            raise CollectionLoading(
                f"collection {quoted(self.config.name)} is still loading after the server "
                f"started{where}; it answers once loaded: retry shortly (GET /readyz answers "
                f"200 when every collection is loaded)"
            )

    def check_usable(self) -> None:
        """Called with the collection's lock held: refuses a dropped or unavailable collection."""
        if self.dropped:
            raise CollectionNotFound(f"collection {quoted(self.config.name)} was dropped while the request ran")
        if self.unavailable:
            raise unavailable_error(self.config.name, self.unavailable)


class _Progress:
    """Logs `done of total` every `seconds` during a long start-up step (`step` names its current part), so a
    restart of a large collection shows how far it is; raises _LoadCancelled once `cancel` is set."""

    def __init__(self, what: str, total: int, seconds: float = PROGRESS_SECONDS, cancel: threading.Event | None = None):
        self.what, self.total, self.seconds, self.cancel = what, total, seconds, cancel
        self.started = self.last = time.monotonic()
        self.step, self.done = "", 0

    def __call__(self, done: int, step: str | None = None) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise _LoadCancelled()
        self.done = done
        if step is not None:
            self.step = step
        now = time.monotonic()
        if now - self.last >= self.seconds:
            self.last = now
            log.info("%s: %s", self.what, self.state())

    def state(self) -> str:
        step = f"{self.step}, " if self.step else ""
        return (
            f"{step}{self.done} of {self.total} items ({100 * self.done / max(1, self.total):.0f}%, "
            f"{time.monotonic() - self.started:.1f} s)"
        )


class LocalStore:
    """All collections under one data directory, owned by this process alone."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        checkpoint_every: int = 20_000,
        omp_threads: int = 0,
        max_top_k: int = DEFAULT_MAX_TOP_K,
        background_load: bool = False,
        progress_seconds: float = PROGRESS_SECONDS,
    ):
        """`background_load`: return once the data directory is open and load the collections in a thread
        (each answers CollectionLoading until loaded; `loaded` tells when all are), so a server can listen
        meanwhile; else every collection is loaded when this returns. `progress_seconds`: how often a long
        load, replay or rebuild logs how far it is."""
        self.data_dir = Path(data_dir)
        self.folder = self.data_dir / "indexes"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # A nameless (or uniquely named) file: a fixed name let two openers racing here remove each other's
            # probe, and the loser reported the directory not writable instead of meeting the lock.
            with tempfile.TemporaryFile(dir=self.data_dir, prefix=".write-probe-"):
                pass
        except OSError as exc:
            for path, what in ((self.data_dir, "data directory"), (self.folder, "folder of vector files")):
                if path.exists() and not path.is_dir():  # a copy gone wrong, not a permission
                    raise InvalidInput(
                        f"{path} is not a folder but embedsvc's {what}: move it away (or point --data-dir "
                        f"elsewhere), then start again"
                    ) from None
            raise InvalidInput(f"data directory {self.data_dir} is not writable: {exc.strerror or exc}") from None
        self._dir_lock = DataDirLock(self.data_dir)
        try:
            self.db = Database(self.data_dir / "store.sqlite3")
        except BaseException:
            self._dir_lock.release()
            raise
        self.omp_threads = omp_threads
        self.checkpoint_every = checkpoint_every
        self.max_top_k = max_top_k
        self.progress_seconds = progress_seconds
        self._registry_lock = threading.Lock()  # guards the dict of collections, not their contents
        self._collections: dict[str, _Collection] = {}
        self._closing = threading.Event()  # stops a background load
        self.loaded = threading.Event()  # set once every collection present at start-up finished loading
        self._closed = False
        self._loader: threading.Thread | None = None
        self._checkpointer = _Checkpointer(self)  # idle until a writer asks
        try:
            self._open(background_load)
        except BaseException as exc:  # what this opened goes now, not at the process's exit: a retry here finds it free
            self.close(checkpoint=False)
            cause = exc.cause if isinstance(exc, DatabaseDamaged) else exc  # damaged: a page past the header
            if isinstance(cause, sqlite3.DatabaseError):
                raise self.db.unopened(cause) from None
            raise

    def _open(self, background_load: bool) -> None:
        self._use_faiss_threads()
        rows = self.db.collections()
        self._remove_stray_files({cid for cid, *_ in rows})
        if self.db.items_hold_vectors():
            self._migrate([(cid, name, config) for cid, name, config, *_ in rows])
        for cid, name, config, created_ms, pooling_version in rows:
            if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):  # no request could name it
                log.error(
                    "the catalogue (store.sqlite3) names collection %d %r, which is not a collection name: it is "
                    "left out (its files are kept); give it a valid name there, or restore the file from a backup",
                    cid,
                    name,
                )
                continue
            self._collections[name] = self._placeholder(cid, name, config, created_ms, pooling_version)
        if background_load:
            self._loader = threading.Thread(target=self._load_all, name="store-loader", daemon=True)
            self._loader.start()
        else:
            self._load_all()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Blocks until every collection present at start-up finished loading; False on timeout."""
        return self.loaded.wait(timeout)

    def _load_all(self) -> None:
        """Loads each collection in turn (the loader thread, or the opener's); never raises for one collection:
        one that cannot load is marked unavailable and the others still load."""
        started = time.monotonic()
        loading = [col for col in self._collections.values() if col.loading]
        try:
            for col in loading:
                if self._closing.is_set():
                    return
                self._load_collection(col)
                self._maybe_checkpoint(col)
            if loading:
                log.info("loaded %d collection(s) in %.1f s", len(loading), time.monotonic() - started)
        finally:
            self.loaded.set()
        for col in loading:  # while they serve: what only writes and a few reads need
            if self._closing.is_set():
                return
            self._make_id_dict(col)

    def _make_id_dict(self, col: _Collection) -> None:
        """Makes the id -> label dict of a loaded collection; a checkpoint that gave one id two labels (a damaged
        file) is replaced by a rebuild from the items table, as at load."""
        ids = col.ids
        try:
            ids.build()
        except ValueError as exc:
            with col.lock.write():
                if col.ids is not ids or col.dropped or col.unavailable:  # a write that met it first rebuilt it
                    return
                log.warning(
                    "collection %s: its checkpoint is inconsistent (%s); rebuilding its index from the items table",
                    col.config.name,
                    exc,
                )
                col.selections.clear()
                try:
                    self._reload(col)
                except Exception as again:  # noqa: BLE001
                    col.unavailable = f"its index could not be rebuilt ({type(again).__name__}: {again})"
                    log.error("collection %s is unavailable: %s", col.config.name, col.unavailable)

    def _use_faiss_threads(self) -> None:
        """Applies `omp_threads` to the calling thread (searches, writes, start-up). OpenMP keeps the setting per
        thread, and FAISS runs in whichever thread calls it (the server's store pool): set once at start-up, it
        held for the opening thread only, and searches ran on every core."""
        import faiss

        if self.omp_threads and faiss.omp_get_max_threads() != self.omp_threads:
            faiss.omp_set_num_threads(self.omp_threads)

    # -- lifecycle ----------------------------------------------------------------------------

    def _checkpoint_path(self, cid: int) -> Path:
        return self.folder / f"collection-{cid}.npz"

    def _remove_stray_files(self, live_ids: set[int]) -> None:
        """Temporary files of writes that died before their rename, and files of dropped collections."""
        for path in self.folder.iterdir():
            match = _CHECKPOINT_FILE.fullmatch(path.name) or VECTOR_FILE.fullmatch(path.name)
            if is_temporary(path) or (match and int(match.group(1)) not in live_ids):
                log.info("removing stray file %s", path)
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    raise FailedPrecondition(
                        f"cannot remove the stray file {path} ({exc.strerror or exc}); it is not part of any "
                        f"collection: remove it by hand, then start again"
                    ) from None

    def _migrate(self, collections: list[tuple[int, str, str]]) -> None:
        """First format -> this one: each collection's vectors move from the items table to a vector file
        (synced), then one transaction drops the column and records where the rows are. A crash before that
        commit leaves the first format as it was (the new files are strays the next start removes)."""
        layouts = {}
        for cid, name, config_json in collections:
            config, unreadable = _unreadable_config(config_json, name)
            if config is None:
                raise FailedPrecondition(f"collection {quoted(name)} cannot be migrated: {unreadable}")
            dim = config.dim
            layout, next_label = self.db.layout(cid)
            count = self.db.count(cid)
            progress = _Progress(
                f"moving the vectors of collection {name} to its vector file", count, self.progress_seconds
            )
            generation = layout.generation + 1
            path = VectorFile.file_path(self.folder, cid, generation)
            labels, done = [], 0
            with open(path, "wb") as f:
                for chunk_labels, chunk_vectors in self.db.old_vectors(cid):
                    for vector in chunk_vectors:
                        if len(vector) != dim * 4:
                            raise FailedPrecondition(
                                f"collection {quoted(name)} holds a vector of {len(vector)} "
                                f"bytes, not {dim * 4}; the store cannot be migrated"
                            )
                        f.write(vector)
                    labels.extend(chunk_labels)
                    done += len(chunk_labels)
                    progress(done)
                f.flush()
                os.fsync(f.fileno())
            layouts[cid] = VectorFile.write_labels(
                self.folder, cid, generation, np.array(labels, dtype=np.int64), next_label
            )
        fsync_dir(self.folder)
        self.db.drop_vector_column(layouts)
        log.info("migrated the data directory: vectors of %d collection(s) moved to vector files", len(layouts))

    def _placeholder(self, cid: int, name: str, config_json: str, created_ms: int, pooling_version: int) -> _Collection:
        """A collection as listed before its load: requests to it get CollectionLoading. One whose catalogue row
        cannot be read is listed as unavailable (its items still read) and the others open."""
        uid = f"{self.db.uuid}-{cid}"
        config, unreadable = _unreadable_config(config_json, name)
        numbers = {"created_ms": created_ms, "pooling_version": pooling_version}
        wrong = [f"{key} {value!r}" for key, value in numbers.items() if type(value) is not int]
        if config is not None and wrong:  # SQLite keeps text in an INTEGER column
            config, unreadable = None, f"its catalogue row (store.sqlite3) holds {', '.join(wrong)}, not an integer"
        if config is None:
            log.error("collection %s is unavailable: %s", name, unreadable)
            created_ms, pooling_version = (value if type(value) is int else 0 for value in numbers.values())
            col = _Collection(
                cid, CollectionConfig(name, 1), created_ms, pooling_version, None, MetadataIndex(), uid=uid
            )
            col.unavailable = unreadable
            return col
        col = _Collection(cid, config, created_ms, pooling_version, None, MetadataIndex(), uid=uid, loading=True)
        try:
            col.stored = self.db.count(cid)
        except DatabaseDamaged as exc:  # a damaged page of its rows: the others' may be whole
            col.loading = False
            col.unavailable = (
                f"its rows in {self.db.path.name} cannot be read ({exc.reason}); restore the file from a backup"
            )
            log.error("collection %s is unavailable: %s", name, col.unavailable)
            return col
        col.progress = _Progress(f"loading collection {config.name}", col.stored, self.progress_seconds, self._closing)
        return col

    def _load_collection(self, col: _Collection) -> None:
        """Loads one listed collection (its write lock held); it serves, or is unavailable, once this returns."""
        try:
            with col.lock.write():
                try:
                    self._load(col)
                except _LoadCancelled:
                    col.unavailable = "the store closed while it was loading"
                except Exception as exc:
                    col.unavailable = f"it could not be loaded ({type(exc).__name__}: {exc})"
                    log.exception("collection %s is unavailable: %s", col.config.name, col.unavailable)
                finally:
                    col.loading = False
        finally:
            col.progress = None

    def _load(self, col: _Collection) -> None:
        config, progress = col.config, col.progress
        assert progress is not None  # set with `loading`
        layout, next_label = self.db.layout(col.id)
        remove_generations(self.folder, col.id, keep=layout.generation)
        try:
            col.vectors = VectorFile(self.folder, col.id, config.dim, layout, next_label, populate=True)
        except (OSError, ValueError, VectorFileError) as exc:
            col.unavailable = f"its vectors cannot be read ({exc})"
            log.error("collection %s is unavailable: %s", config.name, col.unavailable)
            self._load_rows(col, progress)
            return
        reason = self._load_checkpoint(col, progress)  # None: loaded; "": there is none; else why it is unusable
        if reason is not None:
            if reason:
                log.warning("collection %s: %s; rebuilding its index from the items table", config.name, reason)
            try:
                self._reload(col, progress)
            except _LoadCancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken collection must not keep the others offline
                col.unavailable = f"its index could not be rebuilt ({type(exc).__name__}: {exc})"
                log.error("collection %s is unavailable: %s", config.name, col.unavailable)
                return
        log.info(
            "opened collection %s: %d items, replayed to lsn %d, in %.1f s",
            config.name,
            len(col.ids),
            col.applied_lsn,
            time.monotonic() - progress.started,
        )

    def _new_index(self, col: _Collection) -> Index:
        config = col.config
        if file_backed(config.index):
            return FileFlatIndex(config.index, config.dim, config.metric, col.vectors)
        return FaissIndex(config.index, config.dim, config.metric)

    def _load_checkpoint(self, col: _Collection, progress: _Progress) -> str | None:
        """Loads the collection's checkpoint and replays the log after it; returns why it was unusable."""
        path = self._checkpoint_path(col.id)
        if not path.is_file():
            return ""
        try:
            reader = CheckpointReader(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint means: rebuild from the truth
            return f"checkpoint {path.name} is unreadable ({type(exc).__name__}: {exc})"
        with reader:
            header = reader.header
            expected = {
                "store_uuid": self.db.uuid,
                "collection_id": col.id,
                "created_ms": col.created_ms,
                "kind": col.config.index,
                "dim": col.config.dim,
                "metric": col.config.metric,
            }
            wrong = [key for key, value in expected.items() if header.get(key) != value]
            if wrong or not isinstance(header.get("lsn"), int):
                return (
                    f"checkpoint {path.name} belongs to another store, collection or index "
                    f"({', '.join(wrong) or 'lsn'})"
                )
            rowless = np.empty(0, dtype=np.int64)
            try:
                if header.get("format") == CHECKPOINT_FORMAT:
                    self._load_columns(col, header, reader, progress)
                    col.index, rowless = self._index_from(col, header, reader, progress)
                elif file_backed(col.config.index):  # first format: its index copies the vector file
                    return f"checkpoint {path.name} is of the first format, which a flat collection no longer uses"
                else:
                    self._load_rows(col, progress)
                    first_format = read_checkpoint(path)
                    assert first_format is not None  # the file is there: read above
                    col.index = FaissIndex.from_arrays(header, first_format[1])
                col.applied_lsn = col.checkpoint_lsn = header["lsn"]
                self._replay(col, progress)
            except _LoadCancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: rebuild from the items table
                col.ids, col.metadata = _Ids(), MetadataIndex()
                return f"checkpoint {path.name} could not be loaded or replayed ({type(exc).__name__}: {exc})"
        kept = [int(label) for label in rowless[:3] if col.ids.id_of(int(label)) is not None]
        if kept:
            return f"checkpoint {path.name} lists live labels {kept} that have no row in the vector file"
        stored = col.stored  # the items table's count, taken before the load (nothing writes while it loads)
        if len(col.index) != stored or len(col.ids) != stored:
            return (
                f"checkpoint {path.name} holds {len(col.index)} vectors after the log replay but the items table "
                f"{stored}"
            )
        return None

    def _index_from(
        self, col: _Collection, header: dict, reader: CheckpointReader, progress: _Progress
    ) -> tuple[Index, np.ndarray]:
        """The checkpoint's index, and (flat) the labels it lists as live that the vector file has no row for.

        Those are items replaced or deleted after the checkpoint's snapshot, whose rows a compaction right after
        it dropped (a flat checkpoint is written outside the collection's lock, so writes land in between): the
        log replay removes them, and the caller checks that it did. Refusing them rebuilt the whole collection."""
        config = col.config
        if file_backed(config.index):
            flat = FileFlatIndex(config.index, config.dim, config.metric, col.vectors)
            flat.check_shell(reader.array("index"))
            live = np.asarray(reader.array("live"), dtype=np.int64)
            has_row = flat.vectors.slots_of(live) >= 0
            flat.add(live[has_row], None)
            return flat, live[~has_row]
        size = reader.member_size("index")
        progress(progress.done, f"reading its {config.index} index")
        index = FaissIndex.from_checkpoint(
            config.index,
            config.dim,
            config.metric,
            header["index"],
            reader,
            lambda read: progress(int(progress.total * read / max(1, size))),
        )
        return index, np.empty(0, dtype=np.int64)

    def _load_columns(self, col: _Collection, header: dict, reader: CheckpointReader, progress: _Progress) -> None:
        """Ids and metadata as the checkpoint holds them (arrays, no per-item parsing)."""
        live = np.asarray(reader.array("live"), dtype=np.int64)
        offsets = np.asarray(reader.array("id_offsets"), dtype=np.int64)
        blob = reader.array("ids").tobytes()
        if offsets.shape != (len(live) + 1,) or (len(offsets) and offsets[-1] != len(blob)):
            raise ValueError("the checkpoint's ids and labels differ in length")
        col.ids = _Ids()
        col.ids.defer()  # the id -> label dict is made once the collection serves (see _load_all)
        col.ids.reserve(int(live[-1]) + 1 if len(live) else 0, exact=True)
        for start in range(0, len(live), FILL_CHUNK):
            bounds = offsets[start : start + FILL_CHUNK + 1].tolist()
            col.ids.add(
                live[start : start + FILL_CHUNK].tolist(), [blob[a:b].decode() for a, b in itertools.pairwise(bounds)]
            )
            progress(min(start + FILL_CHUNK, len(live)), "reading its checkpoint's ids")
        if len(live) and (live[1:] <= live[:-1]).any():
            raise ValueError("the checkpoint's labels do not ascend")
        col.metadata = MetadataIndex.from_snapshot(
            header["metadata"],
            {k: reader.array(k) for k in (f"meta{i}" for i in range(len(header["metadata"]["keys"])))},
        )

    def _load_rows(self, col: _Collection, progress: _Progress | None = None) -> None:
        """Ids and metadata from the items table (no checkpoint to load them from), a chunk at a time."""
        col.ids, col.metadata = _Ids(), MetadataIndex()
        done = 0
        for rows in self.db.scan(col.id, FILL_CHUNK):
            labels = [r[0] for r in rows]
            col.ids.add(labels, [r[1] for r in rows])
            metadata = _loaded_metadata(col.config.name, [r[1] for r in rows], [r[2] for r in rows])
            col.metadata.add_many(labels, metadata)
            done += len(rows)
            if progress is not None:
                progress(done, "reading the items table")

    def _reload(self, col: _Collection, progress: _Progress | None = None) -> None:
        """In-memory state anew from the items table and the vector file; the log is covered up to its end."""
        last = self.db.last_lsn(col.id)
        self._load_rows(col, progress)
        col.index = self._filled(col, col.ids.live_labels(), progress)
        col.applied_lsn, col.checkpoint_lsn = last, -1  # -1: checkpoint soon

    def _filled(self, col: _Collection, labels: np.ndarray, progress: _Progress | None = None) -> Index:
        """A new index of these labels' vectors, added a chunk at a time (bounded extra memory)."""
        index = self._new_index(col)
        if isinstance(index, FileFlatIndex):
            index.add(labels, None)
            return index
        step = f"building its {col.config.index} index"
        if progress is None:
            progress = _Progress(f"collection {col.config.name}", len(labels), self.progress_seconds)
        assert col.vectors is not None  # opened before any index is built
        if not index.trained and len(labels) >= index.train_min():  # trained for all of them, then filled
            progress(0, f"training its {col.config.index} index")
            picked = train_sample(len(labels))
            index.train_for(len(labels), col.vectors.vectors(labels if picked is None else labels[picked]))
        for start in range(0, len(labels), FILL_CHUNK):
            chunk = labels[start : start + FILL_CHUNK]
            index.add(chunk, col.vectors.vectors(chunk))
            progress(start + len(chunk), step)
        return index

    def _replay(self, col: _Collection, progress: _Progress) -> None:
        changes = self.db.changes_after(col.id, col.applied_lsn)
        if not changes:
            return
        added = [a for a, _ in changes if a is not None]
        removed = {r for _, r in changes if r is not None}
        added_set = set(added)
        # Labels added after the checkpoint were never in the index: nothing to remove for them.
        gone = np.array(sorted(removed - added_set), dtype=np.int64)
        assert col.index is not None and col.vectors is not None  # loaded from the checkpoint: replayed on
        col.index.remove(gone)
        col.metadata.remove_many(gone)
        col.ids.remove_labels(gone)
        live = sorted(a for a in added if a not in removed)
        rows = self.db.items_by_label(col.id, live)
        labels = [label for label in live if label in rows]
        if labels:
            progress(progress.done, f"replaying {len(labels)} additions from its log")
            col.ids.add(labels, [rows[label][0] for label in labels])
            col.metadata.add_many(
                labels,
                _loaded_metadata(
                    col.config.name, [rows[label][0] for label in labels], [rows[label][1] for label in labels]
                ),
            )
            array = np.array(labels, dtype=np.int64)
            index, vectors = col.index, col.vectors
            for start in range(0, len(array), FILL_CHUNK):
                chunk = array[start : start + FILL_CHUNK]
                if isinstance(index, FileFlatIndex):  # its rows are in the vector file already
                    index.add(chunk)
                else:
                    index.add(chunk, vectors.vectors(chunk))
                progress(min(progress.total, progress.done + len(chunk)))
        col.applied_lsn = self.db.last_lsn(col.id)

    def checkpoint(self, name: str | None = None) -> None:
        """Writes the index of one collection (or all) atomically, then trims the log it covers."""
        for col in [self._ready(name)] if name else list(self._collections.values()):
            self._checkpoint_one(col)

    def _checkpoint_parts(self, col: _Collection) -> tuple[dict, dict]:
        """(header, members) of the collection now (read lock held): copies of the small arrays; the FAISS
        index of a non-flat collection itself, streamed by the caller while it still holds the lock."""
        assert col.index is not None  # the caller checked
        labels = col.ids.live_labels()
        ids = col.ids.by_label[labels]
        meta_header, arrays = col.metadata.snapshot(int(labels[-1]) + 1 if len(labels) else 0)
        header = {
            "format": CHECKPOINT_FORMAT,
            "kind": col.config.index,
            "dim": col.config.dim,
            "metric": col.config.metric,
            "lsn": col.applied_lsn,
            "store_uuid": self.db.uuid,
            "collection_id": col.id,
            "created_ms": col.created_ms,
            "count": len(col.index),
            "metadata": meta_header,
        }
        arrays.update(live=labels, ids=ids)
        if isinstance(col.index, FileFlatIndex):
            arrays["index"] = col.index.shell()
        else:
            header["index"], index_arrays = col.index.checkpoint_parts()
            arrays.update(index_arrays)
        return header, arrays

    def _checkpoint_one(self, col: _Collection) -> None:
        path = self._checkpoint_path(col.id)
        with col.checkpoint_lock:
            if col.dropped or col.unavailable or col.loading or col.index is None:
                return
            with col.lock.read():
                if col.applied_lsn == col.checkpoint_lsn and path.exists():
                    return
                header, arrays = self._checkpoint_parts(col)
                if not isinstance(col.index, FileFlatIndex):  # the FAISS index is written from the live one
                    write_checkpoint(path, header, _encoded_ids(arrays))
            if isinstance(col.index, FileFlatIndex):  # a snapshot of arrays: written outside the lock
                write_checkpoint(path, header, _encoded_ids(arrays))
            col.checkpoint_lsn = header["lsn"]
            self.db.truncate_log(col.id, header["lsn"])
        self._maybe_compact(col)

    def _maybe_compact(self, col: _Collection) -> None:
        """Rewrites the vector file without its dead rows once they outnumber the live ones (write lock held
        for the rewrite; amortised, it costs a constant per replaced or deleted item)."""
        if not self._compaction_due(col):
            return
        with col.checkpoint_lock, col.lock.write():
            # Decided again under the locks, on the file in use now: a compaction that ran meanwhile (another
            # thread's checkpoint) switched it, and compacting the closed one again would write the next
            # generation over the file now in use.
            if col.dropped or col.unavailable or not self._compaction_due(col):
                return
            vectors = col.vectors
            assert vectors is not None  # _compaction_due
            dead = vectors.used - len(col.ids)
            _, next_label = self.db.layout(col.id)
            live = col.ids.live_labels()
            started = time.monotonic()
            col.vectors = self._switch_generation(col, vectors.write_compacted(live, next_label), next_label)
            if isinstance(col.index, FileFlatIndex):
                col.index.attach(col.vectors)
            col.selections.clear()
            vectors.close(trim=False)
            remove_generations(self.folder, col.id, keep=col.vectors.layout.generation)
            log.info(
                "collection %s: vector file compacted (%d dead rows dropped, %d live, %.1f s)",
                col.config.name,
                dead,
                len(live),
                time.monotonic() - started,
            )

    @staticmethod
    def _compaction_due(col: _Collection) -> bool:
        vectors = col.vectors
        if vectors is None or col.dropped:
            return False
        return vectors.used - len(col.ids) >= max(COMPACT_MIN_DEAD, len(col.ids))

    def _switch_generation(self, col: _Collection, layout: Layout, next_label: int) -> VectorFile:
        """Opens the new generation, then commits it as the one in use (write lock held). Opened first: a
        failure to open it after the commit kept the old file in memory, where the next acknowledged writes
        went while the database named the new one, and a restart lost them. A generation not committed is
        removed, its space given back."""
        try:
            fresh = VectorFile(self.folder, col.id, col.config.dim, layout, next_label)
        except BaseException:
            assert col.vectors is not None  # the generation being switched from
            col.vectors.remove_generation(layout.generation)
            raise
        try:
            self.db.set_layout(col.id, layout)
        except BaseException:
            if self.db.layout(col.id)[0] == layout:  # the commit is in despite the error: the switch stands
                log.warning(
                    "collection %s: switching to generation %d reported an error, but the database holds "
                    "it: serving from it",
                    col.config.name,
                    layout.generation,
                )
                return fresh
            fresh.close(trim=False)
            assert col.vectors is not None  # the generation being switched from
            col.vectors.remove_generation(layout.generation)
            raise
        return fresh

    def close(self, checkpoint: bool = True) -> None:
        """Stops the checkpointer, checkpoints every collection (unless told not to), releases the lock."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._loader is not None:  # a background load stops at its next progress step
            self._loader.join()
        self._checkpointer.stop()
        if checkpoint:
            for col in list(self._collections.values()):
                try:
                    self._checkpoint_one(col)
                except Exception as exc:  # noqa: BLE001 - the log still covers it: replayed at the next start
                    log.warning(
                        "checkpoint of %s failed at shutdown (%s); the log will be replayed on start",
                        col.config.name,
                        exc,
                    )
        for col in list(self._collections.values()):
            if col.vectors is not None:
                col.vectors.close()
        self.db.close()
        self._dir_lock.release()

    # -- collections --------------------------------------------------------------------------

    def _get(self, name: str) -> _Collection:
        try:
            return self._collections[name]
        except KeyError:
            raise CollectionNotFound(
                f"collection {quoted(name)} does not exist; ListCollections shows those that do"
            ) from None

    def _ready(self, name: str) -> _Collection:
        """The collection, refused (CollectionLoading) while its start-up load runs, before any lock is taken."""
        col = self._get(name)
        col.check_loaded()
        return col

    def create_collection(self, config: CollectionConfig) -> CollectionInfo:
        validate_index_kind(config.index, config.dim, config.metric)
        with self._registry_lock:
            if config.name in self._collections:
                raise AlreadyExists(
                    f"collection {quoted(config.name)} already exists; drop it first or pick another name"
                )
            FaissIndex(config.index, config.dim, config.metric)  # what FAISS refuses fails before anything is stored
            made: list[VectorFile] = []

            def make_files(cid: int) -> None:
                remove_generations(self.folder, cid, keep=None)
                made.append(VectorFile(self.folder, cid, config.dim, Layout(), 0, create=True))

            try:
                cid, created = self.db.create_collection(config.name, config.to_json(), make_files)
            except BaseException:
                for vectors in made:  # not committed (or committed empty, and a missing file is made anew)
                    vectors.close(trim=False)
                    vectors.path.unlink(missing_ok=True)
                raise
            col = _Collection(cid, config, created, 0, None, MetadataIndex(), uid=f"{self.db.uuid}-{cid}")
            col.vectors = made[0]
            col.index = self._new_index(col)
            self._collections[config.name] = col
        return col.info()

    def get_collection(self, name: str) -> CollectionInfo:
        return self._get(name).info()

    def list_collections(self) -> list[CollectionInfo]:
        return [col.info() for _, col in sorted(self._collections.items())]

    def drop_collection(self, name: str) -> int:
        with self._registry_lock:
            col = self._ready(name)
            with col.checkpoint_lock, col.lock.write():
                removed = self.db.drop_collection(col.id)
                col.dropped = True
                self._collections.pop(name)
                path = self._checkpoint_path(col.id)
                path.unlink(missing_ok=True)
                if col.vectors is not None:
                    col.vectors.close(trim=False)
                remove_generations(self.folder, col.id, keep=None)
                fsync_dir(self.folder)
        return removed

    def set_pooling_state(self, name: str, state: bytes, require_empty: bool = True, uid: str | None = None) -> int:
        """Stores a fitted pooling state (e.g. NetVLAD codebook); vectors of an older state must not mix."""
        col = self._ready(name)
        with col.lock.write():
            col.check_usable()
            check_incarnation(name, col.uid, uid)
            if require_empty and len(col.ids):
                raise FailedPrecondition(
                    f"collection {quoted(name)} holds {len(col.ids)} items embedded with the "
                    f"current pooling state; fit a new collection (or drop and recreate it)"
                )
            col.pooling_version = self.db.set_pooling_state(col.id, state)
            return col.pooling_version

    def index_size_bytes(self, name: str) -> int:
        """What the collection's index costs in memory: its vectors' rows (flat) or its serialised FAISS index."""
        col = self._ready(name)
        with col.lock.read():
            col.check_usable()
            assert col.index is not None  # usable
            if isinstance(col.index, FileFlatIndex):
                return len(col.index) * col.config.dim * 4
            return col.index.size_bytes()

    def pooling_state(self, name: str) -> bytes | None:
        return self.db.pooling_state(self._get(name).id)

    # -- items --------------------------------------------------------------------------------

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
        """Inserts or replaces items; durable when this returns. insert_only refuses existing ids.

        Vectors the caller computed with a collection's pooling pass the `uid` and `pooling_version` they
        were computed for: if the collection was re-created or re-fitted since, nothing is stored (Aborted).
        `thumbnails` {id: (media type, bytes)}: small images for display, stored with the items.
        """
        self._use_faiss_threads()
        col = self._ready(name)
        check_incarnation(name, col.uid, uid)
        if not items:
            return UpsertResult(0, 0, len(col.ids))
        col.check_usable()  # before checking items against a config an unavailable collection may not have
        ids, vectors, metadata = prepare_items(name, col.config, items)
        encoded = [_metadata_json(m) for m in metadata]
        with col.lock.write():
            col.check_usable()
            if insert_only:
                existing = [i for i in ids if i in col.ids.label_of]
                if existing:
                    raise AlreadyExists(
                        f"{len(existing)} id(s) already exist in {quoted(name)}, e.g. {quoted(existing[0])}; "
                        f"use upsert to replace them"
                    )
            wanted = set(ids)
            kept = {i: t for i, t in (thumbnails or {}).items() if i in wanted}
            vector_file = col.vectors
            assert vector_file is not None  # usable
            labels, old = self.db.upsert(
                col.id, ids, encoded, lambda start: vector_file.append(start, vectors), pooling_version, kept
            )
            vector_file.committed(int(labels[-1]) + 1)
            self._apply(col, lambda: self._apply_upsert(col, ids, labels, old, vectors, metadata))
            count = len(col.ids)
        self._maybe_checkpoint(col)
        return UpsertResult(len(ids) - len(old), len(old), count)

    def _apply_upsert(self, col: _Collection, ids, labels, old, vectors, metadata) -> None:
        replaced = np.array(col.ids.remove(list(old)), dtype=np.int64)
        col.metadata.remove_many(replaced)
        assert col.index is not None  # usable (the caller checked)
        col.index.remove(replaced)
        col.ids.add(labels.tolist(), ids)
        col.metadata.add_many(labels.tolist(), metadata)
        col.index.add(labels, vectors)

    def _apply(self, col: _Collection, change: Callable[[], None]) -> None:
        """Applies a committed change to the in-memory state (write lock held). The change is durable
        whatever happens here: if applying it fails, the index is rebuilt from the items table, and if
        even that fails the collection is marked unavailable; the caller's write still succeeded."""
        col.selections.clear()  # every in-memory change comes through here: no prepared filter outlives it
        try:
            change()
            col.applied_lsn = self.db.last_lsn(col.id)
            self._maintain(col)
        except Exception as exc:
            log.exception(
                "collection %s: applying a committed write to the index failed; rebuilding it", col.config.name
            )
            try:
                self._reload(col)
            except Exception as again:  # noqa: BLE001 - reported: the collection is marked unavailable
                col.unavailable = f"its index failed ({type(exc).__name__}: {exc}) and could not be rebuilt ({again})"
                log.error("collection %s is unavailable: %s", col.config.name, col.unavailable)

    def delete(self, name: str, ids: Iterable[str], *, strict: bool = False) -> DeleteResult:
        """Removes ids; missing ones are reported (strict: refused, nothing removed)."""
        self._use_faiss_threads()
        col = self._ready(name)
        ids = list(dict.fromkeys(validate_id(i) for i in ids))
        with col.lock.write():
            col.check_usable()
            missing = [i for i in ids if i not in col.ids.label_of]
            if strict and missing:
                raise ItemsNotFound(
                    f"{len(missing)} id(s) not in {quoted(name)}, e.g. {quoted(missing[0])}; nothing was deleted"
                )
            old = self.db.delete(col.id, [i for i in ids if i in col.ids.label_of])

            def change() -> None:
                labels = np.array(col.ids.remove(list(old)), dtype=np.int64)
                col.metadata.remove_many(labels)
                assert col.index is not None  # usable (checked above)
                col.index.remove(labels)

            self._apply(col, change)
        self._maybe_checkpoint(col)
        return DeleteResult(len(old), missing)

    def _maintain(self, col: _Collection) -> None:
        """Rebuilds a tombstoning index from the truth once tombstones pile up (write lock held)."""
        assert col.index is not None  # a write was applied to it
        if col.index.needs_rebuild(len(col.ids)):
            log.info(
                "rebuilding index of %s (%d live, %d tombstones, trained at %d)",
                col.config.name,
                len(col.ids),
                len(col.index.tombstones),
                col.index.trained_at,
            )
            col.index = self._filled(col, col.ids.live_labels())

    def _maybe_checkpoint(self, col: _Collection) -> None:
        """Asks the background checkpointer; never checkpoints on the caller's (write) path."""
        due = max(self.checkpoint_every, CHECKPOINT_SHARE * len(col.ids))
        if col.checkpoint_lsn < 0 or col.applied_lsn - col.checkpoint_lsn >= due:
            self._checkpointer.request(col)

    def _vectors_of(self, col: _Collection, labels: list[int], ids: list[str] | None = None) -> np.ndarray:
        """Called with the read lock held (the file's layout does not change under it). `ids`: the items the labels
        were read for from the items table, named if a label has no row (a damaged or hand-edited row)."""
        vectors = col.vectors
        if vectors is None:
            raise unavailable_error(col.config.name, col.unavailable or "its vectors are not loaded")
        try:
            return vectors.vectors(np.array(labels, dtype=np.int64))
        except (VectorFileError, ValueError, TypeError) as exc:

            def unreadable(label) -> bool:
                try:
                    vectors.vectors(np.array([label], dtype=np.int64))
                except (VectorFileError, ValueError, TypeError):
                    return True
                return False

            named = ", ".join(quoted(i) for i, label in zip(ids or [], labels) if unreadable(label))
            raise FailedPrecondition(
                f"collection {quoted(col.config.name)}: the vectors of {named or 'these items'} cannot be read "
                f"({exc}): the items table (store.sqlite3) and the vector file disagree; upsert the items again "
                f"(or delete them)"
            ) from None

    def get(self, name: str, ids: Iterable[str], include_vectors: bool = False) -> tuple[list[StoredItem], list[str]]:
        col = self._ready(name)
        ids = [validate_id(i) for i in ids]
        with col.lock.read():
            rows = self.db.items(col.id, ids)
            found_ids = [i for i in ids if i in rows]
            vectors = self._vectors_of(col, [rows[i][0] for i in found_ids], found_ids) if include_vectors else None
        found = [
            StoredItem(i, _stored_metadata(name, i, rows[i][1]), vectors[k] if vectors is not None else None)
            for k, i in enumerate(found_ids)
        ]
        return found, [i for i in ids if i not in rows]

    def vector_of(self, name: str, item_id: str) -> np.ndarray:
        items, missing = self.get(name, [item_id], include_vectors=True)
        if missing:
            raise ItemsNotFound(f"item {quoted(item_id)} is not in collection {quoted(name)}")
        assert items[0].vector is not None  # include_vectors
        return items[0].vector

    def thumbnail(self, name: str, item_id: str) -> tuple[str, bytes]:
        """(media type, bytes) of an item's stored thumbnail."""
        col = self._ready(name)
        found = self.db.thumbnail(col.id, validate_id(item_id))
        if found is None:
            where = "has no thumbnail" if item_id in col.ids.label_of else "is not in the collection"
            raise ItemsNotFound(f"item {quoted(item_id)} of {quoted(name)} {where}")
        return found

    # -- search -------------------------------------------------------------------------------

    def missing_keys(self, name: str, keys: Sequence[str]) -> list[str]:
        """The keys no live item holds, in the order given."""
        col = self._ready(name)
        with col.lock.read():
            return [key for key in keys if not col.metadata.holds_key(key)]

    def search(
        self,
        name: str,
        queries: np.ndarray,
        options: SearchOptions = DEFAULT_SEARCH,
        exclude_ids: Sequence[str | None] | None = None,
    ) -> list[list[Hit]]:
        """Top-k per query; `exclude_ids[i]` drops one id from query i's results ("more like this")."""
        self._use_faiss_threads()
        col = self._ready(name)
        col.check_usable()  # before checking queries against a config an unavailable collection may not have
        queries = prepare_queries(col.config, queries, options, self.max_top_k)
        top_k, flt = options.top_k, options.filter
        include_metadata, include_vectors = options.include_metadata, options.include_vectors
        k = top_k + (1 if exclude_ids is not None and any(exclude_ids) else 0)
        with col.lock.read():
            col.check_usable()
            allowed = col.selection(flt) if flt is not None and flt.must else None
            assert col.index is not None  # usable
            scores, labels = col.index.search(queries, k, allowed, options.nprobe, options.ef_search)
            results = []
            for q, (row_scores, row_labels) in enumerate(zip(scores, labels)):
                skip = exclude_ids[q] if exclude_ids is not None else None
                hits = []
                for s, label in zip(row_scores.tolist(), row_labels.tolist()):
                    item_id = col.ids.id_of(label) if label >= 0 else None
                    if item_id is not None and item_id != skip:
                        hits.append(Hit(item_id, float(s)))
                results.append(hits[:top_k])
            if include_metadata or include_vectors:
                self._fill_hits(col, results, include_metadata, include_vectors)
        return results

    def _fill_hits(
        self, col: _Collection, results: list[list[Hit]], include_metadata: bool, include_vectors: bool
    ) -> None:
        """Metadata (as stored) and vectors of the hits (read lock held)."""
        wanted = sorted({col.ids.label_of[h.id] for hits in results for h in hits})
        rows = self.db.items_by_label(col.id, wanted) if include_metadata else {}
        vectors = dict(zip(wanted, self._vectors_of(col, wanted))) if include_vectors else {}
        for hits in results:
            for hit in hits:
                label = col.ids.label_of[hit.id]
                if include_metadata:
                    hit.metadata = _stored_metadata(col.config.name, hit.id, rows[label][1]) if label in rows else {}
                if include_vectors:
                    hit.vector = vectors[label].copy()


def _parsed(text: str) -> dict | None:
    """An item's metadata from the items table; None where the text is damaged (not JSON, not an object)."""
    try:
        parsed = json.loads(text)
    except (ValueError, TypeError):
        return None
    return parsed if type(parsed) is dict else None


def _stored_metadata(name: str, item_id: str, text: str) -> dict:
    """An item's metadata for Get or a search's hits; a damaged row (a disk error, a hand edit) is a clear error
    naming the item, not a bare JSONDecodeError (INTERNAL) nor a number given as metadata."""
    parsed = _parsed(text)
    if parsed is None:
        raise FailedPrecondition(
            f"item {quoted(item_id)} of {quoted(name)} has damaged metadata in the catalogue (store.sqlite3: "
            f"{text[:40]!r} is not a JSON object); upsert it again (or delete it) to repair it"
        )
    return parsed


def _loaded_metadata(name: str, ids: list[str], texts: list[str]) -> list:
    """Metadata of rows loaded into a collection's filter index: one parse for all of them; an item whose row is
    damaged is loaded without metadata (logged; Get of it says so) instead of keeping its collection offline."""
    try:
        parsed = json.loads("[" + ",".join(texts) + "]")
        if len(parsed) == len(texts) and all(type(m) is dict for m in parsed):  # not `{}, {}` in one row
            return parsed
    except (ValueError, TypeError):  # TypeError: a row holding a blob
        pass
    found = [_parsed(text) for text in texts]
    for item_id, metadata in zip(ids, found):
        if metadata is None:
            log.error("collection %s: item %s has damaged metadata; loaded without it (upsert it again)", name, item_id)
    return [metadata if metadata is not None else {} for metadata in found]


def _metadata_json(metadata: dict) -> str:
    """The items table's metadata text: orjson (a tenth of json.dumps' cost), json for what it refuses (an
    integer beyond 64 bits); json.loads reads both."""
    try:
        return orjson.dumps(metadata).decode()
    except orjson.JSONEncodeError:
        return json.dumps(metadata)


def _encoded_ids(arrays: dict) -> dict:
    """The ids member (an object array of str) as UTF-8 bytes and offsets, which .npy stores without pickle."""
    ids = arrays.pop("ids")
    encoded = [i.encode() for i in ids.tolist()]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    arrays["ids"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    arrays["id_offsets"] = offsets
    return arrays


class _Checkpointer:
    """One background thread writes checkpoints that writers ask for; failures are retried later."""

    def __init__(self, store: LocalStore):
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
                    log.warning(
                        "checkpoint of %s failed (%s: %s); retrying in %.0f s",
                        col.config.name,
                        type(exc).__name__,
                        exc,
                        CHECKPOINT_RETRY_SECONDS,
                    )
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
