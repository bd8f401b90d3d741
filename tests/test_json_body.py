"""HTTP response bodies: exactly MessageToDict's JSON (values read back as the same float32), with no Python
code run per float."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from google.protobuf import json_format

from embedsvc.service import json_body
from embedsvc.service.wire import embed_response
from embedsvc.v1 import embedsvc_pb2 as pb


def reference(message) -> dict:
    return json.loads(json.dumps(json_format.MessageToDict(message, always_print_fields_with_no_presence=True)))


def assert_same(expected, got, where="body"):
    """Same keys, lists, strings; numbers equal as float32 (MessageToDict writes 0.1234567 for what orjson may
    write as 0.12345670, the same float32)."""
    assert type(expected) is type(got) or {type(expected), type(got)} <= {int, float}, f"{where}: {expected!r} {got!r}"
    if isinstance(expected, dict):
        assert expected.keys() == got.keys(), where  # JSON objects are unordered
        for key in expected:
            assert_same(expected[key], got[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(expected) == len(got), where
        for i, (a, b) in enumerate(zip(expected, got)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert np.float32(expected) == np.float32(got), f"{where}: {expected} != {got}"
    else:
        assert expected == got, f"{where}: {expected!r} != {got!r}"


def rendered(message) -> dict:
    copy = type(message)()
    copy.CopyFrom(message)
    return json.loads(json_body.dumps(json_body.document(copy)))


def embed_message(n=32, dim=512, tokens=False):
    rng = np.random.default_rng(0)
    vectors = [
        rng.standard_normal((n, dim)).astype(np.float32) * 10.0 ** rng.integers(-8, 8, (n, dim)) for _ in range(2)
    ]
    token_rows = None
    if tokens:
        token_rows = [
            pb.TokenFeatures(
                num_tokens=2, dim=3, data=np.arange(6, dtype="<f4").tobytes(), grid_height=1, grid_width=2
            ).SerializeToString()
            if i % 2
            else None
            for i in range(n)
        ]
    return embed_response(
        "m",
        [pb.MODALITY_TEXT, pb.MODALITY_IMAGE] * (n // 2),
        [i % 3 == 0 for i in range(n)],
        ["cls", "gem"],
        vectors,
        token_rows,
    )


def search_message():
    out = pb.SearchResponse()
    first = out.results.add(truncated=True)
    first.hits.add(
        id="a",
        score=0.25,
        vector=pb.Vector(values=[1.5, -2.25, 3e-7]),
        metadata={
            "n": pb.MetadataValue(number_value=3),
            "s": pb.MetadataValue(string_value="x"),
            "b": pb.MetadataValue(bool_value=False),
        },
    )
    first.hits.add(id="b", score=-0.1)  # no vector: absent, not empty
    first.hits.add(id="c", score=0.3, vector=pb.Vector())  # set but empty
    out.results.add()
    return out


def get_message():
    out = pb.GetResponse(missing_ids=["gone"])
    out.items.add(id="v", vector=pb.Vector(values=np.linspace(-1, 1, 7, dtype=np.float32)))
    out.items.add(id="w", metadata={"k": pb.MetadataValue(string_value="é")})
    return out


@pytest.mark.parametrize(
    "message",
    [
        embed_message(),
        embed_message(4, 3, tokens=True),
        search_message(),
        pb.EmbedResponse(results=[pb.EmbedResult(embeddings=[pb.PooledEmbedding(pooling="cls")])]),
        get_message(),
        pb.EmbedResponse(),
        pb.ListModelsResponse(default_model="m"),
        pb.UpsertResponse(inserted=2**40),
    ],
    ids=["embed", "embed-tokens", "search", "embed-sparse", "get", "empty", "models", "int64"],
)
def test_body_is_message_to_dicts(message):
    assert_same(reference(message), rendered(message))


@pytest.mark.parametrize("n, dim, tokens", [(32, 512, False), (4, 3, True), (0, 8, False)])
def test_embed_document_is_the_embed_responses_json(n, dim, tokens):
    """HTTP Embed writes its JSON from the matrices; it must be what the EmbedResponse gRPC sends would give."""
    rng = np.random.default_rng(n)
    vectors = [rng.standard_normal((n, dim)).astype(np.float32) for _ in range(2)]
    modalities = [(pb.MODALITY_TEXT, pb.MODALITY_IMAGE, pb.MODALITY_UNSPECIFIED)[i % 3] for i in range(n)]
    truncated = [i % 2 == 1 for i in range(n)]
    token_messages = None
    if tokens:
        token_messages = [
            pb.TokenFeatures(
                num_tokens=2, dim=3, data=rng.standard_normal(6).astype("<f4").tobytes(), grid_height=i, grid_width=i
            )
            if i % 2
            else None
            for i in range(n)
        ]
    message = embed_response(
        "m",
        modalities,
        truncated,
        ["cls", "gem"],
        vectors,
        [t.SerializeToString() if t else None for t in token_messages] if tokens else None,
    )
    got = json.loads(
        json_body.dumps(json_body.embed_document("m", modalities, truncated, ["cls", "gem"], vectors, token_messages))
    )
    assert_same(reference(message), got)


def test_non_finite_values_are_written_as_message_to_dict_writes_them():
    message = pb.GetResponse()
    message.items.add(id="x", vector=pb.Vector(values=[float("nan"), float("inf"), -float("inf"), 0.5]))
    message.items.add(id="y", vector=pb.Vector(values=[1.0]))
    got = rendered(message)
    assert got["items"][0]["vector"]["values"] == ["NaN", "Infinity", "-Infinity", 0.5]
    assert_same(reference(message), got)


def python_calls(work) -> int:
    calls = []

    def count(frame, event, arg):
        if event in ("call", "c_call"):
            calls.append(1)

    sys.setprofile(count)
    try:
        work()
    finally:
        sys.setprofile(None)
    return len(calls)


def test_no_python_code_runs_per_float():
    """32 inputs x 2 poolings x 512 floats: MessageToDict makes over 14 Python calls per float (478,516 in all);
    here the calls are per message, not per value (counted with a profile hook, not timed)."""
    message = embed_message(32, 512)
    floats = sum(len(e.vector.values) for r in message.results for e in r.embeddings)
    assert python_calls(lambda: json_body.dumps(json_body.document(message))) < floats / 4
    search = pb.SearchResponse()
    for _ in range(64):
        search.results.add().hits.add(id="x", vector=pb.Vector(values=np.ones(512, np.float32)))
    assert python_calls(lambda: json_body.dumps(json_body.document(search))) < floats / 4
    vectors = [np.ones((32, 512), np.float32)] * 2
    assert (
        python_calls(
            lambda: json_body.dumps(json_body.embed_document("m", [1] * 32, [False] * 32, ["a", "b"], vectors))
        )
        < floats / 4
    )
