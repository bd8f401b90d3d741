"""The API contract: generated code reproducible from the .proto, every field documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "protos" / "embedsvc" / "v1" / "embedsvc.proto"
GENERATED = ["embedsvc_pb2.py", "embedsvc_pb2.pyi", "embedsvc_pb2_grpc.py"]


def test_generated_code_is_reproducible(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools comes with the dev extra")
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, env=env)
    for name in GENERATED:
        committed = (ROOT / "embedsvc" / "v1" / name).read_text()
        fresh = (tmp_path / "embedsvc" / "v1" / name).read_text()
        assert fresh == committed, f"embedsvc/v1/{name} differs from the .proto: run scripts/gen_protos.sh"


def test_every_field_and_enum_value_has_a_comment():
    lines = PROTO.read_text().splitlines()
    field = re.compile(r"^\s+(optional\s+|repeated\s+)?[\w.<>, ]+\s+\w+\s*=\s*\d+;")
    undocumented = []
    for i, line in enumerate(lines):
        if field.match(line) and not line.strip().startswith("//"):
            previous = next(line for line in reversed(lines[:i]) if line.strip())
            if not previous.strip().startswith("//"):
                undocumented.append(f"{i + 1}: {line.strip()}")
    assert not undocumented, "fields without a comment:\n" + "\n".join(undocumented)


def test_package_and_enums_are_versioned_and_prefixed():
    from embedsvc.v1 import embedsvc_pb2 as pb

    assert pb.DESCRIPTOR.package == "embedsvc.v1"
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
        assert enum.values[0].name == prefix + "UNSPECIFIED" and enum.values[0].number == 0
        assert all(v.name.startswith(prefix) for v in enum.values), enum.name
    services = pb.DESCRIPTOR.services_by_name
    assert set(services["EmbedService"].methods_by_name) == {"Embed", "ListModels"}
    assert set(services["IndexService"].methods_by_name) == {
        "CreateCollection",
        "GetCollection",
        "ListCollections",
        "DropCollection",
        "Upsert",
        "Delete",
        "Get",
        "Search",
        "FitPooling",
    }
    assert services["IndexService"].methods_by_name["Upsert"].client_streaming
