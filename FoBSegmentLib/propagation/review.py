"""Which slice to check next: a ranking of the segmented slices, most doubtful first, computed from
the image and the result only (never from a reference).

Each segmented, unannotated slice gets a doubt score in [0, 1] from four signs, each in [0, 1]:
    distance   slices to the nearest annotated slice, relative to the organ's segmented extent
               (a chain's error grows with every step);
    end        the first and last segmented slices (where the organ ends is the chain's guess, and
               the most frequent large error: running past the organ, or stopping short of it);
    shape      how much the slice's area departs from its neighbours' (log ratio to their mean);
    look       the segmenter's own doubt (1 - its score: for graphcut the share of the mask whose
               appearance does not favour the organ) and the review flags the chain raised.
The score is their weighted sum; the reason names the strongest sign.

Frames: slice indices along the propagation's axis (the same numbers as `--slices`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from FoBSegmentLib.propagation.types import PropagationResult

WEIGHTS = {"distance": 0.35, "end": 0.3, "shape": 0.2, "look": 0.15}
SEGMENTED = ("neighbour", "fob", "edited", "prompts-in")


@dataclass
class ReviewItem:
    """One slice of the ranking: index along the axis, doubt score in [0, 1], why."""

    index: int
    score: float
    reason: str

    def to_json(self) -> dict:
        return {"index": self.index, "score": round(self.score, 4), "reason": self.reason}


def _shape_doubt(areas: dict[int, int], z: int) -> float:
    near = [areas[n] for n in (z - 1, z + 1) if areas.get(n, 0) > 0]
    if not near or areas[z] <= 0:
        return 0.0
    return float(min(1.0, abs(np.log(areas[z] / np.mean(near))) / np.log(2.0)))


def review_ranking(result: PropagationResult) -> list[ReviewItem]:
    """Every segmented slice that is not annotated, most doubtful first (ties: lower index)."""
    reports = result.slices
    annotated = sorted(z for z, r in reports.items() if r.source == "annotation")
    areas = {z: r.area for z, r in reports.items()}
    segmented = sorted(z for z, r in reports.items() if r.source in SEGMENTED and r.area > 0)
    if not segmented:
        return []
    organ = sorted(set(segmented) | {z for z in annotated if areas[z] > 0})
    first, last = organ[0], organ[-1]
    extent = max(1, last - first)
    items = []
    for z in segmented:
        rep = reports[z]
        signs = {
            "distance": min(1.0, 2.0 * min((abs(z - a) for a in annotated), default=extent) / extent),
            "end": 1.0 if z in (first, last) else 0.0,
            "shape": _shape_doubt(areas, z),
            "look": min(1.0, (1.0 - rep.score if rep.score is not None else 0.5)
                        + 0.5 * sum(f.startswith(("review:", "area-", "retried")) for f in rep.flags)),
        }
        score = sum(WEIGHTS[k] * v for k, v in signs.items())
        top = max(signs, key=lambda k: WEIGHTS[k] * signs[k])
        reason = {
            "distance": f"{min((abs(z - a) for a in annotated), default=0)} slices from the nearest annotation",
            "end": "the organ's end as the chain found it",
            "shape": "its area departs from its neighbours'",
            "look": "; ".join(rep.flags) or (f"the segmenter's score is {rep.score:.2f}" if rep.score is not None
                                              else "the segmenter gave no score"),
        }[top]
        items.append(ReviewItem(int(z), float(score), reason))
    return sorted(items, key=lambda it: (-it.score, it.index))


def write_review(path: str | os.PathLike, items: list[ReviewItem]) -> None:
    """`{"slices": [{"index", "score", "reason"}, ...]}`, most doubtful first, written atomically."""
    from FoBSegmentLib.atomic import write_text_atomic

    write_text_atomic(path, json.dumps({"slices": [it.to_json() for it in items]}, indent=2) + "\n",
                      make_parents=False)
