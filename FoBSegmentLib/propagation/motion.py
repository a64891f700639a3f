"""The organ's motion between neighbouring slices: for the shape prior of a chain's next step, and
for how well a result's slices agree with their neighbours (the review ranking's sign of error).

Each step of a chain draws its prompts and shape prior from the previous slice's mask. From slice to
slice an organ moves and turns (a liver's lobe swings medially, a kidney slides down along the
psoas), and a prior left where it was makes the graph cut pay for every pixel the organ moved, so
the chain lags behind it. OpenCV's DIS optical flow between the two slices says where each pixel of
the next slice lies on the previous one, and the previous mask is carried along it (docs/RESULTS.md,
"Tuning notes", `moved_prior`). Once the motion is taken out an organ changes little from one slice to
the next, so a slice whose mask its neighbours' moved masks do not predict is likely wrong there
(`agreements`, read by `review.review_ranking`; tuning-notes row "review ranking").

Frames: slices (H, W) (or (H, W, 3), taken as their mean) float in [0, 1], indexed [row, col]; the
flow's two channels are (dx, dy) = (column, row) pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from FoBSegmentLib.io.coords import take_slice
from FoBSegmentLib.labelmap import dice
from FoBSegmentLib.morphology import crop_box

# A moved mask keeping less than this share of the mask's area was carried off the organ (the flow
# lost it on a blank or noisy slice): the mask stays where it was.
KEPT_AREA = 0.5


def moves_prior(config: Any, segmenter: Any) -> bool:
    """Whether a chain under `config` (`PropagationConfig`) with `segmenter` moves its shape prior
    (`moved_prior`): only where the prompts carry a prior the segmenter uses (graphcut). The chain
    adds its own exceptions (tip chains, another patient's support: `neighbour._chain`)."""
    return bool(config.moved_prior and config.shape_prior and getattr(segmenter, "uses_prior_mask", False))


def _grey8(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image, np.float32)
    if a.ndim == 3:
        a = a.mean(axis=2)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def move_mask(mask: np.ndarray, image_from: np.ndarray, image_to: np.ndarray) -> np.ndarray:
    """`mask` ((H, W) bool, on slice `image_from`) carried onto slice `image_to` by the dense motion
    between the two (DIS optical flow, OpenCV's medium preset): each pixel of `image_to` takes the
    mask's value where the flow says it came from. Deterministic for the same slices. Returns the
    mask unmoved when the moved one keeps less than `KEPT_AREA` of its area."""
    import cv2

    m = np.asarray(mask, bool)
    if not m.any():
        return m.copy()
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    # to(x) ~ from(x + flow(x)): sampling the mask at x + flow pulls it onto `image_to`'s grid.
    flow = dis.calc(_grey8(image_to), _grey8(image_from), None)
    h, w = m.shape
    cols, rows = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    moved = cv2.remap(m.astype(np.float32), cols + flow[..., 0], rows + flow[..., 1], cv2.INTER_LINEAR,
                      borderMode=cv2.BORDER_CONSTANT, borderValue=0.0) > 0.5
    return moved if moved.sum() >= KEPT_AREA * m.sum() else m.copy()


# The neighbour agreement's flow is computed on the organ's box grown by this many pixels on each
# side (the flow needs context around the organ; the rest of the slice costs time and says nothing).
AGREEMENT_MARGIN = 24


def neighbour_agreement(mask: np.ndarray, image: np.ndarray, neighbour_mask: np.ndarray,
                        neighbour_image: np.ndarray) -> float | None:
    """How well a slice's mask ((H, W) bool on `image`) agrees with its neighbour's mask carried onto
    it by the motion between the two slices: Dice in [0, 1] (0 when only one of the two shows the
    organ); None when neither does. Computed on the box of both masks grown by `AGREEMENT_MARGIN`."""
    m, n = np.asarray(mask, bool), np.asarray(neighbour_mask, bool)
    box = crop_box(m | n, AGREEMENT_MARGIN)
    if box is None:
        return None
    moved = move_mask(n[box], np.asarray(neighbour_image)[box], np.asarray(image)[box])
    return dice(moved, m[box])


def agreements(mask: np.ndarray, image: np.ndarray, axis: int,
               within: tuple[int, int] | None = None) -> dict[int, float]:
    """Slice index along `axis` -> mean `neighbour_agreement` of the slice's mask with the masks of
    the slices before and after it, for every slice where the organ is on it or on a neighbour
    (mask [k, j, i] bool; image [k, j, i] float in [0, 1] or [k, j, i, 3]). within: the inclusive
    range of slices that were segmented (`--slices`); a slice outside it is no neighbour (its empty
    mask says nothing about the organ)."""
    m = np.asarray(mask, bool)
    n = m.shape[axis]
    lo, hi = within if within is not None else (0, n - 1)
    on = [bool(take_slice(m, axis, z).any()) for z in range(n)]
    out: dict[int, float] = {}
    for z in range(lo, hi + 1):
        values = [neighbour_agreement(take_slice(m, axis, z), take_slice(image, axis, z),
                                      take_slice(m, axis, w), take_slice(image, axis, w))
                  for w in (z - 1, z + 1) if lo <= w <= hi and (on[z] or on[w])]
        if values:
            out[z] = float(np.mean(values))
    return out
