"""Every bad input to the store is a typed error with a clear message, and the store stays usable."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import pytest

from embedsvc.errors import AlreadyExists, FailedPrecondition, InvalidInput, NotFound
from embedsvc.store import CollectionConfig, Condition, Filter, Item, ItemsNotFound, LocalStore, SearchOptions


@pytest.fixture
def store(tmp_path):
    s = LocalStore(tmp_path)
    s.create_collection(CollectionConfig("c", 4))
    s.upsert("c", [Item("a", [1, 0, 0, 0], {"k": "x"}), Item("b", [0, 1, 0, 0], {"k": 2})])
    yield s
    s.close()


def still_usable(store: LocalStore) -> None:
    hits = store.search("c", np.array([[1, 0, 0, 0]], dtype=np.float32), SearchOptions(2))[0]
    assert [h.id for h in hits] == ["a", "b"]


def test_upsert_replaces_existing_id_and_insert_only_refuses_it(store):
    result = store.upsert("c", [Item("a", [0, 0, 1, 0], {"k": "y"}), Item("new", [0, 0, 0, 1])])
    assert (result.inserted, result.replaced, result.count) == (1, 1, 3)
    items, _ = store.get("c", ["a"], include_vectors=True)
    assert items[0].metadata == {"k": "y"} and np.allclose(items[0].vector, [0, 0, 1, 0])
    with pytest.raises(AlreadyExists, match=r"already exist.*'a'"):
        store.upsert("c", [Item("a", [1, 0, 0, 0]), Item("fresh", [1, 1, 0, 0])], insert_only=True)
    assert store.get("c", ["fresh"])[1] == ["fresh"]  # nothing of the refused batch was written


def test_delete_missing_id(store):
    result = store.delete("c", ["nope"])
    assert result.deleted == 0 and result.missing == ["nope"]
    with pytest.raises(ItemsNotFound, match=r"'nope'.*nothing was deleted"):
        store.delete("c", ["a", "nope"], strict=True)
    assert store.get_collection("c").count == 2
    still_usable(store)


@pytest.mark.parametrize(
    "vector, message",
    [
        ([1, 0, 0], "dimension 3; collection 'c' holds vectors of dimension 4"),
        ([1, 0, 0, 0, 0], "dimension 5"),
        ([np.nan, 0, 0, 0], "NaN or infinity"),
        ([np.inf, 0, 0, 0], "NaN or infinity"),
        ([0, 0, 0, 0], "zero vector"),
    ],
)
def test_bad_vectors(store, vector, message):
    with pytest.raises(InvalidInput, match=message):
        store.upsert("c", [Item("z", vector)])
    still_usable(store)


@pytest.mark.parametrize(
    "query, k, message",
    [
        ([[1, 0, 0]], 5, "dimension 3"),
        ([[np.nan, 0, 0, 0]], 5, "NaN or infinity"),
        ([[1, 0, 0, 0]], 0, "top_k must be between 1 and 1000"),
        ([[1, 0, 0, 0]], 1001, "top_k must be between 1 and 1000"),
    ],
)
def test_bad_queries(store, query, k, message):
    with pytest.raises(InvalidInput, match=message):
        store.search("c", np.array(query, dtype=np.float32), SearchOptions(k))
    still_usable(store)


@pytest.mark.parametrize(
    "item_id, message", [("", "non-empty"), ("x" * 513, "over the 512-byte limit"), ("\ud800", "not valid UTF-8")]
)
def test_bad_ids(store, item_id, message):
    with pytest.raises(InvalidInput, match=message):
        store.upsert("c", [Item(item_id, [1, 0, 0, 0])])
    still_usable(store)


def test_unicode_ids_round_trip(store):
    store.upsert("c", [Item("éé/😀 id with spaces", [0, 0, 1, 0])])
    assert store.get("c", ["éé/😀 id with spaces"])[0][0].id == "éé/😀 id with spaces"


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"k": [1, 2]}, "use a string, number or boolean"),
        ({"": 1}, "non-empty string"),
        ({"k": float("nan")}, "finite"),
    ],
)
def test_bad_metadata(store, metadata, message):
    with pytest.raises(InvalidInput, match=message):
        store.upsert("c", [Item("z", [1, 0, 0, 0], metadata)])


def test_unknown_and_duplicate_collections(store):
    with pytest.raises(NotFound, match="collection 'nope' does not exist"):
        store.search("nope", np.ones((1, 4), np.float32))
    with pytest.raises(NotFound):
        store.upsert("nope", [Item("a", [1, 0, 0, 0])])
    with pytest.raises(AlreadyExists, match="already exists"):
        store.create_collection(CollectionConfig("c", 4))
    still_usable(store)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"name": "bad name!", "dim": 4}, "collection name"),
        ({"name": "d", "dim": 0}, "dimension must be"),
        ({"name": "d", "dim": 4, "index": "IVF-nonsense"}, "bad index type 'IVF-nonsense'"),
        ({"name": "d", "dim": 4, "index": "PQ3"}, "bad index type"),
        ({"name": "d", "dim": 4, "metric": "l1"}, "unknown metric"),
    ],
)
def test_bad_collection_configs(store, config, message):
    with pytest.raises(InvalidInput, match=message):
        store.create_collection(CollectionConfig(**config))
    assert [c.config.name for c in store.list_collections()] == ["c"]


def test_factory_string_collection(store):
    info = store.create_collection(CollectionConfig("custom", 4, index="HNSW8"))
    assert info.index_factory == "HNSW8"
    store.upsert("custom", [Item("a", [1, 0, 0, 0])])
    assert store.search("custom", np.array([[1, 0, 0, 0]], np.float32), SearchOptions(1))[0][0].id == "a"


def test_pooling_state_requires_an_empty_collection(store):
    with pytest.raises(FailedPrecondition, match="holds 2 items"):
        store.set_pooling_state("c", b"state")
    store.create_collection(CollectionConfig("fresh", 4))
    assert store.set_pooling_state("fresh", b"v1") == 1
    assert store.pooling_state("fresh") == b"v1"


def test_more_like_this_excludes_the_item(store):
    hits = store.search("c", np.array([[1, 0, 0, 0]], np.float32), SearchOptions(5), exclude_ids=["a"])[0]
    assert [h.id for h in hits] == ["b"]


def test_drop_collection(store, tmp_path):
    assert store.drop_collection("c") == 2
    with pytest.raises(NotFound):
        store.get_collection("c")
    store.create_collection(CollectionConfig("c", 4))
    assert store.get_collection("c").count == 0


def test_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InvalidInput, match="not writable"):
        LocalStore(blocker / "data")


def test_checkpoint_and_reopen_replays_the_log(tmp_path):
    store = LocalStore(tmp_path, checkpoint_every=10**9)
    store.create_collection(CollectionConfig("c", 4, index="hnsw"))
    store.upsert("c", [Item(f"i{i}", np.eye(4)[i % 4] + 0.01 * i, {"n": i}) for i in range(40)])
    store.checkpoint()
    store.delete("c", ["i1", "i2"])
    store.upsert("c", [Item("i3", [0, 0, 0, 1], {"n": -1}), Item("late", [1, 1, 1, 1])])
    store.close(checkpoint=False)  # no close(): the log after the checkpoint must be replayed
    reopened = LocalStore(tmp_path)
    assert reopened.get_collection("c").count == 39
    assert reopened.get("c", ["i1", "i2"])[1] == ["i1", "i2"]
    hits = reopened.search(
        "c",
        np.array([[0, 0, 0, 1]], np.float32),
        SearchOptions(3, Filter((Condition("n", equals=-1),)), include_metadata=True),
    )[0]
    assert [(h.id, h.metadata) for h in hits] == [("i3", {"n": -1})]
    ids = {h.id for h in reopened.search("c", np.ones((1, 4), np.float32), SearchOptions(50))[0]}
    assert "i1" not in ids and "late" in ids and len(ids) == 39


def _count_on_reopening(data_dir, name: str) -> int:
    store = LocalStore(data_dir)
    try:
        return store.get_collection(name).count
    finally:
        store.close()


def test_a_config_written_by_a_later_version_still_opens(tmp_path):
    """A key this version does not know (a later release's field) is ignored, not a TypeError that keeps
    the whole data directory (or a Milvus catalogue) from opening."""
    import json
    import sqlite3

    store = LocalStore(tmp_path / "d")
    store.create_collection(CollectionConfig("c", 4))
    store.upsert("c", [Item("a", np.ones(4, np.float32))])
    store.close()
    db = sqlite3.connect(tmp_path / "d" / "store.sqlite3")
    ((config,),) = db.execute("SELECT config FROM collections").fetchall()
    db.execute("UPDATE collections SET config = ?", (json.dumps({**json.loads(config), "from_the_future": 1}),))
    db.commit()
    db.close()
    assert _count_on_reopening(tmp_path / "d", "c") == 1


def _set_config(data_dir, name: str, config: str) -> None:
    import sqlite3

    db = sqlite3.connect(data_dir / "store.sqlite3")
    db.execute("UPDATE collections SET config = ? WHERE name = ?", (config, name))
    db.commit()
    db.close()


def _open_files_under(path) -> list[str]:
    import os

    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd listing itself, closed meanwhile
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


def test_a_collection_whose_catalogue_row_cannot_be_read_is_unavailable_and_the_others_serve(tmp_path):
    """One damaged row of the catalogue (its config not JSON) kept the whole data directory from opening with
    a bare JSONDecodeError: no collection served. Now that one answers FAILED_PRECONDITION naming the damage,
    its items' metadata still reads, it can be dropped and re-created, and the others serve."""
    store = LocalStore(tmp_path / "d")
    for name in ("broken", "ok"):
        store.create_collection(CollectionConfig(name, 4))
        store.upsert(name, [Item("a", np.ones(4, np.float32), {"k": name})])
    store.close()
    _set_config(tmp_path / "d", "broken", "{not json")
    store = LocalStore(tmp_path / "d")
    try:
        assert [h.id for h in store.search("ok", np.ones((1, 4), np.float32), SearchOptions(1))[0]] == ["a"]
        with pytest.raises(FailedPrecondition, match="'broken' is unavailable: its configuration in the catalogue"):
            store.search("broken", np.ones((1, 4), np.float32), SearchOptions(1))
        with pytest.raises(FailedPrecondition, match="unavailable"):
            store.upsert("broken", [Item("b", np.ones(4, np.float32))])
        found, missing = store.get("broken", ["a", "zz"])
        assert [(i.id, i.metadata) for i in found] == [("a", {"k": "broken"})] and missing == ["zz"]
        assert {c.config.name for c in store.list_collections()} == {"broken", "ok"}
        assert store.drop_collection("broken") == 1
        store.create_collection(CollectionConfig("broken", 4))
        store.upsert("broken", [Item("c", np.ones(4, np.float32))])
        assert store.get_collection("broken").count == 1
    finally:
        store.close()


def test_a_store_that_fails_to_open_lets_its_lock_and_database_go(tmp_path):
    """A start-up step failing after the lock was taken (here: a directory where a stray file was to be removed)
    left the data directory locked and its database open in this process: after the cause was fixed, opening it
    again here said it was in use by another process (this one). The error names the path, and a second open
    succeeds once it is removed."""
    store = LocalStore(tmp_path / "d")
    store.create_collection(CollectionConfig("c", 4))
    store.close()
    stray = tmp_path / "d" / "indexes" / "collection-999.npz"
    stray.mkdir()
    (stray / "x").write_text("x")
    with pytest.raises(FailedPrecondition, match=f"cannot remove the stray file {stray}.*remove it"):
        LocalStore(tmp_path / "d")
    assert not _open_files_under(tmp_path / "d")
    (stray / "x").unlink()
    stray.rmdir()
    assert _count_on_reopening(tmp_path / "d", "c") == 0


def _two_collections(data_dir, checkpoint: bool = True) -> None:
    """Collections "a" (the one a test damages) and "ok", two items each (metadata {"k": id})."""
    store = LocalStore(data_dir)
    for name in ("a", "ok"):
        store.create_collection(CollectionConfig(name, 4))
        store.upsert(name, [Item(i, np.eye(4, dtype=np.float32)[n], {"k": i}) for n, i in enumerate(("x", "y"))])
    if checkpoint:
        store.checkpoint()
    store.close()


def _sql(data_dir, statement: str, *params) -> None:
    import sqlite3

    db = sqlite3.connect(data_dir / "store.sqlite3")
    db.execute(statement, params)
    db.commit()
    db.close()


@contextlib.contextmanager
def _opened_after(data_dir, statement: str):
    """Collections "a" and "ok" written, "a"'s catalogue row changed by `statement`, the store opened again."""
    _two_collections(data_dir)
    _sql(data_dir, statement)
    store = LocalStore(data_dir)
    try:
        yield store
    finally:
        store.close()


def _ok_serves(store: LocalStore) -> None:
    hits = store.search("ok", np.array([[1, 0, 0, 0]], np.float32), SearchOptions(1))[0]
    assert [h.id for h in hits] == ["x"]


@pytest.mark.parametrize(
    "config_set, words",
    [
        ("'$.metric', 'l9'", "unknown metric 'l9'"),
        ("'$.metric', 5", "metric"),
        ("'$.model', 5", "model"),
        ("'$.pooling_params', json('[1]')", "pooling_params"),
        ("'$.index', 'bogus'", "bad index type 'bogus'"),
    ],
    ids=["metric-unknown", "metric-number", "model-number", "pooling-params-list", "index-unknown"],
)
def test_a_catalogue_row_of_valid_json_but_wrong_values_makes_that_collection_unavailable(tmp_path, config_set, words):
    """A config that is JSON but holds an unknown metric (or a value of the wrong type) opened and served: an
    unknown metric searched with other semantics than the collection was made for (its vectors were not
    normalised as cosine's are), and a number where a name belongs reached ListCollections, whose answer then
    failed for every collection. Now that collection is unavailable, naming the field, and the others serve."""
    statement = f"UPDATE collections SET config = json_set(config, {config_set}) WHERE name = 'a'"
    with _opened_after(tmp_path / "d", statement) as store:
        _ok_serves(store)
        with pytest.raises(FailedPrecondition, match="'a' is unavailable: its configuration in the catalogue") as e:
            store.search("a", np.ones((1, 4), np.float32), SearchOptions(1))
        assert words in str(e.value)
        for info in store.list_collections():  # what ListCollections answers from: the types it expects
            c = info.config
            assert all(isinstance(v, str) for v in (c.name, c.model, c.pooling, c.metric, c.index, c.weights))
            assert isinstance(c.pooling_params, dict) and isinstance(info.created_ms, int)
        assert [(i.id, i.metadata) for i in store.get("a", ["x"])[0]] == [("x", {"k": "x"})]
        assert store.drop_collection("a") == 2


@pytest.mark.parametrize("column", ["created_ms", "pooling_version"])
def test_a_catalogue_row_with_text_in_a_number_column_makes_that_collection_unavailable(tmp_path, column):
    """SQLite keeps text in an INTEGER column: the row's creation time or pooling version as text opened and
    reached ListCollections (whose answer failed for every collection) and the pooling check of every write.
    Now that collection is unavailable and lists with numbers; the others serve."""
    with _opened_after(tmp_path / "d", f"UPDATE collections SET {column} = 'soon' WHERE name = 'a'") as store:
        _ok_serves(store)
        with pytest.raises(FailedPrecondition, match=f"'a' is unavailable: .*{column}"):
            store.upsert("a", [Item("z", np.ones(4, np.float32))])
        infos = store.list_collections()
        assert all(isinstance(i.created_ms, int) and isinstance(i.pooling_version, int) for i in infos)


def test_a_config_whose_name_differs_from_its_row_serves_under_the_row_name(tmp_path):
    """The catalogue's name column (unique, what requests name) and the name inside the config JSON disagreeing
    (a hand edit) listed the collection under the config's name: ListCollections showed "ok" twice and never "a",
    which requests still reached. The row's name is the collection's name."""
    statement = "UPDATE collections SET config = json_set(config, '$.name', 'ok') WHERE name = 'a'"
    with _opened_after(tmp_path / "d", statement) as store:
        assert [i.config.name for i in store.list_collections()] == ["a", "ok"]
        assert store.get_collection("a").config.name == "a"
        assert [h.id for h in store.search("a", np.array([[1, 0, 0, 0]], np.float32), SearchOptions(1))[0]] == ["x"]


def test_a_catalogue_of_another_schema_is_one_clear_error_and_lets_go(tmp_path):
    """A store.sqlite3 whose tables lack a column this version reads (another version's, or an edited one)
    failed the open with a bare sqlite3.OperationalError ("no such column: config"; a traceback from `serve`),
    or (items.metadata) opened and failed every search the same way. Now the open is one FailedPrecondition
    naming the column, nothing stays held, and the data directory opens once the column is back."""
    data = tmp_path / "d"
    _two_collections(data)
    for table, column in (("collections", "config"), ("items", "metadata")):
        _sql(data, f"ALTER TABLE {table} RENAME COLUMN {column} TO renamed")
        with pytest.raises(FailedPrecondition, match=f"store.sqlite3 .*lacks .*{table}.{column}.*another version"):
            LocalStore(data)
        assert not _open_files_under(data)
        _sql(data, f"ALTER TABLE {table} RENAME COLUMN renamed TO {column}")
    store = LocalStore(data)
    try:
        _ok_serves(store)
    finally:
        store.close()


@pytest.mark.parametrize("checkpoint", [True, False], ids=["checkpointed", "from-the-items-table"])
@pytest.mark.parametrize("metadata", ["{not json", "5", '{"k": 1}, {"k": 2}'], ids=["not-json", "not-an-object", "two"])
def test_an_item_whose_metadata_is_damaged_is_a_clear_error_and_its_collection_serves(tmp_path, checkpoint, metadata):
    """One item's metadata in the items table not JSON (or not an object): Get of it raised a bare
    JSONDecodeError (INTERNAL; or returned a number as metadata), and a start without a checkpoint made its
    whole collection unavailable. Now the collection serves, Get of that item is a FailedPrecondition naming
    it, and upserting it again (or deleting it) repairs it."""
    data = tmp_path / "d"
    _two_collections(data, checkpoint)
    _sql(data, "UPDATE items SET metadata = ? WHERE id = 'x' AND collection_id = 1", metadata)
    store = LocalStore(data)
    try:
        query = np.array([[0, 1, 0, 0]], np.float32)
        assert [h.id for h in store.search("a", query, SearchOptions(1))[0]] == ["y"]
        assert [(i.id, i.metadata) for i in store.get("a", ["y"])[0]] == [("y", {"k": "y"})]
        with pytest.raises(FailedPrecondition, match=r"item 'x' of 'a' has damaged metadata.*upsert it again"):
            store.get("a", ["x"])
        with pytest.raises(FailedPrecondition, match="item 'x' of 'a' has damaged metadata"):
            store.search("a", np.array([[1, 0, 0, 0]], np.float32), SearchOptions(1, include_metadata=True))
        store.upsert("a", [Item("x", np.eye(4, dtype=np.float32)[0], {"k": "again"})])
        assert [(i.id, i.metadata) for i in store.get("a", ["x"])[0]] == [("x", {"k": "again"})]
    finally:
        store.close()


@pytest.mark.parametrize("config", ["{not json", None], ids=["config-unreadable", "config-fine"])
def test_a_catalogue_row_whose_name_is_not_a_collection_name_is_left_out_and_the_others_serve(tmp_path, config):
    """A row renamed by hand to a name no request can carry ("bad name"), its config damaged too, kept the
    whole data directory from opening (InvalidInput making the unavailable collection's placeholder). Now the
    row is left out (logged, its files kept) and the others serve; the name it had is free again."""
    data = tmp_path / "d"
    _two_collections(data)
    _sql(data, "UPDATE collections SET name = 'bad name' WHERE name = 'a'")
    if config is not None:
        _sql(data, "UPDATE collections SET config = ? WHERE name = 'bad name'", config)
    store = LocalStore(data)
    try:
        _ok_serves(store)
        assert [i.config.name for i in store.list_collections()] == ["ok"]
        assert list((data / "indexes").glob("collection-1.*"))  # kept: a restored name serves them again
        store.create_collection(CollectionConfig("a", 4))
    finally:
        store.close()


@pytest.mark.parametrize("label", [5000, -3, "zz"], ids=["past-the-file", "negative", "text"])
def test_get_of_an_item_whose_label_has_no_vector_is_a_clear_error(tmp_path, label):
    """An items row whose label names no row of the vector file (a hand edit, a damaged page): Get with vectors
    (and "more like this" by id) raised a bare VectorFileError or ValueError (INTERNAL). Now it is a
    FailedPrecondition naming the collection, and the other items still read."""
    data = tmp_path / "d"
    _two_collections(data)
    _sql(data, "UPDATE items SET label = ? WHERE id = 'x' AND collection_id = 1", label)
    store = LocalStore(data)
    try:
        with pytest.raises(FailedPrecondition, match="'a': the vectors of 'x' cannot be read"):
            store.get("a", ["y", "x"], include_vectors=True)
        assert store.get("a", ["y"], include_vectors=True)[0][0].vector.tolist() == [0, 1, 0, 0]
        _ok_serves(store)
    finally:
        store.close()


def _damage_pages(data_dir, table: str, which: Callable[[list[str]], list[int]]) -> None:
    """Overwrites pages of one table or index of store.sqlite3 with garbage, as a failing disk does."""
    import os
    import sqlite3

    db = sqlite3.connect(data_dir / "store.sqlite3")
    rows = db.execute("SELECT path, pageno, pagetype FROM dbstat WHERE name = ? ORDER BY path", (table,)).fetchall()
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(data_dir / "store.sqlite3", "r+b") as f:
        for index in which([f"{kind}:{path}" for path, _, kind in rows]):
            f.seek((rows[index][1] - 1) * page_size)
            f.write(os.urandom(page_size))


def _many_items(data_dir, n: int = 2000) -> None:
    store = LocalStore(data_dir)
    for name in ("a", "ok"):
        store.create_collection(CollectionConfig(name, 4))
        store.upsert(name, [Item(f"{name}{k}", np.eye(4, dtype=np.float32)[k % 4]) for k in range(n)])
    store.close()


def test_a_damaged_catalogue_page_is_one_clear_error_and_lets_go(tmp_path):
    """A page of the collections table overwritten (a disk error) past the database's header: the open failed
    with a bare sqlite3.DatabaseError ("database disk image is malformed"; a traceback from `serve`). Now it is
    one FailedPrecondition saying to restore the file, and nothing stays held."""
    data = tmp_path / "d"
    _many_items(data, 10)
    _damage_pages(data, "collections", lambda pages: [0])
    for _ in range(2):  # the second open meets the same error, not the first one's lock
        with pytest.raises(FailedPrecondition, match=r"store.sqlite3 is not a usable SQLite database.*backup"):
            LocalStore(data)
    assert not _open_files_under(data)


def test_a_damaged_page_of_one_collections_items_leaves_the_others_serving(tmp_path):
    """A leaf page of the items' label index overwritten, holding rows of collection "a" only: counting "a"'s
    items at the open raised a bare sqlite3.DatabaseError and no collection served. Now "a" is unavailable
    (naming the damage) and "ok" serves."""
    data = tmp_path / "d"
    _many_items(data)
    _damage_pages(data, "items_by_label", lambda pages: [pages.index(next(p for p in pages if p.startswith("leaf")))])
    store = LocalStore(data)
    try:
        hits = store.search("ok", np.eye(4, dtype=np.float32)[:1], SearchOptions(1))[0]
        assert hits[0].id.startswith("ok")
        with pytest.raises(FailedPrecondition, match=r"'a' is unavailable: .*malformed.*backup"):
            store.search("a", np.eye(4, dtype=np.float32)[:1], SearchOptions(1))
    finally:
        store.close()


def test_a_damaged_page_of_one_collections_items_is_a_clear_error_on_its_requests(tmp_path):
    """A leaf page of the items table overwritten (a disk error) after the collection loaded from its checkpoint:
    Get, upsert, delete and drop of the items it held raised a bare sqlite3.DatabaseError (INTERNAL). Now each is
    a FailedPrecondition saying the catalogue is damaged and to restore it; the other collection serves."""
    data = tmp_path / "d"
    _many_items(data)
    store = LocalStore(data)
    store.checkpoint()
    store.close()
    _damage_pages(data, "items", lambda pages: [pages.index(next(p for p in pages if p.startswith("leaf")))])
    store = LocalStore(data)
    try:
        calls = [
            lambda: store.get("a", ["a0"]),
            lambda: store.upsert("a", [Item("a0", np.ones(4, np.float32))]),
            lambda: store.delete("a", ["a1"]),
            lambda: store.drop_collection("a"),
        ]
        for call in calls:
            with pytest.raises(FailedPrecondition, match=r"store.sqlite3 is damaged \(.*malformed.*backup"):
                call()
        assert store.get("ok", ["ok1"])[0][0].id == "ok1"
        store.upsert("ok", [Item("ok1", np.ones(4, np.float32))])
    finally:
        store.close()


def test_an_indexes_path_that_is_a_file_is_named_as_such(tmp_path):
    """`indexes` in the data directory a file (a copy gone wrong): the open said the data directory "is not
    writable: File exists", which it was. Now the message names the file and what to do, and nothing is held."""
    data = tmp_path / "d"
    _two_collections(data)
    import shutil

    shutil.rmtree(data / "indexes")
    (data / "indexes").write_text("x")
    with pytest.raises(
        InvalidInput, match=r"indexes is not a folder but embedsvc.s folder of vector files: move it away"
    ):
        LocalStore(data)
    assert not _open_files_under(data)
