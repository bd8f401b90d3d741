"""Token modes (docs/pooling.md) against plain re-implementations of each paper's formula on a random
ViT-B-32, `cls` parity with every mode asked, one trunk for several modes, and refusals through the service."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import png_bytes

from embedsvc.encoder import ClipEncoder, embed
from embedsvc.errors import InvalidPoolingParams, UnsupportedTokenMode
from embedsvc.models import load_model, resolve_model_spec
from embedsvc.pooling import bind_pooling
from embedsvc.pooling.features import TOKEN_MODES

MODES = ("maskclip", "clearclip", "sclip", "naclip")


@pytest.fixture(scope="module")
def pixels(vit_b32):
    from embedsvc.encoder import decode_image

    images = [png_bytes(size=(64, 80), color=(200, 40, 40)), png_bytes(size=(90, 50), color=(30, 160, 220))]
    return vit_b32.preprocess([decode_image(b) for b in images])


# -- the formulas, written out with plain tensors from the model's weights (batch-first, one image at a time) --


def _trunk_and_last(visual, image: torch.Tensor):
    """The last block's input x [L, W] (every block before it run as open_clip runs them) and the last block."""
    x = visual.conv1(image[None]).flatten(2).transpose(1, 2)[0]  # [N, W]
    x = torch.cat([visual.class_embedding[None], x]) + visual.positional_embedding
    x = visual.ln_pre(x)[None]
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x[0], visual.transformer.resblocks[-1]


def _qkv(block, x):
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    h = F.layer_norm(x, x.shape[-1:], block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    width = x.shape[-1]
    q, k, v = (h @ w[i * width : (i + 1) * width].T + b[i * width : (i + 1) * width] for i in range(3))
    heads = block.attn.num_heads
    d = width // heads
    return [t.reshape(-1, heads, d).transpose(0, 1) for t in (q, k, v)], d  # [H, L, d]


def _out(block, a, v):
    """sum over heads of A_h v_h, heads concatenated, through W_o."""
    merged = (a @ v).transpose(0, 1).reshape(v.shape[1], -1)
    return merged @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def _project(visual, y):
    """ln_post, patches only, proj."""
    y = F.layer_norm(y, y.shape[-1:], visual.ln_post.weight, visual.ln_post.bias, visual.ln_post.eps)
    return y[1:] @ visual.proj


def _softmax_self(t, d):
    return torch.softmax(t @ t.transpose(-1, -2) / math.sqrt(d), dim=-1)


def reference(mode: str, visual, image: torch.Tensor) -> torch.Tensor:
    x, block = _trunk_and_last(visual, image)
    (q, k, v), d = _qkv(block, x)
    n = x.shape[0]
    if mode == "maskclip":  # MaskCLIP: the value path, no attention mixing, no residual, no FFN
        y = _out(block, torch.eye(n), v)
    elif mode == "clearclip":  # ClearCLIP: softmax(q q^T / sqrt(d)) v, no residual, no FFN
        y = _out(block, _softmax_self(q, d), v)
    elif mode == "sclip":  # SCLIP: (softmax(q q^T/sqrt d) + softmax(k k^T/sqrt d)) v inside residual + FFN
        y = x + _out(block, _softmax_self(q, d) + _softmax_self(k, d), v)
        y = y + block.mlp(F.layer_norm(y, y.shape[-1:], block.ln_2.weight, block.ln_2.bias, block.ln_2.eps))
    elif mode == "naclip":  # NACLIP: softmax(k k^T/sqrt d + Gaussian(std 5) over patch distance), no residual/FFN
        side = round(math.sqrt(n - 1))
        omega = torch.zeros(n, n)
        for i in range(n - 1):
            for j in range(n - 1):
                di, dj = i // side - j // side, i % side - j % side
                omega[i + 1, j + 1] = math.exp(-(di * di + dj * dj) / (2 * 5.0**2))
        y = _out(block, torch.softmax(k @ k.transpose(-1, -2) / math.sqrt(d) + omega, dim=-1), v)
    else:
        raise AssertionError(mode)
    return _project(visual, y)


@pytest.mark.parametrize("mode", MODES)
def test_mode_matches_its_formula(vit_b32, pixels, mode):
    features = vit_b32.encode_images(pixels, (mode,))
    assert features.mode == mode and features.tokens.shape == (2, 49, 512)
    with torch.no_grad():
        expected = torch.stack([reference(mode, vit_b32.model.visual, image) for image in pixels])
    assert (features.tokens - expected).abs().max() < 1e-4
    # a mode really changes the tokens: it is not `final` in disguise
    assert (features.tokens - vit_b32.encode_images(pixels).tokens).abs().max() > 1e-2


def test_one_pass_gives_every_mode_and_cls_keeps_parity(vit_b32, pixels):
    features = vit_b32.encode_images(pixels, TOKEN_MODES)
    assert features.modes == TOKEN_MODES
    with torch.no_grad():
        ref_native = vit_b32.model.encode_image(pixels)
    assert (features.native - ref_native).abs().max() < 1e-5
    for mode in TOKEN_MODES:  # each mode in a joint pass equals that mode alone
        alone = vit_b32.encode_images(pixels, (mode,))
        assert (features.in_mode(mode).tokens - alone.tokens).abs().max() < 1e-5
        assert (alone.native - ref_native).abs().max() < 1e-5


def test_embed_feeds_poolings_of_different_modes_from_one_call(vit_b32):
    images = [png_bytes(color=(10, 200, 10))]
    specs = ["cls", "avg", "avg:tokens=clearclip", "max:tokens=maskclip", "gem:p=3;tokens=sclip", "spp:tokens=naclip"]
    together = embed(vit_b32, images, [bind_pooling(s) for s in specs]).vectors
    for spec, vector in zip(specs, together):
        assert np.abs(embed(vit_b32, images, [bind_pooling(spec)]).vectors[0] - vector).max() < 1e-5
    assert np.abs(together[2] - together[1]).max() > 1e-3


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(InvalidPoolingParams, match="final, maskclip, clearclip, sclip, naclip"):
        bind_pooling("avg:tokens=bogus")
    with pytest.raises(InvalidPoolingParams, match="unknown parameter"):
        bind_pooling("cls:tokens=clearclip")


def test_modes_refused_where_the_tower_lacks_them(rn50_checkpoint, vit_b32):
    rn50 = ClipEncoder(load_model(resolve_model_spec("RN50", checkpoint=str(rn50_checkpoint))))
    with pytest.raises(UnsupportedTokenMode, match="valid: final"):
        embed(rn50, [png_bytes()], [bind_pooling("avg:tokens=clearclip")])
    with pytest.raises(UnsupportedTokenMode, match="text tower has one token mode, final"):
        embed(vit_b32, ["a red circle"], [bind_pooling("avg:tokens=clearclip")])
    # a collection's pooling pools text queries from the text tower's own tokens
    collection_pooling = bind_pooling("avg:tokens=clearclip", text_final_tokens=True)
    text = embed(vit_b32, ["a red circle"], [collection_pooling]).vectors[0]
    assert np.abs(text - embed(vit_b32, ["a red circle"], [bind_pooling("avg")]).vectors[0]).max() < 1e-6


# -- through the service -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_spec, tiny_rn_spec):
    from serving import tiny_server

    from embedsvc.client import Client
    from embedsvc.models import MODEL_REGISTRY, register_model

    register_model(tiny_rn_spec, replace=True)
    with tiny_server(tiny_spec, tmp_path_factory.mktemp("modes")) as server, Client(server.address, timeout=60) as c:
        yield c
    MODEL_REGISTRY.pop(tiny_rn_spec.name, None)


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown mode", "final, maskclip, clearclip, sclip, naclip"),
        ("mode on RN50-style tower", "valid: final"),
        ("mode on text", "one token mode, final"),
        ("collection with a mode on a ResNet", "valid: final"),
    ],
)
def test_service_refuses_with_invalid_argument(client, tiny_rn_spec, case, message):
    from embedsvc.client import EmbedsvcClientError

    call = {
        "unknown mode": lambda: client.embed([png_bytes()], ["avg:tokens=bogus"]),
        "mode on RN50-style tower": lambda: client.embed(
            [png_bytes()], ["max:tokens=maskclip"], model=tiny_rn_spec.name
        ),
        "mode on text": lambda: client.embed(["a red circle"], ["avg:tokens=clearclip"]),
        "collection with a mode on a ResNet": lambda: client.create_collection(
            "rn-modes", model=tiny_rn_spec.name, pooling="avg:tokens=clearclip"
        ),
    }[case]
    with pytest.raises(EmbedsvcClientError) as err:
        call()
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert message in str(err.value)


def test_service_collection_with_a_mode_is_searched_by_text(client):
    from embedsvc.client import Item

    images = {f"i{k}": png_bytes(color=(60 * k, 90, 200 - 60 * k)) for k in range(4)}
    client.create_collection("clear", pooling="avg:tokens=clearclip")
    client.upsert("clear", [Item(key, image=data) for key, data in images.items()])
    clear = client.embed(list(images.values()), ["avg:tokens=clearclip"]).vectors["avg:tokens=clearclip"]
    final = client.embed(list(images.values()), ["avg"]).vectors["avg"]
    assert client.search("clear", image=images["i2"], top_k=1)[0].id == "i2"
    stored, _ = client.get("clear", ["i2"], include_vectors=True)
    assert np.abs(stored[0].vector - clear[2]).max() < 1e-5
    assert np.abs(clear[2] - final[2]).max() > 1e-3  # not the final tokens
    assert len(client.search("clear", text="a red circle", top_k=4)) == 4  # text queries pool final tokens
