"""When a chain must stop, and where FoB's coarse probability puts the organ: image-only rules, they
never read a reference mask.

Frames: masks and images are (H, W) slices (RGB: (H, W, 3)), intensities normalised to [0, 1].
"""

from __future__ import annotations

import numpy as np


def organ_range_from_probability(
    fg_max_area: dict[int, int], n_slices: int, anchor: list[int] | None, margin: int
) -> tuple[int, int] | None:
    """Slice range of the organ from FoB's coarse probability, without any reference.

    fg_max_area: slice -> number of pixels where the coarse probability reaches the threshold.
    anchor: slices known to hold the organ (annotated slices of the same volume) - the run through
    them is chosen; otherwise the longest run of positive slices. Returns the run widened by
    `margin` slices on each side and clipped to the volume, or None when no slice is positive.
    """
    positive = sorted(z for z, a in fg_max_area.items() if a > 0)
    anchors = sorted(anchor or [])
    runs: list[list[int]] = []
    for z in positive:
        if runs and z == runs[-1][-1] + 1:
            runs[-1].append(z)
        else:
            runs.append([z])
    if anchors:
        # Annotated slices are organ by definition; join the runs touching the annotated span.
        lo, hi = anchors[0], anchors[-1]
        for run in runs:
            if run[-1] + 1 >= lo and run[0] - 1 <= hi:
                lo, hi = min(lo, run[0]), max(hi, run[-1])
        first, last = lo, hi
    else:
        if not runs:
            return None
        best = max(runs, key=len)
        first, last = best[0], best[-1]
    return max(0, first - margin), min(n_slices - 1, last + margin)


def intensity_range(
    image: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float] = (2.0, 98.0)
) -> tuple[np.ndarray, np.ndarray] | None:
    """Low and high percentile of the (grey or per-channel) intensities inside a mask, or None."""
    m = np.asarray(mask, bool)
    if m.sum() < 5:
        return None
    vals = np.asarray(image)[m]
    return np.percentile(vals, percentiles[0], axis=0), np.percentile(vals, percentiles[1], axis=0)


def median_inside(image: np.ndarray, mask: np.ndarray, band: tuple[np.ndarray, np.ndarray] | None) -> bool:
    """True when the median intensity (per channel) of the mask lies inside `band` (or band is None)."""
    m = np.asarray(mask, bool)
    if band is None or not m.any():
        return True
    med = np.median(np.asarray(image)[m], axis=0)
    return bool(np.all((med >= band[0]) & (med <= band[1])))


def intensity_match(image: np.ndarray, mask: np.ndarray, rng: tuple[np.ndarray, np.ndarray] | None) -> float:
    """Fraction of the mask's pixels whose intensity lies inside `rng` (all channels); 1.0 when unknown."""
    m = np.asarray(mask, bool)
    if rng is None or not m.any():
        return 1.0
    vals = np.asarray(image)[m]
    inside = (vals >= rng[0]) & (vals <= rng[1])
    if inside.ndim > 1:
        inside = inside.all(axis=1)
    return float(inside.mean())
