"""The state of one propagation: the mask being built, the prompts each slice received, progress,
cancel, and the final 3D clean-up.

Frames: `image` is [k, j, i] (RGB [k, j, i, 3]); slices are (H, W) along `axis`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from FoBSegmentLib import morphology
from FoBSegmentLib.io.coords import put_slice, slice_axes, take_slice
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.propagation.config import PropagationConfig
from FoBSegmentLib.propagation.types import (
    CancelCheck,
    ProgressCallback,
    PropagationCancelled,
    PropagationResult,
    SliceCallback,
    SliceReport,
    SupportSlice,
)


def cleanup_3d(mask: np.ndarray, axis: int, largest_component: bool, fill_holes: bool) -> np.ndarray:
    """[k, j, i] bool -> bool: 2D hole filling in every slice along `axis`, then (optionally) the
    largest 26-connected 3D component."""
    out = np.asarray(mask, bool).copy()
    if fill_holes:
        for z in range(out.shape[axis]):
            sl = take_slice(out, axis, z)
            if sl.any():
                put_slice(out, axis, z, morphology.fill_holes(sl))
    if largest_component and out.any():
        labels, n = ndimage.label(out, structure=np.ones((3, 3, 3), bool))
        if n > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            out = labels == int(np.argmax(sizes))
    return out


@dataclass
class Kept:
    """Some slices of a `Runner` as they were (`Runner.keep`), to put back with `Runner.restore`."""

    slices: dict[int, tuple[np.ndarray, SliceReport, PromptSet | None]]
    order: list[int]

    def mask(self, z: int) -> np.ndarray:
        return self.slices[z][0]


class Runner:
    """One propagation in progress. Slices are accepted one by one (`accept`); `finish` cleans up
    and returns the `PropagationResult`."""

    def __init__(
        self,
        image: np.ndarray,
        axis: int,
        segmenter: Any,
        config: PropagationConfig,
        progress: ProgressCallback | None,
        cancel: CancelCheck | None,
        total: int,
        on_slice: SliceCallback | None = None,
    ) -> None:
        self.t0 = time.perf_counter()
        self.image = image
        self.axis = axis
        self.segmenter = segmenter
        self.config = config
        self.progress = progress
        self.cancel = cancel
        self.n = image.shape[axis]
        rows, cols = slice_axes(axis)
        self.hw = (image.shape[rows], image.shape[cols])
        self.mask = np.zeros(image.shape[:3], bool)
        self.prompts: dict[int, PromptSet] = {}
        self.reports: dict[int, SliceReport] = {z: SliceReport(z, "skipped") for z in range(self.n)}
        self.order: list[int] = []
        self.notes: list[str] = []
        self.done = 0
        self.total = max(1, total)
        self.on_slice = on_slice
        # (lo, hi): only slices inside are reported to on_slice (an explicit range's stepping stones
        # are dropped from the result at the end); None = all.
        self.report_range: tuple[int, int] | None = None
        # slice -> (report, accepted mask, prompts) of an earlier run whose chains may be reused.
        self.reuse: dict[int, tuple[SliceReport, np.ndarray, PromptSet | None]] = {}
        self.segmented_count = 0
        # The FoB model of a chained-FoB run: each chained slice is predicted from the previous one.
        self.generator: Any = None
        # mm between slices, rows and columns (`io.coords.slice_spacing`).
        self.spacing: tuple[float, ...] = (1.0, 1.0, 1.0)
        # Slices no person drew that seed chains as an annotated slice does (`neighbour.body_seed_pass`).
        self.body_seeds: set[int] = set()
        # False when the supports come from another patient (`neighbour.cross_patient`).
        self.same_volume = True
        # The outline refiner (`propagation.refine`): it redraws the outlines once the chains are done,
        # and the body seeds before they seed chains (`neighbour.redraw_body_seed`).
        self.refiner: Any = None

    def slice(self, z: int) -> np.ndarray:
        return np.asarray(take_slice(self.image, self.axis, z), dtype=np.float32)

    def accepted(self, z: int) -> np.ndarray:
        """The accepted (H, W) bool mask of slice z (all False when not segmented)."""
        return np.asarray(take_slice(self.mask, self.axis, z), bool)

    def annotated_with_organ(self) -> list[int]:
        """The annotated slices that show the organ (not annotated absences) and the body seeds, in order."""
        return [z for z in sorted(self.reports) if self.is_seed(z) and self.accepted(z).any()]

    def is_seed(self, z: int) -> bool:
        """Whether slice z is annotated or a body seed: no chain passes it."""
        return self.reports[z].source == "annotation" or z in self.body_seeds

    def tick(self, text: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total, text)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise PropagationCancelled("cancelled")

    def segment(self, z: int, prompts: PromptSet) -> tuple[np.ndarray, float]:
        # OpenCV's GrabCut initialises its colour models from a global RNG; re-seeding makes a
        # slice's mask a function of (image, prompts) alone, so a replayed slice comes out identical.
        cv2.setRNGSeed(0)
        self.segmented_count += 1
        try:
            res = self.segmenter.segment(self.slice(z), prompts)
        except ValueError as exc:
            raise ValueError(f"slice {z}: {exc}") from None
        return np.asarray(res.mask, bool), float(res.score)

    def accept(self, z: int, mask: np.ndarray, report: SliceReport, prompts: PromptSet | None) -> None:
        put_slice(self.mask, self.axis, z, mask)
        report.area = int(mask.sum())
        if report.fg_max is None:
            report.fg_max = self.reports[z].fg_max  # measured by FoB earlier (hybrid range search)
        self.reports[z] = report
        if report.source != "annotation":
            if z in self.order:
                self.order.remove(z)
            self.order.append(int(z))
        if prompts is not None:
            self.prompts[z] = prompts
        if self._shown(z, report.source):
            self.on_slice(int(z), np.array(mask, dtype=bool, copy=True))

    def _shown(self, z: int, source: str) -> bool:
        """Whether a caller watching the slices one by one (`on_slice`) is told about slice z."""
        return (self.on_slice is not None and source not in ("annotation", "skipped")
                and (self.report_range is None or self.report_range[0] <= z <= self.report_range[1]))

    def end_chain(self, z: int, rep: SliceReport, flag: str | None, note: str) -> None:
        """Slice z is not accepted: a chain ends there (`flag` added to its report, `note` to the run's)."""
        if flag is not None:
            rep.flags.append(flag)
        rep.source = "skipped"
        self.reports[z] = rep
        self.tick(f"slice {z}: chain ends")
        self.notes.append(note)

    def drop(self, z: int, flag: str | None = None) -> None:
        """Forget slice z's result (it becomes "skipped"); its prompts stay if it was segmented."""
        put_slice(self.mask, self.axis, z, np.zeros(self.hw, bool))
        rep = self.reports[z]
        rep.source = "skipped"
        if flag:
            rep.flags.append(flag)

    def clear(self) -> None:
        """Forget every accepted slice, its prompts and report (a pass that starts over); the notes,
        progress and counters stay. A caller shown the slices one by one is told they are empty."""
        for z, rep in self.reports.items():
            if self._shown(z, rep.source) and self.accepted(z).any():
                self.on_slice(int(z), np.zeros(self.hw, bool))
        self.mask[...] = False
        self.prompts.clear()
        self.reports = {z: SliceReport(z, "skipped") for z in range(self.n)}
        self.order.clear()
        self.body_seeds.clear()

    def start_over(self, rng: tuple[int, int]) -> None:
        """A pass that runs again over the inclusive slice range `rng` (a cross-patient second pass,
        a body-seed pass): every slice forgotten (`clear`), that range counted as the work left."""
        self.check_cancel()
        self.clear()
        self.total = self.done + rng[1] - rng[0] + 1

    def keep(self, zs: range) -> Kept:
        """What slices `zs` hold now (masks, reports, prompts, the acceptance order), for `restore`."""
        return Kept({z: (self.accepted(z).copy(), replace(self.reports[z], flags=list(self.reports[z].flags)),
                         self.prompts.get(z)) for z in zs}, list(self.order))

    def restore(self, kept: Kept) -> None:
        """Slices as `keep` found them (a pass tried and taken back)."""
        for z, (m, rep, ps) in kept.slices.items():
            # A watcher shown the pass's slice is told what the slice holds again, even if that is nothing.
            told = self._shown(z, self.reports[z].source) or self._shown(z, rep.source)
            put_slice(self.mask, self.axis, z, m)
            self.reports[z] = rep
            if ps is None:
                self.prompts.pop(z, None)
            else:
                self.prompts[z] = ps
            if told:
                self.on_slice(int(z), m.copy())
        self.order[:] = kept.order

    def copy_annotations(self, supports: list[SupportSlice]) -> None:
        for s in supports:
            self.accept(s.index, s.mask, SliceReport(s.index, "annotation", support_index=s.index), None)

    def finish(self, prompts_from: str, annotations: list[SupportSlice],
               outlines: np.ndarray | None = None) -> PropagationResult:
        """3D clean-up (the annotated slices stay exactly as drawn) and the result; `outlines`
        ([k, j, i] bool, `propagation.refine`) replace the accepted masks in the final mask."""
        cfg = self.config
        final = cleanup_3d(self.mask if outlines is None else outlines, self.axis, cfg.largest_component,
                           cfg.fill_holes)
        for s in annotations:
            put_slice(final, self.axis, s.index, s.mask)
        for z, rep in self.reports.items():
            rep.area = int(take_slice(final, self.axis, z).sum())
        if self.progress is not None:
            self.progress(self.total, self.total, "done")  # chains that stop early leave slices unvisited
        return PropagationResult(
            mask=final.astype(np.uint8),
            prompts=self.prompts,
            slices=self.reports,
            axis=self.axis,
            prompts_from=prompts_from,
            notes=self.notes,
            seconds=time.perf_counter() - self.t0,
            order=[z for z in self.order if self.reports[z].source != "skipped" or z in self.prompts],
            accepted=self.mask.copy(),
            refined=outlines,
            segmented_count=self.segmented_count,
        )
