"""The CLI as a user drives it against a real server on 127.0.0.1: NetVLAD end to end, typed metadata filters
on CSV and JSONL manifests, one-line errors (exit 2) for every user error, and a parser that loads no torch."""

from __future__ import annotations

import csv
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runner import finished, run_cli, start_cli
from serving import running_server

from embedsvc.datasets import write_scenes
from embedsvc.errors import AlreadyExists
from embedsvc.service.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]


def server_config(data_dir) -> ServerConfig:
    return ServerConfig(listen="127.0.0.1:0", data_dir=str(data_dir), metrics_port=-1, demo_size=0, log_format="text")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    return write_scenes(tmp_path_factory.mktemp("scenes"), "val", 40, size=72)


def hits(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow  # a server, two index jobs and fits (19 s)
def test_netvlad_end_to_end_through_a_server_and_locally(scenes, tmp_path):
    with running_server(server_config(tmp_path / "served")) as server:
        address = ["--address", server.address]
        proc = run_cli(
            "index",
            str(scenes),
            "--collection",
            "pv=netvlad:clusters=4",
            "--fit-sample",
            "20",
            "--report",
            str(tmp_path / "r.jsonl"),
            *address,
        )
        assert proc.returncode == 0, proc.stderr
        assert "fitting the pooling of 'pv' on 20 sample images" in proc.stderr and "indexed 40" in proc.stdout
        found = hits(run_cli("search", "pv", "--text", "a small red circle", "-k", "5", "--json", *address))
        assert len(found) == 5 and all(h["metadata"]["caption"] for h in found)

        # an empty NetVLAD collection: searching says how to fit it; `collections fit` fits it
        assert run_cli("collections", "create", "pn", "--pooling", "netvlad:clusters=4", *address).returncode == 0
        assert_one_line_error(
            run_cli("search", "pn", "--text", "a red star", *address),
            "FAILED_PRECONDITION",
            "`embedsvc collections fit NAME SOURCE`",
        )
        proc = run_cli("collections", "fit", "pn", str(scenes.parent / "images"), "--sample", "12", *address)
        assert proc.returncode == 0 and "fitted pn on 12 images" in proc.stdout, proc.stderr
        listed = run_cli("collections", "list", *address).stdout
        assert re.search(r"pn\titems=0\t.*pooling=netvlad", listed), listed
        assert (
            run_cli(
                "index", str(scenes), "--collection", "pn", "--report", str(tmp_path / "r3.jsonl"), *address
            ).returncode
            == 0
        )  # fitted: no refit
        assert len(hits(run_cli("search", "pn", "--text", "a blue square", "--json", *address))) == 10

    local = tmp_path / "local"
    proc = run_cli(
        "index",
        str(scenes),
        "--collection",
        "lv=netvlad:clusters=4",
        "--fit-sample",
        "16",
        "--local",
        str(local),
        "--report",
        str(tmp_path / "r2.jsonl"),
    )
    assert proc.returncode == 0 and "fitting the pooling of 'lv'" in proc.stderr, proc.stderr
    with running_server(server_config(local)) as server:
        found = hits(
            run_cli("search", "lv", "--text", "a large green star", "-k", "3", "--json", "--address", server.address)
        )
        assert len(found) == 3


def _labelled_manifests(folder: Path, scenes: Path) -> tuple[Path, Path]:
    """The same 10 images as CSV (label 0..9 infers as numbers, tag mixes words so stays text) and JSONL
    (label a JSON number, tag a JSON string)."""
    images = sorted((scenes.parent / "images").glob("*.png"))[:10]
    rows = [
        {
            "id": f"item-{i}",
            "path": str(p),
            "caption": f"item {i}",
            "label": i % 5 + 5,
            "tag": str(i % 5 + 5) if i % 2 else f"word{i}",
        }
        for i, p in enumerate(images)
    ]
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "labels.csv", folder / "labels.jsonl"


def test_typed_filters_on_csv_and_jsonl_manifests(scenes, tmp_path):
    csv_manifest, jsonl_manifest = _labelled_manifests(tmp_path, scenes)
    with running_server(server_config(tmp_path / "served")) as server:
        address = ["--address", server.address]
        for name, manifest in (("fromcsv", csv_manifest), ("fromjsonl", jsonl_manifest)):
            proc = run_cli(
                "index", str(manifest), "--collection", f"{name}=cls", "--report", str(tmp_path / "r.jsonl"), *address
            )
            assert proc.returncode == 0, proc.stderr

            def search(flt, name=name):
                return run_cli("search", name, "--text", "item", "--filter", flt, "--json", *address)

            # label: numbers (7 = items 2 and 7); tag: strings ("7" on odd items with i % 5 == 2: item 7)
            assert sorted(h["id"] for h in hits(search("label=7"))) == ["item-2", "item-7"]
            assert all(h["metadata"]["label"] == 7 for h in hits(search("label=7")))
            assert [h["id"] for h in hits(search('tag="7"'))] == ["item-7"]
            assert sorted(h["id"] for h in hits(search('tag="7"|word2'))) == ["item-2", "item-7"]
            assert_one_line_error(search('label="7"'), "INVALID_ARGUMENT", "'label'", "number")
            assert_one_line_error(search("tag=7"), "INVALID_ARGUMENT", "'tag'", "string", """--filter 'tag="7"'""")


def test_filter_grammar_ranges_unknown_keys_and_bad_text(scenes, tmp_path):
    """The grammar of docs and page: KEY>=X, KEY>X, KEY<=X, KEY<X and any-of, each returning exactly the items a
    plain reading of the manifest selects; text that does not parse is one line naming the accepted forms (exit
    2); a key no item holds is a warning on stderr, not a silent empty list."""
    images = sorted((scenes.parent / "images").glob("*.png"))[:12]
    rows = [
        {
            "id": f"item-{i}",
            "path": str(p),
            "caption": f"item {i}",
            "sort_order": 250 * i,
            "vendor": ["acme", "globex", "initech"][i % 3],
        }
        for i, p in enumerate(images)
    ]
    manifest = tmp_path / "orders.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with running_server(server_config(tmp_path / "served")) as server:
        address = ["--address", server.address]
        proc = run_cli(
            "index", str(manifest), "--collection", "orders=cls", "--report", str(tmp_path / "r.jsonl"), *address
        )
        assert proc.returncode == 0, proc.stderr

        def search(*filters):
            return run_cli(
                "search",
                "orders",
                "--text",
                "item",
                "-k",
                "50",
                "--json",
                *address,
                *[a for f in filters for a in ("--filter", f)],
            )

        cases = {
            ("sort_order>=1000",): lambda r: r["sort_order"] >= 1000,
            ("sort_order>1000",): lambda r: r["sort_order"] > 1000,
            ("sort_order<=500",): lambda r: r["sort_order"] <= 500,
            ("sort_order<500",): lambda r: r["sort_order"] < 500,
            ("sort_order>250 sort_order<2000",): lambda r: 250 < r["sort_order"] < 2000,
            ("sort_order>=500", "vendor=acme|initech"): lambda r: (
                r["sort_order"] >= 500 and r["vendor"] in ("acme", "initech")
            ),
        }
        for filters, selects in cases.items():
            proc = search(*filters)
            expected = sorted(r["id"] for r in rows if selects(r))
            assert expected and sorted(h["id"] for h in hits(proc)) == expected, filters
            assert proc.stderr == "", proc.stderr

        for text in ("sort_order=>1000", "sort_order=", "sort_order>=lots", "vendor!=acme", "vendor"):
            assert_one_line_error(
                search(text), "INVALID_ARGUMENT", "KEY=VALUE", "KEY=A|B", "KEY>=X", "KEY>X", "KEY<=X", "KEY<X"
            )

        proc = search("sort_ordr>=1000")
        assert proc.returncode == 0 and json.loads(proc.stdout) == []
        assert proc.stderr.startswith("warning: ") and "'sort_ordr'" in proc.stderr and "orders" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        proc = search("vendor=nobody")  # a held key whose value nothing has: empty, and rightly no warning
        assert json.loads(proc.stdout) == [] and proc.stderr == ""


@pytest.fixture(scope="module")
def error_server(tmp_path_factory):
    with running_server(server_config(tmp_path_factory.mktemp("errors"))) as server:
        yield server


def test_user_errors_are_one_line_on_stderr_and_exit_2(error_server, scenes, tmp_path):
    """Every documented CLI error case (docs/errors.md, "The CLI"), run as a user runs it (in this process; one also
    as `python -m embedsvc`, through the entry point's exit status; a process that imports torch and ends in one
    line is test_integrity_data's `index --local`)."""
    address = ["--address", error_server.address]
    assert run_cli("collections", "create", "plain", *address).returncode == 0
    cases = [
        (["search", "nosuch", "--text", "x", *address], "NOT_FOUND"),
        (["search", "plain", "--text", "x", "--filter", "novalue", *address], "KEY=VALUE"),
        (["search", "plain", "--image", str(tmp_path / "none.png"), *address], "does not exist"),
        (["search", "plain", "--text", "x", "--address", "127.0.0.1:9", "--timeout", "5"], "UNAVAILABLE"),
        (["collections", "fit", "plain", str(scenes), *address], "learns nothing; only NetVLAD"),
        (["collections", "fit", "fresh=netvlad", str(scenes), "--sample", "0", *address], "at least 1"),
        (["index", str(scenes), "--collection", "x=netvlad", "--fit-sample", "0", *address], "collections fit"),
        (["index", str(scenes), "--collection", "nosuch", *address], "does not exist"),
        (["index", str(tmp_path / "nowhere"), "--collection", "x=cls", *address], "cannot read"),
        (["index", str(scenes), "--collection", "x=cls", "--checkpoint", "w.pt", *address], "--local DATA_DIR"),
        (["embed", "--model", "no-such-model", "--text", "x"], "unknown model 'no-such-model'"),
        (["compare", "--data", str(tmp_path / "missing.csv")], "does not exist"),
        (["compare", "--checkpoint", str(tmp_path / "missing.safetensors"), "--pooling", "cls"], "does not exist"),
        (
            ["train", "--data", str(tmp_path / "missing.csv"), "--steps", "1", "--out-dir", str(tmp_path / "t")],
            "does not exist",
        ),
    ]
    unreachable = 3  # a remote command: the process imports no torch
    process = start_cli(*cases[unreachable][0])
    for args, fragment in cases:
        assert_one_line_error(run_cli(*args), fragment)
    assert_one_line_error(finished(process), cases[unreachable][1])


def test_every_command_a_message_names_exists():
    """Backticked `embedsvc ...` in any message or docstring of the package: the command, its action and
    every --flag must be in the parser."""
    from embedsvc.cli import build_parser

    parser = build_parser()

    def subparsers(p):
        return next((a.choices for a in p._actions if isinstance(a, type(parser._subparsers._group_actions[0]))), {})

    named = []
    for path in (ROOT / "embedsvc").rglob("*.py"):
        if "v1" in path.parts:
            continue
        for match in re.finditer(r"`embedsvc ([^`]*)`", path.read_text()):
            named.append((path.name, match.group(1)))
    assert len(named) > 10
    for where, command in named:
        p = parser
        for word in command.split():
            if word.startswith("--"):
                assert word.split("=")[0] in p._option_string_actions, (where, command, word)
            elif word in subparsers(p):
                p = subparsers(p)[word]
            elif word.islower() and p is parser:
                pytest.fail(f"{where}: `embedsvc {command}` names no command")


def test_the_server_module_imports_no_open_clip():
    """open_clip (and the torchvision it imports, ~2 s) loads with a model, not with the server: a server without
    models starts without it, and ClipEncoder.tokenize imports SimpleTokenizer only when it runs."""
    code = "import sys, embedsvc.service.server; print('open_clip' in sys.modules, 'torchvision' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_the_parser_and_remote_commands_import_no_torch():
    """Also the index job's modules (a job that sends images to a server decodes only) and serve's start-up
    checks (a bad setting fails before torch loads)."""
    code = (
        "import sys, time; t = time.perf_counter(); from embedsvc.cli import build_parser; "
        "[build_parser(a) for a in ([], ['search'], ['collections'], ['index'])]; "
        "import embedsvc.jobs.index, embedsvc.service.preflight; "
        "print(round(time.perf_counter() - t, 3)); print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seconds, torch_loaded = proc.stdout.split()
    assert torch_loaded == "False"
    for args in (["--help"], ["search", "--help"], ["collections", "--help"]):
        started = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "embedsvc", *args], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0 and "torch" not in {line.split("|")[-1].strip() for line in run.stderr.splitlines()}
        total = max(
            (
                int(line.split("|")[1])
                for line in run.stderr.splitlines()
                if line.startswith("import time:") and line.split("|")[1].strip().isdigit()
            ),
            default=0,
        )
        print(
            f"embedsvc {' '.join(args)}: {time.perf_counter() - started:.2f} s wall, largest cumulative import "
            f"{total / 1e6:.2f} s (parser build {seconds} s)"
        )


@pytest.mark.slow  # four CLI processes (9 s)
def test_models_file_names_a_model_by_flag_or_environment(tiny_spec, scenes, tmp_path):
    import os

    models = tmp_path / "models.json"
    models.write_text(
        json.dumps(
            [
                {
                    "name": "mine",
                    "architecture": tiny_spec.architecture,
                    "checkpoint": tiny_spec.checkpoint,
                    "config_file": tiny_spec.config_file,
                }
            ]
        )
    )
    env = {**os.environ, "EMBEDSVC_MODELS_FILE": str(models)}
    proc = run_cli("embed", "--model", "mine", "--text", "hi", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["model"] == "mine" and len(out["results"][0]["embeddings"]["cls"]) == 32
    proc = run_cli(
        "compare",
        "--model",
        "mine",
        "--models-file",
        str(models),
        "--data",
        str(scenes),
        "--pooling",
        "cls",
        "--out-dir",
        str(tmp_path / "cmp"),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["model"] == "mine"


MISMATCHES = [  # (--collection, other options, what the existing collection has, what the job asks for)
    ("shaped=avg", {}, "pooling cls", "pooling avg"),
    ("shaped", {"index": "hnsw"}, "index flat", "index hnsw"),
    ("shaped=cls", {"model": "ViT-B-32"}, "model 'embedsvc-tiny-scenes-2'", "model 'ViT-B-32'"),
    ("ipc=cls", {}, "metric inner_product", "metric cosine"),
    ("gemc=gem:p=4", {}, "pooling gem:p=3.0;tokens=final", "pooling gem:p=4"),
]


def test_index_into_an_existing_collection_of_another_definition_is_an_error(error_server, scenes, tmp_path):
    """NAME=POOLING, --model and --index must match an existing collection, through a server and --local: asking
    for avg on a cls collection used to print "already present" and index nothing as avg."""
    from embedsvc.client import Client
    from embedsvc.jobs.index import IndexJob, run_index
    from embedsvc.store import CollectionConfig, LocalStore

    images, data, report = str(scenes.parent / "images"), tmp_path / "local", str(tmp_path / "r.jsonl")
    with Client(error_server.address) as client:
        client.create_collection("shaped", pooling="cls")
        client.create_collection("ipc", pooling="cls", metric="inner_product")
        client.create_collection("gemc", pooling="gem:p=3")
    run_index(IndexJob(images, ["shaped=cls", "gemc=gem:p=3"], local=str(data), report=report))
    store = LocalStore(data)
    store.create_collection(
        CollectionConfig(
            "ipc",
            store.get_collection("shaped").config.dim,
            model="embedsvc-tiny-scenes-2",
            pooling="cls",
            metric="inner_product",
        )
    )
    store.close(checkpoint=False)
    where = {"server": {"address": error_server.address}, "local": {"local": str(data)}}
    for (target, options, have, want), (mode, sink) in itertools.product(MISMATCHES, where.items()):
        with pytest.raises(AlreadyExists) as caught:
            run_index(IndexJob(images, [target], report=report, **sink, **options))
        assert f"collection '{target.partition('=')[0]}' exists with {have}, but this job asks for {want}" in str(
            caught.value
        ), (mode, str(caught.value))
    for k, v in (("address", error_server.address), ("local", str(data))):  # as a user runs it: one line, exit 2
        assert_one_line_error(
            run_cli("index", images, "--collection", "shaped=avg", "--report", report, f"--{k}", v),
            "collection 'shaped' exists with pooling cls, but this job asks for pooling avg",
        )
    with Client(error_server.address) as client:
        assert all(client.get_collection(name).count == 0 for name in ("shaped", "ipc", "gemc"))
    # the same definition written another way (defaults spelled out or left out, --index flat) is no mismatch
    for mode, sink in where.items():
        summary = run_index(IndexJob(images, ["gemc=gem", "shaped=cls"], report=report, index="flat", **sink))
        assert (summary.indexed, summary.already_present) == ((40, 0) if mode == "server" else (0, 40)), mode
