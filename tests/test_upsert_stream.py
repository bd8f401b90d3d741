"""Bulk upserts (issue 24's upsert rate): the client sends vectors as packed bytes, and the server decodes a
stream's next message while the one before it commits, with the stream's outcome as it was: commits in order,
each error saying what earlier messages stored. Real server on 127.0.0.1, real store."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from serving import running_server

from embedsvc.client import Client, Item
from embedsvc.client.client import _Api
from embedsvc.service.config import ServerConfig
from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc

DIM = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = ServerConfig(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path_factory.mktemp("upsert")),
        metrics_port=-1,
        demo_size=0,
        log_format="text",
        log_level="WARNING",
        preload_models="",
        http_listen="",
    )
    with running_server(config) as s:
        yield s


@pytest.fixture
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.IndexServiceStub(channel)
    channel.close()


def messages_of(items: list[Item], batch_size: int, collection: str = "c") -> list[pb.UpsertRequest]:
    """The messages the client streams for these items."""
    steps = _Api().upsert(collection, items, batch_size=batch_size)
    _, method, messages, _ = next(steps)
    assert method == "Upsert"
    return list(messages)


def items(start: int, count: int, dim: int = DIM) -> list[Item]:
    v = np.random.default_rng(start).standard_normal((count, dim)).astype(np.float32)
    return [
        Item(f"i{start + k}", vector=v[k], metadata={"n": start + k, "tag": f"t{k % 3}", "even": k % 2 == 0})
        for k in range(count)
    ]


def test_the_client_builds_the_messages_field_by_field_would_build():
    given = [
        *items(0, 20),
        Item("f64", vector=np.arange(DIM, dtype=np.float64) / 3),
        Item("list", vector=[0.5] * DIM),
        Item("text", text="a star", metadata={"x": 1.5}),
    ]
    expected = pb.UpsertRequest(collection="c")
    for item in given:
        out = expected.items.add(id=item.id)
        if item.vector is not None:
            out.vector.values.extend(np.asarray(item.vector, dtype=np.float32).reshape(-1).tolist())
        else:
            out.content.text = item.text
        for key, value in item.metadata.items():
            if isinstance(value, bool):
                out.metadata[key].bool_value = value
            elif isinstance(value, (int, float)):
                out.metadata[key].number_value = float(value)
            else:
                out.metadata[key].string_value = value
    assert messages_of(given, 100) == [expected]


def build_seconds(dim: int) -> float:
    given = items(0, 1000, dim)
    started = time.process_time()
    messages_of(given, 1000)
    return time.process_time() - started


def test_the_client_does_not_spend_a_python_float_per_vector_value():
    """Setting Vector.values from a list cost ~30 ns a value (20 ms a message of 1,000 x 512, the client's largest
    cost in a bulk load); packed bytes cost a copy. Building 1,000 items of 512-d against 1,000 of 64-d, in one
    run (CPU time, best of alternated tries): 8x the values, at most 2x the time (measured: 1.25x; a Python float
    per value: 3.6x)."""
    small, large = [], []
    for _ in range(5):
        small.append(build_seconds(64))
        large.append(build_seconds(512))
    assert min(large) < 2 * min(small), f"512-d {min(large) * 1e3:.1f} ms, 64-d {min(small) * 1e3:.1f} ms"


def create(stub, name: str) -> None:
    stub.CreateCollection(pb.CreateCollectionRequest(config=pb.CollectionConfig(name=name, dim=DIM)), timeout=30)


def count(stub, name: str) -> int:
    return stub.GetCollection(pb.GetCollectionRequest(name=name), timeout=30).count


def test_a_stream_commits_every_message_in_order_and_counts_replacements(stub, server):
    create(stub, "order")
    first, second = items(0, 50), items(30, 50)  # i30..i49 again: replaced by the later message
    messages = messages_of(first, 25, "order") + messages_of(second, 25, "order")
    response = stub.Upsert(iter(messages), timeout=60)
    assert (response.inserted, response.replaced, response.count) == (80, 20, 80)
    with Client(server.address) as client:
        stored, missing = client.get("order", ["i35", "i10", "i79"], include_vectors=True)
    assert not missing
    latest = {i.id: i for i in first + second}  # the last message naming an id wins
    for item in stored:
        expected = latest[item.id].vector / np.linalg.norm(latest[item.id].vector)
        np.testing.assert_allclose(item.vector, expected, rtol=1e-6)
        assert item.metadata["n"] == latest[item.id].metadata["n"]


def test_a_bad_message_is_reported_after_the_messages_before_it_are_stored(stub):
    create(stub, "bad-later")
    good = messages_of(items(0, 40), 20, "bad-later")
    wrong = pb.UpsertRequest(collection="other", items=messages_of(items(100, 1), 1)[0].items)
    with pytest.raises(grpc.RpcError) as info:
        stub.Upsert(iter([*good, wrong]), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one Upsert stream writes one collection" in info.value.details()
    assert count(stub, "bad-later") == 40  # both messages before it committed, whole


def test_a_failed_commit_says_what_the_messages_before_it_stored(stub):
    create(stub, "fails-later")
    good = messages_of(items(0, 40), 20, "fails-later")
    wrong_dimension = messages_of(items(200, 5, DIM + 1), 5, "fails-later")[0]
    after = messages_of(items(300, 10), 10, "")[0]
    with pytest.raises(grpc.RpcError) as info:
        stub.Upsert(iter([*good, wrong_dimension, after]), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "this message was not stored; 40 items from earlier messages of the stream were" in info.value.details()
    assert count(stub, "fails-later") == 40  # nothing of the failed message, nothing after it
