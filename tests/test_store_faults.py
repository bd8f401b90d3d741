"""Integrity: requests and faults that used to take the server or a collection down, store side
(issue 10, items 7, 8, 13, 15, 17): each test failed on the 0.1 main. Real servers, real stores.
"""

from __future__ import annotations

import functools
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import running_server, serve_once, tiny_config

from embedsvc.client import Client, EmbedsvcClientError, Item
from embedsvc.store import CollectionConfig, Item as StoreItem, LocalStore

C = grpc.StatusCode


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except EmbedsvcClientError as exc:
        return exc.code
    return C.OK


@pytest.fixture(scope="module")
def server(make_server):
    return make_server(checkpoint_every=3)


def healthy(server) -> bool:
    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    return status == health_pb2.HealthCheckResponse.SERVING


# -- 7. index strings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "index",
    [
        "HNSW32," * 2900,
        "IDMap,Flat",
        "IDMap2,Flat",
        "NSG32",
        "IVF16,Flat,Refine(Flat)",
        "LSH",
        "PQ4",
        "IVF16,PQ3",
        "PCA64,Flat",
    ],
)
def test_unsupported_index_strings_are_refused_before_faiss_sees_them(client, server, index):
    with pytest.raises(EmbedsvcClientError) as error:
        client.create_collection(f"bad-index-{abs(hash(index)) % 10**6}", dim=16, index=index)
    assert error.value.code == C.INVALID_ARGUMENT
    details = error.value.details
    assert len(details) < 600 and any(word in details for word in ("supported", "at most", "dimension")), details
    assert healthy(server)


@pytest.mark.parametrize("index", ["HNSW16", "IVF16,Flat", "IVF8,PQ4x8", "OPQ4,IVF8,PQ4", "PCA8,HNSW8", "HNSW8_SQ8"])
def test_supported_factory_strings_add_remove_filter_and_reload(tmp_path, index):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((1200, 16)).astype(np.float32)
    store = LocalStore(tmp_path)
    store.create_collection(CollectionConfig("c", 16, index=index))
    store.upsert("c", [StoreItem(f"i{k}", v, {"even": k % 2 == 0}) for k, v in enumerate(vectors)])
    store.delete("c", [f"i{k}" for k in range(10)])
    store.close()
    store = LocalStore(tmp_path)
    from embedsvc.store import Condition, Filter, SearchOptions

    even = Filter((Condition("even", equals=True),))
    hits = store.search("c", vectors[20:25], SearchOptions(5, even, include_metadata=True))
    assert all(h.metadata["even"] for row in hits for h in row) and all(row for row in hits)
    found = {h.id for row in store.search("c", vectors[:10], SearchOptions(20)) for h in row}
    assert not found & {f"i{k}" for k in range(10)}
    store.close()


def test_collection_whose_index_cannot_be_built_is_unavailable_while_others_serve(tiny_spec, tmp_path):
    data = tmp_path / "data"
    store = LocalStore(data)
    store.create_collection(CollectionConfig("good", 4))
    store.create_collection(CollectionConfig("broken", 4))
    store.upsert("good", [StoreItem("g", [1, 0, 0, 0])])
    store.upsert("broken", [StoreItem("b", [0, 1, 0, 0])])
    store.close()
    with sqlite3.connect(data / "store.sqlite3") as db:  # what a 0.1 server accepted and then could not load
        db.execute(
            'UPDATE collections SET config=replace(config, \'"index": "flat"\', \'"index": "NSG32"\') '
            "WHERE name='broken'"
        )
    (data / "indexes" / "collection-2.npz").unlink()
    with running_server(tiny_config(tiny_spec, data)) as server, Client(server.address) as client:
        assert client.search("good", vector=[1, 0, 0, 0], top_k=1)[0].id == "g"
        with pytest.raises(EmbedsvcClientError, match=r"broken.*unavailable") as error:
            client.search("broken", vector=[0, 1, 0, 0], top_k=1)
        assert error.value.code == C.FAILED_PRECONDITION
        assert code_of(lambda: client.upsert("broken", [Item("x", vector=[0, 0, 1, 0])])) == C.FAILED_PRECONDITION
        assert client.get("broken", ["b"])[0][0].id == "b"  # the items are kept and readable
        assert {c.name for c in client.list_collections()} == {"good", "broken"}
        client.drop_collection("broken")  # the way out
        client.create_collection("broken", dim=4)
        assert healthy(server)


@pytest.mark.parametrize(
    "damage",
    [
        "UPDATE collections SET config=json_set(config, '$.model', 5) WHERE name='broken'",
        "UPDATE collections SET created_ms='yesterday' WHERE name='broken'",
        "UPDATE collections SET config=json_set(config, '$.pooling_params', json('[1]')) WHERE name='broken'",
    ],
    ids=["model-number", "created-text", "params-list"],
)
def test_a_catalogue_row_of_wrong_types_leaves_list_collections_and_the_others_serving(tiny_spec, tmp_path, damage):
    """One row holding a number where the model name belongs (or text as its creation time) opened, and every
    ListCollections then failed (INTERNAL: the answer could not be made), for all collections alike."""
    data = tmp_path / "data"
    store = LocalStore(data)
    for name in ("good", "broken"):
        store.create_collection(CollectionConfig(name, 4))
        store.upsert(name, [StoreItem("g", [1, 0, 0, 0])])
    store.close()
    with sqlite3.connect(data / "store.sqlite3") as db:
        db.execute(damage)
    with running_server(tiny_config(tiny_spec, data)) as server, Client(server.address) as client:
        assert {c.name for c in client.list_collections()} == {"good", "broken"}
        assert client.search("good", vector=[1, 0, 0, 0], top_k=1)[0].id == "g"
        assert code_of(lambda: client.search("broken", vector=[1, 0, 0, 0], top_k=1)) == C.FAILED_PRECONDITION
        assert healthy(server)


# -- 8. concurrent checkpoints ----------------------------------------------------------------------


def test_concurrent_writers_crossing_checkpoints_all_get_ok(client, server):
    client.create_collection("busy", dim=8)
    statuses: list = []

    def writer(w: int) -> None:
        rng = np.random.default_rng(w)
        with Client(server.address, timeout=60) as own:
            for batch in range(25):
                items = [Item(f"w{w}-{batch}-{k}", vector=rng.standard_normal(8)) for k in range(4)]
                statuses.append(code_of(functools.partial(own.upsert, "busy", items)))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses.count(C.OK) == len(statuses) == 100
    assert client.get_collection("busy").count == 400


def test_a_failing_checkpoint_never_fails_a_committed_write(client, server):
    client.create_collection("nockpt", dim=4)
    indexes = Path(server.config.data_dir) / "indexes"
    moved = indexes.with_name("indexes-away")
    indexes.rename(moved)
    indexes.write_text("not a folder: every checkpoint write fails")
    try:
        for k in range(10):  # checkpoint_every=3: several checkpoints are asked for, and fail
            client.upsert("nockpt", [Item(f"n{k}", vector=np.eye(4)[k % 4] + 0.1)])
    finally:
        indexes.unlink()
        moved.rename(indexes)
    assert client.get_collection("nockpt").count == 10


# -- 13, 15: statuses ---------------------------------------------------------------------------------


def test_search_params_out_of_range_are_invalid_argument(client):
    client.create_collection("graph", dim=4, index="hnsw")
    client.upsert("graph", [Item("a", vector=[1, 0, 0, 0])])
    from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc

    with grpc.insecure_channel(client.channel._channel.target().decode()) as channel:
        stub = pb_grpc.IndexServiceStub(channel)
        for params in (pb.SearchParams(ef_search=2**32 - 1), pb.SearchParams(nprobe=2**32 - 1)):
            request = pb.SearchRequest(
                collection="graph", queries=[pb.Query(vector=pb.Vector(values=[1, 0, 0, 0]))], params=params
            )
            with pytest.raises(grpc.RpcError) as error:
                stub.Search(request, timeout=10)
            assert error.value.code() == C.INVALID_ARGUMENT and "ef_search" in error.value.details()


def _record_code(result: dict, call) -> None:
    result.setdefault("code", code_of(call))


def test_upsert_racing_drop_is_not_found_never_internal(client, server):
    seen = set()
    for _round in range(15):
        client.create_collection("racy", dim=8)
        items = [Item(f"r{k}", vector=np.random.default_rng(k).standard_normal(8)) for k in range(400)]
        result = {}
        upsert = functools.partial(client.upsert, "racy", items, batch_size=20)
        writer = threading.Thread(target=functools.partial(_record_code, result, upsert))
        writer.start()
        code = code_of(lambda: client.drop_collection("racy"))
        writer.join(60)
        assert code == C.OK
        assert result["code"] in (C.OK, C.NOT_FOUND), result
        seen.add(result["code"])
    assert healthy(server)


@pytest.mark.parametrize("name", ["tnl\n", "tnl\r\n", "\ntnl", "a" * 65])
def test_collection_names_match_in_full(client, name):
    assert code_of(lambda: client.create_collection(name, dim=4)) == C.INVALID_ARGUMENT


# -- 17. operator traps -----------------------------------------------------------------------------


def problem_lines(stderr: str) -> list[str]:
    """What stderr says beyond informational log records."""
    import json

    def informational(line: str) -> bool:
        try:
            return json.loads(line).get("level") in ("DEBUG", "INFO")
        except (ValueError, AttributeError):
            return False

    return [line for line in stderr.splitlines() if line.strip() and not informational(line)]


def serve(*args: str) -> subprocess.CompletedProcess:
    return serve_once(*args)


def test_corrupt_database_is_one_line_and_exit_2(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "store.sqlite3").write_bytes(b"this is not a database, it is garbage" * 100)
    proc = serve("--data-dir", str(data))
    lines = problem_lines(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "not a usable SQLite database" in lines[0] and "backup" in lines[0], lines


def test_a_database_of_another_schema_is_one_line_and_exit_2(tmp_path):
    """A store.sqlite3 whose collections table lacks a column this version reads (another version's copy) made
    `serve` print a traceback ending in sqlite3.OperationalError ("no such column: config")."""
    data = tmp_path / "data"
    store = LocalStore(data)
    store.create_collection(CollectionConfig("c", 4))
    store.close()
    db = sqlite3.connect(data / "store.sqlite3")
    db.execute("ALTER TABLE collections RENAME COLUMN config TO settings")
    db.commit()
    db.close()
    proc = serve("--data-dir", str(data))
    lines = problem_lines(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "collections.config" in lines[0] and "another version" in lines[0], lines


@pytest.fixture
def small_mount(tmp_path):
    """A small tmpfs of our own, to fill the data directory's disk as a real one fills."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs permission to mount a tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_gives_unavailable_naming_the_directory_and_recovers(tiny_spec, small_mount):
    data = small_mount / "data"
    filler = small_mount / "filler"
    with running_server(tiny_config(tiny_spec, data)) as server, Client(server.address) as client:
        client.create_collection("full", dim=256)
        client.upsert("full", [Item("before", vector=np.eye(256)[0])])
        with open(filler, "wb", buffering=0) as f:  # take every free byte
            for chunk in (1 << 20, 4096, 512):
                try:
                    while True:
                        f.write(b"\0" * chunk)
                except OSError:
                    pass
        try:
            rng = np.random.default_rng(0)
            with pytest.raises(EmbedsvcClientError, match=str(data)) as error:
                for k in range(50):  # SQLite refuses once its WAL cannot grow
                    client.upsert("full", [Item(f"during-{k}-{j}", vector=rng.standard_normal(256)) for j in range(64)])
            assert error.value.code == C.UNAVAILABLE and "nothing was stored" in error.value.details
            assert client.search("full", vector=np.eye(256)[0], top_k=1)[0].id == "before"  # reads still serve
            assert healthy(server)
        finally:
            filler.unlink()
        client.upsert("full", [Item("after", vector=np.eye(256)[1])])  # recovered by itself
        assert client.search("full", vector=np.eye(256)[1], top_k=1)[0].id == "after"
        stored = client.get_collection("full").count
        assert stored == 2 + 64 * k  # the refused batch is all absent, every acknowledged one present
