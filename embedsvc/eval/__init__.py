"""Retrieval metrics on numpy arrays: recall@k, median rank, mAP."""

from embedsvc.eval.metrics import RetrievalMetrics, cross_modal_metrics, retrieval_metrics

__all__ = ["RetrievalMetrics", "cross_modal_metrics", "retrieval_metrics"]
