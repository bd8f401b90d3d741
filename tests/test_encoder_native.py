"""`cls` must equal open_clip's own encode_image / encode_text; token features must be the documented ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import png_bytes

from embedsvc.encoder import ClipEncoder, embed
from embedsvc.models import load_model, resolve_model_spec
from embedsvc.pooling import bind_pooling

TEXTS = ["a small red circle in the top left", "two objects: a blue star and a green square", "x"]


@pytest.fixture(scope="module")
def rn50(rn50_checkpoint):
    return ClipEncoder(load_model(resolve_model_spec("RN50", checkpoint=str(rn50_checkpoint))))


@pytest.fixture(params=["vit_b32", "rn50"])
def full_size(request):
    return request.getfixturevalue(request.param)


def _reference(encoder: ClipEncoder, pixels: torch.Tensor, texts: list[str]):
    model = encoder.model
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(encoder.loaded.tokenizer(texts)), dim=-1)
    return image.numpy(), text.numpy()


def test_cls_equals_open_clip_encode(full_size):
    encoder = full_size
    rng = np.random.default_rng(0)
    images = [
        png_bytes(
            size=(int(rng.integers(40, 300)), int(rng.integers(40, 300))),
            color=tuple(int(c) for c in rng.integers(0, 255, 3)),
        )
        for _ in range(3)
    ]
    result = embed(encoder, TEXTS + images, [bind_pooling("cls")])
    from embedsvc.encoder import decode_image

    pixels = encoder.preprocess([decode_image(b) for b in images])
    ref_image, ref_text = _reference(encoder, pixels, TEXTS)
    ours = result.vectors[0]
    assert np.abs(ours[3:] - ref_image).max() < 1e-5
    assert np.abs(ours[:3] - ref_text).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_vit_avg_commutes_with_projection(vit_b32):
    """avg of projected patch tokens == mean(ln_post(patch tokens)) @ proj, via open_clip's output_tokens."""
    encoder = vit_b32
    visual = encoder.model.visual
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(pixels)  # ln_post applied, CLS excluded, not projected
    finally:
        visual.output_tokens = False
    expected = F.normalize(tokens.mean(dim=1) @ visual.proj, dim=-1)
    ours = bind_pooling("avg")(encoder.encode_images(pixels))
    assert torch.abs(ours - expected).max().item() < 1e-5


def test_token_shapes_and_masks(full_size):
    encoder = full_size
    features = encoder.encode_images(torch.zeros(1, 3, 224, 224))
    assert features.grid == (7, 7)
    assert features.tokens.shape == (1, 49, encoder.loaded.embed_dim)
    text = encoder.encode_texts(TEXTS)
    tokenizer = encoder.loaded.tokenizer
    expected_lengths = [len(tokenizer.encode(t)) + 2 for t in TEXTS]  # SOT .. EOT
    assert text.mask.sum(dim=1).tolist() == expected_lengths


def test_texts_run_only_the_longest_span(vit_b32):
    """The text forward stops at the longest text's EOT: same native vectors and real-position tokens as
    the full 77-position context, per text alone and in a batch with a longer one."""
    from embedsvc.encoder.encoder import text_forward

    encoder = vit_b32
    ids, _ = encoder.tokenize(TEXTS)
    with torch.inference_mode():
        full_native, full_tokens, full_mask = text_forward(encoder._text, ids)
        batch = encoder.encode_texts(TEXTS)
        alone = encoder.encode_texts(TEXTS[2:])  # "x": SOT x EOT
    longest = int(full_mask.sum(dim=1).max())
    assert ids.shape[1] == 77 and batch.tokens.shape[1] == longest < 20 and alone.tokens.shape[1] == 3
    assert torch.equal(batch.mask, full_mask[:, :longest])
    assert torch.abs(batch.native - full_native).max().item() < 1e-5
    assert torch.abs(alone.native[0] - full_native[2]).max().item() < 1e-5
    for row in range(len(TEXTS)):
        real = full_mask[row]
        assert torch.abs(batch.tokens[row][real[:longest]] - full_tokens[row][real]).max().item() < 1e-5


def test_resnet_tokens_are_maskclip_value_projection(rn50):
    encoder = rn50
    visual = encoder.model.visual
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fmap = visual.forward_intermediates(pixels, intermediates_only=True)["image_intermediates"][-1]
        dense = fmap[0].flatten(1).T  # [49, C]
        expected = visual.attnpool.c_proj(visual.attnpool.v_proj(dense))
    ours = encoder.encode_images(pixels).tokens[0]
    assert torch.abs(ours - expected).max().item() < 1e-4


def test_one_forward_pass_feeds_several_poolings(tiny_encoder):
    calls = {"visual": 0, "text": 0}
    hooks = [
        # the image trunk's first block runs once per pass (token modes only recompute the last block)
        tiny_encoder.model.visual.transformer.resblocks[0].register_forward_hook(
            lambda *a: calls.__setitem__("visual", calls["visual"] + 1)
        ),
        tiny_encoder.model.transformer.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1)),
    ]
    try:
        poolings = [
            bind_pooling(name, text_final_tokens=True)
            for name in ("cls", "avg", "max", "gem:p=2", "spp", "avg:tokens=clearclip", "max:tokens=naclip")
        ]
        result = embed(
            tiny_encoder, ["a red circle", png_bytes(), "a blue square", png_bytes(color=(0, 255, 0))], poolings
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"visual": 1, "text": 1}
    assert [v.shape for v in result.vectors] == [(4, 32)] * 7
    assert result.modalities == ["text", "image", "text", "image"]


def test_long_text_is_truncated_and_flagged(tiny_encoder):
    result = embed(tiny_encoder, ["word " * 200, "short"], [bind_pooling("cls")])
    assert result.truncated == [True, False]


def test_resnet_tiny_from_safetensors(tiny_rn_spec):
    encoder = ClipEncoder(load_model(tiny_rn_spec))
    assert encoder.loaded.vision_tower == "resnet"
    features = encoder.encode_images(torch.randn(2, 3, 64, 64))
    assert features.grid == (2, 2)
    with torch.no_grad():
        ref = encoder.model.encode_image(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
        ours = encoder.encode_images(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))).native
    assert torch.abs(ours - ref).max().item() < 1e-5


def test_text_fit_across_forward_batches_of_different_spans(tiny_spec, tmp_path):
    """FitPooling with texts: the batcher runs them in several forwards, each up to its own longest text; the
    fitted codebook uses every real token (one descriptor each), as with one batch of the full context."""
    from serving import tiny_server

    from embedsvc.client import Client

    texts = [
        "a red circle",
        "blue",
        "a large green triangle on the left of a small yellow square at the top",
        "x",
        "two stars",
    ]
    with tiny_server(tiny_spec, tmp_path / "data", max_batch_size=2) as server, Client(server.address) as client:
        client.create_collection("v", model=tiny_spec.name, pooling="netvlad:clusters=2")
        response = client.fit_pooling("v", texts, params={"seed": "0"})
        tokenizer = server.server.engine.runtime(tiny_spec.name).encoder.loaded.tokenizer
        assert response.descriptors == sum(len(tokenizer.encode(t)) + 2 for t in texts)
