"""The review panel's rows, without Qt: the slices of the current job with their state, in the order a
person should check them.

States: "annotated" (drawn by the person, a support slice), "absent" (marked by the person as not
showing the organ: no chain passes it), "reviewed" (marked reviewed: its points are locked), "flagged"
(the propagation flagged it; the reason says why), "plain" (segmented, nothing to report). Slice indices are along the job's slicing axis of the volume's [k, j, i] array.

Order: by the engine's review ranking when one is given (a list of {"index", "score", "reason"}, most
doubtful first, as `fob segment --review-out` writes it), the unranked slices after it in slice order;
without a ranking, in slice order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

STATES = ("annotated", "absent", "reviewed", "flagged", "plain")
TO_CHECK = ("flagged", "plain")

# Keyboard shortcuts of the module (Qt key sequences). Single letters are left to Slicer's slice views
# (b / f step through slices there); these are registered while the module is shown.
SHORTCUTS: dict[str, str] = {
    "background point": "Shift+B",
    "foreground point": "Shift+F",
    "accept slice, go to the next to check": "Shift+N",
    "organ not on this slice": "Shift+E",
}


@dataclass(frozen=True)
class ReviewRow:
    """One line of the panel. score/reason of the ranking when the slice is ranked (rank 0 = first)."""

    index: int
    state: str
    reason: str = ""
    score: float | None = None
    rank: int | None = None


def _flag_reason(flags: Sequence[str]) -> str:
    # chain ends are the normal end of a propagation, not a reason to look at a slice
    return "; ".join(f for f in flags if not f.startswith("chain-end"))


def _check_ranking(ranking: Sequence[Mapping[str, Any]]) -> list[tuple[int, float | None, str]]:
    out = []
    for n, entry in enumerate(ranking):
        if not isinstance(entry, Mapping) or "index" not in entry:
            raise ValueError(f"review ranking entry {n} has no slice index: {entry!r}")
        index = entry["index"]
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"review ranking entry {n}: index must be an integer slice, got {index!r}")
        score = entry.get("score")
        if score is not None and not isinstance(score, (int, float)):
            raise ValueError(f"review ranking entry {n}: score must be a number, got {score!r}")
        out.append((index, None if score is None else float(score), str(entry.get("reason", ""))))
    return out


def review_rows(
    reports: Mapping[int, Any],
    ranking: Sequence[Mapping[str, Any]] | None = None,
    reviewed: Iterable[int] = (),
    annotated: Iterable[int] = (),
    absent: Iterable[int] = (),
) -> list[ReviewRow]:
    """The panel's rows from a propagation's per-slice reports (`PropagationResult.slices`: objects with
    `source` and `flags`), the optional review ranking, and the slices marked reviewed / annotated.

    Skipped slices (outside the organ's range) are not listed unless reviewed, annotated or absent. A ranked
    slice that is not among the reports is still listed (it is in the job). Raises ValueError for a
    malformed ranking entry.
    """
    reviewed, annotated = {int(z) for z in reviewed}, {int(z) for z in annotated}
    absent = {int(z) for z in absent}
    ranked = _check_ranking(ranking) if ranking is not None else []
    slices = {int(z) for z, r in reports.items() if r.source != "skipped"} | reviewed | annotated | absent
    slices |= {index for index, _, _ in ranked}
    rank = {}
    for n, (index, score, reason) in enumerate(ranked):
        rank.setdefault(index, (n, score, reason))  # a slice ranked twice keeps its first place

    def row(z: int) -> ReviewRow:
        report = reports.get(z)
        flags = _flag_reason(report.flags) if report is not None else ""
        if z in absent:
            state = "absent"
        elif z in annotated or (report is not None and report.source == "annotation"):
            state = "annotated"
        elif z in reviewed:
            state = "reviewed"
        elif flags:
            state = "flagged"
        else:
            state = "plain"
        n, score, reason = rank.get(z, (None, None, ""))
        return ReviewRow(z, state, "; ".join(r for r in (reason, flags) if r), score, n)

    rows = [row(z) for z in sorted(slices)]
    return sorted(rows, key=lambda r: (r.rank is None, r.rank if r.rank is not None else 0, r.index))


def next_to_check(rows: Sequence[ReviewRow], after: int | None = None) -> int | None:
    """The slice to go to after accepting slice `after`: the next row in panel order (after that slice's
    row) still to check (flagged or plain), wrapping round; None when every slice is done."""
    todo = [r for r in rows if r.state in TO_CHECK and r.index != after]
    if not todo:
        return None
    order = [r.index for r in rows]
    if after is None or after not in order:
        return todo[0].index
    position = order.index(after)
    later = [r for r in todo if order.index(r.index) > position]
    return (later or todo)[0].index
