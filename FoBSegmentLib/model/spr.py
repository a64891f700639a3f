"""SPR: Structure-guided Prompt Refinement (fob_method.md 6), differentiable end to end.

Frames: points are (x, y) pixels of the S x S working image. For sampling features they are mapped
to the normalised frame u = (p + 0.5) / S in (0, 1) and `grid_sample(..., align_corners=False)`
with grid = 2u - 1, the convention in which pixel centres of the image and cell centres of a
stride-s feature map line up. Offsets are predicted in feature-cell units (stride px) and converted
to pixels before use; candidates are clamped to the image.

Unlike the authors' code (D1/D2), the refined points stay tensors, so the point loss L_coor trains
every SPR parameter. Initialisation (6.5): the offset head has zero weights and a bias that puts the
k candidates on a circle of one feature cell, so the first step is the identity plus a symmetric
probe. The candidate-weight head gets a small random init (std 1e-2) instead of zeros: with both
heads at exactly zero the refined point would not depend on any upstream SPR feature, and the graph,
context attention and scale head would receive no gradient until the weights moved.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from FoBSegmentLib.model.heatmaps import gaussian_heatmaps, masked_average_pool


def ring_graph(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(N, N) 0/1 adjacency of a cycle i <-> (i +- 1) mod N, no self-loops."""
    idx = torch.arange(n, device=device)
    a = torch.zeros(n, n, device=device, dtype=dtype)
    a[idx, (idx + 1) % n] = 1.0
    a[idx, (idx - 1) % n] = 1.0
    a.fill_diagonal_(0.0)
    return a


class SPR(nn.Module):
    """Structure propagation graph + context attention + iterative deformable refinement."""

    def __init__(self, dim: int, kappa: int = 3, k_samples: int = 8, heads: int = 1) -> None:
        super().__init__()
        self.dim, self.kappa, self.k = dim, kappa, k_samples
        # Structure propagation graph (code form: row-normalised, gated).
        self.theta = nn.Linear(dim, dim)
        # No bias on phi: it would add a constant per softmax row of A_ada and never get a gradient.
        self.phi = nn.Linear(dim, dim, bias=False)
        self.alpha = nn.Parameter(torch.tensor(0.5))
        self.gate = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.w_g = nn.Linear(dim, dim, bias=False)
        # Context.
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        # Iterative deformable refinement, weights shared across the kappa steps.
        self.offsets = nn.Linear(2 * dim, 2 * k_samples)
        self.scale = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, 1))
        self.weights = nn.Linear(dim, k_samples)
        self.norm3 = nn.LayerNorm(dim)
        nn.init.zeros_(self.offsets.weight)
        ang = torch.arange(k_samples, dtype=torch.float32) * (2 * math.pi / k_samples)
        with torch.no_grad():
            self.offsets.bias.copy_(torch.stack([ang.cos(), ang.sin()], dim=-1).flatten())
        nn.init.normal_(self.weights.weight, std=1e-2)
        nn.init.zeros_(self.weights.bias)

    @staticmethod
    def _sample(fq: torch.Tensor, pts: torch.Tensor, size: int) -> torch.Tensor:
        """Bilinear features at (B, N, K, 2) pixel points -> (B, N, K, d)."""
        grid = (pts + 0.5) / size * 2.0 - 1.0
        # Border padding: points in the outer half cell read the edge features instead of fading to zero.
        out = F.grid_sample(fq, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.permute(0, 2, 3, 1)

    def forward(
        self,
        fq: torch.Tensor,
        coarse: torch.Tensor,
        valid: torch.Tensor | None,
        prototypes: torch.Tensor,
        size: int,
        sigma: float,
    ) -> dict[str, torch.Tensor]:
        """fq (B, d, h, w); coarse (B, N, 2) pixels (treated as constants); prototypes (B, N, d) support.

        Returns 'refined' (B, N, 2) pixel points, differentiable, and 'query_prototypes' (B, N, d).
        """
        b, n, _ = coarse.shape
        d = self.dim
        mu = coarse.detach().to(fq.dtype)
        q = masked_average_pool(fq, gaussian_heatmaps(mu, valid, (size, size), sigma))

        a_ada = torch.softmax(
            self.theta(prototypes) @ self.phi(prototypes).transpose(1, 2) / math.sqrt(d), dim=-1
        )
        alpha = self.alpha.clamp(0.0, 1.0)
        adj = alpha * a_ada + (1.0 - alpha) * ring_graph(n, fq.device, fq.dtype).unsqueeze(0)
        adj = adj / adj.sum(-1, keepdim=True).clamp(min=1e-6)
        q_graph = F.relu(adj @ (torch.sigmoid(self.gate(q)) * self.w_g(q)))

        q1 = self.norm1(q + q_graph)
        f = self.norm2(q1 + self.attn(q1, q1, q1, need_weights=False)[0])

        cell = size / fq.shape[-1]
        for _ in range(self.kappa):
            delta = self.offsets(torch.cat([f, q_graph], dim=-1)).view(b, n, self.k, 2)
            s = 2.0 * torch.sigmoid(self.scale(torch.cat([f, prototypes], dim=-1)))  # (B, N, 1)
            cand = (mu.unsqueeze(2) + s.unsqueeze(-1) * delta * cell).clamp(0.0, size - 1.0)
            w = torch.softmax(self.weights(f), dim=-1)  # (B, N, K)
            v = (w.unsqueeze(-1) * self._sample(fq, cand, size)).sum(2)
            mu = (w.unsqueeze(-1) * cand).sum(2)
            f = self.norm3(f + v)
        return {"refined": mu, "query_prototypes": q}
