"""Two embedsvc servers on one Milvus: stateless replicas; bulk jobs writing to Milvus.

Milvus Lite is single-process when opened as a file, so the replicas meet at its gRPC server
(`python -m milvus_lite server`, the package's documented entry point) on a local TCP port, as they
would meet at a Milvus Standalone or cluster address.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli
from conftest import png_bytes
from serving import running_server, serve_once, tiny_config

from embedsvc.client import Client, Item
from embedsvc.datasets import write_scenes
from embedsvc.errors import Aborted, AlreadyExists
from embedsvc.service.config import ServerConfig
from embedsvc.store import CollectionConfig, CollectionNotFound, Item as StoreItem, open_store

pytest.importorskip("milvus_lite")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def lite_server(data: Path) -> Iterator[str]:
    """A Milvus Lite gRPC server on 127.0.0.1. One worker thread: Milvus Lite's server documents that its
    engine is not safe under concurrent writes to one collection (a Milvus server is), so requests are
    applied one at a time, as a Milvus server's log would order them; replicas still interleave freely."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "milvus_lite",
            "server",
            "--data-dir",
            str(data),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-workers",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "milvus_lite server did not start"
            time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    """One Milvus Lite server shared by every client of this module."""
    with lite_server(tmp_path_factory.mktemp("milvus") / "lite") as uri:
        yield uri


def replica_config(spec, tmp_path, uri: str, name: str) -> ServerConfig:
    # Each replica gets its own (unused) data_dir: nothing of the milvus back end is kept there.
    return tiny_config(spec, tmp_path / name, store_backend="milvus", milvus_uri=uri)


def test_two_replicas_serve_the_same_collections(tiny_spec, tmp_path, milvus_uri):
    with (
        running_server(replica_config(tiny_spec, tmp_path, milvus_uri, "a")) as a,
        running_server(replica_config(tiny_spec, tmp_path, milvus_uri, "b")) as b,
        Client(a.address) as ca,
        Client(b.address) as cb,
    ):
        ca.create_collection("shared", pooling="cls")
        ca.upsert(
            "shared",
            [
                Item("red", text="a red circle", metadata={"k": "x"}),
                Item("blue", text="a blue star", metadata={"k": "y"}),
            ],
        )
        # Strong consistency: the write acknowledged by a is in b's very next search.
        assert cb.search("shared", text="a red circle", top_k=2)[0].id == "red"
        assert [h.id for h in cb.search("shared", text="a red circle", filter={"k": "y"})] == ["blue"]
        cb.delete("shared", ["blue"])
        assert ca.get_collection("shared").count == 1
        assert {c.name for c in cb.list_collections()} >= {"shared"}
        assert not list((tmp_path / "a").glob("*.sqlite3")) and not list((tmp_path / "b").glob("*.sqlite3"))


def test_a_refit_through_one_replica_is_seen_by_the_other_by_version(tiny_spec, tmp_path, milvus_uri):
    samples_1 = [png_bytes(color=(i * 20, 100, 255 - i * 20)) for i in range(10)]
    samples_2 = [png_bytes(color=(255 - i * 20, i * 25, 40)) for i in range(10)]
    with (
        running_server(replica_config(tiny_spec, tmp_path, milvus_uri, "a")) as a,
        running_server(replica_config(tiny_spec, tmp_path, milvus_uri, "b")) as b,
        Client(a.address) as ca,
        Client(b.address) as cb,
    ):
        ca.create_collection("vlad", pooling="netvlad:clusters=4")
        ca.fit_pooling("vlad", samples_1, {"seed": 1})
        assert cb.search("vlad", text="a red circle", top_k=1) == []  # b loads and caches version 1
        ca.fit_pooling("vlad", samples_2, {"seed": 2})  # a re-fits: version 2, another codebook
        assert b.server.store.get_collection("vlad").pooling_version == 2
        cb.upsert("vlad", [Item("t", text="a red circle"), Item("i", image=samples_2[3])])
        # b pooled with version 2: a (which fitted it) finds the items at cosine 1 with its own embedding.
        for query, item_id in (({"text": "a red circle"}), "t"), ({"image": samples_2[3]}, "i"):
            top = ca.search("vlad", top_k=1, **query)[0]
            assert top.id == item_id and top.score == pytest.approx(1.0, abs=1e-5)

        # Dropped and re-created through b: same name, same version number 1, different uid and codebook.
        cb.drop_collection("vlad")
        cb.create_collection("vlad", pooling="netvlad:clusters=4")
        cb.fit_pooling("vlad", samples_1, {"seed": 3})
        assert a.server.store.get_collection("vlad").pooling_version == 1
        ca.upsert("vlad", [Item("t", text="a red circle")])
        top = cb.search("vlad", text="a red circle", top_k=1)[0]
        assert top.id == "t" and top.score == pytest.approx(1.0, abs=1e-5)


def test_vectors_pooled_before_a_concurrent_refit_are_refused(milvus_uri):
    """Two clients of one Milvus: a write carrying the pooling version it was pooled with loses to a re-fit."""
    first, second = open_store("milvus", milvus_uri=milvus_uri), open_store("milvus", milvus_uri=milvus_uri)
    first.create_collection(CollectionConfig("race", 4))
    version = first.set_pooling_state("race", b"v1")
    seen = second.get_collection("race").pooling_version
    assert seen == version == 1
    first.set_pooling_state("race", b"v2")  # collection still empty: allowed
    with pytest.raises(Aborted, match="re-fitted"):
        second.upsert("race", [StoreItem("a", np.ones(4, np.float32))], pooling_version=seen)
    assert second.get_collection("race").count == 0 and second.pooling_state("race") == b"v2"
    first.drop_collection("race")
    first.close()
    second.close()


RACE_BATCHES, RACE_BATCH = 3, 5


def physical_collections(uri: str) -> set[str]:
    """The Milvus collections embedsvc made for its collections (all but the catalogue), read with pymilvus."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    try:
        return {n for n in client.list_collections() if n.startswith("embedsvc_") and n != "embedsvc_catalogue"}
    finally:
        client.close()


def create_and_write(store, name: str, side: int, barrier: threading.Barrier) -> tuple[bool, list[str]]:
    """One replica: create `name` at the barrier, then upsert batches into it; (created, acknowledged ids)."""
    barrier.wait(30)
    try:
        store.create_collection(CollectionConfig(name, 4))
        created = True
    except AlreadyExists:
        created = False
    acknowledged = []
    for batch in range(RACE_BATCHES):
        ids = [f"{side}-{batch}-{i}" for i in range(RACE_BATCH)]
        store.upsert(name, [StoreItem(i, np.full(4, 1.0 + side, np.float32)) for i in ids])
        acknowledged += ids
    return created, acknowledged


@pytest.mark.parametrize("races", [5, pytest.param(20, marks=pytest.mark.slow)])  # ~0.75 s a race
def test_replicas_creating_one_name_at_once_get_one_ok_and_lose_no_acknowledged_item(tmp_path, races):
    """Two replicas create the same name at once, then write into it at once: exactly one creation succeeds,
    every acknowledged item is readable through both, and Milvus holds no collection the catalogue lost."""
    with lite_server(tmp_path / "lite") as uri:
        stores = [open_store("milvus", milvus_uri=uri) for _ in range(2)]
        double, lost, split = [], {}, []
        with ThreadPoolExecutor(2) as pool:
            for race in range(races):
                name, barrier = f"race{race}", threading.Barrier(2)
                outcomes = [
                    f.result()
                    for f in [pool.submit(create_and_write, stores[side], name, side, barrier) for side in (0, 1)]
                ]
                if all(created for created, _ in outcomes):
                    double.append(name)
                acknowledged = [i for _, ids in outcomes for i in ids]
                for store in stores:
                    _, missing = store.get(name, acknowledged)
                    if missing:
                        lost[name] = missing
                if len({store.get_collection(name).uid for store in stores}) != 1:
                    split.append(name)
        reachable = {f"embedsvc_{c.uid}" for c in stores[0].list_collections()}
        orphans = physical_collections(uri) - reachable
        for store in stores:
            store.close()
    failures = {
        "both got OK": double,
        "acknowledged items lost": lost,
        "replicas disagree": split,
        "collections no catalogue row reaches": sorted(orphans),
    }
    assert not any(failures.values()), f"{races} races: {failures}"


REFIT_CYCLES = 5


def test_a_refit_racing_a_drop_and_recreate_never_touches_the_new_incarnation(milvus_uri):
    """One replica re-fits a name over and over while another drops and re-creates it: every re-creation
    succeeds and serves its own items, through both replicas (a re-fit commits to its own incarnation only)."""
    fitter, admin = open_store("milvus", milvus_uri=milvus_uri), open_store("milvus", milvus_uri=milvus_uri)
    admin.create_collection(CollectionConfig("refit", 4))
    stop = threading.Event()

    def refit() -> int:
        fits = 0
        while not stop.is_set():
            try:
                fitter.set_pooling_state("refit", b"codebook", require_empty=False)
                fits += 1
            except CollectionNotFound:  # between a drop and the re-create
                pass
        return fits

    with ThreadPoolExecutor(1) as pool:
        fits = pool.submit(refit)
        try:
            for cycle in range(REFIT_CYCLES):
                admin.drop_collection("refit")
                info = admin.create_collection(CollectionConfig("refit", 4))
                admin.upsert("refit", [StoreItem(f"c{cycle}", np.ones(4, np.float32))])
                for store in (admin, fitter):
                    assert store.get_collection("refit").uid == info.uid, f"cycle {cycle}"
                    assert store.get("refit", [f"c{cycle}"])[1] == [], f"cycle {cycle}"
        finally:
            stop.set()
        assert fits.result() > 0
    admin.drop_collection("refit")
    fitter.close()
    admin.close()


def test_creates_abandoned_midway_and_orphaned_collections_are_swept(milvus_uri):
    """A replica that died mid-create leaves its claim, and its Milvus collection if it got that far; earlier
    versions left collections no catalogue row names. Those an hour old are swept, at open or by a create of the
    name; a create still in progress and a collection made a moment ago are left alone."""
    from pymilvus import MilvusClient

    from embedsvc.store.milvus import MilvusStore, _new_uid

    def hour_ago() -> float:
        return time.time() - 3600

    died = MilvusStore(milvus_uri, clock=hour_ago)  # a replica whose claims are an hour old
    built = died._claim(CollectionConfig("died_built", 4))  # died after building its collection
    died._build(built)
    busy = open_store("milvus", milvus_uri=milvus_uri)
    in_progress = busy._claim(CollectionConfig("busy", 4))  # still creating: claimed and built, not committed
    busy._build(in_progress)
    client = MilvusClient(uri=milvus_uri)
    old_orphan, new_orphan = (f"embedsvc_{_new_uid(int(t * 1000))}" for t in (hour_ago(), time.time()))
    legacy_orphan = f"embedsvc_{uuid.uuid4().hex}"  # an earlier version's loser of a create race
    for physical in (old_orphan, new_orphan, legacy_orphan):
        client.create_collection(physical, dimension=4)

    fresh = open_store("milvus", milvus_uri=milvus_uri)  # opening sweeps
    left = physical_collections(milvus_uri)
    assert not {built.physical, old_orphan, legacy_orphan} & left
    assert {in_progress.physical, new_orphan} <= left
    claimed = died._claim(CollectionConfig("died_claimed", 4))  # died after claiming, after that sweep
    for name in ("died_built", "died_claimed"):  # both names are free again
        assert fresh.create_collection(CollectionConfig(name, 4)).uid not in (built.uid, claimed.uid)
        fresh.drop_collection(name)
    busy._commit(in_progress, time.monotonic())  # the create in progress completes unharmed
    assert fresh.get_collection("busy").uid == in_progress.uid
    fresh.drop_collection("busy")
    client.drop_collection(new_orphan)
    client.close()
    for store in (died, busy, fresh):
        store.close()


def test_a_create_waiting_on_a_dead_replicas_claim_proceeds_once_that_claim_is_swept(milvus_uri):
    """A replica that died between claim and commit blocks the name until its claim is CLAIM_TTL_S old; a create
    that yielded to it must claim again once it is swept, not wait out CREATE_LIMIT_S and answer ABORTED."""
    from embedsvc.store.milvus import CLAIM_TTL_S, CREATE_LIMIT_S, MilvusStore

    expires_in = 3.0

    def nearly_stale() -> float:  # the dead replica's claim turns abandoned `expires_in` s from now
        return time.time() - (CLAIM_TTL_S - expires_in)

    died = MilvusStore(milvus_uri, clock=nearly_stale)
    dead = died._claim(CollectionConfig("after_death", 4))
    died._build(dead)
    survivor = open_store("milvus", milvus_uri=milvus_uri)
    started = time.monotonic()
    info = survivor.create_collection(CollectionConfig("after_death", 4))
    took = time.monotonic() - started
    assert info.uid != dead.uid and survivor.get_collection("after_death").uid == info.uid
    assert took < CREATE_LIMIT_S - expires_in, f"the create waited {took:.1f} s"
    assert f"embedsvc_{dead.uid}" not in physical_collections(milvus_uri)
    survivor.drop_collection("after_death")
    for store in (died, survivor):
        store.close()


@pytest.mark.slow  # waits out CREATE_LIMIT_S (20 s)
def test_a_create_blocked_by_a_dead_replicas_claim_says_when_to_retry(milvus_uri):
    from embedsvc.store.milvus import CLAIM_TTL_S, MilvusStore

    age = 30.0
    died = MilvusStore(milvus_uri, clock=lambda: time.time() - age)
    dead = died._claim(CollectionConfig("blocked", 4))
    survivor = open_store("milvus", milvus_uri=milvus_uri)
    with pytest.raises(Aborted, match=r"claimed \d+ s ago; if that replica died.*retry in (\d+) s") as caught:
        survivor.create_collection(CollectionConfig("blocked", 4))
    retry_in = int(re.search(r"retry in (\d+) s", str(caught.value)).group(1))
    assert 0 < retry_in <= CLAIM_TTL_S - age
    died._purge(dead.uid)
    for store in (died, survivor):
        store.close()


def test_listing_and_checkpointing_while_another_replica_drops_collections(milvus_uri):
    """A replica listing (or checkpointing every collection, or starting up, which lists) while another drops
    collections answers with those still there; a collection dropped under it is left out, not NOT_FOUND."""
    lister, dropper = open_store("milvus", milvus_uri=milvus_uri), open_store("milvus", milvus_uri=milvus_uri)
    names = [f"listed{i:02d}" for i in range(12)]
    for name in names:
        dropper.create_collection(CollectionConfig(name, 4))
    errors, listings, stop = [], [], threading.Event()

    def list_until_stopped() -> None:
        while not stop.is_set():
            for call in (lister.list_collections, lister.checkpoint):
                try:
                    listings.append(call())
                except Exception as exc:  # noqa: BLE001 - every failure is the finding
                    errors.append(f"{call.__name__}: {type(exc).__name__}: {exc}")

    thread = threading.Thread(target=list_until_stopped)
    thread.start()
    try:
        for name in reversed(names):  # the lister reads them in name order: the last ones dropped under it
            dropper.drop_collection(name)
    finally:
        stop.set()
        thread.join(60)
    assert not errors, f"{len(errors)} failures, e.g. {errors[:3]}"
    assert len(listings) > 2 and not {c.config.name for c in lister.list_collections()} & set(names)
    for store in (lister, dropper):
        store.close()


def test_a_name_whose_milvus_collection_was_lost_can_be_dropped_and_created_again(milvus_uri, caplog):
    """A live catalogue row whose Milvus collection is gone (dropped outside embedsvc, or replicas' clocks beyond
    the tolerated skew) must not wedge the name: listing leaves it out and logs why, a drop frees it."""
    from pymilvus import MilvusClient

    store = open_store("milvus", milvus_uri=milvus_uri)
    lost = store.create_collection(CollectionConfig("lost", 4))
    client = MilvusClient(uri=milvus_uri)
    client.drop_collection(f"embedsvc_{lost.uid}")
    client.close()
    assert "lost" not in {c.config.name for c in store.list_collections()}
    assert f"embedsvc_{lost.uid} is gone: drop the collection" in caplog.text
    assert store.drop_collection("lost") == 0
    again = store.create_collection(CollectionConfig("lost", 4))
    assert again.uid != lost.uid and store.get_collection("lost").count == 0
    store.drop_collection("lost")
    with pytest.raises(CollectionNotFound):
        store.drop_collection("lost")
    store.close()


def test_a_catalogue_in_the_previous_layout_is_moved_to_incarnation_rows(milvus_uri):
    """Earlier versions kept one catalogue row per name; a store opened on such a catalogue serves its
    collections unchanged (uid, pooling state, items) from incarnation rows and leaves no old row."""
    from pymilvus import MilvusClient

    store = open_store("milvus", milvus_uri=milvus_uri)
    store.create_collection(CollectionConfig("legacy", 4))
    store.set_pooling_state("legacy", b"codebook")
    store.upsert("legacy", [StoreItem("a", np.ones(4, np.float32))])
    before = store.get_collection("legacy")
    client = MilvusClient(uri=milvus_uri)
    docs = {
        r["kind"]: r["doc"]
        for r in client.query("embedsvc_catalogue", filter='owner == "legacy"', output_fields=["kind", "doc"])
    }
    old = {
        **{k: docs["incarnation"][k] for k in ("config", "created_ms", "uid")},
        **{k: docs["pooling"][k] for k in ("pooling_version", "state_key", "state_chunks")},
    }
    client.delete("embedsvc_catalogue", filter='owner == "legacy"')
    client.upsert(
        "embedsvc_catalogue",
        [
            {
                "key": "collection/legacy",
                "kind": "collection",
                "owner": before.uid,
                "doc": old,
                "chunk": "",
                "v": [1.0, 0.0],
            }
        ],
    )
    reopened = open_store("milvus", milvus_uri=milvus_uri)
    after = reopened.get_collection("legacy")
    assert (after.uid, after.created_ms, after.pooling_version, after.count) == (before.uid, before.created_ms, 1, 1)
    assert reopened.pooling_state("legacy") == b"codebook" and reopened.get("legacy", ["a"])[1] == []
    assert client.query("embedsvc_catalogue", filter='kind == "collection"', output_fields=["key"]) == []
    reopened.drop_collection("legacy")
    client.close()
    for s in (store, reopened):
        s.close()


def index(*args, cwd) -> subprocess.CompletedProcess:
    return run_cli("index", *args, cwd=cwd)


@pytest.mark.slow  # two index jobs and a server (16 s)
def test_index_job_local_milvus_uri_equals_milvus_backed_server(tmp_path):
    write_scenes(tmp_path / "photos", "val", 12, size=72)
    for f in (tmp_path / "photos").glob("manifest.*"):
        f.unlink()
    target = f"milvus://{tmp_path / 'job.db'}"
    first = index(str(tmp_path / "photos"), "--collection", "c=cls", "--local", target, cwd=tmp_path)
    assert first.returncode == 0 and "indexed 12" in first.stdout, first.stderr[-2000:]
    again = index(str(tmp_path / "photos"), "--collection", "c=cls", "--local", target, cwd=tmp_path)
    assert again.returncode == 0 and "already present 12" in again.stdout, again.stdout + again.stderr[-2000:]
    config = ServerConfig(
        listen="127.0.0.1:0",
        data_dir=str(tmp_path / "unused"),
        metrics_port=-1,
        demo_size=0,
        log_format="text",
        store_backend="milvus",
        milvus_uri=str(tmp_path / "server.db"),
    )
    with running_server(config) as server:
        remote = index(str(tmp_path / "photos"), "--collection", "c=cls", "--address", server.address, cwd=tmp_path)
        assert remote.returncode == 0 and "indexed 12" in remote.stdout, remote.stderr[-2000:]
        ids = sorted(f"images/val-{i:07d}.png" for i in range(12))
        with Client(server.address) as client:
            remote_items, _ = client.get("c", ids, include_vectors=True)
    store = open_store("milvus", milvus_uri=target)
    local_items, missing = store.get("c", ids, include_vectors=True)
    store.close()
    assert not missing and [i.id for i in remote_items] == [i.id for i in local_items] == ids
    for x, y in zip(remote_items, local_items):
        assert np.abs(x.vector - y.vector).max() < 1e-5
    assert not Path(tmp_path / "unused").exists() or not list(Path(tmp_path / "unused").iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--store-backend", "milvus"], "needs milvus_uri"),
        (["--store-backend", "milvus", "--milvus-uri", "http://127.0.0.1:{port}"], "cannot connect to Milvus"),
        (["--store-backend", "cassandra"], "must be local or milvus"),
    ],
)
def test_bad_milvus_settings_are_clear_startup_errors(tmp_path, args, message):
    args = [a.replace("{port}", str(free_port())) for a in args]
    result = serve_once(*args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
