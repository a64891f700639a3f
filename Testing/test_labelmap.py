"""Writing slice results into one segment's mask (real CHAOS labels), as the Slicer Logic does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FoBSegmentLib.evaluate.metrics import dice
from FoBSegmentLib.io.coords import take_slice
from FoBSegmentLib.labelmap import nonempty_slices, write_binary_slices


@pytest.fixture(scope="module")
def label(data_dir: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / "label_2.nii.gz")))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_write_binary_slices_changes_only_those_slices(label: np.ndarray, axis: int) -> None:
    kidney = label == 2
    slices = nonempty_slices(kidney, axis)
    assert slices, "right kidney present along every axis"
    picks = slices[len(slices) // 2 : len(slices) // 2 + 2]
    work = kidney.copy()
    masks = {s: ~take_slice(kidney, axis, s) for s in picks}  # inverted: every voxel of the slice changes
    edit = write_binary_slices(work, axis, masks)
    assert sorted(edit.before) == picks
    assert edit.changed_voxels() == sum(take_slice(kidney, axis, s).size for s in picks)
    for s in picks:
        assert np.array_equal(take_slice(work, axis, s), masks[s])
        assert np.array_equal(edit.before[s], take_slice(kidney, axis, s))
    untouched = np.ones(work.shape[axis], bool)
    untouched[picks] = False
    assert np.array_equal(np.compress(untouched, work, axis=axis), np.compress(untouched, kidney, axis=axis))
    # writing the same masks again changes nothing (the Logic then saves no undo state)
    assert write_binary_slices(work, axis, masks).changed_voxels() == 0


def test_bad_inputs_leave_the_mask_untouched(label: np.ndarray) -> None:
    liver = label == 1
    work = liver.copy()
    good = np.zeros(work.shape[1:], bool)
    with pytest.raises(ValueError, match="expected"):
        write_binary_slices(work, 0, {3: good, 4: np.zeros((5, 5), bool)})
    with pytest.raises(ValueError, match="outside"):
        write_binary_slices(work, 0, {3: good, work.shape[0]: good})
    with pytest.raises(ValueError, match="3-D"):
        write_binary_slices(work[0], 0, {0: good[0]})
    assert np.array_equal(work, liver)


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
