"""Store throughput and latency next to a bare FAISS index, per preset, in one run.

    python bench/store_bench.py [--n 100000] [--dim 512] [--queries 500]

Add: vectors/s through Store.upsert (validation, SQLite commit with fsync, index update) vs the same
FAISS index type's add. Search: single-query top-10 latency p50/p99 through Store.search vs FAISS.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim)).astype(np.float32)
    x = centres[rng.integers(0, 256, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def percentiles(samples: list[float]) -> tuple[float, float]:
    ms = np.array(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def bare_faiss(preset: str, vectors: np.ndarray, queries: np.ndarray, batch: int):
    import faiss

    from embedsvc.store.indexes import INDEX_PRESETS, hnsw_ef_search

    n, dim = vectors.shape
    index = faiss.index_factory(dim, INDEX_PRESETS[preset].factory(dim, n), faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    if not index.is_trained:
        index.train(vectors)
    for start in range(0, n, batch):
        index.add(vectors[start : start + batch])
    add_seconds = time.perf_counter() - started
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = max(32, ivf.nlist // 8)
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        faiss.downcast_index(index).hnsw.efSearch = hnsw_ef_search(n)
    latencies = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None], 10)
        latencies.append(time.perf_counter() - t)
    return n / add_seconds, percentiles(latencies)


def store_run(preset: str, vectors: np.ndarray, queries: np.ndarray, batch: int):
    from embedsvc.store import CollectionConfig, Item, LocalStore, SearchOptions

    n, dim = vectors.shape
    with tempfile.TemporaryDirectory() as folder:
        store = LocalStore(folder, checkpoint_every=10**9)
        store.create_collection(CollectionConfig("bench", dim, index=preset))
        started = time.perf_counter()
        for start in range(0, n, batch):
            store.upsert(
                "bench", [Item(f"item-{i}", vectors[i], {"shard": i % 16}) for i in range(start, min(n, start + batch))]
            )
        add_seconds = time.perf_counter() - started
        latencies = []
        for q in queries:
            t = time.perf_counter()
            store.search("bench", q[None], SearchOptions(10))
            latencies.append(time.perf_counter() - t)
        t = time.perf_counter()
        store.checkpoint()
        checkpoint_seconds = time.perf_counter() - t
        store.close(checkpoint=False)
    return n / add_seconds, percentiles(latencies), checkpoint_seconds


def main() -> None:
    import faiss

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--presets", default="flat,ivf,hnsw,ivfpq")
    args = parser.parse_args()
    vectors = clustered(args.n, args.dim, 0)
    queries = clustered(args.queries, args.dim, 1)
    print(
        f"# store vs bare FAISS: n={args.n} dim={args.dim} batch={args.batch} queries={args.queries} "
        f"machine={platform.machine()} cpus={faiss.omp_get_max_threads()} faiss={faiss.__version__}"
    )
    print(
        "| preset | store add/s | faiss add/s | add ratio | store p50 ms | store p99 ms | faiss p50 ms | "
        "faiss p99 ms | p50 ratio | checkpoint s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset in args.presets.split(","):
        f_rate, (f50, f99) = bare_faiss(preset, vectors, queries, args.batch)
        s_rate, (s50, s99), ckpt = store_run(preset, vectors, queries, args.batch)
        print(
            f"| {preset} | {s_rate:,.0f} | {f_rate:,.0f} | {s_rate / f_rate:.2f} | {s50:.2f} | {s99:.2f} | "
            f"{f50:.2f} | {f99:.2f} | {s50 / f50:.2f} | {ckpt:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
