"""What a filter's type check costs a Milvus search that finds something, on Milvus Lite: each filtered search
used to ask Milvus first whether the filter's key holds a value of its type (a query scanning every item's JSON);
now it asks only when the search found nothing. Paired, alternating: the check then the search (as before) against
the search alone (now), on the same store.

    python bench/milvus_filter_check.py [--n 10000] [--searches 40] [--milvus-uri URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedsvc.store import CollectionConfig, Condition, Filter, Item, SearchOptions, open_store
from embedsvc.store.milvus import MilvusStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--searches", type=int, default=40)
    parser.add_argument("--milvus-uri", default="", help="a Milvus server instead of a Milvus Lite file")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="embedsvc-filter-check-")
    store = open_store("milvus", milvus_uri=args.milvus_uri or f"{folder}/milvus.db")
    assert isinstance(store, MilvusStore)  # its type check is what is timed
    rng = np.random.default_rng(0)
    name = f"filter_check_{int(time.time())}"
    store.create_collection(CollectionConfig(name, 64))
    for start in range(0, args.n, 1000):
        ids = range(start, min(args.n, start + 1000))
        store.upsert(name, [Item(f"i{i}", rng.standard_normal(64).astype("f4"), {"group": i % 10}) for i in ids])
    store.checkpoint(name)
    query = rng.standard_normal((1, 64)).astype("f4")
    flt = Filter((Condition("group", equals=3),))  # keeps 10% of the items
    record = store._record(name)
    before: list[float] = []
    now: list[float] = []
    for k in range(args.searches):
        for times in (now, before) if k % 2 else (before, now):
            started = time.perf_counter()
            if times is before:
                store._check_filter_types(record, flt)
            if not store.search(name, query, SearchOptions(10, flt))[0]:
                raise SystemExit("the filtered search found nothing: the figure would not be the one described")
            times.append(time.perf_counter() - started)
    store.drop_collection(name)
    store.close()
    b, n = statistics.median(before) * 1000, statistics.median(now) * 1000
    print(
        f"{args.n:,} items, top-10 with a 10% filter, {args.searches} searches each, p50: check then search "
        f"(before) {b:.1f} ms, search alone (now) {n:.1f} ms = {n / b:.2f}x"
    )


if __name__ == "__main__":
    main()
