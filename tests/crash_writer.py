"""Streams upserts and deletes into a store until killed; prints each op before it and ACK after it.

Run by test_store_crash.py, which SIGKILLs it at random moments. Vectors are a pure function of
(id, version), so the test can rebuild what every acknowledged write stored.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from embedsvc.store import CollectionConfig, Item, LocalStore

DIM = 16
POOL = 400
COLLECTIONS = {"flat": "flat", "graph": "hnsw"}


def vector_for(item_id: str, version: int) -> np.ndarray:
    seed = [int.from_bytes(item_id.encode(), "little") % (2**32), version]
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def main(data_dir: str, seed: int) -> None:
    store = LocalStore(data_dir, checkpoint_every=150)  # frequent checkpoints: kills land around them too
    for name, index in COLLECTIONS.items():
        if name not in {c.config.name for c in store.list_collections()}:
            store.create_collection(CollectionConfig(name, DIM, index=index))
    rng = np.random.default_rng(seed)
    version = seed * 1_000_000
    print("READY", flush=True)
    while True:
        name = str(rng.choice(list(COLLECTIONS)))
        ids = [f"id-{int(i)}" for i in rng.choice(POOL, size=int(rng.integers(1, 25)), replace=False)]
        if rng.random() < 0.7:
            version += 1
            op = {"op": "upsert", "collection": name, "ids": ids, "version": version}
            print("BEGIN " + json.dumps(op), flush=True)
            store.upsert(name, [Item(i, vector_for(i, version), {"version": version}) for i in ids])
        else:
            op = {"op": "delete", "collection": name, "ids": ids}
            print("BEGIN " + json.dumps(op), flush=True)
            store.delete(name, ids)
        print("ACK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
