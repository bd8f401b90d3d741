"""Long runs say how far they are: `compare` while it encodes and pools, `train` while it prepares its data."""

from __future__ import annotations

import torch
from conftest import png_bytes


def test_compare_encodes_in_batches_with_a_progress_line(tiny_encoder, capsys):
    import io

    from PIL import Image

    from embedsvc.jobs.compare import _encode

    images = [
        Image.open(io.BytesIO(png_bytes(size=(40, 32), color=(i % 250, 90, 200 - i % 200)))).convert("RGB")
        for i in range(300)
    ]
    captions = [f"a red circle number {i}" for i in range(300)]
    image_features, text_features = _encode(tiny_encoder, images, captions, ("final",))
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("encoded 512/600 ") for line in lines), lines
    assert lines[-1].startswith("encoded 600/600 ") and "inputs/s" in lines[-1]
    whole_images, whole_texts = tiny_encoder.encode_images(images), tiny_encoder.encode_texts(captions)
    assert torch.allclose(image_features.native, whole_images.native, atol=1e-5)  # batches change nothing
    assert torch.allclose(text_features.native, whole_texts.native, atol=1e-5)


def test_train_prepares_its_data_with_a_progress_line(tiny_encoder, capsys):
    from embedsvc.training.data import scene_pairs

    loaded = tiny_encoder.loaded
    data = scene_pairs("train", 40, loaded.preprocess, loaded.tokenizer, loaded.image_size)
    lines = capsys.readouterr().err.splitlines()
    assert len(data) == 40 and lines[-1].startswith("preparing train scenes 40/40 ") and "images/s" in lines[-1]
