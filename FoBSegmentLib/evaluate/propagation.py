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
the upper bound of slice-to-slice chaining with the segmenter, `chaining_ceiling`); beside the
cross-patient rows (`--methods cross`), `cross1_range` and `crossvol_range`: the same given the
query organ's first and last slices from the reference (`fob segment --slices A:B`), as FoB's own
evaluation selects its query slices (how much of the cross-patient loss is finding the organ's extent).

The reference label is read for four things only: choosing the annotated slice, the baselines
that are defined on it (fill, copy), the slice range of the `_range` rows, and scoring. The
pipeline receives the image and the one annotated slice (see `predict`); the tests perturb the
reference everywhere else and check that the pipeline's result does not change.

Run it as `fob evaluate --protocol propagation` (options in `commands/evaluate.py`); the tables,
JSON and the docs/RESULTS.md section are written by `evaluate/propagation_report.py`.

Frames: volumes [k, j, i] (SimpleITK order); slices along the axis `fob segment` chooses
(`job.default_slice_axis`); slice indices count along that axis.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from FoBSegmentLib.evaluate.datasets import ORGANS, VOLUME_DATASETS, Case, list_cases
from FoBSegmentLib.evaluate.interpolation import (
    annotated_nonempty,
    copy_mask,
    fill_between_slices,
    middle_slice,
    organ_slice_range,
)
from FoBSegmentLib.evaluate.metrics import best_stop_dice, dice, error_breakdown
from FoBSegmentLib.io.coords import point_pixels, put_slice, take_slice
from FoBSegmentLib.propagation.refine import parse_refine, segmenter_label

# Method -> (short label, what it is). Pipeline methods map to a `--prompts-from` source.
METHODS: dict[str, tuple[str, str]] = {
    "fob": ("FoB", "fob segment --prompts-from fob (FoB prompts on every slice, extent from its coarse map)"),
    "hybrid": ("FoB hybrid", "fob segment --prompts-from hybrid (FoB extent, neighbour-chained shape)"),
    "chained": ("FoB chained", "fob segment --prompts-from chained (the neighbour chain with FoB in every step: "
                "support = the previous accepted slice; FoB's confident ring and foreground points and its coarse "
                "probability join the prompts and the graph cut's data term; FoB's coarse map takes part in the stop)"),
    "neighbour": ("neighbour chain", "fob segment --prompts-from neighbour (no model: the default chain, range not "
                  "limited by FoB's coarse map)"),
    "plain": ("mask propagation", "plain baseline, no learning: ring outside / points inside the adjacent slice's result, "
              "the same segmenter without shape prior or reference appearance (graphcut then runs GrabCut), stops "
              "only when the mask vanishes or its area jumps x2 (PLAIN_CONFIG)"),
    "neighbour3": ("neighbour chain, 3 slices", "fob segment --prompts-from neighbour with the 3 slices fill-between 3 uses annotated"),
    "fill3": ("fill-between 3", "Slicer Fill between slices (ITK MCI) from 3 reference slices incl. the organ's ends"),
    "fill5": ("fill-between 5", "Slicer Fill between slices (ITK MCI) from 5 reference slices incl. the organ's ends"),
    "copy": ("mask copy", "annotated mask copied onto every slice of the reference organ range"),
    "cross1": ("cross-patient, 1 slice", "fob segment --support-image OTHER --support-mask OTHER_MASK with only the "
               "middle slice of the organ in the other patient (the next case of the dataset) annotated: the locate "
               "step registers it onto the query, then the chain"),
    "crossvol": ("cross-patient, volume", "fob segment --support-image OTHER --support-mask OTHER_MASK with the other "
                 "patient's whole labelled organ (chunked into 3 supports, the paper's protocol)"),
    "cross1_range": ("cross-patient, 1 slice, organ's slices given (reads ref.)", "cross-patient, 1 slice, with the "
                     "query organ's first and last slices given (`fob segment --slices A:B`, read from the reference): "
                     "FoB's evaluation selects its query slices from the ground truth this way; an analysis row, no target"),
    "crossvol_range": ("cross-patient, volume, organ's slices given (reads ref.)", "cross-patient, volume, with the "
                       "query organ's first and last slices given as above"),
    "atlas_affine": ("atlas affine", "single-atlas baseline: the other patient's whole image registered to the query "
                     "(SimpleITK, 3D affine, Mattes MI), its label warped"),
    "atlas_deform": ("atlas deformable", "single-atlas baseline: the affine above then 3D demons (SimpleITK fast "
                     "symmetric forces, histogram-matched, 60 iterations, sigma 2), the other patient's label warped"),
    "ceiling": ("chaining ceiling (reads ref.)", "upper bound, reads the reference by design: every slice of the "
                "reference range segmented with the pipeline's neighbour prompts from the TRUE adjacent mask"),
}
PIPELINE_SOURCES = {"fob": "fob", "hybrid": "hybrid", "chained": "chained", "neighbour": "neighbour", "neighbour3": "neighbour",
                    "plain": "neighbour"}
# The plain mask propagation: prompts from the adjacent result and nothing else.
PLAIN_CONFIG = {"shape_prior": False, "retry_foreground": 0, "retry_ring": None, "intensity_match": 0.0,
                "median_band": None, "back_check": None, "regrow": None, "fg_area_per_point": 0.0}
MODEL_METHODS = ("fob", "hybrid", "chained")
# Methods whose support comes from another patient (the next case of the same dataset).
CROSS_METHODS = ("cross1", "crossvol", "cross1_range", "crossvol_range", "atlas_affine", "atlas_deform")
# Chains whose stopping rule `best_stop_dice` judges.
CHAIN_METHODS = ("fob", "hybrid", "chained", "neighbour", "plain")
# The cross-patient rows of the issue (not in the default run: `--methods cross`).
CROSS_DEFAULT = ("cross1", "crossvol", "atlas_affine", "atlas_deform")
# The cross-patient pipeline rows (`fob segment` with another patient's support).
CROSS_PIPELINE = ("cross1", "crossvol", "cross1_range", "crossvol_range")
DEFAULT_METHODS = ("fob", "hybrid", "chained", "neighbour", "plain", "fill3", "fill5", "copy")


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
    refiner: Any = None,
) -> Any:
    """`fob segment`'s propagation from annotated slices, built by the one job builder
    (`job.build_job`); the reference label is not an input.

    annotations: slice index along `prepared.axis` -> (H, W) bool mask drawn on that slice (one
    entry for the protocol; several for the "annotate a few slices" variant; an empty mask says the
    organ is absent from that slice).
    source: 'fob' | 'hybrid' | 'neighbour' (`--prompts-from`). config: a `PropagationConfig`
    (default: `fob segment`'s defaults, slices 'auto'); the modality preset is applied to it as
    `fob segment` does unless `modality_defaults` is False (the plain baseline).
    refiner: `fob segment --refine`'s loaded refiner (None: none).
    Returns the `PropagationResult` (mask [k, j, i] uint8, per-slice reports).
    """
    from FoBSegmentLib.job import Components

    return annotation_job(prepared, annotations, Components(generator, segmenter, source, refiner=refiner), config,
                          modality_defaults).run()


def annotation_job(prepared: Any, annotations: dict[int, np.ndarray], components: Any, config: Any = None,
                   modality_defaults: bool = True) -> Any:
    """The `job.Job` of `predict` (annotations as there; an empty mask is an annotated absence) with
    already loaded `components` (`job.Components`, whose prompt source is used)."""
    from FoBSegmentLib.job import JobSettings, build_job

    support_vol = np.zeros(prepared.normalised.shape[:3], bool)
    for index, ann in annotations.items():
        put_slice(support_vol, prepared.axis, int(index), np.asarray(ann, bool))
    settings = JobSettings(prompts_from=components.prompts_from, config=config, modality_presets=modality_defaults)
    absent = [z for z, ann in annotations.items() if not np.asarray(ann).any()]
    return build_job(prepared, support_vol, settings, components=components, absent_slices=absent)


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
    from the reference mask of the adjacent slice towards `index`, moved onto z as the chain moves
    its prior (`config.moved_prior`): no compounding, perfect stop.
    What is left of the Dice loss is the segmenter's own per-slice error. A segmenter with
    `fit_reference` learns the organ's appearance from the annotated slice first, as in the pipeline.
    reference: [k, j, i] bool. Returns [k, j, i] bool.
    """
    import cv2

    from FoBSegmentLib.propagation import PropagationConfig, cleanup_3d, prompts_from_mask
    from FoBSegmentLib.propagation.motion import move_mask, moves_prior

    cfg = config if config is not None else PropagationConfig()
    ref = np.asarray(reference, bool)
    axis = prepared.axis
    first, last = organ_slice_range(ref, axis)
    out = np.zeros(ref.shape, bool)
    sl = [slice(None)] * 3
    fit_reference = getattr(segmenter, "fit_reference", None)
    if cfg.shape_prior and fit_reference is not None:
        fit_reference(take_slice(prepared.normalised, axis, index), take_slice(ref, axis, index))
    moved = moves_prior(cfg, segmenter)
    for z in range(first, last + 1):
        sl[axis] = z
        if z == index:
            out[tuple(sl)] = ref[tuple(sl)]
            continue
        parent = z - 1 if z > index else z + 1
        prev = np.asarray(take_slice(ref, axis, parent), bool)
        image = np.asarray(take_slice(prepared.normalised, axis, z), np.float32)
        if moved:
            prev = move_mask(prev, take_slice(prepared.normalised, axis, parent), image)
        ps = prompts_from_mask(prev, cfg) if prev.any() else None
        if ps is None:
            continue
        cv2.setRNGSeed(0)
        out[tuple(sl)] = np.asarray(segmenter.segment(image, ps).mask, bool)
    return cleanup_3d(out, axis, largest_component=False, fill_holes=cfg.fill_holes)


def ring_quality(background: np.ndarray, reference: np.ndarray) -> tuple[int, int, float | None]:
    """Background prompts of one slice against its reference mask (READS THE REFERENCE: scoring
    only): (points, points inside the organ, mean distance in px of the points to the organ's
    contour, None when the slice shows no organ). background: (N, 2) (x, y) pixels; reference:
    (H, W) bool."""
    from scipy import ndimage

    ref = np.asarray(reference, bool)
    pts = np.asarray(background, np.float64).reshape(-1, 2)
    if len(pts) == 0:
        return 0, 0, None
    r, c = point_pixels(pts, ref.shape)
    inside = int(ref[r, c].sum())
    if not ref.any():
        return len(pts), inside, None
    contour = ref & ~ndimage.binary_erosion(ref)
    dist = ndimage.distance_transform_edt(~contour)
    return len(pts), inside, float(dist[r, c].mean())


def prompt_quality(rings: dict[int, np.ndarray], reference: np.ndarray, axis: int) -> dict[str, Any]:
    """Per-slice quality of background prompts, `rings` = slice -> (N, 2) (x, y) points, against the
    reference (READS IT: scoring only). Returns {"slices", "bg_inside" (mean over slices of the
    share of points inside the organ), "ring_distance" (mean over the slices showing the organ of
    the points' mean distance to its contour, px), "per_slice": [[z, points, inside, distance]]}."""
    per = []
    for z in sorted(rings):
        n, inside, d = ring_quality(rings[z], np.asarray(take_slice(reference, axis, z), bool))
        if n:
            per.append([int(z), n, inside, None if d is None else round(d, 2)])
    shares = [p[2] / p[1] for p in per]
    dists = [p[3] for p in per if p[3] is not None]
    return {"slices": len(per), "bg_inside": float(np.mean(shares)) if shares else None,
            "ring_distance": float(np.mean(dists)) if dists else None, "per_slice": per}


def _chained_fob_rings(res: Any, prepared: Any, generator: Any) -> dict[str, dict[int, np.ndarray]]:
    """FoB's own ring on every chained slice, predicted again from the slice's parent and its
    accepted mask, as the chain did: {"fob_ring": every ring point after SPR, "fob_ring_coarse":
    before SPR, "fob_ring_used": the points the chain used (confident, outside the parent's
    mask)}, each slice -> (N, 2) (x, y)."""
    from FoBSegmentLib.prompts import PromptSet
    from FoBSegmentLib.propagation.fob import chained_prompts, fob_step

    every, coarse, used = {}, {}, {}
    axis = prepared.axis
    cfg = (res.record or {}).get("config")
    from FoBSegmentLib.propagation import PropagationConfig

    cfg = PropagationConfig.from_json(cfg) if cfg else PropagationConfig()
    for z in res.order:
        rep = res.slices[z]
        if rep.parent is None or rep.source == "skipped" or res.accepted is None:
            continue
        prev = np.asarray(take_slice(res.accepted, axis, rep.parent), bool)
        step = fob_step(generator, np.asarray(take_slice(prepared.normalised, axis, rep.parent), np.float32), prev,
                        np.asarray(take_slice(prepared.normalised, axis, z), np.float32))
        every[z] = step.background
        coarse[z] = step.ring(False)
        used[z] = chained_prompts(PromptSet(), step, prev, dataclasses.replace(cfg, fob_ring="replace")).background
    return {"fob_ring": every, "fob_ring_coarse": coarse, "fob_ring_used": used}


def _range_of(mask: np.ndarray, axis: int) -> list[int] | None:
    try:
        return list(organ_slice_range(mask, axis))
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# one case


@dataclass
class Runtime:
    """What the methods need besides the data: segmenter, generator (None: FoB methods skipped), the
    outline refiner (`--refine`, None: none) and the pipeline config."""

    segmenter: Any = None
    generator: Any = None
    config_factory: Callable[[], Any] | None = None
    refiner: Any = None


@dataclass
class CaseOutcome:
    records: list[dict] = field(default_factory=list)
    masks: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)


@dataclass
class OtherPatient:
    """The support patient of the cross-patient methods: its case, prepared image, label map
    ([k, j, i] integers), its 3D affine registration onto the current query (`affine`, see
    `other_affine`) and the atlas registrations onto it (kind -> warped label map); both computed
    once per query."""

    case: Case
    prepared: Any
    labels: np.ndarray
    warped: dict[str, np.ndarray] = field(default_factory=dict)
    affine: Any = None


def other_affine(query: Any, other: OtherPatient) -> Any:
    """`other`'s 3D affine registration onto the query (`locate.register_volumes`), computed once per
    query: it serves all the query's organs and the atlas baselines."""
    if other.affine is None:
        from FoBSegmentLib.propagation.locate import register_volumes

        other.affine = register_volumes(query, other.prepared)
    return other.affine


def load_other(case: Case, query: Any = None) -> OtherPatient:
    """The support patient `case`, its axes turned to run as the prepared `query`'s when given
    (`job.in_query_axes`, as the cross-patient job does): the atlas baselines register the two volumes
    array against array."""
    from FoBSegmentLib.job import in_query_axes

    prepared = prepare_volume(case.image)
    labels = read_reference(case.label, prepared)
    if query is not None:
        prepared, labels, _turned = in_query_axes(query, prepared, labels)
    return OtherPatient(case, prepared, labels)


def atlas_labels(query: Any, other: OtherPatient) -> dict[str, np.ndarray]:
    """The single-atlas baselines: `other`'s whole image registered onto the query with SimpleITK
    (3D affine, Mattes MI; then demons on top of it) and its label map warped (nearest neighbour)
    with each. Returns {'atlas_affine': labels, 'atlas_deform': labels} on the query grid.
    Random metric sampling with a fixed seed, on one thread (reproducible)."""
    import SimpleITK as sitk

    from FoBSegmentLib.propagation.locate import one_thread

    if other.warped:
        return other.warped
    with one_thread():
        return _atlas_labels(sitk, query, other)


def _atlas_labels(sitk: Any, query: Any, other: OtherPatient) -> dict[str, np.ndarray]:
    from FoBSegmentLib.propagation.locate import volume_image

    f, m = volume_image(query), volume_image(other.prepared)
    affine = other_affine(query, other)
    # Deformable: diffeomorphic-style demons (fast symmetric forces) on the affinely resampled,
    # histogram-matched support, at half in-plane resolution; displacement back on the full grid.
    moved = sitk.HistogramMatching(sitk.Resample(m, f, affine, sitk.sitkLinear, 0.0), f, 128, 15, True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(60)
    demons.SetStandardDeviations(2.0)
    disp = demons.Execute(sitk.Shrink(f, [2, 2, 1]), sitk.Shrink(moved, [2, 2, 1]))
    disp = sitk.Resample(disp, f, sitk.Transform(), sitk.sitkLinear, 0.0, disp.GetPixelID())
    field_tf = sitk.DisplacementFieldTransform(sitk.Cast(disp, sitk.sitkVectorFloat64))
    deform = sitk.CompositeTransform([affine, field_tf])  # the field first, then the affine
    lab = sitk.GetImageFromArray(np.ascontiguousarray(other.labels, dtype=np.uint8))
    lab.CopyInformation(m)
    for kind, tf in (("atlas_affine", affine), ("atlas_deform", deform)):
        out = sitk.Resample(lab, f, tf, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        other.warped[kind] = sitk.GetArrayFromImage(out)
    return other.warped


def predict_cross(query: Any, other: OtherPatient, organ: int, whole: bool, segmenter: Any,
                  generator: Any = None, config: Any = None, slices: str | tuple[int, int] = "auto",
                  refiner: Any = None) -> Any:
    """`fob segment QUERY --support-image OTHER --support-mask OTHER_MASK [--slices A:B]` through the
    one job builder: the support is the other patient's organ on its middle slice (whole=False) or its
    whole labelled organ (whole=True). Only the query's image is read, never its reference; `slices`
    is the job's slice range (the caller's to give)."""
    return cross_job(query, other, organ, whole, segmenter, generator, config, slices=slices, refiner=refiner).run()


def cross_job(query: Any, other: OtherPatient, organ: int, whole: bool, segmenter: Any,
              generator: Any = None, config: Any = None, registered: bool = True,
              slices: str | tuple[int, int] = "auto", refiner: Any = None) -> Any:
    """The `job.Job` that `predict_cross` runs; registered=False: the job registers the two volumes
    itself when it runs, as `fob segment` does (the evaluation registers each pair once)."""
    from FoBSegmentLib.job import Components, JobSettings, build_job

    sup = other.labels == organ
    axis = other.prepared.axis
    if not whole:
        z = annotated_slice(sup, axis)
        only = np.zeros_like(sup)
        sl = [slice(None)] * 3
        sl[axis] = z
        only[tuple(sl)] = sup[tuple(sl)]
        sup = only
    source = "neighbour"
    settings = JobSettings(prompts_from=source, config=config, slices=slices)
    job = build_job(query, sup, settings, support=other.prepared,
                    components=Components(generator, segmenter, source, refiner=refiner),
                    support_name=f"label {organ} of case {other.case.case_id}")
    if registered and job.support is other.prepared:  # (a support the job moved to the query's grid registers itself)
        job.support_transform = other_affine(query, other)
    return job


def _confidence(notes: list[str]) -> float | None:
    import re

    for n in notes:
        if n.startswith("cross-patient:") and (hit := re.search(r"confidence (-?[0-9.]+)", n)):
            return float(hit.group(1))
    return None


@dataclass
class OrganTask:
    """One organ of one case, as every method sees it: the prepared image, the reference mask
    ([k, j, i] bool, read for the baselines and scoring only), its slice range and the annotated
    slice `index` with its (H, W) mask `annotation`."""

    prepared: Any
    reference: np.ndarray
    first: int
    last: int
    index: int
    annotation: np.ndarray
    organ: int = 0
    other: OtherPatient | None = None

    @property
    def axis(self) -> int:
        return self.prepared.axis


def _annotated_only(shape: tuple[int, ...], axis: int, annotations: dict[int, np.ndarray]) -> np.ndarray:
    """[k, j, i] bool holding only the annotated slices."""
    pred = np.zeros(shape, bool)
    for k, a in annotations.items():
        sl = [slice(None)] * 3
        sl[axis] = k
        pred[tuple(sl)] = a
    return pred


def _run_pipeline(task: OrganTask, method: str, runtime: Runtime, rec: dict[str, Any]) -> np.ndarray:
    """A pipeline method on one organ; fills rec's annotated slices, notes, flags or error."""
    ref, axis = task.reference, task.axis
    cfg = runtime.config_factory() if runtime.config_factory else None
    if method == "plain":
        from FoBSegmentLib.propagation import PropagationConfig

        cfg = dataclasses.replace(cfg or PropagationConfig(), **PLAIN_CONFIG)
    annotations = {task.index: task.annotation}
    if method == "neighbour3":
        _, picks = fill_between_slices(ref, axis, 3, interpolate=False)
        annotations = {p: np.asarray(take_slice(ref, axis, p), bool).copy() for p in picks}
        rec["annotated"] = picks
    try:
        res = predict(task.prepared, annotations, runtime.segmenter, PIPELINE_SOURCES[method], runtime.generator,
                      cfg, modality_defaults=method != "plain", refiner=runtime.refiner)
    except ValueError as exc:
        # `fob segment` would stop with this error: the user is left with what they drew,
        # which is how the case is scored (and counted in the report's failures).
        rec["error"] = " ".join(str(exc).split())
        return _annotated_only(ref.shape, axis, annotations)
    rec["notes"] = list(res.notes)
    rec["flagged"] = list(res.flagged)
    rings = {z: ps.background for z, ps in res.prompts.items()}
    rec["prompt_quality"] = {"used": prompt_quality(rings, ref, axis)}
    if method == "chained" and runtime.generator is not None:
        for kind, rings in _chained_fob_rings(res, task.prepared, runtime.generator).items():
            rec["prompt_quality"][kind] = prompt_quality(rings, ref, axis)
    return np.asarray(res.mask, bool)


def _run_method(task: OrganTask, method: str, runtime: Runtime, rec: dict[str, Any]) -> np.ndarray:
    """The [k, j, i] bool prediction of `method` for one organ (rec gets what the method reports)."""
    ref, axis = task.reference, task.axis
    if method in PIPELINE_SOURCES:
        return _run_pipeline(task, method, runtime, rec)
    if method in ("fill3", "fill5"):
        pred, picks = fill_between_slices(ref, axis, 3 if method == "fill3" else 5)
        rec["annotated"] = picks
        return pred
    if method == "copy":
        return copy_mask(task.annotation, ref.shape, axis, (task.first, task.last))
    if method in CROSS_PIPELINE:
        cfg = runtime.config_factory() if runtime.config_factory else None
        rec["support_case"] = task.other.case.case_id
        # The _range rows are given the organ's slices, as FoB's evaluation gives its query slices.
        given = (task.first, task.last) if method.endswith("_range") else "auto"
        try:
            res = predict_cross(task.prepared, task.other, task.organ, method.startswith("crossvol"), runtime.segmenter,
                                config=cfg, slices=given, refiner=runtime.refiner)
        except ValueError as exc:
            rec["error"] = " ".join(str(exc).split())
            return np.zeros(ref.shape, bool)
        rec["notes"] = list(res.notes)
        rec["flagged"] = list(res.flagged)
        rec["confidence"] = _confidence(res.notes)
        rec["warning"] = bool(res.warnings)
        return np.asarray(res.mask, bool)
    if method in ("atlas_affine", "atlas_deform"):
        rec["support_case"] = task.other.case.case_id
        return atlas_labels(task.prepared, task.other)[method] == task.organ
    if method == "ceiling":
        cfg = runtime.config_factory() if runtime.config_factory else None
        return chaining_ceiling(task.prepared, ref, task.index, runtime.segmenter, cfg)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _score(rec: dict[str, Any], pred: np.ndarray, task: OrganTask, method: str) -> None:
    rec["dice"] = dice(pred, task.reference)
    rec["pred_range"] = _range_of(pred, task.axis)
    rec["errors"] = error_breakdown(pred, task.reference, task.axis)
    if method in CHAIN_METHODS:
        rec["dice_best_stop"] = best_stop_dice(rec["errors"], task.index)


def evaluate_case(
    case: Case,
    organs: Iterable[int],
    methods: Iterable[str],
    runtime: Runtime,
    keep_masks: bool = False,
    tick: Callable[[str], None] | None = None,
    other: Case | None = None,
) -> CaseOutcome:
    """Every method on every organ of one case; one record per (organ, method).

    Record: dataset, case, organ, method, dice, annotated slice(s), reference and predicted slice
    ranges, seconds, error breakdown, pipeline notes / flagged slices. keep_masks also returns the
    predicted [k, j, i] bool masks keyed by (organ, method) (the tests compare them).
    other: the support patient of the cross-patient methods (`CROSS_METHODS`; needed for them).
    """
    methods = list(methods)
    if any(m in CROSS_METHODS for m in methods) and other is None:
        raise ValueError("the cross-patient methods need a support patient (other)")
    prepared = prepare_volume(case.image)
    support = load_other(other, prepared) if other is not None and any(m in CROSS_METHODS for m in methods) else None
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
        task = OrganTask(prepared, ref, first, last, z, np.asarray(take_slice(ref, axis, z), bool).copy(),
                         organ, support)
        for m in methods:
            t0 = time.perf_counter()
            rec: dict[str, Any] = {
                "dataset": case.dataset, "case": case.case_id, "organ": organ, "method": m,
                "ref_range": [first, last], "annotated": [z],
            }
            if m in MODEL_METHODS and runtime.generator is None:
                rec.update(dice=None, skipped="no FoB model")
                out.records.append(rec)
                continue
            pred = _run_method(task, m, runtime, rec)
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            _score(rec, pred, task, m)
            out.records.append(rec)
            if keep_masks:
                out.masks[(organ, m)] = pred
        if tick is not None:
            tick(f"{case.dataset} {case.case_id} {ORGANS.get(organ, organ)}")
    return out


# ----------------------------------------------------------------------------------------------
# the run


def resolve_methods(names: Iterable[str] | None) -> list[str]:
    """--methods (default DEFAULT_METHODS), duplicates dropped; ValueError for an unknown name."""
    methods = list(names) if names else list(DEFAULT_METHODS)
    if "cross" in methods:  # the cross-patient rows, with their registration baselines
        i = methods.index("cross")
        methods[i:i + 1] = list(CROSS_DEFAULT)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown propagation method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def resolve_organs(labels: Iterable[int] | None) -> list[int]:
    """--organs (default all four labels); ValueError for an unknown label."""
    organs = list(labels) if labels else list(ORGANS)
    bad = [o for o in organs if o not in ORGANS]
    if bad:
        raise ValueError(f"--organs: unknown label(s) {bad}; use 1 liver, 2 right kidney, 3 left kidney, 4 spleen")
    return organs


def select_cases(datasets: list[str], data: str | None, case_ids: list[str] | None) -> list[Case]:
    """The cases of `datasets` (in that order), only `case_ids` when given; `data` overrides the
    folder of a single dataset."""
    bad = [d for d in datasets if d not in VOLUME_DATASETS]
    if bad:
        raise ValueError(f"--protocol propagation runs on chaos and synapse, not {', '.join(bad)}")
    if data and len(datasets) != 1:
        raise ValueError("--data can only be used with a single --dataset")
    folder = Path(data) if data else None
    cases: list[Case] = []
    for ds in datasets:
        if case_ids:
            available = {c.case_id for c in list_cases(ds, folder)}
            chosen = [c for c in case_ids if c in available]
            if not chosen:
                raise ValueError(f"--cases {' '.join(case_ids)}: none of them is a {ds} case")
            cases += list_cases(ds, folder, chosen)
        else:
            cases += list_cases(ds, folder)
    return cases


def support_patient(case: Case, data: str | None = None) -> Case:
    """The cross-patient support of `case`: the next case of its dataset (sorted ids, cyclic)."""
    every = list_cases(case.dataset, Path(data) if data else None)
    ids = [c.case_id for c in every]
    if len(every) < 2:
        raise ValueError(f"the cross-patient methods need two {case.dataset} cases")
    return every[(ids.index(case.case_id) + 1) % len(every)]


def make_runtime(args: argparse.Namespace, methods: list[str]) -> tuple[Runtime, str, list[str]]:
    """Segmenter and generator for `methods`; returns (runtime, model line, notes)."""
    from FoBSegmentLib.job import JobSettings, load_components, load_generator

    notes: list[str] = []
    rt = Runtime()
    settings = JobSettings(prompts_from="neighbour", segmenter=args.segmenter,
                           sam_checkpoint=getattr(args, "checkpoint", None),
                           device=getattr(args, "device", "cpu") or "cpu",
                           refine=parse_refine(getattr(args, "refine", None)))
    if any(m in PIPELINE_SOURCES or m == "ceiling" or m in CROSS_PIPELINE for m in methods):
        comps = load_components(settings)
        rt.segmenter, rt.refiner = comps.segmenter, comps.refiner
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


def _command_line() -> str:
    """The command as typed (the report's provenance line)."""
    if sys.argv[1:2] == ["evaluate"]:
        return "fob " + shlex.join(sys.argv[1:])
    return "fob evaluate --protocol propagation (called from Python)"


def _progress(total: int, quiet: bool) -> tuple[Callable[[str], None], Callable[[], None]]:
    """(tick, close) of a progress bar over `total` organs; no-ops when quiet."""
    if quiet:
        return (lambda text: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, unit="organ", file=sys.stderr, dynamic_ncols=True)

    def tick(text: str) -> None:
        bar.set_postfix_str(text, refresh=False)
        bar.update(1)

    return tick, bar.close


def run(args: argparse.Namespace) -> int:
    """`fob evaluate --protocol propagation`: every case x organ x method, tables printed, --json and
    --markdown written (`propagation_report`)."""
    # Imported here: the report module reads this module's METHODS.
    from FoBSegmentLib.evaluate import propagation_report as report_mod

    if args.from_json:
        report_mod.write_outputs(report_mod.merge_reports(args.from_json), args.json, args.markdown)
        return 0
    cases = select_cases(list(args.dataset or VOLUME_DATASETS), args.data, args.cases)
    methods = resolve_methods(args.methods)
    organs = resolve_organs(args.organs)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    runtime, model_line, notes = make_runtime(args, methods)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)

    tick, close = _progress(len(cases) * len(organs), bool(args.quiet))
    t0 = time.perf_counter()
    records: list[dict] = []
    try:
        for case in cases:
            records += evaluate_case(case, organs, methods, runtime, tick=tick,
                                     other=support_patient(case, args.data)).records
    finally:
        close()
    seconds = time.perf_counter() - t0
    segmenter = getattr(runtime.segmenter, "name", args.segmenter) if runtime.segmenter else args.segmenter
    report = report_mod.build_report(records, cases, organs, methods, command=_command_line(),
                                     segmenter=segmenter_label(segmenter, runtime.refiner),
                                     model_line=model_line, notes=notes, seconds=seconds)
    print(f"\n({seconds:.0f} s)")
    report_mod.write_outputs(report, args.json, args.markdown)
    return 0
