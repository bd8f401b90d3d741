"""The server's typed configuration: defaults, then a TOML/JSON file, then EMBEDSVC_* variables, then flags.

Every field is documented here and in docs/configuration.md (generated from this file by scripts/gen_config_docs.py).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from embedsvc.cpu import DEFAULT_DECODE_NICE
from embedsvc.engine.config import EngineConfig
from embedsvc.errors import InvalidInput, quoted

ENV_PREFIX = "EMBEDSVC_"
# Image.open raises DecompressionBombError above 2 x Image.MAX_IMAGE_PIXELS, whatever our limits say.
PILLOW_PIXEL_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 1 << 62)
JSON_ENVELOPE_BYTES = 4096  # an HTTP request's JSON around its images: field names, ids, poolings, metadata
MAX_FRONTENDS = 64
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class ServerConfig:
    # Address the gRPC server listens on; port 0 picks a free port (tests).
    listen: str = "127.0.0.1:50051"
    # Address of the HTTP/JSON API and search page (same process and engine as gRPC); empty disables it.
    http_listen: str = "127.0.0.1:8080"
    # Host names the HTTP API answers for besides IP addresses, localhost and http_listen's host, comma-separated:
    # "api.example.com", ".example.com" (it and its subdomains), "*" (any name: no DNS-rebinding guard); other
    # names get 421.
    http_allowed_hosts: str = ""
    # Origins (scheme://host[:port]) of web front ends on other origins that may call the HTTP API from a browser
    # (CORS), comma-separated, or "*" for any; other pages' writes get 403 and their reads no CORS headers.
    http_cors_origins: str = ""
    # Keep a 256 px JPEG thumbnail of every image item upserted, for the search page (the demo always does).
    store_thumbnails: bool = False
    # Folder of the durable store (SQLite database and FAISS checkpoints); unused with store_backend "milvus".
    data_dir: str = "embedsvc-data"
    # Where collections live: "local" (SQLite + FAISS in data_dir, one process) or "milvus" (stateless replicas).
    store_backend: str = "local"
    # Milvus to use with store_backend "milvus": http://host:19530, or a Milvus Lite file (path ending in .db).
    milvus_uri: str = ""
    # Milvus credentials, "user:password" or an API key; empty for none.
    milvus_token: str = ""
    # Milvus database holding embedsvc's collections; empty for Milvus's default database.
    milvus_db: str = ""
    # Model used when a request or collection names none.
    default_model: str = "embedsvc-tiny-scenes-2"
    # Models loaded at start-up, comma-separated; others load on first use.
    preload_models: str = "embedsvc-tiny-scenes-2"
    # JSON file of extra model specs: [{"name", "architecture", "checkpoint" | "pretrained", "config_file"}].
    models_file: str = ""
    # "auto" (cuda if available, else cpu), "cpu" or "cuda[:N]".
    device: str = "auto"
    # "auto" (fp16 on GPU, fp32 on CPU), "fp32", "fp16" or "bf16".
    precision: str = "auto"
    # Most inputs one forward pass takes; concurrent requests are coalesced up to this.
    max_batch_size: int = 64
    # Under load only, the longest the model idles after a batch while waiting for as many inputs as that batch
    # had, in milliseconds; an idle model runs a request at once.
    max_batch_delay_ms: float = 5.0
    # Inputs waiting per model and tower before new requests get RESOURCE_EXHAUSTED.
    max_queue: int = 2048
    # Largest gRPC message accepted or sent, in bytes (HTTP bodies: http_max_body_bytes).
    max_message_bytes: int = 64 * 1024 * 1024
    # Largest encoded image accepted, in bytes.
    max_image_bytes: int = 16 * 1024 * 1024
    # Largest image decoded, in pixels, checked from its header before decoding: a JPEG decodes DCT-scaled
    # toward the model's input (a 48 MP photo at 1/8: 0.75 MP), other formats whole.
    max_image_pixels: int = 50_000_000
    # Largest width x height an image file may declare, however it decodes (decompression-bomb guard; at most
    # 178956970, where Pillow refuses by itself).
    max_image_header_pixels: int = 150_000_000
    # Most decoded pixels (summed over the images, counted as for max_image_pixels) one request or streamed
    # message may carry.
    max_request_pixels: int = 500_000_000
    # Longest text accepted, in characters; tokens past the model's context are truncated and reported.
    max_text_chars: int = 4096
    # Most inputs, items, ids or queries in one request (or one streamed message).
    max_items_per_request: int = 1024
    # Most samples one FitPooling call may stream (all messages together); each holds ~50 KB of features.
    max_fit_samples: int = 10_000
    # Most encoded bytes of samples one FitPooling call may stream; they are held until the fit runs.
    max_fit_bytes: int = 1024 * 1024 * 1024
    # Largest top_k a search may ask for.
    max_top_k: int = 1000
    # Embedsvc RPCs and HTTP API requests served at once, counted from their first request message or whole body
    # (health and probes never wait).
    max_concurrent_rpcs: int = 256
    # RPCs and HTTP API requests that wait for one of those slots (gRPC until their deadline); more get
    # RESOURCE_EXHAUSTED.
    max_waiting_rpcs: int = 1024
    # Seconds a call may take to send its (next) request message; then DEADLINE_EXCEEDED.
    request_message_timeout_seconds: float = 30.0
    # Seconds an HTTP client has to send a request's headers, from connecting or from its previous response; then
    # the connection is closed (408 if part of a request came). A byte at a time does not extend it.
    http_header_timeout_seconds: float = 10.0
    # Seconds an HTTP request's body may take to arrive after its headers; then 408 DEADLINE_EXCEEDED.
    http_body_timeout_seconds: float = 30.0
    # Seconds an HTTP response may stay stuck because its client does not read it (less than 64 KiB taken while
    # the server's buffer is full or a closed connection's output unsent); then the connection is dropped.
    http_send_timeout_seconds: float = 30.0
    # Seconds an idle HTTP keep-alive connection stays open (at most http_header_timeout_seconds).
    http_keepalive_timeout_seconds: float = 5.0
    # Open HTTP connections; one more closes the oldest that is not serving a request (at most half the file
    # descriptors the process may open).
    http_max_connections: int = 2048
    # Largest HTTP request body, in bytes: one image of max_image_bytes in base64 (4/3 of it) with room to spare;
    # several images per request fit while they are smaller. Must hold one such image.
    http_max_body_bytes: int = 32 * 1024 * 1024
    # torch intra-op threads (0: the CPUs this process may use: affinity mask, cgroup CPU quota).
    torch_threads: int = 0
    # FAISS OpenMP threads (0: the CPUs this process may use); lower it when many searches run at once.
    faiss_threads: int = 0
    # gRPC front-end processes sharing the listen port (SO_REUSEPORT): each parses, authenticates, admits and decodes
    # requests, and one model process batches all their inputs and owns the store, HTTP and metrics; 0: one process
    # does everything. Admission limits are split evenly between front ends.
    frontends: int = 0
    # Threads that decode and preprocess images.
    decode_workers: int = 2
    # Nice increment of those threads (0-19): on a CPU the forward fills, decodes yield to the forward's
    # OpenMP team instead of stalling it (one preempted thread holds every other at the next barrier); 0: same
    # priority.
    decode_nice: int = DEFAULT_DECODE_NICE
    # Port of the Prometheus /metrics endpoint on the listen host; -1 disables it, 0 picks a free port.
    metrics_port: int = 9100
    # Index this many generated scenes into a demo collection "scenes" when the store starts empty (0: none).
    demo_size: int = 500
    # Write a collection's checkpoint after this many logged changes (and no sooner than a quarter of its items).
    checkpoint_every: int = 20_000
    # Seconds between progress lines (logged at INFO) while a collection loads, replays its log or rebuilds its
    # index at start-up; the server listens meanwhile, /readyz answering 503 until every collection is loaded.
    load_progress_seconds: float = 5.0
    # Seconds in-flight RPCs get to finish after SIGTERM.
    shutdown_grace_seconds: float = 10.0
    # JSON file of API tokens with scopes (see docs/security.md); empty with auth_tokens empty: auth off.
    auth_tokens_file: str = ""
    # The same JSON inline (e.g. from EMBEDSVC_AUTH_TOKENS, a Kubernetes Secret); added to the file's tokens.
    auth_tokens: str = ""
    # TLS certificate chain (PEM) of the server; with tls_key_file, the port serves TLS only.
    tls_cert_file: str = ""
    # TLS private key (PEM) of the server.
    tls_key_file: str = ""
    # CA bundle (PEM) that client certificates must chain to: set for mutual TLS.
    tls_client_ca_file: str = ""
    # Log format: "json" (one object per line) or "text".
    log_format: str = "json"
    # Log level.
    log_level: str = "INFO"

    def validate(self) -> ServerConfig:
        positive = [
            "max_batch_size",
            "max_queue",
            "max_message_bytes",
            "max_image_bytes",
            "max_image_pixels",
            "max_image_header_pixels",
            "max_text_chars",
            "max_items_per_request",
            "max_top_k",
            "max_concurrent_rpcs",
            "decode_workers",
            "checkpoint_every",
            "max_waiting_rpcs",
            "max_request_pixels",
            "max_fit_samples",
            "max_fit_bytes",
            "http_max_connections",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise InvalidInput(f"config {name} must be at least 1, got {getattr(self, name)}")
        if self.max_image_header_pixels > PILLOW_PIXEL_LIMIT:
            raise InvalidInput(
                f"config max_image_header_pixels must be at most {PILLOW_PIXEL_LIMIT} (Pillow refuses "
                f"larger images itself), got {self.max_image_header_pixels}"
            )
        if not self.request_message_timeout_seconds > 0:
            raise InvalidInput("config request_message_timeout_seconds must be > 0")
        for name in (
            "http_header_timeout_seconds",
            "http_body_timeout_seconds",
            "http_send_timeout_seconds",
            "http_keepalive_timeout_seconds",
        ):
            if not getattr(self, name) > 0:
                raise InvalidInput(f"config {name} must be > 0, got {getattr(self, name)}")
        if self.http_keepalive_timeout_seconds > self.http_header_timeout_seconds:
            raise InvalidInput(
                f"config http_keepalive_timeout_seconds ({self.http_keepalive_timeout_seconds:g}) must not "
                f"exceed http_header_timeout_seconds ({self.http_header_timeout_seconds:g}): the next "
                f"request's headers are due within that"
            )
        one_image = base64_size(self.max_image_bytes) + JSON_ENVELOPE_BYTES
        if self.http_listen and self.http_max_body_bytes < one_image:
            raise InvalidInput(
                f"config http_max_body_bytes ({self.http_max_body_bytes:,}) must hold one image of "
                f"max_image_bytes in base64 with its JSON: at least {one_image:,} bytes"
            )
        if not 0 <= self.frontends <= MAX_FRONTENDS:
            raise InvalidInput(
                f"config frontends must be between 0 (one process) and {MAX_FRONTENDS}, got {self.frontends}"
            )
        if self.max_batch_delay_ms < 0:
            raise InvalidInput("config max_batch_delay_ms must be >= 0")
        if not self.load_progress_seconds >= 0:
            raise InvalidInput(f"config load_progress_seconds must be >= 0, got {self.load_progress_seconds}")
        if not 0 <= self.decode_nice <= 19:
            raise InvalidInput(f"config decode_nice must be between 0 and 19, got {self.decode_nice}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise InvalidInput(f"config log_level must be one of {', '.join(LOG_LEVELS)}, got {quoted(self.log_level)}")
        if self.log_format not in ("json", "text"):
            raise InvalidInput("config log_format must be json or text")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise InvalidInput("config tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise InvalidInput("config tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.store_backend not in ("local", "milvus"):
            raise InvalidInput(f"config store_backend must be local or milvus, got {quoted(self.store_backend)}")
        if self.store_backend == "milvus" and not self.milvus_uri:
            raise InvalidInput(
                "config store_backend milvus needs milvus_uri (http://host:19530 or a Milvus Lite .db file)"
            )
        port = self.listen.rsplit(":", 1)[-1] if ":" in self.listen else ""
        if not port.isdigit() or int(port) > 65535:
            raise InvalidInput(f"config listen must be HOST:PORT with a port of 0-65535, got {quoted(self.listen)}")
        http_port = self.http_listen.rsplit(":", 1)[-1] if ":" in self.http_listen else ""
        if self.http_listen and (not http_port.isdigit() or int(http_port) > 65535):
            raise InvalidInput(
                f"config http_listen must be HOST:PORT with a port of 0-65535 (or empty to disable), "
                f"got {quoted(self.http_listen)}"
            )
        _ = self.allowed_hosts, self.cors_origins  # parsed here: a bad entry stops start-up, not a request
        if not -1 <= self.metrics_port <= 65535:
            raise InvalidInput(f"config metrics_port must be -1 (off) or 0-65535, got {self.metrics_port}")
        if self.shutdown_grace_seconds < 0:
            raise InvalidInput("config shutdown_grace_seconds must be >= 0")
        return self

    def engine_config(self) -> EngineConfig:
        """The settings the engine reads, from the fields of the same names."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)})

    @property
    def preload(self) -> list[str]:
        return [m.strip() for m in self.preload_models.split(",") if m.strip()]

    @property
    def allowed_hosts(self) -> tuple[str, ...]:
        """http_allowed_hosts, lowercased: "*", names, or ".suffix" patterns."""
        return tuple(_allowed_host(entry) for entry in _entries(self.http_allowed_hosts))

    @property
    def cors_origins(self) -> tuple[str, ...]:
        """http_cors_origins as browsers write an Origin header (lowercase, no default port), or "*"."""
        return tuple(_origin(entry) for entry in _entries(self.http_cors_origins))


HOST_NAME = re.compile(r"\.?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
DEFAULT_PORTS = {"http": 80, "https": 443}


def _entries(text: str) -> list[str]:
    return [entry.strip().lower() for entry in text.split(",") if entry.strip()]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
        return True
    except ValueError:
        return False


def _allowed_host(entry: str) -> str:
    if entry == "*" or _is_ip(entry) or HOST_NAME.fullmatch(entry):
        return entry.strip("[]").rstrip(".")
    raise InvalidInput(
        f"config http_allowed_hosts: {quoted(entry)} is not a host name; write names without "
        f"scheme or port (api.example.com, .example.com for it and its subdomains, or *)"
    )


def _origin(entry: str) -> str:
    if entry == "*":
        return entry
    try:
        parts = urllib.parse.urlsplit(entry)
        port = parts.port
    except ValueError:
        parts, port = None, None
    if (
        parts is None
        or parts.scheme not in DEFAULT_PORTS
        or not parts.hostname
        or parts.username is not None
        or parts.path
        or parts.query
        or parts.fragment
        or entry.endswith(("?", "#"))
    ):
        raise InvalidInput(
            f"config http_cors_origins: {quoted(entry)} is not an origin; write scheme://host[:port] "
            f"with no path, as the browser's address bar shows the front end "
            f"(https://app.example.com, http://localhost:3000), or *"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != DEFAULT_PORTS[parts.scheme] else "")


def base64_size(size: int) -> int:
    """Characters of `size` bytes in base64, as JSON carries them."""
    return -(-size // 3) * 4


def _convert(name: str, hint: Any, raw: Any) -> Any:
    try:
        if hint is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            return int(raw)
        if hint is float:
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"config {name}: bad value {quoted(raw)} ({exc})") from None


def field_docs() -> list[tuple[str, str, str]]:
    """(name, default, comment) per field, from the comment lines above each field, for docs/configuration.md."""
    import ast
    import inspect

    lines = inspect.getsource(ServerConfig).splitlines()
    docs = {}
    tree = ast.parse("\n".join(lines)).body[0]
    assert isinstance(tree, ast.ClassDef)
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):  # a field
            above: list[str] = []
            row = node.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#"):
                above.insert(0, lines[row].strip()[1:].strip())
                row -= 1
            docs[node.target.id] = " ".join(above)
    return [(f.name, repr(f.default), docs.get(f.name, "")) for f in dataclasses.fields(ServerConfig)]


def load_config(
    path: str | None = None, env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> ServerConfig:
    """Defaults < file (TOML or JSON) < EMBEDSVC_<FIELD> environment variables < overrides (CLI flags)."""
    hints = typing.get_type_hints(ServerConfig)
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    values: dict[str, Any] = {}
    if path:
        file = Path(path)
        if not file.is_file():
            raise InvalidInput(f"config file {file} does not exist")
        try:
            if file.suffix == ".toml":
                import tomllib

                data = tomllib.loads(file.read_text())
            else:
                data = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # TOMLDecodeError, JSONDecodeError: ValueError
            raise InvalidInput(
                f"config file {file}: cannot read it as {'TOML' if file.suffix == '.toml' else 'JSON'} ({exc})"
            ) from None
        if not isinstance(data, dict):
            raise InvalidInput(f"config file {file}: expected a table of settings, got {type(data).__name__}")
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidInput(f"config file {file}: unknown key(s) {', '.join(unknown)}")
        values.update(data)
    for key, raw in (os.environ if env is None else env).items():
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in names:
            values[key[len(ENV_PREFIX) :].lower()] = raw
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    converted = {k: _convert(k, hints[k], v) for k, v in values.items()}
    return ServerConfig(**converted).validate()
