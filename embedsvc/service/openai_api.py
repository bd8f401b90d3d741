"""OpenAI-compatible embeddings: `POST /v1/embeddings`, and OpenAI's fields in `GET /v1/models`.

OpenAI's SDKs, and what is built on them (langchain-openai's OpenAIEmbeddings...), talk to embedsvc with
base_url "http://host:port/v1". A request becomes an EmbedRequest and runs calls.embed_rows, the operation of
gRPC Embed, so the vectors are Embed's; tokens, scopes (Embed's: read) and limits are the HTTP API's. Errors
keep their HTTP status and take OpenAI's body, {"error": {"message", "type", "param", "code"}}, on this path
whoever answers (the route, BrowserGuard's 421/403/415, the body limit, the router), so the SDKs raise their
typed exceptions. Like every write, the POST must be application/json (the SDKs send it).

embedsvc's own choices, in OpenAI's shape: `model` names a registered model, optionally with a pooling after
a ':' (`embedsvc-tiny-scenes-2:gem:p=3`), or the pooling comes in the extra field `pooling`; an input string
that is a `data:image/...;base64,` URL is an image (nothing is fetched: http(s) URLs are refused); texts
longer than the model's context are refused unless `"truncate": true`; `dimensions` must equal the vectors'
own; usage counts the text tokens the model read (SOT and EOT included), images count 0.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from embedsvc.errors import InvalidInput, UnknownModel, quoted
from embedsvc.models import MODEL_REGISTRY
from embedsvc.pooling import PoolingSpec
from embedsvc.service import bodyproc, calls, json_body
from embedsvc.v1 import embedsvc_pb2 as pb

PATH = "/v1/embeddings"
EMBED_METHOD = "/embedsvc.v1.EmbedService/Embed"  # same tokens and scope as Embed
PARAM_KEY = "embedsvc.openai_param"  # the ASGI scope key where a refusal names the request field at fault
INPUT = frozenset({"input"})  # the array max_items_per_request limits, as Embed's inputs
FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "pooling", "truncate")
ENCODINGS = ("float", "base64")
URL = re.compile(r"https?://\S+", re.IGNORECASE)
TOKEN_IDS_HINT = (
    "embedsvc tokenizes text with the model's own tokenizer, and OpenAI's token ids mean nothing to it; "
    "send strings (langchain-openai: OpenAIEmbeddings(..., check_embedding_ctx_length=False))"
)


class ParamError(InvalidInput):
    """A request field is wrong; `param` names it for OpenAI's error body."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str  # as the client wrote it, echoed in the response
    embed: pb.EmbedRequest
    encoding_format: str
    dimensions: int | None
    truncate: bool


# -- the request ------------------------------------------------------------------------------------


def parse_request(
    data: bytes, max_items: int = 0, check_count: Callable[[int, str], None] | None = None
) -> EmbeddingsRequest:
    """The request, decoded in short steps when large (json_body.loads); with `check_count`, an `input` of more
    than `max_items` items is refused before any of them is read."""
    try:
        body = json_body.loads(data, max_items, INPUT, check_count)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ParamError(None, f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ParamError(None, f"request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ParamError(
            unknown[0],
            f"unknown field(s) {', '.join(quoted(u) for u in unknown)}; this endpoint takes {', '.join(FIELDS)}",
        )
    if "input" not in body or "model" not in body:
        missing = "input" if "input" not in body else "model"
        raise ParamError(missing, f"{quoted(missing)} is required")
    for key, value in body.items():  # JSON may escape a lone UTF-16 surrogate; no text of a model can hold one
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not _is_unicode(text):
                raise ParamError(
                    key,
                    f"{key} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its "
                    f"pair), which is not text: send valid Unicode",
                )
    model = body["model"]
    if not isinstance(model, str):
        raise ParamError("model", f"model must be a string, got {type(model).__name__}")
    name, pooling = resolve_model(model, _optional(body, "pooling", str))
    encoding = _optional(body, "encoding_format", str)
    encoding = "float" if encoding is None else encoding
    if encoding not in ENCODINGS:
        raise ParamError("encoding_format", f"encoding_format must be float or base64, got {quoted(encoding)}")
    dimensions = _optional(body, "dimensions", int)
    if dimensions is not None and dimensions < 1:
        raise ParamError("dimensions", f"dimensions must be a positive integer, got {dimensions}")
    _optional(body, "user", str)  # OpenAI's end-user id for abuse monitoring: accepted, nothing to do with it here
    embed = pb.EmbedRequest(
        model=name,
        inputs=contents(body["input"]),
        poolings=[pb.PoolingSpec(name=pooling.name, params=pooling.params)] if pooling else [],
    )
    return EmbeddingsRequest(model, embed, encoding, dimensions, bool(_optional(body, "truncate", bool)))


def parse_chunks(
    chunks: list[bytes], max_items: int = 0, check_count: Callable[[int, str], None] | None = None
) -> EmbeddingsRequest:
    """parse_request of the body's chunks, joined here: in a codec thread when large (the join of 32 MiB, 40 ms
    or more, releases the GIL but would hold the event loop)."""
    return parse_request(b"".join(chunks), max_items, check_count)


KINDS = {str: "a string", int: "an integer", bool: "true or false"}


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _optional(body: dict, key: str, kind: type) -> Any:
    """body[key] if it is of `kind` (None when absent or null)."""
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise ParamError(key, f"{key} must be {KINDS[kind]}, got {orjson.dumps(value).decode()[:40]}")
    return value


def resolve_model(model: str, pooling: str | None) -> tuple[str, PoolingSpec | None]:
    """(registered model, pooling) of `model`, a registered name optionally followed by ':' and a pooling
    spec, and of the `pooling` field; the longest registered name that `model` starts with wins."""
    name = model
    if model not in MODEL_REGISTRY:
        known = [n for n in MODEL_REGISTRY if model.startswith(n + ":")]
        if not known:
            error = UnknownModel(
                f"model {quoted(model)} does not exist; GET /v1/models lists the models (write "
                f"NAME or NAME:POOLING, e.g. NAME:gem:p=3)"
            )
            error.param = "model"  # type: ignore[attr-defined]  # read back with getattr, as ParamError's
            raise error
        name = max(known, key=len)
    by_model = name != model  # the pooling comes after the name
    if by_model and pooling is not None:
        raise ParamError(
            "pooling",
            f"the model {quoted(model)} names a pooling and so does the pooling field "
            f"({quoted(pooling)}): give it once",
        )
    spec, param = (model[len(name) + 1 :], "model") if by_model else (pooling, "pooling")
    if spec is not None and not spec.strip():
        raise ParamError(param, "the pooling is empty: write a pooling spec such as cls, avg or gem:p=3")
    try:
        return name, PoolingSpec.parse(spec) if spec else None
    except InvalidInput as exc:
        raise ParamError(param, str(exc)) from None


def contents(value: Any) -> list[pb.Content]:
    """`input`: a string or a list of strings, each a text or a data:image/...;base64, URL."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ParamError("input", f"input must be a string or a list of strings, got {type(value).__name__}")
    if not items:
        raise ParamError("input", "input is an empty list: send at least one text or image")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (int, list)) and not isinstance(item, bool):
            raise ParamError(
                "input", f"input {'' if isinstance(value, str) else f'{i} '}is token ids: {TOKEN_IDS_HINT}"
            )
        if not isinstance(item, str):
            raise ParamError(
                "input",
                f"input {i} is {type(item).__name__}: send strings (texts, or images as data:image/...;base64, URLs)",
            )
        out.append(content(item, i))
    return out


def content(item: str, i: int) -> pb.Content:
    if item[:5].lower() == "data:":
        header, comma, payload = item.partition(",")
        if not comma or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
            raise ParamError(
                "input",
                f"input {i} is a data URL but not an image in base64: write "
                f"data:image/<type>;base64,<data> (got {quoted(header[:60])})",
            )
        try:
            return pb.Content(image=base64.b64decode("".join(payload.split()), validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ParamError("input", f"input {i}: the data URL's base64 does not decode ({exc})") from None
    if URL.fullmatch(item):
        raise ParamError(
            "input",
            f"input {i} is a URL ({quoted(item[:80])}): embedsvc fetches nothing from the "
            f"network; send the image inline as a data:image/<type>;base64,<data> URL",
        )
    return pb.Content(text=item)


# -- the response -----------------------------------------------------------------------------------


def embedding_document(request: EmbeddingsRequest, batch, model_context: int) -> dict:
    """OpenAI's CreateEmbeddingResponse from the pooled matrix."""
    cut = [i for i, t in enumerate(batch.truncated) if t]
    if cut and not request.truncate:
        raise ParamError(
            "input",
            f"input {cut[0]}{f' (and {len(cut) - 1} more)' if len(cut) > 1 else ''} is "
            f"longer than the model's text context ({model_context} tokens, SOT and EOT "
            f'included) and would be cut; shorten it, or send "truncate": true to embed '
            f"its first {model_context} tokens",
        )
    matrix = batch.vectors[0]
    if request.dimensions is not None and request.dimensions != matrix.shape[1]:
        raise ParamError(
            "dimensions",
            f"dimensions={request.dimensions}, but {quoted(request.model)} gives "
            f"{matrix.shape[1]}-dimensional vectors and embedsvc does not shorten them: "
            f"omit dimensions or send {matrix.shape[1]}",
        )
    if request.encoding_format == "base64":
        rows = [base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode("ascii") for row in matrix]
    else:
        rows = json_body.floats(list(matrix))
    tokens = int(sum(batch.token_counts))
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def with_model_list(document: dict) -> dict:
    """ListModels' JSON with OpenAI's model list beside it (`object`, `data`), for client.models.list().
    OpenAI's `created` is the model's creation time; embedsvc does not know it and writes 0."""
    document["object"] = "list"
    document["data"] = [
        {"id": m["name"], "object": "model", "created": 0, "owned_by": "embedsvc"} for m in document["models"]
    ]
    return document


# -- HTTP ---------------------------------------------------------------------------------------------


# What BrowserGuard lets through to the route (the SDKs send application/json); others are refused with 415.
MEDIA_TYPES = ("application/json",)


def route(api) -> Route:
    """POST /v1/embeddings on `api` (an HttpApi). The HttpApi puts OpenAIErrors around its whole ASGI app, so its
    refusals (BrowserGuard's, the body limit's, the router's) take OpenAI's body on this path too."""

    async def embeddings(request: Request) -> Response:
        async def work() -> Response:
            try:
                chunks = await bodyproc.body_chunks(request)
                parsed = await api._off_loop(
                    sum(map(len, chunks)),
                    parse_chunks,
                    chunks,
                    api.config.max_items_per_request,
                    lambda count, _: api.engine._check_count(count, "inputs"),
                )
                async with api.slots.held():  # in whole: now it is work, counted as gRPC's is
                    model, _, batch = await calls.embed_rows(api.engine, parsed.embed)
                runtime = api.engine.loaded_models().get(model)
                context = runtime.encoder.loaded.context_length if runtime else 0
                return await api.respond(embedding_document(parsed, batch, context))
            except Exception as exc:
                request.scope[PARAM_KEY] = getattr(exc, "param", None)
                raise

        return await api._guarded("OpenAIEmbeddings", EMBED_METHOD, request, work)

    return Route(PATH, embeddings, methods=["POST"])


# 421 is BrowserGuard's PERMISSION_DENIED for a Host the server does not answer for.
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 421: "permission_error", 429: "rate_limit_error"}


def error_body(status: int, native: bytes, param: str | None) -> bytes:
    """OpenAI's error body from the HTTP API's {"code": "NOT_FOUND", "message": "..."}."""
    try:
        parsed = orjson.loads(native)
        code, message = str(parsed["code"]), str(parsed["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        code, message = "", native.decode("utf-8", "replace")
    kind = "server_error" if status >= 500 else ERROR_TYPES.get(status, "invalid_request_error")
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code.lower() or None}})


class OpenAIErrors:
    """ASGI middleware: on OpenAI's path, an error response's body is rewritten into OpenAI's shape."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != PATH:
            return await self.app(scope, receive, send)
        start, chunks = None, []

        async def reshape(message):
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = error_body(start["status"], b"".join(chunks), scope.get(PARAM_KEY))
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshape)


# -- OpenAPI ------------------------------------------------------------------------------------------

OPENAPI_SCHEMAS = {
    "OpenAIEmbeddingsRequest": {
        "type": "object",
        "required": ["input", "model"],
        "properties": {
            "input": {
                "description": "a string or a list of strings: texts, or images as data:image/<type>;base64,<data> "
                "URLs (http(s) URLs are refused: nothing is fetched); token-id arrays are refused",
                "oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
            },
            "model": {
                "type": "string",
                "description": "a registered model (GET /v1/models), optionally followed by "
                "':' and a pooling spec: NAME:gem:p=3",
            },
            "pooling": {
                "type": "string",
                "description": "embedsvc's extra: the pooling spec (default cls), when the model does not name one",
            },
            "encoding_format": {
                "type": "string",
                "enum": list(ENCODINGS),
                "default": "float",
                "description": "base64: the little-endian float32 bytes of each vector",
            },
            "dimensions": {"type": "integer", "description": "refused unless it equals the vectors' dimension"},
            "user": {"type": "string", "description": "accepted and unused"},
            "truncate": {
                "type": "boolean",
                "default": False,
                "description": "embedsvc's extra: embed texts longer than the model's context from their "
                "first tokens instead of refusing them",
            },
        },
    },
    "OpenAIEmbeddingsResponse": {
        "type": "object",
        "properties": {
            "object": {"const": "list"},
            "model": {"type": "string", "description": "the request's model, as written"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "object": {"const": "embedding"},
                        "index": {"type": "integer"},
                        "embedding": {
                            "oneOf": [
                                {"type": "array", "items": {"type": "number"}},
                                {"type": "string", "contentEncoding": "base64"},
                            ]
                        },
                    },
                },
            },
            "usage": {
                "type": "object",
                "description": "text tokens the model read, SOT and EOT included; images count 0",
                "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}},
            },
        },
    },
    "OpenAIModelList": {
        "type": "object",
        "description": "OpenAI's model list, beside ListModels' fields",
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "model"},
                        "created": {"type": "integer", "description": "unknown: 0"},
                        "owned_by": {"type": "string"},
                    },
                },
            },
        },
    },
    "OpenAIError": {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {
                        "type": "string",
                        "description": "invalid_request_error, "
                        "authentication_error, permission_error, rate_limit_error or "
                        "server_error",
                    },
                    "param": {"type": ["string", "null"], "description": "the request field at fault, when one is"},
                    "code": {
                        "type": ["string", "null"],
                        "description": "the gRPC status name in lower case, e.g. invalid_argument",
                    },
                },
            }
        },
    },
}


def add_to_openapi(paths: dict, schemas: dict, error_statuses: dict) -> None:
    """Documents POST /v1/embeddings, and OpenAI's fields in GET /v1/models' response."""
    ref = "#/components/schemas/"
    schemas.update(OPENAPI_SCHEMAS)
    errors = {
        status: {"description": what, "content": {"application/json": {"schema": {"$ref": ref + "OpenAIError"}}}}
        for status, what in error_statuses.items()
    }
    paths[PATH] = {
        "post": {
            "operationId": "OpenAIEmbeddings",
            "tags": ["OpenAI-compatible"],
            "summary": "OpenAI's create-embeddings call (base_url http://host:port/v1), run as Embed.",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": ref + "OpenAIEmbeddingsRequest"}}},
            },
            "responses": {
                "200": {
                    "description": "OK",
                    "content": {"application/json": {"schema": {"$ref": ref + "OpenAIEmbeddingsResponse"}}},
                },
                **errors,
            },
        }
    }
    models = paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]
    models["schema"] = {"allOf": [models["schema"], {"$ref": ref + "OpenAIModelList"}]}
