"""Every bad input to the store is a typed error with a clear message, and the store stays usable."""

from __future__ import annotations

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
