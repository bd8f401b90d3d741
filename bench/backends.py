"""Store back ends side by side in one run: local (SQLite + FAISS), Milvus Lite (through MilvusStore), bare FAISS.

    python bench/backends.py [--n 100000] [--dim 512] [--searches 200] [--preset flat] [--milvus-uri URL] [--threads 1]

Upsert: vectors/s in batches of 1000 with metadata (validation and the durable write included; bare FAISS is
an in-memory add). Search: single-query top-10 latency p50/p99, plain and with a filter keeping ~10% of the
items (`group == 3` of ten groups; bare FAISS gets the allowed ids as an IDSelectorBatch). Milvus Lite is a
local, single-process stand-in for a Milvus server: see docs/scaling.md for what a cluster changes.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_bench import clustered, percentiles

BATCH = 1000
GROUPS = 10


def timed_searches(search, queries: np.ndarray) -> tuple[float, float]:
    latencies = []
    for q in queries:
        started = time.perf_counter()
        search(q)
        latencies.append(time.perf_counter() - started)
    return percentiles(latencies)


def bare_faiss(preset: str, vectors: np.ndarray, groups: np.ndarray, queries: np.ndarray) -> dict:
    import faiss

    from embedsvc.store.indexes import INDEX_PRESETS, hnsw_ef_search

    n, dim = vectors.shape
    index = (
        faiss.IndexIDMap2(faiss.index_factory(dim, INDEX_PRESETS[preset].factory(dim, n), faiss.METRIC_INNER_PRODUCT))
        if preset in ("flat", "hnsw")
        else faiss.index_factory(dim, INDEX_PRESETS[preset].factory(dim, n), faiss.METRIC_INNER_PRODUCT)
    )
    started = time.perf_counter()
    if not index.is_trained:
        index.train(vectors)
    for start in range(0, n, BATCH):
        index.add_with_ids(vectors[start : start + BATCH], np.arange(start, min(n, start + BATCH), dtype=np.int64))
    add_rate = n / (time.perf_counter() - started)
    allowed = np.flatnonzero(groups == 3).astype(np.int64)
    hnsw = preset == "hnsw"

    def params(selector=None):
        p = faiss.SearchParametersHNSW(efSearch=hnsw_ef_search(n)) if hnsw else faiss.SearchParameters()
        if selector is not None:
            p.sel = selector
        return p

    selector = faiss.IDSelectorBatch(allowed)
    plain = timed_searches(lambda q: index.search(q[None], 10, params=params()), queries)
    filtered = timed_searches(lambda q: index.search(q[None], 10, params=params(selector)), queries)
    return {"add": add_rate, "plain": plain, "filtered": filtered, "seal": 0.0}


def through_store(store, preset: str, vectors: np.ndarray, groups: np.ndarray, queries: np.ndarray) -> dict:
    from embedsvc.store import CollectionConfig, Condition, Filter, Item, SearchOptions

    n, dim = vectors.shape
    store.create_collection(CollectionConfig("bench", dim, index=preset))
    started = time.perf_counter()
    for start in range(0, n, BATCH):
        store.upsert(
            "bench",
            [
                Item(f"v{i}", vectors[i], {"group": int(groups[i]), "tag": f"t{i % 100}"})
                for i in range(start, min(n, start + BATCH))
            ],
        )
    add_rate = n / (time.perf_counter() - started)
    started = time.perf_counter()
    store.checkpoint("bench")  # local: FAISS checkpoint; Milvus: flush, sealing the data into indexed segments
    seal = time.perf_counter() - started
    flt = Filter((Condition("group", equals=3),))
    plain = timed_searches(lambda q: store.search("bench", q[None], SearchOptions(10)), queries)
    filtered = timed_searches(lambda q: store.search("bench", q[None], SearchOptions(10, flt)), queries)
    return {"add": add_rate, "plain": plain, "filtered": filtered, "seal": seal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--searches", type=int, default=200)
    parser.add_argument("--preset", default="flat", choices=["flat", "ivf", "hnsw"])
    parser.add_argument("--milvus-uri", default="", help="a Milvus server to use instead of a Milvus Lite file")
    parser.add_argument("--threads", type=int, default=1, help="FAISS OpenMP threads (1: single queries don't spin)")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)

    from embedsvc.store import open_store

    vectors = clustered(args.n, args.dim, 0)
    queries = clustered(args.searches, args.dim, 1)
    groups = np.random.default_rng(2).integers(0, GROUPS, args.n)
    rows = {}
    print(
        f"# {args.n:,} x {args.dim}, preset {args.preset}, {args.searches} single-query top-10 searches each; "
        f"filter keeps {np.mean(groups == 3):.1%}; {platform.machine()}, {platform.python_version()}\n"
    )
    print(
        "| back end | upsert vectors/s | checkpoint / flush s | search p50 ms | p99 ms | filtered p50 ms | "
        "filtered p99 ms |"
    )
    print("|---|---|---|---|---|---|---|", flush=True)

    def report(name: str, row: dict) -> None:
        rows[name] = row
        print(
            f"| {name} | {row['add']:,.0f} | {row['seal']:.1f} | {row['plain'][0]:.2f} | {row['plain'][1]:.2f} | "
            f"{row['filtered'][0]:.2f} | {row['filtered'][1]:.2f} |",
            flush=True,
        )

    with tempfile.TemporaryDirectory() as tmp:
        report("bare FAISS", bare_faiss(args.preset, vectors, groups, queries))
        local = open_store("local", data_dir=f"{tmp}/local")
        report("local (SQLite + FAISS)", through_store(local, args.preset, vectors, groups, queries))
        local.close()
        milvus = open_store("milvus", milvus_uri=args.milvus_uri or f"{tmp}/milvus.db")
        label = "Milvus server" if args.milvus_uri else "Milvus Lite (file)"
        report(label, through_store(milvus, args.preset, vectors, groups, queries))
        milvus.drop_collection("bench")
        milvus.close()
    print()
    base = rows["local (SQLite + FAISS)"]
    for name, row in rows.items():
        add, plain = row["add"] / base["add"], row["plain"][0] / base["plain"][0]
        filtered = row["filtered"][0] / base["filtered"][0]
        print(f"{name}: upsert {add:.2f}x local, search p50 {plain:.2f}x local, filtered p50 {filtered:.2f}x local")


if __name__ == "__main__":
    main()
