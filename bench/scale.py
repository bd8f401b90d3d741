"""One collection at scale through the real server and client, next to bare FAISS, in one run.

    python bench/scale.py --size 100000            # the flat table (what issue 24 asks), ~2 min
    python bench/scale.py --size 1000000           # the same at 1M (~2 GiB of vectors; needs ~5 GiB free)
    python bench/scale.py --size 100000 --kinds hnsw,ivf,ivfpq   # + approximate indexes in-process
    python bench/scale.py --size 100000 --milvus   # + the same flat table on the Milvus back end (Lite file)
    python bench/scale.py --size 100000 --kinds-only --kinds hnsw,ivf --milvus   # approximate, both back ends
    python bench/scale.py --size 1000000 --kinds-only --kinds hnsw,ivf,ivfpq --kinds-sweep   # + other search settings
    python bench/scale.py --size 100000 --no-local --milvus --milvus-uri http://127.0.0.1:19530 \
        --milvus-server-cmd 'milvus-server --data /tmp/m --proxy-port 19530' --milvus-data /tmp/m   # a Milvus server

Flat table: random 512-d vectors (seeded, unit norm) upserted through embedsvc.client in messages of
--batch, metadata {"bucket": i % 10} (so a bucket filter allows 10%). Figures: the upsert rate per tenth
of the load (steady means the last tenth within 20% of the first), server RSS over the raw vector bytes
(peak during the load, settled after it, after a restart; each above the empty server's own RSS), the
data directory's disk use (allocated blocks) over the raw bytes, the time from starting the server until a
search answers (graceful restart: the previous server checkpointed on SIGTERM), and single-query top-10
p50 through the client (include_metadata off) next to bare FAISS (IndexFlatIP; a prebuilt IDSelectorBitmap
for the filter) in this process, which costs the gRPC round trip on top of the search.
Kinds: HNSW/IVF/IVF-PQ collections built through the store in this process (LocalStore, or MilvusStore on a Milvus
Lite file with --milvus): build time, RSS over raw, recall@10 against exact search, p50 at the defaults, on
embedding-like vectors by default (--kinds-data; see spectrum_chunk); --kinds-sweep adds recall and p50 at other
efSearch / nprobe settings of the same build and, for IVF-PQ, its top 40 / 100 re-ranked exactly from stored vectors.
--milvus-uri puts the Milvus side on a Milvus server instead of a Lite file: RSS is then the server's (the process
listening on the URI's port, when it runs on this machine), disk is --milvus-data's growth, and the restart is the
Milvus server's too when the bench runs it (--milvus-server-cmd); a figure that cannot be taken says so.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from common import serve_command

SEED = 24
NAME = "scale"


def vectors_chunk(start: int, count: int, dim: int) -> np.ndarray:
    """Rows start..start+count of the benchmark's vectors (a pure function of the row range's chunks)."""
    out = np.empty((count, dim), dtype=np.float32)
    for block, lo, hi, at in _blocks(start, count):
        rows = np.random.default_rng([SEED, block]).standard_normal((1000, dim)).astype(np.float32)
        out[at : at + hi - lo] = rows[lo:hi]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def queries(count: int, dim: int) -> np.ndarray:
    q = np.random.default_rng([SEED, 10**9]).standard_normal((count, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _blocks(start: int, count: int):
    """(block number, rows from, rows to, offset in the output) of the 1,000-row blocks covering the range."""
    row, end = start, start + count
    while row < end:
        take = min(1000 - row % 1000, end - row)
        yield row // 1000, row % 1000, row % 1000 + take, row - start
        row += take


@functools.lru_cache(maxsize=4)
def _rotation(dim: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng([SEED, 7]).standard_normal((dim, dim)))
    return q.astype(np.float32)


def spectrum_chunk(start: int, count: int, dim: int, salt: int = 0) -> np.ndarray:
    """Embedding-like rows: Gaussian with variance 1/i along the i-th of `dim` random orthogonal directions (about
    28 effective dimensions at 512, the low intrinsic dimension of real embeddings), unit norm. Uniform random
    vectors have no neighbourhoods (every pair at cosine ~0 +- 0.04, the true top-10 barely above the rest), on
    which no approximate index finds the true neighbours at any practical setting (HNSW's defaults: recall 0.22
    at 100k); on these, top-10 neighbours sit at cosine ~0.45 and the defaults find them."""
    scale = np.arange(1, dim + 1, dtype=np.float32) ** -0.5
    out = np.empty((count, dim), dtype=np.float32)
    for block, lo, hi, at in _blocks(start, count):
        z = np.random.default_rng([SEED, 11 + salt, block]).standard_normal((1000, dim)).astype(np.float32)
        out[at : at + hi - lo] = ((z * scale) @ _rotation(dim))[lo:hi]  # whole blocks: the same bits whatever the range
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def kind_data(data: str, start: int, count: int, dim: int, queries_of: bool = False) -> np.ndarray:
    """Rows of the --kinds-data set; queries_of: held-out queries from the same distribution."""
    if data == "random":
        return queries(count, dim) if queries_of else vectors_chunk(start, count, dim)
    return spectrum_chunk(start, count, dim, salt=1 if queries_of else 0)


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    """RSS of a process and its children (Milvus Lite runs its server as a child)."""
    total = rss_bytes(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return total + sum(tree_rss(int(c)) for c in children)


def listener_pid(uri: str) -> int:
    """The process listening on the URI's port on this machine (0 when none here: a remote server)."""
    port = urlparse(uri).port or 19530
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(fields[9])
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return int(fd.parts[2])
    return 0


class MilvusServer:
    """A Milvus server at `uri`: the bench measures its RSS (when it listens on this machine) and, given a shell
    command that runs it, starts it, restarts it for the restart figure and stops it at the end."""

    def __init__(self, uri: str, command: str, data: str, log_path: Path):
        self.uri, self.command, self.log_path = uri, command, log_path
        self.data = Path(data) if data else None
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Seconds from starting the command until the server answers."""
        started = time.perf_counter()
        if self.command:
            if listener_pid(self.uri):  # else the old server would answer for the one this starts
                raise SystemExit(f"a process already listens on {self.uri}'s port; stop it first")
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as log:
                self.proc = subprocess.Popen(self.command, shell=True, stdout=log, stderr=log, start_new_session=True)
        self.wait_answering()
        return time.perf_counter() - started

    def wait_answering(self, timeout: float = 900) -> None:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + timeout
        while True:
            try:
                client = MilvusClient(uri=self.uri, timeout=5)
                client.get_server_version()
                client.close()  # else pymilvus keeps reconnecting to it in the background through a restart
                return
            except Exception as exc:  # noqa: BLE001 - not up yet, whatever pymilvus raises
                if time.monotonic() > deadline or (self.proc is not None and self.proc.poll() is not None):
                    raise SystemExit(f"Milvus at {self.uri} did not answer: {exc}; see {self.log_path}") from None
                time.sleep(0.5)

    def stop(self, grace: float = 60.0) -> float:
        """SIGTERM to the command's process group (a graceful stop), SIGKILL what is left after `grace` seconds
        (said on stderr: Milvus recovers from its log either way); seconds until all of it has exited."""
        if self.proc is None:
            return 0.0
        started = time.perf_counter()
        os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self._group_alive():
            if time.monotonic() > deadline:
                print(f"  Milvus did not stop within {grace:.0f} s of SIGTERM: killed", file=sys.stderr, flush=True)
                self.kill()
                break
            time.sleep(0.2)
        self.proc.wait()
        self.proc = None
        return time.perf_counter() - started

    def _group_alive(self) -> bool:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL to the whole process group (its leader may be gone while the server runs on)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def rss(self) -> int:
        pid = listener_pid(self.uri)
        return tree_rss(pid) if pid else 0


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


class Sampler:
    """The peak RSS of a process tree (or of what `measure` returns), sampled every 50 ms in a thread."""

    def __init__(self, pid: int, measure: Callable[[], int] | None = None):
        self.measure = measure or functools.partial(tree_rss, pid)
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.measure())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


SERVERS: list[subprocess.Popen] = []  # killed at exit if still running (a run that failed midway)


def start_server(data: Path, log_path: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a")  # noqa: SIM115 - the server's log for its lifetime (its stdout and a reader thread)
    proc = subprocess.Popen(
        serve_command(str(data), "--preload-models", "", "--log-format", "text", "--log-level", "INFO", *extra),
        stderr=subprocess.PIPE,
        stdout=log,
        text=True,
        start_new_session=True,
    )
    SERVERS.append(proc)
    deadline = time.monotonic() + 1800
    stderr = proc.stderr
    assert stderr is not None  # stderr=PIPE
    while time.monotonic() < deadline:
        line = stderr.readline()
        if not line:
            break
        log.write(line)
        match = re.search(r"serving on (\S+):(\d+)", line)
        if match:
            threading.Thread(target=lambda: [log.write(x) for x in stderr], daemon=True).start()
            return proc, f"127.0.0.1:{match.group(2)}"
    proc.kill()
    raise SystemExit(f"server did not start; see {log_path}")


def stop_server(proc: subprocess.Popen) -> float:
    started = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(1800)
    return time.perf_counter() - started


def p50_ms(call, items) -> float:  # the kinds' searches
    call(items[0])
    times = []
    for item in items:
        t = time.perf_counter()
        call(item)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def run_flat(
    size: int,
    dim: int,
    batch: int,
    nq: int,
    folder: Path,
    backend: list[str],
    bare: Bare,
    milvus: MilvusServer | None = None,
) -> dict:
    """The flat table; with `milvus` (a server), RSS is that server's and its restart is timed too where it can."""
    from embedsvc.client import Client, Item

    data = folder / "data"
    if milvus is not None:
        out_start = {"milvus_start_s": milvus.start()}
        disk_before = disk_bytes(milvus.data) if milvus.data else 0
    started = time.perf_counter()
    proc, address = start_server(data, folder / "server.log", backend)
    from embedsvc.client import Client as _C

    with _C(address, timeout=600) as probe:
        probe.list_collections()
    empty_start = time.perf_counter() - started
    time.sleep(1.0)

    def rss() -> int:
        return milvus.rss() if milvus is not None else tree_rss(proc.pid)

    base_rss = rss()
    raw = size * dim * 4
    out: dict[str, Any] = {"raw_mib": raw / 2**20, "empty_rss_mib": base_rss / 2**20, "empty_start_s": empty_start}
    if milvus is not None:
        out.update(out_start, rss_measured=base_rss > 0)
    client = Client(address, timeout=600)
    client.create_collection(NAME, dim=dim)
    sampler = Sampler(proc.pid, rss)
    rates, tenth = [], max(batch, size // 10)

    def items(start: int, count: int):
        vectors = vectors_chunk(start, count, dim)
        for i in range(count):
            yield Item(f"item-{start + i}", vector=vectors[i], metadata={"bucket": (start + i) % 10})

    load_started = time.perf_counter()
    for start in range(0, size, tenth):
        count = min(tenth, size - start)
        t = time.perf_counter()
        client.upsert(NAME, items(start, count), batch_size=batch)
        rates.append(count / (time.perf_counter() - t))
        print(
            f"  loaded {start + count:>9,} ({rates[-1]:,.0f}/s, server RSS {rss() / 2**20:,.0f} MiB, load average "
            f"{os.getloadavg()[0]:.1f})",
            file=sys.stderr,
            flush=True,
        )
    out["load_s"] = time.perf_counter() - load_started
    out["rates"] = rates
    qs = queries(nq, dim)
    print("  searching", file=sys.stderr, flush=True)

    def search(q, flt=None):
        return client.search(NAME, vector=q, top_k=10, filter=flt, include_metadata=False)

    # Each query through the server, then the same on bare FAISS: pairs see the same load on a shared machine.
    out["p50_ms"], out["bare_p50_ms"], out["pair_ratio"] = paired_p50(search, bare.search, qs)
    out["p50_filtered_ms"], out["bare_p50_filtered_ms"], out["pair_ratio_filtered"] = paired_p50(
        lambda q: search(q, {"bucket": 3}), bare.search_filtered, qs
    )
    out["peak_rss"] = (sampler.stop() - base_rss) / raw
    time.sleep(2.0)
    out["settled_rss"] = (rss() - base_rss) / raw
    out["disk"] = disk_bytes(data) / raw
    print(  # now, in case the restart fails (a 1M run on Milvus 2.3 lost its table that way)
        f"  search p50 {out['p50_ms']:.1f} / {out['p50_filtered_ms']:.1f} ms (bare FAISS {out['bare_p50_ms']:.1f} / "
        f"{out['bare_p50_filtered_ms']:.1f} ms); RSS over raw peak {out['peak_rss']:.2f}x, settled "
        f"{out['settled_rss']:.2f}x",
        file=sys.stderr,
        flush=True,
    )
    client.close()
    out["stop_s"] = stop_server(proc)
    out["disk_after_stop"] = disk_bytes(data) / raw
    print("  restarting", file=sys.stderr, flush=True)
    if milvus is not None and milvus.data:  # what the load added to the server's folder (WAL, segments, etcd)
        out["disk"] = (disk_bytes(milvus.data) - disk_before) / raw
    if not backend or backend[0] != "--store-backend":  # the local store alone, without the server's start-up
        from embedsvc.store import LocalStore, SearchOptions

        started = time.perf_counter()
        store = LocalStore(data)
        store.search(NAME, qs[:1], SearchOptions(10))
        out["store_open_s"] = time.perf_counter() - started
        store.close(checkpoint=False)
    if milvus is not None and milvus.command:
        out["milvus_stop_s"] = milvus.stop()
    if milvus is not None and milvus.data:  # (not stopped without --milvus-server-cmd: the same as after load)
        out["disk_after_stop"] = (disk_bytes(milvus.data) - disk_before) / raw
    started = time.perf_counter()
    if milvus is not None and milvus.command:
        out["milvus_restart_s"] = milvus.start()
    proc, address = start_server(data, folder / "server.log", backend)
    with Client(address, timeout=600) as again:
        hits = again.search(NAME, vector=qs[0], top_k=10, include_metadata=False)
        out["restart_s"] = time.perf_counter() - started
        assert len(hits) == 10
        again.search(NAME, vector=qs[1], top_k=10, filter={"bucket": 3}, include_metadata=False)
        time.sleep(1.0)
        out["restart_rss"] = (rss() - base_rss) / raw
        if milvus is not None:
            again.drop_collection(NAME)  # the server outlives the run
    stop_server(proc)
    if milvus is not None:
        milvus.stop()
    return out


class Bare:
    """The same vectors in a FAISS IndexFlatIP in this process, and the bucket-3 filter as a prebuilt bitmap."""

    def __init__(self, size: int, dim: int):
        import faiss

        self.index = faiss.IndexFlatIP(dim)
        for start in range(0, size, 100_000):
            self.index.add(vectors_chunk(start, min(100_000, size - start), dim))
        self.bits = np.packbits(np.arange(size) % 10 == 3, bitorder="little")
        self.params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(len(self.bits), faiss.swig_ptr(self.bits)))

    def search(self, q: np.ndarray):
        return self.index.search(q[None], 10)

    def search_filtered(self, q: np.ndarray):
        return self.index.search(q[None], 10, params=self.params)


def paired_p50(call, bare_call, items) -> tuple[float, float, float]:
    """p50 of each, and the median of the per-query ratios (each pair ran back to back: the same load)."""
    call(items[0])
    bare_call(items[0])
    ours, theirs = [], []
    for item in items:
        t = time.perf_counter()
        call(item)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        bare_call(item)
        theirs.append(time.perf_counter() - t)
    return (
        float(np.median(ours) * 1000),
        float(np.median(theirs) * 1000),
        float(np.median(np.array(ours) / np.array(theirs))),
    )


def sweep_settings(kind: str, factory: str) -> tuple[int, ...]:
    """Search settings around the default: HNSW efSearch, or IVF cells probed (a share of nlist)."""
    if kind == "hnsw":
        return (64, 128, 256, 512, 768, 1024)
    match = re.match(r"IVF(\d+)", factory)
    nlist = int(match.group(1)) if match else 128
    return tuple(sorted({max(1, nlist // d) for d in (32, 16, 8, 4, 2)}))


def reranked(store, kind: str, q: np.ndarray, candidates: int) -> list:
    """The top `candidates` of a compressed index re-scored exactly from the stored vectors (what a refine step
    over the vector file would give): the hits, best first."""
    from embedsvc.store import SearchOptions

    hits = store.search(kind, q[None], SearchOptions(candidates))[0]
    items, _ = store.get(kind, [h.id for h in hits], include_vectors=True)
    scores = np.stack([item.vector for item in items]) @ q
    return [items[i] for i in np.argsort(-scores)[:10]]


def run_kind(
    kind: str,
    size: int,
    dim: int,
    batch: int,
    nq: int,
    folder: Path,
    data: str,
    backend: str,
    budget_s: float,
    sweep: bool = False,
    milvus: MilvusServer | None = None,
) -> dict:
    """An approximate index through the store in this process (`backend` local, or milvus: a Milvus Lite file, or
    the server `milvus`): build, memory (this process and its children: Milvus Lite's server; or the server's),
    recall against exact search, p50."""
    import faiss

    from embedsvc.store import CollectionConfig, Item, SearchOptions, VectorStore

    raw = size * dim * 4
    measure = milvus.rss if milvus is not None else functools.partial(tree_rss, os.getpid())
    before = measure()
    where = folder / f"kind-{backend}-{kind}"
    where.mkdir(parents=True, exist_ok=True)
    store: VectorStore
    if backend == "milvus":
        from embedsvc.store.milvus import MilvusStore

        store = MilvusStore(milvus.uri if milvus is not None else str(where / "lite.db"))
    else:
        from embedsvc.store import LocalStore

        store = LocalStore(where, checkpoint_every=10**9)
    store.create_collection(CollectionConfig(kind, dim, index=kind))
    sampler = Sampler(os.getpid(), measure)
    started = time.perf_counter()
    built, tenth, mark, curve = 0, max(batch, size // 10), time.perf_counter(), []
    for start in range(0, size, batch):
        if time.perf_counter() - started > budget_s:
            break
        vectors = kind_data(data, start, min(batch, size - start), dim)
        store.upsert(kind, [Item(f"item-{start + i}", v) for i, v in enumerate(vectors)])
        built = start + len(vectors)
        if built % tenth == 0 or built == size:  # the build rate per tenth: how adding slows as the index grows
            now = time.perf_counter()
            curve.append((built, tenth / (now - mark)))
            mark = now
            print(
                f"  {kind}: built {built:>9,} ({curve[-1][1]:,.0f}/s over the last {tenth:,}; {now - started:,.0f} s; "
                f"load {os.getloadavg()[0]:.1f})",
                file=sys.stderr,
                flush=True,
            )
    build_s = time.perf_counter() - started
    qs = kind_data(data, 0, nq, dim, queries_of=True)
    # Milvus builds and loads its index on the first search after writes
    store.search(kind, qs[:1], SearchOptions(10))
    ready_s = time.perf_counter() - started
    peak = sampler.stop()
    rss = (measure() - before) / (built * dim * 4) if before else float("nan")  # nan: a server elsewhere
    info = store.get_collection(kind)
    knob = "efSearch" if kind == "hnsw" else "nprobe"
    settings: dict[str, Any] = {"": lambda q: store.search(kind, q[None], SearchOptions(10))[0]}  # "": the default
    for setting in sweep_settings(kind, info.index_factory) if sweep else ():
        options = SearchOptions(10, nprobe=setting, ef_search=setting)
        settings[f"{knob} {setting}"] = lambda q, options=options: store.search(kind, q[None], options)[0]
    for candidates in (40, 100) if sweep and "PQ" in info.index_factory else ():
        settings[f"top {candidates} at the default {knob}, re-ranked exactly (vectors read back with get)"] = (
            lambda q, candidates=candidates: reranked(store, kind, q, candidates)
        )
    found, p50 = {}, {}  # per search setting, then scored against exact search below
    for label, search in settings.items():
        found[label] = [[int(h.id.split("-")[1]) for h in search(q)] for q in qs]
        p50[label] = p50_ms(search, qs)
    if milvus is not None:
        store.drop_collection(kind)  # the server outlives the run
    checkpoint_started = time.perf_counter()
    store.close()
    close_s = time.perf_counter() - checkpoint_started
    exact = faiss.IndexFlatIP(dim)
    for start in range(0, built, 100_000):
        exact.add(kind_data(data, start, min(100_000, built - start), dim))
    _, truth = exact.search(qs, 10)
    del exact
    recall = {
        label: float(np.mean([len(set(f[:10]) & set(t.tolist())) / 10 for f, t in zip(hits, truth)]))
        for label, hits in found.items()
    }
    shutil.rmtree(where, ignore_errors=True)
    return {
        "sweep": [(label, recall[label], p50[label]) for label in found if label],
        "curve": curve,
        "factory": getattr(info, "index_factory", "") or kind,
        "built": built,
        "build_s": build_s,
        "ready_s": ready_s,
        "rss": rss,
        "peak_rss": (peak - before) / (built * dim * 4) if before else float("nan"),
        "recall": recall[""],
        "p50_ms": p50[""],
        "checkpoint_s": close_s,
        "raw": raw,
    }


def report_flat(label: str, size: int, got: dict) -> None:
    rates = got["rates"]
    print(
        f"\n{label}: {size:,} x 512-d flat cosine ({got['raw_mib']:,.0f} MiB raw), empty server "
        f"{got['empty_rss_mib']:.0f} MiB RSS"
    )
    print("| figure | value |")
    print("|---|---|")
    server = "milvus_start_s" in got  # a Milvus server, not the server's own store
    if "milvus_restart_s" in got:
        restarted = (
            f"Milvus server and embedsvc (Milvus answered after {got['milvus_restart_s']:.1f} s; its graceful stop "
            f"took {got['milvus_stop_s']:.1f} s)"
        )
    else:
        restarted = "embedsvc only: the Milvus server kept running (no --milvus-server-cmd)" if server else "embedsvc"
    print(
        f"| restart until a search answers | {got['restart_s']:.1f} s, {restarted} (an empty embedsvc server: "
        f"{got['empty_start_s']:.1f} s; its graceful stop took {got['stop_s']:.1f} s) |"
    )
    if "store_open_s" in got:
        print(f"| of which the store: open + first search, in process | {got['store_open_s']:.2f} s |")
    whose = "the Milvus server's" if server else "server"
    if got.get("rss_measured", True):
        print(
            f"| {whose} RSS over raw: load peak / settled / after restart | {got['peak_rss']:.2f}x / "
            f"{got['settled_rss']:.2f}x / {got['restart_rss']:.2f}x (above its empty {got['empty_rss_mib']:.0f} MiB) |"
        )
    else:
        print(f"| {whose} RSS over raw | not measured: the server does not listen on this machine |")
    if server and not got.get("milvus_data"):
        print("| the Milvus server's disk over raw | not measured: give --milvus-data |")
    else:
        what = "the Milvus server's folder: growth over raw" if server else "data directory over raw"
        print(f"| {what} (after load / after stop) | {got['disk']:.2f}x / {got['disk_after_stop']:.2f}x |")
    print(
        f"| upsert rate through the client, first / last tenth (min, max) | {rates[0]:,.0f}/s / {rates[-1]:,.0f}/s "
        f"({min(rates):,.0f}, {max(rates):,.0f}); mean {size / got['load_s']:,.0f}/s |"
    )
    print(
        f"| search p50 top-10 unfiltered / 10% filter | {got['p50_ms']:.2f} / {got['p50_filtered_ms']:.2f} ms; "
        f"bare FAISS {got['bare_p50_ms']:.2f} / {got['bare_p50_filtered_ms']:.2f} ms; ratio "
        f"{got['p50_ms'] / got['bare_p50_ms']:.2f}x / {got['p50_filtered_ms'] / got['bare_p50_filtered_ms']:.2f}x; "
        f"median of per-query ratios {got['pair_ratio']:.2f}x / {got['pair_ratio_filtered']:.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--kinds", default="", help="comma-separated approximate presets to build too (hnsw,ivf,ivfpq)")
    parser.add_argument("--kinds-size", type=int, default=0, help="size for --kinds (default: --size)")
    parser.add_argument(
        "--kinds-data",
        choices=("spectrum", "random"),
        default="spectrum",
        help="vectors for --kinds: embedding-like (default; see spectrum_chunk), or uniform random (the "
        "flat table's, on which approximate indexes find few true neighbours at any setting)",
    )
    parser.add_argument(
        "--kinds-budget",
        type=float,
        default=3600.0,
        help="seconds a --kinds build may take before it stops adding (reported as such)",
    )
    parser.add_argument(
        "--kinds-sweep",
        action="store_true",
        help="also recall@10 and p50 at other search settings of the same build (HNSW efSearch, IVF nprobe)",
    )
    parser.add_argument("--milvus", action="store_true", help="the flat table on Milvus Lite too")
    parser.add_argument(
        "--milvus-uri",
        default="",
        help="with --milvus: a Milvus server (http://127.0.0.1:19530) instead of a Milvus Lite file; it must hold "
        "no collection named 'scale' or like a --kinds preset (the bench drops what it creates)",
    )
    parser.add_argument(
        "--milvus-server-cmd",
        default="",
        help="with --milvus-uri: a shell command that runs that server; the bench starts it, restarts it for the "
        "restart figure, and stops it (SIGTERM to its process group)",
    )
    parser.add_argument("--milvus-data", default="", help="with --milvus-uri: the server's folder, for the disk figure")
    parser.add_argument("--no-local", action="store_true", help="skip the local back end's flat table")
    parser.add_argument(
        "--kinds-only", action="store_true", help="only the --kinds table (with --milvus: both back ends)"
    )
    parser.add_argument(
        "--faiss-threads",
        type=int,
        default=1,
        help="FAISS threads of the server and of bare FAISS (1: no OpenMP wake-ups in the timings)",
    )
    parser.add_argument("--dir", default="", help="work folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    if args.size < 10 * args.batch:
        parser.error(f"--size must be at least 10 x --batch ({10 * args.batch})")
    kinds = [k for k in args.kinds.split(",") if k]
    from embedsvc.store.indexes import INDEX_PRESETS

    unknown = [k for k in kinds if k not in INDEX_PRESETS or k == "flat"]
    if unknown:
        parser.error(f"unknown --kinds {unknown}; choose from hnsw, ivf, ivfpq")
    if args.milvus_uri and not args.milvus:
        parser.error("--milvus-uri needs --milvus (it says where the Milvus side runs)")
    if (args.milvus_server_cmd or args.milvus_data) and not args.milvus_uri:
        parser.error("--milvus-server-cmd and --milvus-data need --milvus-uri")
    if args.milvus_data and not Path(args.milvus_data).is_dir() and not args.milvus_server_cmd:
        parser.error(f"--milvus-data {args.milvus_data}: no such folder")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped run still stops its servers (finally below)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="embedsvc-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    milvus = (
        MilvusServer(args.milvus_uri, args.milvus_server_cmd, args.milvus_data, folder / "milvus-server.log")
        if args.milvus_uri
        else None
    )
    load = os.getloadavg()
    print(
        f"# bench/scale.py --size {args.size}: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} at start"
    )
    try:
        import faiss

        faiss.omp_set_num_threads(args.faiss_threads)
        threads = ["--faiss-threads", str(args.faiss_threads)]
        bare = Bare(args.size, args.dim) if not args.kinds_only and (not args.no_local or args.milvus) else None
        if not args.no_local and not args.kinds_only:
            assert bare is not None  # made for either run
            got = run_flat(args.size, args.dim, args.batch, args.queries, folder / "local", threads, bare)
            report_flat("local store", args.size, got)
        if args.milvus and not args.kinds_only:
            uri = args.milvus_uri or f"{folder / 'milvus' / 'lite.db'}"
            (folder / "milvus").mkdir(parents=True, exist_ok=True)
            assert bare is not None  # made for either run
            got = run_flat(
                args.size,
                args.dim,
                args.batch,
                args.queries,
                folder / "milvus",
                ["--store-backend", "milvus", "--milvus-uri", uri, *threads],
                bare,
                milvus,
            )
            if milvus is None:
                got["disk"] = disk_bytes(folder / "milvus") / (args.size * args.dim * 4)
            got["milvus_data"] = bool(args.milvus_data)
            report_flat(f"Milvus server {args.milvus_uri}" if milvus else "Milvus Lite", args.size, got)
        del bare
        if kinds:
            size = args.kinds_size or args.size
            backends = ["local"] + (["milvus"] if args.milvus else [])
            print(
                f"\napproximate indexes through the store in this process, {size:,} x {args.dim}-d {args.kinds_data} "
                f"vectors (--kinds-data), {args.queries} held-out queries, defaults of each preset; a build stops "
                f"at --kinds-budget {args.kinds_budget:.0f} s (then 'built' says how far it got)"
            )
            print(
                "| back end | index | factory | built | build time (rate) | until first search | RSS over raw: "
                "settled / peak | recall@10 vs exact | p50 | close (checkpoint) |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|")
            if milvus is not None and args.milvus:
                milvus.start()
            for backend in backends:
                for kind in kinds:
                    if backend == "milvus" and kind == "ivfpq" and milvus is None:
                        print(f"| milvus | {kind} | - | - | not built: Milvus Lite has no IVF_PQ | | | | | |")
                        continue
                    r = run_kind(
                        kind,
                        size,
                        args.dim,
                        args.batch,
                        args.queries,
                        folder,
                        args.kinds_data,
                        backend,
                        args.kinds_budget,
                        args.kinds_sweep,
                        milvus if backend == "milvus" else None,
                    )
                    short = "" if r["built"] == size else " (budget hit)"
                    print(
                        f"| {backend} | {kind} | {r['factory']} | {r['built']:,}{short} | {r['build_s']:.0f} s "
                        f"({r['built'] / r['build_s']:,.0f}/s) | {r['ready_s']:.0f} s | {r['rss']:.2f}x / "
                        f"{r['peak_rss']:.2f}x | {r['recall']:.3f} | {r['p50_ms']:.2f} ms | "
                        f"{r['checkpoint_s']:.1f} s |",
                        flush=True,
                    )
                    for label, recall, p50 in r["sweep"]:
                        print(f"|  | {kind}, {label} | | | | | | {recall:.3f} | {p50:.2f} ms | |", flush=True)
                    if r["curve"]:
                        rates = ", ".join(f"{n // 1000:,}k {rate:,.0f}/s" for n, rate in r["curve"])
                        print(f"|  | {kind}: build rate per tenth | {rates} | | | | | | | |", flush=True)
        if milvus is not None:
            milvus.stop()
    finally:
        if milvus is not None:
            milvus.kill()
        for proc in SERVERS:
            if proc.poll() is None:  # its process group: Milvus Lite's server too
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    load = os.getloadavg()
    print(f"# load average {load[0]:.1f} at the end")


if __name__ == "__main__":
    main()
