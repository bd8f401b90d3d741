"""Large JSON request bodies parsed in worker processes, so that no step of their parse runs in the server's.

Measured (issue 22, item 3): parsed in a thread of the server process, in short steps, a 32 MiB body still
stalled the event loop that also serves gRPC by 100-400 ms at times. The steps took turns with the loop for the
GIL (5 ms a turn, several turns per health check), the cyclic GC walked the decoded lists from whichever thread
allocated, and on a busy machine a thread preempted while it held the GIL held up every other one. In another
process none of that touches the server: the loop only shares the CPU with it, as with any other process.

So a body over json_body.SMALL is sent, as the chunks it arrived in, down a pipe to a worker process (each write
releases the GIL), which parses it with json_body as before (the item count checked before the items are
kept), and sends the message back as pieces: the message without its repeated message fields, then one piece
per element of those (a query, an item), each a few KiB of protobuf wire format. The server merges them into
the message one at a time (MergeFromString appends an element per piece), so no call holds the GIL for longer
than one piece takes. Workers start with the first large body (spawned: a fresh interpreter importing only
json_body), at most `size` of them, one body at a time each; one that dies fails its request with UNAVAILABLE
and is replaced by the next.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from google.protobuf.message import Message

from embedsvc.errors import InvalidInput, ResourceExhausted, Unavailable
from embedsvc.service import json_body

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger("embedsvc.http")


class Over(Exception):
    """In a worker: an array under a limited key holds `count` items, over max_items (the server says how)."""

    @property
    def count(self) -> int:
        return self.args[0]

    @property
    def key(self) -> str:
        return self.args[1]


def _over(count: int, key: str) -> None:
    raise Over(count, key)


# -- in the worker process ----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def pieces(message: Message) -> list[bytes]:
    """The message's wire format in pieces that, merged in order into an empty message, give it back: the
    message without its repeated message fields (emptied here), then each of their elements as that field."""
    out: list[bytes] = []
    for field in message.DESCRIPTOR.fields:
        if not field.is_repeated or field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        tag = _varint(field.number << 3 | 2)  # wire type 2: length-delimited
        for element in getattr(message, field.name):
            data = element.SerializeToString()
            out.append(tag + _varint(len(data)) + data)
        message.ClearField(field.name)
    return [message.SerializeToString(), *out]


def parse_message(
    data: bytes, message_type: type, where: str, max_items: int, counted: bool
) -> tuple[list[bytes], None]:
    """json_body.parse in a worker: the message's pieces, or its error (Over for too many items)."""
    return pieces(json_body.parse(data, message_type, where, max_items, _over if counted else None)), None


def parse_lines(data: bytes, message_type: type) -> tuple[list[bytes], str | None]:
    """Every line of a JSON-lines body as a `message_type`, serialised, up to the first that does not parse, and
    that line's error (as json_body.parse_lines words it), or None."""
    out: list[bytes] = []
    start, line = 0, 0
    while start < len(data):
        try:
            messages, start, line = json_body.parse_lines(data, start, line, 1, message_type)
        except InvalidInput as exc:
            return out, str(exc)
        out += [m.SerializeToString() for m in messages]
    return out, None


def _serve(conn) -> None:
    """A worker's loop: (function, args, number of chunks), the chunks, then ("ok", n, extra) and n pieces, or
    ("error", type, args, attributes) back; until the server closes the pipe."""
    while True:
        try:
            fn, args, count = conn.recv()
            data = b"".join([conn.recv_bytes() for _ in range(count)])
        except (EOFError, OSError):
            return
        try:
            out, extra = fn(data, *args)
        except Exception as exc:  # noqa: BLE001 - the server raises it for its request
            del data
            conn.send(("error", type(exc), exc.args, vars(exc)))
            continue
        del data
        conn.send(("ok", len(out), extra))
        for piece in out:
            conn.send_bytes(piece)


# -- in the server -----------------------------------------------------------------------------------


async def body_chunks(request: Request) -> list[bytes]:
    """The request body as the chunks it arrived in: joined on the event loop, 32 MiB stalled it 40 ms (150 ms
    on a busy machine); a large one is joined where it is parsed, off the loop."""
    return [chunk async for chunk in request.stream() if chunk]


def _revive(kind: type[BaseException], args: tuple, attributes: dict) -> BaseException:
    """An exception raised in a worker, rebuilt without calling its constructor (not all take their args)."""
    exc = BaseException.__new__(kind)
    exc.args = args
    exc.__dict__.update(attributes)
    return exc


class _Worker:
    def __init__(self, context):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child,), name="embedsvc-json", daemon=True)
        self.process.start()
        child.close()

    def call(self, fn: Callable, chunks: Sequence[bytes], args: tuple) -> tuple[list[bytes], Any] | BaseException:
        """fn's pieces and extra value, or the exception it raised."""
        self.conn.send((fn, args, len(chunks)))
        for chunk in chunks:
            self.conn.send_bytes(chunk)
        reply = self.conn.recv()
        if reply[0] == "error":
            return _revive(*reply[1:])
        _, count, extra = reply
        return [self.conn.recv_bytes() for _ in range(count)], extra

    def close(self) -> None:
        self.conn.close()  # the worker sees the end of its pipe and returns
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class BodyParsers:
    """Up to `size` worker processes that parse large JSON bodies; `call` runs in the server's codec threads."""

    def __init__(self, size: int):
        self.size = size
        self._context = multiprocessing.get_context("spawn")  # fork would copy the server: threads, locks, models
        self._idle: list[_Worker] = []
        self._count = 0  # workers started or starting, not yet ended
        self.workers: set[_Worker] = set()  # the running ones, idle or parsing
        self._lock = threading.Condition()
        self._closed = False

    def _take(self) -> _Worker:
        with self._lock:
            while not self._idle and self._count >= self.size and not self._closed:
                self._lock.wait()
            if self._closed:
                raise Unavailable("the server is shutting down; retry on another replica")
            worker = self._idle.pop() if self._idle else None
            if worker is not None and worker.process.is_alive():
                return worker
            if worker is None:
                self._count += 1
        if worker is not None:  # died while idle: its place goes to a new one
            self._ended(worker)
        try:
            worker = _Worker(self._context)
        except BaseException:
            self._lost()
            raise
        self.workers.add(worker)
        return worker

    def _ended(self, worker: _Worker) -> None:
        self.workers.discard(worker)
        worker.close()
        log.error(
            "a JSON body worker process ended (exit code %s); the next large body starts another",
            worker.process.exitcode,
        )

    def _lost(self) -> None:
        with self._lock:
            self._count -= 1
            self._lock.notify()

    def call(self, fn: Callable, chunks: Sequence[bytes], *args) -> tuple[list[bytes], Any]:
        """fn(b"".join(chunks), *args) in a worker: its pieces and its extra value, or its exception."""
        worker = self._take()
        try:
            reply = worker.call(fn, chunks, args)
        except BaseException as exc:  # the worker died (killed for memory, say), or its pipe is out of step
            self._ended(worker)
            self._lost()
            if isinstance(exc, (EOFError, OSError)):
                raise Unavailable(
                    "the process parsing this request's body ended before it answered; retry the "
                    "request (the server log has details)"
                ) from None
            raise
        self._give_back(worker)
        if isinstance(reply, BaseException):  # fn's own exception, for the request
            raise reply
        return reply

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if self._closed:
                self._count -= 1
            else:
                self._idle.append(worker)
                self._lock.notify()
                return
        self.workers.discard(worker)
        worker.close()

    def parse(
        self,
        chunks: Sequence[bytes],
        message_type: type,
        where: str,
        max_items: int,
        check_count: Callable[[int, str], None] | None = None,
    ) -> Message:
        """json_body.parse of the body's chunks, in a worker; check_count(count, key) as json_body.parse calls it."""
        try:
            out, _ = self.call(parse_message, chunks, message_type, where, max_items, check_count is not None)
        except Over as over:  # raised only with check_count
            if check_count is not None:
                check_count(over.count, over.key)
            raise ResourceExhausted(f"{over.count} {over.key} in one request, over the limit of {max_items}") from None
        return merged(message_type(), out)

    def parse_lines(self, chunks: Sequence[bytes], message_type: type) -> tuple[list[bytes], str | None]:
        """The lines of a JSON-lines body, serialised, up to the first that does not parse, and its error."""
        return self.call(parse_lines, chunks, message_type)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._lock.notify_all()
        for worker in idle:
            self.workers.discard(worker)
            worker.close()


def add_all(container, serialised: Sequence[bytes]) -> None:
    """Appends the serialised messages to a repeated message field, one call per message."""
    for data in serialised:
        container.add().MergeFromString(data)


def merged(message: Message, out: Sequence[bytes]) -> Message:
    """`message` with each piece merged into it, in order (each call holds the GIL for one piece only)."""
    for piece in out:
        message.MergeFromString(piece)
    return message
