"""The organ's motion between neighbouring slices (`propagation.motion`), on real data: the prior a
chain outward draws from the previous slice's mask, carried by the optical flow between the slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from FoBSegmentLib import propagation as P
from FoBSegmentLib.evaluate.datasets import list_cases
from FoBSegmentLib.evaluate.metrics import dice
from FoBSegmentLib.evaluate.propagation import prepare_volume, read_reference
from FoBSegmentLib.job import Components, JobSettings, build_job
from FoBSegmentLib.propagation.motion import move_mask
from FoBSegmentLib.segmenters.graphcut import GraphCutSegmenter

RIGHT_KIDNEY, LEFT_KIDNEY = 2, 3


@pytest.fixture(scope="module")
def kidney(data_dir: Path):
    case = list_cases("chaos", ids=["2"])[0]
    prepared = prepare_volume(case.image)
    return prepared, read_reference(case.label, prepared) == LEFT_KIDNEY


def test_a_moved_mask_lies_nearer_the_next_slices_organ(kidney) -> None:
    prepared, ref = kidney
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    still, moved = [], []
    for z in zs[:-1]:
        still.append(dice(ref[z], ref[z + 1]))
        moved.append(dice(move_mask(ref[z], prepared.normalised[z], prepared.normalised[z + 1]), ref[z + 1]))
    # CHAOS MR 2's left kidney, its 13 pairs of neighbouring slices: 0.824 -> 0.881, closer on 11.
    assert np.mean(moved) >= np.mean(still) + 0.03, (np.mean(still), np.mean(moved))
    assert sum(m > s for m, s in zip(moved, still)) >= 0.75 * len(still)
    # The same slices give the same mask (a replay rebuilds the prior this way), an empty mask stays empty.
    z = int(zs[len(zs) // 2])
    again = move_mask(ref[z], prepared.normalised[z], prepared.normalised[z + 1])
    assert np.array_equal(again, move_mask(ref[z], prepared.normalised[z], prepared.normalised[z + 1]))
    assert not move_mask(np.zeros_like(ref[z]), prepared.normalised[z], prepared.normalised[z + 1]).any()


def test_the_chains_move_their_prior_but_from_a_tip_and_a_replay_gives_the_mask_back() -> None:
    """CHAOS MR 8's right kidney drawn on its two end slices: the chains from the tips keep the prior
    where it lay; those from the body seed between them move it; off, none does."""
    case = list_cases("chaos", ids=["8"])[0]
    prepared = prepare_volume(case.image)
    ref = read_reference(case.label, prepared) == RIGHT_KIDNEY
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    support = np.zeros(ref.shape, bool)
    support[[zs[0], zs[-1]]] = ref[[zs[0], zs[-1]]]
    comps = Components(None, GraphCutSegmenter(), "neighbour")
    priors = {}
    for name, cfg in (("tips", P.PropagationConfig(tip_consensus=None, body_seed=False)), ("default", None),
                      ("off", P.PropagationConfig(moved_prior=False))):
        job = build_job(prepared, support, JobSettings(prompts_from="neighbour", config=cfg), components=comps)
        result = job.run()
        priors[name] = {(rep.look, rep.prior) for rep in result.slices.values()
                        if rep.source == "neighbour" and rep.parent is not None}
        if name == "default":
            assert np.array_equal(job.with_prompts(result.prompts, result.record).run().mask, result.mask)
    assert priors["tips"] == {("tip", "parent")}, priors
    assert ("parent", "moved") in priors["default"] and all(p == "moved" for _, p in priors["default"]), priors
    assert all(p == "parent" for _, p in priors["off"]), priors
