"""API tokens with read and write scopes, checked by a server interceptor.

Tokens come from `auth_tokens_file` (JSON) or the `auth_tokens` setting (the same JSON, e.g. from the
EMBEDSVC_AUTH_TOKENS environment variable): {"tokens": [{"name": "indexer", "token": "...",
"scopes": ["read", "write"]}]}. Clients send `authorization: Bearer <token>`. Health and reflection
stay open. Tokens are compared in constant time and never logged; only the token's name is.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc

from embedsvc.errors import InvalidInput

SCOPES = ("read", "write")
WRITE_METHODS = {"CreateCollection", "DropCollection", "Upsert", "Delete", "FitPooling"}
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Token:
    name: str
    secret: str
    scopes: frozenset


def load_tokens(file: str = "", inline: str = "") -> list[Token]:
    """Tokens from a JSON file and/or inline JSON; [] means auth is off."""
    sources = []
    if file:
        path = Path(file)
        if not path.is_file():
            raise InvalidInput(f"auth tokens file {path} does not exist")
        sources.append((str(path), path.read_text()))
    if inline:
        sources.append(("auth_tokens setting", inline))
    tokens = []
    for where, text in sources:
        try:
            entries = json.loads(text)["tokens"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InvalidInput(f"{where}: expected {{\"tokens\": [{{\"name\", \"token\", \"scopes\"}}]}} ({exc})") from None
        for entry in entries:
            scopes = frozenset(entry.get("scopes", []))
            if not entry.get("token") or len(entry["token"]) < 16:
                raise InvalidInput(f"{where}: token {entry.get('name', '?')!r} must be at least 16 characters")
            if not scopes or not scopes <= set(SCOPES):
                raise InvalidInput(f"{where}: token {entry.get('name', '?')!r} scopes must be among {SCOPES}")
            tokens.append(Token(str(entry.get("name", "unnamed")), entry["token"], scopes))
    return tokens


def required_scope(method: str) -> Optional[str]:
    """None for open methods; "read" or "write" for embedsvc's."""
    if method.startswith(OPEN_PREFIXES):
        return None
    return "write" if method.rsplit("/", 1)[-1] in WRITE_METHODS else "read"


def find_token(tokens: list[Token], presented: str) -> Optional[Token]:
    found = None
    for token in tokens:  # compare against every token: timing does not reveal which matched
        if hmac.compare_digest(token.secret.encode(), presented.encode()):
            found = token
    return found


def authorize(tokens: list[Token], method: str, header: str) -> Optional[tuple[grpc.StatusCode, str]]:
    """None if the `authorization` header value may call `method`; else the status and message to refuse with.
    Shared by the gRPC interceptor and the HTTP API, so both accept the same tokens and scopes."""
    scope = required_scope(method)
    if scope is None or not tokens:
        return None
    if not header:
        return grpc.StatusCode.UNAUTHENTICATED, "missing credentials: send 'authorization: Bearer <token>'"
    presented = header[7:] if header.lower().startswith("bearer ") else ""
    token = find_token(tokens, presented) if presented else None
    if token is None:
        return grpc.StatusCode.UNAUTHENTICATED, "invalid token"
    if scope not in token.scopes:
        return (grpc.StatusCode.PERMISSION_DENIED,
                f"token {token.name!r} lacks the {scope!r} scope needed for {method.rsplit('/', 1)[-1]}")
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[Token]):
        self.tokens = tokens

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return handler
        header = dict(details.invocation_metadata or ()).get("authorization", "")
        refusal = authorize(self.tokens, details.method, header)
        return handler if refusal is None else _deny(handler, *refusal)


def _deny(handler, code: grpc.StatusCode, message: str):
    async def abort_unary(request, context):
        await context.abort(code, message)

    async def abort_stream(request_iterator, context):
        await context.abort(code, message)

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(abort_unary, handler.request_deserializer, handler.response_serializer)
