"""FoBNet: the FoB prompt generator's network (shared encoder, BPPC, BCM, SPR) as one nn.Module.

This is the trainable part, like segment-anything's `modeling/`; the inference API (numpy in,
PromptSet out), `load` and `save` live on its subclass `FoBPromptGenerator` in predictor.py, and
the checkpoint format in checkpoint.py.

Training (tensors in the S x S working frame, batch B >= 1)::

    gen = FoBPromptGenerator.from_config()   # a FoBNet with the inference API
    out = gen(support_img (B, 3, S, S), support_mask (B, S, S), query_img (B, 3, S, S))
    losses = gen.compute_losses(out, query_mask (B, S, S))   # 'heat', 'coor', 'fore', 'rac', 'total'
    losses["total"].backward()

`forward` returns a dict:
    'heatmaps' H_hat (B, N, S, S); 'phi' Phi (B, N, h, w); 'fg_prob' P_fg (B, S, S) in (0, 1);
    'fg_prob_lowres' (B, h, w); 'cosine' C (B, h, w); 'threshold' t (B,);
    'coarse_points' (B, N, 2) argmax of H_hat, detached; 'bg_confidence' (B, N) heatmap peaks;
    'refined_points' P'_b (B, N, 2), differentiable (SPR); 'query_prototypes' Q (B, N, d);
    'bg_prototypes' P (B, N, d); 'fg_prototype' p_fg (B, d); 'inner_prototype' p_p (B, d);
    'support_points' (B, N, 2) ring of the support, 'support_valid' (B, N) bool;
    'support_mask_valid' (B,) bool (non-empty support masks); 'features_query' F_q (B, d, h, w).
Points are (x, y) = (column, row) pixels of the working frame. Images should be z-scored per image
(use `predictor.normalize_image`); masks are 0/1. Ring points can be passed in
(`support_ring=(points, valid)`, `query_ring=...`) when a data loader computes them in its workers;
otherwise they are computed with `ring_points` (CPU, OpenCV). Invalid rings (empty masks, no band)
are masked out of the losses; an episode with nothing valid gives a zero total that still
backpropagates.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from FoBSegmentLib.model.bcm import BCM, heatmap_argmax
from FoBSegmentLib.model.bppc import batch_ring_points, support_prototypes
from FoBSegmentLib.model.config import FoBConfig
from FoBSegmentLib.model.encoders import build_encoder
from FoBSegmentLib.model.heatmaps import gaussian_heatmaps
from FoBSegmentLib.model.losses import foreground_loss, heatmap_loss, point_loss, rac_loss, total_loss
from FoBSegmentLib.model.spr import SPR


class FoBNet(nn.Module):
    """FoB network: shared encoder, BPPC prototypes, BCM heatmaps, SPR refinement."""

    def __init__(self, config: FoBConfig | None = None, encoder_weights: str | Path | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else FoBConfig()
        c = self.config
        self.encoder = build_encoder(c.encoder, c.feature_dim, encoder_weights)
        self.bcm = BCM(c.feature_dim, c.n_bg, c.heads)
        self.spr = SPR(c.feature_dim, c.kappa, c.k_samples, c.heads)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def coarse_probability(
        self, fq: torch.Tensor, tq: torch.Tensor, fg_prototype: torch.Tensor, size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The coarse foreground map alone (no background heads): (cosine, P_fg at the feature
        resolution, P_fg (B, S, S) in the working frame)."""
        cos, prob = self.bcm.coarse_foreground(fq, fg_prototype, tq)
        prob_up = F.interpolate(prob.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=True)[:, 0]
        return cos, prob, prob_up

    def _query_forward(
        self,
        fq: torch.Tensor,
        tq: torch.Tensor,
        bg_prototypes: torch.Tensor,
        fg_prototype: torch.Tensor,
        size: int,
    ) -> dict[str, torch.Tensor]:
        cos, prob, prob_up = self.coarse_probability(fq, tq, fg_prototype, size)
        out = self.bcm(fq, cos, bg_prototypes, size)
        coarse, peak = heatmap_argmax(out["heatmaps"])
        spr = self.spr(fq, coarse, None, bg_prototypes, size, self.config.sigma)
        return {
            "heatmaps": out["heatmaps"],
            "phi": out["phi"],
            "fg_prob": prob_up,
            "fg_prob_lowres": prob,
            "cosine": cos,
            "threshold": tq,
            "coarse_points": coarse,
            "bg_confidence": peak,
            "refined_points": spr["refined"],
            "query_prototypes": spr["query_prototypes"],
            "features_query": fq,
        }

    def forward(
        self,
        support_img: torch.Tensor,
        support_mask: torch.Tensor,
        query_img: torch.Tensor,
        support_ring: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One batch of episodes in the S x S working frame; see the module docstring for the outputs.

        support_img, query_img: (B, 3, S, S) float, z-scored; support_mask: (B, S, S) 0/1.
        support_ring: optional precomputed ((B, N, 2) points, (B, N) valid) of the support masks.
        """
        if (
            support_img.ndim != 4
            or support_img.shape[1] != 3
            or support_img.shape[-1] != support_img.shape[-2]
        ):
            raise ValueError(f"support_img must be (B, 3, S, S), got {tuple(support_img.shape)}")
        if tuple(query_img.shape) != tuple(support_img.shape):
            raise ValueError(
                f"query_img {tuple(query_img.shape)} must match support_img {tuple(support_img.shape)}"
            )
        b, _, size, _ = support_img.shape
        if tuple(support_mask.shape) != (b, size, size):
            raise ValueError(
                f"support_mask must be (B, S, S) = {(b, size, size)}, got {tuple(support_mask.shape)}"
            )
        if size % self.encoder.stride:
            raise ValueError(
                f"working size {size} must be a multiple of the encoder stride {self.encoder.stride}"
            )
        mask = support_mask.to(support_img.dtype)
        feats, thr = self.encoder(torch.cat([support_img, query_img], dim=0))
        fs, fq = feats[:b], feats[b:]
        tq = thr[b:]
        if support_ring is None:
            pts, valid = batch_ring_points(mask, self.config.n_bg, self.config.k_out, self.config.k_in)
        else:
            pts, valid = (
                support_ring[0].to(mask.device, torch.float32),
                support_ring[1].to(mask.device, torch.bool),
            )
        sp = support_prototypes(fs, mask, pts, valid, self.config.sigma, self.config.erode_inner)
        out = self._query_forward(fq, tq, sp["bg_prototypes"], sp["fg_prototype"], size)
        out.update(
            bg_prototypes=sp["bg_prototypes"],
            fg_prototype=sp["fg_prototype"],
            inner_prototype=sp["inner_prototype"],
            support_points=pts,
            support_valid=valid,
            support_mask_valid=mask.flatten(1).amax(1) > 0.5,
        )
        return out

    def compute_losses(
        self,
        outputs: dict[str, torch.Tensor],
        query_mask: torch.Tensor,
        query_ring: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses of one `forward` output against query_mask (B, S, S) 0/1.

        Returns 'heat', 'coor' (pixels^2, unweighted), 'fore', 'rac' and 'total' = rac +
        lambda_heat heat + lambda_coor coor + fore, plus 'gt_points' (B, N, 2) / 'gt_valid' (B, N).
        Ring channels count only where both the support and the query ring are valid.
        """
        c = self.config
        heat = outputs["heatmaps"]
        b, n, size, _ = heat.shape
        if tuple(query_mask.shape) != (b, size, size):
            raise ValueError(
                f"query_mask must be (B, S, S) = {(b, size, size)}, got {tuple(query_mask.shape)}"
            )
        qm = query_mask.to(heat.device, heat.dtype)
        if query_ring is None:
            gt, gt_valid = batch_ring_points(qm, n, c.k_out, c.k_in)
        else:
            gt, gt_valid = (
                query_ring[0].to(heat.device, torch.float32),
                query_ring[1].to(heat.device, torch.bool),
            )
        valid = gt_valid & outputs["support_valid"]
        target = gaussian_heatmaps(gt, valid, (size, size), c.sigma)
        losses = {
            "heat": heatmap_loss(heat, outputs["phi"], target, valid, c.heat_loss),
            "coor": point_loss(outputs["refined_points"], gt, valid),
            "fore": foreground_loss(
                outputs["fg_prob"], qm, outputs["support_mask_valid"], c.fg_loss_bg_weight
            ),
            "rac": rac_loss(
                outputs["fg_prototype"],
                outputs["inner_prototype"],
                outputs["bg_prototypes"],
                outputs["support_valid"] & outputs["support_mask_valid"][:, None],
                c.tau,
                c.rac,
            ),
        }
        losses["total"] = total_loss(losses, c.lambda_heat, c.lambda_coor)
        losses["gt_points"] = gt
        losses["gt_valid"] = gt_valid
        return losses
