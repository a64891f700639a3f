"""Dermoscopy: one annotated image -> the lesion in another image (issue 21).

A dermoscopy lesion is, in nearly every image, one blob whose colour differs from the skin around it,
inside the dermatoscope's round field of view. The pipeline therefore does not place the support's
mask (its size says nothing about the query's lesion); it finds the query's lesion from colour:

1. `lesion_score`: per-pixel "lesion-ness" of the query, the sum of robust z-scores of
   - the support's colour discriminant: Fisher's linear discriminant of lesion against skin learnt
     on the support image (CIELAB, each image standardised by its own median and interquartile range
     so that illumination differences between images cancel);
   - the distance from the query's own skin colour: Mahalanobis distance from the colour
     distribution of the periphery of the field of view (which is skin in dermoscopy framing),
     for lesions whose colour the support's lesion does not share;
   - FoB's coarse foreground probability (when a FoB model is given), the learnt support-query
     match.
2. `locate_lesion`: Otsu threshold of the smoothed score inside the inscribed ellipse (the dark
   corners of the dermatoscope's vignette never count as lesion), the component that is both large
   and central, holes filled.
3. `lesion_extent`: where the located boundary is uncertain. Otsu cuts the lesion's faint
   periphery off whenever the score there lies between skin and the lesion's core, so the located
   lesion is widened by everything connected to it that the score does not call typical skin (above
   the median score of the Otsu skin class). A ring point must lie where the cues say skin.
4. `lesion_prompts`: a background ring around that extent at a distance proportional to the located
   lesion's size (the BPPC ring of `prompts.ring`), foreground points spread inside the located
   lesion, and a soft prior map from the located lesion; then the colour segmenter cuts the lesion
   (the ring only bounds it: the prior and colour decide how far into the uncertain band it goes).

Frames: images (H, W, 3) float in [0, 1], masks (H, W) bool indexed [row, col], points (x, y) =
(column, row) pixels. Measurements of every choice: docs/RESULTS.md, "Dermoscopy (issue 21)".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.prompts.ring import ring_points
from FoBSegmentLib.prompts.sampling import mask_prompt_points


@dataclass
class LesionConfig:
    """The dermoscopy pipeline's settings.

    smooth: Gaussian sigma of the score map as a fraction of the image diagonal.
    periphery: (inner, outer) radii of the skin annulus, in units of the inscribed ellipse.
    min_area: smallest candidate component, as a fraction of the image area.
    ring_distance: the background ring's distance from the located lesion, as a fraction of the
        lesion's equivalent radius (at least 5 px).
    n_background / n_foreground: prompt counts.
    prior_sigma: blur of the located mask (fraction of its radius) handed to the segmenter as
        `fg_probability` (interior pixels far from the located lesion start as probable background).
    fob_weight: weight of FoB's coarse probability in the score (0 = colour only).
    ring_extent: ring around `lesion_extent` (the located lesion widened by its uncertain band)
        instead of around the located lesion itself.
    """

    smooth: float = 0.01
    periphery: tuple[float, float] = (0.75, 0.95)
    min_area: float = 0.005
    ring_distance: float = 0.15
    n_background: int = 16
    n_foreground: int = 10
    prior_sigma: float = 0.1
    fob_weight: float = 1.0
    ring_extent: bool = True


def _lab_features(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) CIELAB of an RGB [0, 1] image, lightly blurred (hair, noise), each channel
    standardised by the image's own median and interquartile range."""
    rgb = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"the dermoscopy pipeline needs an (H, W, 3) colour image, got shape {rgb.shape}")
    lab = cv2.cvtColor((rgb * 255).astype(np.uint8), cv2.COLOR_RGB2LAB).astype(np.float32)
    lab = cv2.GaussianBlur(lab, (0, 0), 2.0)
    flat = lab.reshape(-1, 3)
    med = np.median(flat, axis=0)
    iqr = np.percentile(flat, 75, axis=0) - np.percentile(flat, 25, axis=0) + 1.0
    return (lab - med) / iqr


def _ellipse_radius(shape: tuple[int, int]) -> np.ndarray:
    """(H, W) radius in units of the inscribed ellipse (1 on the ellipse)."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    return np.sqrt(((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2)


def _robust_z(a: np.ndarray) -> np.ndarray:
    spread = float(np.percentile(a, 90) - np.percentile(a, 10))
    return (a - float(np.median(a))) / (spread if spread > 1e-6 else 1.0)


def colour_discriminant(support_image: np.ndarray, support_mask: np.ndarray) -> np.ndarray:
    """(3,) Fisher discriminant of lesion against skin on the support, in `_lab_features` units."""
    m = np.asarray(support_mask, bool)
    if not m.any() or m.all():
        raise ValueError("the support mask must hold both lesion and skin pixels")
    f = _lab_features(support_image).reshape(-1, 3)
    a, b = f[m.ravel()], f[~m.ravel()]
    within = np.cov(a.T) + np.cov(b.T) + 1e-3 * np.eye(3)
    return np.linalg.solve(within, a.mean(axis=0) - b.mean(axis=0))


def lesion_score(
    query: np.ndarray,
    support_image: np.ndarray,
    support_mask: np.ndarray,
    fg_probability: np.ndarray | None = None,
    config: LesionConfig | None = None,
) -> np.ndarray:
    """(H, W) float32 lesion-ness of `query` (higher = lesion); see the module docstring."""
    cfg = config or LesionConfig()
    feats = _lab_features(query)
    h, w = feats.shape[:2]
    if support_image.shape[:2] != np.asarray(support_mask).shape:
        raise ValueError("the support mask's size differs from its image")
    score = _robust_z(feats @ colour_discriminant(support_image, support_mask))
    r = _ellipse_radius((h, w))
    skin = feats[(r > cfg.periphery[0]) & (r < cfg.periphery[1])]
    if len(skin) > 10:
        mu = np.median(skin, axis=0)
        cov = np.cov((skin - mu).T) + 1e-2 * np.eye(3)
        d = feats - mu
        score = score + _robust_z(np.sqrt(np.einsum("hwi,ij,hwj->hw", d, np.linalg.inv(cov), d)))
    if fg_probability is not None and cfg.fob_weight > 0:
        p = np.asarray(fg_probability, np.float32)
        if p.shape != (h, w):
            raise ValueError(f"fg_probability has shape {p.shape}, the query {(h, w)}")
        score = score + cfg.fob_weight * _robust_z(p)
    return ndi.gaussian_filter(score, cfg.smooth * float(np.hypot(h, w))).astype(np.float32)


def _score_levels(score: np.ndarray) -> tuple[float, float] | None:
    """(Otsu threshold, median of the Otsu skin class) of a `lesion_score` map inside the field of
    view; None for a flat map."""
    from skimage.filters import threshold_otsu

    vals = score[_ellipse_radius(score.shape) <= 1.0]
    if vals.max() <= vals.min():
        return None
    t = float(threshold_otsu(vals))
    return t, float(np.median(vals[vals <= t]))


def locate_lesion(score: np.ndarray, config: LesionConfig | None = None) -> np.ndarray:
    """(H, W) bool: the located lesion of a `lesion_score` map (empty when nothing qualifies)."""
    cfg = config or LesionConfig()
    h, w = score.shape
    inside = _ellipse_radius((h, w)) <= 1.0
    levels = _score_levels(score)
    if levels is None:
        return np.zeros((h, w), bool)
    cand = (score > levels[0]) & inside
    cand = ndi.binary_opening(cand, iterations=2)
    cand = ndi.binary_fill_holes(cand)
    labels, n = ndi.label(cand)
    if n == 0:
        return np.zeros((h, w), bool)
    idx = np.arange(1, n + 1)
    area = ndi.sum(cand, labels, idx)
    cy, cx = (np.asarray(c) for c in zip(*ndi.center_of_mass(cand, labels, idx)))
    # large AND central: the lesion is what the dermatologist framed
    off = ((cy - h / 2) / h) ** 2 + ((cx - w / 2) / w) ** 2
    merit = np.where(area >= cfg.min_area * h * w, area * np.exp(-4.0 * off), -1.0)
    if merit.max() < 0:
        return np.zeros((h, w), bool)
    return labels == int(idx[int(np.argmax(merit))])


def lesion_extent(score: np.ndarray, located: np.ndarray) -> np.ndarray:
    """(H, W) bool: `located` widened by its uncertain band, the components of "score above the median
    of the Otsu skin class" (inside the field of view, opened like the located lesion) that touch it,
    holes filled. Where the lesion's periphery is faint (lighter than its core, or as light as the
    support's skin) this reaches past the located boundary; where the boundary is sharp it adds a
    few pixels."""
    m = np.asarray(located, bool)
    levels = _score_levels(score)
    if levels is None or not m.any():
        return m.copy()
    above = (score > levels[1]) & (_ellipse_radius(score.shape) <= 1.0)
    above = ndi.binary_opening(above, iterations=2) | m
    labels, _n = ndi.label(above)
    ids = np.unique(labels[m])
    return ndi.binary_fill_holes(np.isin(labels, ids[ids > 0]))


def lesion_prompts(located: np.ndarray, config: LesionConfig | None = None,
                   extent: np.ndarray | None = None) -> PromptSet:
    """Background ring around `extent` (the located lesion when None), foreground points inside the
    located lesion, and a soft prior from it. The ring's distance scales with the located lesion."""
    cfg = config or LesionConfig()
    m = np.asarray(located, bool)
    if not m.any():
        raise ValueError("no lesion located")
    around = m if extent is None else (np.asarray(extent, bool) | m)
    radius = float(np.sqrt(m.sum() / np.pi))
    k_in = 2 * max(2, int(round(cfg.ring_distance * radius))) + 1
    ring = (k_in + 10, k_in)
    bg, fg = mask_prompt_points(m, cfg.n_background, cfg.n_foreground, ring=ring)
    if around is not m:
        pts, valid = ring_points(around, cfg.n_background, *ring)
        bg = pts[valid]
    prior = ndi.gaussian_filter(m.astype(np.float32), max(1.0, cfg.prior_sigma * radius))
    return PromptSet(background=bg, foreground=fg, fg_probability=np.clip(prior, 0.0, 1.0))


def located_prompts(score: np.ndarray, located: np.ndarray, config: LesionConfig) -> PromptSet:
    """`lesion_prompts` for the lesion `located` on the `score` map, the ring around its
    `lesion_extent` unless `config.ring_extent` is off."""
    return lesion_prompts(located, config, lesion_extent(score, located) if config.ring_extent else None)


def segment_lesion(
    query: np.ndarray,
    support_image: np.ndarray,
    support_mask: np.ndarray,
    segmenter: Any,
    fg_probability: np.ndarray | None = None,
    config: LesionConfig | None = None,
) -> tuple[np.ndarray, PromptSet | None, np.ndarray]:
    """(lesion mask (H, W) bool, the prompts handed to the segmenter or None, located mask).

    The located mask is the answer when the segmenter rejects the prompts; an empty located mask
    gives an empty answer and no prompts."""
    cfg = config or LesionConfig()
    score = lesion_score(query, support_image, support_mask, fg_probability, cfg)
    located = locate_lesion(score, cfg)
    if not located.any():
        return located, None, located
    prompts = located_prompts(score, located, cfg)
    # OpenCV's GrabCut seeds its GMMs from a global RNG: same inputs, same mask.
    cv2.setRNGSeed(0)
    try:
        mask = np.asarray(segmenter.segment(query, prompts).mask, bool)
    except ValueError:
        return located, prompts, located
    return (mask if mask.any() else located), prompts, located


def run_skin(run: Any, supports: list, generator: Any = None, config: LesionConfig | None = None) -> None:
    """`propagate`'s path for a colour 2-D query with another image's annotation (`Runner` `run`,
    one slice): FoB's coarse probability (when `generator` is given) and colour locate the lesion,
    the colour segmenter cuts it. The support is the first annotated support slice."""
    from FoBSegmentLib.propagation.fob import dequantize_probability, quantize_probability

    sup = next(s for s in supports if s.mask.any())
    query = run.slice(0)
    prob = None
    if generator is not None:
        prob = generator.predict(sup.image, sup.mask, query).fg_probability
        # the record stores the map in 8 bits; the segmenter sees exactly what a replay will see
        prob = dequantize_probability(quantize_probability(prob)) if prob is not None else None
    cfg = config or LesionConfig()
    score = lesion_score(query, sup.image, sup.mask, prob, cfg)
    located = locate_lesion(score, cfg)
    rep = run.reports[0]
    rep.support_index = sup.index
    rep.fg_max = float(prob.max()) if prob is not None else None
    if not located.any():
        run.end_chain(0, rep, "chain-end: no lesion found", "no lesion found in the image (colour and FoB agree on "
                      "no central blob)")
        return
    prompts = located_prompts(score, located, cfg)
    prompts.fg_probability = dequantize_probability(quantize_probability(prompts.fg_probability))
    mask, score = run.segment(0, prompts)
    rep.source, rep.score = "fob", score
    run.accept(0, mask if mask.any() else located, rep, prompts)
    run.tick("image 0")
    seg_name = getattr(run.segmenter, "name", "the segmenter")
    if hasattr(run.segmenter, "colour_fallback"):
        seg_name += " (its colour-GMM graph cut for a colour image with prompts)"
    run.notes.append("dermoscopy pipeline: lesion located by " + ("FoB's coarse probability and " if prob is not None
                     else "") + f"colour (support's lesion/skin discriminant, distance from the skin), then {seg_name}")
