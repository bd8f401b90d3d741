"""Issue 10, "one request can take the server down": half-open calls, extreme aspect ratios, the per-request
decode budget with fair scheduling, FitPooling caps. Real servers on 127.0.0.1, real models and store."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from conftest import png_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from serving import executor_busy, model_busy, queued_jobs, running_server, tiny_config, tiny_server, wait_until

from embedsvc.client import Client, EmbedsvcClientError, Item
from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc

TOKEN = "t" * 24
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def _tokens(folder) -> str:
    path = folder / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": "ops", "token": TOKEN, "scopes": ["read", "write"]}]}))
    return str(path)


class HalfOpenCalls:
    """Calls that send their headers and never a request message, from a grpc.aio client in its own thread."""

    def __init__(self, address: str):
        self.address = address
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.channel = None
        self.calls = []

    def open(self, method: str, count: int, metadata=()) -> None:
        async def start():
            if self.channel is None:
                self.channel = grpc.aio.insecure_channel(self.address)
            stub = self.channel.stream_unary(method)  # on the wire, a unary call whose message never comes
            for _ in range(count):
                call = stub(metadata=metadata)
                self.calls.append(call)
            await asyncio.gather(*(c.wait_for_connection() for c in self.calls[-count:]))

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(60)

    def codes(self, timeout: float, start: int = 0, stop: int | None = None) -> list:
        async def wait():
            return await asyncio.gather(*(c.code() for c in self.calls[start:stop]))

        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(wait(), timeout), self.loop).result(timeout + 5)

    def close(self) -> None:
        async def close():
            for call in self.calls:
                call.cancel()
            if self.channel is not None:
                await self.channel.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- 9. half-open calls ----------------------------------------------------------------------------------


def test_half_open_calls_do_not_starve_health_or_authorised_calls(tiny_spec, tmp_path):
    config = tiny_config(tiny_spec, tmp_path / "d", auth_tokens_file=_tokens(tmp_path), max_concurrent_rpcs=64)
    with running_server(config) as server:
        with Client(server.address, token=TOKEN) as c:
            c.create_collection("v", dim=3)
            c.upsert("v", [Item("a", vector=[1, 0, 0])])
        attacker = HalfOpenCalls(server.address)
        try:
            attacker.open("/embedsvc.v1.IndexService/Search", 500)  # no token
            attacker.open("/embedsvc.v1.EmbedService/Embed", 250, AUTH)  # a token, but no message
            attacker.open("/embedsvc.v1.IndexService/Upsert", 250, AUTH)  # streaming, no first message
            # the calls without a token were refused on their headers, without waiting for a message
            assert set(attacker.codes(timeout=30, stop=500)) == {grpc.StatusCode.UNAUTHENTICATED}
            admission = server.server.admission  # the server has taken in all 1,000 calls: 500 await a message
            wait_until(lambda: admission.awaiting_message == 500, 120, "500 half-open calls awaiting a message")
            with grpc.insecure_channel(server.address) as channel:
                started = time.perf_counter()
                health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                hits = pb_grpc.IndexServiceStub(channel).Search(
                    pb.SearchRequest(collection="v", queries=[pb.Query(vector=pb.Vector(values=[1, 0, 0]))]),
                    metadata=AUTH,
                    timeout=1,
                )
                seconds = time.perf_counter() - started
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert [h.id for h in hits.results[0].hits] == ["a"] and seconds < 1
        finally:
            attacker.close()


def test_half_open_calls_end_after_the_message_timeout(tiny_spec, tmp_path):
    config = tiny_config(tiny_spec, tmp_path / "d", request_message_timeout_seconds=0.5)
    with running_server(config) as server:
        attacker = HalfOpenCalls(server.address)
        try:
            attacker.open("/embedsvc.v1.EmbedService/Embed", 20)
            attacker.open("/embedsvc.v1.IndexService/Upsert", 20)
            assert set(attacker.codes(timeout=20)) == {grpc.StatusCode.DEADLINE_EXCEEDED}
        finally:
            attacker.close()


def test_excess_rpcs_wait_for_a_slot_then_are_refused(tiny_spec, tmp_path):
    """max_concurrent_rpcs run, max_waiting_rpcs wait (docs/serving.md's promise), the next is RESOURCE_EXHAUSTED."""
    config = tiny_config(tiny_spec, tmp_path / "d", max_concurrent_rpcs=1, max_waiting_rpcs=1)
    with running_server(config) as server, Client(server.address, timeout=60) as c:
        c.embed(["warm-up"])
        with ThreadPoolExecutor(2) as pool, model_busy(server) as release:  # the first Embed holds its slot
            slots = server.server.admission.slots
            running = pool.submit(c.embed, ["first"])
            wait_until(lambda: slots.active == 1, 60, "the first Embed to hold the slot")
            waiting = pool.submit(c.embed, ["second"])
            wait_until(lambda: slots.waiting == 1, 60, "the second Embed to wait for the slot")
            with pytest.raises(EmbedsvcClientError) as info:
                c.embed(["third"])
            release.set()
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "server busy" in info.value.details
            assert running.result().vectors["cls"].shape[0] == 1 and waiting.result().vectors["cls"].shape[0] == 1


# -- 10. extreme aspect ratios ---------------------------------------------------------------------------


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.mark.parametrize("width", [100_000, 1_000_000, 40_000_000])
def test_extreme_aspect_ratio_is_refused_within_bounded_memory(tiny_spec, tmp_path, width):
    buffer = io.BytesIO()
    Image.new("L", (width, 1)).save(buffer, format="PNG")
    config = tiny_config(tiny_spec, tmp_path / "d")
    with running_server(config) as server, Client(server.address, timeout=120) as c:
        c.embed([png_bytes()])  # everything warmed up
        before = _rss_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak (VmHWM) to the current RSS
        with pytest.raises(EmbedsvcClientError) as info:
            c.embed([buffer.getvalue()])
        grown_mb = (_rss_kb("VmHWM") - before) / 1024
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "aspect ratio" in info.value.details
    assert grown_mb < 100, f"peak RSS grew by {grown_mb:.0f} MB"


# -- 11. per-request decode budget and fair scheduling ---------------------------------------------------


def test_request_pixel_budget(tiny_spec, tmp_path):
    config = tiny_config(tiny_spec, tmp_path / "d", max_request_pixels=10_000)
    with running_server(config) as server, Client(server.address) as c:
        assert c.embed([png_bytes((80, 80))]).vectors["cls"].shape[0] == 1  # 6,400 pixels
        with pytest.raises(EmbedsvcClientError) as info:
            c.embed([png_bytes((80, 80)), png_bytes((80, 80))])
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_request_pixels" in info.value.details
        c.create_collection("p")
        with pytest.raises(EmbedsvcClientError) as info:
            c.upsert("p", [Item(str(k), image=png_bytes((80, 80))) for k in range(2)])
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_small_request_is_not_queued_behind_a_large_one(tiny_spec, tmp_path):
    large_image = png_bytes((3000, 3000))
    config = tiny_config(tiny_spec, tmp_path / "d", decode_workers=1)  # one worker: turns are plain to see
    with running_server(config) as server, Client(server.address, timeout=300) as c:
        c.embed([png_bytes()])
        finished = {}

        def embed(name, images):
            started = time.perf_counter()
            c.embed(images)
            finished[name] = time.perf_counter()
            return finished[name] - started

        decode_pool = server.server.engine.decode_pool
        with ThreadPoolExecutor(2) as pool, executor_busy(decode_pool) as release:
            large = pool.submit(embed, "large", [large_image] * 10)
            wait_until(lambda: queued_jobs(decode_pool) == 1, 60, "the large request's first decode job")
            small = pool.submit(embed, "small", [png_bytes((8, 8))])
            wait_until(lambda: queued_jobs(decode_pool) == 2, 60, "the small request's first job behind it")
            release.set()  # the large request's turn came first
            large_seconds, small_seconds = large.result(), small.result()
    assert finished["small"] < finished["large"], (small_seconds, large_seconds)
    assert small_seconds < large_seconds / 3, (small_seconds, large_seconds)


# -- 12. FitPooling caps ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fit_server(tiny_spec, tmp_path_factory):
    with tiny_server(
        tiny_spec, tmp_path_factory.mktemp("fit"), max_fit_samples=6, max_items_per_request=4, max_fit_bytes=3000
    ) as server:
        with Client(server.address) as c:
            c.create_collection("vlad", pooling="netvlad:clusters=2")
        yield server


def _fit(server, messages):
    with grpc.insecure_channel(server.address) as channel:
        return pb_grpc.IndexServiceStub(channel).FitPooling(iter(messages), timeout=120)


def _texts(n):
    return [pb.Content(text=f"a red circle number {k}") for k in range(n)]


@pytest.mark.parametrize(
    "messages, words",
    [
        ([pb.FitPoolingRequest(collection="vlad", samples=_texts(5))], "over the limit of 4"),
        (
            [pb.FitPoolingRequest(collection="vlad", samples=_texts(4)), pb.FitPoolingRequest(samples=_texts(4))],
            "max_fit_samples",
        ),
        (
            [
                pb.FitPoolingRequest(collection="vlad", samples=[pb.Content(text="a blue square " * 60)] * 2),
                pb.FitPoolingRequest(samples=[pb.Content(text="a blue square " * 60)] * 2),
            ],
            "max_fit_bytes",
        ),
    ],
    ids=["per-message", "total", "bytes"],
)
def test_fit_pooling_caps(fit_server, messages, words):
    with pytest.raises(grpc.RpcError) as info:
        _fit(fit_server, messages)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and words in info.value.details()
    response = _fit(
        fit_server,
        [pb.FitPoolingRequest(collection="vlad", samples=_texts(4)), pb.FitPoolingRequest(samples=_texts(2))],
    )  # at the caps: fits
    assert response.collection.pooling_state == pb.POOLING_STATE_FITTED
