"""The error table of docs/errors.md, row by row, against a real server; afterwards it still serves correctly."""

from __future__ import annotations

import concurrent.futures

import grpc
import numpy as np
import pytest
from conftest import png_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import model_busy, wait_until

from embedsvc.client import Client, EmbedsvcClientError, Item
from embedsvc.v1 import embedsvc_pb2_grpc as pb_grpc

C = grpc.StatusCode


@pytest.fixture(scope="module")
def server(make_server):
    s = make_server(max_message_bytes=1_000_000, max_queue=8, max_items_per_request=50, max_top_k=100)
    with Client(s.address) as c:
        c.create_collection("c", pooling="cls")
        c.create_collection("grid", pooling="spp:combine=concat")
        c.create_collection("vlad", pooling="netvlad:clusters=4")
        c.upsert("c", [Item(f"i{k}", image=png_bytes(color=(40 * k, 80, 200 - 40 * k))) for k in range(5)])
    return s


# (row of the table in docs/errors.md, call, expected code, words the message must contain)
ROWS = [
    ("unknown collection", lambda c: c.search("nope", text="x"), C.NOT_FOUND, "collection 'nope' does not exist"),
    ("unknown model", lambda c: c.embed(["x"], model="nope"), C.NOT_FOUND, "unknown model 'nope'"),
    (
        "unknown model in a new collection",
        lambda c: c.create_collection("m", model="nope"),
        C.NOT_FOUND,
        "unknown model",
    ),
    ("unknown pooling", lambda c: c.embed(["x"], ["bogus"]), C.INVALID_ARGUMENT, "unknown pooling 'bogus'"),
    ("bad pooling parameter", lambda c: c.embed(["x"], ["gem:p=-1"]), C.INVALID_ARGUMENT, "p must be in"),
    ("corrupt image", lambda c: c.embed([b"\x89PNG\r\n\x1a\n broken"]), C.INVALID_ARGUMENT, "could not decode image"),
    ("zero-byte image", lambda c: c.embed([b""]), C.INVALID_ARGUMENT, "image is empty"),
    ("empty text", lambda c: c.embed(["   "]), C.INVALID_ARGUMENT, "text is empty"),
    ("empty request", lambda c: c.embed([]), C.INVALID_ARGUMENT, "no inputs"),
    (
        "wrong vector dimension (upsert)",
        lambda c: c.upsert("c", [Item("v", vector=np.ones(7))]),
        C.INVALID_ARGUMENT,
        "dimension 7",
    ),
    (
        "wrong vector dimension (query)",
        lambda c: c.search("c", vector=np.ones(7)),
        C.INVALID_ARGUMENT,
        "query 0 has dimension 7",
    ),
    (
        "NaN in a vector",
        lambda c: c.upsert("c", [Item("v", vector=np.full(32, np.nan))]),
        C.INVALID_ARGUMENT,
        "NaN or infinity",
    ),
    (
        "top_k out of range",
        lambda c: c.search("c", text="x", top_k=101),
        C.INVALID_ARGUMENT,
        "top_k must be between 1 and 100",
    ),
    ("bad index type", lambda c: c.create_collection("bad", index="IVFxyz"), C.INVALID_ARGUMENT, "bad index type"),
    ("bad collection name", lambda c: c.create_collection("no spaces"), C.INVALID_ARGUMENT, "collection name"),
    ("duplicate collection", lambda c: c.create_collection("c"), C.ALREADY_EXISTS, "already exists"),
    ("text query on an image-only pooling", lambda c: c.search("grid", text="x"), C.FAILED_PRECONDITION, "combine=sum"),
    (
        "NetVLAD collection before FitPooling",
        lambda c: c.upsert("vlad", [Item("a", text="x")]),
        C.FAILED_PRECONDITION,
        "no fitted codebook",
    ),
    ("too many items in one request", lambda c: c.embed(["x"] * 51), C.RESOURCE_EXHAUSTED, "over the limit of 50"),
    ("message over the size limit", lambda c: c.embed([b"\xff" * 1_200_000]), C.RESOURCE_EXHAUSTED, ""),
    ("more-like-this on a missing id", lambda c: c.search("c", id="nope"), C.NOT_FOUND, "'nope' is not in"),
]


@pytest.mark.parametrize("row, call, code, words", ROWS, ids=[r[0] for r in ROWS])
def test_error_table(client, row, call, code, words):
    with pytest.raises(EmbedsvcClientError) as info:
        call(client)
    assert info.value.code == code, f"{row}: {info.value}"
    assert words in info.value.details


def test_empty_upsert_stream(server):
    channel = grpc.insecure_channel(server.address)
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.IndexServiceStub(channel).Upsert(iter([]), timeout=10)
    assert info.value.code() == C.INVALID_ARGUMENT and "empty Upsert stream" in info.value.details()
    channel.close()


def test_queue_full(server):
    """max_queue=8 inputs, the model busy: concurrent 4-input requests overflow the queue."""

    def call(_):
        with Client(server.address, timeout=30) as c:
            try:
                c.embed(["a red circle", "b", "c", "d"])
                return "OK"
            except EmbedsvcClientError as exc:
                return exc.code.name + ":" + exc.details

    with model_busy(server) as release, concurrent.futures.ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(call, i) for i in range(8)]
        # none can succeed while the model is held: one that ended was refused (the queue is full)
        wait_until(lambda: any(c.done() for c in calls), 60, "a call refused while the model is held")
        release.set()
        outcomes = [c.result() for c in calls]
    refused = [o for o in outcomes if o.startswith("RESOURCE_EXHAUSTED")]
    assert refused and "already queued" in refused[0]
    assert "OK" in outcomes


def test_deadline_exceeded(server, client):
    """A busy model outlasts a 50 ms deadline: DEADLINE_EXCEEDED, and the work is dropped."""
    with model_busy(server), pytest.raises(EmbedsvcClientError) as info:
        client.embed(["a red circle"], timeout=0.05)
    assert info.value.code == C.DEADLINE_EXCEEDED


def test_server_still_healthy_and_correct_after_all_errors(server, client):
    for _row, call, _code, _ in ROWS:
        with pytest.raises(EmbedsvcClientError):
            call(client)
    channel = grpc.insecure_channel(server.address)
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="")).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    assert client.get_collection("c").count == 5
    hits = client.search("c", image=png_bytes(color=(80, 80, 120)), top_k=5)
    assert hits[0].id == "i2" and hits[0].score == pytest.approx(1.0, abs=1e-4)
