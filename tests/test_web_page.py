"""The search page in a real browser: Debian's Chromium driven by Playwright against a real server with the
demo collection (bundled model) and the same scenes under two more poolings for the compare view.

EMBEDSVC_SCREENSHOTS=1 also writes docs/search-page.png and docs/compare-view.png from these runs.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import httpx
import pytest
from serving import running_server

from embedsvc.datasets import full_caption, generate_scene, render_scene
from embedsvc.pooling import PoolingSpec
from embedsvc.service.config import ServerConfig
from embedsvc.service.server import index_scenes

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DOCS = Path(__file__).resolve().parents[1] / "docs"
TOKEN = "t" * 24

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium); .ci/run installs it",
    ),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


def demo_config(data_dir, **overrides) -> ServerConfig:
    settings = {
        "listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "data_dir": str(data_dir),
        "metrics_port": -1,
        "demo_size": 60,
        "log_format": "text",
    }
    settings.update(overrides)
    return ServerConfig(**settings)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    with running_server(demo_config(tmp_path_factory.mktemp("web")), demo=True) as srv:
        for pooling in ("avg", "max"):
            srv.call(index_scenes(srv.server.engine, f"scenes-{pooling}", 60, PoolingSpec(pooling)))
        yield srv


def page_of(browser, url: str):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.route("http*://**", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())
    page.goto(url + "/")
    # The page lists the collections after it loads; a search typed before that finds none to search (this
    # raced on a busy machine: "Pick a collection first." and no hits).
    page.wait_for_selector("body[data-collections=listed]", state="attached")
    return page


def hits(page, column: str = "") -> list[str]:
    return page.locator(f"section.column{column} .hit").evaluate_all("els => els.map(e => e.dataset.id)")


def screenshot(page, name: str) -> None:
    if os.environ.get("EMBEDSVC_SCREENSHOTS") == "1":
        from PIL import Image

        image = Image.open(io.BytesIO(page.screenshot(full_page=False))).convert("RGB")
        image.quantize(colors=128).save(DOCS / name, optimize=True)


def api_search(srv, collection: str, query: dict, top_k: int = 12, **extra) -> list[tuple[str, float]]:
    reply = httpx.post(
        f"{srv.http_url}/v1/collections/{collection}/search",
        json={"queries": [query], "topK": top_k, **extra},
        timeout=60,
    ).json()
    return [(h["id"], h["score"]) for h in reply["results"][0]["hits"]]


def test_a_text_query_shows_the_expected_first_hit(browser, demo):
    scene = generate_scene("val", 7)
    query = full_caption(scene)
    expected = api_search(demo, "scenes", {"text": query})
    assert expected[0][0] == scene.id  # the bundled model finds the scene its caption describes
    page = page_of(browser, demo.http_url)
    page.keyboard.press("/")  # the keyboard shortcut focuses the text box
    page.keyboard.type(query)
    page.keyboard.press("Enter")
    page.wait_for_selector("section.column .hit img")
    assert hits(page) == [i for i, _ in expected]
    first = page.locator("section.column .hit").first
    assert first.locator(".score").inner_text() == f"{expected[0][1]:.4f}"
    assert "caption" in first.inner_text()  # metadata shown with the hit
    assert first.locator("img").evaluate("img => img.naturalWidth") > 0  # the stored thumbnail, loaded
    screenshot(page, "search-page.png")
    # "More like this" by keyboard: focus the second hit and press Enter.
    second = page.locator("section.column .hit").nth(1)
    second_id = second.get_attribute("data-id")
    second.focus()
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.getElementById('status').textContent.includes('more like {second_id}')")
    page.wait_for_selector("section.column .hit")
    assert hits(page) == [i for i, _ in api_search(demo, "scenes", {"id": second_id})]
    assert second_id not in hits(page)
    # A metadata filter narrows the grid.
    page.fill("#filter", "objects>=3")
    page.click("button[type=submit]")
    page.wait_for_function("document.getElementById('status').textContent.includes('filtered')")
    objects = page.locator("section.column .hit dl").evaluate_all(
        "dls => dls.map(dl => [...dl.querySelectorAll('dt')].find(dt => dt.textContent === 'objects')"
        ".nextElementSibling.textContent)"
    )
    assert objects and all(float(n) >= 3 for n in objects)
    assert hits(page) == [
        i
        for i, _ in api_search(
            demo, "scenes", {"id": second_id}, filter={"must": [{"key": "objects", "range": {"gte": 3}}]}
        )
    ]
    page.close()


def _scene_metadata(index: int) -> dict:
    scene = generate_scene("val", index)
    return {
        "objects": len(scene.objects),
        "colours": " ".join(sorted({o.colour for o in scene.objects})),
        "shapes": " ".join(sorted({o.shape for o in scene.objects})),
    }


PAGE_FILTERS = {
    "objects>2": lambda m: m["objects"] > 2,
    "objects<2": lambda m: m["objects"] < 2,
    "objects>=2 objects<=3": lambda m: 2 <= m["objects"] <= 3,
    "objects > 1": None,  # spaces around the operator: refused, as by the CLI
    "shapes=circle|square objects<3": lambda m: m["shapes"] in ("circle", "square") and m["objects"] < 3,
    "objects=>2": None,
    "objects=": None,
    "objects!=2": None,
}


def test_the_page_applies_the_cli_grammar(browser, demo):
    """Every text of the table gives, on the page, exactly the scenes a plain reading of their metadata selects
    (the same text the CLI and `filterText` take: the server parses it, one parser); text that does not parse
    shows INVALID_ARGUMENT with the accepted forms; a key no item holds is said, not an empty grid alone."""
    metadata = {generate_scene("val", i).id: _scene_metadata(i) for i in range(60)}
    query = full_caption(generate_scene("val", 3))
    page = page_of(browser, demo.http_url)
    page.fill("#top-k", "60")
    for text, selects in PAGE_FILTERS.items():
        page.fill("#filter", text)
        page.fill("#text", query)
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('section.column .hit, section.column p')")
        if selects is None:
            error = page.locator("section.column p.error").inner_text()
            assert "INVALID_ARGUMENT" in error, (text, error)
            assert all(form in error for form in ("KEY=A|B", "KEY>X", "KEY<=X")), (text, error)
            continue
        expected = {i for i, m in metadata.items() if selects(m)}
        assert expected and set(hits(page)) == expected, text
        assert hits(page) == [i for i, _ in api_search(demo, "scenes", {"text": query}, top_k=60, filterText=text)]
    page.fill("#filter", "object>=2")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('section.column p')")
    note = page.locator("section.column p").inner_text()
    assert hits(page) == [] and "'object'" in note and "no item" in note, note
    page.close()


def test_an_image_upload_finds_that_image_first(browser, demo, tmp_path):
    scene = generate_scene("val", 11)
    picture = tmp_path / "query.png"
    render_scene(scene, 128).save(picture)
    page = page_of(browser, demo.http_url)
    page.set_input_files("#image", str(picture))
    page.wait_for_function("document.getElementById('status').textContent.includes('image query.png')")
    page.wait_for_selector("section.column .hit")
    assert hits(page)[0] == scene.id
    assert float(page.locator("section.column .hit .score").first.inner_text()) > 0.9
    # Dropped on the drop zone instead: the same search.
    other = generate_scene("val", 12)
    buffer = io.BytesIO()
    render_scene(other, 128).save(buffer, format="PNG")
    page.evaluate(
        """(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""",
        base64.b64encode(buffer.getvalue()).decode(),
    )
    page.wait_for_function("document.getElementById('status').textContent.startsWith('image dropped.png')")
    assert hits(page)[0] == other.id
    page.close()


def test_the_compare_view_renders_one_column_per_collection(browser, demo):
    query = full_caption(generate_scene("val", 14))
    page = page_of(browser, demo.http_url)
    page.check("#compare")
    for box in page.locator("#compare-list input").all():  # the scenes under each pooling, nothing else
        box.set_checked((box.get_attribute("value") or "").startswith("scenes"))
    assert page.locator("#compare-list input:checked").count() == 3
    page.fill("#text", query)
    page.keyboard.press("Enter")
    page.wait_for_function(
        "document.querySelectorAll('section.column').length === 3 && "
        "[...document.querySelectorAll('section.column')].every(c => c.querySelector('.hit img'))"
    )
    columns = page.locator("section.column").evaluate_all("els => els.map(e => e.dataset.collection)")
    assert sorted(columns) == ["scenes", "scenes-avg", "scenes-max"]
    for name in columns:
        assert hits(page, f"[data-collection='{name}']") == [i for i, _ in api_search(demo, name, {"text": query})]
    assert len({tuple(hits(page, f"[data-collection='{n}']")) for n in columns}) > 1  # poolings differ
    screenshot(page, "compare-view.png")
    page.close()


def test_a_protected_server_asks_for_a_token(browser, tmp_path):
    tokens = json.dumps({"tokens": [{"name": "viewer", "token": TOKEN, "scopes": ["read"]}]})
    with running_server(demo_config(tmp_path, demo_size=12, auth_tokens=tokens), demo=True) as srv:
        page = page_of(browser, srv.http_url)
        page.evaluate("sessionStorage.clear()")
        page.reload()
        message = page.locator("#message")
        message.wait_for(state="visible")
        assert "requires an API token" in message.inner_text() and "UNAUTHENTICATED" not in message.inner_text()
        page.fill("#token", TOKEN)
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('collection').options.length === 1")
        assert message.is_hidden()
        page.fill("#text", "a red square")
        page.keyboard.press("Enter")
        page.wait_for_selector("section.column .hit img")  # thumbnails load with the token too
        page.close()


def test_items_without_thumbnails_show_their_uri(browser, demo):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 40, 40)).save(buffer, format="PNG")  # metadata strings hold 4 KiB at most
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    base = demo.http_url + "/v1/collections"
    assert httpx.post(base, json={"config": {"name": "linked"}}, timeout=60).status_code == 200
    httpx.post(
        base + "/linked/items",
        json={
            "items": [
                {
                    "id": "with-uri",
                    "content": {"text": "a picture elsewhere"},
                    "metadata": {"uri": {"stringValue": uri}},
                },
                {"id": "bare", "content": {"text": "no picture at all"}},
            ]
        },
        timeout=60,
    ).raise_for_status()
    page = page_of(browser, demo.http_url)
    page.select_option("#collection", "linked")
    page.fill("#text", "a picture elsewhere")
    page.keyboard.press("Enter")
    page.wait_for_selector(".hit[data-id='with-uri'] img")
    assert page.locator(".hit[data-id='with-uri'] img").get_attribute("src") == uri
    assert page.locator(".hit[data-id='bare'] .placeholder").inner_text() == "bare"
    page.close()


def test_the_docs_page_renders_the_openapi_offline(browser, demo):
    from embedsvc.service.http import ENDPOINTS

    page = browser.new_page()
    page.route("http*://**", lambda r: r.continue_() if r.request.url.startswith(demo.http_url) else r.abort())
    page.goto(demo.http_url + "/docs")
    page.wait_for_function("document.querySelectorAll('#endpoints details').length > 0")
    summaries = page.locator("#endpoints summary").all_inner_texts()
    assert len(summaries) >= len(ENDPOINTS) + 3  # every RPC, the thumbnail and the two probes
    assert any("/v1/collections/{name}/search" in s for s in summaries)
    assert page.locator("#schema-SearchRequest").count() == 1
    page.close()
