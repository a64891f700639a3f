"""One correction -> updated volume: the annotation loop's step, on a 40-slice organ range.

Synapse CT case 1, liver (54 slices): the job is `fob segment`'s defaults on the 40 slices around
the liver's middle (`slices=A:B`), annotated on its middle slice. The correction is what the loop
does: the slice the review ranking puts first is annotated with its reference mask and the volume
is propagated again, given the previous result (`Job.run(previous=...)`: the chains the correction
does not touch are taken over; a slice that shows the organ changes the appearance learnt from the
annotations, so then every chain runs again, while an annotated absence keeps the chains it does not
cut). Timed from the call to the updated result; the full re-propagation is measured beside it.
"""

from __future__ import annotations

import time

import numpy as np

from FoBSegmentLib.bench.core import CaseResult, Settings, measured, skipped

RANGE = 40


def _setup():
    from FoBSegmentLib.evaluate.datasets import list_cases
    from FoBSegmentLib.evaluate.propagation import prepare_volume, read_reference
    from FoBSegmentLib.job import JobSettings, load_components

    case = list_cases("synapse", ids=["1"])[0]
    prepared = prepare_volume(case.image)
    ref = read_reference(case.label, prepared) == 1
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    middle = int(zs[len(zs) // 2])
    lo = max(0, middle - RANGE // 2)
    settings = JobSettings(slices=(lo, lo + RANGE - 1))
    return prepared, ref, middle, settings, load_components(settings)


def _job(prepared, ref, slices, settings, components):
    from FoBSegmentLib.job import build_job

    support = np.zeros(ref.shape, bool)
    for z in slices:
        support[z] = ref[z]
    return build_job(prepared, support, settings, components=components)


def cases(settings: Settings) -> list[CaseResult]:
    from FoBSegmentLib.bench.core import _join, summarize
    from FoBSegmentLib.bench.report import progress_line

    label = f"one correction -> updated volume, {RANGE}-slice liver range (Synapse CT 1)"
    key = "correction-update"
    if settings.device.startswith("cuda"):
        return [skipped("correction", label, settings, "weight-free CPU pipeline, measured on the CPU run", key=key)]
    from FoBSegmentLib.propagation.review import review_ranking

    row = CaseResult(group="correction", case=label, device=settings.device, key=key, unit="s/correction")
    with measured(row, settings.device):
        prepared, ref, middle, job_settings, components = _setup()
        first = _job(prepared, ref, [middle], job_settings, components).run()
        pick = next(it.index for it in review_ranking(first) if it.index != middle)
        both = _job(prepared, ref, [middle, pick], job_settings, components)
        updates, fulls = [], []
        for _ in range(max(1, settings.reps(2, 3))):
            t0 = time.perf_counter()
            updated = both.run(previous=first)
            updates.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            full = both.run()
            fulls.append(time.perf_counter() - t0)
        if not np.array_equal(updated.mask, full.mask):
            raise RuntimeError("the updated volume differs from a full re-propagation")
        row.__dict__.update(summarize(updates))
        row.items = 1
        row.total_s = round(float(np.median(updates)), 3)
        row.params = {"range_slices": RANGE, "annotated": [middle, pick],
                      "segmenter_calls_update": updated.segmented_count,
                      "segmenter_calls_full": full.segmented_count,
                      "full_repropagation_s": round(float(np.median(fulls)), 3), "target_s": 3.0}
        row.note = _join(row.note, f"updated in {row.total_s:.2f} s ({updated.segmented_count} segmenter calls; "
                                   f"a full re-propagation {np.median(fulls):.2f} s, {full.segmented_count} calls); "
                                   "target < 3 s")
    progress_line(row)
    return [row]
