"""The shape-prior graph cut (segmenters/graphcut.py) on real CHAOS MR slices.

Floors sit a few points under what was measured with these implementations, so a regression fails
while numeric noise does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import dice

from FoBSegmentLib.evaluate import propagation as PR
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.propagation import PropagationConfig, config_for_modality, prompts_from_mask
from FoBSegmentLib.segmenters import get_segmenter
from FoBSegmentLib.segmenters.grabcut import GrabCutSegmenter
from FoBSegmentLib.segmenters.graphcut import AppearanceModel, GraphCutSegmenter


@pytest.fixture(scope="module")
def patient1(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """CHAOS patient 1 as `fob segment` normalises it: image [k, j, i] float in [0, 1], labels [k, j, i]."""
    case = PR.list_cases("chaos", folder=data_dir / "chaos_mr_t2spir", ids=["1"])[0]
    prepared = PR.prepare_volume(case.image)
    assert prepared.axis == 0
    return prepared.normalised, PR.read_reference(case.label, prepared)


def _chain_steps(image: np.ndarray, ref: np.ndarray, seg, cfg: PropagationConfig) -> list[float]:
    """Dice of every slice of the organ segmented from the TRUE mask of the slice towards the middle."""
    zs = np.nonzero(ref.any(axis=(1, 2)))[0]
    mid = (zs[0] + zs[-1]) // 2
    if hasattr(seg, "fit_reference"):
        seg.fit_reference(image[mid], ref[mid])
    out = []
    for z in range(zs[0] + 1, zs[-1]):
        if z == mid:
            continue
        prev = ref[z - 1] if z > mid else ref[z + 1]
        ps = prompts_from_mask(prev, cfg)
        out.append(dice(seg.segment(image[z], ps).mask, ref[z]))
    return out


def test_one_chain_step_from_the_true_neighbouring_mask(patient1) -> None:
    """Every inner slice of patient 1's liver and kidneys segmented from the TRUE mask of the slice
    towards the middle (one step of the propagation chain, no compounding)."""
    image, labels = patient1
    cfg = config_for_modality(None, "mr")
    for organ in (1, 2, 3):
        ours = float(np.mean(_chain_steps(image, labels == organ, GraphCutSegmenter(), cfg)))
        print(f"organ {organ}: graphcut {ours:.3f}")
        # Measured 0.919 / 0.951 / 0.942 (GrabCut with the same prompts: 0.911 / 0.958 / 0.971): one
        # step is no better than GrabCut's; the gain is that the chain does not drift (next test).
        assert ours > 0.89


def test_chain_keeps_a_heterogeneous_liver_where_grabcut_collapses(data_dir: Path) -> None:
    """Patient 2's liver from its middle slice through `fob segment`'s neighbour chain: GrabCut
    re-learns its colours on every slice and hands the liver to the background; graphcut keeps the
    annotated slice's appearance."""
    case = PR.list_cases("chaos", folder=data_dir / "chaos_mr_t2spir", ids=["2"])[0]
    ours = PR.evaluate_case(case, [1], ["neighbour"], PR.Runtime(segmenter=GraphCutSegmenter())).records[0]["dice"]
    theirs = PR.evaluate_case(case, [1], ["neighbour"], PR.Runtime(segmenter=GrabCutSegmenter())).records[0]["dice"]
    print(f"patient 2 liver: graphcut {ours:.3f}, grabcut {theirs:.3f}")
    # Measured 0.811 against 0.652 (GrabCut through the same chain, prompts and stopping rules;
    # patients 8, 15, 39: 0.714 / 0.840 / 0.896 against 0.556 / 0.780 / 0.738).
    assert ours > 0.76
    assert ours > theirs + 0.1


def test_without_prior_or_reference_it_is_grabcut(patient1) -> None:
    image, labels = patient1
    ref = labels == 1
    z = int(np.argmax(ref.sum(axis=(1, 2))))
    ps = prompts_from_mask(ref[z], PropagationConfig(shape_prior=False))
    assert ps is not None and ps.prior_mask is None
    seg = GraphCutSegmenter()
    seg.fit_reference(image[z], ref[z])
    assert np.array_equal(seg.segment(image[z + 1], ps).mask, GrabCutSegmenter().segment(image[z + 1], ps).mask)
    with_prior = prompts_from_mask(ref[z], PropagationConfig())
    seg.clear_reference()
    assert np.array_equal(seg.segment(image[z + 1], with_prior).mask,
                          GrabCutSegmenter().segment(image[z + 1], with_prior).mask)


def test_prompts_are_hard_constraints_and_results_repeat(patient1) -> None:
    image, labels = patient1
    ref = labels == 2
    z = int(np.argmax(ref.sum(axis=(1, 2))))
    seg = get_segmenter("graphcut")
    seg.fit_reference(image[z], ref[z])
    ps = prompts_from_mask(ref[z], PropagationConfig(n_foreground=6))
    a = seg.segment(image[z + 1], ps)
    b = seg.segment(image[z + 1], ps)
    assert np.array_equal(a.mask, b.mask) and a.score == b.score
    assert a.mask.dtype == bool and a.mask.shape == ref[z].shape
    assert 0.0 < a.score <= 1.0 and a.logits is not None and a.logits.shape == ref[z].shape
    fg = np.rint(ps.foreground).astype(int)
    bg = np.rint(ps.background).astype(int)
    assert a.mask[fg[:, 1], fg[:, 0]].all()
    assert not a.mask[bg[:, 1], bg[:, 0]].any()
    # Nothing farther than max_grow px from the prior is ever foreground.
    from scipy import ndimage

    far = ndimage.distance_transform_edt(~ref[z]) > seg.max_grow
    assert not (a.mask & far).any()
    # A reach (`propagation.neighbour.gap_step`) bounds the organ further; one that misses the prior's
    # neighbourhood altogether is ignored rather than emptying the slice.
    seg.reach = np.zeros_like(ref[z])
    seg.reach[:, : int(np.median(np.nonzero(ref[z])[1]))] = True
    half = seg.segment(image[z + 1], PromptSet(ps.background, np.zeros((0, 2)), prior_mask=ps.prior_mask)).mask
    assert half.any() and not (half & ~seg.reach).any()
    seg.reach = ndimage.distance_transform_edt(~ref[z]) > seg.max_grow + 1
    assert np.array_equal(seg.segment(image[z + 1], ps).mask, a.mask)


def test_appearance_model_separates_the_organ(patient1) -> None:
    image, labels = patient1
    ref = labels == 1
    z = int(np.argmax(ref.sum(axis=(1, 2))))
    model = AppearanceModel().fit(image[z], ref[z])
    ratio = model.log_ratio(image[z + 1])
    near = ref[z + 1]
    # On the next slice most liver pixels look like liver and most of its surroundings do not.
    assert (ratio[near] > 0).mean() > 0.8
    assert dice(ratio > 0, near) > 0.5


def test_bad_input_is_refused(patient1) -> None:
    image, labels = patient1
    ref = labels == 3
    z = int(np.argmax(ref.sum(axis=(1, 2))))
    seg = GraphCutSegmenter()
    with pytest.raises(ValueError, match="reference mask has shape"):
        seg.fit_reference(image[z], ref[z][:10])
    with pytest.raises(ValueError, match="at least 5 organ"):
        seg.fit_reference(image[z], np.zeros_like(ref[z]))
    with pytest.raises(ValueError, match="NaN"):
        bad = image[z].copy()
        bad[0, 0] = np.nan
        seg.fit_reference(bad, ref[z])
    seg.fit_reference(image[z], ref[z])
    ps = prompts_from_mask(ref[z], PropagationConfig())
    with pytest.raises(ValueError, match="prior_mask has shape"):
        seg.segment(image[z], PromptSet(background=ps.background, foreground=ps.foreground, prior_mask=ref[z][:20]))
    with pytest.raises(ValueError, match="prior_mask must be an"):
        PromptSet(background=ps.background, prior_mask=np.full(ref[z].shape, 0.5))
    for bad_option in ({"smoothness": -1.0}, {"grow_weight": float("nan")}, {"max_grow": 0}, {"bins": 2}):
        with pytest.raises(ValueError):
            GraphCutSegmenter(**bad_option)


def test_the_surroundings_ring_grows_with_the_organ() -> None:
    """The ring the appearance model learns the surroundings from is band_scale x the organ's
    equivalent radius per annotated slice, within [MIN_BAND, band]; band_scale 0 keeps a fixed ring."""
    from FoBSegmentLib.segmenters.graphcut import MIN_BAND

    seg = GraphCutSegmenter()
    small, kidney, liver = np.pi * 5**2, np.pi * 15**2, np.pi * 60**2
    assert seg.surroundings_band(small) == MIN_BAND
    assert seg.surroundings_band(kidney) == 30
    assert seg.surroundings_band(liver) == seg.band == 40
    assert GraphCutSegmenter(band_scale=0, band=20).surroundings_band(liver) == 20
    # Two annotated slices side by side: the ring follows the organ's size on one slice.
    image = np.zeros((64, 256), np.float32)
    mask = np.zeros((64, 256), bool)
    for c in (64, 192):
        yy, xx = np.ogrid[:64, :256]
        mask |= (yy - 32) ** 2 + (xx - c) ** 2 <= 15**2
    image[mask] = 0.8
    seg.fit_reference(image, mask, slices=2)
    assert seg.reference.band == seg.surroundings_band(mask.sum() / 2)
    with pytest.raises(ValueError, match="band_scale"):
        GraphCutSegmenter(band_scale=-1)


def test_an_organ_sized_ring_keeps_the_left_kidney_out_of_the_spleen(data_dir: Path) -> None:
    """CHAOS 31's left kidney from its middle slice: with a fixed 20-px ring the appearance model
    never saw the spleen, which lies farther than that on the annotated slice, and the chain ran on
    into it; the organ-sized ring learns it as surroundings. With the prior left where it lay (as
    measured then): a prior moved with the organ (`moved_prior`) keeps this chain out of the spleen
    with either ring (0.903 / 0.896), so the ring is tested apart from it."""
    from FoBSegmentLib.propagation import PropagationConfig

    case = PR.list_cases("chaos", folder=data_dir / "chaos_mr_t2spir", ids=["31"])[0]

    def still() -> PropagationConfig:
        return PropagationConfig(moved_prior=False)

    fixed = PR.evaluate_case(case, [3], ["neighbour"], PR.Runtime(segmenter=GraphCutSegmenter(band_scale=0, band=20),
                                                                  config_factory=still))
    sized = PR.evaluate_case(case, [3], ["neighbour"], PR.Runtime(segmenter=GraphCutSegmenter(), config_factory=still))
    before, after = fixed.records[0]["dice"], sized.records[0]["dice"]
    print(f"CHAOS 31 left kidney: fixed ring {before:.3f}, organ-sized ring {after:.3f}")
    # Measured 0.626 -> 0.847.
    assert after > 0.8
    assert after > before + 0.15


def test_outliers_learnt_as_surroundings_turn_the_look_against_them(patient1) -> None:
    """CHAOS 1's spleen with a 4-px ring of its surroundings drawn as organ too (a leak):
    `outliers` finds pixels of other intensities, nearly all on the leak, and a look fitted with them
    excluded (`fit_reference(exclude=...)`) scores them as surroundings, where the plain fit calls
    them organ; the spleen itself stays organ."""
    import cv2

    image, labels = patient1
    ref = labels == 4
    z = int(np.argmax(ref.sum(axis=(1, 2))))
    grown = cv2.dilate(ref[z].astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    seg = GraphCutSegmenter()
    out = seg.outliers(image[z], grown, 2.5)
    assert out.sum() > 100 and (out & ~ref[z]).sum() > 0.95 * out.sum()  # measured 442 px, 441 on the leak
    seg.fit_reference(image[z], grown)
    plain = seg.reference.log_ratio(image[z])
    seg.fit_reference(image[z], grown, exclude=out)
    trimmed = seg.reference.log_ratio(image[z])
    assert (plain[out] > 0).mean() > 0.8 and (trimmed[out] > 0).mean() < 0.2  # measured 0.93 -> 0.06
    assert (trimmed[ref[z]] > 0).mean() > 0.95
    with pytest.raises(ValueError, match="exclude mask has shape"):
        seg.fit_reference(image[z], grown, exclude=out[:10])
