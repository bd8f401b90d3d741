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


def _limited_memory() -> None:
    """Guard for the job under test: a regression that reads a device or a huge file whole dies with
    MemoryError at 6 GiB of data instead of taking the test machine's memory."""
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (6 << 30, 6 << 30))


def _unusable(root: Path, good_image: bytes) -> dict[str, str]:
    """Paths `index` must skip and report, created under root, each with a fragment of its reason."""
    import os

    root.mkdir()
    bad = {}
    # sparse (no disk), larger than this machine's memory: reading it whole fails at once instead of swapping
    huge = root / "huge.png"
    huge.write_bytes(good_image)
    os.truncate(huge, max(30 * 10**9, 2 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")))
    bad[str(huge)] = "too large"
    os.mkfifo(root / "pipe.png")  # opening it for reading would block until a writer comes
    bad[str(root / "pipe.png")] = "FIFO"
    (root / "zero.png").symlink_to("/dev/zero")  # a device that never ends
    bad[str(root / "zero.png")] = "character device"
    (root / "loop.png").symlink_to("loop.png")
    bad[str(root / "loop.png")] = "symlink loop"
    (root / "gone.png").symlink_to(root / "deleted.png")  # a file removed after it was listed reads the same
    bad[str(root / "gone.png")] = "file not found"
    (root / "album.png").symlink_to(root.parent, target_is_directory=True)  # not followed: no cycles
    bad[str(root / "album.png")] = "directory"
    if os.geteuid() != 0:  # root reads any file
        (root / "locked.png").write_bytes(good_image)
        (root / "locked.png").chmod(0)
        bad[str(root / "locked.png")] = "permission denied"
    return bad


@pytest.mark.parametrize("source,engine", [("folder", "local"), ("manifest", "local"),
                                           pytest.param("manifest", "ray", marks=pytest.mark.slow)])  # Ray: 71 s
def test_unusable_paths_are_skipped_reported_and_never_read_whole(folder, tmp_path, source, engine):
    """Huge files, FIFOs, devices, directories, symlink loops and vanished files: each is reported with its
    reason and counted, none is opened or read whole, and the good images are indexed (exit 0)."""
    if engine == "ray":
        pytest.importorskip("ray.data")
    root, good, _ = folder
    names = sorted(good)[:6]
    photos = tmp_path / "photos"
    bad = _unusable(photos, (root / names[0]).read_bytes())
    for k, name in enumerate(names):
        (photos / f"good-{k}.png").write_bytes((root / name).read_bytes())
    if source == "manifest":  # rows of the same files, plus a device, a directory and a missing file
        bad.update({"/dev/zero": "character device", str(tmp_path): "directory",
                    str(tmp_path / "missing.png"): "file not found"})
        rows = [{"id": f"row-{k}", "path": path} for k, path in enumerate(sorted(bad))]
        rows += [{"id": f"good-{k}", "path": str(photos / f"good-{k}.png")} for k in range(len(names))]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.Popen([sys.executable, "-m", "embedsvc", "index",
                             str(photos if source == "folder" else tmp_path / "rows.jsonl"),
                             "--collection", "c=cls", "--local", str(tmp_path / "d"), "--batch-size", "4",
                             "--engine", engine],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_limited_memory)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("index did not finish in 300 s: a reader blocked (on the FIFO?)")
    assert proc.returncode == 0, err[-3000:]
    assert f"indexed {len(names)}, already present 0, failed {len(bad)} of {len(bad) + len(names)}" in out, out
    lines = (tmp_path / "index-report.jsonl").read_text().splitlines()
    report = {r["path"]: r["reason"] for r in map(json.loads, lines)}
    assert set(report) == set(bad), report
    for path, fragment in bad.items():
        assert fragment in report[path], (path, report[path])
    store = Store(tmp_path / "d")
    assert store.get_collection("c").count == len(names)
    store.close(checkpoint=False)


def test_webdataset_members_over_the_limit_are_refused_unread(tmp_path):
    """A key whose image, caption or metadata member is over the byte limit is reported, its members unread."""
    import io
    import tarfile

    from embedsvc.jobs.sources import webdataset_records

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for name, size in (("big.png", 300), ("big.txt", 5), ("long.png", 50), ("long.txt", 300), ("ok.png", 100),
                           ("ok.json", 10)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"{}" + b" " * (size - 2)))
    records = {r.id: r for r in webdataset_records([shard], 100)}
    assert records["big"].refused.startswith("too large: 300 bytes (big.png), over the limit of 100")
    assert records["long"].refused.startswith("too large: 300 bytes (long.txt), over the limit of 100")
    assert records["ok"].refused is None and records["ok"].read() == b"{}" + b" " * 98
