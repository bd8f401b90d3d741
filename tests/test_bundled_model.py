"""The shipped models `embedsvc-tiny-scenes` (v1) and `embedsvc-tiny-scenes-2` (v2, the default): held-out
retrieval per pooling, zero-shot on foreign drawings, and equality of `cls` with open_clip on the shipped
checkpoints. Loads the checkpoints in the package, not retrained ones. Each model carries its own floors: v1's
patch poolings are findings (they do not retrieve), v2's are what it was trained for."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedsvc.datasets import full_caption, generate_scene, render_scene
from embedsvc.datasets.foreign import foreign_set, prompts_of, zero_shot_scores
from embedsvc.encoder import ClipEncoder, embed
from embedsvc.eval import cross_modal_metrics
from embedsvc.models import DEFAULT_MODEL, TINY_SCENES, TINY_SCENES_2, get_model_spec, load_model
from embedsvc.pooling import bind_pooling

HELD_OUT = 1000
# embedsvc-tiny-scenes.safetensors as shipped in 0.1
V1_SHA256 = "2af07c37de702c4af2072727d897da7804cf4f3557ce067fd8f0be1a215f9bdd"
# Per model, the least text->image R@1 on the held-out scenes per pooling, and the least zero-shot shape accuracy
# on foreign drawings (measured: docs/models.md, "The bundled models").
FLOORS = {
    TINY_SCENES: {"t2i": {"cls": 0.80}, "shape": 0.2},
    TINY_SCENES_2: {
        "t2i": {"cls": 0.88, "avg": 0.6, "max": 0.6, "gem": 0.6, "netvlad": 0.4, "spp": 0.6},
        "shape": 0.35,
    },
}


@pytest.fixture(scope="module", params=list(FLOORS))
def encoder(request):
    spec = get_model_spec(request.param)  # registered from the package's assets
    assert "assets/models" in spec.checkpoint.replace("\\", "/")
    return ClipEncoder(load_model(spec, device="cpu"))


def test_v2_is_the_default_and_v1_keeps_its_weights():
    from embedsvc.service.config import ServerConfig

    assert DEFAULT_MODEL == TINY_SCENES_2 == ServerConfig().default_model == ServerConfig().preload_models
    import hashlib
    from pathlib import Path

    v1 = Path(get_model_spec(TINY_SCENES).checkpoint).read_bytes()  # collections bound to v1 must keep matching
    assert hashlib.sha256(v1).hexdigest() == V1_SHA256


@pytest.fixture(scope="module")
def held_out(encoder):
    scenes = [generate_scene("test", i) for i in range(HELD_OUT)]
    size = encoder.loaded.image_size
    images = [render_scene(s, size) for s in scenes]
    return scenes, images


@pytest.fixture(scope="module")
def held_out_vectors(encoder, held_out):
    """The held-out captions then images embedded once with every pooling (one forward per tower feeds them all;
    NetVLAD fitted on 300 training scenes): (poolings, their vectors), cls first."""
    from embedsvc.pooling import fit_netvlad

    scenes, images = held_out
    fit_images = [render_scene(generate_scene("train", i), encoder.loaded.image_size) for i in range(300)]
    fit_features = encoder.encode_images(fit_images)
    state = fit_netvlad([(fit_features.tokens, fit_features.mask)], clusters=8, seed=0)
    poolings = [
        bind_pooling(p, state if p.startswith("netvlad") else None)
        for p in ("cls", "avg", "max", "gem:p=3", "netvlad:clusters=8", "spp")
    ]
    return poolings, embed(encoder, [full_caption(s) for s in scenes] + images, poolings).vectors


def test_held_out_recall_with_cls(held_out, held_out_vectors, encoder):
    scenes, _ = held_out
    _, vectors = held_out_vectors  # cls first
    texts, pics = vectors[0][:HELD_OUT], vectors[0][HELD_OUT:]
    metrics = cross_modal_metrics(
        pics, texts, captions=[full_caption(s) for s in scenes], image_keys=[s.object_key() for s in scenes]
    )
    t2i, i2t = metrics["text_to_image"], metrics["image_to_text"]
    print(
        f"\nheld-out {HELD_OUT}: t2i R@1 {t2i.recall_at_1:.3f} R@10 {t2i.recall_at_10:.3f}; "
        f"i2t R@1 {i2t.recall_at_1:.3f}; i2i mAP {metrics['image_to_image'].mean_average_precision:.3f}"
    )
    assert t2i.recall_at_1 >= FLOORS[encoder.loaded.spec.name]["t2i"]["cls"]
    assert t2i.recall_at_10 >= 0.98
    assert i2t.recall_at_1 >= 0.80


def test_every_pooling_reports_held_out_recall(encoder, held_out, held_out_vectors):
    """Figures for the closing note and docs/models.md, each pooling held to its model's floor."""
    scenes, _ = held_out
    poolings, all_vectors = held_out_vectors
    keys = [s.object_key() for s in scenes]
    captions = [full_caption(s) for s in scenes]  # 961 distinct of 1000: identical captions are one text
    lines = []
    for pooling, vectors in zip(poolings, all_vectors):
        m = cross_modal_metrics(vectors[HELD_OUT:], vectors[:HELD_OUT], captions=captions, image_keys=keys)
        t2i, i2t, i2i = m["text_to_image"], m["image_to_text"], m["image_to_image"]
        lines.append(
            f"| {pooling.name} | {t2i.recall_at_1:.3f} | {t2i.recall_at_10:.3f} | {t2i.median_rank:.0f} | "
            f"{i2t.recall_at_1:.3f} | {i2i.mean_average_precision:.3f} |"
        )
        assert np.isfinite(vectors).all() and t2i.queries == len(set(captions))
        floor = FLOORS[encoder.loaded.spec.name]["t2i"].get(pooling.name, 0.0)
        assert t2i.recall_at_1 >= floor, f"{pooling.name}: t2i R@1 {t2i.recall_at_1:.3f} under {floor}"
    header = "| pooling | t2i R@1 | t2i R@10 | t2i median rank | i2t R@1 | i2i mAP |\n|---|---|---|---|---|---|\n"
    print(f"\n{encoder.loaded.spec.name}\n{header}" + "\n".join(lines))


def test_cls_equals_open_clip_on_the_shipped_checkpoint(encoder, held_out):
    _, images = held_out
    model = encoder.model
    pixels = encoder.preprocess(images[:8])
    with torch.no_grad():
        ref_image = F.normalize(model.encode_image(pixels), dim=-1)
        ref_text = F.normalize(model.encode_text(encoder.loaded.tokenizer(["a large red star in the center"])), dim=-1)
    assert (bind_pooling("cls")(encoder.encode_images(pixels)) - ref_image).abs().max() < 1e-5
    assert (bind_pooling("cls")(encoder.encode_texts(["a large red star in the center"])) - ref_text).abs().max() < 1e-5


# -- foreign drawings: numpy rasteriser, other backgrounds, sizes and placements ----------------------


def test_zero_shot_on_foreign_drawings(encoder):
    classes, truth, images = foreign_set(300)
    prompts = prompts_of(classes)
    result = embed(encoder, prompts + images, [bind_pooling("cls")])
    text, pics = result.vectors[0][: len(prompts)], result.vectors[0][len(prompts) :]
    z = zero_shot_scores(pics, text, classes, truth)
    print(
        f"\nzero-shot on {len(truth)} foreign drawings, {len(classes)} classes: accuracy {z['accuracy']:.3f} "
        f"(chance {z['chance']:.3f}); colour {z['colour']:.3f} (chance {z['chance_colour']:.2f}), "
        f"shape {z['shape']:.3f} (chance {z['chance_shape']:.2f})"
    )
    assert z["accuracy"] >= 5 * z["chance"]
    assert z["shape"] >= FLOORS[encoder.loaded.spec.name]["shape"]


def test_zero_shot_scores_on_a_known_case():
    """Two classes; drawing 0 predicted right, drawing 1 predicted as class 0 (same colour, wrong shape)."""
    classes = [("red", "circle"), ("red", "star")]
    prompts = np.eye(2)
    pictures = np.array([[1.0, 0.0], [0.9, 0.1]])
    z = zero_shot_scores(pictures, prompts, classes, [0, 1])
    assert (z["accuracy"], z["colour"], z["shape"]) == (0.5, 1.0, 0.5)
