"""Drawings made by code that shares nothing with the scenes renderers, for zero-shot evaluation only.

One shape per image, rasterised with numpy (no PIL drawing): a plain light or dark or a checkered background,
free placement (not on the 3x3 grid), a continuous size and, for hexagons, any rotation. A model that learned
shapes, not one renderer's look, names them; training never draws these."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from embedsvc.datasets.scenes import COLOURS, SHAPES


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
        n, inner, start = {
            "triangle": (3, None, -math.pi / 2),
            "hexagon": (6, None, angle),
            "star": (5, 0.45, -math.pi / 2),
        }[shape]
        steps = n * 2 if inner else n
        points = [
            (
                cx + r * (inner if inner and k % 2 else 1) * math.cos(start + 2 * math.pi * k / steps),
                cy + r * (inner if inner and k % 2 else 1) * math.sin(start + 2 * math.pi * k / steps),
            )
            for k in range(steps)
        ]
        mask = _polygon_mask(xx, yy, points)
    pixels = np.where(mask[..., None], np.array(colour, dtype=np.float32), bg)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def foreign_set(count: int = 300, seed: int = 2026) -> tuple[list[tuple[str, str]], list[int], list[Image.Image]]:
    """(classes as (colour, shape), true class per drawing, drawings): `count` drawings of random classes."""
    rng = np.random.default_rng(seed)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    truth, images = [], []
    for _ in range(count):
        k = int(rng.integers(len(classes)))
        colour, shape = classes[k]
        truth.append(k)
        images.append(draw_foreign(shape, COLOURS[colour], rng))
    return classes, truth, images


def prompts_of(classes: list[tuple[str, str]]) -> list[str]:
    return [f"a {colour} {shape}" for colour, shape in classes]


def zero_shot_scores(
    image_vectors: np.ndarray, prompt_vectors: np.ndarray, classes: list[tuple[str, str]], truth: list[int]
) -> dict:
    """Top-1 over the joint colour+shape prompts, and how often the predicted colour / shape is right."""
    predicted = np.argmax(image_vectors @ prompt_vectors.T, axis=1)
    return {
        "accuracy": float(np.mean(predicted == np.array(truth))),
        "colour": float(np.mean([classes[p][0] == classes[t][0] for p, t in zip(predicted, truth)])),
        "shape": float(np.mean([classes[p][1] == classes[t][1] for p, t in zip(predicted, truth)])),
        "chance": 1 / len(classes),
        "chance_colour": 1 / len(COLOURS),
        "chance_shape": 1 / len(SHAPES),
    }
