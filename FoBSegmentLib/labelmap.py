"""MRML-free helpers for writing slice results into label volumes, with undo.

Frames: volumes are numpy arrays indexed [k, j, i]; slices are taken along one array axis with
`FoBSegmentLib.io.coords.take_slice` (rows/cols as `slice_axes`), so a slice mask is (H, W) [row, col].

A multi-segment label array holds one integer value per segment (0 = empty). Writing segment `value`
into a slice changes only voxels of that slice that either hold `value` (cleared where the new mask is
off) or are switched on by the new mask; voxels of other segments are kept unless `overwrite_others`.
Every write returns a `LabelEdit` holding exactly the previous contents of the touched slices, so it
can be undone (`LabelHistory` keeps one edit per user action: a batch of slices is one undo step).
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

    @property
    def slices(self) -> list[int]:
        return sorted(self.before)

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


def merge_slice(
    current: np.ndarray, mask: np.ndarray, value: int, overwrite_others: bool = False
) -> np.ndarray:
    """New contents of one slice of a multi-segment label: segment `value` := `mask`, others kept.

    current: (H, W) integer label slice; mask: (H, W) bool. Returns a new (H, W) array (same dtype).
    """
    if value <= 0:
        raise ValueError(f"segment label value must be positive, got {value}")
    cur = np.asarray(current)
    m = np.asarray(mask, dtype=bool)
    out = cur.copy()
    out[(cur == value) & ~m] = 0
    writable = m if overwrite_others else m & ((cur == 0) | (cur == value))
    out[writable] = value
    return out


def write_segment_slices(
    label: np.ndarray,
    axis: int,
    masks: dict[int, np.ndarray],
    value: int,
    overwrite_others: bool = False,
) -> LabelEdit:
    """Write (H, W) masks of segment `value` into slices of `label` (in place) and return the edit.

    Validates every slice before writing anything, so a bad mask leaves `label` untouched.
    """
    checked = {int(k): _check_slice_mask(label, axis, int(k), m) for k, m in masks.items()}
    edit = LabelEdit(axis=axis)
    for k, m in sorted(checked.items()):
        before = take_slice(label, axis, k).copy()
        after = merge_slice(before, m, value, overwrite_others)
        put_slice(label, axis, k, after)
        edit.before[k] = before
        edit.after[k] = after
    return edit


def write_binary_slices(volume_mask: np.ndarray, axis: int, masks: dict[int, np.ndarray]) -> LabelEdit:
    """Replace slices of a one-segment bool [k, j, i] mask (in place) and return the edit."""
    checked = {int(k): _check_slice_mask(volume_mask, axis, int(k), m) for k, m in masks.items()}
    edit = LabelEdit(axis=axis)
    for k, m in sorted(checked.items()):
        edit.before[k] = take_slice(volume_mask, axis, k).copy()
        put_slice(volume_mask, axis, k, m)
        edit.after[k] = m.copy()
    return edit


def undo_edit(label: np.ndarray, edit: LabelEdit) -> None:
    """Restore the slices an edit changed (in place)."""
    for k, before in edit.before.items():
        put_slice(label, edit.axis, k, before)


def redo_edit(label: np.ndarray, edit: LabelEdit) -> None:
    """Re-apply an undone edit (in place)."""
    for k, after in edit.after.items():
        put_slice(label, edit.axis, k, after)


class LabelHistory:
    """Undo/redo of slice edits on one label array; one entry per user action, capped at `max_states`.

    Stores only the touched slices (not whole volumes), so a 200-slice propagation costs about
    2 x 200 slices of memory, not 2 x the volume per click.
    """

    def __init__(self, label: np.ndarray, max_states: int = 20) -> None:
        self.label = label
        self.max_states = int(max_states)
        self._undo: list[LabelEdit] = []
        self._redo: list[LabelEdit] = []

    def apply(self, axis: int, masks: dict[int, np.ndarray], value: int, overwrite_others: bool = False) -> LabelEdit:
        edit = write_segment_slices(self.label, axis, masks, value, overwrite_others)
        self._undo.append(edit)
        del self._undo[: -self.max_states]
        self._redo.clear()
        return edit

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> LabelEdit:
        if not self._undo:
            raise ValueError("nothing to undo")
        edit = self._undo.pop()
        undo_edit(self.label, edit)
        self._redo.append(edit)
        return edit

    def redo(self) -> LabelEdit:
        if not self._redo:
            raise ValueError("nothing to redo")
        edit = self._redo.pop()
        redo_edit(self.label, edit)
        self._undo.append(edit)
        return edit


def nonempty_slices(mask: np.ndarray, axis: int) -> list[int]:
    """Indices along `axis` where a [k, j, i] mask has any voxel set (the annotated slices)."""
    slice_axes(axis)
    m = np.asarray(mask)
    other = tuple(a for a in (0, 1, 2) if a != axis)
    return [int(k) for k in np.flatnonzero(m.any(axis=other))]

