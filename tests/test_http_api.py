"""The HTTP/JSON API on a real server: JSON lines and multipart, thumbnails, auth and scopes, limits,
hostile input (4xx with a message, and the server keeps serving), probes, metrics, OpenAPI and docs."""

from __future__ import annotations

import base64
import io
import json
import socket
import sqlite3

import httpx
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image
from serving import ServerThread, running_server, tiny_config

from embedsvc.errors import InvalidInput
from embedsvc.models import MODEL_REGISTRY
from embedsvc.service.config import ServerConfig
from embedsvc.service.http import ENDPOINTS

READ, WRITE = "r" * 24, "w" * 24
LIMIT = 64 * 1024  # http_max_body_bytes of the test server: small, so "huge" is cheap to send


def png(colour, size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(make_server):
    srv = make_server(
        http_listen="127.0.0.1:0",
        store_thumbnails=True,
        http_max_body_bytes=LIMIT,
        max_items_per_request=8,
        max_image_bytes=20_000,
    )
    with httpx.Client(base_url=srv.http_url, timeout=60) as http:
        assert http.post("/v1/collections", json={"config": {"name": "pics"}}).status_code == 200
        assert http.post("/v1/collections", json={"config": {"name": "vec", "dim": 3}}).status_code == 200
        yield srv, http


def error(response: httpx.Response, status: int, code: str, words: str = "") -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and body["message"], body
    assert words.lower() in body["message"].lower(), body["message"]
    return body["message"]


def test_json_lines_upsert_is_batched_like_a_stream(server):
    srv, http = server
    lines = "\n".join(
        json.dumps({"id": f"v{i}", "vector": {"values": [1, i, 0]}, "metadata": {"i": {"numberValue": i}}})
        for i in range(20)
    )
    response = http.post(
        "/v1/collections/vec/items", content=lines + "\n\n", headers={"content-type": "application/x-ndjson"}
    )
    assert response.json() == {"inserted": "20", "replaced": "0", "count": "20"}  # 20 > 8 per request: 3 batches
    bad = "\n".join([json.dumps({"id": "ok", "vector": {"values": [1, 0, 0]}}), "{not json"])
    message = error(
        http.post("/v1/collections/vec/items", content=bad, headers={"content-type": "application/x-ndjson"}),
        400,
        "INVALID_ARGUMENT",
        "line 2",
    )
    assert "UpsertItem" in message
    late = "\n".join([json.dumps({"id": f"w{i}", "vector": {"values": [1, 0, i]}}) for i in range(9)] + ["{broken"])
    error(
        http.post("/v1/collections/vec/items", content=late, headers={"content-type": "application/x-ndjson"}),
        400,
        "INVALID_ARGUMENT",
        "line 10 is not a valid UpsertItem",
    )
    assert (
        "the 8 items of the lines before were stored"
        in http.post(
            "/v1/collections/vec/items", content=late, headers={"content-type": "application/x-ndjson"}
        ).json()["message"]
    )
    got = http.post("/v1/collections/vec/get", json={"ids": ["v3", "ok"]}).json()
    assert [i["id"] for i in got["items"]] == ["v3"] and got["missingIds"] == ["ok"]


def test_search_by_upload_base64_vector_and_id_with_filter(server):
    srv, http = server
    red, blue = png((230, 20, 20)), png((20, 20, 230))
    items = [
        {"id": "red", "content": {"image": b64(red)}, "metadata": {"colour": {"stringValue": "red"}}},
        {"id": "blue", "content": {"image": b64(blue)}, "metadata": {"colour": {"stringValue": "blue"}}},
        {"id": "note", "content": {"text": "a note"}, "metadata": {"colour": {"stringValue": "none"}}},
    ]
    assert http.post("/v1/collections/pics/items", json={"items": items}).status_code == 200
    by_upload = http.post(
        "/v1/collections/pics/search",
        files={"image": ("q.png", red, "image/png")},
        data={"request": json.dumps({"topK": 2, "includeMetadata": True})},
    ).json()
    by_base64 = http.post(
        "/v1/collections/pics/search", json={"queries": [{"image": b64(red)}], "topK": 2, "includeMetadata": True}
    ).json()
    assert by_upload == by_base64
    assert by_upload["results"][0]["hits"][0]["id"] == "red"
    assert by_upload["results"][0]["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    filtered = http.post(
        "/v1/collections/pics/search",
        json={
            "queries": [{"id": "red"}],
            "topK": 5,
            "filter": {
                "must": [{"key": "colour", "in": {"values": [{"stringValue": "blue"}, {"stringValue": "none"}]}}]
            },
        },
    )
    assert sorted(h["id"] for h in filtered.json()["results"][0]["hits"]) == ["blue", "note"]
    text = http.post(
        "/v1/collections/pics/search", files={"image": ("q.png", blue, "image/png")}, data={"text": "a note"}
    ).json()
    assert len(text["results"]) == 2  # the text field and the upload are two queries


def test_filter_text_is_the_cli_grammar_parsed_by_the_server(server):
    """`filterText` takes the CLI's grammar (ranges with strict and inclusive bounds, any-of, typed values); text
    that does not parse is 400 INVALID_ARGUMENT naming the accepted forms; a key no item holds is named in
    `unknownFilterKeys`; the structured `filter` and the text are one or the other."""
    from embedsvc.store.filter_text import FORMS

    srv, http = server
    rows = [{"n": n, "kind": ["a", "b", "c"][n % 3]} for n in range(8)]
    items = [
        {
            "id": f"r{r['n']}",
            "vector": {"values": [1, r["n"], 0]},
            "metadata": {"n": {"numberValue": r["n"]}, "kind": {"stringValue": r["kind"]}},
        }
        for r in rows
    ]
    assert http.post("/v1/collections", json={"config": {"name": "ranks", "dim": 3}}).status_code == 200
    assert http.post("/v1/collections/ranks/items", json={"items": items}).status_code == 200

    def search(**body):
        return http.post(
            "/v1/collections/ranks/search", json={"queries": [{"vector": {"values": [1, 0, 0]}}], "topK": 20, **body}
        )

    for text, selects in {
        "n>=5": lambda r: r["n"] >= 5,
        "n>5": lambda r: r["n"] > 5,
        "n<2": lambda r: r["n"] < 2,
        "n<=2 kind=a|c": lambda r: r["n"] <= 2 and r["kind"] in ("a", "c"),
        "n>1 n<6 kind=b": lambda r: 1 < r["n"] < 6 and r["kind"] == "b",
    }.items():
        reply = search(filterText=text).json()
        assert sorted(h["id"] for h in reply["results"][0]["hits"]) == [f"r{r['n']}" for r in rows if selects(r)], text
        assert reply["unknownFilterKeys"] == []
    strict = search(filter={"must": [{"key": "n", "range": {"gt": 5}}]}).json()
    assert sorted(h["id"] for h in strict["results"][0]["hits"]) == ["r6", "r7"]
    for text in ("n=>5", "n=", "n>=five", "kind!=a", 'kind="a'):
        message = error(search(filterText=text), 400, "INVALID_ARGUMENT", FORMS)
        assert repr(text) in message or text in message
    error(
        search(filterText="n>=5", filter={"must": [{"key": "n", "equals": {"numberValue": 1}}]}),
        400,
        "INVALID_ARGUMENT",
        "not both",
    )
    missing = search(filterText="m>=5 kind=a").json()
    assert missing["results"][0]["hits"] == [] and missing["unknownFilterKeys"] == ["m"]
    assert search(filterText="kind=z").json()["unknownFilterKeys"] == []  # a held key: empty is the answer
    from embedsvc.client import Client, InvalidArgumentError, UnknownFilterKeyWarning

    with Client(srv.address, timeout=60) as client:  # over gRPC: the Python client takes the same text
        assert sorted(h.id for h in client.search("ranks", vector=[1, 0, 0], top_k=20, filter="n>5")) == ["r6", "r7"]
        with pytest.warns(UnknownFilterKeyWarning, match="'ranks' has the metadata key 'm'"):
            assert client.search("ranks", vector=[1, 0, 0], filter="m>=5") == []
        with pytest.raises(InvalidArgumentError, match="KEY>=X"):
            client.search("ranks", vector=[1, 0, 0], filter="n=>5")


def test_thumbnails_are_stored_served_and_removed_with_their_items(server):
    srv, http = server
    big = png((10, 200, 10), size=(600, 300))
    http.post("/v1/collections/pics/items", json={"items": [{"id": "big/one", "content": {"image": b64(big)}}]})
    response = http.get("/v1/collections/pics/items/big/one/thumbnail")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.size == (256, 128) and thumb.getpixel((128, 64))[1] > 150
    error(http.get("/v1/collections/pics/items/note/thumbnail"), 404, "NOT_FOUND", "has no thumbnail")
    # Replaced by a text item: the old picture must not be shown for the new content.
    http.post("/v1/collections/pics/items", json={"items": [{"id": "big/one", "content": {"text": "now text"}}]})
    error(http.get("/v1/collections/pics/items/big/one/thumbnail"), 404, "NOT_FOUND")
    http.post("/v1/collections/pics/items", json={"items": [{"id": "big/one", "content": {"image": b64(big)}}]})
    http.post("/v1/collections/pics/delete", json={"ids": ["big/one"]})
    error(http.get("/v1/collections/pics/items/big/one/thumbnail"), 404, "NOT_FOUND", "not in the collection")
    http.post("/v1/collections", json={"config": {"name": "tmp"}})
    http.post("/v1/collections/tmp/items", json={"items": [{"id": "x", "content": {"image": b64(big)}}]})
    assert http.get("/v1/collections/tmp/items/x/thumbnail").status_code == 200
    assert http.delete("/v1/collections/tmp").json() == {"itemsRemoved": "1"}
    db = sqlite3.connect(srv.config.data_dir + "/store.sqlite3")
    ids = {row[0] for row in db.execute("SELECT id FROM thumbnails")}
    db.close()
    assert "x" not in ids and "big/one" not in ids and {"red", "blue"} <= ids


HOSTILE = [
    (
        "bad json",
        "/v1/collections/pics/search",
        b'{"queries": [',
        "application/json",
        400,
        "INVALID_ARGUMENT",
        "SearchRequest",
    ),
    (
        "wrong type",
        "/v1/collections/pics/search",
        b'{"queries": [{"text": "x"}], "topK": "many"}',
        "application/json",
        400,
        "INVALID_ARGUMENT",
        "topK",
    ),
    (
        "negative",
        "/v1/collections/pics/search",
        b'{"queries": [{"text": "x"}], "topK": -1}',
        "application/json",
        400,
        "INVALID_ARGUMENT",
        "",
    ),
    ("unknown field", "/v1/embed", b'{"input": [{"text": "x"}]}', "application/json", 400, "INVALID_ARGUMENT", "input"),
    (
        "bad base64",
        "/v1/embed",
        b'{"inputs": [{"image": "***not base64***"}]}',
        "application/json",
        400,
        "INVALID_ARGUMENT",
        "base64",
    ),
    (
        "not an image",
        "/v1/embed",
        json.dumps({"inputs": [{"image": b64(b"GIF89a garbage")}]}).encode(),
        "application/json",
        400,
        "INVALID_ARGUMENT",
        "decode",
    ),
    (
        "not utf-8",
        "/v1/embed",
        b'{"inputs": [{"text": "\xff\xfe"}]}',
        "application/json",
        400,
        "INVALID_ARGUMENT",
        "UTF-8",
    ),
    (
        "deep nesting",
        "/v1/embed",
        b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "application/json",
        400,
        "INVALID_ARGUMENT",
        "",
    ),
    ("a list body", "/v1/embed", b"[1, 2]", "application/json", 400, "INVALID_ARGUMENT", ""),
    (
        "wrong media type",
        "/v1/embed",
        b"inputs=x",
        "application/x-www-form-urlencoded",
        415,
        "INVALID_ARGUMENT",
        "application/json",
    ),
    (
        "broken multipart",
        "/v1/collections/pics/search",
        b"--x\r\nnonsense",
        "multipart/form-data; boundary=x",
        400,
        "INVALID_ARGUMENT",
        "",
    ),
    (
        "too many items",
        "/v1/collections/vec/items",
        json.dumps({"items": [{"id": f"i{i}", "vector": {"values": [1, 0, 0]}} for i in range(9)]}).encode(),
        "application/json",
        429,
        "RESOURCE_EXHAUSTED",
        "limit of 8",
    ),
    (
        "image over max_image_bytes",
        "/v1/embed",
        json.dumps({"inputs": [{"image": b64(b"\0" * 30_000)}]}).encode(),
        "application/json",
        400,
        "INVALID_ARGUMENT",
        "limit",
    ),
    (
        "body over http_max_body_bytes",
        "/v1/embed",
        b'{"inputs": [{"text": "' + b"x" * LIMIT + b'"}]}',
        "application/json",
        413,
        "RESOURCE_EXHAUSTED",
        "http_max_body_bytes",
    ),
    (
        "path traversal",
        "/v1/collections/..%2F..%2Fetc%2Fpasswd/search",
        b'{"queries": [{"text": "x"}]}',
        "application/json",
        404,
        "NOT_FOUND",
        "",
    ),
    (
        "traversal in a new name",
        "/v1/collections",
        b'{"config": {"name": "../../etc"}}',
        "application/json",
        400,
        "INVALID_ARGUMENT",
        "name",
    ),
    (
        "collection mismatch",
        "/v1/collections/pics/search",
        b'{"collection": "vec", "queries": [{"text": "x"}]}',
        "application/json",
        400,
        "INVALID_ARGUMENT",
        "path names",
    ),
    ("no route", "/v1/nothing", b"{}", "application/json", 404, "NOT_FOUND", "/docs"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_input_gets_4xx_with_a_message_and_the_server_keeps_serving(server, case):
    srv, http = server
    _, path, body, kind, status, code, words = case
    error(http.post(path, content=body, headers={"content-type": kind}), status, code, words)
    assert http.get("/v1/collections/pics").json()["config"]["name"] == "pics"


def test_a_chunked_body_over_the_limit_is_cut_off(server):
    srv, http = server

    def chunks():
        for _ in range(8):
            yield b"x" * (LIMIT // 4)

    error(
        http.post("/v1/embed", content=chunks(), headers={"content-type": "application/json"}),
        413,
        "RESOURCE_EXHAUSTED",
        "http_max_body_bytes",
    )
    with socket.create_connection(("127.0.0.1", srv.server.http_port), timeout=10) as raw:  # garbage on the wire
        raw.sendall(b"\x16\x03\x01 this is not http\r\n\r\n")
        raw.recv(1024)
    assert http.get("/healthz").json() == {"status": "ok"}


def test_wrong_methods_and_reads_of_missing_things(server):
    srv, http = server
    error(http.get("/v1/embed"), 405, "UNIMPLEMENTED")
    error(http.get("/v1/collections/missing"), 404, "NOT_FOUND", "missing")
    error(http.post("/v1/collections", json={"config": {"name": "pics"}}), 409, "ALREADY_EXISTS")
    error(http.get("/v1/collections/pics/items/..%2F..%2Fstore.sqlite3/thumbnail"), 404, "NOT_FOUND")


def test_auth_uses_the_grpc_tokens_and_scopes(tiny_spec, tmp_path):
    tokens = json.dumps(
        {
            "tokens": [
                {"name": "reader", "token": READ, "scopes": ["read"]},
                {"name": "writer", "token": WRITE, "scopes": ["read", "write"]},
            ]
        }
    )
    config = tiny_config(tiny_spec, tmp_path, http_listen="127.0.0.1:0", auth_tokens=tokens)
    with running_server(config) as srv, httpx.Client(base_url=srv.http_url, timeout=60) as http:
        create = {"config": {"name": "c", "dim": 2}}
        error(http.post("/v1/collections", json=create), 401, "UNAUTHENTICATED", "Bearer")
        error(http.get("/v1/collections", headers={"authorization": "Bearer " + "z" * 24}), 401, "UNAUTHENTICATED")
        error(
            http.post("/v1/collections", json=create, headers={"authorization": f"Bearer {READ}"}),
            403,
            "PERMISSION_DENIED",
            "'write' scope",
        )
        assert (
            http.post("/v1/collections", json=create, headers={"authorization": f"Bearer {WRITE}"}).status_code == 200
        )
        assert http.get("/v1/collections", headers={"authorization": f"Bearer {READ}"}).status_code == 200
        error(http.get("/v1/collections/c/items/a/thumbnail"), 401, "UNAUTHENTICATED")
        for open_path in ("/healthz", "/readyz", "/openapi.json", "/docs", "/"):  # probes and the page stay open
            assert http.get(open_path).status_code == 200, open_path
        assert http.get("/openapi.json").json()["security"] == [{"bearer": []}]
    MODEL_REGISTRY.pop(tiny_spec.name, None)


def test_metrics_count_http_requests_by_method(server):
    srv, http = server
    before = _count(srv, "ListCollections", "OK")
    http.get("/v1/collections")
    http.get("/v1/collections")
    http.get("/v1/collections/nope")
    assert _count(srv, "ListCollections", "OK") == before + 2
    assert _count(srv, "GetCollection", "NOT_FOUND") >= 1


def _count(srv, method: str, code: str) -> float:
    value = srv.server.engine.metrics.registry.get_sample_value(
        "embedsvc_requests_total", {"method": method, "code": code}
    )
    return value or 0.0


def test_openapi_lists_every_endpoint_with_proto_json_names(server):
    srv, http = server
    document = http.get("/openapi.json").json()
    operations = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    assert {e.rpc for e in ENDPOINTS} | {"GetThumbnail", "healthz", "readyz"} <= operations
    search = document["components"]["schemas"]["SearchRequest"]["properties"]
    assert {"topK", "includeMetadata", "queries", "filter", "filterText"} <= set(search)
    from embedsvc.store.filter_text import FORMS

    assert FORMS in search["filterText"]["description"]  # the grammar, in the docs page's field table too
    assert document["components"]["schemas"]["CollectionInfo"]["properties"]["count"]["type"] == "string"  # uint64
    docs = http.get("/docs")
    assert docs.headers["content-type"].startswith("text/html") and "openapi.json" in docs.text
    assert "https://" not in docs.text and "https://" not in http.get("/").text  # works offline: no CDN


def test_readyz_turns_503_while_draining_and_healthz_stays_ok(tiny_spec, tmp_path):
    srv = ServerThread(tiny_config(tiny_spec, tmp_path, http_listen="127.0.0.1:0")).start()
    try:
        with httpx.Client(base_url=srv.http_url, timeout=30) as http:
            assert http.get("/readyz").status_code == 200
            srv.server.http.drain()
            assert http.get("/readyz").status_code == 503
            error(http.get("/v1/collections"), 503, "UNAVAILABLE", "shutting down")
            assert http.get("/healthz").status_code == 200
    finally:
        srv.stop()
        MODEL_REGISTRY.pop(tiny_spec.name, None)


def test_a_taken_http_port_is_a_clear_startup_error(tiny_spec, tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        config = tiny_config(tiny_spec, tmp_path, http_listen=f"127.0.0.1:{blocker.getsockname()[1]}")
        with pytest.raises(InvalidInput, match=r"cannot serve HTTP .* port is taken"):
            ServerThread(config).start()
    MODEL_REGISTRY.pop(tiny_spec.name, None)
    with pytest.raises(InvalidInput, match="http_listen must be HOST:PORT"):
        ServerConfig(http_listen="8080").validate()


FIELD_NAMES = sorted(
    {f.json_name for e in ENDPOINTS for f in e.request_type.DESCRIPTOR.fields}
    | {
        "text",
        "image",
        "vector",
        "values",
        "id",
        "content",
        "metadata",
        "stringValue",
        "numberValue",
        "must",
        "key",
        "equals",
        "range",
        "gte",
        "name",
        "params",
        "config",
        "dim",
    }
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=16,
)


@settings(max_examples=60, deadline=None)
@given(endpoint=st.sampled_from([e for e in ENDPOINTS if e.body]), body=JSON)
def test_random_json_gets_an_answer_never_a_500(server, endpoint, body):
    srv, http = server
    response = http.request(
        endpoint.method,
        endpoint.path.format(name="pics"),
        content=json.dumps(body),
        headers={"content-type": "application/json"},
    )
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()) == {"code", "message"} and response.json()["message"]


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_http_serves_tls_with_the_grpc_certificates(tmp_path, mutual):
    pytest.importorskip("cryptography")
    from test_security import _certificates

    certs = _certificates(tmp_path)
    config = ServerConfig(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        data_dir=str(tmp_path / "d"),
        metrics_port=-1,
        demo_size=0,
        preload_models="",
        log_format="text",
        tls_cert_file=certs["server"],
        tls_key_file=certs["server_key"],
        tls_client_ca_file=certs["ca"] if mutual else "",
    )
    with running_server(config) as srv:
        url = f"https://127.0.0.1:{srv.server.http_port}/v1/collections"
        cert = (certs["client"], certs["client_key"]) if mutual else None
        with httpx.Client(verify=_context(certs["ca"], cert), timeout=20) as https:
            assert https.get(url).json() == {"collections": []}
        with pytest.raises(httpx.TransportError):  # plain HTTP on the TLS port
            httpx.get(url.replace("https", "http"), timeout=5)
        if mutual:
            with pytest.raises(httpx.TransportError):  # no client certificate
                httpx.get(url, verify=_context(certs["ca"]), timeout=5)


def _context(ca: str, cert=None):
    import ssl

    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(*cert)
    return context


def test_the_http_socket_is_tcp_so_responses_are_not_held_back_by_nagle(server):
    srv, http = server
    # asyncio sets TCP_NODELAY on accepted connections only when the listening socket says IPPROTO_TCP; without
    # it every keep-alive response waited ~40 ms for a delayed ACK (bench/http_vs_grpc.py showed it).
    assert srv.server.http.sock.proto == socket.IPPROTO_TCP
