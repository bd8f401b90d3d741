"""Retrieval metrics on numpy arrays: recall@k, median rank, mAP, each with its chance level."""

from embedsvc.eval.metrics import (RetrievalMetrics, chance_recall, cross_modal_metrics, relevance_summary,
                                   retrieval_metrics)

__all__ = ["RetrievalMetrics", "chance_recall", "cross_modal_metrics", "relevance_summary", "retrieval_metrics"]
