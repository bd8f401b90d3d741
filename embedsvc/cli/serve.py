"""`embedsvc serve`: run the gRPC and HTTP server until SIGTERM/SIGINT, then shut down gracefully."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import typing

from embedsvc.cli.models import add_model_arguments, model_options, resolve_model
from embedsvc.service.config import ServerConfig, load_config

log = logging.getLogger("embedsvc.serve")


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        description="Run the embedsvc server: gRPC, HTTP/JSON and the search page. Settings: "
        "defaults < --config file < EMBEDSVC_* environment variables < these flags.",
    )
    p.add_argument("--config", help="TOML or JSON config file")
    hints = typing.get_type_hints(ServerConfig)
    add_model_arguments(p, what="serve this model as the default (registered in the server, loaded at start-up)")
    for f in dataclasses.fields(ServerConfig):
        if f.name == "models_file":  # the model option group's
            continue
        kind = hints[f.name]
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            type=kind if kind in (int, float) else str,
            help=f"(default: {f.default})",
        )
    p.set_defaults(run=run)


def run(args) -> int:
    from embedsvc.service.logs import configure_logging
    from embedsvc.service.preflight import check_settings

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    options = model_options(args)
    if options.model or options.has_weight_source:
        spec = resolve_model(args)  # registered in this process, where the engine looks names up
        overrides["default_model"] = spec.name
        if args.preload_models is None:
            overrides["preload_models"] = spec.name
    config = load_config(args.config, overrides=overrides)
    configure_logging(config.log_level, config.log_format)
    check_settings(config)  # before the model and torch imports: a bad setting costs a fraction of a second
    return asyncio.run(serve(config))


async def serve(config: ServerConfig) -> int:
    if config.frontends:
        from embedsvc.service.frontends import serve_with_front_ends

        return await serve_with_front_ends(config)
    from embedsvc.service.server import create_server, index_demo_collection

    server, port = await create_server(config)
    try:
        await index_demo_collection(server.engine, config.demo_size)
    except BaseException:
        await server.stop(0)
        raise
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host = config.listen.rsplit(":", 1)[0]
    metrics = f", metrics on http://{host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    if server.http:
        metrics = (
            f", HTTP API and search page on {server.http.scheme}://{server.http.host}:{server.http_port}/" + metrics
        )
    data = config.data_dir if config.store_backend == "local" else f"milvus {config.milvus_uri}"
    waiter = asyncio.create_task(server.wait_for_termination())
    stopping = asyncio.create_task(stop.wait())
    ready = asyncio.create_task(server.wait_ready())
    if not server.store.wait_loaded(0):
        # Probes answer while collections load; "serving on" below still means every collection answers.
        print(
            f"embedsvc listening on {host}:{port}{metrics} (data: {data}); loading collections, /readyz 503 "
            f"until loaded",
            file=sys.stderr,
            flush=True,
        )
    await asyncio.wait([waiter, stopping, ready], return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and not ready.cancelled():
        log.info(
            "serving",
            extra={
                "address": f"{host}:{port}",
                "metrics_port": server.metrics_port,
                "http_port": server.http_port,
                "data": data,
            },
        )
        print(
            f"embedsvc serving on {host}:{port}{metrics} (data: {data}); Ctrl-C or SIGTERM to stop",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.wait([waiter, stopping], return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    log.info("shutting down", extra={"grace_s": config.shutdown_grace_seconds})
    await server.stop()
    waiter.cancel()
    return 0
