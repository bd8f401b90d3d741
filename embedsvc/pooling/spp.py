"""Spatial pyramid pooling over an image's token grid (He et al. 2014), R-MAC-style aggregation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from embedsvc.pooling.functional import l2_normalize


def pyramid_regions(grid: tuple[int, int], levels: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """(row0, row1, col0, col1) of each region, level by level; boundaries as adaptive pooling draws them."""
    h, w = grid
    regions = []
    for level in levels:
        for i in range(level):
            r0, r1 = (i * h) // level, math.ceil((i + 1) * h / level)
            for j in range(level):
                c0, c1 = (j * w) // level, math.ceil((j + 1) * w / level)
                regions.append((r0, r1, c0, c1))
    return regions


def spatial_pyramid(
    tokens: torch.Tensor, grid: tuple[int, int], levels: Sequence[int], region: str = "max", combine: str = "sum"
) -> torch.Tensor:
    """Pools each region of each level (max or avg), L2-normalises each region vector, then sums them
    (D dims, comparable with text) or concatenates them (sum(l^2) * D dims, image->image only)."""
    b, _, d = tokens.shape
    h, w = grid
    spatial = tokens.reshape(b, h, w, d)
    pooled = []
    for r0, r1, c0, c1 in pyramid_regions(grid, levels):
        cell = spatial[:, r0:r1, c0:c1, :].reshape(b, -1, d)
        pooled.append(l2_normalize(cell.amax(dim=1) if region == "max" else cell.mean(dim=1)))
    stacked = torch.stack(pooled, dim=1)  # [B, R, D]
    return stacked.sum(dim=1) if combine == "sum" else stacked.reshape(b, -1)
