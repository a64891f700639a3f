"""The segmenter interface and the input checks every segmenter shares.

Frames: images are numpy arrays (H, W) or (H, W, 3) indexed [row, col]; prompts are (x, y) = (column, row)
pixels with pixel centres at integers (see FoBSegmentLib.prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from FoBSegmentLib import morphology
from FoBSegmentLib.device import resolve_device as resolve_device  # re-exported: older imports keep working
from FoBSegmentLib.prompts import PromptSet


@dataclass
class SegmentationResult:
    """The output of one segmenter call on one slice.

    mask: (H, W) bool, True = foreground, same grid as the input image.
    score: float, the segmenter's own confidence (SAM/MedSAM: predicted IoU of the chosen mask;
        random-walker: mean foreground probability inside the mask; grabcut: the fraction of the
        ring polygon's free interior kept as foreground). Heuristic; not a calibrated probability.
    logits: optional (H, W) float32, foreground evidence where > 0 means foreground.
    """

    mask: np.ndarray
    score: float
    logits: np.ndarray | None = None


@runtime_checkable
class Segmenter(Protocol):
    """Anything that turns one slice and its prompts into a mask."""

    name: str

    def segment(self, image: np.ndarray, prompts: PromptSet) -> SegmentationResult:
        """Segment `image` (H, W) or (H, W, 3) float of any range with `prompts` in its (x, y) frame."""
        ...


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate a slice: (H, W) or (H, W, 3|4), finite, at least 2x2; returns it as float32 (H, W[, 3])."""
    arr = np.asarray(image)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"image must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]  # alpha carries no anatomy
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"image must have shape (H, W) or (H, W, 3), got {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"image must be at least 2x2 pixels, got {arr.shape[:2]}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError("image contains NaN or infinite values; fill or clip them before segmenting")
    return arr


def check_prompts(prompts: PromptSet, height: int, width: int) -> None:
    """Raise ValueError for prompts outside an (H, W) slice or an fg_probability of the wrong shape."""
    if not isinstance(prompts, PromptSet):
        raise ValueError(f"prompts must be a PromptSet, got {type(prompts).__name__}")
    prompts.check_inside(height, width)
    prob = prompts.fg_probability
    if prob is not None:
        if prob.shape != (height, width):
            raise ValueError(f"fg_probability has shape {prob.shape}, the image is {(height, width)}")
        if not np.all(np.isfinite(prob)):
            raise ValueError("fg_probability contains NaN or infinite values")
    prior = prompts.prior_mask
    if prior is not None and prior.shape != (height, width):
        raise ValueError(f"prior_mask has shape {prior.shape}, the image is {(height, width)}")


def to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """Min-max scale one slice to uint8 and replicate grey to 3 channels: (H, W[, 3]) -> (H, W, 3) uint8.

    One min and max for the whole slice (not per channel) so colour images keep their hue; a constant
    slice becomes all zeros. This is what FoB's SAM call does (per-slice min-max to uint8 RGB).
    """
    arr = np.asarray(image, dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi > lo:
        scaled = (arr - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(arr)
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out)


def _segments_cross(p1: np.ndarray, p2: np.ndarray, q1: np.ndarray, q2: np.ndarray) -> bool:
    def orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> float:
        return float((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))

    d1, d2 = orient(q1, q2, p1), orient(q1, q2, p2)
    d3, d4 = orient(p1, p2, q1), orient(p1, p2, q2)
    return (d1 * d2 < 0) and (d3 * d4 < 0)


def polygon_is_simple(points: np.ndarray) -> bool:
    """True when the closed polygon through (N, 2) points in the given order does not cross itself."""
    n = len(points)
    if n < 4:
        return True
    for i in range(n):
        a1, a2 = points[i], points[(i + 1) % n]
        for j in range(i + 2, n):
            if i == 0 and j == n - 1:
                continue  # adjacent through the closing edge
            if _segments_cross(a1, a2, points[j], points[(j + 1) % n]):
                return False
    return True


def ordered_ring(points: np.ndarray) -> np.ndarray:
    """The background prompts as a simple closed polygon, (N, 2) (x, y).

    FoB emits its ring in cyclic order and that order is kept, because it follows concave organs
    (liver) better than any re-ordering. Hand-edited or shuffled prompts can make the polygon cross
    itself; only then are the points re-ordered by angle around their centroid.
    """
    pts = np.asarray(points, dtype=np.float64)
    if polygon_is_simple(pts):
        return pts
    centre = pts.mean(axis=0)
    angles = np.arctan2(pts[:, 1] - centre[1], pts[:, 0] - centre[0])
    return pts[np.argsort(angles, kind="stable")]


def polygon_mask(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of the pixels whose centres lie inside the polygon through (N, 2) (x, y) points."""
    mask = np.zeros((height, width), dtype=np.uint8)
    if len(points) >= 3:
        shift = 4  # sub-pixel vertices: cv2 takes fixed-point coordinates
        pts = np.rint(np.asarray(points) * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(mask, [pts], 1, lineType=cv2.LINE_8, shift=shift)
    return mask.astype(bool)


def disk_mask(points: np.ndarray, radius: int, height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of filled disks of `radius` pixels around (N, 2) (x, y) points."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for x, y in np.rint(np.asarray(points)).astype(int):
        cv2.circle(mask, (int(x), int(y)), int(radius), 1, thickness=-1)
    return mask.astype(bool)


def keep_seeded_components(mask: np.ndarray, seeds: np.ndarray | None, fill_holes: bool = True) -> np.ndarray:
    """Clean a (H, W) bool mask: keep the 4-connected components that touch a True pixel of `seeds`
    (the largest component when no seed falls inside the mask), then fill enclosed holes.

    Weight-free segmenters leak into same-intensity tissue that is not connected to the organ the
    user clicked; the prompts say which blob is meant.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    labels, n = ndimage.label(mask)
    keep: np.ndarray
    hit = np.unique(labels[np.asarray(seeds, bool) & mask]) if seeds is not None else np.zeros(0, int)
    hit = hit[hit > 0]
    if len(hit):
        keep = np.isin(labels, hit)
    else:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = labels == int(np.argmax(sizes))
    if fill_holes:
        keep = morphology.fill_holes(keep)
    return keep


def require_ring(background: np.ndarray, who: str) -> None:
    """ValueError naming the segmenter `who` when fewer than 3 background prompts, which cannot
    enclose the object, are given."""
    if len(background) < 3:
        raise ValueError(f"{who} needs at least 3 background prompts around the object, got {len(background)}")


def ring_polygon(background: np.ndarray, height: int, width: int, who: str) -> tuple[np.ndarray, np.ndarray]:
    """The background ring as a simple polygon (N, 2) (x, y) and its filled (H, W) bool interior.

    ValueError (naming the segmenter `who`) for fewer than 3 points or a polygon enclosing less than
    one pixel of area (all points on a line or on top of each other).
    """
    require_ring(background, who)
    ring = ordered_ring(background)
    x, y = ring[:, 0], ring[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    inside = polygon_mask(ring, height, width)
    if area < 1.0 or not inside.any():
        raise ValueError(f"the background prompts enclose a degenerate polygon (area {area:.1f} px^2)")
    return ring, inside
