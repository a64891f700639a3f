"""The FoB pass: the generator predicts each query slice's background ring, foreground points and
coarse foreground probability from a support slice; the probability also says where the organ is.

Frames: slices are (H, W) along the run's axis; prompts are (x, y) = (column, row) pixels; the
coarse probability is (H, W) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from FoBSegmentLib.io.coords import point_pixels
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.propagation.runner import Runner
from FoBSegmentLib.propagation.stopping import organ_range_from_probability
from FoBSegmentLib.propagation.supports import assign_supports, inside_absent
from FoBSegmentLib.propagation.types import SliceReport, SupportSlice

# The flag of a slice whose FoB prompts the segmenter refused (e.g. no foreground point inside the ring).
REFUSED = "the segmenter refused FoB's prompts"


def quantize_probability(prob: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] -> uint8 in 0..255, the precision a propagation record stores."""
    return np.round(np.clip(np.asarray(prob, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def dequantize_probability(q: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> (H, W) float32 in [0, 1]. The segmenter only ever sees dequantised maps, so a
    replay from the record gets bit-identical inputs."""
    return np.asarray(q, np.uint8).astype(np.float32) / np.float32(255.0)


def predict_slices(
    run: Runner, supports: list[SupportSlice], generator: Any, same_volume: bool, candidates: list[int], batch: int = 8,
    prompts: bool = True, encoded: dict[int, Any] | None = None,
) -> tuple[dict[int, PromptSet], dict[int, int]]:
    """FoB predictions for the candidate slices and, per slice, the count of confident pixels
    (0 below `min_prob_area`). prompts=False: only the coarse probability is needed (a generator
    with `coarse_probabilities` then skips the background ring's heads, and encodes each support
    once, kept in `encoded` (support index -> its encoding) across calls; the PromptSets hold no points)."""
    cfg = run.config
    # FoB learns from slices that show the organ; an annotated absence teaches it nothing.
    assign = assign_supports(candidates, [s for s in supports if s.mask.any()], same_volume)
    preds: dict[int, PromptSet] = {}
    areas: dict[int, int] = {}
    encoded = {} if encoded is None else encoded
    groups: dict[int, list[int]] = {}
    for z in candidates:
        groups.setdefault(id(assign[z]), []).append(z)
    for zs in groups.values():
        sup = assign[zs[0]]
        # Small batches: the support is re-encoded per batch, but cancel is honoured quickly.
        for start in range(0, len(zs), batch):
            run.check_cancel()
            part = zs[start : start + batch]
            if not prompts and hasattr(generator, "coarse_probabilities"):
                if sup.index not in encoded:
                    encoded[sup.index] = generator.encode_support(sup.image, sup.mask)
                probs = generator.coarse_probabilities(encoded[sup.index], [run.slice(z) for z in part])
                out = [PromptSet(np.zeros((0, 2)), np.zeros((0, 2)), fg_probability=p) for p in probs]
            elif hasattr(generator, "predict_batch"):
                out = generator.predict_batch(sup.image, sup.mask, [run.slice(z) for z in part], spr=cfg.fob_spr)
            else:
                out = [generator.predict(sup.image, sup.mask, run.slice(z)) for z in part]
            for z, ps in zip(part, out):
                if prompts:  # the FoB pass of `run_fob`: a long one on CPU, so progress per slice
                    run.tick(f"FoB's prompts for slice {z}")
                if ps.fg_probability is not None:
                    ps.fg_probability = dequantize_probability(quantize_probability(ps.fg_probability))
                preds[z] = ps
                prob = ps.fg_probability
                count = int((prob >= cfg.prob_threshold).sum()) if prob is not None else 0
                areas[z] = count if count >= cfg.min_prob_area else 0
                run.reports[z].fg_max = float(prob.max()) if prob is not None else None
                run.reports[z].support_index = sup.index
    return preds, areas


def organ_range(run: Runner, areas: dict[int, int], anchor: list[int] | None) -> tuple[int, int]:
    found = organ_range_from_probability(areas, run.n, anchor, run.config.margin)
    if found is None:
        raise ValueError("FoB's coarse probability finds the organ on no slice; give --slices A:B")
    run.notes.append(f"FoB's coarse probability puts the organ on slices {found[0]}..{found[1]} "
                     f"(margin {run.config.margin})")
    return found


def hybrid_range(
    run: Runner, supports: list[SupportSlice], generator: Any, same_volume: bool, rng: tuple[int, int],
    batch: int = 8,
) -> tuple[int, int]:
    """The organ's slice range from FoB's coarse probability (an explicit --slices range wins).

    Another patient's support: every slice of `rng` is predicted (the longest run of slices where
    FoB sees the organ wins). The same volume: the range is the annotated span joined with the runs
    that touch it (`organ_range_from_probability`), so only the slices outward from the span up to
    the first one where FoB sees no organ can move it; they alone are predicted, in batches, which
    gives the same range as predicting every slice for a fraction of the work."""
    if run.config.slices != "auto":
        return rng
    present = [s.index for s in supports if s.mask.any()] if same_volume else []
    if not present:
        _, areas = predict_slices(run, supports, generator, same_volume, list(range(rng[0], rng[1] + 1)),
                                  prompts=False)
        return organ_range(run, areas, None)
    # An annotated absence ends the range anyway (`inside_absent`); the absence itself is still
    # predicted, since whether FoB sees the organ there decides the range's end before clipping.
    lo, hi = inside_absent(rng, supports)
    areas: dict[int, int] = {}
    encoded: dict[int, Any] = {}
    for step, start, end in ((-1, min(present) - 1, lo), (1, max(present) + 1, hi)):
        z = start
        while (z - end) * step <= 0:
            part = list(range(z, end + step, step))[:batch]
            _, got = predict_slices(run, supports, generator, same_volume, part, prompts=False, encoded=encoded)
            areas.update(got)
            if not all(got.values()):
                break
            z += step * len(part)
    return organ_range(run, areas, present)


def map_region(prob: np.ndarray, foreground: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """FoB's mask prompt: its coarse map at `threshold` ((H, W) bool), only the 8-connected components
    that hold a foreground point ((N, 2) (x, y) pixels) when any does: the points choose the organ
    among the blobs the map also lights up (a neighbouring organ of the same look)."""
    from scipy import ndimage

    hot = np.asarray(prob, np.float32) >= threshold
    labels, _ = ndimage.label(hot, structure=np.ones((3, 3)))
    held = labels[point_pixels(foreground, hot.shape)]
    held = held[held > 0]
    return np.isin(labels, held) if held.size else hot


def with_mask_prompt(ps: PromptSet, threshold: float = 0.5, probability: bool = True) -> PromptSet:
    """FoB's whole output for one slice: its points and the coarse map's region (`map_region`) as
    the mask prompt (`PromptSet.prior_mask`; None when the map is empty), as SAM takes a mask beside
    its points; the map itself too unless `probability` is False (a graph cut would add it to its
    data term, `fob_data_term`)."""
    if ps.fg_probability is None:
        raise ValueError("FoB's mask prompt needs the generator's coarse foreground probability")
    region = map_region(ps.fg_probability, ps.foreground, threshold)
    return PromptSet(ps.background, ps.foreground, fg_probability=ps.fg_probability if probability else None,
                     prior_mask=region if region.any() else None)


def fob_look(run: Runner, supports: list[SupportSlice], same_volume: bool) -> Any:
    """What a segmenter with a shape prior (graphcut) needs before it cuts from FoB's mask prompts:
    the organ's look learnt from the annotated slices of the same volume (the `Appearance` the
    chain's end rules read), or None: another patient's support (its look belongs to another scan;
    the segmenter forgets any look it holds and cuts from the prompts alone), `fob_mask_prompt` or
    `shape_prior` off, or a segmenter that takes no mask. A replay calls it as the run did."""
    # Imported here: the neighbour chain imports this module for chained FoB.
    from FoBSegmentLib.propagation.neighbour import learn_appearance

    cfg, seg = run.config, run.segmenter
    if not (cfg.fob_mask_prompt and getattr(seg, "uses_prior_mask", False)):
        return None
    if same_volume and cfg.shape_prior and any(s.mask.any() for s in supports):
        return learn_appearance(run, supports)
    if hasattr(seg, "clear_reference"):
        seg.clear_reference()
    return None


def run_fob(run: Runner, supports: list[SupportSlice], generator: Any, same_volume: bool, rng: tuple[int, int]) -> None:
    """The unannotated slices of the range segmented with FoB's own prompts, each predicted from
    its support slice.

    A segmenter with a shape prior (graphcut, `fob_mask_prompt`) receives FoB's whole output, its
    points and its coarse map as the mask prompt (`with_mask_prompt`), and cuts with the organ's look
    learnt from the annotated slices (`fob_look`). FoB's coarse map sees the organ far beyond its
    ends, so from the annotated span outwards the slices are then taken one at a time and the
    neighbour chain's end rules (area, intensity, regrowth, back-check) end each side, as they end a
    chain; between annotated slices every slice is kept. Otherwise every slice of FoB's range is
    segmented from the points."""
    from FoBSegmentLib.propagation.neighbour import area_extremes, end_reason

    cfg = run.config
    lo, hi = rng
    annotated = {s.index for s in supports} if same_volume else set()
    cand = [z for z in range(lo, hi + 1) if z not in annotated]
    # Two passes over the candidates: predict, then segment.
    run.total = max(1, 2 * len(cand))
    if run.progress is not None:
        run.progress(0, run.total, f"FoB predicting prompts for {len(cand)} slices")
    preds, areas = predict_slices(run, supports, generator, same_volume, cand)
    present = sorted(s.index for s in supports if s.mask.any()) if same_volume else []
    if cfg.slices == "auto":
        lo, hi = organ_range(run, areas, present or None)
        lo, hi = max(lo, rng[0]), min(hi, rng[1])
    look = fob_look(run, supports, same_volume)
    todo = [z for z in cand if lo <= z <= hi]

    def segment(z: int) -> tuple[np.ndarray, SliceReport, PromptSet]:
        run.check_cancel()
        ps = preds[z] if look is None else with_mask_prompt(preds[z], cfg.prob_threshold, cfg.fob_data_term)
        rep = run.reports[z]
        try:
            m, score = run.segment(z, ps)
        except ValueError as exc:  # one slice's prompts, not the run, failed: left empty, flagged for review
            m, score = np.zeros(run.hw, bool), 0.0
            rep.flags.append(f"{REFUSED}: {str(exc).split(': ', 1)[-1]}")
        rep.source, rep.score = "fob", score
        # The mask prompt is no accepted slice: the record stores it, so that a replay cuts from it.
        rep.prior = "stored" if ps.prior_mask is not None else "none"
        return m, rep, ps

    def accept(z: int, m: np.ndarray, rep: SliceReport, ps: PromptSet) -> None:
        run.accept(z, m, rep, ps)
        run.tick(f"slice {z}")

    # With a look (same volume, annotated slices showing the organ): every slice between the annotated
    # ones, then outward from each end of the span until an end rule fires.
    inner = todo if look is None else [z for z in todo if present[0] < z < present[-1]]
    sides = [] if look is None else [(-1, present[0]), (1, present[-1])]
    for z in inner:
        accept(z, *segment(z))
    for step, start in sides:
        prev = run.accepted(start)
        peak = trough = int(prev.sum())
        z = start + step
        while z in todo:
            m, rep, ps = segment(z)
            end = end_reason(run, z, step, m, prev, peak, trough, look, rep)
            if end is not None:
                run.end_chain(z, rep, end, f"FoB from slice {start} stops before slice {z}: {end.split(': ', 1)[1]}")
                break
            accept(z, m, rep, ps)
            prev = m
            peak, trough = area_extremes(peak, trough, int(m.sum()))
            z += step
    for z in range(max(lo, 1), hi + 1):
        a, b = run.reports[z - 1].area, run.reports[z].area
        if a > 0 and b > 0 and max(a, b) > cfg.area_jump * min(a, b):
            run.reports[z].flags.append(f"area-jump x{max(a, b) / min(a, b):.1f} from slice {z - 1}")


# ----------------------------------------------------------------------------------------------
# chained FoB: the support is the previous accepted slice of the chain (adjacent, as in training)


@dataclass
class FoBStep:
    """FoB's view of the next slice of a chain, predicted from the previous accepted slice.

    background: (N, 2) (x, y) ring points of the query slice after SPR; coarse: (N, 2) the same
    points before SPR (the heatmaps' argmax); confidence: (N,) their heatmap peaks; foreground:
    (M, 2) (x, y) points; probability: (H, W) float32 coarse foreground map, already quantised as
    the record stores it (the segmenter of a replay receives the same map).
    """

    background: np.ndarray
    confidence: np.ndarray
    foreground: np.ndarray
    probability: np.ndarray
    coarse: np.ndarray | None = None

    def ring(self, spr: bool) -> np.ndarray:
        """The ring after SPR (spr True, or no coarse points known), else before it."""
        return self.background if spr or self.coarse is None else self.coarse

    def organ_pixels(self, threshold: float) -> int:
        return int((self.probability >= threshold).sum())

    def mean_inside(self, mask: np.ndarray) -> float:
        """Mean coarse probability inside an (H, W) bool mask (0 when the mask is empty)."""
        m = np.asarray(mask, bool)
        return float(self.probability[m].mean()) if m.any() else 0.0


def fob_step(generator: Any, support_image: np.ndarray, support_mask: np.ndarray, query_image: np.ndarray) -> FoBStep:
    """FoB's prompts and coarse map for `query_image` from one support slice (image (H, W[, 3]),
    mask (H, W) bool). A generator without `predict_with_details` gives confidence 1 to every
    ring point."""
    coarse = None
    if hasattr(generator, "predict_with_details"):
        d = generator.predict_with_details(support_image, support_mask, query_image)
        ps, conf = d["prompts"], np.asarray(d["bg_confidence"], np.float32)
        if len(ps.background) == len(d.get("coarse_background", ())):
            coarse = np.asarray(d["coarse_background"], np.float64)
    else:
        ps = generator.predict(support_image, support_mask, query_image)
        conf = np.ones(len(ps.background), np.float32)
    if ps.fg_probability is None:
        raise ValueError("chained FoB needs the generator's coarse foreground probability")
    prob = dequantize_probability(quantize_probability(ps.fg_probability))
    return FoBStep(np.asarray(ps.background, np.float64), conf, np.asarray(ps.foreground, np.float64), prob, coarse)


def chained_prompts(neighbour: PromptSet, step: FoBStep, prev: np.ndarray, config: Any) -> PromptSet:
    """The prompts of one chained-FoB slice: the dilation ring of the previous mask (`neighbour`,
    with its interior points and shape prior) combined with FoB's prediction from that mask:
    FoB's ring points where FoB is confident and that lie outside the previous mask (a point the
    previous slice calls organ is FoB contradicting the chain, the costliest error of a hard
    background seed), FoB's foreground points inside the previous mask, and, with
    `config.fob_data_term`, FoB's coarse probability for the segmenter's data term. Frames: (x, y)
    pixels, masks (H, W) bool."""
    prev = np.asarray(prev, bool)

    def inside(points: np.ndarray) -> np.ndarray:
        return prev[point_pixels(points, prev.shape)]

    ring = step.ring(config.fob_spr)
    ok = np.zeros(len(ring), bool)
    if len(ring):
        ok = (step.confidence >= config.fob_bg_confidence) & ~inside(ring)
    fob_bg = ring[ok]
    if config.fob_ring == "replace" and len(fob_bg) >= 3:
        background = fob_bg
    else:
        background = np.concatenate([neighbour.background, fob_bg]) if len(fob_bg) else neighbour.background
    fob_fg = step.foreground[inside(step.foreground)] if len(step.foreground) else step.foreground
    foreground = np.concatenate([neighbour.foreground, fob_fg]) if len(fob_fg) else neighbour.foreground
    prob = step.probability if config.fob_data_term else None
    return PromptSet(background, foreground, fg_probability=prob, prior_mask=neighbour.prior_mask)
