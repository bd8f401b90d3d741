"""Dynamic batching: concurrent requests for one model and tower share one forward pass.

Each request submits its inputs (texts, or preprocessed image tensors) and awaits its slice of the
batch's token features. A worker per (model, tower) waits up to `max_delay` after the first waiting
request, fills the batch up to `max_batch` inputs, and runs the model in a dedicated thread so the
event loop keeps serving. A request names the token modes it needs; a batch computes the union of its
requests' modes in its one pass (modes share the trunk, so mixing them costs only extra last blocks).
The queue is bounded in inputs: past `max_queue`, requests are refused with ResourceExhausted at once
instead of piling up. A request cancelled while it waits (deadline, client gone) is dropped before it
costs a forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

from embedsvc.errors import ResourceExhausted
from embedsvc.pooling.features import FINAL, TokenFeatures

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    inputs: list
    future: asyncio.Future
    modes: tuple[str, ...] = (FINAL,)
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Coalesces requests for one encoder function ((texts or image tensors, token modes) -> TokenFeatures)."""

    def __init__(self, name: str, encode: Callable[[list, tuple], TokenFeatures], executor: ThreadPoolExecutor,
                 max_batch: int, max_delay_s: float, max_queue: int,
                 on_batch: Optional[Callable[[str, int, int], None]] = None):
        self.name = name
        self.encode = encode
        self.executor = executor
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.on_batch = on_batch  # (name, batch size, queue depth) for metrics
        self.queued_inputs = 0
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker: Optional[asyncio.Task] = None

    async def submit(self, inputs: list, modes: tuple[str, ...] = (FINAL,)) -> TokenFeatures:
        """The features of `inputs`, with (at least) the token `modes`."""
        if not inputs:
            raise ValueError("submit needs at least one input")
        if self.queued_inputs + len(inputs) > self.max_queue:
            raise ResourceExhausted(f"{self.name}: {self.queued_inputs} inputs already queued (limit {self.max_queue}); "
                                    f"retry with backoff or send smaller batches")
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")
        parts = [inputs[i:i + self.max_batch] for i in range(0, len(inputs), self.max_batch)]
        pending = [_Pending(part, asyncio.get_running_loop().create_future(), tuple(modes)) for part in parts]
        self.queued_inputs += len(inputs)
        for p in pending:
            self._queue.put_nowait(p)
        try:
            results = await asyncio.gather(*(p.future for p in pending))
        except BaseException:
            for p in pending:
                p.future.cancel()  # whatever has not run yet is skipped by the worker
            raise
        return TokenFeatures.concat(results)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [first]
            size = len(first.inputs)
            deadline = first.enqueued + self.max_delay_s
            while size < self.max_batch:
                timeout = deadline - time.perf_counter()
                try:
                    nxt = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
                if size + len(nxt.inputs) > self.max_batch:
                    self._queue_front(nxt)
                    break
                batch.append(nxt)
                size += len(nxt.inputs)
            live = [p for p in batch if not p.future.done()]
            for p in batch:
                self.queued_inputs -= len(p.inputs)
            if not live:
                continue
            inputs = [x for p in live for x in p.inputs]
            modes = tuple(dict.fromkeys(m for p in live for m in p.modes))
            if self.on_batch:
                self.on_batch(self.name, len(inputs), self.queued_inputs)
            try:
                features = await loop.run_in_executor(self.executor, self.encode, inputs, modes)
            except BaseException as exc:  # noqa: BLE001 - hand every waiter the error, keep the worker alive
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            start = 0
            for p in live:
                rows = list(range(start, start + len(p.inputs)))
                start += len(p.inputs)
                if not p.future.done():
                    p.future.set_result(features.select(rows))

    def _queue_front(self, pending: _Pending) -> None:
        """Puts a request that did not fit back at the head of the queue."""
        rest = []
        while not self._queue.empty():
            rest.append(self._queue.get_nowait())
        self._queue.put_nowait(pending)
        for p in rest:
            self._queue.put_nowait(p)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

