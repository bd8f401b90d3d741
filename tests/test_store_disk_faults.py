"""The vector files (vectors.py) under a disk that refuses: a file size limit, a full disk, no free inodes.
Each write is refused cleanly (StorageUnavailable, nothing stored), the store keeps serving what it
acknowledged, and writes succeed again once the disk allows them. Real stores on real (small) file systems."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serving import serve_once

import embedsvc.store.local as store_module
from embedsvc.errors import StorageUnavailable
from embedsvc.store import CollectionConfig, Item, LocalStore, SearchOptions

HERE = Path(__file__).parent


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode
    ):
        pytest.skip("needs permission to mount a tmpfs")


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "mnt"
    mount_tmpfs(mount, "size=4m")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture
def few_inodes(tmp_path):
    mount = tmp_path / "mnt"
    mount_tmpfs(mount, "size=16m,nr_inodes=64")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(path: Path) -> None:
    """Takes every free byte of path's file system."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 4096, 512):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


FILE_SIZE_LIMIT = r"""
import resource, sys
import numpy as np
from embedsvc.errors import StorageUnavailable
from embedsvc.store import CollectionConfig, Item, LocalStore, SearchOptions

store = LocalStore(sys.argv[1], checkpoint_every=10**9)
store.create_collection(CollectionConfig("c", 512))
vectors = np.random.default_rng(0).standard_normal((2210, 512)).astype(np.float32)
store.upsert("c", [Item(f"a{k}", v) for k, v in enumerate(vectors[:10])])  # the file: 1024 rows of 2 KiB
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (5 * 2**19, hard))  # 2.5 MiB: the file cannot grow for 1100 more rows
try:
    store.upsert("c", [Item(f"b{k}", v) for k, v in enumerate(vectors[10:1110])])
    print("REFUSED nothing")
except StorageUnavailable as exc:
    print("REFUSED", exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
store.upsert("c", [Item(f"c{k}", v) for k, v in enumerate(vectors[1110:])])
ids = [f"a{k}" for k in range(10)] + [f"c{k}" for k in range(1100)]
items, missing = store.get("c", ids, include_vectors=True)
hits = store.search("c", vectors[[0, 1500, 2209]], SearchOptions(1))
print("FOUND", len(items), len(missing), store.get_collection("c").count, " ".join(row[0].id for row in hits))
"""


def test_a_file_size_limit_refuses_the_write_and_the_next_writes_are_served_from_their_rows(tmp_path):
    """The vector file could not grow (RLIMIT_FSIZE: EFBIG): the write must be refused like a full disk, and
    the store must not believe the file grew, or the next writes' rows lie past the memory map (a search read
    beyond it and answered a wrong id, Get failed with an IndexError)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused, found = proc.stdout.strip().splitlines()[-2:]
    assert refused.startswith("REFUSED ") and "nothing was stored" in refused, refused
    assert found == "FOUND 1110 0 1110 a0 c390 c1099", found
    store = LocalStore(tmp_path / "data")
    try:
        vectors = np.random.default_rng(0).standard_normal((2210, 512)).astype(np.float32)
        stored = store.vector_of("c", "c1099")
        assert np.allclose(stored, vectors[2209] / np.linalg.norm(vectors[2209]), atol=1e-6)
    finally:
        store.close()


def test_a_collection_whose_vector_file_cannot_be_made_is_not_created_and_its_name_stays_free(few_inodes):
    """No free inode: the collection's vector file cannot be created. The collection was committed before the
    file was made, so the name was taken by a collection nobody was told of: re-creating it failed with
    SQLite's IntegrityError, and after a restart it was unavailable ("vector file ... is missing"), as after
    a crash between that commit and the file's creation."""
    data = few_inodes / "data"
    store = LocalStore(data)
    try:
        store.create_collection(CollectionConfig("a", 8))
        store.upsert("a", [Item("x", np.ones(8, np.float32))])
        fillers = []
        try:
            while True:
                path = few_inodes / f"filler-{len(fillers)}"
                path.touch()
                fillers.append(path)
        except OSError:
            pass
        with pytest.raises(StorageUnavailable, match="nothing was stored"):
            store.create_collection(CollectionConfig("b", 8))
        assert [c.config.name for c in store.list_collections()] == ["a"]
        for path in fillers:
            path.unlink()
        store.create_collection(CollectionConfig("b", 8))
        store.upsert("b", [Item("y", np.ones(8, np.float32))])
    finally:
        store.close()
    store = LocalStore(data)
    try:
        assert {c.config.name: c.count for c in store.list_collections()} == {"a": 1, "b": 1}
        assert store.search("b", np.ones((1, 8), np.float32), SearchOptions(1))[0][0].id == "y"
    finally:
        store.close()


def test_a_collection_committed_without_its_vector_file_opens_empty(tmp_path):
    """What a crash between the collection's commit and its vector file's creation left (data directories of
    the code before the fix): no row was ever committed, so a missing file holds nothing and is made anew
    instead of marking the collection unavailable."""
    store = LocalStore(tmp_path)
    store.create_collection(CollectionConfig("a", 8))
    store.close()
    (tmp_path / "indexes" / "collection-1.g0.f32").unlink()
    store = LocalStore(tmp_path)
    try:
        store.upsert("a", [Item("x", np.ones(8, np.float32))])
        assert store.search("a", np.ones((1, 8), np.float32), SearchOptions(1))[0][0].id == "x"
    finally:
        store.close()


def test_a_compaction_the_full_disk_refuses_leaves_its_space_free_for_writes(tiny_disk, monkeypatch):
    """A compaction that runs out of space must give back what it wrote: its half-written generation held the
    last free bytes, and every write was refused until the next restart."""
    monkeypatch.setattr(store_module, "COMPACT_MIN_DEAD", 100)
    data = tiny_disk / "data"
    store = LocalStore(data, checkpoint_every=10**9)
    latest = {}
    try:
        store.create_collection(CollectionConfig("c", 256))
        for version in range(3):  # 900 rows of 1 KiB, 300 of them live
            vectors = unit(300, 256, version)
            store.upsert("c", [Item(f"i{k}", v, {"v": version}) for k, v in enumerate(vectors)])
            latest.update((f"i{k}", v) for k, v in enumerate(vectors))
        filler = tiny_disk / "filler"
        fill(filler)
        os.truncate(filler, filler.stat().st_size - 200 * 1024)  # room for writes, not for the 300 KiB compaction
        with pytest.raises(OSError):
            store.checkpoint("c")
        extra = unit(20, 256, 9)
        store.upsert("c", [Item(f"new{k}", v, {"v": 9}) for k, v in enumerate(extra)])  # refused before the fix
        latest.update((f"new{k}", v) for k, v in enumerate(extra))
        assert sorted(p.name for p in (data / "indexes").glob("*.f32")) == ["collection-1.g0.f32"]
        filler.unlink()
        store.checkpoint("c")  # compacts now
        assert sorted(p.name for p in (data / "indexes").glob("*.f32")) == ["collection-1.g1.f32"]
    finally:
        store.close()
    store = LocalStore(data)
    try:
        items, missing = store.get("c", sorted(latest), include_vectors=True)
        assert not missing and all(np.allclose(i.vector, latest[i.id], atol=1e-6) for i in items)
        ids = sorted(latest)
        assert [row[0].id for row in store.search("c", np.stack([latest[i] for i in ids]), SearchOptions(1))] == ids
    finally:
        store.close()


@pytest.mark.parametrize("left", [0, 8192], ids=["no byte free", "a few KiB free"])
def test_serve_on_a_full_disk_exits_2_saying_to_free_space_and_the_data_is_kept(tiny_disk, left):
    """A full disk at start-up is not a broken database: it was reported as "not a usable SQLite database ...
    move it away to start with an empty store" (advice that throws the data away), or, with no byte free, as
    a traceback from the lock file."""
    data = tiny_disk / "data"
    shutil.copytree(HERE / "data" / "store-format1", data)  # a directory that also needs migrating
    filler = tiny_disk / "filler"
    fill(filler)
    os.truncate(filler, filler.stat().st_size - left)
    proc = serve_once("--data-dir", str(data))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "free space" in lines[-1] and "move it away" not in lines[-1], lines[-1]
    filler.unlink()
    store = LocalStore(data)
    try:
        assert {c.config.name: c.count for c in store.list_collections()} == {"flat": 210, "graph": 210, "empty": 0}
    finally:
        store.close()
