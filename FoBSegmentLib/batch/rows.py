"""What one batch row does on a Dask worker: exactly `fob segment` (`files.segment_files`), then its
Dice against the reference, its thumbnail montage and its status record, all written atomically.

A row never raises: a failure becomes a status record with a one-line reason (and leaves neither
the row's label map nor its montage behind), so the cohort goes on. A cancelled row (Ctrl-C)
writes nothing at all and is run again next time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from FoBSegmentLib.batch.manifest import BatchRow

STATUS_FORMAT = "fob-batch-status/1"
# How often a running row asks the scheduler whether the cohort was cancelled: rarely enough that
# the question costs nothing next to a slice, often enough that Ctrl-C stops within about a second.
CANCEL_POLL_S = 1.0


def one_line(exc: BaseException) -> str:
    from FoBSegmentLib.errors import SettingError

    text = str(exc) if not isinstance(exc, SettingError) else f"{exc.field}: {exc.message}"
    return " ".join(text.split()) or type(exc).__name__


def read_status(path: Path) -> dict[str, Any] | None:
    """The status record at `path`, or None when there is none (or it is unreadable: run again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == STATUS_FORMAT else None


def is_finished(row: BatchRow, outdir: Path) -> bool:
    """A row is finished when its status record says done for the same inputs and options, and its
    label map is there."""
    st = read_status(row.status_path(outdir))
    return bool(st and st.get("status") == "done" and st.get("key") == row.key() and row.output.is_file())


def _cancel_check(event_name: str | None):
    if event_name is None:
        return None
    from distributed import Event

    event = Event(event_name)
    last = [0.0, False]

    def cancelled() -> bool:
        now = time.monotonic()
        if not last[1] and now - last[0] >= CANCEL_POLL_S:
            last[0] = now
            try:
                last[1] = event.is_set()
            except Exception:  # noqa: BLE001 - the scheduler is gone: nobody will take the result
                last[1] = True
        return last[1]

    return cancelled


def run_row(row: BatchRow, outdir: str, cancel_event: str | None = None, torch_threads: int | None = 1,
            montage_panels: int = 8) -> dict[str, Any]:
    """Run one row; returns its status record (already written beside the output), or
    {"status": "cancelled", ...} (nothing written) when the cohort was cancelled meanwhile."""
    from FoBSegmentLib.atomic import write_text_atomic
    from FoBSegmentLib.files import SegmentRequest, segment_files
    from FoBSegmentLib.propagation.types import PropagationCancelled

    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    out_dir = Path(outdir)
    status: dict[str, Any] = {
        "format": STATUS_FORMAT, "row": row.number, "name": row.name, "key": row.key(),
        "image": row.request["image"], "output": str(row.output), "host": os.uname().nodename, "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    t0 = time.perf_counter()
    c0 = time.thread_time()
    status["t_start"] = time.time()  # epoch seconds: the cohort's span across workers (benchmark)
    montage = row.montage_path(out_dir)
    try:
        outcome = segment_files(SegmentRequest(**row.request), cancel=_cancel_check(cancel_event))
        res = outcome.result
        dice = None
        reference = None
        if row.reference is not None:
            from FoBSegmentLib.labelmap import dice as dice_of
            from FoBSegmentLib.reports.montage import read_reference

            label = row.reference_label if row.reference_label is not None else row.request.get("support_label")
            reference = read_reference(row.reference, outcome.query, label)
            dice = float(dice_of(res.mask > 0, reference))
        seconds = time.perf_counter() - t0
        from FoBSegmentLib.reports.montage import montage_of_outcome

        montage_of_outcome(montage, outcome, reference, dice, max_panels=montage_panels, panel_inches=1.6, dpi=70)
        seg = res.segmented
        status.update(
            status="done", seconds=round(seconds, 2), dice=dice, voxels=int((res.mask > 0).sum()),
            segmented=list(seg) if seg else None, axis=res.axis, prompts_from=res.prompts_from,
            flags={str(z): [f for f in res.slices[z].flags if not f.startswith("chain-end")] for z in res.flagged},
            montage=montage.name, notes=list(outcome.messages),
        )
    except PropagationCancelled:
        return {"status": "cancelled", "row": row.number, "name": row.name}
    except Exception as exc:  # noqa: BLE001 - a row's failure is its record, never the cohort's
        # The outputs of an earlier run of this row no longer match its record: remove them.
        for p in (row.output, montage):
            if p.is_file():
                p.unlink()
        status.update(status="failed", error=one_line(exc), error_type=type(exc).__name__,
                      seconds=round(time.perf_counter() - t0, 2))
    status["finished"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    status["row_seconds"] = round(time.perf_counter() - t0, 3)  # with the montage and the Dice
    status["row_cpu_seconds"] = round(time.thread_time() - c0, 3)  # this row's thread only
    status["t_end"] = time.time()
    write_text_atomic(row.status_path(out_dir), json.dumps(status, indent=1) + "\n", make_parents=False)
    return status
