"""What the HTTP/JSON transport costs next to gRPC, on one server, in one run.

    python bench/http_vs_grpc.py [--items 2000] [--dim 128] [--queries 300] [--batch 32] [--model ViT-B-32]

Starts a server (vector-only collection, the default model for embeds), then times the same single-query
top-10 vector search, the same one-text embed and the same embed of --batch texts over both transports, one
client connection each, requests alternating between the transports, and prints p50/p99 and the HTTP/gRPC
ratio of the p50s. Keep-alive on both: it measures the per-request framing, not connects.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def percentiles(samples: list[float]) -> tuple[float, float]:
    ms = np.array(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="texts per request of the batch embed")
    parser.add_argument(
        "--model",
        default="bundled",
        help="model of the embeds: 'bundled' (the default model) or an open_clip architecture with "
        "random weights, e.g. ViT-B-32 (the size users serve)",
    )
    args = parser.parse_args()

    import grpc
    import httpx
    from google.protobuf import json_format
    from serving import running_server  # type: ignore[attr-defined]  # tests/serving.py: first on sys.path

    from embedsvc.service.config import ServerConfig
    from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.items, args.dim)).astype(np.float32)
    queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as data:
        model = ServerConfig.default_model
        if args.model != "bundled":
            from embedsvc.models import ModelSpec, register_model

            model = register_model(
                ModelSpec(name=f"bench-{args.model}", architecture=args.model, random_init=True), replace=True
            ).name
        config = ServerConfig(
            listen="127.0.0.1:0",
            http_listen="127.0.0.1:0",
            data_dir=data,
            metrics_port=-1,
            demo_size=0,
            log_level="WARNING",
            log_format="text",
            default_model=model,
            preload_models=model,
        )
        with running_server(config) as srv:
            channel = grpc.insecure_channel(srv.address)
            index = pb_grpc.IndexServiceStub(channel)
            embed = pb_grpc.EmbedServiceStub(channel)
            index.CreateCollection(pb.CreateCollectionRequest(config=pb.CollectionConfig(name="v", dim=args.dim)))
            for start in range(0, args.items, 500):
                index.Upsert(
                    iter(
                        [
                            pb.UpsertRequest(
                                collection="v",
                                items=[
                                    pb.UpsertItem(id=str(i), vector=pb.Vector(values=vectors[i].tolist()))
                                    for i in range(start, min(args.items, start + 500))
                                ],
                            )
                        ]
                    )
                )
            requests: dict[str, list[Any]] = {
                "search": [
                    pb.SearchRequest(collection="v", top_k=10, queries=[pb.Query(vector=pb.Vector(values=q.tolist()))])
                    for q in queries
                ],
                "embed": [
                    pb.EmbedRequest(inputs=[pb.Content(text=f"a red circle number {i}")]) for i in range(args.queries)
                ],
                f"embed {args.batch}": [
                    pb.EmbedRequest(inputs=[pb.Content(text=f"a red circle number {i} {j}") for j in range(args.batch)])
                    for i in range(args.queries)
                ],
            }
            grpc_calls = {"search": index.Search, "embed": embed.Embed, f"embed {args.batch}": embed.Embed}
            http_paths = {
                "search": "/v1/collections/v/search",
                "embed": "/v1/embed",
                f"embed {args.batch}": "/v1/embed",
            }
            print(
                f"# {platform.processor() or platform.machine()}, {args.items} x {args.dim} vectors, "
                f"{args.queries} requests each, embeds by {model}"
            )
            print("| request | gRPC p50 ms | gRPC p99 ms | HTTP p50 ms | HTTP p99 ms | HTTP/gRPC p50 |")
            print("|---|---|---|---|---|---|")
            with httpx.Client(base_url=srv.http_url, timeout=60) as http:
                for name, batch in requests.items():
                    grpc_calls[name](batch[0])  # warm up both
                    http.post(
                        http_paths[name],
                        content=json_format.MessageToJson(batch[0]),
                        headers={"content-type": "application/json"},
                    ).raise_for_status()
                    g, h = [], []
                    for request in batch:
                        started = time.perf_counter()
                        grpc_calls[name](request)
                        g.append(time.perf_counter() - started)
                        body = json_format.MessageToJson(request, indent=None)
                        started = time.perf_counter()
                        http.post(
                            http_paths[name], content=body, headers={"content-type": "application/json"}
                        ).raise_for_status()
                        h.append(time.perf_counter() - started)
                    (g50, g99), (h50, h99) = percentiles(g), percentiles(h)
                    print(f"| {name} | {g50:.2f} | {g99:.2f} | {h50:.2f} | {h99:.2f} | {h50 / g50:.2f} |")
            channel.close()


if __name__ == "__main__":
    main()
