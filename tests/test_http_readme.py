"""The README's curl and OpenAI SDK examples, verbatim (only the port changed), against `embedsvc serve` on its
defaults."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tests/test_http_readme.py runs this block -->"
DEMO_SIZE = 100  # the defaults index 500; fewer keeps the test short and changes nothing the examples use


def readme_block(marker: str = MARKER, language: str = "bash") -> str:
    text = README.read_text()
    match = re.search(re.escape(marker) + rf"\n```{language}\n(.*?)\n```", text, re.S)
    assert match, f"README lacks the {language} block after {marker}"
    return match.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def json_documents(text: str) -> list:
    decoder, out, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        value, at = decoder.raw_decode(text, at)
        out.append(value)
    return out


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("readme-server")
    port = free_port()
    env = dict(os.environ, EMBEDSVC_HTTP_LISTEN=f"127.0.0.1:{port}", EMBEDSVC_LISTEN="127.0.0.1:0",
               EMBEDSVC_METRICS_PORT="-1", EMBEDSVC_DATA_DIR=str(tmp_path / "embedsvc-data"),
               EMBEDSVC_DEMO_SIZE=str(DEMO_SIZE), EMBEDSVC_LOG_LEVEL="WARNING")
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - the server's output while it runs
    proc = subprocess.Popen([sys.executable, "-m", "embedsvc", "serve"], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.3)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (tmp_path / "server.log").read_text()
        log.close()


def test_readme_curl_examples_work_verbatim(default_server, tmp_path):
    block = readme_block()
    assert "localhost:8080" in block
    script = block.replace("localhost:8080", f"localhost:{default_server}")
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    embed, upsert, bulk, search, by_image = json_documents(run.stdout)
    assert embed["model"] == "embedsvc-tiny-scenes-2"
    vectors = [np.array(e["vector"]["values"]) for e in embed["results"][0]["embeddings"]]
    assert [e["pooling"] for e in embed["results"][0]["embeddings"]] == ["cls", "avg"]
    assert all(v.shape == (128,) and abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    assert upsert == {"inserted": "1", "replaced": "0", "count": str(DEMO_SIZE + 1)}
    assert bulk == {"inserted": "2", "replaced": "0", "count": str(DEMO_SIZE + 3)}
    first = search["results"][0]["hits"][0]
    assert first["id"] == "note-1" and first["score"] == pytest.approx(1.0, abs=1e-5)
    assert first["metadata"]["source"] == {"stringValue": "curl"}
    assert (tmp_path / "scene.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG thumbnail
    assert by_image["results"][0]["hits"][0]["id"] == "val-0000003"
    assert len(by_image["results"][0]["hits"]) == 3


def test_readme_openai_sdk_example_works_verbatim_and_prints_what_it_says(default_server, tmp_path):
    block = readme_block("<!-- tests/test_http_readme.py runs this Python block -->", "python")
    printed = readme_block("<!-- tests/test_http_readme.py checks this output -->", "text")
    assert "localhost:8080" in block
    thumbnail = httpx.get(f"http://127.0.0.1:{default_server}/v1/collections/scenes/items/val-0000003/thumbnail")
    (tmp_path / "scene.jpg").write_bytes(thumbnail.raise_for_status().content)  # the curl example's download
    script = block.replace("localhost:8080", f"localhost:{default_server}")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "no-tiktoken-cache")))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == printed.strip()
    assert not (tmp_path / "no-tiktoken-cache").exists()  # langchain fetched no tokenizer
