"""HTTP connections that cannot starve the server: a deadline for each request's headers, a cap on open ones.

uvicorn's `limit_concurrency` counts every open connection, idle or half-sent: 2 x max_concurrent_rpcs idle
sockets made every request 503, the probes included. And uvicorn has no deadline for a request's headers: its
keep-alive timer restarts on every byte, so a header line trickled a byte at a time holds a connection forever.
GuardedH11 is uvicorn's h11 protocol with two additions:

- the next request's headers must be complete within `header_timeout` of the connection opening or of the
  previous response (the unread rest of that request's body included); then the connection is closed, after
  a 408 in JSON when part of a request came;
- a response its client does not read (the transport's buffer over its high-water mark, or the rest of a closed
  connection's output unsent) must shrink by SEND_PROGRESS_BYTES (or to nothing) in each `send_timeout`; else
  the connection is dropped, its buffer freed and its request's task ended (without this, a client pipelining
  requests and reading nothing held its connection and task forever);
- one connection over `max_connections` closes the oldest that is not serving a request (idle, or its headers
  incomplete); failing that, the oldest whose body is still arriving or whose response is not being read;
  failing that, the new one. One whose output is stuck is dropped, not closed: closing waits for the output.

With TLS the guard runs the handshake itself (`loop.start_tls`), so a connection is counted and its header
deadline runs from the moment it is accepted: left to uvicorn, asyncio hands a connection to the protocol only
after its handshake, which it gives 60 s, so connections that sent nothing were held uncounted. And a TLS
connection the server closes keeps its socket only until its output and close_notify are on the wire: asyncio
waits up to 30 s for the client's close_notify, so connections closed by the cap or a deadline held their socket
uncounted, and a stop waited its whole grace period for one idle client that did not answer. A handshake that
ends once a stop has begun closes its connection as the stop closed the others (after the request in progress,
if one came with it): uvicorn, which had asked its connections to close before, waited its grace period for it.

A body's deadline is the application's (BodyLimit in embedsvc.service.http answers 408 in JSON); real work is
bounded by the admission slots the HTTP API shares with gRPC (embedsvc.service.admission), not here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
import ssl

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("embedsvc.http")

WAITING, BODY, RUNNING = "waiting", "body", "running"  # for a request; its body arriving; served by the app
WARN_EVERY_SECONDS = 60.0
SEND_PROGRESS_BYTES = 64 * 1024  # a stuck response's client must take this much of it per http_send_timeout_seconds
CLOSE_CHECK_SECONDS = 0.05  # with TLS, how often a closing connection's socket is checked for unsent output


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps(
        {
            "code": "DEADLINE_EXCEEDED",
            "message": f"the request headers did not arrive within http_header_timeout_seconds "
            f"({seconds:g} s); send the whole request at once",
        },
        separators=(",", ":"),
    ).encode()
    return (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    ) + body


class ConnectionGuard:
    """The open connections of one HTTP server, oldest first, and the deadline of their headers."""

    def __init__(
        self, max_connections: int, header_timeout: float, send_timeout: float, tls: ssl.SSLContext | None = None
    ):
        self.max_connections, self.header_timeout, self.send_timeout = max_connections, header_timeout, send_timeout
        self.tls = tls  # when set, connections arrive unencrypted and GuardedH11 runs their handshake
        self.open: dict[GuardedH11, None] = {}  # insertion order: oldest first
        self.closed_for_room = 0  # since the last warning, one a minute at most
        self.warned = -WARN_EVERY_SECONDS
        self.stopping = False  # set when the server's stop begins

    def protocol(self):
        """The protocol factory for uvicorn.Config(http=...)."""
        return functools.partial(GuardedH11, guard=self)

    def opened(self, connection: GuardedH11) -> None:
        self.open[connection] = None
        if len(self.open) > self.max_connections:
            victim = self._victim(connection)
            self.lost(victim)
            victim.drop()  # a body being read ends its request: the client is gone
            self._warn(connection.loop.time())

    def _warn(self, now: float) -> None:
        self.closed_for_room += 1
        if now - self.warned >= WARN_EVERY_SECONDS:
            log.warning(
                "closed %d HTTP connection(s) to stay within http_max_connections (%d): the oldest idle or "
                "incomplete ones, else the new one; many slow or idle clients, or raise the setting",
                self.closed_for_room,
                self.max_connections,
            )
            self.closed_for_room, self.warned = 0, now

    def lost(self, connection: GuardedH11) -> None:
        self.open.pop(connection, None)

    def close_handshakes(self) -> None:
        """At shutdown: connections still in their TLS handshake are not the server's yet, so nothing else ends
        them."""
        for connection in list(self.open):
            if connection.handshake is not None and not connection.handshake.done():
                connection.handshake.cancel()

    def _victim(self, newcomer: GuardedH11) -> GuardedH11:
        slow = None
        for connection in self.open:
            if connection is newcomer:
                continue
            state = connection.state()
            if state == WAITING:
                return connection
            if slow is None and (state == BODY or connection.flow.write_paused):
                slow = connection
        return slow or newcomer


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol under a ConnectionGuard (see the module's docstring)."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.header_deadline: asyncio.TimerHandle | None = None
        self.send_deadline: asyncio.TimerHandle | None = None
        self.unsent = 0  # output waiting when send_deadline was armed
        self.handshake: asyncio.Task[None] | None = None  # with TLS: the handshake, until it is done
        self.early: list[bytes] = []  # with TLS: data decrypted before the handshake's task resumed
        self.raw: asyncio.Transport | None = None  # with TLS, once the handshake is done: the socket's transport
        self.close_check: asyncio.TimerHandle | None = None  # with TLS: waits for a closing one's output to go

    def state(self) -> str:
        if self.cycle is None or self.cycle.response_complete:
            return WAITING
        return BODY if self.cycle.more_body and not self.cycle.response_started else RUNNING

    def connection_made(self, transport) -> None:
        if self.guard.tls is None:
            super().connection_made(transport)
        else:
            self.transport = transport  # until the handshake is done: what the deadline and the cap close
        self._arm()
        self.guard.opened(self)
        if self.guard.tls is not None and not transport.is_closing():
            self.handshake = self.loop.create_task(self._secure(transport))

    async def _secure(self, transport) -> None:
        """The TLS handshake, under the header deadline (and asyncio's own timeout, set to the same)."""
        tls = self.guard.tls
        assert tls is not None  # only with TLS
        try:
            secured = await self.loop.start_tls(
                transport, self, tls, server_side=True, ssl_handshake_timeout=self.guard.header_timeout
            )
        except (OSError, ConnectionError, TimeoutError, asyncio.CancelledError):  # ssl.SSLError is an OSError
            secured = None
        if secured is None:  # failed, timed out, closed by the deadline or the cap, or shut down
            self._disarm()
            self.guard.lost(self)
            transport.abort()
            return
        self.raw = transport
        H11Protocol.connection_made(self, secured)  # the request's transport from here on: addresses, https
        early, self.early = self.early, []
        for data in early:
            super().data_received(data)
        if self.guard.stopping:  # uvicorn asked its connections to close before this one was its own
            self.shutdown()

    def data_received(self, data: bytes) -> None:
        if self.handshake is not None and not self.handshake.done():
            # the request's first bytes, decrypted in the same read that ended the handshake: asyncio hands them
            # over before start_tls returns, so before the protocol has its transport
            self.early.append(data)
            return
        super().data_received(data)

    def connection_lost(self, exc) -> None:
        self._disarm()
        self._unwatch_output()
        if self.close_check is not None:
            self.close_check.cancel()
            self.close_check = None
        self.guard.lost(self)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete: its body is the application's to time
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request, whose headers are complete
        if self.transport.is_closing():
            self._watch_output()
        elif self.state() == WAITING:
            self._arm()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_output()

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self.transport.is_closing():
            self._unwatch_output()

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self._watch_output()

    def send_400_response(self, msg: str) -> None:
        super().send_400_response(msg)
        self._watch_output()

    def shutdown(self) -> None:
        super().shutdown()  # closes the connection when it is idle
        self._close_socket()

    def drop(self) -> None:
        """Closes the connection; at once, discarding its output, when some is still unsent."""
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()
            self._close_socket()

    def _close_socket(self) -> None:
        """With TLS, a closing connection's socket is closed once its output, close_notify included, is all on
        the wire: asyncio would wait up to 30 s for the client's close_notify, which HTTP does not need."""
        self.close_check = None
        raw = self.raw
        if raw is None or raw.is_closing() or not self.transport.is_closing():
            return
        if self.transport.get_write_buffer_size() or raw.get_write_buffer_size():  # still going (or stuck:
            self.close_check = self.loop.call_later(CLOSE_CHECK_SECONDS, self._close_socket)  # send_timeout's)
        else:
            raw.close()

    def _watch_output(self) -> None:
        """Output is waiting on the client (writing paused, or closing with bytes unsent): it has send_timeout."""
        if self.close_check is None:
            self._close_socket()
        if self.send_deadline is None and self.transport.get_write_buffer_size():
            self.unsent = self.transport.get_write_buffer_size()
            self.send_deadline = self.loop.call_later(self.guard.send_timeout, self._send_late)

    def _unwatch_output(self) -> None:
        if self.send_deadline is not None:
            self.send_deadline.cancel()
            self.send_deadline = None

    def _send_late(self) -> None:
        self.send_deadline = None
        unsent = self.transport.get_write_buffer_size()
        if not unsent or not (self.flow.write_paused or self.transport.is_closing()):
            return
        if self.unsent - unsent >= SEND_PROGRESS_BYTES:  # slow, but reading: another period
            self._watch_output()
        else:
            log.info(
                "dropped an HTTP connection whose client read less than 64 KiB of its response in "
                "http_send_timeout_seconds (%g s)",
                self.guard.send_timeout,
            )
            self.transport.abort()  # connection_lost ends the request's task: its send returns

    def _arm(self) -> None:
        self._disarm()
        self.header_deadline = self.loop.call_later(self.guard.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _headers_late(self) -> None:
        self.header_deadline = None
        if self.transport.is_closing():
            return
        started = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        if started:  # part of a request came: say why it ends (nothing came: just close)
            self.transport.write(_timeout_response(self.guard.header_timeout))
        self.transport.close()
        self._watch_output()


def connection_cap(configured: int) -> int:
    """http_max_connections within half the file descriptors this process may open (the soft limit, raised to
    the hard one first): the other half is for gRPC connections, the store and models."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):  # a container may refuse; keep what we have
            pass
    room = soft // 2
    if configured > room:
        log.warning(
            "http_max_connections %d is over half the open files this process may have (ulimit -n %d): "
            "holding at most %d HTTP connections; raise the limit to allow more",
            configured,
            soft,
            room,
        )
        return room
    return configured
