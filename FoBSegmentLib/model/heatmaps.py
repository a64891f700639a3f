"""Gaussian point heatmaps and heatmap-weighted masked average pooling (BPPC, SPR query prototypes).

Frames: points are (x, y) = (column, row) pixels of the working image (S x S); heatmaps are
(B, N, S, S) with rows first, as every torch image tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_heatmaps(
    points: torch.Tensor, valid: torch.Tensor | None, size: tuple[int, int], sigma: float = 4.0
) -> torch.Tensor:
    """Render one truncated Gaussian per point, as the authors' `generate_keypoint_heatmaps`.

    points: (B, N, 2) (x, y) pixels; valid: (B, N) bool or None; size: (H, W).
    Returns (B, N, H, W) float, peak 1 at the rounded point (floor(p + 0.5)), exp(-d^2 / (2 sigma^2))
    inside the (6 sigma + 1)^2 square around it, 0 elsewhere; all-zero for invalid points and points
    outside the image. Not differentiable with respect to the points (they are rounded).
    """
    if points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be (B, N, 2), got {tuple(points.shape)}")
    h, w = size
    centre = torch.floor(points.detach().float() + 0.5)
    inside = (
        (centre[..., 0] >= 0) & (centre[..., 0] <= w - 1) & (centre[..., 1] >= 0) & (centre[..., 1] <= h - 1)
    )
    if valid is not None:
        inside = inside & valid.to(inside.device, torch.bool)
    radius = 3.0 * float(sigma)
    xs = torch.arange(w, device=points.device, dtype=torch.float32)
    ys = torch.arange(h, device=points.device, dtype=torch.float32)
    dx = xs.view(1, 1, w) - centre[..., 0:1]
    dy = ys.view(1, 1, h) - centre[..., 1:2]
    # Separable: the 2-D Gaussian is the outer product of two truncated 1-D Gaussians.
    gx = torch.exp(-(dx**2) / (2 * sigma**2)) * (dx.abs() <= radius)
    gy = torch.exp(-(dy**2) / (2 * sigma**2)) * (dy.abs() <= radius)
    gy = gy * inside.unsqueeze(-1)
    return gy.unsqueeze(-1) * gx.unsqueeze(-2)


def pool_weights_to(weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-average (B, N, H, W) weights down to the feature grid `size` (h, w)."""
    if tuple(weights.shape[-2:]) == tuple(size):
        return weights
    return F.adaptive_avg_pool2d(weights, size)


def masked_average_pool(features: torch.Tensor, weights: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Weighted average of feature vectors: sum_uv F(u,v) W_i(u,v) / (sum_uv W_i(u,v) + eps).

    features: (B, C, h, w); weights: (B, N, H, W) at image or feature resolution. The weights are
    area-pooled to (h, w) instead of upsampling F to (H, W) (fob_method.md 4.3, the cheaper
    equivalent; not bit-identical with the authors' upsampling). Returns (B, N, C).
    """
    b, c, h, w = features.shape
    wts = pool_weights_to(weights.to(features.dtype), (h, w)).flatten(2)  # (B, N, hw)
    num = torch.bmm(wts, features.flatten(2).transpose(1, 2))  # (B, N, C)
    den = wts.sum(-1, keepdim=True) + eps
    return num / den
