"""Retrieval metrics from a similarity matrix and a relevance matrix.

Conventions: ranks are 1-based; a query's rank is that of its best-ranked relevant item; recall@k is
the fraction of queries with a relevant item in the top k; AP averages precision at each relevant
item's rank over all relevant items; queries with no relevant item are left out. Ties in score are
broken against the query (a relevant item tied with an irrelevant one ranks below it), so a constant
scorer earns no credit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class RetrievalMetrics:
    recall_at_1: float
    recall_at_5: float
    recall_at_10: float
    median_rank: float
    mean_average_precision: float
    queries: int

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


def retrieval_metrics(similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> RetrievalMetrics:
    """similarity [Q, N] (higher is closer), relevant [Q, N] bool."""
    similarity = np.asarray(similarity, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {similarity.shape} and relevance {relevant.shape} differ in shape")
    keep = relevant.any(axis=1)
    ranks = _ranks(similarity[keep], relevant[keep])
    if not ranks:
        return RetrievalMetrics(0.0, 0.0, 0.0, float("nan"), 0.0, 0)
    first = np.array([r[0] for r in ranks])
    recalls = {k: float(np.mean(first <= k)) for k in ks}
    aps = [float(np.mean(np.arange(1, len(r) + 1) / r)) for r in ranks]
    return RetrievalMetrics(recalls.get(1, 0.0), recalls.get(5, 0.0), recalls.get(10, 0.0),
                            float(np.median(first)), float(np.mean(aps)), int(keep.sum()))


def cross_modal_metrics(image_vectors: np.ndarray, text_vectors: np.ndarray,
                        image_keys: Optional[Sequence] = None) -> dict[str, RetrievalMetrics]:
    """Text i describes image i (its only correct match). image->image relevance: other images with
    equal `image_keys` (e.g. the same objects), when given."""
    sim = np.asarray(text_vectors) @ np.asarray(image_vectors).T
    identity = np.eye(len(image_vectors), dtype=bool)
    results = {
        "text_to_image": retrieval_metrics(sim, identity),
        "image_to_text": retrieval_metrics(sim.T, identity),
    }
    if image_keys is not None:
        keys = list(image_keys)
        same = np.array([[a == b for b in keys] for a in keys], dtype=bool) & ~identity
        image_sim = np.asarray(image_vectors) @ np.asarray(image_vectors).T
        image_sim[identity] = -np.inf  # a query never retrieves itself
        results["image_to_image"] = retrieval_metrics(image_sim, same)
    return results
