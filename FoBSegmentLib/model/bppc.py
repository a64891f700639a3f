"""BPPC: Background Prompt Prototype Construction (fob_method.md 4), batched.

Frames: masks (B, S, S) float/bool in the working image; ring points (B, N, 2) (x, y) pixels of it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from FoBSegmentLib.model.heatmaps import gaussian_heatmaps, masked_average_pool
from FoBSegmentLib.prompts.ring import ring_points


def batch_ring_points(
    masks: torch.Tensor, n_points: int, k_out: int, k_in: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ring_points` for each (S, S) mask of a (B, S, S) batch -> points (B, N, 2) float32, valid (B, N) bool.

    Runs on the CPU (OpenCV contours); the results are moved to the masks' device.
    """
    arr = masks.detach().to("cpu").numpy() > 0.5
    pts = np.zeros((arr.shape[0], n_points, 2), np.float32)
    val = np.zeros((arr.shape[0], n_points), bool)
    for i, m in enumerate(arr):
        p, v = ring_points(m, n_points, k_out, k_in)
        pts[i], val[i] = p, v
    return torch.from_numpy(pts).to(masks.device), torch.from_numpy(val).to(masks.device)


def erode_mask(masks: torch.Tensor, kernel: int) -> torch.Tensor:
    """Square erosion of (B, S, S) float masks in torch (outside the image counts as foreground)."""
    x = masks.unsqueeze(1)
    pad = kernel // 2
    x = F.pad(x, (pad, pad, pad, pad), value=1.0)
    return -F.max_pool2d(-x, kernel, stride=1).squeeze(1)


def support_prototypes(
    features: torch.Tensor,
    masks: torch.Tensor,
    points: torch.Tensor,
    valid: torch.Tensor,
    sigma: float,
    erode_inner: int,
) -> dict[str, torch.Tensor]:
    """Prototypes of the support: features (B, d, h, w), masks (B, S, S), ring points (B, N, 2) + valid (B, N).

    Returns 'bg_prototypes' (B, N, d) = MAP(F, G_i) with Gaussian heatmaps G_i (sigma px) at the ring
    points (zeros for invalid points), 'fg_prototype' (B, d) = MAP(F, M), 'inner_prototype' (B, d) =
    MAP(F, M - erode(M, erode_inner)) (the RAC positive), 'support_heatmaps' (B, N, S, S).
    """
    size = tuple(masks.shape[-2:])
    heat = gaussian_heatmaps(points, valid, size, sigma)
    m = masks.to(features.dtype)
    inner = (m - erode_mask(m, erode_inner)).clamp(min=0.0)
    both = torch.cat([m.unsqueeze(1), inner.unsqueeze(1), heat.to(features.dtype)], dim=1)
    pooled = masked_average_pool(features, both)
    return {
        "bg_prototypes": pooled[:, 2:],
        "fg_prototype": pooled[:, 0],
        "inner_prototype": pooled[:, 1],
        "support_heatmaps": heat,
    }
