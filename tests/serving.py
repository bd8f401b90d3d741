"""Runs a real embedsvc server in-process on 127.0.0.1 (port 0), in its own event-loop thread."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from cli_runner import run_cli

from embedsvc.models import MODEL_REGISTRY, register_model
from embedsvc.service.config import ServerConfig
from embedsvc.service.server import EmbedsvcServer, create_server, index_demo_collection

# Set by conftest from --store-backend: "milvus" runs every in-process server on Milvus Lite.
STORE_BACKEND = "local"


def with_test_backend(config: ServerConfig) -> ServerConfig:
    """The config on the suite's store back end: with milvus, a Milvus Lite file inside its data_dir."""
    if STORE_BACKEND != "milvus" or config.store_backend != "local":
        return config
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(config, store_backend="milvus", milvus_uri=str(Path(config.data_dir) / "milvus.db"))


class ServerThread:
    def __init__(self, config: ServerConfig, demo: bool = False, wait_loaded: bool = True):
        """`wait_loaded`: start() returns once every stored collection is loaded, as `embedsvc serve` prints
        "serving on" then (the server listens before)."""
        if config.listen.endswith(":0") and config.http_listen == ServerConfig.http_listen:
            config = dataclasses.replace(config, http_listen="127.0.0.1:0")  # test servers take no fixed port
        self.config = with_test_backend(config)
        self.demo = demo
        self.wait_loaded = wait_loaded
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: EmbedsvcServer | None = None
        self.port = 0

    def call(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self.thread.start()

        async def boot():
            server, port = await create_server(self.config)
            if self.demo:
                await index_demo_collection(server.engine, self.config.demo_size)
            await server.start()
            if self.wait_loaded:
                await server.wait_ready()
            return server, port

        self.server, self.port = self.call(boot())
        return self

    @property
    def engine(self):
        return self.server.engine

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class EngineThread:
    """The engine alone (its store, models, batchers, metrics) on an event loop thread of its own, no gRPC or
    HTTP: the harness for engine and store logic that needs no transport. Opened as create_server opens it."""

    def __init__(self, config: ServerConfig):
        self.config = with_test_backend(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.engine = None

    def call(self, coro, timeout: float = 300):
        """Runs an engine coroutine on the engine's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> EngineThread:
        from embedsvc.engine.engine import Engine
        from embedsvc.service.metrics import Metrics
        from embedsvc.store import open_store

        self.thread.start()
        config = self.config
        store = open_store(
            config.store_backend,
            data_dir=config.data_dir,
            milvus_uri=config.milvus_uri,
            milvus_token=config.milvus_token,
            milvus_db=config.milvus_db,
            checkpoint_every=config.checkpoint_every,
            max_top_k=config.max_top_k,
        )
        self.engine = Engine(config.engine_config(), store, Metrics())
        for name in config.preload:
            self.engine.runtime(name)
        return self

    def stop(self) -> None:
        if self.engine is not None:
            self.call(self.engine.close())
            self.engine.store.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def tiny_engine(spec, data_dir, **overrides) -> Iterator[EngineThread]:
    """A running EngineThread of `tiny_config(spec, data_dir, **overrides)`; the spec is unregistered after."""
    engine = EngineThread(tiny_config(spec, data_dir, **overrides))
    try:
        yield engine.start()
    finally:
        engine.stop()
        MODEL_REGISTRY.pop(spec.name, None)


@contextmanager
def running_server(config: ServerConfig, demo: bool = False) -> Iterator[ServerThread]:
    server = ServerThread(config, demo).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def tiny_server(spec, data_dir, demo: bool = False, **overrides) -> Iterator[ServerThread]:
    """A running server of `tiny_config(spec, data_dir, **overrides)`; the spec is unregistered afterwards."""
    try:
        with running_server(tiny_config(spec, data_dir, **overrides), demo) as server:
            yield server
    finally:
        MODEL_REGISTRY.pop(spec.name, None)


def tiny_config(spec, data_dir, **overrides) -> ServerConfig:
    """A local server on a free port serving a test model spec (registered here), no demo, no metrics, no HTTP
    (pass http_listen="127.0.0.1:0" for the HTTP API on a free port)."""
    register_model(spec, replace=True)
    settings = {
        "listen": "127.0.0.1:0",
        "data_dir": str(data_dir),
        "default_model": spec.name,
        "preload_models": spec.name,
        "metrics_port": -1,
        "demo_size": 0,
        "log_format": "text",
        "http_listen": "",
    }
    settings.update(overrides)
    return ServerConfig(**settings)


def bundled_config(data_dir, **overrides) -> ServerConfig:
    """A local server on a free port serving the bundled default model (loaded at start unless
    preload_models=""), no demo, no metrics, no HTTP unless http_listen="127.0.0.1:0"."""
    settings = {
        "listen": "127.0.0.1:0",
        "data_dir": str(data_dir),
        "metrics_port": -1,
        "demo_size": 0,
        "log_format": "text",
        "http_listen": "",
    }
    settings.update(overrides)
    return ServerConfig(**settings)


class BlockingAsyncClient:
    """A real AsyncClient, its calls run to completion on an event loop of its own: a test suite written for
    Client runs unchanged against AsyncClient (tests/test_service_basics.py runs both)."""

    def __init__(self, address: str, **options):
        from embedsvc.client import AsyncClient

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def connect():  # grpc.aio channels belong to the loop they are made in
            return AsyncClient(address, **options)

        self.client = self._run(connect())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(600)

    def __getattr__(self, name: str):
        attribute = getattr(self.client, name)
        if not asyncio.iscoroutinefunction(attribute):
            return attribute
        return lambda *args, **kwargs: self._run(attribute(*args, **kwargs))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._run(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def model_busy(server: ServerThread | EngineThread, model: str = "") -> Iterator[threading.Event]:
    """Holds the model's forward thread, as a long forward pass would: requests queue behind it until
    the returned event is set (or the block ends)."""
    with executor_busy(server.engine.runtime(model).executor) as release:
        yield release


@contextmanager
def executor_busy(executor) -> Iterator[threading.Event]:
    """Holds one thread of a ThreadPoolExecutor of the server's (all of it, when it has one thread): jobs
    queue behind it until the returned event is set (or the block ends)."""
    release = threading.Event()
    started = threading.Event()

    def hold():
        started.set()
        release.wait(60)

    executor.submit(hold)
    started.wait(10)
    try:
        yield release
    finally:
        release.set()


def queued_jobs(executor) -> int:
    """Jobs waiting in a ThreadPoolExecutor's queue (not yet picked up by a thread)."""
    return executor._work_queue.qsize()


def wait_until(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.01) -> None:
    """Polls `condition` until it holds; fails the test after `timeout` seconds, naming `what` it waited for.
    The timeout only bounds a hang: the verdict never depends on how fast the machine is."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(every)


def serve_once(*args: str, process: bool = False, timeout: float = 120, **run: Any) -> subprocess.CompletedProcess:
    """`embedsvc serve` run to its exit, for start-up errors: no model preload, no demo, no metrics, a free port;
    `args` come last (a flag given again wins). In this process unless `process` (tests/cli_runner.py says when a
    process of its own is needed, as for the data-dir lock this process holds); `run`: cwd, env."""
    command = ["serve", "--preload-models", "", "--demo-size", "0", "--metrics-port", "-1", "--listen", "127.0.0.1:0"]
    return run_cli(*command, *args, process=process, timeout=timeout, **run)
