"""The curl and OpenAI SDK examples of the README and of docs/http-api.md and docs/openai.md, verbatim (only the
port changed), against `embedsvc serve` on its defaults."""

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

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HTTP_PAGE = ROOT / "docs" / "http-api.md"
OPENAI_PAGE = ROOT / "docs" / "openai.md"
MARKER = "<!-- tests/test_http_readme.py runs this block -->"
DEMO_SIZE = 100  # the defaults index 500; fewer keeps the test short and changes nothing the examples use


def marked_block(page: Path, marker: str = MARKER, language: str = "bash") -> str:
    text = page.read_text()
    match = re.search(re.escape(marker) + rf"\n```{language}\n(.*?)\n```", text, re.DOTALL)
    assert match, f"{page.relative_to(ROOT)} lacks the {language} block after {marker}"
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
    env = dict(
        os.environ,
        EMBEDSVC_HTTP_LISTEN=f"127.0.0.1:{port}",
        EMBEDSVC_LISTEN="127.0.0.1:0",
        EMBEDSVC_METRICS_PORT="-1",
        EMBEDSVC_DATA_DIR=str(tmp_path / "embedsvc-data"),
        EMBEDSVC_DEMO_SIZE=str(DEMO_SIZE),
        EMBEDSVC_LOG_LEVEL="WARNING",
    )
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


def run_curl_block(block: str, port: int, cwd: Path) -> list:
    assert "localhost:8080" in block
    script = block.replace("localhost:8080", f"localhost:{port}")
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, check=False, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return json_documents(run.stdout)


def test_readme_curl_block_works_verbatim_and_returns_what_it_says(default_server, tmp_path):
    search, openai = run_curl_block(
        marked_block(README, "<!-- tests/test_http_readme.py runs this README block -->"), default_server, tmp_path
    )
    hits = search["results"][0]["hits"]
    assert len(hits) == 3 and all(h["id"].startswith("val-") for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert openai["object"] == "list" and openai["model"] == "embedsvc-tiny-scenes-2:gem:p=3"
    assert [d["index"] for d in openai["data"]] == [0, 1] and {d["object"] for d in openai["data"]} == {"embedding"}
    assert all(len(d["embedding"]) == 128 for d in openai["data"]) and openai["usage"]["prompt_tokens"] > 0


def test_http_page_curl_examples_work_verbatim(default_server, tmp_path):
    embed, upsert, bulk, search, by_image = run_curl_block(marked_block(HTTP_PAGE), default_server, tmp_path)
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


def test_openai_page_sdk_example_works_verbatim_and_prints_what_it_says(default_server, tmp_path):
    block = marked_block(OPENAI_PAGE, "<!-- tests/test_http_readme.py runs this Python block -->", "python")
    printed = marked_block(OPENAI_PAGE, "<!-- tests/test_http_readme.py checks this output -->", "text")
    assert "localhost:8080" in block
    thumbnail = httpx.get(f"http://127.0.0.1:{default_server}/v1/collections/scenes/items/val-0000003/thumbnail")
    (tmp_path / "scene.jpg").write_bytes(thumbnail.raise_for_status().content)  # the curl example's download
    script = block.replace("localhost:8080", f"localhost:{default_server}")
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "no-tiktoken-cache")),
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == printed.strip()
    assert not (tmp_path / "no-tiktoken-cache").exists()  # langchain fetched no tokenizer
