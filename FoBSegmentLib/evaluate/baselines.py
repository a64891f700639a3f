"""Prompt baselines built from FoB's own coarse foreground map, so that the comparison isolates how
prompts are chosen (method doc Sec. 1 and [S] Sec. A), plus the oracle upper bound.

All maps are (H, W) float in [0, 1] in the query slice's (row, col) frame; all returned points are
(x, y) = (column, row) pixels of that slice (PromptSet's frame).

- `confidence_prompts` (i): the N_f most confident foreground pixels and the N_p most confident
  background pixels (lowest P_fg) of the coarse map, with a minimum spacing so that the points do not
  all fall on one clump of tied pixels.
- `mask_sampled_prompts` (ii, ProtoSAM style): binarise the coarse map at 0.5 and sample N_f points
  uniformly inside and N_p outside the coarse mask (seeded).
- `coarse_mask` (iii, ALPNet-like): the coarse map thresholded at 0.5 is the segmentation itself.
- `oracle_prompts`: BPPC ring of the ground truth + foreground points spread inside it (method doc
  16.10); the segmenter's Dice with perfect prompts, an upper bound for every prompt source.
"""

from __future__ import annotations

import numpy as np

from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.prompts.sampling import mask_prompt_points, random_points

DEFAULT_MIN_SPACING_PX = 8.0


def _check_map(prob: np.ndarray) -> np.ndarray:
    p = np.asarray(prob, dtype=np.float32)
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"coarse foreground map must be a non-empty (H, W) array, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("coarse foreground map contains NaN or infinite values")
    return p


def _spaced_top(score: np.ndarray, n: int, min_spacing: float) -> np.ndarray:
    """(<= n, 2) (x, y) points of the highest `score` pixels, greedily at least `min_spacing` px apart."""
    order = np.argsort(-score.ravel(), kind="stable")
    w = score.shape[1]
    chosen: list[tuple[float, float]] = []
    for idx in order:
        y, x = divmod(int(idx), w)
        if all((x - cx) ** 2 + (y - cy) ** 2 >= min_spacing**2 for cx, cy in chosen):
            chosen.append((float(x), float(y)))
            if len(chosen) == n:
                break
    return np.asarray(chosen, dtype=np.float64).reshape(-1, 2)


def confidence_prompts(
    prob: np.ndarray, n_fg: int = 10, n_bg: int = 10, min_spacing: float = DEFAULT_MIN_SPACING_PX
) -> PromptSet:
    """Baseline (i): most confident foreground (max P_fg) and background (min P_fg) pixels."""
    p = _check_map(prob)
    return PromptSet(
        background=_spaced_top(1.0 - p, n_bg, min_spacing),
        foreground=_spaced_top(p, n_fg, min_spacing),
        fg_probability=p,
    )


def mask_sampled_prompts(
    prob: np.ndarray, n_fg: int = 10, n_bg: int = 10, threshold: float = 0.5, seed: int = 0
) -> PromptSet:
    """Baseline (ii), ProtoSAM style: points drawn uniformly inside / outside the binarised coarse mask.

    An empty coarse mask yields the single most confident pixel as the foreground prompt (as FoB's
    own fallback does), so the segmenter always gets a foreground hint.
    """
    p = _check_map(prob)
    rng = np.random.default_rng(seed)
    mask = p >= threshold
    fg = random_points(mask, n_fg, rng)
    if len(fg) == 0:
        y, x = np.unravel_index(int(np.argmax(p)), p.shape)
        fg = np.array([[float(x), float(y)]])
    return PromptSet(background=random_points(~mask, n_bg, rng), foreground=fg, fg_probability=p)


def coarse_mask(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Baseline (iii), ALPNet-like: the coarse foreground map thresholded, (H, W) bool."""
    return _check_map(prob) >= threshold


def oracle_prompts(gt: np.ndarray, n_fg: int = 10, n_bg: int = 10, k_out: int = 21, k_in: int = 15) -> PromptSet:
    """Perfect prompts from the (H, W) ground truth: the BPPC ring and farthest-point foreground points
    inside the mask eroded by 2 px (interior points, not boundary pixels)."""
    g = np.asarray(gt, bool)
    if not g.any():
        raise ValueError("oracle prompts need a non-empty ground-truth mask")
    bg, fg = mask_prompt_points(g, n_bg, n_fg, ring=(k_out, k_in), foreground="spread")
    return PromptSet(background=bg, foreground=fg)
