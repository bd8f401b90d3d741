"""`embedsvc index`: bulk-index images into one or several collections, locally or through a server.

Records are read and decoded in parallel worker threads (bad files are reported by path, never fatal),
grouped in batches, embedded and written batch by batch. Each written batch is durable, so a job that
is interrupted and run again skips what is already stored and finishes the rest (idempotent by id).
Locally (`--local DATA_DIR`) one forward pass per batch feeds every target collection's pooling; through
a server each collection's Upsert stream embeds on the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from embedsvc.encoder.images import DEFAULT_MAX_PIXELS, decode_image
from embedsvc.errors import EmbedsvcError, InvalidInput
from embedsvc.jobs.sources import Record, open_source
from embedsvc.progress import Progress


@dataclass
class IndexJob:
    # Image folder, manifest (.csv/.jsonl/.parquet) or WebDataset shards (.tar, glob allowed).
    source: str
    # Target collections: "NAME" (must exist) or "NAME=POOLING" (created if missing, e.g. "photos-gem=gem:p=3").
    collections: list[str]
    # Data directory to write into in-process; None to go through the server at `address`.
    local: Optional[str] = None
    # Server address when not local.
    address: str = "127.0.0.1:50051"
    # Model for collections this job creates ("" = the default model).
    model: str = ""
    # Index type for collections this job creates.
    index: str = "flat"
    # Items per batch (one forward pass, one durable write per collection).
    batch_size: int = 64
    # Threads that read and decode images.
    workers: int = 4
    # Where failures are written, one JSON object per line.
    report: str = "index-report.jsonl"
    # "auto", "cpu" or "cuda[:N]" (local only).
    device: str = "auto"


@dataclass
class IndexSummary:
    total: int
    indexed: int
    already_present: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    # Whole job, start-up (model load, collection creation) included.
    seconds: float = 0.0
    # Reading, decoding, embedding and writing only: what throughput is measured on.
    indexing_seconds: float = 0.0


def _targets(specs: list[str]) -> list[tuple[str, Optional[str]]]:
    out = []
    for spec in specs:
        name, eq, pooling = spec.partition("=")
        out.append((name, pooling if eq else None))
    if not out:
        raise InvalidInput("name at least one --collection")
    return out


class _LocalSink:
    """Writes through the service engine in this process: one forward pass per batch for all targets."""

    def __init__(self, job: IndexJob, targets):
        from embedsvc.pooling import PoolingSpec
        from embedsvc.service.config import ServerConfig
        from embedsvc.service.engine import Engine
        from embedsvc.store import Store

        config = ServerConfig(data_dir=job.local, device=job.device, preload_models="", demo_size=0,
                              max_batch_size=job.batch_size, max_items_per_request=max(1024, job.batch_size),
                              decode_workers=job.workers)
        self.store = Store(job.local)
        self.engine = Engine(config, self.store)
        self.loop = asyncio.new_event_loop()
        self.names = [name for name, _ in targets]
        existing = {c.config.name for c in self.store.list_collections()}
        for name, pooling in targets:
            if name not in existing:
                if pooling is None:
                    raise InvalidInput(f"collection {name!r} does not exist in {job.local}; write {name}=POOLING "
                                       f"(e.g. {name}=cls) to create it")
                self.loop.run_until_complete(self.engine.create_collection(
                    name, job.model, PoolingSpec.parse(pooling), "cosine", job.index))

    def present(self, ids: list[str]) -> set[str]:
        found = None
        for name in self.names:
            items, _ = self.store.get(name, ids)
            have = {item.id for item in items}
            found = have if found is None else found & have
        return found or set()

    def write(self, batch: list[tuple[Record, object, bytes]]) -> None:
        from embedsvc.service.engine import DecodedImage, UpsertRequestItem

        items = [UpsertRequestItem(r.id, DecodedImage(image), None, _metadata(r)) for r, image, _ in batch]
        self.loop.run_until_complete(self.engine.upsert_multi(self.names, items))

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.close())
        self.loop.close()
        self.store.close()


class _RemoteSink:
    """Streams each batch to a running server, one Upsert per collection."""

    def __init__(self, job: IndexJob, targets):
        from embedsvc.client import Client, NotFoundError

        self.client = Client(job.address, timeout=600)
        self.names = [name for name, _ in targets]
        for name, pooling in targets:
            try:
                self.client.get_collection(name)
            except NotFoundError:
                if pooling is None:
                    raise InvalidInput(f"collection {name!r} does not exist on {job.address}; write {name}=POOLING "
                                       f"to create it") from None
                self.client.create_collection(name, model=job.model, pooling=pooling, index=job.index)

    def present(self, ids: list[str]) -> set[str]:
        found = None
        for name in self.names:
            items, _ = self.client.get(name, ids)
            have = {item.id for item in items}
            found = have if found is None else found & have
        return found or set()

    def write(self, batch) -> None:
        from embedsvc.client import Item

        for name in self.names:
            self.client.upsert(name, [Item(r.id, image=data, metadata=_metadata(r)) for r, _, data in batch],
                               batch_size=len(batch))

    def close(self) -> None:
        self.client.close()


def _metadata(record: Record) -> dict:
    meta = dict(record.metadata)
    if record.caption:
        meta["caption"] = record.caption
    return meta


def _decode(record: Record):
    """(record, image, bytes) or (record, None, reason)."""
    if record.refused:
        return record, None, record.refused
    try:
        data = record.read()
        return record, decode_image(data, DEFAULT_MAX_PIXELS), data
    except FileNotFoundError:
        return record, None, "file not found"
    except EmbedsvcError as exc:
        return record, None, str(exc)
    except OSError as exc:
        return record, None, f"could not read: {exc.strerror or exc}"


def run_index(job: IndexJob) -> IndexSummary:
    started = time.perf_counter()
    records = open_source(job.source)
    if not records:
        raise InvalidInput(f"{job.source} holds no items")
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InvalidInput(f"{job.source}: id {dup!r} appears more than once; ids must be unique")
    targets = _targets(job.collections)
    sink = _LocalSink(job, targets) if job.local else _RemoteSink(job, targets)
    failed: list[tuple[str, str]] = []
    indexed = present = 0
    progress = Progress(len(records), unit="items", label="indexed ")
    chunks = [records[i:i + job.batch_size] for i in range(0, len(records), job.batch_size)]
    loop_started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=job.workers, thread_name_prefix="read") as pool:
            def submit(chunk):
                done = sink.present([r.id for r in chunk])
                return len(done), [pool.submit(_decode, r) for r in chunk if r.id not in done]

            pending = submit(chunks[0]) if chunks else None
            for number, chunk in enumerate(chunks):
                skipped, futures = pending
                # decode the next batch while this one is embedded and written
                pending = submit(chunks[number + 1]) if number + 1 < len(chunks) else None
                present += skipped
                good = []
                for future in futures:
                    record, image, payload = future.result()
                    if image is None:
                        failed.append((record.source, payload))
                    else:
                        good.append((record, image, payload))
                if good:
                    sink.write(good)
                    indexed += len(good)
                progress.update(min(len(records), (number + 1) * job.batch_size), indexed)
    finally:
        loop_seconds = time.perf_counter() - loop_started
        sink.close()
        report = Path(job.report)
        with open(report, "w") as f:
            for source, reason in failed:
                f.write(json.dumps({"path": source, "reason": reason}) + "\n")
    return IndexSummary(len(records), indexed, present, failed, time.perf_counter() - started, loop_seconds)
