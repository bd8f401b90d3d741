"""The encoder's output: what every pooling reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

IMAGE = "image"
TEXT = "text"
MODALITIES = (IMAGE, TEXT)


@dataclass
class TokenFeatures:
    """Token features of a batch, all in the joint (projected) embedding space, float32.

    Image tokens are patch (or ResNet grid) tokens only: the CLS token is never among them.
    Text tokens span the whole context; `mask` marks SOT..EOT.
    """

    # "image" or "text".
    modality: str
    # [B, N, D] per-token features.
    tokens: torch.Tensor
    # [B, N] bool, True where a token is real (always all-True for images).
    mask: torch.Tensor
    # [B, D] the model's own pooled output, equal to open_clip's encode_image / encode_text.
    native: torch.Tensor
    # (height, width) of the token grid for images; None for text.
    grid: Optional[tuple[int, int]] = None
    # Per input: True when the text was cut to the context length.
    truncated: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        b, n, d = self.tokens.shape
        assert self.mask.shape == (b, n), (self.mask.shape, self.tokens.shape)
        assert self.native.shape == (b, d), (self.native.shape, self.tokens.shape)
        if self.grid is not None:
            assert self.grid[0] * self.grid[1] == n, (self.grid, n)
        if not self.truncated:
            self.truncated = [False] * b

    def select(self, index: list[int]) -> "TokenFeatures":
        """The features of a subset of the batch, in the given order."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.tokens.device)
        return TokenFeatures(self.modality, self.tokens[idx], self.mask[idx], self.native[idx], self.grid,
                             [self.truncated[i] for i in index])
