"""What a worker thread computes for the Slicer module: a `PropagationJob` wraps the engine's `Job`
(built by `FoBSegmentLib.job.build_job`, the same builder `fob segment` uses) with the MRML node ids
it belongs to, so `run_propagation` never touches MRML or Qt (the same run serves Propagate and
Predict prompts: the prompts shown for review are the ones the job's slices received).

Frames: `job.image` is the normalised [k, j, i] volume, sliced along `job.axis`; prompts are
{slice: PromptSet} in (x, y) = (column, row) pixels of those slices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from FoBSegmentLib.job import Job
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.propagation import (
    CancelCheck,
    ProgressCallback,
    PropagationResult,
    SliceCallback,
)

__all__ = [
    "CancelCheck",
    "ProgressCallback",
    "PropagationJob",
    "SegmentOutcome",
    "SegmentTask",
    "SliceCallback",
    "run_propagation",
]


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
