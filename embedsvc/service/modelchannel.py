"""The model process's channel to its front-end processes: Embed inputs in, pooled vectors out.

With `frontends` > 0 (embedsvc.service.frontends), several front-end processes parse, authenticate, admit and
decode requests, and one model process per device batches every front end's inputs into its forwards. Each
front end holds one Unix-socket connection to the model process:

- on connecting it gets the name of a shared-memory segment the model process made for it (and unlinks when
  the connection ends, so a killed front end leaks nothing); the front end writes each decoded image there
  (ClipEncoder.prepare's uint8 tensor, ~15 KB at 72 px, 150 KB at 224 px) and sends only its place;
- frames are a 4-byte length and a pickle: ("embed", id, model, poolings, inputs), ("facts", id, model),
  ("cancel", id), ("call", 0, method, code, seconds) (for /metrics: a call the front end answered itself) one
  way; ("ok", id, value) or ("err", id, error class, message) the other, exactly one per request, so the front
  end frees a request's shared memory only once the model process is done with it;
- the model process feeds the inputs to the engine's batchers (Engine.embed_batch with PreparedImage
  contents): the same continuous batching, queue limit and poolings as an in-process request.

Only the model process opens the store; collection RPCs travel from the front ends to it over gRPC on a
Unix socket (embedsvc.service.frontends).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import pickle
import struct
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Protocol

import numpy as np
import torch

from embedsvc import errors
from embedsvc.engine.engine import Content, EmbeddedBatch, ModelRuntime, PreparedImage, Text
from embedsvc.errors import EmbedsvcError, Unavailable
from embedsvc.pooling import PoolingSpec

log = logging.getLogger(__name__)

HEADER = struct.Struct("<I")
# Shared memory per front end for images in flight: 64 MiB holds ~430 ViT-B-32 inputs (224 px, uint8); an
# image that finds no room travels inside the frame instead (slower, never refused).
SHM_BYTES = 64 * 1024 * 1024
DTYPES = {"uint8": torch.uint8, "float32": torch.float32}


def frame(message: tuple) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


class _Frames(asyncio.Protocol):
    """Splits a byte stream into pickled frames and hands each to `on_message`."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if len(self._buffer) < HEADER.size + size:
                return
            message = pickle.loads(self._buffer[HEADER.size : HEADER.size + size])
            del self._buffer[: HEADER.size + size]
            try:
                self.on_message(message)
            except Exception:
                log.exception("model channel: cannot handle a %r message", message[0])

    def send(self, message: tuple) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(message))

    def on_message(self, message: tuple) -> None:
        raise NotImplementedError


# -- the model process's side ---------------------------------------------------------------


class ChannelEngine(Protocol):
    """What the model process's side asks of its Engine (bench/floor_server.py stands in one that does no work)."""

    metrics: Any  # Metrics, or None

    async def runtime_async(self, name: str) -> ModelRuntime: ...

    async def embed_batch(
        self, model: str, poolings: Sequence[PoolingSpec], contents: Sequence[Content], include_tokens: bool = False
    ) -> tuple[str, EmbeddedBatch]: ...


class _FrontEndConnection(_Frames):
    """One front end, seen from the model process: its shared memory and its requests in flight."""

    def __init__(self, engine: ChannelEngine, shm_bytes: int, connections: set):
        super().__init__()
        self.engine, self.connections = engine, connections
        self.shm = shared_memory.SharedMemory(create=True, size=shm_bytes)
        self.tasks: dict[int, asyncio.Task] = {}

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.connections.add(self)
        self.send(("hello", self.shm.name, self.shm.size))

    def connection_lost(self, exc) -> None:
        """A front end that exits or is killed: its requests are cancelled (their callers are gone with it)
        and its segment unlinked; the mapping stays valid for a forward that still reads it."""
        self.connections.discard(self)
        for task in self.tasks.values():
            task.cancel()
        self.shm.unlink()

    def on_message(self, message: tuple) -> None:
        kind, rid = message[0], message[1]
        if kind == "call":  # a call the front end served itself, for /metrics
            if self.engine.metrics:
                self.engine.metrics.record_call(*message[2:])
            return
        if kind == "cancel":
            task = self.tasks.get(rid)
            if task is not None:
                task.cancel()
            return
        work = self._embed(*message[2:]) if kind == "embed" else self._facts(*message[2:])
        task = asyncio.get_running_loop().create_task(work)
        self.tasks[rid] = task
        task.add_done_callback(lambda t: self._answer(rid, t))

    def _answer(self, rid: int, task: asyncio.Task) -> None:
        self.tasks.pop(rid, None)
        if task.cancelled():
            self.send(("err", rid, "Cancelled", "cancelled"))
        elif isinstance(task.exception(), EmbedsvcError):
            exc = task.exception()
            self.send(("err", rid, type(exc).__name__, str(exc)))
        elif task.exception() is not None:
            log.error("model channel request failed", exc_info=task.exception())
            self.send(("err", rid, "Internal", f"internal error: {type(task.exception()).__name__}"))
        else:
            self.send(("ok", rid, task.result()))

    async def _facts(self, model: str) -> tuple:
        """What a front end needs to check and decode inputs for `model`: its name, input size and transform."""
        runtime = await self.engine.runtime_async(model)
        loaded = runtime.encoder.loaded
        return loaded.spec.name, loaded.image_size, pickle.dumps(loaded.preprocess)

    async def _embed(self, model: str, poolings: list, inputs: list) -> tuple:
        contents = [Text(x[1]) if x[0] == "t" else PreparedImage(self._pixels(x)) for x in inputs]
        name, batch = await self.engine.embed_batch(model, [PoolingSpec(n, p) for n, p in poolings], contents)
        return name, batch.modalities, batch.vectors, batch.truncated, batch.token_counts

    def _pixels(self, item: tuple) -> torch.Tensor:
        kind, where, shape, dtype = item
        if kind == "b":  # no room in shared memory: the bytes came in the frame
            return torch.frombuffer(bytearray(where), dtype=DTYPES[dtype]).view(shape)
        count = int(np.prod(shape))
        return torch.frombuffer(self.shm.buf, dtype=DTYPES[dtype], count=count, offset=where).view(shape)


class ModelChannelServer:
    """Listens on a Unix socket for front-end processes (embedsvc.service.frontends)."""

    def __init__(self, engine: ChannelEngine, path: str, shm_bytes: int = SHM_BYTES):
        self.engine, self.path, self.shm_bytes = engine, path, shm_bytes
        self.connections: set[_FrontEndConnection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: _FrontEndConnection(self.engine, self.shm_bytes, self.connections), self.path
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for connection in list(self.connections):
            if connection.transport is not None:  # made, so connected
                connection.transport.close()


# -- the front end's side -------------------------------------------------------------------


class _SharedSlots:
    """Places in the model process's segment, by size: a freed place is reused by the next image of its size
    (one model input size per model), new ones are cut from the top until the segment is full."""

    def __init__(self, shm: shared_memory.SharedMemory):
        self.shm, self._top = shm, 0
        self._free: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self._array = np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf)

    def put(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """Copies the tensor in; its (offset, size), or None when the segment is full."""
        data = tensor.contiguous().view(torch.uint8).reshape(-1).numpy()
        size = data.size
        free = self._free[size]
        if free:
            offset = free.popleft()
        elif self._top + size <= self.shm.size:
            offset, self._top = self._top, self._top + size
        else:
            return None
        self._array[offset : offset + size] = data
        return offset, size

    def release(self, places: list[tuple[int, int]]) -> None:
        for offset, size in places:
            self._free[size].append(offset)


class ModelChannelClient(_Frames):
    """A front end's connection to the model process: one request per Embed, answered once."""

    def __init__(self, on_lost=None):
        super().__init__()
        self.slots: _SharedSlots | None = None
        self._ready: asyncio.Future | None = None
        self._pending: dict[int, tuple[asyncio.Future, list]] = {}
        self._ids = itertools.count(1)
        self._on_lost = on_lost
        self.lost = False

    @classmethod
    async def connect(cls, path: str, on_lost=None) -> ModelChannelClient:
        loop = asyncio.get_running_loop()
        client = cls(on_lost)
        client._ready = loop.create_future()
        await loop.create_unix_connection(lambda: client, path)
        await client._ready
        return client

    def on_message(self, message: tuple) -> None:
        if message[0] == "hello":
            shm = shared_memory.SharedMemory(name=message[1])
            # the model process owns (and unlinks) the segment; Python 3.11 registers attachments too
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
            self.slots = _SharedSlots(shm)
            assert self._ready is not None  # connect made it before the connection opened
            self._ready.set_result(None)
            return
        future, places = self._pending.pop(message[1], (None, []))
        assert self.slots is not None  # the hello is the first message
        self.slots.release(places)
        if future is None or future.done():
            return
        if message[0] == "ok":
            future.set_result(message[2])
        else:
            future.set_exception(_error(message[2], message[3]))

    def connection_lost(self, exc) -> None:
        self.lost = True
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(Unavailable("the model process is gone; retry"))
        self._pending.clear()
        if self._on_lost:
            self._on_lost()

    async def request(self, kind: str, *args, places: list | None = None) -> Any:
        """Sends one request and waits for its answer; a cancelled wait tells the model process to drop it
        (its shared memory is freed when the model process answers)."""
        if self.lost:
            raise Unavailable("the model process is gone; retry")
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = (future, places or [])
        self.send((kind, rid, *args))
        try:
            return await future
        except asyncio.CancelledError:
            if not self.lost:
                self.send(("cancel", rid))
            raise

    def record_call(self, method: str, code: str, seconds: float) -> None:
        """Counts a call this front end served in the model process's /metrics (Metrics.record_call's shape)."""
        self.send(("call", 0, method, code, seconds))

    async def facts(self, model: str) -> tuple:
        return await self.request("facts", model)

    async def embed(self, model: str, poolings: list[PoolingSpec], texts_or_pixels: list) -> tuple[str, EmbeddedBatch]:
        """Pooled vectors of texts (str) and prepared images (tensors), in input order."""
        assert self.slots is not None  # connect returned after the hello
        inputs: list[tuple] = []  # ("t", text), ("b", bytes, shape, dtype) or ("s", offset, shape, dtype)
        places: list[tuple[int, int]] = []
        for x in texts_or_pixels:
            if isinstance(x, str):
                inputs.append(("t", x))
                continue
            dtype = str(x.dtype).replace("torch.", "")
            place = self.slots.put(x)
            if place is None:
                inputs.append(("b", x.contiguous().numpy().tobytes(), tuple(x.shape), dtype))
            else:
                places.append(place)
                inputs.append(("s", place[0], tuple(x.shape), dtype))
        specs = [(p.name, dict(p.params)) for p in poolings]
        name, modalities, vectors, truncated, counts = await self.request("embed", model, specs, inputs, places=places)
        return name, EmbeddedBatch(modalities, vectors, truncated, None, counts)


def _error(name: str, message: str) -> BaseException:
    """The model process's error as the same domain error here, so it maps to the same status."""
    if name == "Cancelled":
        return asyncio.CancelledError()
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, EmbedsvcError):
        return kind(message)
    return RuntimeError(message)
