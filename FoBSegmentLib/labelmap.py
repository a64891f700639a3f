"""MRML-free helpers for writing slice results into one segment's mask.

Frames: volumes are numpy arrays indexed [k, j, i]; slices are taken along one array axis with
`FoBSegmentLib.io.coords.take_slice` (rows/cols as `slice_axes`), so a slice mask is (H, W) [row, col].

A write returns a `LabelEdit` with the previous and new contents of the touched slices; the Logic uses
it to skip writes (and undo states) that change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from FoBSegmentLib.io.coords import put_slice, slice_axes, take_slice


@dataclass
class LabelEdit:
    """Previous and new contents of the slices one action changed (along `axis`)."""

    axis: int
    before: dict[int, np.ndarray] = field(default_factory=dict)
    after: dict[int, np.ndarray] = field(default_factory=dict)

    def changed_voxels(self) -> int:
        return int(sum(np.count_nonzero(self.before[k] != self.after[k]) for k in self.before))


def _check_slice_mask(label: np.ndarray, axis: int, index: int, mask: np.ndarray) -> np.ndarray:
    if label.ndim != 3:
        raise ValueError(f"label volume must be 3-D [k, j, i], got shape {label.shape}")
    slice_axes(axis)
    if not 0 <= index < label.shape[axis]:
        raise ValueError(f"slice {index} is outside 0..{label.shape[axis] - 1} along axis {axis}")
    m = np.asarray(mask)
    expected = take_slice(label, axis, index).shape
    if m.shape != expected:
        raise ValueError(f"slice {index} mask has shape {m.shape}, expected {expected} for axis {axis}")
    return m.astype(bool)


def write_binary_slices(volume_mask: np.ndarray, axis: int, masks: dict[int, np.ndarray]) -> LabelEdit:
    """Replace slices of a one-segment bool [k, j, i] mask (in place) and return the edit.

    Validates every slice before writing anything, so a bad mask leaves `volume_mask` untouched.
    """
    checked = {int(k): _check_slice_mask(volume_mask, axis, int(k), m) for k, m in masks.items()}
    edit = LabelEdit(axis=axis)
    for k, m in sorted(checked.items()):
        edit.before[k] = take_slice(volume_mask, axis, k).copy()
        put_slice(volume_mask, axis, k, m)
        edit.after[k] = m.copy()
    return edit


def nonempty_slices(mask: np.ndarray, axis: int) -> list[int]:
    """Indices along `axis` where a [k, j, i] mask has any voxel set (the annotated slices)."""
    slice_axes(axis)
    m = np.asarray(mask)
    other = tuple(a for a in (0, 1, 2) if a != axis)
    return [int(k) for k in np.flatnonzero(m.any(axis=other))]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """2TP / (2TP + FP + FN) of two boolean arrays of the same shape; 1.0 when both are empty."""
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    if p.shape != g.shape:
        raise ValueError(f"dice: shapes differ, {p.shape} vs {g.shape}")
    denom = int(p.sum()) + int(g.sum())
    return 1.0 if denom == 0 else 2.0 * int(np.logical_and(p, g).sum()) / denom
