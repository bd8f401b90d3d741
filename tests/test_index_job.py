"""`embedsvc index` on a folder with bad files, interrupted by SIGKILL and resumed; and through a server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli, start_cli
from serving import running_server

from embedsvc.client import Client
from embedsvc.datasets import write_scenes
from embedsvc.service.config import ServerConfig
from embedsvc.store import LocalStore


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, set[str], set[str]]:
    root = tmp_path_factory.mktemp("photos")
    write_scenes(root, "val", 292, size=72)  # + 8 bad files = a folder of 300
    for f in root.glob("manifest.*"):
        f.unlink()
    bad = set()
    for i in range(5):  # corrupt: a truncated PNG, garbage, an empty file, text named .jpg, half a GIF header
        path = root / "images" / f"corrupt-{i}.{['png', 'png', 'jpg', 'jpg', 'gif'][i]}"
        path.write_bytes(
            [(root / "images" / "val-0000000.png").read_bytes()[:200], b"garbage", b"", b"hello", b"GIF89a"][i]
        )
        bad.add(str(path))
    for name in ("notes.txt", "sub/README.md", "data.csv"):
        path = root / "images" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text("not an image")
        bad.add(str(path))
    good = {f"images/val-{i:07d}.png" for i in range(292)}
    return root, good, bad


def index(*args, cwd, **options) -> subprocess.CompletedProcess:
    """`embedsvc index ARGS` run in `cwd` (tests/cli_runner.py; process=True for a process of its own)."""
    return run_cli("index", *args, cwd=cwd, **options)


@pytest.mark.slow  # starts a local Ray cluster twice
def test_ray_workers_load_a_model_from_a_models_file_and_report_a_refusal_in_one_line(tiny_spec, tmp_path):
    """`--models-file` registers its models in the job's process only: the Ray workers were handed the name, did
    not know it, and the job ended in Ray's ActorDiedError traceback, exit 1. Workers get the model's spec now,
    and an error a worker raises (here: its checkpoint is not on the worker's disk) reaches the user as our error
    type, one line."""
    pytest.importorskip("ray.data")
    root = tmp_path / "photos"
    write_scenes(root, "val", 12, size=32)
    models = tmp_path / "models.json"
    models.write_text(
        json.dumps(
            [
                {
                    "name": "tiny-from-file",
                    "architecture": tiny_spec.architecture,
                    "checkpoint": tiny_spec.checkpoint,
                    "config_file": tiny_spec.config_file,
                }
            ]
        )
    )
    vectors = {}
    for engine in ("local", "ray"):
        proc = index(
            str(root / "images"),
            "--collection",
            "c=cls",
            "--models-file",
            str(models),
            "--model",
            "tiny-from-file",
            "--local",
            str(tmp_path / engine),
            "--engine",
            engine,
            cwd=tmp_path,
            process=engine == "ray",
        )
        assert proc.returncode == 0 and "indexed 12" in proc.stdout, proc.stderr[-3000:]
        store = LocalStore(tmp_path / engine)
        vectors[engine] = {i.id: i.vector for i in store.get("c", [f"val-{k:07d}.png" for k in range(12)], True)[0]}
        store.close(checkpoint=False)
    assert set(vectors["ray"]) == set(vectors["local"]) and len(vectors["ray"]) == 12
    assert max(float(np.abs(vectors["ray"][i] - vectors["local"][i]).max()) for i in vectors["ray"]) < 1e-5

    script = (
        "import sys\n"
        "from embedsvc.jobs.ray_engine import embed_with_ray\n"
        "from embedsvc.models import ModelSpec\n"
        "spec = ModelSpec(name='nowhere', architecture='ViT-B-32', checkpoint='/nonexistent/weights.pt')\n"
        "try:\n"
        "    list(embed_with_ray([{'id': 'a', 'path': '', 'data': b'x'}], spec, [], 1, 1))\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, '|', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=os.environ
    )
    line = done.stdout.strip().splitlines()[-1]
    expected = "WeightsUnavailable | a Ray worker: checkpoint file /nonexistent/weights.pt does not exist"
    assert line.startswith(expected), done.stdout + done.stderr
    assert "Traceback" not in line and "ActorDiedError" not in line


def test_folder_with_bad_files_interrupted_and_resumed(folder, tmp_path):
    root, good, bad = folder
    args = [
        str(root),
        "--collection",
        "photos=cls",
        "--collection",
        "photos-max=max",
        "--local",
        str(tmp_path / "d"),
        "--batch-size",
        "8",
        "--workers",
        "2",
    ]
    first = start_cli("index", *args, cwd=tmp_path)  # a process, to be killed
    deadline = time.monotonic() + 240
    for line in first.stderr:  # progress lines: kill once about half is stored
        if line.startswith("indexed ") and int(line.split()[1].split("/")[0]) >= 140:
            break
        assert time.monotonic() < deadline
    first.send_signal(signal.SIGKILL)
    first.wait(30)

    store = LocalStore(tmp_path / "d")
    # "already present" counts the ids every collection holds: the kill may fall between the two collections'
    # commits of one batch, so one of them may hold a batch more than the other.
    partial = min(store.get_collection(name).count for name in ("photos", "photos-max"))
    store.close(checkpoint=False)
    assert 0 < partial < 292, partial

    second = index(*args, cwd=tmp_path)
    out, err = second.stdout, second.stderr
    assert second.returncode == 0, err
    assert "failed 8 of 300" in out, out
    present = int(out.split("already present ")[1].split(",")[0])
    assert present >= partial  # what the killed run stored is skipped, not redone
    report = [json.loads(line) for line in (tmp_path / "index-report.jsonl").read_text().splitlines()]
    assert {r["path"] for r in report} == bad

    store = LocalStore(tmp_path / "d")
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
    assert local.returncode == 0, local.stderr
    config = ServerConfig(
        listen="127.0.0.1:0", data_dir=str(tmp_path / "server"), metrics_port=-1, demo_size=0, log_format="text"
    )
    with running_server(config) as server:
        remote = index(str(subset), "--collection", "c=gem:p=3", "--address", server.address, cwd=tmp_path)
        assert remote.returncode == 0 and "indexed 40" in remote.stdout, remote.stderr
        with Client(server.address) as client:
            remote_items, _ = client.get("c", sorted(good)[:40], include_vectors=True)
    store = LocalStore(tmp_path / "local")
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
        proc = index(
            str(root),
            "--collection",
            "c=cls",
            "--collection",
            "m=max",
            "--local",
            str(tmp_path / engine),
            "--engine",
            engine,
            "--batch-size",
            "32",
            "--report",
            str(tmp_path / f"{engine}.jsonl"),
            cwd=tmp_path,
            process=engine == "ray",  # Ray's workers and cluster belong to a process of their own
        )
        out, err = proc.stdout, proc.stderr
        assert proc.returncode == 0, err[-3000:]
        assert "indexed 292" in out and "failed 8 of 300" in out, out
        assert {json.loads(line)["path"] for line in (tmp_path / f"{engine}.jsonl").read_text().splitlines()} == bad
        store = LocalStore(tmp_path / engine)
        contents[engine] = {
            name: {i.id: i.vector for i in store.get(name, sorted(good), include_vectors=True)[0]}
            for name in ("c", "m")
        }
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
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0 and "indexed 6" in out and "failed 2 of 8" in out, out + err
    store = LocalStore(tmp_path / "wds")
    items, missing = store.get("w", ["sample3"])
    assert not missing and items[0].metadata == {"n": 3, "caption": "caption 3"}
    store.close(checkpoint=False)

    table = pa.table(
        {
            "id": [f"p{k}" for k in range(6)],
            "path": [str(root / n) for n in names],
            "caption": [f"c{k}" for k in range(6)],
            "album": ["x"] * 6,
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    proc = index(str(tmp_path / "m.parquet"), "--collection", "p=cls", "--local", str(tmp_path / "pq"), cwd=tmp_path)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0 and "indexed 6" in out, out + err
    store = LocalStore(tmp_path / "pq")
    assert store.get("p", ["p2"])[0][0].metadata == {"album": "x", "caption": "c2"}
    store.close(checkpoint=False)


# Runs `embedsvc ARGV...` with its data segment limited to 6 GiB: a regression that reads a device or a huge file
# whole dies with MemoryError instead of taking the test machine's memory. The limit is set by this small program,
# which then execs: a preexec_fn would run Python between fork and exec in a child of this process, whose gRPC
# threads (servers of earlier tests) make that unsafe (once: "epoll_wait error: Bad file descriptor", SIGABRT).
LIMITED_MEMORY = (
    "import os, resource, sys; resource.setrlimit(resource.RLIMIT_DATA, (6 << 30, 6 << 30)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'embedsvc', *sys.argv[1:]])"
)


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


@pytest.mark.parametrize(
    "source,engine",
    [("folder", "local"), ("manifest", "local"), pytest.param("manifest", "ray", marks=pytest.mark.slow)],
)  # Ray: 71 s
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
        bad.update(
            {
                "/dev/zero": "character device",
                str(tmp_path): "directory",
                str(tmp_path / "missing.png"): "file not found",
            }
        )
        rows = [{"id": f"row-{k}", "path": path} for k, path in enumerate(sorted(bad))]
        rows += [{"id": f"good-{k}", "path": str(photos / f"good-{k}.png")} for k in range(len(names))]
        (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.Popen(  # a process of its own: its memory is limited
        [
            sys.executable,
            "-c",
            LIMITED_MEMORY,
            "index",
            str(photos if source == "folder" else tmp_path / "rows.jsonl"),
            "--collection",
            "c=cls",
            "--local",
            str(tmp_path / "d"),
            "--batch-size",
            "4",
            "--engine",
            engine,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
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
    store = LocalStore(tmp_path / "d")
    assert store.get_collection("c").count == len(names)
    store.close(checkpoint=False)


def test_webdataset_members_over_the_limit_are_refused_unread(tmp_path):
    """A key whose image, caption or metadata member is over the byte limit is reported, its members unread."""
    import io
    import tarfile

    from embedsvc.jobs.sources import webdataset_records

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for name, size in (
            ("big.png", 300),
            ("big.txt", 5),
            ("long.png", 50),
            ("long.txt", 300),
            ("ok.png", 100),
            ("ok.json", 10),
        ):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"{}" + b" " * (size - 2)))
    records = {r.id: r for r in webdataset_records([shard], 100)}
    assert records["big"].refused.startswith("too large: 300 bytes (big.png), over the limit of 100")
    assert records["long"].refused.startswith("too large: 300 bytes (long.txt), over the limit of 100")
    assert records["ok"].refused is None and records["ok"].read() == b"{}" + b" " * 98


def test_file_names_no_store_keeps_are_reported_and_odd_names_cannot_forge_stderr(folder, tmp_path):
    """A file name that is not UTF-8 or a path over the id limit used to stop the whole job (exit 2) at its batch;
    each is now one reported failure. A name with a newline or a terminal escape is printed escaped on stderr."""
    import os

    root, good, _ = folder
    image = (root / sorted(good)[0]).read_bytes()
    photos = tmp_path / "photos"
    deep = photos / ("d" * 200) / ("e" * 200)
    deep.mkdir(parents=True)
    undecodable = photos / os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: a lone surrogate in Python
    odd = {
        undecodable: image,
        deep / ("f" * 200 + ".png"): image,
        photos / "two\nlines.png": image,
        photos / "esc\x1b]0;pwned\x07.png": b"not a png",
    }
    for path, data in odd.items():
        path.write_bytes(data)
    for k in range(3):
        (photos / f"good-{k}.png").write_bytes(image)
    proc = index(
        str(photos), "--collection", "c=cls", "--local", str(tmp_path / "d"), "--batch-size", "4", cwd=tmp_path
    )
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 0, err[-3000:]
    assert "indexed 4, already present 0, failed 3 of 7" in out, out + err
    report = {
        r["path"]: r["reason"] for r in map(json.loads, (tmp_path / "index-report.jsonl").read_text().splitlines())
    }
    assert set(report) == {str(p) for p in odd if "two" not in p.name}, report
    assert "not valid UTF-8" in report[str(undecodable)] and "byte limit" in report[str(deep / ("f" * 200 + ".png"))]
    assert "\x1b" not in err and r"esc\x1b]0;pwned\x07.png" in err
    failed = [line for line in err.splitlines() if line.startswith("  failed ")]
    assert len(failed) == 3 and all(line.count(": ") >= 1 for line in failed), failed
    store = LocalStore(tmp_path / "d")
    items, missing = store.get("c", ["two\nlines.png", "good-0.png"])
    assert not missing and len(items) == 2
    store.close(checkpoint=False)


def test_manifest_rows_no_store_keeps_are_reported_not_fatal(folder, tmp_path):
    """A caption over the metadata string limit, an undecodable value, a nested value: each row is reported, the
    others indexed (they used to fail their batch and stop the job). An id of 0 is the id "0", not the path."""
    from embedsvc.jobs.index import IndexJob, run_index

    root, good, _ = folder
    path = str(root / sorted(good)[0])
    rows = [
        {"id": "long", "path": path, "caption": "x" * 5000},
        {"id": "surrogate", "path": path, "note": "\udcff"},
        {"id": "nested", "path": path, "exif": {"iso": 100}},
        {"id": 0, "path": path, "caption": "fine"},
        {"id": "ok", "path": path, "n": 1},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_index(
        IndexJob(str(tmp_path / "rows.jsonl"), ["c=cls"], local=str(tmp_path / "d"), report=str(tmp_path / "r.jsonl"))
    )
    assert (summary.indexed, len(summary.failed)) == (2, 3), summary.failed
    reasons = dict(summary.failed)
    assert len(reasons) == 1 and path in reasons  # three rows of one file: the report names the file
    assert [r.split(":")[0] for _, r in summary.failed] == ["not storable"] * 3
    assert "over 4096 bytes" in summary.failed[0][1] and "not valid UTF-8" in summary.failed[1][1]
    assert "has type dict" in summary.failed[2][1]
    store = LocalStore(tmp_path / "d")
    items, missing = store.get("c", ["0", "ok"])
    assert not missing and {i.id: i.metadata for i in items} == {"0": {"caption": "fine"}, "ok": {"n": 1}}
    store.close(checkpoint=False)


def test_webdataset_links_devices_bad_json_and_broken_shards_are_reported(tmp_path):
    """Tar members that are links or devices, a .json that is not an object, a shard that is not a tar or ends
    early: each is a refused record with its reason (they used to be dropped silently or stop the job)."""
    import io
    import tarfile

    from embedsvc.jobs.index import decode_record
    from embedsvc.jobs.sources import open_source

    def shard(name: str, members: list[tuple[str, bytes, bytes]]) -> bytes:
        with tarfile.open(tmp_path / name, "w") as tar:
            for member, kind, data in members:
                info = tarfile.TarInfo(member)
                info.type, info.size, info.linkname = kind, len(data), "/etc/passwd" if kind == tarfile.SYMTYPE else ""
                tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        return (tmp_path / name).read_bytes()

    data = shard(
        "a.tar",
        [
            ("ok.png", tarfile.REGTYPE, b"png"),
            ("ok.json", tarfile.REGTYPE, b'{"n": 1}'),
            ("sym.png", tarfile.SYMTYPE, b""),
            ("dev.png", tarfile.CHRTYPE, b""),
            ("fifo.png", tarfile.FIFOTYPE, b""),
            ("badjson.png", tarfile.REGTYPE, b"png"),
            ("badjson.json", tarfile.REGTYPE, b"{nope"),
            ("list.png", tarfile.REGTYPE, b"png"),
            ("list.json", tarfile.REGTYPE, b"[1]"),
            ("last.png", tarfile.REGTYPE, b"x" * 2000),
        ],
    )
    (tmp_path / "b.tar").write_bytes(b"no tar here" * 100)
    with tarfile.open(tmp_path / "a.tar") as tar:
        cut = tar.getmember("last.png").offset_data + 1000
    (tmp_path / "c.tar").write_bytes(data[:cut])  # cut inside the last member's data
    records = {r.source: r for r in open_source(str(tmp_path / "[abc].tar"))}
    a, b, c = (str(tmp_path / f"{x}.tar") for x in "abc")
    expected = {
        f"{a}:sym": "member sym.png is a symlink (to /etc/passwd)",
        f"{a}:dev": "is a character device",
        f"{a}:fifo": "member fifo.png is a FIFO",
        f"{a}:badjson": "badjson.json is not valid JSON",
        f"{a}:list": "list.json must hold a JSON object, not list",
        b: "not a tar archive",
        c: "shard read up to member 10 only",
    }  # an absolute glob: Path().glob used to refuse it
    for source, fragment in expected.items():
        assert fragment in (records[source].refused or ""), (source, records[source].refused)
    assert records[f"{a}:ok"].refused is None and records[f"{a}:ok"].metadata == {"n": 1}
    assert records[f"{c}:ok"].refused is None and records[f"{c}:ok"].read() == b"png"
    decoded = decode_record(records[f"{c}:last"])  # its header was read, its data is cut
    image, reason = decoded.image, decoded.reason
    assert image is None and f"could not read last.png from {c}" in reason, reason


@pytest.mark.parametrize(
    "name,text,fragment",
    [
        ("list.jsonl", "[1, 2]\n", "rows.jsonl:1: expected a JSON object, not list"),
        ("number.jsonl", '{"path": 5}\n', "row 1: 'path' must be a string, not int"),
        ("extra.csv", "id,path\na,x.png,surplus\n", "row 1 has more values than the header has columns"),
        ("latin1.csv", b"id,path\na,caf\xe9.png\n", "is not UTF-8 text (byte 0xe9"),
        ("fifo.jsonl", None, "is not a regular file"),
        ("fifo.parquet", None, "is not a regular file"),
    ],
)
def test_malformed_manifests_are_one_clear_error(tmp_path, name, text, fragment):
    """Rows that are not objects, paths that are not strings, surplus CSV values, non-UTF-8 text and a FIFO named
    as the manifest: an InvalidInput naming the row (exit 2), where they were tracebacks or 'does not exist'."""
    import os

    from embedsvc.errors import InvalidInput
    from embedsvc.jobs.sources import open_source

    manifest = tmp_path / ("rows" + Path(name).suffix)
    if text is None:
        os.mkfifo(manifest)
    elif isinstance(text, bytes):
        manifest.write_bytes(text)
    else:
        manifest.write_text(text)
    with pytest.raises(InvalidInput, match=re.escape(fragment)):
        open_source(str(manifest))


def test_manifest_byte_order_mark_and_id_zero_are_read_as_written(tmp_path):
    """A CSV saved with a BOM (Excel) used to lose its id column to the path; an id of 0 was replaced by the path."""
    from embedsvc.jobs.sources import open_source

    (tmp_path / "m.csv").write_text("\ufeffid,path,label\nx1,a.png,3\n", encoding="utf-8")
    (tmp_path / "m.jsonl").write_text('{"id": 0, "path": "a.png"}\n')
    (csv_row,) = open_source(str(tmp_path / "m.csv"))
    assert (csv_row.id, csv_row.metadata) == ("x1", {"label": 3})
    assert [r.id for r in open_source(str(tmp_path / "m.jsonl"))] == ["0"]


def test_a_collection_named_twice_is_refused_before_anything_is_created(tmp_path):
    """`--collection n=cls --collection n=avg` used to create n as cls, then fail on the second as 'already
    exists'; `n=cls n` wrote every item twice into n."""
    from embedsvc.errors import InvalidInput
    from embedsvc.jobs.index import IndexJob, run_index

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"png")
    for targets in (["n=cls", "n=avg"], ["n=cls", "n"], ["m", "n=cls", "m=cls"]):
        with pytest.raises(InvalidInput, match=f"collection '{targets[-1][0]}' is named twice"):
            run_index(
                IndexJob(str(tmp_path / "photos"), targets, local=str(tmp_path / "d"), report=str(tmp_path / "r.jsonl"))
            )
    assert not (tmp_path / "d").exists()


def test_a_job_that_stores_nothing_because_every_path_failed_exits_1(tmp_path):
    """Nothing silently wrong: a folder whose every file is unusable is not a success (exit 0 would read as done)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "broken.png").write_bytes(b"not a png")
    os.mkfifo(photos / "pipe.jpg")
    proc = index(str(photos), "--collection", "c=cls", "--local", str(tmp_path / "d"), cwd=tmp_path)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 1, out + err
    assert "indexed 0, already present 0, failed 2 of 2" in out, out
    assert "nothing was indexed: all 2 paths failed" in err, err
