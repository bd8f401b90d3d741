"""Restart of a server holding one large flat collection: how long until it listens, until /readyz says ready
and until a search answers, with the store's load broken down in process.

    python bench/restart.py --build 1000000 --dir /tmp/restart     # make the data directory (through LocalStore)
    python bench/restart.py --dir /tmp/restart --rounds 3          # time restarts of that directory
    python bench/restart.py --dir /tmp/restart --compare OTHER_SRC  # alternate with another checkout's code

The collection is what bench/scale.py loads (random unit 512-d vectors, ids item-<i>, metadata
{"bucket": i % 10}), written through LocalStore in messages of 10,000 so that building 1M takes minutes, not the
client's quarter hour; the store then checkpoints at close, as a graceful server stop does. `--compare`
alternates each round between this checkout and another source tree (e.g. `git archive` of the base) on
copies of the same directory, so both see the same machine load; ratios are printed per round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import serve_command
from scale import NAME, queries, vectors_chunk

HERE = Path(__file__).resolve().parent.parent


def build(size: int, data: Path, dim: int, batch: int) -> None:
    from embedsvc.store import CollectionConfig, Item, LocalStore

    store = LocalStore(data, checkpoint_every=10**9)
    store.create_collection(CollectionConfig(NAME, dim))
    started = time.perf_counter()
    for start in range(0, size, batch):
        vectors = vectors_chunk(start, min(batch, size - start), dim)
        store.upsert(NAME, [Item(f"item-{start + i}", v, {"bucket": (start + i) % 10}) for i, v in enumerate(vectors)])
        if (start // batch) % 10 == 0:
            print(
                f"  built {start + len(vectors):,} ({(start + len(vectors)) / (time.perf_counter() - started):,.0f}/s)",
                file=sys.stderr,
                flush=True,
            )
    store.close()


def _port(line: str, pattern: str) -> int | None:
    match = re.search(pattern, line)
    return int(match.group(1)) if match else None


def restart(src: Path, data: Path, log_path: Path, search: bool = True) -> dict:
    """Starts `python -m embedsvc serve` from `src` on `data`; times listening ("listening on", printed while
    collections load, or "serving on" of code that loads first), "serving on" (every collection loaded) and the
    first search that answers (retried while it gets UNAVAILABLE: a collection still loading)."""
    from embedsvc.client import Client

    env = dict(os.environ, PYTHONPATH=str(src))
    log = open(log_path, "a")  # noqa: SIM115 - the server's stderr for as long as it runs, closed when it stops
    started = time.perf_counter()
    proc = subprocess.Popen(
        serve_command(
            str(data),
            "--preload-models",
            "",
            "--log-format",
            "text",
            "--log-level",
            "INFO",
            "--http-listen",
            "127.0.0.1:0",
            "--faiss-threads",
            "1",
        ),
        stderr=subprocess.PIPE,
        stdout=log,
        text=True,
        env=env,
        cwd=src,
    )
    out: dict = {}
    ports: dict = {}
    listening = threading.Event()

    stderr = proc.stderr
    assert stderr is not None  # piped

    def read() -> None:
        for line in stderr:
            log.write(line)
            for key, pattern in (("listening_s", r"listening on \S+?:(\d+)"), ("serving_s", r"serving on \S+?:(\d+)")):
                port = _port(line, pattern)
                if port:
                    out.setdefault(key, time.perf_counter() - started)
                    out.setdefault("listening_s", out[key])
                    ports.setdefault("grpc", port)
                    ports.setdefault("http", _port(line, r"https?://\S+?:(\d+)/"))
                    listening.set()
        listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        listening.wait(600)
        if "grpc" not in ports:
            raise SystemExit(f"server did not start; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports['http']}/readyz", timeout=10) as r:
                out["readyz_at_listen"] = r.status
        except urllib.error.HTTPError as exc:
            out["readyz_at_listen"] = exc.code
        q = queries(1, 512)[0]
        with (Client if search else _NoClient)(f"127.0.0.1:{ports['grpc']}", timeout=600) as client:
            while True:  # a collection still loading answers UNAVAILABLE
                try:
                    hits = client.search(NAME, vector=q, top_k=10, include_metadata=False)
                    break
                except Exception as exc:
                    if "UNAVAILABLE" not in str(exc) and "loading" not in str(exc):
                        raise
                    time.sleep(0.05)
            out["search_s"] = time.perf_counter() - started
            assert len(hits) == 10, hits
    except _Empty:
        pass
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(600)
        reader.join(10)
    return out


class _NoClient:
    """An empty server's round: nothing to search."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        raise _Empty

    def __exit__(self, *exc):
        return False


class _Empty(Exception):
    pass


def in_process(data: Path) -> dict:
    """The store alone: open (and, where it loads in the background, until loaded) plus the first search."""
    from embedsvc.store import LocalStore, SearchOptions

    q = queries(1, 512)
    started = time.perf_counter()
    store = LocalStore(data)
    opened = time.perf_counter() - started
    wait = getattr(store, "wait_loaded", None)
    if wait:
        wait()
    store.search(NAME, q, SearchOptions(10))
    total = time.perf_counter() - started
    store.close(checkpoint=False)
    return {"open_s": opened, "open_and_search_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--build", type=int, default=0, help="make DIR/data with this many items first")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", default="", help="another source tree to alternate with (its own data copy)")
    parser.add_argument("--in-process", action="store_true", help="time the store's open in this process too")
    args = parser.parse_args()
    folder = Path(args.dir)
    data = folder / "data"
    if args.build:
        shutil.rmtree(data, ignore_errors=True)
        build(args.build, data, args.dim, 10_000)
    trees = [("this", HERE, data)]
    if args.compare:
        other = folder / "data-compare"
        if not other.exists():
            shutil.copytree(data, other)
        trees.append(("other", Path(args.compare).resolve(), other))
    print(f"# bench/restart.py {data}: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    (folder / "empty").mkdir(exist_ok=True)
    for round_ in range(args.rounds):
        got = {"empty": restart(HERE, folder / "empty", folder / "server-empty.log", search=False)}
        print(
            f"round {round_} empty server: {json.dumps({k: round(v, 2) for k, v in got['empty'].items()})} "
            f"(load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
        for label, src, where in trees:
            got[label] = restart(src, where, folder / f"server-{label}.log")
            if args.in_process and label == "this":
                got[label].update(in_process(where))
            print(
                f"round {round_} {label}: {json.dumps({k: round(v, 2) for k, v in got[label].items()})} "
                f"(load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
        if "other" in got:
            print(
                f"round {round_} search-answers ratio this/other: "
                f"{got['this']['search_s'] / got['other']['search_s']:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
