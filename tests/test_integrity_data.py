"""Integrity, data loss and silent corruption (issue 10, items 1-6): each test failed on the 0.1 main.

Real servers on 127.0.0.1, real stores on disk, real models.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from cli_runner import run_cli
from conftest import png_bytes
from serving import running_server, serve_once, tiny_config, tiny_server
from test_store_faults import problem_lines

from embedsvc.client import Client, EmbedsvcClientError, Item
from embedsvc.errors import DataDirLocked, FailedPrecondition
from embedsvc.pooling import NetVLADState
from embedsvc.store import CollectionConfig, Item as StoreItem, LocalStore, SearchOptions
from embedsvc.store.checkpoint import read_checkpoint, write_checkpoint


def unit(rows: int, dim: int = 4, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# -- 1. single-writer lock ------------------------------------------------------------------------


def test_second_opener_of_a_live_data_dir_exits_2_naming_the_holder(tiny_spec, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes())
    data = tmp_path / "data"
    with running_server(tiny_config(tiny_spec, data)) as server:
        with Client(server.address) as client:
            client.create_collection("kv", dim=4)
            client.upsert("kv", [Item("a", vector=[1, 0, 0, 0])])
        # processes of their own: the lock's holder is this process
        second = serve_once("--data-dir", str(data), process=True, timeout=180)
        local = run_cli("index", str(images), "--collection", "kv", "--local", str(data), cwd=tmp_path, process=True)
        for proc in (second, local):
            lines = problem_lines(proc.stderr)
            assert proc.returncode == 2, proc.stderr
            assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert f"pid {os.getpid()}" in lines[0] and "--address" in lines[0], lines[0]
        with Client(server.address) as client:  # the live server is untouched
            assert client.get_collection("kv").count == 1
    reopened = LocalStore(data)  # released at shutdown
    assert reopened.get_collection("kv").count == 1
    reopened.close()


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from embedsvc.store import LocalStore; "
            f"LocalStore({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match=f"pid {holder.pid}"):
            LocalStore(tmp_path)
    finally:
        holder.kill()
        holder.wait(10)
    LocalStore(tmp_path).close()  # the kernel released the lock with the process


def test_deleting_the_lock_file_does_not_let_a_second_opener_in(tiny_spec, tmp_path):
    """Issue 22 item 6: `rm DATA_DIR/LOCK` beside a live server let a second store open the directory."""
    data = tmp_path / "data"
    with running_server(tiny_config(tiny_spec, data)) as server:
        with Client(server.address) as client:
            client.create_collection("kv", dim=4)
        (data / "LOCK").unlink()
        with pytest.raises(DataDirLocked) as refused:
            LocalStore(data)
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and "--address" in message, message
        assert "never delete" in message.lower() and "LOCK" in message, message
        with Client(server.address) as client:  # the live server is untouched and still writes
            client.upsert("kv", [Item("a", vector=[1, 0, 0, 0])])
            assert client.get_collection("kv").count == 1
    reopened = LocalStore(data)  # released at shutdown
    assert reopened.get_collection("kv").count == 1
    reopened.close()


def test_a_holder_in_another_process_is_named_even_without_its_lock_file(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from embedsvc.store import LocalStore; "
            f"LocalStore({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "LOCK").unlink()
        with pytest.raises(DataDirLocked, match=f"(?i)pid {holder.pid}\\b.*never delete"):
            LocalStore(tmp_path)
        (tmp_path / "LOCK").write_text("")  # a LOCK file put back empty changes nothing either
        with pytest.raises(DataDirLocked, match=f"pid {holder.pid}\\b"):
            LocalStore(tmp_path)
    finally:
        holder.kill()
        holder.wait(10)
    LocalStore(tmp_path).close()


RACER = """
import sys
from embedsvc.errors import DataDirLocked
from embedsvc.store import LocalStore
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    try:
        LocalStore(sys.argv[1]).close(checkpoint=False)
    except DataDirLocked:
        pass
"""


def test_two_processes_racing_to_open_get_the_lock_or_its_refusal(tmp_path):
    """Openers started together on one directory: each gets the store or DataDirLocked. A write probe of one fixed
    name, made and removed before the lock, let one opener remove the other's and report the directory 'not
    writable: No such file or directory' (about 1 round in 100 on 2 cores)."""
    rounds = 1000
    racer = subprocess.Popen(
        [sys.executable, "-c", RACER, str(tmp_path), str(rounds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert racer.stdout.readline().strip() == "ready"
    outcomes = {"opened": 0, "locked": 0}  # either may be 0: which process wins each round is the scheduler's
    try:
        for _ in range(rounds):
            try:
                LocalStore(tmp_path).close(checkpoint=False)
                outcomes["opened"] += 1
            except DataDirLocked:
                outcomes["locked"] += 1
    finally:
        _, err = racer.communicate(timeout=120)
    assert racer.returncode == 0, err  # the racer met nothing but the lock either
    assert sum(outcomes.values()) == rounds, outcomes


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_lock_path_that_is_not_a_file_is_a_clear_refusal(tmp_path, kind):
    """`LOCK` made a directory (or a FIFO) by hand: a one-line refusal naming it, not an OSError traceback."""
    lock = tmp_path / "LOCK"
    lock.mkdir() if kind == "directory" else os.mkfifo(lock)
    with pytest.raises(FailedPrecondition, match=f"{lock}.*not a regular file") as refused:
        LocalStore(tmp_path)
    assert f"is a {kind}" in str(refused.value).lower(), refused.value
    lock.rmdir() if kind == "directory" else lock.unlink()
    LocalStore(tmp_path).close()  # and the directory itself was left unlocked


# -- 2. checkpoints tied to their store and collection --------------------------------------------


def make_store(path, n: int = 30, name: str = "c", seed: int = 0) -> np.ndarray:
    store = LocalStore(path)
    store.create_collection(CollectionConfig(name, 4))
    vectors = unit(n, seed=seed)
    store.upsert(name, [StoreItem(f"{name}-{i}", v) for i, v in enumerate(vectors)])
    store.close()  # writes the checkpoint
    return vectors


def assert_serves_exactly(path, name: str, vectors: np.ndarray) -> None:
    store = LocalStore(path)
    try:
        assert store.get_collection(name).count == len(vectors)
        hits = store.search(name, vectors, SearchOptions(top_k=1))
        assert [h[0].id for h in hits] == [f"{name}-{i}" for i in range(len(vectors))]
        assert np.allclose([h[0].score for h in hits], 1.0, atol=1e-5)
    finally:
        store.close()


def test_checkpoint_of_a_deleted_database_is_not_adopted(tmp_path):
    make_store(tmp_path, n=30, name="c")
    checkpoint = tmp_path / "indexes" / "collection-1.npz"
    assert checkpoint.exists()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"store.sqlite3{suffix}").unlink(missing_ok=True)
    store = LocalStore(tmp_path)  # a new, empty store: the orphan checkpoint goes at start
    assert not checkpoint.exists()
    store.create_collection(CollectionConfig("new", 4))  # gets id 1 again
    store.upsert("new", [StoreItem("only", [0, 0, 1, 0])])
    store.close(checkpoint=False)
    store = LocalStore(tmp_path)
    hits = store.search("new", np.eye(4, dtype=np.float32), SearchOptions(top_k=5))
    assert {h.id for row in hits for h in row} == {"only"}
    store.close()


def test_checkpoint_of_another_store_is_rejected_and_rebuilt(tmp_path, caplog):
    vectors = make_store(tmp_path / "a", seed=1)
    make_store(tmp_path / "b", seed=2)  # the same collection id and config in another store
    foreign = tmp_path / "b" / "indexes" / "collection-1.npz"
    foreign.write_bytes((tmp_path / "a" / "indexes" / "collection-1.npz").read_bytes())
    del vectors
    with caplog.at_level(logging.WARNING, logger="embedsvc.store.local"):
        assert_serves_exactly(tmp_path / "b", "c", unit(30, seed=2))
    warnings = [r for r in caplog.records if "rebuilding its index" in r.getMessage()]
    assert len(warnings) == 1 and "another store" in warnings[0].getMessage()


@pytest.mark.parametrize("damage", ["undeserialisable blob", "no lsn", "empty index", "another collection"])
def test_unusable_checkpoints_mean_a_rebuild(tmp_path, damage, caplog):
    vectors = make_store(tmp_path)
    store = LocalStore(tmp_path)
    store.create_collection(CollectionConfig("other", 4))
    store.upsert("other", [StoreItem("x", [1, 0, 0, 0])])
    store.close()
    path = tmp_path / "indexes" / "collection-1.npz"
    header, arrays = read_checkpoint(path)
    if damage == "undeserialisable blob":
        arrays["index"] = np.frombuffer(b"not a faiss index" * 10, dtype=np.uint8)
    elif damage == "no lsn":
        header.pop("lsn")
    elif damage == "empty index":
        import faiss

        arrays["index"] = faiss.serialize_index(faiss.IndexIDMap2(faiss.IndexFlatIP(4)))
    if damage == "another collection":
        path.write_bytes((tmp_path / "indexes" / "collection-2.npz").read_bytes())
    else:
        write_checkpoint(path, header, arrays)
    with caplog.at_level(logging.WARNING, logger="embedsvc.store.local"):
        assert_serves_exactly(tmp_path, "c", vectors)
    assert sum("rebuilding its index" in r.getMessage() for r in caplog.records) == 1


def test_leftover_temporary_files_are_removed_at_start(tmp_path):
    make_store(tmp_path)
    leftover = tmp_path / "indexes" / ".collection-1.npz.tmp-12345"
    leftover.write_bytes(b"half a checkpoint")
    LocalStore(tmp_path).close()
    assert not leftover.exists()


# -- 3, 4, 5, 6: through a real server --------------------------------------------------------------


@pytest.fixture(scope="module")
def server(make_server):
    return make_server()


def test_recreated_name_uses_its_new_pooling(client):
    image = png_bytes(color=(200, 40, 90))
    client.create_collection("photos", pooling="cls")
    client.upsert("photos", [Item("a", image=image)])
    client.search("photos", text="a red circle", top_k=1)  # caches the cls pooling
    client.drop_collection("photos")
    client.create_collection("photos", pooling="avg")
    client.upsert("photos", [Item("a", image=image)])
    stored = client.get("photos", ["a"], include_vectors=True)[0][0].vector
    expected = client.embed([image, "a red circle"], poolings=["avg"]).vectors["avg"]
    assert np.abs(stored - expected[0]).max() < 1e-5
    hit = client.search("photos", text="a red circle", top_k=1)[0]
    assert hit.score == pytest.approx(float(expected[0] @ expected[1]), abs=1e-5)


def test_fit_racing_upsert_never_mixes_codebooks(client, server, tiny_encoder):
    from embedsvc.pooling import bind_pooling

    images = [png_bytes(color=(20 * k % 256, 255 - 10 * k, 60 + 5 * k)) for k in range(48)]
    samples = [png_bytes(color=(9 * k % 256, 30, 250 - 9 * k)) for k in range(16)]
    decoded = [__import__("embedsvc.encoder", fromlist=["decode_image"]).decode_image(b) for b in images]
    features = tiny_encoder.encode_images(decoded)
    outcomes = {"both ok": 0, "upsert first": 0}
    for trial in range(20):
        name = f"vlad-{trial}"
        client.create_collection(name, pooling="netvlad:clusters=4")
        client.fit_pooling(name, samples, params={"seed": "0"})
        errors = []

        def upsert(name=name, errors=errors):
            try:
                client.upsert(name, [Item(f"i{k}", image=b) for k, b in enumerate(images)], batch_size=48)
            except EmbedsvcClientError as exc:
                errors.append(exc)

        def refit(name=name, trial=trial):
            try:
                client.fit_pooling(name, samples, params={"seed": str(trial + 1)})
            except EmbedsvcClientError as exc:
                assert exc.code == grpc.StatusCode.FAILED_PRECONDITION, exc  # the upsert committed first
                outcomes["upsert first"] += 1
                return
            outcomes["both ok"] += 1

        threads = [threading.Thread(target=upsert), threading.Thread(target=refit)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        state = NetVLADState.from_bytes(server.server.store.pooling_state(name))
        expected = bind_pooling("netvlad:clusters=4", state)(features).numpy()
        stored = client.get(name, [f"i{k}" for k in range(len(images))], include_vectors=True)[0]
        assert np.abs(np.stack([s.vector for s in stored]) - expected).max() < 1e-4, f"trial {trial}: mixed codebooks"
        client.drop_collection(name)
    assert sum(outcomes.values()) == 20


def test_cosine_normalisation_never_overflows(client):
    client.create_collection("cos", dim=4)
    client.upsert(
        "cos",
        [Item("huge", vector=[3e38] * 4), Item("tiny", vector=[1e-30] * 4), Item("denormal", vector=[1e-45, 0, 0, 0])],
    )
    items = {i.id: i.vector for i in client.get("cos", ["huge", "tiny", "denormal"], include_vectors=True)[0]}
    assert np.allclose(items["huge"], 0.5) and np.allclose(items["tiny"], 0.5)
    assert np.allclose(items["denormal"], [1, 0, 0, 0])
    hits = client.search("cos", vector=[3e38] * 4, top_k=3)
    assert all(np.isfinite(h.score) for h in hits) and hits[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(EmbedsvcClientError, match="zero vector") as error:
        client.upsert("cos", [Item("zero", vector=[0, 0, 0, 0])])
    assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_inner_product_scores_stay_finite(client):
    client.create_collection("ip", dim=4, metric="inner_product")
    client.upsert("ip", [Item("big", vector=[1e17, 0, 0, 0])])
    for bad in ([3e38] * 4, [1e19, 0, 0, 0]):
        with pytest.raises(EmbedsvcClientError, match="overflow float32") as error:
            client.upsert("ip", [Item("x", vector=bad)])
        assert error.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(EmbedsvcClientError, match="overflow float32"):
            client.search("ip", vector=bad, top_k=1)
    hit = client.search("ip", vector=[1e17, 0, 0, 0], top_k=1)[0]
    assert np.isfinite(hit.score) and hit.score == pytest.approx(1e34, rel=1e-5)


@pytest.mark.parametrize("p", [3, 16, 64])
def test_gem_is_finite_and_exact_for_every_allowed_p(client, p):
    texts = ["a small green triangle in the bottom right", "two red stars"]
    result = client.embed(texts, poolings=[f"gem:p={p}"], include_tokens=True)
    vectors = result.vectors[f"gem:p={p}"]
    assert np.isfinite(vectors).all()
    for vector, tokens in zip(vectors, result.tokens):  # float64 reference of the formula
        x = tokens.astype(np.float64)
        m = np.mean(np.sign(x) * np.abs(x) ** p, axis=0)
        reference = np.sign(m) * np.abs(m) ** (1 / p)
        assert np.abs(vector - reference / np.linalg.norm(reference)).max() < 1e-4


# -- a model name that now loads other weights ----------------------------------------------------


def test_collection_refuses_to_embed_with_other_weights_than_its_vectors_came_from(tiny_spec, tmp_path):
    """A models file that points a collection's model name at new weights would have mixed two unrelated
    vector spaces in one collection, silently: content upserts and content queries are FAILED_PRECONDITION
    naming both fingerprints, vector search and reads keep working, and the original weights serve again."""
    import hashlib
    from dataclasses import replace

    from conftest import TINY_ARCH, _save_random

    def file_sha256(path):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()

    other = replace(tiny_spec, checkpoint=str(_save_random(TINY_ARCH, tmp_path / "retrained.pt", seed=7)))
    data = tmp_path / "data"
    with tiny_server(tiny_spec, data) as server, Client(server.address) as client:
        info = client.create_collection("c", model=tiny_spec.name)
        client.upsert("c", [Item("a", text="a red circle")])
        (stored,), _ = client.get("c", ["a"], include_vectors=True)
        recorded = server.server.store.get_collection("c").config
    with tiny_server(other, data) as server, Client(server.address) as client:
        for attempt in (
            lambda: client.upsert("c", [Item("b", text="a blue star")]),
            lambda: client.search("c", text="a red circle"),
        ):
            with pytest.raises(EmbedsvcClientError) as error:
                attempt()
            assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION
            message = str(error.value)
            assert file_sha256(tiny_spec.checkpoint)[:12] in message and file_sha256(other.checkpoint)[:12] in message
        assert [h.id for h in client.search("c", vector=stored.vector, top_k=1)] == ["a"]
        assert client.get_collection("c").count == 1
        client.upsert("c", [Item("v", vector=stored.vector)])  # vectors need no model
    with tiny_server(tiny_spec, data) as server, Client(server.address) as client:
        client.upsert("c", [Item("b", text="a blue star")])
        assert client.get_collection("c").count == 3
    assert info.name == "c" and recorded.weights == file_sha256(tiny_spec.checkpoint)


def test_collections_without_recorded_weights_keep_embedding(tiny_spec, tmp_path):
    """Collections created before weights were recorded (no "weights" in their config) are not refused."""
    store = LocalStore(tmp_path / "data")
    store.create_collection(CollectionConfig("old", 32, model=tiny_spec.name, pooling="cls"))
    store.close()
    with tiny_server(tiny_spec, tmp_path / "data") as server, Client(server.address) as client:
        client.upsert("old", [Item("a", text="a red circle")])
        assert [h.id for h in client.search("old", text="a red circle", top_k=1)] == ["a"]


def test_ray_targets_refuse_a_model_name_that_now_loads_other_weights(tiny_spec, tmp_path):
    """`index --engine ray` hands its workers the model name: the parent checks the weights first."""
    from dataclasses import replace

    from conftest import TINY_ARCH, _save_random

    from embedsvc.errors import FailedPrecondition
    from embedsvc.jobs.index import IndexJob, _LocalSink
    from embedsvc.models import MODEL_REGISTRY, register_model

    job = IndexJob(source="unused", collections=["c=cls"], local=str(tmp_path / "data"), model=tiny_spec.name)
    register_model(tiny_spec, replace=True)
    sink = _LocalSink(job, [("c", "cls")])
    try:
        assert sink.targets()[0] == tiny_spec.name
        register_model(
            replace(tiny_spec, checkpoint=str(_save_random(TINY_ARCH, tmp_path / "new.pt", seed=8))), replace=True
        )
        with pytest.raises(FailedPrecondition, match="now loads weights sha256"):
            sink.targets()
    finally:
        sink.close()
        MODEL_REGISTRY.pop(tiny_spec.name, None)


def test_ray_workers_refuse_weights_other_than_the_collections(tiny_spec, tmp_path):
    """The parent's check hashes the file; each Ray worker loads it again, later and maybe on another node. A file
    replaced in between (or another node's copy) embedded into the collection with other weights, silently: each
    worker checks the fingerprint of the bytes it loaded itself."""
    import shutil
    from dataclasses import replace

    from conftest import TINY_ARCH, _save_random

    from embedsvc.jobs.index import IndexJob, _LocalSink
    from embedsvc.jobs.ray_engine import EmbedActor
    from embedsvc.models import MODEL_REGISTRY, register_model

    weights = tmp_path / "weights.pt"
    shutil.copy(tiny_spec.checkpoint, weights)
    spec = replace(tiny_spec, checkpoint=str(weights))
    register_model(spec, replace=True)
    job = IndexJob(source="unused", collections=["c=cls"], local=str(tmp_path / "data"), model=spec.name)
    sink = _LocalSink(job, [("c", "cls")])
    try:
        model, targets = sink.targets()  # the parent's check passes...
        assert EmbedActor(spec, targets).dims == [32]  # ...and a worker loading the same file embeds
        os.replace(_save_random(TINY_ARCH, tmp_path / "new.pt", seed=9), weights)  # ...then the file changes
        with pytest.raises(FailedPrecondition, match="now loads weights sha256"):
            EmbedActor(spec, targets)
    finally:
        sink.close()
        MODEL_REGISTRY.pop(spec.name, None)
