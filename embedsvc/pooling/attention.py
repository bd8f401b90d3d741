"""A trained pooling head: attention pooling over frozen token features plus a linear projection.

Patch tokens of a CLS-trained CLIP align poorly with text under fixed poolings; a light head trained
with the contrastive loss on frozen tokens (text side: the frozen native text embedding) shows how much
of that alignment a learned aggregation recovers. The pooling is the pure function `attention_pool`;
`AttentionHead` only holds its learned tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from embedsvc.pooling.functional import l2_normalize


def attention_pool(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    queries: torch.Tensor,
    key_weight: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
) -> torch.Tensor:
    """[B, N, D] -> [B, D_out]: H learned queries attend over keys W_k x (softmax over real tokens);
    the H pooled vectors are concatenated and projected linearly."""
    keys = tokens @ key_weight.T  # [B, N, D]
    logits = torch.einsum("bnd,hd->bhn", keys, queries) / math.sqrt(tokens.shape[-1])
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    pooled = torch.einsum("bhn,bnd->bhd", logits.softmax(dim=-1), tokens)  # [B, H, D]
    return pooled.flatten(1) @ proj_weight.T + proj_bias


class AttentionHead(torch.nn.Module):
    def __init__(self, dim: int, heads: int = 4, out_dim: int | None = None):
        super().__init__()
        out_dim = out_dim or dim
        self.queries = torch.nn.Parameter(torch.randn(heads, dim) * 0.02)
        self.key_weight = torch.nn.Parameter(torch.eye(dim))
        proj = torch.zeros(out_dim, heads * dim)
        for h in range(heads):  # start as the mean of the heads' pooled vectors
            proj[:, h * dim : (h + 1) * dim] = torch.eye(out_dim, dim) / heads
        self.proj_weight = torch.nn.Parameter(proj)
        self.proj_bias = torch.nn.Parameter(torch.zeros(out_dim))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return attention_pool(tokens, mask, self.queries, self.key_weight, self.proj_weight, self.proj_bias)


def train_attention_head(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 400,
    batch_size: int = 256,
    lr: float = 2e-3,
    heads: int = 4,
    seed: int = 0,
) -> AttentionHead:
    """Contrastive training (symmetric InfoNCE) of a head on frozen image tokens against frozen
    target vectors (e.g. the native text embeddings of each image's captions)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = AttentionHead(tokens.shape[-1], heads, targets.shape[-1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    targets = l2_normalize(targets.float())
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        index = torch.from_numpy(rng.choice(len(tokens), size=min(batch_size, len(tokens)), replace=False))
        image = l2_normalize(head(tokens[index], mask[index]))
        logits = head.logit_scale.exp().clamp(max=100) * image @ targets[index].T
        labels = torch.arange(len(index))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()
