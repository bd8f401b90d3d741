"""Continuous batching: concurrent requests for one model and tower share one forward pass.

Each request submits its inputs (texts, or preprocessed image tensors) and awaits its slice of the
batch's token features. One worker per (model, tower) runs the model in a dedicated thread so the
event loop keeps serving, and never holds an idle model back for nothing:

- when the model is idle, a request runs at once, alone if it is alone;
- while a batch runs, arriving requests gather in the queue and the next batch takes all of them,
  up to `max_batch` inputs (continuous batching, as Triton's and TEI's schedulers do); the two towers
  of a model share a lock (`model_free`), so one tower gathers while the other's forward runs;
- under load (the previous batch ended less than `max_delay` ago), the worker waits for as many inputs
  as the previous batch had, so callers that are answered and come straight back share one batch again
  instead of being split into a small and a large one. `max_delay` bounds that wait, counted from the
  end of the previous forward: the model idles at most that long while requests are queued.

The queue is bounded in inputs: past `max_queue`, requests are refused with ResourceExhausted at once
instead of piling up. A request cancelled while it waits (deadline, client gone) is dropped before it
costs a forward pass (checked again in the model thread). A request of more than `max_batch` inputs is split
into parts of at most that size.
A request may pass `finish`, run in the model thread on its own slice of the features (poolings, copies
to numpy), so no per-item work is left for the event loop; an error there fails that request alone.
A request names the token modes it needs; a batch computes the union of its requests' modes in its one
pass (modes share the trunk, so mixing them costs only extra last blocks).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from embedsvc.errors import ResourceExhausted
from embedsvc.pooling.features import FINAL, TokenFeatures

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending:
    inputs: list
    future: asyncio.Future
    finish: Callable[[TokenFeatures], Any] | None = None
    modes: tuple[str, ...] = (FINAL,)


class DynamicBatcher:
    """Coalesces requests for one encoder function ((texts or image tensors, token modes) -> TokenFeatures)."""

    def __init__(
        self,
        name: str,
        encode: Callable[[list, tuple], TokenFeatures],
        executor: ThreadPoolExecutor,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[str, int, int], None] | None = None,
        model_free: asyncio.Lock | None = None,
    ):
        self.name = name
        self.encode = encode
        self.executor = executor
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.on_batch = on_batch  # (name, batch size, queue depth) for metrics
        self.model_free = model_free or asyncio.Lock()  # shared by the towers of one model: one forward at a time
        self.queued_inputs = 0
        self.batches = 0  # forward passes run, for tests and logs
        self.taken_inputs = 0  # inputs of the batch taken for the forward pass now running or due (tests, logs)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._target = 1  # inputs the next batch waits for while under load: the previous batch's size
        self._last_end = float("-inf")  # loop time the previous forward finished
        self._worker: asyncio.Task | None = None

    async def submit(
        self, inputs: list, finish: Callable[[TokenFeatures], Any] | None = None, modes: tuple[str, ...] = (FINAL,)
    ) -> Any:
        """The inputs' TokenFeatures, with (at least) the token `modes`; with `finish`, the list of
        finish(features) per part of at most max_batch inputs (one element unless the request was split),
        computed in the model thread."""
        if not inputs:
            raise ValueError("submit needs at least one input")
        if self.queued_inputs + len(inputs) > self.max_queue:
            raise ResourceExhausted(
                f"{self.name}: {self.queued_inputs} inputs already queued (limit {self.max_queue}); "
                f"retry with backoff or send smaller batches"
            )
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run(), name=f"batcher-{self.name}")
        pending = [
            _Pending(inputs[i : i + self.max_batch], loop.create_future(), finish, tuple(modes))
            for i in range(0, len(inputs), self.max_batch)
        ]
        self.queued_inputs += len(inputs)
        self._queue.extend(pending)
        self._arrived.set()
        try:  # one part (the usual case) is awaited as is: gather would add a future and a turn of the loop
            results = (
                [await pending[0].future] if len(pending) == 1 else await asyncio.gather(*(p.future for p in pending))
            )
        except BaseException:
            for p in pending:
                p.future.cancel()  # whatever has not run yet is skipped by the worker
            raise
        if finish is not None:
            return results
        return TokenFeatures.concat(results)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._gather(loop)
            async with self.model_free:  # the other tower's forward may hold the model: keep gathering meanwhile
                live = self._take()
                if not live:
                    continue
                self._target = self.taken_inputs = sum(len(p.inputs) for p in live)
                try:
                    outcomes, size = await loop.run_in_executor(self.executor, self._forward, live)
                except BaseException as exc:  # hand every waiter the error, keep the worker alive
                    for p in live:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                finally:
                    self._last_end = loop.time()
                    self.taken_inputs = 0
            if size:
                self.batches += 1
                if self.on_batch:
                    self.on_batch(self.name, size, self.queued_inputs)
            for p, (ok, value) in zip(live, outcomes):
                if not p.future.done():
                    if ok:
                        p.future.set_result(value)
                    else:
                        p.future.set_exception(value)

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Returns when the next batch should start: at once when the model has been idle longer than
        max_delay; under load, when the previous batch's number of inputs (or max_batch) is queued,
        or when max_delay has passed since the previous forward ended."""
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._last_end + self.max_delay_s
        want = min(self._target, self.max_batch)
        while self.queued_inputs < want:
            timeout = deadline - loop.time()
            if timeout <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        """Pops the queued requests that fit in one batch, in order; cancelled ones are dropped."""
        live: list[_Pending] = []
        size = 0
        while self._queue:
            p = self._queue[0]
            if p.future.done():
                self._queue.popleft()
                self.queued_inputs -= len(p.inputs)
                continue
            if live and size + len(p.inputs) > self.max_batch:
                break
            self._queue.popleft()
            self.queued_inputs -= len(p.inputs)
            live.append(p)
            size += len(p.inputs)
        return live

    def _forward(self, live: list[_Pending]) -> tuple[list[tuple[bool, Any]], int]:
        """Model thread: one forward for the batch, then each request's rows (views) and its finish;
        requests cancelled since they were taken are left out. Returns the outcomes and the inputs encoded."""
        cancelled = (False, asyncio.CancelledError())
        running = [p for p in live if not p.future.done()]
        taken = {id(p) for p in running}
        if not running:
            return [cancelled] * len(live), 0
        modes = tuple(dict.fromkeys(m for p in running for m in p.modes))
        features = self.encode([x for p in running for x in p.inputs], modes)
        outcomes: list[tuple[bool, Any]] = []
        start = 0
        for p in live:
            if id(p) not in taken:
                outcomes.append(cancelled)
                continue
            part = features if len(running) == 1 else _rows(features, start, start + len(p.inputs))
            start += len(p.inputs)
            if p.finish is None:
                outcomes.append((True, part))
                continue
            try:
                outcomes.append((True, p.finish(part)))
            except Exception as exc:  # noqa: BLE001 - this request's error, not the batch's
                outcomes.append((False, exc))
        return outcomes, sum(len(p.inputs) for p in running)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker


def _rows(features: TokenFeatures, start: int, stop: int) -> TokenFeatures:
    """Rows start:stop of a batch, as views (no copy), every token mode included."""
    return TokenFeatures(
        features.modality,
        features.tokens[start:stop],
        features.mask[start:stop],
        features.native[start:stop],
        features.grid,
        features.truncated[start:stop],
        features.mode,
        {m: t[start:stop] for m, t in features.other_modes.items()},
    )
