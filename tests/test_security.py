"""API tokens with scopes on every RPC; health and reflection open; TLS and mutual TLS."""

from __future__ import annotations

import datetime
import json

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import running_server

from embedsvc.client import Client, EmbedsvcClientError, Item
from embedsvc.service.config import ServerConfig
from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc

READ, WRITE, BOTH = "r" * 24, "w" * 24, "b" * 24

# Every RPC, with a request that would succeed given the right scope, and the scope it needs.
CALLS = {
    "Embed": ("read", lambda s: s["embed"].Embed(pb.EmbedRequest(inputs=[pb.Content(text="x")]), **s["kw"])),
    "ListModels": ("read", lambda s: s["embed"].ListModels(pb.ListModelsRequest(), **s["kw"])),
    "GetCollection": ("read", lambda s: s["index"].GetCollection(pb.GetCollectionRequest(name="v"), **s["kw"])),
    "ListCollections": ("read", lambda s: s["index"].ListCollections(pb.ListCollectionsRequest(), **s["kw"])),
    "Get": ("read", lambda s: s["index"].Get(pb.GetRequest(collection="v", ids=["a"]), **s["kw"])),
    "Search": (
        "read",
        lambda s: s["index"].Search(
            pb.SearchRequest(collection="v", queries=[pb.Query(vector=pb.Vector(values=[1, 0, 0]))]), **s["kw"]
        ),
    ),
    "CreateCollection": (
        "write",
        lambda s: s["index"].CreateCollection(
            pb.CreateCollectionRequest(config=pb.CollectionConfig(name=f"new{np.random.randint(1 << 30)}", dim=3)),
            **s["kw"],
        ),
    ),
    "DropCollection": ("write", lambda s: s["index"].DropCollection(pb.DropCollectionRequest(name="gone"), **s["kw"])),
    "Upsert": (
        "write",
        lambda s: s["index"].Upsert(
            iter([pb.UpsertRequest(collection="v", items=[pb.UpsertItem(id="a", vector=pb.Vector(values=[1, 0, 0]))])]),
            **s["kw"],
        ),
    ),
    "Delete": ("write", lambda s: s["index"].Delete(pb.DeleteRequest(collection="v", ids=["zz"]), **s["kw"])),
    "FitPooling": ("write", lambda s: s["index"].FitPooling(iter([pb.FitPoolingRequest(collection="v")]), **s["kw"])),
}


@pytest.fixture(scope="module")
def server(make_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("auth")
    tokens = folder / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "tokens": [
                    {"name": "reader", "token": READ, "scopes": ["read"]},
                    {"name": "writer", "token": WRITE, "scopes": ["write"]},
                ]
            }
        )
    )
    s = make_server(
        bundled=True,
        data_dir=folder / "d",
        auth_tokens_file=str(tokens),
        auth_tokens=json.dumps({"tokens": [{"name": "admin", "token": BOTH, "scopes": ["read", "write"]}]}),
    )
    with Client(s.address, token=BOTH) as admin:
        admin.create_collection("v", dim=3)
        admin.upsert("v", [Item("a", vector=[1, 0, 0])])
    return s


def stubs(address: str, token: str | None):
    channel = grpc.insecure_channel(address)
    kw = {"timeout": 30, "metadata": (("authorization", f"Bearer {token}"),) if token else ()}
    return {
        "embed": pb_grpc.EmbedServiceStub(channel),
        "index": pb_grpc.IndexServiceStub(channel),
        "kw": kw,
        "channel": channel,
    }


@pytest.mark.parametrize("method", sorted(CALLS))
def test_every_rpc_checks_token_and_scope(server, method):
    scope, call = CALLS[method]
    for token, code in (
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("x" * 24, grpc.StatusCode.UNAUTHENTICATED),
        (WRITE if scope == "read" else READ, grpc.StatusCode.PERMISSION_DENIED),
    ):
        s = stubs(server.address, token)
        with pytest.raises(grpc.RpcError) as info:
            call(s)
        assert info.value.code() == code, (method, token, info.value.details())
        s["channel"].close()
    s = stubs(server.address, READ if scope == "read" else WRITE)
    try:
        call(s)  # the right scope gets through to the service (which may still refuse the request itself)
    except grpc.RpcError as exc:
        assert exc.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), exc.details()
    s["channel"].close()


def test_health_and_reflection_stay_open(server):
    channel = grpc.insecure_channel(server.address)
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    assert any(r.list_services_response.service for r in responses)
    channel.close()


def test_client_token_and_typed_errors(server):
    with Client(server.address, token=READ) as reader:
        assert reader.search("v", vector=np.array([1, 0, 0]), top_k=1)[0].id == "a"
        with pytest.raises(EmbedsvcClientError) as info:
            reader.delete("v", ["a"])
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED and "lacks the 'write' scope" in info.value.details


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"tokens": [{"name": "x", "token": "short", "scopes": ["read"]}]}', "at least 16"),
        ('{"tokens": [{"name": "x", "token": "' + "k" * 20 + '", "scopes": ["admin"]}]}', "scopes must be"),
        ('{"nope": 1}', "expected"),
    ],
)
def test_bad_token_files(tmp_path, content, message):
    from embedsvc.errors import InvalidInput
    from embedsvc.service.auth import load_tokens

    path = tmp_path / "t.json"
    path.write_text(content)
    with pytest.raises(InvalidInput, match=message):
        load_tokens(str(path))


# -- TLS ----------------------------------------------------------------------------------------------


def _certificates(folder):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def make(name, issuer_cert=None, issuer_key=None, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_cert.subject if issuer_cert else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        return cert, key

    import ipaddress

    ca, ca_key = make("embedsvc test CA", ca=True)
    server, server_key = make(
        "localhost", ca, ca_key, san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    client, client_key = make("client", ca, ca_key)
    paths = {}
    for name, obj in (("ca", ca), ("server", server), ("client", client)):
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    for name, key in (("server_key", server_key), ("client_key", client_key)):
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return {k: str(v) for k, v in paths.items()}


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tls_and_mutual_tls(tmp_path, mutual):
    pytest.importorskip("cryptography")
    certs = _certificates(tmp_path)
    config = ServerConfig(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path / "d"),
        metrics_port=-1,
        demo_size=0,
        log_format="text",
        tls_cert_file=certs["server"],
        tls_key_file=certs["server_key"],
        tls_client_ca_file=certs["ca"] if mutual else "",
    )
    with running_server(config) as server:
        extra = {"cert_file": certs["client"], "key_file": certs["client_key"]} if mutual else {}
        with Client(server.address, ca_file=certs["ca"], timeout=20, **extra) as client:
            client.create_collection("t", dim=2)
            assert client.get_collection("t").dim == 2
        with Client(server.address, timeout=5) as plain:  # no TLS: refused
            with pytest.raises(EmbedsvcClientError) as info:
                plain.list_collections()
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        if mutual:
            with Client(server.address, ca_file=certs["ca"], timeout=5) as no_cert:
                with pytest.raises(EmbedsvcClientError) as info:
                    no_cert.list_collections()
                assert info.value.code == grpc.StatusCode.UNAVAILABLE
