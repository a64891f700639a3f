"""The module file's helpers and the worker's prediction (issue 18, defect 8 and defect 1's editor side):
the torch version check, the Segment Editor undo callback, a FoB preview that is the propagation itself.
The module is imported with stand-ins for Qt and the ScriptedLoadableModule classes (see
test_slicer_logic._load_module_with_stand_ins); everything else is the real slicer-core."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from slicer_fixtures import mrml  # noqa: E402,F401  (pytest fixture)
from test_slicer_logic import _load_module_with_stand_ins  # noqa: E402

from FoBSegmentLib.io.coords import put_slice, take_slice  # noqa: E402
from FoBSegmentLib.labelmap import nonempty_slices  # noqa: E402
from FoBSegmentLib.slicer import mrml as fob_mrml  # noqa: E402
from FoBSegmentLib.slicer.logic import FoBSegmentLogic  # noqa: E402

pytestmark = pytest.mark.slicer


def test_torch_version_check(monkeypatch) -> None:
    module = _load_module_with_stand_ins(monkeypatch)
    check = module.torch_version_problem
    assert check("2.4.1+cu121") is None and check("2.1.0") is None and check("3.0") is None
    assert "too old" in check("2.0.1+cpu") and "too old" in check("1.13.1")
    assert check(None) == "PyTorch is not installed"
    assert "unreadable" in check("nightly")
    assert check("2.10.0.dev20260101") is None, "2.10 is newer than 2.1 (not a string comparison)"


def test_segment_editor_receives_one_undo_state_per_fob_action(mrml, data_dir: Path, monkeypatch) -> None:  # noqa: F811
    """The module's Logic passes _segmentEditorSaveState: the Segment Editor saves a state before each FoB
    write when it works on that segmentation (or on none), never for another segmentation."""
    scene, logics = mrml
    module = _load_module_with_stand_ins(monkeypatch)

    class FakeEditor:
        def __init__(self, node) -> None:
            self.node, self.saved = node, 0

        def segmentationNode(self):
            return self.node

        def setSegmentationNode(self, node) -> None:
            self.node = node

        def saveStateForUndo(self) -> None:
            self.saved += 1

    editor = FakeEditor(None)
    representation = types.SimpleNamespace(self=lambda: types.SimpleNamespace(editor=editor))
    monkeypatch.setattr(slicer.modules, "segmenteditor",
                        types.SimpleNamespace(widgetRepresentation=lambda: representation), raising=False)
    engine = module.FoBSegmentLogic().engine
    vol = logics["volumes"].AddArchetypeVolume(str(data_dir / "chaos_mr_t2spir" / "image_2.nii.gz"), "v")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    sid = seg.GetSegmentation().AddEmptySegment("a", "a")
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other")
    square = np.zeros((256, 256), bool)
    square[100:120, 100:120] = True
    engine.write_slices(vol, seg, sid, {5: square}, 0)
    assert editor.saved == 1 and editor.node is seg, "an idle editor is given the segmentation FoB writes"
    editor.node = other
    engine.write_slices(vol, seg, sid, {6: square}, 0)
    assert editor.saved == 1, "the editor's history of another segmentation is left alone"
    editor.node = seg
    engine.write_slices(vol, seg, sid, {7: square}, 0)
    assert editor.saved == 2
    monkeypatch.delattr(slicer.modules, "segmenteditor")
    engine.write_slices(vol, seg, sid, {8: square}, 0)  # no Segment Editor (headless): no error
    assert engine.undo(seg)


def _kidney_outlined(mrml, data_dir: Path, names: tuple[str, ...]) -> types.SimpleNamespace:  # noqa: F811
    """CHAOS MR 2 in the scene and, in one segmentation per name, its right kidney outlined on the
    middle slice of its range (the reference's)."""
    scene, logics = mrml
    folder = data_dir / "chaos_mr_t2spir"
    vol = logics["volumes"].AddArchetypeVolume(str(folder / "image_2.nii.gz"), "v")
    label = logics["volumes"].AddArchetypeVolume(str(folder / "label_2.nii.gz"), "l", 1)
    kidney = fob_mrml.volume_array(label) == 2
    scene.RemoveNode(label)
    logic = FoBSegmentLogic(scene)
    axis = logic.slice_axis(vol)
    zs = nonempty_slices(kidney, axis)
    z0 = zs[len(zs) // 2]
    support = np.zeros_like(kidney)
    put_slice(support, axis, z0, take_slice(kidney, axis, z0))
    segs = {}
    for name in names:
        seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
        sid = seg.GetSegmentation().AddEmptySegment("kidney", "kidney")
        fob_mrml.set_segment_mask(seg, sid, vol, support)
        segs[name] = (seg, sid)
    return types.SimpleNamespace(logic=logic, vol=vol, axis=axis, zs=zs, z0=z0, support=support, segs=segs)


def test_fob_preview_is_the_propagation_and_segment_gives_its_mask(mrml, data_dir: Path) -> None:  # noqa: F811
    """Predict prompts runs the job Propagate runs (FoB's points and its mask prompt, cut by the graph
    cut, the chain's end rules), shows the prompts its slices received and stores its record: Segment,
    with no point moved, writes exactly the mask Propagate writes. Progress starts at 0 and Cancel
    stops the preview with nothing written."""
    from FoBSegmentLib.model import FoBPromptGenerator
    from FoBSegmentLib.propagation import PropagationCancelled
    from FoBSegmentLib.slicer import point_lists

    scene = mrml[0]
    k = _kidney_outlined(mrml, data_dir, ("preview", "propagate"))
    logic, vol, z0, support = k.logic, k.vol, k.z0, k.support
    kw = {"prompts_from": "fob", "segmenter": "graphcut", "generator": FoBPromptGenerator.load()}
    (seg, sid), (seg2, sid2) = k.segs["preview"], k.segs["propagate"]

    progress: list[tuple[int, int]] = []
    with pytest.raises(PropagationCancelled):
        logic.predict_prompts(vol, seg, sid, progress=lambda d, t, s="": progress.append((d, t)),
                              cancel=lambda: len(progress) >= 3, **kw)
    assert progress[0][0] == 0 and not logic.prompt_point_lists(vol, seg, sid, create=False)
    assert np.array_equal(fob_mrml.segment_mask(seg, sid, vol), support)

    shown = logic.predict_prompts(vol, seg, sid, **kw)
    assert shown and z0 not in shown
    assert np.array_equal(fob_mrml.segment_mask(seg, sid, vol), support), "a preview writes nothing"
    record = point_lists.propagation_record(scene, seg, sid)
    assert record is not None and sorted(int(e["index"]) for e in record["slices"]) == sorted(shown)
    assert all("priorMask" in e for e in record["slices"]), "FoB's mask prompt is in the record"

    written = logic.segment_slices(vol, seg, sid, segmenter="graphcut")
    logic.propagate(vol, seg2, sid2, **kw)
    propagated = fob_mrml.segment_mask(seg2, sid2, vol)
    assert set(written) <= set(shown) and propagated.sum() > support.sum()
    assert np.array_equal(fob_mrml.segment_mask(seg, sid, vol), propagated)


def test_propagate_after_an_edited_preview_uses_the_edited_points(mrml, data_dir: Path) -> None:  # noqa: F811
    """Predict prompts, tighten the ring of one predicted slice and mark it reviewed, then Propagate:
    the volume is the one the points as shown give (Segment on every predicted slice writes the same
    mask), the edited slice differs from a fresh propagation's, and the reviewed slice still shows the
    points its mask came from. Without the edit, Propagate is the fresh job."""
    from FoBSegmentLib.propagation.document import prompt_fingerprint
    from FoBSegmentLib.slicer import point_lists

    scene = mrml[0]
    k = _kidney_outlined(mrml, data_dir, ("edited", "segmented", "fresh"))
    logic, vol, axis, zs, z0, segs = k.logic, k.vol, k.axis, k.zs, k.z0, k.segs
    kw = {"prompts_from": "neighbour", "segmenter": "graphcut"}

    z1 = z0 + 2
    for name in ("edited", "segmented"):
        seg, sid = segs[name]
        shown = logic.predict_prompts(vol, seg, sid, **kw)
        assert z1 in shown and z0 - 2 in shown
        ps = shown[z1]
        centre = ps.background.mean(axis=0)
        tighter = type(ps)(background=ps.background + 0.35 * (centre - ps.background), foreground=ps.foreground)
        logic.show_prompts(vol, seg, sid, {z1: tighter}, axis)
        logic.set_reviewed(vol, seg, sid, [z1])
    result = logic.propagate(vol, *segs["edited"], **kw)
    assert any("edited" in n for n in result.notes), result.notes
    logic.segment_slices(vol, *segs["segmented"], slices=sorted(shown), segmenter="graphcut")
    logic.propagate(vol, *segs["fresh"], **kw)
    edited, segmented, fresh = (fob_mrml.segment_mask(*segs[n], vol) for n in ("edited", "segmented", "fresh"))

    assert np.array_equal(edited, segmented), "Propagate writes what Segment writes from the same points"
    assert take_slice(edited, axis, z1).sum() < take_slice(fresh, axis, z1).sum(), "the tighter ring took part"
    below = [z for z in zs if z < z0]
    assert all(np.array_equal(take_slice(edited, axis, z), take_slice(fresh, axis, z)) for z in below)
    # the reviewed slice shows the points its mask came from, and the stored record says so
    now = logic.read_prompts(vol, *segs["edited"], axis)
    assert np.allclose(now[z1].background, tighter.background)
    record = point_lists.propagation_record(scene, *segs["edited"])
    entry = next(e for e in record["slices"] if int(e["index"]) == z1)
    assert entry["prompts"] == prompt_fingerprint(now[z1])

    # an unedited preview: Propagate runs the fresh job (no replay note), with the fresh job's mask
    seg, sid = segs["fresh"]
    logic.predict_prompts(vol, seg, sid, **kw)
    again = logic.propagate(vol, seg, sid, **kw)
    assert not any("edited" in n for n in again.notes)
    assert np.array_equal(fob_mrml.segment_mask(seg, sid, vol), fresh)
