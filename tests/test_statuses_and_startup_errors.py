"""Issue 10, "wrong statuses and operator traps": malformed protobuf, FitPooling parameters, quoted input in
messages, top_k=0, duplicate authorization headers, truncated JPEGs, start-up errors of `embedsvc serve`."""

from __future__ import annotations

import io
import json
import logging
import struct
from pathlib import Path

import grpc
import pytest
from PIL import Image
from serving import serve_once

from embedsvc.client import Client, EmbedsvcClientError, Item
from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc

C = grpc.StatusCode
TOKEN = "s" * 24
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(make_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("statuses")
    tokens = folder / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "tokens": [
                    {"name": "ops", "token": TOKEN, "scopes": ["read", "write"]},
                    {"name": "other", "token": "o" * 24, "scopes": ["read"]},
                ]
            }
        )
    )
    s = make_server(data_dir=folder / "d", auth_tokens_file=str(tokens))
    with Client(s.address, token=TOKEN) as c:
        c.create_collection("v", dim=3)
        c.upsert("v", [Item(f"i{k}", vector=[1, k, 0], metadata={"k": k}) for k in range(15)])
        c.create_collection("vlad", pooling="netvlad:clusters=2")
    return s


@pytest.fixture
def client(server):
    with Client(server.address, token=TOKEN, timeout=60) as c:
        yield c


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


AUTH = (("authorization", f"Bearer {TOKEN}"),)


# -- 13. malformed protobuf, FitPooling parameters --------------------------------------------------------

MALFORMED = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, with a length far past the end


@pytest.mark.parametrize(
    "method",
    [
        "/embedsvc.v1.EmbedService/Embed",
        "/embedsvc.v1.IndexService/Search",
        "/embedsvc.v1.IndexService/Upsert",
        "/embedsvc.v1.IndexService/FitPooling",
    ],
)
def test_malformed_protobuf_is_invalid_argument_and_one_log_line(channel, method, caplog):
    streaming = method.endswith(("Upsert", "FitPooling"))
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                if streaming:
                    channel.stream_unary(method)(iter([MALFORMED]), metadata=AUTH, timeout=30)
                else:
                    channel.unary_unary(method)(MALFORMED, metadata=AUTH, timeout=30)
            assert info.value.code() == C.INVALID_ARGUMENT and "malformed request" in info.value.details()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert len([r for r in caplog.records if "malformed request" in r.getMessage()]) == 3


@pytest.mark.parametrize(
    "params, words",
    [
        ({"seed": "-1"}, "seed must be between"),
        ({"seed": str(2**70)}, "seed must be between"),
        ({"max_descriptors": "0"}, "max_descriptors must be at least 1"),
        ({"max_descriptors": "-5"}, "max_descriptors must be at least 1"),
        ({"seed": "x"}, "seed must be an integer"),
    ],
)
def test_fit_pooling_parameters(channel, params, words):
    request = pb.FitPoolingRequest(
        collection="vlad", params=params, samples=[pb.Content(text=f"a red square {k}") for k in range(4)]
    )
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.IndexServiceStub(channel).FitPooling(iter([request]), metadata=AUTH, timeout=60)
    assert info.value.code() == C.INVALID_ARGUMENT and words in info.value.details()


# -- 14. long user input in messages ----------------------------------------------------------------------

LONG = "x" * 16_000


# (call, status, whether the message quotes the input: ids over 512 bytes are refused without quoting)
@pytest.mark.parametrize(
    "call, code, quotes",
    [
        (lambda c: c.search(LONG, vector=[1, 0, 0]), C.NOT_FOUND, True),
        (lambda c: c.get_collection(LONG), C.NOT_FOUND, True),
        (lambda c: c.create_collection(LONG, dim=3), C.INVALID_ARGUMENT, True),
        (lambda c: c.embed(["x"], model=LONG), C.NOT_FOUND, True),
        (lambda c: c.embed(["x"], [LONG]), C.INVALID_ARGUMENT, True),
        (lambda c: c.embed(["x"], [f"gem:p={LONG}"]), C.INVALID_ARGUMENT, True),
        (lambda c: c.upsert("v", [Item("m", vector=[1, 0, 0], metadata={LONG: 1})]), C.INVALID_ARGUMENT, True),
        (lambda c: c.search("v", id=LONG), C.INVALID_ARGUMENT, False),
        (lambda c: c.upsert("v", [Item(LONG, vector=[1, 0, 0])]), C.INVALID_ARGUMENT, False),
        (lambda c: c.delete("v", [LONG]), C.INVALID_ARGUMENT, False),
    ],
    ids=[
        "search",
        "get_collection",
        "create",
        "model",
        "pooling",
        "pooling param",
        "metadata key",
        "more-like-this",
        "item id",
        "delete",
    ],
)
def test_long_input_is_quoted_briefly(client, call, code, quotes):
    from embedsvc.service.errors import MAX_DETAILS_CHARS

    with pytest.raises(EmbedsvcClientError) as info:
        call(client)
    assert info.value.code == code, info.value
    assert len(info.value.details) < MAX_DETAILS_CHARS + 100
    assert not quotes or "16,000 characters" in info.value.details


def test_long_filter_key_and_stream_collection(channel):
    index = pb_grpc.IndexServiceStub(channel)
    search = pb.SearchRequest(
        collection="v",
        queries=[pb.Query(vector=pb.Vector(values=[1, 0, 0]))],
        filter=pb.Filter(must=[pb.Condition(key=LONG)]),
    )
    with pytest.raises(grpc.RpcError) as info:
        index.Search(search, metadata=AUTH, timeout=30)
    assert info.value.code() == C.INVALID_ARGUMENT and len(info.value.details()) < 1000
    messages = [
        pb.UpsertRequest(collection="v", items=[pb.UpsertItem(id="s", vector=pb.Vector(values=[1, 0, 0]))]),
        pb.UpsertRequest(collection=LONG),
    ]
    with pytest.raises(grpc.RpcError) as info:
        index.Upsert(iter(messages), metadata=AUTH, timeout=30)
    assert info.value.code() == C.INVALID_ARGUMENT and len(info.value.details()) < 1000


def test_status_details_are_capped_as_a_second_wall():
    from embedsvc.errors import InvalidInput
    from embedsvc.service.errors import MAX_DETAILS_CHARS, status_details

    details = status_details(InvalidInput("y" * 50_000))
    assert len(details) < MAX_DETAILS_CHARS + 100 and "50,000 characters" in details


# -- 16. top_k=0, duplicate authorization headers, truncated JPEG -----------------------------------------


def test_top_k_zero_means_ten_as_the_proto_and_the_errors_page_say(channel):
    response = pb_grpc.IndexServiceStub(channel).Search(
        pb.SearchRequest(collection="v", queries=[pb.Query(vector=pb.Vector(values=[1, 0, 0]))], top_k=0),
        metadata=AUTH,
        timeout=30,
    )
    assert len(response.results[0].hits) == 10
    proto = (ROOT / "protos/embedsvc/v1/embedsvc.proto").read_text()
    assert "0: 10" in proto
    errors_table = (ROOT / "docs" / "errors.md").read_text().split("## gRPC statuses", 1)[1].split("\n## ", 1)[0]
    assert "outside 1..`max_top_k`" not in errors_table and "`top_k` above `max_top_k`" in errors_table


@pytest.mark.parametrize("second", [TOKEN, "o" * 24], ids=["same", "another"])
def test_two_authorization_headers_are_refused(channel, second):
    metadata = (("authorization", f"Bearer {TOKEN}"), ("authorization", f"Bearer {second}"))
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.IndexServiceStub(channel).ListCollections(pb.ListCollectionsRequest(), metadata=metadata, timeout=30)
    assert info.value.code() == C.UNAUTHENTICATED and "exactly one" in info.value.details()


def test_jpeg_declaring_more_pixels_than_its_data_is_invalid(client):
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    frame = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, frame + 5, 6000, 6000)  # the header now says 6000x6000
    with pytest.raises(EmbedsvcClientError) as info:
        client.embed([bytes(data)])
    assert info.value.code == C.INVALID_ARGUMENT and "truncated or inconsistent" in info.value.details
    assert client.embed([buffer.getvalue()]).vectors["cls"].shape[0] == 1  # the honest file still embeds
    for progressive in (False, True):  # large flat images compress far, and are still whole
        flat = io.BytesIO()
        Image.new("RGB", (3000, 3000), (90, 90, 90)).save(flat, "JPEG", quality=5, progressive=progressive)
        assert client.embed([flat.getvalue()]).vectors["cls"].shape[0] == 1


# -- 17. start-up errors of `embedsvc serve` --------------------------------------------------------------


def _serve(tmp_path, *args, timeout=120):
    return serve_once("--data-dir", str(tmp_path / "d"), *args, timeout=timeout)


def _assert_one_line_exit_2(proc, words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and words in proc.stderr, proc.stderr
    not_logs = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(not_logs) == 1 and not_logs[0].startswith("embedsvc serve: error:"), proc.stderr


@pytest.mark.parametrize(
    "content, words",
    [
        ('{"tokens": {"a": 1}}', "expected"),
        ('{"tokens": [1]}', "not an object"),
        ('{"tokens": [{"name": "x", "token": "' + "k" * 20 + '", "scopes": "read"}]}', "scopes must be"),
        ('{"tokens": [{"name": "x", "token": 12345678901234567890, "scopes": ["read"]}]}', "at least 16"),
        ("[1, 2]", "expected"),
        ('{"tokens": []}', "turn auth off"),
        ("not json", "not JSON"),
    ],
    ids=["tokens-object", "entry-number", "scopes-string", "token-number", "list", "empty", "not-json"],
)
def test_bad_token_json_is_one_line_and_exit_2(tmp_path, content, words):
    path = tmp_path / "tokens.json"
    path.write_text(content)
    _assert_one_line_exit_2(_serve(tmp_path, "--auth-tokens-file", str(path)), words)


@pytest.mark.parametrize("swap", ["swapped", "not-pem"])
def test_bad_tls_pair_is_reported_as_such(tmp_path, swap):
    pytest.importorskip("cryptography")
    from test_security import _certificates

    certs = _certificates(tmp_path)
    if swap == "swapped":
        cert, key = certs["server_key"], certs["server"]
    else:
        (tmp_path / "junk.pem").write_text("this is not PEM\n")
        cert, key = certs["server"], str(tmp_path / "junk.pem")
    proc = _serve(tmp_path, "--tls-cert-file", cert, "--tls-key-file", key)
    _assert_one_line_exit_2(proc, "not a PEM certificate chain and its private key")
    assert "port is taken" not in proc.stderr


@pytest.mark.parametrize(
    "name, content, args, words",
    [
        ("c.json", "{not json", (), "cannot read it as JSON"),
        ("c.toml", "listen = = 1", (), "cannot read it as TOML"),
        ("c.json", "[1, 2]", (), "expected a table of settings"),
        ("m.json", "{broken", ("--models-file",), "models file"),
        ("m.json", '[{"name": "x", "architecture": "ViT-B-32", "bogus": 1}]', ("--models-file",), "models file"),
        (None, None, ("--log-level", "LOUD"), "log_level must be one of"),
        (None, None, ("--listen", "127.0.0.1:99999"), "port of 0-65535"),
        (None, None, ("--metrics-port", "99999"), "metrics_port must be"),
        (None, None, ("--shutdown-grace-seconds", "-1"), "shutdown_grace_seconds"),
        (None, None, ("--device", "tpu"), "unknown device"),
        (None, None, ("--precision", "fp8"), "unknown precision"),
        (None, None, ("--default-model", "nope"), "unknown model 'nope'"),
    ],
    ids=[
        "config-json",
        "config-toml",
        "config-list",
        "models-json",
        "models-key",
        "log-level",
        "listen-port",
        "metrics-port",
        "grace",
        "device",
        "precision",
        "default-model",
    ],
)
def test_other_start_up_errors_are_one_line_and_exit_2(tmp_path, name, content, args, words):
    if name:
        path = tmp_path / name
        path.write_text(content)
        args = (*args, str(path)) if args else ("--config", str(path))
    _assert_one_line_exit_2(_serve(tmp_path, *args), words)
