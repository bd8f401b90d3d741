"""NetVLAD (Arandjelovic et al. 2016) over token features, with its codebook fitted by faiss k-means.

The pooling is the pure function `netvlad`; `NetVLADState` only holds the learned tensors (centroids,
soft-assignment weights, optional PCA-whitening) so they can move between devices, be saved with
safetensors, and later be trained end to end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from embedsvc.errors import InvalidInput, quoted
from embedsvc.pooling.functional import l2_normalize

STATE_FORMAT = "embedsvc.netvlad/1"


def netvlad(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    centroids: torch.Tensor,
    assign_weight: torch.Tensor,
    assign_bias: torch.Tensor,
) -> torch.Tensor:
    """[B, N, D] tokens -> [B, K*D] VLAD, each cluster's residual sum intra-normalised, then L2.

    a_k(x) = softmax_k(w_k . x + b_k) on L2-normalised descriptors x; V_k = sum_i a_k(x_i)(x_i - c_k)
    over real tokens only. The layout is cluster-major: V_0 first, then V_1, ...
    """
    x = l2_normalize(tokens)  # [B, N, D]
    soft = torch.softmax(x @ assign_weight.T + assign_bias, dim=-1)  # [B, N, K]
    soft = soft * mask.to(soft.dtype).unsqueeze(-1)
    # sum_i a_ik x_i - c_k sum_i a_ik
    vlad = soft.transpose(1, 2) @ x - soft.sum(dim=1).unsqueeze(-1) * centroids.unsqueeze(0)  # [B, K, D]
    vlad = l2_normalize(vlad, dim=-1)
    return l2_normalize(vlad.flatten(1))


class NetVLADState(torch.nn.Module):
    """Learned state of a NetVLAD pooling: a codebook and, optionally, a PCA-whitening."""

    # Buffers (register_buffer): declared for type checkers, which see a Module's attributes as Tensor | Module.
    centroids: torch.Tensor
    assign_weight: torch.Tensor
    assign_bias: torch.Tensor
    pca_mean: torch.Tensor | None  # with pca_matrix, or neither
    pca_matrix: torch.Tensor | None

    def __init__(
        self,
        centroids: torch.Tensor,
        alpha: float,
        pca_mean: torch.Tensor | None = None,
        pca_matrix: torch.Tensor | None = None,
    ):
        super().__init__()
        centroids = centroids.float()
        self.alpha = float(alpha)
        self.register_buffer("centroids", centroids)
        # w_k = 2 alpha c_k and b_k = -alpha |c_k|^2: softmax over -alpha |x - c_k|^2 (|x| = 1 drops out).
        self.register_buffer("assign_weight", 2.0 * alpha * centroids)
        self.register_buffer("assign_bias", -alpha * centroids.pow(2).sum(dim=1))
        self.register_buffer("pca_mean", pca_mean.float() if pca_mean is not None else None)
        self.register_buffer("pca_matrix", pca_matrix.float() if pca_matrix is not None else None)

    @property
    def clusters(self) -> int:
        return self.centroids.shape[0]

    @property
    def input_dim(self) -> int:
        return self.centroids.shape[1]

    @property
    def output_dim(self) -> int:
        return self.pca_matrix.shape[0] if self.pca_matrix is not None else self.clusters * self.input_dim

    def vlad(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The VLAD vector before any PCA."""
        return netvlad(
            tokens,
            mask,
            self.centroids.to(tokens.device),
            self.assign_weight.to(tokens.device),
            self.assign_bias.to(tokens.device),
        )

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.input_dim:
            raise InvalidInput(f"NetVLAD codebook is for {self.input_dim}-d tokens, got {tokens.shape[-1]}-d")
        v = self.vlad(tokens, mask)
        if self.pca_matrix is not None and self.pca_mean is not None:
            v = l2_normalize((v - self.pca_mean.to(v.device)) @ self.pca_matrix.to(v.device).T)
        return v

    # -- persistence ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """safetensors bytes: the tensors, with format and alpha in the header's metadata."""
        from safetensors.torch import save

        tensors = {"centroids": self.centroids.contiguous().cpu()}
        if self.pca_matrix is not None and self.pca_mean is not None:
            tensors["pca_mean"] = self.pca_mean.contiguous().cpu()
            tensors["pca_matrix"] = self.pca_matrix.contiguous().cpu()
        return save(tensors, metadata={"format": STATE_FORMAT, "alpha": repr(self.alpha)})

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "NetVLAD state") -> NetVLADState:
        import json
        import struct

        from safetensors.torch import load

        try:
            (header_len,) = struct.unpack("<Q", data[:8])
            meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
            tensors = load(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure means: not a state file
            raise InvalidInput(f"{where} is not a safetensors file ({exc})") from None
        if meta.get("format") != STATE_FORMAT:
            raise InvalidInput(f"{where} is not a NetVLAD state file (format {quoted(meta.get('format'))})")
        return cls(tensors["centroids"], float(meta["alpha"]), tensors.get("pca_mean"), tensors.get("pca_matrix"))

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> NetVLADState:
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"NetVLAD state file {path} does not exist")
        return cls.from_bytes(path.read_bytes(), str(path))


def fit_netvlad(
    token_sets: Iterable[tuple[torch.Tensor, torch.Tensor]],
    clusters: int,
    alpha: float = 0.0,
    pca_dim: int = 0,
    seed: int = 0,
    max_descriptors: int = 200_000,
    kmeans_iters: int = 25,
) -> NetVLADState:
    """Fits a codebook on batches of (tokens [B, N, D], mask [B, N]).

    Centroids: faiss k-means on a seeded sample of L2-normalised descriptors. alpha=0 chooses alpha
    so that, on average, the nearest centroid gets 100x the weight of the second nearest (the paper's
    rule). pca_dim > 0 adds PCA-whitening (eigenvalue power -0.5) trained on the sets' VLAD vectors.
    """
    import faiss

    batches = [(t.detach().float().cpu(), m.detach().cpu()) for t, m in token_sets]
    if not batches:
        raise InvalidInput("NetVLAD fitting needs sample inputs; none were given")
    descriptors = torch.cat([l2_normalize(t)[m] for t, m in batches]).numpy().astype(np.float32)
    n, d = descriptors.shape
    if n < clusters:
        raise InvalidInput(
            f"NetVLAD with {clusters} clusters needs at least {clusters} token descriptors; "
            f"the samples gave {n}: send more samples or fewer clusters"
        )
    rng = np.random.default_rng(seed)
    if n > max_descriptors:
        descriptors = descriptors[rng.choice(n, max_descriptors, replace=False)]
    kmeans = faiss.Kmeans(
        d,
        clusters,
        niter=kmeans_iters,
        seed=seed,
        verbose=False,
        max_points_per_centroid=max(256, math.ceil(len(descriptors) / clusters)),
    )
    kmeans.train(np.ascontiguousarray(descriptors))
    centroids = kmeans.centroids.astype(np.float32)
    if alpha <= 0:
        alpha = _alpha_from_gap(descriptors, centroids)
    state = NetVLADState(torch.from_numpy(centroids), alpha)
    if pca_dim:
        vlads = torch.cat([state.vlad(t, m) for t, m in batches]).numpy().astype(np.float32)
        if pca_dim > min(len(vlads) - 1, vlads.shape[1]):
            raise InvalidInput(
                f"PCA to {pca_dim} dims needs more than {pca_dim} samples and at most "
                f"{vlads.shape[1]} dims; got {len(vlads)} samples"
            )
        pca = faiss.PCAMatrix(vlads.shape[1], pca_dim, -0.5)
        pca.train(vlads)
        matrix = faiss.vector_to_array(pca.A).reshape(pca_dim, vlads.shape[1])  # y = A (x - mean)
        mean = faiss.vector_to_array(pca.mean)
        state = NetVLADState(
            state.centroids, alpha, torch.from_numpy(mean.copy()), torch.from_numpy(np.ascontiguousarray(matrix))
        )
    return state


def _alpha_from_gap(descriptors: np.ndarray, centroids: np.ndarray) -> float:
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    distances, _ = index.search(descriptors[:50_000], 2)
    gap = float(np.mean(distances[:, 1] - distances[:, 0]))
    return math.log(100.0) / max(gap, 1e-6)
