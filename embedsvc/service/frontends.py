"""`frontends` mode: N gRPC front-end processes on one port, one model process that batches for all of them.

One Python process serving every request spends most of a core on protobuf, gRPC's per-call work,
admission and response framing, in one event loop, while the forward waits for it (issue 26). With
`frontends` = N > 0, `embedsvc serve` is the model process and starts N front-end processes:

- each front end listens on the gRPC port with SO_REUSEPORT (the kernel spreads new connections over the live
  ones), runs auth, admission, parsing and image decoding to the model's input tensor, and sends Embed inputs
  to the model process through shared memory (embedsvc.service.modelchannel), which batches them across all
  front ends in its one executor per model;
- every other RPC (collections, upserts, searches, ListModels, Embed with include_tokens) is forwarded to the
  model process's own gRPC server on a Unix socket in a private folder: the model process is the store's only
  opener (one data-directory lock holder), and a front end acknowledges a write only when the model process
  committed it, so killing a front end loses nothing acknowledged;
- admission limits are split: each front end admits max_concurrent_rpcs / N calls and lets max_waiting_rpcs / N
  wait; the batch queue (max_queue) is the model process's, shared by all;
- a front end that dies is restarted; its connections fail (clients retry and reach another), its requests in
  the model process are cancelled. The HTTP API, the search page and /metrics stay in the model process;
  /metrics counts every call once, whichever process answered it (front ends report theirs over the channel).

    python -m embedsvc.service.frontends   # a front end; its settings come as JSON on stdin
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from embedsvc.cpu import lower_thread_priority
from embedsvc.encoder.preprocess import split_transform
from embedsvc.engine.engine import ImageBytes, Text, check_content, check_count, check_pixel_budget, decode_for_model
from embedsvc.errors import InvalidInput
from embedsvc.pooling import PoolingSpec
from embedsvc.service import calls
from embedsvc.service.admission import AdmissionInterceptor, Slots
from embedsvc.service.auth import AuthInterceptor
from embedsvc.service.config import ServerConfig
from embedsvc.service.modelchannel import ModelChannelClient, ModelChannelServer
from embedsvc.service.preflight import check_settings
from embedsvc.service.servicers import rpc
from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc

log = logging.getLogger("embedsvc.frontends")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["EmbedService"].full_name,
    pb.DESCRIPTOR.services_by_name["IndexService"].full_name,
)
RESTART_DELAY_S = 1.0  # before a dead front end's replacement starts (a crash loop costs one start a second)


# -- the front end --------------------------------------------------------------------------


FORWARDED = contextvars.ContextVar("forwarded", default=False)  # this call went to the model process's gRPC


class _CallsServedHere:
    """FrontEngine.metrics: calls a front end answered itself are counted in the model process's /metrics;
    forwarded ones are counted there by the model process's own gRPC server (once)."""

    def __init__(self, client: ModelChannelClient):
        self.client = client

    def record_call(self, method: str, code: str, seconds: float) -> None:
        if not FORWARDED.get():
            self.client.record_call(method, code, seconds)


class FrontEngine:
    """What calls.embed needs of an Engine, in a front end: input checks and decoding here, the forward and the
    poolings in the model process."""

    def __init__(self, config: ServerConfig, client: ModelChannelClient):
        self.config, self.client = config, client
        self.limits = config.engine_config()  # the engine's input checks, run here before anything is sent
        self.metrics = _CallsServedHere(client)
        self.decode_pool = ThreadPoolExecutor(
            max_workers=config.decode_workers,
            thread_name_prefix="decode",
            initializer=lower_thread_priority,
            initargs=(config.decode_nice,),
        )
        self._facts: dict[str, tuple[int, Any]] = {}  # model name asked for -> (input size, prepare)

    async def _model(self, name: str) -> tuple[int, Any]:
        if name not in self._facts:
            _, size, transform = await self.client.facts(name)
            preprocess = pickle.loads(transform)
            split = split_transform(preprocess)
            self._facts[name] = (size, split.to_uint8 if split else preprocess)
        return self._facts[name]

    async def embed_batch(
        self, model: str, poolings: Sequence[PoolingSpec], contents: Sequence[Any], include_tokens: bool = False
    ):
        if include_tokens:
            raise InvalidInput("include_tokens goes to the model process (FrontEmbedServicer forwards it)")
        if not contents:
            raise InvalidInput("no inputs: send at least one text or image")
        check_count(self.limits, len(contents), "inputs")
        for i, content in enumerate(contents):
            check_content(self.limits, content, f"input {i}")
        images = [i for i, c in enumerate(contents) if not isinstance(c, Text)]
        inputs: list[Any] = [c.text if isinstance(c, Text) else None for c in contents]
        if images:
            size, prepare = await self._model(model)
            payloads = [contents[i].data if isinstance(contents[i], ImageBytes) else contents[i].image for i in images]
            loop = asyncio.get_running_loop()
            if len(images) == 1:  # its budget from the header its decode opens: one trip through the pool
                decode = functools.partial(decode_for_model, self.limits, size, prepare, payloads[0], lone=True)
                pixels = [await loop.run_in_executor(self.decode_pool, decode, f"input {images[0]}")]
            else:
                await loop.run_in_executor(self.decode_pool, check_pixel_budget, self.limits, payloads, size)
                pixels = await asyncio.gather(
                    *(
                        loop.run_in_executor(
                            self.decode_pool, decode_for_model, self.limits, size, prepare, payload, f"input {i}"
                        )
                        for i, payload in zip(images, payloads)
                    )
                )
            for i, tensor in zip(images, pixels):
                inputs[i] = tensor
        return await self.client.embed(model, list(poolings), inputs)


async def _forward(method, request, context):
    """One call to the model process's gRPC, its status passed on as is."""
    FORWARDED.set(True)
    try:
        return await method(request, timeout=context.time_remaining())
    except grpc.aio.AioRpcError as exc:
        await context.abort(exc.code(), exc.details() or "")


class FrontEmbedServicer(pb_grpc.EmbedServiceServicer):
    def __init__(self, engine: FrontEngine, channel: grpc.aio.Channel):
        self.engine, self.stub = engine, pb_grpc.EmbedServiceStub(channel)

    @rpc("Embed")
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        if request.include_tokens:  # token features are large and rare: the model process frames them
            return await _forward(self.stub.Embed, request, context)
        return await calls.embed(self.engine, request)

    @rpc("ListModels")
    async def ListModels(self, request, context) -> pb.ListModelsResponse:
        return await _forward(self.stub.ListModels, request, context)


def _forwarding(name: str):
    @rpc(name)
    async def method(self, request, context):
        return await _forward(getattr(self.stub, name), request, context)

    method.__name__ = name
    return method


class ForwardIndexServicer(pb_grpc.IndexServiceServicer):
    """IndexService in a front end: every call goes to the model process, which owns the store."""

    def __init__(self, engine: FrontEngine, channel: grpc.aio.Channel):
        self.engine, self.stub = engine, pb_grpc.IndexServiceStub(channel)

    for _name in (
        "CreateCollection",
        "GetCollection",
        "ListCollections",
        "DropCollection",
        "Upsert",
        "Delete",
        "Get",
        "Search",
        "FitPooling",
    ):
        locals()[_name] = _forwarding(_name)
    del _name


async def run_front_end(spec: dict) -> int:
    """A front end's life: connect to the model process, serve the port, stop on SIGTERM or when the model
    process is gone."""
    config = ServerConfig(**spec["config"]).validate()
    tokens, credentials = check_settings(config)
    stop = asyncio.Event()
    client = await ModelChannelClient.connect(spec["channel"], on_lost=stop.set)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    channel = grpc.aio.insecure_channel(spec["internal"], options=options)
    engine = FrontEngine(config, client)
    admission = AdmissionInterceptor(
        Slots(spec["max_active"], spec["max_waiting"]), config.request_message_timeout_seconds
    )
    server = grpc.aio.server(
        options=[
            *options,
            ("grpc.so_reuseport", 1),
            ("grpc.keepalive_time_ms", 60000),
            ("grpc.keepalive_timeout_ms", 20000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10000),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_connection_idle_ms", 300000),
        ],
        interceptors=[AuthInterceptor(tokens), admission] if tokens else [admission],
    )
    pb_grpc.add_EmbedServiceServicer_to_server(FrontEmbedServicer(engine, channel), server)
    pb_grpc.add_IndexServiceServicer_to_server(ForwardIndexServicer(engine, channel), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{spec['host']}:{spec['port']}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if not port:
        print(f"front end: cannot listen on {address}", file=sys.stderr, flush=True)
        return 2
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(0 if client.lost else config.shutdown_grace_seconds)
    await channel.close(None)  # the server stopped: nothing of ours is in flight
    engine.decode_pool.shutdown(wait=False, cancel_futures=True)
    return 0


# -- the model process ----------------------------------------------------------------------


def reserve_port(listen: str) -> tuple[socket.socket, str, int]:
    """A bound (not listening) SO_REUSEPORT socket on `listen`: the port every front end joins, chosen here
    when it is 0, and refused here when another program holds it."""
    host, port = listen.rsplit(":", 1)
    host = host.strip("[]") or "0.0.0.0"
    try:
        info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)[0]
        sock = socket.socket(*info[:3])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(info[4])
    except OSError as exc:
        raise InvalidInput(
            f"cannot listen on {listen}: the port is taken or the address is not local "
            f"({exc.strerror or exc}); pick another with --listen or EMBEDSVC_LISTEN"
        ) from None
    return sock, listen.rsplit(":", 1)[0], sock.getsockname()[1]


class FrontEnds:
    """Starts, watches and restarts the front-end processes; stops them on shutdown."""

    def __init__(self, config: ServerConfig, spec: dict):
        self.config, self.spec = config, spec
        self.procs: list[asyncio.subprocess.Process | None] = [None] * config.frontends
        self._watchers: list[asyncio.Task] = []
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None]

    async def start(self) -> None:
        await asyncio.gather(*(self._spawn(i) for i in range(len(self.procs))))
        self._watchers = [asyncio.create_task(self._watch(i)) for i in range(len(self.procs))]

    async def _spawn(self, index: int) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "embedsvc.service.frontends",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None  # both piped
        proc.stdin.write(json.dumps({**self.spec, "index": index}).encode())
        proc.stdin.close()
        line = await proc.stdout.readline()
        if line.strip() != b"ready":
            await proc.wait()
            raise InvalidInput(f"front end {index} did not start (exit status {proc.returncode}); its error is above")
        self.procs[index] = proc

    async def _watch(self, index: int) -> None:
        while not self._stopping:
            proc = self.procs[index]
            assert proc is not None  # start() spawned it; a restart below replaces it before the next turn
            code = await proc.wait()
            if self._stopping:
                return
            log.warning("front end %d (pid %d) exited with status %s; starting another", index, proc.pid, code)
            await asyncio.sleep(RESTART_DELAY_S)
            if self._stopping:  # Ctrl-C reaches the whole process group: front ends may exit first
                return
            try:
                await self._spawn(index)
            except InvalidInput as exc:
                log.error("%s", exc)
                return

    async def stop(self) -> None:
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*(p.wait() for p in self.procs if p is not None))


def front_end_spec(config: ServerConfig, folder: str, host: str, port: int) -> dict:
    n = config.frontends
    return {
        "config": dataclasses.asdict(config),
        "channel": os.path.join(folder, "model.sock"),
        "internal": f"unix:{os.path.join(folder, 'grpc.sock')}",
        "host": host,
        "port": port,
        "max_active": max(1, config.max_concurrent_rpcs // n),
        "max_waiting": max(1, config.max_waiting_rpcs // n),
    }


async def serve_with_front_ends(config: ServerConfig, on_ready=None) -> int:
    """`embedsvc serve` with frontends > 0: this process is the model process (store, models, batching, HTTP)."""
    from embedsvc.service.server import create_server, index_demo_collection

    reserved, host, port = reserve_port(config.listen)
    folder = tempfile.mkdtemp(prefix="embedsvc-")  # 0700: only this user reaches the unauthenticated sockets
    group = None
    try:
        server, _ = await create_server(config, internal_listen=f"unix:{os.path.join(folder, 'grpc.sock')}")
        channel = ModelChannelServer(server.engine, os.path.join(folder, "model.sock"))
        try:
            await index_demo_collection(server.engine, config.demo_size)
            await channel.start()
            await server.start()
            group = FrontEnds(config, front_end_spec(config, folder, host, port))
            await group.start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            _announce(config, server, host, port, group.pids)
            if on_ready:
                on_ready(port, group)
            await stop.wait()
            log.info("shutting down", extra={"grace_s": config.shutdown_grace_seconds})
        finally:
            if group is not None:
                await group.stop()
            await channel.close()
            await server.stop()
    finally:
        reserved.close()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _announce(config: ServerConfig, server, host: str, port: int, pids: list[int]) -> None:
    extra = (
        f", HTTP API and search page on {server.http.scheme}://{server.http.host}:{server.http_port}/"
        if server.http
        else ""
    )
    if server.metrics_port:
        extra += f", metrics on http://{host}:{server.metrics_port}/metrics"
    data = config.data_dir if config.store_backend == "local" else f"milvus {config.milvus_uri}"
    log.info("serving", extra={"address": f"{host}:{port}", "frontends": pids, "data": data})
    print(
        f"embedsvc serving on {host}:{port}{extra} (data: {data}; front ends: pids "
        f"{', '.join(map(str, pids))}); Ctrl-C or SIGTERM to stop",
        file=sys.stderr,
        flush=True,
    )


def main() -> int:
    import torch

    from embedsvc.service.logs import configure_logging

    spec = json.loads(sys.stdin.read())
    configure_logging(spec["config"]["log_level"], spec["config"]["log_format"])
    torch.set_num_threads(1)  # a front end's tensors are one image's crop: no thread team competing with the forward
    return asyncio.run(run_front_end(spec))


if __name__ == "__main__":
    sys.exit(main())
