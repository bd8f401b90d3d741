"""deploy/: the manifests are well-formed and agree with each other and with the server's config."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from embedsvc.service.auth import load_tokens
from embedsvc.service.config import ServerConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
FIELDS = {f.name for f in dataclasses.fields(ServerConfig)}


def k8s(folder: str = "k8s") -> dict[str, dict]:
    docs = {}
    for path in sorted((DEPLOY / folder).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path
            docs[doc["kind"]] = doc
    return docs


def env_config(env: dict) -> ServerConfig:
    unknown = [k for k in env if k.startswith("EMBEDSVC_") and k[9:].lower() not in FIELDS]
    assert not unknown, f"not config settings: {unknown}"
    return load_config(env=env)


def service_ports(config: ServerConfig) -> dict[str, int]:
    """The ports a deployment must publish: gRPC, the HTTP API and page, metrics."""
    return {
        "grpc": int(config.listen.rsplit(":", 1)[1]),
        "http": int(config.http_listen.rsplit(":", 1)[1]),
        "metrics": config.metrics_port,
    }


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfiles_match_config(name):
    text = (DEPLOY / name).read_text()
    env = dict(re.findall(r"(EMBEDSVC_\w+)=(\S+)", text))
    config = env_config(env)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}
    assert exposed == set(service_ports(config).values())
    assert config.listen.startswith("0.0.0.0:") and config.http_listen.startswith("0.0.0.0:")  # reachable from outside
    defaults = ServerConfig()  # same ports as a bare `embedsvc serve`
    assert config.listen.rsplit(":", 1)[1] == defaults.listen.rsplit(":", 1)[1]
    assert config.metrics_port == defaults.metrics_port
    assert config.http_listen.rsplit(":", 1)[1] == defaults.http_listen.rsplit(":", 1)[1]
    assert re.search(r'^ENTRYPOINT \["embedsvc", "serve"\]$', text, re.M)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["embedsvc"] == "embedsvc.cli:main"
    assert "nvidia/cuda" in text if name.endswith("gpu") else "python:3.11" in text
    assert f"VOLUME {config.data_dir}" in text


def test_kubernetes_manifests_agree():
    docs = k8s()
    assert set(docs) == {"ConfigMap", "Secret", "PersistentVolumeClaim", "Deployment", "Service"}
    config = env_config(docs["ConfigMap"]["data"])
    assert load_tokens(inline=docs["Secret"]["stringData"]["EMBEDSVC_AUTH_TOKENS"])
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == service_ports(config)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert refs == {docs["ConfigMap"]["metadata"]["name"], docs["Secret"]["metadata"]["name"]}
    mount = container["volumeMounts"][0]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert mount["mountPath"] == config.data_dir
    service = docs["Service"]["spec"]
    assert {p["targetPort"] for p in service["ports"]} == set(ports)
    assert service["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_compose_and_prometheus_agree():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    service = compose["services"]["embedsvc"]
    text = (DEPLOY / service["build"]["dockerfile"].split("/")[-1]).read_text()
    config = env_config(
        {
            **dict(re.findall(r"(EMBEDSVC_\w+)=(\S+)", text)),
            **{k: v for k, v in service["environment"].items() if k != "EMBEDSVC_AUTH_TOKENS_FILE"},
        }
    )
    assert "EMBEDSVC_AUTH_TOKENS_FILE" in service["environment"]
    assert load_tokens(str(DEPLOY / compose["secrets"]["embedsvc_tokens"]["file"]))
    assert any(v.endswith(":" + config.data_dir) for v in service["volumes"])
    published = {int(p.split(":")[1]) for p in service["ports"]}
    assert published == set(service_ports(config).values())
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"embedsvc:{config.metrics_port}"]


def test_compose_with_milvus_standalone_and_two_replicas():
    compose = yaml.safe_load((DEPLOY / "docker-compose.milvus.yml").read_text())
    services = compose["services"]
    assert set(services) == {"etcd", "minio", "standalone", "embedsvc"}
    milvus = services["standalone"]
    assert milvus["image"].startswith("milvusdb/milvus:v2.") and milvus["command"] == ["milvus", "run", "standalone"]
    assert (
        milvus["environment"]["ETCD_ENDPOINTS"] == "etcd:2379"
        and milvus["environment"]["MINIO_ADDRESS"] == "minio:9000"
    )
    assert "-listen-client-urls http://0.0.0.0:2379" in services["etcd"]["command"]
    assert "minio server" in services["minio"]["command"]
    embedsvc = services["embedsvc"]
    assert embedsvc["deploy"]["replicas"] == 2 and "ports" not in embedsvc  # two containers, one service name
    env = {k: v for k, v in embedsvc["environment"].items() if k != "EMBEDSVC_AUTH_TOKENS_FILE"}
    text = (DEPLOY / embedsvc["build"]["dockerfile"].split("/")[-1]).read_text()
    config = env_config({**dict(re.findall(r"(EMBEDSVC_\w+)=(\S+)", text)), **env})
    assert config.store_backend == "milvus" and config.demo_size == 0
    host, port = config.milvus_uri.removeprefix("http://").split(":")
    assert host == "standalone" and f"{port}:{port}" in milvus["ports"] and port == "19530"
    assert embedsvc["depends_on"]["standalone"]["condition"] == "service_healthy"
    assert {int(p) for p in embedsvc["expose"]} == set(service_ports(config).values())
    assert "volumes" not in embedsvc  # stateless: nothing to keep
    assert load_tokens(str(DEPLOY / compose["secrets"]["embedsvc_tokens"]["file"]))


def test_kubernetes_milvus_variant_is_stateless_and_autoscaled():
    docs = k8s("k8s-milvus")
    assert set(docs) == {"ConfigMap", "Secret", "Deployment", "Service", "HorizontalPodAutoscaler"}
    config = env_config(
        {**docs["ConfigMap"]["data"], "EMBEDSVC_MILVUS_TOKEN": docs["Secret"]["stringData"]["EMBEDSVC_MILVUS_TOKEN"]}
    )
    assert config.store_backend == "milvus" and config.milvus_token
    assert load_tokens(inline=docs["Secret"]["stringData"]["EMBEDSVC_AUTH_TOKENS"])
    deployment = docs["Deployment"]
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert "volumes" not in pod and "volumeMounts" not in container
    refs = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert refs == {docs["ConfigMap"]["metadata"]["name"], docs["Secret"]["metadata"]["name"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == service_ports(config)
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["minReplicas"] == deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    service = docs["Service"]["spec"]
    assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in service["ports"]} == set(ports)
    # Milvus comes from its own chart: the URI names the release and namespace the install command creates.
    helm = (DEPLOY / "k8s-milvus" / "helm" / "README.md").read_text()
    release, namespace = re.search(r"helm install (\S+) zilliztech/milvus --namespace (\S+)", helm).groups()
    assert config.milvus_uri == f"http://{release}.{namespace}.svc.cluster.local:19530"
    assert yaml.safe_load((DEPLOY / "k8s-milvus" / "helm" / "milvus-values.yaml").read_text())["cluster"]["enabled"]
    assert not list((DEPLOY / "k8s-milvus").rglob("Chart.yaml"))  # referenced, not vendored
