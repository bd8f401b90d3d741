"""Continuous batching on a real server: no wait for an idle model, coalescing under load, equal results."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from embedsvc.client import Client, EmbedsvcClientError
from embedsvc.encoder import ClipEncoder, embed
from embedsvc.models import load_model
from embedsvc.pooling import PoolingSpec, bind_pooling
from embedsvc.engine.engine import ImageBytes, Text

from conftest import png_bytes
from serving import model_busy, tiny_server

DELAY_MS = 2000
POOLINGS = ["cls", "avg", "max", "gem:p=3", "spp:levels=1,2"]


@pytest.fixture(scope="module")
def server(tiny_spec, tmp_path_factory):
    with tiny_server(tiny_spec, tmp_path_factory.mktemp("data"), max_batch_delay_ms=DELAY_MS, max_batch_size=16) as s:
        yield s


def batch_stats(server, tower: str) -> tuple[float, float]:
    """(forward passes, inputs) the server's batch-size metric counted for a tower."""
    registry = server.server.engine.metrics.registry
    name = f"{server.config.default_model}/{tower}"
    count = registry.get_sample_value("embedsvc_batch_size_count", {"batcher": name}) or 0.0
    total = registry.get_sample_value("embedsvc_batch_size_sum", {"batcher": name}) or 0.0
    return count, total


def test_a_lone_request_does_not_wait_out_the_delay(server):
    """The model is idle: a single Embed runs at once, far under max_batch_delay_ms (2 s)."""
    with Client(server.address, timeout=60) as client:
        client.embed(["warm up"])
        time.sleep(DELAY_MS / 1000 * 1.1)  # the model has been idle longer than the delay
        for inputs in (["a red circle"], [png_bytes()]):
            started = time.perf_counter()
            client.embed(inputs)
            assert time.perf_counter() - started < DELAY_MS / 1000 / 4


def test_consecutive_lone_requests_do_not_wait(server):
    """One caller in a loop is not 'load': each request runs at once, none waits for company."""
    with Client(server.address, timeout=60) as client:
        started = time.perf_counter()
        for i in range(5):
            client.embed([f"caption number {i}"])
        assert time.perf_counter() - started < DELAY_MS / 1000 / 2


def test_concurrent_requests_share_forward_passes(server):
    """Requests that arrive while the model is busy form the next batch, up to max_batch_size."""
    before = batch_stats(server, "text")
    engine = server.server.engine

    async def burst():
        return await asyncio.gather(*(engine.embed("", [PoolingSpec("cls")], [Text(f"text {i}")]) for i in range(12)))

    with model_busy(server):
        future = asyncio.run_coroutine_threadsafe(burst(), server.loop)
        time.sleep(0.3)
    future.result(60)
    count, total = (a - b for a, b in zip(batch_stats(server, "text"), before))
    assert total == 12 and count == 1, (count, total)


def test_batches_fill_to_max_batch_size_and_split_big_requests(server):
    before = batch_stats(server, "text")
    engine = server.server.engine

    async def burst():
        return await asyncio.gather(engine.embed("", [], [Text(f"long {i}") for i in range(20)]),
                                    *(engine.embed("", [], [Text(f"one {i}")]) for i in range(12)))

    with model_busy(server):
        future = asyncio.run_coroutine_threadsafe(burst(), server.loop)
        time.sleep(0.3)
    results = future.result(60)
    count, total = (a - b for a, b in zip(batch_stats(server, "text"), before))
    assert total == 32 and count == 2, (count, total)  # 16 + (4 + 12): two full batches of max_batch_size
    assert len(results[0][1]) == 20


def test_batched_results_equal_unbatched(server, tiny_spec):
    """Mixed texts and images, several poolings, from concurrent requests: equal to the local encoder."""
    local = ClipEncoder(load_model(tiny_spec))
    inputs = [f"a caption {i}" for i in range(6)] + [png_bytes(color=(30 * i, 90, 200 - 30 * i)) for i in range(6)]
    engine = server.server.engine
    specs = [PoolingSpec.parse(p) for p in POOLINGS]

    async def burst():
        contents = [Text(x) if isinstance(x, str) else ImageBytes(x) for x in inputs]
        return await asyncio.gather(*(engine.embed("", specs, [c]) for c in contents))

    with model_busy(server):
        future = asyncio.run_coroutine_threadsafe(burst(), server.loop)
        time.sleep(0.3)
    results = future.result(60)
    for x, (_, [embedding]) in zip(inputs, results):
        alone = embed(local, [x], [bind_pooling(p) for p in POOLINGS])
        for j in range(len(POOLINGS)):
            assert np.abs(embedding.vectors[j] - alone.vectors[j][0]).max() < 1e-5


def test_cancelled_request_is_dropped_before_the_forward(server):
    before = batch_stats(server, "text")
    with Client(server.address, timeout=60) as client, model_busy(server):
        with pytest.raises(EmbedsvcClientError):
            client.embed(["never computed"], timeout=0.1)
    with Client(server.address, timeout=60) as client:
        client.embed(["computed"])
    count, total = (a - b for a, b in zip(batch_stats(server, "text"), before))
    assert (count, total) == (1, 1)


def test_embed_response_wire_bytes_equal_the_message_built_field_by_field():
    from embedsvc.service.wire import embed_response
    from embedsvc.v1 import embedsvc_pb2 as pb

    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal((3, 512)).astype(np.float32), rng.standard_normal((3, 20)).astype(np.float32)]
    modalities, truncated = [pb.MODALITY_TEXT, pb.MODALITY_IMAGE, pb.MODALITY_TEXT], [False, False, True]
    tokens = [None, pb.TokenFeatures(num_tokens=1, dim=2, data=b"\0" * 8, grid_height=1, grid_width=1), None]
    expected = pb.EmbedResponse(model="m")
    for i in range(3):
        result = expected.results.add(modality=modalities[i], truncated=truncated[i])
        for name, matrix in zip(["cls", "gem"], vectors):
            result.embeddings.add(pooling=name, vector=pb.Vector(values=matrix[i].tolist()))
        if tokens[i] is not None:
            result.tokens.CopyFrom(tokens[i])
    built = embed_response("m", modalities, truncated, ["cls", "gem"], vectors,
                           [t.SerializeToString() if t is not None else None for t in tokens])
    assert built == expected


def test_one_tower_gathers_while_the_other_runs_its_forward(server):
    """Texts arriving one by one while an image batch holds the model form one text batch after it."""
    time.sleep(DELAY_MS / 1000 * 1.1)  # idle: a lone text would otherwise run at once, alone
    before = batch_stats(server, "text")
    engine = server.server.engine

    async def staggered():
        image = asyncio.ensure_future(engine.embed("", [], [ImageBytes(png_bytes())]))
        await asyncio.sleep(0.05)
        texts = []
        for i in range(6):
            texts.append(asyncio.ensure_future(engine.embed("", [], [Text(f"late {i}")])))
            await asyncio.sleep(0.05)
        return await asyncio.gather(image, *texts)

    with model_busy(server):
        future = asyncio.run_coroutine_threadsafe(staggered(), server.loop)
        time.sleep(0.8)
    future.result(60)
    count, total = (a - b for a, b in zip(batch_stats(server, "text"), before))
    assert (count, total) == (1, 6)
