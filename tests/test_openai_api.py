"""OpenAI's embeddings API on a real server, driven by the real `openai` SDK and langchain-openai: vectors equal
gRPC Embed's, both encodings, images as data URLs, poolings by model suffix or field, usage, and every
refusal as the SDK's typed exception with OpenAI's error body."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from serving import running_server, tiny_config

from embedsvc.client import Client

READ, WRITE = "r" * 24, "w" * 24
LIMIT = 256 * 1024


def png(colour, size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


RED, BLUE = png((230, 20, 20)), png((20, 20, 230))
TEXTS = ["a red square", "two blue circles on a green field"]


@pytest.fixture(scope="module")
def server(make_server):
    srv = make_server(
        http_listen="127.0.0.1:0", http_max_body_bytes=LIMIT, max_image_bytes=LIMIT // 2, max_items_per_request=8
    )
    with Client(srv.address) as grpc_client:
        sdk = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="unused", max_retries=0)
        yield srv, sdk, grpc_client
        sdk.close()


def grpc_vectors(client: Client, inputs, pooling="cls") -> np.ndarray:
    return client.embed(inputs, poolings=[pooling]).vectors[pooling]


@pytest.mark.parametrize("encoding", ["float", "base64", None])
def test_texts_and_images_equal_grpc_embed_in_either_encoding(server, tiny_spec, encoding):
    srv, sdk, client = server
    kwargs = {"encoding_format": encoding} if encoding else {}  # None: the SDK asks for base64 and decodes it
    response = sdk.embeddings.create(
        model=tiny_spec.name, input=[TEXTS[0], data_url(RED), TEXTS[1], data_url(BLUE, "jpeg")], **kwargs
    )
    expected = grpc_vectors(client, [TEXTS[0], RED, TEXTS[1], BLUE])
    if encoding == "base64":  # asked for explicitly, the SDK hands the strings over as they came
        got = np.array([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in response.data])
    else:
        got = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert [d.index for d in response.data] == [0, 1, 2, 3]
    assert got.shape == expected.shape == (4, 32)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert response.model == tiny_spec.name and response.object == "list"
    tokenizer = srv.server.engine.loaded_models()[tiny_spec.name].encoder.loaded.tokenizer
    text_tokens = sum(len(tokenizer.encode(t)) + 2 for t in TEXTS)  # SOT and EOT; images count 0
    assert response.usage.prompt_tokens == response.usage.total_tokens == text_tokens


def test_response_shape_on_the_wire(server, tiny_spec):
    srv, sdk, client = server
    for encoding in ("float", "base64"):
        raw = httpx.post(
            srv.http_url + "/v1/embeddings",
            json={"model": tiny_spec.name, "input": "a red square", "encoding_format": encoding},
        ).json()
        assert set(raw) == {"object", "data", "model", "usage"} and raw["object"] == "list"
        assert raw["data"][0].keys() == {"object", "index", "embedding"} and raw["data"][0]["object"] == "embedding"
        assert isinstance(raw["data"][0]["embedding"], list if encoding == "float" else str)


def test_pooling_by_model_suffix_or_field(server, tiny_spec):
    srv, sdk, client = server
    inputs = [TEXTS[0], data_url(RED)]
    expected = grpc_vectors(client, [TEXTS[0], RED], "gem:p=3")
    by_suffix = sdk.embeddings.create(model=f"{tiny_spec.name}:gem:p=3", input=inputs, encoding_format="float")
    by_field = sdk.embeddings.create(model=tiny_spec.name, input=inputs, extra_body={"pooling": "gem:p=3"})
    for response in (by_suffix, by_field):
        np.testing.assert_allclose(np.array([d.embedding for d in response.data]), expected, atol=1e-6, rtol=0)
    assert not np.allclose(expected, grpc_vectors(client, [TEXTS[0], RED]))  # not what cls gives
    assert by_suffix.model == f"{tiny_spec.name}:gem:p=3"


def test_langchain_openai_embeddings(server, tiny_spec):
    from langchain_openai import OpenAIEmbeddings

    srv, sdk, client = server
    embeddings = OpenAIEmbeddings(
        model=tiny_spec.name,
        base_url=srv.http_url + "/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    documents = embeddings.embed_documents([TEXTS[0], data_url(RED), TEXTS[1]])
    query = embeddings.embed_query(TEXTS[1])
    np.testing.assert_allclose(np.array(documents), grpc_vectors(client, [TEXTS[0], RED, TEXTS[1]]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(query, documents[2], atol=1e-6, rtol=0)


def test_models_list_is_openais_beside_the_native_fields(server, tiny_spec):
    srv, sdk, client = server
    ids = [m.id for m in sdk.models.list()]
    native = httpx.get(srv.http_url + "/v1/models").json()
    assert ids == [m["name"] for m in native["models"]] and tiny_spec.name in ids
    assert native["defaultModel"] == tiny_spec.name and native["poolings"]
    assert all(m["object"] == "model" and m["created"] == 0 and m["owned_by"] == "embedsvc" for m in native["data"])


def test_long_texts_are_refused_unless_truncation_is_asked_for(server, tiny_spec):
    srv, sdk, client = server
    long_text = "cat " * 200
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.embeddings.create(model=tiny_spec.name, input=["short", long_text])
    assert "input 1" in caught.value.body["message"] and "77 tokens" in caught.value.body["message"]
    assert caught.value.body["param"] == "input"
    response = sdk.embeddings.create(
        model=tiny_spec.name, input=["short", long_text], encoding_format="float", extra_body={"truncate": True}
    )
    np.testing.assert_allclose(
        np.array([d.embedding for d in response.data]), grpc_vectors(client, ["short", long_text]), atol=1e-6, rtol=0
    )
    assert response.usage.prompt_tokens == 3 + 77


REFUSALS = [  # (request fields, SDK exception, HTTP status, param, words in the message)
    ({"input": [[1, 2, 3]]}, openai.BadRequestError, 400, "input", "check_embedding_ctx_length=False"),
    ({"input": [101, 102]}, openai.BadRequestError, 400, "input", "token ids"),
    ({"input": "https://example.com/cat.png"}, openai.BadRequestError, 400, "input", "fetches nothing"),
    ({"input": "data:image/png;base64,@@@"}, openai.BadRequestError, 400, "input", "does not decode"),
    ({"input": "data:text/plain;base64,aGk="}, openai.BadRequestError, 400, "input", "data:image/<type>;base64"),
    ({"input": data_url(b"not an image")}, openai.BadRequestError, 400, None, "input 0"),
    ({"input": []}, openai.BadRequestError, 400, "input", "empty"),
    ({"input": ["ok", "  "]}, openai.BadRequestError, 400, None, "empty"),
    ({"input": "x", "dimensions": 16}, openai.BadRequestError, 400, "dimensions", "32-dimensional"),
    ({"input": "x", "encoding_format": "int8"}, openai.BadRequestError, 400, "encoding_format", "float or base64"),
    ({"input": "x", "model": "text-embedding-3-small"}, openai.NotFoundError, 404, "model", "GET /v1/models"),
    ({"input": "x", "model": "{model}:nonesuch"}, openai.BadRequestError, 400, None, "nonesuch"),
    ({"input": "x", "model": "{model}:gem", "pooling": "avg"}, openai.BadRequestError, 400, "pooling", "once"),
    ({"input": "x", "model": "{model}:"}, openai.BadRequestError, 400, "model", "pooling is empty"),
    ({"input": "x", "model": "{model}:gem:p"}, openai.BadRequestError, 400, "model", "key=value"),
    ({"input": ["x"] * 9}, openai.RateLimitError, 429, None, "over the limit of 8"),
    ({"input": "x", "temperature": 1}, openai.BadRequestError, 400, "temperature", "unknown field"),
]


@pytest.mark.parametrize(
    "fields, exception, status, param, words", REFUSALS, ids=[str(i) for i in range(len(REFUSALS))]
)
def test_refusals_are_the_sdks_typed_errors_in_openais_shape(
    server, tiny_spec, fields, exception, status, param, words
):
    srv, sdk, client = server
    fields = {"model": tiny_spec.name, **fields}
    fields["model"] = fields["model"].replace("{model}", tiny_spec.name)
    extra = {k: fields.pop(k) for k in ("pooling", "temperature") if k in fields}
    with pytest.raises(exception) as caught:
        sdk.embeddings.create(**fields, extra_body=extra)
    error = caught.value
    assert error.status_code == status
    assert set(error.body) == {"message", "type", "param", "code"}, error.body
    assert words in error.body["message"] and error.body["param"] == param
    assert error.body["type"] == ("rate_limit_error" if status == 429 else "invalid_request_error")
    assert error.body["code"] == {400: "invalid_argument", 404: "not_found", 429: "resource_exhausted"}[status]
    assert sdk.embeddings.create(model=tiny_spec.name, input="still serving").data  # the server keeps serving


def test_errors_outside_the_route_take_openais_shape_too(server, tiny_spec):
    srv, sdk, client = server
    huge = httpx.post(srv.http_url + "/v1/embeddings", json={"model": tiny_spec.name, "input": "x" * LIMIT})
    assert huge.status_code == 413
    error = huge.json()["error"]
    assert error["code"] == "resource_exhausted" and "http_max_body_bytes" in error["message"]
    wrong_method = httpx.get(srv.http_url + "/v1/embeddings")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    not_json = httpx.post(
        srv.http_url + "/v1/embeddings", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]["message"]
    native = httpx.post(srv.http_url + "/v1/embed", json={})  # the native API keeps its own error body
    assert set(native.json()) == {"code", "message"}


@pytest.mark.parametrize("kind", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_post_without_a_json_type_is_415_in_openais_shape(server, tiny_spec, kind):
    """Like every write, /v1/embeddings reads application/json only (what the SDKs send): a body type a page of
    another site may send without a preflight never reaches the route, and the refusal is OpenAI's body."""
    srv, sdk, client = server
    body = json.dumps({"model": tiny_spec.name, "input": "a red square"}).encode()
    refused = httpx.post(srv.http_url + "/v1/embeddings", content=body, headers={"content-type": kind} if kind else {})
    assert refused.status_code == 415, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_argument", None)
    assert (
        "application/json" in error["message"]
        and (repr(kind) if kind else "no content-type") in error["message"].lower()
    )
    for accepted in ("application/json; charset=utf-8", "application/vnd.example+json"):
        response = httpx.post(srv.http_url + "/v1/embeddings", content=body, headers={"content-type": accepted})
        assert response.status_code == 200 and len(response.json()["data"]) == 1


def test_browser_refusals_are_the_sdks_typed_errors_in_openais_shape(server, tiny_spec):
    """A page of another origin (403) and a rebound Host name (421) are refused before the route, in OpenAI's body."""
    srv, sdk, client = server
    foreign = sdk.with_options(default_headers={"origin": "https://attacker.example"})
    with pytest.raises(openai.PermissionDeniedError) as caught:
        foreign.embeddings.create(model=tiny_spec.name, input="a red square")
    assert caught.value.status_code == 403 and set(caught.value.body) == {"message", "type", "param", "code"}
    assert (caught.value.body["type"], caught.value.body["code"]) == ("permission_error", "permission_denied")
    assert "http_cors_origins" in caught.value.body["message"]
    rebound = sdk.with_options(default_headers={"host": "attacker.example"})
    with pytest.raises(openai.APIStatusError) as caught:
        rebound.embeddings.create(model=tiny_spec.name, input="a red square")
    assert caught.value.status_code == 421 and set(caught.value.body) == {"message", "type", "param", "code"}
    assert (caught.value.body["type"], caught.value.body["code"]) == ("permission_error", "permission_denied")
    assert "http_allowed_hosts" in caught.value.body["message"]
    assert sdk.embeddings.create(model=tiny_spec.name, input="a red square").data  # the SDK's own requests pass


def test_tokens_and_scopes_are_embeds(tiny_spec, tmp_path):
    tokens = json.dumps(
        {
            "tokens": [
                {"name": "reader", "token": READ, "scopes": ["read"]},
                {"name": "writer", "token": WRITE, "scopes": ["write"]},
            ]
        }
    )
    config = tiny_config(tiny_spec, tmp_path, http_listen="127.0.0.1:0", auth_tokens=tokens)
    with running_server(config) as srv:

        def sdk(key):
            return openai.OpenAI(base_url=srv.http_url + "/v1", api_key=key, max_retries=0)

        assert len(sdk(READ).embeddings.create(model=tiny_spec.name, input=["a", "b"]).data) == 2
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk("x" * 24).embeddings.create(model=tiny_spec.name, input="a")
        assert caught.value.body["type"] == "authentication_error" and caught.value.body["code"] == "unauthenticated"
        with pytest.raises(openai.PermissionDeniedError) as caught:
            sdk(WRITE).embeddings.create(model=tiny_spec.name, input="a")
        assert "read" in caught.value.body["message"]


def test_openapi_documents_the_endpoint_and_the_responses_match_it(server, tiny_spec):
    from jsonschema import Draft202012Validator

    from embedsvc.service.openai_api import FIELDS

    srv, sdk, client = server
    document = httpx.get(srv.http_url + "/openapi.json").json()

    def check(schema: str, instance) -> None:
        Draft202012Validator({**document, "$ref": f"#/components/schemas/{schema}"}).validate(instance)

    operation = document["paths"]["/v1/embeddings"]["post"]
    request = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert set(document["components"]["schemas"][request]["properties"]) == set(FIELDS)
    for encoding in ("float", "base64"):
        check(
            "OpenAIEmbeddingsResponse",
            httpx.post(
                srv.http_url + "/v1/embeddings",
                json={"model": tiny_spec.name, "input": ["a", data_url(RED)], "encoding_format": encoding},
            ).json(),
        )
    check("OpenAIError", httpx.post(srv.http_url + "/v1/embeddings", json={"model": "nope", "input": "a"}).json())
    assert operation["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    assert {"403", "415", "421"} <= set(operation["responses"])
    assert operation["responses"]["415"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
    models = document["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    Draft202012Validator({**document, **models}).validate(httpx.get(srv.http_url + "/v1/models").json())
    assert {"$ref": "#/components/schemas/OpenAIModelList"} in models["allOf"]


@pytest.mark.parametrize(
    "field, value, param",
    [
        ("input", "\\ud800", "input"),
        ("input", ["ok", "\\udfff x"], "input"),
        ("model", "{model}:\\ud800", "model"),
        ("pooling", "gem:p=\\ud800", "pooling"),
        ("encoding_format", "", "encoding_format"),
    ],
)
def test_text_no_model_can_read_is_a_400_naming_its_field(server, tiny_spec, field, value, param):
    """A lone UTF-16 surrogate (valid JSON, not Unicode) was a 500 from deep in the protobuf; an empty
    encoding_format was read as float. Both are the caller's to fix, and the answer says where."""
    srv, sdk, client = server
    body = {"model": tiny_spec.name, "input": "a red square"}
    body[field] = value.replace("{model}", tiny_spec.name) if isinstance(value, str) else value
    raw = json.dumps(body).replace("\\\\u", "\\u").encode()  # the escapes reach the server as JSON escapes
    response = httpx.post(srv.http_url + "/v1/embeddings", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text
