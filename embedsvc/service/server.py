"""Server assembly: `create_server(config) -> (server, port)`, health, reflection, metrics, shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedsvc.cpu import usable_cpus
from embedsvc.engine.engine import Engine, ImageBytes, UpsertRequestItem
from embedsvc.errors import InvalidInput
from embedsvc.models import resolve_device, resolve_precision
from embedsvc.pooling import PoolingSpec
from embedsvc.service.admission import AdmissionInterceptor, Slots
from embedsvc.service.auth import AuthInterceptor
from embedsvc.service.config import ServerConfig
from embedsvc.service.metrics import Metrics
from embedsvc.service.preflight import check_settings
from embedsvc.service.servicers import EmbedServicer, IndexServicer
from embedsvc.store import VectorStore, open_store
from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["EmbedService"].full_name,
    pb.DESCRIPTOR.services_by_name["IndexService"].full_name,
)
INDEX_SERVICE = SERVICE_NAMES[1]  # NOT_SERVING in gRPC health until the store loaded every collection
DEMO_COLLECTION = "scenes"


class EmbedsvcServer:
    """The running server: the grpc.aio server plus what it owns (engine, store, health, metrics)."""

    def __init__(
        self,
        config: ServerConfig,
        grpc_server: grpc.aio.Server,
        engine: Engine,
        store: VectorStore,
        health_servicer: health.aio.HealthServicer,
        metrics_http=None,
        http=None,
        admission: AdmissionInterceptor | None = None,
    ):
        self.config, self.grpc_server, self.engine, self.store = config, grpc_server, engine, store
        self.health = health_servicer
        self.admission = admission  # its counters (calls awaiting a message, slots held) show the server's load
        self.http = http  # embedsvc.service.http.HttpServer, or None when http_listen is empty
        self.http_port = http.port if http else None
        self.metrics_http = metrics_http
        self.metrics_port = metrics_http.server_port if metrics_http else None
        self._stopped = False
        self._loaded: asyncio.Task | None = None
        self._grpc_started = False

    async def start(self) -> None:
        """Listens at once, while the store may still load its collections: the process reports alive (gRPC
        health "" and EmbedService SERVING, /healthz 200) and not ready (IndexService NOT_SERVING, /readyz
        503) until every collection is loaded; requests to a collection still loading get UNAVAILABLE."""
        await self.grpc_server.start()
        self._grpc_started = True
        for name in ("", *SERVICE_NAMES):
            loads = name == INDEX_SERVICE and not self.store.wait_loaded(0)
            await self.health.set(
                name, health_pb2.HealthCheckResponse.NOT_SERVING if loads else health_pb2.HealthCheckResponse.SERVING
            )
        if self.http:
            await self.http.start()
        self._loaded = asyncio.get_running_loop().create_task(self._serve_when_loaded())

    async def _serve_when_loaded(self) -> None:
        if not self.store.wait_loaded(0):
            await asyncio.get_running_loop().run_in_executor(None, self.store.wait_loaded)
        if not self._stopped:
            await self.health.set(INDEX_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    async def wait_ready(self) -> None:
        """Returns once every collection is loaded (and IndexService reported SERVING)."""
        assert self._loaded is not None, "start() the server first"
        await asyncio.shield(self._loaded)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()

    async def stop(self, grace: float | None = None) -> None:
        """Health to NOT_SERVING, let in-flight RPCs finish (up to `grace` s), checkpoint and close the store."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if self._loaded is not None and not self._loaded.done():
            self._loaded.cancel()  # the load itself stops when the store closes
        if self.http:
            self.http.drain()
        grace = grace if grace is not None else self.config.shutdown_grace_seconds
        # never started (the demo's indexing failed): grpc.aio's stop() alone would keep the port until exit
        grpc_stop = self.grpc_server.stop(grace) if self._grpc_started else _release_port(self.grpc_server)
        await asyncio.gather(grpc_stop, *([self.http.stop(grace)] if self.http else []))
        await self.engine.close()
        self.store.close()
        if self.metrics_http:
            self.metrics_http.shutdown()
        log.info("server stopped")


async def create_server(config: ServerConfig, internal_listen: str = "") -> tuple[EmbedsvcServer, int]:
    """Builds the server (not started): binds the port, opens the store (its collections load in a thread: see
    EmbedsvcServer.start), preloads models. With `internal_listen` (a unix: address in a private folder), the
    model process of `frontends` mode: its gRPC serves only its front ends there, with neither TLS nor tokens
    (they checked both); HTTP and metrics stay as configured.

    The store is opened after the model stack's imports, not before them to overlap: a loader thread holding
    the GIL made every file read of the imports wait its switch interval, and the start was slower (measured
    at 1M: 24.7-30.1 s to serve against 20.4-23.3 s)."""
    tokens, credentials = check_settings(config)  # bad settings fail before anything opens
    grpc_tokens, listen = (tokens, config.listen) if not internal_listen else ([], internal_listen)
    if internal_listen:
        credentials = None
    resolve_precision(config.precision, resolve_device(config.device))  # a bad device fails now, not per request
    store = open_store(
        config.store_backend,
        data_dir=config.data_dir,
        milvus_uri=config.milvus_uri,
        milvus_token=config.milvus_token,
        milvus_db=config.milvus_db,
        checkpoint_every=config.checkpoint_every,
        omp_threads=config.faiss_threads or usable_cpus(),
        max_top_k=config.max_top_k,
        background_load=True,
        progress_seconds=config.load_progress_seconds,
    )
    metrics = Metrics()
    try:
        engine = Engine(config.engine_config(), store, metrics)
    except BaseException:
        store.close()
        raise
    loop = asyncio.get_running_loop()
    for name in config.preload:
        await loop.run_in_executor(None, engine.runtime, name)
    for info in store.list_collections():
        engine._track_count(info.config.name, info.count)
    # No maximum_concurrent_rpcs: grpc would count half-open calls and health checks; AdmissionInterceptor
    # counts only calls that passed auth and sent their message. Keepalive finds dead peers; pings from
    # clients are limited (ping floods), idle connections are closed.
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", 300_000),
    ]
    slots = Slots(config.max_concurrent_rpcs, config.max_waiting_rpcs)  # shared with the HTTP API
    admission = AdmissionInterceptor(slots, config.request_message_timeout_seconds)
    interceptors = [AuthInterceptor(grpc_tokens), admission] if grpc_tokens else [admission]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    pb_grpc.add_EmbedServiceServicer_to_server(EmbedServicer(engine), server)
    pb_grpc.add_IndexServiceServicer_to_server(IndexServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port, cause = _add_port(server, listen, credentials)
    if not port:
        await engine.close()
        store.close()
        raise InvalidInput(
            f"cannot listen on {listen}: the port is taken or the address is not local "
            f"({cause}); pick another with --listen or EMBEDSVC_LISTEN"
        )
    metrics_http = None
    if config.metrics_port >= 0:
        host = config.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
        try:
            metrics_http = metrics.start_http(host, config.metrics_port)
        except OSError as exc:
            await _release_port(server)
            await engine.close()
            store.close()
            raise InvalidInput(
                f"cannot serve metrics on {host}:{config.metrics_port}: {exc.strerror or exc}; "
                f"pick another --metrics-port (or -1 to disable)"
            ) from None
    http = None
    if config.http_listen:
        from embedsvc.service.http import HttpServer

        try:
            http = HttpServer.bind(config, engine, tokens, slots)
        except InvalidInput:
            await _release_port(server)
            if metrics_http:
                metrics_http.shutdown()
            await engine.close()
            store.close()
            raise
    return EmbedsvcServer(config, server, engine, store, health_servicer, metrics_http, http, admission), port


def _add_port(server: grpc.aio.Server, listen: str, credentials) -> tuple[int, str]:
    """The port bound (0: not bound) and why not. gRPC's core logs a failed bind on file descriptor 2 itself, a
    second line beside the one-line error the caller raises: that log line is taken in and becomes the reason (its
    own exception only says to set GRPC_VERBOSITY); whatever else reached fd 2 meanwhile is written back."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as spill:
        saved = os.dup(2)
        os.dup2(spill.fileno(), 2)
        try:
            port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
            cause = "bind failed"
        except RuntimeError as exc:
            port, cause = 0, str(exc)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        spill.seek(0)
        lines = spill.read().decode("utf-8", "replace").splitlines(keepends=True)
    grpc_lines = [line for line in lines if _GRPC_LOG_LINE.match(line)] if not port else []
    others = [line for line in lines if line not in grpc_lines]
    if others:
        os.write(2, "".join(others).encode())
    if grpc_lines:
        cause = grpc_lines[-1].split("] ", 1)[-1].strip()
    return port, cause


_GRPC_LOG_LINE = re.compile(r"^[EWIF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [^ ]+:\d+\] ")


async def _release_port(server: grpc.aio.Server) -> None:
    """Lets go of the port a server not yet started has bound: grpc.aio keeps it through stop() and garbage
    collection until the process exits (an in-process start that failed, e.g. a test's, left it listening)."""
    await server.start()
    await server.stop(0)


async def index_demo_collection(engine: Engine, size: int) -> int:
    """Indexes generated scenes into 'scenes' when the store is empty, so a new user can search at once."""
    if size <= 0 or engine.store.list_collections():
        return 0
    started = time.perf_counter()
    await index_scenes(engine, DEMO_COLLECTION, size)
    log.info("indexed %d demo scenes into %r in %.1fs", size, DEMO_COLLECTION, time.perf_counter() - started)
    return size


async def index_scenes(engine: Engine, name: str, size: int, pooling: PoolingSpec | None = None) -> None:
    """Creates collection `name` of the first `size` generated validation scenes, thumbnails kept (for the
    search page; the compare view shows the same scenes under other poolings)."""
    from embedsvc.datasets import full_caption, generate_scene, render_scene

    runtime = await engine.runtime_async(engine.config.default_model)
    image_size = runtime.encoder.loaded.image_size
    await engine.create_collection(name, engine.config.default_model, pooling, "cosine", "flat")
    loop = asyncio.get_running_loop()

    def render(index: int):
        import io

        scene = generate_scene("val", index)
        buffer = io.BytesIO()
        render_scene(scene, image_size).save(buffer, format="PNG")
        return scene, buffer.getvalue()

    for start in range(0, size, 128):
        batch = await asyncio.gather(
            *(loop.run_in_executor(engine.decode_pool, render, i) for i in range(start, min(size, start + 128)))
        )
        await engine.upsert(
            name,
            [
                UpsertRequestItem(
                    scene.id,
                    ImageBytes(png),
                    None,
                    {
                        "caption": full_caption(scene),
                        "objects": len(scene.objects),
                        "colours": " ".join(sorted({o.colour for o in scene.objects})),
                        "shapes": " ".join(sorted({o.shape for o in scene.objects})),
                    },
                )
                for scene, png in batch
            ],
            thumbnails=True,
        )
