"""Token modes: other computations of a ViT's last residual attention block, for patch tokens that align
with text (see docs/pooling.md for the formulas and papers).

One trunk pass runs every block but the last; the real last block gives the native embedding and the
`final` tokens, and each other requested mode recomputes only the last block from that block's input.
These are small functions over open_clip's own modules (ResidualAttentionBlock's ln_1 and
nn.MultiheadAttention weights, VisionTransformer's ln_post and proj); nothing here copies model code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from embedsvc.pooling.features import FINAL, TOKEN_MODES


def vit_forward(visual, pixels: torch.Tensor, modes: Iterable[str] = (FINAL,)) -> tuple[torch.Tensor, dict]:
    """(native [B, D], {mode: patch tokens [B, N, D]}) in the joint space, from one trunk pass.

    `native` is what open_clip's VisionTransformer.forward returns (before normalisation)."""
    modes = list(dict.fromkeys(modes))
    transformer = visual.transformer
    x = visual._embeds(pixels)
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in transformer.resblocks[:-1]:
        x = block(x)
    last = transformer.resblocks[-1]
    y = last(x)
    if not transformer.batch_first:
        x, y = x.transpose(0, 1), y.transpose(0, 1)
    pooled, tokens = visual._pool(y)
    if visual.final_ln_after_pool:  # CLIPA: tokens come back before ln_post
        tokens = visual.ln_post(tokens)
    out = {}
    for mode in modes:
        if mode == FINAL:
            out[mode] = tokens @ visual.proj
        else:
            out[mode] = visual.ln_post(LAST_BLOCK[mode](last, x, visual))[:, 1:] @ visual.proj
    return pooled @ visual.proj, out


def _heads(block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, L, d] of the block's attention on ln_1(x), with its own in-projection."""
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    b, n, width = x.shape
    q, k, v = (t.reshape(b, n, attn.num_heads, width // attn.num_heads).transpose(1, 2) for t in (q, k, v))
    return q, k, v


def _attend(block, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The attention branch's output for given weights [B, H, L, L]: heads merged, out_proj, ls_1."""
    b, h, n, d = v.shape
    merged = (weights @ v).transpose(1, 2).reshape(b, n, h * d)
    return block.ls_1(block.attn.out_proj(merged))


def _self_softmax(t: torch.Tensor) -> torch.Tensor:
    return torch.softmax(t @ t.transpose(-1, -2) * t.shape[-1] ** -0.5, dim=-1)


def _maskclip(block, x, visual) -> torch.Tensor:
    """Value path only: out_proj(W_v ln_1(x)); no residual, no FFN."""
    _, _, v = _heads(block, x)
    return _attend(block, torch.eye(v.shape[2], dtype=v.dtype, device=v.device), v)


def _clearclip(block, x, visual) -> torch.Tensor:
    """Self-self (q-q) attention; no residual, no FFN."""
    q, _, v = _heads(block, x)
    return _attend(block, _self_softmax(q), v)


def _sclip(block, x, visual) -> torch.Tensor:
    """Correlative self-attention softmax(qq^T) + softmax(kk^T), inside the block's residual and FFN."""
    q, k, v = _heads(block, x)
    y = x + _attend(block, _self_softmax(q) + _self_softmax(k), v)
    return y + block.ls_2(block.mlp(block.ln_2(y)))


NACLIP_STD = 5.0  # the Gaussian's standard deviation in patches (NACLIP's default)


def neighbourhood_bias(grid: tuple[int, int], std: float = NACLIP_STD, device=None, dtype=None) -> torch.Tensor:
    """[1+N, 1+N] additive attention bias: exp(-|p - p'|^2 / (2 std^2)) between patches at grid positions
    p, p'; 0 in the CLS token's row and column."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=-1).double()
    window = torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * std * std))
    return F.pad(window, (1, 0, 1, 0)).to(device=device, dtype=dtype)


def _naclip(block, x, visual) -> torch.Tensor:
    """Neighbourhood attention softmax(kk^T / sqrt(d) + Gaussian window); no residual, no FFN."""
    _, k, v = _heads(block, x)
    bias = neighbourhood_bias(tuple(visual.grid_size), device=x.device, dtype=x.dtype)
    weights = torch.softmax(k @ k.transpose(-1, -2) * k.shape[-1] ** -0.5 + bias, dim=-1)
    return _attend(block, weights, v)


# mode -> (last block, its input x [B, 1+N, W] batch-first, visual) -> the block's output [B, 1+N, W]
LAST_BLOCK: dict[str, Callable] = {"maskclip": _maskclip, "clearclip": _clearclip, "sclip": _sclip, "naclip": _naclip}

assert set(TOKEN_MODES) == {FINAL, *LAST_BLOCK}, "features.TOKEN_MODES names exactly the modes computed here"


def vit_token_modes(visual) -> tuple[str, ...]:
    """Every mode for a ViT whose last block is open_clip's standard ResidualAttentionBlock (nn.MultiheadAttention
    with a packed in-projection); only `final` otherwise (custom blocks with q/k norms, scaled cosine attention)."""
    from open_clip.transformer import ResidualAttentionBlock

    last = visual.transformer.resblocks[-1]
    standard = (
        type(last) is ResidualAttentionBlock
        and isinstance(last.attn, torch.nn.MultiheadAttention)
        and last.attn.in_proj_weight is not None
    )
    return TOKEN_MODES if standard else (FINAL,)
