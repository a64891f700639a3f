"""The widget's Qt-free state (issue 18: defects 2, 4 and 8's buttons; the review panel): the worker
controller driven with fake widgets and a fake clock, the edit debounce, the review rows.

Deterministic on a loaded machine: the worker threads are joined before the main-thread side is polled,
and time is a fake clock, never measured."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from FoBSegmentLib.propagation import PropagationCancelled
from FoBSegmentLib.slicer.controller import (
    ACTION_BUTTONS,
    CANCEL_BUTTON,
    SETUP_BUTTONS,
    EditDebouncer,
    WorkerController,
    button_states,
    cancel_button_text,
)
from FoBSegmentLib.slicer.review import SHORTCUTS, ReviewRow, next_to_check, review_rows


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@dataclass
class FakeButton:
    enabled: bool = True
    text: str = ""


@dataclass
class FakePanel:
    """What the widget does with the controller's output: buttons, a progress bar, a status text."""

    buttons: dict[str, FakeButton] = field(default_factory=lambda: {
        n: FakeButton() for n in (*ACTION_BUTTONS, *SETUP_BUTTONS, CANCEL_BUTTON)})
    progress: list = field(default_factory=list)
    slices: list = field(default_factory=list)
    finished: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    def update(self, ready: bool, busy: bool, downloading: bool = False) -> None:
        for name, enabled in button_states(ready, busy, downloading).items():
            self.buttons[name].enabled = enabled
        self.buttons[CANCEL_BUTTON].text = cancel_button_text(busy)

    def handlers(self) -> dict:
        return {
            "progress": self.progress.append,
            "slice": lambda z, m: self.slices.append(z),
            "done": lambda kind, result: self.finished.append((kind, result)),
            "error": lambda kind, exc, cancelled: self.errors.append((kind, type(exc).__name__, cancelled)),
        }


def test_buttons_while_a_worker_runs() -> None:
    panel = FakePanel()
    panel.update(ready=True, busy=False)
    assert all(panel.buttons[n].enabled for n in (*ACTION_BUTTONS, *SETUP_BUTTONS, CANCEL_BUTTON))
    assert panel.buttons[CANCEL_BUTTON].text == "Propagate volume"
    panel.update(ready=True, busy=True)
    # install and download must not start while the worker runs (pip on a busy interpreter, two downloads)
    assert not any(panel.buttons[n].enabled for n in (*ACTION_BUTTONS, *SETUP_BUTTONS))
    assert panel.buttons[CANCEL_BUTTON].enabled and panel.buttons[CANCEL_BUTTON].text == "Cancel"
    panel.update(ready=False, busy=False)
    assert not any(panel.buttons[n].enabled for n in (*ACTION_BUTTONS, CANCEL_BUTTON))
    assert all(panel.buttons[n].enabled for n in SETUP_BUTTONS), "installing needs no volume"
    panel.update(ready=True, busy=False, downloading=True)
    assert not panel.buttons["downloadWeightsButton"].enabled and panel.buttons["predictButton"].enabled


def test_live_slices_are_spread_over_ticks_and_progress_is_collapsed() -> None:
    """20 slices queued at once are written at most 2 per tick (defect 4: one tick must not write the
    whole queue), the last progress of a tick is reported with an ETA, 'done' comes after every slice."""
    clock, panel = FakeClock(), FakePanel()
    ctl = WorkerController(panel.handlers(), max_heavy_per_tick=2, tick_budget_s=10.0, clock=clock)

    def work(progress, cancel, emit):
        for z in range(20):
            emit("slice", z, np.zeros((4, 4), bool))
            progress(z + 1, 20, f"slice {z}")
        return "result"

    assert ctl.start("propagate", work)
    assert not ctl.start("predict", work), "one run at a time"
    assert ctl.wait(10)
    clock.t += 10.0  # 10 s after the start
    ticks = 0
    while ctl.poll():
        ticks += 1
        assert len(panel.slices) == min(2 * ticks, 20)
    assert panel.slices == list(range(20)) and panel.finished == [("propagate", "result")]
    assert ticks == 10 and not ctl.busy
    last = panel.progress[-1]
    assert (last.done, last.total) == (20, 20) and last.eta_s == 0.0
    first = panel.progress[0]
    assert first.done == 1 and first.eta_s == pytest.approx(10.0 / 1 * 19), "progress up to the slices written"


def test_tick_time_budget_stops_a_tick_early() -> None:
    """Writing a slice may be slow: once the tick's budget is spent, the rest waits for the next tick."""
    clock, written = FakeClock(), []

    def slow_write(z, mask) -> None:
        written.append(z)
        clock.t += 0.03  # each write takes 30 ms of the 50 ms budget

    ctl = WorkerController({"slice": slow_write}, max_heavy_per_tick=100, tick_budget_s=0.05, clock=clock)
    ctl.start("propagate", lambda progress, cancel, emit: [emit("slice", z, None) for z in range(6)])
    ctl.wait(10)
    ctl.poll()
    assert written == [0, 1], "the third write would overrun the tick"
    while ctl.poll():
        pass
    assert written == list(range(6))


def test_cancel_reaches_the_worker_and_is_reported_as_cancelled() -> None:
    panel = FakePanel()
    ctl = WorkerController(panel.handlers())
    started = threading.Event()

    def work(progress, cancel, emit):
        started.set()
        while not cancel():
            threading.Event().wait(0.01)
        raise PropagationCancelled("cancelled")

    ctl.start("segment", work)
    started.wait(10)
    ctl.cancel()
    assert ctl.wait(10)
    while ctl.poll():
        pass
    assert panel.errors == [("segment", "PropagationCancelled", True)] and not panel.finished
    ctl.start("segment", lambda p, c, e: 1 / 0)
    ctl.wait(10)
    while ctl.poll():
        pass
    assert panel.errors[-1] == ("segment", "ZeroDivisionError", False), "a real error is not a cancel"


def test_edits_are_debounced_and_kept_while_busy() -> None:
    clock = FakeClock()
    deb = EditDebouncer(delay_s=0.25, clock=clock)
    deb.add(0, [5])
    clock.t += 0.1
    deb.add(0, [5, 6])
    deb.add(2, [40])
    assert deb.take(busy=False) == {} and deb.remaining_s() == pytest.approx(0.25)
    clock.t += 0.3
    assert deb.take(busy=True) == {}, "a run is going on: the edits wait"
    assert deb.take(busy=False) == {0: [5, 6], 2: [40]}
    assert deb.take(busy=False) == {} and deb.remaining_s() == 0.0
    deb.add(1, [])
    assert deb.pending == {}


class Report:
    def __init__(self, source: str, flags=()) -> None:
        self.source, self.flags = source, list(flags)


REPORTS = {
    10: Report("annotation"),
    11: Report("neighbour"),
    12: Report("neighbour", ["area-jump x2.3"]),
    13: Report("neighbour", ["chain-end: mask vanished"]),
    14: Report("skipped"),
    9: Report("fob", ["intensity-mismatch"]),
}


def test_review_rows_states_without_a_ranking() -> None:
    rows = review_rows(REPORTS, reviewed=[11])
    assert [r.index for r in rows] == [9, 10, 11, 12, 13], "slice order; skipped slices are not listed"
    state = {r.index: r.state for r in rows}
    assert state == {9: "flagged", 10: "annotated", 11: "reviewed", 12: "flagged", 13: "plain"}
    assert rows[3].reason == "area-jump x2.3" and rows[4].reason == "", "a chain end is no reason to look"
    assert next_to_check(rows) == 9 and next_to_check(rows, after=9) == 12
    assert next_to_check(rows, after=13) == 9, "wraps round"


def test_review_rows_follow_the_ranking() -> None:
    ranking = [
        {"index": 13, "score": 0.9, "reason": "low SAM score"},
        {"index": 12, "score": 0.7, "reason": "shape change"},
        {"index": 20, "score": 0.1, "reason": "outside the propagated range"},
    ]
    rows = review_rows(REPORTS, ranking, reviewed=[11])
    assert [r.index for r in rows] == [13, 12, 20, 9, 10, 11]
    assert rows[0] == ReviewRow(13, "plain", "low SAM score", 0.9, 0)
    assert rows[1].reason == "shape change; area-jump x2.3" and rows[1].state == "flagged"
    assert next_to_check(rows, after=13) == 12 and next_to_check(rows, after=12) == 20
    assert next_to_check([r for r in rows if r.state == "annotated"]) is None
    with pytest.raises(ValueError, match="entry 0"):
        review_rows(REPORTS, [{"score": 1.0}])
    with pytest.raises(ValueError, match="integer slice"):
        review_rows(REPORTS, [{"index": "12"}])


def test_shortcuts_leave_slicers_single_keys_alone_and_are_documented() -> None:
    from pathlib import Path

    assert len(set(SHORTCUTS.values())) == len(SHORTCUTS)
    assert all("+" in key for key in SHORTCUTS.values()), "b / f step slices in Slicer's views"
    root = Path(__file__).resolve().parent.parent
    for text in ((root / "docs" / "SLICER.md").read_text(encoding="utf-8"),
                 (root / "FoBSegment" / "FoBSegment.py").read_text(encoding="utf-8"),
                 (root / "FoBSegment" / "Resources" / "UI" / "FoBSegment.ui").read_text(encoding="utf-8")):
        assert all(key in text for key in SHORTCUTS.values())
