"""The same store operations against both back ends (local SQLite + FAISS, Milvus via Milvus Lite in a
temporary file): identical flat results, ANN recall against brute force, filters, errors, and no filter
or id injection on the Milvus side.

EMBEDSVC_TEST_MILVUS_URI=http://127.0.0.1:19530 runs the Milvus side on that server instead of Milvus Lite (a
database of its own per test folder, dropped at the end): a throwaway server only, never one holding data."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re

import numpy as np
import pytest

from embedsvc.errors import Aborted, EmbedsvcError, InvalidInput
from embedsvc.store import CollectionConfig, Condition, Filter, Item, SearchOptions, open_store
from embedsvc.store.milvus import MilvusStore

pytest.importorskip("milvus_lite")

DIM = 32
N = 3000
SMALL = 360  # items of the hostile-filter collection: every hostile key holds every hostile value
BACKENDS = ("local", "milvus")
SERVER_URI = os.environ.get("EMBEDSVC_TEST_MILVUS_URI", "")
SERVER_DATABASES: set[str] = set()  # made on SERVER_URI by this run; dropped at the end


def clustered(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, dim))
    x = centres[rng.integers(0, 30, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


VECTORS = clustered(N, 0)
QUERIES = clustered(50, 1)
REPLACED = clustered(N // 10, 3)
HOSTILE_KEYS = [
    'k"]',
    "a' or 1==1 or 'b",
    'x"] == 1 || metadata["y',
    "k && true",
    "]) or (true",
    "back\\slash",
    "line\nbreak",
    "{p0}",
    "or",
]
HOSTILE_VALUES = ['" or true or "', "' or ''='", 'v && id != ""', "[1, 2]", "\\", '\\"', "tab\there", "{p1}", "or"]


def metadata(i: int) -> dict:
    meta = {"group": int(i % 10), "even": i % 2 == 0, "name": f"n{i % 7}", "score": (i % 13) / 2}
    if i % 3 == 0:
        meta["mixed"] = [1, True, "1", 1.0][i % 4]  # the same "one" as int, bool, string and float
    meta[HOSTILE_KEYS[i % len(HOSTILE_KEYS)]] = HOSTILE_VALUES[i % len(HOSTILE_VALUES)]
    return meta


def open_backend(backend: str, path) -> object:
    if backend == "local":
        return open_store("local", data_dir=str(path / "local"))
    if SERVER_URI:
        return open_store("milvus", milvus_uri=SERVER_URI, milvus_db=server_database(path))
    return open_store("milvus", milvus_uri=str(path / "milvus.db"))


def server_database(path) -> str:
    """The database of a test folder on SERVER_URI (the same folder reopens the same database)."""
    from pymilvus import MilvusClient

    name = "t_" + hashlib.sha1(str(path).encode()).hexdigest()[:20]
    if name not in SERVER_DATABASES:
        client = MilvusClient(uri=SERVER_URI)
        client.create_database(name)
        client.close()
        SERVER_DATABASES.add(name)
    return name


@pytest.fixture(scope="module", autouse=True)
def drop_server_databases():
    yield
    if not SERVER_DATABASES:
        return
    from pymilvus import MilvusClient

    for name in sorted(SERVER_DATABASES):
        client = MilvusClient(uri=SERVER_URI, db_name=name)
        for collection in client.list_collections():
            client.drop_collection(collection)
        client.drop_database(name)
        client.close()
    SERVER_DATABASES.clear()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Per back end and preset, a collection with the same items, then 20% deleted and 10% replaced."""
    root = tmp_path_factory.mktemp("backends")
    stores = {backend: open_backend(backend, root) for backend in BACKENDS}
    truth = {f"item-{i}": VECTORS[i] for i in range(N)}
    for i in range(0, N, 5):
        truth.pop(f"item-{i}")
    for j, i in enumerate(range(1, N, 10)):
        truth[f"item-{i}"] = REPLACED[j]
    for store in stores.values():
        for preset in ("flat", "ivf", "hnsw"):
            name = f"c-{preset}"
            store.create_collection(CollectionConfig(name, DIM, index=preset))
            for start in range(0, N, 1000):
                store.upsert(
                    name, [Item(f"item-{i}", VECTORS[i], metadata(i)) for i in range(start, min(N, start + 1000))]
                )
            store.delete(name, [f"item-{i}" for i in range(0, N, 5)])
            store.upsert(name, [Item(f"item-{i}", REPLACED[j], metadata(i)) for j, i in enumerate(range(1, N, 10))])
        # the hostile filters' own collection: the same items, deletes and replacements up to SMALL (a Milvus Lite
        # filter scans every item's JSON: ~10 us an item a call, and these tests make ~600 calls)
        store.create_collection(CollectionConfig("c-hostile", DIM))
        store.upsert("c-hostile", [Item(f"item-{i}", VECTORS[i], metadata(i)) for i in range(SMALL)])
        store.delete("c-hostile", [f"item-{i}" for i in range(0, SMALL, 5)])
        store.upsert(
            "c-hostile", [Item(f"item-{i}", REPLACED[j], metadata(i)) for j, i in enumerate(range(1, SMALL, 10))]
        )
    yield stores, truth
    for store in stores.values():
        store.close()


def brute_force(vectors: dict[str, np.ndarray], queries: np.ndarray, k: int) -> list[list[str]]:
    ids = sorted(vectors)
    scores = queries @ np.stack([vectors[i] for i in ids]).T
    return [[ids[j] for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


def recall(found, truth) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth) if t]))


def ids_of(results) -> list[list[str]]:
    return [[h.id for h in hits] for hits in results]


def test_flat_results_are_identical_across_backends(loaded):
    stores, truth = loaded
    local, milvus = (stores[b].search("c-flat", QUERIES, SearchOptions(10, include_metadata=True)) for b in BACKENDS)
    assert ids_of(local) == ids_of(milvus) == brute_force(truth, QUERIES, 10)
    for a, b in zip(local, milvus):
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
        assert [h.metadata for h in a] == [h.metadata for h in b]
    expected = np.sort(QUERIES @ np.stack(list(truth.values())).T, axis=1)[:, ::-1][:, :10]
    assert np.allclose([[h.score for h in hits] for hits in milvus], expected, atol=1e-5)
    assert (
        stores["milvus"].get_collection("c-flat").count == stores["local"].get_collection("c-flat").count == len(truth)
    )


@pytest.mark.parametrize("preset", ["ivf", "hnsw"])
def test_ann_presets_recall_at_10_on_milvus(loaded, preset):
    stores, truth = loaded
    info = stores["milvus"].get_collection(f"c-{preset}")
    assert info.count == len(truth)
    found = ids_of(stores["milvus"].search(f"c-{preset}", QUERIES, SearchOptions(10)))
    r = recall(found, brute_force(truth, QUERIES, 10))
    assert r >= 0.95, f"{preset} recall@10 {r:.3f} ({info.index_factory})"


@pytest.mark.skipif(bool(SERVER_URI), reason="about Milvus Lite; a Milvus server builds IVF_PQ")
def test_ivfpq_is_refused_by_milvus_lite_naming_what_it_supports(tmp_path):
    store = open_backend("milvus", tmp_path)
    assert isinstance(store, MilvusStore) and store.lite
    with pytest.raises(EmbedsvcError) as refused:
        store.create_collection(CollectionConfig("pq", DIM, index="ivfpq"))
    assert type(refused.value).__name__ == "FailedPrecondition"
    assert "'ivfpq'" in str(refused.value) and "flat, ivf, hnsw" in str(refused.value)
    assert store.list_collections() == []
    store.close()


FILTERS = [
    Filter((Condition("group", equals=3),)),
    Filter((Condition("group", equals=3.0),)),
    Filter((Condition("even", equals=True),)),
    Filter((Condition("even", equals=1),)),  # a number never equals a boolean
    Filter((Condition("name", equals="n2"),)),
    Filter((Condition("group", any_of=(1, 7, "3", True)),)),
    Filter((Condition("group", any_of=(1, 7)), Condition("even", equals=False))),
    Filter((Condition("score", gte=1.5, lte=4.0),)),
    Filter((Condition("score", gte=5.0),)),
    Filter((Condition("score", lte=0.0),)),
    Filter((Condition("score", gte=float("-inf"), lte=float("inf")),)),
    Filter((Condition("score", gte=float("nan")),)),
    Filter((Condition("score", gt=1.5, lt=4.0),)),  # exclusive bounds: 1.5 and 4.0 are stored, and left out
    Filter((Condition("score", gt=1.5), Condition("score", lte=4.0))),
    Filter((Condition("score", gt=5.5),)),
    Filter((Condition("score", lt=0.5),)),
    Filter((Condition("score", gt=float("-inf"), lt=float("inf")),)),
    Filter((Condition("score", lt=float("nan")),)),
    Filter((Condition("even", gt=0),)),
    Filter((Condition("even", gte=0, lte=1),)),  # ranges are numeric: booleans never match
    Filter((Condition("name", gte=0),)),  # nor strings
    Filter((Condition("mixed", equals=1),)),
    Filter((Condition("mixed", equals=True),)),
    Filter((Condition("mixed", equals="1"),)),
    Filter((Condition("mixed", any_of=(True, "1")),)),
    Filter((Condition("absent", equals=1),)),
    Filter((Condition("group", equals=99),)),
    Filter(()),
]


@pytest.mark.parametrize("flt", FILTERS, ids=[repr(f.must)[:60] for f in FILTERS])
def test_filters_agree_across_backends(loaded, flt):
    """Same hits and scores; a filter no stored value's type can match is refused by both, with one message."""
    stores, truth = loaded
    refusals = {}
    for backend in BACKENDS:
        try:
            stores[backend].search("c-flat", QUERIES[:10], SearchOptions(10, flt))
        except InvalidInput as exc:
            refusals[backend] = str(exc)
    if refusals:
        assert set(refusals) == set(BACKENDS) and len(set(refusals.values())) == 1, refusals
        assert "every stored" in next(iter(refusals.values()))
        return
    local, milvus = (stores[b].search("c-flat", QUERIES[:10], SearchOptions(10, flt)) for b in BACKENDS)
    assert ids_of(local) == ids_of(milvus)
    for a, b in zip(local, milvus):
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    keep = {i for i in truth if flt.matches(metadata(int(i.split("-")[1])))}
    assert (
        ids_of(milvus) == brute_force({i: truth[i] for i in keep}, QUERIES[:10], 10)
        if keep
        else ids_of(milvus) == [[]] * 10
    )


def test_both_backends_name_the_filter_keys_no_item_holds(loaded):
    """A key no live item holds (a typo, or `sort_order>` read as a key) is reported, whatever its type would be;
    keys held by deleted items only count as missing."""
    stores, _ = loaded
    keys = ["group", "even", "name", "mixed", "sort_order>", "absent", HOSTILE_KEYS[1], 'k"] or exists x']
    for store in stores.values():
        assert store.missing_keys("c-flat", keys) == ["sort_order>", "absent", 'k"] or exists x']
        store.create_collection(CollectionConfig("gone-keys", DIM))
        store.upsert("gone-keys", [Item("a", VECTORS[0], {"only": 1}), Item("b", VECTORS[1], {"kept": "x"})])
        store.delete("gone-keys", ["a"])
        assert store.missing_keys("gone-keys", ["only", "kept"]) == ["only"]
        store.drop_collection("gone-keys")


@pytest.mark.parametrize("key", HOSTILE_KEYS)
@pytest.mark.parametrize("value", [*HOSTILE_VALUES, "' or 1==1", 'n1" or "1"=="1'])
def test_filter_injection_matches_literally(loaded, key, value):
    """Hostile keys and values (quotes, brackets, &&, or, escapes, template braces) match only themselves."""
    stores, _ = loaded
    live = [metadata(i) for i in range(SMALL) if i % 5]
    for flt in (
        Filter((Condition(key, equals=value),)),
        Filter((Condition(key, any_of=(value, "no such")),)),
        Filter((Condition(key, equals=value), Condition("even", equals=True))),
    ):
        local, milvus = (ids_of(stores[b].search("c-hostile", QUERIES[:5], SearchOptions(20, flt))) for b in BACKENDS)
        assert local == milvus
        assert all(bool(hits) == any(flt.matches(m) for m in live) for hits in milvus)  # the pairs stored are found


@contextlib.contextmanager
def type_checks(store):
    """The filters of the type-check queries `store` (Milvus) makes meanwhile (the catalogue's reads are others)."""
    asked: list[str] = []
    real_query = store.client.query

    def query(*args, **kwargs):
        if "exists filterable" in kwargs.get("filter", ""):
            asked.append(kwargs["filter"])
        return real_query(*args, **kwargs)

    store.client.query = query
    try:
        yield asked
    finally:
        store.client.query = real_query


def test_a_search_with_hits_asks_milvus_nothing_more(loaded):
    """A filter's type check (a Milvus query, a scan of every item's JSON) runs only when the search found nothing:
    a hit satisfies every condition. A mistyped filter, which finds nothing, is still refused."""
    store = loaded[0]["milvus"]
    with type_checks(store) as asked:
        flt = Filter((Condition("group", equals=3), Condition("even", equals=False)))
        assert all(store.search("c-flat", QUERIES[:3], SearchOptions(5, flt)))
        assert asked == []
        with pytest.raises(InvalidInput, match="every stored"):
            store.search("c-flat", QUERIES[:3], SearchOptions(5, Filter((Condition("group", equals="3"),))))
        assert asked


@pytest.mark.parametrize(
    "condition, most",
    [
        (Condition("absent", equals=1), 2),  # the wanted kind, then the others together: no key, no refusal
        (Condition("group", any_of=(99, "x", True)), 1),  # the three wanted kinds together: held
        (Condition("group", gte=1000), 1),  # a range asks for numbers: held
    ],
    ids=["missing key", "mixed any-of", "range"],
)
def test_a_search_that_finds_nothing_asks_each_condition_once_or_twice(loaded, condition, most):
    """Kinds are asked together (each question a query: on a Milvus server each also waits for Strong
    consistency); one by one only to word a refusal. The answer is the local store's."""
    stores, _ = loaded
    flt = Filter((condition,))
    with type_checks(stores["milvus"]) as asked:
        assert stores["milvus"].search("c-flat", QUERIES[:2], SearchOptions(5, flt)) == [[], []]
    assert len(asked) <= most, asked
    assert stores["local"].search("c-flat", QUERIES[:2], SearchOptions(5, flt)) == [[], []]


def test_hostile_ids_get_and_delete_only_themselves(tmp_path):
    hostile = ['a" or id != "', "b' || true", 'c"] or [', "d\\", 'e\\"', "f\nnewline", "{p0}", "plain"]
    results = {}
    for backend in BACKENDS:
        store = open_backend(backend, tmp_path)
        store.create_collection(CollectionConfig("ids", 4))
        store.upsert(
            "ids", [Item(i, np.eye(4, dtype=np.float32)[n % 4] + 0.1, {"n": n}) for n, i in enumerate(hostile)]
        )
        found, missing = store.get("ids", [hostile[0], 'zz" or id != "', hostile[2]])
        deleted = store.delete("ids", ['x" or id != "', hostile[1]])
        results[backend] = (
            [i.id for i in found],
            missing,
            deleted,
            store.get_collection("ids").count,
            sorted(i.id for i in store.get("ids", hostile)[0]),
        )
        store.close()
    assert results["local"] == results["milvus"]
    assert results["milvus"][3] == len(hostile) - 1


def test_items_get_exclude_and_vectors_agree(loaded):
    stores, truth = loaded
    out = {}
    for backend in BACKENDS:
        store = stores[backend]
        found, missing = store.get("c-flat", ["item-1", "item-0", "item-2", "item-1"], include_vectors=True)
        vector = store.vector_of("c-flat", "item-11")
        like = store.search("c-flat", vector[None], SearchOptions(5, include_vectors=True), exclude_ids=["item-11"])
        out[backend] = (found, missing, vector, like)
    (lf, lm, lv, ll), (mf, mm, mv, ml) = out["local"], out["milvus"]
    assert [i.id for i in lf] == [i.id for i in mf] == ["item-1", "item-2", "item-1"] and lm == mm == ["item-0"]
    assert [i.metadata for i in lf] == [i.metadata for i in mf]
    assert all(np.allclose(a.vector, b.vector, atol=1e-6) for a, b in zip(lf, mf))
    assert np.allclose(lv, mv, atol=1e-6)
    assert ids_of(ll) == ids_of(ml) and "item-11" not in ids_of(ml)[0]
    assert all(np.allclose(a.vector, b.vector, atol=1e-6) for a, b in zip(ll[0], ml[0]))


ZERO_QUERY_FILTERS = [None, Filter((Condition("k", equals=1),)), Filter((Condition("k", equals="1"),))]


def test_no_queries_answer_alike_on_both_backends(tmp_path):
    """An empty query matrix (the store API allows it; the engine refuses it earlier) is no results, or the mistyped
    filter's refusal, on both back ends: Milvus is not asked to search nothing (pymilvus fails on it, untyped)."""
    outcomes = {}
    for backend in BACKENDS:
        store = open_backend(backend, tmp_path)
        store.create_collection(CollectionConfig("e", DIM))
        store.upsert("e", [Item("a", VECTORS[0], {"k": 1})])
        found = []
        for flt in ZERO_QUERY_FILTERS:
            try:
                found.append(store.search("e", QUERIES[:0], SearchOptions(3, flt)))
            except EmbedsvcError as exc:
                found.append(f"{type(exc).__name__}: {exc}")
        outcomes[backend] = found
        store.close()
    assert outcomes["milvus"] == outcomes["local"]
    assert outcomes["local"][:2] == [[], []] and "every stored" in outcomes["local"][2]


def _error_of(call) -> str:
    try:
        call()
    except EmbedsvcError as exc:
        return type(exc).__name__
    return "no error"


ERROR_CASES = {
    "unknown collection get_collection": lambda s: s.get_collection("nope"),
    "unknown collection search": lambda s: s.search("nope", QUERIES[:1], SearchOptions(5)),
    "unknown collection upsert": lambda s: s.upsert("nope", [Item("a", VECTORS[0])]),
    "unknown collection delete": lambda s: s.delete("nope", ["a"]),
    "unknown collection get": lambda s: s.get("nope", ["a"]),
    "unknown collection drop": lambda s: s.drop_collection("nope"),
    "unknown collection pooling_state": lambda s: s.pooling_state("nope"),
    "duplicate collection": lambda s: s.create_collection(CollectionConfig("e", DIM)),
    "bad collection name": lambda s: s.create_collection(CollectionConfig("bad name!", DIM)),
    "unknown metric": lambda s: s.create_collection(CollectionConfig("m", DIM, metric="l2")),
    "bad index string": lambda s: s.create_collection(CollectionConfig("m", DIM, index="NoSuchIndex,,")),
    "wrong dimension": lambda s: s.upsert("e", [Item("a", VECTORS[0][:5])]),
    "nan vector": lambda s: s.upsert("e", [Item("a", np.full(DIM, np.nan, np.float32))]),
    "zero vector": lambda s: s.upsert("e", [Item("a", np.zeros(DIM, np.float32))]),
    "empty id": lambda s: s.upsert("e", [Item("", VECTORS[0])]),
    "long id": lambda s: s.upsert("e", [Item("x" * 600, VECTORS[0])]),
    "bad metadata": lambda s: s.upsert("e", [Item("a", VECTORS[0], {"k": [1, 2]})]),
    "insert_only existing": lambda s: s.upsert("e", [Item("have", VECTORS[1])], insert_only=True),
    "strict delete missing": lambda s: s.delete("e", ["have", "missing"], strict=True),
    "top_k zero": lambda s: s.search("e", QUERIES[:1], SearchOptions(0)),
    "top_k too large": lambda s: s.search("e", QUERIES[:1], SearchOptions(5000)),
    "query dimension": lambda s: s.search("e", QUERIES[:1, :5], SearchOptions(3)),
    "missing vector_of": lambda s: s.vector_of("e", "missing"),
    "fit a non-empty collection": lambda s: s.set_pooling_state("e", b"state"),
    "stale pooling version": lambda s: s.upsert("e", [Item("b", VECTORS[2])], pooling_version=7),
}


def test_errors_are_the_same_classes_on_both_backends(tmp_path):
    outcomes = {}
    for backend in BACKENDS:
        store = open_backend(backend, tmp_path)
        store.create_collection(CollectionConfig("e", DIM))
        store.upsert("e", [Item("have", VECTORS[0])])
        outcomes[backend] = {case: _error_of(functools.partial(call, store)) for case, call in ERROR_CASES.items()}
        assert store.get_collection("e").count == 1  # nothing refused was written
        store.close()
    assert outcomes["local"] == outcomes["milvus"]
    assert "no error" not in outcomes["milvus"].values(), outcomes["milvus"]
    assert outcomes["milvus"]["stale pooling version"] == Aborted.__name__


LONG_ID = "x" * 500  # storable (ids take up to 512 bytes), but too long to quote whole in a status message


@pytest.mark.parametrize(
    "call",
    [lambda s: s.delete("e", [LONG_ID], strict=True), lambda s: s.vector_of("e", LONG_ID)],
    ids=["strict delete", "vector_of"],
)
def test_messages_quote_user_input_alike_on_both_backends(tmp_path, call):
    """Both back ends quote ids with errors.quoted: cut to QUOTE_LIMIT characters with the full length."""
    messages = {}
    for backend in BACKENDS:
        store = open_backend(backend, tmp_path)
        store.create_collection(CollectionConfig("e", DIM))
        with pytest.raises(EmbedsvcError) as caught:
            call(store)
        messages[backend] = str(caught.value)
        store.close()
    assert messages["milvus"] == messages["local"]
    assert "(500 characters)" in messages["milvus"] and LONG_ID not in messages["milvus"], messages


def test_uid_pooling_state_and_versions(tmp_path):
    store = open_backend("milvus", tmp_path)
    first = store.create_collection(CollectionConfig("v", DIM))
    assert first.uid and first.pooling_version == 0 and store.pooling_state("v") is None
    big = bytes(range(256)) * 1000  # several catalogue chunks
    assert store.set_pooling_state("v", big) == 1
    assert store.pooling_state("v") == big
    assert store.set_pooling_state("v", b"second") == 2 and store.pooling_state("v") == b"second"
    store.upsert("v", [Item("a", VECTORS[0])], pooling_version=2)
    with pytest.raises(Aborted):
        store.upsert("v", [Item("b", VECTORS[1])], pooling_version=1)
    assert store.get("v", ["b"])[1] == ["b"]
    assert store.drop_collection("v") == 1
    again = store.create_collection(CollectionConfig("v", DIM))
    assert again.uid != first.uid and again.pooling_version == 0 and again.count == 0
    assert store.pooling_state("v") is None
    store.close()
    reopened = open_backend("milvus", tmp_path)  # nothing lives in the process: a new one sees it all
    assert [(c.config.name, c.uid) for c in reopened.list_collections()] == [("v", again.uid)]
    reopened.close()


def test_bound_expressions_carry_no_user_text():
    """The Milvus-server path (templates; Milvus Lite has none, so it is not run end to end here): every value is
    a parameter, every key hex, so the expression text is the same whatever the user sent."""
    from embedsvc.store.milvus_filter import Expression

    flt = Filter(
        (
            Condition(HOSTILE_KEYS[0], equals=HOSTILE_VALUES[0]),
            Condition("n", any_of=(1, True, "x")),
            Condition("r", gte=1, lte=2.5),
        )
    )
    expr = Expression(bind=True)
    text = expr.filter(flt)
    assert re.fullmatch(r'[a-z0-9_\[\]"{}=<> ()]+', text), text  # hex keys, placeholders, operators only
    assert expr.params == {"p0": HOSTILE_VALUES[0], "p1": 1.0, "p2": True, "p3": "x", "p4": 1.0, "p5": 2.5}
    assert text.count("{p") == 6 and " or " in text


@pytest.mark.parametrize(
    "version, templates",
    [
        ("v2.3.5-lite", False),  # the `milvus` package's embedded server
        ("v2.4.9", False),
        ("v2.5.0", True),
        ("v2.5.14", True),
        ("2.6.1", True),
        ("v3.0.0-beta", True),
        ("milvus_lite 3.2.2", False),
        ("master-20261201-abcdef", True),  # a development build: today's servers have them
    ],
)
def test_templates_are_used_only_where_the_server_has_them(version, templates):
    """Filter templates came with Milvus 2.5; an older server rejects `{p0}` ('cannot parse expression'), so it
    gets escaped literals, as Milvus Lite does (run end to end with EMBEDSVC_TEST_MILVUS_URI on a 2.3 server)."""
    from embedsvc.store.milvus_filter import templates_supported

    assert templates_supported(version) is templates


@pytest.mark.parametrize("backend", ["local", "milvus"])
def test_a_fit_for_a_dropped_incarnation_is_refused(tmp_path, backend):
    """A FitPooling that started before a drop and re-create must not install its codebook on the new
    collection (whose name it shares): the state names the incarnation it was fitted for."""
    store = open_backend(backend, tmp_path)
    old = store.create_collection(CollectionConfig("v", DIM))
    store.drop_collection("v")
    new = store.create_collection(CollectionConfig("v", DIM))
    with pytest.raises(Aborted):
        store.set_pooling_state("v", b"fitted for the old one", uid=old.uid)
    assert store.pooling_state("v") is None and store.get_collection("v").pooling_version == 0
    assert store.set_pooling_state("v", b"fitted for this one", uid=new.uid) == 1
    store.close()
