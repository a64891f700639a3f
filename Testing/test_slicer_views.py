"""Issue 18, defects 2 and 5 on a real headless MRML scene (slicer-core):

* the "current slice" is the slice of the 2D view that shows voxel slices along the job's axis (k, j or
  i), the view the user last worked in first, not the Red view's centre;
* the slow parts (normalising the volume, loading the segmenter, segmenting) run in the part of a task
  the widget calls on its worker; the main-thread part only copies MRML.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from slicer_fixtures import chaos_volume, mrml, oblique_volume  # noqa: E402,F401  (pytest fixture)

from FoBSegmentLib.io.coords import put_slice, take_slice  # noqa: E402
from FoBSegmentLib.labelmap import nonempty_slices  # noqa: E402
from FoBSegmentLib.slicer import mrml as fob_mrml  # noqa: E402
from FoBSegmentLib.slicer.logic import FoBSegmentLogic  # noqa: E402

pytestmark = pytest.mark.slicer


def _oblique_volume(scene):
    t = np.eye(4)
    t[:3, :3] = [[np.cos(0.5), -np.sin(0.5), 0], [np.sin(0.5), np.cos(0.5), 0], [0, 0, 1]]
    t[:3, 3] = [20.0, -5.0, 12.0]
    return oblique_volume(scene, t)


def _view_on(logic: FoBSegmentLogic, vol, axis: int, z: int, offset_mm: float = 0.0) -> np.ndarray:
    """A SliceToRAS whose plane is voxel slice z along `axis` (what Rotate to volume plane gives),
    its origin moved in-plane by offset_mm (a panned view: the centre is not the slice's centre)."""
    centre = logic.slice_center(vol, z, axis)
    normal = logic.slice_center(vol, 1, axis) - logic.slice_center(vol, 0, axis)
    normal /= np.linalg.norm(normal)
    helper = np.array([1.0, 0.0, 0.0]) if abs(normal[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(helper, normal)
    x /= np.linalg.norm(x)
    y = np.cross(normal, x)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, normal, centre + offset_mm * x
    return m


def _n(vol, axis: int) -> int:
    return fob_mrml.volume_geometry(vol)[0].array_shape[axis]


@pytest.mark.parametrize("axis", [0, 1, 2], ids=["k", "j", "i"])
def test_current_slice_is_the_aligned_views_slice(mrml, axis: int) -> None:  # noqa: F811
    scene, _ = mrml
    vol = _oblique_volume(scene)
    logic = FoBSegmentLogic(scene)
    z = _n(vol, axis) // 2 + 1
    other = (axis + 1) % 3
    red_axial = np.eye(4)  # the default Red view: axial in world RAS, oblique to every voxel axis here
    views = {"Red": red_axial, "Yellow": _view_on(logic, vol, other, 3), "Green": _view_on(logic, vol, axis, z, 7.5)}
    assert logic.view_slice(vol, views, axis) == ("Green", z), "the view along the job's axis, panned or not"
    # the user works in Yellow, which now shows slices along the axis too: it wins over Green
    views["Yellow"] = _view_on(logic, vol, axis, z - 2)
    assert logic.view_slice(vol, views, axis, preferred="Yellow") == ("Yellow", z - 2)
    assert logic.view_slice(vol, views, axis, preferred="Red") == ("Yellow", z - 2), "Red is oblique"
    with pytest.raises(ValueError, match="no slice view shows voxel slices along"):
        logic.view_slice(vol, {"Red": red_axial}, axis)


def test_segmenting_runs_its_slow_part_off_the_main_thread(mrml, data_dir: Path, monkeypatch,  # noqa: F811
                                                           tmp_path: Path) -> None:
    """begin_* (main thread) copies MRML only; the returned computation normalises, loads the segmenter
    and segments on a worker thread; apply writes. The result equals the one-call path."""
    scene, logics = mrml
    folder = data_dir / "chaos_mr_t2spir"
    vol = logics["volumes"].AddArchetypeVolume(str(folder / "image_2.nii.gz"), "chaos2")
    label = logics["volumes"].AddArchetypeVolume(str(folder / "label_2.nii.gz"), "reference", 1)
    liver = fob_mrml.volume_array(label) == 1
    scene.RemoveNode(label)
    logic = FoBSegmentLogic(scene)
    axis = logic.slice_axis(vol)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    sid = seg.GetSegmentation().AddEmptySegment("liver", "liver")
    zs = nonempty_slices(liver, axis)
    z0 = zs[len(zs) // 2]
    support = np.zeros_like(liver)
    put_slice(support, axis, z0, take_slice(liver, axis, z0))
    fob_mrml.set_segment_mask(seg, sid, vol, support)

    build = logic.begin_propagation(vol, seg, sid, slice_range=(z0 - 2, z0 + 2), prompts_from="neighbour",
                                    segmenter="grabcut")
    assert not logic._images and not logic._segmenters, "nothing normalised or loaded on the main thread"
    out: dict = {}

    def on_worker() -> None:
        job = build()
        out["prompts"] = logic.run_propagation(job)
        out["job"] = job

    t = threading.Thread(target=on_worker)
    t.start()
    t.join(120)
    assert logic._images and logic._segmenters and out["prompts"]
    logic.show_job_prompts(out["job"], out["prompts"])
    # a cached image is not copied again: begin is cheap the second time
    logic.set_reviewed(vol, seg, sid, [z0 - 1, z0 + 1])
    task = logic.begin_segment(vol, seg, sid, segmenter="grabcut")
    assert task.slices == [z0 - 1, z0 + 1]
    progress: list = []
    t = threading.Thread(target=lambda: out.update(outcome=task.compute(lambda d, n, s: progress.append(d))))
    t.start()
    t.join(120)
    assert progress and progress == sorted(progress)
    written = logic.apply_segment(task, out["outcome"])
    got = fob_mrml.segment_mask(seg, sid, vol)
    for z in (z0 - 1, z0 + 1):
        assert np.array_equal(take_slice(got, axis, z), written[z]) and written[z].any()
    assert logic.undo(seg) and np.array_equal(fob_mrml.segment_mask(seg, sid, vol), support)
    assert logic.segment_slices(vol, seg, sid, segmenter="grabcut").keys() == written.keys()
    assert np.array_equal(fob_mrml.segment_mask(seg, sid, vol), got), "worker and one-call paths agree"
    with pytest.raises(ValueError, match="no prompts on slice"):
        logic.begin_segment(vol, seg, sid, [z0 + 9], segmenter="grabcut")
    # what `auto` chose is reported with the outcome (the widget shows it in the status line); an empty
    # cache, so that a SAM checkpoint on the machine running the tests is not loaded
    monkeypatch.setenv("FOB_CACHE", str(tmp_path))
    outcome = logic.begin_segment(vol, seg, sid, [z0 + 1], segmenter="auto", device="cpu").compute()
    assert any(n.startswith("auto: ") for n in outcome.notes)
    assert not any(n.startswith("auto: ") for n in logic.begin_segment(vol, seg, sid, [z0 + 1],
                                                                       segmenter="grabcut").compute().notes)
