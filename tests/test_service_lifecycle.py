"""Configuration precedence, start-up errors, graceful shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from serving import ServerThread, model_busy, serve_once, tiny_config, wait_until

from embedsvc.client import Client, Item
from embedsvc.errors import InvalidInput
from embedsvc.models import MODEL_REGISTRY
from embedsvc.service.config import ServerConfig, field_docs, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_config_precedence(tmp_path):
    file = tmp_path / "embedsvc.toml"
    file.write_text('max_batch_size = 8\nlisten = "127.0.0.1:7000"\ndemo_size = 3\n')
    config = load_config(
        str(file),
        env={"EMBEDSVC_MAX_BATCH_SIZE": "16", "EMBEDSVC_DEMO_SIZE": "5", "OTHER": "x"},
        overrides={"demo_size": 7, "data_dir": None},
    )
    assert (config.max_batch_size, config.listen, config.demo_size) == (16, "127.0.0.1:7000", 7)
    assert config.data_dir == ServerConfig().data_dir
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"max_top_k": 50}))
    assert load_config(str(json_file), env={}).max_top_k == 50


@pytest.mark.parametrize(
    "content, env, message",
    [
        ("nonsense_key = 1\n", {}, "unknown key"),
        ("", {"EMBEDSVC_MAX_BATCH_SIZE": "many"}, "bad value 'many'"),
        ("", {"EMBEDSVC_MAX_BATCH_SIZE": "0"}, "at least 1"),
        ("", {"EMBEDSVC_LISTEN": "nohost"}, "HOST:PORT"),
    ],
)
def test_bad_config(tmp_path, content, env, message):
    file = tmp_path / "c.toml"
    file.write_text(content)
    with pytest.raises(InvalidInput, match=message):
        load_config(str(file), env=env)


def test_configuration_page_documents_every_config_field_as_its_comment_says():
    page = (ROOT / "docs" / "configuration.md").read_text()
    for name, _default, doc in field_docs():
        assert doc, f"ServerConfig.{name} has no comment"
        assert f"`{name}`" in page and f"EMBEDSVC_{name.upper()}" in page, f"docs/configuration.md lacks {name}"
        assert doc in page, f"docs/configuration.md does not say what the comment on ServerConfig.{name} says"
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr  # the generated table, byte for byte


def serve(*args: str) -> subprocess.CompletedProcess:
    return serve_once("--http-listen", "", *args)


def test_port_taken_is_a_clear_startup_error(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        proc = serve("--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"))
    assert proc.returncode == 2, proc.stderr
    assert "port is taken" in proc.stderr and "Traceback" not in proc.stderr


def test_port_taken_is_one_line_on_stderr_of_a_real_process(tmp_path):
    """gRPC's core logs a failed bind on file descriptor 2 itself, which only a process of its own shows: the user
    sees our one line, with gRPC's reason in it, not that log line as well."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        proc = serve_once(
            "--http-listen", "", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"), process=True
        )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("embedsvc serve: error: cannot listen on"), proc.stderr
    assert "Address already in use" in lines[0], proc.stderr


def test_unwritable_data_dir_is_a_clear_startup_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = serve("--listen", "127.0.0.1:0", "--data-dir", str(blocker / "data"))
    assert proc.returncode == 2 and "not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_graceful_shutdown_finishes_in_flight_and_checkpoints(tiny_spec, tmp_path):
    config = tiny_config(tiny_spec, tmp_path)
    server = ServerThread(config).start()
    try:
        with Client(server.address) as client:
            client.create_collection("c", dim=4)
            client.upsert("c", [Item("a", vector=[1, 0, 0, 0])])
        outcome = {}

        def slow_call():
            with Client(server.address) as c:  # queued behind the held model
                outcome["result"] = c.embed(["still answered"]).vectors["cls"].shape

        def release_once_draining(release):
            wait_until(lambda: server.server._stopped, 60, "the server to start its graceful stop")
            release.set()  # the model frees up while the server drains

        with model_busy(server) as release:
            thread = threading.Thread(target=slow_call)
            thread.start()
            wait_until(
                lambda: server.server.engine.runtime("").text.model_free.locked(),
                60,
                "the call's batch to wait for the held model",
            )
            threading.Thread(target=release_once_draining, args=(release,)).start()
            server.call(server.server.stop(grace=10))
        thread.join(30)
        assert outcome.get("result") == (1, 32)
        if server.config.store_backend == "local":  # Milvus persists every write itself: nothing to checkpoint
            assert list((tmp_path / "indexes").glob("collection-*.npz")), "no checkpoint written on shutdown"
    finally:
        server.stop()
        MODEL_REGISTRY.pop(tiny_spec.name, None)


def _listening_sockets() -> set[str]:
    """Inodes of the TCP sockets this process holds in LISTEN state (Linux /proc)."""
    held = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                held.add(target[len("socket:[") : -1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening.add(fields[9])
    return held & listening


@pytest.mark.parametrize("taken", ["--http-listen", "--metrics-port"])
def test_a_failed_start_releases_the_grpc_port_it_bound(tmp_path, taken):
    """A start that fails after binding gRPC's port (HTTP's or the metrics port taken) lets it go: a grpc.aio server
    never started keeps its port through stop() and garbage collection, until its process exits."""
    before = _listening_sockets()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        value = f"127.0.0.1:{port}" if taken == "--http-listen" else str(port)
        proc = serve_once("--data-dir", str(tmp_path / "d"), "--http-listen", "", taken, value)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "embedsvc serve: error:" in proc.stderr and str(port) in proc.stderr, proc.stderr
    assert _listening_sockets() - before == set()


def _open_files() -> dict[str, str]:
    """This process's file descriptors and what each is open on."""
    found = {}
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            found[fd.name] = os.readlink(fd)
    return found


@pytest.mark.parametrize("failure", ["http-port-taken", "corrupt-database"])
def test_a_failed_start_leaves_no_file_open(tmp_path, failure):
    """What a failed start opened is closed by it, not by the process's exit: the HTTP socket that could not bind,
    the SQLite connection to a database that is not one (found open after a start-up error run in this process)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "store.sqlite3").write_bytes(b"this is not a database, it is garbage" * 100)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        args = ["--http-listen", f"127.0.0.1:{blocker.getsockname()[1]}", "--data-dir", str(tmp_path / "d")]
        if failure == "corrupt-database":
            args = ["--http-listen", "", "--data-dir", str(data)]
        serve_once(*args)  # the first gRPC server of a process starts gRPC's own poller (kept for the next ones)
        before = _open_files()
        proc = serve_once(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    after = _open_files()
    assert {fd: what for fd, what in after.items() if before.get(fd) != what} == {}


def test_a_start_failing_at_the_demo_releases_the_grpc_port(tmp_path, tiny_spec):
    """The demo collection is indexed after create_server bound the port and before start(): its failure (here the
    default model's weights are missing) stops a server never started, which must let the port go as well."""
    models = tmp_path / "models.json"
    missing = str(tmp_path / "missing.safetensors")
    spec = {"name": "broken", "architecture": tiny_spec.architecture, "config_file": tiny_spec.config_file}
    models.write_text(json.dumps([{**spec, "checkpoint": missing}]))
    before = _listening_sockets()
    proc = serve_once(
        "--data-dir", str(tmp_path / "d"), "--http-listen", "", "--models-file", str(models),
        "--default-model", "broken", "--demo-size", "1",
    )  # fmt: skip
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert _listening_sockets() - before == set()
