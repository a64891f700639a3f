"""The module file's helpers and the worker's prediction loop (issue 18, defect 8 and defect 1's editor
side): the torch version check, the Segment Editor undo callback, progress and Cancel of a FoB prediction.
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
from FoBSegmentLib.prompts import PromptSet  # noqa: E402
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


def test_fob_prediction_reports_progress_and_stops_on_cancel_between_chunks(mrml, data_dir: Path) -> None:  # noqa: F811
    """compute_prompts works in chunks of PROMPT_CHUNK slices: progress from 0, Cancel honoured after a
    chunk, so even a long or one-slice FoB prediction can be followed and stopped."""
    from FoBSegmentLib.propagation import PropagationCancelled
    from FoBSegmentLib.slicer.worker import PROMPT_CHUNK

    scene, logics = mrml
    folder = data_dir / "chaos_mr_t2spir"
    vol = logics["volumes"].AddArchetypeVolume(str(folder / "image_2.nii.gz"), "v")
    label = logics["volumes"].AddArchetypeVolume(str(folder / "label_2.nii.gz"), "l", 1)
    liver = fob_mrml.volume_array(label) == 1
    scene.RemoveNode(label)
    logic = FoBSegmentLogic(scene)
    axis = logic.slice_axis(vol)
    z0 = nonempty_slices(liver, axis)[len(nonempty_slices(liver, axis)) // 2]
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    sid = seg.GetSegmentation().AddEmptySegment("liver", "liver")
    support = np.zeros_like(liver)
    put_slice(support, axis, z0, take_slice(liver, axis, z0))
    fob_mrml.set_segment_mask(seg, sid, vol, support)

    calls: list[int] = []

    class CountingGenerator:  # what a FoB model does, minus the network: a ring at the image's edge
        def predict(self, support_image, support_mask, image):
            calls.append(1)
            h, w = image.shape[:2]
            ring = np.array([[2.0, 2.0], [w - 3.0, 2.0], [w - 3.0, h - 3.0], [2.0, h - 3.0]])
            return PromptSet(background=ring, foreground=np.array([[w / 2.0, h / 2.0]]))

    job = logic.prepare_propagation(vol, seg, sid, prompts_from="fob", generator=CountingGenerator(),
                                    segmenter="grabcut")
    n = liver.shape[axis] - 1
    assert n > 2 * PROMPT_CHUNK
    progress: list[tuple[int, int]] = []
    with pytest.raises(PropagationCancelled):
        logic.compute_prompts(job, progress=lambda d, t, s="": progress.append((d, t)),
                              cancel=lambda: len(calls) >= PROMPT_CHUNK)
    assert progress[0] == (0, n) and progress[-1] == (PROMPT_CHUNK, n) and len(calls) == PROMPT_CHUNK
    calls.clear()
    prompts = logic.compute_prompts(job)
    assert len(prompts) == n == len(calls) and z0 not in prompts
