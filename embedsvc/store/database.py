"""The store's source of truth: SQLite in WAL mode with synchronous=FULL.

Tables: `meta` (the store's identity, a UUID made with the database), `collections` (config, label
counter, fitted pooling state), `items` (id -> label, vector, metadata), `changes`, the log of label
additions and removals that FAISS checkpoints are replayed from, and `thumbnails` (id -> small image for
display, optional), written with the items. Each write is one transaction; once commit returns it is on
disk. A write the disk refuses (read-only, full, I/O error) is rolled back and reported as
StorageUnavailable; the next write tries again, so the store recovers by itself.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from embedsvc.errors import Aborted, FailedPrecondition, NotFound, StorageUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS collections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    next_label INTEGER NOT NULL DEFAULT 0,
    pooling_version INTEGER NOT NULL DEFAULT 0,
    pooling_state BLOB
);
CREATE TABLE IF NOT EXISTS items (
    collection_id INTEGER NOT NULL,
    id TEXT NOT NULL,
    label INTEGER NOT NULL,
    vector BLOB NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (collection_id, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS items_by_label ON items (collection_id, label);
CREATE TABLE IF NOT EXISTS changes (
    lsn INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL,
    added INTEGER,
    removed INTEGER
);
CREATE INDEX IF NOT EXISTS changes_by_collection ON changes (collection_id, lsn);
CREATE TABLE IF NOT EXISTS thumbnails (
    collection_id INTEGER NOT NULL,
    id TEXT NOT NULL,
    media_type TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (collection_id, id)
) WITHOUT ROWID;
"""

CHUNK = 500  # SQLite's host-parameter limit is far above; this keeps statements short


def _chunks(values: list, size: int = CHUNK) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


class Database:
    """A thread-safe wrapper around one SQLite connection."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.RLock()
        try:
            self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.executescript(SCHEMA)
            self.conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_uuid', ?)", (uuid.uuid4().hex,))
            self.uuid = self.conn.execute("SELECT value FROM meta WHERE key='store_uuid'").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise FailedPrecondition(f"{path} is not a usable SQLite database ({exc}); restore it from a backup, "
                                     f"or move it away to start with an empty store") from None

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def _unavailable(self, exc: sqlite3.Error) -> StorageUnavailable:
        return StorageUnavailable(f"the data directory {self.path.parent} cannot be written now ({exc}); nothing "
                                  f"was stored: make it writable (or free space) and retry")

    @contextmanager
    def transaction(self):
        """BEGIN IMMEDIATE ... COMMIT; rolled back on any exception. Disk refusals become StorageUnavailable."""
        with self._lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise self._unavailable(exc) from None
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException as exc:
                try:
                    self.conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # a failed COMMIT may have rolled back already
                if isinstance(exc, sqlite3.OperationalError):
                    raise self._unavailable(exc) from None
                raise

    def query(self, sql: str, params: Iterable = ()) -> list:
        with self._lock:
            return self.conn.execute(sql, tuple(params)).fetchall()

    # -- collections --------------------------------------------------------------------------

    def collections(self) -> list[tuple]:
        return self.query("SELECT id, name, config, created_ms, pooling_version FROM collections ORDER BY name")

    def create_collection(self, name: str, config: dict) -> tuple[int, int]:
        created = int(time.time() * 1000)
        with self.transaction() as c:
            cur = c.execute("INSERT INTO collections (name, config, created_ms) VALUES (?, ?, ?)",
                            (name, json.dumps(config), created))
            return cur.lastrowid, created

    def drop_collection(self, collection_id: int) -> int:
        with self.transaction() as c:
            count = c.execute("SELECT COUNT(*) FROM items WHERE collection_id=?", (collection_id,)).fetchone()[0]
            c.execute("DELETE FROM items WHERE collection_id=?", (collection_id,))
            c.execute("DELETE FROM changes WHERE collection_id=?", (collection_id,))
            c.execute("DELETE FROM thumbnails WHERE collection_id=?", (collection_id,))
            c.execute("DELETE FROM collections WHERE id=?", (collection_id,))
            return count

    def set_pooling_state(self, collection_id: int, state: bytes) -> int:
        with self.transaction() as c:
            c.execute("UPDATE collections SET pooling_version = pooling_version + 1, pooling_state=? WHERE id=?",
                      (state, collection_id))
            return c.execute("SELECT pooling_version FROM collections WHERE id=?", (collection_id,)).fetchone()[0]

    def pooling_state(self, collection_id: int) -> Optional[bytes]:
        rows = self.query("SELECT pooling_state FROM collections WHERE id=?", (collection_id,))
        return rows[0][0] if rows else None

    # -- items --------------------------------------------------------------------------------

    def labels_of(self, c: sqlite3.Connection, collection_id: int, ids: list[str]) -> dict[str, int]:
        found = {}
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            found.update(c.execute(f"SELECT id, label FROM items WHERE collection_id=? AND id IN ({marks})",
                                   (collection_id, *chunk)).fetchall())
        return found

    def upsert(self, collection_id: int, ids: list[str], vectors: np.ndarray, metadata: list[str],
               pooling_version: Optional[int] = None, thumbnails: Optional[dict[str, tuple[str, bytes]]] = None
               ) -> tuple[np.ndarray, dict[str, int]]:
        """Writes one batch (ids unique) in one transaction; returns new labels and replaced {id: old label}.

        `pooling_version`: the version of the pooling state the vectors were computed with; checked in
        the same transaction, so vectors of a codebook replaced meanwhile are never committed.
        `thumbnails` {id: (media type, bytes)} are written in the same transaction; a replaced item loses its
        old thumbnail unless it brings a new one."""
        with self.transaction() as c:
            row = c.execute("SELECT next_label, pooling_version FROM collections WHERE id=?",
                            (collection_id,)).fetchone()
            if row is None:
                raise NotFound("the collection was dropped while the request ran; nothing was stored")
            start, current_version = row
            if pooling_version is not None and pooling_version != current_version:
                raise Aborted(f"the collection's pooling was re-fitted (version {pooling_version} -> "
                              f"{current_version}) while these items were embedded; nothing was stored: retry")
            old = self.labels_of(c, collection_id, ids)
            labels = np.arange(start, start + len(ids), dtype=np.int64)
            c.execute("UPDATE collections SET next_label=? WHERE id=?", (start + len(ids), collection_id))
            c.executemany("INSERT OR REPLACE INTO items (collection_id, id, label, vector, metadata) VALUES (?,?,?,?,?)",
                          [(collection_id, i, int(l), v.tobytes(), m)
                           for i, l, v, m in zip(ids, labels.tolist(), vectors, metadata)])
            c.executemany("INSERT INTO changes (collection_id, added, removed) VALUES (?,?,?)",
                          [(collection_id, int(l), old.get(i)) for i, l in zip(ids, labels.tolist())])
            self._replace_thumbnails(c, collection_id, [i for i in old if i not in (thumbnails or {})], thumbnails)
        return labels, old

    def delete(self, collection_id: int, ids: list[str]) -> dict[str, int]:
        """Removes the ids that exist; returns {id: label} of those removed."""
        with self.transaction() as c:
            old = self.labels_of(c, collection_id, ids)
            c.executemany("DELETE FROM items WHERE collection_id=? AND id=?", [(collection_id, i) for i in old])
            self._replace_thumbnails(c, collection_id, list(old), None)
            c.executemany("INSERT INTO changes (collection_id, added, removed) VALUES (?,NULL,?)",
                          [(collection_id, label) for label in old.values()])
        return old

    def _replace_thumbnails(self, c: sqlite3.Connection, collection_id: int, removed: list[str],
                            added: Optional[dict[str, tuple[str, bytes]]]) -> None:
        c.executemany("DELETE FROM thumbnails WHERE collection_id=? AND id=?", [(collection_id, i) for i in removed])
        c.executemany("INSERT OR REPLACE INTO thumbnails (collection_id, id, media_type, data) VALUES (?,?,?,?)",
                      [(collection_id, i, kind, data) for i, (kind, data) in (added or {}).items()])

    def thumbnail(self, collection_id: int, item_id: str) -> Optional[tuple[str, bytes]]:
        rows = self.query("SELECT media_type, data FROM thumbnails WHERE collection_id=? AND id=?",
                          (collection_id, item_id))
        return (rows[0][0], rows[0][1]) if rows else None

    def _rows_by(self, key: str, collection_id: int, values: list, with_vectors: bool) -> dict:
        """{key value: (the other of id/label, metadata json, vector bytes | None)} for the rows found."""
        other = "label" if key == "id" else "id"
        column = "vector" if with_vectors else "NULL"
        found = {}
        for chunk in _chunks(values):
            marks = ",".join("?" * len(chunk))
            for row in self.query(f"SELECT {key}, {other}, metadata, {column} FROM items "
                                  f"WHERE collection_id=? AND {key} IN ({marks})", (collection_id, *chunk)):
                found[row[0]] = row[1:]
        return found

    def items(self, collection_id: int, ids: list[str], with_vectors: bool) -> dict[str, tuple]:
        return self._rows_by("id", collection_id, ids, with_vectors)

    def items_by_label(self, collection_id: int, labels: list[int], with_vectors: bool = False) -> dict[int, tuple]:
        return self._rows_by("label", collection_id, labels, with_vectors)

    def scan(self, collection_id: int, with_vectors: bool) -> Iterator[tuple]:
        """(label, id, metadata json, vector bytes | None) of every live item, in label order."""
        column = "vector" if with_vectors else "NULL"
        with self._lock:
            rows = self.conn.execute(f"SELECT label, id, metadata, {column} FROM items WHERE collection_id=? "
                                     f"ORDER BY label", (collection_id,)).fetchall()
        return iter(rows)

    # -- log ----------------------------------------------------------------------------------

    def last_lsn(self, collection_id: int) -> int:
        row = self.query("SELECT MAX(lsn) FROM changes WHERE collection_id=?", (collection_id,))
        return row[0][0] or 0

    def changes_after(self, collection_id: int, lsn: int) -> list[tuple[Optional[int], Optional[int]]]:
        return self.query("SELECT added, removed FROM changes WHERE collection_id=? AND lsn>? ORDER BY lsn",
                          (collection_id, lsn))

    def truncate_log(self, collection_id: int, lsn: int) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM changes WHERE collection_id=? AND lsn<=?", (collection_id, lsn))
