"""FoB's writes follow the Segment Editor's masking settings when the widget passes them (issue 18,
defect 8): editable area, editable intensity range, "modify other segments". Real CHAOS MR volume on a
headless MRML scene (slicer-core); the Segment Editor's own C++ logic applies the settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
    pytest.skip("this slicer-core has no vtkSlicerSegmentEditorLogic", allow_module_level=True)

from slicer_fixtures import chaos_volume, mrml, oblique_volume  # noqa: E402,F401  (pytest fixture)

from FoBSegmentLib.io.coords import put_slice, take_slice  # noqa: E402
from FoBSegmentLib.labelmap import nonempty_slices  # noqa: E402
from FoBSegmentLib.slicer import mrml as fob_mrml  # noqa: E402
from FoBSegmentLib.slicer.logic import FoBSegmentLogic  # noqa: E402
from FoBSegmentLib.slicer.parameters import Masking  # noqa: E402

pytestmark = pytest.mark.slicer

SEG = slicer.vtkMRMLSegmentationNode
EDITOR = slicer.vtkMRMLSegmentEditorNode


@pytest.fixture
def setup(mrml, data_dir: Path):  # noqa: F811
    scene, logics = mrml
    vol, reference = chaos_volume(scene, logics, data_dir)
    logic = FoBSegmentLogic(scene)
    axis = logic.slice_axis(vol)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    ids = {n: seg.GetSegmentation().AddEmptySegment(n, n) for n in ("liver", "spleen", "region")}
    spleen = reference == 4
    fob_mrml.set_segment_mask(seg, ids["spleen"], vol, spleen)
    z = nonempty_slices(spleen, axis)[len(nonempty_slices(spleen, axis)) // 2]
    # a "liver" result that is wrong on purpose: the whole slice, over the spleen too
    full = np.ones_like(take_slice(spleen, axis, z))
    return logic, vol, seg, ids, axis, z, full, spleen, fob_mrml.volume_array(vol)


def test_without_masking_fob_writes_its_segment_only(setup) -> None:
    logic, vol, seg, ids, axis, z, full, spleen, _ = setup
    logic.masking = Masking(overwrite_mode=EDITOR.OverwriteNone)
    logic.write_slices(vol, seg, ids["liver"], {z: full}, axis)
    assert take_slice(fob_mrml.segment_mask(seg, ids["liver"], vol), axis, z).all()
    assert np.array_equal(fob_mrml.segment_mask(seg, ids["spleen"], vol), spleen), "overlap allowed"


def test_overwrite_other_segments_removes_them_where_fob_writes_and_undo_restores(setup) -> None:
    logic, vol, seg, ids, axis, z, full, spleen, _ = setup
    logic.masking = Masking(overwrite_mode=EDITOR.OverwriteAllSegments)
    logic.write_slices(vol, seg, ids["liver"], {z: full}, axis)
    got = fob_mrml.segment_mask(seg, ids["spleen"], vol)
    assert not take_slice(got, axis, z).any(), "the liver overwrote the spleen on that slice"
    others = [k for k in range(spleen.shape[axis]) if k != z]
    assert all(np.array_equal(take_slice(got, axis, k), take_slice(spleen, axis, k)) for k in others)
    assert logic.undo(seg), "one undo restores both segments"
    assert np.array_equal(fob_mrml.segment_mask(seg, ids["spleen"], vol), spleen)
    assert not fob_mrml.segment_mask(seg, ids["liver"], vol).any()


def test_editable_area_and_intensity_range_limit_fob_writes(setup) -> None:
    logic, vol, seg, ids, axis, z, full, spleen, image = setup
    region = np.zeros_like(spleen)
    sl = take_slice(region, axis, z).copy()
    sl[: sl.shape[0] // 2] = True  # the upper half of the slice
    put_slice(region, axis, z, sl)
    fob_mrml.set_segment_mask(seg, ids["region"], vol, region)
    logic.masking = Masking(mask_mode=SEG.EditAllowedInsideSingleSegment, mask_segment_id=ids["region"],
                            overwrite_mode=EDITOR.OverwriteNone)
    logic.write_slices(vol, seg, ids["liver"], {z: full}, axis)
    liver = take_slice(fob_mrml.segment_mask(seg, ids["liver"], vol), axis, z)
    assert np.array_equal(liver, sl), "written inside the editable area only"

    # the editable intensity range, through the live (one-slice) write of a running propagation
    lo, hi = np.percentile(take_slice(image, axis, z), [40, 90])
    logic.masking = Masking(overwrite_mode=EDITOR.OverwriteNone, intensity_range=(float(lo), float(hi)))
    job = logic.prepare_propagation(vol, seg, ids["liver"], slice_range=(z, z + 2), prompts_from="neighbour",
                                    segmenter="grabcut")
    z2 = z + 1
    assert logic.apply_slice_result(job, z2, np.ones_like(full))
    liver2 = take_slice(fob_mrml.segment_mask(seg, ids["liver"], vol), axis, z2)
    inside = (take_slice(image, axis, z2) >= lo) & (take_slice(image, axis, z2) <= hi)
    assert inside.any() and not inside.all()
    assert np.array_equal(liver2, inside)
    assert np.array_equal(take_slice(fob_mrml.segment_mask(seg, ids["liver"], vol), axis, z), sl), "z kept"
    assert Masking().everywhere and not logic.masking.everywhere
    assert scene_nodes_named(vol.GetScene(), "FoBSegment masking") == 0, "the private editor node is removed"


def scene_nodes_named(scene, prefix: str) -> int:
    nodes = scene.GetNodesByClass("vtkMRMLSegmentEditorNode")
    return sum(1 for n in range(nodes.GetNumberOfItems()) if nodes.GetItemAsObject(n).GetName().startswith(prefix))
