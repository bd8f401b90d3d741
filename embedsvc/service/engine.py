"""The service core without gRPC: models, batchers, poolings per collection, and the store, wired.

Servicers convert protobuf to the plain types here and back; everything that decides lives here.
Blocking work (decoding, model forward, SQLite commits, FAISS searches) runs off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from embedsvc.encoder import ClipEncoder
from embedsvc.encoder.images import decode_image
from embedsvc.errors import EmptyText, FailedPrecondition, InvalidInput, ResourceExhausted
from embedsvc.models import ModelSpec, get_model_spec, load_model, register_model
from embedsvc.pooling import (BoundPooling, NetVLADState, PoolingSpec, bind_pooling, fit_netvlad, image_token_modes,
                              params_to_strings)
from embedsvc.pooling.features import IMAGE, TEXT, TokenFeatures
from embedsvc.service.batching import DynamicBatcher
from embedsvc.service.config import ServerConfig
from embedsvc.store import CollectionConfig, CollectionInfo, Filter, Hit, Item, Store

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


Content = Union[Text, ImageBytes, DecodedImage]


@dataclass
class Embedding:
    modality: str
    vectors: list[np.ndarray]  # one per pooling
    truncated: bool
    tokens: Optional[TokenFeatures] = None


@dataclass
class UpsertRequestItem:
    id: str
    content: Optional[Content]
    vector: Optional[np.ndarray]
    metadata: dict


@dataclass
class Query:
    content: Optional[Content] = None
    vector: Optional[np.ndarray] = None
    item_id: Optional[str] = None


@dataclass
class SearchOutcome:
    hits: list[Hit]
    truncated: bool


def _image_payload(content: Content) -> Any:
    return content.image if isinstance(content, DecodedImage) else content.data


class ModelRuntime:
    """One loaded model with its two batchers (text, image) and its forward thread."""

    def __init__(self, encoder: ClipEncoder, config: ServerConfig, on_batch):
        self.encoder = encoder
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{encoder.loaded.spec.name}")
        name = encoder.loaded.spec.name
        delay = config.max_batch_delay_ms / 1000
        self.text = DynamicBatcher(f"{name}/text", lambda xs, modes: encoder.encode_texts(xs), self.executor,
                                   config.max_batch_size, delay, config.max_queue, on_batch)
        self.image = DynamicBatcher(f"{name}/image", lambda xs, modes: encoder.encode_images(torch.stack(xs), modes),
                                    self.executor, config.max_batch_size, delay, config.max_queue, on_batch)

    async def close(self) -> None:
        await self.text.close()
        await self.image.close()
        self.executor.shutdown(wait=True)


class Engine:
    def __init__(self, config: ServerConfig, store: Store, metrics=None):
        self.config = config
        self.store = store
        self.metrics = metrics
        self.decode_pool = ThreadPoolExecutor(max_workers=config.decode_workers, thread_name_prefix="decode")
        self.io_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="store")
        self._models: dict[str, ModelRuntime] = {}
        self._model_lock = threading.Lock()
        self._poolings: dict[tuple[str, int], BoundPooling] = {}
        self._tracked: set[str] = set()  # collections with an items gauge
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        if config.models_file:
            self._register_models_file(Path(config.models_file))

    # -- models -------------------------------------------------------------------------------

    def _register_models_file(self, path: Path) -> None:
        if not path.is_file():
            raise InvalidInput(f"models file {path} does not exist")
        for entry in json.loads(path.read_text()):
            for key in ("checkpoint", "config_file"):
                if entry.get(key) and not Path(entry[key]).is_absolute():
                    entry[key] = str(path.parent / entry[key])
            register_model(ModelSpec(**entry), replace=True)

    def runtime(self, name: str) -> ModelRuntime:
        """The model's runtime, loading it on first use (loading blocks: call from a worker thread)."""
        name = name or self.config.default_model
        with self._model_lock:
            if name not in self._models:
                spec = get_model_spec(name)
                loaded = load_model(spec, device=self.config.device, precision=self.config.precision)
                if self.metrics:
                    self.metrics.model_load_seconds.labels(name).set(loaded.load_seconds)
                self._models[name] = ModelRuntime(ClipEncoder(loaded, max_batch=self.config.max_batch_size),
                                                  self.config, self.metrics.observe_batch if self.metrics else None)
            return self._models[name]

    async def runtime_async(self, name: str) -> ModelRuntime:
        name = name or self.config.default_model
        if name in self._models:
            return self._models[name]
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, self.runtime, name)

    def loaded_models(self) -> dict[str, ModelRuntime]:
        return dict(self._models)

    # -- embedding ----------------------------------------------------------------------------

    def _check_content(self, content: Content, where: str) -> None:
        if isinstance(content, Text):
            if not content.text.strip():
                raise EmptyText(f"{where}: text is empty; send at least one non-blank character")
            if len(content.text) > self.config.max_text_chars:
                raise InvalidInput(f"{where}: text has {len(content.text)} characters, over the limit of "
                                   f"{self.config.max_text_chars}")
        elif isinstance(content, DecodedImage):
            pass
        elif isinstance(content, ImageBytes):
            if len(content.data) > self.config.max_image_bytes:
                raise InvalidInput(f"{where}: image is {len(content.data):,} bytes, over the limit of "
                                   f"{self.config.max_image_bytes:,}")
        else:
            raise InvalidInput(f"{where}: no content (set text or image)")

    def _decode(self, runtime: ModelRuntime, data: Any, where: str) -> torch.Tensor:
        if not isinstance(data, (bytes, bytearray)):  # already decoded
            return runtime.encoder.loaded.preprocess(data)
        try:
            image = decode_image(data, self.config.max_image_pixels)
        except InvalidInput as exc:
            raise type(exc)(f"{where}: {exc}") from None
        return runtime.encoder.loaded.preprocess(image)

    async def features(self, runtime: ModelRuntime, contents: Sequence[Content], where: str = "input",
                       poolings: Sequence[BoundPooling] = ()) -> list[TokenFeatures]:
        """Token features per content, via the batchers, with the image token modes `poolings` read;
        images decoded in the worker pool."""
        modes = image_token_modes(list(poolings))
        runtime.encoder.check_token_modes(modes)
        for i, content in enumerate(contents):
            self._check_content(content, f"{where} {i}")
        loop = asyncio.get_running_loop()
        texts = [i for i, c in enumerate(contents) if isinstance(c, Text)]
        images = [i for i, c in enumerate(contents) if not isinstance(c, Text)]
        jobs = []
        if images:  # decode first: a bad image fails the request before any forward pass is queued
            pixels = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, self._decode, runtime,
                                                                 _image_payload(contents[i]), f"{where} {i}")
                                                   for i in images))
        if texts:
            jobs.append(runtime.text.submit([contents[i].text for i in texts]))
        if images:
            jobs.append(runtime.image.submit(list(pixels), modes))
        results = await asyncio.gather(*jobs)
        out: list[Optional[TokenFeatures]] = [None] * len(contents)
        for index, features in zip([x for x in (texts, images) if x], results):
            for row, i in enumerate(index):
                out[i] = features.select([row])
        return out

    async def embed(self, model: str, poolings: Sequence[PoolingSpec], contents: Sequence[Content],
                    include_tokens: bool = False) -> tuple[str, list[Embedding]]:
        if not contents:
            raise InvalidInput("no inputs: send at least one text or image")
        self._check_count(len(contents), "inputs")
        bound = [bind_pooling(spec) for spec in (poolings or [PoolingSpec("cls")])]
        for pooling in bound:
            pooling.check_ready()
            for modality in {TEXT if isinstance(c, Text) else IMAGE for c in contents}:
                pooling.check_modality(modality)
        runtime = await self.runtime_async(model)
        features = await self.features(runtime, contents, poolings=bound)
        out = []
        for f in features:
            vectors = [pooling(f)[0].cpu().numpy() for pooling in bound]
            out.append(Embedding(f.modality, vectors, f.truncated[0], f if include_tokens else None))
        return runtime.encoder.loaded.spec.name, out

    def _check_count(self, n: int, what: str) -> None:
        if n > self.config.max_items_per_request:
            raise ResourceExhausted(f"{n} {what} in one request, over the limit of {self.config.max_items_per_request}; "
                                    f"split it")

    # -- collections --------------------------------------------------------------------------

    async def run_blocking(self, fn: Callable, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, lambda: fn(*args, **kwargs))

    async def create_collection(self, name: str, model: str, pooling: Optional[PoolingSpec], metric: str,
                                index: str, dim: int = 0) -> CollectionInfo:
        if not model and dim:  # a vector-only collection
            config = CollectionConfig(name, dim, metric=metric, index=index or "flat")
            return await self.run_blocking(self.store.create_collection, config)
        model = model or self.config.default_model
        get_model_spec(model)  # NOT_FOUND before anything is loaded
        bound = bind_pooling(pooling or PoolingSpec("cls"))
        runtime = await self.runtime_async(model)
        runtime.encoder.check_token_modes((bound.token_mode,))
        config = CollectionConfig(name, bound.output_dim(runtime.encoder.loaded.embed_dim), model=model,
                                  pooling=bound.name, pooling_params=params_to_strings(bound.params),
                                  metric=metric, index=index or "flat")
        return await self.run_blocking(self.store.create_collection, config)

    async def collection_pooling(self, info: CollectionInfo) -> BoundPooling:
        key = (info.config.name, info.pooling_version)
        if key not in self._poolings:
            spec = PoolingSpec(info.config.pooling, info.config.pooling_params)
            state = None
            if info.pooling_version:
                blob = await self.run_blocking(self.store.pooling_state, info.config.name)
                state = NetVLADState.from_bytes(blob)
            self._poolings = {k: v for k, v in self._poolings.items() if k[0] != info.config.name}
            self._poolings[key] = bind_pooling(spec, state, text_final_tokens=True)
        return self._poolings[key]

    async def _embed_for(self, info: CollectionInfo, contents: Sequence[Content], where: str
                         ) -> tuple[np.ndarray, list[bool]]:
        if not info.config.model:
            raise FailedPrecondition(f"collection {info.config.name!r} holds raw vectors and has no model: "
                                     f"send vectors, not texts or images")
        pooling = await self.collection_pooling(info)
        pooling.check_ready()
        for modality in {TEXT if isinstance(c, Text) else IMAGE for c in contents}:
            try:
                pooling.check_modality(modality)
            except FailedPrecondition as exc:
                raise type(exc)(f"collection {info.config.name!r} ({pooling.name}): {exc}") from None
        runtime = await self.runtime_async(info.config.model)
        features = await self.features(runtime, contents, where, [pooling])
        vectors = np.stack([pooling(f)[0].cpu().numpy() for f in features])
        return vectors, [f.truncated[0] for f in features]

    async def upsert(self, name: str, items: Sequence[UpsertRequestItem]) -> Any:
        self._check_count(len(items), "items")
        info = await self.run_blocking(self.store.get_collection, name)
        to_embed = [i for i, item in enumerate(items) if item.content is not None]
        vectors: list[Optional[np.ndarray]] = [item.vector for item in items]
        for i, item in enumerate(items):
            if item.content is None and item.vector is None:
                raise InvalidInput(f"item {item.id!r} has neither content nor vector")
        if to_embed:
            embedded, _ = await self._embed_for(info, [items[i].content for i in to_embed], "item")
            for row, i in enumerate(to_embed):
                vectors[i] = embedded[row]
        store_items = [Item(item.id, vectors[i], item.metadata) for i, item in enumerate(items)]
        result = await self.run_blocking(self.store.upsert, name, store_items)
        self._track_count(name, result.count)
        return result

    async def delete(self, name: str, ids: list[str]):
        self._check_count(len(ids), "ids")
        result = await self.run_blocking(self.store.delete, name, ids)
        self._track_count(name, (await self.run_blocking(self.store.get_collection, name)).count)
        return result

    async def drop_collection(self, name: str) -> int:
        removed = await self.run_blocking(self.store.drop_collection, name)
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
        contents = [item.content for item in items]
        if any(c is None for c in contents):
            raise InvalidInput("upsert_multi takes content items (texts or images), not vectors")
        by_model: dict[str, list] = {}
        for info in infos:
            if not info.config.model:
                raise FailedPrecondition(f"collection {info.config.name!r} has no model to embed content with")
            by_model.setdefault(info.config.model, []).append(info)
        results = {}
        for model, group in by_model.items():
            poolings = [await self.collection_pooling(info) for info in group]
            for pooling in poolings:
                pooling.check_ready()
            features = await self.features(await self.runtime_async(model), contents, "item", poolings)
            for info, pooling in zip(group, poolings):
                vectors = [pooling(f)[0].cpu().numpy() for f in features]
                store_items = [Item(item.id, vector, item.metadata) for item, vector in zip(items, vectors)]
                result = await self.run_blocking(self.store.upsert, info.config.name, store_items)
                self._track_count(info.config.name, result.count)
                results[info.config.name] = result
        return [results[name] for name in names]

    async def search(self, name: str, queries: Sequence[Query], top_k: int, flt: Optional[Filter], nprobe: int,
                     ef_search: int, include_metadata: bool, include_vectors: bool) -> list[SearchOutcome]:
        if not queries:
            raise InvalidInput("no queries: send at least one")
        self._check_count(len(queries), "queries")
        info = await self.run_blocking(self.store.get_collection, name)
        vectors: list[Optional[np.ndarray]] = [None] * len(queries)
        truncated = [False] * len(queries)
        exclude: list[Optional[str]] = [None] * len(queries)
        content_rows = [i for i, q in enumerate(queries) if q.content is not None]
        if content_rows:
            embedded, flags = await self._embed_for(info, [queries[i].content for i in content_rows], "query")
            for row, i in enumerate(content_rows):
                vectors[i], truncated[i] = embedded[row], flags[row]
        for i, q in enumerate(queries):
            if q.item_id is not None:
                vectors[i] = await self.run_blocking(self.store.vector_of, name, q.item_id)
                exclude[i] = q.item_id
            elif q.vector is not None:
                vectors[i] = np.asarray(q.vector, dtype=np.float32)
            elif q.content is None:
                raise InvalidInput(f"query {i} is empty: set text, image, vector or id")
        sizes = {np.asarray(v).size for v in vectors}
        if len(sizes) != 1 or info.config.dim not in sizes:
            bad = next(i for i, v in enumerate(vectors) if np.asarray(v).size != info.config.dim)
            raise InvalidInput(f"query {bad} has dimension {np.asarray(vectors[bad]).size}; collection {name!r} holds "
                               f"vectors of dimension {info.config.dim}")
        hits = await self.run_blocking(self.store.search, name, np.stack(vectors), top_k, flt, nprobe, ef_search,
                              include_metadata, include_vectors, exclude if any(exclude) else None)
        return [SearchOutcome(h, t) for h, t in zip(hits, truncated)]

    async def fit_pooling(self, name: str, samples: Sequence[Content], params: dict[str, str]) -> tuple[CollectionInfo, int, float]:
        started = time.perf_counter()
        info = await self.run_blocking(self.store.get_collection, name)
        if not info.config.model:
            raise FailedPrecondition(f"collection {name!r} has no model and nothing to fit")
        bound = bind_pooling(PoolingSpec(info.config.pooling, info.config.pooling_params))
        if not bound.definition.requires_fit:
            raise FailedPrecondition(f"collection {name!r} uses pooling {bound.name!r}, which learns nothing")
        if info.count:
            raise FailedPrecondition(f"collection {name!r} holds {info.count} items embedded with the current "
                                     f"pooling state; fit a new (empty) collection")
        if not samples:
            raise InvalidInput("FitPooling needs sample texts or images")
        unknown = set(params) - {"seed", "max_descriptors"}
        if unknown:
            raise InvalidInput(f"unknown fit parameter(s) {', '.join(sorted(unknown))}; allowed: seed, max_descriptors")
        runtime = await self.runtime_async(info.config.model)
        features = []
        for start in range(0, len(samples), self.config.max_batch_size * 4):
            features += await self.features(runtime, samples[start:start + self.config.max_batch_size * 4], "sample",
                                            [bound])
        p = bound.params
        token_sets = [(f.in_mode(bound.mode_for(f.modality)).tokens, f.mask) for f in features]
        try:
            seed = int(params.get("seed", 0))
            max_descriptors = int(params.get("max_descriptors", 200_000))
        except ValueError as exc:
            raise InvalidInput(f"fit parameters: {exc}") from None
        state = await asyncio.get_running_loop().run_in_executor(
            self.io_pool, lambda: fit_netvlad(token_sets, p.clusters, p.alpha, p.pca_dim, seed, max_descriptors))
        if state.output_dim != info.config.dim:
            raise FailedPrecondition(f"fitted state has dimension {state.output_dim}, collection {info.config.dim}")
        await self.run_blocking(self.store.set_pooling_state, name, state.to_bytes())
        descriptors = int(sum(int(f.mask.sum()) for f in features))
        return await self.run_blocking(self.store.get_collection, name), descriptors, time.perf_counter() - started

    async def close(self) -> None:
        for runtime in self._models.values():
            await runtime.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.io_pool.shutdown(wait=True)

