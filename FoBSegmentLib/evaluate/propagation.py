"""The propagation protocol (issue 10): one annotated slice -> the whole organ, against what a
radiologist already has.

For every CHAOS MR patient and every Synapse CT case in `../shared/data` and each organ (1 liver,
2 right kidney, 3 left kidney, 4 spleen):

* the annotated slice is the middle of the organ's axial slice range in the reference label (the
  nearest slice that shows the organ if the middle one does not);
* pipeline methods run `fob segment`'s pipeline on the image with a support mask that holds only
  that slice (same reading, intensity preset, support extraction, `PropagationConfig` defaults and
  the one job builder, `job.build_job`; `Testing/test_propagation_protocol.py` checks the result equals
  `fob segment`'s output file): `fob` (FoB prompts), `hybrid` (FoB decides the extent, neighbour
  chaining the shape), `neighbour` (the same chain without a model) and `plain` (the issue's plain
  mask propagation baseline: prompts from the adjacent result, the segmenter without its shape
  prior, stops only when the mask vanishes or jumps, `PLAIN_CONFIG`);
* the model-free baselines of `evaluate/interpolation.py`: Fill between slices from 3 and from 5
  reference slices (ITK MorphologicalContourInterpolator, as Slicer), and the annotated mask copied
  over the organ's range (the range read from the reference: an optimistic baseline by definition);
* metric: 3D Dice over the whole volume (every slice, not only the organ's range).

Analysis methods (not default): `neighbour3` (the pipeline with the 3 slices fill-between 3 uses)
and `ceiling` (reads the reference by design: every slice segmented from the TRUE adjacent mask,
the upper bound of slice-to-slice chaining with the segmenter, `chaining_ceiling`).

The reference label is read for three things only: choosing the annotated slice, the baselines
that are defined on it (fill, copy), and scoring. The pipeline receives the image and the one
annotated slice (see `predict`); the tests perturb the reference everywhere else and check that
the pipeline's result does not change.

`python -m FoBSegmentLib.evaluate.propagation --help` runs it standalone; `fob evaluate --protocol
propagation` calls `run(args)` with the `fob evaluate` namespace plus `add_arguments`' options.

Frames: volumes [k, j, i] (SimpleITK order); slices along the axis `fob segment` chooses
(`job.default_slice_axis`); slice indices count along that axis.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from FoBSegmentLib.atomic import write_text_atomic
from FoBSegmentLib.evaluate.datasets import DATASET_TITLES, ORGANS, VOLUME_DATASETS, Case, list_cases
from FoBSegmentLib.evaluate.interpolation import (
    annotated_nonempty,
    copy_mask,
    fill_between_slices,
    middle_slice,
    organ_slice_range,
)
from FoBSegmentLib.evaluate.metrics import dice
from FoBSegmentLib.evaluate.report import markers, write_section
from FoBSegmentLib.io.coords import take_slice

# Method -> (short label, what it is). Pipeline methods map to a `--prompts-from` source.
METHODS: dict[str, tuple[str, str]] = {
    "fob": ("FoB", "fob segment --prompts-from fob (FoB prompts on every slice, extent from its coarse map)"),
    "hybrid": ("FoB hybrid", "fob segment --prompts-from hybrid (FoB extent, neighbour-chained shape)"),
    "neighbour": ("neighbour chain", "fob segment --prompts-from neighbour (no model: the default chain, range not "
                  "limited by FoB's coarse map)"),
    "plain": ("mask propagation", "plain baseline, no learning: ring outside / points inside the adjacent slice's result, "
              "the same segmenter without shape prior or reference appearance (graphcut then runs GrabCut), stops "
              "only when the mask vanishes or its area jumps x2 (PLAIN_CONFIG)"),
    "neighbour3": ("neighbour chain, 3 slices", "fob segment --prompts-from neighbour with the 3 slices fill-between 3 uses annotated"),
    "fill3": ("fill-between 3", "Slicer Fill between slices (ITK MCI) from 3 reference slices incl. the organ's ends"),
    "fill5": ("fill-between 5", "Slicer Fill between slices (ITK MCI) from 5 reference slices incl. the organ's ends"),
    "copy": ("mask copy", "annotated mask copied onto every slice of the reference organ range"),
    "ceiling": ("chaining ceiling (reads ref.)", "upper bound, reads the reference by design: every slice of the "
                "reference range segmented with the pipeline's neighbour prompts from the TRUE adjacent mask"),
}
PIPELINE_SOURCES = {"fob": "fob", "hybrid": "hybrid", "neighbour": "neighbour", "neighbour3": "neighbour",
                    "plain": "neighbour"}
# The plain mask propagation: prompts from the adjacent result and nothing else.
PLAIN_CONFIG = {"shape_prior": False, "retry_foreground": 0, "retry_ring": None, "intensity_match": 0.0,
                "median_band": None, "back_check": None, "regrow": None, "fg_area_per_point": 0.0}
MODEL_METHODS = ("fob", "hybrid")
DEFAULT_METHODS = ("fob", "hybrid", "neighbour", "plain", "fill3", "fill5", "copy")
SECTION_START, SECTION_END = markers("propagation")


# ----------------------------------------------------------------------------------------------
# cases and volumes




def prepare_volume(image_path: str | os.PathLike, modality: str = "auto") -> Any:
    """Read an image and prepare it exactly as `fob segment` does (`job.prepare_image`): a
    `job.PreparedImage` (volume, normalised, modality, axis)."""
    from FoBSegmentLib.io import volumes
    from FoBSegmentLib.job import JobSettings, prepare_image

    return prepare_image(volumes.read_volume(image_path), JobSettings(modality=modality))


def read_reference(label_path: str | os.PathLike, prepared: Any) -> np.ndarray:
    """The reference label map [k, j, i] (integers) on the prepared image's grid."""
    from FoBSegmentLib.io import volumes

    return np.asarray(volumes.read_label(label_path, reference=prepared.volume).array)


def annotated_slice(reference: np.ndarray, axis: int) -> int:
    """The protocol's annotated slice: middle of the organ's slice range (nearest non-empty slice)."""
    first, last = organ_slice_range(reference, axis)
    return annotated_nonempty(reference, axis, middle_slice(first, last))


# ----------------------------------------------------------------------------------------------
# the pipeline, as `fob segment` runs it


def predict(
    prepared: Any,
    annotations: dict[int, np.ndarray],
    segmenter: Any,
    source: str,
    generator: Any = None,
    config: Any = None,
    modality_defaults: bool = True,
) -> Any:
    """`fob segment`'s propagation from annotated slices, built by the one job builder
    (`job.build_job`); the reference label is not an input.

    annotations: slice index along `prepared.axis` -> (H, W) bool mask drawn on that slice (one
    entry for the protocol; several for the "annotate a few slices" variant).
    source: 'fob' | 'hybrid' | 'neighbour' (`--prompts-from`). config: a `PropagationConfig`
    (default: `fob segment`'s defaults, slices 'auto'); the modality preset is applied to it as
    `fob segment` does unless `modality_defaults` is False (the plain baseline).
    Returns the `PropagationResult` (mask [k, j, i] uint8, per-slice reports).
    """
    from FoBSegmentLib.job import Components, JobSettings, build_job

    support_vol = np.zeros(prepared.normalised.shape[:3], bool)
    sl = [slice(None)] * 3
    for index, ann in annotations.items():
        sl[prepared.axis] = int(index)
        support_vol[tuple(sl)] = np.asarray(ann, bool)
    settings = JobSettings(prompts_from=source, config=config, modality_presets=modality_defaults)
    job = build_job(prepared, support_vol, settings, components=Components(generator, segmenter, source))
    return job.run()


# ----------------------------------------------------------------------------------------------
# analysis: the segmenter's own per-slice error


def chaining_ceiling(
    prepared: Any,
    reference: np.ndarray,
    index: int,
    segmenter: Any,
    config: Any = None,
) -> np.ndarray:
    """Upper bound of slice-to-slice chaining with `segmenter` (READS THE REFERENCE, by design).

    Every slice z of the reference organ range except the annotated `index` is segmented with the
    pipeline's neighbour prompts (`prompts_from_mask`, `config` or the pipeline defaults) derived
    from the reference mask of the adjacent slice towards `index`: no compounding, perfect stop.
    What is left of the Dice loss is the segmenter's own per-slice error. A segmenter with
    `fit_reference` learns the organ's appearance from the annotated slice first, as in the pipeline.
    reference: [k, j, i] bool. Returns [k, j, i] bool.
    """
    import cv2

    from FoBSegmentLib.propagation import PropagationConfig, cleanup_3d, prompts_from_mask

    cfg = config if config is not None else PropagationConfig()
    ref = np.asarray(reference, bool)
    axis = prepared.axis
    first, last = organ_slice_range(ref, axis)
    out = np.zeros(ref.shape, bool)
    sl = [slice(None)] * 3
    fit_reference = getattr(segmenter, "fit_reference", None)
    if cfg.shape_prior and fit_reference is not None:
        fit_reference(take_slice(prepared.normalised, axis, index), take_slice(ref, axis, index))
    for z in range(first, last + 1):
        sl[axis] = z
        if z == index:
            out[tuple(sl)] = ref[tuple(sl)]
            continue
        prev = np.asarray(take_slice(ref, axis, z - 1 if z > index else z + 1), bool)
        ps = prompts_from_mask(prev, cfg) if prev.any() else None
        if ps is None:
            continue
        cv2.setRNGSeed(0)
        image = np.asarray(take_slice(prepared.normalised, axis, z), np.float32)
        out[tuple(sl)] = np.asarray(segmenter.segment(image, ps).mask, bool)
    return cleanup_3d(out, axis, largest_component=False, fill_holes=cfg.fill_holes)


# ----------------------------------------------------------------------------------------------
# scoring and error breakdown


def error_breakdown(pred: np.ndarray, ref: np.ndarray, axis: int) -> dict[str, Any]:
    """Where a prediction loses Dice, in voxels (all [k, j, i] bool).

    missed_slices_fn: reference voxels on slices where the prediction is empty (organ ends cut off).
    extra_slices_fp: predicted voxels on slices where the reference is empty (run past the organ).
    inslice_fn / inslice_fp: errors on slices both hold (boundary errors, leaks into neighbours).
    Also the per-slice areas (reference, prediction, overlap) from the first to the last slice either
    holds, for the analysis of which slices fail.
    """
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    other = tuple(a for a in range(3) if a != axis)
    pa, ra, ov = p.sum(axis=other), r.sum(axis=other), (p & r).sum(axis=other)
    both = (pa > 0) & (ra > 0)
    out = {
        "tp": int(ov.sum()),
        "missed_slices_fn": int(ra[(pa == 0)].sum()),
        "extra_slices_fp": int(pa[(ra == 0)].sum()),
        "inslice_fn": int((ra - ov)[both].sum()),
        "inslice_fp": int((pa - ov)[both].sum()),
    }
    z = np.flatnonzero((pa > 0) | (ra > 0))
    if len(z):
        lo, hi = int(z[0]), int(z[-1])
        out["slices"] = {
            "first": lo,
            "ref_area": [int(v) for v in ra[lo : hi + 1]],
            "pred_area": [int(v) for v in pa[lo : hi + 1]],
            "overlap": [int(v) for v in ov[lo : hi + 1]],
        }
    return out


def best_stop_dice(errors: dict[str, Any], annotated: int) -> float | None:
    """Dice the prediction would reach had its chain stopped at the best slice on each side of the
    `annotated` slice (READS THE REFERENCE: an analysis of how much the stopping rule costs).

    errors: an `error_breakdown` result (its per-slice areas). Truncation only removes predicted
    slices, so the per-slice overlaps give the answer exactly.
    """
    sl = errors.get("slices")
    if not sl:
        return None
    ref, pred, ov = (np.asarray(sl[k], np.float64) for k in ("ref_area", "pred_area", "overlap"))
    z0 = annotated - sl["first"]
    if not 0 <= z0 < len(ref):
        return None
    cp, co = np.concatenate([[0.0], np.cumsum(pred)]), np.concatenate([[0.0], np.cumsum(ov)])
    lo = np.arange(0, z0 + 1)[:, None]
    hi = np.arange(z0, len(ref))[None, :] + 1
    d = 2 * (co[hi] - co[lo]) / (ref.sum() + cp[hi] - cp[lo])
    return float(d.max())


def _range_of(mask: np.ndarray, axis: int) -> list[int] | None:
    try:
        return list(organ_slice_range(mask, axis))
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# one case


@dataclass
class Runtime:
    """What the methods need besides the data: segmenter, generator (None: FoB methods skipped) and
    the pipeline config."""

    segmenter: Any = None
    generator: Any = None
    config_factory: Callable[[], Any] | None = None


@dataclass
class CaseOutcome:
    records: list[dict] = field(default_factory=list)
    masks: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)


def evaluate_case(
    case: Case,
    organs: Iterable[int],
    methods: Iterable[str],
    runtime: Runtime,
    keep_masks: bool = False,
    tick: Callable[[str], None] | None = None,
) -> CaseOutcome:
    """Every method on every organ of one case; one record per (organ, method).

    Record: dataset, case, organ, method, dice, annotated slice(s), reference and predicted slice
    ranges, seconds, error breakdown, pipeline notes / flagged slices. keep_masks also returns the
    predicted [k, j, i] bool masks keyed by (organ, method) (the tests compare them).
    """
    prepared = prepare_volume(case.image)
    labels = read_reference(case.label, prepared)
    axis = prepared.axis
    out = CaseOutcome()
    for organ in organs:
        ref = labels == organ
        if not ref.any():
            for m in methods:
                out.records.append(
                    {"dataset": case.dataset, "case": case.case_id, "organ": organ, "method": m,
                     "dice": None, "skipped": "organ absent from the reference"}
                )
            continue
        first, last = organ_slice_range(ref, axis)
        z = annotated_slice(ref, axis)
        ann = np.asarray(take_slice(ref, axis, z), bool).copy()
        for m in methods:
            t0 = time.perf_counter()
            rec: dict[str, Any] = {
                "dataset": case.dataset, "case": case.case_id, "organ": organ, "method": m,
                "ref_range": [first, last], "annotated": [z],
            }
            if m in PIPELINE_SOURCES:
                if m in MODEL_METHODS and runtime.generator is None:
                    rec.update(dice=None, skipped="no FoB model")
                    out.records.append(rec)
                    continue
                cfg = runtime.config_factory() if runtime.config_factory else None
                if m == "plain":
                    from FoBSegmentLib.propagation import PropagationConfig

                    cfg = dataclasses.replace(cfg or PropagationConfig(), **PLAIN_CONFIG)
                annotations = {z: ann}
                if m == "neighbour3":
                    _, picks = fill_between_slices(ref, axis, 3, interpolate=False)
                    annotations = {p: np.asarray(take_slice(ref, axis, p), bool).copy() for p in picks}
                    rec["annotated"] = picks
                try:
                    res = predict(prepared, annotations, runtime.segmenter, PIPELINE_SOURCES[m], runtime.generator, cfg,
                                  modality_defaults=m != "plain")
                except ValueError as exc:
                    # `fob segment` would stop with this error: the user is left with what they drew,
                    # which is how the case is scored (and counted in the report's failures).
                    pred = np.zeros(ref.shape, bool)
                    for k, a in annotations.items():
                        sl_k = [slice(None)] * 3
                        sl_k[axis] = k
                        pred[tuple(sl_k)] = a
                    rec["error"] = " ".join(str(exc).split())
                else:
                    pred = np.asarray(res.mask, bool)
                    rec["notes"] = list(res.notes)
                    rec["flagged"] = list(res.flagged)
            elif m in ("fill3", "fill5"):
                pred, picks = fill_between_slices(ref, axis, 3 if m == "fill3" else 5)
                rec["annotated"] = picks
            elif m == "copy":
                pred = copy_mask(ann, ref.shape, axis, (first, last))
            elif m == "ceiling":
                cfg = runtime.config_factory() if runtime.config_factory else None
                pred = chaining_ceiling(prepared, ref, z, runtime.segmenter, cfg)
            else:
                raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            rec["dice"] = dice(pred, ref)
            rec["pred_range"] = _range_of(pred, axis)
            rec["errors"] = error_breakdown(pred, ref, axis)
            if m in ("fob", "hybrid", "neighbour", "plain"):
                rec["dice_best_stop"] = best_stop_dice(rec["errors"], z)
            out.records.append(rec)
            if keep_masks:
                out.masks[(organ, m)] = pred
        if tick is not None:
            tick(f"{case.dataset} {case.case_id} {ORGANS.get(organ, organ)}")
    return out


# ----------------------------------------------------------------------------------------------
# summaries and tables


def summarise(records: list[dict], datasets: list[str], organs: list[int], methods: list[str]) -> dict:
    """dataset -> method -> {organ name: mean Dice over cases, 'mean': mean over organs, 'n': cases}."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for ds in datasets:
        table[ds] = {}
        for m in methods:
            row: dict[str, Any] = {}
            for o in organs:
                vals = [r["dice"] for r in records if r["dataset"] == ds and r["method"] == m
                        and r["organ"] == o and r.get("dice") is not None]
                row[ORGANS[o]] = float(np.mean(vals)) if vals else None
                row.setdefault("n", len(vals))
            organ_means = [row[ORGANS[o]] for o in organs]
            row["mean"] = float(np.mean(organ_means)) if organ_means and all(v is not None for v in organ_means) else None
            table[ds][m] = row
    return table


def breakdown_summary(records: list[dict], datasets: list[str], methods: list[str]) -> dict:
    """dataset -> method -> organ -> share of the Dice loss per error kind (sums over cases).

    Dice = 2TP / (2TP + FP + FN), so the loss splits exactly into FN and FP voxel counts; each kind is
    reported as its fraction of (FP + FN), plus the mean Dice and, for chains, the mean Dice with
    the best stop (`best_stop_dice`, reads the reference).
    """
    kinds = ("missed_slices_fn", "extra_slices_fp", "inslice_fn", "inslice_fp")
    out: dict[str, dict] = {}
    for ds in datasets:
        out[ds] = {}
        for m in methods:
            out[ds][m] = {}
            for o, name in ORGANS.items():
                rs = [r for r in records if r["dataset"] == ds and r["method"] == m and r["organ"] == o and r.get("errors")]
                if not rs:
                    continue
                tot = {k: sum(r["errors"][k] for r in rs) for k in kinds}
                err = sum(tot.values())
                out[ds][m][name] = {k: (tot[k] / err if err else 0.0) for k in kinds}
                best = [r["dice_best_stop"] for r in rs if r.get("dice_best_stop") is not None]
                out[ds][m][name]["dice"] = float(np.mean([r["dice"] for r in rs]))
                out[ds][m][name]["dice_best_stop"] = float(np.mean(best)) if len(best) == len(rs) else None
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def format_table(summary: dict, dataset: str, organs: list[int], methods: list[str], markdown: bool = False) -> str:
    """Organ x method Dice (%) table, one row per method, mean over organs last."""
    names = [ORGANS[o] for o in organs]
    rows = [[METHODS[m][0], *[_pct(summary[dataset][m][n]) for n in names], _pct(summary[dataset][m]["mean"]),
             str(summary[dataset][m]["n"])] for m in methods]
    head = ["method", *names, "mean", "cases"]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            lines.append("| " + " | ".join([r[0], *r[1:-2], f"**{r[-2]}**", r[-1]]) + " |")
        return "\n".join(lines)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]])


# Baselines that need at most 3 annotated slices (the bar for every organ).
FEW_SLICE_BASELINES = ("fill3", "plain", "copy")
TARGET_MEAN = 90.0


def target_lines(table: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown bullets: the default pipeline (FoB hybrid, else the neighbour chain) against the
    issue's target (mean >= 90) and, organ by organ, against the best baseline with at most 3
    annotated slices, computed from `table` (method -> organ -> Dice in [0, 1])."""
    ours = next((m for m in ("hybrid", "neighbour") if table.get(m, {}).get("mean") is not None), None)
    if ours is None:
        return []
    row = table[ours]
    gap = 100 * row["mean"] - TARGET_MEAN
    out = [f"- {METHODS[ours][0]} (the default pipeline): mean {100 * row['mean']:.1f}, "
           + (f"target {TARGET_MEAN:.0f} reached" if gap >= 0 else f"short of {TARGET_MEAN:.0f} by {-gap:.1f}")]
    parts = []
    for organ in (o for o in ORGANS.values() if row.get(o) is not None):
        cands = [(table[m][organ], m) for m in FEW_SLICE_BASELINES if table.get(m, {}).get(organ) is not None]
        if cands:
            best, m = max(cands)
            parts.append(f"{organ} {100 * row[organ]:.1f} vs {100 * best:.1f} ({METHODS[m][0]}, "
                         f"{100 * (row[organ] - best):+.1f})")
    if parts:
        out.append("- per organ against the best baseline with at most 3 annotated slices: " + "; ".join(parts))
    return out + [""]


def markdown_section(report: dict) -> str:
    """The propagation section of docs/RESULTS.md, markers included."""
    lines = [
        SECTION_START,
        "## Propagation from one annotated slice (issue 10)",
        "",
        "Generated by `FoBSegmentLib/evaluate/propagation.py`; do not edit by hand (only the text between",
        "the propagation markers is replaced).",
        "",
        f"- command: `{report['command']}`",
        f"- segmenter: `{report['segmenter']}`",
        f"- FoB model: {report['model']}",
        f"- date: {report['date']}, {report['host']['cpus']} CPUs, {report['seconds']:.0f} s",
        "- protocol: per case and organ, the annotated slice is the middle of the organ's axial slice range "
        "in the reference; 3D Dice over the whole volume (%), mean over cases; `mean` = mean over organs.",
        "- baselines: `fill-between N` = Slicer's Fill between slices (ITK MorphologicalContourInterpolator, "
        "Slicer's settings) from N reference slices spread evenly over the organ's range, both end slices "
        "included; `mask copy` = the annotated mask on every slice of the organ's range, the range taken from "
        "the reference (optimistic by definition); `mask propagation` = the plain baseline (ring and "
        "points from the adjacent slice's result, the same segmenter without its shape prior, stops only when the mask "
        "vanishes or jumps); `neighbour chain` = `fob segment --prompts-from neighbour` (no model).",
    ]
    lines += [f"- note: {n}" for n in report.get("notes", [])]
    lines.append("")
    extra = [m for m in report["methods"] if m in ("neighbour3", "ceiling")]
    if extra:
        lines += ["Analysis rows (not part of the issue's comparison):", ""]
        lines += [f"- `{METHODS[m][0]}`: {report['methods'][m]}" for m in extra]
        lines.append("")
    for ds, block in report["datasets"].items():
        lines += [f"### {block['title']}", "", block["markdown_table"], ""]
        lines += target_lines(block["dice"])
        loss = report.get("breakdown", {}).get(ds, {})
        rows = [(m, o, v) for m, per in loss.items() if m in PIPELINE_SOURCES
                for o, v in per.items()]
        if rows:
            lines += [
                "Where the Dice is lost (share of all FP + FN voxels, summed over cases): organ ends not "
                "reached, slices segmented beyond the organ, misses and leaks on slices both hold.",
                "",
                "| method | organ | Dice | Dice with the best stop (reads ref.) | ends missed (FN) "
                "| beyond the organ (FP) | in-slice misses (FN) | in-slice leaks (FP) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for m, o, v in rows:
                cells = [f"{100 * v[k]:.0f}%" for k in ("missed_slices_fn", "extra_slices_fp", "inslice_fn", "inslice_fp")]
                lines.append(f"| {METHODS[m][0]} | {o} | {_pct(v.get('dice'))} | {_pct(v.get('dice_best_stop'))} | "
                             + " | ".join(cells) + " |")
            lines.append("")
    lines.append(SECTION_END)
    return "\n".join(lines)


def write_markdown_section(path: Path, section: str) -> None:
    """Replace the text between the propagation markers of `path` (append the section when the file
    has none; create the file with only the section). Atomic."""
    write_section(path, section, header="")


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of this protocol that `fob evaluate` lacks (added to its parser; no shared option is
    redefined, so `fob evaluate --protocol fob` keeps its own defaults)."""
    p.add_argument("--cases", nargs="+", metavar="ID",
                   help="propagation protocol: only these case ids (e.g. 1 2 for CHAOS); default all")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m FoBSegmentLib.evaluate.propagation",
        description="Propagation protocol (issue 10): one annotated slice per organ (the middle of its range) -> "
        "3D Dice over the whole volume, FoB and plain mask propagation through fob segment's pipeline against "
        "Fill between slices (3 and 5 slices) and mask copy. Same as `fob evaluate --protocol propagation`.",
    )
    p.add_argument("--dataset", nargs="+", default=list(VOLUME_DATASETS), choices=list(VOLUME_DATASETS), metavar="NAME",
                   help="chaos and/or synapse (default both)")
    p.add_argument("--data", metavar="DIR", help="data folder (only with a single --dataset; default ../shared/data)")
    p.add_argument("--organs", nargs="+", type=int, metavar="LABEL", help="only these labels (1-4); default all")
    p.add_argument("--methods", nargs="+", metavar="M",
                   help=f"subset of {', '.join(METHODS)} (default {' '.join(DEFAULT_METHODS)})")
    p.add_argument("--segmenter", default="graphcut", help="segmenter name (get_segmenter; default graphcut, "
                   "what `fob segment` uses without SAM weights)")
    p.add_argument("--checkpoint", metavar="FILE", help="segmenter weights (SAM)")
    p.add_argument("--model", metavar="PATH", help="FoB generator weights (default: the shipped Resources model)")
    p.add_argument("--device", default="cpu", help="segmenter device (cpu, cuda, auto)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--json", metavar="OUT", help="write every record (per case, organ, method) as JSON")
    p.add_argument("--markdown", metavar="OUT",
                   help="write the table into OUT between the propagation markers (e.g. docs/RESULTS.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_arguments(p)
    return p


def _command_line(argv: list[str] | None = None) -> str:
    """The command as typed: `fob evaluate ...` when run through the fob dispatcher, else the module."""
    if argv is None and sys.argv[1:2] == ["evaluate"]:
        return "fob " + shlex.join(sys.argv[1:])
    return "python -m FoBSegmentLib.evaluate.propagation " + shlex.join(sys.argv[1:] if argv is None else argv)


def _resolve_methods(names: Iterable[str] | None) -> list[str]:
    methods = list(names) if names else list(DEFAULT_METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown propagation method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def _resolve_organs(labels: Iterable[int] | None) -> list[int]:
    organs = list(labels) if labels else list(ORGANS)
    bad = [o for o in organs if o not in ORGANS]
    if bad:
        raise ValueError(f"--organs: unknown label(s) {bad}; use 1 liver, 2 right kidney, 3 left kidney, 4 spleen")
    return organs


def make_runtime(args: argparse.Namespace, methods: list[str]) -> tuple[Runtime, str, list[str]]:
    """Segmenter and generator for `methods`; returns (runtime, model line, notes)."""
    from FoBSegmentLib.job import JobSettings, load_components, load_generator

    notes: list[str] = []
    rt = Runtime()
    settings = JobSettings(prompts_from="neighbour", segmenter=args.segmenter,
                           sam_checkpoint=getattr(args, "checkpoint", None),
                           device=getattr(args, "device", "cpu") or "cpu")
    if any(m in PIPELINE_SOURCES or m == "ceiling" for m in methods):
        rt.segmenter = load_components(settings).segmenter
    model_line = "not used"
    if any(m in MODEL_METHODS for m in methods):
        model = getattr(args, "model", None)
        rt.generator, model_line = load_generator(model, required=bool(model), device=settings.device)
        if rt.generator is None:
            # load_generator's message names the machine's Resources folder; files get a path-free line.
            print(f"note: {model_line}", file=sys.stderr)
            model_line = "none: the default Resources/fob_lite.safetensors is not shipped yet and no --model given"
            notes.append("FoB methods (fob, hybrid) skipped: no FoB model")
        else:
            model_line = f"`{model}`" if model else "the shipped default (Resources)"
    return rt, model_line, notes


def run(args: argparse.Namespace) -> int:
    """The protocol for `fob evaluate --protocol propagation` and the standalone main."""
    datasets = list(getattr(args, "dataset", None) or VOLUME_DATASETS)
    bad = [d for d in datasets if d not in VOLUME_DATASETS]
    if bad:
        raise ValueError(f"--protocol propagation runs on chaos and synapse, not {', '.join(bad)}")
    if getattr(args, "data", None) and len(datasets) != 1:
        raise ValueError("--data can only be used with a single --dataset")
    methods = _resolve_methods(getattr(args, "methods", None))
    organs = _resolve_organs(getattr(args, "organs", None))
    threads = int(getattr(args, "threads", 0) or 0)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    case_ids = getattr(args, "cases", None)
    cases: list[Case] = []
    for ds in datasets:
        folder = Path(args.data) if getattr(args, "data", None) else None
        if case_ids:
            available = {c.case_id for c in list_cases(ds, folder)}
            chosen = [c for c in case_ids if c in available]
            if not chosen:
                raise ValueError(f"--cases {' '.join(case_ids)}: none of them is a {ds} case")
            cases += list_cases(ds, folder, chosen)
        else:
            cases += list_cases(ds, folder)
    runtime, model_line, notes = make_runtime(args, methods)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)

    quiet = bool(getattr(args, "quiet", False))
    bar = None
    if not quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(cases) * len(organs), unit="organ", file=sys.stderr, dynamic_ncols=True)

    def tick(text: str) -> None:
        if bar is not None:
            bar.set_postfix_str(text, refresh=False)
            bar.update(1)

    t0 = time.perf_counter()
    records: list[dict] = []
    try:
        for case in cases:
            records += evaluate_case(case, organs, methods, runtime, tick=tick).records
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    used = [d for d in datasets if any(c.dataset == d for c in cases)]
    summary = summarise(records, used, organs, methods)
    report: dict[str, Any] = {
        "protocol": "propagation",
        "command": getattr(args, "command_line", None) or _command_line(),
        "segmenter": getattr(runtime.segmenter, "name", args.segmenter) if runtime.segmenter else args.segmenter,
        "model": model_line,
        "methods": {m: METHODS[m][1] for m in methods},
        "organs": {o: ORGANS[o] for o in organs},
        "date": time.strftime("%Y-%m-%d"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "seconds": seconds,
        "notes": notes,
        "datasets": {},
        "breakdown": breakdown_summary(records, used, methods),
        "records": records,
    }
    failures = [r for r in records if r.get("error")]
    for r in failures:
        line = f"{r['dataset']} case {r['case']} {ORGANS[r['organ']]} {r['method']}: pipeline error ({r['error']}); scored as the annotated slice alone"
        report["notes"].append(line)
        print(f"note: {line}", file=sys.stderr)
    for ds in used:
        n_cases = len([c for c in cases if c.dataset == ds])
        title = f"{DATASET_TITLES[ds]} ({n_cases} cases), segmenter {report['segmenter']}"
        print(f"\n{title} - 3D Dice % over the whole volume, one annotated slice (baselines: see methods)")
        print(format_table(summary, ds, organs, methods))
        report["datasets"][ds] = {
            "title": title,
            "dice": summary[ds],
            "markdown_table": format_table(summary, ds, organs, methods, markdown=True),
        }
    print(f"\n({seconds:.0f} s)")
    if getattr(args, "json", None):
        write_text_atomic(Path(args.json), json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    if getattr(args, "markdown", None):
        write_markdown_section(Path(args.markdown), markdown_section(report))
        print(f"wrote the propagation section of {args.markdown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = _command_line(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as exc:
        if os.environ.get("FOB_DEBUG"):
            raise
        print(f"propagation: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
