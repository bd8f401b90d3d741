"""Training pairs held in memory as preprocessed tensors, from the scenes generator or a manifest."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from embedsvc.datasets.augment import render_augmented
from embedsvc.datasets.manifest import read_manifest
from embedsvc.datasets.scenes import (
    generate_scene,
    lone_object_captions,
    negative_captions,
    render_scene,
    scene_captions,
    true_captions,
)
from embedsvc.encoder.images import decode_image, split_by_resized_size
from embedsvc.errors import EmbedsvcError, InvalidInput
from embedsvc.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class PairData:
    """N images as one [N, 3, H, W] float tensor and, per image, one or more token-id rows."""

    # Preprocessed images.
    pixels: torch.Tensor
    # Per image: [C_i, context] token ids of its captions; row 0 is the primary (full) caption.
    captions: list[torch.Tensor]
    # Per image: an id.
    ids: list[str]
    # Per image: what image->image relevance compares (scenes: colour-shape multiset); None if unknown.
    keys: list | None = None
    # Inputs that could not be used: (path, reason).
    skipped: list[tuple[str, str]] = field(default_factory=list)
    # Per image: its class label (the manifest's `label` or `class` column), or None when there is none.
    labels: list | None = None
    # Per image: token ids of hard negative captions, row k a false variant of caption k; None: none known.
    negatives: list[torch.Tensor] | None = None
    # With negatives: per image, the ids (into `vocabulary`) of its hard negatives, row by row, and of every
    # caption true of it, so that a negative true of another image in the batch is left out of its softmax.
    negative_ids: list[list[int]] | None = None
    truth_ids: list[set[int]] | None = None
    vocabulary: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def sample_batch(self, rng: np.random.Generator, batch_size: int, primary_share: float) -> Batch:
        """Random images, each with its full caption (with probability `primary_share`) or another one, and
        (when the data has them) that caption's hard negative."""
        index = rng.choice(len(self), size=min(batch_size, len(self)), replace=False)
        rows, picks = [], []
        for i in index:
            options = self.captions[i]
            pick = 0 if len(options) == 1 or rng.random() < primary_share else int(rng.integers(1, len(options)))
            rows.append(options[pick])
            picks.append(pick)
        if self.negatives is None:
            return Batch(self.pixels[index], torch.stack(rows))
        assert self.truth_ids is not None and self.negative_ids is not None  # set with negatives
        negatives = torch.stack([self.negatives[i][pick] for i, pick in zip(index, picks)])
        mask = negative_mask(
            [self.truth_ids[i] for i in index], [self.negative_ids[i][pick] for i, pick in zip(index, picks)]
        )
        return Batch(self.pixels[index], torch.stack(rows), negatives, torch.from_numpy(mask))


@dataclass
class Batch:
    """One training step's pairs: image i matches text i; negatives match no image except where masked."""

    images: torch.Tensor
    texts: torch.Tensor
    # [M, context] token ids of hard negative captions, or None.
    negatives: torch.Tensor | None = None
    # [B, M] bool: True where negative m is true of image b (left out of b's softmax).
    negative_mask: torch.Tensor | None = None

    def to(self, device) -> Batch:
        return Batch(
            self.images.to(device),
            self.texts.to(device),
            None if self.negatives is None else self.negatives.to(device),
            None if self.negative_mask is None else self.negative_mask.to(device),
        )


def negative_mask(truths: list[set], negatives: list) -> np.ndarray:
    """[len(truths), len(negatives)] bool: True where negative m is one of image b's true captions."""
    columns: dict = {}
    for m, negative in enumerate(negatives):
        columns.setdefault(negative, []).append(m)
    mask = np.zeros((len(truths), len(negatives)), dtype=bool)
    for b, truth in enumerate(truths):
        for caption in truth:
            if caption in columns:
                mask[b, columns[caption]] = True
    return mask


def _pixels(images, preprocess: Callable, count: int, what: str) -> torch.Tensor:
    """The images through the model's transform, with a progress line: thousands take minutes."""
    progress = Progress(count, unit="images", label=f"preparing {what} ")
    out = []
    for image in images:
        out.append(preprocess(image))
        progress.update(len(out))
    return torch.stack(out)


def scene_pairs(
    split: str,
    count: int,
    preprocess: Callable,
    tokenizer,
    image_size: int,
    start: int = 0,
    augment: float = 0.0,
    negatives: bool = False,
) -> PairData:
    """`augment`: the share of scenes drawn by the augmented renderer instead of the plain one (the
    choice per scene is a fixed function of its index, so a data set is reproducible). `negatives`: also
    one hard negative per caption (one object's shape or colour swapped), and the lone-object captions."""
    scenes = [generate_scene(split, i) for i in range(start, start + count)]
    chosen = np.random.default_rng([len(split), 0xA06]).random(start + count)[start:] < augment
    pixels = _pixels(
        ((render_augmented if pick else render_scene)(s, image_size) for s, pick in zip(scenes, chosen)),
        preprocess,
        count,
        f"{split} scenes",
    )
    if not negatives:
        captions = [tokenizer(scene_captions(s)) for s in scenes]
        return PairData(pixels, captions, [s.id for s in scenes], [s.object_key() for s in scenes])
    texts = [scene_captions(s) + lone_object_captions(s) for s in scenes]
    false = [negative_captions(s, np.random.default_rng([s.index, 0x4E6])) for s in scenes]
    vocabulary: dict[str, int] = {}

    def ids_of(captions) -> list[int]:
        return [vocabulary.setdefault(c, len(vocabulary)) for c in captions]

    return PairData(
        pixels,
        [tokenizer(t) for t in texts],
        [s.id for s in scenes],
        [s.object_key() for s in scenes],
        negatives=[tokenizer(f) for f in false],
        negative_ids=[ids_of(f) for f in false],
        truth_ids=[set(ids_of(sorted(true_captions(s)))) for s in scenes],
        vocabulary=list(vocabulary),
    )


LABEL_COLUMNS = ("label", "class")


@dataclass
class ManifestImages:
    """A manifest's usable rows, decoded but not yet preprocessed: read before any model is built, so that
    a manifest with nothing usable fails at once."""

    images: list
    captions: list[str]
    ids: list[str]
    # Rows that could not be used: (path, reason).
    skipped: list[tuple[str, str]]
    # Per row: its class label, or None when some usable row has none.
    labels: list | None
    # Per row: its image file.
    sources: list[str] = field(default_factory=list)
    # The model input size the images were decoded for (0: decoded whole).
    short_side: int = 0


def read_manifest_images(manifest: str, short_side: int = 0) -> ManifestImages:
    """Reads every row; a missing or undecodable image, or a row without caption, is reported and skipped.
    Images decode at the size a model of input side `short_side` needs (decode_image). A `label` (else
    `class`) column that every usable row fills becomes the evaluation's class labels."""
    images, captions, ids, skipped, labels, sources = [], [], [], [], [], []
    for row in read_manifest(manifest):
        if not row.caption:
            skipped.append((str(row.path), "no caption"))
            continue
        try:
            data = row.path.read_bytes()
            images.append(decode_image(data, short_side=short_side))
        except FileNotFoundError:
            skipped.append((str(row.path), "file not found"))
            continue
        except (OSError, EmbedsvcError) as exc:
            skipped.append((str(row.path), str(exc)))
            continue
        captions.append(row.caption)
        ids.append(row.id)
        sources.append(str(row.path))
        labels.append(next((row.metadata[c] for c in LABEL_COLUMNS if c in row.metadata), None))
    for path, reason in skipped:
        log.warning("skipped %s: %s", path, reason)
    if not images:
        raise InvalidInput(f"manifest {manifest}: no usable image-caption pairs ({len(skipped)} rows skipped)")
    return ManifestImages(
        images,
        captions,
        ids,
        skipped,
        labels if all(label is not None for label in labels) else None,
        sources,
        short_side,
    )


def manifest_pairs(rows: ManifestImages, preprocess: Callable, tokenizer, short_side: int) -> PairData:
    """The model's tensors for rows read by `read_manifest_images`. An image that the resize (shorter side
    to `short_side`) would blow past the pixel limit is skipped, as the server refuses it."""
    if rows.short_side and rows.short_side < short_side:
        raise InvalidInput(
            f"images were decoded for a {rows.short_side}-pixel input, the model takes {short_side}: "
            f"read the manifest with read_manifest_images(path, {short_side})"
        )
    keep, refused = split_by_resized_size(rows.images, short_side)
    skipped = list(rows.skipped) + [(rows.sources[i], reason) for i, reason in refused.items()]
    for i, reason in refused.items():
        log.warning("skipped %s: %s", rows.sources[i], reason)
    if not keep:
        raise InvalidInput(f"no usable image-caption pairs ({len(skipped)} rows skipped)")
    return PairData(
        _pixels([rows.images[i] for i in keep], preprocess, len(keep), "manifest images"),
        [tokenizer([rows.captions[i]]) for i in keep],
        [rows.ids[i] for i in keep],
        None,
        skipped,
        [rows.labels[i] for i in keep] if rows.labels else None,
    )
