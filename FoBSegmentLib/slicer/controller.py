"""The widget's state without Qt: the worker thread and its queue, the button states, the debounce of
point edits. The widget (FoBSegment/FoBSegment.py) owns the QTimers and forwards their ticks here, so
all of this is tested headless with fake widgets (Testing/test_slicer_controller.py).

Rules it holds:
* Everything longer than about 100 ms (normalising a volume, loading SAM, segmenting slices, predicting,
  propagating) runs on ONE worker thread; the main thread only copies MRML in and writes results out.
* `poll` (a QTimer tick) does a bounded amount of main-thread work: progress messages are collapsed to
  the last one, and at most `max_heavy_per_tick` heavy messages (a live slice to write) or
  `tick_budget_s` seconds are spent per tick, so the GUI stays responsive while slices stream in.
* While a worker runs, every button that starts work (install, download included) is disabled and the
  propagate button is the Cancel button.
* Point edits are collected and re-segmented `delay_s` after the last one; edits made while a worker
  runs are kept and re-segmented after it finishes, never dropped.

No Slicer, Qt or MRML import here.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ACTION_BUTTONS = (
    "predictButton",
    "markReviewedButton",
    "clearReviewedButton",
    "markAbsentButton",
    "segmentCurrentButton",
    "segmentReviewedButton",
    "undoButton",
    "exportPromptsButton",
    "importPromptsButton",
    "acceptNextButton",
    "show3DButton",
)
SETUP_BUTTONS = ("installDependenciesButton", "downloadWeightsButton", "useLocalWeightsButton")
CANCEL_BUTTON = "propagateButton"
CANCEL_TEXT = "Cancel"
IDLE_TEXT = "Propagate volume"

Work = Callable[[Callable[..., None], Callable[[], bool], Callable[..., None]], Any]


def button_states(ready: bool, busy: bool, downloading: bool = False) -> dict[str, bool]:
    """{button name: enabled}. ready: a volume, a segmentation and a segment are chosen; busy: a worker
    runs; downloading: a weights download runs (it has its own progress dialog)."""
    states = {name: ready and not busy for name in ACTION_BUTTONS}
    for name in SETUP_BUTTONS:
        states[name] = not busy and not downloading
    states[CANCEL_BUTTON] = busy or ready  # while busy it is the Cancel button
    return states


def cancel_button_text(busy: bool) -> str:
    return CANCEL_TEXT if busy else IDLE_TEXT


@dataclass
class Progress:
    """The last progress message of a run: done of total steps, a text, the estimated seconds left."""

    done: int
    total: int
    text: str
    eta_s: float | None


class WorkerController:
    """One worker thread at a time and the queue it talks to the main thread through.

    handlers (main thread, called from `poll`): "progress"(Progress), "done"(kind, result),
    "error"(kind, exc, cancelled), and one per custom tag the work emits (e.g. "slice"(z, mask)).
    work(progress, cancel, emit) runs on the worker: progress(done, total, text), cancel() -> bool,
    emit(tag, *payload); it must not touch Qt or MRML.
    """

    def __init__(
        self,
        handlers: Mapping[str, Callable[..., Any]],
        heavy: Iterable[str] = ("slice",),
        max_heavy_per_tick: int = 2,
        tick_budget_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.handlers = dict(handlers)
        self.heavy = set(heavy)
        self.max_heavy_per_tick = int(max_heavy_per_tick)
        self.tick_budget_s = float(tick_budget_s)
        self.clock = clock
        self.kind: str | None = None
        self.cancel_requested = False
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._started = 0.0

    @property
    def busy(self) -> bool:
        """True from `start` until `poll` has handled the run's last message."""
        return self.kind is not None

    def start(self, kind: str, work: Work) -> bool:
        """Run work on a new worker thread; False (nothing started) while another run is busy."""
        if self.busy:
            return False
        self.kind, self.cancel_requested = kind, False
        self._cancel = threading.Event()
        self._queue = queue.Queue()
        q, cancel = self._queue, self._cancel

        def run() -> None:
            try:
                result = work(lambda d, t, s="": q.put(("progress", d, t, s)), cancel.is_set,
                              lambda tag, *payload: q.put((tag, *payload)))
                q.put(("done", result))
            except BaseException as exc:  # noqa: BLE001  (reported on the main thread, whatever it is)
                q.put(("error", exc))

        self._started = self.clock()
        self._thread = threading.Thread(target=run, name=f"FoBSegment {kind}", daemon=True)
        self._thread.start()
        return True

    def cancel(self) -> None:
        """Ask the work to stop at its next cancel() check; `poll` then reports the error as cancelled."""
        if self.busy:
            self.cancel_requested = True
            self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker thread ended (scene close, tests); True when it did."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def poll(self) -> bool:
        """Main thread, once per timer tick: handle queued messages within this tick's budget.

        Returns True while the run is still busy (keep the timer going)."""
        if not self.busy:
            return False
        deadline = self.clock() + self.tick_budget_s
        heavy_done = 0
        last_progress = None
        while True:
            if heavy_done >= self.max_heavy_per_tick or self.clock() > deadline:
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            tag = item[0]
            if tag == "progress":
                last_progress = item[1:]
                continue
            if tag in ("done", "error"):
                self._report_progress(last_progress)
                kind, self.kind = self.kind, None
                self._thread = None
                if tag == "done":
                    self._call("done", kind, item[1])
                else:
                    self._call("error", kind, item[1], self.cancel_requested or _is_cancel(item[1]))
                return False
            if tag in self.heavy:
                heavy_done += 1
            self._call(tag, *item[1:])
        self._report_progress(last_progress)
        return True

    def _report_progress(self, item) -> None:
        if item is None:
            return
        done, total, text = item
        elapsed = self.clock() - self._started
        eta = elapsed / done * (total - done) if done > 0 and total >= done else None
        self._call("progress", Progress(int(done), int(total), str(text), eta))

    def _call(self, tag: str, *args: Any) -> None:
        handler = self.handlers.get(tag)
        if handler is not None:
            handler(*args)


def _is_cancel(exc: BaseException) -> bool:
    return type(exc).__name__ == "PropagationCancelled"


@dataclass
class EditDebouncer:
    """Point edits collected per slicing axis and released `delay_s` after the last one."""

    delay_s: float = 0.25
    clock: Callable[[], float] = time.monotonic
    pending: dict[int, set[int]] = field(default_factory=dict)
    last: float = 0.0

    def add(self, axis: int, slices: Iterable[int]) -> None:
        slices = {int(z) for z in slices}
        if slices:
            self.pending.setdefault(int(axis), set()).update(slices)
            self.last = self.clock()

    def remaining_s(self) -> float:
        """Seconds until the pending edits are due (0 when due or nothing is pending)."""
        if not self.pending:
            return 0.0
        return max(0.0, self.delay_s - (self.clock() - self.last))

    def take(self, busy: bool) -> dict[int, list[int]]:
        """{axis: sorted slices} to re-segment now, cleared; {} while busy or before the delay passed
        (the edits stay pending: ask again after the run, `remaining_s` from now)."""
        if busy or not self.pending or self.remaining_s() > 0:
            return {}
        pending, self.pending = self.pending, {}
        return {axis: sorted(zs) for axis, zs in sorted(pending.items())}

    def clear(self) -> None:
        self.pending = {}
