"""Faults and endurance against a real `embedsvc serve` process: SIGKILL under mixed load from gRPC and HTTP
writers, 10 times (EMBEDSVC_KILLS to change); and a bounded soak from several client processes with zero errors
and bounded memory growth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_service_kill import serve_process, start_server

from embedsvc.client import Client

HERE = Path(__file__).parent
KILLS = int(os.environ.get("EMBEDSVC_KILLS", "10"))


def clients(addresses: list[str], seconds: float, embed: bool) -> list[subprocess.Popen]:
    """One load_client process per address (gRPC host:port or HTTP URL), each writing its own ids."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    return [
        subprocess.Popen(
            [sys.executable, str(HERE / "load_client.py"), address, str(w), str(seconds), "1" if embed else "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for w, address in enumerate(addresses)
    ]


@pytest.mark.slow  # 10 SIGKILLs under load from gRPC and HTTP client processes (290 s measured on 2 shared cores)
def test_sigkill_under_mixed_load_loses_nothing_acknowledged(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    expected: dict[str, int] = {}
    pending: list[dict] = []  # writes in flight at the kill: all or nothing, either way
    acked_writes = http_acked = 0
    rng = np.random.default_rng(3)

    def apply(state: dict, op: dict) -> None:
        for i in op["ids"]:
            if op["kind"] == "upsert":
                state[i] = op["v"]
            else:
                state.pop(i, None)

    for kill in range(KILLS + 1):
        served = serve_process(data, http=True)
        proc, address = served.proc, served.address
        with Client(address, timeout=20) as client:
            if kill == 0:
                client.create_collection("load", dim=8, index="hnsw")
            touched = sorted(set(expected) | {i for op in pending for i in op["ids"]})
            items, _ = client.get("load", touched)
            actual = {i.id: int(i.metadata["v"]) for i in items}
            for op in pending:  # each in-flight write landed whole or not at all
                before = {i: expected.get(i) for i in op["ids"]}
                after = dict(before)
                apply(after, op) if op["kind"] == "upsert" else [after.__setitem__(i, None) for i in op["ids"]]
                seen = {i: actual.get(i) for i in op["ids"]}
                assert seen in (before, after), f"after kill {kill}: half-applied write {op}"
                if seen == after:
                    apply(expected, op)
            assert actual == expected, f"after kill {kill}: acknowledged state differs"
        pending = []
        if kill == KILLS:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            break
        workers = clients([address, address, served.http_url, served.http_url], 30, embed=False)
        # a random kill point under load is the thing under test (not synchronisation): the verdict reads the
        # workers' own begin/ack logs, so it holds wherever the kill lands
        time.sleep(float(rng.uniform(1.5, 3.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        for number, worker in enumerate(workers):
            out, _ = worker.communicate(timeout=60)
            in_flight = None
            for line in out.splitlines():
                event = json.loads(line)
                if "begin" in event:
                    in_flight = {"kind": event["begin"], "ids": event["ids"], "v": event.get("v")}
                elif "ack" in event and in_flight is not None:
                    apply(expected, in_flight)  # each worker writes its own ids: its order is the order of effect
                    acked_writes += 1
                    http_acked += number >= 2
                    in_flight = None
            if in_flight is not None:
                pending.append(in_flight)
    print(
        f"\nfault test: {KILLS} SIGKILLs under gRPC and HTTP writers, {acked_writes} acknowledged writes "
        f"({http_acked} over HTTP), {len(expected)} items verified after the last restart"
    )
    assert acked_writes > 50 and http_acked > 20, f"{acked_writes} writes acknowledged, {http_acked} over HTTP"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@pytest.mark.slow  # a 20 s soak from 4 client processes, with start-up (85 s measured)
def test_bounded_soak(tmp_path):
    seconds = float(os.environ.get("EMBEDSVC_SOAK_SECONDS", "20"))
    data = tmp_path / "data"
    data.mkdir()
    proc, address = start_server(data, preload=True)
    try:
        with Client(address, timeout=20) as client:
            client.create_collection("load", dim=8)
            client.embed(["warm up"])  # load the model before measuring memory
        rss_before = rss_kb(proc.pid)
        workers = clients([address] * 4, seconds, embed=True)
        requests = errors = 0
        for worker in workers:
            out, _ = worker.communicate(timeout=seconds + 120)
            summary = json.loads(out.splitlines()[-1])["summary"]
            requests, errors = requests + summary["requests"], errors + summary["errors"]
        rss_after = rss_kb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    growth = (rss_after - rss_before) / max(rss_before, 1)
    print(
        f"\nsoak: {seconds:.0f}s, 4 client processes, {requests} requests, {errors} errors, "
        f"RSS {rss_before / 1024:.0f} MiB -> {rss_after / 1024:.0f} MiB ({growth:+.1%})"
    )
    assert errors == 0 and requests > 200
    assert growth < 0.25
