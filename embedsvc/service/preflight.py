"""Start-up checks that need no model and no torch: run before the heavy imports, so a bad setting fails in
a fraction of a second with one line, and again inside `create_server` for in-process callers."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from embedsvc.errors import InvalidInput
from embedsvc.models.registry import get_model_spec, register_models_file
from embedsvc.service.auth import Token, load_tokens
from embedsvc.service.config import ServerConfig


def check_settings(config: ServerConfig) -> tuple[list[Token], grpc.ServerCredentials | None]:
    """Tokens, TLS files and the default model's name; returns the tokens and the server credentials."""
    tokens = load_tokens(config.auth_tokens_file, config.auth_tokens)
    credentials = server_credentials(config)
    if config.models_file:
        register_models_file(config.models_file)
    get_model_spec(config.default_model)
    return tokens, credentials


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert_file:
        return None
    try:
        chain = Path(config.tls_cert_file).read_bytes()
        key = Path(config.tls_key_file).read_bytes()
        client_ca = Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else None
    except OSError as exc:
        raise InvalidInput(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
    _check_key_pair(config.tls_cert_file, config.tls_key_file)
    if client_ca is not None:
        try:
            ssl.create_default_context(cafile=config.tls_client_ca_file)
        except (ssl.SSLError, ValueError) as exc:
            raise InvalidInput(
                f"tls_client_ca_file {config.tls_client_ca_file} is not a PEM CA bundle ({exc})"
            ) from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _check_key_pair(cert_file: str, key_file: str) -> None:
    """A PEM certificate chain and its private key, checked before binding: grpc reports a bad pair only as
    a failed bind, which reads like "port in use"."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file, password=lambda: b"")
    except (ssl.SSLError, ValueError) as exc:
        raise InvalidInput(
            f"TLS: tls_cert_file {cert_file} and tls_key_file {key_file} are not a PEM certificate "
            f"chain and its private key (swapped, or not PEM?): {exc}"
        ) from None
