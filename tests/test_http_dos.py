"""Issue 22, "HTTP clients can starve everyone": idle and slowly trickled connections must not hold the slots
that probes and real requests need (headers and bodies arrive within timeouts, a cap on open connections
closes the oldest idle ones first), and one large JSON body or response must not freeze the event loop that
also serves gRPC (large bodies parse in worker processes, responses render in threads in bounded pieces; the
item count is checked before the body becomes protobuf). Real servers on 127.0.0.1, real sockets, real gRPC
health checks, real worker processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import httpx
import numpy as np
import pytest
from google.protobuf import json_format
from hypothesis import given, settings, strategies as st
from serving import ServerThread, running_server, tiny_config

from embedsvc.client import Client, Item
from embedsvc.errors import InvalidInput
from embedsvc.service import bodyproc, json_body
from embedsvc.service.config import ServerConfig
from embedsvc.v1 import embedsvc_pb2 as pb

TOKEN = "h" * 24
AUTH = {"authorization": f"Bearer {TOKEN}"}
PARTIAL_HEADER = b"GET /v1/collections HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def _tokens(folder) -> str:
    path = folder / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": "ops", "token": TOKEN, "scopes": ["read", "write"]}]}))
    return str(path)


def _fd_room(needed: int) -> None:
    """This process holds both ends of every attacking connection: make room for them, or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _open_connections(server) -> int:
    return len(server.server.http.server.server_state.connections)


def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Attackers:
    """Raw TCP connections to the HTTP port: some idle, some trickling one more byte of an endless header line."""

    def __init__(self, port: int):
        self.port = port
        self.idle: list[socket.socket] = []
        self.trickling: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)

    def open(self, idle: int, trickling: int) -> Attackers:
        for i in range(idle + trickling):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            if (i % 2 and len(self.trickling) < trickling) or len(self.idle) >= idle:
                sock.sendall(PARTIAL_HEADER)
                self.trickling.append(sock)
            else:
                self.idle.append(sock)
        self.thread.start()
        return self

    def _trickle(self):
        while not self.stop.wait(0.5):
            for sock in self.trickling:
                with contextlib.suppress(OSError):  # closed by the server
                    sock.send(b"a")

    def close(self):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(10)
        for sock in self.idle + self.trickling:
            sock.close()


@contextmanager
def attacked(port: int, idle: int, trickling: int):
    attackers = Attackers(port)
    try:
        yield attackers.open(idle, trickling)
    finally:
        attackers.close()


# -- item 2: connections ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bound", [pytest.param(None, id="answered"), pytest.param(1.0, id="within-1s", marks=pytest.mark.slow)]
)
def test_idle_and_trickling_connections_do_not_starve_probes_or_authorised_calls(tiny_spec, tmp_path, bound):
    """Answered at all (uvicorn's limit_concurrency answered 503 to everyone); the issue's bound, 1 s for the
    three, only in the slow suite: on a loaded machine the time is the scheduler's as much as the server's."""
    _fd_room(4096)
    config = tiny_config(
        tiny_spec,
        tmp_path / "d",
        http_listen="127.0.0.1:0",
        auth_tokens_file=_tokens(tmp_path),
        http_header_timeout_seconds=120,
    )  # they stay open however slow this machine is
    with running_server(config) as server:
        with httpx.Client(base_url=server.http_url, headers=AUTH, timeout=30) as http:
            assert http.post("/v1/collections", json={"config": {"name": "v", "dim": 3}}).status_code == 200
            assert (
                http.post(
                    "/v1/collections/v/items", json={"items": [{"id": "a", "vector": {"values": [1, 0, 0]}}]}
                ).status_code
                == 200
            )
        with attacked(server.server.http_port, idle=500, trickling=500):
            _wait_until(lambda: _open_connections(server) >= 1000, 60, "the server to take in 1,000 connections")
            started = time.perf_counter()
            with httpx.Client(base_url=server.http_url, timeout=bound or 60) as fresh:
                health, ready = fresh.get("/healthz"), fresh.get("/readyz")
                search = fresh.post(
                    "/v1/collections/v/search",
                    headers=AUTH,
                    json={"queries": [{"vector": {"values": [1, 0, 0]}}], "topK": 1},
                )
            seconds = time.perf_counter() - started
        print(
            f"\n/healthz, /readyz and a search with 1,000 idle and trickling connections open: {seconds * 1000:.0f} ms"
        )
        assert (health.status_code, ready.status_code, search.status_code) == (200, 200, 200), search.text
        assert [h["id"] for h in search.json()["results"][0]["hits"]] == ["a"]
        assert bound is None or seconds < bound


def test_over_the_connection_cap_the_oldest_idle_connections_are_closed(tiny_spec, tmp_path):
    _fd_room(2048)
    config = tiny_config(
        tiny_spec, tmp_path / "d", http_listen="127.0.0.1:0", http_max_connections=40, http_header_timeout_seconds=120
    )  # only the cap closes them
    with running_server(config) as server, attacked(server.server.http_port, idle=100, trickling=100) as attackers:
        opened = [s for pair in zip(attackers.idle, attackers.trickling) for s in pair]  # in the order opened
        # the 200th connection closed the 160th: the server has taken in all of them, and kept the newest
        assert all(_closed_by_server(sock) for sock in opened[:160])
        assert _open_connections(server) <= 40
        with httpx.Client(base_url=server.http_url, timeout=1) as fresh:
            assert fresh.get("/healthz").status_code == 200
            assert fresh.get("/v1/collections").json() == {"collections": []}
        assert not any(_closed_by_server(sock, timeout=0.05) for sock in opened[-20:])  # newest: still open


def _tls_config(tiny_spec, tmp_path, **overrides) -> tuple[ServerConfig, dict]:
    pytest.importorskip("cryptography")
    from test_security import _certificates

    certs = _certificates(tmp_path)
    settings = {"tls_cert_file": certs["server"], "tls_key_file": certs["server_key"], **overrides}
    return tiny_config(tiny_spec, tmp_path / "d", http_listen="127.0.0.1:0", **settings), certs


def test_connections_that_never_finish_their_tls_handshake_count_toward_the_cap(tiny_spec, tmp_path):
    """With TLS, a connection reached the cap's count only once its handshake was done, and asyncio gives a
    handshake 60 s: connections that opened and sent nothing were held without limit (each a file descriptor),
    under no cap and no header deadline. They are counted from the moment they are accepted now."""
    _fd_room(1024)
    config, certs = _tls_config(tiny_spec, tmp_path, http_max_connections=8, http_header_timeout_seconds=120)
    with running_server(config) as server, ExitStack() as stack:
        silent = []
        for _ in range(40):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", server.server.http_port)))
            silent.append(sock)
        assert all(_closed_by_server(sock, timeout=30) for sock in silent[:32])  # under 60 s: the cap, not asyncio
        assert len(server.server.http.guard.open) <= 8
        url = f"https://127.0.0.1:{server.server.http_port}/healthz"
        with httpx.Client(verify=_tls_context(certs["ca"]), timeout=20) as https:
            assert https.get(url).status_code == 200


def test_a_tls_handshake_has_the_header_deadline(tiny_spec, tmp_path):
    """The time to the request's headers counts from the connection's opening, the TLS handshake included."""
    config, certs = _tls_config(tiny_spec, tmp_path, http_header_timeout_seconds=0.6)
    with running_server(config) as server:
        with socket.create_connection(("127.0.0.1", server.server.http_port)) as silent:
            assert _closed_by_server(silent, timeout=30)  # under asyncio's 60 s
        url = f"https://127.0.0.1:{server.server.http_port}/v1/collections"
        with httpx.Client(verify=_tls_context(certs["ca"]), timeout=20) as https:
            response = https.get(url)
            assert response.status_code == 200 and response.json() == {"collections": []}
            assert response.request.url.scheme == "https"


def _tls_context(ca: str):
    import ssl

    return ssl.create_default_context(cafile=ca)


class _HeldTls:
    """A raw socket whose TLS handshake (through memory buffers) is done on the client's side, its last message,
    the client's Finished, not yet sent: it never answers the server's close_notify, and reads stay at the TCP
    level."""

    def __init__(self, port: int, ca: str):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ssl.create_default_context(cafile=ca).wrap_bio(
            self.incoming, self.outgoing, server_hostname="127.0.0.1"
        )
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                data = self.sock.recv(65536)
                assert data, "the server closed the connection during the handshake"
                self.incoming.write(data)

    def finish(self, request: bytes = b"") -> None:
        """Sends the Finished message and `request` in one write (so they arrive in one read)."""
        if request:
            self.tls.write(request)
        self.sock.sendall(self.outgoing.read())


def _tls_client(port: int, ca: str, request: bytes = b"") -> tuple[socket.socket, ssl.SSLObject, ssl.MemoryBIO]:
    """A raw socket that has done a TLS handshake and sent `request` with its Finished message, in one write."""
    held = _HeldTls(port, ca)
    held.finish(request)
    return held.sock, held.tls, held.incoming


def _tls_read(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, until: bytes) -> bytes:
    """The decrypted bytes up to and including `until`."""
    data = b""
    while until not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before {until!r}: {data!r}"
        incoming.write(chunk)
        with suppress(ssl.SSLWantReadError):
            while piece := tls.read(65536):
                data += piece
    return data


def test_tls_connections_the_server_closes_free_their_socket_at_once(tiny_spec, tmp_path):
    """Closing a TLS connection sent close_notify and then waited for the client's, which asyncio gives 30 s:
    connections closed by the cap (or a deadline) held their socket that long, uncounted, so a client that
    completed handshakes and never answered held any number of file descriptors past http_max_connections."""
    _fd_room(1024)
    config, certs = _tls_config(tiny_spec, tmp_path, http_max_connections=4, http_header_timeout_seconds=120)
    with running_server(config) as server, ExitStack() as stack:
        port = server.server.http_port
        clients = []
        for _ in range(16):
            sock, _, _ = _tls_client(port, certs["ca"])
            clients.append(stack.enter_context(sock))
        assert all(_closed_by_server(sock, timeout=10) for sock in clients[:12])  # under asyncio's 30 s
        assert not any(_closed_by_server(sock, timeout=0.05) for sock in clients[-4:])


def test_a_stop_does_not_wait_for_tls_clients_to_answer_close_notify(tiny_spec, tmp_path, caplog):
    """At a stop uvicorn closes idle keep-alive connections and waits for them to go: with TLS each waited for
    its client's close_notify, so one client that did not answer held the stop for the whole grace period,
    which then ended in an ERROR ("timeout graceful shutdown exceeded")."""
    config, certs = _tls_config(tiny_spec, tmp_path)
    server = ServerThread(config).start()
    try:
        healthz = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        sock, tls, incoming = _tls_client(server.server.http_port, certs["ca"], healthz)
        with sock:
            assert b'{"status":"ok"}' in _tls_read(sock, tls, incoming, b"}")
            server.stop(grace=20)  # held for its grace, uvicorn ends it with an ERROR (asserted below)
            server = None
            assert _closed_by_server(sock, timeout=10)
    finally:
        if server is not None:
            server.stop()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_tls_handshake_done_while_the_server_stops_does_not_hold_the_stop(tiny_spec, tmp_path, caplog):
    """A connection whose handshake ended after a stop had begun became the server's only then, after uvicorn had
    asked its connections to close: the stop waited its whole grace period for it (idle, never closed), then
    logged an ERROR. It is closed like the others now; a request already in progress still finishes."""
    from concurrent.futures import ThreadPoolExecutor

    from serving import model_busy, queued_jobs

    config, certs = _tls_config(tiny_spec, tmp_path, http_header_timeout_seconds=60)
    server = ServerThread(config).start()
    try:
        port = server.server.http_port
        executor = server.engine.runtime("").executor
        with (
            httpx.Client(verify=_tls_context(certs["ca"]), timeout=60) as https,
            ThreadPoolExecutor(2) as pool,
            model_busy(server) as release,
        ):
            url = f"https://127.0.0.1:{port}/v1/embed"
            running = pool.submit(https.post, url, json={"inputs": [{"text": "in progress"}]})
            _wait_until(lambda: queued_jobs(executor) >= 1, 30, "the request to wait for the model")
            late = _HeldTls(port, certs["ca"])
            stopper = pool.submit(server.stop, 30)  # held for its grace, it ends with an ERROR (asserted below)
            server = None  # stopping

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except ConnectionRefusedError:
                    return True
                return False

            _wait_until(refused, 30, "the stop to close the listening socket")
            with late.sock:
                late.finish()
                assert _closed_by_server(late.sock, timeout=10)
                release.set()
                assert running.result().status_code == 200
                stopper.result()
    finally:
        if server is not None:
            server.stop()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


PIPELINED = b"GET /static/app.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 2000  # 22 MB of responses


def _not_reading(port: int) -> socket.socket:
    """A client that pipelines requests for 22 MB of responses and reads none of them."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(PIPELINED)
    return sock


def test_clients_that_do_not_read_their_responses_neither_fill_the_cap_nor_stay(tiny_spec, tmp_path):
    """A response its client does not read blocked its request forever: such connections were never closed for
    room, so http_max_connections of them made every new connection, probes included, close unanswered."""
    config = tiny_config(
        tiny_spec,
        tmp_path / "d",
        http_listen="127.0.0.1:0",
        http_max_connections=4,
        http_header_timeout_seconds=120,
        http_send_timeout_seconds=120,
    )  # only the cap closes them
    with running_server(config) as server, ExitStack() as stack:
        guard = server.server.http.guard
        readers = [stack.enter_context(_not_reading(server.server.http_port)) for _ in range(4)]
        _wait_until(
            lambda: len(guard.open) == 4 and all(c.flow.write_paused for c in guard.open),
            60,
            "the server's output to the four to stall",
        )
        with httpx.Client(base_url=server.http_url, timeout=10) as fresh:
            assert fresh.get("/healthz").status_code == 200
            assert fresh.get("/readyz").status_code == 200
        assert len(readers) == 4 and _open_connections(server) <= 4


def test_a_response_its_client_does_not_read_is_dropped_after_http_send_timeout_seconds(tiny_spec, tmp_path):
    config = tiny_config(
        tiny_spec,
        tmp_path / "d",
        http_listen="127.0.0.1:0",
        http_header_timeout_seconds=120,
        http_body_timeout_seconds=120,
        http_send_timeout_seconds=0.5,
    )
    with running_server(config) as server, ExitStack() as stack:
        state = server.server.http.server.server_state
        for _ in range(3):
            stack.enter_context(_not_reading(server.server.http_port))
        _wait_until(lambda: server.server.http.guard.open and state.total_requests > 0, 60, "responses to start")
        # the requests' tasks end and the connections with their buffered output are gone, unread
        _wait_until(lambda: not state.connections and not state.tasks, 60, "the stuck connections to be dropped")
        with httpx.Client(base_url=server.http_url, timeout=10) as fresh:
            assert fresh.get("/healthz").status_code == 200


def _closed_by_server(sock: socket.socket, timeout: float = 10) -> bool:
    """True once the server has closed the connection (what it wrote before closing is skipped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def _read_response(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_headers_bodies_and_keep_alive_have_deadlines(tiny_spec, tmp_path):
    config = tiny_config(
        tiny_spec,
        tmp_path / "d",
        http_listen="127.0.0.1:0",
        http_header_timeout_seconds=0.6,
        http_body_timeout_seconds=0.6,
        http_keepalive_timeout_seconds=0.3,
    )
    with running_server(config) as server, ExitStack() as stack:
        address = ("127.0.0.1", server.server.http_port)
        idle, partial, slow_body, kept = (stack.enter_context(socket.create_connection(address)) for _ in range(4))
        started = time.monotonic()
        partial.sendall(PARTIAL_HEADER)
        slow_body.sendall(
            b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"inputs": '
        )
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        stop = threading.Event()

        def trickle():  # one byte of the header line every 0.1 s: each byte alone would reset a keep-alive timer
            while not stop.wait(0.1):
                try:
                    partial.send(b"a")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        try:
            assert _read_response(idle) == b""  # nothing was asked: closed without an answer
            header = _read_response(partial)
            body = _read_response(slow_body)
            health = _read_response(kept)
        finally:
            stop.set()
        seconds = time.monotonic() - started
        assert header.startswith(b"HTTP/1.1 408 "), header
        assert b'"code":"DEADLINE_EXCEEDED"' in header and b"http_header_timeout_seconds" in header
        assert body.startswith(b"HTTP/1.1 408 "), body
        assert b'"code":"DEADLINE_EXCEEDED"' in body and b"http_body_timeout_seconds" in body
        assert health.startswith(b"HTTP/1.1 200 ") and b'{"status":"ok"}' in health  # then closed when idle
        assert 0.6 <= seconds < 10
        with httpx.Client(base_url=server.http_url, timeout=5) as fresh:  # prompt clients are served as before
            assert fresh.post("/v1/collections", json={"config": {"name": "v", "dim": 3}}).status_code == 200


def test_connection_settings_are_validated():
    for bad, words in [
        ({"http_header_timeout_seconds": 0}, "http_header_timeout_seconds"),
        ({"http_body_timeout_seconds": -1}, "http_body_timeout_seconds"),
        ({"http_send_timeout_seconds": 0}, "http_send_timeout_seconds"),
        ({"http_keepalive_timeout_seconds": 20, "http_header_timeout_seconds": 10}, "http_keepalive_timeout_seconds"),
        ({"http_max_connections": 0}, "http_max_connections"),
        ({"http_max_body_bytes": 1_000_000}, "http_max_body_bytes"),
    ]:
        with pytest.raises(InvalidInput, match=words):
            ServerConfig(**bad).validate()


# -- item 3: bodies and responses off the loop ---------------------------------------------------------


# gRPC health checks one after another, from another process (as a kubelet's probes come; a thread of this
# process would wait for the GIL itself): after "ready", `count` of them, or (count 0) until a line on stdin;
# then their latencies as JSON.
PROBE = """
import json, select, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(sys.argv[1]))
count = int(sys.argv[2])
for _ in range(5):
    stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
print("ready", flush=True)
latencies = []
while len(latencies) < count if count else not latencies or not select.select([sys.stdin], [], [], 0)[0]:
    started = time.perf_counter()
    stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
    latencies.append(time.perf_counter() - started)
print(json.dumps(latencies), flush=True)
"""


def _probe(address: str, count: int) -> subprocess.Popen:
    probe = subprocess.Popen(
        [sys.executable, "-c", PROBE, address, str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert probe.stdout.readline().strip() == "ready"
    return probe


# A gRPC server that serves health checks only, in a process of its own: the control beside the server under test.
CONTROL = """
import asyncio
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
async def main():
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(port, flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


class Checks(list):
    """Latencies of the health checks of the server under test; `control`: those of a server that does nothing
    else, checked in the same window (what the machine's own stalls cost any server meanwhile)."""

    control: list[float]


@contextmanager
def health_checks(address: str):
    """The latencies of the gRPC health checks made while the block ran (filled in when it ends), with a control
    server's checked meanwhile."""
    latencies = Checks()
    with subprocess.Popen([sys.executable, "-c", CONTROL], stdout=subprocess.PIPE, text=True) as control:
        try:
            control_address = f"127.0.0.1:{int(control.stdout.readline())}"
            with _probe(address, 0) as probe, _probe(control_address, 0) as control_probe:
                try:
                    yield latencies
                finally:
                    for p in (probe, control_probe):
                        p.stdin.write("stop\n")
                        p.stdin.flush()
                    latencies.extend(json.loads(probe.stdout.readline()))
                    latencies.control = json.loads(control_probe.stdout.readline())
        finally:
            control.kill()


def assert_health_kept_up(address: str, latencies: Checks, what: str, margin: float, seconds: float = 0.0) -> None:
    """The slowest check while `what` ran is within `margin` seconds of the slowest of as many on the idle server,
    or of the control server's slowest in the same window, whichever is slower: on a busy machine the checks are
    slow now and then whatever a server does (the other tests beside this one stall every process at times); the
    work may not add to it. A margin of RELATIVE is half the work's own `seconds` (at least 0.5 s): work done on
    the event loop stalls the checks for nearly all of its time however busy the machine is, work beside the loop
    for a small share."""
    if margin == RELATIVE:
        margin = max(0.5, seconds / 2)
    with _probe(address, max(len(latencies), 5)) as probe:
        idle = json.loads(probe.stdout.readline())
    machine = max(max(idle), max(latencies.control, default=0.0))
    print(
        f"\n{what}: {len(latencies)} health checks meanwhile, slowest {max(latencies) * 1000:.1f} ms "
        f"(idle server: {max(idle) * 1000:.1f} ms; control server meanwhile: "
        f"{max(latencies.control, default=0.0) * 1000:.1f} ms of {len(latencies.control)})"
    )
    assert max(latencies) < margin + machine, (
        f"slowest health check {max(latencies) * 1000:.0f} ms of {len(latencies)}, over {margin * 1000:.0f} ms + "
        f"the machine's {machine * 1000:.0f} ms (idle server, or control server meanwhile)"
    )
    assert latencies, latencies  # checks ran while the server worked (a fast render leaves time for few)


def _maximal(limit: int, case: str) -> bytes:
    """A body of `limit` bytes (within 2 KiB) and max_items_per_request items, each a vector of as many numbers as
    fit: the costliest JSON per byte to parse, and the most items a request may carry."""
    items = ServerConfig.max_items_per_request
    template = {
        "search": ('{{"queries": [{}]}}', '{{"vector": {{"values": [{}]}}}}', ","),
        "json lines": ("{}\n", '{{"id": "i", "vector": {{"values": [{}]}}}}', "\n"),
    }[case]
    body, item, separator = template
    overhead = len(body.format(separator.join([item.format("")] * items)))
    count = (limit - overhead - 1024) // (items * len("0.123456,"))
    values = ",".join(["0.123456"] * count)
    data = body.format(separator.join([item.format(values)] * items)).encode()
    assert limit - 2048 - items * 9 < len(data) <= limit
    return data


MAXIMAL = {
    "search": ("/v1/collections/v/search", "application/json"),
    "json lines": ("/v1/collections/v/items", "application/x-ndjson"),
}
# (body limit, margin over the idle server's slowest health check). The bound, 100 ms, holds in the slow
# suite; the default suite (2 workers on 2 cores in CI, other load beside) allows half the request's own time: a
# parse on the event loop stalls the checks for nearly all of it (json_format.Parse alone: 2.5 s here, idle),
# whatever the load, so the verdict does not depend on how busy the machine is. That a large body's parse stays
# out of the server process altogether, test_large_bodies_are_parsed_outside_the_server_process checks by CPU
# time, in the default suite.
RELATIVE = -1.0
LIMITS = [
    pytest.param(8 * 1024 * 1024, RELATIVE, id="8MiB-within-half-the-request"),
    pytest.param(2 * 1024 * 1024, 0.1, id="2MiB-within-100ms", marks=pytest.mark.slow),
    pytest.param(ServerConfig.http_max_body_bytes, 0.1, id="default-limit-within-100ms", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("limit, margin", LIMITS)
@pytest.mark.parametrize("case", list(MAXIMAL))
def test_grpc_health_keeps_answering_while_a_maximal_body_is_parsed(tiny_spec, tmp_path, case, limit, margin):
    path, kind = MAXIMAL[case]
    body = tmp_path / "body"
    body.write_bytes(_maximal(limit, case))
    config = tiny_config(tiny_spec, tmp_path / "d", http_listen="127.0.0.1:0", http_max_body_bytes=limit)
    with running_server(config) as server, httpx.Client(base_url=server.http_url, timeout=600) as http:
        assert http.post("/v1/collections", json={"config": {"name": "v", "dim": 3}}).status_code == 200
        with _poster(server.http_url + path, body, kind) as post, health_checks(server.address) as latencies:
            status, answer, seconds = post()
        assert status == 400 and "dimension" in json.loads(answer)["message"], answer
        assert_health_kept_up(
            server.address,
            latencies,
            f"{case}: {body.stat().st_size:,} bytes answered in {seconds:.2f} s",
            margin,
            seconds,
        )


# One POST of a file's bytes from another process, when a line comes on stdin (the file read by then); then its
# status, body and seconds as JSON. From a thread of the server's process, the client's own work would count as
# the server's: httpx slices what is left of the body after each send(), a copy of up to 32 MiB holding the GIL.
POSTER = """
import json, sys, time
import httpx
url, path, kind = sys.argv[1:4]
body = open(path, "rb").read()
print("ready", flush=True)
sys.stdin.readline()
started = time.perf_counter()
response = httpx.post(url, content=body, headers={"content-type": kind}, timeout=600)
print(json.dumps([response.status_code, response.text, time.perf_counter() - started]), flush=True)
"""


@contextmanager
def _poster(url: str, body, kind: str):
    """A function that makes the POST (from another process) and returns (status, body text, seconds)."""
    with subprocess.Popen(
        [sys.executable, "-c", POSTER, url, str(body), kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as poster:
        assert poster.stdout.readline().strip() == "ready"

        def post():
            poster.stdin.write("go\n")
            poster.stdin.flush()
            return json.loads(poster.stdout.readline())

        yield post


@pytest.mark.parametrize(
    "margin",
    [
        pytest.param(RELATIVE, id="within-half-the-request"),
        pytest.param(0.1, id="within-100ms", marks=pytest.mark.slow),
    ],
)
def test_grpc_health_keeps_answering_while_a_large_response_is_rendered(tiny_spec, tmp_path, margin):
    dim, count = 1024, 256  # a GetResponse of 262,144 floats
    config = tiny_config(tiny_spec, tmp_path / "d", http_listen="127.0.0.1:0")
    with running_server(config) as server, httpx.Client(base_url=server.http_url, timeout=120) as http:
        vectors = np.random.default_rng(0).standard_normal((count, dim)).astype(np.float32)
        with Client(server.address, timeout=120) as client:
            client.create_collection("big", dim=dim, metric="inner_product")
            client.upsert("big", [Item(f"i{i}", vector=v.tolist()) for i, v in enumerate(vectors)])
        with health_checks(server.address) as latencies:
            started = time.perf_counter()
            response = http.post(
                "/v1/collections/big/get", json={"ids": [f"i{i}" for i in range(count)], "includeVectors": True}
            )
            seconds = time.perf_counter() - started
        assert response.status_code == 200
        items = response.json()["items"]
        assert len(items) == count and np.allclose(items[7]["vector"]["values"], vectors[7], atol=1e-6)
        assert_health_kept_up(
            server.address,
            latencies,
            f"GetResponse of {count * dim:,} floats rendered in {seconds:.2f} s",
            margin,
            seconds,
        )


def test_the_item_count_is_checked_before_the_body_becomes_protobuf(tiny_spec, tmp_path):
    """Nine items where eight are allowed, the last with a value of the wrong type: the count refuses it (as the
    engine would, same words) before the protobuf parse could see the type error."""
    config = tiny_config(tiny_spec, tmp_path / "d", http_listen="127.0.0.1:0", max_items_per_request=8)
    with running_server(config) as server, httpx.Client(base_url=server.http_url, timeout=60) as http:
        assert http.post("/v1/collections", json={"config": {"name": "v", "dim": 3}}).status_code == 200
        items = [{"id": f"i{i}", "vector": {"values": [1, 0, 0]}} for i in range(8)]
        bad = {"items": [*items, {"id": "late", "vector": {"values": "not a list"}}]}
        response = http.post("/v1/collections/v/items", json=bad)
        assert response.status_code == 429, response.text
        assert response.json() == {
            "code": "RESOURCE_EXHAUSTED",
            "message": "9 items in one request, over the limit of 8; split it",
        }
        assert http.post("/v1/collections/v/items", json={"items": [*items[:1], bad["items"][-1]]}).status_code == 400
        openai = http.post("/v1/embeddings", json={"model": "m", "input": ["x"] * 8 + ["data:image/png;base64,!"]})
        assert openai.status_code == 429, openai.text  # counted before the model or the inputs are read
        assert openai.json()["error"]["message"] == "9 inputs in one request, over the limit of 8; split it"
        ids = {"ids": [f"i{i}" for i in range(12)]}
        assert (
            http.post("/v1/collections/v/get", json=ids).json()["message"]
            == "12 ids in one request, over the limit of 8; split it"
        )


def _children_cpu_seconds() -> float:
    """User and system CPU time so far of this process's child processes (Linux /proc)."""
    total = 0.0
    for task in os.listdir("/proc/self/task"):
        for pid in Path(f"/proc/self/task/{task}/children").read_text().split():
            with suppress(FileNotFoundError):  # ended meanwhile
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@pytest.mark.parametrize("case", list(MAXIMAL))
def test_large_bodies_are_parsed_outside_the_server_process(tiny_spec, tmp_path, case):
    """Every step of a parse in the server process holds the GIL that the loop serving gRPC needs, and on a busy
    machine a thread preempted while it holds it stalls the loop for as long as the OS keeps it waiting: in short
    steps in a codec thread, 32 MiB bodies still stalled health checks 100-800 ms (load 10-30). So a large body
    is parsed by a worker process; what the server itself spends on it (receiving the body, putting the message
    together, finding the vectors' dimension wrong) is a small share of the parse's CPU time, whatever the load
    (in the server, the parse was all of it)."""
    body = _maximal(8 * 1024 * 1024, case)
    path, kind = MAXIMAL[case]
    config = tiny_config(tiny_spec, tmp_path / "d", http_listen="127.0.0.1:0")
    with running_server(config) as server, httpx.Client(base_url=server.http_url, timeout=300) as http:
        assert http.post("/v1/collections", json={"config": {"name": "v", "dim": 3}}).status_code == 200
        warm = http.post(
            "/v1/collections/v/search",
            content=_padded(json.dumps({"queries": [VEC]}).encode()),
            headers={"content-type": "application/json"},
        )  # starts the worker
        assert warm.status_code == 200, warm.text
        server_cpu, worker_cpu = time.process_time(), _children_cpu_seconds()
        response = http.post(path, content=body, headers={"content-type": kind})
        server_cpu, worker_cpu = time.process_time() - server_cpu, _children_cpu_seconds() - worker_cpu
    assert response.status_code == 400 and "dimension" in response.json()["message"], response.text
    print(
        f"\n{case}, {len(body):,} bytes: {server_cpu * 1000:.0f} ms of CPU in the server process (this one, "
        f"client included), {worker_cpu * 1000:.0f} ms in its child processes"
    )
    assert server_cpu < worker_cpu / 3


def _padded(body: bytes) -> bytes:
    """The same JSON (or JSON lines) over json_body.SMALL bytes: spaces, JSON's whitespace, end each line."""
    pad = b" " * (json_body.SMALL + 1)
    return b"\n".join(line + pad if line.strip() else line for line in body.split(b"\n"))


def _lines(*items) -> bytes:
    return "\n".join(item if isinstance(item, str) else json.dumps(item) for item in items).encode()


VEC = {"vector": {"values": [1, 0, 0]}}
# (path, content type, body): bodies a large one must be answered for as the small one is (small: parsed on
# the event loop; padded: in a worker process, the message sent back in pieces)
SAME_ANSWERS = [
    (
        "search",
        "application/json",
        json.dumps(
            {
                "queries": [VEC, {"id": "a"}],
                "topK": 2,
                "includeVectors": True,
                "filter": {"must": [{"key": "k", "equals": {"numberValue": 1}}]},
            }
        ),
    ),
    ("search", "application/json", '{"queries": [{"vector": {"values": [1, 0, 0]}}], "topK" 1}'),  # no colon
    ("search", "application/json", '{"querys": []}'),
    ("search", "application/json", json.dumps({"queries": [VEC] * 9})),  # over max_items_per_request
    ("search", "application/json", json.dumps({"queries": [{"vector": {"values": "x"}}]})),
    ("search", "application/json", b'{"queries": [{"text": "\xff"}]}'),  # not UTF-8
    ("items", "application/json", json.dumps({"items": [{"id": f"j{i}", **VEC} for i in range(9)]})),
    (
        "items",
        "application/x-ndjson",
        _lines(
            *(
                {"id": f"l{i}", "vector": {"values": [1, i, 0]}, "metadata": {"i": {"numberValue": i}}}
                for i in range(20)
            )
        ),
    ),
    ("items", "application/x-ndjson", _lines({"id": "ok", **VEC}, "{not json")),
    ("items", "application/x-ndjson", _lines(*({"id": f"w{i}", **VEC} for i in range(9)), "{broken")),
    ("embeddings", "application/json", json.dumps({"model": "M", "input": ["x"] * 9})),
]


@pytest.mark.parametrize("endpoint, kind, body", SAME_ANSWERS)
def test_large_bodies_are_answered_as_small_ones(tiny_spec, tmp_path, endpoint, kind, body):
    """A body over json_body.SMALL bytes parses in a worker process; the answer, and what is stored, are those of
    the same body parsed in the server, item count, batches of JSON lines and error words included."""
    body = (body if isinstance(body, bytes) else body.encode()).replace(b'"M"', json.dumps(tiny_spec.name).encode())
    config = tiny_config(tiny_spec, tmp_path / "d", http_listen="127.0.0.1:0", max_items_per_request=8)
    answers = []
    with running_server(config) as server, httpx.Client(base_url=server.http_url, timeout=120) as http:
        for name, data in (("small", body), ("large", _padded(body))):
            assert (len(data) > json_body.SMALL) == (name == "large")
            assert http.post("/v1/collections", json={"config": {"name": name, "dim": 3}}).status_code == 200
            item = {"id": "a", "vector": {"values": [0, 1, 0]}, "metadata": {"k": {"numberValue": 1}}}
            assert http.post(f"/v1/collections/{name}/items", json={"items": [item]}).status_code == 200
            path = "/v1/embeddings" if endpoint == "embeddings" else f"/v1/collections/{name}/{endpoint}"
            response = http.post(path, content=data, headers={"content-type": kind})
            ids = [f"{p}{i}" for p in "jlw" for i in range(20)] + ["ok"]
            stored = [
                http.post(f"/v1/collections/{name}/get", json={"ids": ids[i : i + 8], "includeVectors": True}).json()[
                    "items"
                ]
                for i in range(0, len(ids), 8)
            ]  # max_items_per_request at a time
            answers.append((response.status_code, response.json(), stored))
        assert len(server.server.http.api.parsers.workers) == (endpoint != "embeddings")  # the large one's
    assert answers[0] == answers[1]
    assert answers[0][0] != 500, answers[0]


def test_a_body_worker_that_dies_is_replaced_and_its_request_is_503(tiny_spec, tmp_path):
    body = _maximal(8 * 1024 * 1024, "search")
    config = tiny_config(tiny_spec, tmp_path / "d", http_listen="127.0.0.1:0")
    with running_server(config) as server, httpx.Client(base_url=server.http_url, timeout=300) as http:
        parsers = server.server.http.api.parsers
        assert http.post("/v1/collections", json={"config": {"name": "v", "dim": 3}}).status_code == 200
        search = _padded(json.dumps({"queries": [VEC]}).encode())

        def one_worker() -> bodyproc._Worker:
            assert len(parsers.workers) == 1
            return next(iter(parsers.workers))

        assert (
            http.post(
                "/v1/collections/v/search", content=search, headers={"content-type": "application/json"}
            ).status_code
            == 200
        )
        idle = one_worker()
        os.kill(idle.process.pid, signal.SIGKILL)  # while idle: the next body gets a new worker
        idle.process.join(30)
        assert (
            http.post(
                "/v1/collections/v/search", content=search, headers={"content-type": "application/json"}
            ).status_code
            == 200
        )
        busy = one_worker()
        assert busy is not idle
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                http.post, "/v1/collections/v/search", content=body, headers={"content-type": "application/json"}
            )
            _wait_until(lambda: not parsers._idle or answer.done(), 60, "the worker to take the body")
            os.kill(busy.process.pid, signal.SIGKILL)  # while it parses 8 MiB (a second or more)
            response = answer.result()
        assert response.status_code == 503, response.text
        assert response.json()["code"] == "UNAVAILABLE" and "retry the request" in response.json()["message"]
        assert (
            http.post(
                "/v1/collections/v/search", content=search, headers={"content-type": "application/json"}
            ).status_code
            == 200
        )
        assert one_worker() not in (idle, busy)


# -- the piecewise parser reads what json_format reads ---------------------------------------------------

NUMBER = st.one_of(
    st.integers(-(2**130), 2**130), st.floats(), st.booleans(), st.sampled_from(["NaN", "1.5", "x"]), st.none()
)
VECTOR = st.fixed_dictionaries({}, optional={"values": st.lists(NUMBER, max_size=5) | NUMBER})
ITEM = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=3),
        "vector": VECTOR | st.integers(),
        "content": st.fixed_dictionaries({}, optional={"text": st.text(max_size=3)}),
        "metadata": st.dictionaries(
            st.text(max_size=2), st.fixed_dictionaries({}, optional={"numberValue": NUMBER}), max_size=2
        ),
    },
)
BODIES = {
    pb.UpsertRequest: st.fixed_dictionaries(
        {}, optional={"collection": st.text(max_size=3), "items": st.lists(ITEM, max_size=4) | st.integers()}
    ),
    pb.SearchRequest: st.fixed_dictionaries(
        {},
        optional={
            "queries": st.lists(
                st.fixed_dictionaries({}, optional={"vector": VECTOR, "text": st.text(max_size=2)}), max_size=3
            ),
            "topK": st.integers(-3, 2**33) | st.text(max_size=2),
            "top_k": st.integers(0, 3),
            "filter": st.fixed_dictionaries(
                {},
                optional={
                    "must": st.lists(
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "key": st.text(max_size=2),
                                "range": st.fixed_dictionaries({}, optional={"gte": NUMBER}),
                            },
                        ),
                        max_size=2,
                    )
                },
            ),
        },
    ),
}


def _json_format(data: bytes, message_type: type):
    """What the HTTP API answered before (json_format.Parse; a blank body is the empty message)."""
    if not data.strip():
        return b""
    try:
        return json_format.Parse(data, message_type()).SerializeToString(deterministic=True)  # map keys sorted
    except (json_format.ParseError, ValueError, RecursionError, TypeError) as exc:
        return f"request body is not a valid {message_type.DESCRIPTOR.name} in JSON: {exc}"


def _parsed(data: bytes, message_type: type, piecewise: bool):
    """The message as a worker process sends it back (in pieces) and the server puts it together."""
    try:
        message = json_body.parse(data, message_type, piecewise=piecewise)
    except InvalidInput as exc:
        return str(exc)
    return bodyproc.merged(message_type(), bodyproc.pieces(message)).SerializeToString(deterministic=True)


def _piecewise(data: bytes, message_type: type):
    return _parsed(data, message_type, True)


def _whole(data: bytes, message_type: type):
    """The path of small bodies: json.loads in one call."""
    return _parsed(data, message_type, False)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), message_type=st.sampled_from(list(BODIES)), indent=st.sampled_from([None, 1]))
def test_the_piecewise_parse_reads_what_json_format_reads(data, message_type, indent):
    body = json.dumps(data.draw(BODIES[message_type]), indent=indent).encode()
    expected = _json_format(body, message_type)
    assert _piecewise(body, message_type) == expected  # the message, or the same words
    assert _whole(body, message_type) == expected


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet='[]{}",:0123456789.eE-+ \ntruefalsnq', max_size=40))
def test_the_piecewise_parse_refuses_what_json_format_refuses(text):
    for message_type in BODIES:
        refused = isinstance(_json_format(text.encode(), message_type), str)
        assert isinstance(_piecewise(text.encode(), message_type), str) == refused, text
        assert isinstance(_whole(text.encode(), message_type), str) == refused, text


def test_long_runs_of_numbers_are_read_whole():
    """Vectors longer than one step of the parser (json_body.RUN_CHARS of text), numbers in every JSON form."""
    rng = np.random.default_rng(7)
    for size in (1, 5_000, 30_000):
        numbers = [json.dumps(float(x)) for x in rng.standard_normal(size) * 10.0 ** rng.integers(-30, 30, size)]
        numbers[::7] = [str(int(n)) for n in rng.integers(-(10**6), 10**6, len(numbers[::7]))]
        for separator in (",", ", ", " ,\n "):
            body = ('{"queries": [{"vector": {"values": [' + separator.join(numbers) + ']}}, {"text": "x"}]}').encode()
            assert _piecewise(body, pb.SearchRequest) == _json_format(body, pb.SearchRequest)
    broken = ('{"queries": [{"vector": {"values": [' + ",".join(["1.5"] * 20_000) + ", 2.5.5]}}]}").encode()
    assert "not a valid SearchRequest" in _piecewise(broken, pb.SearchRequest)


def test_vectors_read_from_their_wire_bytes_equal_their_values():
    """calls.vector_from_pb reads a Vector's packed bytes (a request's 3.7M values iterated one by one held the
    event loop 130 ms); the result is the field's values, bit for bit, and an array of its own."""
    from embedsvc.service.wire import vector_values

    rng = np.random.default_rng(3)
    special = [np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, 3.4e38]
    for size in (0, 1, 15, 16, 17, 127, 128, 4096, 300_000):
        values = (rng.standard_normal(size) * 10.0 ** rng.integers(-20, 20, size)).astype(np.float32)
        values[: len(special)] = special[:size]
        vector = pb.Vector(values=values)
        for message in (vector, pb.Vector.FromString(vector.SerializeToString() + b"\x10\x07")):  # unknown field 2
            read = vector_values(message)
            assert read.dtype == np.float32 and read.flags.writeable and read.flags.owndata
            assert read.tobytes() == np.asarray(message.values, dtype=np.float32).tobytes()


def test_http_requests_take_the_admission_slots_grpc_calls_take(tiny_spec, tmp_path):
    """max_concurrent_rpcs run and max_waiting_rpcs wait, gRPC and HTTP together; the next is 429 "server busy"."""
    from concurrent.futures import ThreadPoolExecutor

    from serving import model_busy

    config = tiny_config(
        tiny_spec, tmp_path / "d", http_listen="127.0.0.1:0", max_concurrent_rpcs=1, max_waiting_rpcs=1
    )
    with (
        running_server(config) as server,
        Client(server.address, timeout=60) as client,
        httpx.Client(base_url=server.http_url, timeout=60) as http,
    ):
        slots = server.server.http.api.slots
        client.embed(["warm-up"])
        with ThreadPoolExecutor(2) as pool, model_busy(server) as release:
            running = pool.submit(client.embed, ["over gRPC"])  # holds the one slot, its forward waits
            _wait_until(lambda: slots.full, 30, "the gRPC call to take the slot")
            waiting = pool.submit(http.post, "/v1/embed", json={"inputs": [{"text": "over HTTP"}]})
            _wait_until(lambda: slots.waiting == 1, 30, "the HTTP request to wait for a slot")
            refused = http.post("/v1/embed", json={"inputs": [{"text": "one too many"}]})
            openai = http.post("/v1/embeddings", json={"input": "one too many", "model": tiny_spec.name})
            assert http.get("/healthz").status_code == 200  # probes take no slot
            release.set()
            assert refused.status_code == 429 and refused.json()["code"] == "RESOURCE_EXHAUSTED"
            assert "server busy" in refused.json()["message"]
            assert openai.status_code == 429 and "server busy" in openai.json()["error"]["message"]  # OpenAI's too
            assert running.result().vectors["cls"].shape[0] == 1
            assert len(waiting.result().json()["results"]) == 1


def _partial_body(port: int, length: int, sent: int) -> socket.socket:
    """A connection that has sent the headers of a search of `length` bytes and `sent` of its bytes, no more."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"POST /v1/collections/v/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
        + b" " * sent
    )
    return sock


def test_the_bytes_of_large_bodies_held_at_once_are_bounded(tiny_spec, tmp_path):
    """Each large body is held whole until its request ends (two parse at a time): without a bound, clients that
    each send a maximal body (here: all but its last bytes) made the server hold all of them, 86 MB of RSS per
    32 MiB body, up to http_max_connections of them. Past HELD_BODIES maximal bodies a large one is refused, with
    RESOURCE_EXHAUSTED; small ones still pass, and once those bodies are gone large ones pass again."""
    from embedsvc.service.http import HELD_BODIES

    limit = 2 * 1024 * 1024
    config = tiny_config(
        tiny_spec, tmp_path / "d", http_listen="127.0.0.1:0", max_image_bytes=1024 * 1024, http_max_body_bytes=limit
    )
    search = json.dumps({"queries": [{"vector": {"values": [1, 0, 0]}}]}).encode()
    json_type = {"content-type": "application/json"}
    with running_server(config) as server, httpx.Client(base_url=server.http_url, timeout=60) as http:
        assert http.post("/v1/collections", json={"config": {"name": "v", "dim": 3}}).status_code == 200
        received = server.server.http.api.body_limit
        with ExitStack() as stack:
            for _ in range(HELD_BODIES):
                stack.callback(_partial_body(server.server.http_port, limit, limit - 1000).close)
            _wait_until(lambda: received.held >= HELD_BODIES * (limit - 1000), 30, "the partial bodies received")
            refused = http.post("/v1/collections/v/search", content=_padded(search), headers=json_type)
            assert refused.status_code == 429, refused.text
            assert "bytes of request bodies" in refused.json()["message"], refused.text
            assert http.post("/v1/collections/v/search", content=search, headers=json_type).status_code == 200
        _wait_until(lambda: received.held == 0, 30, "the partial bodies let go")
        response = http.post("/v1/collections/v/search", content=_padded(search), headers=json_type)
        assert response.status_code == 200, response.text
