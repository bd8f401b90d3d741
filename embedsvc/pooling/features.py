"""The encoder's output: what every pooling reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal, get_args

import torch

IMAGE = "image"
TEXT = "text"
MODALITIES = (IMAGE, TEXT)

# Token modes: how a ViT's last block computes the patch tokens (docs/pooling.md). `final` is the real
# last block (the only mode of text and ResNet towers); the others recompute it from the same trunk.
FINAL: Final = "final"
# The values of every patch pooling's `tokens` parameter (validated by parse_params like any Literal).
TokenMode = Literal["final", "maskclip", "clearclip", "sclip", "naclip"]
TOKEN_MODES: tuple[TokenMode, ...] = get_args(TokenMode)


@dataclass
class TokenFeatures:
    """Token features of a batch, all in the joint (projected) embedding space, float32.

    Image tokens are patch (or ResNet grid) tokens only: the CLS token is never among them.
    Text tokens span the context up to the batch's longest SOT..EOT (padding past it is never computed);
    `mask` marks each text's SOT..EOT.
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
    grid: tuple[int, int] | None = None
    # Per input: True when the text was cut to the context length.
    truncated: list[bool] = field(default_factory=list)
    # The token mode `tokens` were computed with (see TOKEN_MODES).
    mode: str = FINAL
    # Tokens of the same inputs under other token modes, from the same forward pass: mode -> [B, N, D].
    other_modes: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b, n, d = self.tokens.shape
        assert self.mask.shape == (b, n), (self.mask.shape, self.tokens.shape)
        assert self.native.shape == (b, d), (self.native.shape, self.tokens.shape)
        if self.grid is not None:
            assert self.grid[0] * self.grid[1] == n, (self.grid, n)
        if not self.truncated:
            self.truncated = [False] * b

    @property
    def modes(self) -> tuple[str, ...]:
        return (self.mode, *self.other_modes)

    def in_mode(self, mode: str) -> TokenFeatures:
        """These inputs' features with the tokens of `mode` (which must have been computed)."""
        if mode == self.mode:
            return self
        if mode not in self.other_modes:
            raise KeyError(f"token mode {mode!r} was not computed for these features (have {', '.join(self.modes)})")
        return TokenFeatures(
            self.modality, self.other_modes[mode], self.mask, self.native, self.grid, self.truncated, mode
        )

    def select(self, index: list[int]) -> TokenFeatures:
        """The features of a subset of the batch, in the given order."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.tokens.device)
        return TokenFeatures(
            self.modality,
            self.tokens[idx],
            self.mask[idx],
            self.native[idx],
            self.grid,
            [self.truncated[i] for i in index],
            self.mode,
            {m: t[idx] for m, t in self.other_modes.items()},
        )

    @staticmethod
    def concat(parts: list[TokenFeatures]) -> TokenFeatures:
        """The features of several batches (same modality and modes), rows in order. Text batches run up to
        their own longest text, so shorter ones are padded with masked-out zero tokens."""
        first = parts[0]
        if len(parts) == 1:
            return first
        n = max(p.tokens.shape[1] for p in parts)

        def padded(t: torch.Tensor) -> torch.Tensor:  # [B, N, ...] -> [B, n, ...], zeros (False) appended
            return t if t.shape[1] == n else torch.cat([t, t.new_zeros((t.shape[0], n - t.shape[1], *t.shape[2:]))], 1)

        return TokenFeatures(
            first.modality,
            torch.cat([padded(p.tokens) for p in parts]),
            torch.cat([padded(p.mask) for p in parts]),
            torch.cat([p.native for p in parts]),
            first.grid,
            [t for p in parts for t in p.truncated],
            first.mode,
            {m: torch.cat([padded(p.other_modes[m]) for p in parts]) for m in first.other_modes},
        )
