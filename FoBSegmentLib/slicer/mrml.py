"""MRML <-> numpy: parent transforms, volume geometry and voxels, one segment's mask read and written.

Frames:
    [k, j, i]   numpy arrays of volumes and masks (as `slicer.util.arrayFromVolume` returns them).
    IJK         voxel index (i, j, k) of a volume; its IJKToRAS maps it to the volume's local RAS.
    local RAS   a node's own frame; world RAS = parent_to_world @ local RAS (linear parent transforms only).
Matrices are only read from MRML here; the conversions themselves are in `FoBSegmentLib.io.coords`.

`import slicer` is Slicer's module (or the slicer-core wheel's), not this package: imports are absolute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from FoBSegmentLib.io.coords import (
    Geometry,
    geometry_from_ijk_to_ras,
    ijk_to_slice_xy,
    ijk_to_world_ras,
    slice_axes,
    slice_xy_to_ijk,
    world_ras_to_ijk,
)


def matrix_from_vtk(vtk_matrix) -> np.ndarray:
    """A vtkMatrix4x4 as a (4, 4) float64 array."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtk_matrix(matrix: np.ndarray):
    """A (4, 4) array as a vtkMatrix4x4."""
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    return m


def parent_to_world(node) -> np.ndarray | None:
    """4x4 from a transformable node's local RAS to world RAS, None when it has no parent transform.

    Raises ValueError for a non-linear parent transform (a voxel slice would not stay planar).
    """
    tnode = node.GetParentTransformNode()
    if tnode is None:
        return None
    if not tnode.IsTransformToWorldLinear():
        raise ValueError(
            f"{node.GetName()} is under a non-linear transform ({tnode.GetName()}); harden or remove it first"
        )
    m = vtk.vtkMatrix4x4()
    tnode.GetMatrixTransformToWorld(m)
    return matrix_from_vtk(m)


def volume_geometry(volume) -> tuple[Geometry, np.ndarray | None]:
    """(Geometry in the volume's local frame, parent_to_world 4x4 or None) of a scalar volume node."""
    image = volume.GetImageData() if volume is not None else None
    if image is None:
        raise ValueError("the volume has no image data")
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return geometry_from_ijk_to_ras(matrix_from_vtk(m), image.GetDimensions()), parent_to_world(volume)


def resolve_axis(volume, axis: int | None = None) -> int:
    """The array axis of [k, j, i] to slice along: `axis` if given (>= 0), else the engine's rule
    (`job.default_slice_axis`, the same as `fob segment`'s)."""
    from FoBSegmentLib.job import default_slice_axis

    if axis is not None and axis >= 0:
        slice_axes(axis)
        return int(axis)
    geom, _ = volume_geometry(volume)
    return default_slice_axis(geom)[0]


def engine_volume(volume):
    """The node as the engine's `io.volumes.Volume` (what `fob segment` reads from a file): its voxels
    as float32 [k, j, i] (a single-slice colour image as (H, W, 3)), its geometry in the node's local
    frame (LPS inside `Geometry`), its name as path; no modality hint (like a NIfTI file)."""
    return engine_volume_source(volume)()


def engine_volume_source(volume):
    """`engine_volume` in two halves: the MRML reads (geometry, one copy of the voxels in their own type)
    now, on the calling (main) thread; the float32 conversion in the returned function, on any thread."""
    from pathlib import Path

    from FoBSegmentLib.io.volumes import Volume

    geom, _ = volume_geometry(volume)
    arr = volume_array(volume)
    name = Path(volume.GetName())

    def build() -> Volume:
        if arr.ndim == 4 and arr.shape[0] == 1 and arr.shape[-1] == 3:
            return Volume(arr[0].astype(np.float32), geom, name, "rgb", is_2d=True)
        a = arr[..., 0] if arr.ndim == 4 else arr
        return Volume(a.astype(np.float32), geom, name, None, is_2d=a.shape[0] == 1)

    return build


def slice_at_world_point(volume, ras_world: tuple[float, float, float], axis: int) -> int:
    """Nearest slice index along `axis` to a world RAS point (e.g. a slice view's centre).

    Only the position along the axis matters: a panned view's centre may lie beside the volume. Raises
    ValueError when that slice is not in the volume.
    """
    geom, p2w = volume_geometry(volume)
    ijk = world_ras_to_ijk(np.asarray([ras_world], float), geom, p2w)
    _, along = ijk_to_slice_xy(ijk, axis)
    index = int(np.floor(along[0] + 0.5))
    if not 0 <= index < geom.array_shape[axis]:
        raise ValueError(f"the slice view is not on the volume (slice {index} of 0..{geom.array_shape[axis] - 1})")
    return index


def slice_center_world(volume, axis: int, index: int) -> np.ndarray:
    """World RAS (3,) of the centre of slice `index` along `axis` (where a view jumps to show it)."""
    geom, p2w = volume_geometry(volume)
    rows, cols = slice_axes(axis)
    shape = geom.array_shape
    centre_xy = np.array([[(shape[cols] - 1) / 2.0, (shape[rows] - 1) / 2.0]])  # (x, y) = (column, row)
    return ijk_to_world_ras(slice_xy_to_ijk(centre_xy, axis, int(index)), geom, p2w)[0]


def view_slice(volume, views: dict[str, np.ndarray], axis: int, preferred: str | None = None,
               tolerance_deg: float = 1.0) -> tuple[str, int]:
    """The slice shown by a 2D view that shows voxel slices along `axis`, e.g. the view the user works in.

    views: {view name: its SliceToRAS 4x4 (world RAS; column 2 is the view's normal, column 3 a point of
    the view's plane)}; preferred: the view to take when it qualifies (the one the user last used), else
    the first that does. Returns (view name, slice index). Raises ValueError when no view's plane is a
    voxel slice along `axis` (e.g. all views are oblique to it) or the slice is outside the volume.
    """
    geom, p2w = volume_geometry(volume)
    # the axis' world direction: from the centre of slice 0 to the centre of slice 1
    last = min(1, geom.array_shape[axis] - 1)
    along = slice_center_world(volume, axis, last) - slice_center_world(volume, axis, 0)
    if not np.any(along):  # a single slice: its normal from the slice's (x, y) directions
        pts = ijk_to_world_ras(slice_xy_to_ijk(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), axis, 0), geom, p2w)
        along = np.cross(pts[1] - pts[0], pts[2] - pts[0])
    along = along / np.linalg.norm(along)
    names = ([preferred] if preferred in views else []) + [n for n in views if n != preferred]
    cos_min = np.cos(np.deg2rad(tolerance_deg))
    for name in names:
        m = np.asarray(views[name], float)
        normal = m[:3, 2] / np.linalg.norm(m[:3, 2])
        if abs(float(normal @ along)) >= cos_min:
            return name, slice_at_world_point(volume, tuple(m[:3, 3]), axis)
    axis_name = "kji"[axis]
    raise ValueError(
        f"no slice view shows voxel slices along {axis_name}: rotate a view to the volume's planes "
        "(slice view menu > Rotate to volume plane) or choose another slice axis"
    )


def volume_array(volume) -> np.ndarray:
    """A copy of the volume's voxels as a [k, j, i] array (first component for multi-component images)."""
    image = volume.GetImageData()
    if image is None:
        raise ValueError("the volume has no image data")
    ni, nj, nk = image.GetDimensions()
    comps = image.GetNumberOfScalarComponents()
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    arr = arr.reshape(nk, nj, ni, comps) if comps > 1 else arr.reshape(nk, nj, ni)
    return np.array(arr, copy=True)


def image_from_array(array: np.ndarray, image) -> None:
    """Fill a vtkImageData (or vtkOrientedImageData) with a [k, j, i] array (deep copy)."""
    arr = np.ascontiguousarray(array)
    nk, nj, ni = arr.shape[:3]
    vtk_arr = numpy_support.numpy_to_vtk(arr.reshape(-1), deep=True)
    image.SetDimensions(ni, nj, nk)
    image.GetPointData().SetScalars(vtk_arr)


def relative_transform(target_node, source_node) -> np.ndarray:
    """4x4 from source_node's local RAS to target_node's local RAS (via world RAS)."""
    src = parent_to_world(source_node)
    dst = parent_to_world(target_node)
    m = np.eye(4) if src is None else src
    return m if dst is None else np.linalg.inv(dst) @ m


def _segment_labelmap(segmentation, segment_id: str):
    """(the segment's layer as vtkOrientedImageData, its label value), None for an empty segment."""
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise ValueError(f"segment {segment_id!r} is not in {segmentation.GetName()}")
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation, segment_id, labelmap, False
    ):
        raise ValueError(f"segment {segment_id!r} has no binary labelmap representation")
    ext = labelmap.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return None
    return labelmap, segment.GetLabelValue()


def segment_mask(segmentation, segment_id: str, volume) -> np.ndarray:
    """The segment as a bool [k, j, i] array on `volume`'s voxel grid (nearest-neighbour resampled;
    different parent transforms of the two nodes are taken into account)."""
    geom, _ = volume_geometry(volume)
    out = np.zeros(geom.array_shape, bool)
    found = _segment_labelmap(segmentation, segment_id)
    if found is None:
        return out
    labelmap, label_value = found
    to_world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(to_world)
    # bring the labelmap into the volume's local frame, then resample onto the volume's grid
    labelmap.SetImageToWorldMatrix(vtk_matrix(relative_transform(volume, segmentation) @ matrix_from_vtk(to_world)))
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, geom.size[0] - 1, 0, geom.size[1] - 1, 0, geom.size[2] - 1)
    reference.SetImageToWorldMatrix(vtk_matrix(geom.ijk_to_ras_matrix()))
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False, True
    )
    rext = resampled.GetExtent()
    if rext[1] < rext[0]:
        return out
    dims = resampled.GetDimensions()
    vals = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    # The resampled image may cover only part of the volume (padImage keeps it in the reference extent).
    i0, j0, k0 = max(rext[0], 0), max(rext[2], 0), max(rext[4], 0)
    i1, j1, k1 = min(rext[1], geom.size[0] - 1), min(rext[3], geom.size[1] - 1), min(rext[5], geom.size[2] - 1)
    if i1 < i0 or j1 < j0 or k1 < k0:
        return out
    # The labelmap returned is the segment's whole layer: segments sharing it have other label values.
    out[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1] = (
        vals[k0 - rext[4] : k1 - rext[4] + 1, j0 - rext[2] : j1 - rext[2] + 1, i0 - rext[0] : i1 - rext[0] + 1]
        == label_value
    )
    return out


def set_segment_mask(segmentation, segment_id: str, volume, mask: np.ndarray) -> None:
    """Replace the segment's voxels by a bool [k, j, i] mask on `volume`'s grid; other segments are
    not modified (where they overlap, Slicer keeps both by moving the segment to its own layer)."""
    geom, _ = volume_geometry(volume)
    m = np.asarray(mask, bool)
    if m.shape != geom.array_shape:
        raise ValueError(f"mask shape {m.shape} does not match the volume's {geom.array_shape}")
    image = slicer.vtkOrientedImageData()
    image_from_array(m.astype(np.uint8), image)
    to_seg = relative_transform(segmentation, volume) @ geom.ijk_to_ras_matrix()
    image.SetImageToWorldMatrix(vtk_matrix(to_seg))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    # Only this segment may be overwritten: where the new mask overlaps another segment of a shared
    # layer, Slicer moves this segment to a layer of its own (tested: the other keeps every voxel).
    if not logic.SetBinaryLabelmapToSegment(
        image, segmentation, segment_id, logic.MODE_REPLACE, image.GetExtent(), False, (segment_id,)
    ):
        raise ValueError(f"could not write segment {segment_id!r} of {segmentation.GetName()}")


def segmentation_fingerprint(segmentation) -> str:
    """A fingerprint of a segmentation's binary labelmaps: its segment ids and label values, and each
    layer's identity and modification time. Painting, erasing, adding or removing a segment, an undo of
    the Segment Editor: every change of a labelmap changes it; display settings do not. It is cheap (no
    voxel is read), so it can be taken after each live slice; a labelmap marked modified without a
    changed voxel also counts as a change, the safe side for `FoBSegmentLogic.undo`."""
    seg = segmentation.GetSegmentation()
    rep = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    parts = [f"{seg.GetNthSegmentID(n)}={seg.GetNthSegment(n).GetLabelValue()}" for n in range(seg.GetNumberOfSegments())]
    for layer in range(seg.GetNumberOfLayers(rep)):
        image = seg.GetLayerDataObject(layer, rep)
        parts.append("-" if image is None else f"{image.GetAddressAsString('vtkObject')}@{image.GetMTime()}")
    return ";".join(parts)


def set_segment_slice(segmentation, segment_id: str, volume, axis: int, index: int, mask: np.ndarray) -> None:
    """Replace one slice of a segment by an (H, W) bool mask (`take_slice`'s frame along `axis` of the
    volume's [k, j, i] grid); the rest of the segment and the other segments are not touched.

    Only that slice's extent is sent to Slicer, so a live propagation's per-slice write costs one slice,
    not a read and a rewrite of the whole volume.
    """
    geom, _ = volume_geometry(volume)
    slab = np.expand_dims(np.asarray(mask, bool), axis)  # inverse of np.take(..., axis): the slice as a slab
    shape = list(geom.array_shape)
    shape[axis] = 1
    if slab.shape != tuple(shape):
        raise ValueError(f"slice mask shape {np.asarray(mask).shape} does not match the volume's slices along axis {axis}")
    if not 0 <= index < geom.array_shape[axis]:
        raise ValueError(f"slice {index} is outside 0..{geom.array_shape[axis] - 1} along axis {axis}")
    lo = [0, 0, 0]  # (k, j, i) offset of the slab
    lo[axis] = int(index)
    nk, nj, ni = slab.shape
    image = slicer.vtkOrientedImageData()
    image.SetExtent(lo[2], lo[2] + ni - 1, lo[1], lo[1] + nj - 1, lo[0], lo[0] + nk - 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(slab.astype(np.uint8).reshape(-1), deep=True))
    image.SetImageToWorldMatrix(vtk_matrix(relative_transform(segmentation, volume) @ geom.ijk_to_ras_matrix()))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    # MODE_REPLACE would replace the whole segment by this one slice; min then max within the slab's
    # extent clears what the mask clears and sets what it sets, and leaves every other voxel as it was.
    for mode in (logic.MODE_MERGE_MIN, logic.MODE_MERGE_MAX):
        if not logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, mode, image.GetExtent(), False,
                                                (segment_id,)):
            raise ValueError(f"could not write slice {index} of segment {segment_id!r} of {segmentation.GetName()}")


@contextmanager
def segment_editor_logic(masking, segmentation, volume) -> Iterator[Any]:
    """A `vtkSlicerSegmentEditorLogic` that edits `segmentation` with the Segment Editor's masking settings
    `masking` (a `parameters.Masking`), on a private editor node: the user's own Segment Editor node and its
    source volume are not touched. Yields None when this Slicer has no such class (the caller then writes
    without masking). The private node has to be in the scene while it is used (the logic finds the mask
    segment through it); it is hidden, not saved, and removed afterwards."""
    logic_class = getattr(slicer, "vtkSlicerSegmentEditorLogic", None)
    if logic_class is None:
        yield None
        return
    scene = segmentation.GetScene()
    node = slicer.vtkMRMLSegmentEditorNode()
    node.SetHideFromEditors(True)
    node.SetSaveWithScene(False)
    node.SetName(scene.GenerateUniqueName("FoBSegment masking"))
    scene.AddNode(node)
    try:
        if masking.mask_segment_id:
            node.SetMaskSegmentID(masking.mask_segment_id)
        node.SetMaskMode(int(masking.mask_mode))
        node.SetOverwriteMode(int(masking.overwrite_mode))
        if masking.intensity_range is not None:
            node.SetSourceVolumeIntensityMask(True)
            node.SetSourceVolumeIntensityMaskRange(float(masking.intensity_range[0]),
                                                   float(masking.intensity_range[1]))
        logic = logic_class()
        logic.SetMRMLScene(scene)
        logic.SetSegmentEditorNode(node)
        logic.SetSegmentationNode(segmentation)
        logic.SetSourceVolumeNode(volume)
        # the editable area is computed from the segments as they are now (as an effect does when it starts)
        if not (logic.ResetModifierLabelmapToDefault() and logic.UpdateMaskLabelmap()):
            raise ValueError(f"the Segment Editor's masking settings cannot be applied to {segmentation.GetName()}")
        yield logic
    finally:
        scene.RemoveNode(node)


def set_segment_slice_masked(logic, segmentation, segment_id: str, volume, axis: int, index: int,
                             mask: np.ndarray) -> None:
    """`set_segment_slice` through the Segment Editor's logic (`segment_editor_logic`): only the editable
    voxels of the slice change (editable area, editable intensity range), and the voxels set are removed
    from the other segments as "Modify other segments" says (overwrite all / visible / none)."""
    geom, _ = volume_geometry(volume)
    m = np.asarray(mask, bool)
    shape = list(geom.array_shape)
    shape[axis] = 1
    if np.expand_dims(m, axis).shape != tuple(shape):
        raise ValueError(f"slice mask shape {m.shape} does not match the volume's slices along axis {axis}")
    lo = [0, 0, 0]
    lo[axis] = int(index)
    to_seg = vtk_matrix(relative_transform(segmentation, volume) @ geom.ijk_to_ras_matrix())
    extent = (lo[2], lo[2] + shape[2] - 1, lo[1], lo[1] + shape[1] - 1, lo[0], lo[0] + shape[0] - 1)

    def slab(values: np.ndarray):
        image = slicer.vtkOrientedImageData()
        image.SetExtent(*extent)
        image.GetPointData().SetScalars(
            numpy_support.numpy_to_vtk(np.expand_dims(values, axis).astype(np.uint8).reshape(-1), deep=True))
        image.SetImageToWorldMatrix(to_seg)
        return image

    # Set mode would replace the whole segment; remove what the mask clears, then add what it sets.
    logic.ModifySegmentByLabelmap(segmentation, segment_id, slab(~m), logic.ModificationModeRemove, extent, False, False)
    logic.ModifySegmentByLabelmap(segmentation, segment_id, slab(m), logic.ModificationModeAdd, extent, False, False)
