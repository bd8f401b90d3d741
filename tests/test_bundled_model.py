"""The shipped model `embedsvc-tiny-scenes`: held-out retrieval, zero-shot on foreign drawings, and equality
of `cls` with open_clip on the shipped checkpoint. Loads the checkpoint in the package, not a retrained one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from embedsvc.datasets import COLOURS, SHAPES, full_caption, generate_scene, render_scene
from embedsvc.encoder import ClipEncoder, embed
from embedsvc.eval import cross_modal_metrics
from embedsvc.models import TINY_SCENES, get_model_spec, load_model
from embedsvc.pooling import bind_pooling

HELD_OUT = 1000


@pytest.fixture(scope="module")
def encoder():
    spec = get_model_spec(TINY_SCENES)  # registered from the package's assets
    assert "assets/models" in spec.checkpoint.replace("\\", "/")
    return ClipEncoder(load_model(spec, device="cpu"))


@pytest.fixture(scope="module")
def held_out(encoder):
    scenes = [generate_scene("test", i) for i in range(HELD_OUT)]
    size = encoder.loaded.image_size
    images = [render_scene(s, size) for s in scenes]
    return scenes, images


def test_held_out_recall_with_cls(encoder, held_out):
    scenes, images = held_out
    result = embed(encoder, [full_caption(s) for s in scenes] + images, [bind_pooling("cls")])
    texts, pics = result.vectors[0][:HELD_OUT], result.vectors[0][HELD_OUT:]
    metrics = cross_modal_metrics(pics, texts, captions=[full_caption(s) for s in scenes],
                                  image_keys=[s.object_key() for s in scenes])
    t2i, i2t = metrics["text_to_image"], metrics["image_to_text"]
    print(f"\nheld-out {HELD_OUT}: t2i R@1 {t2i.recall_at_1:.3f} R@10 {t2i.recall_at_10:.3f}; "
          f"i2t R@1 {i2t.recall_at_1:.3f}; i2i mAP {metrics['image_to_image'].mean_average_precision:.3f}")
    assert t2i.recall_at_1 >= 0.80
    assert t2i.recall_at_10 >= 0.98
    assert i2t.recall_at_1 >= 0.80


def test_every_pooling_reports_held_out_recall(encoder, held_out):
    """Figures for the closing note and README; only `cls` carries a target (the others are findings)."""
    from embedsvc.pooling import fit_netvlad

    scenes, images = held_out
    fit_images = [render_scene(generate_scene("train", i), encoder.loaded.image_size) for i in range(300)]
    fit_features = encoder.encode_images(fit_images)
    state = fit_netvlad([(fit_features.tokens, fit_features.mask)], clusters=8, seed=0)
    poolings = [bind_pooling(p, state if p.startswith("netvlad") else None)
                for p in ("cls", "avg", "max", "gem:p=3", "netvlad:clusters=8", "spp")]
    result = embed(encoder, [full_caption(s) for s in scenes] + images, poolings)
    keys = [s.object_key() for s in scenes]
    captions = [full_caption(s) for s in scenes]  # 961 distinct of 1000: identical captions are one text
    lines = []
    for pooling, vectors in zip(poolings, result.vectors):
        m = cross_modal_metrics(vectors[HELD_OUT:], vectors[:HELD_OUT], captions=captions, image_keys=keys)
        t2i, i2t, i2i = m["text_to_image"], m["image_to_text"], m["image_to_image"]
        lines.append(f"| {pooling.name} | {t2i.recall_at_1:.3f} | {t2i.recall_at_10:.3f} | {t2i.median_rank:.0f} | "
                     f"{i2t.recall_at_1:.3f} | {i2i.mean_average_precision:.3f} |")
        assert np.isfinite(vectors).all() and t2i.queries == len(set(captions))
    print("\n| pooling | t2i R@1 | t2i R@10 | t2i median rank | i2t R@1 | i2i mAP |\n|---|---|---|---|---|---|\n"
          + "\n".join(lines))


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


def _polygon_mask(xx, yy, points) -> np.ndarray:
    """Even-odd point-in-polygon test on a pixel grid (works for the non-convex star)."""
    inside = np.zeros(xx.shape, dtype=bool)
    n = len(points)
    for i in range(n):
        (x1, y1), (x2, y2) = points[i], points[(i + 1) % n]
        crosses = ((y1 > yy) != (y2 > yy)) & (xx < (x2 - x1) * (yy - y1) / (y2 - y1 + 1e-12) + x1)
        inside ^= crosses
    return inside


def draw_foreign(shape: str, colour: tuple, rng: np.random.Generator, size: int = 144) -> Image.Image:
    """One shape drawn with numpy (not the scenes renderer): textured or plain light/dark background,
    free placement (not on the 3x3 grid) and a continuous size."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    style = rng.integers(3)
    if style == 0:
        bg = np.stack(np.broadcast_arrays(*(np.full((size, size), c) for c in rng.integers(190, 250, 3))), -1)
    elif style == 1:
        bg = np.stack(np.broadcast_arrays(*(np.full((size, size), c) for c in rng.integers(20, 70, 3))), -1)
    else:
        checker = ((xx // 12 + yy // 12) % 2)[..., None]
        bg = 110 + 40 * checker + np.zeros((1, 1, 3))
    r = rng.uniform(0.12, 0.3) * size
    cx, cy = rng.uniform(r + 4, size - r - 4, 2)
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    elif shape == "square":
        mask = (np.abs(xx - cx) <= r * 0.8) & (np.abs(yy - cy) <= r * 0.8)
    elif shape == "cross":
        w = r * 0.35
        mask = ((np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= w)) | ((np.abs(xx - cx) <= w) & (np.abs(yy - cy) <= r))
    else:
        n, inner, start = {"triangle": (3, None, -math.pi / 2), "hexagon": (6, None, angle),
                           "star": (5, 0.45, -math.pi / 2)}[shape]
        steps = n * 2 if inner else n
        points = [(cx + r * (inner if inner and k % 2 else 1) * math.cos(start + 2 * math.pi * k / steps),
                   cy + r * (inner if inner and k % 2 else 1) * math.sin(start + 2 * math.pi * k / steps))
                  for k in range(steps)]
        mask = _polygon_mask(xx, yy, points)
    pixels = np.where(mask[..., None], np.array(colour, dtype=np.float32), bg)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_zero_shot_on_foreign_drawings(encoder):
    rng = np.random.default_rng(2026)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    prompts = [f"a {c} {s}" for c, s in classes]
    truth, images = [], []
    for _ in range(300):
        k = int(rng.integers(len(classes)))
        colour, shape = classes[k]
        truth.append(k)
        images.append(draw_foreign(shape, COLOURS[colour], rng))
    result = embed(encoder, prompts + images, [bind_pooling("cls")])
    text, pics = result.vectors[0][:len(prompts)], result.vectors[0][len(prompts):]
    predicted = np.argmax(pics @ text.T, axis=1)
    accuracy = float(np.mean(predicted == np.array(truth)))
    colour_acc = float(np.mean([classes[p][0] == classes[t][0] for p, t in zip(predicted, truth)]))
    shape_acc = float(np.mean([classes[p][1] == classes[t][1] for p, t in zip(predicted, truth)]))
    chance = 1 / len(classes)
    print(f"\nzero-shot on {len(truth)} foreign drawings, {len(classes)} classes: accuracy {accuracy:.3f} "
          f"(chance {chance:.3f}); colour {colour_acc:.3f} (chance {1 / len(COLOURS):.2f}), "
          f"shape {shape_acc:.3f} (chance {1 / len(SHAPES):.2f})")
    assert accuracy >= 5 * chance
