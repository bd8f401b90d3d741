"""Writes tests/data/store-format1: a data directory of the first store format (vectors in the items table,
whole FAISS indexes in the checkpoints), made by the code of commit aed62a4, for test_store_scale.py.

    git archive aed62a4 embedsvc | tar -x -C /tmp/format1
    PYTHONPATH=/tmp/format1 python tests/data/make_store_format1.py tests/data/store-format1

The items are a pure function of their number (`item`), so the test knows what must come back.
"""

from __future__ import annotations

import sys

import numpy as np

DIM = 8
COLLECTIONS = {"flat": "flat", "graph": "hnsw", "empty": "flat"}


def item(i: int, version: int = 0) -> tuple[str, np.ndarray, dict]:
    v = np.random.default_rng([i, version]).standard_normal(DIM).astype(np.float32)
    return f"id-{i}", v / np.linalg.norm(v), {"group": i % 5, "name": f"n{i}", "version": version}


def main(path: str) -> None:
    from embedsvc.store import CollectionConfig, Item, LocalStore

    store = LocalStore(path, checkpoint_every=10**9)
    for name, index in COLLECTIONS.items():
        store.create_collection(CollectionConfig(name, DIM, index=index))
    for name in ("flat", "graph"):
        store.upsert(name, [Item(*item(i)) for i in range(200)])
        store.checkpoint(name)  # the checkpoint covers these; what follows is in the log only
        store.upsert(name, [Item(*item(i, 1)) for i in range(40)])  # replaced
        store.delete(name, [item(i)[0] for i in range(40, 60)])
        store.upsert(name, [Item(*item(i)) for i in range(200, 230)])
    store.close(checkpoint=False)


if __name__ == "__main__":
    main(sys.argv[1])
