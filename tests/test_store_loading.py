"""Start-up of a store whose collections take a while to load (issue 24): the server listens first, says it is
alive but not ready until every collection is loaded, refuses requests to a collection still loading with
UNAVAILABLE and a message, and a long load logs how far it is. Real stores and a real server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import STORE_BACKEND, ServerThread

from embedsvc.client import Client
from embedsvc.service.config import ServerConfig
from embedsvc.store import CollectionConfig, Item, LocalStore, SearchOptions

pytestmark = pytest.mark.skipif(STORE_BACKEND != "local", reason="the local store's start-up load")


def unit(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def http_get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def http_post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=30).status
        )


def test_the_server_listens_and_is_alive_but_not_ready_while_a_collection_loads(tmp_path, monkeypatch):
    vectors = unit(50, 8)
    store = LocalStore(tmp_path)
    store.create_collection(CollectionConfig("big", 8))
    store.upsert("big", [Item(f"i{k}", v, {"k": k}) for k, v in enumerate(vectors)])
    store.close()
    entered, release = threading.Event(), threading.Event()
    real_load = LocalStore._load_collection

    def held_load(self, col):  # the real load, once the test has looked at the server meanwhile
        entered.set()
        assert release.wait(60)
        return real_load(self, col)

    monkeypatch.setattr(LocalStore, "_load_collection", held_load)
    config = ServerConfig(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        data_dir=str(tmp_path),
        preload_models="",
        metrics_port=-1,
        demo_size=0,
        log_format="text",
    )
    server = ServerThread(config, wait_loaded=False).start()  # returns once listening
    try:
        assert entered.wait(60)
        url = server.http_url
        assert http_get(f"{url}/healthz")[0] == 200
        status, body = http_get(f"{url}/readyz")
        assert status == 503 and body["status"] == "loading"
        assert health(server.address, "") == health_pb2.HealthCheckResponse.SERVING
        assert health(server.address, "embedsvc.v1.EmbedService") == health_pb2.HealthCheckResponse.SERVING
        assert health(server.address, "embedsvc.v1.IndexService") == health_pb2.HealthCheckResponse.NOT_SERVING
        with Client(server.address) as client:
            assert [(c.name, c.count) for c in client.list_collections()] == [("big", 50)]
            with pytest.raises(Exception) as refused:
                client.search("big", vector=vectors[0], top_k=3)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in refused.value.details and "retry" in refused.value.details
            status, body = http_post(
                f"{url}/v1/collections/big/search",
                {"collection": "big", "queries": [{"vector": {"values": vectors[0].tolist()}}], "topK": 3},
            )
            assert status == 503 and "still loading" in json.dumps(body), (status, body)
            release.set()
            server.call(server.server.wait_ready())
            assert http_get(f"{url}/readyz") == (200, {"status": "ready"})
            assert health(server.address, "embedsvc.v1.IndexService") == health_pb2.HealthCheckResponse.SERVING
            hits = client.search("big", vector=vectors[7], top_k=3)
            assert hits[0].id == "i7"
    finally:
        release.set()
        server.stop()


def test_a_server_stopped_while_a_collection_loads_stops_and_keeps_its_data(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.create_collection(CollectionConfig("c", 8))
    store.upsert("c", [Item(f"i{k}", v) for k, v in enumerate(unit(20, 8))])
    store.close()
    entered, release = threading.Event(), threading.Event()
    real_load = LocalStore._load_collection

    def held_load(self, col):
        entered.set()
        assert release.wait(60)
        return real_load(self, col)

    monkeypatch.setattr(LocalStore, "_load_collection", held_load)
    config = ServerConfig(
        listen="127.0.0.1:0",
        http_listen="",
        data_dir=str(tmp_path),
        preload_models="",
        metrics_port=-1,
        demo_size=0,
        log_format="text",
    )
    server = ServerThread(config, wait_loaded=False).start()
    assert entered.wait(60)
    threading.Timer(0, release.set).start()
    server.stop()
    monkeypatch.undo()
    reopened = LocalStore(tmp_path)
    try:
        assert reopened.get_collection("c").count == 20
    finally:
        reopened.close()


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_load_logs_its_progress_at_the_interval_set(tmp_path, caplog, kind):
    """progress_seconds 0: a line at every step, so a small collection shows what a large one logs every few
    seconds: checkpoint reads, log replays and rebuilds."""
    store = LocalStore(tmp_path, checkpoint_every=10**9)
    store.create_collection(CollectionConfig("c", 8, index=kind))
    store.upsert("c", [Item(f"i{k}", v) for k, v in enumerate(unit(300, 8))])
    store.close()  # checkpointed
    store = LocalStore(tmp_path, checkpoint_every=10**9)
    store.upsert("c", [Item(f"j{k}", v) for k, v in enumerate(unit(5, 8, seed=1))])
    store.close(checkpoint=False)  # a log after the checkpoint
    with caplog.at_level(logging.INFO, logger="embedsvc.store.local"):
        LocalStore(tmp_path, progress_seconds=0).close(checkpoint=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading collection c: ")]
    assert any("reading its checkpoint's ids, 300 of 305 items" in line for line in lines), lines
    assert any("replaying 5 additions from its log" in line for line in lines), lines
    if kind == "hnsw":
        assert any("reading its hnsw index" in line for line in lines), lines
    caplog.clear()
    (tmp_path / "indexes" / "collection-1.npz").unlink()  # no checkpoint: rebuilt from the items table
    with caplog.at_level(logging.INFO, logger="embedsvc.store.local"):
        LocalStore(tmp_path, progress_seconds=0).close(checkpoint=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading collection c: ")]
    assert any("reading the items table, 305 of 305 items (100%" in line for line in lines), lines
    if kind == "hnsw":
        assert any("building its hnsw index, 305 of 305 items" in line for line in lines), lines
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="embedsvc.store.local"):
        LocalStore(tmp_path).close(checkpoint=False)  # the default interval: a small load logs no progress line
    assert not [r for r in caplog.records if r.getMessage().startswith("loading collection c: ")]


def test_serve_prints_load_progress_on_stderr(tmp_path):
    store = LocalStore(tmp_path)
    store.create_collection(CollectionConfig("c", 8))
    store.upsert("c", [Item(f"i{k}", v) for k, v in enumerate(unit(30, 8))])
    store.close()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embedsvc",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path),
            "--preload-models",
            "",
            "--demo-size",
            "0",
            "--metrics-port",
            "-1",
            "--http-listen",
            "",
            "--log-format",
            "text",
            "--load-progress-seconds",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:
            seen.append(line)
            if "serving on" in line or time.monotonic() > deadline:
                break
    finally:
        proc.terminate()
        proc.wait(60)
    text = "".join(seen)
    assert "serving on" in text, text
    assert "loading collection c: reading its checkpoint's ids, 30 of 30 items" in text, text


def test_a_checkpoint_giving_one_id_two_labels_is_replaced_by_a_rebuild(tmp_path, caplog):
    """The id -> label dict is made after a collection serves (hashing a million ids took seconds of a restart);
    a damaged checkpoint that lists one id under two labels is still caught then, and rebuilt from the truth."""
    from embedsvc.store.checkpoint import read_checkpoint, write_checkpoint

    vectors = unit(30, 8)
    store = LocalStore(tmp_path)
    store.create_collection(CollectionConfig("c", 8))
    store.upsert("c", [Item(f"i{k:02d}", v) for k, v in enumerate(vectors)])
    store.close()
    path = tmp_path / "indexes" / "collection-1.npz"
    header, arrays = read_checkpoint(path)
    blob = arrays["ids"].tobytes()
    assert blob.startswith(b"i00i01")
    arrays["ids"] = np.frombuffer(b"i00i00" + blob[6:], dtype=np.uint8)  # label 1 now holds "i00" too
    write_checkpoint(path, header, arrays)
    with caplog.at_level(logging.INFO, logger="embedsvc.store.local"):
        store = LocalStore(tmp_path)
    try:
        assert any(
            "checkpoint is inconsistent" in r.getMessage() and "held by two labels" in r.getMessage()
            for r in caplog.records
        ), [r.getMessage() for r in caplog.records]
        assert store.get_collection("c").count == 30
        assert [row[0].id for row in store.search("c", vectors[:3], SearchOptions(1))] == ["i00", "i01", "i02"]
        store.upsert("c", [Item("i01", vectors[5])])  # writes find the right labels
        assert store.search("c", vectors[1:2], SearchOptions(1))[0][0].id != "i01"
        assert store.get_collection("c").count == 30
    finally:
        store.close()
