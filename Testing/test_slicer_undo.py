"""Undo that keeps the user's work (issue 18, defect 1), one-slice live writes (defect 4) and freeing the
Logic's caches (defect 7), on a real headless MRML scene (slicer-core) with real CHAOS MR data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from slicer_fixtures import mrml  # noqa: E402,F401  (pytest fixture)

from FoBSegmentLib.io.coords import put_slice, take_slice  # noqa: E402
from FoBSegmentLib.labelmap import nonempty_slices  # noqa: E402
from FoBSegmentLib.slicer import mrml as fob_mrml  # noqa: E402
from FoBSegmentLib.slicer.logic import FoBSegmentLogic  # noqa: E402

pytestmark = pytest.mark.slicer

LIVER = 1


class Scene:
    """CHAOS MR patient 2 read by Slicer's reader, a segmentation with an empty liver and an empty
    second segment ("other", the one the user paints in the Segment Editor)."""

    def __init__(self, scene, logics, data_dir: Path, undo_callback=None) -> None:
        folder = data_dir / "chaos_mr_t2spir"
        self.volume = logics["volumes"].AddArchetypeVolume(str(folder / "image_2.nii.gz"), "chaos2")
        label = logics["volumes"].AddArchetypeVolume(str(folder / "label_2.nii.gz"), "reference", 1)
        self.liver = fob_mrml.volume_array(label) == LIVER
        scene.RemoveNode(label)
        self.logic = FoBSegmentLogic(scene, undo_callback=undo_callback)
        self.axis = self.logic.slice_axis(self.volume)
        self.seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
        self.seg.SetReferenceImageGeometryParameterFromVolumeNode(self.volume)
        self.liver_id = self.seg.GetSegmentation().AddEmptySegment("liver", "liver")
        self.other_id = self.seg.GetSegmentation().AddEmptySegment("other", "other")
        self.slices = nonempty_slices(self.liver, self.axis)

    def mask(self, segment_id: str) -> np.ndarray:
        return fob_mrml.segment_mask(self.seg, segment_id, self.volume)

    def fob_writes(self, z: int) -> None:
        """A FoB action: the liver's reference outline written on slice z (one undo step)."""
        self.logic.write_slices(self.volume, self.seg, self.liver_id, {z: take_slice(self.liver, self.axis, z)},
                                self.axis)

    def user_paints(self, n: int = 100) -> np.ndarray:
        """What a Segment Editor effect does: n voxels of the other segment set, outside FoB's Logic."""
        painted = self.mask(self.other_id)
        flat = np.flatnonzero(~painted & ~self.liver)[:n]
        painted.reshape(-1)[flat] = True
        fob_mrml.set_segment_mask(self.seg, self.other_id, self.volume, painted)
        return painted


@pytest.fixture
def s(mrml, data_dir: Path) -> Scene:  # noqa: F811
    scene, logics = mrml
    return Scene(scene, logics, data_dir)


def test_undo_refuses_after_the_user_painted_and_keeps_the_paint(s: Scene) -> None:
    """The issue's probe: FoB writes the liver, the user paints 100 voxels of another segment, FoB undo.
    Before the fix the other segment had 0 voxels afterwards; now the undo is refused and nothing changes."""
    z = s.slices[len(s.slices) // 2]
    s.fob_writes(z)
    written = s.mask(s.liver_id)
    assert take_slice(written, s.axis, z).any()
    painted = s.user_paints(100)
    assert int(s.mask(s.other_id).sum()) == 100
    ok, why = s.logic.can_undo(s.seg)
    assert not ok and "Segment Editor" in why
    with pytest.raises(ValueError, match="changed after FoB's last action"):
        s.logic.undo(s.seg)
    assert np.array_equal(s.mask(s.other_id), painted), "the user's 100 voxels are kept"
    assert np.array_equal(s.mask(s.liver_id), written), "a refused undo changes nothing"


def test_undo_still_works_when_nothing_else_changed_and_stops_at_an_edit(s: Scene) -> None:
    """FoB action 1, a paint, FoB actions 2 and 3: undo 3 and 2 (nothing changed after them), then undo 1
    is refused because the paint came after it; redo is refused once the segmentation changed again."""
    z1, z2, z3 = s.slices[2], s.slices[4], s.slices[6]
    empty = s.mask(s.liver_id)
    s.fob_writes(z1)
    after1 = s.mask(s.liver_id)
    painted = s.user_paints(50)
    s.fob_writes(z2)
    after2 = s.mask(s.liver_id)
    s.fob_writes(z3)
    assert s.logic.undo(s.seg)
    assert np.array_equal(s.mask(s.liver_id), after2)
    assert s.logic.redo(s.seg) and s.logic.undo(s.seg)
    assert s.logic.undo(s.seg)
    assert np.array_equal(s.mask(s.liver_id), after1)
    assert np.array_equal(s.mask(s.other_id), painted)
    with pytest.raises(ValueError):
        s.logic.undo(s.seg)  # would remove the paint together with action 1
    assert np.array_equal(s.mask(s.other_id), painted) and not np.array_equal(after1, empty)
    s.user_paints(10)
    assert not s.logic.redo(s.seg), "redo after an edit would discard it"
    assert int(s.mask(s.other_id).sum()) == 60


def test_each_fob_action_is_one_step_of_the_editors_undo(mrml, data_dir: Path) -> None:  # noqa: F811
    """The widget passes the Segment Editor's saveStateForUndo as undo_callback: it is called once per FoB
    action with the segmentation written, before the write (so the editor's Undo restores the state before)."""
    scene, logics = mrml
    calls: list[tuple[str, int]] = []
    holder: dict[str, Scene] = {}

    def editor_save_state(segmentation) -> None:
        calls.append((segmentation.GetID(), int(holder["s"].mask(holder["s"].liver_id).sum())))

    s = holder["s"] = Scene(scene, logics, data_dir, undo_callback=editor_save_state)
    z = s.slices[3]
    s.fob_writes(z)
    assert calls == [(s.seg.GetID(), 0)], "one editor undo state, saved before the write"
    s.fob_writes(z)  # the same mask again: nothing written, no undo state
    assert len(calls) == 1
    assert s.logic.undo(s.seg), "FoB's own Undo works beside the editor's"


def test_cancelled_live_run_keeps_what_the_user_painted_meanwhile(s: Scene) -> None:
    """A live propagation is cancelled after the user painted during the run: the rollback removes the
    slices the run wrote and nothing else (an Undo of the whole run would have removed the paint)."""
    from FoBSegmentLib.propagation import PropagationCancelled

    z0 = s.slices[len(s.slices) // 2]
    support = np.zeros_like(s.liver)
    put_slice(support, s.axis, z0, take_slice(s.liver, s.axis, z0))
    fob_mrml.set_segment_mask(s.seg, s.liver_id, s.volume, support)
    seen: list[int] = []
    painted: dict[str, np.ndarray] = {}

    def on_slice(z: int, mask: np.ndarray) -> None:
        seen.append(z)
        if len(seen) == 2:
            painted["other"] = s.user_paints(100)

    with pytest.raises(PropagationCancelled):
        s.logic.propagate(s.volume, s.seg, s.liver_id, live=True, on_slice=on_slice, cancel=lambda: len(seen) >= 3,
                          slice_range=(z0 - 4, z0 + 4), prompts_from="neighbour", segmenter="grabcut")
    assert len(seen) == 3
    assert np.array_equal(s.mask(s.liver_id), support), "the run's slices are removed"
    assert np.array_equal(s.mask(s.other_id), painted["other"]), "the paint made during the run stays"
    with pytest.raises(ValueError):
        s.logic.undo(s.seg)  # the run's undo state predates the paint


@pytest.mark.parametrize("axis", [0, 1, 2], ids=["k", "j", "i"])
def test_one_slice_write_touches_that_slice_only(s: Scene, axis: int) -> None:
    """The live write (`mrml.set_segment_slice`): along k, j or i, only that slice of that segment changes,
    also where another segment overlaps it in a shared layer."""
    rng = np.random.default_rng(axis)
    liver = s.liver.copy()
    other = rng.random(liver.shape) < 0.02
    fob_mrml.set_segment_mask(s.seg, s.liver_id, s.volume, liver)
    fob_mrml.set_segment_mask(s.seg, s.other_id, s.volume, other)
    n = liver.shape[axis]
    for z in (0, n // 2, n - 1):
        new = rng.random(take_slice(liver, axis, z).shape) < 0.3
        fob_mrml.set_segment_slice(s.seg, s.liver_id, s.volume, axis, z, new)
        put_slice(liver, axis, z, new)
        assert np.array_equal(s.mask(s.liver_id), liver), (axis, z)
        assert np.array_equal(s.mask(s.other_id), other)
    with pytest.raises(ValueError, match="does not match"):
        fob_mrml.set_segment_slice(s.seg, s.liver_id, s.volume, axis, 0, np.zeros((3, 3), bool))


def test_release_frees_the_caches_of_a_closed_scene(s: Scene) -> None:
    """On scene close the widget calls release(): prepared float32 volumes, histories, segmenters go."""
    s.logic.normalised_image(s.volume)
    s.logic.get_segmenter("grabcut")
    s.fob_writes(s.slices[1])
    assert s.logic._images and s.logic._segmenters and s.logic._histories
    s.logic.release()
    assert not (s.logic._images or s.logic._segmenters or s.logic._histories or s.logic._generators)
    assert not s.logic.undo(s.seg), "nothing to undo after release"


def test_show_3d_and_display_changes_are_not_edits(s: Scene) -> None:
    """After a propagation the widget shows the segmentation in 3D (closed surface); hiding a segment or
    changing its colour is no edit either: FoB's Undo must still work after those."""
    s.seg.CreateDefaultDisplayNodes()
    z = s.slices[3]
    s.fob_writes(z)
    assert s.seg.CreateClosedSurfaceRepresentation()
    s.seg.GetDisplayNode().SetSegmentVisibility(s.other_id, False)
    s.seg.GetSegmentation().GetSegment(s.liver_id).SetColor(0.2, 0.9, 0.1)
    assert s.logic.can_undo(s.seg) == (True, "")
    assert s.logic.undo(s.seg)
    assert not s.mask(s.liver_id).any()
