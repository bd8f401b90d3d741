"""The RPC floor: an Embed server that does no work, answering every request with a canned response of the
shape embedsvc's would have (one `dim`-float cls vector per input). What a served request costs on this
machine before any decode, batching or forward: `bench/serving.py --floor` runs it beside the real server.

    python bench/floor_server.py DIM      # prints "serving on 127.0.0.1:PORT"
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


async def serve(dim: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 1 << 26)])
    pb_grpc.add_EmbedServiceServicer_to_server(FloorServicer(dim), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
