"""A second renderer for the same scene descriptions, with the variation the scenes renderer lacks.

The plain renderer always draws filled, anti-aliased shapes near the centre of their grid cell on a muted
gradient. A model trained only on it learns that look, not shapes (zero-shot shape accuracy 0.26 on foreign
drawings). This renderer keeps each scene's captions true (every object stays in the cell its caption names,
a "large" object stays larger than a "small" one, colours stay within their name) and varies everything
else: placement anywhere in the cell (a lone object anywhere in the image, at a free size), any rotation,
plain light, dark, checkered, striped or noisy backgrounds, outlines of several widths, aliased or
anti-aliased edges, colour and noise jitter. Deterministic per scene, like the plain renderer.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from embedsvc.datasets.scenes import COLOURS, POSITIONS, SPLITS, Scene, _draw_shape

_RESAMPLE = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)


def _muted(rgb: np.ndarray) -> np.ndarray:
    """Half way to its own grey, so that a background is never mistaken for an object colour."""
    return 0.5 * rgb + 0.5 * rgb.mean()


def _background(rng: np.random.Generator, big: int) -> np.ndarray:
    """[big, big, 3] float: one of plain light, plain dark, checkered, stripes, gradient, noise."""
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
    style = int(rng.choice(6, p=[0.2, 0.2, 0.2, 0.1, 0.2, 0.1]))
    if style == 0:
        return np.broadcast_to(_muted(rng.uniform(180, 255, 3)), (big, big, 3)).astype(np.float32)
    if style == 1:
        return np.broadcast_to(_muted(rng.uniform(0, 75, 3)), (big, big, 3)).astype(np.float32)
    a, b = (_muted(rng.uniform(40, 220, 3)) for _ in range(2))
    if style == 2:
        period = rng.uniform(big / 16, big / 4)
        pattern = ((xx // period + yy // period) % 2)[..., None]
    elif style == 3:
        period, theta = rng.uniform(big / 20, big / 6), rng.uniform(0, math.pi)
        pattern = (((xx * math.cos(theta) + yy * math.sin(theta)) // period) % 2)[..., None]
    elif style == 4:
        theta = rng.uniform(0, 2 * math.pi)
        pattern = ((xx * math.cos(theta) + yy * math.sin(theta)) / big * 0.7 + 0.5).clip(0, 1)[..., None]
    else:
        coarse = rng.uniform(0, 1, (8, 8)).astype(np.float32)
        pattern = np.asarray(Image.fromarray(coarse).resize((big, big), Image.Resampling.BICUBIC)).clip(0, 1)[..., None]
    return a * (1 - pattern) + b * pattern


def render_augmented(scene: Scene, size: int = 64) -> Image.Image:
    """Draws `scene` so that its captions stay true, with free placement, size, rotation, background,
    outline, aliasing and colour jitter."""
    rng = np.random.default_rng([SPLITS[scene.split], scene.index, 0xA06])
    supersample = int(rng.choice([1, 2, 3]))
    big = size * supersample
    image = Image.fromarray(np.clip(_background(rng, big), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cell = big / 3
    alone = len(scene.objects) == 1
    outline = rng.random() < 0.35
    outline_rgb = tuple(int(c) for c in (rng.uniform(0, 60, 3) if rng.random() < 0.6 else rng.uniform(200, 255, 3)))
    outline_width = int(rng.integers(1, 3 + supersample))
    for obj in scene.objects:
        row, col = divmod(POSITIONS.index(obj.position), 3)
        if alone:  # free size; "small" stays below every "large"
            radius = cell * (rng.uniform(0.18, 0.36) if obj.size == "small" else rng.uniform(0.4, 0.95))
        else:
            radius = cell * (rng.uniform(0.17, 0.3) if obj.size == "small" else rng.uniform(0.36, 0.5))
        # centre anywhere in its cell (the caption names the cell), kept inside the image
        lo, hi = (0.05, 0.95) if alone else (0.2, 0.8)  # neighbours rarely overlap
        cx = (col + rng.uniform(lo, hi)) * cell
        cy = (row + rng.uniform(lo, hi)) * cell
        cx, cy = (float(np.clip(c, radius * 0.9, big - radius * 0.9)) for c in (cx, cy))
        base = np.array(COLOURS[obj.colour], dtype=np.float32)
        rgb = np.clip(base * rng.uniform(0.88, 1.06) + rng.integers(-25, 26, size=3), 0, 255)
        fill = tuple(int(c) for c in rgb)
        angle = rng.uniform(0, 2 * math.pi) if rng.random() < 0.6 else rng.uniform(-0.3, 0.3)
        if outline:  # the same shape, grown by the line width, under the fill
            _draw_shape(draw, obj.shape, cx, cy, radius + outline_width, outline_rgb, angle)
        _draw_shape(draw, obj.shape, cx, cy, radius, fill, angle)
    if supersample > 1:
        image = image.resize((size, size), _RESAMPLE[int(rng.integers(1, len(_RESAMPLE)))])
    noise = rng.uniform(0, 8)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, noise, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
