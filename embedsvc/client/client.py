"""Python clients, blocking (`Client`) and asyncio (`AsyncClient`): numpy arrays and plain dataclasses in and
out, typed errors. Both run the same request-building and response-decoding code (`_Api`).

Imports only the generated API code and this package's own helpers.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import warnings
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Concatenate,
    ParamSpec,
    Self,
    TypeVar,
)

import grpc
import grpc.aio
import numpy as np

from embedsvc.client.errors import EmbedsvcClientError, InvalidArgumentError, UnknownFilterKeyWarning, from_rpc_error
from embedsvc.spec_text import SpecTextError, parse_spec_text
from embedsvc.v1 import embedsvc_pb2 as pb, embedsvc_pb2_grpc as pb_grpc

Input = str | bytes | Path  # text, encoded image bytes, or an image file path
MetadataDict = Mapping[str, str | float | int | bool]


@dataclass
class Embeddings:
    """One matrix per pooling ([N, dim] float32, rows in input order), and per-input flags."""

    model: str
    # Keyed by each pooling spec as the caller wrote it ("gem:p=3"; a (name, params) tuple as "name:k=v;k=v"),
    # so two specs of one pooling ("gem:p=3", "gem:p=4") each keep their vectors; "cls" when none was given.
    vectors: dict[str, np.ndarray]
    modalities: list[str]
    truncated: list[bool]
    tokens: list[np.ndarray] | None = None  # with include_tokens: [num_tokens, dim] per input
    grids: list[tuple[int, int] | None] | None = None  # with include_tokens: image token grids; None for text


@dataclass
class ModelInfo:
    """A model the server offers (`list_models`)."""

    name: str
    architecture: str
    weights: str  # "pretrained:<tag>", "checkpoint:<path>", "bundled" or "random"
    embed_dim: int
    image_size: int
    context_length: int
    vision_tower: str  # "vit" or "resnet"
    loaded: bool
    device: str  # when loaded: "cpu", "cuda:0"
    dtype: str  # when loaded: "float32", "float16", "bfloat16"


@dataclass
class PoolingInfo:
    """A pooling the server offers: its parameters' defaults, and whether it needs `fit_pooling` first."""

    name: str
    description: str
    modalities: list[str]  # "text", "image"
    defaults: dict[str, str]
    requires_fit: bool


@dataclass
class Models:
    """`list_models`: the models, the poolings, and the model a request that names none gets."""

    models: list[ModelInfo]
    poolings: list[PoolingInfo]
    default_model: str


@dataclass
class Collection:
    name: str
    model: str
    pooling: str
    pooling_params: dict[str, str]
    metric: str
    index: str
    dim: int
    count: int
    pooling_state: str
    index_trained: bool


@dataclass
class Item:
    """An item to upsert: give `vector`, or `text` / `image` for the server to embed."""

    id: str
    vector: np.ndarray | None = None
    text: str | None = None
    image: bytes | Path | None = None
    metadata: MetadataDict = field(default_factory=dict)


@dataclass
class StoredItem:
    id: str
    metadata: dict[str, Any]
    vector: np.ndarray | None = None


@dataclass
class Hit:
    id: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    vector: np.ndarray | None = None


@dataclass
class FitResult:
    """`fit_pooling`: the collection after fitting, the token descriptors the fit used and its seconds."""

    collection: Collection
    descriptors: int
    seconds: float


@dataclass
class UpsertStats:
    inserted: int
    replaced: int
    count: int


def _content(value: Input) -> dict[str, Any]:
    """A Content message's fields, for the message that holds it to build in place: a Content built first would be
    copied into it (a photo's megabytes once more per call)."""
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, Path):
        return {"image": value.read_bytes()}
    if isinstance(value, (bytes, bytearray)):
        return {"image": bytes(value)}
    raise TypeError(f"input must be str (text), bytes or Path (image), got {type(value).__name__}")


def _value(v: Any) -> pb.MetadataValue:
    out = pb.MetadataValue()
    _set_value(out, v)
    return out


def _set_value(out: pb.MetadataValue, v: Any) -> None:
    """Sets the value in place (a map entry): building a message and copying it in cost 3 us an item."""
    if isinstance(v, bool):
        out.bool_value = v
    elif isinstance(v, (int, float)):
        out.number_value = float(v)
    else:
        out.string_value = str(v)


def _metadata(values) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        kind = v.WhichOneof("kind")
        value: Any = getattr(v, kind) if kind else None
        if kind == "number_value" and float(value).is_integer():
            value = int(value)
        out[k] = value
    return out


def _filter(flt: Mapping[str, Any] | None) -> pb.Filter | None:
    """{"colour": "red"} equality, {"shape": ["star", "circle"]} any-of, {"n": (2, 4)} inclusive range."""
    if not flt:
        return None
    out = pb.Filter()
    for key, test in flt.items():
        condition = out.must.add(key=key)
        if isinstance(test, list):
            getattr(condition, "in").values.extend(_value(v) for v in test)
        elif isinstance(test, tuple):
            low, high = test
            if low is not None:
                condition.range.gte = low
            if high is not None:
                condition.range.lte = high
        else:
            condition.equals.CopyFrom(_value(test))
    return out


PoolingArg = str | tuple[str, Mapping[str, Any]]  # "gem:p=3" or ("gem", {"p": 3})


def _pooling(spec: PoolingArg) -> pb.PoolingSpec:
    """The proto of one spec; its text is read by the same parser as the server's (embedsvc.spec_text)."""
    params: Mapping[str, Any]
    if isinstance(spec, str):
        try:
            name, params = parse_spec_text(spec)
        except SpecTextError as exc:
            raise InvalidArgumentError(str(exc)) from None
    else:
        name, params = spec
    return pb.PoolingSpec(name=name, params={k: str(v) for k, v in params.items()})


def _pooling_list(poolings: PoolingArg | Sequence[PoolingArg]) -> list[PoolingArg]:
    """A lone spec ("gem:p=3", or one (name, params) tuple) is one pooling, not a sequence of characters."""
    if isinstance(poolings, str) or (
        isinstance(poolings, tuple)
        and len(poolings) == 2
        and isinstance(poolings[0], str)
        and isinstance(poolings[1], Mapping)
    ):
        return [poolings]
    return list(poolings)


def _pooling_key(spec: str | tuple[str, Mapping[str, Any]]) -> str:
    """Where a pooling's vectors go in Embeddings.vectors: the spec as written, a tuple written as a string."""
    if isinstance(spec, str):
        return spec
    name, params = spec
    return f"{name}:{';'.join(f'{k}={v}' for k, v in params.items())}" if params else name


def _pooling_keys(poolings: Sequence[str | tuple]) -> list[str]:
    """One key per requested pooling, in request order; the server's default (cls) when none is given."""
    keys = [_pooling_key(p) for p in poolings] or ["cls"]
    repeated = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
    if repeated is not None:
        raise InvalidArgumentError(
            f"pooling {repeated!r} is asked for twice in one embed call; give each spec once "
            f"(its vectors are returned under the spec)"
        )
    return keys


def _pooled_vectors(response: pb.EmbedResponse, names: list[str], keys: list[str]) -> dict[str, np.ndarray]:
    """Each requested spec's [N, dim] matrix, taken by position (the server answers in request order)."""
    for result in response.results:
        answered = [e.pooling for e in result.embeddings]
        if answered != names:
            raise EmbedsvcClientError(
                f"the server answered poolings {answered} for {names} requested; the "
                f"vectors cannot be matched to the specs"
            )
    return {
        key: np.array([r.embeddings[j].vector.values for r in response.results], dtype=np.float32)
        for j, key in enumerate(keys)
    }


def _collection(info: pb.CollectionInfo) -> Collection:
    c = info.config
    metric = {pb.METRIC_INNER_PRODUCT: "inner_product"}.get(c.metric, "cosine")
    return Collection(
        c.name,
        c.model,
        c.pooling.name,
        dict(c.pooling.params),
        metric,
        c.index,
        info.dim,
        info.count,
        pb.PoolingState.Name(info.pooling_state),
        info.index_trained,
    )


def _modality(value: int) -> str:
    return pb.Modality.Name(value).split("_")[-1].lower()


def _models(response: pb.ListModelsResponse) -> Models:
    models = [
        ModelInfo(
            m.name,
            m.architecture,
            m.weights,
            m.embed_dim,
            m.image_size,
            m.context_length,
            m.vision_tower,
            m.loaded,
            m.device,
            m.dtype,
        )
        for m in response.models
    ]
    poolings = [
        PoolingInfo(p.name, p.description, [_modality(m) for m in p.modalities], dict(p.defaults), p.requires_fit)
        for p in response.poolings
    ]
    return Models(models, poolings, response.default_model)


def _embeddings(request: pb.EmbedRequest, response: pb.EmbedResponse, keys: list[str]) -> Embeddings:
    vectors = _pooled_vectors(response, [p.name for p in request.poolings] or ["cls"], keys)
    tokens = grids = None
    if request.include_tokens:
        tokens = [
            np.frombuffer(r.tokens.data, dtype="<f4").reshape(r.tokens.num_tokens, r.tokens.dim)
            for r in response.results
        ]
        grids = [
            (r.tokens.grid_height, r.tokens.grid_width) if r.tokens.grid_height else None for r in response.results
        ]
    return Embeddings(
        response.model,
        vectors,
        [_modality(r.modality) for r in response.results],
        [r.truncated for r in response.results],
        tokens,
        grids,
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _set_vector(out: pb.Vector, values: Any) -> None:
    """Fills a Vector from its wire bytes: a packed `repeated float` is a tag, a length and the little-endian
    floats numpy holds already, parsed with one copy; setting `values` from a Python list converted each float
    on its own (20 ms for a message of 1,000 x 512, the client's largest cost in a bulk upsert)."""
    data = np.ascontiguousarray(values, dtype="<f4").reshape(-1).tobytes()
    out.MergeFromString(b"\x0a" + _varint(len(data)) + data if data else b"")
    out.SetInParent()


def _upsert_request(collection: str, items: Sequence[Item]) -> pb.UpsertRequest:
    """Items are filled in place: a message built apart and then added is copied again."""
    request = pb.UpsertRequest(collection=collection)
    for item in items:
        _fill_item(request.items.add(), item)
    return request


def _fill_item(out: pb.UpsertItem, item: Item) -> None:
    out.id = item.id
    if item.vector is not None:
        _set_vector(out.vector, item.vector)
    elif item.text is not None:
        out.content.text = item.text
    elif item.image is not None:
        out.content.CopyFrom(pb.Content(**_content(item.image)))
    for k, v in item.metadata.items():
        _set_value(out.metadata[k], v)


@dataclass(frozen=True)
class _SearchOptions:
    """What applies to every query of one Search request."""

    top_k: int
    filter: str | Mapping[str, Any] | None
    nprobe: int
    ef_search: int
    include_metadata: bool
    include_vectors: bool


def _search_request(collection: str, queries: Sequence[Mapping[str, Any]], options: _SearchOptions) -> pb.SearchRequest:
    request = pb.SearchRequest(
        collection=collection,
        top_k=options.top_k,
        include_metadata=options.include_metadata,
        include_vectors=options.include_vectors,
        params=pb.SearchParams(nprobe=options.nprobe, ef_search=options.ef_search),
    )
    if isinstance(options.filter, str):  # the CLI's grammar, parsed by the server (embedsvc.store.filter_text)
        request.filter_text = options.filter
    elif (flt := _filter(options.filter)) is not None:
        request.filter.CopyFrom(flt)
    for q in queries:
        ((kind, value),) = q.items()
        if kind == "vector":
            _set_vector(request.queries.add().vector, value)
        elif kind == "image":
            request.queries.add(image=pb.Content(**_content(value)).image)
        else:
            request.queries.add(**{kind: value})
    return request


def _search(
    collection: str, queries: Sequence[Mapping[str, Any]], options: _SearchOptions, timeout: float | None
) -> Steps[list[list[Hit]]]:
    """The Search RPC both `search` and `search_batch` make (a generator, like the methods that use it)."""
    response = yield "index", "Search", _search_request(collection, queries, options), timeout
    if response.unknown_filter_keys:  # stacklevel 4: past here, search and the driver, to the caller
        warnings.warn(UnknownFilterKeyWarning(collection, list(response.unknown_filter_keys)), stacklevel=4)
    return [
        [
            Hit(
                h.id,
                h.score,
                _metadata(h.metadata),
                np.array(h.vector.values, np.float32) if options.include_vectors else None,
            )
            for h in r.hits
        ]
        for r in response.results
    ]


def _batches(iterable: Iterable, size: int) -> Iterator[list]:
    """Lists of up to `size` items; at least one (maybe empty) list."""
    iterator, first = iter(iterable), True
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk and not first:
            return
        yield chunk
        first = False
        if not chunk:
            return


# -- the API, once: each method is a generator that yields the RPCs it makes ---------------------------------
#
# A method yields (stub, rpc, request or message iterator, timeout), is sent each response, and returns the
# result. Client runs it blocking and AsyncClient awaiting it (see _blocking and _awaiting), so both clients
# build the same requests and decode the same responses with the same code.

Rpc = tuple[str, str, Any, float | None]
R = TypeVar("R")
P = ParamSpec("P")
Steps = Generator[Rpc, Any, R]  # a method of _Api: yields Rpcs, is sent their responses, returns R


class _Api:
    def embed(
        self,
        inputs: Sequence[Input],
        poolings: PoolingArg | Sequence[PoolingArg] = ("cls",),
        model: str = "",
        include_tokens: bool = False,
        timeout: float | None = None,
    ) -> Steps[Embeddings]:
        """One matrix per pooling, keyed by the spec as written (Embeddings.vectors); with include_tokens, each
        input's token features (and image token grid). `poolings` is one spec or a sequence of them. A spec
        given twice is refused before anything is sent."""
        poolings = _pooling_list(poolings)
        keys = _pooling_keys(poolings)
        if isinstance(inputs, (str, bytes, Path)):  # one input, not a sequence of characters or bytes
            inputs = [inputs]
        request = pb.EmbedRequest(
            model=model,
            poolings=[_pooling(p) for p in poolings],
            inputs=[_content(x) for x in inputs],
            include_tokens=include_tokens,
        )
        return _embeddings(request, (yield "embed", "Embed", request, timeout), keys)

    def list_models(self, timeout: float | None = None) -> Steps[Models]:
        return _models((yield "embed", "ListModels", pb.ListModelsRequest(), timeout))

    # -- collections --------------------------------------------------------------------------

    def create_collection(
        self,
        name: str,
        *,
        model: str = "",
        pooling: str | tuple = "cls",
        metric: str = "cosine",
        index: str = "flat",
        dim: int = 0,
        timeout: float | None = None,
    ) -> Steps[Collection]:
        metric_enum = {"cosine": pb.METRIC_COSINE, "inner_product": pb.METRIC_INNER_PRODUCT}[metric]
        config = pb.CollectionConfig(
            name=name,
            model=model,
            pooling=_pooling(pooling) if not dim else None,
            metric=metric_enum,
            index=index,
            dim=dim,
        )
        return _collection((yield "index", "CreateCollection", pb.CreateCollectionRequest(config=config), timeout))

    def get_collection(self, name: str, timeout: float | None = None) -> Steps[Collection]:
        return _collection((yield "index", "GetCollection", pb.GetCollectionRequest(name=name), timeout))

    def list_collections(self, timeout: float | None = None) -> Steps[list[Collection]]:
        response = yield "index", "ListCollections", pb.ListCollectionsRequest(), timeout
        return [_collection(c) for c in response.collections]

    def drop_collection(self, name: str, timeout: float | None = None) -> Steps[int]:
        return (yield "index", "DropCollection", pb.DropCollectionRequest(name=name), timeout).items_removed

    # -- items --------------------------------------------------------------------------------

    def upsert(
        self, collection: str, items: Iterable[Item], *, batch_size: int = 64, timeout: float | None = None
    ) -> Steps[UpsertStats]:
        """Streams any iterable of items in messages of `batch_size`; acknowledged when all are durable."""
        messages = (
            _upsert_request(collection if n == 0 else "", chunk) for n, chunk in enumerate(_batches(items, batch_size))
        )
        response = yield "index", "Upsert", messages, timeout
        return UpsertStats(response.inserted, response.replaced, response.count)

    def delete(
        self, collection: str, ids: Sequence[str], timeout: float | None = None, chunk: int = 1000
    ) -> Steps[tuple[int, list[str]]]:
        """Deletes ids (sent `chunk` at a time, under the server's per-request limit); returns (deleted, missing)."""
        deleted, missing = 0, []
        for part in _batches(ids, chunk):
            response = yield "index", "Delete", pb.DeleteRequest(collection=collection, ids=part), timeout
            deleted += response.deleted
            missing += list(response.missing_ids)
        return deleted, missing

    def get(
        self,
        collection: str,
        ids: Sequence[str],
        include_vectors: bool = False,
        timeout: float | None = None,
        chunk: int = 1000,
    ) -> Steps[tuple[list[StoredItem], list[str]]]:
        """Reads ids (sent `chunk` at a time); returns (found items in request order, missing ids)."""
        items, missing = [], []
        for part in _batches(ids, chunk):
            response = yield (
                "index",
                "Get",
                pb.GetRequest(collection=collection, ids=part, include_vectors=include_vectors),
                timeout,
            )
            items += [
                StoredItem(
                    i.id,
                    _metadata(i.metadata),
                    np.array(i.vector.values, dtype=np.float32) if include_vectors else None,
                )
                for i in response.items
            ]
            missing += list(response.missing_ids)
        return items, missing

    def search(
        self,
        collection: str,
        *,
        text: str | None = None,
        image: bytes | Path | None = None,
        vector: np.ndarray | None = None,
        id: str | None = None,
        top_k: int = 10,
        filter: str | Mapping[str, Any] | None = None,
        nprobe: int = 0,
        ef_search: int = 0,
        include_metadata: bool = True,
        include_vectors: bool = False,
        timeout: float | None = None,
    ) -> Steps[list[Hit]]:
        """The hits of one query: exactly one of text=, image=, vector= or id=. `filter`: text in the CLI's
        grammar ("n>=2 colour=red|blue"), parsed by the server, or a dict (see _filter). A filter on keys no
        item holds warns (UnknownFilterKeyWarning)."""
        given = {k: v for k, v in {"text": text, "image": image, "vector": vector, "id": id}.items() if v is not None}
        if len(given) != 1:
            raise ValueError("give exactly one of text=, image=, vector=, id= (search_batch takes many queries)")
        options = _SearchOptions(top_k, filter, nprobe, ef_search, include_metadata, include_vectors)
        return (yield from _search(collection, [given], options, timeout))[0]

    def search_batch(
        self,
        collection: str,
        queries: Sequence[Mapping[str, Any]],
        *,
        top_k: int = 10,
        filter: str | Mapping[str, Any] | None = None,
        nprobe: int = 0,
        ef_search: int = 0,
        include_metadata: bool = True,
        include_vectors: bool = False,
        timeout: float | None = None,
    ) -> Steps[list[list[Hit]]]:
        """One hit list per query, in order, in one request; each query is a dict of one of text=, image=,
        vector=, id= (`{"text": "a red car"}`). The options apply to every query."""
        for q in queries:
            if not isinstance(q, Mapping) or len(q) != 1 or next(iter(q)) not in ("text", "image", "vector", "id"):
                raise ValueError(f"each query is a dict of one of text, image, vector, id; got {q!r:.80}")
        options = _SearchOptions(top_k, filter, nprobe, ef_search, include_metadata, include_vectors)
        return (yield from _search(collection, queries, options, timeout))

    def fit_pooling(
        self,
        collection: str,
        samples: Iterable[Input],
        params: Mapping[str, Any] | None = None,
        batch_size: int = 64,
        timeout: float | None = None,
    ) -> Steps[FitResult]:
        messages = (
            pb.FitPoolingRequest(
                collection=collection if n == 0 else "",
                params={k: str(v) for k, v in (params or {}).items()} if n == 0 else {},
                samples=[_content(x) for x in chunk],
            )
            for n, chunk in enumerate(_batches(samples, batch_size))
        )
        response = yield "index", "FitPooling", messages, timeout
        return FitResult(_collection(response.collection), response.descriptors, response.seconds)


API_METHODS = [
    name for name, value in vars(_Api).items() if inspect.isgeneratorfunction(value) and not name.startswith("_")
]


class _Channel:
    """What both clients share: channel options, credentials, the token and the default deadline."""

    grpc_module: Any = grpc  # grpc (blocking channels) or grpc.aio

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: float | None = 60.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ):
        """token: API token (sent as 'authorization: Bearer'); tls: connect with TLS, trusting `ca_file`
        (else the system roots); cert_file + key_file: client certificate for mutual TLS."""
        grpc_module = self.grpc_module
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if credentials is None and (tls or ca_file or cert_file):

            def read(path: str | None) -> bytes | None:
                return Path(path).read_bytes() if path else None

            credentials = grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))
        if token:
            metadata = (*metadata, ("authorization", f"Bearer {token}"))
        self.channel = (
            grpc_module.secure_channel(address, credentials, options)
            if credentials
            else grpc_module.insecure_channel(address, options)
        )
        self.stubs = {"embed": pb_grpc.EmbedServiceStub(self.channel), "index": pb_grpc.IndexServiceStub(self.channel)}
        self.timeout = timeout
        self.metadata = tuple(metadata)

    def _invoke(self, rpc: Rpc):
        stub, method, request, timeout = rpc
        return getattr(self.stubs[stub], method)(
            request, timeout=self.timeout if timeout is None else timeout, metadata=self.metadata
        )


def _blocking(method: Callable[Concatenate[Any, P], Steps[R]]) -> Callable[Concatenate[_Channel, P], R]:
    @functools.wraps(method)
    def run(self: _Channel, *args: P.args, **kwargs: P.kwargs) -> R:
        steps = method(self, *args, **kwargs)
        try:
            rpc = next(steps)
            while True:
                rpc = steps.send(self._invoke(rpc))
        except StopIteration as done:
            return done.value
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    return run


def _awaiting(method: Callable[Concatenate[Any, P], Steps[R]]) -> Callable[Concatenate[_Channel, P], Awaitable[R]]:
    @functools.wraps(method)
    async def run(self: _Channel, *args: P.args, **kwargs: P.kwargs) -> R:
        steps = method(self, *args, **kwargs)
        try:
            rpc = next(steps)
            while True:
                rpc = steps.send(await self._invoke(rpc))
        except StopIteration as done:
            return done.value
        except grpc.RpcError as error:  # grpc.aio's AioRpcError is one
            raise from_rpc_error(error) from None

    return run


class Client(_Channel):
    """Client(address) for an embedsvc server. `timeout` is the default per-call deadline in seconds."""

    embed = _blocking(_Api.embed)
    list_models = _blocking(_Api.list_models)
    create_collection = _blocking(_Api.create_collection)
    get_collection = _blocking(_Api.get_collection)
    list_collections = _blocking(_Api.list_collections)
    drop_collection = _blocking(_Api.drop_collection)
    upsert = _blocking(_Api.upsert)
    delete = _blocking(_Api.delete)
    get = _blocking(_Api.get)
    search = _blocking(_Api.search)
    search_batch = _blocking(_Api.search_batch)
    fit_pooling = _blocking(_Api.fit_pooling)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Channel):
    """Client's asyncio twin on grpc.aio: the same methods and arguments, awaited. Create and use it in one
    event loop: `async with AsyncClient(address) as client: await client.embed(["a red circle"])`."""

    grpc_module = grpc.aio

    embed = _awaiting(_Api.embed)
    list_models = _awaiting(_Api.list_models)
    create_collection = _awaiting(_Api.create_collection)
    get_collection = _awaiting(_Api.get_collection)
    list_collections = _awaiting(_Api.list_collections)
    drop_collection = _awaiting(_Api.drop_collection)
    upsert = _awaiting(_Api.upsert)
    delete = _awaiting(_Api.delete)
    get = _awaiting(_Api.get)
    search = _awaiting(_Api.search)
    search_batch = _awaiting(_Api.search_batch)
    fit_pooling = _awaiting(_Api.fit_pooling)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
