"""FoBSegment's Logic over MRML nodes: everything the Slicer module does, without Qt or `slicer.app`.

It takes the scene and nodes as arguments and uses only the MRML/VTK classes that the `slicer-core`
wheel also provides, so it runs (and is tested) headless; the module's widget is a thin adapter.

Frames:
    [k, j, i]   numpy arrays of volumes and masks (as `slicer.util.arrayFromVolume` returns them).
    IJK         voxel index (i, j, k) of the input volume; slices are taken along one array axis.
    local RAS   a node's own frame; world RAS = parent_to_world @ local RAS (linear parent transforms only).
    (x, y)      (column, row) pixels of one slice, the frame of `PromptSet`.
Coordinate conversions go through `FoBSegmentLib.io.coords`; this module only reads matrices from MRML.

Prompts live in two markups point lists per target segment ("FoB <segment> background" red and
"FoB <segment> foreground" green), parented to the volume's transform, visible in 2D views only; each
point's description says its kind and slice. Points on reviewed slices are locked, so a new prediction
never moves them. Segmentation results are written into one segment only; each user action (segmenting
some slices, a propagation) saves one undo state first.

Live propagation (the widget's "Propagate volume"): the worker runs `run_propagation(job, on_slice=...)`
and queues each accepted slice; the main thread writes it with `apply_slice_result` as it arrives, so
slices appear one by one. The undo state is saved once, before the first slice is written; the final
`apply_propagation` writes the cleaned-up result without another undo state, so the run stays ONE undo
step. On cancel or error, `rollback_propagation` removes the partial result (the policy: a cancelled
run changes nothing, as before); with the Logic's own history the partial result stays available as Redo.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from FoBSegmentLib.io.coords import (
    Geometry,
    axial_axis,
    check_inside_volume,
    geometry_from_ijk_to_ras,
    ijk_to_slice_xy,
    ijk_to_world_ras,
    put_slice,
    slice_axes,
    slice_xy_to_ijk,
    take_slice,
    world_ras_to_ijk,
)
from FoBSegmentLib.io.markups import COLORS, KINDS, LABEL_PREFIX, point_description
from FoBSegmentLib.labelmap import nonempty_slices, write_binary_slices
from FoBSegmentLib.prompts import PromptSet

MODULE_NAME = "FoBSegment"
ROLE_ATTR = "FoBSegment.Role"  # "background" | "foreground"
SEGMENT_ATTR = "FoBSegment.SegmentID"
AXIS_ATTR = "FoBSegment.SliceAxis"
REVIEWED_ATTR = "FoBSegment.ReviewedSlices"  # comma-separated slice indices, on the background list
SEGMENTATION_REF = "FoBSegment.segmentation"
VOLUME_REF = "FoBSegment.volume"
NODE_REFERENCES = ("inputVolume", "segmentation", "supportVolume", "supportSegmentation")

ProgressCallback = Callable[[int, int, str], None]
CancelCheck = Callable[[], bool]
SliceCallback = Callable[[int, np.ndarray], None]


# ---------------------------------------------------------------------------------------------------
# parameters (mirrored to a vtkMRMLScriptedModuleNode so they are saved with the scene)


@dataclass
class FoBParameters:
    """The module's settings; field names equal the widget's parameterNodeWrapper fields.

    sliceAxis: array axis of [k, j, i] to slice along, -1 = the volume's axial axis.
    sliceStart / sliceStop: inclusive slice range for prediction and propagation, -1 = automatic.
    model: FoB model file, "" = the shipped default (if any); promptSource: auto | fob | neighbour.
    checkpoint: a local segmenter checkpoint chosen by the user, "" = the registry's cached download.
    segmenter: a `FoBSegmentLib.segmenters` name (graphcut, grabcut, random-walker, sam-vit-b, ..., auto).
    """

    segmentID: str = ""
    supportSegmentID: str = ""
    sliceAxis: int = -1
    sliceStart: int = -1
    sliceStop: int = -1
    model: str = ""
    checkpoint: str = ""
    promptSource: str = "auto"
    segmenter: str = "auto"
    device: str = "auto"
    numBackgroundPoints: int = 16
    numForegroundPoints: int = 4


def find_parameter_node(scene, create: bool = True):
    """The scene's FoBSegment parameter node, the one Slicer's ScriptedLoadableModuleLogic.getParameterNode
    returns (singleton tag FoBSegment, attribute ModuleName = FoBSegment); created with defaults when missing."""
    node = scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")
    if node is not None:
        return node
    nodes = scene.GetNodesByClass("vtkMRMLScriptedModuleNode")
    for n in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(n)
        if node.GetAttribute("ModuleName") == MODULE_NAME:
            return node
    if not create:
        return None
    node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
    node.UnRegister(None)  # owned by the Python variable, as in Slicer's createParameterNode
    node.SetSingletonTag(MODULE_NAME)
    node.SetName(scene.GenerateUniqueName(MODULE_NAME))
    node.SetAttribute("ModuleName", MODULE_NAME)
    write_parameters(node, FoBParameters())
    return scene.AddNode(node)


def read_parameters(node) -> FoBParameters:
    """FoBParameters from a parameter node; missing or unparsable values keep their defaults."""
    params = FoBParameters()
    for f in fields(FoBParameters):
        text = node.GetParameter(f.name)
        if not text:
            continue
        default = getattr(params, f.name)
        try:
            setattr(params, f.name, int(text) if isinstance(default, int) else str(text))
        except ValueError:
            pass
    return params


def write_parameters(node, params: FoBParameters) -> None:
    for f in fields(FoBParameters):
        node.SetParameter(f.name, str(getattr(params, f.name)))


# ---------------------------------------------------------------------------------------------------
# MRML <-> numpy


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def _vtk_matrix(matrix: np.ndarray):
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
    return _matrix(m)


def volume_geometry(volume) -> tuple[Geometry, np.ndarray | None]:
    """(Geometry in the volume's local frame, parent_to_world 4x4 or None) of a scalar volume node."""
    image = volume.GetImageData() if volume is not None else None
    if image is None:
        raise ValueError("the volume has no image data")
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return geometry_from_ijk_to_ras(_matrix(m), image.GetDimensions()), parent_to_world(volume)


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


def _image_from_array(array: np.ndarray, image) -> None:
    arr = np.ascontiguousarray(array)
    nk, nj, ni = arr.shape[:3]
    vtk_arr = numpy_support.numpy_to_vtk(arr.reshape(-1), deep=True)
    image.SetDimensions(ni, nj, nk)
    image.GetPointData().SetScalars(vtk_arr)


def _relative(target_node, source_node) -> np.ndarray:
    """4x4 from source_node's local frame to target_node's local frame (via world)."""
    src = parent_to_world(source_node)
    dst = parent_to_world(target_node)
    m = np.eye(4) if src is None else src
    return m if dst is None else np.linalg.inv(dst) @ m


def segment_mask(segmentation, segment_id: str, volume) -> np.ndarray:
    """The segment as a bool [k, j, i] array on `volume`'s voxel grid (nearest-neighbour resampled;
    different parent transforms of the two nodes are taken into account)."""
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise ValueError(f"segment {segment_id!r} is not in {segmentation.GetName()}")
    geom, _ = volume_geometry(volume)
    out = np.zeros(geom.array_shape, bool)
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation, segment_id, labelmap, False
    ):
        raise ValueError(f"segment {segment_id!r} has no binary labelmap representation")
    ext = labelmap.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return out  # empty segment
    to_world = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(to_world)
    # bring the labelmap into the volume's local frame, then resample onto the volume's grid
    labelmap.SetImageToWorldMatrix(_vtk_matrix(_relative(volume, segmentation) @ _matrix(to_world)))
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, geom.size[0] - 1, 0, geom.size[1] - 1, 0, geom.size[2] - 1)
    reference.SetImageToWorldMatrix(_vtk_matrix(geom.ijk_to_ras_matrix()))
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
        == segment.GetLabelValue()
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
    _image_from_array(m.astype(np.uint8), image)
    to_seg = _relative(segmentation, volume) @ geom.ijk_to_ras_matrix()
    image.SetImageToWorldMatrix(_vtk_matrix(to_seg))
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    # Only this segment may be overwritten: where the new mask overlaps another segment of a shared
    # layer, Slicer moves this segment to a layer of its own (tested: the other keeps every voxel).
    if not logic.SetBinaryLabelmapToSegment(
        image, segmentation, segment_id, logic.MODE_REPLACE, image.GetExtent(), False, (segment_id,)
    ):
        raise ValueError(f"could not write segment {segment_id!r} of {segmentation.GetName()}")


# ---------------------------------------------------------------------------------------------------
# prompts as markups point lists


def _point_lists(scene, segmentation, segment_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    nodes = scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")
    for n in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(n)
        role = node.GetAttribute(ROLE_ATTR)
        if (
            role in KINDS
            and node.GetAttribute(SEGMENT_ATTR) == segment_id
            and node.GetNodeReferenceID(SEGMENTATION_REF) == segmentation.GetID()
        ):
            found.setdefault(role, node)
    return found


def _style_point_list(node, kind: str) -> None:
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    if display is None:
        return
    display.SetSelectedColor(*COLORS[kind])
    display.SetColor(*COLORS[kind])
    display.SetActiveColor(*COLORS[kind])
    display.SetGlyphScale(1.8)
    display.SetTextScale(1.5)
    display.SetPointLabelsVisibility(True)
    display.SetPropertiesLabelVisibility(False)
    # Off: a point is drawn only in the slice view cutting through it, i.e. only on its own slice.
    display.SetSliceProjection(False)
    display.SetVisibility2D(True)
    display.SetVisibility3D(False)


def _slice_of_points(node, volume, axis: int, include_hidden: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every defined control point: (N, 2) (x, y), (N,) nearest slice, (N,) control point index.

    include_hidden=False leaves out points a person hid (eye icon): they are kept but not used.
    """
    geom, p2w = volume_geometry(volume)
    idx, pos = [], []
    for c in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(c) != node.PositionDefined:
            continue
        if not include_hidden and not node.GetNthControlPointVisibility(c):
            continue
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(c, p)
        idx.append(c)
        pos.append(p)
    if not pos:
        return np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    ijk = world_ras_to_ijk(np.asarray(pos), geom, p2w)
    labels = [node.GetNthControlPointLabel(c) for c in idx]
    for n, lab in enumerate(labels):
        check_inside_volume(ijk[n : n + 1], geom, what=f"point {lab!r} of {node.GetName()}")
    xy, along = ijk_to_slice_xy(ijk, axis)
    return xy, np.floor(along + 0.5).astype(np.int64), np.asarray(idx, np.int64)


@dataclass
class PropagationJob:
    """Everything a propagation needs, copied out of MRML on the main thread; `run` needs no MRML."""

    volume_id: str
    segmentation_id: str
    segment_id: str
    axis: int
    image: np.ndarray
    supports: list
    same_volume: bool
    prompts_from: str
    generator: Any
    segmenter: Any
    config: Any
    notes: list[str] = field(default_factory=list)
    # Main thread only (apply_slice_result): the segment on the volume grid before the first live slice
    # was written (None = nothing written live yet) and the slices written live so far.
    live_before: np.ndarray | None = field(default=None, repr=False)
    live_slices: set[int] = field(default_factory=set)


class FoBSegmentLogic:
    """The module's Logic. Usable from the Python console, tests and the widget.

    undo_callback: when given (the widget passes the Segment Editor's `saveStateForUndo`), it is called
    once before each write instead of the Logic's own `vtkSegmentationHistory`.
    """

    def __init__(self, scene, undo_callback: Callable[[], None] | None = None, max_undo_states: int = 10) -> None:
        self.scene = scene
        self.undo_callback = undo_callback
        self.max_undo_states = int(max_undo_states)
        self._histories: dict[str, Any] = {}
        self._segmenters: dict[tuple[str, str, str], Any] = {}
        self._images: dict[str, tuple[int, np.ndarray]] = {}

    # --- parameters --------------------------------------------------------------------------------

    def parameter_node(self, create: bool = True):
        return find_parameter_node(self.scene, create)

    def parameters(self) -> FoBParameters:
        node = self.parameter_node()
        return read_parameters(node)

    def set_parameters(self, params: FoBParameters, **nodes) -> None:
        """Store settings and node references (inputVolume=..., segmentation=..., ...) with the scene."""
        node = self.parameter_node()
        write_parameters(node, params)
        for role, value in nodes.items():
            if role not in NODE_REFERENCES:
                raise ValueError(f"unknown node reference {role!r}; use one of {', '.join(NODE_REFERENCES)}")
            node.SetNodeReferenceID(role, value.GetID() if value is not None else None)

    def referenced_node(self, role: str):
        node = self.parameter_node(create=False)
        return node.GetNodeReference(role) if node is not None else None

    # --- inputs ------------------------------------------------------------------------------------

    def slice_axis(self, volume, axis: int | None = None) -> int:
        """The array axis to slice along: `axis` if given (>= 0), else the volume's axial axis."""
        if axis is not None and axis >= 0:
            slice_axes(axis)
            return int(axis)
        geom, _ = volume_geometry(volume)
        return axial_axis(geom)

    def normalised_image(self, volume) -> np.ndarray:
        """The volume's voxels normalised to [0, 1] as the CLI does (io/intensity), cached per image version."""
        from FoBSegmentLib.io import intensity

        image = volume.GetImageData()
        if image is None:
            raise ValueError(f"{volume.GetName()} has no image data")
        key, mtime = volume.GetID(), int(image.GetMTime())
        cached = self._images.get(key)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        arr = volume_array(volume)
        is_rgb = arr.ndim == 4 and arr.shape[-1] == 3
        guess = intensity.guess_modality(arr, None, is_rgb)
        norm = intensity.normalize(arr, guess.modality).astype(np.float32)
        self._images[key] = (mtime, norm)
        return norm

    def support_slices(self, volume, segmentation, segment_id: str, axis: int | None = None) -> list[int]:
        """Slice indices along the axis where the segment is non-empty on `volume`'s grid."""
        return nonempty_slices(segment_mask(segmentation, segment_id, volume), self.slice_axis(volume, axis))

    def current_slice(self, volume, ras_world: tuple[float, float, float], axis: int | None = None) -> int:
        """Nearest slice index along the axis to a world RAS point (e.g. a slice view's centre)."""
        geom, p2w = volume_geometry(volume)
        ax = self.slice_axis(volume, axis)
        ijk = world_ras_to_ijk(np.asarray([ras_world], float), geom, p2w)
        _, along = ijk_to_slice_xy(ijk, ax)
        index = int(np.floor(along[0] + 0.5))
        # only the position along the axis matters: a panned view's centre may lie beside the volume
        if not 0 <= index < geom.array_shape[ax]:
            raise ValueError(f"the slice view is not on the volume (slice {index} of 0..{geom.array_shape[ax] - 1})")
        return index

    def get_segmenter(self, name: str = "auto", device: str = "auto", checkpoint: str | None = None):
        """A cached segmenter (`FoBSegmentLib.segmenters.get_segmenter`), so SAM embeddings stay cached
        and re-segmenting a slice after an edit only reruns the decoder."""
        key = (name, device, checkpoint or "")
        if key not in self._segmenters:
            try:
                from FoBSegmentLib.segmenters import get_segmenter
            except ImportError:
                get_segmenter = None
            if get_segmenter is not None:
                self._segmenters[key] = get_segmenter(name, checkpoint=checkpoint or None, device=device)
            elif name in ("graphcut", "auto"):
                from FoBSegmentLib.segmenters.graphcut import GraphCutSegmenter

                self._segmenters[key] = GraphCutSegmenter()
            elif name == "grabcut":
                from FoBSegmentLib.segmenters.grabcut import GrabCutSegmenter

                self._segmenters[key] = GrabCutSegmenter()
            else:
                raise ValueError(f"segmenter {name!r} is not available in this installation")
        return self._segmenters[key]

    # --- prompt point lists ------------------------------------------------------------------------

    def prompt_point_lists(self, volume, segmentation, segment_id: str, create: bool = True) -> dict[str, Any]:
        """{"background": node, "foreground": node} for a target segment, found by their attributes and
        reference to the segmentation (so they are found again after a scene reload), created if asked."""
        lists = _point_lists(self.scene, segmentation, segment_id)
        if not create:
            return lists
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        if segment is None:
            raise ValueError(f"segment {segment_id!r} is not in {segmentation.GetName()}")
        for kind in KINDS:
            if kind in lists:
                continue
            node = self.scene.AddNewNodeByClass(
                "vtkMRMLMarkupsFiducialNode", f"FoB {segment.GetName()} {kind}"
            )
            node.SetAttribute(ROLE_ATTR, kind)
            node.SetAttribute(SEGMENT_ATTR, segment_id)
            node.SetNodeReferenceID(SEGMENTATION_REF, segmentation.GetID())
            node.SetNodeReferenceID(VOLUME_REF, volume.GetID())
            node.SetMarkupLabelFormat(f"{LABEL_PREFIX[kind]}%d")
            _style_point_list(node, kind)
            lists[kind] = node
        for node in lists.values():
            # Points are placed in the volume's frame; sharing its parent keeps them attached when the
            # volume is moved.
            tnode = volume.GetParentTransformNode()
            node.SetAndObserveTransformNodeID(tnode.GetID() if tnode is not None else None)
        return lists

    def reviewed_slices(self, volume, segmentation, segment_id: str) -> list[int]:
        lists = self.prompt_point_lists(volume, segmentation, segment_id, create=False)
        node = lists.get("background")
        text = node.GetAttribute(REVIEWED_ATTR) if node is not None else None
        return sorted({int(t) for t in text.split(",") if t.strip()}) if text else []

    def set_reviewed(
        self, volume, segmentation, segment_id: str, slices: list[int], reviewed: bool = True, axis: int | None = None
    ) -> None:
        """Mark slices reviewed (their points locked, never replaced by a new prediction) or not."""
        ax = self.slice_axis(volume, axis)
        lists = self.prompt_point_lists(volume, segmentation, segment_id)
        current = set(self.reviewed_slices(volume, segmentation, segment_id))
        current = current | set(map(int, slices)) if reviewed else current - set(map(int, slices))
        lists["background"].SetAttribute(REVIEWED_ATTR, ",".join(str(s) for s in sorted(current)))
        for node in lists.values():
            _, idx_slice, idx_point = _slice_of_points(node, volume, ax)
            for s, c in zip(idx_slice, idx_point):
                if int(s) in slices:
                    node.SetNthControlPointLocked(int(c), bool(reviewed))

    def show_prompts(
        self, volume, segmentation, segment_id: str, prompts_by_slice: dict[int, PromptSet], axis: int | None = None
    ) -> dict[int, PromptSet]:
        """Put predicted prompts into the point lists, replacing the unlocked points of those slices.

        Reviewed (locked) slices keep their points. Returns the prompts actually shown.
        """
        ax = self.slice_axis(volume, axis)
        geom, p2w = volume_geometry(volume)
        lists = self.prompt_point_lists(volume, segmentation, segment_id)
        reviewed = set(self.reviewed_slices(volume, segmentation, segment_id))
        targets = {int(s): ps for s, ps in prompts_by_slice.items() if int(s) not in reviewed}
        for kind, node in lists.items():
            node.SetAttribute(AXIS_ATTR, str(ax))
            was = node.StartModify()
            try:
                _, idx_slice, idx_point = _slice_of_points(node, volume, ax)
                for s, c in sorted(zip(idx_slice, idx_point), key=lambda t: -t[1]):
                    if int(s) in targets and not node.GetNthControlPointLocked(int(c)):
                        node.RemoveNthControlPoint(int(c))
                for s in sorted(targets):
                    pts = getattr(targets[s], kind)
                    if len(pts) == 0:
                        continue
                    ijk = slice_xy_to_ijk(pts, ax, s)
                    check_inside_volume(ijk, geom, what=f"slice {s} {kind} prompt")
                    ras = ijk_to_world_ras(ijk, geom, p2w)
                    for (x, y), p in zip(pts, ras):
                        c = node.AddControlPointWorld(vtk.vtkVector3d(*p))
                        node.SetNthControlPointDescription(c, point_description(kind, s, ax, (float(x), float(y))))
            finally:
                node.EndModify(was)
        return targets

    def read_prompts(
        self, volume, segmentation, segment_id: str, axis: int | None = None, slices: list[int] | None = None
    ) -> dict[int, PromptSet]:
        """The (possibly edited) prompts of the point lists, {slice: PromptSet in (x, y) pixels}.

        A point's slice is the nearest voxel slice to its current position (a dragged point moves with
        it); hidden points are not used. Raises ValueError for a point outside the volume.
        """
        ax = self.slice_axis(volume, axis)
        lists = self.prompt_point_lists(volume, segmentation, segment_id, create=False)
        collected: dict[int, dict[str, list]] = {}
        for kind in KINDS:
            node = lists.get(kind)
            if node is None:
                continue
            xy, idx_slice, _ = _slice_of_points(node, volume, ax, include_hidden=False)
            for p, s in zip(xy, idx_slice):
                if slices is not None and int(s) not in slices:
                    continue
                collected.setdefault(int(s), {k: [] for k in KINDS})[kind].append(p)
        return {
            s: PromptSet(
                background=np.asarray(v["background"]).reshape(-1, 2), foreground=np.asarray(v["foreground"]).reshape(-1, 2)
            )
            for s, v in sorted(collected.items())
        }

    def export_prompts(self, path, volume, segmentation, segment_id: str, axis: int | None = None) -> None:
        """Write the point lists' prompts to a `.mrk.json` the CLI reads (`fob segment --prompts-in`).

        Positions are in the volume's local frame (LPS), i.e. the file matches the volume file on disk.
        """
        from FoBSegmentLib.io.markups import write_prompt_markups

        ax = self.slice_axis(volume, axis)
        geom, _ = volume_geometry(volume)
        write_prompt_markups(path, self.read_prompts(volume, segmentation, segment_id, ax), geom, ax)

    def import_prompts(self, path, volume, segmentation, segment_id: str, axis: int | None = None) -> dict[int, PromptSet]:
        """Load prompts from a `.mrk.json` (e.g. `fob segment --prompts-out`) into the point lists."""
        from FoBSegmentLib.io.markups import read_prompt_markups

        ax = self.slice_axis(volume, axis)
        geom, _ = volume_geometry(volume)
        return self.show_prompts(volume, segmentation, segment_id, read_prompt_markups(path, geom, ax), ax)

    # --- undo ----------------------------------------------------------------------------------------

    def _history(self, segmentation):
        key = segmentation.GetID()
        hist = self._histories.get(key)
        if hist is None or hist.GetSegmentation() is not segmentation.GetSegmentation():
            hist = slicer.vtkSegmentationHistory()
            hist.SetMaximumNumberOfStates(self.max_undo_states)
            hist.SetSegmentation(segmentation.GetSegmentation())
            self._histories[key] = hist
        return hist

    def save_state_for_undo(self, segmentation) -> None:
        """One undo state, taken before a user action modifies the segmentation."""
        if self.undo_callback is not None:
            self.undo_callback()
        else:
            self._history(segmentation).SaveState()
        if self.scene.GetUndoFlag():
            self.scene.SaveStateForUndo()

    def undo(self, segmentation) -> bool:
        """Undo the last FoB action on the segmentation (the Logic's own history); False when none."""
        hist = self._history(segmentation)
        if not hist.IsRestorePreviousStateAvailable():
            return False
        return bool(hist.RestorePreviousState())

    def redo(self, segmentation) -> bool:
        hist = self._history(segmentation)
        if not hist.IsRestoreNextStateAvailable():
            return False
        return bool(hist.RestoreNextState())

    def write_slices(
        self, volume, segmentation, segment_id: str, masks: dict[int, np.ndarray], axis: int | None = None
    ) -> None:
        """Replace slices of one segment with (H, W) masks; one undo state for the whole call."""
        if not masks:
            return
        ax = self.slice_axis(volume, axis)
        current = segment_mask(segmentation, segment_id, volume)
        edit = write_binary_slices(current, ax, masks)
        if edit.changed_voxels() == 0:
            return
        self.save_state_for_undo(segmentation)
        set_segment_mask(segmentation, segment_id, volume, current)

    # --- segmenting ----------------------------------------------------------------------------------

    def segment_slices(
        self,
        volume,
        segmentation,
        segment_id: str,
        slices: list[int] | None = None,
        segmenter: str = "auto",
        device: str = "auto",
        axis: int | None = None,
        checkpoint: str | None = None,
    ) -> dict[int, np.ndarray]:
        """Segment slices with the prompts in the point lists and write them into the segment.

        slices: None = all reviewed slices (all slices with prompts when none is reviewed). Returns
        {slice: (H, W) bool mask}. One undo state for the whole call; other segments are not touched.
        """
        ax = self.slice_axis(volume, axis)
        prompts = self.read_prompts(volume, segmentation, segment_id, ax)
        if slices is None:
            reviewed = self.reviewed_slices(volume, segmentation, segment_id)
            slices = reviewed or sorted(prompts)
        missing = [s for s in slices if s not in prompts]
        if missing:
            raise ValueError(f"no prompts on slice(s) {', '.join(map(str, missing))}; predict or place points first")
        image = self.normalised_image(volume)
        seg = self.get_segmenter(segmenter, device, checkpoint)
        masks = {}
        for s in slices:
            try:
                masks[int(s)] = np.asarray(seg.segment(take_slice(image, ax, int(s)), prompts[s]).mask, bool)
            except ValueError as exc:
                raise ValueError(f"slice {s}: {exc}") from None
        self.write_slices(volume, segmentation, segment_id, masks, ax)
        return masks

    # --- prediction and propagation -----------------------------------------------------------------

    def prepare_propagation(
        self,
        volume,
        segmentation,
        segment_id: str,
        axis: int | None = None,
        slice_range: tuple[int, int] | None = None,
        support_volume=None,
        support_segmentation=None,
        support_segment_id: str | None = None,
        prompts_from: str = "auto",
        model: str = "",
        segmenter: str = "auto",
        device: str = "auto",
        config=None,
        generator=None,
        checkpoint: str | None = None,
        n_background: int | None = None,
        n_foreground: int | None = None,
    ) -> PropagationJob:
        """Copy what a propagation needs out of MRML (main thread). The support is the segment itself
        (same volume) or another volume's segment (cross-patient).

        generator: an already loaded FoB generator (anything with `.predict(support_image, support_mask,
        query_image) -> PromptSet`); otherwise `model` (a file) or the shipped default is loaded.
        """
        from FoBSegmentLib import pipeline

        ax = self.slice_axis(volume, axis)
        image = self.normalised_image(volume)
        same_volume = support_volume is None or support_volume is volume
        if same_volume:
            s_image = image
            s_mask = segment_mask(support_segmentation or segmentation, support_segment_id or segment_id, volume)
            s_axis = ax
        else:
            if support_segmentation is None or not support_segment_id:
                raise ValueError("a support volume needs its segmentation and segment")
            s_image = self.normalised_image(support_volume)
            s_mask = segment_mask(support_segmentation, support_segment_id, support_volume)
            s_axis = self.slice_axis(support_volume, None)
        supports = pipeline.support_slices_from_volume(s_image, s_mask, s_axis)
        if not supports:
            raise ValueError("the support segment is empty: outline the organ on at least one slice")
        if not same_volume:
            supports = pipeline.chunk_supports(supports)
        cfg = config or pipeline.PropagationConfig()
        if n_background is not None:
            cfg.n_background = int(n_background)
        if n_foreground is not None:
            cfg.n_foreground = int(n_foreground)
        if slice_range is not None and min(slice_range) >= 0:
            cfg.slices = (int(slice_range[0]), int(slice_range[1]))
            pipeline.check_slice_range(cfg.slices, image.shape[ax])
        notes: list[str] = []
        if generator is not None:
            prompts_from = "fob" if prompts_from == "auto" else prompts_from
            notes.append("FoB generator given by the caller")
        elif prompts_from in ("auto", "fob", "hybrid"):
            generator, why = pipeline.load_generator(model or None, required=prompts_from != "auto")
            notes.append(why)
            if prompts_from == "auto":
                prompts_from = "fob" if generator is not None else "neighbour"
        if prompts_from not in pipeline.PROMPT_SOURCES:
            raise ValueError(f"unknown prompt source {prompts_from!r}")
        return PropagationJob(
            volume_id=volume.GetID(),
            segmentation_id=segmentation.GetID(),
            segment_id=segment_id,
            axis=ax,
            image=image,
            supports=supports,
            same_volume=same_volume,
            prompts_from=prompts_from,
            generator=generator,
            segmenter=self.get_segmenter(segmenter, device, checkpoint),
            config=cfg,
            notes=notes,
        )

    @staticmethod
    def run_propagation(
        job: PropagationJob,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        on_slice: SliceCallback | None = None,
    ):
        """The computation (no MRML access: safe on a worker thread). Returns a pipeline.PropagationResult;
        raises pipeline.PropagationCancelled when `cancel()` returns True.

        on_slice(z, mask): called on this (worker) thread with each accepted (H, W) slice mask (see
        `pipeline.propagate`); it must not touch MRML/Qt: queue the mask and let the main thread call
        `apply_slice_result(job, z, mask)`."""
        from FoBSegmentLib import pipeline

        return pipeline.propagate(
            job.image,
            job.supports,
            job.segmenter,
            axis=job.axis,
            same_volume=job.same_volume,
            prompts_from=job.prompts_from,
            generator=job.generator,
            config=job.config,
            progress=progress,
            cancel=cancel,
            on_slice=on_slice,
        )

    def _job_nodes(self, job: PropagationJob):
        volume = self.scene.GetNodeByID(job.volume_id)
        segmentation = self.scene.GetNodeByID(job.segmentation_id)
        if volume is None or segmentation is None:
            raise ValueError("the volume or segmentation of this propagation was removed from the scene")
        return volume, segmentation

    def apply_slice_result(self, job: PropagationJob, z: int, mask: np.ndarray) -> bool:
        """Main thread: write one slice of a running propagation into the job's segment (live display).

        Only that slice of that segment changes (other segments and slices keep their voxels, including
        edits made meanwhile). The first write of the job saves the one undo state of the whole run; later
        writes save none. A slice may be written again (the last write wins). Returns False when the
        slice already held exactly this mask (nothing written).
        """
        volume, segmentation = self._job_nodes(job)
        current = segment_mask(segmentation, job.segment_id, volume)
        new = np.asarray(mask, bool)
        if np.array_equal(take_slice(current, job.axis, int(z)), new):
            return False
        if job.live_before is None:
            self.save_state_for_undo(segmentation)
            job.live_before = current.copy()
        put_slice(current, job.axis, int(z), new)
        job.live_slices.add(int(z))
        set_segment_mask(segmentation, job.segment_id, volume, current)
        return True

    def rollback_propagation(self, job: PropagationJob) -> bool:
        """Main thread, after a cancelled or failed live run: remove what `apply_slice_result` wrote.

        With the Logic's own history this is an Undo of the run's single state (Redo brings the partial
        result back); with an external `undo_callback` the written slices get their previous voxels back.
        Returns False when nothing had been written.
        """
        if job.live_before is None:
            return False
        volume, segmentation = self._job_nodes(job)
        before, written = job.live_before, sorted(job.live_slices)
        job.live_before, job.live_slices = None, set()
        if self.undo_callback is None and self.undo(segmentation):
            return True
        current = segment_mask(segmentation, job.segment_id, volume)
        for z in written:
            put_slice(current, job.axis, z, take_slice(before, job.axis, z))
        set_segment_mask(segmentation, job.segment_id, volume, current)
        return True

    def apply_propagation(self, job: PropagationJob, result, show_prompts: bool = True) -> list[int]:
        """Write a finished propagation into its segment (one undo state) and show the prompts it used.

        Only slices the propagation produced are written; annotated slices stay as drawn. Returns them.
        After live writes (`apply_slice_result`) no second undo state is saved: the final, cleaned-up
        masks replace the live ones, and a live-written slice the result does not keep gets its
        previous voxels back, so the run is still one undo step.
        """
        volume, segmentation = self._job_nodes(job)
        produced = [z for z, r in sorted(result.slices.items()) if r.source not in ("skipped", "annotation")]
        masks = {z: take_slice(result.mask, job.axis, z).astype(bool) for z in produced}
        if job.live_before is None:
            self.write_slices(volume, segmentation, job.segment_id, masks, job.axis)
        else:
            for z in job.live_slices - set(masks):
                masks[z] = take_slice(job.live_before, job.axis, z).astype(bool)
            current = segment_mask(segmentation, job.segment_id, volume)
            if write_binary_slices(current, job.axis, masks).changed_voxels():
                set_segment_mask(segmentation, job.segment_id, volume, current)
            job.live_before, job.live_slices = None, set()
        if show_prompts and result.prompts:
            self.show_prompts(volume, segmentation, job.segment_id, result.prompts, job.axis)
        return produced

    def propagate(
        self,
        volume,
        segmentation,
        segment_id: str,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        live: bool = False,
        on_slice: SliceCallback | None = None,
        **kwargs,
    ):
        """prepare + run + apply on the calling thread (scripts and tests); returns the PropagationResult.

        live=True writes each slice as soon as it is segmented (`apply_slice_result`, as the widget does
        from its queue), then calls on_slice(z, mask) if given; still one undo step. A cancelled or failed
        live run is rolled back (`rollback_propagation`) before the exception propagates.
        """
        job = self.prepare_propagation(volume, segmentation, segment_id, **kwargs)
        hook = None
        if live:

            def hook(z: int, mask: np.ndarray) -> None:
                self.apply_slice_result(job, z, mask)
                if on_slice is not None:
                    on_slice(z, mask)

        elif on_slice is not None:
            hook = on_slice
        try:
            result = self.run_propagation(job, progress, cancel, on_slice=hook)
        except BaseException:
            self.rollback_propagation(job)
            raise
        self.apply_propagation(job, result)
        return result

    def predict_prompts(
        self,
        volume,
        segmentation,
        segment_id: str,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        **kwargs,
    ) -> dict[int, PromptSet]:
        """Predict prompts for the slices of the range and show them for review; commits no segmentation.

        prepare_propagation + compute_prompts + show_job_prompts on the calling thread (the widget runs
        compute_prompts on its worker). Returns the prompts shown (reviewed slices keep their points).
        """
        job = self.prepare_propagation(volume, segmentation, segment_id, **kwargs)
        return self.show_job_prompts(job, self.compute_prompts(job, progress, cancel))

    @staticmethod
    def compute_prompts(
        job: PropagationJob, progress: ProgressCallback | None = None, cancel: CancelCheck | None = None
    ) -> dict[int, PromptSet]:
        """Prompts for the range's unannotated slices (no MRML access: safe on a worker thread).

        With a FoB model: the generator's background ring + foreground points from the nearest support
        slice (batched per support). Without one: neighbour chaining (rings around the previous slice's
        provisional mask, which is not written anywhere).
        """
        from FoBSegmentLib import pipeline

        annotated = {s.index for s in job.supports} if job.same_volume else set()
        prompts: dict[int, PromptSet] = {}
        if job.prompts_from != "fob":
            result = FoBSegmentLogic.run_propagation(job, progress, cancel)
            return {z: p for z, p in result.prompts.items() if z not in annotated}
        n = job.image.shape[job.axis]
        lo, hi = (0, n - 1) if job.config.slices == "auto" else job.config.slices
        query = [z for z in range(lo, hi + 1) if z not in annotated]
        assign = pipeline.assign_supports(query, job.supports, job.same_volume)
        groups: dict[int, list[int]] = {}
        for z in query:
            groups.setdefault(id(assign[z]), []).append(z)
        done = 0
        for zs in groups.values():
            if cancel is not None and cancel():
                raise pipeline.PropagationCancelled("cancelled")
            sup = assign[zs[0]]
            images = [take_slice(job.image, job.axis, z) for z in zs]
            if hasattr(job.generator, "predict_batch"):
                # the support is encoded once per group rather than once per slice
                predicted = job.generator.predict_batch(sup.image, sup.mask, images)
            else:
                predicted = [job.generator.predict(sup.image, sup.mask, im) for im in images]
            prompts.update(zip(zs, predicted))
            done += len(zs)
            if progress is not None:
                progress(done, len(query), f"slices {zs[0]}..{zs[-1]}")
        return prompts

    def show_job_prompts(self, job: PropagationJob, prompts: dict[int, PromptSet]) -> dict[int, PromptSet]:
        """Main thread: put a job's computed prompts into its point lists (see `show_prompts`)."""
        volume = self.scene.GetNodeByID(job.volume_id)
        segmentation = self.scene.GetNodeByID(job.segmentation_id)
        if volume is None or segmentation is None:
            raise ValueError("the volume or segmentation of this prediction was removed from the scene")
        return self.show_prompts(volume, segmentation, job.segment_id, prompts, job.axis)
