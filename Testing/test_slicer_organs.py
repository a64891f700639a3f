"""Several organs in one go (issue 18, "also build"): a segmentation whose segments each hold an outline
on one slice propagates each into its own segment, as ONE undo step; real CHAOS MR on headless MRML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from slicer_fixtures import chaos_volume, mrml, oblique_volume  # noqa: E402,F401  (pytest fixture)

from FoBSegmentLib.io.coords import put_slice, take_slice  # noqa: E402
from FoBSegmentLib.labelmap import dice, nonempty_slices  # noqa: E402
from FoBSegmentLib.slicer import mrml as fob_mrml  # noqa: E402
from FoBSegmentLib.slicer.logic import FoBSegmentLogic  # noqa: E402

pytestmark = pytest.mark.slicer

ORGANS = {"liver": 1, "spleen": 4}
RANGE_HALF = 3
# Measured with neighbour prompts + GrabCut over the 7 slices around each outline: liver 0.88, spleen 0.92.
RANGE_DICE_FLOOR = 0.80


def test_every_outlined_segment_propagates_into_itself_in_one_undo_step(mrml, data_dir: Path) -> None:  # noqa: F811
    scene, logics = mrml
    vol, reference = chaos_volume(scene, logics, data_dir)
    logic = FoBSegmentLogic(scene)
    axis = logic.slice_axis(vol)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organs")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    ids, outlines, seeds = {}, {}, {}
    for name, value in ORGANS.items():
        ids[name] = seg.GetSegmentation().AddEmptySegment(name, name)
        truth = reference == value
        zs = nonempty_slices(truth, axis)
        seeds[name] = zs[len(zs) // 2]
        outline = np.zeros_like(truth)
        put_slice(outline, axis, seeds[name], take_slice(truth, axis, seeds[name]))
        fob_mrml.set_segment_mask(seg, ids[name], vol, outline)
        outlines[name] = outline
    empty = seg.GetSegmentation().AddEmptySegment("empty", "empty")
    assert sorted(logic.outlined_segments(vol, seg)) == sorted(ids.values()), "an empty segment is no organ"

    steps: list[tuple[int, int]] = []
    # one common range that covers both seeds' neighbourhoods
    lo = min(seeds.values()) - RANGE_HALF
    hi = max(seeds.values()) + RANGE_HALF
    results = logic.propagate_many(vol, seg, progress=lambda d, t, s="": steps.append((d, t)),
                                   slice_range=(lo, hi), prompts_from="neighbour", segmenter="grabcut")
    assert set(results) == set(ids.values())
    assert steps and steps[-1][0] == steps[-1][1], "progress counts the steps of every organ"
    for name, value in ORGANS.items():
        got = fob_mrml.segment_mask(seg, ids[name], vol)
        truth = reference == value
        near = [z for z in range(seeds[name] - RANGE_HALF, seeds[name] + RANGE_HALF + 1)]
        d = dice(np.stack([take_slice(got, axis, z) for z in near]), np.stack([take_slice(truth, axis, z) for z in near]))
        assert d >= RANGE_DICE_FLOOR, (name, d)
        assert len(nonempty_slices(got, axis)) > 1, f"{name} propagated into its own segment"
    assert not fob_mrml.segment_mask(seg, empty, vol).any()
    assert logic.undo(seg), "one undo step for the whole run"
    for name in ORGANS:
        assert np.array_equal(fob_mrml.segment_mask(seg, ids[name], vol), outlines[name])
    assert not logic._history(seg).IsRestorePreviousStateAvailable()
    with pytest.raises(ValueError, match="no segment holds an outline"):
        logic.propagate_many(vol, seg, segment_ids=[])
