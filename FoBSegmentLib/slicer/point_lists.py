"""Prompts as markups point lists: find, create and style them; points <-> slices; show, read, import and
export prompts; reviewed (locked) slices; slices marked as not showing the organ.

Each target segment has two `vtkMRMLMarkupsFiducialNode` lists, "FoB <segment> background" (red) and
"FoB <segment> foreground" (green), found again after a scene reload by their attributes and their
reference to the segmentation. They are parented to the volume's transform and visible in 2D views
only; each point's description records its kind, slice and axis (`io.markups.point_description`), but
a point's slice is always recomputed from its position, because a person may have dragged it.

Frames: control points are read and written in world RAS; `io.coords` converts them to IJK of the
volume and to (x, y) = (column, row) pixels of the slice along `axis` of the [k, j, i] array.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import vtk

from FoBSegmentLib.io.coords import (
    check_inside_volume,
    ijk_to_slice_xy,
    ijk_to_world_ras,
    inside_volume,
    slice_xy_to_ijk,
    world_ras_to_ijk,
)
from FoBSegmentLib.io.markups import COLORS, KINDS, LABEL_PREFIX, described_xy, point_description
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.slicer.mrml import resolve_axis, volume_geometry

ROLE_ATTR = "FoBSegment.Role"  # "background" | "foreground"
SEGMENT_ATTR = "FoBSegment.SegmentID"
AXIS_ATTR = "FoBSegment.SliceAxis"  # the axis the list's prompts were placed along
REVIEWED_ATTR = "FoBSegment.ReviewedSlices"  # comma-separated slice indices, on the background list
# "axis:z,z,...": slices marked as not showing the organ (`add_absent`), on the background list
ABSENT_ATTR = "FoBSegment.AbsentSlices"
RECORD_ATTR = "FoBSegment.Propagation"  # the propagation record (JSON) of the lists' prompts, on the background list
SEGMENTATION_REF = "FoBSegment.segmentation"
VOLUME_REF = "FoBSegment.volume"

# {control point ID: (slice along the list's axis or None when undefined, world RAS position)}
PointSnapshot = dict[str, tuple[int | None, tuple[float, float, float]]]


def find_point_lists(scene, segmentation, segment_id: str) -> dict[str, Any]:
    """{kind: node} of the existing prompt lists of one segment (either may be missing)."""
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


def style_point_list(node, kind: str) -> None:
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


def prompt_point_lists(scene, volume, segmentation, segment_id: str, create: bool = True) -> dict[str, Any]:
    """{"background": node, "foreground": node} for a target segment, created if asked."""
    lists = find_point_lists(scene, segmentation, segment_id)
    if not create:
        return lists
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise ValueError(f"segment {segment_id!r} is not in {segmentation.GetName()}")
    for kind in KINDS:
        if kind in lists:
            continue
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"FoB {segment.GetName()} {kind}")
        node.SetAttribute(ROLE_ATTR, kind)
        node.SetAttribute(SEGMENT_ATTR, segment_id)
        node.SetNodeReferenceID(SEGMENTATION_REF, segmentation.GetID())
        node.SetNodeReferenceID(VOLUME_REF, volume.GetID())
        node.SetMarkupLabelFormat(f"{LABEL_PREFIX[kind]}%d")
        style_point_list(node, kind)
        lists[kind] = node
    for node in lists.values():
        # Points are placed in the volume's frame; sharing its parent keeps them attached when the
        # volume is moved.
        tnode = volume.GetParentTransformNode()
        node.SetAndObserveTransformNodeID(tnode.GetID() if tnode is not None else None)
    return lists


def _world_position(node, index: int) -> tuple[float, float, float]:
    p = [0.0, 0.0, 0.0]
    node.GetNthControlPointPositionWorld(index, p)
    return (float(p[0]), float(p[1]), float(p[2]))


def points_on_slices(
    node, volume, axis: int, include_hidden: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every defined control point: (N, 2) (x, y), (N,) nearest slice along `axis`, (N,) point index.

    include_hidden=False leaves out points a person hid (eye icon): they are kept but not used.
    Raises ValueError for a point outside the volume.
    """
    geom, p2w = volume_geometry(volume)
    idx, pos = [], []
    for c in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(c) != node.PositionDefined:
            continue
        if not include_hidden and not node.GetNthControlPointVisibility(c):
            continue
        idx.append(c)
        pos.append(_world_position(node, c))
    if not pos:
        return np.zeros((0, 2)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    ijk = world_ras_to_ijk(np.asarray(pos), geom, p2w)
    for n, c in enumerate(idx):
        check_inside_volume(ijk[n : n + 1], geom, what=f"point {node.GetNthControlPointLabel(c)!r} of {node.GetName()}")
    xy, along = ijk_to_slice_xy(ijk, axis)
    slices = np.floor(along + 0.5).astype(np.int64)
    # Points not moved since FoB placed them keep their exact pixel coordinates (the propagation
    # record recognises unedited slices by them).
    xy = np.array([described_xy(node.GetNthControlPointDescription(int(c)), axis, int(z), p)
                   for c, z, p in zip(idx, slices, xy)]).reshape(-1, 2)
    return xy, slices, np.asarray(idx, np.int64)


def reviewed_slices(scene, segmentation, segment_id: str) -> list[int]:
    node = find_point_lists(scene, segmentation, segment_id).get("background")
    text = node.GetAttribute(REVIEWED_ATTR) if node is not None else None
    return sorted({int(t) for t in text.split(",") if t.strip()}) if text else []


def set_reviewed(
    scene, volume, segmentation, segment_id: str, slices: list[int], reviewed: bool, axis: int
) -> None:
    """Mark slices reviewed (their points locked, never replaced by a new prediction) or not."""
    chosen = {int(s) for s in slices}
    lists = prompt_point_lists(scene, volume, segmentation, segment_id)
    current = set(reviewed_slices(scene, segmentation, segment_id))
    current = current | chosen if reviewed else current - chosen
    lists["background"].SetAttribute(REVIEWED_ATTR, ",".join(str(s) for s in sorted(current)))
    for node in lists.values():
        _, idx_slice, idx_point = points_on_slices(node, volume, axis)
        for s, c in zip(idx_slice, idx_point):
            if int(s) in chosen:
                node.SetNthControlPointLocked(int(c), bool(reviewed))


def absent_slices(scene, segmentation, segment_id: str, axis: int) -> list[int]:
    """The slices along `axis` marked as not showing the organ (marks made along another axis: none)."""
    node = find_point_lists(scene, segmentation, segment_id).get("background")
    text = node.GetAttribute(ABSENT_ATTR) if node is not None else None
    if not text or ":" not in text:
        return []
    marked_axis, _, zs = text.partition(":")
    if marked_axis.strip() != str(int(axis)):
        return []
    return sorted({int(t) for t in zs.split(",") if t.strip()})


def add_absent(scene, volume, segmentation, segment_id: str, slices: list[int], axis: int) -> None:
    """Mark slices along `axis` as not showing the organ (marks made along another axis go). A mark is
    lifted by drawing the organ there again (`FoBSegmentLogic.absent_slices`), not here."""
    current = set(absent_slices(scene, segmentation, segment_id, axis)) | {int(s) for s in slices}
    lists = prompt_point_lists(scene, volume, segmentation, segment_id)
    lists["background"].SetAttribute(ABSENT_ATTR, f"{int(axis)}:" + ",".join(str(s) for s in sorted(current)))


def show_prompts(
    scene, volume, segmentation, segment_id: str, prompts_by_slice: dict[int, PromptSet], axis: int
) -> dict[int, PromptSet]:
    """Put prompts into the point lists, replacing the unlocked points of those slices.

    Reviewed (locked) slices keep their points. Returns the prompts actually shown.
    """
    geom, p2w = volume_geometry(volume)
    lists = prompt_point_lists(scene, volume, segmentation, segment_id)
    reviewed = set(reviewed_slices(scene, segmentation, segment_id))
    targets = {int(s): ps for s, ps in prompts_by_slice.items() if int(s) not in reviewed}
    for kind, node in lists.items():
        node.SetAttribute(AXIS_ATTR, str(axis))
        was = node.StartModify()
        try:
            _, idx_slice, idx_point = points_on_slices(node, volume, axis)
            for s, c in sorted(zip(idx_slice, idx_point), key=lambda t: -t[1]):
                if int(s) in targets and not node.GetNthControlPointLocked(int(c)):
                    node.RemoveNthControlPoint(int(c))
            for s in sorted(targets):
                pts = getattr(targets[s], kind)
                if len(pts) == 0:
                    continue
                ijk = slice_xy_to_ijk(pts, axis, s)
                check_inside_volume(ijk, geom, what=f"slice {s} {kind} prompt")
                ras = ijk_to_world_ras(ijk, geom, p2w)
                for (x, y), p in zip(pts, ras):
                    c = node.AddControlPointWorld(vtk.vtkVector3d(*p))
                    node.SetNthControlPointDescription(c, point_description(kind, s, axis, (float(x), float(y))))
        finally:
            node.EndModify(was)
    return targets


def read_prompts(
    scene, volume, segmentation, segment_id: str, axis: int, slices: list[int] | None = None
) -> dict[int, PromptSet]:
    """The (possibly edited) prompts of the point lists, {slice: PromptSet in (x, y) pixels}.

    A point's slice is the nearest voxel slice to its current position (a dragged point moves with
    it); hidden points are not used. Raises ValueError for a point outside the volume.
    """
    lists = find_point_lists(scene, segmentation, segment_id)
    collected: dict[int, dict[str, list]] = {}
    for kind in KINDS:
        node = lists.get(kind)
        if node is None:
            continue
        xy, idx_slice, _ = points_on_slices(node, volume, axis, include_hidden=False)
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


def propagation_record(scene, segmentation, segment_id: str) -> dict | None:
    """The propagation record stored with the lists (None when the prompts were not made by a propagation)."""
    node = find_point_lists(scene, segmentation, segment_id).get("background")
    text = node.GetAttribute(RECORD_ATTR) if node is not None else None
    if not text:
        return None
    from FoBSegmentLib.propagation.document import check_record

    try:
        return check_record(json.loads(text))
    except ValueError:
        return None  # a damaged attribute: the prompts are still usable on their own


def set_propagation_record(scene, volume, segmentation, segment_id: str, record: dict | None) -> None:
    lists = prompt_point_lists(scene, volume, segmentation, segment_id)
    lists["background"].SetAttribute(RECORD_ATTR, json.dumps(record) if record is not None else "")


def export_prompts(path: str | os.PathLike, scene, volume, segmentation, segment_id: str, axis: int) -> None:
    """Write the lists' prompts and their propagation record to a `.mrk.json` the CLI reads
    (`fob segment --prompts-in`); positions in the volume's local frame (LPS), so the file matches the
    volume file on disk."""
    from FoBSegmentLib.io.markups import write_prompt_markups

    geom, _ = volume_geometry(volume)
    record = propagation_record(scene, segmentation, segment_id)
    write_prompt_markups(path, read_prompts(scene, volume, segmentation, segment_id, axis), geom, axis, record=record)


def import_prompts(
    path: str | os.PathLike, scene, volume, segmentation, segment_id: str, axis: int
) -> dict[int, PromptSet]:
    """Load prompts (and their propagation record, if any) from a `.mrk.json` (e.g. `fob segment
    --prompts-out`) into the point lists."""
    from FoBSegmentLib.io.markups import load_markups_document, markups_dict_to_prompts
    from FoBSegmentLib.io.markups import propagation_record as file_record

    geom, _ = volume_geometry(volume)
    doc = load_markups_document(path)
    record = file_record(doc, os.path.basename(str(path)))
    shown = show_prompts(scene, volume, segmentation, segment_id,
                         markups_dict_to_prompts(doc, geom, axis, name=os.path.basename(str(path))), axis)
    set_propagation_record(scene, volume, segmentation, segment_id, record)
    return shown


# --- which slice a control point is on (re-segmenting after an edit) ---------------------------------------


def point_list_volume(node, volume=None):
    """The volume a prompt list belongs to: `volume` if given, else the list's volume reference."""
    volume = volume if volume is not None else node.GetNodeReference(VOLUME_REF)
    if volume is None:
        raise ValueError(f"{node.GetName()} refers to no volume")
    return volume


def point_list_axis(node, volume, fallback_axis: int | None = None) -> int:
    """The array axis a prompt list's points are sliced along: the axis its prompts were placed along
    (`AXIS_ATTR`), else `fallback_axis` (the module's parameter), else the volume's axial axis."""
    text = node.GetAttribute(AXIS_ATTR)
    axis = int(text) if text not in (None, "") else fallback_axis
    return resolve_axis(volume, axis)


def _slices_of(node, indices: list[int], volume, axis: int) -> list[int | None]:
    """Nearest slice along `axis` of each listed control point; None when undefined or outside the volume."""
    if not indices:
        return []
    geom, p2w = volume_geometry(volume)
    ijk = world_ras_to_ijk(np.asarray([_world_position(node, c) for c in indices]), geom, p2w)
    _, along = ijk_to_slice_xy(ijk, axis)
    # floor(v + 0.5) as everywhere (io.coords.round_ijk); the clip only catches a point on the outer face
    slices = np.clip(np.floor(along + 0.5), 0, geom.array_shape[axis] - 1).astype(np.int64)
    ok = inside_volume(ijk, geom)
    return [
        int(s) if inside and node.GetNthControlPointPositionStatus(c) == node.PositionDefined else None
        for c, s, inside in zip(indices, slices, ok)
    ]


def control_point_slice(node, index: int, volume, axis: int) -> int | None:
    """The slice along `axis` (nearest voxel slice) of control point `index`; None while its position is
    not defined (a point being placed) or when it lies outside the volume."""
    if not 0 <= index < node.GetNumberOfControlPoints():
        raise IndexError(f"{node.GetName()} has no control point {index}")
    return _slices_of(node, [index], volume, axis)[0]


def control_point_slices(node, volume, axis: int) -> PointSnapshot:
    """Every control point's slice (None: undefined or outside the volume) and world position, by ID."""
    indices = list(range(node.GetNumberOfControlPoints()))
    slices = _slices_of(node, indices, volume, axis)
    return {node.GetNthControlPointID(c): (s, _world_position(node, c)) for c, s in zip(indices, slices)}


def edited_slices(before: PointSnapshot, after: PointSnapshot, tol: float = 1e-6) -> list[int]:
    """The slices whose prompts changed between two snapshots of one list: for each point that moved,
    appeared or disappeared, its old and its new slice (a dragged point may leave slice A for slice B)."""
    changed: set[int | None] = set()
    for pid in before.keys() | after.keys():
        old, new = before.get(pid), after.get(pid)
        if old is not None and new is not None and np.allclose(old[1], new[1], atol=tol) and old[0] == new[0]:
            continue
        changed.update(v[0] for v in (old, new) if v is not None)
    return sorted(s for s in changed if s is not None)
