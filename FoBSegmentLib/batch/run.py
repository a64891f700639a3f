"""A cohort of `fob segment` jobs on Dask: a `distributed.LocalCluster` on this machine (one worker
process per core, one torch thread each) or an existing cluster (`scheduler` address).

The client (this process) checks the manifest, skips finished rows, submits the others as Dask
tasks (`batch.rows.run_row`), draws the cohort's progress, and writes OUTDIR/report.html at the
end. Ctrl-C sets a Dask `Event` that every running row polls between slices: the rows stop without
writing anything, the pending ones are cancelled, and the report shows what had finished.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from FoBSegmentLib.batch.manifest import BatchRow
from FoBSegmentLib.batch.rows import is_finished, one_line, read_status, run_row

# A cancelled cohort waits this long for its running rows to notice; a row polls every second, so
# only a row inside one slow call (a model load, a SAM encoder pass) can take longer.
CANCEL_GRACE_S = 60.0


@dataclass
class BatchSummary:
    """What a `run_batch` did; `statuses` holds the record of every row that ran or was skipped."""

    total: int
    skipped: int = 0
    done: int = 0
    failed: int = 0
    cancelled: bool = False
    seconds: float = 0.0
    workers: int = 0
    statuses: dict[int, dict[str, Any]] = field(default_factory=dict)
    report: Path | None = None


def default_workers() -> int:
    """One worker per usable core."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# Dask's bookkeeping runs beside the rows on the same cores. Its defaults suit an interactive
# dashboard: a sampling profiler every 10 ms and memory / system monitors every 0.1-0.5 s. Rows last
# seconds, so they are slowed: an idle 1-worker cluster used 0.046 cores with the defaults, 0.017
# with these (docs/BENCHMARKS.md, "Cohorts on Dask").
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.tick.interval": "100ms",
}


def worker_environment(torch_threads: int = 1) -> dict[str, str]:
    """The environment a worker process must start with (Dask's `pre-spawn-environ`: read by the C
    libraries at process start, so it cannot be set later).

    Dask's default sets MALLOC_TRIM_THRESHOLD_=65536 so idle workers give memory back; that also
    freezes glibc's mmap threshold at 128 KiB, so every temporary slice array is a fresh mmap whose
    pages fault in again: measured 1.7-1.9x slower per volume than the same row without Dask
    (docs/BENCHMARKS.md, "Cohorts on Dask"). A row's memory is freed when the row ends anyway.
    """
    threads = str(max(1, torch_threads))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
            "OMP_WAIT_POLICY": "PASSIVE"}


def start_local_cluster(workers: int, torch_threads: int = 1):
    """A LocalCluster on 127.0.0.1 (no dashboard, nothing reachable from outside): `workers`
    processes with one Dask thread each, started with `worker_environment`."""
    import logging

    import dask
    from distributed import LocalCluster

    # Ctrl-C in a terminal reaches every process of the foreground group, the workers too: they would
    # die mid-row with tracebacks. Spawned with SIGINT ignored (inherited; Python keeps an ignored
    # SIGINT ignored), they leave Ctrl-C to this process, which stops the rows through the cancel
    # Event. (A Ctrl-C during these 1-2 s of start-up is lost.)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        with dask.config.set(LOCAL_CLUSTER_CONFIG
                             | {"distributed.nanny.pre-spawn-environ": worker_environment(torch_threads)}):
            return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                dashboard_address=None, silence_logs=logging.ERROR)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


class Progress:
    """The cohort's line on the terminal: done / failed / running / queued, and the ETA."""

    def __init__(self, total: int, stream: TextIO | None, enabled: bool = True) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.last_line = ""
        self.last_print = 0.0

    def line(self, done: int, failed: int, running: int) -> str:
        finished = done + failed
        text = f"fob batch: {finished}/{self.total} finished ({done} done, {failed} failed), {running} running"
        if 0 < finished < self.total:
            eta = (time.perf_counter() - self.t0) / finished * (self.total - finished)
            text += f", ETA {_duration(eta)}"
        return text

    def update(self, done: int, failed: int, running: int, force: bool = False) -> None:
        if not self.enabled:
            return
        text = self.line(done, failed, running)
        now = time.perf_counter()
        if self.tty:
            if text != self.last_line or now - self.last_print > 1.0:
                self.stream.write("\r" + text.ljust(len(self.last_line)))
                self.stream.flush()
        elif text != self.last_line and (force or now - self.last_print > 10.0 or done + failed == self.total):
            # A log file gets a line per change (at most one every 10 s), not a redrawn line.
            self.stream.write(text + "\n")
            self.stream.flush()
        else:
            return
        self.last_line, self.last_print = text, now

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tty and self.last_line:
            self.stream.write("\r" + " " * len(self.last_line) + "\r")
            self.last_line = ""
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self.last_line:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def remove_partial_files(outdir: Path) -> list[Path]:
    """Temporary files of atomic writes that a killed worker could not remove (`atomic.atomic_output`
    names them `.<target>.<random>.part<suffixes>`)."""
    gone = []
    for p in outdir.glob(".*.part*"):
        if p.is_file():
            p.unlink()
            gone.append(p)
    return gone


def run_batch(
    rows: list[BatchRow],
    outdir: str | os.PathLike,
    scheduler: str | None = None,
    workers: int | None = None,
    force: bool = False,
    torch_threads: int = 1,
    stream: TextIO | None = None,
    progress: bool = True,
    on_submitted: Callable[[], None] | None = None,
) -> BatchSummary:
    """Run the rows not yet finished (all of them with `force`) on Dask and write OUTDIR/report.html.

    on_submitted: called once every row is submitted (tests use it to interrupt a running cohort).
    Raises KeyboardInterrupt after a clean stop when interrupted.
    """
    from distributed import Client, Event

    from FoBSegmentLib.reports.html import write_batch_report

    out = Path(outdir)
    t0 = time.perf_counter()
    summary = BatchSummary(total=len(rows))
    todo: list[BatchRow] = []
    for row in rows:
        if not force and is_finished(row, out):
            summary.skipped += 1
            summary.statuses[row.number] = {**(read_status(row.status_path(out)) or {}), "skipped": True}
        else:
            todo.append(row)
    bar = Progress(len(todo), stream, enabled=progress)
    if summary.skipped:
        bar.message(f"fob batch: {summary.skipped} of {len(rows)} rows already finished, skipped (--force redoes them)")
    interrupted = False
    if todo:
        cluster = None
        if scheduler is None:
            n = workers or default_workers()
            bar.message(f"fob batch: starting a local Dask cluster, {n} worker(s) x 1 thread on 127.0.0.1")
            cluster = start_local_cluster(n, torch_threads)
            client = Client(cluster)
        else:
            try:
                client = Client(scheduler, timeout="20s")
            except (OSError, ValueError) as exc:
                raise OSError(f"cannot reach the Dask scheduler {scheduler}: {one_line(exc)}") from None
        try:
            summary.workers = len(client.scheduler_info().get("workers", {}))
            interrupted = _run_on_client(client, todo, out, torch_threads, summary, bar, on_submitted, Event)
        finally:
            bar.close()
            client.close()
            if cluster is not None:
                cluster.close()
            remove_partial_files(out)
    summary.seconds = time.perf_counter() - t0
    summary.cancelled = interrupted
    summary.report = write_batch_report(out, rows)
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _run_on_client(client, todo: list[BatchRow], out: Path, torch_threads: int, summary: BatchSummary,
                   bar: Progress, on_submitted, Event) -> bool:
    """Submit, follow, collect; returns True when interrupted (after the clean stop)."""
    run_id = uuid.uuid4().hex[:8]
    event_name = f"fob-batch-cancel-{run_id}"
    cancel = Event(event_name, client=client)
    futures = {}
    for row in todo:
        key = f"fob-batch-{run_id}-row{row.number}"
        futures[key] = (row, client.submit(run_row, row, str(out), event_name, torch_threads, key=key, pure=False))
    if on_submitted is not None:
        on_submitted()
    pending = dict(futures)
    running, asked = 0, 0.0
    try:
        while pending:
            for key in [k for k, (_, f) in pending.items() if f.done()]:
                row, fut = pending.pop(key)
                _collect(row, fut, out, summary)
            if time.monotonic() - asked >= 1.0:  # a scheduler round trip: once a second is enough
                running, asked = _running(client, pending), time.monotonic()
            bar.update(summary.done, summary.failed, min(running, len(pending)))
            if pending:
                time.sleep(0.2)
        bar.update(summary.done, summary.failed, 0, force=True)
        return False
    except KeyboardInterrupt:
        bar.message(f"fob batch: stopping: {len(pending)} row(s) not finished; nothing partial is kept")
        cancel.set()
        waiting = [f for k, (_, f) in pending.items() if k in _processing_keys(client)]
        client.cancel([f for _, f in pending.values() if f not in waiting])
        deadline = time.monotonic() + CANCEL_GRACE_S
        try:
            while any(not f.done() for f in waiting) and time.monotonic() < deadline:
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop waiting; closing the cluster ends the rows
        for row, fut in list(pending.values()):
            if fut.done() and fut.status == "finished":
                _collect(row, fut, out, summary)
        return True


def _processing_keys(client) -> set[str]:
    try:
        return {k for keys in client.processing().values() for k in keys}
    except Exception:  # noqa: BLE001 - the scheduler is going away; nothing is running then
        return set()


def _running(client, pending: dict) -> int:
    keys = _processing_keys(client)
    return sum(1 for k in pending if k in keys)


def _collect(row: BatchRow, fut, out: Path, summary: BatchSummary) -> None:
    """The row's status from its finished future; a row whose worker died is recorded here."""
    from FoBSegmentLib.atomic import write_text_atomic
    from FoBSegmentLib.batch.rows import STATUS_FORMAT

    try:
        status = fut.result()
    except Exception as exc:  # noqa: BLE001 - e.g. KilledWorker: the worker process died on this row
        status = {"format": STATUS_FORMAT, "row": row.number, "name": row.name, "key": row.key(),
                  "image": row.request["image"], "output": str(row.output), "status": "failed",
                  "error": f"the worker running it died ({type(exc).__name__}: {one_line(exc)})",
                  "error_type": type(exc).__name__}
        import json

        write_text_atomic(row.status_path(out), json.dumps(status, indent=1) + "\n", make_parents=False)
    if status.get("status") == "cancelled":
        return
    summary.statuses[row.number] = status
    if status.get("status") == "done":
        summary.done += 1
    else:
        summary.failed += 1
