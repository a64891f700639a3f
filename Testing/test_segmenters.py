"""Behaviour of the weight-free segmenters and the shared helpers on a real MR slice: frames, prompt
handling, background-only prompts, FoB's coarse probability as a prior, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import dice

from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.segmenters import SEGMENTER_NAMES, Segmenter, get_segmenter
from FoBSegmentLib.segmenters.base import (
    check_image,
    keep_seeded_components,
    ordered_ring,
    polygon_is_simple,
    polygon_mask,
    to_uint8_rgb,
)

WEIGHT_FREE = ["grabcut", "random-walker"]


@pytest.fixture(scope="module")
def spleen(data_dir: Path) -> tuple[np.ndarray, np.ndarray, PromptSet]:
    """CHAOS MR patient 2, the slice with most spleen, cropped to a non-square window (150 rows)."""
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / "image_2.nii.gz")))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / "label_2.nii.gz")))
    z = int((label == 4).sum(axis=(1, 2)).argmax())
    rows, cols = np.nonzero(label[z] == 4)
    r0, c0 = max(0, rows.min() - 40), max(0, cols.min() - 60)
    img = image[z, r0 : r0 + 150, c0 : c0 + 210].astype(np.float32)
    mask = label[z, r0 : r0 + 150, c0 : c0 + 210] == 4
    img = (img - img.min()) / (img.max() - img.min())
    from test_segmenters_quality import prompts_from_mask

    return img, mask, prompts_from_mask(mask)


@pytest.mark.parametrize("name", WEIGHT_FREE)
def test_mask_contract_and_frame(spleen, name):
    img, mask, prompts = spleen
    seg = get_segmenter(name)
    assert isinstance(seg, Segmenter) and seg.name == name
    result = seg.segment(img, prompts)
    assert result.mask.shape == img.shape and result.mask.dtype == bool and isinstance(result.score, float)
    assert 0.0 <= result.score <= 1.0
    assert dice(result.mask, mask) > 0.85
    # everything outside the ring's polygon is background; every foreground prompt is inside the mask
    poly = polygon_mask(ordered_ring(prompts.background), *img.shape)
    assert not np.any(result.mask & ~poly)
    fx, fy = np.rint(prompts.foreground).astype(int).T
    assert result.mask[fy, fx].all()
    # (x, y) frame: transposing the image and swapping x and y transposes the answer
    swapped = PromptSet(background=prompts.background[:, ::-1], foreground=prompts.foreground[:, ::-1])
    transposed = seg.segment(img.T.copy(), swapped)
    assert dice(transposed.mask.T, result.mask) > 0.95


def test_grey_and_replicated_rgb_agree(spleen):
    img, _, prompts = spleen
    seg = get_segmenter("grabcut")
    grey = seg.segment(img, prompts).mask
    rgb = seg.segment(np.repeat(img[..., None], 3, axis=2), prompts).mask
    assert np.array_equal(grey, rgb)
    # intensity range does not matter: the segmenters rescale each crop
    assert np.array_equal(seg.segment(img * 1200.0 - 300.0, prompts).mask, grey)


def test_background_only_prompts(spleen):
    """grabcut accepts a ring alone (the polygon is the hypothesis); random-walker needs a seed."""
    img, mask, prompts = spleen
    ring_only = PromptSet(background=prompts.background)
    result = get_segmenter("grabcut").segment(img, ring_only)
    poly = polygon_mask(ordered_ring(prompts.background), *img.shape)
    assert result.mask.any() and dice(result.mask, mask) > dice(poly, mask)
    with pytest.raises(ValueError, match="at least one foreground prompt"):
        get_segmenter("random-walker").segment(img, ring_only)
    # FoB's coarse probability can stand in for foreground prompts
    with_prob = PromptSet(background=prompts.background, fg_probability=mask.astype(np.float32))
    assert dice(get_segmenter("random-walker").segment(img, with_prob).mask, mask) > 0.85


def test_probability_prior_is_used(spleen):
    img, mask, prompts = spleen
    wrong = np.zeros_like(mask, dtype=np.float32)  # a prior that says "nothing here"
    base = get_segmenter("random-walker").segment(img, prompts).mask
    fully_prior = get_segmenter("random-walker", prior_weight=1.0).segment(
        img, PromptSet(prompts.background, prompts.foreground, wrong)
    ).mask
    assert fully_prior.sum() < 0.2 * base.sum()  # only the forced seed disks survive
    trusted = get_segmenter("random-walker", prior_weight=1.0).segment(
        img, PromptSet(prompts.background, prompts.foreground, mask.astype(np.float32))
    ).mask
    assert dice(trusted, mask) > 0.97
    # grabcut: interior pixels with low coarse probability start as probable background
    gc = get_segmenter("grabcut").segment(img, PromptSet(prompts.background, prompts.foreground, mask.astype(np.float32)))
    assert dice(gc.mask, mask) > 0.85


def test_ring_order_is_repaired_only_when_it_crosses_itself():
    ang = np.linspace(0, 2 * np.pi, 10, endpoint=False)
    ring = np.stack([50 + 30 * np.cos(ang), 40 + 20 * np.sin(ang)], axis=1)
    assert polygon_is_simple(ring)
    assert ordered_ring(ring) is not None and np.array_equal(ordered_ring(ring), ring)
    shuffled = ring[[0, 5, 2, 7, 4, 9, 6, 1, 8, 3]]
    assert not polygon_is_simple(shuffled)
    assert np.array_equal(polygon_mask(ordered_ring(shuffled), 80, 100), polygon_mask(ring, 80, 100))
    # a concave ring (C shape) in its given order is kept, not convexified
    c_shape = np.array([[10, 10], [60, 10], [60, 20], [25, 20], [25, 50], [60, 50], [60, 60], [10, 60]], float)
    poly = polygon_mask(ordered_ring(c_shape), 70, 70)
    assert not poly[35, 45] and poly[35, 15]


def test_keep_seeded_components_and_fill_holes():
    m = np.zeros((30, 30), bool)
    m[2:12, 2:12] = True
    m[5:8, 5:8] = False  # a hole
    m[18:30, 18:30] = True  # a bigger blob (144 px vs 91) without seeds
    seeds = np.zeros_like(m)
    seeds[3, 3] = True
    kept = keep_seeded_components(m, seeds)
    assert kept[6, 6] and not kept[24, 24] and kept[3, 3]
    assert keep_seeded_components(m, None)[24, 24] and not keep_seeded_components(m, None)[3, 3]


@pytest.mark.parametrize("name", WEIGHT_FREE)
def test_bad_input_is_a_clear_value_error(spleen, name):
    img, _, prompts = spleen
    seg = get_segmenter(name)
    nan = img.copy()
    nan[10, 10] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        seg.segment(nan, prompts)
    outside = PromptSet(background=prompts.background, foreground=[[500.0, 20.0]])
    with pytest.raises(ValueError, match=f"outside the {img.shape[1]}x{img.shape[0]} image"):
        seg.segment(img, outside)
    with pytest.raises(ValueError, match="at least 3 background prompts"):
        seg.segment(img, PromptSet(background=prompts.background[:2], foreground=prompts.foreground))
    with pytest.raises(ValueError, match="fg_probability has shape"):
        seg.segment(img, PromptSet(prompts.background, prompts.foreground, np.zeros((5, 5))))
    with pytest.raises(ValueError, match="shape"):
        seg.segment(np.zeros((4, 4, 4, 4)), prompts)
    with pytest.raises(ValueError, match="degenerate"):
        seg.segment(img, PromptSet(background=[[5, 5], [5, 5], [5, 5]], foreground=[[5, 5]]))


def test_helpers_and_registry_names():
    assert set(SEGMENTER_NAMES) >= {"sam-vit-h", "sam-vit-l", "sam-vit-b", "medsam", "grabcut", "random-walker", "auto"}
    u8 = to_uint8_rgb(np.array([[0.0, 0.5], [1.0, 0.25]]))
    assert u8.shape == (2, 2, 3) and u8.dtype == np.uint8 and u8[1, 0, 0] == 255 and u8[0, 0, 2] == 0
    assert to_uint8_rgb(np.full((3, 3), 7.0)).max() == 0
    assert check_image(np.zeros((5, 6, 1))).shape == (5, 6)
    with pytest.raises(ValueError, match="iterations"):
        get_segmenter("grabcut", iterations=0)
    with pytest.raises(ValueError, match="prior_weight"):
        get_segmenter("random-walker", prior_weight=2.0)


def test_grabcut_answers_empty_when_the_ring_leaves_no_room() -> None:
    """A ring collapsed onto a few pixels (as FoB can predict past an organ's end) gives an empty
    mask with score 0 instead of aborting a whole-volume propagation."""
    from FoBSegmentLib import PromptSet
    from FoBSegmentLib.segmenters import get_segmenter

    rng = np.random.default_rng(0)
    image = rng.random((64, 64)).astype(np.float32)
    ring = np.array([[30.0, 30.0], [31.0, 30.0], [31.0, 31.0], [30.0, 31.0]])
    result = get_segmenter("grabcut").segment(image, PromptSet(background=ring))
    assert result.mask.shape == (64, 64) and result.mask.dtype == bool
    assert not result.mask.any() and result.score == 0.0


def test_refine_mask_moves_a_mask_to_the_edges_the_slice_shows(spleen):
    """`grabcut.refine_mask` (the cross-patient second pass's seed on MR): the spleen cut short (eroded
    by 5 px) or run over its edge (dilated by 4 px) comes back closer to the organ; the same mask
    gives the same answer; an empty mask stays empty."""
    import cv2

    from FoBSegmentLib.segmenters.grabcut import refine_mask

    img, mask, _ = spleen
    short = cv2.erode(mask.astype(np.uint8), np.ones((11, 11), np.uint8)).astype(bool)
    over = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    for rough in (short, over):
        got = refine_mask(img, rough, 0.5)
        assert dice(got, mask) > max(0.85, dice(rough, mask) + 0.1)  # measured 0.854 / 0.929 from 0.589 / 0.795
        np.testing.assert_array_equal(got, refine_mask(img, rough, 0.5))
    empty = np.zeros_like(mask)
    assert not refine_mask(img, empty, 0.5).any()


def test_grabcut_starts_from_a_mask_prompt(spleen):
    """With `mask_prompt` and a prior mask, GrabCut starts from the mask, not from the ring's polygon: a rough
    mask (the spleen shrunk and shifted) comes back closer to the organ, with or without a ring, and a
    ring through the organ no longer cuts it."""
    import cv2

    img, mask, prompts = spleen
    rough = np.roll(cv2.erode(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool), 4, axis=1)
    seg = get_segmenter("grabcut", mask_prompt=True)
    got = seg.segment(img, PromptSet(prompts.background[:2], prompts.foreground[:2], prior_mask=rough))
    assert dice(got.mask, mask) > max(0.85, dice(rough, mask) + 0.05)
    assert 0.0 < got.score <= 1.0
    # a ring through the organ: from the polygon the organ is lost, from the mask prompt it is not
    rows, cols = np.nonzero(mask)
    cy, cx = rows.mean(), cols.mean()
    inner = np.array([[cx - 8, cy - 8], [cx + 8, cy - 8], [cx + 8, cy + 8], [cx - 8, cy + 8]])
    cut = seg.segment(img, PromptSet(inner, prompts.foreground[:1]))
    kept = seg.segment(img, PromptSet(inner, prompts.foreground[:1], prior_mask=rough))
    assert dice(kept.mask, mask) > dice(cut.mask, mask) + 0.3
    with pytest.raises(ValueError, match="at least 3 background prompts"):
        seg.segment(img, PromptSet(prompts.background[:2], prompts.foreground[:2]))
    # off by default (the neighbour chain's prior stays a shape prior for the graph cut only)
    ring = PromptSet(prompts.background, prompts.foreground)
    assert np.array_equal(get_segmenter("grabcut").segment(img, PromptSet(prompts.background, prompts.foreground,
                                                                            prior_mask=rough)).mask,
                          get_segmenter("grabcut").segment(img, ring).mask)
