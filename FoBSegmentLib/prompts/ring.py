"""BPPC ring sampler: N_p background points on a narrow ring just outside an object mask.

Frame: points are (x, y) = (column, row) pixels of the mask's grid, float, pixel centres at integers.

Construction (fob_method.md 4.2-4.3, with the authors' defects D3/D4 fixed):
1. ring band = dilate(M, k_out) AND NOT dilate(M, k_in), square (Chebyshev) dilations, so with the
   defaults 21/15 the band holds the pixels at Chebyshev distance 8..10 from the mask;
2. the outer contour of the largest connected component of dilate(M, k_out) (8-connected pixel
   chain); its vertices are the band's outermost pixels, exactly (k_out - 1) / 2 px from the mask;
3. orientation fixed to clockwise on screen (positive shoelace area with y pointing down);
4. N_p points at equal arc-length steps L / N_p on the CLOSED contour (the closing segment is part
   of the curve), index 0 at the contour vertex whose polar angle about the contour centroid is
   closest to "straight up" (-pi/2 with y down); the order is a spatial cycle, never re-sorted.

Masks touching the image border: where the dilated mask is cut by the border, its contour runs along
the border, possibly through the object itself. Those contour vertices are dropped (they are not in
the band), the remaining arcs are concatenated in clockwise order starting after the longest gap, and
the N_p points are placed at the centres of N_p equal arc-length slots, so no point lands on the
border cut and index order still follows the contour.

Empty masks, masks leaving no band (the object fills the image) give all-invalid flags and zero
points; inference raises on them, training skips them.
"""

from __future__ import annotations

import cv2
import numpy as np


def _check_mask(mask: object) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask must be a 2-D (H, W) array, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"mask must be boolean or 0/1 numbers, got dtype {arr.dtype}")
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        raise ValueError("mask must contain only 0 and 1 (or be boolean)")
    return arr.astype(bool)


def dilate_square(mask: np.ndarray, kernel: int) -> np.ndarray:
    """Binary dilation of an (H, W) bool mask by a kernel x kernel square (zero outside the image)."""
    if kernel <= 1:
        return mask.copy()
    element = np.ones((kernel, kernel), np.uint8)
    out = cv2.dilate(mask.astype(np.uint8), element, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return out.astype(bool)


def erode_square(mask: np.ndarray, kernel: int) -> np.ndarray:
    """Binary erosion by a kernel x kernel square; outside the image counts as foreground (no border erosion)."""
    if kernel <= 1:
        return mask.copy()
    element = np.ones((kernel, kernel), np.uint8)
    out = cv2.erode(mask.astype(np.uint8), element, borderType=cv2.BORDER_CONSTANT, borderValue=1)
    return out.astype(bool)


def _outer_contour(region: np.ndarray) -> np.ndarray | None:
    """(n, 2) float (x, y) outer contour of the largest 8-connected component, clockwise on screen."""
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    # Largest by enclosed area, ties (e.g. degenerate lines) by vertex count.
    best = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
    pts = best.reshape(-1, 2).astype(np.float64)
    if len(pts) < 3:
        return None
    x, y = pts[:, 0], pts[:, 1]
    area2 = float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
    if area2 == 0.0:
        return None
    if area2 < 0:
        # Reverse but keep vertex 0 first so the traversal stays a plain rotation of the cycle.
        pts = np.concatenate([pts[:1], pts[:0:-1]], axis=0)
    return pts


def _sample_closed(pts: np.ndarray, n_points: int) -> np.ndarray:
    centre = pts.mean(axis=0)
    d = pts - centre
    angle = np.arctan2(d[:, 1], d[:, 0])
    # Angular distance to "up" (-pi/2 with y down); ties go to the vertex farthest from the centre.
    gap = np.abs(np.angle(np.exp(1j * (angle + np.pi / 2))))
    radius = np.hypot(d[:, 0], d[:, 1])
    start = int(np.lexsort((-radius, np.round(gap, 9)))[0])
    cyc = np.roll(pts, -start, axis=0)
    closed = np.concatenate([cyc, cyc[:1]], axis=0)
    seg = np.hypot(*np.diff(closed, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    targets = np.arange(n_points) * (cum[-1] / n_points)
    return np.stack([np.interp(targets, cum, closed[:, 0]), np.interp(targets, cum, closed[:, 1])], axis=1)


def _sample_arcs(pts: np.ndarray, keep: np.ndarray, n_points: int) -> np.ndarray | None:
    n = len(pts)
    # Rotate so the cycle starts right after the longest run of dropped vertices.
    drop = ~keep
    best_len, best_end, run = -1, 0, 0
    for i in range(2 * n):
        if drop[i % n]:
            run += 1
            if run > best_len:
                best_len, best_end = run, i % n
        else:
            run = 0
    cyc = np.roll(pts, -(best_end + 1), axis=0)
    ck = np.roll(keep, -(best_end + 1))
    # Only segments between two kept vertices count; the arcs are concatenated in contour order.
    a, b = cyc, np.roll(cyc, -1, axis=0)
    use = ck & np.roll(ck, -1)
    use[-1] = False  # the wrap-around segment crosses the longest gap
    seg = np.where(use, np.hypot(*(b - a).T), 0.0)
    total = float(seg.sum())
    if total <= 0:
        return None
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    targets = (np.arange(n_points) + 0.5) * (total / n_points)
    idx = np.clip(np.searchsorted(cum, targets, side="right") - 1, 0, n - 1)
    t = np.where(seg[idx] > 0, (targets - cum[idx]) / np.where(seg[idx] > 0, seg[idx], 1.0), 0.0)
    return a[idx] + t[:, None] * (b[idx] - a[idx])


def ring_points(
    mask: np.ndarray, n_points: int = 10, k_out: int = 21, k_in: int = 15
) -> tuple[np.ndarray, np.ndarray]:
    """Sample `n_points` ordered background points on the BPPC ring of `mask`.

    mask: (H, W) bool (or 0/1 numbers). Returns points (n_points, 2) float64 (x, y) pixels in the
    mask's frame, clockwise on screen with index 0 nearest "straight up" from the contour centroid
    (for a ring cut by the image border: index 0 at the start of the arc after the cut, see the
    module docstring), and valid (n_points,) bool. Invalid (empty mask, or no band left inside the image): zeros and
    all-False. Raises ValueError for a mask that is not 2-D or not binary, or bad kernel sizes.
    """
    m = _check_mask(mask)
    if isinstance(n_points, bool) or not isinstance(n_points, (int, np.integer)) or n_points < 1:
        raise ValueError(f"n_points must be a positive integer, got {n_points!r}")
    for name, k in (("k_out", k_out), ("k_in", k_in)):
        if not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0:
            raise ValueError(f"{name} must be a positive odd integer, got {k!r}")
    if k_in >= k_out:
        raise ValueError(f"k_in ({k_in}) must be smaller than k_out ({k_out})")
    invalid = (np.zeros((n_points, 2), np.float64), np.zeros(n_points, bool))
    if not m.any():
        return invalid
    outer = dilate_square(m, k_out)
    band = outer & ~dilate_square(m, k_in)
    if not band.any():
        return invalid
    pts = _outer_contour(outer)
    if pts is None:
        return invalid
    ix = pts.astype(np.int64)
    keep = band[ix[:, 1], ix[:, 0]]
    if keep.all():
        out = _sample_closed(pts, n_points)
    elif keep.sum() >= 2:
        out = _sample_arcs(pts, keep, n_points)
        if out is None:
            return invalid
    else:
        return invalid
    return out, np.ones(n_points, bool)
