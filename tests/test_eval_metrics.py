"""Retrieval metrics on hand-computed cases, multi-relevant ones included, and an oracle check."""

from __future__ import annotations

from math import comb

import numpy as np
import pytest

from embedsvc.eval import chance_recall, cross_modal_metrics, retrieval_metrics


def test_hand_computed_ranks():
    # query 0: relevant item 2 ranks 1st; query 1: relevant item 0 ranks 3rd; query 2: relevant {0, 2} at ranks 2 and 3
    sim = np.array([[0.1, 0.2, 0.9, 0.3], [0.5, 0.9, 0.2, 0.8], [0.6, 0.9, 0.5, 0.1]])
    rel = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [1, 0, 1, 0]], dtype=bool)
    m = retrieval_metrics(sim, rel)
    assert m.recall_at_1 == pytest.approx(1 / 3)
    assert m.recall_at_5 == 1.0 and m.recall_at_10 == 1.0
    assert m.median_rank == 2.0  # first relevant ranks: 1, 3, 2
    ap = [1.0, 1 / 3, (1 / 2 + 2 / 3) / 2]
    assert m.mean_average_precision == pytest.approx(np.mean(ap))
    assert m.queries == 3 and m.candidates == 4 and m.relevant_per_query == pytest.approx(4 / 3)
    # chance: r=1 of 4 -> R@1 1/4; r=2 of 4 -> 1 - C(2,1)/C(4,1) = 1/2
    assert m.chance_recall_at_1 == pytest.approx((1 / 4 + 1 / 4 + 1 / 2) / 3)
    assert m.chance_recall_at_5 == 1.0
    # expected AP of a random ranking, N=4 (H_4 = 25/12): r=1 -> H_4/4; r=2 -> (H_4 + (1/3)(4 - H_4))/4
    h4 = 25 / 12
    assert m.chance_mean_average_precision == pytest.approx((2 * h4 / 4 + (h4 + (4 - h4) / 3) / 4) / 3)
    assert m.chance_median_rank == pytest.approx(2.5)  # (N+1)/(r+1): 2.5, 2.5, 5/3


def test_ties_count_against_the_query_and_queries_without_positives_are_skipped():
    sim = np.zeros((2, 4))
    rel = np.array([[0, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
    m = retrieval_metrics(sim, rel)
    assert m.queries == 1 and m.recall_at_1 == 0.0 and m.median_rank == 4.0


def test_chance_recall_is_the_hypergeometric_miss_complement():
    for n, r, k in [(10, 1, 1), (10, 3, 5), (50, 5, 10), (7, 7, 1), (12, 2, 10)]:
        expected = 1 - comb(n - r, k) / comb(n, k)
        assert chance_recall(n, np.array([r]), k)[0] == pytest.approx(expected)
    rng = np.random.default_rng(0)  # and a random ranking earns it
    n, r, k = 40, 4, 5
    rel = np.zeros((4000, n), dtype=bool)
    rel[:, :r] = True
    m = retrieval_metrics(rng.random((4000, n)), rel)
    assert m.recall_at_5 == pytest.approx(m.chance_recall_at_5, abs=0.025)
    assert m.mean_average_precision == pytest.approx(m.chance_mean_average_precision, abs=0.01)


def test_identical_captions_are_one_text_and_every_image_of_the_caption_is_relevant():
    # images 0, 1 captioned "a", image 2 "b", image 3 "c"; the text of "a" scores image 1 first
    images = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]], dtype=float)
    texts_per_image = np.array([[0.8, 0.2, 0], [0.8, 0.2, 0], [0, 0.5, 1], [0, 1, 0.5]], dtype=float)  # b<->c swapped
    m = cross_modal_metrics(images, texts_per_image, captions=["a", "a", "b", "c"])
    t2i = m["text_to_image"]
    assert t2i.queries == 3 and t2i.candidates == 4  # three distinct texts
    assert t2i.recall_at_1 == pytest.approx(1 / 3)  # "a" finds an "a" image first; "b", "c" swapped
    # "a": relevant {0, 1} at ranks 1, 2 -> AP 1; "b": image 2 ranks 2nd (behind 3) -> 1/2; "c" likewise
    assert t2i.mean_average_precision == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert t2i.relevant_per_query == pytest.approx(4 / 3)
    i2t = m["image_to_text"]
    assert i2t.queries == 4 and i2t.candidates == 3
    assert i2t.recall_at_1 == pytest.approx(2 / 4)  # both "a" images find "a"; images 2, 3 do not
    assert "image_to_image" not in m


def test_labels_define_relevance_across_captions():
    # two classes; class 0 has captions "x" and "y", class 1 "z"
    images = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    texts = np.array([[1, 0], [0.9, 0.1], [0, 1], [0, 1]], dtype=float)
    m = cross_modal_metrics(images, texts, captions=["x", "y", "z", "z"], labels=[0, 0, 1, 1])
    t2i, i2t, i2i = m["text_to_image"], m["image_to_text"], m["image_to_image"]
    assert t2i.queries == 3 and t2i.relevant_per_query == 2.0 and t2i.recall_at_1 == 1.0
    assert t2i.mean_average_precision == 1.0
    # image 0's relevant texts are "x" and "y" (both of its class): ranks 1, 2
    assert i2t.relevant_per_query == pytest.approx((2 + 2 + 1 + 1) / 4) and i2t.recall_at_1 == 1.0
    assert i2i.candidates == 3 and i2i.relevant_per_query == 1.0 and i2i.recall_at_1 == 1.0
    assert i2i.chance_recall_at_1 == pytest.approx(1 / 3)


def test_oracle_one_hot_vectors_score_perfectly_with_thirty_images_per_caption():
    classes, per_class = 10, 30
    labels = np.repeat(np.arange(classes), per_class)
    one_hot = np.eye(classes)[labels]
    captions = [f"a handwritten digit {c}" for c in labels]
    for given_labels in (None, labels):
        m = cross_modal_metrics(one_hot, one_hot, captions=captions, labels=given_labels)
        for task in ("text_to_image", "image_to_text"):
            assert m[task].recall_at_1 == 1.0 and m[task].mean_average_precision == 1.0, (task, m[task])
            assert m[task].median_rank == 1.0
        assert m["text_to_image"].queries == classes and m["text_to_image"].relevant_per_query == per_class
        assert m["text_to_image"].chance_recall_at_1 == pytest.approx(0.1)
        assert m["image_to_text"].chance_recall_at_1 == pytest.approx(0.1)
    assert m["image_to_image"].recall_at_1 == 1.0 and m["image_to_image"].mean_average_precision == 1.0


def test_without_captions_each_text_describes_only_its_image_and_keys_group_images():
    images = np.eye(3)
    texts = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=float)  # text 1 and 2 are swapped
    m = cross_modal_metrics(images, texts, image_keys=["a", "b", "a"])
    assert m["text_to_image"].recall_at_1 == pytest.approx(1 / 3)
    assert m["image_to_text"].recall_at_1 == pytest.approx(1 / 3)
    assert m["image_to_image"].queries == 2  # image 1 has no other image with key "b"


def test_a_task_without_a_query_that_has_a_relevant_item_is_not_measured():
    """Every label once (or every scene key once): no image has another relevant image, so image->image has no
    query to measure. It is absent, never a row of zeros that reads as a measured 0.000."""
    assert retrieval_metrics(np.ones((2, 3)), np.zeros((2, 3), dtype=bool)) is None
    images = np.eye(3)
    for groups in ({"labels": [0, 1, 2]}, {"image_keys": ["a", "b", "c"]}):
        m = cross_modal_metrics(images, images, captions=["x", "y", "z"], **groups)
        assert set(m) == {"text_to_image", "image_to_text"}, groups
