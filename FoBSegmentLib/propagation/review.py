"""Which slice to check next: a ranking of the segmented slices by how much of the result's likely
error a correction there would remove, computed from the image and the result only (never from a
reference).

The likely error of a slice w is estimated as

    err(w) = area(w) * (1 + doubt(w)) * g(d(w)),    g(d) = 1 - exp(-d / L)

where d(w) is its distance in slices to the nearest annotated slice (a chain drifts with every
step, and the drift saturates), L a sixth of the organ's segmented extent (at least 2 slices), area
its segmented pixels (3D Dice counts voxels: a large cross-section holds more of the error than a
tip), and doubt(w) in [0, 1] the slice's own signs:
    shape      how much its area departs from its neighbours' (log ratio to their mean);
    look       the segmenter's own doubt (1 - its score: for graphcut the share of the mask whose
               appearance does not favour the organ) and the review flags the chain raised;
    end        the first and last segmented slices (where the organ ends is the chain's guess).
Annotating slice z resets d to |w - z| for the slices nearer z than to any annotation, so its
value is the error it removes, sum_w err(w) * (1 - g(min(d(w), |w - z|)) / g(d(w))); the score is
that value as a share of the whole estimated error, in [0, 1]. The ranking therefore prefers the
middle of a long unannotated stretch of large cross-sections, and among comparable stretches the
one whose slices look doubtful.

Frames: slice indices along the propagation's axis (the same numbers as `--slices`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from FoBSegmentLib.propagation.types import PropagationResult

SEGMENTED = ("neighbour", "interpolated", "fob", "edited", "prompts-in")
DOUBT_WEIGHTS = {"shape": 0.4, "look": 0.4, "end": 0.2}


@dataclass
class ReviewItem:
    """One slice of the ranking: index along the axis, score in [0, 1] (the share of the estimated
    error a correction there removes), why."""

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


def _doubt_signs(result: PropagationResult, z: int, areas: dict[int, int], ends: tuple[int, int]) -> dict[str, float]:
    rep = result.slices[z]
    return {
        "shape": _shape_doubt(areas, z),
        "look": min(1.0, (1.0 - rep.score if rep.score is not None else 0.5)
                    + 0.5 * sum(f.startswith(("review:", "area-", "retried")) for f in rep.flags)),
        "end": 1.0 if z in ends else 0.0,
    }


def review_ranking(result: PropagationResult) -> list[ReviewItem]:
    """Every segmented slice that is not annotated, the most error removed first (ties: lower index)."""
    reports = result.slices
    annotated = np.array(sorted(z for z, r in reports.items() if r.source == "annotation"), int)
    areas = {z: r.area for z, r in reports.items()}
    segmented = sorted(z for z, r in reports.items() if r.source in SEGMENTED and r.area > 0)
    if not segmented:
        return []
    organ = np.array(sorted(set(segmented) | {int(z) for z in annotated if areas[z] > 0}), int)
    ends = (int(organ[0]), int(organ[-1]))
    extent = max(1, ends[1] - ends[0])
    scale = max(2.0, extent / 6.0)

    def g(d: np.ndarray) -> np.ndarray:
        return 1.0 - np.exp(-np.asarray(d, float) / scale)

    signs = {int(z): _doubt_signs(result, int(z), areas, ends) for z in segmented}
    doubt = np.array([sum(DOUBT_WEIGHTS[k] * v for k, v in signs[int(w)].items()) if int(w) in signs else 0.0
                      for w in organ])
    dist = (np.abs(organ[:, None] - annotated[None, :]).min(axis=1) if annotated.size
            else np.full(organ.shape, float(extent)))
    weight = np.array([areas[int(w)] for w in organ], float) * (1.0 + doubt)
    err = weight * g(dist)
    total = float(err.sum()) or 1.0
    items = []
    for z in segmented:
        removed = err - weight * g(np.minimum(dist, np.abs(organ - z)))
        share = float(removed.sum()) / total
        own = signs[z]
        top = max(own, key=lambda k: DOUBT_WEIGHTS[k] * own[k])
        d_z = int(dist[np.searchsorted(organ, z)])
        if DOUBT_WEIGHTS[top] * own[top] >= 0.2:
            rep = reports[z]
            why = {
                "shape": "its area departs from its neighbours'",
                "look": "; ".join(rep.flags) or (f"the segmenter's score is {rep.score:.2f}" if rep.score is not None
                                                  else "the segmenter gave no score"),
                "end": "the organ's end as the chain found it",
            }[top]
            reason = f"{why}; {d_z} slices from the nearest annotation"
        else:
            reason = f"{d_z} slices from the nearest annotation"
        items.append(ReviewItem(int(z), min(1.0, max(0.0, share)),
                                f"{reason} (a correction here removes ~{100 * share:.0f}% of the estimated error)"))
    return sorted(items, key=lambda it: (-it.score, it.index))


def write_review(path: str | os.PathLike, items: list[ReviewItem]) -> None:
    """`{"slices": [{"index", "score", "reason"}, ...]}`, most doubtful first, written atomically."""
    from FoBSegmentLib.atomic import write_text_atomic

    write_text_atomic(path, json.dumps({"slices": [it.to_json() for it in items]}, indent=2) + "\n",
                      make_parents=False)
