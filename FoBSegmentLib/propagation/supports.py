"""Which annotated slices feed a propagation, on which grid, and where another patient's organ sits.

Frames: supports are (H, W) slices taken along the slicing axis of their own volume; shifts are
(dx, dy) = (columns, rows) pixels.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from FoBSegmentLib.io.coords import take_slice
from FoBSegmentLib.propagation.types import SupportSlice


def support_slices_from_volume(
    image: np.ndarray, mask: np.ndarray, axis: int
) -> list[SupportSlice]:
    """All slices along `axis` where `mask` ([k, j, i] bool) is non-empty, as SupportSlices.

    image: the normalised [k, j, i] (or [k, j, i, 3]) array on the same grid.
    """
    other = tuple(a for a in (0, 1, 2) if a != axis)
    present = np.flatnonzero(np.asarray(mask, bool).any(axis=other))
    n = int(np.asarray(mask).shape[axis])
    return [
        SupportSlice(
            int(z), np.asarray(take_slice(image, axis, int(z))), np.asarray(take_slice(mask, axis, int(z)), bool), n
        )
        for z in present
    ]


def resize_support(support: SupportSlice, hw: tuple[int, int]) -> SupportSlice:
    """Another patient's support slice resampled to the query's (H, W) pixel grid (image linear,
    mask nearest), so masks and prompts can move between them; unchanged when the sizes agree."""
    if support.mask.shape == tuple(hw):
        return support
    h, w = hw
    img = cv2.resize(np.asarray(support.image, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(support.mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    if not mask.any():
        raise ValueError(f"support slice {support.index} vanishes when resampled to the query's {w}x{h} slices")
    return dataclasses.replace(support, image=img, mask=mask)


def chunk_supports(supports: list[SupportSlice], count: int = 3) -> list[SupportSlice]:
    """The method's support choice for another patient: with more than `count` labelled slices,
    the middle slice of each of `count` equal thirds, i.e. indices int(n * {1/6, 1/2, 5/6})."""
    n = len(supports)
    if n <= count:
        return list(supports)
    picks = [int(n * (2 * j + 1) / (2 * count)) for j in range(count)]
    return [supports[p] for p in picks]


def inside_absent(rng: tuple[int, int], supports: list[SupportSlice]) -> tuple[int, int]:
    """The inclusive slice range `rng` clipped to the slices between the annotated absences (supports
    with an empty mask) around the organ's annotations (at least one support shows the organ)."""
    present = [s.index for s in supports if s.mask.any()]
    absent = [s.index for s in supports if not s.mask.any()]
    lo, hi = rng
    below = [a for a in absent if a < min(present)]
    above = [a for a in absent if a > max(present)]
    return (max(lo, max(below)) if below else lo), (min(hi, min(above)) if above else hi)


def assign_supports(
    query: list[int], supports: list[SupportSlice], same_volume: bool
) -> dict[int, SupportSlice]:
    """Which support slice feeds each query slice index.

    same_volume: the nearest annotated slice (ties to the lower one).
    otherwise (another patient): the query slices, sorted, are split into len(supports) chunks
    with boundaries int(linspace(0, n_q, len + 1)); chunk j uses support j (supports sorted by index).
    """
    if not supports:
        raise ValueError("no support slice")
    sup = sorted(supports, key=lambda s: s.index)
    if same_volume:
        idx = np.array([s.index for s in sup])
        return {int(z): sup[int(np.argmin(np.abs(idx - z)))] for z in query}
    q = sorted(int(z) for z in query)
    bounds = np.linspace(0, len(q), len(sup) + 1).astype(int)
    out: dict[int, SupportSlice] = {}
    for j, s in enumerate(sup):
        for z in q[bounds[j] : bounds[j + 1]]:
            out[z] = s
    return out


def _scaled_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """(H, W) bool mask scaled by `scale` about its centroid, on the same grid (clipped)."""
    if scale == 1.0:
        return mask
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    cy, cx = rows.mean(), cols.mean()
    matrix = np.array([[scale, 0.0, cx * (1 - scale)], [0.0, scale, cy * (1 - scale)]])
    out = cv2.warpAffine(mask.astype(np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST)
    return out.astype(bool)


def locate_mask(
    query: np.ndarray,
    support_image: np.ndarray,
    support_mask: np.ndarray,
    max_shift: int | None = None,
    scales: tuple[float, ...] = (1.0,),
) -> tuple[np.ndarray, tuple[int, int], float]:
    """Move (and optionally rescale) a support mask to where the query slice looks most like the
    support's organ.

    query, support_image: (H, W) or (H, W, 3) float in [0, 1] on the same pixel grid; support_mask
    (H, W) bool. The score of a placement is the squared distance between the query's mean
    intensity inside the placed mask and in a band around it, and the support's own two means (an
    appearance match that needs no learning; FFT correlations make every shift cost the same).
    max_shift: largest |dx|, |dy| in pixels (None: anywhere the mask stays inside the image).
    scales: mask sizes tried, about its centroid (lesions differ in size between images).
    Returns the placed (H, W) bool mask, its shift (dx, dy) and its scale.
    """
    from scipy.signal import fftconvolve

    q = np.asarray(query, np.float64)
    sup = np.asarray(support_image, np.float64)
    if q.ndim == 2:
        q, sup = q[..., None], sup[..., None]
    m0 = np.asarray(support_mask, bool)
    h, w = m0.shape
    radius = max(3, int(round(0.25 * np.sqrt(m0.sum() / np.pi))))
    yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    disk = (xx * xx + yy * yy <= radius * radius).astype(np.uint8)
    band0 = cv2.dilate(m0.astype(np.uint8), disk).astype(bool) & ~m0
    mu_in, mu_out = sup[m0].mean(axis=0), sup[band0].mean(axis=0)
    best: tuple[float, np.ndarray, tuple[int, int], float] | None = None
    for scale in scales:
        m = _scaled_mask(m0, scale)
        if m.sum() < 5:
            continue
        band = cv2.dilate(m.astype(np.uint8), disk).astype(bool) & ~m
        rows, cols = np.nonzero(m | band)
        r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        if r1 - r0 > h or c1 - c0 > w:
            continue
        tm_in = m[r0:r1, c0:c1].astype(np.float64)
        tm_out = band[r0:r1, c0:c1].astype(np.float64)
        score = np.zeros((h - (r1 - r0) + 1, w - (c1 - c0) + 1))
        for c in range(q.shape[2]):
            # 'valid' correlation: entry (y, x) = mean over the template with its corner at (y, x).
            s_in = fftconvolve(q[..., c], tm_in[::-1, ::-1], mode="valid") / tm_in.sum()
            s_out = fftconvolve(q[..., c], tm_out[::-1, ::-1], mode="valid") / max(tm_out.sum(), 1.0)
            score += (s_in - mu_in[c]) ** 2 + (s_out - mu_out[c]) ** 2
        oy, ox = np.mgrid[0 : score.shape[0], 0 : score.shape[1]]
        dy, dx = oy - r0, ox - c0
        if max_shift is not None:
            score[(np.abs(dy) > max_shift) | (np.abs(dx) > max_shift)] = np.inf
        # Among near-equal scores prefer small moves: anatomy is roughly where the support has it.
        score = score + 1e-6 * (dx * dx + dy * dy) + 1e-4 * abs(np.log(scale))
        i = np.unravel_index(int(np.argmin(score)), score.shape)
        if best is None or score[i] < best[0]:
            sy, sx = int(dy[i]), int(dx[i])
            moved = np.zeros_like(m)
            moved[max(0, sy) : h + min(0, sy), max(0, sx) : w + min(0, sx)] = m[
                max(0, -sy) : h + min(0, -sy), max(0, -sx) : w + min(0, -sx)
            ]
            best = (float(score[i]), moved, (sx, sy), scale)
    if best is None:
        return m0.copy(), (0, 0), 1.0
    return best[1], best[2], best[3]
