"""Search by vector over gRPC next to bare FAISS on the same vectors, unfiltered and with a 10% filter.

    python bench/search.py [--n 100000] [--dim 512] [--index flat] [--slice 3] [--reps 3]

A vector-only collection on `embedsvc serve` and a bare FAISS index of the same type hold the same
clustered vectors; every tenth item has metadata g=0 (10% selectivity). Single-query top-10 searches
alternate between the two in slices of --slice seconds, --reps rounds; bare FAISS's filtered search uses
a selector built once, before timing. Printed: p50/p99 per system, the gRPC-minus-FAISS p50 gap and the
ratio as median (min-max) of the rounds. Hits come back without metadata, as from FAISS.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

from embedsvc.cpu import apply_openmp_defaults

apply_openmp_defaults()  # before numpy loads OpenMP: hence the imports after it (E402)

import numpy as np  # noqa: E402
from common import alternate, ms, ratio_summary, start_server  # noqa: E402

from embedsvc.client import Client, Item  # noqa: E402


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim)).astype(np.float32)
    x = centres[rng.integers(0, 256, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn, queries: np.ndarray, seconds: float):
    latencies: list[float] = []
    i = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or not latencies:
        t = time.perf_counter()
        fn(queries[i % len(queries)])
        latencies.append(time.perf_counter() - t)
        i += 1
    return statistics.median(latencies), latencies


def main() -> None:
    import faiss

    from embedsvc.store.indexes import INDEX_PRESETS, hnsw_ef_search

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--index", default="flat", choices=("flat", "hnsw"))
    parser.add_argument("--slice", type=float, default=3.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    vectors, queries = clustered(args.n, args.dim, 0), clustered(200, args.dim, 1)
    group = np.arange(args.n) % 10
    bare = faiss.index_factory(
        args.dim, INDEX_PRESETS[args.index].factory(args.dim, args.n), faiss.METRIC_INNER_PRODUCT
    )
    bare.add(vectors)
    selected = np.flatnonzero(group == 0).astype(np.int64)
    ef = hnsw_ef_search(args.n)
    params = {"flat": faiss.SearchParameters, "hnsw": lambda: faiss.SearchParametersHNSW(efSearch=ef)}
    plain, filtered = params[args.index](), params[args.index]()
    selector = faiss.IDSelectorBatch(selected)  # built once: the best a bare caller can do
    filtered.sel = selector
    with tempfile.TemporaryDirectory() as folder:
        proc, address = start_server([], folder + "/data")
        try:
            with Client(address, timeout=600) as client:
                client.create_collection("v", dim=args.dim, index=args.index)
                client.upsert(
                    "v",
                    (Item(f"i{i}", vector=vectors[i], metadata={"g": int(group[i])}) for i in range(args.n)),
                    batch_size=1000,
                )
                systems = {
                    "faiss": lambda: timed(lambda q: bare.search(q[None], 10, params=plain), queries, args.slice),
                    "grpc": lambda: timed(
                        lambda q: client.search("v", vector=q, top_k=10, include_metadata=False), queries, args.slice
                    ),
                    "faiss 10%": lambda: timed(
                        lambda q: bare.search(q[None], 10, params=filtered), queries, args.slice
                    ),
                    "grpc 10%": lambda: timed(
                        lambda q: client.search("v", vector=q, top_k=10, filter={"g": 0}, include_metadata=False),
                        queries,
                        args.slice,
                    ),
                }
                runs = alternate(systems, args.reps)
        finally:
            proc.terminate()
            proc.wait(60)
    print(
        f"# search: {args.n} x {args.dim} {args.index}, top-10, machine={platform.machine()} "
        f"cpus={len(os.sched_getaffinity(0))} faiss threads={faiss.omp_get_max_threads()}, "
        f"slice {args.slice}s x {args.reps}"
    )
    print("| search | FAISS p50/p99 ms | gRPC p50/p99 ms | gRPC - FAISS p50 ms | gRPC/FAISS (median of rounds) |")
    print("|---|---|---|---|---|")
    for label, a, b in (("unfiltered", "faiss", "grpc"), ("filter 10%", "faiss 10%", "grpc 10%")):
        fa, gr = ms([x for _, lat in runs[a] for x in lat]), ms([x for _, lat in runs[b] for x in lat])
        gap = statistics.median([g - f for (g, _), (f, _) in zip(runs[b], runs[a])]) * 1000
        print(
            f"| {label} | {fa[0]:.2f} / {fa[1]:.2f} | {gr[0]:.2f} / {gr[1]:.2f} | {gap:+.2f} "
            f"| {ratio_summary([m for m, _ in runs[b]], [m for m, _ in runs[a]])} |"
        )


if __name__ == "__main__":
    main()
