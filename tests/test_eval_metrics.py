"""Retrieval metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from embedsvc.eval import cross_modal_metrics, retrieval_metrics


def test_hand_computed_ranks():
    # query 0: relevant item 2 ranks 1st; query 1: relevant item 0 ranks 3rd; query 2: relevant {0, 2} at ranks 2 and 3
    sim = np.array([[0.1, 0.2, 0.9, 0.3],
                    [0.5, 0.9, 0.2, 0.8],
                    [0.6, 0.9, 0.5, 0.1]])
    rel = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [1, 0, 1, 0]], dtype=bool)
    m = retrieval_metrics(sim, rel)
    assert m.recall_at_1 == pytest.approx(1 / 3)
    assert m.recall_at_5 == 1.0 and m.recall_at_10 == 1.0
    assert m.median_rank == 2.0  # first relevant ranks: 1, 3, 2
    ap = [1.0, 1 / 3, (1 / 2 + 2 / 3) / 2]
    assert m.mean_average_precision == pytest.approx(np.mean(ap))
    assert m.queries == 3


def test_ties_count_against_the_query_and_queries_without_positives_are_skipped():
    sim = np.zeros((2, 4))
    rel = np.array([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    m = retrieval_metrics(sim, rel)
    assert m.queries == 1 and m.recall_at_1 == 0.0 and m.median_rank == 4.0


def test_cross_modal_identity_and_image_keys():
    images = np.eye(3, dtype=np.float32)
    texts = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=np.float32)  # text 1 and 2 are swapped
    m = cross_modal_metrics(images, texts, image_keys=["a", "b", "a"])
    assert m["text_to_image"].recall_at_1 == pytest.approx(1 / 3)
    assert m["image_to_text"].recall_at_1 == pytest.approx(1 / 3)
    i2i = m["image_to_image"]
    assert i2i.queries == 2  # image 1 has no other image with key "b"
