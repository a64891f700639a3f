"""Random-walker segmentation seeded by FoB prompts (scikit-image), with FoB's coarse map as a prior.

Seeds: everything outside the polygon through the background ring (cyclic order) and small disks
around the background prompts are background; small disks around the foreground prompts are
foreground. The random walker solves for the foreground probability of every other pixel; when
`prompts.fg_probability` is given it is blended in as a prior. Frame: prompts are (x, y) =
(column, row) pixels of the slice.
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
    polygon_mask,
    ring_polygon,
)
from FoBSegmentLib.segmenters.grabcut import roi_box


class RandomWalkerSegmenter:
    """scikit-image random walker seeded by a FoB prompt set.

    Options:
        beta: edge sensitivity of the walker on the [0, 1]-scaled crop (default 2000).
        margin: pixels around the ring's bounding box that are solved (default 6).
        fg_radius: radius in px of the foreground seed disk around each foreground prompt (default 3).
        bg_radius: radius in px of the background seed disk around each background prompt (default 2).
        prior_weight: weight of `prompts.fg_probability` in the final probability, 0..1 (default 0.3).
        max_side: the crop is downsampled so its long side is at most this many px (default 128).

    Needs at least 3 background prompts (the polygon) and at least one foreground seed: a foreground
    prompt, or, without any, the pixels where `fg_probability` >= 0.9. Without either it raises
    ValueError, since the walker has nothing to diffuse from (use `grabcut`, which accepts
    background-only prompts).
    """

    name = "random-walker"

    def __init__(
        self,
        beta: float = 2000.0,
        margin: int = 6,
        fg_radius: int = 3,
        bg_radius: int = 2,
        prior_weight: float = 0.3,
        max_side: int = 128,
    ) -> None:
        if beta <= 0:
            raise ValueError(f"random-walker beta must be > 0, got {beta}")
        if not 0.0 <= prior_weight <= 1.0:
            raise ValueError(f"random-walker prior_weight must lie in [0, 1], got {prior_weight}")
        if max_side < 16:
            raise ValueError(f"random-walker max_side must be >= 16 px, got {max_side}")
        self.beta = float(beta)
        self.margin = int(margin)
        self.fg_radius = int(fg_radius)
        self.bg_radius = int(bg_radius)
        self.prior_weight = float(prior_weight)
        self.max_side = int(max_side)

    def segment(self, image: np.ndarray, prompts: PromptSet) -> SegmentationResult:
        """Segment one slice: image (H, W) or (H, W, 3) float, any range; prompts in (x, y) pixels.

        Returns mask (H, W) bool, score = mean foreground probability inside the mask, logits (H, W)
        float32 = log-odds of the (blended) foreground probability (probability clipped to
        [1e-6, 1 - 1e-6]; pixels outside the solved crop get the minimum).
        """
        from skimage.segmentation import random_walker

        img = check_image(image)
        height, width = img.shape[:2]
        check_prompts(prompts, height, width)
        prob = prompts.fg_probability
        if len(prompts.foreground) == 0 and (prob is None or not np.any(prob >= 0.9)):
            raise ValueError(
                "random-walker needs at least one foreground prompt (or an fg_probability >= 0.9 "
                "somewhere); use grabcut for background-only prompts"
            )
        ring, inside = ring_polygon(prompts.background, height, width, "random-walker")

        r0, r1, c0, c1 = roi_box(ring, self.margin, height, width)
        crop = img[r0:r1, c0:c1].astype(np.float32)
        lo, hi = np.percentile(crop, [0.5, 99.5])
        crop = np.clip((crop - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        scale = min(1.0, self.max_side / max(crop.shape[:2]))
        if scale < 1.0:
            size = (max(2, round(crop.shape[1] * scale)), max(2, round(crop.shape[0] * scale)))
            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        h, w = crop.shape[:2]
        sx, sy = w / (c1 - c0), h / (r1 - r0)

        def to_work(points: np.ndarray) -> np.ndarray:
            pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
            return np.stack([(pts[:, 0] - c0 + 0.5) * sx - 0.5, (pts[:, 1] - r0 + 0.5) * sy - 0.5], axis=1)

        inside_c = polygon_mask(to_work(ring), h, w)
        if not inside_c.any():
            inside_c = cv2.resize(inside[r0:r1, c0:c1].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        prob_c = None
        if prob is not None:
            prob_c = cv2.resize(prob[r0:r1, c0:c1], (w, h), interpolation=cv2.INTER_AREA)
        fg_c = disk_mask(to_work(prompts.foreground), self.fg_radius, h, w) & inside_c
        if not fg_c.any() and prob_c is not None:
            fg_c = inside_c & (prob_c >= 0.9)
        if not fg_c.any():
            raise ValueError("no foreground seed lies inside the background polygon")
        bg_c = (~inside_c | disk_mask(to_work(prompts.background), self.bg_radius, h, w)) & ~fg_c

        labels = np.zeros((h, w), dtype=np.int32)
        labels[bg_c] = 2
        labels[fg_c] = 1
        if np.all(labels > 0):
            p_fg = (labels == 1).astype(np.float64)
        else:
            # A direct sparse LU ("bf") on a crop of <= max_side^2 px takes tens of ms, while CG can need
            # hundreds of iterations when strong edges make the Laplacian ill-conditioned (seconds).
            full = random_walker(
                crop,
                labels,
                beta=self.beta,
                mode="bf",
                tol=1e-3,
                return_full_prob=True,
                channel_axis=-1 if crop.ndim == 3 else None,
            )
            p_fg = np.asarray(full[0], dtype=np.float64)
        if prob_c is not None and self.prior_weight > 0:
            p_fg = (1.0 - self.prior_weight) * p_fg + self.prior_weight * np.clip(prob_c, 0.0, 1.0)
            p_fg[fg_c] = 1.0
            p_fg[~inside_c] = 0.0
        fg = keep_seeded_components(p_fg > 0.5, fg_c)
        score = float(p_fg[fg].mean()) if fg.any() else 0.0
        if scale < 1.0:
            size = (c1 - c0, r1 - r0)
            p_fg = cv2.resize(p_fg.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
            up = cv2.resize(fg.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
            seeds_full = disk_mask(prompts.foreground - [c0, r0], 1, r1 - r0, c1 - c0)
            fg = keep_seeded_components(up > 0.5, seeds_full if seeds_full.any() else None) & inside[r0:r1, c0:c1]
        mask = np.zeros((height, width), dtype=bool)
        mask[r0:r1, c0:c1] = fg
        p_full = np.zeros((height, width), dtype=np.float32)
        p_full[r0:r1, c0:c1] = p_fg
        eps = 1e-6
        p_full = np.clip(p_full, eps, 1 - eps)
        logits = np.log(p_full / (1 - p_full)).astype(np.float32)
        return SegmentationResult(mask=mask, score=score, logits=logits)
