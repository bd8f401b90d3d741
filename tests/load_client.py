"""A load-generating client process for fault and soak tests: mixed upsert/delete/search/embed on
127.0.0.1, bounded in time; prints one JSON line per acknowledged write and a final summary.

The address is a gRPC host:port (the Python client) or an http:// URL (the HTTP/JSON API through httpx)."""

from __future__ import annotations

import json
import sys
import time
from typing import Self

import httpx
import numpy as np

from embedsvc.client import Client, EmbedsvcClientError, Item

DIM = 8


def vector(key: str, version: int) -> np.ndarray:
    return np.random.default_rng([abs(hash(key)) % (2**31), version]).standard_normal(DIM).astype(np.float32)


class HttpWriter:
    """The Client calls load_client makes, over the HTTP/JSON API: a non-2xx answer raises with its gRPC code."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=20)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def _post(self, path: str, body: dict) -> dict:
        try:
            response = self.http.post(path, json=body)
        except httpx.TransportError as exc:  # the server died under the request: not acknowledged
            raise HttpError("UNAVAILABLE", str(exc)) from None
        if response.status_code != 200:
            raise HttpError(response.json().get("code", "UNKNOWN"), response.text)
        return response.json()

    def upsert(self, collection: str, items: list[Item]) -> None:
        self._post(
            f"/v1/collections/{collection}/items",
            {
                "items": [
                    {
                        "id": item.id,
                        "vector": {"values": [float(x) for x in item.vector]},
                        "metadata": {k: {"numberValue": v} for k, v in item.metadata.items()},
                    }
                    for item in items
                ]
            },
        )

    def delete(self, collection: str, ids: list[str]) -> None:
        self._post(f"/v1/collections/{collection}/delete", {"ids": ids})

    def search(self, collection: str, vector: np.ndarray, top_k: int) -> None:
        self._post(
            f"/v1/collections/{collection}/search",
            {"queries": [{"vector": {"values": [float(x) for x in vector]}}], "topK": top_k},
        )

    def embed(self, texts: list[str]) -> None:
        self._post("/v1/embed", {"inputs": [{"text": t} for t in texts]})


class HttpError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def main(address: str, worker: int, seconds: float, embed: bool) -> None:
    rng = np.random.default_rng(worker)
    counts = {"requests": 0, "errors": 0}
    deadline = time.monotonic() + seconds
    http = address.startswith("http")
    with HttpWriter(address) if http else Client(address, timeout=20) as client:
        while time.monotonic() < deadline:
            op = rng.random()
            ids = [f"w{worker}-{int(i)}" for i in rng.choice(200, size=int(rng.integers(1, 10)), replace=False)]
            try:
                if op < 0.45:
                    version = int(rng.integers(1, 1 << 30))
                    print(json.dumps({"begin": "upsert", "ids": ids, "v": version}), flush=True)
                    client.upsert("load", [Item(i, vector=vector(i, version), metadata={"v": version}) for i in ids])
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
            except (EmbedsvcClientError, HttpError) as exc:
                counts["errors"] += 1
                print(json.dumps({"error": str(exc)[:500]}), flush=True)
                code = exc.code if isinstance(exc, HttpError) else exc.code.name
                if code == "UNAVAILABLE":
                    break
    print(json.dumps({"summary": counts}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1")
