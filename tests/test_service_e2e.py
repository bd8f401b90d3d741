"""The product end to end: the real server with the bundled model, one collection per pooling, 500 scenes
streamed in through Upsert, held-out captions searched over the network."""

from __future__ import annotations

import io

import numpy as np
import pytest

from embedsvc.client import Client, Item
from embedsvc.datasets import full_caption, generate_scene, render_scene

POOLINGS = ["cls", "avg", "max", "gem:p=3", "netvlad:clusters=8", "spp"]
N = 500


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(make_server):
    return make_server(bundled=True)


def test_text_to_image_over_grpc_per_pooling(server):
    scenes = [generate_scene("test", i) for i in range(N)]
    images = {s.id: png(render_scene(s, 72)) for s in scenes}
    rank1 = {}
    with Client(server.address, timeout=300) as client:
        for spec in POOLINGS:
            name = "scenes-" + spec.split(":")[0]
            created = client.create_collection(name, pooling=spec)
            if created.pooling_state == "POOLING_STATE_NEEDS_FIT":
                fit_images = [png(render_scene(generate_scene("train", i), 72)) for i in range(200)]
                client.fit_pooling(name, fit_images, {"seed": 0})
            stats = client.upsert(
                name,
                (Item(s.id, image=images[s.id], metadata={"caption": full_caption(s)}) for s in scenes),
                batch_size=64,
            )
            assert stats.count == N
            hits = []
            for start in range(0, N, 100):
                hits += client.search_batch(
                    name,
                    [{"text": full_caption(s)} for s in scenes[start : start + 100]],
                    top_k=1,
                    include_metadata=False,
                )
            rank1[spec] = float(np.mean([h[0].id == s.id for h, s in zip(hits, scenes)]))
    print("\ntext->image rank-1 over gRPC, 500 held-out scenes: " + ", ".join(f"{k} {v:.3f}" for k, v in rank1.items()))
    assert rank1["cls"] >= 0.80
