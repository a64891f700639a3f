"""GrabCut driven by FoB prompts: the weight-free default when no SAM weights are on the machine.

The closed polygon through the background ring (in its cyclic order) bounds the object: every
pixel outside it is sure background, small disks around the foreground prompts are sure
foreground, and the polygon's interior is "probable foreground" (or probable background where FoB's
coarse probability says so). With `mask_prompt`, a prompt set with a prior mask (a mask prompt, as
SAM takes one) starts from that mask instead: it is "probable foreground", a band of its own equivalent radius around it
"probable background" and everything beyond sure background, the background prompts outside it sure
background. GrabCut then fits colour GMMs and cuts. `refine_mask` starts GrabCut from a mask alone
(the cross-patient second pass's seed on MR). Frame: prompts are (x, y) = (column, row) pixels
of the slice.
"""

from __future__ import annotations

import cv2
import numpy as np

from FoBSegmentLib.morphology import core, dilate, disk
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.segmenters.base import (
    SegmentationResult,
    check_image,
    check_prompts,
    disk_mask,
    keep_seeded_components,
    polygon_mask,
    ring_polygon,
)


def roi_box(points: np.ndarray, margin: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1), half-open, around (N, 2) (x, y) points plus `margin` px, clipped to the image."""
    x0, y0 = np.floor(points.min(axis=0)).astype(int) - margin
    x1, y1 = np.ceil(points.max(axis=0)).astype(int) + margin + 1
    return max(0, y0), min(height, y1), max(0, x0), min(width, x1)


def roi_uint8(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Crop (H, W[, 3]) to `box` and scale by the crop's 0.5-99.5 percentiles to (h, w, 3) uint8.

    Percentiles of the crop rather than min-max of the slice: the organ's contrast with its
    neighbours is what GrabCut's GMMs must separate, and a few bright outliers elsewhere (contrast,
    bone, fat) would otherwise squeeze it into a handful of grey levels.
    """
    r0, r1, c0, c1 = box
    crop = image[r0:r1, c0:c1].astype(np.float32)
    lo, hi = np.percentile(crop, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(crop.min()), float(crop.max()) + 1e-6
    out = np.clip((crop - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out)


def _bg_like(crop: np.ndarray, fg: np.ndarray, bg: np.ndarray, margin: float = 2.0) -> np.ndarray:
    """(h, w) bool: pixels whose colour is much likelier under a Gaussian of the `bg` pixels than of
    the `fg` seed pixels (log-likelihood ratio > `margin`), diagonal covariance per channel."""
    x = crop.reshape(-1, crop.shape[2]).astype(np.float32)

    def loglik(sel: np.ndarray) -> np.ndarray:
        v = x[sel.ravel()]
        mu, var = v.mean(axis=0), v.var(axis=0) + 25.0  # floor: ~5 grey levels of noise
        return -0.5 * (((x - mu) ** 2) / var + np.log(var)).sum(axis=1)

    if bg.sum() < 10:
        return np.zeros(fg.shape, bool)
    return (loglik(bg) - loglik(fg) > margin).reshape(fg.shape)


class GrabCutSegmenter:
    """OpenCV GrabCut seeded by a FoB prompt set.

    Options:
        iterations: GrabCut EM iterations (default 1: more iterations shrink dermoscopy lesions and
            help no organ on the project's slices).
        margin: pixels around the ring's bounding box that GrabCut sees (default 20); the background
            GMM is learnt from this band, the rest of the slice is never touched (speed).
        fg_radius: radius in px of the sure-foreground disk around each foreground prompt (default 3).
        bg_radius: radius in px of the sure-background disk around each background prompt (default 2).
        smooth: bilateral filter diameter applied to the crop before GrabCut, 0 = off (default 5).
        prob_threshold: with `prompts.fg_probability`, interior pixels below it start as probable
            background instead of probable foreground (default 0.3).
        max_side: the crop is downsampled so its long side is at most this many px (default 160).
        seed_prior: start interior pixels that look like the outside band (Gaussian likelihood ratio
            against the foreground seeds) as probable background (default False; it helps small CT
            kidney slices and costs MR and dermoscopy a little, +0.01 / -0.01 Dice on the project data).
        mask_prompt: start from `prompts.prior_mask` when the prompts carry one (the paper protocol's
            `fob-map`, docs/RESULTS.md "FoB in the chain"). Off by default: the neighbour chain hands
            the previous slice's mask as a prior, and GrabCut's chains were measured from the ring.

    Background-only prompts are accepted (the polygon interior is the object hypothesis);
    fewer than 3 background prompts cannot enclose anything and raise ValueError, unless the prompts
    carry a prior mask and `mask_prompt` is on (then any number of points is fine).
    """

    name = "grabcut"

    def __init__(
        self,
        iterations: int = 1,
        margin: int = 20,
        fg_radius: int = 3,
        bg_radius: int = 2,
        smooth: int = 5,
        prob_threshold: float = 0.3,
        max_side: int = 160,
        seed_prior: bool = False,
        mask_prompt: bool = False,
    ) -> None:
        if iterations < 1:
            raise ValueError(f"grabcut iterations must be >= 1, got {iterations}")
        self.iterations = int(iterations)
        self.margin = int(margin)
        self.fg_radius = int(fg_radius)
        self.bg_radius = int(bg_radius)
        self.smooth = int(smooth)
        self.prob_threshold = float(prob_threshold)
        if max_side < 16:
            raise ValueError(f"grabcut max_side must be >= 16 px, got {max_side}")
        self.max_side = int(max_side)
        self.seed_prior = bool(seed_prior)
        self.mask_prompt = bool(mask_prompt)

    def segment(self, image: np.ndarray, prompts: PromptSet) -> SegmentationResult:
        """Segment one slice: image (H, W) or (H, W, 3) float, any range; prompts in (x, y) pixels.

        Returns mask (H, W) bool, score = fraction of the polygon interior GrabCut kept as foreground
        that the prompts did not force (1.0 when all of it), logits None.
        """
        img = check_image(image)
        height, width = img.shape[:2]
        check_prompts(prompts, height, width)
        if self.mask_prompt and prompts.prior_mask is not None and prompts.prior_mask.any():
            return self._from_mask(img, prompts)
        ring, inside = ring_polygon(prompts.background, height, width, "grabcut")

        box = roi_box(ring, self.margin, height, width)
        r0, r1, c0, c1 = box
        crop = roi_uint8(img, box)
        # GrabCut's cost grows faster than linearly with pixels (8 s on a 512x340 dermoscopy crop);
        # it runs on a crop whose long side is at most max_side and the mask is resized back.
        scale = min(1.0, self.max_side / max(crop.shape[:2]))
        if scale < 1.0:
            size = (max(2, round(crop.shape[1] * scale)), max(2, round(crop.shape[0] * scale)))
            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        h, w = crop.shape[:2]
        if self.smooth > 0:
            # MR speckle splits GrabCut's GMM components; an edge-preserving blur keeps organ borders.
            crop = cv2.bilateralFilter(crop, self.smooth, 25, self.smooth)
        sx, sy = w / (c1 - c0), h / (r1 - r0)

        def to_work(points: np.ndarray) -> np.ndarray:
            # pixel centres at integers in both frames: x' = (x - c0 + 0.5) * sx - 0.5
            pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
            return np.stack([(pts[:, 0] - c0 + 0.5) * sx - 0.5, (pts[:, 1] - r0 + 0.5) * sy - 0.5], axis=1)

        inside_c = polygon_mask(to_work(ring), h, w)
        if not inside_c.any():
            inside_c = cv2.resize(inside[r0:r1, c0:c1].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        fg_c = disk_mask(to_work(prompts.foreground), self.fg_radius, h, w) & inside_c
        bg_c = disk_mask(to_work(prompts.background), self.bg_radius, h, w)

        gc = np.full((h, w), cv2.GC_BGD, dtype=np.uint8)
        gc[inside_c] = cv2.GC_PR_FGD
        prob = prompts.fg_probability
        if prob is not None:
            prob_c = cv2.resize(prob[r0:r1, c0:c1], (w, h), interpolation=cv2.INTER_AREA)
            gc[inside_c & (prob_c < self.prob_threshold)] = cv2.GC_PR_BGD
        if self.seed_prior and fg_c.any():
            gc[inside_c & _bg_like(crop, fg_c, ~inside_c)] = cv2.GC_PR_BGD
        gc[bg_c] = cv2.GC_BGD
        gc[fg_c] = cv2.GC_FGD
        if not np.any((gc == cv2.GC_PR_FGD) | (gc == cv2.GC_FGD)):
            # The prompts leave no room for the object (a ring collapsed onto itself, or a prior that
            # rules out every pixel): that is an empty answer for this slice, not bad input, so a
            # whole-volume propagation goes on and the caller sees score 0.
            return SegmentationResult(mask=np.zeros((height, width), bool), score=0.0, logits=None)

        _grabcut(crop, gc, self.iterations)
        fg = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
        seeds = fg_c if fg_c.any() else None
        fg = keep_seeded_components(fg, seeds)
        free = inside_c & ~fg_c
        score = float(fg[free].mean()) if free.any() else 1.0
        if scale < 1.0:
            up = cv2.resize(fg.astype(np.float32), (c1 - c0, r1 - r0), interpolation=cv2.INTER_LINEAR)
            seeds_full = disk_mask(prompts.foreground - [c0, r0], 1, r1 - r0, c1 - c0)
            fg = keep_seeded_components(up > 0.5, seeds_full if seeds_full.any() else None) & inside[r0:r1, c0:c1]
        mask = np.zeros((height, width), dtype=bool)
        mask[r0:r1, c0:c1] = fg
        return SegmentationResult(mask=mask, score=score, logits=None)

    def _from_mask(self, img: np.ndarray, prompts: PromptSet) -> SegmentationResult:
        """`segment` started from the prompts' prior mask (see the module docstring); score = the
        share of the prior mask GrabCut keeps."""
        height, width = img.shape[:2]
        prior = prompts.prior_mask
        band = int(np.clip(np.sqrt(prior.sum() / np.pi), 10, 40))
        mask = _cut_around(img, prior, dilate(prior, disk(band)),
                          disk_mask(prompts.foreground, self.fg_radius, height, width) & prior,
                          disk_mask(prompts.background, self.bg_radius, height, width) & ~prior,
                          self.iterations, self.margin, self.smooth)
        return SegmentationResult(mask=mask, score=float(mask[prior].mean()), logits=None)


def _cut_around(img: np.ndarray, prior: np.ndarray, near: np.ndarray, sure_fg: np.ndarray,
               sure_bg: np.ndarray | None, iterations: int, margin: int, smooth: int) -> np.ndarray:
    """GrabCut on the crop around `near` (plus `margin` px) of img (H, W[, 3]): `prior` probable
    foreground, the rest of `near` probable background, `sure_fg` / `sure_bg` sure, everything else
    in the crop sure background (masks (H, W) bool). Returns the (H, W) bool foreground's components
    holding `sure_fg` (the largest without), holes filled."""
    height, width = img.shape[:2]
    rows, cols = np.nonzero(near)
    r0, r1, c0, c1 = roi_box(np.stack([cols, rows], axis=1).astype(np.float64), margin, height, width)
    crop = roi_uint8(img, (r0, r1, c0, c1))
    if smooth > 0:
        crop = cv2.bilateralFilter(crop, smooth, 25, smooth)
    fg_seeds = sure_fg[r0:r1, c0:c1]
    gc = np.full(crop.shape[:2], cv2.GC_BGD, dtype=np.uint8)
    gc[near[r0:r1, c0:c1]] = cv2.GC_PR_BGD
    gc[prior[r0:r1, c0:c1]] = cv2.GC_PR_FGD
    if sure_bg is not None:
        gc[sure_bg[r0:r1, c0:c1]] = cv2.GC_BGD
    gc[fg_seeds] = cv2.GC_FGD
    _grabcut(crop, gc, iterations)
    fg = keep_seeded_components((gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD), fg_seeds if fg_seeds.any() else None)
    mask = np.zeros((height, width), dtype=bool)
    mask[r0:r1, c0:c1] = fg
    return mask


def refine_mask(image: np.ndarray, mask: np.ndarray, band_share: float, core_share: float = 0.25) -> np.ndarray:
    """`mask` (H, W) bool moved to the edges the (H, W) grey `image` shows: GrabCut (one iteration)
    started from it, its core (eroded by `core_share` x its equivalent radius, at least 2 px) sure
    foreground, the rest of it probable foreground, a band of `band_share` x that radius (10-40 px)
    around it probable background, the pixels beyond sure background. Both colour models are learnt
    from this slice, so the edges follow what this image shows rather than the look the mask was
    cut with. Returns the (H, W) bool mask (the components holding the core, holes filled)."""
    m = np.asarray(mask, bool)
    if not m.any():
        return m.copy()
    near = dilate(m, disk(int(np.clip(band_share * np.sqrt(m.sum() / np.pi), 10, 40))))
    # A 5 px margin of sure background beyond the band, and GrabCutSegmenter's default speckle filter.
    return _cut_around(np.asarray(image, np.float32), m, near, core(m, core_share), None, 1, 5, 5)


def _grabcut(crop: np.ndarray, gc: np.ndarray, iterations: int) -> None:
    """GrabCut on the (h, w, 3) uint8 crop from the (h, w) GC_* label map `gc`, in place."""
    if not np.any((gc == cv2.GC_BGD) | (gc == cv2.GC_PR_BGD)):
        return
    bgd_model = np.zeros((1, 65), np.float64)
    fgd_model = np.zeros((1, 65), np.float64)
    # GrabCut seeds its GMMs with k-means on OpenCV's global RNG: fix it so that the same
    # slice and prompts always give the same mask (reproducible propagation, undo/redo).
    cv2.setRNGSeed(0)
    try:
        cv2.grabCut(crop, gc, None, bgd_model, fgd_model, iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        # GrabCut cannot fit a GMM on too few or identical pixels (tiny regions, flat crops):
        # the starting labels are then the honest answer.
        pass
