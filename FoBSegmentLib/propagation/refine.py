"""Outline refinement: once the chain has found the organ on each slice, a trained box-prompted model
redraws its outline there (`fob segment --refine litemedsam`).

The chain (graph cut with its shape prior, end rules and checks) decides where the organ is and on
which slices; LiteMedSAM, trained on medical images, draws a sharper outline inside the box of the
chain's slice mask. The refined outlines never feed the chain (its next slice, its end rules and a
later correction's reuse all read the accepted chain masks), so the prompts and the record of a run
are those of the chain alone, and replaying them with the same refiner gives back the same mask.
Annotated slices stay exactly as drawn.

Frames: slices (H, W) along the run's `axis` of [k, j, i]; the box is (x, y) = (column, row) pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from FoBSegmentLib.io.coords import put_slice, take_slice
from FoBSegmentLib.labelmap import dice, nonempty_slices
from FoBSegmentLib.prompts import PromptSet

# The refiners `--refine` offers (box-prompted segmenters of `segmenters.get_segmenter`).
REFINERS = ("litemedsam",)
# Pixels added around the chain mask's bounding box: about the jitter MedSAM's boxes were trained with
# (0-20 px on its 1024 px input, 0-5 on LiteMedSAM's 256).
BOX_MARGIN = 3
# The refined outline replaces the chain's only when the two overlap at least this much (Dice): below
# it the model drew mostly something else in the box (a neighbour, or nothing of the organ), and the
# chain's mask stays. Half overlap, set by reasoning; docs/RESULTS.md has 0.7 and no rule measured too.
REFINE_AGREEMENT = 0.5
# The refiner redraws a job's outlines only when, in the box of each annotated slice that shows the
# organ's body (at least `BODY_SHARE` of the largest annotation), it draws inside what the person
# drew: at least this share of its outlines there (pooled) must lie inside the annotations. An organ
# unlike those it was trained on (a thin crescent of an atrophic kidney) it fills in as a blob that
# spills over its box, and it spills the same way on the chain's slices, where the chain's masks stand
# closer to the organ. An outline drawn short of the annotation is no such sign: its box comes from the
# chain. Set by reasoning: a fifth of the outline outside the organ where the organ is known.
REFINER_TRUST = 0.8
# The organ's tips are left out of that judgement (annotated end slices, `inner_supports`, and slices
# under this share of the largest annotation): the refiner spills over a small end slice's box more
# than over the body's, and most of the organ's volume lies in its body.
BODY_SHARE = 0.5


def parse_refine(value: str | None) -> str | None:
    """`--refine` (or a manifest's refine column) as `JobSettings.refine`: None for none or empty;
    ValueError for a name that is not a refiner."""
    if value in (None, "", "none"):
        return None
    if value not in REFINERS:
        raise ValueError(f"refine: choose from none, {', '.join(REFINERS)}, got {value!r}")
    return value


def segmenter_label(segmenter: str, refiner: Any) -> str:
    """How a report names its segmenter: "graphcut", or "graphcut, outlines refined by litemedsam"."""
    return segmenter if refiner is None else f"{segmenter}, outlines refined by {getattr(refiner, 'name', refiner)}"


def box_prompts(mask: np.ndarray, margin: int = BOX_MARGIN) -> PromptSet:
    """The box around `mask` ((H, W) bool, not empty) widened by `margin` px and clipped to the slice,
    as the two corner points a box-prompted segmenter reads from `background`."""
    rows, cols = np.nonzero(mask)
    height, width = mask.shape
    x0, y0 = max(0, cols.min() - margin), max(0, rows.min() - margin)
    x1, y1 = min(width - 1, cols.max() + margin), min(height - 1, rows.max() + margin)
    return PromptSet(background=np.array([[x0, y0], [max(x1, x0 + 1), max(y1, y0 + 1)]], float))


def refine_slice(refiner: Any, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """(outline (H, W) bool, refined?): the refiner's outline of the organ in the box of `mask`, or
    `mask` itself (False) when that answer is empty or overlaps it less than `REFINE_AGREEMENT`."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return mask, False
    out = np.asarray(refiner.segment(image, box_prompts(mask)).mask, bool)
    if out.any() and dice(out, mask) >= REFINE_AGREEMENT:
        return out, True
    return mask, False


def refiner_trust(refiner: Any, supports: list[Any]) -> float | None:
    """The share of the refiner's outlines (pooled) that lies inside the support's mask, each drawn in
    the box of that mask, over the supports at least `BODY_SHARE` x the largest support's area.
    supports: `SupportSlice`s, image (H, W) and mask (H, W) bool. None when no support shows the organ."""
    areas = [int(np.count_nonzero(s.mask)) for s in supports]
    body = [s for s, area in zip(supports, areas) if area and area >= BODY_SHARE * max(areas, default=0)]
    if not body:
        return None
    outs = [np.asarray(refiner.segment(s.image, box_prompts(s.mask)).mask, bool) for s in body]
    # (Nothing drawn at all: nothing inside.)
    return sum(int(np.count_nonzero(o & s.mask)) for o, s in zip(outs, body)) / max(1, sum(int(o.sum()) for o in outs))


def inner_supports(run: Any, supports: list[Any]) -> list[Any]:
    """The annotated slices of the run's own volume with segmented slices on both sides (the organ's
    tips, where nothing was found beyond, left out)."""
    shown = nonempty_slices(run.mask, run.axis)
    return [s for s in supports if shown and shown[0] < s.index < shown[-1]]


def trusted_refiner(refiner: Any, supports: list[Any], notes: list[str]) -> Any:
    """`refiner`, or None (a note says why) when, in the boxes of the supports' masks, less than
    `REFINER_TRUST` of its outlines lies inside them (`refiner_trust`): the job's outlines are then the chain's."""
    if refiner is None:
        return None
    trust = refiner_trust(refiner, supports)
    if trust is None or trust >= REFINER_TRUST:
        return refiner
    name = getattr(refiner, "name", "the refiner")
    notes.append(f"outlines not refined: in the box of the annotated slices that show the organ's body, {name} "
                 f"draws {trust:.0%} of its outline inside the annotation, under {REFINER_TRUST:.0%}; the chain's "
                 f"masks stand")
    return None


def refine_outlines(run: Any, refiner: Any, annotated: set[int], previous: Any = None) -> np.ndarray:
    """[k, j, i] bool: the run's accepted masks, each non-annotated slice's outline refined.

    run: the `Runner` after its chains (its `mask` is not changed). annotated: slices kept as drawn.
    previous: an earlier result of the same job refined by the same refiner: a slice whose accepted
    mask is unchanged takes its refined outline from there (a correction redraws only what changed).
    Progress and cancel go through the run's callbacks; each refined slice is reported to `on_slice`.
    """
    out = run.mask.copy()
    todo = [z for z in range(run.n) if z not in annotated and take_slice(run.mask, run.axis, z).any()]
    old = getattr(previous, "refined", None)
    reusable = old is not None and previous.accepted is not None and old.shape == out.shape \
        and previous.axis == run.axis
    kept = []
    for i, z in enumerate(todo):
        run.check_cancel()
        mask = np.asarray(take_slice(run.mask, run.axis, z), bool)
        if reusable and np.array_equal(take_slice(previous.accepted, run.axis, z), mask):
            refined = np.asarray(take_slice(old, run.axis, z), bool)
        else:
            refined, changed = refine_slice(refiner, run.slice(z), mask)
            if not changed:
                kept.append(z)
        put_slice(out, run.axis, z, refined)
        if run.on_slice is not None and (run.report_range is None or run.report_range[0] <= z <= run.report_range[1]):
            run.on_slice(z, refined.copy())
        if run.progress is not None:
            run.progress(i + 1, len(todo), f"refining outlines: slice {z}")
    if todo:
        name = getattr(refiner, "name", "the refiner")
        run.notes.append(f"outlines refined by {name} in the box of each chain mask on {len(todo)} slice(s)"
                         + (f"; the chain's mask kept on slice(s) {', '.join(map(str, kept))}, where {name} "
                            f"drew mostly something else" if kept else ""))
    return out
