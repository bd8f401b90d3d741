"""Thumbnails live in the store's SQLite database, written in the items' transaction and removed with them."""

from __future__ import annotations

import pytest

from embedsvc.errors import InvalidInput, NotFound
from embedsvc.store import CollectionConfig, Item, LocalStore

JPEG = ("image/jpeg", b"\xff\xd8 a small picture")


@pytest.fixture
def store(tmp_path):
    s = LocalStore(tmp_path)
    s.create_collection(CollectionConfig("c", 2))
    yield s
    s.close()


def test_thumbnails_are_durable_and_follow_their_items(tmp_path):
    store = LocalStore(tmp_path)
    store.create_collection(CollectionConfig("c", 2))
    store.upsert("c", [Item("a", [1, 0]), Item("b", [0, 1]), Item("c", [1, 1])], thumbnails={"a": JPEG, "b": JPEG})
    store.close()
    reopened = LocalStore(tmp_path)
    assert reopened.thumbnail("c", "a") == JPEG
    with pytest.raises(NotFound, match="has no thumbnail"):
        reopened.thumbnail("c", "c")
    reopened.upsert("c", [Item("a", [1, 0])])  # replaced without a picture: the old one must go
    with pytest.raises(NotFound):
        reopened.thumbnail("c", "a")
    reopened.delete("c", ["b"])
    with pytest.raises(NotFound, match="not in the collection"):
        reopened.thumbnail("c", "b")
    reopened.upsert("c", [Item("d", [1, 0])], thumbnails={"d": JPEG, "not-in-batch": JPEG})
    reopened.drop_collection("c")
    assert reopened.db.query("SELECT COUNT(*) FROM thumbnails")[0][0] == 0
    reopened.close()


def test_a_refused_batch_writes_no_thumbnail(store):
    with pytest.raises(InvalidInput, match="zero vector"):
        store.upsert("c", [Item("a", [1, 0]), Item("z", [0, 0])], thumbnails={"a": JPEG, "z": JPEG})
    assert store.db.query("SELECT COUNT(*) FROM thumbnails")[0][0] == 0
