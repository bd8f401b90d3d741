"""The store's source of truth: SQLite in WAL mode with synchronous=FULL.

Tables: `meta` (the store's identity, a UUID made with the database), `collections` (config, label
counter, fitted pooling state, where its vector file's rows are), `items` (id -> label, metadata; the
vectors are in the collection's vector file, see vectors.py, synced before the transaction that commits
their labels), `changes`, the log of label additions and removals that checkpoints are replayed from, and
`thumbnails` (id -> small image for display, optional), written with the items. Each write is one
transaction; once commit returns it is on disk. Databases of the first format (vectors in the items table)
are migrated on open (LocalStore). A write the disk refuses (read-only, full, I/O error) is rolled back and reported as
StorageUnavailable; the next write tries again, so the store recovers by itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from embedsvc.errors import Aborted, FailedPrecondition, NotFound, StorageUnavailable
from embedsvc.store.vectors import Layout

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
    pooling_state BLOB,
    vector_generation INTEGER NOT NULL DEFAULT 0,
    vector_base_count INTEGER NOT NULL DEFAULT 0,
    vector_base_label INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS items (
    collection_id INTEGER NOT NULL,
    id TEXT NOT NULL,
    label INTEGER NOT NULL,
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

# Columns the first format lacked (added on open); the items table's vector column is moved out by LocalStore.
_ADDED_COLUMNS = (
    ("collections", "vector_generation", "INTEGER NOT NULL DEFAULT 0"),
    ("collections", "vector_base_count", "INTEGER NOT NULL DEFAULT 0"),
    ("collections", "vector_base_label", "INTEGER NOT NULL DEFAULT 0"),
)
# The columns this version reads and writes, table by table: a table of another schema (CREATE TABLE IF NOT
# EXISTS keeps it as it is) is refused at the open, not met by the first query that names a missing column.
_READ = {
    "meta": ("key", "value"),
    "collections": (
        "id",
        "name",
        "config",
        "created_ms",
        "next_label",
        "pooling_version",
        "pooling_state",
        "vector_generation",
        "vector_base_count",
        "vector_base_label",
    ),
    "items": ("collection_id", "id", "label", "metadata"),
    "changes": ("lsn", "collection_id", "added", "removed"),
    "thumbnails": ("collection_id", "id", "media_type", "data"),
}
# A disk that refuses a vector file write: reported like SQLite's refusals (nothing stored, retry).
# EFBIG: a file size limit (RLIMIT_FSIZE, a file system's largest file) refuses a vector file's growth.
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG}


class DatabaseDamaged(FailedPrecondition):
    """store.sqlite3 has pages that cannot be read ("database disk image is malformed"): restore it."""

    def __init__(self, message: str, cause: sqlite3.DatabaseError):
        super().__init__(message)
        self.cause = cause  # SQLite's own error
        self.reason = str(cause)  # SQLite's words


CHUNK = 500  # SQLite's host-parameter limit is far above; this keeps statements short


def _chunks(values: list, size: int = CHUNK) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


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
            self.conn.execute("PRAGMA journal_size_limit=67108864")  # the WAL shrinks back after a bulk load
            self.conn.executescript(SCHEMA)
            for table, column, kind in _ADDED_COLUMNS:
                if column not in self._columns(table):
                    self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            found = {table: set(self._columns(table)) for table in _READ}
            lacking = [
                f"{table}.{column}"
                for table, columns in _READ.items()
                for column in columns
                if column not in found[table]
            ]
            if lacking:
                self.conn.close()
                raise FailedPrecondition(
                    f"{path} lacks the column(s) {', '.join(lacking)} this version reads: it was written by "
                    f"another version of embedsvc (or edited); open it with the version that wrote it, or restore "
                    f"it from a backup"
                )
            self.conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_uuid', ?)", (uuid.uuid4().hex,))
            self.uuid = self.conn.execute("SELECT value FROM meta WHERE key='store_uuid'").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise self.unopened(exc) from None

    def unopened(self, exc: sqlite3.DatabaseError) -> FailedPrecondition:
        """Why the database cannot be opened (here, or by the store's first reads of it); its connection, if made,
        closed now (not when the process exits: a start-up error run in a test's process kept the file open)."""
        path = self.path
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()
        if isinstance(exc, sqlite3.OperationalError):  # the disk refused (full, read-only, I/O): not a bad database
            return FailedPrecondition(
                f"{path} cannot be opened now ({exc}): free space on its disk or make it "
                f"writable, then start again; the database is kept as it was"
            )
        return FailedPrecondition(
            f"{path} is not a usable SQLite database ({exc}); restore it from a backup, "
            f"or move it away to start with an empty store"
        )

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    def _columns(self, table: str) -> list[str]:
        return [row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")]

    def items_hold_vectors(self) -> bool:
        """True for a database of the first format, whose items table has a vector column."""
        with self._lock:
            return "vector" in self._columns("items")

    def _unavailable(self, exc: sqlite3.Error | OSError) -> StorageUnavailable:
        return StorageUnavailable(
            f"the data directory {self.path.parent} cannot be written now ({exc}); nothing "
            f"was stored: make it writable (or free space) and retry"
        )

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
                with contextlib.suppress(sqlite3.Error):  # a failed COMMIT may have rolled back already
                    self.conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) or (
                    isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS
                ):
                    raise self._unavailable(exc) from None
                if type(exc) is sqlite3.DatabaseError:
                    raise self._damaged(exc) from None
                raise

    def _damaged(self, exc: sqlite3.DatabaseError) -> DatabaseDamaged:
        return DatabaseDamaged(
            f"{self.path} is damaged ({exc}): the pages this request needs cannot be read (a disk error); "
            f"restore it from a backup. Collections whose rows are elsewhere keep serving",
            exc,
        )

    def query(self, sql: str, params: Iterable = ()) -> list:
        with self._lock:
            try:
                return self.conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.DatabaseError as exc:
                if type(exc) is sqlite3.DatabaseError:  # malformed: not a constraint, nor the disk refusing now
                    raise self._damaged(exc) from None
                raise

    # -- collections --------------------------------------------------------------------------

    def collections(self) -> list[tuple]:
        return self.query("SELECT id, name, config, created_ms, pooling_version FROM collections ORDER BY name")

    def layout(self, collection_id: int) -> tuple[Layout, int]:
        """Where the collection's vector rows are, and its next label (rows in use end there)."""
        row = self.query(
            "SELECT vector_generation, vector_base_count, vector_base_label, next_label FROM collections WHERE id=?",
            (collection_id,),
        )[0]
        return Layout(*row[:3]), row[3]

    def set_layout(self, collection_id: int, layout: Layout) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE collections SET vector_generation=?, vector_base_count=?, vector_base_label=? WHERE id=?",
                (layout.generation, layout.base_count, layout.base_label, collection_id),
            )

    def create_collection(self, name: str, config: dict, make_files: Callable[[int], None]) -> tuple[int, int]:
        """`make_files(collection id)` creates the collection's files durably before the commit: a collection
        is never committed without them (a disk that refuses them refuses the collection, and its name stays
        free); files of a collection whose commit never came are strays that the next start-up removes."""
        created = int(time.time() * 1000)
        with self.transaction() as c:
            cur = c.execute(
                "INSERT INTO collections (name, config, created_ms) VALUES (?, ?, ?)",
                (name, json.dumps(config), created),
            )
            make_files(cur.lastrowid)
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
            c.execute(
                "UPDATE collections SET pooling_version = pooling_version + 1, pooling_state=? WHERE id=?",
                (state, collection_id),
            )
            return c.execute("SELECT pooling_version FROM collections WHERE id=?", (collection_id,)).fetchone()[0]

    def pooling_state(self, collection_id: int) -> bytes | None:
        rows = self.query("SELECT pooling_state FROM collections WHERE id=?", (collection_id,))
        return rows[0][0] if rows else None

    # -- items --------------------------------------------------------------------------------

    def labels_of(self, c: sqlite3.Connection, collection_id: int, ids: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            found.update(
                c.execute(
                    f"SELECT id, label FROM items WHERE collection_id=? AND id IN ({marks})", (collection_id, *chunk)
                ).fetchall()
            )
        return found

    def upsert(
        self,
        collection_id: int,
        ids: list[str],
        metadata: list[str],
        write_vectors: Callable[[int], Callable[[], None]],
        pooling_version: int | None = None,
        thumbnails: dict[str, tuple[str, bytes]] | None = None,
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Writes one batch (ids unique) in one transaction; returns new labels and replaced {id: old label}.

        `write_vectors(first label)` writes the batch's vectors (the vector file) and returns the wait for their
        sync, which runs while the rows are inserted; the commit comes after it returned (vectors first on disk).
        `pooling_version`: the version of the pooling state the vectors were computed with; checked in
        the same transaction, so vectors of a codebook replaced meanwhile are never committed.
        `thumbnails` {id: (media type, bytes)} are written in the same transaction; a replaced item loses its
        old thumbnail unless it brings a new one."""
        with self.transaction() as c:
            row = c.execute(
                "SELECT next_label, pooling_version FROM collections WHERE id=?", (collection_id,)
            ).fetchone()
            if row is None:
                raise NotFound("the collection was dropped while the request ran; nothing was stored")
            start, current_version = row
            if pooling_version is not None and pooling_version != current_version:
                raise Aborted(
                    f"the collection's pooling was re-fitted (version {pooling_version} -> "
                    f"{current_version}) while these items were embedded; nothing was stored: retry"
                )
            synced = write_vectors(start)
            try:
                old = self.labels_of(c, collection_id, ids)
                labels = np.arange(start, start + len(ids), dtype=np.int64)
                c.execute("UPDATE collections SET next_label=? WHERE id=?", (start + len(ids), collection_id))
                c.executemany(
                    "INSERT OR REPLACE INTO items (collection_id, id, label, metadata) VALUES (?,?,?,?)",
                    [(collection_id, i, label, m) for i, label, m in zip(ids, labels.tolist(), metadata)],
                )
                c.executemany(
                    "INSERT INTO changes (collection_id, added, removed) VALUES (?,?,?)",
                    [(collection_id, label, old.get(i)) for i, label in zip(ids, labels.tolist())],
                )
                self._replace_thumbnails(c, collection_id, [i for i in old if i not in (thumbnails or {})], thumbnails)
            finally:
                synced()  # the vectors are on disk before the commit that names them (or this raises)
        return labels, old

    def delete(self, collection_id: int, ids: list[str]) -> dict[str, int]:
        """Removes the ids that exist; returns {id: label} of those removed."""
        with self.transaction() as c:
            old = self.labels_of(c, collection_id, ids)
            c.executemany("DELETE FROM items WHERE collection_id=? AND id=?", [(collection_id, i) for i in old])
            self._replace_thumbnails(c, collection_id, list(old), None)
            c.executemany(
                "INSERT INTO changes (collection_id, added, removed) VALUES (?,NULL,?)",
                [(collection_id, label) for label in old.values()],
            )
        return old

    def _replace_thumbnails(
        self, c: sqlite3.Connection, collection_id: int, removed: list[str], added: dict[str, tuple[str, bytes]] | None
    ) -> None:
        c.executemany("DELETE FROM thumbnails WHERE collection_id=? AND id=?", [(collection_id, i) for i in removed])
        c.executemany(
            "INSERT OR REPLACE INTO thumbnails (collection_id, id, media_type, data) VALUES (?,?,?,?)",
            [(collection_id, i, kind, data) for i, (kind, data) in (added or {}).items()],
        )

    def thumbnail(self, collection_id: int, item_id: str) -> tuple[str, bytes] | None:
        rows = self.query(
            "SELECT media_type, data FROM thumbnails WHERE collection_id=? AND id=?", (collection_id, item_id)
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def _rows_by(self, key: str, collection_id: int, values: list) -> dict:
        """{key value: (the other of id/label, metadata json)} for the rows found."""
        other = "label" if key == "id" else "id"
        found = {}
        for chunk in _chunks(values):
            marks = ",".join("?" * len(chunk))
            for row in self.query(
                f"SELECT {key}, {other}, metadata FROM items WHERE collection_id=? AND {key} IN ({marks})",
                (collection_id, *chunk),
            ):
                found[row[0]] = row[1:]
        return found

    def items(self, collection_id: int, ids: list[str]) -> dict[str, tuple]:
        return self._rows_by("id", collection_id, ids)

    def items_by_label(self, collection_id: int, labels: list[int]) -> dict[int, tuple]:
        return self._rows_by("label", collection_id, labels)

    def scan(self, collection_id: int, chunk: int = 65_536) -> Iterator[list[tuple]]:
        """(label, id, metadata json) of every live item, in label order, `chunk` rows at a time (a start-up
        reports its progress between chunks, and holds one chunk of Python rows at a time)."""
        last = -1
        while True:
            rows = self.query(
                "SELECT label, id, metadata FROM items WHERE collection_id=? AND label>? ORDER BY label LIMIT ?",
                (collection_id, last, chunk),
            )
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def count(self, collection_id: int) -> int:
        return self.query("SELECT COUNT(*) FROM items WHERE collection_id=?", (collection_id,))[0][0]

    # -- migration from the first format --------------------------------------------------------

    def old_vectors(self, collection_id: int, chunk: int = 8192) -> Iterator[tuple[list[int], list[bytes]]]:
        """(labels, vector bytes) of a first-format collection's items in label order, a chunk at a time."""
        last = -1
        while True:
            rows = self.query(
                "SELECT label, vector FROM items WHERE collection_id=? AND label>? ORDER BY label LIMIT ?",
                (collection_id, last, chunk),
            )
            if not rows:
                return
            yield [r[0] for r in rows], [r[1] for r in rows]
            last = rows[-1][0]

    def drop_vector_column(self, layouts: dict[int, Layout]) -> None:
        """One transaction: the items table without its vector column, and where each collection's rows now are."""
        with self.transaction() as c:
            c.execute(
                "CREATE TABLE items_new (collection_id INTEGER NOT NULL, id TEXT NOT NULL, label INTEGER NOT "
                "NULL, metadata TEXT NOT NULL, PRIMARY KEY (collection_id, id)) WITHOUT ROWID"
            )
            c.execute("INSERT INTO items_new SELECT collection_id, id, label, metadata FROM items")
            c.execute("DROP TABLE items")
            c.execute("ALTER TABLE items_new RENAME TO items")
            c.execute("CREATE UNIQUE INDEX items_by_label ON items (collection_id, label)")
            for cid, layout in layouts.items():
                c.execute(
                    "UPDATE collections SET vector_generation=?, vector_base_count=?, vector_base_label=? WHERE id=?",
                    (layout.generation, layout.base_count, layout.base_label, cid),
                )
        with self._lock:
            self.conn.execute("VACUUM")  # gives the moved vectors' pages back to the file system

    # -- log ----------------------------------------------------------------------------------

    def last_lsn(self, collection_id: int) -> int:
        row = self.query("SELECT MAX(lsn) FROM changes WHERE collection_id=?", (collection_id,))
        return row[0][0] or 0

    def changes_after(self, collection_id: int, lsn: int) -> list[tuple[int | None, int | None]]:
        return self.query(
            "SELECT added, removed FROM changes WHERE collection_id=? AND lsn>? ORDER BY lsn", (collection_id, lsn)
        )

    def truncate_log(self, collection_id: int, lsn: int) -> None:
        with self.transaction() as c:
            c.execute("DELETE FROM changes WHERE collection_id=? AND lsn<=?", (collection_id, lsn))
