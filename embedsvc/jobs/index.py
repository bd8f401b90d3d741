"""`embedsvc index`: bulk-index images into one or several collections, locally or through a server.

Records are read and decoded in parallel worker threads (bad files are reported by path, never fatal),
grouped in batches, embedded and written batch by batch. Each written batch is durable, so a job that
is interrupted and run again skips what is already stored and finishes the rest (idempotent by id).
Locally (`--local DATA_DIR` or a Milvus URI) one forward pass per batch feeds every target collection's pooling; through
a server each collection's Upsert stream embeds on the server.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from embedsvc.cpu import DEFAULT_DECODE_NICE, lower_thread_priority, usable_cpus
from embedsvc.encoder.images import DEFAULT_MAX_PIXELS, decode_image, header_pixels
from embedsvc.engine.config import EngineConfig
from embedsvc.errors import AlreadyExists, EmbedsvcError, FailedPrecondition, InvalidInput
from embedsvc.jobs.sources import Record, open_source
from embedsvc.progress import Progress

if TYPE_CHECKING:
    from embedsvc.models import ModelSpec

WRITES_IN_FLIGHT = 2  # batches being embedded and written at once (run_index)
# The side a job that indexes through a server decodes at, only to report bad files: the server decodes again at
# its model's size.
REMOTE_CHECK_SIDE = 224


# A target collection's learned-pooling state, as fit_targets reads it from either sink.
NOT_REQUIRED, NEEDS_FIT, FITTED = "not required", "needs fit", "fitted"


@dataclass
class IndexJob:
    # Image folder, manifest (.csv/.jsonl/.parquet) or WebDataset shards (.tar, glob allowed).
    source: str
    # Target collections: "NAME" (must exist) or "NAME=POOLING" (created if missing, e.g. "photos-gem=gem:p=3").
    collections: list[str]
    # Data directory or Milvus URI (milvus:///path/file.db, http://host:19530) to write into in-process;
    # None to go through the server at `address`.
    local: str | None = None
    # Server address when not local.
    address: str = "127.0.0.1:50051"
    # API token for the server (the CLI reads $EMBEDSVC_TOKEN); never printed.
    token: str = field(default="", repr=False)
    # Model for collections this job creates ("" = the default model).
    model: str = ""
    # Index type for collections this job creates ("" = flat); when given, existing targets must have it too.
    index: str = ""
    # Items per batch (one forward pass, one durable write per collection).
    batch_size: int = 64
    # Threads that read and decode images (0: one per usable CPU, at least 4: decoding takes every core the
    # forward leaves).
    workers: int = 0
    # Where failures are written, one JSON object per line.
    report: str = "index-report.jsonl"
    # "auto", "cpu" or "cuda[:N]" (local only).
    device: str = "auto"
    # "local" (in-process threads) or "ray" (Ray Data actor pool; needs `local`, and ray installed).
    engine: str = "local"
    # Ray actors (each loads the model; one GPU each where there are GPUs).
    ray_actors: int = 1
    # Ray cluster address; empty starts a local Ray instance.
    ray_address: str = ""
    # Images sampled (evenly) from the source to fit a NetVLAD target that has no codebook yet.
    fit_sample: int = 500
    # Largest image file read, in bytes (the server's default limit); larger ones are reported, never read.
    max_image_bytes: int = EngineConfig.max_image_bytes


class DecodedRecord(NamedTuple):
    """A record as a reader left it: its image, or the reason it has none."""

    record: Record
    image: Any  # a PIL image, decoded for the model's input side; None when the record is unusable
    data: bytes = b""  # the file's bytes, when kept (a server decodes them again)
    reason: str = ""  # why there is no image


class FittedTarget(NamedTuple):
    """One collection whose pooling a job fitted: on how many sample images, from how many token descriptors."""

    name: str
    images: int
    descriptors: int


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


def _targets(specs: list[str]) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for spec in specs:
        name, eq, pooling = spec.partition("=")
        twice = next((earlier for earlier in specs[: len(out)] if earlier.partition("=")[0] == name), None)
        if twice is not None:  # else the second create fails after the first, or one collection is written twice
            raise InvalidInput(
                f"collection {name!r} is named twice (--collection {twice}, --collection {spec}); name each target once"
            )
        out.append((name, pooling if eq else None))
    if not out:
        raise InvalidInput("name at least one --collection")
    return out


class _LocalSink:
    """Writes through an engine in this process: one forward pass per batch for all targets."""

    def __init__(self, job: IndexJob, targets):
        from embedsvc.engine.engine import Engine
        from embedsvc.pooling import PoolingSpec
        from embedsvc.store import open_store_at

        job = _with_readers(job)  # a sink made from a job whose workers are still 0 (one per CPU)
        assert job.local is not None  # a local sink is made for --local only
        config = EngineConfig(
            device=job.device,
            max_batch_size=job.batch_size,
            max_items_per_request=max(1024, job.batch_size),
            decode_workers=job.workers,
        )
        self.store = open_store_at(job.local)  # a data directory or a Milvus URI
        self.engine = Engine(config, self.store)
        # The engine's loop runs in its own thread, so that writes from several threads can be in flight.
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._loop_thread.start()
        self.names = [name for name, _ in targets]
        # Readers keep decoded images, not their files' bytes: the engine embeds the images.
        self.keeps_bytes = False
        # Most decoded pixels one write may carry: the engine refuses more (max_request_pixels).
        self.pixel_budget = config.max_request_pixels
        try:
            existing = {c.config.name: c.config for c in self.store.list_collections()}
            for name, pooling in targets:  # every target checked before any is created
                if name in existing:
                    check_existing(name, existing[name], asked_of(job, pooling, lambda: config.default_model))
                elif pooling is None:
                    raise InvalidInput(
                        f"collection {name!r} does not exist in {job.local}; write "
                        f"{name}=POOLING (e.g. {name}=cls) to create it"
                    )
            for name, pooling in targets:
                if name not in existing:
                    self._run(
                        self.engine.create_collection(
                            name, job.model, PoolingSpec.parse(pooling), "cosine", job.index or "flat"
                        )
                    )
        except BaseException:
            self.close()
            raise

    @functools.cached_property
    def image_side(self) -> int:
        """The input side of the largest among the targets' models (loading them): what readers decode for."""
        models = {self.store.get_collection(name).config.model for name in self.names} - {""}
        return max((self.engine.runtime(m).encoder.loaded.image_size for m in models), default=0)

    @staticmethod
    def pixels(row: DecodedRecord) -> int:
        """What a decoded row counts against the engine's pixel budget: the image held."""
        return row.image.size[0] * row.image.size[1]

    def _run(self, coro):
        """Runs a coroutine on the engine's loop and waits for it; callable from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def present(self, ids: list[str]) -> set[str]:
        return _present_in_all(self.store.get, self.names, ids)

    def items(self, name: str) -> int:
        return self.store.get_collection(name).count

    def fit_state(self, name: str) -> str:
        from embedsvc.pooling import POOLINGS

        info = self.store.get_collection(name)
        definition = POOLINGS.get(info.config.pooling)
        if not (definition and definition.requires_fit):
            return NOT_REQUIRED
        return FITTED if info.pooling_version else NEEDS_FIT

    def fit(self, name: str, samples: list[DecodedRecord]) -> int:
        """Fits the collection's pooling on decoded sample images; returns the token descriptors used."""
        from embedsvc.engine.engine import DecodedImage

        fitted = self._run(self.engine.fit_pooling(name, [DecodedImage(row.image) for row in samples], {}))
        return fitted.descriptors

    def write(self, batch: list[DecodedRecord]) -> None:
        from embedsvc.engine.engine import DecodedImage, UpsertRequestItem

        items = [
            UpsertRequestItem(row.record.id, DecodedImage(row.image), None, _metadata(row.record)) for row in batch
        ]
        self._run(self.engine.upsert_multi(self.names, items))

    def write_vectors(self, ids: list[str], vectors: list, metadata: list[dict]) -> None:
        from embedsvc.store import Item

        for name, matrix in zip(self.names, vectors):
            self.store.upsert(name, [Item(i, v, m) for i, v, m in zip(ids, matrix, metadata)])

    def targets(self) -> tuple[str, list[dict]]:
        """The one model and, per collection, its pooling and fitted state: what Ray actors need."""
        infos = [self.store.get_collection(name) for name in self.names]
        models = {info.config.model for info in infos}
        if len(models) != 1 or "" in models:
            raise InvalidInput("the ray engine needs target collections that share one model")
        from embedsvc.models import get_model_spec, weights_sha256

        loaded = weights_sha256(get_model_spec(infos[0].config.model))
        for info in infos:  # fail early, before Ray starts; each actor checks again what it loads itself
            info.config.check_weights(loaded)
        return models.pop(), [
            {
                "pooling": info.config.pooling,
                "params": dict(info.config.pooling_params),
                "state": self.store.pooling_state(info.config.name),
                "dim": info.config.dim,
                "config": info.config.to_json(),
            }  # each actor checks the weights it loads
            for info in infos
        ]

    def close(self) -> None:
        """Cancels writes still running on the loop (their callers get CancelledError instead of waiting
        forever), then closes the engine, the loop and the store."""

        async def cancel_the_rest():
            rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        try:
            self._run(cancel_the_rest())
            self._run(self.engine.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._loop_thread.join()
            self.loop.close()
            self.store.close()


class _RemoteSink:
    """Streams each batch to a running server, one Upsert per collection."""

    def __init__(self, job: IndexJob, targets):
        from embedsvc.client import Client, NotFoundError

        self.client = Client(job.address, timeout=600, token=job.token or None)
        self.names = [name for name, _ in targets]
        self.image_side, self.keeps_bytes = REMOTE_CHECK_SIDE, True
        # The server's budget is its own; a job splits writes by the default, counting each file's declared
        # size (never less than what the server counts: it decodes JPEGs scaled down).
        self.pixel_budget = EngineConfig.max_request_pixels
        try:
            existing = {}
            for name, pooling in targets:  # every target checked before any is created
                try:
                    existing[name] = self.client.get_collection(name)
                except NotFoundError:
                    if pooling is None:
                        raise InvalidInput(
                            f"collection {name!r} does not exist on {job.address}; write {name}=POOLING to create it"
                        ) from None
            server_default = functools.cache(lambda: self.client.list_models().default_model)  # asked once, if needed
            for name, pooling in targets:
                if name in existing:
                    check_existing(name, existing[name], asked_of(job, pooling, server_default))
            for name, pooling in targets:
                if name not in existing:
                    self.client.create_collection(name, model=job.model, pooling=pooling, index=job.index or "flat")
        except BaseException:
            self.client.close()
            raise

    @staticmethod
    def pixels(row: DecodedRecord) -> int:
        return header_pixels(row.data)

    def present(self, ids: list[str]) -> set[str]:
        return _present_in_all(self.client.get, self.names, ids)

    def items(self, name: str) -> int:
        return self.client.get_collection(name).count

    def fit_state(self, name: str) -> str:
        state = self.client.get_collection(name).pooling_state  # POOLING_STATE_NEEDS_FIT, ...
        return {"POOLING_STATE_NEEDS_FIT": NEEDS_FIT, "POOLING_STATE_FITTED": FITTED}.get(state, NOT_REQUIRED)

    def fit(self, name: str, samples: list[DecodedRecord]) -> int:
        return self.client.fit_pooling(name, [row.data for row in samples]).descriptors

    def write(self, batch: list[DecodedRecord]) -> None:
        from embedsvc.client import Item

        for name in self.names:
            self.client.upsert(
                name,
                [Item(row.record.id, image=row.data, metadata=_metadata(row.record)) for row in batch],
                batch_size=len(batch),
            )

    def close(self) -> None:
        self.client.close()


def asked_of(job: IndexJob, pooling: str | None, default_model: Callable[[], str]) -> dict[str, tuple]:
    """What the job asks of an existing target, field by field: (value to compare, how to show it). NAME=POOLING
    asks for the collection the job would create (model, pooling, metric cosine); --model and --index, when
    given, ask for themselves."""
    asked: dict[str, tuple[Any, str]] = {}
    if job.model or pooling is not None:
        model = job.model or default_model()
        asked["model"] = (model, f"model {model!r}" + ("" if job.model else " (the default)"))
    if pooling is not None:
        from embedsvc.pooling import bind_pooling, params_to_strings  # imports torch: only for an existing target

        bound = bind_pooling(pooling)
        asked["pooling"] = ((bound.name, params_to_strings(bound.params)), f"pooling {pooling}")
        asked["metric"] = ("cosine", "metric cosine")
    if job.index:
        asked["index"] = (job.index, f"index {job.index}")
    return asked


def check_existing(name: str, config, asked: dict[str, tuple]) -> None:
    """Refuses an existing target that differs from what the job asks for (`config`: a CollectionConfig or a
    client Collection): its items would be embedded otherwise than asked, under a message that all is well."""
    params = dict(config.pooling_params)
    pooling = config.pooling + (":" + ";".join(f"{k}={v}" for k, v in sorted(params.items())) if params else "")
    have = {
        "model": (config.model, f"model {config.model!r}"),
        "pooling": ((config.pooling, params), f"pooling {pooling or 'none (vectors only)'}"),
        "metric": (config.metric, f"metric {config.metric}"),
        "index": (config.index, f"index {config.index}"),
    }
    differ = [field for field, (value, _) in asked.items() if have[field][0] != value]
    if differ:
        raise AlreadyExists(
            f"collection {name!r} exists with {', '.join(have[f][1] for f in differ)}, but this job "
            f"asks for {', '.join(asked[f][1] for f in differ)}; to use it as it is, write "
            f"--collection {name} without =POOLING, --model or --index, or name a new collection"
        )


def _present_in_all(get, names: list[str], ids: list[str]) -> set[str]:
    """Ids already stored in every target collection (`get` is a store's get or Client.get)."""
    found = None
    for name in names:
        items, _ = get(name, ids)
        have = {item.id for item in items}
        found = have if found is None else found & have
    return found or set()


def _metadata(record: Record) -> dict:
    meta = dict(record.metadata)
    if record.caption:
        meta["caption"] = record.caption
    return meta


def decode_record(record: Record, short_side: int = 0, keep_bytes: bool = True) -> DecodedRecord:
    """The record with its image, or with the reason it has none. The image is decoded at the size a model of
    input side `short_side` needs (decode_image); without `keep_bytes` the bytes are dropped (b"") once decoded."""
    if record.refused:
        return DecodedRecord(record, None, reason=record.refused)
    try:
        data = record.read()
        return DecodedRecord(record, decode_image(data, DEFAULT_MAX_PIXELS, short_side), data if keep_bytes else b"")
    except FileNotFoundError:
        return DecodedRecord(record, None, reason="file not found")
    except EmbedsvcError as exc:
        return DecodedRecord(record, None, reason=str(exc))
    except OSError as exc:
        return DecodedRecord(record, None, reason=f"could not read: {exc.strerror or exc}")


def split_by_pixels(rows: list, pixels, budget: int) -> list[list]:
    """Consecutive runs of `rows` whose pixels(row) add up to at most `budget` (a row over it alone): a batch
    of large images is written in several parts instead of being refused."""
    parts: list[list] = []
    part: list = []
    total = 0
    for row in rows:
        n = pixels(row)
        if part and total + n > budget:
            parts.append(part)
            part, total = [], 0
        part.append(row)
        total += n
    return [*parts, part] if part else parts


def _write_report(path: str, failed: list[tuple[str, str]]) -> None:
    with open(path, "w") as f:
        for source, reason in failed:
            f.write(json.dumps({"path": source, "reason": reason}) + "\n")


def _run_ray(job: IndexJob, records: list[Record], sink: _LocalSink, started: float) -> IndexSummary:
    from embedsvc.models import get_model_spec

    try:
        from embedsvc.jobs.ray_engine import embed_with_ray
    except ImportError:
        raise InvalidInput("the ray engine needs Ray Data: pip install 'ray[data]'") from None
    model, targets = sink.targets()
    failed = [(r.source, r.refused) for r in records if r.refused]
    present = sink.present([r.id for r in records if not r.refused])
    todo = [r for r in records if not r.refused and r.id not in present]
    by_id = {r.id: r for r in todo}
    rows = []
    for r in todo:  # files are read by the actors (absolute paths, bounded reads); archive members travel as bytes
        rows.append(
            {"id": r.id, "path": os.path.abspath(r.path) if r.path else "", "data": b"" if r.path else r.read()}
        )
    indexed = 0
    progress = Progress(len(records), unit="items", label="indexed ")
    loop_started = time.perf_counter()
    if rows:
        for batch in embed_with_ray(
            rows,
            _portable_spec(get_model_spec(model)),
            targets,
            job.batch_size,
            job.ray_actors,
            job.device,
            job.ray_address or None,
            job.max_image_bytes,
        ):
            ok = [k for k, reason in enumerate(batch["reason"]) if not reason]
            failed += [
                (by_id[batch["id"][k]].source, batch["reason"][k]) for k in range(len(batch["id"])) if k not in ok
            ]
            ids = [str(batch["id"][k]) for k in ok]
            if ids:
                sink.write_vectors(
                    ids, [batch[f"vector_{t}"][ok] for t in range(len(targets))], [_metadata(by_id[i]) for i in ids]
                )
                indexed += len(ids)
            progress.update(len(present) + indexed + len(failed), indexed)
    _write_report(job.report, failed)
    return IndexSummary(
        len(records), indexed, len(present), failed, time.perf_counter() - started, time.perf_counter() - loop_started
    )


def _portable_spec(spec: ModelSpec) -> ModelSpec:
    """The spec with absolute file paths: Ray workers may run in another working directory."""
    return replace(
        spec,
        checkpoint=os.path.abspath(spec.checkpoint) if spec.checkpoint else spec.checkpoint,
        config_file=os.path.abspath(spec.config_file) if spec.config_file else spec.config_file,
    )


def sample_records(records: list[Record], count: int) -> list[Record]:
    """`count` records spread evenly over the source (its order is often by class or time)."""
    usable = [r for r in records if not r.refused]
    if count >= len(usable):
        return usable
    step = len(usable) / count
    return [usable[int(i * step)] for i in range(count)]


def fit_targets(
    sink, names: list[str], records: list[Record], sample: int, workers: int = 4, only_unfitted: bool = True
) -> list[FittedTarget]:
    """Fits the learned pooling of each named collection (the unfitted ones, by default) on a sample of
    the source; returns what each fit used. Unusable sample files are skipped."""
    states = {name: sink.fit_state(name) for name in names}
    if not only_unfitted:
        fixed = [name for name, state in states.items() if state == NOT_REQUIRED]
        if fixed:
            raise FailedPrecondition(
                f"collection {fixed[0]!r} uses a pooling that learns nothing; only NetVLAD collections are fitted"
            )
        full = next((name for name in names if sink.items(name)), None)  # before sampling: refit needs empty
        if full:
            raise FailedPrecondition(
                f"collection {full!r} holds {sink.items(full)} items embedded with its current "
                f"codebook; fit a new (empty) collection"
            )
    todo = [name for name, state in states.items() if state == NEEDS_FIT or not only_unfitted]
    if not todo:
        return []
    if sample < 1:
        raise InvalidInput(
            f"{', '.join(todo)} need a fitted codebook before items go in: sample at least one image "
            f"(--fit-sample N), or fit first with `embedsvc collections fit NAME SOURCE`"
        )
    read = functools.partial(decode_record, short_side=sink.image_side, keep_bytes=sink.keeps_bytes)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read") as pool:
        decoded = list(pool.map(read, sample_records(records, sample)))
    good = [row for row in decoded if row.image is not None]
    if not good:
        raise InvalidInput(f"no usable image among the {len(decoded)} sampled to fit {', '.join(todo)}")
    done = []
    for name in todo:
        print(
            f"fitting the pooling of {name!r} on {len(good)} sample images of the source ...",
            file=sys.stderr,
            flush=True,
        )
        done.append(FittedTarget(name, len(good), sink.fit(name, good)))
        print(f"fitted {name!r}: codebook from {done[-1].descriptors} token descriptors", file=sys.stderr, flush=True)
    return done


def _with_readers(job: IndexJob) -> IndexJob:
    """The job with its reader count resolved (workers 0: one per usable CPU, at least 4)."""
    if job.workers < 0:
        raise InvalidInput(f"--workers must be at least 1 (or 0 for one per CPU), got {job.workers}")
    return replace(job, workers=job.workers or max(4, usable_cpus()))


def _source_records(job: IndexJob) -> list[Record]:
    """The source's records, image files over job.max_image_bytes refused unread."""
    if job.max_image_bytes < 1:
        raise InvalidInput(f"--max-image-bytes must be at least 1, got {job.max_image_bytes}")
    records = open_source(job.source, job.max_image_bytes)
    if not records:
        raise InvalidInput(f"{job.source} holds no items")
    for record in records:
        refuse_unstorable(record)
    return records


def refuse_unstorable(record: Record) -> None:
    """Refuses, before anything is read, a record whose id or metadata every store refuses (a file name that is
    not UTF-8, a path over the id limit, a caption over the string limit): written in a batch, it would fail the
    batch, and with it the job."""
    from embedsvc.store.metadata import validate_metadata
    from embedsvc.store.models import validate_id

    if record.refused:
        return
    try:
        validate_id(record.id)
        validate_metadata(_metadata(record), "item")
    except InvalidInput as exc:
        record.refused = f"not storable: {exc}"


def run_index(job: IndexJob) -> IndexSummary:
    started = time.perf_counter()
    job = _with_readers(job)
    records = _source_records(job)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InvalidInput(f"{job.source}: id {dup!r} appears more than once; ids must be unique")
    targets = _targets(job.collections)
    if job.engine not in ("local", "ray"):
        raise InvalidInput(f"--engine must be local or ray, got {job.engine!r}")
    if job.engine == "ray" and not job.local:
        raise InvalidInput("--engine ray writes into a data directory: add --local DATA_DIR")
    sink = _LocalSink(job, targets) if job.local else _RemoteSink(job, targets)
    try:
        fit_targets(sink, sink.names, records, job.fit_sample, job.workers)
    except BaseException:
        sink.close()
        raise
    if job.engine == "ray":
        assert isinstance(sink, _LocalSink)  # --engine ray needs --local (checked above)
        try:
            return _run_ray(job, records, sink, started)
        finally:
            sink.close()
    failed: list[tuple[str, str]] = []
    indexed = present = 0
    progress = Progress(len(records), unit="items", label="indexed ")
    chunks = [records[i : i + job.batch_size] for i in range(0, len(records), job.batch_size)]
    loop_started = time.perf_counter()
    try:
        # Readers decode beside the forward: niced like serve's decoders, so its OpenMP team keeps its cores.
        # WRITES_IN_FLIGHT batches are written at once: one batch's preprocessing and commit overlap the
        # other's forward pass instead of leaving the model idle.
        with (
            ThreadPoolExecutor(
                max_workers=job.workers,
                thread_name_prefix="read",
                initializer=lower_thread_priority,
                initargs=(DEFAULT_DECODE_NICE,),
            ) as pool,
            ThreadPoolExecutor(max_workers=WRITES_IN_FLIGHT, thread_name_prefix="write") as writer,
        ):
            read = functools.partial(decode_record, short_side=sink.image_side, keep_bytes=sink.keeps_bytes)

            def submit(chunk):
                done = sink.present([r.id for r in chunk if not r.refused])  # a refused id may be unstorable
                return len(done), [pool.submit(read, r) for r in chunk if r.id not in done]

            writes: deque = deque()

            def finish_write():
                nonlocal indexed
                future, rows = writes.popleft()
                future.result()
                indexed += rows

            pending = submit(chunks[0]) if chunks else None
            for number in range(len(chunks)):
                assert pending is not None  # submitted for every chunk
                skipped, futures = pending
                # decode the next batch while this one is embedded and written
                pending = submit(chunks[number + 1]) if number + 1 < len(chunks) else None
                present += skipped
                good = []
                for future in futures:
                    row = future.result()
                    if row.image is None:
                        failed.append((row.record.source, row.reason))
                    else:
                        good.append(row)
                for part in split_by_pixels(good, sink.pixels, sink.pixel_budget):
                    writes.append((writer.submit(sink.write, part), len(part)))
                    if len(writes) >= WRITES_IN_FLIGHT:
                        finish_write()
                progress.update(min(len(records), (number + 1) * job.batch_size), indexed)
            while writes:
                finish_write()
    finally:
        loop_seconds = time.perf_counter() - loop_started
        sink.close()
        _write_report(job.report, failed)
    return IndexSummary(len(records), indexed, present, failed, time.perf_counter() - started, loop_seconds)


def run_fit(job: IndexJob, sample: int) -> list[FittedTarget]:
    """`embedsvc collections fit`: fits the learned pooling of job's collections (created first when written
    NAME=POOLING) on `sample` images of job's source, whether fitted before or not (refitting needs an
    empty collection)."""
    job = _with_readers(job)
    records = _source_records(job)
    sink = _LocalSink(job, _targets(job.collections)) if job.local else _RemoteSink(job, _targets(job.collections))
    try:
        return fit_targets(sink, sink.names, records, sample, job.workers, only_unfitted=False)
    finally:
        sink.close()
