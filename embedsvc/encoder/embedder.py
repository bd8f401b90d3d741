"""Embeds mixed batches of texts and images under several poolings with one forward pass per tower."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from embedsvc.encoder.encoder import ClipEncoder
from embedsvc.encoder.images import DEFAULT_MAX_PIXELS, decode_image
from embedsvc.pooling.features import IMAGE, TEXT, TokenFeatures
from embedsvc.pooling.registry import BoundPooling, image_token_modes

Input = str | bytes | Image.Image


@dataclass
class Embedded:
    """The result of one batch: one matrix per pooling, rows in input order."""

    # Per pooling (same order as asked): [B, dim] float32, L2-normalised.
    vectors: list[np.ndarray]
    # Per input: "image" or "text".
    modalities: list[str]
    # Per input: text cut to the context length.
    truncated: list[bool]
    # Per input: its token features (only when asked for).
    features: list[TokenFeatures] | None = None


def modality_of(item: Input) -> str:
    return TEXT if isinstance(item, str) else IMAGE


def embed(
    encoder: ClipEncoder,
    inputs: Sequence[Input],
    poolings: Sequence[BoundPooling],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_features: bool = False,
) -> Embedded:
    """Texts are str, images are encoded bytes (decoded at the model's size, as the server does) or PIL
    images. Every pooling is checked against every
    modality present (and the image token modes against the model) before any forward pass, so a refused
    combination costs no compute. One image pass computes every token mode the poolings read."""
    modalities = [modality_of(item) for item in inputs]
    for pooling in poolings:
        pooling.check_ready()
    for modality in set(modalities):
        for pooling in poolings:
            pooling.check_modality(modality)
    modes = image_token_modes(list(poolings))
    if IMAGE in modalities:
        encoder.check_token_modes(modes)
    dims = [p.output_dim(encoder.loaded.embed_dim) for p in poolings]
    vectors = [np.zeros((len(inputs), dim), dtype=np.float32) for dim in dims]
    truncated = [False] * len(inputs)
    features_out: list = [None] * len(inputs)
    for modality in (TEXT, IMAGE):
        index = [i for i, m in enumerate(modalities) if m == modality]
        if not index:
            continue
        if modality == TEXT:
            features = encoder.encode_texts([item for item in inputs if isinstance(item, str)])  # those at index
        else:
            images = [
                item if isinstance(item, Image.Image) else decode_image(item, max_pixels, encoder.loaded.image_size)
                for item in inputs
                if not isinstance(item, str)
            ]  # those at index
            features = encoder.encode_images(images, modes)
        for out, pooling in zip(vectors, poolings):
            out[index] = pooling(features).cpu().numpy()
        for row, i in enumerate(index):
            truncated[i] = features.truncated[row]
            if keep_features:
                features_out[i] = features.select([row])
    return Embedded(vectors, modalities, truncated, features_out if keep_features else None)
