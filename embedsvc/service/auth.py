"""API tokens with read and write scopes, checked by a server interceptor.

Tokens come from `auth_tokens_file` (JSON) or the `auth_tokens` setting (the same JSON, e.g. from the
EMBEDSVC_AUTH_TOKENS environment variable): {"tokens": [{"name": "indexer", "token": "...",
"scopes": ["read", "write"]}]}; a setting that lists no tokens is refused rather than read as "auth off".
Clients send exactly one `authorization: Bearer <token>`. Health and reflection stay open. A refused call
is answered on its headers, before its message is read. Tokens are compared in constant time and never logged;
only the token's name is.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from embedsvc.errors import InvalidInput, quoted

SCOPES = ("read", "write")
WRITE_METHODS = {"CreateCollection", "DropCollection", "Upsert", "Delete", "FitPooling"}
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Token:
    name: str
    secret: str
    scopes: frozenset


def load_tokens(file: str = "", inline: str = "") -> list[Token]:
    """Tokens from a JSON file and/or inline JSON; [] (neither given) means auth is off."""
    sources = []
    if file:
        path = Path(file)
        if not path.is_file():
            raise InvalidInput(f"auth tokens file {path} does not exist")
        try:
            sources.append((str(path), path.read_text()))
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"cannot read auth tokens file {path}: {exc}") from None
    if inline:
        sources.append(("auth_tokens setting", inline))
    tokens = []
    for where, text in sources:
        tokens += _parse_tokens(where, text)
    return tokens


def _parse_tokens(where: str, text: str) -> list[Token]:
    shape = '{"tokens": [{"name": "...", "token": "<16+ characters>", "scopes": ["read", "write"]}]}'
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{where}: not JSON ({exc}); expected {shape}") from None
    entries = document.get("tokens") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise InvalidInput(f"{where}: expected {shape}")
    if not entries:
        raise InvalidInput(
            f'{where}: "tokens" is empty, which would turn auth off; add a token, or remove the '
            f"setting to run without auth"
        )
    tokens = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where}: token {n} is {type(entry).__name__}, not an object; expected {shape}")
        name, secret, scopes = entry.get("name", f"#{n}"), entry.get("token"), entry.get("scopes", [])
        if not isinstance(name, str):
            raise InvalidInput(f"{where}: token {n}: name must be a string")
        if not isinstance(secret, str) or len(secret) < 16:
            raise InvalidInput(f"{where}: token {quoted(name)} must be a string of at least 16 characters")
        if (
            not isinstance(scopes, list)
            or not scopes
            or not all(isinstance(s, str) for s in scopes)
            or not set(scopes) <= set(SCOPES)
        ):
            raise InvalidInput(f"{where}: token {quoted(name)} scopes must be a non-empty list among {SCOPES}")
        tokens.append(Token(name, secret, frozenset(scopes)))
    return tokens


def required_scope(method: str) -> str | None:
    """None for open methods; "read" or "write" for embedsvc's."""
    if method.startswith(OPEN_PREFIXES):
        return None
    return "write" if method.rsplit("/", 1)[-1] in WRITE_METHODS else "read"


def find_token(tokens: list[Token], presented: str) -> Token | None:
    found = None
    for token in tokens:  # compare against every token: timing does not reveal which matched
        if hmac.compare_digest(token.secret.encode(), presented.encode()):
            found = token
    return found


def authorize(tokens: list[Token], method: str, headers: Sequence[str]) -> tuple[grpc.StatusCode, str] | None:
    """None if the `authorization` header values may call `method`; else the status and message to refuse with.
    Shared by the gRPC interceptor and the HTTP API, so both accept the same tokens and scopes. More than
    one header is ambiguous and refused."""
    scope = required_scope(method)
    if scope is None or not tokens:
        return None
    if len(headers) > 1:
        return grpc.StatusCode.UNAUTHENTICATED, f"{len(headers)} authorization headers: send exactly one"
    header = headers[0] if headers else ""
    if not header:
        return grpc.StatusCode.UNAUTHENTICATED, "missing credentials: send 'authorization: Bearer <token>'"
    presented = header[7:] if header.lower().startswith("bearer ") else ""
    token = find_token(tokens, presented) if presented else None
    if token is None:
        return grpc.StatusCode.UNAUTHENTICATED, "invalid token"
    if scope not in token.scopes:
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            f"token {quoted(token.name)} lacks the {quoted(scope)} scope needed for {method.rsplit('/', 1)[-1]}",
        )
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[Token]):
        self.tokens = tokens

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return handler
        headers = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else v
            for k, v in details.invocation_metadata or ()
            if k == "authorization"
        ]
        refusal = authorize(self.tokens, details.method, headers)
        return handler if refusal is None else _deny(handler, *refusal)


def _deny(handler, code: grpc.StatusCode, message: str):
    """A handler that answers at once, before any request message: an unauthorised call holds nothing."""

    async def abort(request_iterator, context):
        await context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(abort, None, handler.response_serializer)
