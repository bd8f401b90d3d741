"""Admission of embedsvc RPCs: the request message is read and parsed here, then a slot is taken.

grpc's own `maximum_concurrent_rpcs` counts a call from its headers on: calls that send headers and never
a message (or never a token) fill it, and health checks are refused with everyone else. Instead, every
embedsvc method is served as a client-streaming handler that

- waits at most `message_timeout` seconds for each request message (DEADLINE_EXCEEDED after),
- parses the bytes itself, so a malformed message is INVALID_ARGUMENT with one log line (grpc.aio would
  answer UNKNOWN or INTERNAL and log a traceback per call),
- only then takes one of `max_active` slots (Slots, shared with the HTTP API's requests); up to `max_waiting`
  more calls wait for a slot (until their deadline), later ones get RESOURCE_EXHAUSTED.

The auth interceptor runs before this one and refuses bad tokens without reading a message, so
unauthenticated calls hold nothing. Health and reflection are not wrapped and never wait for a slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc

from embedsvc.errors import ResourceExhausted

log = logging.getLogger("embedsvc.rpc")

WRAPPED_PREFIX = "/embedsvc."


class Slots:
    """`max_active` calls served at once, and up to `max_waiting` more waiting for one. gRPC calls and HTTP API
    requests share one Slots: each takes a slot once its request has arrived whole, so the limit counts work,
    not connections or half-sent requests."""

    def __init__(self, max_active: int, max_waiting: int):
        self.max_active, self.max_waiting = max_active, max_waiting
        self._slots: asyncio.Semaphore | None = None  # made on the server's loop, at the first call
        self._waiting = 0
        self._active = 0

    async def acquire(self) -> None:
        """Waits for a slot; ResourceExhausted ("server busy") when max_waiting calls already wait."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_active)
        if self._slots.locked() and self._waiting >= self.max_waiting:
            raise ResourceExhausted(
                f"server busy: {self.max_active} calls running and {self._waiting} waiting; retry with backoff"
            )
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._active += 1

    def release(self) -> None:
        assert self._slots is not None, "release() before acquire()"
        self._active -= 1
        self._slots.release()

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def active(self) -> int:
        """Calls holding a slot now (for tests and logs)."""
        return self._active

    @property
    def full(self) -> bool:
        return self._slots is not None and self._slots.locked()

    @contextlib.asynccontextmanager
    async def held(self):
        await self.acquire()
        try:
            yield
        finally:
            self.release()


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, slots: Slots, message_timeout: float):
        self.slots, self.message_timeout = slots, message_timeout
        self.awaiting_message = 0  # calls waiting for their next request message now (for tests and logs)
        self._wrapped: dict[str, tuple[Any, Any]] = {}  # method path -> (its handler, the handler wrapping it)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(WRAPPED_PREFIX) or handler.response_streaming:
            return handler
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:  # the registered handler: its wrapper is made once
            return cached[1]
        method = details.method.rsplit("/", 1)[-1]
        behaviour = self._streaming(handler, method) if handler.request_streaming else self._unary(handler, method)
        # raw bytes in (deserializer None): parsing happens in _parse
        wrapped = grpc.stream_unary_rpc_method_handler(behaviour, None, handler.response_serializer)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped

    def _unary(self, handler, method: str):
        async def behaviour(request_iterator, context):
            raw = await self._next(request_iterator, context, method)
            if raw is None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the call ended without a request message"
                )
            request = await self._parse(handler, raw, context, method)
            await self._take_slot(context, method)  # not `async with self._slot(...)`: no generator per call
            try:
                return await handler.unary_unary(request, context)
            finally:
                self.slots.release()

        return behaviour

    def _streaming(self, handler, method: str):
        async def behaviour(request_iterator, context):
            async with contextlib.AsyncExitStack() as slot:
                admitted = False

                async def messages():
                    nonlocal admitted
                    while (raw := await self._next(request_iterator, context, method)) is not None:
                        message = await self._parse(handler, raw, context, method)
                        if not admitted:  # the first message: from here on the call does work
                            await slot.enter_async_context(self._slot(context, method))
                            admitted = True
                        yield message

                return await handler.stream_unary(messages(), context)

        return behaviour

    async def _next(self, request_iterator, context, method: str):
        """The next raw message, None at the end of the stream; a bounded wait."""
        self.awaiting_message += 1
        try:
            async with asyncio.timeout(self.message_timeout):  # in this task: wait_for would start one per message
                return await request_iterator.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            pass
        finally:
            self.awaiting_message -= 1
        await self._refuse(
            context,
            method,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"no request message within {self.message_timeout:g} s of the call (or of the "
            f"previous message); send the message with the headers",
        )

    async def _parse(self, handler, raw: bytes, context, method: str):
        try:
            return handler.request_deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, upb sometimes others
            await self._refuse(
                context,
                method,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"malformed request: {len(raw)} bytes that do not parse as the {method} request "
                f"message ({str(exc)[:200]})",
            )

    @contextlib.asynccontextmanager
    async def _slot(self, context, method: str):
        await self._take_slot(context, method)
        try:
            yield
        finally:
            self.slots.release()

    async def _take_slot(self, context, method: str) -> None:
        """Waits for a slot; a call refused for want of one is aborted with RESOURCE_EXHAUSTED."""
        try:
            await self.slots.acquire()
        except ResourceExhausted as exc:
            await self._refuse(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    @staticmethod
    async def _refuse(context, method: str, code: grpc.StatusCode, message: str):
        log.warning(
            "%s refused with %s: %s",
            method,
            code.name,
            message,
            extra={"rpc": method, "code": code.name, "peer": context.peer()},
        )
        await context.abort(code, message)
