"""`embedsvc serve --frontends N`: front-end processes on one port, one model process (issue 26).

A real `embedsvc serve --frontends 2` (three processes) on 127.0.0.1; front ends are killed with SIGKILL.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image
from test_service_kill import KILLED, serve_process

from embedsvc.client import Client, EmbedsvcClientError, Item
from embedsvc.errors import InvalidInput
from embedsvc.service.config import ServerConfig

DIM = 8


def png(colour: tuple[int, int, int], size=(90, 70)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frontends")
    (folder / "data").mkdir()
    server = serve_process(folder / "data", "--frontends", "2", "--metrics-port", "0", preload=True)
    yield server, folder
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0


def pids_of(server) -> list[int]:
    """Front-end pids: the model process's children running embedsvc.service.frontends."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue
        if ppid == server.proc.pid and b"embedsvc.service.frontends" in command:
            pids.append(int(entry))
    return sorted(pids)


def test_config_refuses_a_bad_front_end_count():
    with pytest.raises(InvalidInput, match="frontends must be between 0"):
        ServerConfig(frontends=-1).validate()
    with pytest.raises(InvalidInput, match="frontends must be between 0"):
        ServerConfig(frontends=65).validate()


def test_front_ends_embed_as_the_model_process_does(served):
    """Vectors decoded and checked in a front end equal those of the model process's own path (Embed with
    include_tokens is forwarded there and decodes there); refusals keep their status and message."""
    server, _ = served
    assert len(pids_of(server)) == 2
    inputs = ["a red circle", png((200, 30, 40)), "two blue squares", png((10, 90, 200), (300, 120))]
    with Client(server.address, timeout=60) as client:
        fast = client.embed(inputs, poolings=["cls", "avg"])
        model_side = client.embed(inputs, poolings=["cls", "avg"], include_tokens=True)
        for key in ("cls", "avg"):
            assert fast.vectors[key].shape == (4, model_side.vectors[key].shape[1])
            np.testing.assert_allclose(fast.vectors[key], model_side.vectors[key], atol=1e-6)
        assert list(fast.modalities) == list(model_side.modalities)
        refusals = {"text is empty": ["   "], "could not decode image": [b"not an image"], "unknown pooling": ["x"]}
        for message, bad in refusals.items():
            with pytest.raises(EmbedsvcClientError, match=message) as caught:
                client.embed(bad, poolings=["nope"] if message == "unknown pooling" else ["cls"])
            assert caught.value.code.name == "INVALID_ARGUMENT"
        with pytest.raises(EmbedsvcClientError) as caught:
            client.embed(["x"], model="no-such-model")
        assert caught.value.code.name == "NOT_FOUND"


def requests_counted(server, method: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=30).read().decode()
    match = re.search(rf'embedsvc_requests_total{{code="OK",method="{method}"}} (\S+)', text)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_every_call_once(served):
    """Embed answered by a front end and ListModels forwarded to the model process both appear in the model
    process's /metrics, each call exactly once."""
    server, _ = served
    assert server.metrics_url
    embeds, models = requests_counted(server, "Embed"), requests_counted(server, "ListModels")
    with Client(server.address, timeout=60) as client:
        for i in range(5):
            client.embed([f"{i} circles"])
        client.list_models()
    deadline = time.monotonic() + 30  # a front end reports its calls after answering them
    while requests_counted(server, "Embed") < embeds + 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert requests_counted(server, "Embed") == embeds + 5
    assert requests_counted(server, "ListModels") == models + 1


def test_many_callers_share_forwards_across_front_ends(served):
    """Callers on separate connections (spread over both front ends) are answered correctly, each its own
    vector, while their inputs share the model process's batches."""
    server, _ = served
    texts = [f"{n} green triangles" for n in range(24)]
    with Client(server.address, timeout=60) as client:
        expected = client.embed(texts).vectors["cls"]
    results: dict[int, np.ndarray] = {}
    errors: list[str] = []

    def caller(i: int):
        try:
            with Client(server.address, timeout=60) as own:
                results[i] = own.embed([texts[i]]).vectors["cls"][0]
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    for i, vector in results.items():
        np.testing.assert_allclose(vector, expected[i], atol=1e-5)


def test_killed_front_end_loses_nothing_acknowledged(served):
    """SIGKILL one front end while writers upsert through fresh connections: the other keeps serving, every
    acknowledged item is stored (the model process committed it before the front end answered), writes that
    died with the front end were not acknowledged, and a new front end replaces the killed one."""
    server, _ = served
    before = pids_of(server)
    assert len(before) == 2
    with Client(server.address, timeout=60) as client:
        client.create_collection("kv", dim=DIM)
    acked: set[str] = set()
    lock = threading.Lock()
    counter = iter(range(10**9))
    other_errors: list[str] = []
    killed = threading.Event()
    after_kill = [0]
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            with lock:
                ids = [f"item-{next(counter)}" for _ in range(4)]
            rng = np.random.default_rng(int(ids[0].split("-")[1]))
            try:
                with Client(server.address, timeout=30) as own:  # a new connection: either front end
                    own.upsert(
                        "kv", (Item(i, vector=rng.standard_normal(DIM).astype(np.float32)) for i in ids), batch_size=2
                    )
            except EmbedsvcClientError as exc:
                if exc.code.name not in KILLED:
                    other_errors.append(str(exc))
                continue
            with lock:
                acked.update(ids)
                if killed.is_set():
                    after_kill[0] += 1

    threads = [threading.Thread(target=writer) for _ in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while len(acked) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(before[0], signal.SIGKILL)
    killed.set()
    while after_kill[0] < 30 and time.monotonic() < deadline and not other_errors:
        time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert not other_errors, other_errors[:3]
    assert after_kill[0] >= 30, "writes stopped being acknowledged after one front end was killed"
    with Client(server.address, timeout=60) as client:
        _, missing = client.get("kv", sorted(acked))
        assert not missing, f"lost {len(missing)} acknowledged items, e.g. {missing[:3]}"
        assert client.get_collection("kv").count >= len(acked)
        client.drop_collection("kv")
    while time.monotonic() < deadline and len(set(pids_of(server)) - set(before)) < 1:
        time.sleep(0.05)
    now = pids_of(server)
    assert before[0] not in now and len(now) == 2, f"front ends before {before}, now {now}"


def test_port_taken_is_a_clear_startup_error_with_front_ends(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "embedsvc",
                "serve",
                "--frontends",
                "2",
                "--listen",
                f"127.0.0.1:{port}",
                "--http-listen",
                "",
                "--metrics-port",
                "-1",
                "--demo-size",
                "0",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"embedsvc serve: error: cannot listen on 127.0.0.1:{port}: the port is taken or the address is not local "
        f"(Address already in use); pick another with --listen or EMBEDSVC_LISTEN"
    ]
