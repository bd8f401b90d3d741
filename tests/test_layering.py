"""Layers import downward only; the core never imports grpc; the client never imports the server.

ALLOWED is the whole picture, one row per package or top-level module of embedsvc: what it may import of
embedsvc besides itself. `service` (gRPC and HTTP) and `jobs` both sit on `engine`; only `cli` and `service`
import `service`; `jobs` and `training` never import a server transport (grpc, starlette, ...). Jobs reach a
running server only through the client, as any user does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "embedsvc"
CORE = ("models", "encoder", "pooling", "store")
FORBIDDEN_FOR_CORE = (
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "embedsvc.service",
    "embedsvc.client",
    "embedsvc.cli",
    "embedsvc.v1",
    "starlette",
    "uvicorn",
    "multipart",
    "httpx",
)


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", CORE)
def test_core_never_imports_grpc_or_upper_layers(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        bad = {n for n in imports(path) if n.split(".")[0] in FORBIDDEN_FOR_CORE or n.startswith(FORBIDDEN_FOR_CORE)}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_pooling_is_below_encoder():
    for path in (PACKAGE / "pooling").rglob("*.py"):
        assert not {n for n in imports(path) if n.startswith(("embedsvc.encoder", "embedsvc.store"))}, path


def test_client_imports_only_generated_code_and_itself():
    for path in (PACKAGE / "client").rglob("*.py"):
        own = {n for n in imports(path) if n.startswith("embedsvc")}
        # embedsvc.spec_text: the pooling spec's text form, a leaf the server's registry reads with the same code.
        assert all(n.startswith(("embedsvc.v1", "embedsvc.client", "embedsvc.spec_text")) for n in own), (
            f"{path.name}: {own}"
        )


def test_leaf_modules_import_nothing_of_the_project():
    for name in ("spec_text.py",):
        assert not {n for n in imports(PACKAGE / name) if n.startswith("embedsvc")}, name


# Below the transports: no gRPC or HTTP library.
TRANSPORTS = ("grpc", "grpc_health", "grpc_reflection", "starlette", "uvicorn", "multipart", "httpx")
BASE = {"errors", "spec_text"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "spec_text": set(),
    "progress": set(),
    "cpu": set(),
    "v1": set(),
    "eval": set(),
    "models": BASE,
    "pooling": BASE,
    "store": BASE,
    "datasets": BASE,
    "encoder": BASE | {"models", "pooling"},
    "engine": BASE | {"cpu", "models", "pooling", "encoder", "store"},
    "training": BASE | {"progress", "datasets", "eval", "models", "pooling", "encoder", "engine"},
    "jobs": BASE | {"progress", "cpu", "datasets", "eval", "models", "pooling", "encoder", "store", "engine", "client"},
    "client": {"v1", "spec_text"},
    "service": BASE | {"cpu", "models", "pooling", "encoder", "store", "engine", "datasets", "v1"},
    "cli": BASE
    | {
        "progress",
        "cpu",
        "models",
        "pooling",
        "encoder",
        "store",
        "engine",
        "datasets",
        "eval",
        "training",
        "jobs",
        "client",
        "service",
        "v1",
    },
    "__main__": {"cli"},
    "__init__": set(),
}
MAY_USE_TRANSPORTS = {"service", "client", "cli", "v1", "__main__"}


def unit_of(path: Path) -> str:
    """The row of ALLOWED a file of the package belongs to: its package, or its own name at the top level."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported_unit(name: str) -> str | None:
    """The unit of embedsvc an import names (None for other libraries; the bare package is "__init__")."""
    parts = name.split(".")
    if parts[0] != "embedsvc":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def violations(unit: str, names: set[str]) -> set[str]:
    """The imports among `names` that ALLOWED (and the transport rule) forbid to `unit`."""
    bad = set()
    for name in names:
        target = imported_unit(name)
        if target is None:
            if name.split(".")[0] in TRANSPORTS and unit not in MAY_USE_TRANSPORTS:
                bad.add(name)
        elif target not in ALLOWED[unit] | {unit, "__init__"}:
            bad.add(name)
    return bad


def test_every_package_and_module_has_a_row():
    units = {unit_of(path) for path in PACKAGE.rglob("*.py")}
    assert units == set(ALLOWED), f"missing rows: {units - set(ALLOWED)}; rows for nothing: {set(ALLOWED) - units}"


def test_every_import_is_allowed():
    bad = {str(path.relative_to(PACKAGE)): violations(unit_of(path), imports(path)) for path in PACKAGE.rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}


def test_only_cli_and_service_import_service_and_jobs_reach_the_engine():
    assert {unit for unit, allowed in ALLOWED.items() if "service" in allowed} == {"cli"}
    assert "engine" in ALLOWED["jobs"] and "engine" in ALLOWED["training"]
    assert not {"service", "cli"} & (ALLOWED["jobs"] | ALLOWED["training"] | ALLOWED["engine"])
    jobs = set().union(*(imports(path) for path in (PACKAGE / "jobs").rglob("*.py")))
    assert {"embedsvc.engine.engine", "embedsvc.engine.config"} <= jobs  # the local sink is an engine


@pytest.mark.parametrize(
    "unit, source",
    [
        ("jobs", "from embedsvc.service.config import ServerConfig"),
        ("training", "import grpc"),
        ("engine", "from embedsvc.service import calls"),
        ("store", "def f():\n    from embedsvc.engine.engine import Engine"),
        ("client", "import embedsvc.store"),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path, unit, source):
    module = tmp_path / "module.py"
    module.write_text(source + "\n")
    assert violations(unit, imports(module))
