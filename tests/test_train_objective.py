"""`embedsvc train`'s patch-token objective (--token-losses), fine-tuning (--init / --checkpoint) and augmented scenes
(--augment): the loss against a plain computation, option errors, and a short run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from embedsvc.errors import InvalidInput
from embedsvc.training.train import TrainConfig, _loss, _token_pools, contrastive_loss, train

from conftest import TINY_VIT_CONFIG


def _clip_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised rows: the i-th image matches the i-th text."""
    logits = scale * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    target = torch.arange(len(a))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def _text_tokens(model, ids):
    x = model.token_embedding(ids) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask)) @ model.text_projection
    mask = torch.arange(ids.shape[1])[None, :] <= ids.argmax(dim=-1, keepdim=True)
    return x, mask


def test_loss_is_the_sum_of_native_avg_and_max_contrastive_losses(tiny_encoder):
    model = tiny_encoder.model
    torch.manual_seed(0)
    images = torch.randn(6, 3, 32, 32)
    ids = tiny_encoder.loaded.tokenizer([f"a {c} circle" for c in ("red", "blue", "green", "pink", "cyan", "white")])
    with torch.no_grad():
        ours = _loss(model, images, ids, _token_pools("avg,max", model))
        scale = model.logit_scale.exp()
        model.visual.output_tokens = True
        try:
            native, patches = model.visual(images)  # open_clip's own forward: ln_post'ed patches
        finally:
            model.visual.output_tokens = False
        patches = patches @ model.visual.proj
        text, mask = _text_tokens(model, ids)
        text_native = model.encode_text(ids)
        text_avg = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        text_max = text.masked_fill(~mask[..., None], float("-inf")).amax(1)
        expected = (_clip_loss(native, text_native, scale) + _clip_loss(patches.mean(1), text_avg, scale)
                    + _clip_loss(patches.amax(1), text_max, scale))
        native_only = _loss(model, images, ids, {})
    assert abs(float(ours) - float(expected)) < 1e-4
    assert abs(float(native_only) - float(_clip_loss(native, text_native, scale))) < 1e-4



def test_contrastive_loss_matches_open_clip_and_hard_negatives_join_each_images_softmax():
    from open_clip.loss import ClipLoss

    torch.manual_seed(1)
    images, texts, negatives = (F.normalize(torch.randn(n, 8), dim=-1) for n in (5, 5, 3))
    scale = torch.tensor(10.0)
    assert abs(float(contrastive_loss(images, texts, scale)) - float(ClipLoss()(images, texts, scale))) < 1e-5
    i2t = torch.stack([-torch.log_softmax(scale * torch.cat([texts, negatives]) @ images[i], 0)[i] for i in range(5)])
    t2i = torch.stack([-torch.log_softmax(scale * images @ texts[i], 0)[i] for i in range(5)])
    expected = (i2t.mean() + t2i.mean()) / 2
    assert abs(float(contrastive_loss(images, texts, scale, negatives)) - float(expected)) < 1e-5
    # a negative equal to an image's own caption halves that image's probability: the loss rises
    assert contrastive_loss(images, texts, scale, texts[:1]) > contrastive_loss(images, texts, scale)


def test_weighted_token_losses_with_hard_negatives(tiny_encoder):
    model = tiny_encoder.model
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    tokenizer = tiny_encoder.loaded.tokenizer
    ids = tokenizer([f"a {c} circle" for c in ("red", "blue", "green", "pink")])
    negatives = tokenizer([f"a {c} square" for c in ("red", "blue", "green", "pink")])
    pools = _token_pools("avg", model)
    with torch.no_grad():
        native = _loss(model, images, ids, {}, negatives)
        both = _loss(model, images, ids, pools, negatives, token_weight=1.0)
        weighted = _loss(model, images, ids, pools, negatives, token_weight=0.25)
        scale = model.logit_scale.exp()
        image = F.normalize(model.encode_image(images), dim=-1)
        text = F.normalize(model.encode_text(torch.cat([ids, negatives])), dim=-1)
        expected_native = contrastive_loss(image, text[:4], scale, text[4:])
    assert abs(float(native) - float(expected_native)) < 1e-4
    assert abs(float(weighted) - (float(native) + 0.25 * (float(both) - float(native)))) < 1e-4


def test_hard_negative_captions_are_false_and_differ_in_one_object():
    import numpy as np

    from embedsvc.datasets.scenes import (generate_scene, lone_object_captions, negative_captions,
                                          scene_captions)

    rng = np.random.default_rng(0)
    for index in range(200):
        scene = generate_scene("train", index)
        positives = scene_captions(scene) + lone_object_captions(scene)
        negatives = negative_captions(scene, rng)
        assert len(negatives) == len(positives)
        assert not set(negatives) & set(positives)
        changed = [a != b for a, b in zip(positives[0].split(), negatives[0].split())]
        assert sum(changed) == 1  # the full caption: exactly one shape or colour word swapped

@pytest.mark.parametrize("overrides, message", [
    ({"token_losses": "avg,bogus"}, "unknown pooling(s) bogus; choose from avg, max, gem"),
    ({"augment": 1.5}, "--augment is a share"),
    ({"hard_negatives": 1, "data": "missing.csv"}, "--hard-negatives needs --data scenes"),
])
def test_bad_options_are_clear_errors(tmp_path, overrides, message):
    config_file = tmp_path / "mini.json"
    config_file.write_text(json.dumps(TINY_VIT_CONFIG))
    config = TrainConfig(config_file=str(config_file), steps=1, train_size=8, eval_size=8, out_dir=str(tmp_path),
                         device="cpu", **overrides)
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(config)


@pytest.mark.slow  # two training runs (10 s)
def test_fine_tune_with_token_losses_and_augmented_scenes(tmp_path):
    config_file = tmp_path / "mini.json"
    config_file.write_text(json.dumps(TINY_VIT_CONFIG))
    common = ["--data", "scenes", "--train-size", "48", "--eval-size", "16",
              "--batch-size", "16", "--warmup-steps", "1", "--device", "cpu"]
    first = subprocess.run([sys.executable, "-m", "embedsvc", "train", "--config", str(config_file), *common,
                            "--steps", "1", "--out-dir", str(tmp_path / "a")], capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "-m", "embedsvc", "train", *common, "--steps", "3",
                             "--token-losses", "avg,max", "--augment", "0.5",
                             "--checkpoint", str(tmp_path / "a" / "mini.safetensors"),
                             "--out-dir", str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    card = (tmp_path / "b" / "model_card.md").read_text()
    assert "patch-token losses: avg,max" in card and "a/mini.safetensors" in card
    assert "50% drawn by the augmented renderer" in card
