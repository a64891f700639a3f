"""The annotation loop as a protocol (`fob evaluate --protocol interactive`): how good is the organ
after N slices drawn by hand, and which slice should be drawn next.

For every case and organ of CHAOS MR and Synapse CT: a simulated annotator starts from the middle
slice of the organ (its reference mask, what a person would draw). In each round it annotates, with
the reference mask of that slice, the slice the tool ranks first (`propagation.review`; a slice the
organ is not on becomes an annotated absence), and the pipeline (`fob segment`'s job, `job.build_job`)
propagates again from all annotated slices. In the same run, on the same cases:
    blind     the annotator picks the middle of the largest unannotated gap of the segmented extent
              instead of the ranking;
    prompts   correction by prompts (the FoB way): the ranked slice's points are replaced by a ring
              and inside points from its reference (none when the organ is absent) and the
              propagation record is replayed (`propagation.document`);
    even      the pipeline from N slices evenly spread over the organ's range, both ends included
              (`even`) and at the centres of N equal parts (`even_inner`, the ends left out);
    fill      Slicer's Fill between slices (ITK MCI) from the same N evenly spread slices, and from
              the slices the ranked annotator chose.
    oracle    (analysis, only when named) the annotator draws the slice where the current result is
              most wrong (reads the reference by design): how far any ranking could take the loop.
The reference is read to draw the annotations, to choose the evenly spread slices (a person knows
where the organ is), to score and for the oracle's pick; the ranking and the pipeline never see it.

Frames: volumes [k, j, i]; slices along the axis `fob segment` chooses; slice indices along it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from FoBSegmentLib.evaluate.datasets import DATASET_TITLES, ORGANS, VOLUME_DATASETS
from FoBSegmentLib.evaluate.interpolation import (
    annotated_nonempty,
    evenly_spaced_slices,
    fill_between_slices,
    middle_slice,
    morphological_contour_interpolation,
    organ_slice_range,
)
from FoBSegmentLib.evaluate.metrics import dice
from FoBSegmentLib.io.coords import put_slice, take_slice
from FoBSegmentLib.propagation.refine import segmenter_label

STRATEGIES = ("ranked", "blind", "prompts", "even", "fill")
# Analysis rows, run only when named (`--strategies oracle`): they read the reference to choose.
ANALYSIS_STRATEGIES = ("oracle",)


@dataclass
class Loop:
    """One case and organ: the prepared image, the reference [k, j, i] bool and its slice range."""

    dataset: str
    case_id: str
    organ: int
    prepared: Any
    ref: np.ndarray
    first: int
    last: int

    def draw(self, z: int) -> np.ndarray:
        """What the annotator draws on slice z: the reference mask of that slice ((H, W) bool)."""
        return np.asarray(take_slice(self.ref, self.prepared.axis, z), bool).copy()


def _job(loop: Loop, annotations: dict[int, np.ndarray], components: Any, config: Any):
    from FoBSegmentLib.evaluate.propagation import annotation_job

    return annotation_job(loop.prepared, annotations, components, config)


def inner_slices(first: int, last: int, count: int) -> list[int]:
    """`count` slices at the centres of `count` equal parts of [first, last] (the ends left out: a
    person annotating a few slices rarely draws the organ's tips)."""
    return sorted({int(np.floor(first + (i + 0.5) * (last - first + 1) / count)) for i in range(count)})


def blind_pick(annotated: list[int], segmented: tuple[int, int] | None) -> int | None:
    """The middle of the largest run of unannotated slices within the segmented extent (and the
    annotated slices); None when every slice there is annotated."""
    pts = sorted(annotated)
    lo, hi = pts[0], pts[-1]
    if segmented is not None:
        lo, hi = min(lo, segmented[0]), max(hi, segmented[1])
    gaps = []
    edges = [lo - 1, *pts, hi + 1]
    for a, b in zip(edges, edges[1:]):
        if b - a > 1:
            gaps.append((b - a - 1, -(a + 1), a + 1, b - 1))
    if not gaps:
        return None
    _, _, g0, g1 = max(gaps)
    return middle_slice(g0, g1)


def ranked_pick(result: Any, annotated: list[int]) -> int | None:
    from FoBSegmentLib.propagation.review import review_ranking

    for item in review_ranking(result):
        if item.index not in annotated:
            return item.index
    return None


def oracle_pick(result: Any, loop: Loop, annotated: list[int]) -> int | None:
    """The unannotated slice with the most voxels the result gets wrong against the reference (READS
    THE REFERENCE, by design); None when no slice is wrong."""
    axis = loop.prepared.axis
    pred = np.asarray(result.mask, bool)
    wrong = {z: int(np.count_nonzero(take_slice(pred, axis, z) ^ take_slice(loop.ref, axis, z)))
             for z in range(loop.ref.shape[axis]) if z not in annotated}
    z = max(wrong, key=lambda k: (wrong[k], -k), default=None)
    return z if z is not None and wrong[z] > 0 else None


def run_annotator(loop: Loop, components: Any, config: Any, rounds: int, strategy: str) -> tuple[list[float], list[int]]:
    """Dice after rounds 0..rounds for the `ranked`, `blind` or `oracle` annotator, and the slices it drew."""
    start = annotated_nonempty(loop.ref, loop.prepared.axis, middle_slice(loop.first, loop.last))
    annotations = {start: loop.draw(start)}
    scores: list[float] = []
    result = None
    for r in range(rounds + 1):
        # The previous round's chains that an added slice does not touch are taken over, as in Slicer.
        result = _job(loop, annotations, components, config).run(previous=result)
        scores.append(dice(result.mask, loop.ref))
        if r == rounds:
            break
        pick = (ranked_pick(result, list(annotations)) if strategy == "ranked"
                else oracle_pick(result, loop, list(annotations)) if strategy == "oracle" else None)
        if pick is None:
            pick = blind_pick(list(annotations), result.segmented)
        if pick is None:
            scores += [scores[-1]] * (rounds - r)
            break
        annotations[pick] = loop.draw(pick)
    return scores, list(annotations)


def run_prompt_corrections(loop: Loop, components: Any, config: Any, rounds: int) -> list[float]:
    """Dice after 0..rounds corrections by prompts of the ranked slice (the propagation record replayed)."""
    from FoBSegmentLib.prompts import PromptSet
    from FoBSegmentLib.propagation import prompts_from_mask

    start = annotated_nonempty(loop.ref, loop.prepared.axis, middle_slice(loop.first, loop.last))
    job = _job(loop, {start: loop.draw(start)}, components, config)
    result = job.run()
    scores = [dice(result.mask, loop.ref)]
    corrected: set[int] = set()
    for _ in range(rounds):
        pick = ranked_pick(result, [start, *corrected])
        if pick is None:
            scores.append(scores[-1])
            continue
        corrected.add(pick)
        prompts = dict(result.prompts)
        drawn = loop.draw(pick)
        made = prompts_from_mask(drawn, job.config) if drawn.any() else None
        # No organ on that slice: the person deletes its points (the slice and its chain are cleared).
        prompts[pick] = PromptSet(made.background, made.foreground) if made is not None else PromptSet()
        result = job.with_prompts(prompts, result.record).run(previous=result)
        scores.append(dice(result.mask, loop.ref))
    return scores


def run_loop(loop: Loop, components: Any, config: Any, rounds: int, even_counts: list[int],
             strategies: tuple[str, ...] = STRATEGIES) -> dict[str, Any]:
    """The `strategies` (default every one and every baseline) on one case and organ; the record of the
    JSON report ("fill" needs "ranked" for the Fill between the ranked slices)."""
    axis = loop.prepared.axis
    rec: dict[str, Any] = {"dataset": loop.dataset, "case": loop.case_id, "organ": loop.organ,
                           "ref_range": [loop.first, loop.last]}
    t0 = time.perf_counter()
    for strategy in ("ranked", "blind", "oracle"):
        if strategy in strategies:
            rec[strategy], rec[f"{strategy}_slices"] = run_annotator(loop, components, config, rounds, strategy)
    if "prompts" in strategies:
        rec["prompts"] = run_prompt_corrections(loop, components, config, rounds)
    if "even" in strategies:
        rec["even"], rec["even_inner"] = {}, {}
        for n in even_counts:
            for row, picks in (("even", evenly_spaced_slices(loop.first, loop.last, n)),
                               ("even_inner", inner_slices(loop.first, loop.last, n))):
                picks = sorted({annotated_nonempty(loop.ref, axis, z) for z in picks})
                result = _job(loop, {z: loop.draw(z) for z in picks}, components, config).run()
                rec[row][str(n)] = dice(result.mask, loop.ref)
    if "fill" in strategies:
        rec["fill_even"] = {str(n): dice(fill_between_slices(loop.ref, axis, n)[0], loop.ref)
                            for n in even_counts if n >= 2}
    if "fill" in strategies and "ranked" in strategies:
        rec["fill_ranked"] = []
        for k in range(2, len(rec["ranked_slices"]) + 1):
            seed = np.zeros(loop.ref.shape, np.uint8)
            for z in rec["ranked_slices"][:k]:
                put_slice(seed, axis, z, loop.draw(z))
            rec["fill_ranked"].append(dice(morphological_contour_interpolation(seed, axis=None) > 0, loop.ref))
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def loops(cases: list, organs: list[int]):
    """The (case, organ) loops of the cases; the organ must be on at least one slice."""
    from FoBSegmentLib.evaluate.propagation import prepare_volume, read_reference

    for case in cases:
        prepared = prepare_volume(case.image)
        labels = read_reference(case.label, prepared)
        for organ in organs:
            ref = labels == organ
            if not ref.any():
                continue
            first, last = organ_slice_range(ref, prepared.axis)
            yield Loop(case.dataset, case.case_id, organ, prepared, ref, first, last)


def _strategies(names: list[str] | None) -> tuple[str, ...]:
    chosen = tuple(names or STRATEGIES)
    known = STRATEGIES + ANALYSIS_STRATEGIES
    bad = [n for n in chosen if n not in known]
    if bad:
        raise ValueError(f"--strategies: unknown {', '.join(bad)} (choose from {', '.join(known)})")
    return tuple(n for n in known if n in chosen)


def run(args: Any) -> int:
    """`fob evaluate --protocol interactive`: the records, the tables, --json, --markdown and --plot."""
    from FoBSegmentLib.evaluate import interactive_report as report

    section = report.SECTION if args.section in (None, "fob-protocol") else args.section
    report.markers(section)  # a bad name fails now, not after the evaluation
    if args.from_json:
        from FoBSegmentLib.evaluate.report import read_reports

        records, head = read_reports(args.from_json, "interactive", "rounds",
                                     ("rounds", "prompts_from", "segmenter", "model"))
        doc = report.build(merge_loops(records), int(head["rounds"]), head["prompts_from"], head["segmenter"], head["model"],
                           [*head.get("notes", []), *(getattr(args, "note", None) or [])], head["seconds_total"])
        doc["command"] = " ; ".join(c for c in dict.fromkeys(head["commands"]) if c)
    else:
        doc = _evaluate(args, report)
    print(report.text_tables(doc))
    if args.json:
        from FoBSegmentLib.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(doc, Path(args.plot))
        print(f"wrote {args.plot}")
    if args.markdown:
        report.write_markdown(doc, Path(args.markdown), args.plot, section)
        print(f"wrote {args.markdown}")
    return 0


def merge_loops(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of the same loop (dataset, case, organ) from several reports made one, in the reports'
    order: a later report's rows replace an earlier one's (a strategy run again after a change to
    it, e.g. `--strategies ranked fill` after a change to the ranking, which the other rows do not
    read), and their seconds add up."""
    merged: dict[tuple, dict[str, Any]] = {}
    for rec in records:
        key = (rec["dataset"], str(rec["case"]), rec["organ"])
        if key in merged:
            seconds = merged[key].get("seconds", 0.0) + rec.get("seconds", 0.0)
            merged[key] = {**merged[key], **rec, "seconds": round(seconds, 1)}
        else:
            merged[key] = dict(rec)
    return list(merged.values())


def _evaluate(args: Any, report: Any) -> dict[str, Any]:
    from FoBSegmentLib.evaluate.propagation import make_runtime, resolve_organs, select_cases
    from FoBSegmentLib.job import Components

    cases = select_cases(list(args.dataset or VOLUME_DATASETS), args.data, args.cases)
    organs = resolve_organs(args.organs)
    rounds = int(args.rounds)
    if not 1 <= rounds <= 20:
        raise ValueError(f"--rounds must be 1..20, got {rounds}")
    strategies = _strategies(getattr(args, "strategies", None))
    source = args.prompts_from or "hybrid"
    runtime, model_line, notes = make_runtime(args, [source])
    if source in ("fob", "hybrid") and runtime.generator is None:
        source = "neighbour"
        notes.append("no FoB model: neighbour prompts")
    components = Components(runtime.generator, runtime.segmenter, source, refiner=runtime.refiner)
    records = []
    t0 = time.perf_counter()
    all_loops = list(loops(cases, organs))
    for i, loop in enumerate(all_loops):
        records.append(run_loop(loop, components, None, rounds, list(range(1, rounds + 2)), strategies))
        if not args.quiet:
            r = records[-1]
            row = next((s for s in ("ranked", "blind", "oracle", "prompts") if s in r), None)
            curve = f"{row} " + " ".join(f"{100 * d:.1f}" for d in r[row]) if row else "done"
            print(f"[{i + 1}/{len(all_loops)}] {loop.dataset} {loop.case_id} {ORGANS[loop.organ]}: {curve} "
                  f"({r['seconds']} s)", file=sys.stderr)
    return report.build(records, rounds, source, segmenter_label(args.segmenter, runtime.refiner), model_line, notes,
                        time.perf_counter() - t0)


__all__ = ["ANALYSIS_STRATEGIES", "DATASET_TITLES", "STRATEGIES", "run", "run_loop"]
