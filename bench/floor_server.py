"""The RPC floor: an Embed server that does no work, answering every request with a canned response of the
shape embedsvc's would have (one `dim`-float cls vector per input). What a served request costs on this
machine before any decode, batching or forward: `bench/serving.py --floor` runs it beside the real server.

    python bench/floor_server.py DIM      # prints "serving on 127.0.0.1:PORT"
    python bench/floor_server.py DIM --frontends N [--model NAME] [--models-file F]

With --frontends, the floor of `embedsvc serve --frontends N`: the same front-end processes (parsing, admission,
image decoding to the model's input, shared memory to the model process), behind a model process whose "model"
answers every request with ones at once (the model is loaded only for its input size and transform).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embedsvc.service.wire import embed_response
from embedsvc.v1 import embedsvc_pb2_grpc as pb_grpc


class FloorServicer(pb_grpc.EmbedServiceServicer):
    def __init__(self, dim: int):
        self.dim = dim
        self.responses: dict[int, object] = {}

    async def Embed(self, request, context):
        n = len(request.inputs)
        if n not in self.responses:
            self.responses[n] = embed_response("floor", [1] * n, [False] * n, ["cls"], [np.ones((n, self.dim), "f4")])
        return self.responses[n]


class FloorEngine:
    """What the model channel asks of an Engine, doing no work: the real model's facts, canned vectors."""

    metrics = None

    def __init__(self, runtime, dim: int):
        self.runtime, self.dim = runtime, dim

    async def runtime_async(self, name: str):
        return self.runtime

    async def embed_batch(self, model, poolings, contents, include_tokens=False):
        from embedsvc.engine.engine import EmbeddedBatch, Text

        n = len(contents)
        modalities = ["text" if isinstance(c, Text) else "image" for c in contents]
        return self.runtime.encoder.loaded.spec.name, EmbeddedBatch(
            modalities, [np.ones((n, self.dim), "f4")] * max(1, len(poolings)), [False] * n, None, [0] * n
        )


async def serve_front_ends(dim: int, frontends: int, model: str, models_file: str) -> None:
    import tempfile

    from embedsvc.engine.engine import Engine
    from embedsvc.service.config import ServerConfig
    from embedsvc.service.frontends import FrontEnds, front_end_spec, reserve_port
    from embedsvc.service.modelchannel import ModelChannelServer
    from embedsvc.store import open_store

    config = ServerConfig(
        listen="127.0.0.1:0",
        frontends=frontends,
        log_level="WARNING",
        models_file=models_file,
        default_model=model or ServerConfig.default_model,
    ).validate()
    folder = tempfile.mkdtemp(prefix="embedsvc-floor-")
    engine = Engine(config.engine_config(), open_store("local", data_dir=folder + "/data"))
    runtime = engine.runtime(config.default_model)
    _sock, host, port = reserve_port(config.listen)
    channel = ModelChannelServer(FloorEngine(runtime, dim), folder + "/model.sock")
    await channel.start()
    group = FrontEnds(config, front_end_spec(config, folder, host, port))
    await group.start()
    print(f"serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await group.stop()


def keep_freed_heap() -> None:
    """glibc's malloc keeps freed memory instead of returning it to the kernel after every call. This process's heap
    holds little besides a call's message, so freeing a photo's megabytes frees the heap's top, which glibc trims
    (its trim threshold follows the largest freed block): the next call faults those pages in again, ~480 minor
    faults for a 1 MB photo, 1 ms of the call. embedsvc's server keeps long-lived objects above such blocks and
    measured ~1 fault a call without this setting (no gain with it), so the floor would count a cost the server
    does not pay. Fixed thresholds (32 MiB, the mmap maximum; 256 MiB to trim) keep the floor at the transport."""
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (mallopt and mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 256 << 20)):
        print("floor_server: no glibc mallopt; the floor may include malloc's page faults", file=sys.stderr)


async def serve(dim: int) -> None:
    keep_freed_heap()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 26)])
    pb_grpc.add_EmbedServiceServicer_to_server(FloorServicer(dim), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("dim", type=int)
    parser.add_argument("--frontends", type=int, default=0)
    parser.add_argument("--model", default="")
    parser.add_argument("--models-file", default="")
    args = parser.parse_args()
    if args.frontends:
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        asyncio.run(serve_front_ends(args.dim, args.frontends, args.model, args.models_file))
    else:
        asyncio.run(serve(args.dim))
