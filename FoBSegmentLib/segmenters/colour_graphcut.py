"""Graph cut with a colour appearance model and a soft location prior (issue 21, dermoscopy).

GrabCut turns the prompts into hard/probable labels and then trusts only colour. This segmenter
keeps the prompts' location as a term of the energy:

    E(L) = sum_p [ -log P(c_p | L_p) - w_prior log prior_p(L_p) ] + lambda sum_{p~q} exp(-|c_p - c_q|^2 / 2 s^2) [L_p != L_q]

with Gaussian-mixture colour models (CIELAB, k-means clusters) of the object (pixels where the prompts'
`fg_probability` is > 0.5 inside the ring) and of the background (outside the ring's polygon), the
prior `fg_probability` (the polygon interior when none is given), pixels outside the polygon and
around the background prompts sure background, disks around the foreground prompts sure object.
Re-estimated `iterations` times; solved exactly by max-flow (PyMaxflow) on a crop around the ring,
downsampled to `max_side` px like GrabCut.

Frame: prompts (x, y) = (column, row) pixels; images (H, W[, 3]) indexed [row, col].
"""

from __future__ import annotations

import cv2
import numpy as np

from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.segmenters.base import (
    SegmentationResult,
    check_image,
    check_prompts,
    disk_mask,
    keep_seeded_components,
    ring_polygon,
)
from FoBSegmentLib.segmenters.grabcut import roi_box, roi_uint8

_HARD = 1e6


def _gmm_loglik(samples: np.ndarray, data: np.ndarray, components: int) -> np.ndarray:
    """Log-likelihood of every row of `data` under a diagonal Gaussian mixture of `samples` (N, 3):
    k-means clusters (OpenCV, fixed seed) with their own means, variances and weights, as GrabCut
    initialises its GMMs."""
    k = int(max(1, min(components, len(samples) // 50)))
    rng = np.random.default_rng(0)
    if len(samples) > 4000:  # k-means cost is linear in samples; 4000 describe a colour cloud well
        samples = samples[rng.choice(len(samples), 4000, replace=False)]
    samples = np.ascontiguousarray(samples, np.float32)
    cv2.setRNGSeed(0)
    _c, labels, _m = cv2.kmeans(samples, k, None, (cv2.TERM_CRITERIA_COUNT + cv2.TERM_CRITERIA_EPS, 20, 0.5),
                                2, cv2.KMEANS_PP_CENTERS)
    labels = labels.ravel()
    lls = []
    for j in range(k):
        part = samples[labels == j]
        if len(part) < 2:
            continue
        mu, var = part.mean(axis=0), part.var(axis=0) + 4.0  # floor: a few LAB units of noise
        lls.append(-0.5 * (((data - mu) ** 2) / var).sum(1) - 0.5 * np.log(var).sum() + np.log(len(part) / len(samples)))
    ll = np.stack(lls, axis=1)
    top = ll.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(ll - top).sum(axis=1, keepdims=True))).ravel()


class ColourGraphCutSegmenter:
    """Colour-GMM graph cut with a location prior (see the module docstring).

    Options: components (GMM size, default 5), smoothness lambda (default 20), prior_weight
    (default 1), iterations (default 2), margin / max_side / fg_radius / bg_radius as GrabCut's.
    """

    name = "colour-graphcut"

    def __init__(self, components: int = 5, smoothness: float = 20.0, prior_weight: float = 1.0,
                 iterations: int = 2, margin: int = 20, max_side: int = 160, fg_radius: int = 3,
                 bg_radius: int = 2) -> None:
        if iterations < 1 or components < 1 or max_side < 16:
            raise ValueError("colour-graphcut needs iterations >= 1, components >= 1, max_side >= 16")
        self.components, self.smoothness, self.prior_weight = int(components), float(smoothness), float(prior_weight)
        self.iterations, self.margin, self.max_side = int(iterations), int(margin), int(max_side)
        self.fg_radius, self.bg_radius = int(fg_radius), int(bg_radius)

    def segment(self, image: np.ndarray, prompts: PromptSet) -> SegmentationResult:
        """mask (H, W) bool, score = share of the polygon interior kept, logits None."""
        import maxflow

        img = check_image(image)
        height, width = img.shape[:2]
        check_prompts(prompts, height, width)
        ring, inside = ring_polygon(prompts.background, height, width, self.name)
        r0, r1, c0, c1 = roi_box(ring, self.margin, height, width)
        crop = roi_uint8(img, (r0, r1, c0, c1))
        scale = min(1.0, self.max_side / max(crop.shape[:2]))
        h, w = max(2, round(crop.shape[0] * scale)), max(2, round(crop.shape[1] * scale))

        def small(a: np.ndarray, nearest: bool) -> np.ndarray:
            return cv2.resize(a, (w, h), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)

        lab = cv2.cvtColor(small(crop, False), cv2.COLOR_RGB2LAB).astype(np.float32)
        inside_c = small(inside[r0:r1, c0:c1].astype(np.uint8), True) > 0
        shift = np.array([c0, r0], np.float64)
        fg_seed = small(disk_mask(prompts.foreground - shift, self.fg_radius, r1 - r0, c1 - c0).astype(np.uint8),
                        True) > 0
        bg_seed = small(disk_mask(prompts.background - shift, self.bg_radius, r1 - r0, c1 - c0).astype(np.uint8),
                        True) > 0
        if prompts.fg_probability is not None:
            prior = small(np.asarray(prompts.fg_probability, np.float32)[r0:r1, c0:c1], False)
        else:
            prior = inside_c.astype(np.float32)
        prior = np.clip(prior, 0.02, 0.98)
        sure_bg = (~inside_c) | bg_seed
        fg = (prior > 0.5) & inside_c
        if not fg.any():
            fg = inside_c.copy()
        data = lab.reshape(-1, 3)
        # contrast-sensitive Potts weights (GrabCut's beta)
        dx = ((lab[:, 1:] - lab[:, :-1]) ** 2).sum(2)
        dy = ((lab[1:] - lab[:-1]) ** 2).sum(2)
        beta = 1.0 / (2.0 * max(float(np.concatenate([dx.ravel(), dy.ravel()]).mean()), 1e-6))
        wx = np.zeros((h, w), np.float32)
        wy = np.zeros((h, w), np.float32)
        wx[:, :-1] = self.smoothness * np.exp(-beta * dx)
        wy[:-1, :] = self.smoothness * np.exp(-beta * dy)
        right = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0]])
        down = np.array([[0, 0, 0], [0, 0, 0], [0, 1, 0]])
        for _ in range(self.iterations):
            bg_pix = data[(~fg).ravel()]
            fg_pix = data[fg.ravel()]
            if len(fg_pix) < 10 or len(bg_pix) < 10:
                break
            cost_fg = -_gmm_loglik(fg_pix, data, self.components).reshape(h, w) - self.prior_weight * np.log(prior)
            cost_bg = -_gmm_loglik(bg_pix, data, self.components).reshape(h, w) - self.prior_weight * np.log(1 - prior)
            cost_fg[sure_bg] = _HARD
            cost_bg[sure_bg] = 0.0
            cost_bg[fg_seed & inside_c] = _HARD
            cost_fg[fg_seed & inside_c] = 0.0
            lo = np.minimum(cost_fg, cost_bg)
            graph = maxflow.Graph[float]()
            nodes = graph.add_grid_nodes((h, w))
            graph.add_grid_edges(nodes, weights=wx, structure=right, symmetric=True)
            graph.add_grid_edges(nodes, weights=wy, structure=down, symmetric=True)
            graph.add_grid_tedges(nodes, cost_bg - lo, cost_fg - lo)
            graph.maxflow()
            fg = ~graph.get_grid_segments(nodes)
        seeds = fg_seed & inside_c
        fg = keep_seeded_components(fg, seeds if seeds.any() else None)
        score = float(fg[inside_c].mean()) if inside_c.any() else 0.0
        up = cv2.resize(fg.astype(np.float32), (c1 - c0, r1 - r0), interpolation=cv2.INTER_LINEAR) > 0.5
        mask = np.zeros((height, width), bool)
        mask[r0:r1, c0:c1] = up & inside[r0:r1, c0:c1]
        return SegmentationResult(mask=mask, score=score, logits=None)
