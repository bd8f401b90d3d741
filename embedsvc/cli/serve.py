"""`embedsvc serve`: run the gRPC server until SIGTERM/SIGINT, then shut down gracefully."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import typing

from embedsvc.service.config import ServerConfig, load_config

log = logging.getLogger("embedsvc.serve")


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC server", description="Run the embedsvc gRPC server. Settings: "
                       "defaults < --config file < EMBEDSVC_* environment variables < these flags.")
    p.add_argument("--config", help="TOML or JSON config file")
    hints = typing.get_type_hints(ServerConfig)
    for f in dataclasses.fields(ServerConfig):
        kind = hints[f.name]
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                       type=kind if kind in (int, float) else str, help=f"(default: {f.default})")
    p.set_defaults(run=run)


def run(args) -> int:
    from embedsvc.service.logs import configure_logging

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    config = load_config(args.config, overrides=overrides)
    configure_logging(config.log_level, config.log_format)
    return asyncio.run(serve(config))


async def serve(config: ServerConfig) -> int:
    from embedsvc.service.server import create_server, index_demo_collection

    server, port = await create_server(config)
    try:
        await index_demo_collection(server.engine, config.demo_size)
    except BaseException:
        await server.stop(0)
        raise
    await server.start()
    host = config.listen.rsplit(":", 1)[0]
    metrics = f", metrics on http://{host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    data = config.data_dir if config.store_backend == "local" else f"milvus {config.milvus_uri}"
    log.info("serving", extra={"address": f"{host}:{port}", "metrics_port": server.metrics_port, "data": data})
    print(f"embedsvc serving on {host}:{port}{metrics} (data: {data}); Ctrl-C or SIGTERM to stop",
          file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(server.wait_for_termination())
    await asyncio.wait([waiter, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down", extra={"grace_s": config.shutdown_grace_seconds})
    await server.stop()
    waiter.cancel()
    return 0
