"""Undo-safe writing of slice results into one segment of a multi-segment label array (real CHAOS labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FoBSegmentLib.evaluate.metrics import dice
from FoBSegmentLib.io.coords import take_slice
from FoBSegmentLib.labelmap import (
    LabelHistory,
    merge_slice,
    nonempty_slices,
    write_binary_slices,
    write_segment_slices,
)


@pytest.fixture(scope="module")
def label(data_dir: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / "label_2.nii.gz")))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_write_one_segment_keeps_others_and_undo_restores(label: np.ndarray, axis: int) -> None:
    arr = label.copy()
    original = label.copy()
    kidney = 2
    slices = nonempty_slices(arr == kidney, axis)
    assert slices, "right kidney present along every axis"
    picks = slices[len(slices) // 2 : len(slices) // 2 + 2]
    # new kidney masks: a box covering the old kidney plus its surroundings (overlaps the liver)
    masks = {}
    for s in picks:
        old = take_slice(arr, axis, s) == kidney
        rows, cols = np.nonzero(old)
        box = np.zeros_like(old)
        box[max(rows.min() - 15, 0) : rows.max() + 15, max(cols.min() - 15, 0) : cols.max() + 15] = True
        masks[s] = box
    hist = LabelHistory(arr)
    edit = hist.apply(axis, masks, kidney)
    assert edit.slices == picks and edit.changed_voxels() > 0
    for s, box in masks.items():
        before, after = take_slice(original, axis, s), take_slice(arr, axis, s)
        others = (before != 0) & (before != kidney)
        assert np.array_equal(after[others], before[others]), "other segments overwritten"
        assert np.all(after[box & ~others] == kidney)
        assert not np.any(after[~box] == kidney)
        assert np.any(others & box), "the test box must overlap another organ to mean anything"
    untouched = np.ones(arr.shape[axis], bool)
    untouched[picks] = False
    assert np.array_equal(np.compress(untouched, arr, axis=axis), np.compress(untouched, original, axis=axis))
    hist.undo()
    assert np.array_equal(arr, original)
    hist.redo()
    assert np.array_equal(take_slice(arr, axis, picks[0]), edit.after[picks[0]])
    assert not hist.can_redo and hist.can_undo


def test_overwrite_others_and_clear(label: np.ndarray) -> None:
    s = nonempty_slices(label == 1, 0)[5]
    cur = take_slice(label, 0, s)
    everything = np.ones_like(cur, bool)
    assert np.all(merge_slice(cur, everything, 1, overwrite_others=True) == 1)
    kept = merge_slice(cur, everything, 1)
    assert np.array_equal(kept[(cur != 0) & (cur != 1)], cur[(cur != 0) & (cur != 1)])
    cleared = merge_slice(cur, np.zeros_like(cur, bool), 1)
    assert not np.any(cleared == 1) and np.array_equal(cleared[cur != 1], cur[cur != 1])


def test_bad_inputs_leave_label_untouched(label: np.ndarray) -> None:
    arr = label.copy()
    good = np.zeros(arr.shape[1:], bool)
    with pytest.raises(ValueError, match="expected"):
        write_segment_slices(arr, 0, {3: good, 4: np.zeros((5, 5), bool)}, 1)
    with pytest.raises(ValueError, match="outside"):
        write_segment_slices(arr, 0, {3: good, arr.shape[0]: good}, 1)
    with pytest.raises(ValueError, match="positive"):
        write_segment_slices(arr, 0, {3: good}, 0)
    assert np.array_equal(arr, label)
    with pytest.raises(ValueError, match="nothing to undo"):
        LabelHistory(arr).undo()


def test_binary_slices_and_dice(label: np.ndarray) -> None:
    liver = label == 1
    work = np.zeros_like(liver)
    zs = nonempty_slices(liver, 0)
    edit = write_binary_slices(work, 0, {z: liver[z] for z in zs})
    assert dice(work, liver) == 1.0 and edit.changed_voxels() == int(liver.sum())
    half = liver.copy()
    half[zs[len(zs) // 2 :]] = False
    expected = 2 * half.sum() / (half.sum() + liver.sum())
    assert dice(half, liver) == pytest.approx(expected)
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
