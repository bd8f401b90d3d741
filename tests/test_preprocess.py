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


def test_encode_images_gives_the_same_features_from_pil_and_from_the_whole_transform(bundled_encoder):
    images = _images()
    from_pil = bundled_encoder.encode_images(images)  # the cut transform
    from_float = bundled_encoder.encode_images(bundled_encoder.preprocess(images))  # the whole one, per image
    assert float((from_pil.native - from_float.native).abs().max()) < 1e-5
    assert float((from_pil.tokens - from_float.tokens).abs().max()) < 1e-5


def test_served_image_embeddings_equal_open_clips_own(tiny_spec, tmp_path):
    """Through a real server (decode workers cut the transform, the model thread normalises the batch): cls
    equals open_clip's encode_image on its whole transform."""
    import torch.nn.functional as F
    from conftest import png_bytes
    from serving import tiny_server

    from embedsvc.client import Client
    from embedsvc.models import load_model

    files = [png_bytes(size=(40 + 7 * i, 33 + 5 * i), color=(40 * i, 200 - 30 * i, 90)) for i in range(4)]
    loaded = load_model(tiny_spec)
    from embedsvc.encoder.images import decode_image

    with torch.no_grad():
        pixels = torch.stack([loaded.preprocess(decode_image(f)) for f in files])
        expected = F.normalize(loaded.model.encode_image(pixels), dim=-1).numpy()
    with tiny_server(tiny_spec, tmp_path) as server, Client(server.address, timeout=60) as client:
        served = client.embed(files).vectors["cls"]
    assert float(np.abs(served - expected).max()) < 1e-5


def test_an_image_still_not_rgb_after_the_geometry_is_converted():
    split = split_transform(
        T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    )
    grey = Image.fromarray(np.full((20, 30), 77, dtype=np.uint8), mode="L")
    pixels = split.to_uint8(grey)
    assert pixels.shape == (3, 8, 8) and (pixels == 77).all()


def test_transforms_of_other_shapes_are_not_cut():
    normalize = T.Normalize((0.5,) * 3, (0.5,) * 3)
    assert split_transform(T.Compose([T.Resize(8), T.ToTensor()])) is None  # no Normalize
    assert split_transform(T.Compose([T.ToTensor(), normalize, T.RandomErasing()])) is None  # a step after it
    assert split_transform(T.Compose([T.ToTensor(), T.Lambda(lambda x: x * 2), normalize])) is None
    assert split_transform(lambda image: image) is None  # not a Compose
    cut = split_transform(T.Compose([T.Resize(8), T.CenterCrop(8), T.ToTensor(), normalize]))
    assert cut is not None and len(cut.geometry) == 2 and cut.mean == (0.5, 0.5, 0.5)
