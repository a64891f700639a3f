"""Which slice to check next: a ranking of the segmented slices by how much of the result's likely
error a correction there would remove, computed from the image and the result only (never from a
reference).

The likely error of a segmented slice w is the part of its mask its neighbours do not confirm:

    err(w) = area(w) * (1 - agreement(w))

where agreement(w) is the mean Dice of w's final mask with the final masks of the slices before
and after it carried onto w by the motion between the slices (`motion.neighbour_agreement`). An
organ changes little from one slice to the next once the motion is taken out, so a mask its
neighbours do not predict is likely wrong there (or they are), and 3D Dice counts voxels, so the
disagreement is weighed by the slice's area. Annotated slices are the truth and count nothing.

A correction on slice z redraws z and re-seeds the chains through its neighbours: it reaches a
slice w with weight K(|w - z|), K(d) = exp(-d / REACH), except what the nearest annotation already
reaches (a chain from the truth a slice away changes little when seeded again). Its value is

    removed(z) = sum_w err(w) * max(0, K(|w - z|) - K(d(w)))

with d(w) the distance in slices from w to the nearest annotated slice; the score is that value as
a share of the error no annotation reaches yet, sum_w err(w) * (1 - K(d(w))), in [0, 1]. Ties (a
result its neighbours confirm everywhere) go to the slice farthest from the annotations.

Frames: slice indices along the propagation's axis (the same numbers as `--slices`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from FoBSegmentLib.propagation.types import PropagationResult

SEGMENTED = ("neighbour", "interpolated", "fob", "edited", "prompts-in")
# How far a correction reaches, in slices (docs/RESULTS.md, "Tuning notes", `review ranking`).
REACH = 2.0
# A segmented slice whose agreement was never measured (no image, e.g. a result built by hand).
UNKNOWN_AGREEMENT = 0.5


@dataclass
class ReviewItem:
    """One slice of the ranking: index along the axis, score in [0, 1] (the share of the estimated
    error a correction there removes), why."""

    index: int
    score: float
    reason: str

    def to_json(self) -> dict:
        return {"index": self.index, "score": round(self.score, 4), "reason": self.reason}


def _reach(d: np.ndarray) -> np.ndarray:
    return np.exp(-np.asarray(d, float) / REACH)


def review_ranking(result: PropagationResult) -> list[ReviewItem]:
    """Every segmented slice that is not annotated, the most error removed first."""
    reports = result.slices
    annotated = np.array(sorted(z for z, r in reports.items() if r.source == "annotation"), int)
    segmented = sorted(z for z, r in reports.items() if r.source in SEGMENTED and r.area > 0)
    if not segmented:
        return []
    organ = np.array(segmented, int)
    agree = {z: (reports[z].agreement if reports[z].agreement is not None else UNKNOWN_AGREEMENT)
             for z in segmented}
    err = np.array([reports[z].area * (1.0 - agree[z]) for z in segmented], float)
    dist = (np.abs(organ[:, None] - annotated[None, :]).min(axis=1) if annotated.size
            else np.full(organ.shape, np.inf))
    covered = _reach(dist)
    total = float((err * (1.0 - covered)).sum())
    items = []
    for i, z in enumerate(segmented):
        removed = float((err * np.maximum(0.0, _reach(np.abs(organ - z)) - covered)).sum())
        share = removed / total if total > 0 else 0.0
        rep = reports[z]
        signs = [f"its neighbours carried onto it agree {agree[z]:.2f}"
                 if rep.agreement is not None else "its agreement with its neighbours is unknown"]
        signs += [f for f in rep.flags if not f.startswith("chain-end")]
        near = (f"{int(dist[i])} slices from the nearest annotation" if np.isfinite(dist[i])
                else "no annotated slice in this volume")
        items.append((-share, -float(dist[i]), z, ReviewItem(
            int(z), min(1.0, max(0.0, share)),
            f"{'; '.join(signs)}; {near} (a correction here removes ~{100 * share:.0f}% of the estimated error)")))
    return [item for *_, item in sorted(items, key=lambda t: t[:3])]


def write_review(path: str | os.PathLike, items: list[ReviewItem]) -> None:
    """`{"slices": [{"index", "score", "reason"}, ...]}`, most doubtful first, written atomically."""
    from FoBSegmentLib.atomic import write_text_atomic

    write_text_atomic(path, json.dumps({"slices": [it.to_json() for it in items]}, indent=2) + "\n",
                      make_parents=False)
