"""The cropped per-slice morphology (FoBSegmentLib/morphology.py) gives exactly what the whole-image
functions give: on every slice of every organ of a real CHAOS MR patient, on a mask with a hole
and pieces, on masks touching each edge of the image, and on an empty mask."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from FoBSegmentLib import morphology
from FoBSegmentLib.evaluate import propagation as PR
from FoBSegmentLib.segmenters.graphcut import AppearanceModel


@pytest.fixture(scope="module")
def labels(data_dir: Path) -> np.ndarray:
    """CHAOS patient 1's reference label map [k, j, i] on its prepared grid."""
    case = PR.list_cases("chaos", folder=data_dir / "chaos_mr_t2spir", ids=["1"])[0]
    return PR.read_reference(case.label, PR.prepare_volume(case.image))


@pytest.fixture(scope="module")
def masks(labels: np.ndarray) -> list[np.ndarray]:
    """Every non-empty organ slice of CHAOS patient 1 (4 organs), plus shapes the organs lack."""
    out = [labels[z] == organ for organ in range(1, 5) for z in range(labels.shape[0]) if (labels[z] == organ).any()]
    assert len(out) > 40
    ring = np.zeros((64, 80), bool)
    ring[10:40, 20:60] = True
    ring[20:30, 30:50] = False  # a hole
    ring[50:55, 5:9] = True  # a second piece
    out.append(ring)
    for edge in (np.s_[:10, 30:50], np.s_[-10:, 30:50], np.s_[20:40, :7], np.s_[20:40, -7:], np.s_[:5, :5]):
        m = np.zeros((64, 80), bool)
        m[edge] = True
        m[2:3, 60:62] = True
        out.append(m)
    out.append(np.zeros((64, 80), bool))
    return out


def test_fill_holes_and_depth_equal_the_whole_image(masks: list[np.ndarray]) -> None:
    for m in masks:
        np.testing.assert_array_equal(morphology.fill_holes(m), ndimage.binary_fill_holes(m))
        np.testing.assert_array_equal(morphology.depth(m), ndimage.distance_transform_edt(m))
    # a hole that touches nothing but the mask is filled; one open to the image's edge is not
    m = masks[-7]
    assert morphology.fill_holes(m)[25, 40] and not m[25, 40]


def test_distance_to_is_exact_within_its_limit(masks: list[np.ndarray]) -> None:
    for m in masks[:-1]:
        whole = ndimage.distance_transform_edt(~m)
        for limit in (3, 21.0, 40):
            near = morphology.distance_to(m, limit)
            inside = whole <= limit
            np.testing.assert_array_equal(near[inside], whole[inside])
            # beyond the limit: exact, or inf (never a smaller, wrong distance)
            assert np.all((near[~inside] == whole[~inside]) | np.isinf(near[~inside]))
    assert np.isinf(morphology.distance_to(masks[-1], 5)).all()


def test_dilate_and_the_appearance_ring_equal_the_whole_image(masks: list[np.ndarray]) -> None:
    for m in masks:
        for r in (2, 20, 40):
            want = cv2.dilate(m.astype(np.uint8), morphology.disk(r)).astype(bool)
            np.testing.assert_array_equal(morphology.dilate(m, morphology.disk(r)), want)
        np.testing.assert_array_equal(AppearanceModel(band=40).ring(m),
                                      cv2.dilate(m.astype(np.uint8), morphology.disk(40)).astype(bool) & ~m)


def test_solidity_is_the_share_of_the_convex_hull_the_mask_fills(labels: np.ndarray) -> None:
    """Against scikit-image's convex hull of the same pixels: within 0.1 on every organ slice of a
    real CHAOS MR patient (the two rasterise the hull's edge apart); lower for a left kidney and the
    spleen beside it together (what a chain that ran from one into the other holds) than for either;
    1 for a filled rectangle and 0 for an empty mask."""
    from skimage.morphology import convex_hull_image

    organs = [labels[z] == o for o in range(1, 5) for z in range(labels.shape[0]) if (labels[z] == o).sum() >= 50]
    assert len(organs) > 40
    for m in organs:
        assert abs(morphology.solidity(m) - m.sum() / convex_hull_image(m).sum()) < 0.1
    both = (labels == 3).any(axis=(1, 2)) & (labels == 4).any(axis=(1, 2))
    z = int(np.argmax(both * (labels == 3).sum(axis=(1, 2))))
    kidney, spleen = labels[z] == 3, labels[z] == 4
    assert morphology.solidity(kidney | spleen) < min(morphology.solidity(kidney), morphology.solidity(spleen))
    box = np.zeros((64, 80), bool)
    box[10:40, 20:60] = True
    assert morphology.solidity(box) == 1.0
    assert morphology.solidity(np.zeros((64, 80), bool)) == 0.0
