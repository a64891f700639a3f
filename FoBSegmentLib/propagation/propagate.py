"""The one entry point of a propagation: annotated slices in, the organ on every slice out.

Prompt sources (`prompts_from`):
    "fob"        FoB's generator predicts background ring + foreground points for every query slice
                 from a support slice (the nearest annotated slice of the same volume, or for another
                 patient's support the method's chunked protocol).
    "neighbour"  no learning: prompts for slice z come from the accepted mask of the adjacent, already
                 segmented slice, chained outwards from each annotated slice (`propagation.neighbour`).
    "hybrid"     FoB's coarse foreground probability decides where the organ ends (`slices="auto"`),
                 neighbour chaining supplies the geometry inside that range.
    "chained"    the neighbour chain with FoB in every step: the support is the previous accepted
                 slice and its mask (adjacent, as FoB is trained); FoB's confident ring points,
                 foreground points and coarse probability join the chain's prompts, and its coarse
                 probability on the next slice takes part in the stop (`propagation.neighbour`).
A prompts file with a propagation record replays it (`propagation.document`); one without a record
is segmented slice by slice from its points alone. The query's reference mask is never read.

Frames: `image` is [k, j, i] float in [0, 1] ([k, j, i, 3] for colour); slices (H, W) along `axis`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from FoBSegmentLib.io.coords import slice_axes, take_slice
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.propagation.config import PROMPT_SOURCES, PropagationConfig, check_slice_range
from FoBSegmentLib.propagation.document import build_record, replay
from FoBSegmentLib.propagation.fob import hybrid_range, run_fob
from FoBSegmentLib.propagation.locate import flag_cross_patient
from FoBSegmentLib.propagation.motion import agreements
from FoBSegmentLib.propagation.neighbour import run_neighbour
from FoBSegmentLib.propagation.refine import inner_supports, refine_outlines, trusted_refiner
from FoBSegmentLib.propagation.runner import Runner
from FoBSegmentLib.propagation.supports import inside_absent, resize_support
from FoBSegmentLib.propagation.types import (
    CancelCheck,
    ProgressCallback,
    PropagationResult,
    SliceCallback,
    SliceReport,
    SupportSlice,
)


def _check_supports(supports: list[SupportSlice], hw: tuple[int, int], same_volume: bool) -> list[SupportSlice]:
    """Sorted supports on the query's slice grid. Same volume, an empty support slice is an
    annotation too: the organ is absent there, and no chain passes it."""
    if not any(s.mask.any() for s in supports):
        raise ValueError("the support mask is empty: no slice holds the support label")
    sup = sorted(supports, key=lambda s: s.index)
    if not same_volume:
        sup = [resize_support(s, hw) for s in sup]
    for s in sup:
        if s.mask.shape != hw:
            raise ValueError(
                f"support slice {s.index} is {s.mask.shape[1]}x{s.mask.shape[0]} px but the query slices are "
                f"{hw[1]}x{hw[0]}; resample the support onto a grid with the same in-plane size"
            )
        if not s.mask.any() and not same_volume:
            raise ValueError(f"support slice {s.index} has an empty mask")
    return sup


def _reusable(previous: PropagationResult, supports: list[SupportSlice], cfg: PropagationConfig, axis: int,
              prompts_from: str, same_volume: bool) -> dict:
    """slice -> (report, accepted mask, prompts) of `previous` that a chain may take over unchanged;
    empty when anything a chain depends on differs (configuration, source, axis, or the annotated
    slices that show the organ, from which its appearance is learnt: an added annotated absence keeps
    the chains it does not cut)."""
    rec = previous.record or {}
    if (not same_volume or previous.accepted is None or previous.axis != axis
            or previous.prompts_from != prompts_from or rec.get("config") != cfg.to_json()):
        return {}
    before = {z for z, r in previous.slices.items()
              if r.source == "annotation" and take_slice(previous.accepted, axis, z).any()}
    shown = [s for s in supports if s.mask.any()]
    if before != {s.index for s in shown}:
        return {}
    for s in shown:
        if not np.array_equal(take_slice(previous.accepted, axis, s.index), s.mask):
            return {}
    out = {}
    for z, rep in previous.slices.items():
        ended = rep.source == "skipped" and any(f.startswith("chain-end") for f in rep.flags)
        if rep.chain is not None and (rep.source == "neighbour" or ended):
            out[z] = (rep, np.asarray(take_slice(previous.accepted, axis, z), bool), previous.prompts.get(z))
    return out


def _points_only(run: Runner, prompts_in: dict[int, PromptSet], annotated: set[int]) -> None:
    """A prompts file without a record: each slice from its points alone."""
    for z in sorted(prompts_in):
        if not 0 <= z < run.n:
            raise ValueError(f"the prompts file has points on slice {z}, outside 0..{run.n - 1}")
        run.check_cancel()
        if z in annotated:
            run.tick(f"slice {z}: annotated, prompts ignored")
            continue
        ps = prompts_in[z]
        mask, score = run.segment(z, ps)
        run.accept(z, mask, SliceReport(z, "prompts-in", score=score), ps)
        run.tick(f"slice {z}")
    run.notes.append(f"segmented the {len(prompts_in)} slice(s) that carry prompts in the prompts file "
                     "(no propagation record: each from its points alone)")


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
    record: dict | None = None,
    previous: PropagationResult | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    on_slice: SliceCallback | None = None,
    spacing: tuple[float, float, float] | None = None,
    refiner: Any = None,
) -> PropagationResult:
    """Segment the organ of `supports` in every slice of `image` along `axis`.

    image: normalised query volume, [k, j, i] float in [0, 1] ([k, j, i, 3] for colour).
    supports: annotated slices (from this volume when `same_volume`, else from another patient,
        resampled to the query's slice size).
    segmenter: has `.segment(image (H, W[, 3]), PromptSet) -> result(.mask, .score)`.
    prompts_from: "fob" | "neighbour" | "hybrid" | "chained"; all but neighbour need `generator`
        (`FoBPromptGenerator`-like with `.predict(support_image, support_mask, query_image)`).
    prompts_in: slice -> PromptSet given by a person (a prompts file, points edited in Slicer).
        With `record` (the propagation record of the file) the propagation is replayed: unedited
        slices come out identical, edited ones and what was chained from them are redone
        (`propagation.document`). Without a record each slice is segmented from its points alone.
        Nothing is predicted either way. `config` should then be the record's.
    previous: an earlier result of the same job: the slices of every chain that runs exactly as
        before (same annotated root, direction, end and target) are taken from it instead of being
        segmented again (`_reusable`); when replaying `previous.record`, its unedited slices are.
    progress(done, total, text) is called after each slice; cancel() is checked before each slice
        and raises PropagationCancelled when it returns True.
    on_slice(z, mask) is called each time slice z's 2D mask ((H, W) bool, a copy) is accepted, so a
        caller can show results slice by slice; a slice accepted again is reported again (the last
        call wins). Annotated slices and stepping stones outside an explicit range are not
        reported. The masks precede the 3D cleanup: the result's `mask` is the final word. It runs
        on the calling (worker) thread: it must be quick and must not touch MRML or Qt.
    spacing: mm between slices and between the rows and columns of a slice (`io.coords.slice_spacing`);
        None: 1 mm each.
    refiner: a box-prompted segmenter that redraws the outline of every segmented slice that is not
        annotated once the chains are done (`propagation.refine`); None: the chain's masks stand.
    Returns the result with its `record`. Raises ValueError for unusable supports or an explicit
    slice range out of bounds.
    """
    cfg = config or PropagationConfig()
    if prompts_from not in PROMPT_SOURCES:
        raise ValueError(f"unknown prompt source {prompts_from!r}; use one of {', '.join(PROMPT_SOURCES)}")
    n = image.shape[axis]
    check_slice_range(cfg.slices, n)
    rows, cols = slice_axes(axis)
    sup = _check_supports(supports, (image.shape[rows], image.shape[cols]), same_volume)
    if prompts_from in ("fob", "hybrid", "chained") and generator is None and prompts_in is None:
        raise ValueError(f"prompt source {prompts_from!r} needs a FoB model (none loaded)")
    annotations = sup if same_volume else []
    lo, hi = (0, n - 1) if cfg.slices == "auto" else cfg.slices
    total = len(prompts_in) + len(annotations) if prompts_in is not None else hi - lo + 1
    run = Runner(image, axis, segmenter, cfg, progress, cancel, total=total, on_slice=on_slice)
    run.same_volume = same_volume
    run.refiner = refiner
    if spacing is not None:
        run.spacing = tuple(float(v) for v in spacing)
    if cfg.slices != "auto":
        run.report_range = (lo, hi)
    rng = (lo, hi)
    source = prompts_from
    run.copy_annotations(annotations)
    if previous is not None and prompts_in is None and prompts_from != "chained":
        # (A chained slice depends on the model, which the record's config does not name.)
        run.reuse = _reusable(previous, sup, cfg, axis, prompts_from, same_volume)
    if prompts_in is not None and record is not None:
        source, rng = replay(run, record, prompts_in, sup, same_volume, previous)
    elif prompts_in is not None:
        _points_only(run, prompts_in, {s.index for s in annotations})
        source = "prompts-in"
    elif not same_volume and image.ndim == 4 and n == 1:
        # Issue 21, dermoscopy: another image's lesion annotation -> this colour image's lesion.
        from FoBSegmentLib.propagation.skin import run_skin

        run_skin(run, sup, generator if prompts_from in ("fob", "hybrid") else None)
    elif prompts_from == "fob":
        run_fob(run, sup, generator, same_volume, inside_absent(rng, sup))
    else:
        if prompts_from == "hybrid":
            rng = hybrid_range(run, sup, generator, same_volume, rng)
        if prompts_from == "chained":
            run.generator = generator
        rng = inside_absent(rng, sup)
        run_neighbour(run, sup, same_volume, rng)
        if cfg.slices != "auto":
            # A chain from an annotated slice outside --slices passes through the slices between;
            # they served as stepping stones only (their points stay in the record).
            for z in range(n):
                if not lo <= z <= hi and run.reports[z].source == "neighbour":
                    run.drop(z, "outside the requested slice range")
    outlines = None
    # After the chains, which tell the organ's ends: an annotated end slice is a tip and is not judged. (A
    # body seed between two drawn tips was redrawn by the refiner during the chains either way,
    # `neighbour.redraw_body_seed`.)
    refiner = trusted_refiner(refiner, inner_supports(run, sup) if same_volume else sup, run.notes)
    if refiner is not None:
        outlines = refine_outlines(run, refiner, {s.index for s in annotations}, previous)
    result = run.finish(source, annotations, outlines)
    if image.ndim == 3:
        for z, value in agreements(result.mask, image, axis, run.report_range).items():
            result.slices[z].agreement = value
    result.record = build_record(result, cfg, sup, same_volume, rng, image.shape[:3])
    result.warnings = flag_cross_patient(result)
    for z, rep in result.slices.items():
        if rep.source == "skipped":
            result.prompts.pop(z, None)  # stepping stones: their points live in the record only
    return result
