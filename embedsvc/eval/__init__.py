"""Retrieval metrics on numpy arrays: recall@k, median rank, mAP, each with its chance level."""

from embedsvc.eval.metrics import (
    TASKS,
    RetrievalMetrics,
    chance_recall,
    cross_modal_metrics,
    not_measured,
    relevance_summary,
    retrieval_metrics,
)

__all__ = [
    "TASKS",
    "RetrievalMetrics",
    "chance_recall",
    "cross_modal_metrics",
    "not_measured",
    "relevance_summary",
    "retrieval_metrics",
]
