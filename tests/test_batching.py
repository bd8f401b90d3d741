"""Continuous batching on a real server: no wait for an idle model, coalescing under load, equal results."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from conftest import png_bytes
from serving import model_busy, tiny_engine, wait_until

from embedsvc.client import Client, EmbedsvcClientError
from embedsvc.encoder import ClipEncoder, embed
from embedsvc.engine.engine import ImageBytes, Text
from embedsvc.models import load_model
from embedsvc.pooling import PoolingSpec, bind_pooling

DELAY_MS = 2000
POOLINGS = ["cls", "avg", "max", "gem:p=3", "spp:levels=1,2"]


@pytest.fixture(scope="module")
def server(make_server):
    """For what goes through a transport: the latency a client sees, a deadline that cancels a call."""
    return make_server(max_batch_delay_ms=DELAY_MS, max_batch_size=16)


@pytest.fixture(scope="module")
def harness(tiny_spec, tmp_path_factory):
    """The same settings on the engine alone (serving.EngineThread), for the batching logic: no transport."""
    with tiny_engine(tiny_spec, tmp_path_factory.mktemp("engine"), max_batch_delay_ms=DELAY_MS, max_batch_size=16) as h:
        yield h


def batch_stats(server, tower: str) -> tuple[float, float]:
    """(forward passes, inputs) the server's batch-size metric counted for a tower."""
    registry = server.engine.metrics.registry
    name = f"{server.config.default_model}/{tower}"
    count = registry.get_sample_value("embedsvc_batch_size_count", {"batcher": name}) or 0.0
    total = registry.get_sample_value("embedsvc_batch_size_sum", {"batcher": name}) or 0.0
    return count, total


def queued(server, tower: str) -> int:
    """Inputs waiting in a tower's batcher queue (not yet taken into a forward pass)."""
    return getattr(server.engine.runtime(""), tower).queued_inputs


def wait_queued(server, tower: str, inputs: int) -> None:
    wait_until(lambda: queued(server, tower) == inputs, 60, f"{inputs} {tower} inputs queued")


def wait_arrived(server, inputs: int) -> None:
    """Waits until all `inputs` sent have reached the batchers: taken into the batch that holds the model (the
    towers' shared lock: model_busy holds the model thread, not the lock) or queued behind it."""
    runtime = server.engine.runtime("")

    def arrived() -> int:
        return sum(b.queued_inputs + b.taken_inputs for b in (runtime.text, runtime.image))

    wait_until(lambda: runtime.text.model_free.locked() and arrived() == inputs, 60, f"{inputs} inputs to arrive")


def wait_idle(server, tower: str) -> None:
    """Waits out what is left of max_batch_delay since the tower's last forward: an idle tower runs a lone
    request at once, one under load waits for company. Idleness is a span of time, so this waits on time."""
    batcher = getattr(server.engine.runtime(""), tower)
    left = batcher._last_end + batcher.max_delay_s - server.loop.time()
    time.sleep(max(0.0, left) + 0.01)


def test_a_lone_request_does_not_wait_out_the_delay(server):
    """The model is idle: a single Embed runs at once, far under max_batch_delay_ms (2 s)."""
    with Client(server.address, timeout=60) as client:
        client.embed(["warm up"])
        wait_idle(server, "text")  # the model has been idle longer than the delay
        wait_idle(server, "image")
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


def test_concurrent_requests_share_forward_passes(harness):
    """Requests that arrive while the model is busy form the next batch, up to max_batch_size."""
    before = batch_stats(harness, "text")
    engine = harness.engine

    async def burst():
        return await asyncio.gather(*(engine.embed("", [PoolingSpec("cls")], [Text(f"text {i}")]) for i in range(12)))

    with model_busy(harness):
        future = asyncio.run_coroutine_threadsafe(burst(), harness.loop)
        wait_arrived(harness, 12)
    future.result(60)
    count, total = (a - b for a, b in zip(batch_stats(harness, "text"), before))
    assert total == 12 and count == 1, (count, total)


def test_batches_fill_to_max_batch_size_and_split_big_requests(harness):
    before = batch_stats(harness, "text")
    engine = harness.engine

    async def burst():
        return await asyncio.gather(
            engine.embed("", [], [Text(f"long {i}") for i in range(20)]),
            *(engine.embed("", [], [Text(f"one {i}")]) for i in range(12)),
        )

    with model_busy(harness):
        future = asyncio.run_coroutine_threadsafe(burst(), harness.loop)
        wait_arrived(harness, 32)
    results = future.result(60)
    count, total = (a - b for a, b in zip(batch_stats(harness, "text"), before))
    assert total == 32 and count == 2, (count, total)  # 16 + (4 + 12): two full batches of max_batch_size
    assert len(results[0][1]) == 20


def test_batched_results_equal_unbatched(harness, tiny_spec):
    """Mixed texts and images, several poolings, from concurrent requests: equal to the local encoder."""
    local = ClipEncoder(load_model(tiny_spec))
    inputs = [f"a caption {i}" for i in range(6)] + [png_bytes(color=(30 * i, 90, 200 - 30 * i)) for i in range(6)]
    engine = harness.engine
    specs = [PoolingSpec.parse(p) for p in POOLINGS]

    async def burst():
        contents = [Text(x) if isinstance(x, str) else ImageBytes(x) for x in inputs]
        return await asyncio.gather(*(engine.embed("", specs, [c]) for c in contents))

    with model_busy(harness):
        future = asyncio.run_coroutine_threadsafe(burst(), harness.loop)
        wait_arrived(harness, 12)
    results = future.result(60)
    for x, (_, [embedding]) in zip(inputs, results):
        alone = embed(local, [x], [bind_pooling(p) for p in POOLINGS])
        for j in range(len(POOLINGS)):
            assert np.abs(embedding.vectors[j] - alone.vectors[j][0]).max() < 1e-5


def test_cancelled_request_is_dropped_before_the_forward(server):
    before = batch_stats(server, "text")
    admission = server.server.admission
    with Client(server.address, timeout=60) as client, model_busy(server):
        with pytest.raises(EmbedsvcClientError):
            client.embed(["never computed"], timeout=0.1)
        # the server has seen the cancellation (its call ended, its queued input cancelled) before the model frees
        wait_until(
            lambda: admission.slots.active == 0 and admission.awaiting_message == 0,
            60,
            "the server to end the cancelled call",
        )
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
    built = embed_response(
        "m",
        modalities,
        truncated,
        ["cls", "gem"],
        vectors,
        [t.SerializeToString() if t is not None else None for t in tokens],
    )
    assert built == expected


def test_one_tower_gathers_while_the_other_runs_its_forward(harness):
    """Texts arriving one by one while an image batch holds the model form one text batch after it.

    The model thread is held until the image batch has taken the model (the towers' shared lock) and all six
    texts, sent one at a time, are provably queued behind it; only then does the image forward run."""
    wait_idle(harness, "text")  # idle: a lone text would otherwise run at once, alone
    before = batch_stats(harness, "text")
    engine = harness.engine
    runtime = engine.runtime("")

    def start(content) -> None:
        async def submit():
            return asyncio.ensure_future(engine.embed("", [], [content]))

        calls.append(asyncio.run_coroutine_threadsafe(submit(), harness.loop).result(10))

    calls: list = []
    with model_busy(harness):
        start(ImageBytes(png_bytes()))
        wait_until(lambda: runtime.image.taken_inputs == 1, 60, "the image batch to take the model")
        for i in range(6):
            start(Text(f"late {i}"))
            wait_queued(harness, "text", i + 1)  # the first text too waits: the image batch holds the model

    async def finish():
        return await asyncio.gather(*calls)

    asyncio.run_coroutine_threadsafe(finish(), harness.loop).result(60)
    count, total = (a - b for a, b in zip(batch_stats(harness, "text"), before))
    assert (count, total) == (1, 6)
