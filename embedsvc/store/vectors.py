"""A collection's vectors in one raw float32 file, written before the SQLite commit that acknowledges them.

Why: vectors kept in SQLite rows and again in every checkpoint cost three times their size on disk, were
copied several times at each checkpoint and start-up, and made the items table slow to scan. Here each
vector is stored once, in a file FAISS can search in place (memory-mapped, no copy at start-up).

Layout of generation g (`collection-<id>.g<g>.f32`): row `slot` holds one vector. Slots below `base_count`
hold the labels listed in `collection-<id>.g<g>.labels.npy` (ascending; written once, when the generation is
made by a compaction); slot `base_count + i` holds label `base_label + i`, so every write appends the rows
of its consecutive new labels. `base_count`, `base_label` and `g` live in the collections table; the rows
in use are those of labels below the table's `next_label`, both committed in the same transaction as the
items. A write pwrites and fdatasyncs its rows *before* that transaction commits (the sync runs while the
transaction inserts its rows, and the commit waits for it): a crash in between leaves rows
past `next_label`, which nothing reads and the next write overwrites. Committed rows are never rewritten;
a compaction writes a new generation next to the old one and switches to it in one SQLite transaction.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedsvc.store.checkpoint import atomic_write, fsync_dir

VECTOR_FILE = re.compile(r"collection-(\d+)\.g(\d+)\.(f32|labels\.npy)")
GROWTH = 1.5  # capacity grows by this factor (sparse until written): few remaps, bounded slack
MIN_CAPACITY = 1024


@dataclass(frozen=True)
class Layout:
    """Where the vector file's rows are: the generation, and the slot <-> label mapping's two parts."""

    generation: int = 0
    base_count: int = 0
    base_label: int = 0


class VectorFileError(RuntimeError):
    """The vector file does not hold the rows the database says were committed."""


class VectorFile:
    """Rows of one collection's vectors; appends are durable once the wait `append` returns has returned."""

    def __init__(
        self,
        folder: Path,
        collection_id: int,
        dim: int,
        layout: Layout,
        next_label: int,
        create: bool = False,
        populate: bool = False,
    ):
        """`populate`: read the rows in and map them now (a start-up's loader thread), so that the first search
        does not fault in every page of the file itself; rows past the committed ones (a crash's leftovers, or
        capacity never written) are cut off first, as `close` does, so that none of them is read in."""
        self.folder, self.collection_id, self.dim = folder, collection_id, dim
        self.layout = layout
        self.row_bytes = dim * 4
        self.path = self.file_path(folder, collection_id, layout.generation)
        labels_path = self.labels_path(folder, collection_id, layout.generation)
        if layout.base_count:
            self.base_labels = np.load(labels_path, allow_pickle=False)  # small next to the vectors: 8 bytes a row
            if self.base_labels.shape != (layout.base_count,) or self.base_labels.dtype != np.int64:
                raise VectorFileError(
                    f"{labels_path.name} maps {self.base_labels.shape} labels, the database {layout.base_count}"
                )
        else:
            self.base_labels = np.empty(0, dtype=np.int64)
        self.used = self.slot_count(next_label)
        # A file that holds no committed row may be missing (a crash between the commit that made the
        # collection and the file's creation, in data directories of earlier versions): it is made anew.
        create = create or (not self.used and not self.path.exists())
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            raise VectorFileError(f"vector file {self.path.name} is missing") from None
        if create:
            try:
                fsync_dir(folder)
            except BaseException:
                os.close(self.fd)
                raise
        size = os.fstat(self.fd).st_size
        if size < self.used * self.row_bytes:
            os.close(self.fd)
            raise VectorFileError(
                f"vector file {self.path.name} holds {size // self.row_bytes} rows, the database committed {self.used}"
            )
        if populate and size > self.used * self.row_bytes:
            os.ftruncate(self.fd, self.used * self.row_bytes)
            size = self.used * self.row_bytes
        self.capacity = size // self.row_bytes
        self.matrix: np.ndarray | None  # None once closed
        self._mmap, self.matrix = self._map(self.capacity, populate)

    @staticmethod
    def file_path(folder: Path, collection_id: int, generation: int) -> Path:
        return folder / f"collection-{collection_id}.g{generation}.f32"

    @staticmethod
    def labels_path(folder: Path, collection_id: int, generation: int) -> Path:
        return folder / f"collection-{collection_id}.g{generation}.labels.npy"

    def slot_count(self, next_label: int) -> int:
        return self.layout.base_count + max(0, next_label - self.layout.base_label)

    def _map(self, capacity: int, populate: bool = False) -> tuple[mmap.mmap | None, np.ndarray]:
        """Maps `capacity` rows; `matrix[:used]` are the committed rows, read in place."""
        if not capacity:
            return None, np.empty((0, self.dim), dtype=np.float32)
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        mapped = mmap.mmap(self.fd, capacity * self.row_bytes, flags, mmap.PROT_READ)
        return mapped, np.frombuffer(mapped, dtype=np.float32).reshape(capacity, self.dim)

    # -- labels <-> slots ---------------------------------------------------------------------

    def slots_of(self, labels: np.ndarray) -> np.ndarray:
        """Slots of labels that have one (committed under this layout); -1 for others."""
        labels = np.asarray(labels, dtype=np.int64)
        layout = self.layout
        slots = np.full(labels.shape, -1, dtype=np.int64)
        appended = labels >= layout.base_label
        slots[appended] = layout.base_count + labels[appended] - layout.base_label
        if len(self.base_labels):
            based = ~appended
            at = np.minimum(np.searchsorted(self.base_labels, labels[based]), len(self.base_labels) - 1)
            slots[based] = np.where(self.base_labels[at] == labels[based], at, -1)
        slots[slots >= self.used] = -1
        return slots

    def labels_of(self, slots: np.ndarray) -> np.ndarray:
        slots = np.asarray(slots, dtype=np.int64)
        base = self.layout.base_count
        labels = self.layout.base_label + slots - base
        if base:
            below = slots < base
            labels[below] = self.base_labels[slots[below]]
        return labels

    def all_labels(self) -> np.ndarray:
        """Label of every slot in use."""
        return self.labels_of(np.arange(self.used, dtype=np.int64))

    # -- writes -------------------------------------------------------------------------------

    def append(self, start_label: int, vectors: np.ndarray) -> Callable[[], None]:
        """Writes the rows of labels start_label.. and starts syncing them in a helper thread; returns the wait
        for that sync, which the caller must call (it raises the sync's error) before the commit naming the
        rows. The caller inserts the batch's SQLite rows meanwhile: the sync no longer adds to each write."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        slot = self.slot_count(start_label)
        if slot != self.used:
            raise VectorFileError(f"append at slot {slot} but {self.used} rows are committed")
        end = slot + len(vectors)
        if end > self.capacity:
            self._grow(end)
        data = vectors.data.cast("B")
        offset = slot * self.row_bytes
        while data:
            written = os.pwrite(self.fd, data, offset)
            data, offset = data[written:], offset + written
        return _sync_pool().submit(os.fdatasync, self.fd).result

    def committed(self, next_label: int) -> None:
        """The transaction naming the appended rows committed: they are in use."""
        self.used = self.slot_count(next_label)

    def _grow(self, rows: int) -> None:
        """The file and its map, larger; `capacity` changes only once both did. A file the disk refused to
        grow (a size limit) left the old capacity believed larger than the map, and the next write's rows
        were committed past the map's end: searched out of bounds, unreadable by Get."""
        capacity = max(rows, MIN_CAPACITY, int(self.capacity * GROWTH))
        os.ftruncate(self.fd, capacity * self.row_bytes)  # sparse: no disk until written
        self._mmap, self.matrix = self._map(capacity)
        self.capacity = capacity

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        """A copy of the committed rows of these labels (all must have one)."""
        slots = self.slots_of(labels)
        if len(slots) and slots.min() < 0:
            missing = np.asarray(labels)[slots < 0][:3].tolist()
            raise VectorFileError(f"labels {missing} have no row in {self.path.name}")
        assert self.matrix is not None, f"{self.path.name} is closed"
        return self.matrix[slots]

    def close(self, trim: bool = True) -> None:
        """Releases the map; `trim` drops the unwritten capacity past the committed rows."""
        self.matrix = None
        if self._mmap is not None:
            with contextlib.suppress(BufferError):  # a search result still views it: the map goes with that view
                self._mmap.close()
            self._mmap = None
        if trim and self.fd >= 0:
            os.ftruncate(self.fd, self.used * self.row_bytes)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- compaction ---------------------------------------------------------------------------

    def write_compacted(self, live_labels: np.ndarray, next_label: int, chunk_rows: int = 65536) -> Layout:
        """Writes the next generation holding only `live_labels` (ascending), synced; returns its layout.

        The caller switches to it in one SQLite transaction; until then the files are strays that the next
        start-up removes."""
        live_labels = np.ascontiguousarray(live_labels, dtype=np.int64)
        generation = self.layout.generation + 1
        try:
            with open(self.file_path(self.folder, self.collection_id, generation), "wb") as f:
                for start in range(0, len(live_labels), chunk_rows):
                    f.write(self.vectors(live_labels[start : start + chunk_rows]).data.cast("B"))
                f.flush()
                os.fsync(f.fileno())
            return self.write_labels(self.folder, self.collection_id, generation, live_labels, next_label)
        except BaseException:
            # A half-written generation on a full disk held its last free bytes: every write was refused
            # until the next start-up removed it.
            self.remove_generation(generation)
            raise

    def remove_generation(self, generation: int) -> None:
        """Deletes one generation's files (never the one in use: the caller knows it is not committed)."""
        if generation == self.layout.generation:
            raise VectorFileError(f"generation {generation} of collection {self.collection_id} is in use")
        self.file_path(self.folder, self.collection_id, generation).unlink(missing_ok=True)
        self.labels_path(self.folder, self.collection_id, generation).unlink(missing_ok=True)

    @classmethod
    def write_labels(
        cls, folder: Path, collection_id: int, generation: int, labels: np.ndarray, next_label: int
    ) -> Layout:
        """The labels of a new generation's rows (ascending), written atomically; returns its layout."""
        if len(labels) and (np.diff(labels) <= 0).any():
            raise VectorFileError("a generation's labels must ascend")
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(labels, dtype=np.int64), allow_pickle=False)
        atomic_write(cls.labels_path(folder, collection_id, generation), buffer.getvalue())
        fsync_dir(folder)
        return Layout(generation, len(labels), next_label)


_SYNCS: list[ThreadPoolExecutor] = []
_SYNCS_LOCK = threading.Lock()


def _sync_pool() -> ThreadPoolExecutor:
    """Threads that sync vector files while their writers go on (made on first use)."""
    with _SYNCS_LOCK:
        if not _SYNCS:
            _SYNCS.append(ThreadPoolExecutor(max_workers=2, thread_name_prefix="vector-sync"))
        return _SYNCS[0]


def remove_generations(folder: Path, collection_id: int, keep: int | None) -> None:
    """Deletes the collection's vector files of every generation but `keep` (None: all of them)."""
    for path in folder.iterdir():
        match = VECTOR_FILE.fullmatch(path.name)
        if match and int(match.group(1)) == collection_id and int(match.group(2)) != keep:
            path.unlink(missing_ok=True)
