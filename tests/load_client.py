"""A load-generating client process for fault and soak tests: mixed upsert/delete/search/embed on
127.0.0.1, bounded in time; prints one JSON line per acknowledged write and a final summary."""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from embedsvc.client import Client, EmbedsvcClientError, Item

DIM = 8


def vector(key: str, version: int) -> np.ndarray:
    return np.random.default_rng([abs(hash(key)) % (2**31), version]).standard_normal(DIM).astype(np.float32)


def main(address: str, worker: int, seconds: float, embed: bool) -> None:
    rng = np.random.default_rng(worker)
    counts = {"requests": 0, "errors": 0}
    deadline = time.monotonic() + seconds
    with Client(address, timeout=20) as client:
        while time.monotonic() < deadline:
            op = rng.random()
            ids = [f"w{worker}-{int(i)}" for i in rng.choice(200, size=int(rng.integers(1, 10)), replace=False)]
            try:
                if op < 0.45:
                    version = int(rng.integers(1, 1 << 30))
                    print(json.dumps({"begin": "upsert", "ids": ids, "v": version}), flush=True)
                    client.upsert("load", [Item(i, vector=vector(i, version),
                                                metadata={"v": version}) for i in ids])
                    print(json.dumps({"ack": "upsert", "ids": ids, "v": version}), flush=True)
                elif op < 0.6:
                    print(json.dumps({"begin": "delete", "ids": ids}), flush=True)
                    client.delete("load", ids)
                    print(json.dumps({"ack": "delete", "ids": ids}), flush=True)
                elif op < 0.9 or not embed:
                    client.search("load", vector=rng.standard_normal(DIM), top_k=5)
                else:
                    client.embed(["a small red circle in the top left"])
                counts["requests"] += 1
            except EmbedsvcClientError as exc:
                counts["errors"] += 1
                print(json.dumps({"error": str(exc)}), flush=True)
                if exc.code.name == "UNAVAILABLE":
                    break
    print(json.dumps({"summary": counts}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1")
