"""For every RPC, the HTTP endpoint answers what gRPC answers on the same server: same ids, scores within
1e-6, the same error class (the gRPC code name in the JSON body, the HTTP status of that code)."""

from __future__ import annotations

import base64
import io
import math
import re

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import json_format
from PIL import Image

from embedsvc.service.errors import HTTP_STATUS
from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc

TRANSPORTS = ("grpc", "http")
VOLATILE = {"createdUnixMs", "seconds"}  # differ between two collections made a moment apart


def png(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = [png((220, 30, 30)), png((30, 200, 40)), png((20, 40, 230)), png((200, 200, 20))]


def items() -> list[pb.UpsertItem]:
    out = [
        pb.UpsertItem(
            id=f"img-{i}",
            content=pb.Content(image=data),
            metadata={"n": pb.MetadataValue(number_value=i), "kind": pb.MetadataValue(string_value="img")},
        )
        for i, data in enumerate(IMAGES)
    ]
    out += [
        pb.UpsertItem(
            id=f"txt-{i}", content=pb.Content(text=t), metadata={"kind": pb.MetadataValue(string_value="text")}
        )
        for i, t in enumerate(["a red square", "a green field", "blue water"])
    ]
    out.append(pb.UpsertItem(id="vec", vector=pb.Vector(values=np.linspace(-1, 1, 32).tolist())))
    return out


# Each case: the RPC, a request builder given the collection prefix of the transport ("base" is shared),
# and an erroneous request. Streaming RPCs get a list of messages.
CASES = {
    "Embed": (
        lambda t: pb.EmbedRequest(
            inputs=[pb.Content(text="a red square"), pb.Content(image=IMAGES[0])],
            poolings=[pb.PoolingSpec(name="cls"), pb.PoolingSpec(name="gem", params={"p": "3"})],
        ),
        lambda t: pb.EmbedRequest(),
    ),
    "ListModels": (lambda t: pb.ListModelsRequest(), None),
    "CreateCollection": (
        lambda t: pb.CreateCollectionRequest(
            config=pb.CollectionConfig(name=f"new-{t}", pooling=pb.PoolingSpec(name="avg"), index="hnsw")
        ),
        lambda t: pb.CreateCollectionRequest(config=pb.CollectionConfig(name="base")),
    ),
    "GetCollection": (lambda t: pb.GetCollectionRequest(name="base"), lambda t: pb.GetCollectionRequest(name="nope")),
    "ListCollections": (lambda t: pb.ListCollectionsRequest(), None),
    "DropCollection": (
        lambda t: pb.DropCollectionRequest(name=f"drop-{t}"),
        lambda t: pb.DropCollectionRequest(name="nope"),
    ),
    "Upsert": (
        lambda t: [pb.UpsertRequest(collection=f"up-{t}", items=items()[:4]), pb.UpsertRequest(items=items()[4:])],
        lambda t: [
            pb.UpsertRequest(
                collection="base", items=[pb.UpsertItem(id="x", content=pb.Content(image=b"not an image"))]
            )
        ],
    ),
    "Delete": (
        lambda t: pb.DeleteRequest(collection=f"del-{t}", ids=["img-0", "txt-1", "absent"]),
        lambda t: pb.DeleteRequest(collection="base", ids=[f"i{i}" for i in range(40)]),
    ),
    "Get": (
        lambda t: pb.GetRequest(collection="base", ids=["img-1", "absent", "vec"], include_vectors=True),
        lambda t: pb.GetRequest(collection="base", ids=[""]),
    ),
    "Search": (
        lambda t: pb.SearchRequest(
            collection="base",
            top_k=5,
            include_metadata=True,
            include_vectors=True,
            queries=[
                pb.Query(text="a red square"),
                pb.Query(image=IMAGES[2]),
                pb.Query(id="img-1"),
                pb.Query(vector=pb.Vector(values=np.linspace(1, -1, 32).tolist())),
            ],
            filter=pb.Filter(must=[pb.Condition(key="n", range=pb.Range(gte=1))]),
        ),
        lambda t: pb.SearchRequest(collection="base", top_k=100000, queries=[pb.Query(text="x")]),
    ),
    "FitPooling": (
        lambda t: [
            pb.FitPoolingRequest(
                collection=f"fit-{t}", samples=[pb.Content(image=d) for d in IMAGES], params={"seed": "7"}
            )
        ],
        lambda t: [pb.FitPoolingRequest(collection="base", samples=[pb.Content(image=IMAGES[0])])],
    ),
}

HTTP = {  # rpc -> (method, path); the path's {name} comes from the request
    "Embed": ("POST", "/v1/embed"),
    "ListModels": ("GET", "/v1/models"),
    "CreateCollection": ("POST", "/v1/collections"),
    "GetCollection": ("GET", "/v1/collections/{name}"),
    "ListCollections": ("GET", "/v1/collections"),
    "DropCollection": ("DELETE", "/v1/collections/{name}"),
    "Upsert": ("POST", "/v1/collections/{collection}/items"),
    "Delete": ("POST", "/v1/collections/{collection}/delete"),
    "Get": ("POST", "/v1/collections/{collection}/get"),
    "Search": ("POST", "/v1/collections/{collection}/search"),
    "FitPooling": ("POST", "/v1/collections/{collection}/fit"),
}


@pytest.fixture(scope="module")
def server(make_server):
    srv = make_server(http_listen="127.0.0.1:0", max_items_per_request=32, store_thumbnails=True)
    engine = srv.server.engine
    from embedsvc.pooling import PoolingSpec
    from embedsvc.service import calls

    async def setup():
        await engine.create_collection("base", "", None, "cosine", "flat")
        await calls.upsert(engine, _aiter([pb.UpsertRequest(collection="base", items=items())]))
        for t in TRANSPORTS:
            for name in (f"drop-{t}", f"up-{t}", f"del-{t}"):
                await engine.create_collection(name, "", None, "cosine", "flat")
            for name in (f"drop-{t}", f"del-{t}"):
                await calls.upsert(engine, _aiter([pb.UpsertRequest(collection=name, items=items())]))
            await engine.create_collection(f"fit-{t}", "", PoolingSpec("netvlad", {"clusters": "4"}), "cosine", "flat")

    srv.call(setup())
    channel = grpc.insecure_channel(srv.address)
    with httpx.Client(base_url=srv.http_url, timeout=60) as http:
        yield srv, channel, http
    channel.close()


async def _aiter(messages):
    for m in messages:
        yield m


def call_grpc(channel, rpc: str, request):
    service = "EmbedService" if rpc in ("Embed", "ListModels") else "IndexService"
    stub = getattr(pb_grpc, f"{service}Stub")(channel)
    method = getattr(stub, rpc)
    try:
        return "OK", method(iter(request) if isinstance(request, list) else request, timeout=120)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()


def call_http(http: httpx.Client, rpc: str, request):
    method, path = HTTP[rpc]
    first = request[0] if isinstance(request, list) else request
    path = path.format(name=getattr(first, "name", ""), collection=getattr(first, "collection", ""))
    if isinstance(request, list):  # a stream: the JSON-lines body of its items
        response_type = {"Upsert": pb.UpsertResponse, "FitPooling": pb.FitPoolingResponse}[rpc]
        if rpc == "Upsert":
            body = "\n".join(json_format.MessageToJson(i, indent=None) for m in request for i in m.items)
            response = http.request(method, path, content=body, headers={"content-type": "application/x-ndjson"})
        else:
            response = http.request(
                method, path, content=json_format.MessageToJson(first), headers={"content-type": "application/json"}
            )
    else:
        response_type = {
            "Embed": pb.EmbedResponse,
            "ListModels": pb.ListModelsResponse,
            "CreateCollection": pb.CollectionInfo,
            "GetCollection": pb.CollectionInfo,
            "ListCollections": pb.ListCollectionsResponse,
            "DropCollection": pb.DropCollectionResponse,
            "Delete": pb.DeleteResponse,
            "Get": pb.GetResponse,
            "Search": pb.SearchResponse,
        }[rpc]
        body = json_format.MessageToJson(request) if method != "GET" and method != "DELETE" else None
        response = http.request(method, path, content=body, headers={"content-type": "application/json"})
    if response.status_code != 200:
        payload = response.json()
        return payload["code"], (payload["message"], response.status_code)
    payload = response.json()
    if rpc == "ListModels":  # OpenAI's model list rides beside the message's fields: the same models
        openai_list = {"object": payload.pop("object"), "data": payload.pop("data")}
        assert openai_list == {
            "object": "list",
            "data": [
                {"id": m["name"], "object": "model", "created": 0, "owned_by": "embedsvc"} for m in payload["models"]
            ],
        }
    return "OK", json_format.ParseDict(payload, response_type())


def normalised(message, transport: str):
    """The response as a dict, with the transport's own collection names made common."""

    def walk(value):
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str) and transport:
            return value.replace(f"-{transport}", "-T")
        return value

    return walk(json_format.MessageToDict(message))


def assert_close(a, b, where="response"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, abs_tol=1e-6), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("rpc", list(CASES))
def test_http_answers_what_grpc_answers(server, rpc):
    srv, channel, http = server
    build, build_error = CASES[rpc]
    results = {"grpc": call_grpc(channel, rpc, build("grpc")), "http": call_http(http, rpc, build("http"))}
    (g_code, g_reply), (h_code, h_reply) = results["grpc"], results["http"]
    assert g_code == h_code == "OK", results
    same_state = rpc == "ListCollections"  # both transports list every collection: nothing to rename
    assert_close(normalised(g_reply, "" if same_state else "grpc"), normalised(h_reply, "" if same_state else "http"))
    if rpc == "Search":  # the case is not vacuous: every query found something, scores in order
        assert all(r.hits for r in g_reply.results)
        assert [h.id for h in g_reply.results[2].hits][:1] != ["img-1"]  # "more like this" excludes itself
    if build_error is not None:
        g_code, g_message = call_grpc(channel, rpc, build_error("grpc"))
        h_code, (h_message, status) = call_http(http, rpc, build_error("http"))
        assert g_code == h_code != "OK"
        assert re.sub("0x[0-9a-f]+", "", g_message) == re.sub("0x[0-9a-f]+", "", h_message)  # object ids aside
        assert status == HTTP_STATUS[getattr(grpc.StatusCode, g_code)]


def test_stores_written_by_either_transport_hold_the_same_vectors(server):
    srv, channel, http = server
    ids = [i.id for i in items()]
    grpc_items = call_grpc(channel, "Get", pb.GetRequest(collection="up-grpc", ids=ids, include_vectors=True))[1]
    http_items = call_http(http, "Get", pb.GetRequest(collection="up-http", ids=ids, include_vectors=True))[1]
    assert len(grpc_items.items) == len(ids)
    assert_close(json_format.MessageToDict(grpc_items), json_format.MessageToDict(http_items))


def test_openai_embeddings_answer_what_grpc_embed_answers(server, tiny_spec):
    """POST /v1/embeddings runs Embed: the same vectors for each pooling, and Embed's refusals with its code and
    message (OpenAI's body: the code in lower case)."""
    srv, channel, http = server
    for pooling in (pb.PoolingSpec(name="cls"), pb.PoolingSpec(name="gem", params={"p": "3"})):
        request = pb.EmbedRequest(
            model=tiny_spec.name,
            poolings=[pooling],
            inputs=[pb.Content(text="a red square"), pb.Content(image=IMAGES[0])],
        )
        code, reply = call_grpc(channel, "Embed", request)
        suffix = ":gem:p=3" if pooling.name == "gem" else ""
        response = http.post(
            "/v1/embeddings",
            json={
                "model": tiny_spec.name + suffix,
                "encoding_format": "float",
                "input": ["a red square", "data:image/png;base64," + base64.b64encode(IMAGES[0]).decode()],
            },
        )
        assert code == "OK" and response.status_code == 200, response.text
        assert_close(
            [list(r.embeddings[0].vector.values) for r in reply.results],
            [d["embedding"] for d in response.json()["data"]],
        )
    request = pb.EmbedRequest(inputs=[pb.Content(text="x")] * 33)  # over max_items_per_request
    g_code, g_message = call_grpc(channel, "Embed", request)
    response = http.post("/v1/embeddings", json={"model": tiny_spec.name, "input": ["x"] * 33})
    assert response.json()["error"]["code"] == g_code.lower() == "resource_exhausted"
    assert response.json()["error"]["message"] == g_message
    assert response.status_code == HTTP_STATUS[getattr(grpc.StatusCode, g_code)]
