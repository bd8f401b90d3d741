"""What a web page may make the HTTP API do, over real HTTP: Host names (DNS rebinding: 421), Origins (cross-site
writes: 403, CORS for configured front ends) and body types (a write without application/json or another type its
endpoint reads: 415). tests/test_web_origin.py runs the same attacks from a real browser."""

from __future__ import annotations

import httpx
import pytest
from serving import running_server

from embedsvc.errors import InvalidInput
from embedsvc.service.config import ServerConfig, load_config
from embedsvc.service.http import BrowserGuard

FRONT_END = "https://app.example.com"  # a configured CORS origin


def bare_config(data_dir, **overrides) -> ServerConfig:
    """A server with no model: vector collections only, quick to start."""
    settings = {
        "listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "data_dir": str(data_dir),
        "metrics_port": -1,
        "demo_size": 0,
        "preload_models": "",
        "log_format": "text",
    }
    settings.update(overrides)
    return ServerConfig(**settings)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = bare_config(
        tmp_path_factory.mktemp("origin"),
        http_cors_origins=FRONT_END + ", http://localhost:3000",
        http_allowed_hosts="api.example.com, .corp.example",
    )
    with running_server(config) as srv, httpx.Client(base_url=srv.http_url, timeout=30) as http:
        assert http.post("/v1/collections", json={"config": {"name": "v", "dim": 3}}).status_code == 200
        upsert = {"items": [{"id": f"i{k}", "vector": {"values": [1, k, 0]}} for k in range(5)]}
        assert http.post("/v1/collections/v/items", json=upsert).status_code == 200
        yield srv, http


def refusal(response: httpx.Response, status: int, code: str, *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message"} and body["code"] == code, body
    assert all(w.lower() in body["message"].lower() for w in words), body["message"]
    return body["message"]


def names(http: httpx.Client) -> set[str]:
    return {c["config"]["name"] for c in http.get("/v1/collections").json()["collections"]}


def ids(http: httpx.Client) -> set[str]:
    found = http.post("/v1/collections/v/get", json={"ids": [f"i{k}" for k in range(5)]}).json()["items"]
    return {item["id"] for item in found}


# -- Content-Type -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_write_without_a_json_type_is_415_and_changes_nothing(server, kind):
    srv, http = server
    headers = {"content-type": kind} if kind else {}
    before = ids(http)
    message = refusal(
        http.post("/v1/collections", content=b'{"config": {"name": "sneaky", "dim": 3}}', headers=headers),
        415,
        "INVALID_ARGUMENT",
        "application/json",
    )
    assert (repr(kind) if kind else "no content-type") in message.lower()
    refusal(
        http.post("/v1/collections/v/delete", content=b'{"ids": ["i1"]}', headers=headers),
        415,
        "INVALID_ARGUMENT",
        "application/json",
    )
    assert "sneaky" not in names(http) and ids(http) == before


@pytest.mark.parametrize(
    "path, kind, allowed",
    [
        ("/v1/embed", "application/x-ndjson", "application/json"),
        ("/v1/collections/v/items", "multipart/form-data; boundary=x", "application/x-ndjson"),
        ("/v1/collections/v/get", "multipart/form-data; boundary=x", "application/json"),
        ("/v1/collections/v/search", "application/x-ndjson", "multipart/form-data"),
        ("/v1/collections/v/fit", "application/x-ndjson", "application/json"),  # was a 500: lines parsed as items
    ],
)
def test_each_endpoint_reads_only_its_documented_types(server, path, kind, allowed):
    srv, http = server
    refusal(http.post(path, content=b"{}", headers={"content-type": kind}), 415, "INVALID_ARGUMENT", allowed)


def test_documented_types_still_pass(server):
    srv, http = server
    line = b'{"id": "n1", "vector": {"values": [0, 1, 0]}}\n'
    assert (
        http.post("/v1/collections/v/items", content=line, headers={"content-type": "application/x-ndjson"}).json()[
            "inserted"
        ]
        == "1"
    )
    assert (
        http.post(
            "/v1/collections/v/get",
            content=b'{"ids": ["n1"]}',
            headers={"content-type": "application/json; charset=utf-8"},
        ).json()["items"][0]["id"]
        == "n1"
    )
    assert (
        http.post(
            "/v1/collections/v/delete",
            content=b'{"ids": ["n1"]}',
            headers={"content-type": "application/vnd.embedsvc+json"},
        ).json()["deleted"]
        == "1"
    )
    found = http.post(
        "/v1/collections/v/search",
        data={"request": '{"queries": [{"vector": {"values": [1, 0, 0]}}], "topK": 1}'},
        files={"none": ("x", b"")},
    )
    assert found.json()["results"][0]["hits"][0]["id"] == "i0"
    # A DELETE has no body to type: it passes without one (browsers preflight every DELETE across origins).
    assert http.post("/v1/collections", json={"config": {"name": "gone", "dim": 2}}).status_code == 200
    assert http.delete("/v1/collections/gone").json() == {"itemsRemoved": "0"}
    refusal(http.post("/v1/nothing", content=b"{}"), 404, "NOT_FOUND")  # no route: 404, whatever the type


# -- Host -------------------------------------------------------------------------------------------------------


def test_a_rebound_host_name_gets_421_and_probes_stay_open(server):
    srv, http = server
    port = srv.server.http_port
    rebound = {"host": f"attacker.example:{port}"}
    refusal(
        http.get("/v1/collections", headers=rebound), 421, "PERMISSION_DENIED", "attacker.example", "http_allowed_hosts"
    )
    refusal(
        http.post("/v1/collections", json={"config": {"name": "rebound", "dim": 3}}, headers=rebound),
        421,
        "PERMISSION_DENIED",
    )
    refusal(http.get("/", headers=rebound), 421, "PERMISSION_DENIED")  # the page too: it would run as their origin
    assert "rebound" not in names(http)
    for probe in ("/healthz", "/readyz"):  # orchestrators probe by whatever name they know the pod by
        assert http.get(probe, headers=rebound).status_code == 200


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",
        "LOCALHOST.",
        "[::1]",
        "10.1.2.3",
        "api.example.com",
        "corp.example",
        "a.b.corp.example",
    ],
)
def test_ip_literals_localhost_and_configured_names_are_answered(server, host):
    srv, http = server
    assert http.get("/v1/collections", headers={"host": f"{host}:{srv.server.http_port}"}).status_code == 200


@pytest.mark.parametrize("host", ["example.com", "api.example.com.evil", "evilcorp.example", "localhost.evil"])
def test_other_names_are_not(server, host):
    srv, http = server
    refusal(http.get("/v1/collections", headers={"host": host}), 421, "PERMISSION_DENIED", host)


def test_the_listen_name_is_answered():
    guard = BrowserGuard(None, ServerConfig(http_listen="embed.internal:8080"), lambda scope: None)
    assert guard.host_allowed("embed.internal") and not guard.host_allowed("other.internal")


def test_star_answers_every_name(tmp_path):
    with running_server(bare_config(tmp_path / "a", http_allowed_hosts="*")) as srv:
        assert httpx.get(srv.http_url + "/v1/collections", headers={"host": "any.name.example"}).status_code == 200


# -- Origin and CORS --------------------------------------------------------------------------------------------


def test_a_write_from_another_origin_is_403_and_a_read_gets_no_cors_headers(server):
    srv, http = server
    evil = {"origin": "http://evil.example"}
    before = ids(http)
    refusal(
        http.post("/v1/collections", json={"config": {"name": "evil", "dim": 3}}, headers=evil),
        403,
        "PERMISSION_DENIED",
        "http://evil.example",
        "http_cors_origins",
    )
    refusal(http.post("/v1/collections/v/delete", json={"ids": ["i1"]}, headers=evil), 403, "PERMISSION_DENIED")
    refusal(http.delete("/v1/collections/v", headers=evil), 403, "PERMISSION_DENIED")
    preflight = http.options(
        "/v1/collections/v/delete",
        headers={**evil, "access-control-request-method": "POST", "access-control-request-headers": "content-type"},
    )
    refusal(preflight, 403, "PERMISSION_DENIED")
    assert "access-control-allow-origin" not in preflight.headers
    read = http.get("/v1/collections", headers=evil)
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
    assert "evil" not in names(http) and ids(http) == before


def test_the_servers_own_page_may_write(server):
    """The search page posts its searches with an Origin of the Host it was loaded from (any scheme: a proxy
    that ends TLS keeps the Host)."""
    srv, http = server
    port = srv.server.http_port
    for origin, host in (
        (f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"),
        (f"http://localhost:{port}", f"localhost:{port}"),
        ("https://api.example.com", "api.example.com"),
    ):
        response = http.post("/v1/collections/v/get", json={"ids": ["i1"]}, headers={"origin": origin, "host": host})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers, origin
    refusal(
        http.post(
            "/v1/collections/v/get",
            json={"ids": ["i1"]},  # another port is another origin
            headers={"origin": f"http://127.0.0.1:{port + 1}"},
        ),
        403,
        "PERMISSION_DENIED",
    )


def test_a_configured_origin_gets_cors_answers_and_may_write(server):
    srv, http = server
    preflight = http.options(
        "/v1/collections",
        headers={
            "origin": FRONT_END,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization,content-type",
        },
    )
    assert preflight.status_code == 204, preflight.text
    assert preflight.headers["access-control-allow-origin"] == FRONT_END
    assert {"POST", "DELETE", "GET"} <= {
        m.strip() for m in preflight.headers["access-control-allow-methods"].split(",")
    }
    allowed_headers = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed_headers
    assert int(preflight.headers["access-control-max-age"]) > 0 and "origin" in preflight.headers["vary"].lower()
    created = http.post(
        "/v1/collections", json={"config": {"name": "friendly", "dim": 3}}, headers={"origin": FRONT_END}
    )
    assert created.status_code == 200 and created.headers["access-control-allow-origin"] == FRONT_END
    assert "origin" in created.headers["vary"].lower() and "friendly" in names(http)
    wrong_type = http.post(
        "/v1/collections/friendly/delete",
        content=b"{}",  # its errors are readable too
        headers={"origin": FRONT_END, "content-type": "text/plain"},
    )
    refusal(wrong_type, 415, "INVALID_ARGUMENT")
    assert wrong_type.headers["access-control-allow-origin"] == FRONT_END
    dropped = http.delete("/v1/collections/friendly", headers={"origin": "http://localhost:3000"})
    assert dropped.status_code == 200 and dropped.headers["access-control-allow-origin"] == "http://localhost:3000"
    plain = http.get("/v1/collections")  # no Origin: no CORS header, but caches learn the answer varies by Origin
    assert "access-control-allow-origin" not in plain.headers and plain.headers["vary"] == "Origin"


def test_openapi_lists_the_refusals(server):
    srv, http = server
    paths = http.get("/openapi.json").json()["paths"]
    assert {"415", "421", "403"} <= set(paths["/v1/collections"]["post"]["responses"])
    assert (
        "421" in paths["/v1/collections"]["get"]["responses"]
        and "415" not in paths["/v1/collections"]["get"]["responses"]
    )


def test_star_allows_every_origin(tmp_path):
    with running_server(bare_config(tmp_path / "a", http_cors_origins="*")) as srv:
        response = httpx.post(
            srv.http_url + "/v1/collections",
            json={"config": {"name": "c", "dim": 2}},
            headers={"origin": "https://anywhere.example"},
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://anywhere.example"


# -- configuration ----------------------------------------------------------------------------------------------


def test_the_lists_come_from_the_environment_normalised():
    config = load_config(
        env={
            "EMBEDSVC_HTTP_ALLOWED_HOSTS": " API.Example.com, .corp.example ,",
            "EMBEDSVC_HTTP_CORS_ORIGINS": "HTTPS://App.Example.com:443,http://localhost:3000",
        }
    )
    assert config.allowed_hosts == ("api.example.com", ".corp.example")
    assert config.cors_origins == ("https://app.example.com", "http://localhost:3000")  # as browsers send them


@pytest.mark.parametrize(
    "setting, value, words",
    [
        ("http_allowed_hosts", "https://api.example.com", "not a host name"),
        ("http_allowed_hosts", "api.example.com:8080", "without scheme or port"),
        ("http_cors_origins", "https://app.example.com/", "no path"),
        ("http_cors_origins", "app.example.com", "scheme://host"),
        ("http_cors_origins", "null", "not an origin"),
    ],
)
def test_bad_entries_stop_start_up_with_the_fix(setting, value, words):
    with pytest.raises(InvalidInput, match=f"config {setting}: .*{words}"):
        load_config(env={f"EMBEDSVC_{setting.upper()}": value})


@pytest.mark.parametrize("folder", ["k8s", "k8s-milvus"])
def test_the_kubernetes_service_is_answered_by_its_names(folder):
    from test_deploy import env_config, k8s

    docs = k8s(folder)
    guard = BrowserGuard(None, env_config(docs["ConfigMap"]["data"]), lambda scope: None)
    name = docs["Service"]["metadata"]["name"]
    for host in (name, f"{name}.search.svc", f"{name}.search.svc.cluster.local"):
        assert guard.host_allowed(host), host
    assert not guard.host_allowed("attacker.example")
