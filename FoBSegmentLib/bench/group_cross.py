"""Across patients: one annotated slice of another patient segments the query, as `fob segment QUERY
--support-image OTHER --support-mask OTHER_MASK` runs it.

CHAOS MR case 2 is the query and case 3 (the protocol's support patient of case 2) gives its middle
liver slice: the job registers the two whole volumes (3D affine), searches the query's slices with
2D registrations (the locate step), chains, and chains again from the query's own cross-section.
Then the next organ of the same pair (the right kidney, from 3's middle kidney slice): the volume
registration is kept for it (`locate.register_volumes`). Timed from the job's start to its result;
the weight-free default segmenter (graphcut) and the neighbour source, as the evaluation's
cross-patient protocol runs them.
"""

from __future__ import annotations

import time

from FoBSegmentLib.bench.core import CaseResult, Settings, measured, skipped

QUERY, ORGANS = "2", ((1, "liver"), (2, "right kidney"))


def cases(settings: Settings) -> list[CaseResult]:
    from FoBSegmentLib.bench.core import _join, summarize
    from FoBSegmentLib.bench.report import progress_line

    labels = {"cross-first": "cross-patient job, one slice of another patient (CHAOS MR 3 -> 2, liver)",
              "cross-next": "cross-patient job, the next organ of the same pair (right kidney)"}
    if settings.device.startswith("cuda"):
        return [skipped("cross-patient", label, settings, "weight-free CPU pipeline, measured on the CPU run", key=key)
                for key, label in labels.items()]
    from FoBSegmentLib.evaluate.datasets import list_cases
    from FoBSegmentLib.evaluate.propagation import cross_job, load_other, prepare_volume, support_patient
    from FoBSegmentLib.propagation import locate
    from FoBSegmentLib.segmenters import get_segmenter

    rows = []
    case = list_cases("chaos", ids=[QUERY])[0]
    query = prepare_volume(case.image)
    other = load_other(support_patient(case))
    locate.clear_volume_registrations()  # the first job pays the volume registration
    for (key, label), (organ, name) in zip(labels.items(), ORGANS):
        row = CaseResult(group="cross-patient", case=label, device=settings.device, key=key, unit="s/job")
        with measured(row, settings.device):
            job = cross_job(query, other, organ, False, get_segmenter("graphcut"), registered=False)
            t0 = time.perf_counter()
            res = job.run()
            seconds = time.perf_counter() - t0
            row.__dict__.update(summarize([seconds]))
            row.items = 1
            row.total_s = round(seconds, 3)
            row.params = {"query": f"chaos {QUERY}", "support": f"chaos {other.case.case_id}", "organ": name,
                          "search_threads": locate.SEARCH_THREADS, "segmenter_calls": res.segmented_count}
            row.note = _join(row.note, f"{seconds:.2f} s, {res.segmented_count} segmenter calls, the 2D "
                                       f"registrations on {locate.SEARCH_THREADS} thread(s)")
        progress_line(row)
        rows.append(row)
    return rows
