"""The API's operations, protobuf request -> engine -> protobuf response, shared by both transports.

The gRPC servicers and the HTTP handlers are thin wrappers over these functions, so the two can only
differ in framing (and tests/test_http_congruence.py checks they do not differ in results). Streaming
RPCs take an async iterable of request messages: a gRPC stream, or the batches of an HTTP body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Callable, Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from embedsvc.engine.engine import Content, EmbeddedBatch, Engine, ImageBytes, Query, Text, UpsertRequestItem
from embedsvc.errors import EmbedsvcError, InvalidInput, ResourceExhausted, quoted
from embedsvc.models import MODEL_REGISTRY
from embedsvc.pooling import POOLINGS, PoolingSpec, params_to_strings
from embedsvc.pooling.features import IMAGE, TEXT
from embedsvc.service import json_body
from embedsvc.service.wire import embed_response, vector_rows, vector_values
from embedsvc.store import CollectionInfo, Condition, Filter, SearchOptions
from embedsvc.store.filter_text import parse_filter_text
from embedsvc.v1 import embedsvc_pb2 as pb

METRICS = {pb.METRIC_UNSPECIFIED: "cosine", pb.METRIC_COSINE: "cosine", pb.METRIC_INNER_PRODUCT: "inner_product"}
METRIC_ENUM = {"cosine": pb.METRIC_COSINE, "inner_product": pb.METRIC_INNER_PRODUCT}
MODALITY = {TEXT: pb.MODALITY_TEXT, IMAGE: pb.MODALITY_IMAGE}

log = logging.getLogger("embedsvc.rpc")


def record(engine: Engine, method: str, code: str, seconds: float, peer: str, transport: str) -> None:
    """Counts, times and logs one request, whichever transport carried it (metrics keep their labels)."""
    if engine.metrics:
        engine.metrics.record_call(method, code, seconds)
    if log.isEnabledFor(logging.INFO):  # the record's fields are not made for a level that drops them
        log.info(
            "rpc",
            extra={"rpc": method, "code": code, "ms": round(seconds * 1000, 2), "peer": peer, "transport": transport},
        )


# -- conversions ------------------------------------------------------------------------------


def pooling_from_pb(spec: pb.PoolingSpec) -> PoolingSpec | None:
    return PoolingSpec(spec.name, dict(spec.params)) if spec.name else None


def content_from_pb(content: pb.Content, where: str):
    kind = content.WhichOneof("kind")
    if kind == "text":
        return Text(content.text)
    if kind == "image":
        return ImageBytes(content.image)
    raise InvalidInput(f"{where}: set text or image")


def value_from_pb(value: pb.MetadataValue, where: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidInput(f"{where}: metadata value has no string, number or bool set")
    return getattr(value, kind)


def value_to_pb(value: Any) -> pb.MetadataValue:
    if isinstance(value, bool):
        return pb.MetadataValue(bool_value=value)
    if isinstance(value, (int, float)):
        return pb.MetadataValue(number_value=float(value))
    return pb.MetadataValue(string_value=str(value))


def filter_from_pb(flt: pb.Filter) -> Filter | None:
    conditions = []
    for c in flt.must:
        test = c.WhichOneof("test")
        if test == "equals":
            conditions.append(Condition(c.key, equals=value_from_pb(c.equals, f"filter on {quoted(c.key)}")))
        elif test == "in":
            values = tuple(value_from_pb(v, f"filter on {quoted(c.key)}") for v in getattr(c, "in").values)
            conditions.append(Condition(c.key, any_of=values))
        elif test == "range":
            bounds = {b: getattr(c.range, b) for b in ("gte", "gt", "lte", "lt") if c.range.HasField(b)}
            if not bounds:
                raise InvalidInput(f"filter on {quoted(c.key)}: a range needs a bound (gte, gt, lte or lt)")
            conditions.append(Condition(c.key, **bounds))
        else:
            raise InvalidInput(f"filter on {quoted(c.key)}: set equals, in or range")
    return Filter(tuple(conditions)) if conditions else None


def vector_from_pb(vector: pb.Vector) -> np.ndarray:
    return vector_values(vector)


STEP_VALUES = 65536  # vector values converted between two turns of the event loop (about 1 ms of copying)


async def converted(elements: Iterable, convert: Callable[[Any, int], Any], vector: Callable[[Any], pb.Vector]) -> list:
    """[convert(element, i) ...], giving the event loop a turn after every STEP_VALUES values of the elements'
    vectors: 1,024 vectors of 3,600 values, converted in one go, held it 60 ms (more on a busy machine)."""
    out, values = [], 0
    for i, element in enumerate(elements):
        out.append(convert(element, i))
        values += len(vector(element).values)
        if values >= STEP_VALUES:
            values = 0
            await asyncio.sleep(0)
    return out


def info_to_pb(info: CollectionInfo) -> pb.CollectionInfo:
    c = info.config
    definition = POOLINGS.get(c.pooling)
    if definition is None or not definition.requires_fit:
        state = pb.POOLING_STATE_NOT_REQUIRED
    else:
        state = pb.POOLING_STATE_FITTED if info.pooling_version else pb.POOLING_STATE_NEEDS_FIT
    config = pb.CollectionConfig(
        name=c.name,
        model=c.model,
        metric=METRIC_ENUM[c.metric],
        index=c.index,
        dim=c.dim,
        pooling=pb.PoolingSpec(name=c.pooling, params=c.pooling_params),
    )
    return pb.CollectionInfo(
        config=config,
        dim=c.dim,
        count=info.count,
        pooling_state=state,
        pooling_version=info.pooling_version,
        created_unix_ms=info.created_ms,
        index_trained=info.index_trained,
    )


def tokens_to_pb(features) -> pb.TokenFeatures:
    mask = features.mask[0]
    tokens = features.tokens[0][mask].cpu().numpy().astype("<f4")
    grid = features.grid or (0, 0)
    return pb.TokenFeatures(
        num_tokens=tokens.shape[0], dim=tokens.shape[1], data=tokens.tobytes(), grid_height=grid[0], grid_width=grid[1]
    )


# -- operations, one per RPC ------------------------------------------------------------------


class Embedder(Protocol):
    """What Embed needs of an engine: the Engine, or a front-end process's FrontEngine (service.frontends)."""

    async def embed_batch(
        self, model: str, poolings: Sequence[PoolingSpec], contents: Sequence[Content], include_tokens: bool = False
    ) -> tuple[str, EmbeddedBatch]: ...


async def embed_rows(engine: Embedder, request: pb.EmbedRequest) -> tuple[str, list[str], EmbeddedBatch]:
    """Embed's work: (the model's name, the pooling names, the matrices), before any framing. The gRPC and HTTP
    Embed pack them into an EmbedResponse; OpenAI's /v1/embeddings writes them in its own shape."""
    poolings = [PoolingSpec(p.name, dict(p.params)) for p in request.poolings]
    contents = [content_from_pb(c, f"input {i}") for i, c in enumerate(request.inputs)]
    model, batch = await engine.embed_batch(request.model, poolings, contents, request.include_tokens)
    return model, [p.name for p in poolings] or ["cls"], batch


async def embed(engine: Embedder, request: pb.EmbedRequest) -> pb.EmbedResponse:
    model, names, batch = await embed_rows(engine, request)
    tokens = [tokens_to_pb(t).SerializeToString() for t in batch.tokens] if batch.tokens else None
    return embed_response(model, [MODALITY[m] for m in batch.modalities], batch.truncated, names, batch.vectors, tokens)


async def embed_json(engine: Embedder, request: pb.EmbedRequest) -> dict:
    """Embed's response as the HTTP API writes it (protobuf's JSON mapping), from the matrices straight to the
    JSON document: no EmbedResponse in between (tests/test_json_body.py checks the two agree)."""
    model, names, batch = await embed_rows(engine, request)
    tokens = [tokens_to_pb(t) for t in batch.tokens] if batch.tokens else None
    return json_body.embed_document(
        model, [MODALITY[m] for m in batch.modalities], batch.truncated, names, batch.vectors, tokens
    )


async def list_models(engine: Engine, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
    loaded = engine.loaded_models()
    out = pb.ListModelsResponse(default_model=engine.config.default_model)
    for name, spec in sorted(MODEL_REGISTRY.items()):
        info = out.models.add(name=name, architecture=spec.architecture, weights=spec.weights, loaded=name in loaded)
        if name in loaded:
            m = loaded[name].encoder.loaded
            info.embed_dim, info.image_size, info.context_length = m.embed_dim, m.image_size, m.context_length
            info.vision_tower, info.device = m.vision_tower, str(m.device)
            info.dtype = str(m.dtype).replace("torch.", "")
    for name, definition in POOLINGS.items():
        out.poolings.add(
            name=name,
            description=definition.description,
            modalities=[MODALITY[m] for m in definition.modalities],
            defaults=params_to_strings(definition.params_cls()),
            requires_fit=definition.requires_fit,
        )
    return out


async def create_collection(engine: Engine, request: pb.CreateCollectionRequest) -> pb.CollectionInfo:
    c = request.config
    info = await engine.create_collection(
        c.name, c.model, pooling_from_pb(c.pooling), METRICS.get(c.metric, "cosine"), c.index, c.dim
    )
    return info_to_pb(info)


async def get_collection(engine: Engine, request: pb.GetCollectionRequest) -> pb.CollectionInfo:
    return info_to_pb(await engine.run_blocking(engine.store.get_collection, request.name))


async def list_collections(engine: Engine, request: pb.ListCollectionsRequest) -> pb.ListCollectionsResponse:
    infos = await engine.run_blocking(engine.store.list_collections)
    return pb.ListCollectionsResponse(collections=[info_to_pb(i) for i in infos])


async def drop_collection(engine: Engine, request: pb.DropCollectionRequest) -> pb.DropCollectionResponse:
    return pb.DropCollectionResponse(items_removed=await engine.drop_collection(request.name))


def upsert_items(message: pb.UpsertRequest) -> list[UpsertRequestItem]:
    """The message's items; error messages are made only for a bad item (formatting one for every item and
    key cost more than reading the vectors)."""
    payloads = [item.WhichOneof("payload") for item in message.items]
    vectors = iter(vector_rows([item.vector for item, p in zip(message.items, payloads) if p == "vector"]))
    items = []
    for item, payload in zip(message.items, payloads):
        metadata = {}
        for key, value in item.metadata.items():
            kind = value.WhichOneof("kind")
            metadata[key] = (
                getattr(value, kind) if kind else value_from_pb(value, f"item {quoted(item.id)} metadata {quoted(key)}")
            )
        items.append(
            UpsertRequestItem(
                item.id,
                content_from_pb(item.content, f"item {quoted(item.id)}") if payload == "content" else None,
                next(vectors) if payload == "vector" else None,
                metadata,
            )
        )
    return items


class _UpsertStream:
    """An Upsert stream's commits: one at a time and in order, while the loop reads and decodes the next
    message (a commit runs in a store thread; decoding waited for it and the commit for the decoding)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.collection = ""
        self.inserted = self.replaced = self.count = 0
        self._commit: asyncio.Future | None = None

    def target(self, message: pb.UpsertRequest) -> str:
        if message.collection and self.collection and message.collection != self.collection:
            raise InvalidInput(
                f"one Upsert stream writes one collection: got {quoted(message.collection)} after "
                f"{quoted(self.collection)}"
            )
        self.collection = self.collection or message.collection
        if not self.collection:
            raise InvalidInput("the first Upsert message must name the collection")
        return self.collection

    def start(self, items: list[UpsertRequestItem]) -> None:
        self._commit = asyncio.ensure_future(self.engine.upsert(self.collection, items))

    async def settle(self) -> None:
        """Waits for the commit in flight; its error says what earlier messages stored."""
        commit, self._commit = self._commit, None
        if commit is None:
            return
        try:
            result = await commit
        except EmbedsvcError as exc:
            if self.inserted or self.replaced:
                raise type(exc)(
                    f"{exc} (this message was not stored; {self.inserted + self.replaced} items from "
                    f"earlier messages of the stream were)"
                ) from None
            raise
        self.inserted, self.replaced, self.count = (
            self.inserted + result.inserted,
            self.replaced + result.replaced,
            result.count,
        )

    def abandon(self) -> None:
        """The stream ended early (cancelled, broken): a commit in flight is not waited for (its thread ends it)."""
        if self._commit is not None and not self._commit.done():
            self._commit.cancel()


async def upsert(engine: Engine, messages: AsyncIterable[pb.UpsertRequest]) -> pb.UpsertResponse:
    stream = _UpsertStream(engine)
    try:
        async for message in messages:
            try:
                stream.target(message)
                items = upsert_items(message)
            except Exception:
                await stream.settle()  # the message before a bad one is reported stored, or its own error
                raise
            await stream.settle()
            if items:
                stream.start(items)
        await stream.settle()
    finally:
        stream.abandon()
    if not stream.collection:
        raise InvalidInput("empty Upsert stream: name the collection and send items")
    return pb.UpsertResponse(inserted=stream.inserted, replaced=stream.replaced, count=stream.count)


async def delete(engine: Engine, request: pb.DeleteRequest) -> pb.DeleteResponse:
    result = await engine.delete(request.collection, list(request.ids))
    return pb.DeleteResponse(deleted=result.deleted, missing_ids=result.missing)


async def get(engine: Engine, request: pb.GetRequest) -> pb.GetResponse:
    engine._check_count(len(request.ids), "ids")
    items, missing = await engine.run_blocking(
        engine.store.get, request.collection, list(request.ids), request.include_vectors
    )
    out = pb.GetResponse(missing_ids=missing)
    for item in items:
        stored = out.items.add(id=item.id)
        for k, v in item.metadata.items():
            stored.metadata[k].CopyFrom(value_to_pb(v))
        if item.vector is not None:
            stored.vector.values.extend(item.vector.tolist())
    return out


def query_from_pb(q: pb.Query, i: int) -> Query:
    kind = q.WhichOneof("kind")
    if kind in ("text", "image"):
        return Query(content=Text(q.text) if kind == "text" else ImageBytes(q.image))
    if kind == "vector":
        return Query(vector=vector_from_pb(q.vector))
    if kind == "id":
        return Query(item_id=q.id)
    raise InvalidInput(f"query {i} is empty: set text, image, vector or id")


def search_filter(request: pb.SearchRequest) -> Filter | None:
    """The request's filter: structured, or text in the grammar of embedsvc.store.filter_text."""
    if request.filter_text and request.HasField("filter"):
        raise InvalidInput("set filter or filter_text, not both")
    return parse_filter_text(request.filter_text) if request.filter_text else filter_from_pb(request.filter)


async def search(engine: Engine, request: pb.SearchRequest) -> pb.SearchResponse:
    queries = await converted(request.queries, query_from_pb, lambda query: query.vector)
    flt = search_filter(request)
    options = SearchOptions(
        request.top_k or 10,
        flt,
        request.params.nprobe,
        request.params.ef_search,
        request.include_metadata,
        request.include_vectors,
    )
    outcomes = await engine.search(request.collection, queries, options)
    out = pb.SearchResponse()
    if flt is not None and not any(outcome.hits for outcome in outcomes):  # say why, when it may be a typo
        out.unknown_filter_keys.extend(await engine.missing_filter_keys(request.collection, flt))
    for outcome in outcomes:
        result = out.results.add(truncated=outcome.truncated)
        for hit in outcome.hits:
            h = result.hits.add(id=hit.id, score=hit.score)
            for k, v in (hit.metadata or {}).items():
                h.metadata[k].CopyFrom(value_to_pb(v))
            if hit.vector is not None:
                h.vector.values.extend(hit.vector.tolist())
    return out


async def fit_pooling(engine: Engine, messages: AsyncIterable[pb.FitPoolingRequest]) -> pb.FitPoolingResponse:
    collection, held = "", 0
    params: dict[str, str] = {}
    samples: list[Text | ImageBytes] = []
    config = engine.config
    async for message in messages:
        collection = collection or message.collection
        params = params or dict(message.params)
        engine._check_count(len(message.samples), "samples")
        held += message.ByteSize()
        if len(samples) + len(message.samples) > config.max_fit_samples or held > config.max_fit_bytes:
            raise ResourceExhausted(
                f"FitPooling streamed more than {config.max_fit_samples:,} samples "
                f"(max_fit_samples) or {config.max_fit_bytes:,} bytes (max_fit_bytes); fit "
                f"on a sample of your data"
            )
        samples += [content_from_pb(c, f"sample {len(samples) + i}") for i, c in enumerate(message.samples)]
    if not collection:
        raise InvalidInput("the first FitPooling message must name the collection")
    fitted = await engine.fit_pooling(collection, samples, params)
    return pb.FitPoolingResponse(
        collection=info_to_pb(fitted.info), descriptors=fitted.descriptors, seconds=fitted.seconds
    )
