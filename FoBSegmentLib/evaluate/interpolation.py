"""Baselines of the propagation protocol that need no model: what a radiologist already has.

* Fill between slices: Slicer's "Fill between slices" effect, i.e. ITK's
  MorphologicalContourInterpolator (PyPI `itk-morphologicalcontourinterpolation`, the filter
  Slicer wraps as vtkITKMorphologicalContourInterpolator) run with Slicer's settings on a label
  volume that holds only the annotated slices.
* Mask copy: the annotated slice's mask copied onto every slice of the organ's range. The range is
  read from the reference label: the baseline is defined that way (it answers "how much does the
  shape change along the organ?"), so it is an optimistic baseline, not a method a user could run.
* Plain mask propagation (no learning) is the pipeline's own `neighbour` prompt source; it lives
  in `evaluate/propagation.py` because it runs through `fob segment`'s code path.

Frames: volumes are [k, j, i] arrays (SimpleITK order); `axis` is the array axis slices are taken
along (the axial axis, `io.coords.axial_axis`); slice indices count along that axis.
"""

from __future__ import annotations

import numpy as np

from FoBSegmentLib.io.coords import put_slice, take_slice


def organ_slice_range(mask: np.ndarray, axis: int) -> tuple[int, int]:
    """(first, last) inclusive slice indices along `axis` where the [k, j, i] bool `mask` is non-empty.

    Raises ValueError for an empty mask.
    """
    m = np.asarray(mask, bool)
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(m.any(axis=other))
    if len(present) == 0:
        raise ValueError("the organ is absent from the label volume")
    return int(present[0]), int(present[-1])


def _round_half_up(values: np.ndarray) -> np.ndarray:
    # np.round rounds halves to even, which would make the picks depend on parity; a person
    # counting slices rounds halves up.
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5).astype(int)


def middle_slice(first: int, last: int) -> int:
    """The middle of an inclusive slice range (halves rounded up): the protocol's annotated slice."""
    return int(_round_half_up(np.array([(first + last) / 2.0]))[0])


def evenly_spaced_slices(first: int, last: int, count: int) -> list[int]:
    """`count` slice indices spread evenly over [first, last], both ends included.

    The ends are included because Fill between slices only interpolates between annotated slices
    and never extrapolates: a user who wants the whole organ annotates its top and bottom slice.
    Fewer indices come back when the range is shorter than `count`.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if last < first:
        raise ValueError(f"empty slice range {first}..{last}")
    if count == 1:
        return [middle_slice(first, last)]
    picks = _round_half_up(np.linspace(first, last, count))
    return sorted({int(p) for p in picks})


def annotated_nonempty(mask: np.ndarray, axis: int, index: int) -> int:
    """`index` if the mask's slice there is non-empty, else the nearest non-empty slice (lower on ties).

    A label can have a gap inside its range (e.g. a kidney's pole splits from a slice to the next);
    a person would annotate the nearest slice that shows the organ.
    """
    m = np.asarray(mask, bool)
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(m.any(axis=other))
    if len(present) == 0:
        raise ValueError("the organ is absent from the label volume")
    return int(present[np.argmin(np.abs(present - index))])


def morphological_contour_interpolation(
    seed: np.ndarray, axis: int | None = None, heuristic_alignment: bool = True
) -> np.ndarray:
    """ITK's MorphologicalContourInterpolator on a [k, j, i] label volume of annotated slices.

    seed: [k, j, i] integer labels, non-zero only on annotated slices.
    axis: array axis to interpolate along, or None for every axis, which is what Slicer's
        Fill between slices does (vtkITKMorphologicalContourInterpolator's defaults: Axis -1,
        HeuristicAlignment on, UseDistanceTransform off, cross structuring element). With only
        axial slices annotated the other axes contribute nothing (no gap between labelled slices).
    Returns [k, j, i] uint8 labels with the empty slices between annotated ones filled.
    """
    import itk

    # Measured with itk-morphologicalcontourinterpolation 2.1.2 / itk 5.4.7: with ITK's default
    # thread pool the filter corrupts the heap (the process aborts with "malloc(): unaligned fastbin
    # chunk" later or at exit), also with SetNumberOfWorkUnits(1); with the global pool limited to
    # one thread before the first filter is built it is stable, and the labels are identical.
    # This only affects ITK-Python filters (SimpleITK keeps its own pool).
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
    itk.MultiThreaderBase.SetGlobalMaximumNumberOfThreads(1)
    arr = np.ascontiguousarray(np.asarray(seed).astype(np.uint8))
    image = itk.image_from_array(arr)
    interp = itk.MorphologicalContourInterpolator.New(image)
    # ITK counts axes (i, j, k); numpy arrays are [k, j, i].
    interp.SetAxis(-1 if axis is None else 2 - int(axis))
    interp.SetHeuristicAlignment(bool(heuristic_alignment))
    interp.SetUseDistanceTransform(False)
    interp.SetUseBallStructuringElement(False)
    interp.SetNumberOfWorkUnits(1)
    interp.Update()
    return np.asarray(itk.array_from_image(interp.GetOutput()), dtype=np.uint8).copy()


def fill_between_slices(
    reference: np.ndarray, axis: int, count: int, interpolate: bool = True
) -> tuple[np.ndarray, list[int]]:
    """Slicer's Fill between slices from `count` reference slices spread evenly over the organ's range.

    reference: [k, j, i] bool organ mask (the slices a person would have annotated are taken from it).
    interpolate: False returns only the annotated slices (the seeds), without running ITK.
    Returns ([k, j, i] bool interpolated mask, the annotated slice indices).
    """
    ref = np.asarray(reference, bool)
    first, last = organ_slice_range(ref, axis)
    picks = sorted({annotated_nonempty(ref, axis, z) for z in evenly_spaced_slices(first, last, count)})
    seed = np.zeros(ref.shape, np.uint8)
    for z in picks:
        put_slice(seed, axis, z, take_slice(ref, axis, z))
    if len(picks) == 1 or not interpolate:
        # Nothing to interpolate between; MCI would return the single slice unchanged.
        return seed.astype(bool), picks
    return morphological_contour_interpolation(seed, axis=None) > 0, picks


def copy_mask(
    annotated_mask: np.ndarray, shape: tuple[int, int, int], axis: int, slice_range: tuple[int, int]
) -> np.ndarray:
    """The (H, W) bool annotated mask repeated on every slice of the inclusive `slice_range`.

    shape: the [k, j, i] volume shape; returns a [k, j, i] bool volume, empty outside the range.
    """
    out = np.zeros(shape, bool)
    m = np.asarray(annotated_mask, bool)
    first, last = slice_range
    if not 0 <= first <= last < shape[axis]:
        raise ValueError(f"slice range {first}..{last} is outside 0..{shape[axis] - 1}")
    for z in range(first, last + 1):
        put_slice(out, axis, z, m)
    return out
