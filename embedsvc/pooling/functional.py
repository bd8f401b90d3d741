"""Pure pooling functions over token features: (tokens [B, N, D], mask [B, N]) -> [B, D].

None of them normalise their output; the registry L2-normalises every pooling's result once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


def l2_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=dim, eps=EPS)


def _all_real(mask: torch.Tensor) -> bool:
    """Image tokens are all real: the masking ops can be skipped (a pooling's cost is its full-size ops)."""
    return bool(mask.all())


def _weights(mask: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask as [B, N, 1] float weights and the per-row token count [B, 1] (at least 1)."""
    w = mask.to(like.dtype).unsqueeze(-1)
    return w, w.sum(dim=1).clamp_min(1.0)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Global average pooling over the real tokens."""
    if _all_real(mask):
        return tokens.mean(dim=1)
    w, count = _weights(mask, tokens)
    return (tokens * w).sum(dim=1) / count


def masked_max(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Global max pooling per dimension over the real tokens."""
    if _all_real(mask):
        return tokens.amax(dim=1)
    return tokens.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)


def signed_power(x: torch.Tensor, p: float) -> torch.Tensor:
    """sign(x)|x|^p; one op where p is an odd integer (x^p keeps the sign), two for an even one."""
    if float(p).is_integer():
        return x.pow(int(p)) if int(p) % 2 else x.sign() * x.pow(int(p))
    return x.sign() * x.abs().pow(p)


def signed_gem(tokens: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """Generalised mean for signed features: m = mean(sign(x)|x|^p), out = sign(m)|m|^(1/p).

    On non-negative features this is GeM (Radenovic et al.) exactly; p=1 is the mean, and growing p
    moves towards the signed value of largest magnitude per dimension. Projected CLIP features are
    signed, so plain x^p (undefined for x<0 and fractional p) cannot be used.

    Computed on each dimension's values divided by their largest magnitude s (so |x/s| <= 1 and no
    power overflows, whatever p and the feature scale), then scaled back: GeM is homogeneous,
    gem(x) = s * gem(x / s). Padding is set to 0 before the power, which p > 0 keeps at 0.
    """
    all_real = _all_real(mask)
    if not all_real:
        tokens = tokens.masked_fill(~mask.unsqueeze(-1), 0)
    scale = tokens.abs().amax(dim=1, keepdim=True)
    powered = signed_power(tokens / scale.clamp_min(torch.finfo(tokens.dtype).tiny), p)
    m = powered.mean(dim=1) if all_real else powered.sum(dim=1) / _weights(mask, tokens)[1]
    return scale.squeeze(1) * m.sign() * m.abs().pow(1.0 / p)
