"""Cross-site attacks on the HTTP API from a real browser (Debian's Chromium driven by Playwright): a page of
another origin, served by a second small HTTP server on 127.0.0.1, and a page reached by a rebound DNS name. Before
BrowserGuard, the other page's no-cors POSTs (a Blob body: no Content-Type, no preflight) created a collection and
deleted an item, and the rebound page could read and write as if it were the server's own."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from serving import running_server
from test_http_origin import bare_config
from test_web_page import ARGS, CHROMIUM

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium); .ci/run installs it",
    ),
]

REBOUND = "rebound.test"  # a name the browser resolves to 127.0.0.1, as an attacker's DNS would after rebinding

# Each entry: how the page calls the API; "answered" when a response came back (opaque for no-cors), else the error.
ATTACK = """async ([api, sends]) => {
  const out = [];
  for (const [method, path, body, init] of sends) {
    const options = Object.assign({method}, init);
    if (body !== null) options.body = init.blob ? new Blob([JSON.stringify(body)]) : JSON.stringify(body);
    out.push(await fetch(api + path, options).then(async (r) => r.type === "opaque" ? "answered" :
                                                   [r.status, await r.json()], (e) => "failed: " + e.name));
  }
  return out;
}"""


class Page(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"<!doctype html><title>another site</title><p>nothing here"
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def sites():
    """Two pages on other origins: the attacker's, and a front end the server is configured to trust."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Page) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for server, thread in zip(servers, threads):
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def api(sites, tmp_path_factory):
    attacker, friend = sites
    with running_server(bare_config(tmp_path_factory.mktemp("web-origin"), http_cors_origins=friend)) as srv:
        base = srv.http_url
        assert httpx.post(base + "/v1/collections", json={"config": {"name": "victim", "dim": 3}}).status_code == 200
        httpx.post(
            base + "/v1/collections/victim/items", json={"items": [{"id": "keep", "vector": {"values": [1, 0, 0]}}]}
        ).raise_for_status()
        yield srv


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=[*ARGS, f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1"]
        )
        yield browser
        browser.close()


def state(api) -> tuple[set[str], list[str]]:
    """The collections, and which of victim's items are left (read without an Origin, as a script would)."""
    collections = httpx.get(api.http_url + "/v1/collections").json()["collections"]
    items = httpx.post(api.http_url + "/v1/collections/victim/get", json={"ids": ["keep"]}).json()["items"]
    return {c["config"]["name"] for c in collections}, [i["id"] for i in items]


def visit(browser, url: str):
    """A page at `url`, and the statuses the server answered its requests to /v1 with (seen by the browser
    even where the page itself only gets an opaque response)."""
    page = browser.new_page()
    statuses = []
    page.on(
        "response",
        lambda r: statuses.append((r.request.method, r.url.split("/v1/", 1)[1], r.status)) if "/v1/" in r.url else None,
    )
    page.goto(url)
    return page, statuses


def test_another_sites_page_can_no_longer_create_or_delete(browser, sites, api, caplog):
    attacker, _ = sites
    caplog.set_level(logging.INFO, logger="embedsvc.http")
    page, _ = visit(browser, attacker + "/")
    no_cors = {"mode": "no-cors", "blob": True}
    results = page.evaluate(
        ATTACK,
        [
            api.http_url,
            [
                ["POST", "/v1/collections", {"config": {"name": "pwned", "dim": 3}}, no_cors],
                ["POST", "/v1/collections/victim/delete", {"ids": ["keep"]}, no_cors],
                [
                    "POST",
                    "/v1/collections/victim/delete",
                    {"ids": ["keep"]},
                    {"mode": "no-cors", "headers": {"Content-Type": "text/plain"}},
                ],  # what a form can send
                [
                    "POST",
                    "/v1/collections",
                    {"config": {"name": "pwned2", "dim": 3}},  # needs a preflight
                    {"headers": {"Content-Type": "application/json"}},
                ],
                ["DELETE", "/v1/collections/victim", None, {}],  # needs a preflight
                [
                    "GET",
                    "/v1/collections",
                    None,
                    {},
                ],  # a read: answered, but without CORS headers the page cannot see it
            ],
        ],
    )
    page.close()
    # the no-cors ones reached the server (statuses below) but their opaque answers are blocked too (CORP); the
    # preflighted ones were stopped at the preflight, and the read has no CORS headers
    assert results == ["failed: TypeError"] * 6, results
    refused = [r.getMessage() for r in caplog.records if r.name == "embedsvc.http"]
    assert [line.split(":")[0] for line in refused[:3]] == [
        "refused POST /v1/collections",
        "refused POST /v1/collections/victim/delete",
        "refused POST /v1/collections/victim/delete",
    ], refused
    assert all("may not POST" in line for line in refused[:3]), refused  # 403: another origin's writes
    assert state(api) == ({"victim"}, ["keep"])


def test_a_rebound_name_gets_421_for_the_page_and_its_requests(browser, api):
    port = api.server.http_port
    page, statuses = visit(browser, f"http://{REBOUND}:{port}/v1/collections")
    assert statuses[0][2] == 421  # the rebound page cannot even read the list
    results = page.evaluate(
        ATTACK,
        [
            "",
            [  # same-origin requests of the rebound page
                [
                    "POST",
                    "/v1/collections",
                    {"config": {"name": "rebound", "dim": 3}},
                    {"headers": {"Content-Type": "application/json"}},
                ],
                ["GET", "/v1/collections", None, {}],
            ],
        ],
    )
    page.close()
    assert [r[0] for r in results] == [421, 421], results
    assert all(r[1]["code"] == "PERMISSION_DENIED" and "http_allowed_hosts" in r[1]["message"] for r in results)
    assert "rebound" not in state(api)[0]


def test_a_configured_front_end_may_write_with_a_token_and_read_the_answers(browser, sites, api):
    _, friend = sites
    page, _ = visit(browser, friend + "/")
    # JSON and a token: the browser preflights each write (as it did the attacker's, refused above)
    json_with_token = {"headers": {"Content-Type": "application/json", "Authorization": "Bearer " + "f" * 24}}
    results = page.evaluate(
        ATTACK,
        [
            api.http_url,
            [
                ["POST", "/v1/collections", {"config": {"name": "friendly", "dim": 3}}, json_with_token],
                [
                    "POST",
                    "/v1/collections/friendly/items",
                    {"items": [{"id": "a", "vector": {"values": [0, 1, 0]}}]},
                    json_with_token,
                ],
                ["POST", "/v1/collections/friendly/delete", {"ids": ["a"]}, json_with_token],
                ["GET", "/v1/collections/friendly", None, {}],
                ["DELETE", "/v1/collections/friendly", None, json_with_token],
                ["POST", "/v1/collections/friendly/get", {"ids": ["a"]}, json_with_token],
            ],
        ],
    )
    page.close()
    assert [r[0] for r in results] == [200, 200, 200, 200, 200, 404], results
    assert results[2][1]["deleted"] == "1" and results[4][1] == {"itemsRemoved": "0"}
    assert results[5][1]["code"] == "NOT_FOUND"  # the front end reads error bodies too
    assert "friendly" not in state(api)[0]


def test_another_sites_page_cannot_probe_thumbnails_through_img(browser, sites, tiny_spec, tmp_path):
    """Without tokens, an <img> of another site loaded a thumbnail (no CORS needed for images): onload or onerror
    told the page whether an item exists, and naturalWidth/Height its picture's shape. Now every answer is
    Cross-Origin-Resource-Policy: same-origin, so such loads fail alike; the server's own page still shows them."""
    import base64

    from conftest import png_bytes
    from serving import tiny_config

    attacker, _ = sites
    config = tiny_config(tiny_spec, tmp_path / "d", http_listen="127.0.0.1:0", store_thumbnails=True)
    with running_server(config) as srv:
        api = srv.http_url
        httpx.post(
            api + "/v1/collections", json={"config": {"name": "photos", "dim": 32, "model": tiny_spec.name}}
        ).raise_for_status()
        httpx.post(
            api + "/v1/collections/photos/items",
            json={"items": [{"id": "private", "content": {"image": base64.b64encode(png_bytes((300, 120))).decode()}}]},
        ).raise_for_status()
        probe = """async (url) => await new Promise((done) => { const img = new Image();
          img.onload = () => done(["loaded", img.naturalWidth, img.naturalHeight]); img.onerror = () => done(["error"]);
          img.src = url; })"""
        thumbnail = api + "/v1/collections/photos/items/{}/thumbnail"
        page, _ = visit(browser, attacker + "/")
        seen = [page.evaluate(probe, thumbnail.format(item)) for item in ("private", "absent")]
        page.close()
        assert seen == [["error"], ["error"]], seen
        own, _ = visit(browser, api + "/")
        assert own.evaluate(probe, thumbnail.format("private")) == ["loaded", 256, 102]
        own.close()
