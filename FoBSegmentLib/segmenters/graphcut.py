"""Shape-prior graph cut: the weight-free segmenter of `fob segment`'s slice-to-slice propagation.

GrabCut re-learns its colour models from every slice's prompts, so along a chain of slices its idea
of "organ" drifts (a heterogeneous liver collapses onto its seeds, a kidney chain walks into the
spleen). This segmenter instead keeps ONE appearance model, learnt from the annotated slice
(`fit_reference`), and adds a shape prior from the neighbouring slice's mask (`PromptSet.prior_mask`):

    E(L) = sum_p [ A_p(L_p) + S_p(L_p) ] + lambda * sum_{p~q} exp(-(I_p - I_q)^2 / 2 s^2) [L_p != L_q]

A_p: the negative log-likelihood ratio of pixel p's (smoothed intensity, local standard deviation)
under the organ's and its surroundings' joint histograms (the texture channel is what separates the
liver from abdominal-wall muscle of the same T2 brightness). S_p: a penalty per pixel of distance
outside the prior (`grow_weight`, after `grow_tolerance` px) and a small one inside it
(`shrink_weight`: organs shrink fast towards their ends). Pixels farther than `max_grow` px from
the prior are background. Solved exactly by max-flow (PyMaxflow) on a crop around the prior.

Measured on CHAOS MR with the pipeline's chain from one annotated slice (docs/RESULTS.md): every
slice given the TRUE neighbouring mask, 90.0 mean 3D Dice against GrabCut's 89.2; chained, with the
pipeline's stopping rules, 85.1 against GrabCut's 83.3.

A slice with prompts only (edited by hand, FoB prompts) or without a fitted reference goes to
GrabCut (a colour slice: to the colour graph cut, `colour_graphcut.py`, issue 21), which is better there: on the slices of Testing/test_segmenters_quality.py (prompts only)
this graph cut with appearance learnt from the prompts scored 0.877 mean Dice, GrabCut 0.897.
Frame: prompts and masks in (x, y) = (column, row) pixels of the slice; images (H, W) indexed
[row, col]. Colour images are segmented on their luminance.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from FoBSegmentLib.morphology import depth, dilate, disk, distance_to, fill_holes
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.segmenters.base import (
    SegmentationResult,
    check_image,
    check_prompts,
    disk_mask,
    require_ring,
)
from FoBSegmentLib.segmenters.grabcut import GrabCutSegmenter

_HARD = 1e6  # a unary cost no labelling pays
MIN_BAND = 10  # px: the narrowest surroundings ring (`GraphCutSegmenter.band_scale`)


def _grey01(image: np.ndarray) -> np.ndarray:
    """(H, W[, 3]) float -> (H, W) float32 in [0, 1] (luminance for colour, min-max otherwise
    only when the slice is outside [0, 1]: the pipeline's normalised slices pass unchanged, so a
    reference fitted on one slice stays comparable with the next)."""
    img = np.asarray(image, np.float32)
    if img.ndim == 3:
        img = img @ np.array([0.299, 0.587, 0.114], np.float32)
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 1.0:
        img = (img - lo) / max(hi - lo, 1e-6)
    return img


class AppearanceModel:
    """Joint histograms of (Gaussian-smoothed intensity, local standard deviation) inside an organ
    and in a band around it; `log_ratio` scores pixels (> 0: looks like the organ).

    image: (H, W) float32 in [0, 1]; masks (H, W) bool.
    """

    def __init__(self, bins: int = 32, sigma: float = 1.0, texture_sigma: float = 4.0, band: int = 20) -> None:
        self.bins, self.sigma, self.texture_sigma, self.band = int(bins), float(sigma), float(texture_sigma), int(band)
        self.organ: np.ndarray | None = None
        self.surroundings: np.ndarray | None = None

    def features(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Two (H, W) float32 maps in about [0, 1]: smoothed intensity and 4 x local std."""
        img = image.astype(np.float32)
        smooth = cv2.GaussianBlur(img, (0, 0), self.sigma)
        mean = cv2.GaussianBlur(img, (0, 0), self.texture_sigma)
        var = cv2.GaussianBlur(img * img, (0, 0), self.texture_sigma) - mean * mean
        # x4: a local std of 0.25 (strong texture in a [0, 1] slice) fills the histogram's range.
        return smooth, 4.0 * np.sqrt(np.maximum(var, 0.0))

    def _histogram(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        h, _, _ = np.histogram2d(np.clip(a, 0, 1), np.clip(b, 0, 1), bins=self.bins, range=[[0, 1], [0, 1]])
        # Smoothing and a floor keep unseen (intensity, texture) pairs from scoring +-infinity.
        h = ndimage.gaussian_filter(h, 1.0) + 1e-3 * max(1, a.size) / self.bins**2
        return h / h.sum()

    def fit(self, image: np.ndarray, organ: np.ndarray, surroundings: np.ndarray | None = None) -> AppearanceModel:
        """Learn from `organ` pixels and `surroundings` pixels (default: a `band`-px ring around the organ)."""
        if surroundings is None:
            surroundings = self.ring(organ)
        if organ.sum() < 5 or surroundings.sum() < 5:
            raise ValueError("the appearance model needs at least 5 organ and 5 surrounding pixels")
        a, b = self.features(image)
        self.organ = self._histogram(a[organ], b[organ])
        self.surroundings = self._histogram(a[surroundings], b[surroundings])
        return self

    def ring(self, organ: np.ndarray) -> np.ndarray:
        """(H, W) bool: the `band`-px ring around `organ` (H, W) bool, the surroundings by default."""
        return dilate(organ, disk(self.band)) & ~organ

    def log_ratio(self, image: np.ndarray) -> np.ndarray:
        """(H, W) float: log p(features | organ) - log p(features | surroundings)."""
        if self.organ is None or self.surroundings is None:
            raise RuntimeError("AppearanceModel.fit must be called first")
        a, b = self.features(image)
        i = np.clip((a * self.bins).astype(int), 0, self.bins - 1)
        j = np.clip((b * self.bins).astype(int), 0, self.bins - 1)
        return np.log(self.organ[i, j]) - np.log(self.surroundings[i, j])


def _keep_supported(mask: np.ndarray, seeds: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Keep the connected components that hold a seed; without seeds, the one overlapping the prior most."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    ids = np.arange(1, n + 1)
    if seeds.any():
        keep = np.unique(lab[seeds & mask])
        return np.isin(lab, keep[keep > 0])
    overlap = ndimage.sum(prior, lab, ids) + 1e-3 * ndimage.sum(mask, lab, ids)
    return lab == ids[int(np.argmax(overlap))]


class GraphCutSegmenter:
    """Max-flow segmentation with a fixed appearance model and a shape prior (module docstring).

    Options (defaults measured on CHAOS MR / Synapse CT chains, docs/RESULTS.md):
        smoothness: lambda, weight of the contrast-sensitive neighbour term (default 6).
        grow_weight / grow_tolerance: cost per px beyond `grow_tolerance` px outside the prior mask
            (default 1.0 / 1 px); shrink_weight: the same inside it, after the same tolerance (0.05).
        max_grow: pixels farther than this from the prior mask are background (default 20).
        seed_radius: radius of the hard foreground/background disks around the prompts (default 2).
        bins / sigma / texture_sigma: the appearance model (32 bins, 1 px, 4 px).
        band_scale / band: the surroundings the appearance model learns from are a ring around the
            annotated organ, `band_scale` x the organ's equivalent radius wide (sqrt(area / pi) of one
            annotated slice), at least `MIN_BAND` and at most `band` px (defaults 2 and 40). A chain
            walks up to `max_grow` px a slice, so over an organ's extent it reaches structures well
            beyond a fixed 20 px ring (a left kidney's chain into the spleen): the ring grows with
            the organ. band_scale 0 = a fixed `band`-px ring.
        prob_weight: weight of FoB's coarse probability (`PromptSet.fg_probability`, chained FoB) in
            the data term: its clipped log-odds are added to the appearance log-ratio (default 1;
            prompts without a probability are unaffected).
    """

    name = "graphcut"
    uses_prior_mask = True

    def __init__(
        self,
        smoothness: float = 6.0,
        grow_weight: float = 1.0,
        grow_tolerance: float = 1.0,
        shrink_weight: float = 0.05,
        max_grow: int = 20,
        seed_radius: int = 2,
        bins: int = 32,
        sigma: float = 1.0,
        texture_sigma: float = 4.0,
        band: int = 40,
        band_scale: float = 2.0,
        prob_weight: float = 1.0,
    ) -> None:
        for key, value in (("smoothness", smoothness), ("grow_weight", grow_weight), ("shrink_weight", shrink_weight),
                           ("grow_tolerance", grow_tolerance), ("prob_weight", prob_weight),
                           ("band_scale", band_scale)):
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"graphcut {key} must be a finite number >= 0, got {value}")
        if max_grow < 1 or seed_radius < 0 or bins < 4 or band < 1 or sigma <= 0 or texture_sigma <= 0:
            raise ValueError("graphcut needs max_grow >= 1, seed_radius >= 0, bins >= 4, band >= 1 and sigmas > 0")
        self.smoothness = float(smoothness)
        self.grow_weight = float(grow_weight)
        self.grow_tolerance = float(grow_tolerance)
        self.shrink_weight = float(shrink_weight)
        self.max_grow = int(max_grow)
        self.seed_radius = int(seed_radius)
        self.prob_weight = float(prob_weight)
        self.band, self.band_scale = int(band), float(band_scale)
        self._model_args = {"bins": int(bins), "sigma": float(sigma), "texture_sigma": float(texture_sigma)}
        self.reference: AppearanceModel | None = None
        # (H, W) bool: the organ may only lie here (None: anywhere); set per slice by the chain
        # between two annotated slices (`propagation.neighbour.gap_step`).
        self.reach: np.ndarray | None = None
        self.fallback = GrabCutSegmenter()
        # issue 21: a colour slice with prompts only goes to the colour-GMM graph cut, which beat GrabCut
        # on held-out dermoscopy (docs/RESULTS.md, "Dermoscopy (issue 21)").
        from FoBSegmentLib.segmenters.colour_graphcut import ColourGraphCutSegmenter

        self.colour_fallback = ColourGraphCutSegmenter()

    def fit_reference(self, image: np.ndarray, mask: np.ndarray, slices: int = 1,
                      exclude: np.ndarray | None = None) -> None:
        """Learn the organ's appearance from annotated slices: image (H, W[, 3]) and mask (H, W) bool,
        `slices` annotated slices side by side (the organ's size per slice sets the surroundings'
        ring, `band_scale`). exclude: (H, W) bool, pixels of the mask learnt as surroundings, not
        organ (`outliers`). Every later `segment` call scores pixels with it (until `clear_reference`)."""
        img = _grey01(check_image(image))
        m = np.asarray(mask, bool)
        if m.shape != img.shape:
            raise ValueError(f"reference mask has shape {m.shape}, the image is {img.shape}")
        model = AppearanceModel(band=self.surroundings_band(m.sum() / max(1, int(slices))), **self._model_args)
        if exclude is None:
            self.reference = model.fit(img, m)
            return
        exclude = np.asarray(exclude, bool)
        if exclude.shape != m.shape:
            raise ValueError(f"exclude mask has shape {exclude.shape}, the image is {img.shape}")
        self.reference = model.fit(img, m & ~exclude, model.ring(m) | (m & exclude))

    def outliers(self, image: np.ndarray, mask: np.ndarray, k: float) -> np.ndarray:
        """(H, W) bool: the pixels of `mask` whose smoothed intensity (the appearance model's first
        feature) lies more than k robust standard deviations (1.4826 x the median absolute deviation)
        from the mask's median. image (H, W[, 3]), mask (H, W) bool."""
        smooth = cv2.GaussianBlur(_grey01(check_image(image)), (0, 0), self._model_args["sigma"])
        m = np.asarray(mask, bool)
        if not m.any():
            return m.copy()
        inside = smooth[m]
        median = float(np.median(inside))
        spread = 1.4826 * float(np.median(np.abs(inside - median))) + 1e-3
        return m & (np.abs(smooth - median) > k * spread)

    def surroundings_band(self, area: float) -> int:
        """Width in px of the ring the appearance model learns the surroundings from, for an organ of
        `area` px on a slice (`band_scale`)."""
        if self.band_scale <= 0:
            return self.band
        return int(np.clip(self.band_scale * np.sqrt(area / np.pi), min(MIN_BAND, self.band), self.band))

    def clear_reference(self) -> None:
        self.reference = None

    def segment(self, image: np.ndarray, prompts: PromptSet) -> SegmentationResult:
        """Segment one slice: image (H, W) or (H, W, 3) float, prompts in (x, y) pixels.

        With a prior mask and a fitted reference: mask (H, W) bool (holes filled), score = fraction
        of the mask whose appearance favours the organ (log-ratio > 0), logits = the appearance
        log-ratio map (H, W) float32. Otherwise GrabCut's result.
        """
        img = _grey01(check_image(image))
        height, width = img.shape
        check_prompts(prompts, height, width)
        prior = prompts.prior_mask
        if prior is None or not prior.any() or self.reference is None:
            # Checked here, not left to the fallback: its error would name grabcut, which the user never chose.
            require_ring(prompts.background, self.name)
            if np.asarray(image).ndim == 3:
                return self.colour_fallback.segment(image, prompts)
            return self.fallback.segment(image, prompts)
        seeds_fg = disk_mask(prompts.foreground, self.seed_radius, height, width)
        seeds_bg = disk_mask(prompts.background, self.seed_radius, height, width)
        # px to the prior, 0 inside it; exact on the crop below (within max_grow + 2 px of the prior)
        outside = distance_to(prior, self.max_grow + 1)
        allowed = outside <= self.max_grow
        if self.reach is not None and (allowed & self.reach).any():
            allowed &= self.reach
        seeds_fg &= allowed
        rows, cols = np.nonzero(allowed)
        r0, r1 = max(0, rows.min() - 2), min(height, rows.max() + 3)
        c0, c1 = max(0, cols.min() - 2), min(width, cols.max() + 3)
        crop = img[r0:r1, c0:c1]
        ratio = self.reference.log_ratio(crop)
        prob = prompts.fg_probability
        if prob is not None and self.prob_weight > 0:
            # FoB's coarse map as a second likelihood: log-odds, clipped so that one confident pixel
            # cannot outweigh the shape prior and the contrast term on its own.
            p = np.clip(np.asarray(prob, np.float32)[r0:r1, c0:c1], 0.02, 0.98)
            ratio = ratio + self.prob_weight * np.log(p / (1.0 - p))
        # Signed distance to the prior's edge (> 0 outside); the crop holds the prior and a
        # max_grow ring around it, so the inside distance can be taken on the crop.
        dist = outside[r0:r1, c0:c1] - depth(prior[r0:r1, c0:c1])
        cost_fg = np.maximum(-ratio, 0.0) + self.grow_weight * np.maximum(dist - self.grow_tolerance, 0.0)
        cost_bg = np.maximum(ratio, 0.0) + self.shrink_weight * np.maximum(-dist - self.grow_tolerance, 0.0)
        cost_fg[~allowed[r0:r1, c0:c1]] = _HARD
        fg_c, bg_c = seeds_fg[r0:r1, c0:c1], seeds_bg[r0:r1, c0:c1]
        cost_bg[fg_c], cost_fg[fg_c] = _HARD, 0.0
        cost_fg[bg_c], cost_bg[bg_c] = _HARD, 0.0
        mask_c = self._cut(crop, cost_fg, cost_bg)

        mask = np.zeros((height, width), bool)
        mask[r0:r1, c0:c1] = mask_c
        mask = fill_holes(_keep_supported(mask, seeds_fg, prior))
        full_ratio = np.zeros((height, width), np.float32)
        full_ratio[r0:r1, c0:c1] = ratio
        score = float((full_ratio[mask] > 0).mean()) if mask.any() else 0.0
        return SegmentationResult(mask=mask, score=score, logits=full_ratio)

    def _cut(self, crop: np.ndarray, cost_fg: np.ndarray, cost_bg: np.ndarray) -> np.ndarray:
        import maxflow

        smooth = cv2.GaussianBlur(crop.astype(np.float32), (0, 0), self._model_args["sigma"])
        dx = np.zeros_like(smooth)
        dy = np.zeros_like(smooth)
        dx[:, :-1] = (smooth[:, 1:] - smooth[:, :-1]) ** 2
        dy[:-1, :] = (smooth[1:, :] - smooth[:-1, :]) ** 2
        pairs = np.concatenate([dx[:, :-1].ravel(), dy[:-1, :].ravel()])
        two_s2 = 2.0 * max(float(pairs.mean()) if pairs.size else 0.0, 1e-8)
        graph = maxflow.Graph[float]()
        nodes = graph.add_grid_nodes(crop.shape)
        right = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 0]])
        down = np.array([[0, 0, 0], [0, 0, 0], [0, 1, 0]])
        graph.add_grid_edges(nodes, weights=self.smoothness * np.exp(-dx / two_s2), structure=right, symmetric=True)
        graph.add_grid_edges(nodes, weights=self.smoothness * np.exp(-dy / two_s2), structure=down, symmetric=True)
        # Source side = organ: the source capacity is paid when a pixel ends up background.
        graph.add_grid_tedges(nodes, cost_bg, cost_fg)
        graph.maxflow()
        return ~graph.get_grid_segments(nodes)
