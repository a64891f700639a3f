"""Propagation of one (or a few) annotated slices across a volume: FoB's main job.

Frames: volumes are [k, j, i] arrays (RGB 2D images [1, H, W, 3]); slices are taken along one array
axis with `io.coords.take_slice` and are (H, W) = (rows, cols) per `io.coords.slice_axes`; prompts
are (x, y) = (column, row) pixels of their slice. Intensities handed in are already normalised to
[0, 1] (`io/intensity.py`).

Prompt sources (`prompts_from`):
    "fob"        FoB's generator predicts background ring + foreground points for every query slice
                 from a support slice (the nearest annotated slice of the same volume, or for another
                 patient's support the method's chunked protocol).
    "neighbour"  no learning: prompts for slice z come from the accepted mask of the adjacent, already
                 segmented slice (BPPC ring outside it, points deep inside it), chained outwards in
                 both directions from each annotated slice (with several, chains meet midway, so
                 each slice follows its nearest annotation); the chain stops when the mask
                 vanishes, its area jumps, or its intensities stop matching the annotated organ.
                 For another patient's support the chain starts at the same relative height, from
                 the support mask slid to the best appearance match (`locate_mask`).
    "hybrid"     FoB's coarse foreground probability decides where the organ ends (`slices="auto"`),
                 neighbour chaining supplies the geometry inside that range.

Slice selection: an explicit inclusive range (A, B), or "auto": for FoB/hybrid from the coarse
foreground probability (with a margin), for neighbour from the stopping rule. The query label is
never read (nothing here takes one).

Entry points: `propagate` (arrays in, `PropagationResult` out; progress and cancel callbacks) and
`segment_files` (`fob segment`: paths in, label map and optional markups written atomically).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from FoBSegmentLib.io.coords import put_slice, slice_axes, take_slice
from FoBSegmentLib.prompts import PromptSet

PROMPT_SOURCES = ("fob", "neighbour", "hybrid")

ProgressCallback = Callable[[int, int, str], None]
CancelCheck = Callable[[], bool]
# on_slice(z, mask): slice index along the axis and its accepted (H, W) bool mask, on the caller's thread.
SliceCallback = Callable[[int, np.ndarray], None]


class PropagationCancelled(Exception):
    """Raised between slices when the cancel callback returns True; nothing has been written."""


@dataclass
class SupportSlice:
    """One annotated slice: index along the slicing axis of its own volume, its image (H, W) or
    (H, W, 3) float in [0, 1], and its mask (H, W) bool."""

    index: int
    image: np.ndarray
    mask: np.ndarray
    volume_slices: int | None = None


@dataclass
class SliceReport:
    """What happened on one slice.

    source: "annotation" (copied from the support mask), "fob", "neighbour", "prompts-in",
        or "skipped" (outside the organ range / after the chain stopped).
    area: foreground pixels in the final 2D mask (before 3D cleanup).
    support_index: the support slice that fed this slice (index in the support volume), if any.
    score: the segmenter's confidence; fg_max: max of FoB's coarse probability (FoB/hybrid).
    flags: review hints, e.g. "area-jump x2.3", "intensity-mismatch", "chain-end: mask vanished".
    """

    index: int
    source: str
    area: int = 0
    support_index: int | None = None
    score: float | None = None
    fg_max: float | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class PropagationResult:
    """mask: [k, j, i] uint8 (1 = organ), same shape as the query volume (RGB: [1, H, W]).
    prompts: slice index -> PromptSet actually used on that slice (annotated slices have none).
    slices: slice index -> SliceReport for every slice along `axis`.
    segmented: (first, last) slice that holds organ, or None when empty.
    notes: human-readable lines (which prompt source, where the chain stopped, ...).
    """

    mask: np.ndarray
    prompts: dict[int, PromptSet]
    slices: dict[int, SliceReport]
    axis: int
    prompts_from: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def flagged(self) -> list[int]:
        """Slices a person should look at (any flag other than the normal chain ends)."""
        return [z for z, r in sorted(self.slices.items()) if any(not f.startswith("chain-end") for f in r.flags)]

    @property
    def segmented(self) -> tuple[int, int] | None:
        zs = [z for z, r in self.slices.items() if r.area > 0]
        return (min(zs), max(zs)) if zs else None


@dataclass
class PropagationConfig:
    """Tunables of the propagation (defaults measured on CHAOS MR / Synapse CT, see the tests).

    slices: "auto" or an inclusive (first, last) range of slice indices along the axis.
    margin: slices added on each side of the auto range found from FoB's coarse probability.
    prob_threshold / min_prob_area: a slice counts as organ for "auto" when at least
        `min_prob_area` pixels of FoB's coarse probability reach `prob_threshold`.
    n_background / ring_k_out / ring_k_in: neighbour prompts, BPPC ring (`model.ring.ring_points`).
    n_foreground: neighbour foreground points, spread over the deep interior of the previous mask.
    fg_area_per_point / max_foreground: big masks get more foreground points: one per
        `fg_area_per_point` pixels of the previous mask, at least `n_foreground` (or the count
        asked for), at most `max_foreground` (0 = off, the class default). GrabCut hands parts of
        a heterogeneous liver to the background slice after slice; more anchors keep them. MR
        only (`config_for_modality`), measured with GrabCut, one annotated slice, neighbour
        prompts (docs/RESULTS.md): CHAOS MR mean 3D Dice 82.6 -> 83.3 (liver 72.4 -> 74.7,
        spleen 81.4 -> 82.1, kidney means unchanged); on Synapse CT it costs the mean 0.2-0.3
        (liver and spleen 0.3-0.5), so CT keeps 4 points. 350 px beat 150 / 250 / 500; a flat 40 points (or 12, 20) on
        every mask costs the small MR kidneys 1-2 points and the CT kidneys up to 7.
    retry_foreground: when a chained slice's area collapses (drop by more than `area_jump`), it is
        segmented again with this many foreground points and the larger mask is kept.
    retry_ring: when a chained slice's area jumps up by more than `area_jump` (a leak), it is
        segmented again with this tighter ring (k_out, k_in) and the smaller mask is kept.
    min_area: a neighbour-chained mask smaller than this (pixels) ends the chain.
    area_jump: ratio between the areas of adjacent slices above which the slice is flagged; a
        growth by more than `area_jump` also ends the chain (a leak into a neighbour organ).
    intensity_match: minimum fraction of the new mask whose intensities fall inside the annotated
        organ's 2-98 % intensity range; below it the chain ends (the organ is gone, the
        segmenter found something else).
    median_band: percentiles of the annotated organ's intensities; the chain also ends when the
        new mask's median intensity leaves that band (None disables; (5, 95) measured best of
        (10, 90) / (5, 95) / (2, 98) / None on CHAOS MR 2, 5, 8 and Synapse CT 1, 5).
    shape_prior: neighbour prompts carry the previous slice's mask as `PromptSet.prior_mask`, and a
        segmenter with `fit_reference` (graphcut) learns the organ's appearance once, from the
        annotated slice showing most of the organ; segmenters without them are unaffected.
    back_check: after segmenting slice z from slice z-1, slice z-1 is segmented again from the new
        mask; when that agrees with the accepted mask of z-1 by a Dice below `back_check`, the chain
        has jumped onto another structure (the organ ended) and stops before z. None = off (the
        class default). Only for segmenters with `uses_prior_mask` (graphcut): GrabCut's answers
        vary too much between neighbouring slices for the check (it cut the CMR bSSFP left
        ventricle of Testing/test_cli_segment.py from 0.685 to 0.219 Dice). Per modality
        (`config_for_modality`), measured with graphcut from one annotated slice, before `regrow`: CHAOS MR 0.8 (mean 3D Dice 84.8; 0.75: 84.2, off:
        81.6 in the development harness); Synapse CT 0.7 (86.2; off 83.7, 0.5: 85.0, 0.6: 85.4,
        0.75: 84.9, 0.8: 83.6: CT's thinner slices change less, but a kidney's poles still jump).
    regrow: (drop, grow): organ cross-sections rise to one peak and fall towards the organ's ends;
        once a chain's area has fallen below `drop` x its peak, growth to more than `grow` x the
        smallest area since the peak means the chain is on another structure (a kidney chain
        entering the spleen) and ends it. None = off. Measured with graphcut on CHAOS MR (0.9, 1.3):
        left kidney 81.1 -> 83.7, mean 84.8 -> 85.7, other organs within 0.7.
    Between two annotated slices no chain ends: a slice where one of the rules above fires is kept
    and flagged "review: ..." (with 3 annotated slices, CHAOS MR mean 78.0 -> 86.2: chains growing
    out of an annotated organ tip jump in area by nature).
    largest_component: keep only the largest 3D connected component.
    fill_holes: fill enclosed holes in each 2D slice of the result.
    """

    slices: str | tuple[int, int] = "auto"
    margin: int = 1
    prob_threshold: float = 0.5
    min_prob_area: int = 20
    n_background: int = 16
    ring_k_out: int = 15
    ring_k_in: int = 9
    n_foreground: int = 4
    fg_area_per_point: float = 0.0
    max_foreground: int = 40
    retry_foreground: int = 12
    retry_ring: tuple[int, int] | None = (7, 3)
    min_area: int = 15
    area_jump: float = 2.0
    intensity_match: float = 0.5
    median_band: tuple[float, float] | None = (5.0, 95.0)
    shape_prior: bool = True
    back_check: float | None = None
    regrow: tuple[float, float] | None = (0.9, 1.3)
    largest_component: bool = False
    fill_holes: bool = True


# ----------------------------------------------------------------------------------------------
# small pieces (unit-tested)


def parse_slices(text: str | None) -> str | tuple[int, int]:
    """'auto' (or None) -> 'auto'; 'A:B' -> (A, B), an inclusive range of slice indices."""
    if text is None or str(text).strip().lower() == "auto":
        return "auto"
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"--slices must be 'auto' or 'A:B' (first:last slice, inclusive), got {text!r}") from None
    if a > b:
        raise ValueError(f"--slices {text}: the first slice {a} is after the last slice {b}")
    return a, b


def check_slice_range(rng: str | tuple[int, int], n_slices: int) -> None:
    """ValueError when an explicit (A, B) range leaves 0..n_slices-1."""
    if rng == "auto":
        return
    a, b = rng
    if a < 0 or b >= n_slices:
        raise ValueError(f"--slices {a}:{b} is out of bounds: the volume has slices 0..{n_slices - 1} along this axis")


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
    return SupportSlice(support.index, img, mask, support.volume_slices)


def chunk_supports(supports: list[SupportSlice], count: int = 3) -> list[SupportSlice]:
    """The method's support choice for another patient: with more than `count` labelled slices,
    the middle slice of each of `count` equal thirds, i.e. indices int(n * {1/6, 1/2, 5/6})."""
    n = len(supports)
    if n <= count:
        return list(supports)
    picks = [int(n * (2 * j + 1) / (2 * count)) for j in range(count)]
    return [supports[p] for p in picks]


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


def interior_points(mask: np.ndarray, count: int, deep_px: float = 12.0) -> np.ndarray:
    """Up to `count` (x, y) points deep inside an (H, W) bool mask: the innermost pixel first, then
    farthest-point sampling among pixels at least min(half the maximal depth, `deep_px`) and at
    least 0.3 x the maximal depth from the edge, so they stay inside a neighbouring slice of the
    same organ. Small organs keep their points in the inner half; big ones (liver) spread them
    wider, which keeps GrabCut from shrinking them slice after slice (measured on CHAOS MR: liver
    0.689 -> 0.724 3D Dice, the other organs unchanged). Returns (n, 2) float (x, y); (0, 2) when empty."""
    m = np.asarray(mask, bool)
    if not m.any() or count < 1:
        return np.zeros((0, 2))
    dist = ndimage.distance_transform_edt(m)
    dmax = float(dist.max())
    rows, cols = np.nonzero(dist >= max(1.0, 0.3 * dmax, min(0.5 * dmax, deep_px)))
    if len(rows) == 0:
        rows, cols = np.nonzero(dist == dmax)
    cand = np.stack([cols, rows], axis=1).astype(np.float64)
    depth = dist[rows, cols]
    picks = [int(np.argmax(depth))]
    d2 = np.sum((cand - cand[picks[0]]) ** 2, axis=1)
    while len(picks) < min(count, len(cand)):
        nxt = int(np.argmax(d2))
        if d2[nxt] < 4.0:  # closer than 2 px: more points add nothing
            break
        picks.append(nxt)
        d2 = np.minimum(d2, np.sum((cand - cand[nxt]) ** 2, axis=1))
    return cand[picks]


def prompts_from_mask(
    mask: np.ndarray,
    config: PropagationConfig,
    n_foreground: int | None = None,
    ring: tuple[int, int] | None = None,
) -> PromptSet | None:
    """Neighbour prompts: BPPC ring outside `mask` ((H, W) bool) plus `n_foreground` (default
    config.n_foreground) interior points, and `mask` itself as the prior when `config.shape_prior`;
    ring = (k_out, k_in) overrides the config's ring kernels.
    None when the mask leaves no ring (empty, or it fills the slice)."""
    from FoBSegmentLib.model.ring import ring_points

    k_out, k_in = ring if ring is not None else (config.ring_k_out, config.ring_k_in)
    pts, valid = ring_points(np.asarray(mask, bool), config.n_background, k_out, k_in)
    if valid.sum() < 3:
        return None
    nf = config.n_foreground if n_foreground is None else n_foreground
    if config.fg_area_per_point > 0:
        by_area = int(round(np.count_nonzero(mask) / config.fg_area_per_point))
        nf = max(nf, min(config.max_foreground, by_area))
    prior = np.asarray(mask, bool) if config.shape_prior else None
    return PromptSet(background=pts[valid], foreground=interior_points(mask, nf), prior_mask=prior)


# Measured per-modality defaults of `PropagationConfig` (see its docstring); `fob segment` applies
# them for the modality it guessed (or was told) for the query image.
MODALITY_CONFIG: dict[str, dict[str, Any]] = {
    "mr": {"fg_area_per_point": 350.0, "back_check": 0.8},
    "ct": {"back_check": 0.7},
}


def config_for_modality(config: PropagationConfig | None, modality: str) -> PropagationConfig:
    """A copy of `config` (default: `PropagationConfig()`) with `MODALITY_CONFIG[modality]` applied
    to the fields still at their class default (a field the caller set is kept)."""
    cfg = dataclasses.replace(config) if config is not None else PropagationConfig()
    base = PropagationConfig()
    for name, value in MODALITY_CONFIG.get(str(modality).lower(), {}).items():
        if getattr(cfg, name) == getattr(base, name):
            setattr(cfg, name, value)
    return cfg


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


def cleanup_3d(mask: np.ndarray, axis: int, largest_component: bool, fill_holes: bool) -> np.ndarray:
    """[k, j, i] bool -> bool: 2D hole filling in every slice along `axis`, then (optionally) the
    largest 26-connected 3D component."""
    out = np.asarray(mask, bool).copy()
    if fill_holes:
        for z in range(out.shape[axis]):
            sl = take_slice(out, axis, z)
            if sl.any():
                put_slice(out, axis, z, ndimage.binary_fill_holes(sl))
    if largest_component and out.any():
        labels, n = ndimage.label(out, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            out = labels == int(np.argmax(sizes))
    return out


# ----------------------------------------------------------------------------------------------
# the propagation


class _Runner:
    def __init__(
        self,
        image: np.ndarray,
        axis: int,
        segmenter: Any,
        config: PropagationConfig,
        progress: ProgressCallback | None,
        cancel: CancelCheck | None,
        total: int,
        on_slice: SliceCallback | None = None,
    ) -> None:
        self.image = image
        self.axis = axis
        self.segmenter = segmenter
        self.config = config
        self.progress = progress
        self.cancel = cancel
        self.n = image.shape[axis]
        rows, cols = slice_axes(axis)
        self.hw = (image.shape[rows], image.shape[cols])
        self.mask = np.zeros(image.shape[:3], bool)
        self.prompts: dict[int, PromptSet] = {}
        self.reports: dict[int, SliceReport] = {z: SliceReport(z, "skipped") for z in range(self.n)}
        self.done = 0
        self.total = max(1, total)
        self.on_slice = on_slice
        # (lo, hi): only slices inside are reported to on_slice (an explicit range's stepping stones
        # are dropped from the result at the end); None = all.
        self.report_range: tuple[int, int] | None = None

    def slice(self, z: int) -> np.ndarray:
        return np.asarray(take_slice(self.image, self.axis, z), dtype=np.float32)

    def tick(self, text: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total, text)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise PropagationCancelled("cancelled")

    def segment(self, z: int, prompts: PromptSet) -> tuple[np.ndarray, float]:
        # OpenCV's GrabCut initialises its colour models from a global RNG; re-seeding makes a
        # slice's mask a function of (image, prompts) alone, so edited prompts re-run identically.
        cv2.setRNGSeed(0)
        try:
            res = self.segmenter.segment(self.slice(z), prompts)
        except ValueError as exc:
            raise ValueError(f"slice {z}: {exc}") from None
        return np.asarray(res.mask, bool), float(res.score)

    def accept(self, z: int, mask: np.ndarray, report: SliceReport, prompts: PromptSet | None) -> None:
        put_slice(self.mask, self.axis, z, mask)
        report.area = int(mask.sum())
        if report.fg_max is None:
            report.fg_max = self.reports[z].fg_max  # measured by FoB earlier (hybrid range search)
        self.reports[z] = report
        if prompts is not None:
            self.prompts[z] = prompts
        if (
            self.on_slice is not None
            and report.source != "annotation"
            and (self.report_range is None or self.report_range[0] <= z <= self.report_range[1])
        ):
            self.on_slice(int(z), np.array(mask, dtype=bool, copy=True))


def propagate(
    image: np.ndarray,
    supports: list[SupportSlice],
    segmenter: Any,
    *,
    axis: int,
    same_volume: bool,
    prompts_from: str = "neighbour",
    generator: Any = None,
    config: PropagationConfig | None = None,
    prompts_in: dict[int, PromptSet] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    on_slice: SliceCallback | None = None,
) -> PropagationResult:
    """Segment the organ of `supports` in every slice of `image` along `axis`.

    image: normalised query volume, [k, j, i] float in [0, 1] ([k, j, i, 3] for colour).
    supports: annotated slices (from this volume when `same_volume`, else from another patient;
        their images/masks must have the query's slice size for neighbour/hybrid chaining seeds).
    segmenter: has `.segment(image (H, W[, 3]), PromptSet) -> result(.mask, .score)`.
    prompts_from: "fob" | "neighbour" | "hybrid"; fob/hybrid need `generator`
        (`FoBPromptGenerator`-like with `.predict(support_image, support_mask, query_image)`).
    prompts_in: slice -> PromptSet given by a person (e.g. edited in Slicer): exactly those slices
        are segmented with exactly those prompts, nothing is predicted.
    progress(done, total, text) is called after each slice; cancel() is checked before each slice
        and raises PropagationCancelled when it returns True.
    on_slice(z, mask) is called each time slice z's 2D mask ((H, W) bool, a copy) is accepted, so a
        caller can show results slice by slice; a slice segmented again (a retry) is reported again,
        the last call wins. Annotated slices and slices that will not be in the result (stepping
        stones outside an explicit range, chain ends) are not reported. The masks precede the 3D
        cleanup (`fill_holes` only adds pixels; `largest_component` may remove some): the result's
        `mask` is the final word. It runs on the calling (worker) thread, between slices: it must be
        quick and must not touch MRML or Qt (queue the mask for the main thread instead).
    Raises ValueError for unusable supports or an explicit slice range out of bounds.
    """
    cfg = config or PropagationConfig()
    if prompts_from not in PROMPT_SOURCES:
        raise ValueError(f"unknown prompt source {prompts_from!r}; use one of {', '.join(PROMPT_SOURCES)}")
    if not supports:
        raise ValueError("the support mask is empty: no slice holds the support label")
    n = image.shape[axis]
    check_slice_range(cfg.slices, n)
    t0 = time.perf_counter()
    sup_sorted = sorted(supports, key=lambda s: s.index)
    rows, cols = slice_axes(axis)
    hw = (image.shape[rows], image.shape[cols])
    if not same_volume:
        sup_sorted = [resize_support(s, hw) for s in sup_sorted]
    for s in sup_sorted:
        if s.mask.shape != hw:
            raise ValueError(
                f"support slice {s.index} is {s.mask.shape[1]}x{s.mask.shape[0]} px but the query slices are "
                f"{hw[1]}x{hw[0]}; resample the support onto a grid with the same in-plane size"
            )
        if not s.mask.any():
            raise ValueError(f"support slice {s.index} has an empty mask")
    if prompts_from in ("fob", "hybrid") and generator is None and prompts_in is None:
        raise ValueError(f"prompt source {prompts_from!r} needs a FoB model (none loaded)")

    annotated = [s.index for s in sup_sorted] if same_volume else []
    lo, hi = (0, n - 1) if cfg.slices == "auto" else cfg.slices
    notes: list[str] = []

    if prompts_in is not None:
        run = _Runner(image, axis, segmenter, cfg, progress, cancel, total=len(prompts_in) + len(annotated), on_slice=on_slice)
        _copy_annotations(run, sup_sorted if same_volume else [])
        for z in sorted(prompts_in):
            if not 0 <= z < n:
                raise ValueError(f"prompts file has points on slice {z}, outside 0..{n - 1}")
            run.check_cancel()
            if z in annotated:
                run.tick(f"slice {z}: annotated, prompts ignored")
                continue
            ps = prompts_in[z]
            mask, score = run.segment(z, ps)
            run.accept(z, mask, SliceReport(z, "prompts-in", score=score), ps)
            run.tick(f"slice {z}")
        notes.append(f"segmented the {len(prompts_in)} slice(s) that carry prompts in the prompts file")
        source = "prompts-in"
    elif prompts_from == "fob":
        run, source = _run_fob(
            image, sup_sorted, segmenter, generator, axis, same_volume, cfg, (lo, hi), progress, cancel, notes, on_slice
        )
    else:
        run = _Runner(image, axis, segmenter, cfg, progress, cancel, total=hi - lo + 1, on_slice=on_slice)
        if cfg.slices != "auto":
            run.report_range = (lo, hi)
        rng = (lo, hi)
        if prompts_from == "hybrid":
            rng = _hybrid_range(run, sup_sorted, generator, same_volume, cfg, (lo, hi), notes)
        _copy_annotations(run, sup_sorted if same_volume else [])
        _run_neighbour(run, sup_sorted, same_volume, rng, cfg, notes)
        source = prompts_from
        if cfg.slices != "auto":
            # A chain from an annotated slice outside --slices passes through the slices between;
            # they served as stepping stones only.
            for z in range(n):
                if not lo <= z <= hi and run.reports[z].source == "neighbour":
                    put_slice(run.mask, axis, z, np.zeros(hw, bool))
                    run.prompts.pop(z, None)
                    run.reports[z].source = "skipped"
                    run.reports[z].flags.append("outside the requested slice range")

    final = cleanup_3d(run.mask, axis, cfg.largest_component, cfg.fill_holes)
    if same_volume:
        # The person's annotation is the truth on its slices: no cleanup may alter it.
        for s in sup_sorted:
            put_slice(final, axis, s.index, s.mask)
    for z, rep in run.reports.items():
        rep.area = int(take_slice(final, axis, z).sum())
    if progress is not None:
        progress(run.total, run.total, "done")  # chains that stop early leave slices unvisited
    return PropagationResult(
        mask=final.astype(np.uint8),
        prompts=run.prompts,
        slices=run.reports,
        axis=axis,
        prompts_from=source,
        notes=notes,
        seconds=time.perf_counter() - t0,
    )


def _copy_annotations(run: _Runner, supports: list[SupportSlice]) -> None:
    for s in supports:
        run.accept(s.index, s.mask, SliceReport(s.index, "annotation", support_index=s.index), None)


def _neighbour_seeds(
    run: _Runner, supports: list[SupportSlice], same_volume: bool, rng: tuple[int, int], notes: list[str]
) -> list[tuple[int, np.ndarray, SupportSlice, bool]]:
    """Where chains start: (slice, mask to derive the first prompts from, support, already accepted)."""
    if same_volume:
        return [(s.index, s.mask, s, True) for s in supports]
    # Another patient: start at the same relative height as the middle support slice and take the
    # support mask itself as the "previous" mask there (no model tells us where the organ is).
    mid = supports[len(supports) // 2]
    n_sup = mid.volume_slices or max(s.index for s in supports) + 1
    rel = mid.index / max(1, n_sup - 1)
    z0 = int(round(rel * (run.n - 1)))
    z0 = min(max(z0, rng[0]), rng[1])
    # Patients differ in position: slide the support mask to where the query looks like the organ.
    # A single 2D image (dermoscopy) may put the lesion anywhere (size search measured no better on
    # ISIC); a volume slice keeps anatomy roughly in place, patients differ a little in size.
    if run.n == 1:
        max_shift, scales = None, (1.0,)
    else:
        max_shift, scales = int(0.15 * max(run.hw)), (0.85, 1.0, 1.15)
    moved, (dx, dy), scale = locate_mask(run.slice(z0), mid.image, mid.mask, max_shift, scales)
    notes.append(
        f"no model: the chain starts at query slice {z0} (same relative height as support slice {mid.index}) "
        f"with prompts from the support mask moved by ({dx}, {dy}) px and scaled x{scale:g} to the best "
        "appearance match"
    )
    return [(z0, moved, mid, False)]


def _run_neighbour(
    run: _Runner,
    supports: list[SupportSlice],
    same_volume: bool,
    rng: tuple[int, int],
    cfg: PropagationConfig,
    notes: list[str],
) -> None:
    lo, hi = rng
    seeds = _neighbour_seeds(run, supports, same_volume, rng, notes)
    # The organ's look is learnt from the support showing most of it: a few annotated slices often
    # include the organ's tips, whose handful of pixels give a poor model and too narrow an
    # intensity band (3 annotated slices on CHAOS MR: 77.7 with each chain's own, 78.0 pooled).
    model = max(supports, key=lambda s: int(s.mask.sum()))
    irange = intensity_range(model.image, model.mask)
    iband = intensity_range(model.image, model.mask, cfg.median_band) if cfg.median_band else None
    fit_reference = getattr(run.segmenter, "fit_reference", None)
    if cfg.shape_prior and fit_reference is not None:
        fit_reference(model.image, model.mask)
    seed_slices = sorted(z for z, *_ in seeds)
    for z0, mask0, sup, accepted in seeds:
        if not accepted:
            run.check_cancel()
            ps = prompts_from_mask(mask0, cfg)
            if ps is None:
                raise ValueError("the support mask leaves no room for a background ring in the query slice")
            m, score = run.segment(z0, ps)
            rep = SliceReport(z0, "neighbour", support_index=sup.index, score=score)
            if m.sum() < cfg.min_area:
                rep.flags.append("chain-end: mask vanished at the seed slice")
                run.reports[z0] = rep
                run.tick(f"slice {z0}: empty")
                notes.append(f"the seed slice {z0} gave no mask; nothing segmented")
                continue
            run.accept(z0, m, rep, ps)
            run.tick(f"slice {z0}")
            mask0 = m
        for step in (-1, 1):
            # Between two annotated slices each one fills up to the midpoint (nearest support).
            others = [s for s in seed_slices if (s - z0) * step > 0]
            if others:
                nxt = min(others, key=lambda s: abs(s - z0))
                # The lower chain takes the midpoint itself (ties go to the lower support).
                stop = (z0 + nxt) // 2 if step > 0 else (z0 + nxt) // 2 + 1
                if step > 0 and stop < z0 + 1:
                    continue
            else:
                stop = hi if step > 0 else lo
            prev = mask0
            peak = trough = int(prev.sum())
            z = z0 + step
            while (step > 0 and z <= stop) or (step < 0 and z >= stop):
                if run.reports[z].source == "annotation":
                    break
                run.check_cancel()
                ps = prompts_from_mask(prev, cfg)
                if ps is None:
                    run.reports[z].flags.append("chain-end: no ring around the previous mask")
                    break
                m, score = run.segment(z, ps)
                retried = False
                if cfg.retry_foreground > cfg.n_foreground and m.sum() * cfg.area_jump < prev.sum():
                    # A collapse is usually the segmenter losing the organ (GrabCut's colour model
                    # latching onto a neighbour), rarely the organ ending: retry with more anchors.
                    ps2 = prompts_from_mask(prev, cfg, cfg.retry_foreground)
                    if ps2 is not None:
                        m2, score2 = run.segment(z, ps2)
                        if m2.sum() > m.sum():
                            m, score, ps, retried = m2, score2, ps2, True
                elif cfg.retry_ring and m.sum() > cfg.area_jump * prev.sum():
                    # A leak: GrabCut spilled over the whole ring polygon; a tighter ring bounds it.
                    ps2 = prompts_from_mask(prev, cfg, ring=cfg.retry_ring)
                    if ps2 is not None:
                        m2, score2 = run.segment(z, ps2)
                        if 0 < m2.sum() < m.sum():
                            m, score, ps, retried = m2, score2, ps2, True
                rep = SliceReport(z, "neighbour", support_index=sup.index, score=score)
                if retried:
                    rep.flags.append("retried with other prompts")
                area, prev_area = int(m.sum()), int(prev.sum())
                end = None
                if area < cfg.min_area:
                    end = "chain-end: mask vanished"
                elif area > cfg.area_jump * prev_area:
                    end = f"chain-end: area jump x{area / max(prev_area, 1):.1f} (leak)"
                elif cfg.regrow and trough < cfg.regrow[0] * peak and area > cfg.regrow[1] * trough:
                    end = f"chain-end: the area grows again (x{area / max(trough, 1):.2f}) after shrinking"
                else:
                    match = intensity_match(run.slice(z), m, irange)
                    if match < cfg.intensity_match:
                        end = f"chain-end: intensity mismatch ({100 * match:.0f}% inside the organ's range)"
                    elif not median_inside(run.slice(z), m, iband):
                        end = "chain-end: median intensity left the organ's band"
                    elif area * cfg.area_jump < prev_area:
                        rep.flags.append(f"area-drop x{prev_area / max(area, 1):.1f}")
                if end is None and cfg.back_check is not None and getattr(run.segmenter, "uses_prior_mask", False):
                    agree = _back_agreement(run, z - step, m, prev)
                    if agree < cfg.back_check:
                        end = f"chain-end: back-check (slice {z - step} re-segmented from this mask agrees {agree:.2f})"
                if end is not None and others and area >= cfg.min_area:
                    # Between two annotated slices the organ does not end: keep the slice, ask for a look.
                    rep.flags.append(f"review: {end.split(': ', 1)[1]} (kept: the organ reaches annotated slice {nxt})")
                    end = None
                if end is not None:
                    rep.flags.append(end)
                    rep.source = "skipped"
                    run.reports[z] = rep
                    run.tick(f"slice {z}: chain ends")
                    notes.append(f"chain from slice {z0} stops before slice {z}: {end.split(': ', 1)[1]}")
                    break
                run.accept(z, m, rep, ps)
                run.tick(f"slice {z}")
                prev = m
                if area > peak:
                    peak = trough = area
                else:
                    trough = min(trough, area)
                z += step


def _back_agreement(run: _Runner, z_prev: int, mask: np.ndarray, prev: np.ndarray) -> float:
    """Dice between `prev` (the accepted mask of slice z_prev) and z_prev segmented again with the
    neighbour prompts of `mask` (the candidate of the next slice): low when the chain jumped."""
    ps = prompts_from_mask(mask, run.config)
    if ps is None:
        return 0.0
    back, _ = run.segment(z_prev, ps)
    total = back.sum() + prev.sum()
    return float(2.0 * np.logical_and(back, prev).sum() / total) if total else 1.0


def _probability_areas(
    run: _Runner,
    supports: list[SupportSlice],
    generator: Any,
    same_volume: bool,
    cfg: PropagationConfig,
    candidates: list[int],
    batch: int = 8,
) -> tuple[dict[int, PromptSet], dict[int, int]]:
    """FoB predictions for the candidate slices and, per slice, the count of confident pixels."""
    assign = assign_supports(candidates, supports, same_volume)
    preds: dict[int, PromptSet] = {}
    areas: dict[int, int] = {}
    groups: dict[int, list[int]] = {}
    for z in candidates:
        groups.setdefault(id(assign[z]), []).append(z)
    for zs in groups.values():
        sup = assign[zs[0]]
        # Small batches: the support is re-encoded per batch, but cancel is honoured quickly.
        for start in range(0, len(zs), batch):
            run.check_cancel()
            part = zs[start : start + batch]
            if hasattr(generator, "predict_batch"):
                out = generator.predict_batch(sup.image, sup.mask, [run.slice(z) for z in part])
            else:
                out = [generator.predict(sup.image, sup.mask, run.slice(z)) for z in part]
            for z, ps in zip(part, out):
                preds[z] = ps
                prob = ps.fg_probability
                count = int((prob >= cfg.prob_threshold).sum()) if prob is not None else 0
                areas[z] = count if count >= cfg.min_prob_area else 0
                run.reports[z].fg_max = float(prob.max()) if prob is not None else None
                run.reports[z].support_index = sup.index
    return preds, areas


def _hybrid_range(
    run: _Runner,
    supports: list[SupportSlice],
    generator: Any,
    same_volume: bool,
    cfg: PropagationConfig,
    rng: tuple[int, int],
    notes: list[str],
) -> tuple[int, int]:
    if cfg.slices != "auto":
        return rng
    cand = list(range(rng[0], rng[1] + 1))
    _, areas = _probability_areas(run, supports, generator, same_volume, cfg, cand)
    anchor = [s.index for s in supports] if same_volume else None
    found = organ_range_from_probability(areas, run.n, anchor, cfg.margin)
    if found is None:
        raise ValueError("FoB's coarse probability finds the organ on no slice; give --slices A:B")
    notes.append(f"FoB's coarse probability puts the organ on slices {found[0]}..{found[1]} (margin {cfg.margin})")
    return found


def _run_fob(
    image: np.ndarray,
    supports: list[SupportSlice],
    segmenter: Any,
    generator: Any,
    axis: int,
    same_volume: bool,
    cfg: PropagationConfig,
    rng: tuple[int, int],
    progress: ProgressCallback | None,
    cancel: CancelCheck | None,
    notes: list[str],
    on_slice: SliceCallback | None = None,
) -> tuple[_Runner, str]:
    lo, hi = rng
    annotated = {s.index for s in supports} if same_volume else set()
    cand = [z for z in range(lo, hi + 1) if z not in annotated]
    # Two passes over the candidates when the range is automatic: predict, then segment.
    total = len(cand) * (2 if cfg.slices == "auto" else 1)
    run = _Runner(image, axis, segmenter, cfg, progress, cancel, total=total, on_slice=on_slice)
    preds, areas = _probability_areas(run, supports, generator, same_volume, cfg, cand)
    run.done = len(cand) if cfg.slices == "auto" else 0
    if cfg.slices == "auto":
        found = organ_range_from_probability(areas, run.n, sorted(annotated) or None, cfg.margin)
        if found is None:
            raise ValueError("FoB's coarse probability finds the organ on no slice; give --slices A:B")
        lo, hi = found
        notes.append(f"FoB's coarse probability puts the organ on slices {lo}..{hi} (margin {cfg.margin})")
    _copy_annotations(run, supports if same_volume else [])
    for z in cand:
        if not lo <= z <= hi:
            continue
        run.check_cancel()
        ps = preds[z]
        m, score = run.segment(z, ps)
        rep = run.reports[z]
        rep.source, rep.score = "fob", score
        run.accept(z, m, rep, ps)
        run.tick(f"slice {z}")
    _flag_jumps(run, lo, hi, cfg)
    return run, "fob"


def _flag_jumps(run: _Runner, lo: int, hi: int, cfg: PropagationConfig) -> None:
    for z in range(max(lo, 1), hi + 1):
        a, b = run.reports[z - 1].area, run.reports[z].area
        if a > 0 and b > 0 and max(a, b) > cfg.area_jump * min(a, b):
            run.reports[z].flags.append(f"area-jump x{max(a, b) / min(a, b):.1f} from slice {z - 1}")


# ----------------------------------------------------------------------------------------------
# files in, file out (what `fob segment`, `fob demo` and batch scripts call)


@dataclass
class SegmentRequest:
    """Everything `fob segment` takes, as plain values (see `fob segment --help`)."""

    image: str | os.PathLike
    output: str | os.PathLike
    support_mask: str | os.PathLike
    support_image: str | os.PathLike | None = None
    support_label: int | None = None
    label_value: int | None = None
    slices: str | tuple[int, int] = "auto"
    segmenter: str = "auto"
    sam_checkpoint: str | None = None
    model: str | None = None
    modality: str = "auto"
    window: tuple[float, float] | None = None
    device: str = "auto"
    prompts_out: str | os.PathLike | None = None
    prompts_in: str | os.PathLike | None = None
    prompts_from: str = "auto"
    axis: int | None = None
    largest_component: bool = False
    config: PropagationConfig | None = None


@dataclass
class SegmentOutcome:
    """What `segment_files` did: the propagation result, the files written, the notes it logged."""

    result: PropagationResult
    output: Path
    prompts_out: Path | None
    messages: list[str]
    query: Any = None  # the query `io.volumes.Volume` (its geometry, path, modality hint)


def _binary_support(label_arr: np.ndarray, label: int | None, path: Path) -> tuple[np.ndarray, int]:
    values = [int(v) for v in np.unique(label_arr) if v != 0]
    if not values:
        raise ValueError(f"the support mask {path.name} is empty (no non-zero voxel)")
    if label is None:
        if len(values) > 1:
            raise ValueError(
                f"the support mask {path.name} holds labels {', '.join(map(str, values))}; choose one with --support-label"
            )
        label = values[0]
    elif label not in values:
        raise ValueError(
            f"support label {label} is not present in {path.name} (labels present: {', '.join(map(str, values))})"
        )
    return label_arr == label, label


def default_slice_axis(geometry: Any) -> tuple[int, str]:
    """The array axis of [k, j, i] to slice along by default, and why.

    A clearly anisotropic volume (one spacing > 1.5x both others) is sliced along its thick axis,
    the acquisition axis, whatever its orientation (oblique cardiac short-axis stacks); otherwise
    along the axial axis from the direction matrix (`io.coords.axial_axis`).
    """
    from FoBSegmentLib.io.coords import axial_axis

    sp = np.asarray(geometry.spacing, dtype=np.float64)
    thick = int(np.argmax(sp))
    others = np.delete(sp, thick)
    if sp[thick] > 1.5 * others.max():
        axis = 2 - thick
        kind = "axial" if axis == axial_axis(geometry) else "not the axial one"
        return axis, f"the acquisition axis, {sp[thick]:.2f} mm slices, {kind}"
    return axial_axis(geometry), "the axial axis of the direction matrix"


def load_generator(model: str | None, required: bool, device: str = "cpu") -> tuple[Any, str]:
    """The FoB generator (`--model PATH` or the shipped default) on `device` ("auto" resolves to
    cuda/mps/cpu) and a line saying which; (None, why) when no default is shipped and `required` is False."""
    try:
        from FoBSegmentLib.model.generator import FoBPromptGenerator
    except ImportError as exc:
        if required or model:
            raise ValueError(f"the FoB model code is not available ({exc})") from None
        return None, "no FoB model code in this installation"
    from FoBSegmentLib.segmenters.base import resolve_device

    dev = resolve_device(device)
    try:
        gen = FoBPromptGenerator.load(model, device=dev) if model else FoBPromptGenerator.load(device=dev)
    except FileNotFoundError as exc:
        if required or model:
            raise
        return None, f"no default FoB model shipped ({' '.join(str(exc).split())})"
    return gen, f"FoB model {Path(model).name if model else 'default (Resources)'} on {dev}"


def segment_files(
    req: SegmentRequest,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    log: Callable[[str], None] | None = None,
    on_slice: SliceCallback | None = None,
) -> SegmentOutcome:
    """Read, normalise, propagate, clean up and write atomically. Every input is checked before any
    computation; nothing is written unless the whole job succeeds. on_slice: see `propagate`."""
    from FoBSegmentLib.io import intensity, volumes

    say = log or (lambda _m: None)
    messages: list[str] = []

    def note(m: str) -> None:
        messages.append(m)
        say(m)

    inputs = [req.image, req.support_mask, req.support_image, req.prompts_in]
    out = volumes.check_output_path(req.output, inputs)
    prompts_out = None
    if req.prompts_out is not None:
        prompts_out = Path(req.prompts_out)
        if not str(prompts_out).endswith(".json"):
            raise ValueError(f"--prompts-out {prompts_out} must end in .mrk.json")
        if not (prompts_out.parent if str(prompts_out.parent) else Path(".")).is_dir():
            raise FileNotFoundError(f"folder of --prompts-out {prompts_out} does not exist")
        for inp in [*inputs, req.output]:
            if inp is not None and Path(inp).resolve() == prompts_out.resolve():
                raise ValueError(f"--prompts-out {prompts_out} is also an input or the output")
    if req.prompts_from not in ("auto", *PROMPT_SOURCES):
        raise ValueError(f"--prompts-from must be auto, {', '.join(PROMPT_SOURCES)}; got {req.prompts_from!r}")

    query = volumes.read_volume(req.image)
    same_file = req.support_image is not None and Path(req.support_image).resolve() == Path(req.image).resolve()
    support_img = volumes.read_volume(req.support_image) if req.support_image is not None and not same_file else query
    support_lab = volumes.read_label(req.support_mask)
    volumes.check_same_grid(support_img, support_lab, "support mask")
    same_volume = support_img is query
    support_bin, label = _binary_support(support_lab.array, req.support_label, Path(req.support_mask))
    if query.is_rgb != support_img.is_rgb:
        raise ValueError("the image and the support image must both be colour (RGB) or both grey")

    if req.axis is not None:
        axis = req.axis
    elif query.is_2d:
        axis = 0
    else:
        axis, why_axis = default_slice_axis(query.geometry)
        note(f"slicing along array axis {axis} of [k, j, i] ({why_axis}); --axis overrides")
    slice_axes(axis)
    if query.is_2d and axis != 0:
        raise ValueError("a 2D image has one slice; --axis must be 0")
    n = query.geometry.array_shape[axis]
    cfg = dataclasses.replace(req.config) if req.config is not None else PropagationConfig()
    cfg.slices = parse_slices(req.slices) if isinstance(req.slices, str) else tuple(req.slices)
    check_slice_range(cfg.slices, n)
    cfg.largest_component = bool(req.largest_component or cfg.largest_component)
    label_value = req.label_value
    if label_value is None:
        # An 8-bit 2D mask is viewed as a picture; 255 matches the dermoscopy masks' convention.
        label_value = 255 if str(out).lower().endswith(".png") else 1
    if not 1 <= label_value <= 65535:
        raise ValueError(f"--label-value must be in 1..65535, got {label_value}")
    if str(out).lower().endswith(".png") and not query.is_2d:
        raise ValueError("a .png output is only for 2D images; use .nii.gz for volumes")

    # intensities
    modalities: dict[str, str] = {}

    def prepare(vol: volumes.Volume, what: str) -> np.ndarray:
        if req.modality == "auto":
            guess = intensity.guess_modality(vol.array, vol.modality_hint, vol.is_rgb)
            note(f"{what}: modality {guess.modality.upper()} ({guess.reason})")
            modality = guess.modality
        else:
            modality = req.modality
            if modality == "rgb" and not vol.is_rgb:
                raise ValueError(f"--modality rgb but {Path(vol.path).name} is not a colour image")
            if vol.is_rgb and modality != "rgb":
                raise ValueError(f"{Path(vol.path).name} is a colour image; use --modality rgb or auto")
        modalities[what] = modality
        window = req.window if modality == "ct" else None
        if req.window is not None and modality != "ct":
            raise ValueError(f"--window applies to CT only, but {what} is treated as {modality.upper()}")
        return intensity.normalize(vol.grid_array if not vol.is_rgb else vol.array, modality, window).reshape(
            vol.grid_array.shape
        )

    q_norm = prepare(query, "image")
    s_norm = q_norm if support_img is query else prepare(support_img, "support image")
    cfg = config_for_modality(cfg, modalities["image"])

    sup_axis = axis if same_volume else (0 if support_img.is_2d else default_slice_axis(support_img.geometry)[0])
    supports = support_slices_from_volume(s_norm, support_bin, sup_axis)
    where = "this image" if same_volume else Path(support_img.path).name
    note(f"support: label {label} of {Path(req.support_mask).name} on {len(supports)} slice(s) of {where}")
    if not same_volume:
        supports = chunk_supports(supports)

    prompts_in = None
    if req.prompts_in is not None:
        from FoBSegmentLib.io.markups import read_prompt_markups

        prompts_in = read_prompt_markups(req.prompts_in, query.geometry, axis)
        if not prompts_in:
            raise ValueError(f"the prompts file {Path(req.prompts_in).name} holds no point")

    # prompt source and model
    source = req.prompts_from
    generator = None
    if prompts_in is None:
        if source in ("fob", "hybrid") or req.model:
            generator, why = load_generator(req.model, required=True, device=req.device)
            note(f"prompts: {why}")
            if source == "auto":
                source = "fob"
        elif source == "auto":
            generator, why = load_generator(None, required=False, device=req.device)
            # With a model, "hybrid": FoB decides where the organ is, neighbour chaining draws it.
            # Measured with the shipped lite model + GrabCut (CHAOS MR 2 and 8, Synapse CT 1, four
            # organs, one middle slice): fob 0.44 / 0.48 mean 3D Dice (MR / CT), hybrid 0.75 / 0.90,
            # neighbour alone 0.75 / 0.90.
            source = "hybrid" if generator is not None else "neighbour"
            if generator is None:
                note(f"prompts: neighbour chaining (no learning), because {why}")
            else:
                note(f"prompts: hybrid (FoB finds the organ's extent, neighbour chaining its shape), {why}")
        else:
            note("prompts: neighbour chaining from the annotated slice (no learning)")
    else:
        source = "neighbour"  # unused: the prompts come from the file
        note(f"prompts: read from {Path(req.prompts_in).name} ({len(prompts_in)} slices)")

    from FoBSegmentLib.segmenters import get_segmenter

    seg = get_segmenter(req.segmenter, checkpoint=req.sam_checkpoint, device=req.device)
    note(getattr(seg, "auto_choice", None) or f"segmenter: {getattr(seg, 'name', req.segmenter)}")

    result = propagate(
        q_norm,
        supports,
        seg,
        axis=axis,
        same_volume=same_volume,
        prompts_from=source,
        generator=generator,
        config=cfg,
        prompts_in=prompts_in,
        progress=progress,
        cancel=cancel,
        on_slice=on_slice,
    )
    for line in result.notes:
        note(line)
    out_arr = result.mask.astype(np.uint16 if label_value > 255 else np.uint8) * label_value
    if prompts_out is not None:
        from FoBSegmentLib.io.markups import write_prompt_markups

        # Written first: if it fails, neither file exists; if the label write fails, remove it.
        write_prompt_markups(prompts_out, result.prompts, query.geometry, axis)
    try:
        volumes.write_label(out, out_arr, query.geometry)
    except BaseException:
        if prompts_out is not None and prompts_out.exists():
            prompts_out.unlink()
        raise
    return SegmentOutcome(result, out, prompts_out, messages, query)
