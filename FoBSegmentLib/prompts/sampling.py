"""Where to put points in a mask: the one farthest-point sampler and the helpers built on it.

farthest_point_sampling  indices of a spread subset of a point set (FoB's foreground prompts)
farthest_points          points spread over a region from its deepest pixel (oracle prompts)
interior_points          points deep inside a mask (neighbour prompts of the propagation chain)
random_points            uniform draws in a region (baselines and benchmark prompts)
mask_prompt_points       BPPC ring + foreground points of a mask (oracle, benchmark, neighbour chain)

Frames: point sets are (M, 2) float (x, y) = (column, row) pixels; masks and depth maps are (H, W)
in the (row, col) frame; returned points are (n, 2) float64 (x, y) of that grid. All but
random_points are deterministic: ties go to the first pixel in raster order.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from FoBSegmentLib.morphology import depth as mask_depth
from FoBSegmentLib.prompts.ring import ring_points


def farthest_point_sampling(
    points: np.ndarray, n: int, start: int = 0, min_spacing: float = 0.0
) -> np.ndarray:
    """Indices into (M, 2) `points` of up to n points, greedily farthest from those already picked.

    The first index is `start` (returned even for n < 1, as every caller asks for at least one).
    `min_spacing` > 0 stops early once the farthest remaining point lies closer than that many
    pixels to a picked one: more points there would add nothing. Returns an (k,) int array, k <= n.
    """
    pts = np.asarray(points, dtype=np.float64)
    m = len(pts)
    if m == 0:
        return np.zeros(0, dtype=int)
    chosen = [int(start)]
    dist = np.sum((pts - pts[start]) ** 2, axis=1)
    while len(chosen) < min(n, m):
        nxt = int(np.argmax(dist))
        if dist[nxt] < min_spacing**2:
            break
        chosen.append(nxt)
        dist = np.minimum(dist, np.sum((pts - pts[nxt]) ** 2, axis=1))
    return np.asarray(chosen)


def farthest_points(
    region: np.ndarray, n: int, depth: np.ndarray | None = None, min_spacing: float = 0.0
) -> np.ndarray:
    """(<= n, 2) (x, y) points spread over the pixels of a bool (H, W) `region` by farthest-point
    sampling, starting at its deepest pixel.

    depth: (H, W) map that ranks the start pixel (default: the region's own Euclidean distance to
    its edge). (0, 2) when the region is empty.
    """
    reg = np.asarray(region, bool)
    rows, cols = np.nonzero(reg)
    if len(rows) == 0:
        return np.zeros((0, 2))
    if depth is None:
        depth = mask_depth(reg)
    pts = np.stack([cols, rows], axis=1).astype(np.float64)
    start = int(np.argmax(depth[rows, cols]))
    return pts[farthest_point_sampling(pts, n, start, min_spacing)]


def random_points(region: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """(min(n, pixels), 2) (x, y) pixels of a bool (H, W) `region` drawn uniformly without
    replacement by `rng` (one `rng.choice` call); (0, 2) when the region is empty."""
    rows, cols = np.nonzero(np.asarray(region, bool))
    if len(rows) == 0:
        return np.zeros((0, 2))
    pick = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
    return np.stack([cols[pick], rows[pick]], axis=1).astype(np.float64)


def interior_points(mask: np.ndarray, count: int, deep_px: float = 12.0) -> np.ndarray:
    """Up to `count` (x, y) points deep inside an (H, W) bool mask: the innermost pixel first, then
    farthest-point sampling among pixels at least min(half the maximal depth, `deep_px`) and at
    least 0.3 x the maximal depth from the edge, so they stay inside a neighbouring slice of the
    same organ; sampling stops when the next point would be closer than 2 px to a picked one.
    Small organs keep their points in the inner half; big ones (liver) spread them wider, which
    keeps GrabCut from shrinking them slice after slice (measured on CHAOS MR: liver 0.689 -> 0.724
    3D Dice, the other organs unchanged). Returns (n, 2) float
    (x, y); (0, 2) when the mask is empty or count < 1."""
    m = np.asarray(mask, bool)
    if not m.any() or count < 1:
        return np.zeros((0, 2))
    dist = mask_depth(m)
    dmax = float(dist.max())
    deep = dist >= max(1.0, 0.3 * dmax, min(0.5 * dmax, deep_px))
    if not deep.any():
        deep = dist == dmax
    return farthest_points(deep, count, depth=dist, min_spacing=2.0)


# How `mask_prompt_points` places foreground points: "spread" covers the mask itself (the slice the
# mask belongs to: oracle prompts, benchmark prompts); "interior" keeps them deep, because the neighbour
# chain uses them on the NEXT slice, where the organ's edge has moved.
FOREGROUND_CHOICES = ("spread", "interior")


def mask_prompt_points(
    mask: np.ndarray,
    n_background: int = 10,
    n_foreground: int = 10,
    ring: tuple[int, int] = (21, 15),
    foreground: str = "spread",
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts derived from a (H, W) bool mask: (background, foreground), each (n, 2) float64 (x, y).

    background: the valid points of the BPPC ring (`ring_points(mask, n_background, *ring)`), fewer
    than n_background (even none) where the ring leaves the image or the mask is empty.
    foreground: "spread" = `farthest_points` over the mask eroded by 2 px (the whole mask when the
    erosion empties it), "interior" = `interior_points(mask, n_foreground)`; (0, 2) for an empty mask.
    """
    if foreground not in FOREGROUND_CHOICES:
        raise ValueError(f"foreground must be one of {', '.join(FOREGROUND_CHOICES)}, got {foreground!r}")
    m = np.asarray(mask, bool)
    pts, valid = ring_points(m, n_background, *ring)
    if foreground == "interior":
        fg = interior_points(m, n_foreground)
    else:
        inner = ndi.binary_erosion(m, iterations=2)
        fg = farthest_points(inner if inner.any() else m, n_foreground)
    return pts[valid], fg


__all__ = [
    "FOREGROUND_CHOICES",
    "farthest_point_sampling",
    "farthest_points",
    "interior_points",
    "mask_prompt_points",
    "random_points",
]
