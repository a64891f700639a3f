"""The neighbour chain: prompts for slice z come from the accepted mask of the adjacent slice (a
BPPC ring outside it, points deep inside it, the mask itself as shape prior), chained outwards from
each annotated slice until an image-only stopping rule fires.

Frames: masks are (H, W) bool slices along the run's axis; prompts are (x, y) = (column, row) pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from FoBSegmentLib.io.coords import point_pixels
from FoBSegmentLib.labelmap import dice
from FoBSegmentLib.morphology import distance_to, solidity
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.prompts.ring import ring_points
from FoBSegmentLib.prompts.sampling import interior_points
from FoBSegmentLib.propagation.config import PropagationConfig
from FoBSegmentLib.propagation.fob import FoBStep, chained_prompts, fob_step
from FoBSegmentLib.propagation.motion import move_mask, moves_prior
from FoBSegmentLib.propagation.refine import refine_slice
from FoBSegmentLib.propagation.runner import Kept, Runner, cleanup_3d
from FoBSegmentLib.propagation.stopping import intensity_match, intensity_range, median_inside
from FoBSegmentLib.propagation.supports import locate_mask
from FoBSegmentLib.propagation.types import SliceReport, SupportSlice

# A cross-patient second pass seeds only from a first-pass cross-section at least this share as solid
# (`morphology.solidity`) as the support's organ on its slice (`second_pass`). Set by reasoning (an
# organ's cross-sections keep about its shape, two organs side by side do not), the only value run:
# the cross-patient section of docs/RESULTS.md.
SEED_SOLIDITY = 0.9
# `config.second_pass_refine`: the refined seed is kept only while it overlaps the first pass's
# cross-section at least this much (Dice): a refinement moves edges, and one that changes more has
# found another structure. Set by reasoning, the only value run.
SEED_REFINE_AGREEMENT = 0.75
# A cross-patient seed cut into more pieces than this (of `min_area` pixels or more) is not sorted
# (`seed_piece`): a look that fits the organ cuts it in one piece, or in a few beside neighbours; in
# many, the look does not fit the slice, and which piece holds the organ says little.
SEED_PIECES = 3


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


@dataclass
class Appearance:
    """What the chain's intensity rules learnt from the annotated slices: the organ's 2-98 %
    intensity range and its median band (both None when unknown)."""

    irange: tuple[np.ndarray, np.ndarray] | None
    iband: tuple[np.ndarray, np.ndarray] | None


def learn_appearance(run: Runner, supports: list[SupportSlice]) -> Appearance:
    """Learn the organ's look from every annotated slice that shows it, pooled (more of the organ's
    texture than any one slice; a tip alone gives a poor model); a segmenter with `fit_reference`
    (graphcut) learns from the same pixels. Deterministic: a replay re-learns the same."""
    cfg = run.config
    shown = [s for s in supports if s.mask.any()]
    # Side by side: one sample of the organ and its surroundings from every annotated slice.
    image = np.concatenate([s.image for s in shown], axis=1)
    mask = np.concatenate([s.mask for s in shown], axis=1)
    fit_reference = getattr(run.segmenter, "fit_reference", None)
    if cfg.shape_prior and fit_reference is not None:
        fit_reference(image, mask, len(shown))
    return _intensities(cfg, image, mask)


def _intensities(cfg: PropagationConfig, image: np.ndarray, mask: np.ndarray) -> Appearance:
    return Appearance(
        intensity_range(image, mask),
        intensity_range(image, mask, cfg.median_band) if cfg.median_band else None,
    )


def nearest_annotation(run: Runner, z: int) -> int:
    """The annotated slice showing the organ nearest slice z (the root of a chain outward from the
    annotated span, for z beyond it)."""
    return min(run.annotated_with_organ(), key=lambda a: (abs(a - z), a))


def chain_stop(z0: int, step: int, seed_slices: list[int], rng: tuple[int, int],
               areas: dict[int, int] | None) -> tuple[int, int | None] | None:
    """Where a chain from seed z0 in direction `step` ends: (last slice, next annotated slice or None);
    None when this chain does not run.

    Outside the annotated slices the chain runs to the end of the range. Between two annotated
    slices, with `areas` (seed -> pixels; for segmenters with a shape prior), the one showing more
    of the organ fills the whole gap (ties: the lower slice; a z0 that is no annotated slice, the
    seed of `tip_consensus`, fills up to the annotation): a shape-prior chain follows an organ
    that shrinks towards its tip well, but grows out of a tip's handful of pixels badly. Without
    `areas` (GrabCut and the like) each fills up to the midpoint, the lower one taking it.
    docs/RESULTS.md ("Tuning notes") has the measurements."""
    others = [s for s in seed_slices if (s - z0) * step > 0]
    if not others:
        return (rng[1] if step > 0 else rng[0]), None
    nxt = min(others, key=lambda s: abs(s - z0))
    if areas is None:
        stop = (z0 + nxt) // 2 if step > 0 else (z0 + nxt) // 2 + 1
        return (stop, nxt) if (stop - z0) * step > 0 else None
    if abs(nxt - z0) < 2:
        return None
    if z0 not in areas or areas[z0] > areas[nxt] or (areas[z0] == areas[nxt] and z0 < nxt):
        return nxt - step, nxt
    return None


def interpolated_gaps(run: Runner, seeds: dict[int, np.ndarray], areas: dict[int, int] | None) -> list[tuple[int, int]]:
    """The gaps (a, b) between neighbouring annotated slices (both showing the organ, at least one slice
    between them) that are filled from their interpolated shape (`config.interpolate_agreement`);
    areas: `fill_areas` of the seeds (None: the segmenter has no shape prior, no gap is)."""
    cfg = run.config
    if cfg.interpolate_agreement is None or areas is None:
        return []
    zs = sorted(z for z, m in seeds.items() if m.any())
    return [(a, b) for a, b in zip(zs, zs[1:])
            if b - a >= 2 and dice(seeds[a], seeds[b]) >= cfg.interpolate_agreement
            and gap_look(run, a, seeds[a], b) != "tip" and gap_look(run, b, seeds[b], a) != "tip"]


def interpolate_shape(mask_a: np.ndarray, mask_b: np.ndarray, t: float) -> np.ndarray:
    """The shape a fraction t (0..1) of the way from (H, W) bool mask_a to mask_b: the zero level of the
    linearly blended signed distance maps (shape-based interpolation, Raya and Udupa 1990)."""
    def signed(m: np.ndarray) -> np.ndarray:
        return ndimage.distance_transform_edt(~m) - ndimage.distance_transform_edt(m)

    return (1.0 - t) * signed(np.asarray(mask_a, bool)) + t * signed(np.asarray(mask_b, bool)) < 0


def fill_gap(run: Runner, a: int, mask_a: np.ndarray, b: int, mask_b: np.ndarray, support_index: int) -> None:
    """Segment the slices strictly between annotated slices a < b, each from the shape interpolated
    between their masks (ring and points from it, it as the stored shape prior): source
    "interpolated", no parent, so an edit of one of them changes that slice alone. An explicit slice
    range (`config.slices`) is honoured."""
    lo, hi = (0, run.n - 1) if run.config.slices == "auto" else run.config.slices
    for z in range(max(a + 1, lo), min(b, hi + 1)):
        run.check_cancel()
        shape = interpolate_shape(mask_a, mask_b, (z - a) / (b - a))
        ps = prompts_from_mask(shape, run.config)
        if ps is None:
            continue
        m, score = run.segment(z, ps)
        run.accept(z, m, SliceReport(z, "interpolated", support_index=support_index, prior="stored", score=score), ps)
        run.tick(f"slice {z}")


def fill_areas(run: Runner, seeds: dict[int, np.ndarray]) -> dict[int, int] | None:
    """The `areas` argument of `chain_stop` for this run's segmenter."""
    if not (run.config.shape_prior and getattr(run.segmenter, "uses_prior_mask", False)):
        return None
    return {z: int(np.count_nonzero(m)) for z, m in seeds.items()}


def _segment_from(run: Runner, z: int, prev: np.ndarray, parent: int | None = None, moved: bool = False
                  ) -> tuple[np.ndarray, float, PromptSet, bool, FoBStep | None] | None:
    """Slice z segmented with prompts from `prev` (the accepted mask of slice `parent`), retried
    once on a collapse or a leak. moved: the prompts and shape prior come from `prev` carried onto
    slice z by the motion between the two slices (`motion.move_mask`). In a chained-FoB run
    (`run.generator` set) FoB predicts slice z from (parent, prev) once and every try's prompts
    carry its prediction (`chained_prompts`)."""
    cfg = run.config
    step = None
    if run.generator is not None and parent is not None:
        run.check_cancel()
        step = fob_step(run.generator, run.slice(parent), prev, run.slice(z))
    shape = move_mask(prev, run.slice(parent), run.slice(z)) if moved and parent is not None else prev

    def prompts(n_foreground: int | None = None, ring: tuple[int, int] | None = None) -> PromptSet | None:
        ps = prompts_from_mask(shape, cfg, n_foreground, ring)
        return ps if ps is None or step is None else chained_prompts(ps, step, shape, cfg)

    ps = prompts()
    if ps is None:
        return None
    m, score = run.segment(z, ps)
    retried = False
    if cfg.retry_foreground > cfg.n_foreground and m.sum() * cfg.area_jump < prev.sum():
        # A collapse is usually the segmenter losing the organ (GrabCut's colour model latching
        # onto a neighbour), rarely the organ ending: retry with more anchors.
        ps2 = prompts(cfg.retry_foreground)
        if ps2 is not None:
            m2, score2 = run.segment(z, ps2)
            if m2.sum() > m.sum():
                m, score, ps, retried = m2, score2, ps2, True
    elif cfg.retry_ring and m.sum() > cfg.area_jump * prev.sum():
        # A leak: GrabCut spilled over the whole ring polygon; a tighter ring bounds it.
        ps2 = prompts(ring=cfg.retry_ring)
        if ps2 is not None:
            m2, score2 = run.segment(z, ps2)
            if 0 < m2.sum() < m.sum():
                m, score, ps, retried = m2, score2, ps2, True
    return m, score, ps, retried, step


def area_extremes(peak: int, trough: int, area: int) -> tuple[int, int]:
    """The (peak, trough) `end_reason` reads after a slice of `area` px is accepted: the largest area
    of the chain so far, and the smallest since that peak."""
    return (area, area) if area > peak else (peak, min(trough, area))


def end_reason(run: Runner, z: int, step: int, m: np.ndarray, prev: np.ndarray, peak: int, trough: int,
               look: Appearance, rep: SliceReport, fob: FoBStep | None = None) -> str | None:
    """Why a chain stepping `step` ends at slice z with mask m after `prev` ((H, W) bool; peak /
    trough: the largest area so far and the smallest since), or None: it goes on. `fob`: chained
    FoB's view of slice z, whose coarse map takes part."""
    cfg = run.config
    area, prev_area = int(m.sum()), int(prev.sum())
    if area < cfg.min_area:
        return "chain-end: mask vanished"
    if area > cfg.area_jump * prev_area:
        return f"chain-end: area jump x{area / max(prev_area, 1):.1f} (leak)"
    if fob is not None:
        # Chained FoB: the model, shown the previous slice and its mask, says whether the organ
        # goes on (its coarse map; image evidence only, the reference is never read).
        mean_p = fob.mean_inside(m)
        rep.fg_max = float(fob.probability.max())
        if cfg.fob_absent and fob.organ_pixels(cfg.prob_threshold) < cfg.min_prob_area:
            return f"chain-end: FoB sees no organ (max probability {rep.fg_max:.2f})"
        if cfg.fob_stop_prob is not None and mean_p < cfg.fob_stop_prob:
            return f"chain-end: FoB's coarse map disagrees with the mask (mean probability {mean_p:.2f})"
    end = _image_end_reason(run, z, step, m, prev, peak, trough, look, rep)
    if end is not None and fob is not None and cfg.fob_keep_prob is not None:
        mean_p = fob.mean_inside(m)
        if mean_p >= cfg.fob_keep_prob:
            rep.flags.append(f"review: {end.split(': ', 1)[1]} (kept: FoB's mean probability {mean_p:.2f})")
            return None
    return end


def _image_end_reason(run: Runner, z: int, step: int, m: np.ndarray, prev: np.ndarray, peak: int, trough: int,
                      look: Appearance, rep: SliceReport) -> str | None:
    """The image-only rules (intensity, median band, regrow, back-check)."""
    cfg = run.config
    area, prev_area = int(m.sum()), int(prev.sum())
    if cfg.regrow and trough < cfg.regrow[0] * peak and area > cfg.regrow[1] * trough:
        return f"chain-end: the area grows again (x{area / max(trough, 1):.2f}) after shrinking"
    match = intensity_match(run.slice(z), m, look.irange)
    if match < cfg.intensity_match:
        return f"chain-end: intensity mismatch ({100 * match:.0f}% inside the organ's range)"
    if not median_inside(run.slice(z), m, look.iband):
        return "chain-end: median intensity left the organ's band"
    if area * cfg.area_jump < prev_area:
        rep.flags.append(f"area-drop x{prev_area / max(area, 1):.1f}")
    if cfg.back_check is not None and getattr(run.segmenter, "uses_prior_mask", False):
        agree = _back_agreement(run, z - step, m, prev)
        if agree < cfg.back_check:
            return f"chain-end: back-check (slice {z - step} re-segmented from this mask agrees {agree:.2f})"
    return None


def chain(run: Runner, z0: int, mask0: np.ndarray, step: int, stop: int, nxt: int | None,
          support_index: int, look: Appearance) -> None:
    """Chain from slice z0 (accepted mask `mask0`) one slice at a time in direction `step` up to
    `stop` inclusive; nxt: the annotated slice the chain runs towards (no chain ends before it)."""
    if not np.any(mask0):
        return  # an annotated absence: nothing to chain from
    _chain(run, z0, mask0, step, stop, nxt, support_index, look, gap_look(run, z0, mask0, nxt))


def gap_look(run: Runner, z0: int, mask0: np.ndarray, nxt: int | None) -> str:
    """How the steps of a chain from annotated slice z0 (mask `mask0`) towards annotated slice `nxt`
    learn the organ's look (`SliceReport.look`): "own" (outward, nxt None, with
    `config.outward_own_look` and several annotated slices: from the annotated slice it runs from
    alone), "annotations" (once, from the annotated slices),
    "parent" (`relearn_gap_look`: at every step between two annotated slices showing the organ) or
    "tip" (such a chain starting from one of the organ's tips, from the outermost annotated slice,
    small against the gap (`tip_ratio`) or where the organ ends (`tip_end`): it must grow, see
    `gap_step`)."""
    cfg = run.config
    relearns = cfg.shape_prior and getattr(run.segmenter, "fit_reference", None) is not None
    if nxt is None:
        # Outward from the annotated span: annotations drawn far away, near the organ's other end
        # (partial volume), widen a pooled look and the chain runs on past this end.
        own = relearns and cfg.outward_own_look and len(run.annotated_with_organ()) > 1
        return "own" if own else "annotations"
    if not (relearns and cfg.relearn_gap_look and run.accepted(nxt).any()):
        return "annotations"
    across, rows, cols = run.spacing
    radius = np.sqrt(np.count_nonzero(mask0) * rows * cols / np.pi)
    # Outermost: no annotated slice showing the organ lies behind z0 (a slice between two others is
    # no tip, however small the organ: a tiny kidney's middle slice is not where it grows from).
    behind = any((a - z0) * (nxt - z0) < 0 for a in run.annotated_with_organ())
    tip = (cfg.tip_ratio is not None and getattr(run.segmenter, "grow_weight", None) is not None
           and not behind and (radius < cfg.tip_ratio * abs(nxt - z0) * across
                               or (cfg.tip_end is not None and _beyond(run, z0, nxt) <= cfg.tip_end)))
    return "tip" if tip else "parent"


def _beyond(run: Runner, z0: int, nxt: int) -> int:
    """How many slices the chain outward from annotated slice z0 (away from `nxt`) accepted in a row:
    few where the organ ends at z0 (`run_neighbour` runs the outward chains first)."""
    away = 1 if z0 > nxt else -1
    z = z0 + away
    while 0 <= z < run.n and run.reports[z].source == "neighbour" and run.accepted(z).any():
        z += away
    return abs(z - z0) - 1


@contextmanager
def gap_step(run: Runner, look: str, z: int, parent: int, prev: np.ndarray, ahead: int | None,
             exclude: np.ndarray | None = None, cone: bool = False) -> Iterator[None]:
    """The segmenter, for one step onto slice z from `parent` (accepted mask `prev`) of a chain whose
    steps learn their look `look` (`gap_look`), towards annotated slice `ahead`; put back afterwards.

    "own": the look is fitted to the annotated slice nearest z alone (`gap_look`).
    "parent": the look is fitted to the annotated slices showing the organ and `parent` under
    `prev`, side by side as `learn_appearance` does: annotations at the organ's tips show little of
    it (partial volume), and a look learnt from them alone calls the organ's body background.
    "tip": the chain starts from a tip and must grow, slice after slice, into an organ much larger
    than its seed. The look is fitted to the annotated slices and slice z itself under `prev` (a
    growing organ covers its parent's footprint; the parent, at a tip, is mostly partial volume),
    growth beyond the prior costs `tip_grow_weight` per px instead of the segmenter's own weight.
    Either way, given `ahead`, the organ stays within the reach of that annotated slice (`reach_of`):
    it has to shrink back into that annotation by the time it gets there (`_chain` gives a
    "parent" step its `ahead` with `config.gap_reach`). exclude: (H, W) bool, pixels of `prev` the
    look learns as surroundings (a trimmed body seed, `refine_body_seed`). cone: the reach is the
    annotation's cone alone (`reach_of`)."""
    seg = run.segmenter
    if look == "annotations":
        yield
        return
    kept = (seg.reference, getattr(seg, "grow_weight", None), getattr(seg, "reach", None))
    cfg = run.config
    try:
        if look == "own":
            root = nearest_annotation(run, z)
            seg.fit_reference(run.slice(root), run.accepted(root))
            yield
            return
        shown = run.annotated_with_organ()
        source = z if look == "tip" else parent
        image = np.concatenate([run.slice(a) for a in shown] + [run.slice(source)], axis=1)
        mask = np.concatenate([run.accepted(a) for a in shown] + [prev], axis=1)
        if exclude is not None:
            exclude = np.concatenate([np.zeros_like(run.accepted(a)) for a in shown] + [exclude], axis=1)
        seg.fit_reference(image, mask, len(shown) + 1, exclude=exclude)
        if look == "tip":
            seg.grow_weight = cfg.tip_grow_weight
        if ahead is not None and run.accepted(ahead).any() and hasattr(seg, "reach"):
            seg.reach = reach_of(run, look, z, parent, prev, ahead, cone)
        yield
    finally:
        seg.reference = kept[0]
        if look == "tip":
            seg.grow_weight = kept[1]
        if hasattr(seg, "reach"):
            seg.reach = kept[2]


def reach_of(run: Runner, look: str, z: int, parent: int, prev: np.ndarray, ahead: int, cone: bool = False
             ) -> np.ndarray:
    """(H, W) bool: where the organ may lie on slice z, one step of a chain (look `look`) from slice
    `parent` (accepted mask `prev`) towards annotated slice `ahead`: within `tip_reach` px a slice of
    that annotation (a cone). On a "parent" step with `config.gap_reach_cap` (not `cone`), also within the
    parent's extent around the annotation (its farthest pixel's distance, px) shrunk as a smooth
    organ's cap shrinks towards its end: its cross-section's area falls about linearly with the
    distance to the end there, its extent like the square root of it, so by sqrt(d / d_parent)
    (slices to `ahead`). The larger of the two: a cone from a small end annotation cuts a domed
    organ (a liver's top) well before its end, where the cap keeps it and still shrinks a chain that
    holds its size into the end (docs/RESULTS.md, "Tuning notes", `gap_reach_cap`)."""
    end = run.accepted(ahead)
    d = abs(z - ahead)
    radius = run.config.tip_reach * d
    if look == "parent" and run.config.gap_reach_cap and not cone and prev.any():
        # The whole slice's distances: the parent's extent needs them, and the reach is read off them too.
        far = ndimage.distance_transform_edt(~end)
        radius = max(radius, float(far[prev].max()) * float(np.sqrt(d / max(abs(parent - ahead), d))))
        return far <= radius
    return distance_to(end, radius) <= radius


def _chain(run: Runner, z0: int, mask0: np.ndarray, step: int, stop: int, nxt: int | None,
           support_index: int, look: Appearance, step_look: str, reach: bool = True) -> None:
    """`chain`'s steps; reach=False: a "parent" chain not held to the reach of the annotation ahead
    even with `config.gap_reach` (`tip_consensus`'s fallback)."""
    cfg = run.config
    # The annotated slice whose reach holds each step (`gap_step`), kept in the record for a replay.
    ahead = nxt if step_look == "tip" or (step_look == "parent" and reach and cfg.gap_reach) else None
    # Not from a tip (there the organ grows out of partial volume, and the flow of a few pixels of it
    # carried the prior astray) nor from another patient's located seed (an imperfect seed moved
    # along lost livers): docs/RESULTS.md, "Tuning notes", `moved_prior`.
    moved = moves_prior(cfg, run.segmenter) and run.same_volume and step_look != "tip"
    if step_look == "own":
        root = nearest_annotation(run, z0)
        look = _intensities(cfg, run.slice(root), run.accepted(root))
    prev = mask0
    peak = trough = int(prev.sum())
    key = [int(z0), int(step), int(stop), None if nxt is None else int(nxt)]
    z = z0 + step
    while (step > 0 and z <= stop) or (step < 0 and z >= stop):
        if run.is_seed(z):
            break
        run.check_cancel()
        earlier = run.reuse.get(z)
        if earlier is not None and earlier[0].chain == key:
            # The same chain ran here before, from the same annotation: its slices come out the same.
            rep = dataclasses.replace(earlier[0], flags=list(earlier[0].flags))
            if rep.source == "skipped":
                end = next(f for f in rep.flags if f.startswith("chain-end"))
                run.end_chain(z, rep, None, f"chain from slice {z0} stops before slice {z}: {end.split(': ', 1)[1]}")
                break
            m = earlier[1]
            run.accept(z, m, rep, earlier[2])
            run.tick(f"slice {z}")
            prev = m
            peak, trough = area_extremes(peak, trough, int(m.sum()))
            z += step
            continue
        got = _step(run, z, step, prev, moved, step_look, ahead, key, support_index, peak, trough, look)
        if got is not None and got[3] is not None and ahead is not None and step_look == "parent" \
                and cfg.gap_reach_cap:
            # The cap lets a chain run on towards a domed organ's end at the size the image shows; a
            # step where it fails an end rule (it holds its size into a neighbour, or off the organ)
            # is held to the cone, which shrinks it into the annotation ahead (`reach_of`).
            got = _step(run, z, step, prev, moved, step_look, ahead, key, support_index, peak, trough, look,
                        cone=True)
        if got is not None and ahead is not None and step_look == "parent" and got[0].sum() < cfg.min_area:
            # The reach of the annotation ahead guards against leaks; it must not lose the organ. An
            # annotation ahead that shows only a sliver of it (a tip drawn a few slices on) can place
            # the reach off the organ's body: the chain goes on without it.
            again = _step(run, z, step, prev, moved, step_look, None, key, support_index, peak, trough, look)
            if again is not None and again[0].sum() >= cfg.min_area:
                got, ahead = again, None
        if got is None:
            run.reports[z] = SliceReport(z, "skipped", chain=key, flags=["chain-end: no ring around the previous mask"])
            break
        m, ps, rep, end = got
        area = int(m.sum())
        if end is not None and nxt is not None and area >= cfg.min_area:
            # Between two annotated slices the organ does not end: keep the slice, ask for a look. Towards
            # a slice marked absent it does somewhere, but the person marked where: the chain runs on
            # to it, its doubtful slices flagged (RESULTS "The annotation loop" measured it so).
            target = (f"annotated slice {nxt}" if run.accepted(nxt).any()
                      else f"slice {nxt}, marked absent")
            rep.flags.append(f"review: {end.split(': ', 1)[1]} (kept: the chain runs on to {target})")
            end = None
        if end is not None:
            run.end_chain(z, rep, end, f"chain from slice {z0} stops before slice {z}: {end.split(': ', 1)[1]}")
            break
        run.accept(z, m, rep, ps)
        run.tick(f"slice {z}")
        prev = m
        peak, trough = area_extremes(peak, trough, area)
        z += step


def _step(run: Runner, z: int, step: int, prev: np.ndarray, moved: bool, step_look: str, ahead: int | None,
          key: list, support_index: int, peak: int, trough: int, look: Appearance, cone: bool = False
          ) -> tuple[np.ndarray, PromptSet, SliceReport, str | None] | None:
    """One step of `_chain` onto slice z: (mask, prompts, report, why the chain ends there or None),
    None when no ring fits around the previous mask; cone: held to the cone of `ahead` alone."""
    with gap_step(run, step_look, z, z - step, prev, ahead, cone=cone):
        got = _segment_from(run, z, prev, z - step, moved)
        if got is None:
            return None
        m, score, ps, retried, fob = got
        prior = "none" if ps.prior_mask is None else "moved" if moved else "parent"
        rep = SliceReport(z, "neighbour", support_index=support_index, parent=z - step, prior=prior, chain=key,
                          score=score, look=step_look, ahead=ahead, cone=cone)
        if retried:
            rep.flags.append("retried with other prompts")
        return m, ps, rep, end_reason(run, z, step, m, prev, peak, trough, look, rep, fob)


def tip_consensus(run: Runner, z0: int, step: int, nxt: int, support_index: int, look: Appearance) -> None:
    """After a tip chain from annotated slice z0 (direction `step`) through the gap to annotated slice
    `nxt`: a tip chain from `nxt` runs back through the gap too. Each grows from its own tip and
    drifts as it goes, so where they agree best (Dice >= `tip_consensus`) the organ is found twice
    from independent starts: the gap is chained again from that slice (the two masks' intersection,
    prior "self" in the record) out to both annotations, as chains that follow a shrinking organ
    (look "parent"). Without such a slice the first chain stays as it ran, unless it vanished before
    the annotation ahead (the organ does not end between two annotated slices): then the gap is
    chained again from the first chain's largest cross-section the same way, but not held to the
    annotations' reach (`config.gap_reach`): the two chains never met, so nothing says that
    cross-section and a small end annotation show the organ in the same place (held to it, CHAOS
    MR 3's left kidney, drawn on its end slices, vanished: docs/RESULTS.md, "The annotation loop")."""
    inside = range(min(z0, nxt) + 1, max(z0, nxt))
    if not any(run.reports[z].look == "tip" for z in inside):
        return
    kept = run.keep(inside)
    reached = kept.slices[nxt - step][1].source == "neighbour"
    run.total += 2 * len(inside)
    ahead = run.accepted(nxt).copy()
    for z in inside:
        run.drop(z)  # the second chain is compared with the first only where it segmented
    _chain(run, nxt, ahead, -step, z0 + step, z0, support_index, look, gap_look(run, nxt, ahead, z0))
    agree = {z: dice(kept.mask(z), run.accepted(z)) for z in inside
             if kept.mask(z).any() and run.accepted(z).any()}
    best = max(agree, key=lambda z: (agree[z], int(kept.mask(z).sum())), default=None)
    both = None if best is None else kept.mask(best) & run.accepted(best)
    run.restore(kept)
    agreed = best is not None and agree[best] >= run.config.tip_consensus
    if agreed:
        seed = both
        why = f"tip chains from slices {z0} and {nxt} agree {agree[best]:.2f} here"
    elif not reached:
        best = max(inside, key=lambda z: (int(kept.mask(z).sum()), -z))
        seed = kept.mask(best)
        why = f"the tip chain from slice {z0} vanished before slice {nxt}: chained again from its largest cross-section"
    else:
        return
    ps = prompts_from_mask(seed, run.config) if seed.sum() >= run.config.min_area else None
    if ps is None:
        return
    run.accept(best, seed, SliceReport(best, "neighbour", support_index=support_index, prior="self", flags=[why]), ps)
    run.tick(f"slice {best}")
    for end in (z0, nxt):
        way = 1 if end > best else -1
        if abs(end - best) > 1:
            _chain(run, best, seed, way, end - way, end, support_index, look, "parent", reach=agreed)


def _back_agreement(run: Runner, z_prev: int, mask: np.ndarray, prev: np.ndarray) -> float:
    """Dice between `prev` (the accepted mask of slice z_prev) and z_prev segmented again with the
    neighbour prompts of `mask` (the candidate of the next slice): low when the chain jumped.

    An annotated z_prev is compared as the segmenter draws it (segmented from its own mask): a hand
    drawn outline is no segmenter's answer, and a small organ's first step from it fell under the
    threshold where the same slice chained through passed (docs/RESULTS.md, "Tuning notes")."""
    ps = prompts_from_mask(mask, run.config)
    if ps is None:
        return 0.0
    back, _ = run.segment(z_prev, ps)
    if run.reports[z_prev].source == "annotation" and (own := prompts_from_mask(prev, run.config)) is not None:
        prev = run.segment(z_prev, own)[0]
    return dice(back, prev)


@dataclass
class SeedCandidate:
    """One placement of another patient's organ on a query slice (`_seed_candidates`): slice z, the
    placed mask (H, W) bool, the appearance match around it, the look the chain learns from
    (`cross_patient_look`), the middle support matched, the share of the placed organ the segmenter
    keeps and the share of its core holding the support organ's intensities."""

    z: int
    moved: np.ndarray
    appearance: float
    look: list[SupportSlice]
    support: SupportSlice
    kept: float
    inside: float
    scores: dict[int, float] = dataclasses.field(default_factory=dict)
    # The look was switched to the query's own seed slice after no chain with the support's look
    # followed the organ (`query_look_candidates`), not because the seed dropped the placed organ.
    query_look: bool = False

    @property
    def score(self) -> float:
        return self.appearance + self.kept

    @property
    def look_from_query(self) -> bool:
        return all(s is not self.support for s in self.look)


def _seed_candidates(run: Runner, supports: list[SupportSlice], rng: tuple[int, int]) -> list[SeedCandidate]:
    """Another patient's support: the locate step (`propagation.locate`) registers the supports onto
    the query's slices; each placement it proposes is segmented with the support's look. Returns the
    candidates, the placement that both looks like the support around the organ and survives
    segmentation first. A single 2D image (dermoscopy) has no anatomy to register: the support mask
    is slid to where the query looks like the lesion (`locate_mask`), one candidate."""
    from FoBSegmentLib.propagation.locate import locate, one_thread

    if run.n == 1:
        mid = supports[len(supports) // 2]
        moved, (dx, dy), scale = locate_mask(run.slice(0), mid.image, mid.mask, None, (0.85, 1.0, 1.15))
        run.notes.append(f"no model: the support mask moved by ({dx}, {dy}) px and scaled x{scale:g} "
                         "to the best appearance match")
        return [SeedCandidate(0, moved, 1.0, supports, mid, 1.0, 1.0)]
    with one_thread():
        located = locate(run.slice, run.n, supports, rng)
    out = []
    for found in located:
        moved, conf = found.mask, found.confidence
        if moved.sum() < run.config.min_area:
            moved, conf = locate_mask(run.slice(found.z), found.support.image, found.support.mask,
                                      int(0.15 * max(run.hw)), (0.85, 1.0, 1.15))[0], -1.0
        look, sup, agree, inside = cross_patient_look(run, supports, found.z, moved)
        out.append(SeedCandidate(found.z, moved, conf, look, sup, agree, inside, found.scores))
    return sorted(out, key=lambda c: -c.score)  # stable: ties keep the locate step's order


def _seed_notes(run: Runner, chosen: SeedCandidate, candidates: list[SeedCandidate], n_supports: int) -> None:
    """The notes of the seed taken: the organ's confidence (a low one adds the `LOW_CONFIDENCE_NOTE`
    line), the candidates tried, and where the organ's look came from."""
    from FoBSegmentLib.propagation.locate import LOW_CONFIDENCE, LOW_CONFIDENCE_NOTE, organ_confidence

    if run.n == 1:
        return
    c = chosen
    organ_conf = organ_confidence(c.appearance, c.inside, c.kept)
    run.notes.append(
        f"cross-patient: the organ of support slice {c.support.index}"
        + (f" (of {n_supports})" if n_supports > 1 else "") + " registered onto query "
        f"slice {c.z}, confidence {organ_conf:.2f} (appearance match around the organ {c.appearance:.2f}, support "
        f"intensities inside {c.inside:.2f}, seed kept {c.kept:.2f}; appearance per slice tried: "
        + ", ".join(f"{z}:{v:.2f}" for z, v in sorted(c.scores.items())) + ")"
    )
    if len(candidates) > 1:
        run.notes.append("cross-patient: seed candidates (query slice: appearance + kept): " + ", ".join(
            f"{t.z}: {t.appearance:.2f} + {t.kept:.2f}" for t in candidates) + f"; slice {c.z} taken")
    if organ_conf < LOW_CONFIDENCE:
        run.notes.append(f"{LOW_CONFIDENCE_NOTE}: the best placement (query slice {c.z}) matches the support's "
                         f"organ with confidence {organ_conf:.2f} < {LOW_CONFIDENCE}; check the result")
    if c.look_from_query and not c.query_look:  # (a query_look seed has its own warning, `cross_patient`)
        run.notes.append(f"cross-patient: the seed slice segmented with the support's look keeps {c.kept:.2f} "
                         "of the placed organ (Dice); the organ's look is learnt from the query's seed slice")


def cross_patient_look(run: Runner, supports: list[SupportSlice], z0: int, moved: np.ndarray
                       ) -> tuple[list[SupportSlice], SupportSlice, float, float]:
    """What the chain learns the organ's look from, for another patient's `supports` placed as
    `moved` ((H, W) bool) on query slice z0: the supports with their intensities histogram-matched
    to the query; when the segmenter, fitted to them, keeps under `SEED_AGREEMENT` of the placed
    organ on the seed slice (Dice), the core of the placed organ on the query's own seed slice.
    A function of (query, supports, z0, moved) only, so a replay of the propagation record (the seed
    and its stored prior) can learn the same look.
    Returns (look supports, the middle support matched, seed kept, share of the placed core
    holding the support organ's intensities)."""
    from FoBSegmentLib.propagation.locate import SEED_AGREEMENT, core_of, match_supports, one_thread

    mid = supports[len(supports) // 2]
    with one_thread():
        matched = match_supports(run.slice, run.n, supports, z0, mid)
    sup = matched[len(supports) // 2]
    learn_appearance(run, matched)
    ps = prompts_from_mask(moved, run.config)
    agree = dice(run.segment(z0, ps)[0], moved) if ps is not None else 0.0
    core = core_of(moved)
    inside = intensity_match(run.slice(z0), core, intensity_range(sup.image, sup.mask)) if core.any() else 0.0
    if agree < SEED_AGREEMENT and core.sum() >= run.config.min_area:
        return query_seed_look(run, z0, moved), sup, agree, inside
    return matched, sup, agree, inside


def query_seed_look(run: Runner, z0: int, moved: np.ndarray) -> list[SupportSlice]:
    """The look of the query's own seed slice z0: the core of the placed organ `moved` ((H, W)
    bool; `locate.core_of`) on it, as the one support the segmenter learns from."""
    from FoBSegmentLib.propagation.locate import core_of

    return [SupportSlice(z0, run.slice(z0), core_of(moved), run.n)]


def query_look_candidates(run: Runner, candidates: list[SeedCandidate]) -> list[SeedCandidate]:
    """The candidates whose chains learnt the support's look, again with the look of the query's own
    seed slice (`query_seed_look`): tried when no chain with the support's look followed the organ.
    Intensities matched from another scanner can fit the organ's look on the seed slice and not
    beyond it, while the placement is right."""
    looks = [(c, query_seed_look(run, c.z, c.moved)) for c in candidates if not c.look_from_query]
    return [dataclasses.replace(c, look=look, query_look=True) for c, look in looks
            if look[0].mask.sum() >= run.config.min_area]


def run_neighbour(run: Runner, supports: list[SupportSlice], same_volume: bool, rng: tuple[int, int]) -> None:
    """Chain outwards in both directions from each annotated slice (same volume), or from a located
    seed slice (another patient, `cross_patient`), inside the inclusive slice range `rng`."""
    if not same_volume:
        cross_patient(run, supports, rng)
        return
    _chain_from_seeds(run, supports, rng)
    if run.config.body_seed:
        body_seed_pass(run, supports, rng)


def _chain_from_seeds(run: Runner, supports: list[SupportSlice], rng: tuple[int, int]) -> None:
    """Same volume: every chain from the annotated slices (and body seeds) `supports`."""
    look = learn_appearance(run, supports)
    seeds = [(s.index, s.mask, s) for s in supports]
    seed_slices = sorted(z for z, *_ in seeds)
    masks = {z: m for z, m, _ in seeds}
    areas = fill_areas(run, masks)
    support_of = {z: sup for z, _, sup in seeds}
    chains = [(z0, mask0, sup, step, bounds) for z0, mask0, sup in seeds for step in (-1, 1)
              for bounds in [chain_stop(z0, step, seed_slices, rng, areas)] if bounds is not None]
    # Outward chains first: where they end tells a gap whether it starts from the organ's end.
    for z0, mask0, sup, step, (stop, nxt) in chains:
        if nxt is None:
            chain(run, z0, mask0, step, stop, nxt, sup.index, look)
    gaps = interpolated_gaps(run, masks, areas)
    for a, b in gaps:
        fill_gap(run, a, masks[a], b, masks[b], support_of[a].index)
    for z0, mask0, sup, step, (stop, nxt) in chains:
        if nxt is not None and tuple(sorted((z0, nxt))) not in gaps:
            chain(run, z0, mask0, step, stop, nxt, sup.index, look)
            if run.config.tip_consensus is not None:
                tip_consensus(run, z0, step, nxt, sup.index, look)


def body_seed_pass(run: Runner, supports: list[SupportSlice], rng: tuple[int, int]) -> None:
    """After the chains from the annotated slices (same volume): when two neighbouring annotated
    slices are both tips of the organ (each starts a tip chain towards the other, `gap_look`), all
    they show of it is partial volume, and the look learnt from them is not its body's. The slice
    midway between them, as the first pass chained it and `refine_body_seed` grew it (and an outline
    refiner redrew it, `redraw_body_seed`), then joins them as a body seed (`Runner.body_seeds`, look
    "body" and prior "self" in the record, which stores its mask): the look is learnt from the
    annotations and it, and the propagation runs
    again, the gap filled from it out to both annotations. Nothing else changes: the body seed is a
    segmented slice like the others, listed for review (docs/RESULTS.md, "The annotation loop", measured this)."""
    def found(z: int) -> bool:
        return run.reports[z].source == "neighbour" and run.accepted(z).sum() >= run.config.min_area

    shown = sorted((s for s in supports if s.mask.any()), key=lambda s: s.index)
    body = []
    for a, b in zip(shown, shown[1:]):
        if b.index - a.index < 2 or not (gap_look(run, a.index, a.mask, b.index) == "tip"
                                         == gap_look(run, b.index, b.mask, a.index)):
            continue
        # The middle, not the largest cross-section: a chain that leaked is widest where it leaked.
        z = (a.index + b.index) // 2
        if not found(z):
            z = max(range(a.index + 1, b.index), key=lambda k: (int(run.accepted(k).sum()), -k))
        if found(z):
            mask, made = refine_body_seed(run, z, run.accepted(z).copy(), run.prompts[z], (a.mask, b.mask))
            body.append((z, a.index, b.index, *redraw_body_seed(run, z, mask, made)))
    if not body:
        return
    run.start_over(rng)
    run.copy_annotations(supports)
    seeds = list(supports)
    for z, a, b, mask, made, drawn in body:
        run.body_seeds.add(z)
        why = f"body seed: annotated slices {a} and {b} are both the organ's tips; chained again from here"
        if drawn:
            why += f" (outline drawn by {getattr(run.refiner, 'name', 'the refiner')})"
        run.accept(z, mask, SliceReport(z, "neighbour", prior="self", look="body", flags=[why]),
                   PromptSet(made.background, made.foreground, prior_mask=mask))
        run.tick(f"slice {z}")
        seeds.append(SupportSlice(z, run.slice(z), mask, run.n))
        run.notes.append(f"annotated slices {a} and {b} are both tips of the organ: chained again from slice {z} "
                         "between them, as the first pass found it, with the look learnt from it too")
    _chain_from_seeds(run, sorted(seeds, key=lambda s: s.index), rng)


def refine_body_seed(run: Runner, z: int, mask: np.ndarray, prompts: PromptSet,
                     tips: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, PromptSet]:
    """The body seed on slice z (its mask and the prompts that made it, as the first pass chained it)
    between the two tips `tips` (their masks), made ready to seed the gap; returns its mask and the
    prompts that made it (docs/RESULTS.md, "Tuning notes", the `body_seed_*` rows).

    1. Segmented again from its own mask, the look fitted to the annotated slices and z under the
       mask, until it settles (`_settle`, `config.body_seed_refine`): a chain grown from a tip lags
       behind the organ's edge (the tips are partial volume); every round moves the mask towards the
       edge the image shows.
    2. In several pieces, the one between the tips (`one_body_piece`, `config.body_seed_one_piece`).
    3. With `config.body_seed_trim` (CT): segmented again until it settles with the look trimmed, the
       seed's pixels of other intensities learnt as surroundings: on CT a tip chain's leak into a
       neighbour of other intensities is learnt as organ otherwise, and no round could shrink it."""
    cfg = run.config
    mask, prompts = _settle(run, z, mask, prompts)
    if cfg.body_seed_one_piece:
        mask, prompts = one_body_piece(mask, prompts, *tips)
    if cfg.body_seed_trim is not None:
        mask, prompts = _settle(run, z, mask, prompts, cfg.body_seed_trim)
        if cfg.body_seed_one_piece:  # the trimmed rounds can split it again
            mask, prompts = one_body_piece(mask, prompts, *tips)
    return mask, prompts


def redraw_body_seed(run: Runner, z: int, mask: np.ndarray, prompts: PromptSet
                     ) -> tuple[np.ndarray, PromptSet, bool]:
    """The body seed on slice z (its mask (H, W) bool and prompts, from `refine_body_seed`) redrawn
    by the run's outline refiner in its box (`config.body_seed_redraw`; `refine.refine_slice`'s rule:
    kept as it is where the refiner drew mostly something else), with neighbour prompts from the
    redrawn mask: (mask, prompts, redrawn?); unchanged without a refiner."""
    if run.refiner is None or not run.config.body_seed_redraw:
        return mask, prompts, False
    run.check_cancel()
    drawn, changed = refine_slice(run.refiner, run.slice(z), mask)
    made = prompts_from_mask(drawn, run.config) if changed else None
    return (mask, prompts, False) if made is None else (drawn, made, True)


def _settle(run: Runner, z: int, mask: np.ndarray, prompts: PromptSet, trim: float | None = None
            ) -> tuple[np.ndarray, PromptSet]:
    """Slice z segmented again from its own mask until it changes by less than 1 % (Dice >= 0.99),
    at most `config.body_seed_refine` times; trim: the look learns the mask's intensity outliers
    (`GraphCutSegmenter.outliers`, beyond `trim` robust standard deviations) as surroundings."""
    for _ in range(run.config.body_seed_refine):
        run.check_cancel()
        exclude = None if trim is None else run.segmenter.outliers(run.slice(z), mask, trim)
        with gap_step(run, "parent", z, z, mask, None, exclude):
            got = _segment_from(run, z, mask, z)
        if got is None or got[0].sum() < run.config.min_area:
            break
        settled = dice(got[0], mask) >= 0.99
        mask, prompts = got[0], got[2]
        if settled:
            break
    return mask, prompts


def one_body_piece(mask: np.ndarray, prompts: PromptSet, tip_a: np.ndarray, tip_b: np.ndarray
                   ) -> tuple[np.ndarray, PromptSet]:
    """A body seed `mask` (H, W) bool in several pieces: the piece whose centre lies nearest the mean
    of the two tips' centres (masks (H, W) bool, distances in (row, col) pixels), and the prompts
    without the foreground points of the pieces dropped. The organ between its two end slices is
    one body; a second piece is a neighbour a tip chain ran into, and the look the rounds learn from
    the whole seed calls it organ as readily (docs/RESULTS.md, "Tuning notes", `body_seed_one_piece`)."""
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask, prompts
    centre = np.mean([ndimage.center_of_mass(tip_a), ndimage.center_of_mass(tip_b)], axis=0)
    centres = np.asarray(ndimage.center_of_mass(mask, labels, range(1, n + 1)))
    piece = labels == 1 + int(np.argmin(np.hypot(*(centres - centre).T)))
    fg = prompts.foreground
    return piece, dataclasses.replace(prompts, foreground=fg[piece[point_pixels(fg, piece.shape)]], prior_mask=piece)


def cross_patient(run: Runner, supports: list[SupportSlice], rng: tuple[int, int]) -> None:
    """Another patient's support: one pass from all `supports` (`cross_patient_pass`), or, for a whole
    labelled organ with `config.cross_chunk_agreement`, one from each (`chunk_consensus`)."""
    if run.config.cross_chunk_agreement is not None and len(supports) > 1 and run.n > 1:
        chunk_consensus(run, supports, rng)
    else:
        cross_patient_pass(run, supports, rng)


def chunk_consensus(run: Runner, supports: list[SupportSlice], rng: tuple[int, int]) -> None:
    """Another patient's whole labelled organ, chunked into `supports` (sorted by index): a cross-patient
    pass from each support slice alone (`cross_patient_pass`), and the pass that agrees most with the
    others stands (the sum of its 3D Dice with each, every result cleaned as the run's result is),
    as it ran; ties go to the middle support's pass. It stands only when it agrees at least
    `config.cross_chunk_agreement` with another pass; otherwise the middle support's pass does. A
    pass that raises for its support (no room for a ring) counts as empty, unless it is the middle
    one's."""
    cfg = run.config
    middle = len(supports) // 2
    start = len(run.notes)
    passes: list[tuple[Kept, list[str]] | None] = []
    masks: list[np.ndarray] = []
    for i, s in enumerate(supports):
        if i:
            run.start_over(rng)
        try:
            cross_patient_pass(run, [s], rng)
        except ValueError:
            if i == middle:
                raise
            passes.append(None)
            masks.append(np.zeros_like(run.mask))
        else:
            passes.append((run.keep(range(run.n)), run.notes[start:]))
            masks.append(cleanup_3d(run.mask, run.axis, cfg.largest_component, cfg.fill_holes))
        del run.notes[start:]
    found = [k for k, m in enumerate(masks) if m.any()]
    agree = {(i, j): dice(masks[i], masks[j]) for i in found for j in found if i < j}
    agree.update({(j, i): d for (i, j), d in list(agree.items())})

    def up_to(k: int) -> float:
        return max((agree.get((k, j), 0.0) for j in found), default=0.0)

    total = {k: sum(agree.get((k, j), 0.0) for j in found) for k in range(len(masks))}
    chosen = max(total, key=lambda k: (total[k], k == middle, -abs(k - middle)))
    if up_to(chosen) < cfg.cross_chunk_agreement:
        chosen = middle
    best = up_to(chosen)
    run.restore(passes[chosen][0])  # (every slice: the last pass's are replaced)
    run.notes.extend(passes[chosen][1])
    where = ", ".join(str(s.index) for s in supports)
    if chosen == middle:
        run.notes.append(f"cross-patient: of the passes from support slices {where} (one each), the one from the "
                         f"middle slice {supports[middle].index} stands (3D Dice with the others up to {best:.2f})")
    else:
        run.notes.append(f"cross-patient: of the passes from support slices {where} (one each), the one from slice "
                         f"{supports[chosen].index} agrees most with the others (3D Dice up to {best:.2f}) and stands")


def cross_patient_pass(run: Runner, supports: list[SupportSlice], rng: tuple[int, int]) -> None:
    """Another patient's support: chain outwards from the best seed candidate (`_seed_candidates`);
    when that first pass does not follow the organ over a plausible extent (`followed_extent`), the
    next candidate is tried; when none does, the candidates again with the query's own look
    (`query_look_candidates`, a warning even when one follows), and the pass that followed the organ
    furthest is kept. Then the second pass (`second_pass`, unless `_candidate_pass` ran it already) and
    the check against the whole-volume registration (`disputed_note`)."""
    from FoBSegmentLib.propagation.locate import NOT_FOLLOWED_NOTE, disputed_note

    candidates = _seed_candidates(run, supports, rng)
    start, done = len(run.notes), run.done

    def take_back() -> None:
        # The pass just run goes: its slices, notes and progress ticks (the bar counts them as extra work).
        nonlocal done
        run.clear()
        del run.notes[start:]
        run.total += run.done - done
        done = run.done

    extents: list[Extent] = []
    tried: list[tuple[Kept, list[str]]] = []  # each pass's slices and notes, should it be kept after all
    order = list(candidates)
    for i, c in enumerate(order):  # grows once: the query's look after the support's (`query_look_candidates`)
        if i:
            take_back()
        extents.append(_candidate_pass(run, c, rng))
        if extents[-1].followed:
            break
        tried.append((run.keep(range(run.n)), run.notes[start:]))
        if i == len(candidates) - 1 and run.n > 1:
            order += query_look_candidates(run, candidates)
    best = max(range(len(extents)), key=lambda i: (extents[i].followed,
                                                   extents[i].got / max(extents[i].needed, 1e-6), -i))
    if best != len(extents) - 1:
        take_back()
        run.restore(tried[best][0])
        run.notes.extend(tried[best][1])
    chosen = order[best]
    passes = run.notes[start:]
    del run.notes[start:]
    _seed_notes(run, chosen, candidates, len(supports))
    both = len(extents) > len(candidates)  # the same slices were tried with both looks
    for i, (e, c) in enumerate(zip(extents, order)):
        if i != best:
            look = (" with the query's look" if c.look_from_query else " with the support's look") if both else ""
            run.notes.append(f"cross-patient: the chain from query slice {c.z}{look} {e.says()}; slice {chosen.z} taken")
    e = extents[best]
    if e.got > 0 and not e.followed:  # (nothing segmented at all has its own warning, `flag_cross_patient`)
        run.notes.append(f"{NOT_FOLLOWED_NOTE}: no seed candidate's chain followed the organ (the chain from query "
                         f"slice {chosen.z} {e.says()}); check the result")
    elif chosen.query_look:
        # Found with the query's look only: the support's look, the placement's evidence, did not hold.
        run.notes.append(f"{NOT_FOLLOWED_NOTE}: no seed candidate's chain followed the organ with the support's "
                         f"look; the chain from query slice {chosen.z} with the query's own look did; check the result")
    run.notes.extend(passes)
    if run.config.second_pass and run.n > 1 and not e.second:
        second_pass(run, rng, chosen.support)
    note = disputed_note(run.accepted, run.n, supports)
    if note is not None:
        run.notes.append(note)


def _candidate_pass(run: Runner, c: SeedCandidate, rng: tuple[int, int]) -> Extent:
    """The first pass from candidate c and how far it followed the organ. A first pass that kept its
    seed slice alone (both chains ended at their first step: the look carried over from the other
    scanner failed at once, which says nothing of the placement) is judged by the second pass run
    from that seed with the query's own look (`second_pass`), which is then not run again."""
    _first_pass(run, c, rng)
    e = followed_extent(run, c, rng)
    if not e.alone:
        return e
    if not (run.config.second_pass and run.n > 1):
        return Extent(e.got, 0.0)
    second_pass(run, rng, c.support)
    return dataclasses.replace(followed_extent(run, c, rng), second=True)


def _first_pass(run: Runner, c: SeedCandidate, rng: tuple[int, int]) -> None:
    """Segment the seed slice from candidate c's placed mask with its look, then chain outwards to
    both ends of `rng` (nothing when the seed slice gives no mask)."""
    look = learn_appearance(run, c.look)
    run.check_cancel()
    ps = prompts_from_mask(c.moved, run.config)
    if ps is None:
        raise ValueError("the support mask leaves no room for a background ring in the query slice")
    m, score = run.segment(c.z, ps)
    kept = seed_piece(run, c.z, m, c.moved, c.support.mask, c.look)
    if kept.sum() < m.sum():
        run.notes.append(f"cross-patient: the seed slice {c.z} came out in pieces; the one that holds most of the placed "
                         f"organ and has its look is kept ({int(kept.sum())} of {int(m.sum())} px)")
        m = kept
    prior = "stored" if ps.prior_mask is not None else "none"
    rep = SliceReport(c.z, "neighbour", support_index=c.support.index, score=score, prior=prior,
                      look="query" if c.query_look else "annotations")
    if m.sum() < run.config.min_area:
        run.end_chain(c.z, rep, "chain-end: mask vanished at the seed slice",
                      f"the seed slice {c.z} gave no mask; nothing segmented")
        return
    run.accept(c.z, m, rep, ps)
    run.tick(f"slice {c.z}")
    for step in (-1, 1):
        chain(run, c.z, m, step, rng[1] if step > 0 else rng[0], None, c.support.index, look)


def _pieces(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, list[int]]:
    """(labels, the labels of the pieces of at least `min_area` pixels) of an (H, W) bool mask."""
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1)) if n else []
    return labels, [i + 1 for i, a in enumerate(sizes) if a >= min_area]


def seed_piece(run: Runner, z: int, mask: np.ndarray, placed: np.ndarray, support_mask: np.ndarray,
               look: list[SupportSlice]) -> np.ndarray:
    """The located seed slice z as segmented (`mask`, (H, W) bool), kept to one piece when the
    support's organ (`support_mask`, (H, W) bool) is one piece, the segmenter cut the seed into two
    or three (of `min_area` pixels or more, `SEED_PIECES`) and the evidence agrees on which piece is
    the organ (`config.cross_seed_one_piece`): the piece that holds most of the `placed` organ ((H,
    W) bool) is also the one whose median intensity lies nearest that of the organ in its `look`
    (the supports the segmenter learnt from, middle one). When the two disagree, the seed stays as
    it is and the chains' own rules judge it. The seed's prompts stay as they were: a replay cuts the
    slice from them and keeps the same piece (`document`)."""
    if not run.config.cross_seed_one_piece or run.n == 1:  # (one 2D image: a lesion may be in pieces)
        return mask
    labels, big = _pieces(mask, run.config.min_area)
    if not 2 <= len(big) <= SEED_PIECES or len(_pieces(support_mask, run.config.min_area)[1]) != 1:
        return mask
    organ = look[len(look) // 2]
    target = float(np.median(organ.image[organ.mask]))
    image = run.slice(z)
    by_look = min(big, key=lambda i: abs(float(np.median(image[labels == i])) - target))
    by_place = max(big, key=lambda i: int(np.count_nonzero(placed[labels == i])))
    return labels == by_look if by_look == by_place else mask


@dataclass(frozen=True)
class Extent:
    """How far a candidate's pass followed the organ across slices (`got`, mm), how far it should at
    least (`needed`, mm), whether it ran from its seed to an end of the slice range only (`one_way`)
    or kept its seed slice alone (`alone`), and whether the second pass has run (`second`)."""

    got: float
    needed: float
    one_way: bool = False
    alone: bool = False
    second: bool = False

    @property
    def followed(self) -> bool:
        return not self.one_way and not self.alone and self.got >= self.needed

    def says(self) -> str:
        if self.alone:
            return "kept its seed slice alone" + (", in the second pass too" if self.second else "")
        if self.one_way:
            return f"ran from it to the end of the volume only ({self.got:.0f} mm)"
        return f"followed the organ over {self.got:.0f} mm, under the {self.needed:.0f} mm its size on the support calls for"


def followed_extent(run: Runner, c: SeedCandidate, rng: tuple[int, int]) -> Extent:
    """How far the first pass from candidate c followed the organ across slices, against how far it
    should at least (`config.cross_min_extent` x the equivalent diameter of the support's organ,
    sqrt(4 area / pi)): an abdominal organ is not a disc, so a chain that follows a structure over a
    few slices of a large cross-section and loses it was not on the organ. A pass cut by an end of
    `rng` followed the organ as far as it could (needed 0) if it also grew the other way from its
    seed; one that ran from its seed to the end only (`one_way`) did not: the seed of a middle
    support slice sits at the body of the organ, not at a tip, and a chain that leaves a tip into the
    volume's end has as likely left the organ as followed it. A pass that kept its seed slice alone
    did not (`alone`; `_candidate_pass` gives it the second pass first). With `cross_min_extent`
    None, every pass followed the organ."""
    cfg = run.config
    if cfg.cross_min_extent is None:
        return Extent(0.0, 0.0)
    across, rows, cols = run.spacing
    needed = cfg.cross_min_extent * 2.0 * float(np.sqrt(np.count_nonzero(c.support.mask) * rows * cols / np.pi))
    zs = [z for z, rep in run.reports.items() if rep.source == "neighbour" and run.accepted(z).any()]
    if not zs:
        return Extent(0.0, needed)
    lo, hi = min(zs), max(zs)
    got = (hi - lo + 1) * across
    if lo == hi:
        return Extent(got, needed, alone=True)
    if (lo <= rng[0] and hi > c.z) or (hi >= rng[1] and lo < c.z):
        return Extent(got, 0.0)
    return Extent(got, needed, one_way=lo <= rng[0] or hi >= rng[1])


def second_pass(run: Runner, rng: tuple[int, int], support: SupportSlice) -> None:
    """Another patient's support, after the first chain: start again from the query's own largest
    cross-section of the organ (slice z1, its mask as the first pass found it or, with
    `config.second_pass_refine`, moved to the edges the slice shows: `_refined_seed`; prior "self" in
    the record) and chain outwards from it with the look learnt from the query's own slice z1. The first pass has
    found the organ; what it carried from the other patient (intensities matched across scanners,
    the other organ's shape) no longer steers the chain. A function of the first pass's result and
    the `support` it was placed from, so a replay needs z1's mask, which the record stores.

    Only cross-sections at least `SEED_SOLIDITY` x as solid as the support's organ on its slice
    (`morphology.solidity`) may seed it, when any is: where the first pass ran into a neighbour of
    the organ's look (a left kidney into the spleen beside it) it is widest, and there it holds two
    bodies side by side, which fill less of their convex hull than the organ does."""
    areas = {z: int(run.accepted(z).sum()) for z, rep in run.reports.items() if rep.source == "neighbour"}
    if not areas or max(areas.values()) < run.config.min_area:
        return
    lo, hi = min(areas), max(areas)
    largest = max(areas, key=lambda z: (areas[z], -z))
    least = SEED_SOLIDITY * solidity(support.mask)
    compact = {z: a for z, a in areas.items() if a >= run.config.min_area and solidity(run.accepted(z)) >= least}
    pool = compact or areas
    z1 = max(pool, key=lambda z: (pool[z], -z))
    mask1 = run.accepted(z1).copy()
    first = run.prompts[z1]
    run.start_over(rng)
    ps = PromptSet(first.background, first.foreground, prior_mask=mask1)
    refined = _refined_seed(run, z1, mask1)
    if refined is not None:
        mask1 = refined
        ps = dataclasses.replace(prompts_from_mask(mask1, run.config) or ps, prior_mask=mask1)
    look = learn_appearance(run, [SupportSlice(z1, run.slice(z1), mask1, run.n)])
    run.accept(z1, mask1, SliceReport(z1, "neighbour", support_index=support.index, prior="self"), ps)
    run.tick(f"slice {z1}")
    for step in (-1, 1):
        chain(run, z1, mask1, step, rng[1] if step > 0 else rng[0], None, support.index, look)
    if not compact:
        which = "largest cross-section (none as solid as the support's organ)"
    elif z1 == largest:
        which = "largest cross-section"
    else:
        which = "largest cross-section as solid as the support's organ"
    edges = " (its edges moved to those the slice shows)" if refined is not None else ""
    run.notes.append(f"cross-patient: second pass from query slice {z1}, the {which} the first pass found "
                     f"(slices {lo}-{hi}){edges}, with the organ's look learnt from the query itself")


def _refined_seed(run: Runner, z: int, mask: np.ndarray) -> np.ndarray | None:
    """The second pass's seed `mask` ((H, W) bool, slice z) moved to the edges the slice shows
    (`config.second_pass_refine`, `grabcut.refine_mask`); None when that is off, gives too little, or
    changes the mask by more than `SEED_REFINE_AGREEMENT` allows."""
    from FoBSegmentLib.segmenters.grabcut import refine_mask

    share = run.config.second_pass_refine
    if share is None:
        return None
    refined = refine_mask(run.slice(z), mask, share)
    if refined.sum() < run.config.min_area or dice(refined, mask) < SEED_REFINE_AGREEMENT:
        return None
    return refined
