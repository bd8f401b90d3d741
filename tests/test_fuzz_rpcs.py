"""Property-based fuzzing of every RPC: whatever the message, the server answers with a status (never
INTERNAL or UNKNOWN) and stays healthy. 2000+ generated cases per run."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from conftest import png_bytes
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings, strategies as st

from embedsvc.client import Client, Item
from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc

CASES = 2200
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
COUNTS = {"cases": 0}

names = st.sampled_from(["fz", "raw", "nope", "", "bad name!", "x" * 70, "new-a", "new-b", "ü"])
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
# Full-size vectors from a seed: drawn float by float, 128 floats cost hypothesis ~6 ms a vector, half the suite's
# fuzzing time; their values matter to no status (the short lists carry the NaNs, infinities and wrong sizes).
full_vectors = st.builds(
    lambda seed: np.random.default_rng(seed).uniform(-1, 1, 128).astype(np.float32).tolist(), st.integers(0, 2**32)
)
vectors = st.builds(pb.Vector, values=st.one_of(st.lists(floats, max_size=5), full_vectors))
texts = st.one_of(st.text(max_size=60), st.just("a large red circle in the top left"))
images = st.one_of(st.binary(max_size=300), st.just(png_bytes()), st.just(png_bytes(fmt="GIF")))
contents = st.one_of(st.builds(pb.Content, text=texts), st.builds(pb.Content, image=images), st.builds(pb.Content))
poolings = st.builds(
    pb.PoolingSpec,
    name=st.sampled_from(["cls", "avg", "max", "gem", "netvlad", "spp", "bogus", ""]),
    params=st.dictionaries(
        st.sampled_from(["p", "levels", "clusters", "combine", "zz"]),
        st.sampled_from(["3", "-1", "1,2", "x", "concat", "nan", ""]),
        max_size=2,
    ),
)
values = st.one_of(
    st.builds(pb.MetadataValue, string_value=st.text(max_size=10)),
    st.builds(pb.MetadataValue, number_value=st.floats(allow_nan=True)),
    st.builds(pb.MetadataValue, bool_value=st.booleans()),
    st.builds(pb.MetadataValue),
)
metadata = st.dictionaries(st.text(max_size=8), values, max_size=3)
# over-long ids (the limit is 512 bytes) of any characters, by repeating a short drawn text (cheaper to draw)
long_ids = st.builds(lambda t: (t * 520)[: 513 + len(t)], st.text(min_size=1, max_size=7))
ids = st.one_of(st.text(max_size=20), st.just("a"), long_ids)
items = st.builds(
    lambda i, c, v, m, kind: pb.UpsertItem(
        id=i, metadata=m, **({"content": c} if kind == 0 else {"vector": v} if kind == 1 else {})
    ),
    ids,
    contents,
    vectors,
    metadata,
    st.integers(0, 2),
)
queries = st.one_of(
    st.builds(pb.Query, text=texts),
    st.builds(pb.Query, image=images),
    st.builds(pb.Query, vector=vectors),
    st.builds(pb.Query, id=ids),
    st.builds(pb.Query),
)
conditions = st.one_of(
    st.builds(lambda k, v: pb.Condition(key=k, equals=v), st.text(max_size=6), values),
    st.builds(
        lambda k, vs: pb.Condition(key=k, **{"in": pb.ValueList(values=vs)}),
        st.text(max_size=6),
        st.lists(values, max_size=3),
    ),
    st.builds(
        lambda k, lo, hi: pb.Condition(
            key=k, range=pb.Range(**({"gte": lo} if lo is not None else {}), **({"lte": hi} if hi is not None else {}))
        ),
        st.text(max_size=6),
        st.none() | st.floats(),
        st.none() | st.floats(),
    ),
    st.builds(pb.Condition, key=st.text(max_size=6)),
)
configs = st.builds(
    pb.CollectionConfig,
    name=names,
    model=st.sampled_from(["", "embedsvc-tiny-scenes", "nope"]),
    pooling=poolings,
    metric=st.integers(0, 3),
    index=st.sampled_from(["", "flat", "hnsw", "IVF4,Flat", "bogus", "ivfpq"]),
    dim=st.integers(0, 70000),
)

CALLS = st.one_of(
    st.builds(
        lambda m, p, c, t: ("Embed", pb.EmbedRequest(model=m, poolings=p, inputs=c, include_tokens=t)),
        st.sampled_from(["", "nope", "embedsvc-tiny-scenes"]),
        st.lists(poolings, max_size=3),
        st.lists(contents, max_size=4),
        st.booleans(),
    ),
    st.just(("ListModels", pb.ListModelsRequest())),
    st.builds(lambda c: ("CreateCollection", pb.CreateCollectionRequest(config=c)), configs),
    st.builds(lambda n: ("GetCollection", pb.GetCollectionRequest(name=n)), names),
    st.just(("ListCollections", pb.ListCollectionsRequest())),
    st.builds(
        lambda n: ("DropCollection", pb.DropCollectionRequest(name=n)), names.filter(lambda n: n.startswith("new"))
    ),
    st.builds(
        lambda msgs: ("Upsert", msgs),
        st.lists(st.builds(pb.UpsertRequest, collection=names, items=st.lists(items, max_size=4)), max_size=3),
    ),
    st.builds(lambda n, i: ("Delete", pb.DeleteRequest(collection=n, ids=i)), names, st.lists(ids, max_size=4)),
    st.builds(
        lambda n, i, v: ("Get", pb.GetRequest(collection=n, ids=i, include_vectors=v)),
        names,
        st.lists(ids, max_size=4),
        st.booleans(),
    ),
    st.builds(
        lambda n, q, k, f, p, m: (
            "Search",
            pb.SearchRequest(collection=n, queries=q, top_k=k, filter=pb.Filter(must=f), params=p, include_metadata=m),
        ),
        names,
        st.lists(queries, max_size=3),
        st.integers(0, 2000),
        st.lists(conditions, max_size=2),
        st.builds(pb.SearchParams, nprobe=st.integers(0, 5000), ef_search=st.integers(0, 5000)),
        st.booleans(),
    ),
    st.builds(
        lambda msgs: ("FitPooling", msgs),
        st.lists(
            st.builds(
                pb.FitPoolingRequest,
                collection=names,
                samples=st.lists(contents, max_size=3),
                params=st.dictionaries(
                    st.sampled_from(["seed", "max_descriptors", "x"]), st.sampled_from(["1", "abc", "-5"]), max_size=2
                ),
            ),
            max_size=2,
        ),
    ),
)


@pytest.fixture(scope="module")
def server(make_server):
    s = make_server(bundled=True, log_level="WARNING", max_message_bytes=4_000_000)
    with Client(s.address) as client:
        client.create_collection("fz")
        client.create_collection("raw", dim=3)
        client.upsert("fz", [Item("a", image=png_bytes()), Item("b", text="a blue star")])
    return s


@pytest.fixture(scope="module")
def stubs(server):
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.EmbedServiceStub(channel), pb_grpc.IndexServiceStub(channel), channel
    channel.close()


@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(call=CALLS)
def test_every_rpc_answers_with_a_status(stubs, call):
    embed, index, _ = stubs
    method, request = call
    stub = embed if method in ("Embed", "ListModels") else index
    arg = iter(request) if isinstance(request, list) else request
    COUNTS["cases"] += 1
    try:
        getattr(stub, method)(arg, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, f"{method}: {exc.code()} {exc.details()}"


def test_server_healthy_after_fuzzing(stubs):
    _, index, channel = stubs
    assert COUNTS["cases"] >= 2000, COUNTS
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    # and still answers correctly: a fresh item is found by its own vector
    index.Upsert(
        iter(
            [
                pb.UpsertRequest(
                    collection="raw", items=[pb.UpsertItem(id="probe", vector=pb.Vector(values=[0.1, 0.2, 0.97]))]
                )
            ]
        ),
        timeout=10,
    )
    hits = index.Search(
        pb.SearchRequest(collection="raw", queries=[pb.Query(vector=pb.Vector(values=[0.1, 0.2, 0.97]))], top_k=1),
        timeout=10,
    )
    assert hits.results[0].hits[0].id == "probe"
