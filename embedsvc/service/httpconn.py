"""HTTP connections that cannot starve the server: a deadline for each request's headers, a cap on open ones.

uvicorn's `limit_concurrency` counts every open connection, idle or half-sent: 2 x max_concurrent_rpcs idle
sockets made every request 503, the probes included. And uvicorn has no deadline for a request's headers: its
keep-alive timer restarts on every byte, so a header line trickled a byte at a time holds a connection forever.
GuardedH11 is uvicorn's h11 protocol with two additions:

- the next request's headers must be complete within `header_timeout` of the connection opening or of the
  previous response (the unread rest of that request's body included); then the connection is closed, after
  a 408 in JSON when part of a request came;
- one connection over `max_connections` closes the oldest that is not serving a request (idle, or its headers
  incomplete); failing that, the oldest whose body is still arriving; failing that, the new one.

A body's deadline is the application's (BodyLimit in embedsvc.service.http answers 408 in JSON); real work is
bounded by the admission slots the HTTP API shares with gRPC (embedsvc.service.admission), not here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("embedsvc.http")

WAITING, BODY, RUNNING = "waiting", "body", "running"  # for a request; its body arriving; served by the app
WARN_EVERY_SECONDS = 60.0


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"code": "DEADLINE_EXCEEDED",
                       "message": f"the request headers did not arrive within http_header_timeout_seconds "
                                  f"({seconds:g} s); send the whole request at once"}, separators=(",", ":")).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


class ConnectionGuard:
    """The open connections of one HTTP server, oldest first, and the deadline of their headers."""

    def __init__(self, max_connections: int, header_timeout: float):
        self.max_connections, self.header_timeout = max_connections, header_timeout
        self.open: dict[GuardedH11, None] = {}  # insertion order: oldest first
        self.closed_for_room = 0  # since the last warning, one a minute at most
        self.warned = -WARN_EVERY_SECONDS

    def protocol(self):
        """The protocol factory for uvicorn.Config(http=...)."""
        return functools.partial(GuardedH11, guard=self)

    def opened(self, connection: "GuardedH11") -> None:
        self.open[connection] = None
        if len(self.open) > self.max_connections:
            victim = self._victim(connection)
            self.lost(victim)
            victim.transport.close()  # a body being read ends its request: the client is gone
            self._warn(connection.loop.time())

    def _warn(self, now: float) -> None:
        self.closed_for_room += 1
        if now - self.warned >= WARN_EVERY_SECONDS:
            log.warning("closed %d HTTP connection(s) to stay within http_max_connections (%d): the oldest idle or "
                        "incomplete ones, else the new one; many slow or idle clients, or raise the setting",
                        self.closed_for_room, self.max_connections)
            self.closed_for_room, self.warned = 0, now

    def lost(self, connection: "GuardedH11") -> None:
        self.open.pop(connection, None)

    def _victim(self, newcomer: "GuardedH11") -> "GuardedH11":
        receiving = None
        for connection in self.open:
            state = connection.state()
            if state == WAITING and connection is not newcomer:
                return connection
            if state == BODY and receiving is None:
                receiving = connection
        return receiving or newcomer


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol under a ConnectionGuard (see the module's docstring)."""

    def __init__(self, *args, guard: ConnectionGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.header_deadline: Optional[asyncio.TimerHandle] = None

    def state(self) -> str:
        if self.cycle is None or self.cycle.response_complete:
            return WAITING
        return BODY if self.cycle.more_body and not self.cycle.response_started else RUNNING

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()
        self.guard.opened(self)

    def connection_lost(self, exc) -> None:
        self._disarm()
        self.guard.lost(self)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete: its body is the application's to time
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request, whose headers are complete
        if not self.transport.is_closing() and self.state() == WAITING:
            self._arm()

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
        log.warning("http_max_connections %d is over half the open files this process may have (ulimit -n %d): "
                    "holding at most %d HTTP connections; raise the limit to allow more", configured, soft, room)
        return room
    return configured
