"""Dynamic batching: 32 concurrent clients sending single-text Embed calls vs the same calls one at a time.

    python bench/embed_batching.py [--requests 640] [--concurrency 32] [-- extra `embedsvc serve` flags]

Starts `embedsvc serve` (bundled model unless flags say otherwise) on a free local port, sends the
same texts sequentially and then concurrently, prints throughput, p50/p99 latency and their ratio,
and checks that every batched vector equals its unbatched one.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import time

import grpc
import numpy as np
from common import start_server

from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc


async def one(stub, text: str) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    response = await stub.Embed(pb.EmbedRequest(inputs=[pb.Content(text=text)]), timeout=60)
    return np.array(response.results[0].embeddings[0].vector.values, dtype=np.float32), time.perf_counter() - started


async def run(address: str, texts: list[str], concurrency: int):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.EmbedServiceStub(channel)
        await one(stub, "warm up")
        started = time.perf_counter()
        sequential = [await one(stub, t) for t in texts]
        sequential_s = time.perf_counter() - started

        queue = list(enumerate(texts))
        results: dict[int, tuple] = {}

        async def worker():
            while queue:
                i, text = queue.pop()
                results[i] = await one(stub, text)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        concurrent_s = time.perf_counter() - started
    return sequential, sequential_s, [results[i] for i in range(len(texts))], concurrent_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=32)
    args, extra = parser.parse_known_args()
    extra = [x for x in extra if x != "--"]
    from embedsvc.datasets import full_caption, generate_scene

    texts = [full_caption(generate_scene("test", i)) for i in range(args.requests)]
    with tempfile.TemporaryDirectory() as data_dir:
        proc, address = start_server(extra, data_dir)
        try:
            sequential, seq_s, batched, conc_s = asyncio.run(run(address, texts, args.concurrency))
        finally:
            proc.terminate()
            proc.wait(30)
    diff = max(float(np.abs(a[0] - b[0]).max()) for a, b in zip(sequential, batched))

    def lat(rs):
        return np.percentile([r[1] * 1000 for r in rs], [50, 99])

    (s50, s99), (c50, c99) = lat(sequential), lat(batched)
    print(
        f"# dynamic batching: {args.requests} single-text Embed calls, machine={platform.machine()} "
        f"server flags={' '.join(extra) or '(defaults)'}"
    )
    print("| mode | requests/s | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    print(f"| sequential (1 client) | {args.requests / seq_s:.1f} | {s50:.2f} | {s99:.2f} |")
    print(f"| concurrent ({args.concurrency} clients) | {args.requests / conc_s:.1f} | {c50:.2f} | {c99:.2f} |")
    print(f"throughput ratio concurrent/sequential: {seq_s / conc_s:.2f}x")
    verdict = "equal within 1e-5" if diff < 1e-5 else "DIFFERENT"
    print(f"max |batched - unbatched| over all vectors: {diff:.2e} ({verdict})")


if __name__ == "__main__":
    main()
