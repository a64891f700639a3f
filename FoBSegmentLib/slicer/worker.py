"""What a worker thread computes for the Slicer module: a `PropagationJob` wraps the engine's `Job`
(built by `FoBSegmentLib.job.build_job`, the same builder `fob segment` uses) with the MRML node ids
it belongs to, so `run_propagation` and `compute_prompts` never touch MRML or Qt.

Frames: `job.image` is the normalised [k, j, i] volume, sliced along `job.axis`; prompts are
{slice: PromptSet} in (x, y) = (column, row) pixels of those slices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from FoBSegmentLib.io.coords import take_slice
from FoBSegmentLib.job import Job
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.propagation import (
    CancelCheck,
    ProgressCallback,
    PropagationCancelled,
    PropagationResult,
    SliceCallback,
    assign_supports,
)

__all__ = [
    "CancelCheck",
    "ProgressCallback",
    "PropagationJob",
    "SegmentOutcome",
    "SegmentTask",
    "SliceCallback",
    "compute_prompts",
    "run_propagation",
]


PROMPT_CHUNK = 8  # slices per model call in compute_prompts


@dataclass
class PropagationJob:
    """An engine job plus where its result goes in the scene; built on the main thread, run anywhere."""

    volume_id: str
    segmentation_id: str
    segment_id: str
    engine: Job
    # Main thread only (apply_slice_result): the segment on the volume grid before the first live slice
    # was written (None = nothing written live yet), the slices written live so far and their last masks.
    live_before: np.ndarray | None = field(default=None, repr=False)
    live_slices: set[int] = field(default_factory=set)
    live_shown: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def axis(self) -> int:
        return self.engine.axis

    @property
    def image(self) -> np.ndarray:
        return self.engine.image

    @property
    def supports(self) -> list:
        return self.engine.supports

    @property
    def same_volume(self) -> bool:
        return self.engine.same_volume

    @property
    def prompts_from(self) -> str:
        return self.engine.prompts_from

    @property
    def generator(self) -> Any:
        return self.engine.components.generator

    @property
    def config(self) -> Any:
        return self.engine.config

    @property
    def notes(self) -> list[str]:
        return self.engine.notes


@dataclass
class SegmentOutcome:
    """What segmenting some slices produced (worker), for `FoBSegmentLogic.apply_segment` (main thread).

    masks: {slice: (H, W) bool} to write (along the task's axis); prompts: {slice: PromptSet} whose
    points a replay moved (chained slices), to show; record: the new propagation record, or None;
    notes: what the person should know (e.g. `auto` fell back to graphcut without torch)."""

    masks: dict[int, np.ndarray]
    prompts: dict[int, PromptSet] = field(default_factory=dict)
    record: dict | None = None
    notes: list[str] = field(default_factory=list)  # e.g. which segmenter `auto` chose, and why


@dataclass
class SegmentTask:
    """Segmenting slices from the point lists' prompts, read out of MRML on the main thread
    (`FoBSegmentLogic.begin_segment`); `compute(progress, cancel)` needs no MRML (worker thread)."""

    volume_id: str
    segmentation_id: str
    segment_id: str
    axis: int
    slices: list[int]
    compute: Callable[..., SegmentOutcome] = field(repr=False)
    # Main thread, when the outcome is written: what the task changes in MRML besides the segment.
    on_apply: Callable[[], None] | None = field(default=None, repr=False)


def run_propagation(
    job: PropagationJob,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    on_slice: SliceCallback | None = None,
) -> PropagationResult:
    """The computation (no MRML access: safe on a worker thread); raises PropagationCancelled when
    `cancel()` returns True.

    on_slice(z, mask): called on this (worker) thread with each accepted (H, W) slice mask (see
    `propagation.propagate`); it must not touch MRML/Qt: queue the mask and let the main thread call
    `apply_slice_result(job, z, mask)`."""
    return job.engine.run(progress=progress, cancel=cancel, on_slice=on_slice)


def compute_prompts(
    job: PropagationJob, progress: ProgressCallback | None = None, cancel: CancelCheck | None = None
) -> dict[int, PromptSet]:
    """Prompts for the range's unannotated slices (no MRML access: safe on a worker thread).

    With prompt source fob: the generator's background ring + foreground points from the nearest
    support slice (batched per support). Otherwise the job's propagation runs and the prompts its
    slices received are returned (the masks are not written anywhere).
    """
    annotated = {s.index for s in job.supports} if job.same_volume else set()
    if job.prompts_from != "fob":
        result = run_propagation(job, progress, cancel)
        return {z: p for z, p in result.prompts.items() if z not in annotated}
    n = job.image.shape[job.axis]
    lo, hi = (0, n - 1) if job.config.slices == "auto" else job.config.slices
    query = [z for z in range(lo, hi + 1) if z not in annotated]
    assign = assign_supports(query, job.supports, job.same_volume)
    groups: dict[int, list[int]] = {}
    for z in query:
        groups.setdefault(id(assign[z]), []).append(z)
    # Chunks, so that progress is reported and Cancel is honoured every few slices (also for one slice:
    # the first model call can take seconds), at the price of encoding a support once per chunk.
    chunks = [zs[i : i + PROMPT_CHUNK] for zs in groups.values() for i in range(0, len(zs), PROMPT_CHUNK)]
    prompts: dict[int, PromptSet] = {}
    done = 0
    if progress is not None:
        progress(0, len(query), "predicting prompts")
    for zs in chunks:
        if cancel is not None and cancel():
            raise PropagationCancelled("cancelled")
        sup = assign[zs[0]]
        images = [take_slice(job.image, job.axis, z) for z in zs]
        if hasattr(job.generator, "predict_batch"):
            # the support is encoded once per group rather than once per slice
            predicted = job.generator.predict_batch(sup.image, sup.mask, images)
        else:
            predicted = [job.generator.predict(sup.image, sup.mask, im) for im in images]
        prompts.update(zip(zs, predicted))
        done += len(zs)
        if progress is not None:
            progress(done, len(query), f"slices {zs[0]}..{zs[-1]}")
    return prompts
