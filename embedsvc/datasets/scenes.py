"""Procedurally generated captioned scenes: 1 to 4 coloured shapes on a 3x3 grid.

Deterministic: scene `i` of split `s` is drawn from a generator seeded with (split code, i), so the
train and test splits never share a seed. Each scene has one *full* caption naming every object with
its size, colour, shape and place (the only correct match for that image among random scenes) and
several other captions (counts, relations, partial descriptions) for training variety.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "pink": (245, 120, 190),
    "cyan": (30, 210, 220),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
SPLITS = {"train": 1, "val": 2, "test": 3}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}

# Backgrounds are muted so that every object colour stays visible on them.
_BACKGROUNDS = [(128, 128, 128), (90, 110, 100), (170, 160, 140), (100, 100, 130), (150, 130, 120), (70, 80, 90)]


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str

    def phrase(self, with_size: bool = True, with_place: bool = True) -> str:
        words = ([self.size] if with_size else []) + [self.colour, self.shape]
        text = " ".join(words)
        text = ("an " if text[0] in "aeiou" else "a ") + text
        if with_place:
            text += " in the " + self.position if self.position != "center" else " in the center"
        return text


@dataclass(frozen=True)
class Scene:
    id: str
    split: str
    index: int
    objects: tuple[SceneObject, ...]
    background: tuple[int, int, int]

    def object_key(self) -> tuple:
        """What 'the same objects' means for image->image relevance: colour-shape pairs, as a multiset."""
        return tuple(sorted((o.colour, o.shape) for o in self.objects))


def _rng(split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([SPLITS[split], index, 0x5CE7E])


def generate_scene(split: str, index: int) -> Scene:
    """The scene description only (no pixels): cheap, deterministic."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}")
    rng = _rng(split, index)
    count = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.2, 0.2]))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    objects = []
    for cell in sorted(cells):
        objects.append(
            SceneObject(
                shape=str(rng.choice(SHAPES)),
                colour=str(rng.choice(list(COLOURS))),
                size=str(rng.choice(SIZES)),
                position=POSITIONS[cell],
            )
        )
    background = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    jitter = rng.integers(-20, 21, size=3)
    red, green, blue = (int(np.clip(c + j, 0, 255)) for c, j in zip(background, jitter))
    return Scene(f"{split}-{index:07d}", split, index, tuple(objects), (red, green, blue))


def render_scene(scene: Scene, size: int = 64, supersample: int = 2) -> Image.Image:
    """Draws the scene: anti-aliased shapes with jittered size and placement, gradient and noise."""
    rng = np.random.default_rng([SPLITS[scene.split], scene.index, 0xD1A])
    big = size * supersample
    gradient = np.linspace(-1.0, 1.0, big)[None, :, None] * rng.uniform(-18, 18)
    if rng.random() < 0.5:
        gradient = gradient.transpose(1, 0, 2)
    base = np.clip(np.array(scene.background, dtype=np.float32)[None, None, :] + gradient, 0, 255)
    image = Image.fromarray(np.broadcast_to(base, (big, big, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cell = big / 3
    for obj in scene.objects:
        row, col = divmod(POSITIONS.index(obj.position), 3)
        radius = cell * (rng.uniform(0.22, 0.28) if obj.size == "small" else rng.uniform(0.38, 0.46))
        cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        rgb = np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-15, 16, size=3), 0, 255)
        _draw_shape(draw, obj.shape, cx, cy, radius, tuple(int(c) for c in rgb), rng.uniform(-0.3, 0.3))
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 4.0, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, angle: float) -> None:
    def polygon(n: int, radius: float, start: float, inner: float | None = None):
        points = []
        steps = n * 2 if inner else n
        for k in range(steps):
            rad = inner if inner and k % 2 else radius
            theta = start + angle + 2 * math.pi * k / steps
            points.append((cx + rad * math.cos(theta), cy + rad * math.sin(theta)))
        return points

    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.polygon(polygon(4, r * 1.15, math.pi / 4), fill=fill)
    elif shape == "triangle":
        draw.polygon(polygon(3, r * 1.15, -math.pi / 2), fill=fill)
    elif shape == "star":
        draw.polygon(polygon(5, r * 1.2, -math.pi / 2, inner=r * 0.5), fill=fill)
    elif shape == "hexagon":
        draw.polygon(polygon(6, r, 0.0), fill=fill)
    elif shape == "cross":
        w = r * 0.38
        c, s = math.cos(angle), math.sin(angle)
        for dx, dy in ((r, w), (w, r)):
            corners = [(-dx, -dy), (dx, -dy), (dx, dy), (-dx, dy)]
            draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def full_caption(scene: Scene) -> str:
    """Every object with size, colour, shape and place, in reading order: the image's unique description."""
    return _join([o.phrase() for o in scene.objects])


_RELATIONS = (
    ("left of", lambda a, b: a[1] < b[1]),
    ("right of", lambda a, b: a[1] > b[1]),
    ("above", lambda a, b: a[0] < b[0]),
    ("below", lambda a, b: a[0] > b[0]),
)


def scene_captions(scene: Scene) -> list[str]:
    """The full caption first, then varied true descriptions of the same scene."""
    objs = scene.objects
    captions = [full_caption(scene)]
    captions.append("a picture of " + full_caption(scene))
    captions.append(_join([o.phrase() for o in reversed(objs)]))
    n = len(objs)
    count = f"{NUMBERS[n]} object{'s' if n > 1 else ''}: " + _join([o.phrase(False, False) for o in objs])
    captions.append(count)
    if n == 1:
        captions.append(objs[0].phrase(with_place=False))
        captions.append(objs[0].phrase(with_size=False))
    places = {o: divmod(POSITIONS.index(o.position), 3) for o in objs}
    for a in objs:
        for b in objs:
            if a is b:
                continue
            for word, holds in _RELATIONS:
                if holds(places[a], places[b]):
                    captions.append(f"{a.phrase(False, False)} {word} {b.phrase(False, False)}")
                    break
    return captions


def lone_object_captions(scene: Scene) -> list[str]:
    """Extra training captions of a one-object scene: its colour and shape alone ("a red circle"), the
    way zero-shot prompts and users name a thing."""
    return [scene.objects[0].phrase(False, False)] if len(scene.objects) == 1 else []


def swapped(scene: Scene, rng: np.random.Generator, shape_share: float = 0.75) -> Scene:
    """The scene with one object's shape (else its colour) changed: what a hard negative caption
    describes, so that a contrastive model must look at that attribute to tell the two apart."""
    objects = list(scene.objects)
    k = int(rng.integers(len(objects)))
    obj = objects[k]
    if rng.random() < shape_share:
        obj = SceneObject(str(rng.choice([s for s in SHAPES if s != obj.shape])), obj.colour, obj.size, obj.position)
    else:
        obj = SceneObject(obj.shape, str(rng.choice([c for c in COLOURS if c != obj.colour])), obj.size, obj.position)
    objects[k] = obj
    return Scene(scene.id, scene.split, scene.index, tuple(objects), scene.background)


def true_captions(scene: Scene) -> set[str]:
    """Every caption of the generators' forms that holds for `scene`: its captions, its lone-object captions,
    and each relation that holds between any two of its objects (`scene_captions` writes only the first
    relation per pair, so "a red star above a blue circle" may hold though only "left of" was written)."""
    truths = set(scene_captions(scene) + lone_object_captions(scene))
    places = {o: divmod(POSITIONS.index(o.position), 3) for o in scene.objects}
    for a in scene.objects:
        for b in scene.objects:
            if a is not b:
                truths.update(
                    f"{a.phrase(False, False)} {word} {b.phrase(False, False)}"
                    for word, holds in _RELATIONS
                    if holds(places[a], places[b])
                )
    return truths


def negative_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Per caption of `scene_captions(scene) + lone_object_captions(scene)`, the same caption of a swapped
    scene (a swap keeps places, so the two lists align); where that caption still holds for the scene (it
    names only untouched objects, or a relation between others), the swapped scene's full caption, which never
    does."""
    truths = true_captions(scene)
    other = swapped(scene, rng)
    candidates = scene_captions(other) + lone_object_captions(other)
    return [candidates[0] if caption in truths else caption for caption in candidates]


def scenes(split: str, count: int, start: int = 0) -> Iterator[Scene]:
    for index in range(start, start + count):
        yield generate_scene(split, index)


def write_scenes(
    out_dir: str | Path, split: str, count: int, start: int = 0, size: int = 64, image_format: str = "png"
) -> Path:
    """Writes images plus manifest.csv (id, path, caption) and manifest.jsonl (with metadata and all
    captions), so that indexing and comparison tools read the scenes like any user data set."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest_csv = out / "manifest.csv"
    with open(manifest_csv, "w", newline="") as fcsv, open(out / "manifest.jsonl", "w") as fjson:
        writer = csv.writer(fcsv)
        writer.writerow(["id", "path", "caption", "colours", "shapes", "count"])
        for scene in scenes(split, count, start):
            rel = f"images/{scene.id}.{image_format}"
            render_scene(scene, size).save(out / rel)
            captions = scene_captions(scene)
            colours = "|".join(o.colour for o in scene.objects)
            shapes = "|".join(o.shape for o in scene.objects)
            writer.writerow([scene.id, rel, captions[0], colours, shapes, len(scene.objects)])
            fjson.write(
                json.dumps(
                    {
                        "id": scene.id,
                        "path": rel,
                        "caption": captions[0],
                        "captions": captions,
                        "objects": [asdict(o) for o in scene.objects],
                    }
                )
                + "\n"
            )
    return manifest_csv
