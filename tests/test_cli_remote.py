"""The CLI follows the server: every remote command takes its address from --address or $EMBEDSVC_ADDRESS and
its token from $EMBEDSVC_TOKEN, and `embed --address` embeds through the server what a local run embeds."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from cli_runner import run_cli
from conftest import png_bytes

from embedsvc.datasets import write_scenes

TOKEN = "t" * 24


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`embedsvc ARGS` with only `env`'s address and token variables (none of this process's)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("EMBEDSVC_ADDRESS", "EMBEDSVC_TOKEN")}
    return run_cli(*args, env={**environment, **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def server(make_server):
    """A server whose API needs a token: what the CLI reaches must come with $EMBEDSVC_TOKEN."""
    tokens = json.dumps({"tokens": [{"name": "cli", "token": TOKEN, "scopes": ["read", "write"]}]})
    return make_server(auth_tokens=tokens)


def test_embed_through_the_server_equals_embed_here(server, tiny_spec, tmp_path):
    image = tmp_path / "scene.png"
    image.write_bytes(png_bytes(size=(60, 40)))
    specs = ["cls", "gem:p=3", "gem:p=4"]  # two specs of one pooling: keyed apart, by the spec as written
    inputs = [
        "--text",
        "a small red circle",
        "--image",
        str(image),
        *[a for s in specs for a in ("--pooling", s)],
        "--json",
        "--tokens",
    ]
    here = cli(
        "embed",
        "--model",
        tiny_spec.architecture,
        "--checkpoint",
        tiny_spec.checkpoint,
        "--model-config",
        tiny_spec.config_file,
        *inputs,
    )
    remote = cli(
        "embed",
        "--address",
        "--model",
        tiny_spec.name,
        *inputs,
        env={"EMBEDSVC_ADDRESS": server.address, "EMBEDSVC_TOKEN": TOKEN},
    )
    assert here.returncode == 0 and remote.returncode == 0, here.stderr + remote.stderr
    here, remote = json.loads(here.stdout)["results"], json.loads(remote.stdout)["results"]
    for local_row, remote_row in zip(here, remote, strict=True):
        assert {k: local_row[k] for k in ("input", "modality", "truncated", "grid")} == {
            k: remote_row[k] for k in ("input", "modality", "truncated", "grid")
        }
        assert list(local_row["embeddings"]) == list(remote_row["embeddings"]) == specs
        for name in specs:
            np.testing.assert_allclose(remote_row["embeddings"][name], local_row["embeddings"][name], atol=1e-5)
        assert not np.allclose(remote_row["embeddings"]["gem:p=3"], remote_row["embeddings"]["gem:p=4"])
        np.testing.assert_allclose(remote_row["tokens"], local_row["tokens"], atol=1e-5)
    assert remote[1]["grid"] == [4, 4] and remote[0]["grid"] is None


def test_embed_address_refuses_what_only_a_local_load_uses(server, tiny_spec):
    line = one_line_error(
        cli(
            "embed", "--address", server.address, "--checkpoint", tiny_spec.checkpoint, "--device", "cpu", "--text", "x"
        )
    )
    assert "--checkpoint, --device cpu shape a model loaded in this process" in line and "drop --address" in line


def test_embed_address_refuses_a_pooling_given_twice(server):
    line = one_line_error(
        cli(
            "embed",
            "--address",
            server.address,
            "--pooling",
            "gem:p=3",
            "--pooling",
            "avg",
            "--pooling",
            "gem:p=3",
            "--text",
            "x",
            env={"EMBEDSVC_TOKEN": TOKEN},
        )
    )
    assert "--pooling 'gem:p=3' is given twice" in line


def test_remote_commands_read_the_address_and_token_from_the_environment(server, tmp_path):
    env = {"EMBEDSVC_ADDRESS": server.address, "EMBEDSVC_TOKEN": TOKEN}
    created = cli("collections", "create", "envs", "--pooling", "avg", env=env)
    assert created.returncode == 0 and "created envs" in created.stdout, created.stderr
    scenes = write_scenes(tmp_path / "scenes", "val", 6, size=40)
    indexed = cli("index", str(scenes), "--collection", "envs", "--report", str(tmp_path / "r.jsonl"), env=env)
    assert indexed.returncode == 0 and "indexed 6" in indexed.stdout, indexed.stderr
    found = cli("search", "envs", "--text", "a small red circle", "-k", "3", "--json", env=env)
    assert found.returncode == 0 and len(json.loads(found.stdout)) == 3, found.stderr
    listed = cli("collections", "list", env=env)
    assert "envs\titems=6" in listed.stdout, listed.stderr
    without_token = cli("collections", "list", env={"EMBEDSVC_ADDRESS": server.address})
    assert "UNAUTHENTICATED" in one_line_error(without_token)
    elsewhere = cli("collections", "list", "--address", "127.0.0.1:1", "--timeout", "2", env=env)
    assert "UNAVAILABLE" in one_line_error(elsewhere)  # the flag wins over the environment


def test_search_with_an_empty_id_is_one_line_and_exit_2():
    """`search COLL --id ""` built no query and ended in an AssertionError traceback."""
    line = one_line_error(cli("search", "scenes", "--id", "", "--address", "127.0.0.1:1"))
    assert "--id is empty" in line
