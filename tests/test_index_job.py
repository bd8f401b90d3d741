"""`embedsvc index` on a folder with bad files, interrupted by SIGKILL and resumed; and through a server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedsvc.client import Client
from embedsvc.datasets import write_scenes
from embedsvc.service.config import ServerConfig
from embedsvc.store import Store

from serving import running_server


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, set[str], set[str]]:
    root = tmp_path_factory.mktemp("photos")
    write_scenes(root, "val", 292, size=72)  # + 8 bad files = a folder of 300
    for f in root.glob("manifest.*"):
        f.unlink()
    bad = set()
    for i in range(5):  # corrupt: a truncated PNG, garbage, an empty file, text named .jpg, half a GIF header
        path = root / "images" / f"corrupt-{i}.{['png', 'png', 'jpg', 'jpg', 'gif'][i]}"
        path.write_bytes([(root / "images" / "val-0000000.png").read_bytes()[:200], b"garbage", b"", b"hello",
                          b"GIF89a"][i])
        bad.add(str(path))
    for name in ("notes.txt", "sub/README.md", "data.csv"):
        path = root / "images" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("not an image")
        bad.add(str(path))
    good = {f"images/val-{i:07d}.png" for i in range(292)}
    return root, good, bad


def index(*args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "embedsvc", "index", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_folder_with_bad_files_interrupted_and_resumed(folder, tmp_path):
    root, good, bad = folder
    args = [str(root), "--collection", "photos=cls", "--collection", "photos-max=max", "--local", str(tmp_path / "d"),
            "--batch-size", "8", "--workers", "2"]
    first = index(*args, cwd=tmp_path)
    deadline = time.monotonic() + 240
    for line in first.stderr:  # progress lines: kill once about half is stored
        if line.startswith("indexed ") and int(line.split()[1].split("/")[0]) >= 140:
            break
        assert time.monotonic() < deadline
    first.send_signal(signal.SIGKILL)
    first.wait(30)

    store = Store(tmp_path / "d")
    partial = store.get_collection("photos").count
    store.close(checkpoint=False)
    assert 0 < partial < 292, partial

    second = index(*args, cwd=tmp_path)
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err
    assert "failed 8 of 300" in out, out
    present = int(out.split("already present ")[1].split(",")[0])
    assert present >= partial  # what the killed run stored is skipped, not redone
    report = [json.loads(line) for line in (tmp_path / "index-report.jsonl").read_text().splitlines()]
    assert {r["path"] for r in report} == bad

    store = Store(tmp_path / "d")
    for name in ("photos", "photos-max"):
        assert store.get_collection(name).count == 292
        items, missing = store.get(name, sorted(good))
        assert not missing and {i.id for i in items} == good
    store.close(checkpoint=False)


def test_remote_index_equals_local(folder, tmp_path):
    root, good, _ = folder
    subset = tmp_path / "subset"
    (subset / "images").mkdir(parents=True)
    for name in sorted(good)[:40]:
        (subset / name).write_bytes((root / name).read_bytes())
    local = index(str(subset), "--collection", "c=gem:p=3", "--local", str(tmp_path / "local"), cwd=tmp_path)
    assert local.wait(300) == 0, local.stderr.read()
    config = ServerConfig(listen="127.0.0.1:0", data_dir=str(tmp_path / "server"), metrics_port=-1, demo_size=0,
                          log_format="text")
    with running_server(config) as server:
        remote = index(str(subset), "--collection", "c=gem:p=3", "--address", server.address, cwd=tmp_path)
        out, err = remote.communicate(timeout=300)
        assert remote.returncode == 0 and "indexed 40" in out, err
        with Client(server.address) as client:
            remote_items, _ = client.get("c", sorted(good)[:40], include_vectors=True)
    store = Store(tmp_path / "local")
    local_items, _ = store.get("c", sorted(good)[:40], include_vectors=True)
    store.close(checkpoint=False)
    assert [i.id for i in remote_items] == [i.id for i in local_items] and len(local_items) == 40
    for a, b in zip(remote_items, local_items):
        assert np.abs(a.vector - b.vector).max() < 1e-5


@pytest.mark.slow  # starts a local Ray cluster and actor pool (233 s measured on 2 shared cores)
def test_ray_engine_matches_in_process(folder, tmp_path):
    pytest.importorskip("ray.data")
    root, good, bad = folder
    contents = {}
    for engine in ("local", "ray"):
        proc = index(str(root), "--collection", "c=cls", "--collection", "m=max",
                     "--local", str(tmp_path / engine), "--engine", engine, "--batch-size", "32",
                     "--report", str(tmp_path / f"{engine}.jsonl"), cwd=tmp_path)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "indexed 292" in out and "failed 8 of 300" in out, out
        assert {json.loads(l)["path"] for l in (tmp_path / f"{engine}.jsonl").read_text().splitlines()} == bad
        store = Store(tmp_path / engine)
        contents[engine] = {name: {i.id: i.vector for i in store.get(name, sorted(good), include_vectors=True)[0]}
                            for name in ("c", "m")}
        store.close(checkpoint=False)
    for name in ("c", "m"):
        assert set(contents["ray"][name]) == set(contents["local"][name]) == good
        diff = max(float(np.abs(contents["ray"][name][i] - contents["local"][name][i]).max()) for i in good)
        assert diff < 1e-5, f"{name}: max difference {diff}"


@pytest.mark.slow  # two more source formats end to end (9 s)
def test_webdataset_and_parquet_sources(folder, tmp_path):
    import io
    import tarfile

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root, good, _ = folder
    names = sorted(good)[:6]
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        def add(name, data: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for k, name in enumerate(names):
            add(f"sample{k}.png", (root / name).read_bytes())
            add(f"sample{k}.txt", f"caption {k}".encode())
            add(f"sample{k}.json", json.dumps({"n": k}).encode())
        add("broken.jpg", b"not a jpeg")
        add("orphan.txt", b"no image here")
    proc = index(str(shard), "--collection", "w=cls", "--local", str(tmp_path / "wds"), cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "indexed 6" in out and "failed 2 of 8" in out, out + err
    store = Store(tmp_path / "wds")
    items, missing = store.get("w", ["sample3"])
    assert not missing and items[0].metadata == {"n": 3, "caption": "caption 3"}
    store.close(checkpoint=False)

    table = pa.table({"id": [f"p{k}" for k in range(6)], "path": [str(root / n) for n in names],
                      "caption": [f"c{k}" for k in range(6)], "album": ["x"] * 6})
    pq.write_table(table, tmp_path / "m.parquet")
    proc = index(str(tmp_path / "m.parquet"), "--collection", "p=cls", "--local", str(tmp_path / "pq"), cwd=tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "indexed 6" in out, out + err
    store = Store(tmp_path / "pq")
    assert store.get("p", ["p2"])[0][0].metadata == {"album": "x", "caption": "c2"}
    store.close(checkpoint=False)
