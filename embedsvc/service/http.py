"""HTTP/JSON API and search page: Starlette on uvicorn, in the gRPC server's own event loop.

Each endpoint parses its body into the RPC's protobuf request as `json_format` does (so field names are
the proto's JSON mapping, lowerCamelCase), calls the same function of embedsvc.service.calls the gRPC
servicer calls, and renders the response in the same mapping (vectors written in C); large bodies are parsed
in worker processes (embedsvc.service.bodyproc) and large responses rendered in threads, in short steps
(embedsvc.service.json_body). OpenAI's /v1/embeddings
is embedsvc.service.openai_api. Tokens, scopes, limits and admission slots are the gRPC server's; domain errors
become HTTP statuses in embedsvc.service.errors, with the gRPC code name in the JSON body:
{"code": "NOT_FOUND", "message": "..."}.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, TypeVar

import grpc
import uvicorn
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from embedsvc.engine.engine import Engine
from embedsvc.errors import (
    CrossOriginRefused,
    EmbedsvcError,
    InvalidInput,
    MisdirectedRequest,
    RequestTimedOut,
    RequestTooLarge,
    ResourceExhausted,
    UnsupportedMediaType,
    quoted,
)
from embedsvc.service import bodyproc, calls, json_body, openai_api
from embedsvc.service.admission import Slots
from embedsvc.service.auth import Token, authorize
from embedsvc.service.config import ServerConfig
from embedsvc.service.errors import http_status_for, status_details, status_for
from embedsvc.service.httpconn import ConnectionGuard, connection_cap
from embedsvc.v1 import embedsvc_pb2 as pb

M = TypeVar("M", bound=Message)

log = logging.getLogger("embedsvc.http")

WEB = resources.files("embedsvc.service") / "web"
JSON_LINES = ("application/x-ndjson", "application/jsonl", "application/json-lines")
STATIC = {"app.js": "text/javascript", "style.css": "text/css", "docs.html": "text/html", "index.html": "text/html"}
# Bodies and responses up to these sizes are parsed and rendered on the event loop (about 1 ms at most); larger
# bodies in worker processes (embedsvc.service.bodyproc; OpenAI's in a codec thread), larger responses in the
# API's codec threads, in short steps (embedsvc.service.json_body), so the loop serving gRPC keeps running. A
# response document's vectors are written by orjson in C (~25 ns a float): 32 embeddings of 512 stay inline; a
# protobuf response goes through MessageToDict, Python per field, hence the smaller bound.
INLINE_BYTES = json_body.SMALL  # a request body, or a protobuf response's wire size
INLINE_DOCUMENT_BYTES = 512 * 1024  # a response document's JSON, as json_body.weight estimates it
HELD_BODIES = 4  # maximal bodies the server holds at once (two parsing, two waiting); more get RESOURCE_EXHAUSTED
CODEC_THREADS = 2  # larger bodies parse (and responses render) two at a time, as many worker processes; more wait


def _service_of(rpc: str) -> str:
    for service in pb.DESCRIPTOR.services_by_name.values():
        if rpc in service.methods_by_name:
            return service.full_name
    return "embedsvc.v1.IndexService"  # HTTP-only reads (thumbnails) take the read scope like Get


@dataclass(frozen=True)
class Endpoint:
    """One HTTP route of one RPC: the request message the body parses into, and which path segment fills
    which request field (`{name}` -> `collection`, say)."""

    method: str
    path: str
    rpc: str
    request_type: type
    response_type: type
    call: Callable[[Engine, Any], Awaitable[Message | dict]]  # a dict: the response already in JSON form
    summary: str
    path_field: str = ""
    body: bool = True
    streaming: bool = False
    extra_content: tuple = field(default_factory=tuple)  # other accepted request media types, for OpenAPI
    extend: Callable[[dict], dict] | None = None  # adds fields beside the response message's (OpenAI's, say)

    @property
    def grpc_method(self) -> str:
        return f"/{_service_of(self.rpc)}/{self.rpc}"

    @property
    def media_types(self) -> tuple[str, ...]:
        """The body types this endpoint reads, as OpenAPI documents them (also application/*+json and JSON lines'
        other names); BrowserGuard refuses others with 415."""
        lines = JSON_LINES[1:] if JSON_LINES[0] in self.extra_content else ()
        return ("application/json", *self.extra_content, *lines)


ENDPOINTS = [
    Endpoint(
        "POST",
        "/v1/embed",
        "Embed",
        pb.EmbedRequest,
        pb.EmbedResponse,
        calls.embed_json,
        "Embed texts and images with one model and one or more poolings.",
    ),
    Endpoint(
        "GET",
        "/v1/models",
        "ListModels",
        pb.ListModelsRequest,
        pb.ListModelsResponse,
        calls.list_models,
        "List models and poolings; also OpenAI's model list (object, data).",
        body=False,
        extend=openai_api.with_model_list,
    ),
    Endpoint(
        "GET",
        "/v1/collections",
        "ListCollections",
        pb.ListCollectionsRequest,
        pb.ListCollectionsResponse,
        calls.list_collections,
        "Describe every collection.",
        body=False,
    ),
    Endpoint(
        "POST",
        "/v1/collections",
        "CreateCollection",
        pb.CreateCollectionRequest,
        pb.CollectionInfo,
        calls.create_collection,
        "Create a collection.",
    ),
    Endpoint(
        "GET",
        "/v1/collections/{name}",
        "GetCollection",
        pb.GetCollectionRequest,
        pb.CollectionInfo,
        calls.get_collection,
        "Describe one collection.",
        path_field="name",
        body=False,
    ),
    Endpoint(
        "DELETE",
        "/v1/collections/{name}",
        "DropCollection",
        pb.DropCollectionRequest,
        pb.DropCollectionResponse,
        calls.drop_collection,
        "Drop a collection and its items.",
        path_field="name",
        body=False,
    ),
    Endpoint(
        "POST",
        "/v1/collections/{name}/items",
        "Upsert",
        pb.UpsertRequest,
        pb.UpsertResponse,
        calls.upsert,
        "Insert or replace items: an UpsertRequest as JSON, or JSON lines (one UpsertItem per line, "
        "application/x-ndjson) for bulk.",
        path_field="collection",
        streaming=True,
        extra_content=("application/x-ndjson",),
    ),
    Endpoint(
        "POST",
        "/v1/collections/{name}/get",
        "Get",
        pb.GetRequest,
        pb.GetResponse,
        calls.get,
        "Read items by id.",
        path_field="collection",
    ),
    Endpoint(
        "POST",
        "/v1/collections/{name}/delete",
        "Delete",
        pb.DeleteRequest,
        pb.DeleteResponse,
        calls.delete,
        "Remove items by id.",
        path_field="collection",
    ),
    Endpoint(
        "POST",
        "/v1/collections/{name}/search",
        "Search",
        pb.SearchRequest,
        pb.SearchResponse,
        calls.search,
        "Top-k search by text, image (base64, or a multipart upload: files 'image', optional field "
        "'request' with the rest of the SearchRequest as JSON), vector or id; filtered by `filter` or by "
        "`filterText` in the CLI's grammar (e.g. objects>=2 colour=red|blue).",
        path_field="collection",
        extra_content=("multipart/form-data",),
    ),
    Endpoint(
        "POST",
        "/v1/collections/{name}/fit",
        "FitPooling",
        pb.FitPoolingRequest,
        pb.FitPoolingResponse,
        calls.fit_pooling,
        "Fit a learned pooling of an empty collection on samples.",
        path_field="collection",
        streaming=True,
    ),
]
THUMBNAIL_PATH = "/v1/collections/{name}/items/{id:path}/thumbnail"


class Refused(Exception):
    """A request refused before the engine saw it (auth, draining), with its gRPC code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def error_response(code: grpc.StatusCode, message: str, exc: BaseException | None = None) -> JSONResponse:
    return JSONResponse({"code": code.name, "message": message}, status_code=http_status_for(code, exc))


async def _one(message: Message) -> AsyncIterator[Message]:
    yield message


class BodyLimit:
    """ASGI middleware: refuses bodies over `limit` bytes (http_max_body_bytes), by header or while reading, and
    bodies that do not arrive within `timeout` seconds of their headers (http_body_timeout_seconds; 408, and the
    connection closes). The headers' own deadline and the cap on connections are embedsvc.service.httpconn's."""

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout
        # Bytes of large bodies (over json_body.SMALL) the server holds, received or being parsed, at most
        # HELD_BODIES maximal ones: each is held whole until its request ends, so without a bound 2048
        # connections could make the server hold 64 GiB (measured: 86 MB of RSS per 32 MiB body in flight).
        self.held, self.most_held = 0, HELD_BODIES * limit

    def _hold(self, size: int, received: int) -> None:
        """Counts `size` more bytes of a body (`received` so far) against most_held; a large one that would go
        over is refused with RESOURCE_EXHAUSTED (small ones pass: there are few bytes per connection)."""
        if received > json_body.SMALL and self.held + size > self.most_held:
            raise ResourceExhausted(
                f"the server holds {self.held:,} bytes of request bodies, the most it takes "
                f"({HELD_BODIES} of http_max_body_bytes); retry shortly, or send less per "
                f"request"
            )
        self.held += size

    def _refusal(self, size: str) -> RequestTooLarge:
        return RequestTooLarge(
            f"request body is {size} bytes, over the limit of {self.limit:,} "
            f"(http_max_body_bytes); send less per request"
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            exc = self._refusal(f"{int(length):,}")
            return await error_response(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), exc)(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline, received, whole, late, held = loop.time() + self.timeout, 0, False, False, 0

        async def limited():
            nonlocal received, whole, late, held
            if whole:  # the body is in: later reads wait for a disconnect, without a deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                late = True
                raise RequestTimedOut(
                    f"the request body did not arrive within http_body_timeout_seconds "
                    f"({self.timeout:g} s) of its headers; send it faster, or less per "
                    f"request"
                ) from None
            if message["type"] == "http.disconnect":
                raise Refused(grpc.StatusCode.CANCELLED, "the client closed the connection before its body came")
            size = len(message.get("body", b""))
            received += size
            if received > self.limit:
                raise self._refusal(f"over {self.limit:,}")
            self._hold(size, received)
            held += size
            whole = not message.get("more_body", False)
            return message

        async def closing(message):
            if late and message["type"] == "http.response.start":  # the rest of a late body is not waited for
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            return await self.app(scope, limited, closing)
        finally:
            self.held -= held  # the request is over: its body is no longer held


WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})  # every method but GET, HEAD, OPTIONS changes or costs
PROBES = ("/healthz", "/readyz")  # answer for any Host: orchestrators probe by pod IP or service name
CORS_MAX_AGE = 600  # seconds a browser may keep a preflight's answer


def host_name(authority: str) -> str:
    """The name in a Host header (`name:port`, `[v6]:port`): lowercase, without port, brackets or final dot."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1 : authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0].rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class BrowserGuard:
    """ASGI middleware: what a web page in someone's browser must not make the API do.

    A Host the server does not answer for is 421: DNS rebinding points an attacker's name at this server, and its
    page is then same-origin with it (an IP literal cannot be rebound). A write (and its CORS preflight) from a page
    of another origin not in http_cors_origins is 403: browsers send a POST across sites without asking when its
    type is text/plain, multipart or none. A write must declare a body type its endpoint reads (415), which no
    page can send across origins without a preflight. Pages of allowed origins get CORS answers.
    """

    def __init__(self, app, config: ServerConfig, media_types: Callable[[dict], tuple[str, ...] | None]):
        self.app, self.media_types = app, media_types
        self.any_host = "*" in config.allowed_hosts
        listen_host = host_name(config.http_listen.rsplit(":", 1)[0])
        self.hosts = {"localhost", listen_host} | set(config.allowed_hosts)
        self.suffixes = tuple(h for h in config.allowed_hosts if h.startswith("."))
        self.cors_origins, self.any_origin = set(config.cors_origins), "*" in config.cors_origins
        # With CORS on, responses differ by Origin: caches (the browser's too) must key on it.
        self.vary = bool(config.cors_origins)

    def host_allowed(self, name: str) -> bool:
        return (
            self.any_host
            or _is_ip(name)
            or name in self.hosts
            or any(name.endswith(s) or name == s[1:] for s in self.suffixes)
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        method, host, origin = scope["method"], headers.get("host", ""), headers.get("origin")
        refusal = self._refusal(scope, headers, method, host, origin)
        cross = origin is not None and not self._same_origin(origin, host)
        cors = origin is not None and cross and refusal is None and self._cors_allowed(origin)
        if cors and origin is not None and method == "OPTIONS" and "access-control-request-method" in headers:
            return await self._preflight(origin)(scope, receive, send)
        if refusal is None:
            refusal = self._media_type_refusal(scope, headers, method)
        send = self._with_cors(send, origin if cors else None)
        if refusal is None:
            return await self.app(scope, receive, send)
        log.info(
            "refused %s %s: %s",
            method,
            scope["path"],
            refusal,
            extra={"host": host, "origin": origin, "transport": "http"},
        )
        return await error_response(status_for(refusal), str(refusal), refusal)(scope, receive, send)

    def _refusal(self, scope, headers: Headers, method: str, host: str, origin: str | None) -> EmbedsvcError | None:
        if host and scope["path"] not in PROBES and not self.host_allowed(host_name(host)):
            return MisdirectedRequest(
                f"this server does not answer for host {quoted(host_name(host))}; if that is its name, add it to "
                f"http_allowed_hosts (EMBEDSVC_HTTP_ALLOWED_HOSTS)"
            )
        preflight = method == "OPTIONS" and "access-control-request-method" in headers
        if (
            origin is not None
            and (method in WRITES or preflight)
            and not self._same_origin(origin, host)
            and not self._cors_allowed(origin)
        ):
            asked = headers.get("access-control-request-method", "") if preflight else method
            return CrossOriginRefused(
                f"a page of {quoted(origin)} may not {asked.upper()} here: it is neither this server's origin "
                f"nor in http_cors_origins (EMBEDSVC_HTTP_CORS_ORIGINS)"
            )
        return None

    @staticmethod
    def _same_origin(origin: str, host: str) -> bool:
        """The page came from this server by the name the browser used: its host:port is the request's Host (any
        scheme, so a proxy that ends TLS and keeps the Host changes nothing)."""
        return "://" in origin and origin.split("://", 1)[1].lower() == host.lower()

    def _cors_allowed(self, origin: str) -> bool:
        return self.any_origin or origin.lower() in self.cors_origins

    def _media_type_refusal(self, scope, headers: Headers, method: str) -> UnsupportedMediaType | None:
        """A write needs a Content-Type its endpoint reads; a DELETE only if it has a body."""
        if method not in WRITES:
            return None
        if method == "DELETE" and headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers:
            return None
        types = self.media_types(scope)
        if types is None:  # no such route: the application's 404 or 405 says so
            return None
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind in types or (kind.endswith("+json") and kind.startswith("application/")):
            return None
        choices = (
            "application/json"
            + (", application/x-ndjson (one item per line)" if JSON_LINES[0] in types else "")
            + (", multipart/form-data" if "multipart/form-data" in types else "")
        )
        got = f"got {quoted(kind)}" if kind else "got no Content-Type header"
        return UnsupportedMediaType(f"{method} {scope['path']} reads {choices}; {got}")

    @staticmethod
    def _preflight(origin: str) -> Response:
        return Response(
            status_code=204,
            headers={
                "access-control-allow-origin": origin,
                "access-control-allow-methods": "GET, POST, DELETE",
                "access-control-allow-headers": "authorization, content-type",
                "access-control-max-age": str(CORS_MAX_AGE),
                "vary": "Origin",
            },
        )

    def _with_cors(self, send, origin: str | None):
        """`send` adding Cross-Origin-Resource-Policy: same-origin (an <img> or <script> of another site loads
        nothing, so its onload/onerror and an image's size cannot tell what exists), Vary: Origin with CORS on,
        and Access-Control-Allow-Origin for an allowed `origin` (CORS-mode fetches are not subject to CORP)."""
        added = [(b"cross-origin-resource-policy", b"same-origin")]
        added += [(b"vary", b"Origin")] if self.vary or origin else []
        added += [(b"access-control-allow-origin", origin.encode("latin-1"))] if origin else []

        async def cors_send(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), *added])
            await send(message)

        return cors_send


class HttpApi:
    """The Starlette application over one engine."""

    def __init__(self, config: ServerConfig, engine: Engine, tokens: list[Token], slots: Slots):
        self.engine, self.tokens, self.slots = engine, tokens, slots
        self.config = config
        self.codec = ThreadPoolExecutor(max_workers=CODEC_THREADS, thread_name_prefix="http-json")
        self.parsers = bodyproc.BodyParsers(CODEC_THREADS)  # worker processes: large bodies parse outside this one
        self.ready = False  # true between start and the beginning of shutdown
        api_routes = [Route(e.path, self._handler(e), methods=[e.method]) for e in ENDPOINTS]
        openai_route = openai_api.route(self)  # POST /v1/embeddings
        routes = [
            *api_routes,
            openai_route,
            Route(THUMBNAIL_PATH, self.thumbnail, methods=["GET"]),
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/openapi.json", self.openapi),
            Route("/docs", self.static("docs.html")),
            Route("/", self.static("index.html")),
        ]
        routes += [Route(f"/static/{name}", self.static(name)) for name in STATIC]
        app = Starlette(routes=routes, exception_handlers={HTTPException: self._http_error})
        body_types = [(route, e.media_types) for route, e in zip(api_routes, ENDPOINTS)]
        body_types.append((openai_route, openai_api.MEDIA_TYPES))
        self.body_limit = BodyLimit(app, self.config.http_max_body_bytes, self.config.http_body_timeout_seconds)
        guarded = BrowserGuard(self.body_limit, self.config, self._body_types_of(body_types))
        self.app = openai_api.OpenAIErrors(guarded)  # OpenAI's error bodies on /v1/embeddings, whoever refuses

    # -- plumbing -----------------------------------------------------------------------------

    @staticmethod
    def _body_types_of(routes: list[tuple[Route, tuple[str, ...]]]) -> Callable[[dict], tuple[str, ...] | None]:
        """The media types of the endpoint a request's path and method name, or None for no endpoint."""

        def body_types(scope: dict) -> tuple[str, ...] | None:
            for route, media_types in routes:
                if route.matches(scope)[0] is Match.FULL:
                    return media_types
            return None

        return body_types

    async def _http_error(self, request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)  # the handler of HTTPException only
        code = {404: grpc.StatusCode.NOT_FOUND, 405: grpc.StatusCode.UNIMPLEMENTED}.get(
            exc.status_code, grpc.StatusCode.INVALID_ARGUMENT
        )
        path = request.url.path
        message = {
            404: f"no route {request.method} {path}; /docs lists the API",
            405: f"{path} does not take {request.method}; /docs lists the API",
        }.get(exc.status_code, str(exc.detail))
        return JSONResponse({"code": code.name, "message": message}, status_code=exc.status_code)

    async def _guarded(
        self, rpc: str, grpc_method: str, request: Request, work: Callable[[], Awaitable[Response]]
    ) -> Response:
        """Auth, readiness, metrics, logs and error mapping around one API request."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if not self.ready:
                raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
            refusal = authorize(self.tokens, grpc_method, request.headers.getlist("authorization"))
            if refusal is not None:
                raise Refused(*refusal)
            return await work()
        except Refused as exc:
            code = exc.code
            return error_response(code, str(exc))
        except EmbedsvcError as exc:
            code = status_for(exc)
            return error_response(code, status_details(exc), exc)
        except Exception:  # a bug must not take the server down
            code = grpc.StatusCode.INTERNAL
            log.exception("internal error in %s", rpc)
            return error_response(code, f"internal error in {rpc}; the server log has details")
        finally:
            client = request.client
            peer = f"{'ipv6' if ':' in client.host else 'ipv4'}:{client.host}:{client.port}" if client else ""
            calls.record(self.engine, rpc, code.name, time.perf_counter() - started, peer, "http")

    async def _off_loop(self, size: int, fn: Callable, *args):
        """fn(*args) here when `size` is small, else in a codec thread."""
        if size <= INLINE_BYTES:
            return fn(*args)
        return await self._codec(fn, *args)

    async def _codec(self, fn: Callable, *args):
        """fn(*args) in a codec thread."""
        return await asyncio.get_running_loop().run_in_executor(self.codec, fn, *args)

    async def _parse(self, chunks: list[bytes], message_type: type[M], where: str = "request body") -> M:
        """The body as the request message (malformed: INVALID_ARGUMENT with the parser's words); one with more
        than max_items_per_request items is refused, as the engine would, before it is built. A large body is
        parsed in a worker process (embedsvc.service.bodyproc), its message put together in a codec thread."""
        limit, check = self.config.max_items_per_request, self.engine._check_count
        if sum(map(len, chunks)) <= INLINE_BYTES:
            return json_body.parse(b"".join(chunks), message_type, where, limit, check)
        return await self._codec(self.parsers.parse, chunks, message_type, where, limit, check)

    async def respond(self, response: Message | dict, extend: Callable[[dict], dict] | None = None) -> Response:
        """The RPC's response in protobuf's JSON mapping (vectors written in C), with the endpoint's added fields
        (`extend`); rendered here when small, in a codec thread and in pieces when large."""

        def render(piecewise: bool) -> bytes:
            document = json_body.document(response) if isinstance(response, Message) else response
            document = extend(document) if extend else document
            return json_body.render(document) if piecewise else json_body.dumps(document)

        small = (
            response.ByteSize() <= INLINE_BYTES
            if isinstance(response, Message)
            else json_body.weight(response, INLINE_DOCUMENT_BYTES) <= INLINE_DOCUMENT_BYTES
        )
        body = render(False) if small else await asyncio.get_running_loop().run_in_executor(self.codec, render, True)
        return Response(body, media_type="application/json")

    def _handler(self, endpoint: Endpoint):
        async def handle(request: Request) -> Response:
            async def work() -> Response:
                message = await self._request(endpoint, request)
                async with self.slots.held():  # the request is in whole: now it is work, counted as gRPC's is
                    response = await endpoint.call(self.engine, message)
                return await self.respond(response, endpoint.extend)

            return await self._guarded(endpoint.rpc, endpoint.grpc_method, request, work)

        handle.__name__ = endpoint.rpc
        return handle

    async def _request(self, endpoint: Endpoint, request: Request):
        """The RPC's argument: one message (path segment filled in), or for streaming RPCs an iterable of them."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if endpoint.streaming and kind in JSON_LINES:
            return self._json_lines(request, request.path_params["name"])
        if endpoint.rpc == "Search" and kind == "multipart/form-data":
            message: Message = await self._multipart_search(request)
        elif endpoint.body:  # application/json: BrowserGuard refused other types
            message = await self._parse(await bodyproc.body_chunks(request), endpoint.request_type)
        else:
            message = endpoint.request_type()
        if endpoint.path_field:
            name = request.path_params["name"]
            given = getattr(message, endpoint.path_field)
            if given and given != name:
                raise InvalidInput(
                    f"the body names {endpoint.path_field} {quoted(given)} but the path names {quoted(name)}"
                )
            setattr(message, endpoint.path_field, name)
        return _one(message) if endpoint.streaming else message

    async def _json_lines(self, request: Request, collection: str) -> AsyncIterator[pb.UpsertRequest]:
        """One UpsertItem per line, sent to the engine in batches of max_items_per_request (like a gRPC stream);
        a batch is stored only if all its lines parse, and the batches before a line that does not parse are.
        A large body is parsed in a worker process, each batch put together in a codec thread."""
        chunks = await bodyproc.body_chunks(request)
        if sum(map(len, chunks)) <= INLINE_BYTES:
            lines, error = bodyproc.parse_lines(b"".join(chunks), pb.UpsertItem)
        else:
            lines, error = await self._codec(self.parsers.parse_lines, chunks, pb.UpsertItem)
        limit, stored = self.config.max_items_per_request, 0
        whole = len(lines) if error is None else len(lines) - len(lines) % limit  # the bad line's batch is not
        for start in range(0, whole, limit):
            batch, message = lines[start : start + limit], pb.UpsertRequest(collection=collection)
            if sum(map(len, batch)) <= INLINE_BYTES:
                bodyproc.add_all(message.items, batch)
            else:
                await self._codec(bodyproc.add_all, message.items, batch)
            yield message
            stored += len(batch)
        if error is not None:
            if stored:
                raise InvalidInput(f"{error} (the {stored} items of the lines before were stored)")
            raise InvalidInput(error)
        if not lines:  # a body of blank lines is one empty batch, as before
            yield pb.UpsertRequest(collection=collection)

    async def _multipart_search(self, request: Request) -> pb.SearchRequest:
        limit = self.config.max_items_per_request
        try:
            form = await request.form(max_files=limit, max_fields=limit, max_part_size=self.config.http_max_body_bytes)
        except HTTPException as exc:  # malformed multipart, too many parts
            raise InvalidInput(f"multipart body: {exc.detail}") from None
        message = await self._parse([str(form.get("request") or "").encode()], pb.SearchRequest, "form field 'request'")
        if form.get("text"):
            message.queries.add(text=str(form["text"]))
        for upload in form.getlist("image"):
            if isinstance(upload, str):
                raise InvalidInput("form field 'image' must be a file upload (curl -F image=@photo.jpg)")
            message.queries.add(image=await upload.read())
        await form.close()
        return message

    # -- routes besides the RPCs ----------------------------------------------------------------

    async def thumbnail(self, request: Request) -> Response:
        name, item_id = request.path_params["name"], request.path_params["id"]

        async def work() -> Response:
            media_type, data = await self.engine.run_blocking(self.engine.store.thumbnail, name, item_id)
            return Response(data, media_type=media_type, headers={"cache-control": "private, max-age=300"})

        return await self._guarded("GetThumbnail", "/embedsvc.v1.IndexService/GetThumbnail", request, work)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if not self.ready:
            return JSONResponse({"status": "not ready", "code": "UNAVAILABLE"}, status_code=503)
        if not self.engine.store.wait_loaded(0):
            return JSONResponse(
                {
                    "status": "loading",
                    "code": "UNAVAILABLE",
                    "message": "collections are still loading; the log shows how far",
                },
                status_code=503,
            )
        return JSONResponse({"status": "ready"})

    async def openapi(self, request: Request) -> Response:
        from embedsvc.service.openapi import openapi_document

        return JSONResponse(openapi_document(ENDPOINTS, THUMBNAIL_PATH, bool(self.tokens)))

    def static(self, name: str):
        async def serve(request: Request) -> Response:
            return Response((WEB / name).read_bytes(), media_type=STATIC[name], headers={"cache-control": "no-cache"})

        return serve


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: `embedsvc serve` owns SIGTERM/SIGINT for both transports."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """The bound socket and the uvicorn server that serves HttpApi on it, as a task of the running loop.

    No `limit_concurrency`: uvicorn counts open connections in it, so idle ones made every request 503. Open
    connections are capped by the ConnectionGuard instead (oldest idle closed first), and work by the slots
    shared with gRPC."""

    def __init__(self, api: HttpApi, sock: socket.socket, config: ServerConfig):
        self.api, self.sock = api, sock
        self.port = sock.getsockname()[1]
        self.host = config.http_listen.rsplit(":", 1)[0]
        tls = None
        if config.tls_cert_file:  # the guard runs the handshakes (under its cap and deadline), not uvicorn
            tls = uvicorn.config.create_ssl_context(
                config.tls_cert_file,
                config.tls_key_file,
                None,
                uvicorn.config.SSL_PROTOCOL_VERSION,
                ssl.CERT_REQUIRED if config.tls_client_ca_file else ssl.CERT_NONE,
                config.tls_client_ca_file or None,
                None,
            )
        self.scheme = "https" if tls else "http"
        self.guard = ConnectionGuard(
            connection_cap(config.http_max_connections),
            config.http_header_timeout_seconds,
            config.http_send_timeout_seconds,
            tls,
        )
        self.server = _QuietServer(
            uvicorn.Config(
                api.app,
                http=self.guard.protocol(),
                lifespan="off",
                log_config=None,
                access_log=False,
                server_header=False,
                timeout_graceful_shutdown=int(config.shutdown_grace_seconds) or 1,
                # uvicorn annotates int but hands it to loop.call_later: a fraction of a second works
                timeout_keep_alive=config.http_keepalive_timeout_seconds,  # type: ignore[arg-type]
            )
        )
        self.task: asyncio.Task[None] | None = None

    @classmethod
    def bind(cls, config: ServerConfig, engine: Engine, tokens: list[Token], slots: Slots) -> HttpServer:
        """Binds http_listen now, so a taken port fails start-up like the gRPC port does."""
        host, port = config.http_listen.rsplit(":", 1)
        host = host.strip("[]") or "0.0.0.0"
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
            # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets, and without it Nagle's
            # algorithm and delayed ACKs add 40 ms to every keep-alive response.
            sock = socket.socket(*infos[0][:3])
        except (OSError, ValueError) as exc:
            raise cls._unbound(config, exc) from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(infos[0][4])
        except OSError as exc:
            sock.close()  # closed now, not when the process exits (a start-up error run in a test's process)
            raise cls._unbound(config, exc) from None
        sock.set_inheritable(True)
        return cls(HttpApi(config, engine, tokens, slots), sock, config)

    @staticmethod
    def _unbound(config: ServerConfig, exc: Exception) -> InvalidInput:
        return InvalidInput(
            f"cannot serve HTTP on {config.http_listen}: the port is taken or the address is not "
            f"local ({getattr(exc, 'strerror', None) or exc}); pick another with --http-listen or "
            f"EMBEDSVC_HTTP_LISTEN (empty disables HTTP)"
        )

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started and not self.task.done():
            await asyncio.sleep(0.01)
        if self.task.done():
            self.task.result()  # raises what stopped it
        self.api.ready = True

    def drain(self) -> None:
        """/readyz turns 503 and new API requests are refused with UNAVAILABLE; in-flight ones finish."""
        self.api.ready = False

    async def stop(self, grace: float) -> None:
        """Stops accepting, lets in-flight requests finish for up to `grace` seconds."""
        self.drain()
        self.guard.stopping = True  # a TLS handshake that ends from now on closes its connection
        if self.task is not None:
            # uvicorn annotates int | None but waits with asyncio.wait_for(timeout=...): a float works
            self.server.config.timeout_graceful_shutdown = max(grace, 0.1)  # type: ignore[assignment]
            self.server.should_exit = True
            await self.task
        self.guard.close_handshakes()
        self.sock.close()
        self.api.codec.shutdown(wait=False, cancel_futures=True)
        self.api.parsers.close()
