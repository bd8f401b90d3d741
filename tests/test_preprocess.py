"""The cut image transform (embedsvc.encoder.preprocess): geometry per image as uint8, normalisation per batch,
equal to the model's whole transform; and served/encoded embeddings unchanged by it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from embedsvc.encoder.preprocess import split_transform


def _images():
    rng = np.random.default_rng(0)
    sizes = [(72, 72), (100, 61), (31, 200), (640, 480), (1, 1)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    images.append(Image.fromarray(rng.integers(0, 256, (50, 40), dtype=np.uint8), mode="L"))  # grey: converted
    return images


@pytest.mark.parametrize("model_fixture", ["tiny_encoder", "bundled_encoder"])
def test_cut_transform_equals_the_models_whole_transform(request, model_fixture):
    encoder = request.getfixturevalue(model_fixture)
    split = split_transform(encoder.loaded.preprocess)
    assert split is not None  # open_clip's own transform is cut
    for image in _images():
        whole = encoder.loaded.preprocess(image)
        pixels = split.to_uint8(image)
        assert pixels.dtype == torch.uint8 and pixels.shape == whole.shape
        cut = split.normalize(pixels[None], torch.device("cpu"), torch.float32)[0]
        assert float((cut - whole).abs().max()) < 1e-6


def test_encode_images_gives_the_same_features_from_pil_uint8_and_float(bundled_encoder):
    images = _images()
    from_pil = bundled_encoder.encode_images(images)
    from_float = bundled_encoder.encode_images(bundled_encoder.preprocess(images))
    from_uint8 = bundled_encoder.encode_images(torch.stack([bundled_encoder.prepare(i) for i in images]))
    for other in (from_float, from_uint8):
        assert float((from_pil.native - other.native).abs().max()) < 1e-5
        assert float((from_pil.tokens - other.tokens).abs().max()) < 1e-5


def test_transforms_of_other_shapes_are_not_cut():
    normalize = T.Normalize((0.5,) * 3, (0.5,) * 3)
    assert split_transform(T.Compose([T.Resize(8), T.ToTensor()])) is None  # no Normalize
    assert split_transform(T.Compose([T.ToTensor(), normalize, T.RandomErasing()])) is None  # a step after it
    assert split_transform(T.Compose([T.ToTensor(), T.Lambda(lambda x: x * 2), normalize])) is None
    assert split_transform(lambda image: image) is None  # not a Compose
    cut = split_transform(T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor(), normalize]))
    assert cut is not None and len(cut.geometry) == 2 and cut.mean == (0.5, 0.5, 0.5)
