"""Vector indexes: one interface, a FAISS implementation and a numpy brute-force one.

The FAISS implementation is derived state over the store's log: it can be rebuilt from the stored
vectors at any time. Index types come from a registry of presets or any FAISS factory string.
Indexes that need training (IVF, PQ) answer with exact search until enough vectors arrive, then
train on what they hold. Indexes that cannot remove (HNSW) mark deletions as tombstones, filtered
out at search time, and ask for a rebuild when tombstones pass a share of the live items.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from embedsvc.errors import InvalidInput, quoted

METRICS = ("cosine", "inner_product")


@dataclass(frozen=True)
class IndexPreset:
    # Registry name, as in CollectionConfig.index.
    name: str
    # One line for docs and errors.
    description: str
    # (dim, vectors available for training) -> FAISS factory string.
    factory: Callable[[int, int], str]
    # Vectors needed before the index is trained; 0 when it needs none.
    train_min: int = 0


def ivf_lists(n: int) -> int:
    """IVF cells for n vectors: about 2 sqrt(n), at least 39 training points per cell, 16..4096."""
    return int(max(1, min(4096, max(16, 2 * math.isqrt(max(n, 1))), n // 39)))


def pq_subquantizers(dim: int) -> int:
    """The largest divisor of dim not above dim / 4: one byte per 4 dimensions (16x smaller than float32)."""
    return max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)


# HNSW's defaults, for both back ends (Milvus takes them as M, efConstruction and ef): recall@10 against exact
# search, p50 and build rate at 100k and 1M are in docs/scaling.md (bench/scale.py --kinds --kinds-sweep).
# efConstruction stays 80 (the 1M graph took 20 min to build on one core); efSearch grows with the collection
# (hnsw_ef_search): on embedding-like vectors 128 held recall@10 0.951 at 100k but gave 0.834 at 1M, where 768
# holds 0.967, and a flat 768 would cost a 100k collection 13x the search time for recall it does not need.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128  # up to HNSW_EF_BASE_ITEMS items
HNSW_EF_BASE_ITEMS = 100_000
HNSW_EF_GROWTH = math.log(6) / math.log(10)  # x6 per x10 items: 128 at 100k, 768 at 1M
HNSW_EF_SEARCH_MAX = 4096
HNSW_EF_UNKNOWN_SIZE = 1_000_000  # a collection whose size is not known here is searched as one of 1M


def hnsw_ef_search(items: int | None) -> int:
    """The default efSearch for a collection of `items` (None: not known)."""
    n = HNSW_EF_UNKNOWN_SIZE if items is None else items
    if n <= HNSW_EF_BASE_ITEMS:
        return HNSW_EF_SEARCH
    return min(HNSW_EF_SEARCH_MAX, round(HNSW_EF_SEARCH * (n / HNSW_EF_BASE_ITEMS) ** HNSW_EF_GROWTH))


INDEX_PRESETS: dict[str, IndexPreset] = {
    p.name: p
    for p in (
        IndexPreset("flat", "exact inner-product search", lambda dim, n: "Flat"),
        IndexPreset("hnsw", f"HNSW graph, M={HNSW_M} (deletions as tombstones)", lambda dim, n: f"HNSW{HNSW_M}"),
        IndexPreset(
            "ivf",
            "inverted lists (~2 sqrt(n) cells), exact until 2048 vectors",
            lambda dim, n: f"IVF{ivf_lists(n)},Flat",
            train_min=2048,
        ),
        IndexPreset(
            "ivfpq",
            "inverted lists with 8-bit product quantisation, exact until 4096 vectors",
            lambda dim, n: f"IVF{ivf_lists(n)},PQ{pq_subquantizers(dim)}x8",
            train_min=4096,
        ),
    )
}

# A filter this selective (allowed share of live items) is answered exactly over the allowed vectors
# where the index can reconstruct them, because graph search degrades under such filters.
EXACT_FILTER_SHARE = 0.05
EXACT_FILTER_MIN = 2000
# Rebuild a tombstoning index once tombstones exceed this share of live items.
TOMBSTONE_REBUILD_SHARE = 0.2
# Retrain a preset whose shape depends on n (IVF cells) once the collection is this many times larger
# than when it was trained: an IVF trained on 2048 vectors has far too few cells for 100k.
RETRAIN_GROWTH = 8
# Vectors an index trains on at most (a random sample beyond): k-means cost grows with the sample, not the collection.
TRAIN_SAMPLE = 200_000


def train_sample(n: int) -> np.ndarray | None:
    """Ascending positions of a seeded random TRAIN_SAMPLE of n vectors, or None when all n are the sample."""
    if n <= TRAIN_SAMPLE:
        return None
    return np.sort(np.random.default_rng(0).choice(n, TRAIN_SAMPLE, replace=False))


def _faiss_metric(metric: str):
    import faiss

    return faiss.METRIC_INNER_PRODUCT  # cosine = inner product on normalised vectors


# FAISS factory strings a collection may use: the families the store can add to with ids, remove from
# (or tombstone), search through an ID selector and serialise. Anything else (IDMap wrappers, NSG,
# LSH, refinements...) is refused before FAISS parses it: FAISS's parser crashes on hostile strings.
MAX_FACTORY_CHARS = 64
_N = r"[1-9][0-9]{0,5}"
FACTORY_GRAMMAR = re.compile(
    rf"(?:(?P<pre>PCAR?(?P<pca>{_N})|OPQ(?P<opq>{_N})(?:_(?P<opq_dim>{_N}))?),)?"
    rf"(?:Flat"
    rf"|HNSW(?P<hnsw>{_N})(?:,Flat|_SQ(?:4|6|8|fp16))?"
    rf"|IVF(?P<ivf>{_N})(?:_HNSW(?P<ivf_hnsw>{_N}))?,(?:Flat|SQ(?:4|6|8|fp16)|PQ(?P<pq>{_N})(?:x(?P<pq_bits>{_N}))?))"
)
FACTORY_HELP = (
    "[PCA<d>,|OPQ<m>[_<d>],] then Flat | HNSW<M>[,Flat|_SQ8] | IVF<n>[_HNSW<M>],Flat|SQ8|PQ<m>[x<bits>]"
    " (e.g. HNSW16, IVF256,PQ32)"
)


def _check_factory(kind: str, dim: int) -> None:
    """Grammar, then bounds FAISS would otherwise assert on (or crash on) when it builds the index."""
    if len(kind) > MAX_FACTORY_CHARS:
        raise InvalidInput(
            f"bad index type {kind[:40]!r}... ({len(kind)} characters): index types are at most "
            f"{MAX_FACTORY_CHARS} characters; use a preset ({', '.join(INDEX_PRESETS)}) or a FAISS "
            f"factory string of the form {FACTORY_HELP}"
        )
    prefix = f"bad index type {kind!r}"
    match = FACTORY_GRAMMAR.fullmatch(kind)
    if match is None:
        raise InvalidInput(
            f"{prefix}: not a preset ({', '.join(INDEX_PRESETS)}) nor a supported FAISS factory "
            f"string; supported: {FACTORY_HELP}"
        )
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None and v.isdigit()}
    inner = g.get("pca") or g.get("opq_dim") or dim
    problems = []
    if inner > dim:
        problems.append(f"the pre-transform outputs {inner} dimensions, more than the vectors' {dim}")
    for key, top in (("hnsw", 256), ("ivf_hnsw", 256), ("pq_bits", 16), ("ivf", 262_144)):
        if key in g and g[key] > top:
            problems.append(f"{key.replace('_', ' ')} {g[key]} is over {top}")
    for key in ("pq", "opq"):
        if key in g and inner % g[key]:
            problems.append(f"{key.upper()}{g[key]} must divide the dimension {inner}")
    if problems:
        raise InvalidInput(f"{prefix} for dimension {dim}: {'; '.join(problems)}")


def validate_index_kind(kind: str, dim: int, metric: str) -> None:
    """Refuses an unknown metric, or an index type that is neither a preset nor a supported factory string."""
    import faiss

    if metric not in METRICS:
        raise InvalidInput(f"unknown metric {quoted(metric)}; choose one of {', '.join(METRICS)}")
    if kind in INDEX_PRESETS:
        return
    if not isinstance(kind, str) or not kind:
        raise InvalidInput(f"index type must be a preset ({', '.join(INDEX_PRESETS)}) or a FAISS factory string")
    _check_factory(kind, dim)
    try:
        faiss.index_factory(dim, kind, _faiss_metric(metric))
    except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError with a C++ trace
        first_line = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        raise InvalidInput(
            f"bad index type {quoted(kind)} for dimension {dim}: FAISS cannot build it ({first_line})"
        ) from None


class VectorIndex(Protocol):
    """What the store needs of an index; labels are int64 and unique among live items."""

    dim: int

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, labels: np.ndarray) -> None: ...

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, nprobe: int = 0, ef_search: int = 0
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def __len__(self) -> int: ...


def _pad(scores: list, labels: list, k: int) -> tuple[np.ndarray, np.ndarray]:
    out_s = np.full((len(scores), k), -np.inf, dtype=np.float32)
    out_l = np.full((len(scores), k), -1, dtype=np.int64)
    for i, (s, row_labels) in enumerate(zip(scores, labels)):
        out_s[i, : len(s)] = s[:k]
        out_l[i, : len(row_labels)] = row_labels[:k]
    return out_s, out_l


class BruteForceIndex:
    """Exact inner-product search in numpy: the reference the FAISS index is checked against."""

    def __init__(self, dim: int):
        self.dim = dim
        self.vectors: dict[int, np.ndarray] = {}

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        for label, vector in zip(labels.tolist(), vectors):
            self.vectors[label] = np.asarray(vector, dtype=np.float32)

    def remove(self, labels: np.ndarray) -> None:
        for label in labels.tolist():
            self.vectors.pop(label, None)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries, k, allowed=None, nprobe=0, ef_search=0):
        labels = np.array(
            sorted(self.vectors if allowed is None else set(allowed.tolist()) & set(self.vectors)), dtype=np.int64
        )
        if not len(labels):
            return _pad([[]] * len(queries), [[]] * len(queries), k)
        matrix = np.stack([self.vectors[label] for label in labels.tolist()])
        scores = np.asarray(queries, dtype=np.float32) @ matrix.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return _pad([s[o] for s, o in zip(scores, order)], [labels[o] for o in order], k)


class FaissIndex:
    """A FAISS index behind the VectorIndex interface, with training, tombstones and serialisation.

    Flat and graph indexes hold no ids of their own: FAISS numbers their vectors 0..n-1, and `labels`
    maps those positions to the store's labels (sorted lookups, vectorised), so searches go straight to
    the index instead of through an IndexIDMap2 wrapper that translates every candidate. Filters are an
    IDSelectorBitmap over positions, built in numpy. IVF indexes store the labels in their lists.
    """

    def __init__(self, kind: str, dim: int, metric: str = "cosine"):
        import faiss

        validate_index_kind(kind, dim, metric)
        self.kind, self.dim, self.metric = kind, dim, metric
        self.preset = INDEX_PRESETS.get(kind)
        self.tombstones: set[int] = set()  # labels of removed vectors an index could not drop
        self.trained_at = 0  # vectors the index was trained on
        self.index: Any = None  # the real index (an untyped FAISS object), once built (and trained)
        self.exact = faiss.IndexFlat(dim, _faiss_metric(metric))  # until then
        self.labels = np.empty(0, dtype=np.int64)  # position -> label, for indexes without ids (flat, graphs)
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None  # (sorted labels, their positions)
        self._live_mask: np.ndarray | None = None  # per position, False where tombstoned
        self._live_bits: np.ndarray | None = None  # the same, packed for an IDSelectorBitmap
        if not self._needs_training(self._factory(0)):
            self.index, self.exact = self._build(self._factory(0)), None

    # -- construction -------------------------------------------------------------------------

    def _factory(self, n: int) -> str:
        return self.preset.factory(self.dim, n) if self.preset else self.kind

    def _needs_training(self, factory: str) -> bool:
        import faiss

        return not faiss.index_factory(self.dim, factory, _faiss_metric(self.metric)).is_trained

    def train_min(self) -> int:
        if self.preset:
            return self.preset.train_min
        import faiss

        base = faiss.index_factory(self.dim, self.kind, _faiss_metric(self.metric))
        ivf = faiss.try_extract_index_ivf(base)
        return max(1024, 39 * ivf.nlist) if ivf is not None else 1024

    def _build(self, factory: str):
        import faiss

        base = faiss.index_factory(self.dim, factory, _faiss_metric(self.metric))
        ivf = faiss.try_extract_index_ivf(base)
        ivf = faiss.downcast_index(ivf) if ivf is not None else None
        if isinstance(ivf, faiss.IndexIVFPQ):
            # index_factory turns on polysemous training for IVF-PQ: a permutation search that took 20 s of
            # a 21 s training on 4,500 vectors, for Hamming filtering that no search here uses.
            ivf.do_polysemous_training = False
        hnsw = _hnsw_of(base)
        if hnsw is not None:
            hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            hnsw.hnsw.efSearch = HNSW_EF_SEARCH
        return base

    @property
    def trained(self) -> bool:
        return self.index is not None

    @property
    def factory_string(self) -> str:
        return self._factory(0) if self.index is None else getattr(self, "_built_factory", self._factory(0))

    def _target(self):
        return self.index if self.index is not None else self.exact

    @property
    def positional(self) -> bool:
        """True when FAISS numbers the vectors and `labels` maps them (everything but IVF)."""
        import faiss

        return self.index is None or faiss.try_extract_index_ivf(self.index) is None

    # -- labels <-> positions -----------------------------------------------------------------

    def _positions_of(self, labels: np.ndarray) -> np.ndarray:
        """Positions of the given labels that the index holds (others are skipped)."""
        if self._lookup is None:
            order = np.argsort(self.labels, kind="stable")
            self._lookup = (self.labels[order], order.astype(np.int64))
        keys, order = self._lookup
        if not len(keys):
            return np.empty(0, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, labels), len(keys) - 1)
        return order[at[keys[at] == labels]]

    def _changed(self) -> None:
        self._lookup = self._live_mask = self._live_bits = None

    # -- writes -------------------------------------------------------------------------------

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if not len(labels):
            return
        if self.index is not None and not self.positional:
            self.index.add_with_ids(vectors, labels)
            return
        self._target().add(vectors)
        self.labels = np.concatenate([self.labels, labels])
        self._changed()
        if self.index is None and self.exact.ntotal >= self.train_min():
            self._train_from_exact()

    def train_for(self, n: int, sample: np.ndarray) -> None:
        """Shapes an empty index for the n vectors about to be added and trains it on a sample of them (see
        train_sample). A rebuild adds a chunk at a time: trained on its first chunk, an IVF got the cells of a
        far smaller collection, and was outgrown again at the next write."""
        if self.index is not None or self.exact.ntotal or n < self.train_min():
            return
        factory = self._factory(n)
        index = self._build(factory)
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        self.index, self.exact, self._built_factory, self.trained_at = index, None, factory, n

    def _train_from_exact(self) -> None:
        n = self.exact.ntotal
        vectors = self.exact.reconstruct_n(0, n)
        labels = self.labels
        factory = self._factory(n)
        index = self._build(factory)
        picked = train_sample(n)
        index.train(vectors if picked is None else vectors[picked])
        self.index, self.exact, self._built_factory = index, None, factory
        self.trained_at = n
        if self.positional:
            index.add(vectors)
        else:
            index.add_with_ids(vectors, labels)
            self.labels = np.empty(0, dtype=np.int64)
        self._changed()

    def remove(self, labels: np.ndarray) -> None:
        import faiss

        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if not len(labels):
            return
        if not self.positional:
            self.index.remove_ids(faiss.IDSelectorBatch(labels))
            return
        positions = self._positions_of(labels)
        if not len(positions):
            return
        try:
            self._target().remove_ids(faiss.IDSelectorBatch(positions))
        except RuntimeError:  # HNSW and other graph indexes cannot remove
            self.tombstones.update(self.labels[positions].tolist())
        else:  # FAISS compacts the remaining vectors in order; so does the label map
            self.labels = np.delete(self.labels, positions)
        self._changed()

    def needs_rebuild(self, live: int) -> bool:
        """Too many tombstones, or a preset index outgrown since training (its cells are too few)."""
        outgrown = (
            self.preset is not None
            and self.preset.train_min
            and self.trained_at
            and live >= RETRAIN_GROWTH * self.trained_at
            and self.preset.factory(self.dim, live) != self.factory_string
        )
        return bool(outgrown) or len(self.tombstones) > max(1000, TOMBSTONE_REBUILD_SHARE * live)

    def rebuild(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Starts over from the live items (the store passes them from its source of truth)."""
        fresh = FaissIndex(self.kind, self.dim, self.metric)
        fresh.add(labels, vectors)
        self.__dict__.update(fresh.__dict__)

    # -- reads --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._target().ntotal - len(self.tombstones)

    def select(self, allowed: np.ndarray) -> Selection:
        """The allowed labels in this index's own terms (positions, bitmap or selector), built once: the
        store keeps it for a repeated filter until the next write changes the index."""
        allowed = np.ascontiguousarray(allowed, dtype=np.int64)
        if not len(allowed):
            return Selection(allowed)
        if not self.positional:
            return Selection(allowed, selector=_label_selector(allowed))
        positions = self._positions_of(allowed)
        if self.tombstones:
            positions = positions[self._live()[positions]]
        if not len(positions):
            return Selection(allowed, positions)
        return Selection(allowed, positions, _bitmap_selector(_bitmap(positions, self._target().ntotal)))

    def search(self, queries, k, allowed=None, nprobe=0, ef_search=0):
        """`allowed`: labels (an array) or a `select` result of this index as it is now."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        live = len(self)
        selection = allowed if allowed is None or isinstance(allowed, Selection) else self.select(allowed)
        if selection is not None and selection.selector is None:  # nothing allowed
            return _pad([[]] * len(queries), [[]] * len(queries), k)
        labels = selection.labels if selection is not None else None
        if not self.positional:
            selector = selection.selector if selection is not None else None
            return self.index.search(queries, k, params=self._params(selector, labels, live, k, nprobe, ef_search))
        if selection is not None:
            assert selection.positions is not None  # a positional index's selection has them
            if (
                self.index is not None
                and _hnsw_of(self.index) is not None
                and len(selection.positions) <= max(EXACT_FILTER_MIN, EXACT_FILTER_SHARE * live)
            ):
                return self._exact_over(queries, k, selection.positions)
            selector = selection.selector
        else:
            selector = _bitmap_selector(self._live_bitmap()) if self.tombstones else None
        params = self._params(selector, labels, live, k, nprobe, ef_search)
        scores, positions = self._target().search(queries, k, params=params)
        if not len(self.labels):  # empty: FAISS found nothing (all -1)
            return scores, positions
        return scores, np.where(positions >= 0, self.labels[np.maximum(positions, 0)], -1)

    def _live(self) -> np.ndarray:
        """Per position, False where tombstoned; reused until the index changes."""
        if self._live_mask is None:
            self._live_mask = np.ones(self._target().ntotal, dtype=bool)
            self._live_mask[self._positions_of(np.fromiter(self.tombstones, dtype=np.int64))] = False
        return self._live_mask

    def _live_bitmap(self) -> np.ndarray:
        """The live positions as a selector bitmap, reused until the index changes."""
        if self._live_bits is None:
            self._live_bits = np.packbits(self._live(), bitorder="little")
        return self._live_bits

    def _params(self, selector, allowed, live, k, nprobe, ef_search):
        import faiss

        base = faiss.downcast_index(self.index) if self.index is not None else None
        share = 1.0 if allowed is None or not live else min(1.0, len(allowed) / live)
        ivf = faiss.try_extract_index_ivf(base) if base is not None else None
        if ivf is not None:
            probes = nprobe or max(32, ivf.nlist // 8)
            if share < 1.0:  # visit enough cells to expect ~10k allowed candidates
                probes = max(probes, math.ceil(ivf.nlist * min(1.0, 10 * k / max(1, len(allowed)))))
            params = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, probes))
        elif base is not None and _hnsw_of(base) is not None:
            ef = max(ef_search or hnsw_ef_search(live), k)
            if share < 1.0:
                ef = min(HNSW_EF_SEARCH_MAX, max(ef, math.ceil(ef / share)))
            params = faiss.SearchParametersHNSW(efSearch=ef)
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
            params._keep = selector  # the selector (and its bitmap) live as long as the params
        return params

    def _exact_over(self, queries, k, positions):
        vectors = self.index.reconstruct_batch(positions)
        scores = queries @ vectors.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        labels = self.labels[positions]
        return _pad([s[o] for s, o in zip(scores, order)], [labels[o] for o in order], k)

    # -- persistence --------------------------------------------------------------------------

    def to_arrays(self) -> tuple[dict, dict[str, np.ndarray]]:
        import faiss

        header = {
            "kind": self.kind,
            "dim": self.dim,
            "metric": self.metric,
            "trained": self.index is not None,
            "factory": self.factory_string,
            "trained_at": self.trained_at,
            "positional": self.positional,
        }
        arrays = {
            "index": faiss.serialize_index(self._target()),
            "tombstones": np.fromiter(sorted(self.tombstones), dtype=np.int64),
        }
        if self.positional:
            arrays["labels"] = self.labels
        return header, arrays

    @classmethod
    def from_arrays(cls, header: dict, arrays: dict[str, np.ndarray]) -> FaissIndex:
        """Loads a checkpoint of the first format (whole index serialised in memory); one written before
        positional labels (an IndexIDMap2 around a flat or graph index) is unwrapped into the same layout."""
        import faiss

        self = cls.__new__(cls)
        self.kind, self.dim, self.metric = header["kind"], header["dim"], header["metric"]
        self.preset = INDEX_PRESETS.get(self.kind)
        self.tombstones = set(arrays["tombstones"].tolist())
        self.trained_at = int(header.get("trained_at", 0))
        self._lookup = self._live_mask = self._live_bits = None
        index = faiss.deserialize_index(arrays["index"])
        if isinstance(index, faiss.IndexIDMap2):
            labels = faiss.vector_to_array(index.id_map).astype(np.int64)
            index = faiss.clone_index(faiss.downcast_index(index.index))
        elif header.get("positional"):
            labels = np.asarray(arrays["labels"], dtype=np.int64)
        else:
            labels = np.empty(0, dtype=np.int64)
        return self._loaded(index, labels, header)

    def _loaded(self, index, labels: np.ndarray, header: dict) -> FaissIndex:
        """Takes a checkpoint's index and labels as this index's, once they are checked to belong together."""
        import faiss

        if labels.shape != (index.ntotal,) and faiss.try_extract_index_ivf(index) is None:
            raise ValueError(f"checkpoint maps {labels.shape[0]} labels for {index.ntotal} vectors")
        self.labels = labels
        if header["trained"]:
            self.index, self.exact, self._built_factory = index, None, header["factory"]
        else:
            self.index, self.exact = None, index
        return self

    def checkpoint_parts(self) -> tuple[dict, dict]:
        """(header, members) of a checkpoint; the "index" member is the FAISS index itself, which
        write_checkpoint streams to the file (no serialised copy in memory)."""
        header = {
            "trained": self.index is not None,
            "factory": self.factory_string,
            "trained_at": self.trained_at,
            "positional": self.positional,
        }
        arrays = {"index": self._target(), "tombstones": np.fromiter(sorted(self.tombstones), dtype=np.int64)}
        if self.positional:
            arrays["labels"] = self.labels
        return header, arrays

    @classmethod
    def from_checkpoint(
        cls, kind: str, dim: int, metric: str, header: dict, reader, on_read: Callable[[int], None] | None = None
    ) -> FaissIndex:
        """Loads what checkpoint_parts wrote, reading the index straight from the file (a CheckpointReader);
        `on_read(bytes so far)` as it reads."""
        self = cls.__new__(cls)
        self.kind, self.dim, self.metric = kind, dim, metric
        self.preset = INDEX_PRESETS.get(self.kind)
        self.tombstones = set(reader.array("tombstones").tolist())
        self.trained_at = int(header.get("trained_at", 0))
        self._lookup = self._live_mask = self._live_bits = None
        index = reader.faiss_index(on_read=on_read)
        if index.d != dim:
            raise ValueError(f"checkpoint index has dimension {index.d}, the collection {dim}")
        labels = (
            np.asarray(reader.array("labels"), dtype=np.int64)
            if header.get("positional")
            else np.empty(0, dtype=np.int64)
        )
        return self._loaded(index, labels, header)

    def size_bytes(self) -> int:
        from embedsvc.store.checkpoint import serialized_size

        return serialized_size(self._target())


def _bitmap(positions: np.ndarray, n: int) -> np.ndarray:
    bits = np.zeros(n, dtype=bool)
    bits[positions] = True
    return np.packbits(bits, bitorder="little")


def _bitmap_selector(bits: np.ndarray):
    import faiss

    selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))  # the size is in bytes
    selector._bits = bits  # FAISS reads the numpy buffer: keep it alive with the selector
    return selector


@dataclass
class Selection:
    """A filter's allowed labels prepared for one index state; `selector` is None when nothing is allowed."""

    labels: np.ndarray
    positions: np.ndarray | None = None  # positional indexes: where the allowed live vectors are
    selector: Any = None  # a FAISS IDSelector (it keeps its bitmap alive)


def _label_selector(allowed: np.ndarray):
    """IVF ids are the store's labels: a bitmap over the label range when that is compact, else a hash set."""
    import faiss

    top = int(allowed.max()) + 1
    if top <= 64 * len(allowed) + 4096:
        return _bitmap_selector(_bitmap(allowed, top))
    return faiss.IDSelectorBatch(allowed)


def _hnsw_of(index):
    import faiss

    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexHNSW) else None


# Index types served straight from the collection's vector file (vectors.py) instead of a FAISS index of
# their own: exact inner product needs nothing but the vectors, so they are stored and mapped once.
FILE_BACKED = ("flat", "Flat")


def file_backed(kind: str) -> bool:
    return kind in FILE_BACKED


class FileFlatIndex:
    """Exact inner-product search over a VectorFile's rows in place (the same FAISS kernel IndexFlatIP runs,
    `knn_inner_product`, with the same ID selectors), so nothing is copied at start-up or at a checkpoint.

    Positions are the file's slots; a slot is live until its label is removed or replaced. The vectors are
    written by the store before the commit; `add` marks their slots live."""

    tombstones: frozenset = frozenset()  # nothing to rebuild: dead slots go at the file's compaction
    trained = True
    trained_at = 0
    positional = True

    def __init__(self, kind: str, dim: int, metric: str, vectors):
        self.kind, self.dim, self.metric = kind, dim, metric
        self.factory_string = "Flat"
        self.vectors = vectors  # embedsvc.store.vectors.VectorFile
        self._live = np.zeros(max(vectors.capacity, 1), dtype=bool)
        self._count = 0
        self._live_bits: np.ndarray | None = None

    def attach(self, vectors) -> None:
        """Serves from another generation of the file (after a compaction): the live slots move with it."""
        labels = self.vectors.labels_of(np.flatnonzero(self._live[: self.vectors.used]))
        self.vectors = vectors
        self._live = np.zeros(max(vectors.capacity, 1), dtype=bool)
        self._count = 0
        self.add(labels, None)

    def _changed(self) -> None:
        self._live_bits = None

    def add(self, labels: np.ndarray, vectors: np.ndarray | None = None) -> None:
        """Marks the labels' slots live; their rows are already in the file."""
        slots = self.vectors.slots_of(labels)
        if len(slots) and slots.min() < 0:
            raise ValueError(f"labels {np.asarray(labels)[slots < 0][:3].tolist()} have no row in the vector file")
        if len(self._live) < self.vectors.capacity:
            grown = np.zeros(self.vectors.capacity, dtype=bool)
            grown[: len(self._live)] = self._live
            self._live = grown
        fresh = slots[~self._live[slots]]
        self._live[fresh] = True
        # Labels come ascending (a checkpoint's live set, a write's new labels), and so do their slots: counted
        # without np.unique, which took 2.4 s of a 1M-item start-up.
        ascending = len(fresh) < 2 or bool((fresh[1:] > fresh[:-1]).all())
        self._count += len(fresh) if ascending else len(np.unique(fresh))
        self._changed()

    def remove(self, labels: np.ndarray) -> None:
        slots = self.vectors.slots_of(labels)
        slots = np.unique(slots[slots >= 0])
        slots = slots[self._live[slots]]
        self._live[slots] = False
        self._count -= len(slots)
        self._changed()

    def live_labels(self) -> np.ndarray:
        return self.vectors.labels_of(np.flatnonzero(self._live[: self.vectors.used]))

    def dead_rows(self) -> int:
        return self.vectors.used - self._count

    def needs_rebuild(self, live: int) -> bool:
        return False

    def __len__(self) -> int:
        return self._count

    def select(self, allowed: np.ndarray) -> Selection:
        allowed = np.ascontiguousarray(allowed, dtype=np.int64)
        if not len(allowed):
            return Selection(allowed)
        slots = self.vectors.slots_of(allowed)
        slots = slots[slots >= 0]
        slots = slots[self._live[slots]]
        if not len(slots):
            return Selection(allowed, slots)
        return Selection(allowed, slots, _bitmap_selector(_bitmap(slots, self.vectors.used)))

    def search(self, queries, k, allowed=None, nprobe=0, ef_search=0):
        """`allowed`: labels (an array) or a `select` result of this index as it is now."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        selection = allowed if allowed is None or isinstance(allowed, Selection) else self.select(allowed)
        if selection is not None and selection.selector is None:
            return _pad([[]] * len(queries), [[]] * len(queries), k)
        used = self.vectors.used
        if not used:
            return _pad([[]] * len(queries), [[]] * len(queries), k)
        if selection is not None:
            selector = selection.selector
        elif self._count < used:  # replaced or deleted rows: search the live ones only
            if self._live_bits is None:
                self._live_bits = np.packbits(self._live[:used], bitorder="little")
            selector = _bitmap_selector(self._live_bits)
        else:
            selector = None
        scores = np.empty((len(queries), k), dtype=np.float32)
        slots = np.empty((len(queries), k), dtype=np.int64)
        matrix = self.vectors.matrix
        faiss.knn_inner_product(
            faiss.swig_ptr(queries),
            faiss.swig_ptr(matrix),
            self.dim,
            len(queries),
            used,
            k,
            faiss.swig_ptr(scores),
            faiss.swig_ptr(slots),
            selector,
        )
        found = slots >= 0
        labels = np.full_like(slots, -1)
        labels[found] = self.vectors.labels_of(slots[found])
        scores[~found] = -np.inf
        return scores, labels

    def shell(self) -> np.ndarray:
        """What a checkpoint records of this index: an empty IndexFlat of its dimension and metric (the
        vectors are the collection's vector file)."""
        import faiss

        return faiss.serialize_index(faiss.IndexFlat(self.dim, _faiss_metric(self.metric)))

    def check_shell(self, blob: np.ndarray) -> None:
        import faiss

        index = faiss.deserialize_index(np.asarray(blob, dtype=np.uint8))  # already of its own class
        flat = isinstance(index, (faiss.IndexFlat, faiss.IndexFlatIP)) and index.metric_type == _faiss_metric(
            self.metric
        )
        if not flat or index.ntotal or index.d != self.dim:
            raise ValueError(
                f"the checkpoint holds a {type(index).__name__} of {index.ntotal} vectors, not the "
                f"empty flat index of a file-backed collection"
            )
