"""What a worker thread computes for the Slicer module: a `PropagationJob` holds copies of everything
taken out of MRML on the main thread, so `run_propagation` and `compute_prompts` never touch MRML or Qt.

Frames: `job.image` is the normalised [k, j, i] volume, sliced along `job.axis`; prompts are
{slice: PromptSet} in (x, y) = (column, row) pixels of those slices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from FoBSegmentLib.io.coords import take_slice
from FoBSegmentLib.prompts import PromptSet

ProgressCallback = Callable[[int, int, str], None]
CancelCheck = Callable[[], bool]
SliceCallback = Callable[[int, np.ndarray], None]


@dataclass
class PropagationJob:
    """Everything a propagation needs, copied out of MRML on the main thread; `run` needs no MRML."""

    volume_id: str
    segmentation_id: str
    segment_id: str
    axis: int
    image: np.ndarray
    supports: list
    same_volume: bool
    prompts_from: str
    generator: Any
    segmenter: Any
    config: Any
    notes: list[str] = field(default_factory=list)
    # Main thread only (apply_slice_result): the segment on the volume grid before the first live slice
    # was written (None = nothing written live yet) and the slices written live so far.
    live_before: np.ndarray | None = field(default=None, repr=False)
    live_slices: set[int] = field(default_factory=set)


def run_propagation(
    job: PropagationJob,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    on_slice: SliceCallback | None = None,
):
    """The computation (no MRML access: safe on a worker thread). Returns a pipeline.PropagationResult;
    raises pipeline.PropagationCancelled when `cancel()` returns True.

    on_slice(z, mask): called on this (worker) thread with each accepted (H, W) slice mask (see
    `pipeline.propagate`); it must not touch MRML/Qt: queue the mask and let the main thread call
    `apply_slice_result(job, z, mask)`."""
    from FoBSegmentLib import pipeline

    return pipeline.propagate(
        job.image,
        job.supports,
        job.segmenter,
        axis=job.axis,
        same_volume=job.same_volume,
        prompts_from=job.prompts_from,
        generator=job.generator,
        config=job.config,
        progress=progress,
        cancel=cancel,
        on_slice=on_slice,
    )


def compute_prompts(
    job: PropagationJob, progress: ProgressCallback | None = None, cancel: CancelCheck | None = None
) -> dict[int, PromptSet]:
    """Prompts for the range's unannotated slices (no MRML access: safe on a worker thread).

    With a FoB model: the generator's background ring + foreground points from the nearest support
    slice (batched per support). Without one: neighbour chaining (rings around the previous slice's
    provisional mask, which is not written anywhere).
    """
    from FoBSegmentLib import pipeline

    annotated = {s.index for s in job.supports} if job.same_volume else set()
    prompts: dict[int, PromptSet] = {}
    if job.prompts_from != "fob":
        result = run_propagation(job, progress, cancel)
        return {z: p for z, p in result.prompts.items() if z not in annotated}
    n = job.image.shape[job.axis]
    lo, hi = (0, n - 1) if job.config.slices == "auto" else job.config.slices
    query = [z for z in range(lo, hi + 1) if z not in annotated]
    assign = pipeline.assign_supports(query, job.supports, job.same_volume)
    groups: dict[int, list[int]] = {}
    for z in query:
        groups.setdefault(id(assign[z]), []).append(z)
    done = 0
    for zs in groups.values():
        if cancel is not None and cancel():
            raise pipeline.PropagationCancelled("cancelled")
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
