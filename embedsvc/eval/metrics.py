"""Retrieval metrics from a similarity matrix and a relevance matrix, with relevance defined by the data.

Conventions: ranks are 1-based; a query's rank is that of its best-ranked relevant item; recall@k is
the fraction of queries with a relevant item in the top k; AP averages precision at each relevant
item's rank over all relevant items; queries with no relevant item are left out, and a task where no query has
one is not measured (absent, never a row of zeros that reads as a measured 0.000). Ties in score are
broken against the query (a relevant item tied with an irrelevant one ranks below it), so a constant
scorer earns no credit. Identical captions are one text (see `cross_modal_metrics`), so the pessimistic
tie-break no longer makes a query fail against a duplicate of its own caption.

Every figure comes with its chance level: what a uniformly random ranking earns on the same queries
(recall@k with r relevant of N: 1 - C(N-r, k) / C(N, k); AP: its exact expectation
(H_N + (r-1)/(N-1) (N - H_N)) / N with H_N the N-th harmonic number, which is about r / N for large r;
first relevant rank: the median of its expectation (N + 1) / (r + 1)).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# How relevance was defined, as `cross_modal_metrics` reports it.
BY_LABEL = "label"
BY_CAPTION = "caption"
# The tasks `cross_modal_metrics` measures, in report order.
TASKS = ("text_to_image", "image_to_text", "image_to_image")


@dataclass(frozen=True)
class RetrievalMetrics:
    recall_at_1: float
    recall_at_5: float
    recall_at_10: float
    median_rank: float
    mean_average_precision: float
    # Queries with at least one relevant item (the others are left out).
    queries: int
    # Items each query is ranked against.
    candidates: int = 0
    # Mean number of relevant items per query.
    relevant_per_query: float = 0.0
    # What a random ranking earns on the same queries.
    chance_recall_at_1: float = 0.0
    chance_recall_at_5: float = 0.0
    chance_recall_at_10: float = 0.0
    chance_median_rank: float = float("nan")
    chance_mean_average_precision: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _ranks(similarity: np.ndarray, relevant: np.ndarray) -> list[np.ndarray]:
    """For each query, the 1-based positions of its relevant items in the ranking, ascending.

    Sorted by score descending; within equal scores irrelevant items come first (pessimistic)."""
    out = []
    for scores, rel in zip(similarity, relevant):
        order = np.lexsort((rel, -scores))  # last key is primary: -score, then relevant after irrelevant
        out.append(np.flatnonzero(rel[order]) + 1)
    return out


def chance_recall(n: int, r: np.ndarray, k: int) -> np.ndarray:
    """P(at least one of r relevant items among the top k of n in random order) = 1 - C(n-r, k)/C(n, k)."""
    r = np.asarray(r, dtype=np.float64)
    miss = np.ones_like(r)
    for i in range(min(k, n)):
        miss *= np.clip((n - r - i) / (n - i), 0.0, None)
    return 1.0 - miss


def chance_average_precision(n: int, r: np.ndarray) -> np.ndarray:
    """Expected AP of a random ranking: a relevant item at position p has precision
    (1 + (p-1)(r-1)/(n-1)) / p in expectation, p uniform over 1..n."""
    r = np.asarray(r, dtype=np.float64)
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    share = (r - 1) / (n - 1) if n > 1 else np.zeros_like(r)
    return (harmonic + share * (n - harmonic)) / n


def retrieval_metrics(
    similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> RetrievalMetrics | None:
    """similarity [Q, N] (higher is closer; -inf marks an item the query may not retrieve, e.g. itself),
    relevant [Q, N] bool. None when no query has a relevant item: there is nothing to measure."""
    similarity = np.asarray(similarity, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {similarity.shape} and relevance {relevant.shape} differ in shape")
    keep = relevant.any(axis=1)
    ranks = _ranks(similarity[keep], relevant[keep])
    if not ranks:
        return None
    # an excluded item (-inf, the query itself) is no candidate
    n = int(np.isfinite(similarity[keep][0]).sum())
    r = relevant[keep].sum(axis=1)
    first = np.array([ranks_[0] for ranks_ in ranks])
    recalls = {k: float(np.mean(first <= k)) for k in ks}
    chances = {k: float(np.mean(chance_recall(n, r, k))) for k in ks}
    aps = [float(np.mean(np.arange(1, len(x) + 1) / x)) for x in ranks]
    return RetrievalMetrics(
        recalls.get(1, 0.0),
        recalls.get(5, 0.0),
        recalls.get(10, 0.0),
        float(np.median(first)),
        float(np.mean(aps)),
        int(keep.sum()),
        n,
        float(np.mean(r)),
        chances.get(1, 0.0),
        chances.get(5, 0.0),
        chances.get(10, 0.0),
        float(np.median((n + 1) / (r + 1))),
        float(np.mean(chance_average_precision(n, r))),
    )


def _codes(values: Sequence[Hashable]) -> np.ndarray:
    """Equal values -> equal small ints, in order of first appearance."""
    seen: dict = {}
    return np.array([seen.setdefault(v, len(seen)) for v in values], dtype=np.int64)


def cross_modal_metrics(
    image_vectors: np.ndarray,
    text_vectors: np.ndarray,
    *,
    captions: Sequence[Hashable] | None = None,
    labels: Sequence[Hashable] | None = None,
    image_keys: Sequence[Hashable] | None = None,
) -> dict[str, RetrievalMetrics]:
    """Image i has caption `captions[i]` embedded as `text_vectors[i]`.

    Identical captions are one text: the text side is deduplicated (the first vector of each caption
    stands for it). text->image: a text's relevant images are those with that caption or, when `labels`
    is given, every image whose label is that of the caption's images. image->text: the relevant texts
    are the image's caption (with labels: every caption of an image of the same label); any of them
    counts for recall. image->image: other images with the same label, else the same `image_keys`
    (e.g. the same objects in a scene), else not measured. Without `captions`, caption i is taken as
    distinct for every i (each text describes only its own image). A task no query can be measured on
    (e.g. image->image when every label occurs once) is left out: see `not_measured` for why."""
    image_vectors = np.asarray(image_vectors, dtype=np.float64)
    text_vectors = np.asarray(text_vectors, dtype=np.float64)
    n = len(image_vectors)
    caption_of = _codes(captions) if captions is not None else np.arange(n)
    _, first = np.unique(caption_of, return_index=True)
    texts = text_vectors[first]  # one row per distinct caption, in code order
    if labels is not None:
        label_of = _codes(labels)
        text_labels = [set(label_of[caption_of == c].tolist()) for c in range(len(first))]
        relevant = np.array([[label_of[i] in text_labels[c] for i in range(n)] for c in range(len(first))])
    else:
        relevant = caption_of[None, :] == np.arange(len(first))[:, None]
    sim = texts @ image_vectors.T
    results = {
        "text_to_image": retrieval_metrics(sim, relevant),
        "image_to_text": retrieval_metrics(sim.T, relevant.T),
    }
    groups = _codes(labels) if labels is not None else _codes(image_keys) if image_keys is not None else None
    if groups is not None:
        identity = np.eye(n, dtype=bool)
        image_sim = image_vectors @ image_vectors.T
        image_sim[identity] = -np.inf  # a query never retrieves itself
        results["image_to_image"] = retrieval_metrics(image_sim, (groups[:, None] == groups[None, :]) & ~identity)
    return {task: m for task, m in results.items() if m is not None}


def not_measured(measured: Mapping[str, Any], *, labels: bool, image_keys: bool) -> dict[str, str]:
    """Why each task missing from `measured` (a `cross_modal_metrics` result, as objects or dicts) was not
    measured, given whether labels or image keys defined relevance; reports print these instead of a figure."""
    reasons = {}
    for task in TASKS:
        if task in measured:
            continue
        if task != "image_to_image":
            reasons[task] = "no query has a relevant item"
        elif labels:
            reasons[task] = "no image has another image of its label"
        elif image_keys:
            reasons[task] = "no image has another image with the same objects"
        else:
            reasons[task] = "no labels tell which images are alike (a label column would)"
    return reasons


def relevance_summary(
    captions: Sequence[Hashable] | None, labels: Sequence[Hashable] | None, label_name: str = "label"
) -> dict:
    """What `cross_modal_metrics` used as relevance, in words and counts (for reports and warnings)."""
    count = len(captions) if captions is not None else len(labels or ())
    distinct = len(set(captions)) if captions is not None else count
    if labels is not None:
        definition = (
            f"by the {label_name!r} column: an image is relevant to every caption of its class, "
            f"and images of one class to each other"
        )
    elif distinct < count:
        definition = (
            "by caption: every image whose caption equals the query's is relevant; identical captions are one text"
        )
    else:
        definition = "by caption: each caption describes only its own image (all captions distinct)"
    return {
        "definition": BY_LABEL if labels is not None else BY_CAPTION,
        "description": definition,
        "items": count,
        "distinct_captions": distinct,
        "classes": len(set(labels)) if labels is not None else None,
    }
