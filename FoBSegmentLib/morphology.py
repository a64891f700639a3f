"""The per-slice morphology of the propagation, computed on the crop around the mask.

Every step of a chain runs hole filling, distance transforms and a wide dilation on a whole slice
(or on several slices side by side), while the organ covers a small part of it. Each function here
gives exactly what its whole-image counterpart gives (Testing/test_morphology.py compares them on
real masks): the crop keeps a margin of background wide enough that nothing outside it can change
the answer inside, and the answer outside it is known without computing it.

Frame: masks are (H, W) bool arrays indexed [row, col].
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage


def crop_box(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """(rows, cols) slices of the bounding box of `mask` widened by `margin` px and clipped to the
    image; None when the mask is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (slice(max(0, rows[0] - margin), min(h, rows[-1] + margin + 1)),
            slice(max(0, cols[0] - margin), min(w, cols[-1] + margin + 1)))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """`scipy.ndimage.binary_fill_holes` of an (H, W) mask. On the crop with a 1-px background
    margin: a hole is background that cannot reach the image's edge, and outside the box every
    pixel is background that reaches it through the margin."""
    m = np.asarray(mask, bool)
    box = crop_box(m, 1)
    out = m.copy()
    if box is not None:
        out[box] = ndimage.binary_fill_holes(m[box])
    return out


def depth(mask: np.ndarray) -> np.ndarray:
    """(H, W) float64: `scipy.ndimage.distance_transform_edt(mask)`, each mask pixel's Euclidean
    distance to the nearest background pixel (0 off the mask). On the crop with a 1-px background
    margin: any background pixel beyond the box lies farther than the margin pixel on the way to it."""
    m = np.asarray(mask, bool)
    out = np.zeros(m.shape)
    box = crop_box(m, 1)
    if box is not None:
        out[box] = ndimage.distance_transform_edt(m[box])
    return out


def distance_to(mask: np.ndarray, limit: float) -> np.ndarray:
    """(H, W) float64: `scipy.ndimage.distance_transform_edt(~mask)`, each pixel's Euclidean
    distance to the nearest pixel of `mask`, on the bounding box of the mask widened by
    ceil(limit) + 1 px (so for every pixel within `limit` px of it); inf beyond that box. Every mask
    pixel lies in the box, so the distances inside it are those of the whole image. All inf for an
    empty mask."""
    m = np.asarray(mask, bool)
    out = np.full(m.shape, np.inf)
    box = crop_box(m, int(np.ceil(limit)) + 1)
    if box is not None:
        out[box] = ndimage.distance_transform_edt(~m[box])
    return out


def disk(radius: int) -> np.ndarray:
    """The (2r + 1, 2r + 1) uint8 ellipse structuring element of radius r px (OpenCV's)."""
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def dilate(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """`cv2.dilate` of an (H, W) bool mask by a centred (2r + 1, 2r + 1) `kernel`, as bool: it
    reaches at most r px from the mask."""
    m = np.asarray(mask, bool)
    out = np.zeros(m.shape, bool)
    box = crop_box(m, kernel.shape[0] // 2)
    if box is not None:
        out[box] = cv2.dilate(m[box].astype(np.uint8), kernel).astype(bool)
    return out


def core(mask: np.ndarray, share: float) -> np.ndarray:
    """`mask` ((H, W) bool) eroded by `share` x its equivalent radius (sqrt(area / pi)), at least
    2 px: the pixels that stay inside the organ when its edges are a few pixels off."""
    m = np.asarray(mask, bool)
    r = max(2, int(round(share * np.sqrt(m.sum() / np.pi))))
    return cv2.erode(m.astype(np.uint8), disk(r)).astype(bool)


def solidity(mask: np.ndarray) -> float:
    """The share of the convex hull of all of `mask`'s pixels ((H, W) bool) that the mask fills: 1 for
    a convex organ, less for one with a bay, and less still for two bodies side by side; 0 for an
    empty mask."""
    m = np.asarray(mask, bool)
    if not m.any():
        return 0.0
    hull = cv2.convexHull(cv2.findNonZero(m.astype(np.uint8)))
    filled = np.zeros(m.shape, np.uint8)
    cv2.fillPoly(filled, [hull], 1)
    return float(m.sum()) / max(1, int(filled.sum()))
