"""`embedsvc train`'s patch-token objective (--token-losses), fine-tuning (--init / --checkpoint) and augmented scenes
(--augment): the loss against a plain computation, option errors, and a short run end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT_CONFIG

from embedsvc.errors import InvalidInput
from embedsvc.training.train import TrainConfig, _loss, _token_pools, contrastive_loss, train


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
        expected = (
            _clip_loss(native, text_native, scale)
            + _clip_loss(patches.mean(1), text_avg, scale)
            + _clip_loss(patches.amax(1), text_max, scale)
        )
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
    from embedsvc.pooling.functional import masked_mean

    model = tiny_encoder.model
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    tokenizer = tiny_encoder.loaded.tokenizer
    ids = tokenizer([f"a {c} circle" for c in ("red", "blue", "green", "pink")])
    negatives = tokenizer([f"a {c} square" for c in ("red", "blue", "green", "pink")])
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1, 2] = True  # negative 2 is true of image 1: out of its softmax
    with torch.no_grad():
        ours = _loss(model, images, ids, _token_pools("avg", model), negatives, 0.25, mask)
        scale = model.logit_scale.exp()
        image = F.normalize(model.encode_image(images), dim=-1)
        text = F.normalize(model.encode_text(torch.cat([ids, negatives])), dim=-1)
        model.visual.output_tokens = True
        try:
            _, patches = model.visual(images)
        finally:
            model.visual.output_tokens = False
        patches = F.normalize((patches @ model.visual.proj).mean(1), dim=-1)
        tokens, token_mask = _text_tokens(model, torch.cat([ids, negatives]))
        text_avg = F.normalize(masked_mean(tokens, token_mask), dim=-1)
        expected = contrastive_loss(image, text[:4], scale, text[4:], mask) + 0.25 * contrastive_loss(
            patches, text_avg[:4], scale, text_avg[4:], mask
        )
    assert abs(float(ours) - float(expected)) < 1e-4


def test_a_masked_negative_leaves_its_images_softmax():
    torch.manual_seed(2)
    images, texts, negatives = (F.normalize(torch.randn(n, 8), dim=-1) for n in (3, 3, 3))
    scale = torch.tensor(10.0)
    mask = torch.tensor([[True, False, False], [False, False, False], [False, False, False]])
    masked = contrastive_loss(images, texts, scale, negatives, mask)
    i2t = torch.stack(
        [
            -torch.log_softmax(scale * torch.cat([texts, negatives[1:] if i == 0 else negatives]) @ images[i], 0)[i]
            for i in range(3)
        ]
    )
    t2i = torch.stack([-torch.log_softmax(scale * images @ texts[i], 0)[i] for i in range(3)])
    assert abs(float(masked) - float((i2t.mean() + t2i.mean()) / 2)) < 1e-5


def test_hard_negative_captions_are_false_and_differ_in_one_object():
    import numpy as np

    from embedsvc.datasets.scenes import (
        generate_scene,
        lone_object_captions,
        negative_captions,
        scene_captions,
        true_captions,
    )

    rng = np.random.default_rng(0)
    for index in range(2000):
        scene = generate_scene("train", index)
        positives = scene_captions(scene) + lone_object_captions(scene)
        negatives = negative_captions(scene, rng)
        assert len(negatives) == len(positives)
        assert not set(negatives) & true_captions(scene)  # every relation that holds counts, not just the written one
        changed = [a != b for a, b in zip(positives[0].split(), negatives[0].split())]
        assert sum(changed) == 1  # the full caption: exactly one shape or colour word swapped


def test_a_relation_that_holds_but_was_not_written_is_true():
    from embedsvc.datasets.scenes import Scene, SceneObject, scene_captions, true_captions

    cross, triangle = SceneObject("cross", "red", "small", "top left"), SceneObject("star", "blue", "small", "right")
    scene = Scene("x", "train", 0, (cross, triangle), (128, 128, 128))
    assert "a red cross above a blue star" not in scene_captions(scene)  # the pair's first relation is "left of"
    assert {
        "a red cross left of a blue star",
        "a red cross above a blue star",
        "a blue star right of a red cross",
        "a blue star below a red cross",
    } <= true_captions(scene)


def test_batches_mask_every_negative_true_of_another_image(tiny_encoder):
    import numpy as np

    from embedsvc.datasets.scenes import generate_scene, true_captions
    from embedsvc.training.data import negative_mask, scene_pairs

    assert negative_mask([{"a", "b"}, {"c"}], ["b", "c", "a", "z"]).tolist() == [
        [True, False, True, False],
        [False, True, False, False],
    ]
    data = scene_pairs("train", 300, tiny_encoder.loaded.preprocess, tiny_encoder.loaded.tokenizer, 32, negatives=True)
    rng = np.random.default_rng(0)
    masked = 0
    for _ in range(5):
        batch = data.sample_batch(rng, 128, 0.3)
        negatives = [data.vocabulary[i] for i in _negative_ids_of(data, batch)]
        index = [data.ids.index(scene_id) for scene_id in _ids_of(data, batch)]
        truths = [true_captions(generate_scene("train", i)) for i in index]
        expected = np.array([[n in t for n in negatives] for t in truths])
        assert (batch.negative_mask.numpy() == expected).all()
        masked += int(expected.sum())
    assert masked > 0  # short negatives ("a red square") are true of other scenes: the case exists


def _ids_of(data, batch):
    """The scene ids of a batch's images (pixels are unique per scene)."""
    flat = data.pixels.flatten(1)
    return [data.ids[int((flat == row.flatten()).all(1).nonzero()[0])] for row in batch.images]


def _negative_ids_of(data, batch):
    ids = _ids_of(data, batch)
    out = []
    for scene_id, tokens in zip(ids, batch.negatives):
        i = data.ids.index(scene_id)
        k = next(k for k, row in enumerate(data.negatives[i]) if torch.equal(row, tokens))
        out.append(data.negative_ids[i][k])
    return out


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"token_losses": "avg,bogus"}, "unknown pooling(s) bogus; choose from avg, max, gem"),
        ({"augment": 1.5}, "--augment is a share"),
        ({"hard_negatives": 1, "data": "missing.csv"}, "--hard-negatives needs --data scenes"),
        ({"hard_negatives": 2}, "--hard-negatives is 0 (off) or 1"),
        ({"token_loss_weight": -1.0}, "--token-loss-weight must be a finite number >= 0"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path, overrides, message):
    config_file = tmp_path / "mini.json"
    config_file.write_text(json.dumps(TINY_VIT_CONFIG))
    config = TrainConfig(
        config_file=str(config_file),
        steps=1,
        train_size=8,
        eval_size=8,
        out_dir=str(tmp_path),
        device="cpu",
        **overrides,
    )
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(config)


@pytest.mark.slow  # two training runs (10 s)
def test_fine_tune_with_token_losses_and_augmented_scenes(tmp_path):
    config_file = tmp_path / "mini.json"
    config_file.write_text(json.dumps(TINY_VIT_CONFIG))
    common = [
        "--data",
        "scenes",
        "--train-size",
        "48",
        "--eval-size",
        "16",
        "--batch-size",
        "16",
        "--warmup-steps",
        "1",
        "--device",
        "cpu",
    ]
    first = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedsvc",
            "train",
            "--config",
            str(config_file),
            *common,
            "--steps",
            "1",
            "--out-dir",
            str(tmp_path / "a"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedsvc",
            "train",
            *common,
            "--steps",
            "3",
            "--token-losses",
            "avg,max",
            "--augment",
            "0.5",
            "--hard-negatives",
            "1",
            "--checkpoint",
            str(tmp_path / "a" / "mini.safetensors"),
            "--out-dir",
            str(tmp_path / "b"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr
    card = (tmp_path / "b" / "model_card.md").read_text()
    assert "patch-token losses: avg,max" in card and "a/mini.safetensors" in card
    assert "50% drawn by the augmented renderer" in card and "hard negatives: one per caption" in card
