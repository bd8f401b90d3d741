"""SIGKILL the real server process during streamed Upserts; after restart no acknowledged item is lost."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from embedsvc.client import Client, EmbedsvcClientError, Item

DIM = 8


def start_server(data_dir: Path, preload: bool = False) -> tuple[subprocess.Popen, str]:
    log = open(data_dir.parent / "server.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "embedsvc", "serve", "--listen", "127.0.0.1:0", "--data-dir",
                             str(data_dir), *([] if preload else ["--preload-models", ""]), "--demo-size", "0",
                             "--metrics-port", "-1",
                             "--log-format", "text", "--log-level", "WARNING"],
                            stderr=subprocess.PIPE, stdout=log, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        match = re.search(r"serving on (\S+):(\d+)", line)
        if match:
            threading.Thread(target=lambda: [log.write(x) for x in proc.stderr], daemon=True).start()
            return proc, f"127.0.0.1:{match.group(2)}"
    proc.kill()
    raise AssertionError("server did not start: " + proc.stderr.read())


def vector(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


@pytest.mark.slow  # 4 server kills under streamed load (54 s measured)
def test_kill_during_streamed_upsert_loses_no_acknowledged_item(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    acked: set[str] = set()
    next_id = 0
    kills = 0
    for round_ in range(4):
        proc, address = start_server(data)
        with Client(address, timeout=30) as client:
            if round_ == 0:
                client.create_collection("kv", dim=DIM)
            # everything acknowledged before is there after the restart
            items, missing = client.get("kv", sorted(acked))
            assert not missing, f"round {round_}: lost {len(missing)} acknowledged items, e.g. {missing[:3]}"
            assert client.get_collection("kv").count >= len(acked)

            stop = threading.Event()

            def writer():
                nonlocal next_id
                while not stop.is_set():
                    ids = [f"item-{next_id + k}" for k in range(40)]
                    next_id += 40
                    try:
                        client.upsert("kv", (Item(i, vector=vector(int(i.split("-")[1]))) for i in ids), batch_size=8)
                    except EmbedsvcClientError:
                        return  # the stream died with the server: not acknowledged
                    acked.update(ids)

            thread = threading.Thread(target=writer)
            thread.start()
            time.sleep(0.6 + 0.3 * round_)
            proc.send_signal(signal.SIGKILL)
            kills += 1
            proc.wait(10)
            stop.set()
            thread.join(60)
    proc, address = start_server(data)
    try:
        with Client(address, timeout=30) as client:
            items, missing = client.get("kv", sorted(acked), include_vectors=True)
            assert not missing
            for item in items:
                expected = vector(int(item.id.split("-")[1]))
                assert np.allclose(item.vector, expected / np.linalg.norm(expected), atol=1e-6)
            hit = client.search("kv", vector=vector(5), top_k=1)[0]
            assert hit.id == "item-5" and hit.score == pytest.approx(1.0, abs=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0  # graceful shutdown exits cleanly
    assert kills == 4 and len(acked) > 200
