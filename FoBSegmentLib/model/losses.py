"""FoB training losses (fob_method.md 8 and 9.7) as plain functions of tensors.

Frames: points (B, N, 2) (x, y) pixels of the S x S working image; maps (B, ..., S, S).
Every loss takes validity masks and averages over valid items only; with nothing valid it returns a
zero that is still attached to the graph (so `total.backward()` never fails on a skipped episode).

    L = L_rac + lambda_heat * L_heat + lambda_coor * L_coor + L_fore   (1e3, 1e-4, pixel units)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _zero_like_graph(*tensors: torch.Tensor) -> torch.Tensor:
    return sum(t.sum() * 0.0 for t in tensors)


def heatmap_loss(
    heatmaps: torch.Tensor, phi: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """0.5 mean((H_hat - H_gt)^2) + 0.5 mean((up(Phi) - H_gt)^2) over valid channels (kind 'mse'),
    or the same two terms as cross-entropies between each channel's spatial softmax and H_gt
    normalised to sum 1 (kind 'softmax').

    heatmaps, target: (B, N, S, S); phi: (B, N, h, w), upsampled bilinearly (align_corners=True, as
    the authors); valid: (B, N) bool. Channel i of both terms targets ground-truth point i.
    """
    size = target.shape[-2:]
    up = F.interpolate(phi, size=size, mode="bilinear", align_corners=True)
    if kind == "softmax":
        dist = target.flatten(2) / target.flatten(2).sum(-1, keepdim=True).clamp_min(1e-12)

        def ce(logits: torch.Tensor) -> torch.Tensor:
            return -(dist * F.log_softmax(logits.flatten(2), dim=-1)).sum(-1)

        per = 0.5 * ce(heatmaps) + 0.5 * ce(up)
    else:
        per = 0.5 * ((heatmaps - target) ** 2).mean(dim=(-2, -1)) + 0.5 * ((up - target) ** 2).mean(dim=(-2, -1))
    v = valid.to(per.dtype)
    if v.sum() == 0:
        return _zero_like_graph(heatmaps, phi)
    return (per * v).sum() / v.sum()


def point_loss(refined: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mean((P'_b - P_gt)^2) over valid points and both coordinates, pixels^2; refined (B, N, 2) differentiable."""
    v = valid.to(refined.dtype)
    if v.sum() == 0:
        return _zero_like_graph(refined)
    sq = ((refined - target.to(refined.dtype)) ** 2).sum(-1)
    return (sq * v).sum() / (2.0 * v.sum())


def foreground_loss(
    prob: torch.Tensor, mask: torch.Tensor, sample_valid: torch.Tensor | None = None, bg_weight: float = 0.1
) -> torch.Tensor:
    """Weighted NLL of the coarse foreground map: prob (B, S, S) in (0, 1), mask (B, S, S) 0/1.

    Weights 0.1 background / 1.0 foreground, normalised by the summed weights as torch's NLLLoss
    does; probabilities clamped to [1e-6, 1 - 1e-6]; sample_valid (B,) drops whole samples.
    """
    p = prob.clamp(1e-6, 1.0 - 1e-6)
    y = (mask > 0.5).to(p.dtype)
    w = bg_weight + (1.0 - bg_weight) * y
    if sample_valid is not None:
        w = w * sample_valid.to(p.dtype)[:, None, None]
    if w.sum() == 0:
        return _zero_like_graph(prob)
    nll = -(y * p.log() + (1.0 - y) * (1.0 - p).log())
    return (w * nll).sum() / w.sum()


def rac_loss(
    fg_prototype: torch.Tensor,
    inner_prototype: torch.Tensor,
    bg_prototypes: torch.Tensor,
    bg_valid: torch.Tensor,
    tau: float = 0.1,
    mode: str = "infonce",
) -> torch.Tensor:
    """Ring-aware contrast between the foreground prototype and the background prompt prototypes.

    fg_prototype, inner_prototype: (B, d); bg_prototypes: (B, N, d); bg_valid: (B, N) bool.
    'infonce': cross-entropy of logits [cos(p_fg, p_inner), cos(p_fg, p_b^1..N)] / tau with target 0
    (positive in the denominator); invalid negatives are left out, samples without any valid
    negative are skipped. 'hinge': the authors' mean_i max(0, 0.5 + cos(p_fg, p_b^i)).
    """
    cos_neg = F.cosine_similarity(fg_prototype.unsqueeze(1), bg_prototypes, dim=-1, eps=1e-6)  # (B, N)
    keep = bg_valid.any(dim=1)
    if not keep.any():
        return _zero_like_graph(fg_prototype, bg_prototypes, inner_prototype)
    if mode == "hinge":
        v = bg_valid.to(cos_neg.dtype)
        return (F.relu(0.5 + cos_neg) * v).sum() / v.sum()
    if mode != "infonce":
        raise ValueError(f"unknown RAC mode {mode!r} (expected 'infonce' or 'hinge')")
    cos_pos = F.cosine_similarity(fg_prototype, inner_prototype, dim=-1, eps=1e-6)  # (B,)
    logits = torch.cat([cos_pos.unsqueeze(1), cos_neg], dim=1) / tau
    logits = logits.masked_fill(torch.cat([torch.zeros_like(keep[:, None]), ~bg_valid], dim=1), float("-inf"))
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    ce = F.cross_entropy(logits[keep], target[keep])
    return ce


def total_loss(
    losses: dict[str, torch.Tensor], lambda_heat: float = 1e3, lambda_coor: float = 1e-4
) -> torch.Tensor:
    """L_rac + lambda_heat L_heat + lambda_coor L_coor + L_fore from a dict with keys rac, heat, coor, fore."""
    return losses["rac"] + lambda_heat * losses["heat"] + lambda_coor * losses["coor"] + losses["fore"]
