"""Evaluation metrics: Dice (2-D and accumulated 3-D), prompt quality independent of the segmenter,
and where a 3-D prediction loses its Dice (`error_breakdown`, `best_stop_dice`).

Masks are (H, W) or (Z, H, W) arrays in the (row, col) frame; prompt points are (x, y) = (column, row)
pixels of the slice they belong to (PromptSet's frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from FoBSegmentLib.io.coords import point_pixels
from FoBSegmentLib.labelmap import dice  # noqa: F401  (the one dice lives with the runtime code)

# Width (px) of the band outside the organ where background prompts are useful. FoB places its ring
# (k_out - 1) / 2 = 10 px (Chebyshev) outside the mask, i.e. up to ~14 px Euclidean; 20 px accepts that
# ring with some slack but rejects confidence-picked points far out in the background.
DEFAULT_BAND_PX = 20.0


@dataclass
class DiceCounter:
    """Accumulates TP / FP / FN over slices, for the 3-D Dice of one query volume (method doc 11.1)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        p, g = np.asarray(pred, bool), np.asarray(gt, bool)
        if p.shape != g.shape:
            raise ValueError(f"prediction shape {p.shape} differs from ground truth {g.shape}")
        self.tp += int(np.logical_and(p, g).sum())
        self.fp += int(np.logical_and(p, ~g).sum())
        self.fn += int(np.logical_and(~p, g).sum())

    @property
    def dice(self) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else 2.0 * self.tp / denom


@dataclass
class PromptQuality:
    """Prompt quality of one slice, or the mean over slices (None where a slice had no such prompts).

    bg_outside: share of background prompts outside the organ.
    bg_in_band: share of background prompts outside the organ AND within `band_px` of its boundary.
    bg_distance: mean Euclidean distance (px) of background prompts to the organ boundary (unsigned).
    fg_inside: share of foreground prompts inside the organ.
    """

    bg_outside: float | None = None
    bg_in_band: float | None = None
    bg_distance: float | None = None
    fg_inside: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "bg_outside": self.bg_outside,
            "bg_in_band": self.bg_in_band,
            "bg_distance_px": self.bg_distance,
            "fg_inside": self.fg_inside,
        }


def boundary_distance_maps(gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance outside, distance inside) of an (H, W) mask, in px, Euclidean.

    outside[r, c]: distance from a background pixel to the nearest organ pixel (0 inside);
    inside[r, c]: distance from an organ pixel to the nearest background pixel (0 outside).
    """
    g = np.asarray(gt, bool)
    if not g.any():
        raise ValueError("prompt quality needs a non-empty organ mask")
    outside = ndi.distance_transform_edt(~g)
    inside = ndi.distance_transform_edt(g) if not g.all() else np.full(g.shape, np.inf)
    return outside, inside


def prompt_quality(
    background: np.ndarray, foreground: np.ndarray, gt: np.ndarray, band_px: float = DEFAULT_BAND_PX
) -> PromptQuality:
    """Quality of one slice's prompts against its (H, W) organ mask.

    background, foreground: (N, 2) (x, y) points. Distances to the boundary: a background point
    outside the organ is `outside` px from it; one inside is `inside` px from it (both unsigned).
    """
    g = np.asarray(gt, bool)
    outside, inside = boundary_distance_maps(g)
    q = PromptQuality()
    bg = np.asarray(background, dtype=np.float64).reshape(-1, 2)
    if len(bg):
        r, c = point_pixels(bg, g.shape)
        out = ~g[r, c]
        dist = np.where(out, outside[r, c], inside[r, c])
        q.bg_outside = float(out.mean())
        q.bg_in_band = float((out & (outside[r, c] <= band_px)).mean())
        q.bg_distance = float(dist.mean())
    fg = np.asarray(foreground, dtype=np.float64).reshape(-1, 2)
    if len(fg):
        r, c = point_pixels(fg, g.shape)
        q.fg_inside = float(g[r, c].mean())
    return q


def mean_quality(items: list[PromptQuality]) -> PromptQuality:
    """Mean of each field over the slices where it is defined."""

    def avg(name: str) -> float | None:
        vals = [getattr(i, name) for i in items if getattr(i, name) is not None]
        return float(np.mean(vals)) if vals else None

    return PromptQuality(avg("bg_outside"), avg("bg_in_band"), avg("bg_distance"), avg("fg_inside"))


# ----------------------------------------------------------------------------------------------
# where a 3-D prediction loses Dice (the propagation protocol)


def error_breakdown(pred: np.ndarray, ref: np.ndarray, axis: int) -> dict[str, Any]:
    """Where a prediction loses Dice, in voxels (all [k, j, i] bool).

    missed_slices_fn: reference voxels on slices where the prediction is empty (organ ends cut off).
    extra_slices_fp: predicted voxels on slices where the reference is empty (run past the organ).
    inslice_fn / inslice_fp: errors on slices both hold (boundary errors, leaks into neighbours).
    Also the per-slice areas (reference, prediction, overlap) from the first to the last slice either
    holds, for the analysis of which slices fail.
    """
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    other = tuple(a for a in range(3) if a != axis)
    pa, ra, ov = p.sum(axis=other), r.sum(axis=other), (p & r).sum(axis=other)
    both = (pa > 0) & (ra > 0)
    out = {
        "tp": int(ov.sum()),
        "missed_slices_fn": int(ra[(pa == 0)].sum()),
        "extra_slices_fp": int(pa[(ra == 0)].sum()),
        "inslice_fn": int((ra - ov)[both].sum()),
        "inslice_fp": int((pa - ov)[both].sum()),
    }
    z = np.flatnonzero((pa > 0) | (ra > 0))
    if len(z):
        lo, hi = int(z[0]), int(z[-1])
        out["slices"] = {
            "first": lo,
            "ref_area": [int(v) for v in ra[lo : hi + 1]],
            "pred_area": [int(v) for v in pa[lo : hi + 1]],
            "overlap": [int(v) for v in ov[lo : hi + 1]],
        }
    return out


def best_stop_dice(errors: dict[str, Any], annotated: int) -> float | None:
    """Dice the prediction would reach had its chain stopped at the best slice on each side of the
    `annotated` slice (READS THE REFERENCE: an analysis of how much the stopping rule costs).

    errors: an `error_breakdown` result (its per-slice areas). Truncation only removes predicted
    slices, so the per-slice overlaps give the answer exactly.
    """
    sl = errors.get("slices")
    if not sl:
        return None
    ref, pred, ov = (np.asarray(sl[k], np.float64) for k in ("ref_area", "pred_area", "overlap"))
    z0 = annotated - sl["first"]
    if not 0 <= z0 < len(ref):
        return None
    cp, co = np.concatenate([[0.0], np.cumsum(pred)]), np.concatenate([[0.0], np.cumsum(ov)])
    lo = np.arange(0, z0 + 1)[:, None]
    hi = np.arange(z0, len(ref))[None, :] + 1
    d = 2 * (co[hi] - co[lo]) / (ref.sum() + cp[hi] - cp[lo])
    return float(d.max())
