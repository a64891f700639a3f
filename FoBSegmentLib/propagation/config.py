"""The tunables of a propagation and their per-modality presets.

The values were chosen with the propagation protocol (`fob evaluate --protocol propagation`);
docs/RESULTS.md ("Tuning notes") keeps the measurements behind each one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from FoBSegmentLib.errors import SettingError

PROMPT_SOURCES = ("fob", "neighbour", "hybrid", "chained")


@dataclass
class PropagationConfig:
    """Tunables of the propagation.

    slices: "auto" or an inclusive (first, last) range of slice indices along the axis.
    margin: slices added on each side of the auto range found from FoB's coarse probability.
    prob_threshold / min_prob_area: a slice counts as organ for "auto" when at least
        `min_prob_area` pixels of FoB's coarse probability reach `prob_threshold`.
    n_background / ring_k_out / ring_k_in: neighbour prompts, BPPC ring (`prompts.ring.ring_points`).
    n_foreground: neighbour foreground points, spread over the deep interior of the previous mask.
    fg_area_per_point / max_foreground: big masks get more foreground points: one per
        `fg_area_per_point` pixels of the previous mask, at least `n_foreground`, at most
        `max_foreground` (0 = off): GrabCut otherwise hands parts of a heterogeneous liver to the
        background slice after slice.
    retry_foreground: when a chained slice's area collapses (drop by more than `area_jump`), it is
        segmented again with this many foreground points and the larger mask is kept.
    retry_ring: when a chained slice's area jumps up by more than `area_jump` (a leak), it is
        segmented again with this tighter ring (k_out, k_in) and the smaller mask is kept.
    min_area: a neighbour-chained mask smaller than this (pixels) ends the chain.
    area_jump: ratio between the areas of adjacent slices above which the slice is flagged; a
        growth by more than `area_jump` also ends the chain (a leak into a neighbour organ).
    intensity_match: minimum fraction of the new mask whose intensities fall inside the annotated
        organ's 2-98 % intensity range; below it the chain ends.
    median_band: percentiles of the annotated organ's intensities; the chain also ends when the
        new mask's median intensity leaves that band (None disables).
    shape_prior: neighbour prompts carry the previous slice's mask as `PromptSet.prior_mask`, and a
        segmenter with `fit_reference` (graphcut) learns the organ's appearance once, from the
        annotated slice showing most of the organ.
    back_check: after segmenting slice z from slice z-1, slice z-1 is segmented again from the new
        mask; a Dice below `back_check` with its accepted mask (an annotated slice's as the segmenter
        draws it, segmented from its own mask) means the chain jumped onto another structure and it
        stops before z. None = off. Only for segmenters with `uses_prior_mask`:
        GrabCut's answers vary too much between neighbouring slices for the check.
    regrow: (drop, grow): once a chain's area has fallen below `drop` x its peak, growth to more
        than `grow` x the smallest area since the peak ends it (a kidney chain entering the spleen).
    Between two annotated slices no chain ends: a slice where one of the rules above fires is kept
    and flagged "review: ...".
    interpolate_agreement: two neighbouring annotated slices whose masks overlap at least this much
        (Dice) are taken to outline the same cross-section drifting slowly: each slice between them
        is segmented from the shape interpolated between the two (its ring, points and shape prior),
        not chained from one of them. Only for segmenters with a shape prior; None = off (the
        default: an organ bulges between two cross-sections that overlap, and the chain with the
        moved prior follows it; docs/RESULTS.md, "Tuning notes").
    moved_prior: each step of a chain draws its prompts and shape prior from the previous slice's
        mask carried onto the next slice by the motion between the two (`motion.move_mask`, DIS
        optical flow), not from where it lay; except a tip chain's steps (`tip_ratio`) and the
        chains of another patient's support. Only with the shape prior of a segmenter that takes
        one (graphcut).
    relearn_gap_look: a chain between two annotated slices that show the organ re-learns the graph
        cut's look at every step from the annotated slices and the slice it steps from: annotations
        at the organ's tips show little of it (partial volume), and a look learnt from them alone
        calls the organ's body background, so the chain cannot grow into it.
    tip_ratio / tip_grow_weight / tip_reach: such a chain starts from one of the organ's tips when
        its annotated slice is the outermost one showing the organ on its side and its equivalent
        radius (mm) is below `tip_ratio` x the distance (mm) to the annotated slice ahead; it must
        grow into an organ much larger than its seed. Each step then learns the look from the
        slice it segments under the parent's mask, pays `tip_grow_weight` per px of growth instead
        of the graph cut's own weight, and stays within `tip_reach` px per slice of the annotated
        slice ahead (`neighbour.gap_step`). tip_ratio None = off.
    gap_reach: every step of a chain between two annotated slices that show the organ (look
        "parent" too, not only a tip chain's) stays within `tip_reach` px per slice of the
        annotation ahead: an organ shrinks into its end slice, and a chain that does not follow it
        (every step fails an end rule, and between annotations none ends it) is held to that cone.
        Not after `tip_consensus` found no agreement (`neighbour.tip_consensus`), nor from a step
        whose mask the reach would empty on (the annotation ahead a sliver off the organ's body:
        the chain goes on without it, `neighbour._chain`).
    gap_reach_cap: such a "parent" step's reach is the larger of that cone and the parent's extent
        around the annotation ahead shrunk as a smooth organ's cap shrinks into its end (by the square
        root of the ratio of their distances to it, `neighbour.reach_of`): the cone alone cuts a domed
        organ's last slices before its end annotation (a liver's top). A step that fails an end rule
        with the cap (a chain holding its size into a neighbour or off the organ) is held to the cone
        (`SliceReport.cone`, kept in the record).
    outward_own_look: a chain running outward from the outermost annotated slice (towards the
        organ's end, no annotation ahead) learns the organ's look, and its end rules' intensity
        ranges, from that slice alone instead of from every annotated slice pooled: slices drawn
        far away, often near the organ's other end (partial volume), widen the pooled look, and
        the chain runs on past the organ's end (`neighbour.gap_look`, look "own"). With one annotated
        slice both are the same.
    tip_end: such a chain also starts from a tip when the chain outward from its annotated slice
        accepted at most `tip_end` slices: the organ ends there, whatever its size (a spleen's end
        slice can be large against the gap and the organ still doubles beyond it). None = off.
    tip_consensus: after a tip chain, a tip chain from the annotation ahead runs back through the
        gap; where the two agree best, at Dice >= this, the gap is chained again from there out to
        both annotations (`neighbour.tip_consensus`). None = off.
    body_seed: when two neighbouring annotated slices are both tips of the organ (each starts a tip
        chain towards the other, e.g. a person drew only its first and last slices), the slice midway
        between them, as the first pass chained it, joins them as a seed whose look is learnt too,
        and the propagation runs again from all of them (`neighbour.body_seed_pass`).
    body_seed_refine: the body seed is segmented again from its own mask, with the look of the
        annotations and itself, until it changes by less than 1 % (Dice >= 0.99), at most this many
        times (`neighbour.refine_body_seed`; 0 = taken as the first pass chained it). A chain grown
        from a tip stops short of the organ's body; each round grows it towards the edge the image shows.
    body_seed_one_piece: a body seed that comes out of its rounds in several pieces keeps the one
        nearest the two tips' mean centre (`neighbour.one_body_piece`): the organ between its two tips
        is one body, and a piece away from both is a neighbour the tip chains ran into.
    body_seed_trim: after those rounds, the body seed is segmented again until it settles with its
        look trimmed: its pixels whose smoothed intensity lies more than this many robust standard
        deviations from its median are learnt as surroundings (`neighbour.refine_body_seed`). None =
        off (the default; the CT preset 2.5): on CT the organs are homogeneous and a leak into a
        neighbour of other intensities shrinks away; on MR a kidney's medulla or a spleen's own range
        is cut too.
    body_seed_redraw: with an outline refiner (`fob segment --refine`), a body seed is redrawn by it
        in its box (`refine.refine_slice`'s rule) before it seeds the chains: a seed chained from
        two tips takes in neighbours of the organ's look, and every chain from it inherits them.
    fob_mask_prompt: the "fob" source with a segmenter that takes a shape prior (graphcut): each
        slice's prompts carry FoB's coarse map as the mask prompt (`fob.with_mask_prompt`), the
        segmenter cuts from it with the organ's look learnt from the annotated slices, and outward
        from them the chain's end rules end the organ (`fob.run_fob`). Off: the points alone, every
        slice of FoB's range (docs/RESULTS.md, "FoB in the chain", measures both).
    fob_bg_confidence: chained FoB: a background point of FoB's ring is used when its heatmap peak
        (`bg_confidence`) reaches this and it lies outside the previous slice's mask.
    fob_data_term: chained FoB and the "fob" source's mask prompt: the prompts carry FoB's coarse
        probability, which a graph cut adds to its data term (`GraphCutSegmenter.prob_weight`). Off
        by default: it cost 2.9 points on CHAOS MR in the chain, and 1.9 / 1.6 (CHAOS MR / Synapse
        CT) beside the mask prompt (docs/RESULTS.md, "FoB in the chain"): the map covers the
        neighbouring organs too.
        The stop rules below read the probability either way.
    fob_spr: both FoB sources ("fob", "chained"): FoB's ring points after SPR (True) or its
        heatmaps' argmax (False). Off by default: SPR puts more ring points inside the organ; the chain
        scored lower with it, FoB alone scored the same held out, and in the paper's protocol, held
        out per fold, its points scored lower than the heatmaps' argmax (docs/RESULTS.md, "FoB in the
        chain"; Resources/MODEL_CARD.md).
    fob_ring: chained FoB: "add" (FoB's confident ring points join the dilation ring) or "replace"
        (they replace it; the dilation ring when fewer than 3 are confident).
    fob_absent: chained FoB: the chain ends where FoB's coarse probability reaches `prob_threshold`
        on fewer than `min_prob_area` pixels of the next slice (FoB sees no organ there).
    fob_stop_prob: chained FoB: the chain ends when the mean coarse probability inside the new
        mask falls below this (the chain walked onto another structure); None = off.
    fob_keep_prob: chained FoB: an image-only end (intensity, median band, regrow, back-check) is
        overruled, the slice kept and flagged, when the mean coarse probability inside the new mask
        reaches this; None = the image rules decide alone.
    second_pass: another patient's support: once the chain from the located seed has run, the
        query's own largest cross-section of it (of those about as solid as the support's organ,
        `neighbour.SEED_SOLIDITY`) becomes the seed of a second chain that learns the
        organ's look from the query itself (no other scanner's intensities, no other patient's shape
        beyond that slice); the first pass only finds the organ (`neighbour.second_pass`).
    second_pass_refine: another patient's support: the second pass's seed is first moved to the
        edges its slice shows (`grabcut.refine_mask`, GrabCut started from it, probable background a
        band of this share of its equivalent radius around it), unless that changes it by more
        than `neighbour.SEED_REFINE_AGREEMENT` allows. Its edges come from another patient's organ
        placed by an affine and cut with a look carried across scanners; GrabCut learns both colour
        models from the query's slice. None = off (the default; the MR preset 0.5: on Synapse CT the
        seeds lie on the organ's edges already, and GrabCut grows the livers into neighbours of the
        same density; docs/RESULTS.md, the cross-patient section).
    cross_seed_one_piece: another patient's support: when the support's organ is one piece on its
        slice and the segmenter cuts the located seed slice into two or three, the seed keeps the
        piece that holds most of the placed organ if it is also the one whose median intensity lies
        nearest the organ's look (`neighbour.seed_piece`): a placement carried from another patient
        often covers a neighbour of about the organ's look too (a kidney and the liver above it), and
        a chain from both follows the neighbour as readily as the organ.
    cross_chunk_agreement: another patient's whole labelled organ (several support slices, chunked):
        the cross-patient pass runs once from each support slice alone, and the pass that agrees most
        with the others stands if it agrees at least this much (3D Dice) with one of them; otherwise
        the middle support's pass does (`neighbour.chunk_consensus`). One placement, seed or look
        carried from another patient can fail where another holds; two passes that agree from
        different slices of the support have rarely both failed. None = one pass learns from all
        supports together.
    cross_min_extent: another patient's support: a first pass that follows the organ across fewer mm
        than this share of the support organ's equivalent diameter did not find it, nor did one that
        runs from its seed to the volume's end only or keeps its seed slice alone (after the second
        pass too); the next seed candidate is tried, and without one that does, a warning
        (`neighbour.cross_patient`, `followed_extent`). None = the best-scored seed is kept.
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
    interpolate_agreement: float | None = None
    moved_prior: bool = True
    relearn_gap_look: bool = True
    tip_ratio: float | None = 0.25
    tip_grow_weight: float = 0.1
    tip_reach: float = 10.0
    gap_reach: bool = True
    gap_reach_cap: bool = True
    outward_own_look: bool = True
    tip_end: int | None = 1
    tip_consensus: float | None = 0.8
    body_seed: bool = True
    body_seed_refine: int = 5
    body_seed_one_piece: bool = True
    body_seed_trim: float | None = None
    body_seed_redraw: bool = True
    fob_mask_prompt: bool = True
    fob_bg_confidence: float = 0.0
    fob_data_term: bool = False
    fob_spr: bool = False
    fob_ring: str = "add"
    fob_absent: bool = True
    fob_stop_prob: float | None = 0.3
    fob_keep_prob: float | None = None
    second_pass: bool = True
    second_pass_refine: float | None = None
    cross_seed_one_piece: bool = True
    cross_chunk_agreement: float | None = 0.8
    cross_min_extent: float | None = 0.5
    largest_component: bool = False
    fill_holes: bool = True

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values (tuples become lists)."""
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PropagationConfig:
        """Inverse of `to_json`; unknown keys are ignored (a record written by a newer version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
        return cls(**{**_BEFORE_THE_FIELD, **values})


# What a record written before a field existed ran with, where that differs from today's default.
_BEFORE_THE_FIELD: dict[str, Any] = {"relearn_gap_look": False, "tip_ratio": None, "tip_end": None,
                                     "tip_consensus": None, "cross_min_extent": None, "gap_reach": False,
                                     "outward_own_look": False, "body_seed": False,
                                     "body_seed_refine": 0, "body_seed_one_piece": False,
                                     "fob_mask_prompt": False, "cross_seed_one_piece": False,
                                     "cross_chunk_agreement": None, "moved_prior": False,
                                     "gap_reach_cap": False, "body_seed_redraw": False}

# Per-modality presets of `PropagationConfig` (measurements in docs/RESULTS.md, "Tuning notes").
MODALITY_CONFIG: dict[str, dict[str, Any]] = {
    "mr": {"fg_area_per_point": 350.0, "back_check": 0.8, "second_pass_refine": 0.5},
    "ct": {"back_check": 0.7, "body_seed_trim": 2.5},
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
        raise SettingError("slices", f"must be 'auto' or 'A:B' (first:last slice, inclusive), got {text!r}") from None
    if a > b:
        raise SettingError("slices", f"{text}: the first slice {a} is after the last slice {b}")
    return a, b


def parse_slice_list(text: str | None) -> tuple[int, ...]:
    """'12,40' (or '12 40') -> (12, 40): slice indices along the slicing axis, sorted, each once;
    None or '' -> (). Bounds are checked against the volume by the job builder."""
    try:
        values = sorted({int(t) for t in str(text or "").replace(",", " ").split()})
    except ValueError:
        raise SettingError("absent_slices", f"must be slice indices separated by commas, e.g. 12,40; got {text!r}") from None
    return tuple(values)


def check_slice_range(rng: str | tuple[int, int], n_slices: int) -> None:
    """SettingError when an explicit (A, B) range leaves 0..n_slices-1."""
    if rng == "auto":
        return
    a, b = rng
    if a < 0 or b >= n_slices:
        raise SettingError("slices", f"{a}:{b} is out of bounds: the volume has slices 0..{n_slices - 1} along this axis")
