"""The application core without a transport: models, batchers, poolings per collection, and the store, wired.

The service's operations (gRPC servicers, HTTP API) and bulk jobs convert their inputs to the plain types here
and back; everything that decides lives here.
Blocking work (decoding, model forward, SQLite commits, FAISS searches) runs off the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import numpy as np
import torch

from embedsvc.cpu import lower_thread_priority, usable_cpus
from embedsvc.encoder import ClipEncoder
from embedsvc.encoder.images import (
    THUMBNAIL_SIDE,
    check_resized_size,
    decode_image,
    decoded_pixels,
    fit_to_model,
    thumbnail_jpeg,
)
from embedsvc.engine.batching import DynamicBatcher
from embedsvc.engine.config import EngineConfig
from embedsvc.errors import Aborted, EmptyText, FailedPrecondition, InvalidInput, ResourceExhausted, quoted
from embedsvc.models import get_model_spec, load_model
from embedsvc.models.registry import register_models_file
from embedsvc.pooling import (
    BoundPooling,
    NetVLADState,
    PoolingSpec,
    bind_pooling,
    fit_netvlad,
    image_token_modes,
    params_to_strings,
)
from embedsvc.pooling.features import IMAGE, TEXT, TokenFeatures
from embedsvc.store import CollectionConfig, CollectionInfo, Filter, Hit, Item, SearchOptions, VectorStore

log = logging.getLogger(__name__)


@dataclass
class Text:
    text: str


@dataclass
class ImageBytes:
    data: bytes


@dataclass
class DecodedImage:
    """An image a caller already decoded (bulk jobs decode in their own workers to report bad files)."""

    image: Any


@dataclass
class PreparedImage:
    """An image a front-end process already checked, decoded and cut to the model's input (ClipEncoder.prepare's
    tensor, in shared memory): it goes to the batcher as is (embedsvc.service.modelchannel)."""

    pixels: torch.Tensor


Content = Text | ImageBytes | DecodedImage | PreparedImage


@dataclass
class Embedding:
    modality: str
    vectors: list[np.ndarray]  # one per pooling
    truncated: bool
    tokens: TokenFeatures | None = None


@dataclass
class EmbeddedBatch:
    """A request's embeddings as matrices, rows in input order."""

    modalities: list[str]
    vectors: list[np.ndarray]  # one [N, dim] float32 matrix per pooling
    truncated: list[bool]
    tokens: list[TokenFeatures] | None = None  # per input, when asked for
    # Per input, the text tokens the model read (SOT and EOT included, after any cut); 0 for images.
    token_counts: list[int] = field(default_factory=list)


@dataclass
class UpsertRequestItem:
    id: str
    content: Content | None
    vector: np.ndarray | None
    metadata: dict


@dataclass
class Query:
    content: Content | None = None
    vector: np.ndarray | None = None
    item_id: str | None = None


@dataclass
class SearchOutcome:
    hits: list[Hit]
    truncated: bool


class TowerOutput(NamedTuple):
    """What one tower's batcher returned for a request's contents of that tower (Engine.features)."""

    positions: list[int]  # of these contents among the request's
    result: Any  # TokenFeatures of the group, or a list of finish(features), one per batcher part


class PooledPart(NamedTuple):
    """Engine.pooled's finish: one batcher part pooled in the model thread."""

    vectors: list[np.ndarray]  # one [rows, dim] matrix per pooling
    truncated: list[bool]
    tokens: TokenFeatures | None  # when asked for
    token_counts: list[int]


@dataclass
class FitOutcome:
    """A fitted collection (its new pooling version), the token descriptors the fit read, and its seconds."""

    info: CollectionInfo
    descriptors: int
    seconds: float


def _image_payload(content: Content) -> Any:
    """What decoding reads of an image input: the image a caller decoded, or the encoded bytes."""
    if isinstance(content, DecodedImage):
        return content.image
    assert isinstance(content, ImageBytes)  # texts and front-end-prepared images are never decoded here
    return content.data


def check_count(config: EngineConfig, n: int, what: str) -> None:
    if n > config.max_items_per_request:
        raise ResourceExhausted(
            f"{n} {what} in one request, over the limit of {config.max_items_per_request}; split it"
        )


def check_content(config: EngineConfig, content: Content, where: str) -> None:
    """A request input's limits, checked before any decode or forward (here and in front-end processes)."""
    if isinstance(content, Text):
        if not content.text.strip():
            raise EmptyText(f"{where}: text is empty; send at least one non-blank character")
        if len(content.text) > config.max_text_chars:
            raise InvalidInput(
                f"{where}: text has {len(content.text)} characters, over the limit of {config.max_text_chars}"
            )
    elif isinstance(content, (DecodedImage, PreparedImage)):
        pass
    elif isinstance(content, ImageBytes):
        if len(content.data) > config.max_image_bytes:
            raise InvalidInput(
                f"{where}: image is {len(content.data):,} bytes, over the limit of {config.max_image_bytes:,}"
            )
    else:
        raise InvalidInput(f"{where}: no content (set text or image)")


def decode_for_model(
    config: EngineConfig,
    short_side: int,
    prepare: Callable[[Any], torch.Tensor],
    data: Any,
    where: str,
    lone: bool = False,
) -> torch.Tensor:
    """Encoded bytes (or a decoded image) to `prepare`'s tensor at the model's input size `short_side`. With
    `lone` (the request's only image), the request's pixel budget is checked here, first, from the header this
    decode opens: `check_pixel_budget` would open it a second time."""
    budget = functools.partial(_check_budget, config, 1) if lone else None
    try:
        if isinstance(data, (bytes, bytearray)):
            image = decode_image(
                bytes(data), config.max_image_pixels, short_side, config.max_image_header_pixels, budget=budget
            )
        else:  # already decoded (by a bulk job, at its model's size or larger): reduced as decode_image does
            if budget:
                budget(data.size[0] * data.size[1])
            check_resized_size(data.size, short_side, config.max_image_pixels)
            image = fit_to_model(data, short_side)
    except InvalidInput as exc:
        raise type(exc)(f"{where}: {exc}") from None
    return prepare(image)


def check_pixel_budget(config: EngineConfig, payloads: Sequence[Any], short_side: int) -> None:
    """RESOURCE_EXHAUSTED when the pixels the images decode to (from their headers: a JPEG's scaled size
    at the model's input size) add up to more than max_request_pixels."""
    total = sum(
        decoded_pixels(bytes(p), short_side) if isinstance(p, (bytes, bytearray)) else p.size[0] * p.size[1]
        for p in payloads
    )
    _check_budget(config, len(payloads), total)


def _check_budget(config: EngineConfig, images: int, total: int) -> None:
    if total > config.max_request_pixels:
        raise ResourceExhausted(
            f"{images} images of {total:,} decoded pixels in one request, over the "
            f"limit of {config.max_request_pixels:,} (max_request_pixels); send fewer "
            f"or smaller images per request"
        )


FIT_SEED_MAX = 2**31 - 1  # faiss k-means takes a C int seed


def _fit_params(params: dict[str, str]) -> tuple[int, int]:
    """FitPooling's (seed, max_descriptors), checked before any work."""
    unknown = set(params) - {"seed", "max_descriptors"}
    if unknown:
        raise InvalidInput(
            f"unknown fit parameter(s) {', '.join(sorted(quoted(u) for u in unknown))}; allowed: seed, max_descriptors"
        )
    seed, max_descriptors = _int_param(params, "seed", 0), _int_param(params, "max_descriptors", 200_000)
    if not 0 <= seed <= FIT_SEED_MAX:
        raise InvalidInput(f"fit parameter seed must be between 0 and {FIT_SEED_MAX}, got {seed}")
    if max_descriptors < 1:
        raise InvalidInput(f"fit parameter max_descriptors must be at least 1, got {max_descriptors}")
    return seed, max_descriptors


def _int_param(params: dict[str, str], key: str, default: int) -> int:
    raw = params.get(key, str(default))
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"fit parameter {key} must be an integer, got {quoted(raw)}") from None


class ModelRuntime:
    """One loaded model with its two batchers (text, image) and its forward thread."""

    def __init__(self, encoder: ClipEncoder, config: EngineConfig, on_batch):
        self.encoder = encoder
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{encoder.loaded.spec.name}")
        name = encoder.loaded.spec.name
        delay = config.max_batch_delay_ms / 1000
        model_free = asyncio.Lock()  # one forward at a time: the other tower keeps gathering meanwhile
        self.text = DynamicBatcher(
            f"{name}/text",
            lambda xs, modes: encoder.encode_texts(xs),
            self.executor,
            config.max_batch_size,
            delay,
            config.max_queue,
            on_batch,
            model_free,
        )
        self.image = DynamicBatcher(
            f"{name}/image",
            lambda xs, modes: encoder.encode_images(torch.stack(xs), modes),
            self.executor,
            config.max_batch_size,
            delay,
            config.max_queue,
            on_batch,
            model_free,
        )

    async def close(self) -> None:
        await self.text.close()
        await self.image.close()
        self.executor.shutdown(wait=True)


class Engine:
    def __init__(self, config: EngineConfig, store: VectorStore, metrics=None):
        self.config = config
        self.store = store
        self.metrics = metrics
        self.decode_pool = ThreadPoolExecutor(
            max_workers=config.decode_workers,
            thread_name_prefix="decode",
            initializer=lower_thread_priority,
            initargs=(config.decode_nice,),
        )
        self.io_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store")
        self._models: dict[str, ModelRuntime] = {}
        self._model_lock = threading.Lock()
        self._poolings: dict[str, tuple[int, BoundPooling]] = {}  # collection uid -> (pooling version, pooling)
        self._tracked: set[str] = set()  # collections with an items gauge
        torch.set_num_threads(config.torch_threads or usable_cpus())
        if config.models_file:
            register_models_file(config.models_file)

    # -- models -------------------------------------------------------------------------------

    def runtime(self, name: str) -> ModelRuntime:
        """The model's runtime, loading it on first use (loading blocks: call from a worker thread)."""
        name = name or self.config.default_model
        with self._model_lock:
            if name not in self._models:
                spec = get_model_spec(name)
                loaded = load_model(spec, device=self.config.device, precision=self.config.precision)
                if self.metrics:
                    self.metrics.model_load_seconds.labels(name).set(loaded.load_seconds)
                self._models[name] = ModelRuntime(
                    ClipEncoder(loaded, max_batch=self.config.max_batch_size),
                    self.config,
                    self.metrics.observe_batch if self.metrics else None,
                )
            return self._models[name]

    async def collection_runtime(self, info: CollectionInfo) -> ModelRuntime:
        """The runtime of a collection's model, refused when the name now loads other weights than the ones the
        stored vectors came from: new vectors would not be comparable with them."""
        runtime = await self.runtime_async(info.config.model)
        info.config.check_weights(runtime.encoder.loaded.weights_sha256)
        return runtime

    async def runtime_async(self, name: str) -> ModelRuntime:
        name = name or self.config.default_model
        if name in self._models:
            return self._models[name]
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, self.runtime, name)

    def loaded_models(self) -> dict[str, ModelRuntime]:
        return dict(self._models)

    # -- embedding ----------------------------------------------------------------------------

    def _check_content(self, content: Content, where: str) -> None:
        check_content(self.config, content, where)

    def _decode(self, runtime: ModelRuntime, data: Any, where: str, lone: bool = False) -> torch.Tensor:
        loaded = runtime.encoder.loaded
        return decode_for_model(self.config, loaded.image_size, runtime.encoder.prepare, data, where, lone)

    def _check_pixel_budget(self, payloads: Sequence[Any], short_side: int) -> None:
        check_pixel_budget(self.config, payloads, short_side)

    async def _in_decode_pool(self, jobs: Sequence[Callable[[], Any]]) -> list[Any]:
        """Runs one request's jobs in the decode pool, at most decode_workers of them at a time.

        The pool's queue is first in, first out: submitting a large request's images all at once would
        put every later request behind all of them. With a few in flight per request, requests take the
        pool in turns, and a small request waits for about one image per worker, not for a whole batch.
        """
        loop = asyncio.get_running_loop()
        if len(jobs) == 1:  # no turns to take: one hop to the pool, without a gate, a task and a gather
            return [await loop.run_in_executor(self.decode_pool, jobs[0])]
        gate = asyncio.Semaphore(self.config.decode_workers)

        async def run(job):
            async with gate:
                return await loop.run_in_executor(self.decode_pool, job)

        tasks = [asyncio.ensure_future(run(job)) for job in jobs]
        try:
            return await asyncio.gather(*tasks)
        finally:  # a failed image (or a cancelled call) stops this request's remaining decodes
            for task in tasks:
                task.cancel()

    async def _decode_images(self, runtime: ModelRuntime, payloads: list[Any], wheres: list[str]) -> list[Any]:
        """The images' model inputs, the request's pixel budget checked from the headers before any is decoded.

        One image is checked and decoded in one decode-pool job, from one opening of its header (decode_for_model's
        `lone`): a second trip through the pool (a wake-up of a niced thread and one of the event loop, each a wait
        for a core on a busy machine) would cost the one-photo request more than its header check.
        """
        if len(payloads) == 1:
            return await self._in_decode_pool([functools.partial(self._decode, runtime, payloads[0], wheres[0], True)])
        short_side = runtime.encoder.loaded.image_size
        await self._in_decode_pool([functools.partial(self._check_pixel_budget, payloads, short_side)])
        decode = [functools.partial(self._decode, runtime, payload, where) for payload, where in zip(payloads, wheres)]
        return await self._in_decode_pool(decode)

    async def features(
        self,
        runtime: ModelRuntime,
        contents: Sequence[Content],
        where: str = "input",
        finish: Callable[[TokenFeatures], Any] | None = None,
        poolings: Sequence[BoundPooling] = (),
    ) -> list[TowerOutput]:
        """Per tower, the indexes of its contents and what the batcher returned for them: TokenFeatures of the
        whole group, or with `finish`, finish(features) per batcher part, computed in the model thread.
        Image features carry the token modes `poolings` read."""
        modes = image_token_modes(list(poolings))
        runtime.encoder.check_token_modes(modes)
        for i, content in enumerate(contents):
            self._check_content(content, f"{where} {i}")
        texts = [i for i, c in enumerate(contents) if isinstance(c, Text)]
        images = [i for i, c in enumerate(contents) if not isinstance(c, Text)]
        jobs = []
        prepared = [c for c in (contents[i] for i in images) if isinstance(c, PreparedImage)]
        if images and len(prepared) == len(images):  # a front end decoded them
            pixels = [c.pixels for c in prepared]
        elif images:  # decode first: a bad image fails the request before any forward pass is queued
            pixels = await self._decode_images(
                runtime, [_image_payload(contents[i]) for i in images], [f"{where} {i}" for i in images]
            )
        if texts:
            jobs.append(runtime.text.submit([c.text for c in contents if isinstance(c, Text)], finish))  # at texts
        if images:
            jobs.append(runtime.image.submit(list(pixels), finish, modes))
        # One tower: awaited in this task (gather would wrap it in a task of its own, a turn of the loop more).
        results = [await jobs[0]] if len(jobs) == 1 else await asyncio.gather(*jobs)
        return [TowerOutput(index, result) for index, result in zip([x for x in (texts, images) if x], results)]

    async def pooled(
        self,
        runtime: ModelRuntime,
        contents: Sequence[Content],
        poolings: Sequence[BoundPooling],
        where: str = "input",
        include_tokens: bool = False,
    ) -> EmbeddedBatch:
        """Every pooling of every content, as matrices: poolings run in the model thread on whole batches."""

        def finish(f: TokenFeatures) -> PooledPart:
            with torch.inference_mode():  # not the decorator: it would wrap a new function on the loop per call
                counts = f.mask.sum(dim=1).tolist() if f.modality == TEXT else [0] * f.mask.shape[0]
                pooled = [pooling(f).cpu().numpy() for pooling in poolings]
            return PooledPart(pooled, f.truncated, f if include_tokens else None, counts)

        groups = await self.features(runtime, contents, where, finish, poolings)
        n = len(contents)
        vectors: list[np.ndarray | None] = [None] * len(poolings)
        truncated = np.zeros(n, dtype=bool)
        token_counts = np.zeros(n, dtype=np.int64)
        modalities = [TEXT if isinstance(c, Text) else IMAGE for c in contents]
        tokens: list | None = [None] * n if include_tokens else None
        for index, parts in groups:
            rows = np.asarray(index)
            for j in range(len(poolings)):
                part_vectors = (
                    np.concatenate([part.vectors[j] for part in parts]) if len(parts) > 1 else parts[0].vectors[j]
                )
                if len(index) == n:  # one tower, inputs in order: the matrix as pooled
                    vectors[j] = part_vectors
                    continue
                matrix = vectors[j]
                if matrix is None:
                    matrix = vectors[j] = np.empty((n, part_vectors.shape[1]), dtype=np.float32)
                matrix[rows] = part_vectors
            truncated[rows] = [t for part in parts for t in part.truncated]
            token_counts[rows] = [c for part in parts for c in part.token_counts]
            if tokens is not None:  # include_tokens
                rows_of = [
                    (part.tokens, r)
                    for part in parts
                    if part.tokens is not None
                    for r in range(part.tokens.tokens.shape[0])
                ]
                for i, (f, r) in zip(index, rows_of):
                    tokens[i] = f.select([r])
        filled = cast(list[np.ndarray], vectors)  # every pooling's matrix: contents are never empty
        return EmbeddedBatch(modalities, filled, truncated.tolist(), tokens, token_counts.tolist())

    async def embed(
        self, model: str, poolings: Sequence[PoolingSpec], contents: Sequence[Content], include_tokens: bool = False
    ) -> tuple[str, list[Embedding]]:
        """Per input, one vector per pooling (see embed_batch for the same as matrices)."""
        name, batch = await self.embed_batch(model, poolings, contents, include_tokens)
        return name, [
            Embedding(
                batch.modalities[i],
                [v[i] for v in batch.vectors],
                batch.truncated[i],
                batch.tokens[i] if batch.tokens else None,
            )
            for i in range(len(contents))
        ]

    async def embed_batch(
        self, model: str, poolings: Sequence[PoolingSpec], contents: Sequence[Content], include_tokens: bool = False
    ) -> tuple[str, EmbeddedBatch]:
        if not contents:
            raise InvalidInput("no inputs: send at least one text or image")
        self._check_count(len(contents), "inputs")
        bound = [bind_pooling(spec) for spec in (poolings or [PoolingSpec("cls")])]
        for pooling in bound:
            pooling.check_ready()
            for modality in {TEXT if isinstance(c, Text) else IMAGE for c in contents}:
                pooling.check_modality(modality)
        runtime = await self.runtime_async(model)
        batch = await self.pooled(runtime, contents, bound, include_tokens=include_tokens)
        return runtime.encoder.loaded.spec.name, batch

    def _check_count(self, n: int, what: str) -> None:
        check_count(self.config, n, what)

    # -- collections --------------------------------------------------------------------------

    async def run_blocking(self, fn: Callable, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, lambda: fn(*args, **kwargs))

    async def create_collection(
        self, name: str, model: str, pooling: PoolingSpec | None, metric: str, index: str, dim: int = 0
    ) -> CollectionInfo:
        if not model and dim:  # a vector-only collection
            config = CollectionConfig(name, dim, metric=metric, index=index or "flat")
            return await self.run_blocking(self.store.create_collection, config)
        model = model or self.config.default_model
        get_model_spec(model)  # NOT_FOUND before anything is loaded
        bound = bind_pooling(pooling or PoolingSpec("cls"))
        runtime = await self.runtime_async(model)
        runtime.encoder.check_token_modes((bound.token_mode,))
        config = CollectionConfig(
            name,
            bound.output_dim(runtime.encoder.loaded.embed_dim),
            model=model,
            pooling=bound.name,
            pooling_params=params_to_strings(bound.params),
            metric=metric,
            index=index or "flat",
            weights=runtime.encoder.loaded.weights_sha256,
        )
        return await self.run_blocking(self.store.create_collection, config)

    async def collection_pooling(self, info: CollectionInfo) -> BoundPooling:
        """The collection's bound pooling, cached by the collection's identity (uid) and pooling version:
        a re-created name or a re-fitted codebook never reuses a stale entry."""
        cached = self._poolings.get(info.uid)
        if cached is None or cached[0] != info.pooling_version:
            spec = PoolingSpec(info.config.pooling, info.config.pooling_params)
            state = None
            if info.pooling_version:
                blob = await self.run_blocking(self.store.pooling_state, info.config.name)
                state = NetVLADState.from_bytes(blob)
            cached = self._poolings[info.uid] = (
                info.pooling_version,
                bind_pooling(spec, state, text_final_tokens=True),
            )
        return cached[1]

    async def _embed_for(
        self, info: CollectionInfo, contents: Sequence[Content], where: str
    ) -> tuple[np.ndarray, list[bool]]:
        info.check_usable()  # an unavailable collection's config may be a stand-in (its catalogue row unreadable)
        if not info.config.model:
            raise FailedPrecondition(
                f"collection {quoted(info.config.name)} holds raw vectors and has no model: "
                f"send vectors, not texts or images"
            )
        pooling = await self.collection_pooling(info)
        pooling.check_ready()
        for modality in {TEXT if isinstance(c, Text) else IMAGE for c in contents}:
            try:
                pooling.check_modality(modality)
            except FailedPrecondition as exc:
                raise type(exc)(f"collection {quoted(info.config.name)} ({pooling.name}): {exc}") from None
        runtime = await self.collection_runtime(info)
        batch = await self.pooled(runtime, contents, [pooling], where)
        return batch.vectors[0], batch.truncated

    async def upsert(self, name: str, items: Sequence[UpsertRequestItem], thumbnails: bool | None = None) -> Any:
        """Embeds and stores items; with thumbnails (default: config.store_thumbnails) image items keep a small
        JPEG for display, written in the same transaction."""
        self._check_count(len(items), "items")
        for item in items:
            if item.content is None and item.vector is None:
                raise InvalidInput(f"item {quoted(item.id)} has neither content nor vector")
        to_embed = [i for i, item in enumerate(items) if item.content is not None]
        keep = self.config.store_thumbnails if thumbnails is None else thumbnails
        media = await self._thumbnails(items) if keep else None

        async def attempt():
            if not to_embed:  # vectors as given: one hop to the store, no collection info needed first
                store_items = [
                    Item(item.id, vector, item.metadata) for item in items if (vector := item.vector) is not None
                ]  # all: an item without content has one
                return await self.run_blocking(lambda: self.store.upsert(name, store_items, thumbnails=media))
            info = await self.run_blocking(self.store.get_collection, name)
            vectors: list[np.ndarray | None] = [item.vector for item in items]
            if to_embed:
                contents = [item.content for item in items if item.content is not None]  # those at to_embed
                embedded, _ = await self._embed_for(info, contents, "item")
                for row, i in enumerate(to_embed):
                    vectors[i] = embedded[row]  # a row view: the store stacks them once
            filled = cast(list[np.ndarray], vectors)  # given, or embedded above
            store_items = [Item(item.id, filled[i], item.metadata) for i, item in enumerate(items)]
            return await self._commit(info, store_items, bool(to_embed), media)

        result = await self._retry_aborted(attempt)
        self._track_count(name, result.count)
        return result

    async def _commit(self, info: CollectionInfo, items: list[Item], embedded: bool, thumbnails=None):
        """Stores items; vectors embedded here are committed only if the collection is still the one
        (uid) and the pooling state (version) they were computed with."""
        check: dict[str, Any] = {"uid": info.uid, "pooling_version": info.pooling_version} if embedded else {}
        return await self.run_blocking(
            lambda: self.store.upsert(info.config.name, items, thumbnails=thumbnails, **check)
        )

    @staticmethod
    async def _retry_aborted(attempt: Callable, attempts: int = 3):
        """Re-embeds and retries when a concurrent re-fit or re-creation invalidated the vectors."""
        for number in range(attempts):
            try:
                return await attempt()
            except Aborted:
                if number == attempts - 1:
                    raise
                log.info("upsert raced a pooling re-fit or a re-creation of its collection; re-embedding")

    async def _thumbnails(self, items: Sequence[UpsertRequestItem]) -> dict[str, tuple[str, bytes]]:
        """{id: ("image/jpeg", bytes)} for the image items (the last of a repeated id decides)."""

        def make(content: ImageBytes | DecodedImage) -> bytes:
            if isinstance(content, DecodedImage):
                return thumbnail_jpeg(content.image)
            return thumbnail_jpeg(
                decode_image(
                    content.data,
                    self.config.max_image_pixels,
                    THUMBNAIL_SIDE,
                    self.config.max_image_header_pixels,
                    for_model=False,
                )
            )

        latest = {item.id: item.content for item in items}
        images = {i: c for i, c in latest.items() if isinstance(c, (ImageBytes, DecodedImage))}
        loop = asyncio.get_running_loop()
        made = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, make, c) for c in images.values()))
        return {i: ("image/jpeg", data) for i, data in zip(images, made)}

    async def delete(self, name: str, ids: list[str]):
        self._check_count(len(ids), "ids")
        result = await self.run_blocking(self.store.delete, name, ids)
        self._track_count(name, (await self.run_blocking(self.store.get_collection, name)).count)
        return result

    async def drop_collection(self, name: str) -> int:
        info = await self.run_blocking(self.store.get_collection, name)
        removed = await self.run_blocking(self.store.drop_collection, name)
        self._poolings.pop(info.uid, None)
        if self.metrics and name in self._tracked:
            self.metrics.collection_items.remove(name)
        self._tracked.discard(name)
        return removed

    def _track_count(self, name: str, count: int) -> None:
        if self.metrics:
            self.metrics.collection_items.labels(name).set(count)
            self._tracked.add(name)

    async def upsert_multi(self, names: Sequence[str], items: Sequence[UpsertRequestItem]) -> list[Any]:
        """Upserts the same content items into several collections, with one forward pass per model:
        the token features are computed once and each collection applies its own pooling."""
        self._check_count(len(items), "items")
        infos = [await self.run_blocking(self.store.get_collection, name) for name in names]
        contents = [item.content for item in items if item.content is not None]
        if len(contents) < len(items):
            raise InvalidInput("upsert_multi takes content items (texts or images), not vectors")
        by_model: dict[str, list] = {}
        for info in infos:
            info.check_usable()
            if not info.config.model:
                raise FailedPrecondition(f"collection {quoted(info.config.name)} has no model to embed content with")
            by_model.setdefault(info.config.model, []).append(info)
        results = {}
        media = await self._thumbnails(items) if self.config.store_thumbnails else None
        for model, group in by_model.items():
            poolings = [await self.collection_pooling(info) for info in group]
            for pooling in poolings:
                pooling.check_ready()
            runtime = await self.runtime_async(model)
            for info in group:
                info.config.check_weights(runtime.encoder.loaded.weights_sha256)
            batch = await self.pooled(runtime, contents, poolings, "item")
            for info, vectors in zip(group, batch.vectors):  # a matrix per collection's pooling
                store_items = [Item(item.id, vector, item.metadata) for item, vector in zip(items, vectors)]
                try:
                    result = await self._commit(info, store_items, True, media)
                except Aborted:  # re-fitted or re-created meanwhile: embed again for this one collection
                    result = await self.upsert(
                        info.config.name,
                        [UpsertRequestItem(item.id, item.content, None, item.metadata) for item in items],
                        thumbnails=media is not None,
                    )
                self._track_count(info.config.name, result.count)
                results[info.config.name] = result
        return [results[name] for name in names]

    async def search(self, name: str, queries: Sequence[Query], options: SearchOptions) -> list[SearchOutcome]:
        if not queries:
            raise InvalidInput("no queries: send at least one")
        self._check_count(len(queries), "queries")
        vectors: list[np.ndarray | None] = [None] * len(queries)
        truncated = [False] * len(queries)
        content_rows = [i for i, q in enumerate(queries) if q.content is not None]
        info = None
        if content_rows:
            info = await self.run_blocking(self.store.get_collection, name)
            contents = [q.content for q in queries if q.content is not None]  # those at content_rows
            embedded, flags = await self._embed_for(info, contents, "query")
            for row, i in enumerate(content_rows):
                vectors[i], truncated[i] = embedded[row], flags[row]

        def lookup_and_search():  # one hop off the event loop for the collection, stored ids and the search
            found = info or self.store.get_collection(name)
            found.check_usable()  # before its dimension is checked: a stand-in's where its row is unreadable
            config = found.config
            exclude: list[str | None] = [None] * len(queries)
            for i, q in enumerate(queries):
                if q.item_id is not None:
                    vectors[i] = self.store.vector_of(name, q.item_id)
                    exclude[i] = q.item_id
                elif q.vector is not None:
                    vectors[i] = np.asarray(q.vector, dtype=np.float32)
                elif q.content is None:
                    raise InvalidInput(f"query {i} is empty: set text, image, vector or id")
            bad = next((i for i, v in enumerate(vectors) if np.asarray(v).size != config.dim), None)
            if bad is not None:
                raise InvalidInput(
                    f"query {bad} has dimension {np.asarray(vectors[bad]).size}; collection {quoted(name)} "
                    f"holds vectors of dimension {config.dim}"
                )
            filled = cast(list[np.ndarray], vectors)  # each query's, or refused above
            return self.store.search(name, np.stack(filled), options, exclude if any(exclude) else None)

        hits = await self.run_blocking(lookup_and_search)
        return [SearchOutcome(h, t) for h, t in zip(hits, truncated)]

    async def missing_filter_keys(self, name: str, flt: Filter) -> list[str]:
        """The filter's keys that no item of the collection holds (a filter on them matches nothing)."""
        keys = list(dict.fromkeys(condition.key for condition in flt.must))
        return await self.run_blocking(self.store.missing_keys, name, keys)

    async def fit_pooling(self, name: str, samples: Sequence[Content], params: dict[str, str]) -> FitOutcome:
        started = time.perf_counter()
        seed, max_descriptors = _fit_params(params)
        info = await self.run_blocking(self.store.get_collection, name)
        info.check_usable()
        if not info.config.model:
            raise FailedPrecondition(f"collection {quoted(name)} has no model and nothing to fit")
        bound = bind_pooling(PoolingSpec(info.config.pooling, info.config.pooling_params))
        if not bound.definition.requires_fit:
            raise FailedPrecondition(
                f"collection {quoted(name)} uses pooling {quoted(bound.name)}, which learns nothing"
            )
        if info.count:
            raise FailedPrecondition(
                f"collection {quoted(name)} holds {info.count} items embedded with the current "
                f"pooling state; fit a new (empty) collection"
            )
        if not samples:
            raise InvalidInput("FitPooling needs sample texts or images")
        runtime = await self.collection_runtime(info)
        features = []
        for start in range(0, len(samples), self.config.max_batch_size * 4):
            groups = await self.features(
                runtime, samples[start : start + self.config.max_batch_size * 4], "sample", poolings=[bound]
            )
            features += [group.result for group in groups]
        p = bound.params
        token_sets = [(f.in_mode(bound.mode_for(f.modality)).tokens, f.mask) for f in features]
        state = await asyncio.get_running_loop().run_in_executor(
            self.io_pool, lambda: fit_netvlad(token_sets, p.clusters, p.alpha, p.pca_dim, seed, max_descriptors)
        )
        if state.output_dim != info.config.dim:
            raise FailedPrecondition(f"fitted state has dimension {state.output_dim}, collection {info.config.dim}")
        await self.run_blocking(self.store.set_pooling_state, name, state.to_bytes(), True, info.uid)
        descriptors = int(sum(int(f.mask.sum()) for f in features))
        return FitOutcome(
            await self.run_blocking(self.store.get_collection, name), descriptors, time.perf_counter() - started
        )

    async def close(self) -> None:
        for runtime in self._models.values():
            await runtime.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.io_pool.shutdown(wait=True)
