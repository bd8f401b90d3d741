"""Layers import downward only; the core never imports grpc; the client never imports the server."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "embedsvc"
CORE = ("models", "encoder", "pooling", "store")
FORBIDDEN_FOR_CORE = ("grpc", "grpc_health", "grpc_reflection", "embedsvc.service", "embedsvc.client", "embedsvc.cli",
                      "embedsvc.v1", "starlette", "uvicorn", "multipart", "httpx")


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
        assert all(n.startswith(("embedsvc.v1", "embedsvc.client", "embedsvc.spec_text")) for n in own), \
            f"{path.name}: {own}"


def test_leaf_modules_import_nothing_of_the_project():
    for name in ("spec_text.py",):
        assert not {n for n in imports(PACKAGE / name) if n.startswith("embedsvc")}, name
