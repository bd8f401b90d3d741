"""The gRPC service end to end on a tiny random model: every RPC, health, reflection, metrics, limits."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from conftest import png_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import BlockingAsyncClient

from embedsvc.client import (
    AlreadyExistsError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    Item,
    NotFoundError,
    UnknownFilterKeyWarning,
)
from embedsvc.encoder import ClipEncoder, embed
from embedsvc.models import load_model
from embedsvc.pooling import bind_pooling


@pytest.fixture(scope="module", params=["Client", "AsyncClient"])
def client_kind(request):
    """Every test runs with both clients (they share their request and response code; this checks it)."""
    return Client if request.param == "Client" else BlockingAsyncClient


@pytest.fixture(scope="module")
def server(make_server, client_kind):  # one per client: the tests name their collections
    return make_server(metrics_port=0)


@pytest.fixture
def client(server, client_kind):
    with client_kind(server.address, timeout=60) as c:
        yield c


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(server.address)
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "embedsvc.v1.EmbedService", "embedsvc.v1.IndexService"):
        assert (
            stub.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        )
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"embedsvc.v1.EmbedService", "embedsvc.v1.IndexService", "grpc.health.v1.Health"} <= names
    channel.close()


def test_embed_equals_local_encoder(client, tiny_spec):
    local = ClipEncoder(load_model(tiny_spec))
    inputs = ["a red circle", png_bytes(), "two blue stars"]
    poolings = ["cls", "avg", "gem:p=3", "spp:levels=1,2"]
    remote = client.embed(inputs, poolings, include_tokens=True)
    expected = embed(local, inputs, [bind_pooling(p) for p in poolings])
    for j, spec in enumerate(poolings):
        assert np.abs(remote.vectors[spec] - expected.vectors[j]).max() < 1e-5
    assert remote.modalities == ["text", "image", "text"]
    assert remote.tokens[1].shape == (16, 32) and remote.tokens[0].shape[0] == 5  # 4x4 patches; SOT a red circle EOT


def test_two_specs_of_one_pooling_in_one_call_each_get_their_vectors(client):
    """Issue 22 item 11: vectors were keyed by pooling name, so gem:p=3 and gem:p=4 collided and one was lost."""
    inputs = [png_bytes(), "a red circle"]
    specs = ["gem:p=3", "gem:p=4", ("gem", {"p": 6})]
    together = client.embed(inputs, specs)
    assert list(together.vectors) == ["gem:p=3", "gem:p=4", "gem:p=6"]
    for spec, key in zip(specs, together.vectors):
        alone = client.embed(inputs, [spec]).vectors[key]
        assert alone.shape == (2, 32) and np.abs(together.vectors[key] - alone).max() < 1e-5
    assert np.abs(together.vectors["gem:p=3"] - together.vectors["gem:p=4"]).max() > 1e-3  # really two exponents
    with pytest.raises(InvalidArgumentError, match="pooling 'gem:p=3' is asked for twice"):
        client.embed(inputs, ["gem:p=3", "cls", ("gem", {"p": 3})])
    assert list(client.embed(["x"], []).vectors) == ["cls"]  # no poolings: the server's default, named


def test_a_lone_spec_or_input_is_one_not_a_sequence_of_characters(client):
    """`poolings="gem:p=3"` was read character by character (poolings 'g', 'e', 'm', ...); one spec or one
    (name, params) tuple is one pooling, one string input one input."""
    one = client.embed("a red circle", "gem:p=3")
    assert list(one.vectors) == ["gem:p=3"] and one.vectors["gem:p=3"].shape == (1, 32)
    listed = client.embed(["a red circle"], ["gem:p=3"])
    assert np.abs(one.vectors["gem:p=3"] - listed.vectors["gem:p=3"]).max() < 1e-6
    assert list(client.embed(["x"], ("gem", {"p": 4})).vectors) == ["gem:p=4"]
    with pytest.raises(InvalidArgumentError, match="must be written key=value"):  # the server's own parser
        client.embed(["x"], "gem:p")


def test_pooling_spec_text_has_one_parser():
    from embedsvc.client.client import _pooling
    from embedsvc.errors import InvalidPoolingParams
    from embedsvc.pooling import PoolingSpec

    for text in ("gem", " gem : p = 4 ", "spp:levels=1,2;combine=concat;", "avg:tokens=clearclip"):
        spec, proto = PoolingSpec.parse(text), _pooling(text)
        assert (spec.name, dict(spec.params)) == (proto.name, dict(proto.params)), text
    with pytest.raises(InvalidPoolingParams, match="key=value"):
        PoolingSpec.parse("gem:p")


def test_list_models(client, tiny_spec):
    response = client.list_models()
    assert response.default_model in {m.name for m in response.models}
    model = next(m for m in response.models if m.name == tiny_spec.name)
    assert model.loaded and model.embed_dim == 32 and model.vision_tower == "vit" and model.dtype == "float32"
    assert {p.name for p in response.poolings} == {"cls", "avg", "max", "gem", "netvlad", "spp"}
    assert next(p for p in response.poolings if p.name == "netvlad").requires_fit


def test_collection_lifecycle_and_cross_modal_search(client):
    created = client.create_collection("life", pooling="avg", index="hnsw")
    assert (created.dim, created.pooling, created.index, created.count) == (32, "avg", "hnsw", 0)
    with pytest.raises(AlreadyExistsError):
        client.create_collection("life")
    images = {f"img-{i}": png_bytes(color=(30 * i, 200 - 20 * i, 90)) for i in range(8)}
    stats = client.upsert(
        "life",
        [Item(k, image=v, metadata={"n": i, "kind": "image"}) for i, (k, v) in enumerate(images.items())]
        + [Item("txt-0", text="a green square", metadata={"kind": "text"})],
        batch_size=3,
    )
    assert (stats.inserted, stats.replaced, stats.count) == (9, 0, 9)
    # image->image: an image finds itself first
    hits = client.search("life", image=images["img-3"], top_k=3)
    assert hits[0].id == "img-3" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    # more like this excludes the item itself; filters apply
    hits = client.search("life", id="img-3", top_k=20, filter={"kind": "image"})
    assert "img-3" not in {h.id for h in hits} and len(hits) == 7
    # text->any and vector->any
    assert client.search("life", text="a green square", top_k=1)[0].id == "txt-0"
    vector = client.get("life", ["img-5"], include_vectors=True)[0][0].vector
    assert client.search("life", vector=vector, top_k=1)[0].id == "img-5"
    # batch queries, range filter
    results = client.search_batch("life", [{"id": "img-1"}, {"text": "x"}], top_k=2, filter={"n": (2, 4)})
    assert len(results) == 2 and all(2 <= h.metadata["n"] <= 4 for r in results for h in r)
    # replace, delete, get
    assert client.upsert("life", [Item("img-0", image=images["img-7"])]).replaced == 1
    assert client.delete("life", ["img-1", "nope"]) == (1, ["nope"])
    items, missing = client.get("life", ["img-2", "img-1"])
    assert [i.id for i in items] == ["img-2"] and missing == ["img-1"] and items[0].metadata["n"] == 2
    assert {c.name: c.count for c in client.list_collections()}["life"] == 8
    assert client.drop_collection("life") == 8
    with pytest.raises(NotFoundError):
        client.get_collection("life")


def test_vector_only_collection(client):
    created = client.create_collection("raw", dim=3, index="flat", metric="inner_product")
    assert created.model == "" and created.dim == 3
    client.upsert("raw", [Item("a", vector=np.array([1, 0, 0])), Item("b", vector=np.array([0, 2, 0]))])
    assert client.search("raw", vector=np.array([0, 1, 0]), top_k=1)[0].id == "b"
    with pytest.raises(FailedPreconditionError, match="has no model"):
        client.search("raw", text="hello")


def test_netvlad_collection_needs_fit_then_works(client):
    created = client.create_collection("vlad", pooling="netvlad:clusters=4")
    assert created.pooling_state == "POOLING_STATE_NEEDS_FIT" and created.dim == 4 * 32
    with pytest.raises(FailedPreconditionError, match="no fitted codebook"):
        client.upsert("vlad", [Item("a", text="a red circle")])
    samples = [png_bytes(color=(i * 20, 100, 255 - i * 20)) for i in range(10)] + ["a red circle", "a blue star"]
    fitted = client.fit_pooling("vlad", samples, {"seed": 1})
    assert fitted.collection.pooling_state == "POOLING_STATE_FITTED" and fitted.descriptors >= 160  # 10 x 16 patches
    client.upsert("vlad", [Item("a", image=samples[0]), Item("b", image=samples[5]), Item("t", text="a red circle")])
    assert client.search("vlad", image=samples[5], top_k=1)[0].id == "b"
    with pytest.raises(FailedPreconditionError, match="holds 3 items"):
        client.fit_pooling("vlad", samples)


def test_spp_concat_refuses_text_queries(client):
    client.create_collection("grid", pooling="spp:combine=concat")
    client.upsert("grid", [Item("a", image=png_bytes())])
    with pytest.raises(FailedPreconditionError, match="combine=sum"):
        client.search("grid", text="a red circle")
    assert client.search("grid", image=png_bytes(), top_k=1)[0].id == "a"


def test_metrics_endpoint(server, client):
    client.embed(["hello"])
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    assert 'embedsvc_requests_total{code="OK",method="Embed"}' in body
    assert "embedsvc_batch_size_bucket" in body and "embedsvc_model_load_seconds" in body


def test_search_takes_filter_text_and_warns_of_unknown_keys(client, client_kind):
    """Both clients: a filter as text in the CLI's grammar (parsed by the server), a typed error for bad text, and
    UnknownFilterKeyWarning, pointing at the caller's line, for a key no item holds."""
    client.create_collection("ranked", dim=3)
    client.upsert(
        "ranked", [Item(f"r{n}", vector=[1, 0, n / 10], metadata={"n": n, "kind": "ab"[n % 2]}) for n in range(6)]
    )
    hits = client.search("ranked", vector=[1, 0, 0], top_k=20, filter="n>=3 kind=b")
    assert sorted(h.id for h in hits) == ["r3", "r5"]
    batch = client.search_batch("ranked", [{"vector": [1, 0, 0]}, {"id": "r1"}], top_k=20, filter="n>=3 kind=b")
    assert [sorted(h.id for h in hits) for hits in batch] == [["r3", "r5"], ["r3", "r5"]]
    with pytest.raises(ValueError, match="exactly one of"):
        client.search("ranked", vector=[1, 0, 0], id="r1")
    with pytest.raises(ValueError, match="a dict of one of"):
        client.search_batch("ranked", [{"vector": [1, 0, 0], "id": "r1"}])
    with pytest.warns(UnknownFilterKeyWarning) as caught:
        assert client.search_batch("ranked", [{"id": "r1"}], filter="m>=1") == [[]]
    if client_kind is Client:
        assert [w.filename for w in caught] == [__file__]
    with pytest.warns(UnknownFilterKeyWarning, match="'ranked' has the metadata key 'm'") as caught:
        assert client.search("ranked", vector=[1, 0, 0], filter="m>=1") == []
    if client_kind is Client:  # BlockingAsyncClient runs the call on its loop: no caller's line to point at
        assert [w.filename for w in caught] == [__file__]
    with pytest.raises(InvalidArgumentError, match="KEY>=X"):
        client.search("ranked", vector=[1, 0, 0], filter="n=>5")


def test_long_text_is_truncated_and_the_response_says_so(client):
    result = client.embed(["word " * 300, "short"])
    assert result.truncated == [True, False]
    hits_response = client.embed(["a red circle"], poolings=["cls"])
    assert hits_response.truncated == [False]


def test_async_client_calls_overlap_in_one_event_loop(server):
    """AsyncClient as asyncio code uses it: calls gathered in one loop, each answered as alone, errors typed."""
    import asyncio

    from embedsvc.client import AsyncClient

    texts = [f"a red circle number {i}" for i in range(6)]

    async def main():
        async with AsyncClient(server.address, timeout=60) as client:
            together = await asyncio.gather(*(client.embed([t]) for t in texts))
            alone = await client.embed(texts)
            with pytest.raises(NotFoundError):
                await client.get_collection("no-such-collection")
            await client.create_collection("async-filtered", dim=2)
            await client.upsert("async-filtered", [Item("a", vector=[1, 0], metadata={"n": 1})])
            with pytest.warns(UnknownFilterKeyWarning, match="key 'm'") as caught:
                assert await client.search("async-filtered", vector=[1, 0], filter="m=1") == []
            assert [w.filename for w in caught] == [__file__]  # the awaiting line, as with Client
            return together, alone

    together, alone = asyncio.run(main())
    assert np.abs(np.concatenate([r.vectors["cls"] for r in together]) - alone.vectors["cls"]).max() < 1e-5


def test_both_clients_offer_every_call_with_the_same_arguments():
    import inspect

    from embedsvc.client import AsyncClient
    from embedsvc.client.client import API_METHODS

    assert {"embed", "fit_pooling", "search", "search_batch"} <= set(API_METHODS) and "_search" not in API_METHODS
    for cls in (Client, AsyncClient):  # each class lists every method of the API
        assert [name for name in API_METHODS if not hasattr(cls, name)] == [], cls
    for name in API_METHODS:
        blocking, awaiting = getattr(Client, name), getattr(AsyncClient, name)
        assert inspect.signature(blocking) == inspect.signature(awaiting), name
        assert not inspect.iscoroutinefunction(blocking) and inspect.iscoroutinefunction(awaiting), name


def test_every_status_the_server_sends_has_its_typed_client_error():
    """ABORTED (a write raced a re-fit or re-creation: retry) had no type; now every code in the server's table
    (and UNAUTHENTICATED, sent by auth) becomes its own EmbedsvcClientError subclass carrying the code."""
    from grpc.aio import AioRpcError, Metadata

    from embedsvc.client import EmbedsvcClientError
    from embedsvc.client.errors import from_rpc_error
    from embedsvc.service.errors import STATUS

    for code in [code for _, code in STATUS] + [grpc.StatusCode.UNAUTHENTICATED]:
        error = from_rpc_error(AioRpcError(code, Metadata(), Metadata(), details="why"))
        assert type(error) is not EmbedsvcClientError and error.code == code and "why" in str(error), code
