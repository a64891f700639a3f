"""BPPC ring sampler and heatmaps: fob_method.md 16.1-16.3 and real CHAOS MR / ISIC masks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FoBSegmentLib.evaluate.datasets import ORGANS
from FoBSegmentLib.model.heatmaps import gaussian_heatmaps, masked_average_pool
from FoBSegmentLib.prompts.ring import ring_points


def chaos_organ_slice(data_dir, case: int, label: int) -> np.ndarray:
    """(256, 256) bool mask of one organ on the slice where it is largest."""
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / f"label_{case}.nii.gz")))
    areas = (lab == label).sum(axis=(1, 2))
    assert areas.max() > 0, f"label {label} missing in case {case}"
    return lab[int(np.argmax(areas))] == label


def isic_mask(data_dir, name: str = "ISIC_0012388") -> np.ndarray:
    m = cv2.imread(str(data_dir / "isic" / f"{name}_mask.png"), cv2.IMREAD_GRAYSCALE)
    assert m is not None
    return m > 127


def cheb_dist_to_mask(points: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Chebyshev distance of (N, 2) (x, y) points to the nearest mask pixel centre."""
    ys, xs = np.nonzero(mask)
    d = np.maximum(np.abs(points[:, None, 0] - xs[None]), np.abs(points[:, None, 1] - ys[None]))
    return d.min(axis=1)


def band(mask: np.ndarray, k_out: int = 21, k_in: int = 15) -> np.ndarray:
    def dil(k):
        return cv2.dilate(mask.astype(np.uint8), np.ones((k, k), np.uint8)) > 0

    return dil(k_out) & ~dil(k_in)


def shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def contour_positions(points: np.ndarray, mask: np.ndarray, k_out: int = 21) -> tuple[np.ndarray, float]:
    """Arc-length position of each point along the outer contour of dilate(mask) (traced here with
    OpenCV, clockwise on screen), and the contour length."""
    outer = cv2.dilate(mask.astype(np.uint8), np.ones((k_out, k_out), np.uint8))
    cs, _ = cv2.findContours(outer, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(cs, key=cv2.contourArea).reshape(-1, 2).astype(float)
    if shoelace(c) < 0:
        c = c[::-1]
    a, b = c, np.roll(c, -1, axis=0)
    seg = np.hypot(*(b - a).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)[:-1]])
    # Project every point on every segment; keep the closest projection.
    ab = b - a
    t = np.clip(((points[:, None, :] - a[None]) * ab[None]).sum(-1) / (seg[None] ** 2), 0.0, 1.0)
    proj = a[None] + t[..., None] * ab[None]
    i = np.argmin(((points[:, None, :] - proj) ** 2).sum(-1), axis=1)
    return cum[i] + t[np.arange(len(points)), i] * seg[i], float(seg.sum())


def assert_cyclic_order(pos: np.ndarray, length: float) -> None:
    """Consecutive points follow each other along the contour: going round once visits them in order."""
    steps = np.mod(np.diff(np.concatenate([pos, pos[:1]])), length)
    assert np.isclose(steps.sum(), length, atol=1e-6), f"points wind {steps.sum() / length:.2f} times round"
    assert np.all(steps > 0), "two points at the same contour position or out of order"


def disc(h=128, w=128, cx=64, cy=64, r=30) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


# ----------------------------------------------------------------------------- 16.1 disc


def test_disc_acceptance_16_1():
    m = disc()
    pts, valid = ring_points(m, 10, 21, 15)
    assert pts.shape == (10, 2) and valid.all()
    d = cheb_dist_to_mask(pts, m)
    assert np.all(np.abs(d - 10) <= 1), d
    gaps = np.hypot(*np.diff(np.vstack([pts, pts[:1]]), axis=0).T)  # includes the pair (9, 0)
    assert np.all(np.abs(gaps - np.median(gaps)) <= 0.15 * np.median(gaps)), gaps
    pos, length = contour_positions(pts, m)
    steps = np.mod(np.diff(np.concatenate([pos, pos[:1]])), length)
    assert np.all(np.abs(steps - length / 10) <= 1.0), steps
    assert int(np.argmin(pts[:, 1])) == 0 and pts[0, 1] == pts[:, 1].min()
    assert abs(pts[0, 0] - 64) <= 1
    assert shoelace(pts) > 0  # clockwise on screen with y down


@pytest.mark.parametrize("n", [6, 10, 16])
def test_disc_equal_spacing_for_several_n(n):
    m = disc(160, 200, 90, 70, 25)
    pts, valid = ring_points(m, n)
    assert pts.shape == (n, 2) and valid.all()
    pos, length = contour_positions(pts, m)
    steps = np.mod(np.diff(np.concatenate([pos, pos[:1]])), length)
    assert np.all(np.abs(steps - length / n) <= 1.0), steps
    assert shoelace(pts) > 0


def test_off_by_one_fixed_closing_segment_sampled():
    # A rectangle: the authors' linspace on the open contour leaves the closing segment empty (D4).
    m = np.zeros((120, 160), bool)
    m[40:80, 50:110] = True
    pts, valid = ring_points(m, 8)
    assert valid.all()
    gaps = np.hypot(*np.diff(np.vstack([pts, pts[:1]]), axis=0).T)
    assert gaps.max() <= 1.5 * np.median(gaps), gaps
    d = cheb_dist_to_mask(pts, m)
    assert np.all(np.abs(d - 10) <= 1), d


# ----------------------------------------------------------------------------- 16.2 stability


def test_order_stable_under_small_shift_and_rotation(data_dir):
    m = chaos_organ_slice(data_dir, 5, 4)  # spleen
    pts, _ = ring_points(m, 10)
    h, w = m.shape
    cy, cx = np.argwhere(m).mean(axis=0)
    for angle, tx, ty in [(0, 3, -2), (5, 0, 0), (-4, -3, 2)]:
        a = cv2.getRotationMatrix2D((float(cx), float(cy)), angle, 1.0)
        a[:, 2] += (tx, ty)
        moved = cv2.warpAffine(m.astype(np.uint8), a, (w, h), flags=cv2.INTER_NEAREST) > 0
        pts2, valid2 = ring_points(moved, 10)
        assert valid2.all()
        expect = np.c_[pts, np.ones(10)] @ a.T  # the original points carried along by the motion
        err = np.hypot(*(pts2 - expect).T)
        gap = np.median(np.hypot(*np.diff(np.vstack([pts, pts[:1]]), axis=0).T))
        # Same index, same anatomical side: much closer than one ring step.
        assert np.all(err < 0.5 * gap), (angle, tx, ty, err, gap)


# ----------------------------------------------------------------------------- 16.3 heatmaps


def test_heatmap_acceptance_16_3():
    pts = torch.tensor([[[40.4, 30.6], [-3.0, 10.0], [10.0, 99.7], [60.0, 60.0]]])
    valid = torch.tensor([[True, True, True, False]])
    h = gaussian_heatmaps(pts, valid, (100, 80), sigma=4.0)
    assert h.shape == (1, 4, 100, 80)
    assert h[0, 0, 31, 40] == 1.0 and h[0, 0].max() == 1.0
    yy, xx = np.mgrid[:100, :80]
    far = np.maximum(np.abs(xx - 40), np.abs(yy - 31)) > 12
    assert float(h[0, 0].numpy()[far].max()) == 0.0
    near = np.maximum(np.abs(xx - 40), np.abs(yy - 31)) <= 12
    assert float(h[0, 0].numpy()[near].min()) > 0.0
    assert float(h[0, 1].abs().max()) == 0.0  # outside the image (x < -0.5)
    assert float(h[0, 2].abs().max()) == 0.0  # rounds to row 100, outside
    assert float(h[0, 3].abs().max()) == 0.0  # flagged invalid
    # Sanity value of fob_method.md 8: mean of a squared sigma-4 Gaussian over 256^2 is about 7.7e-4.
    g = gaussian_heatmaps(torch.tensor([[[128.0, 128.0]]]), None, (256, 256), 4.0)
    assert abs(float((g**2).mean()) - np.pi * 16 / 256**2) < 0.05 * np.pi * 16 / 256**2


def test_masked_average_pool_recovers_region_feature():
    f = torch.zeros(1, 2, 8, 8)
    f[0, 0, :4] = 1.0  # channel 0 is 1 on the top half
    f[0, 1] = 3.0
    w = torch.zeros(1, 2, 64, 64)
    w[0, 0, :32] = 1.0
    w[0, 1, 32:] = 1.0
    p = masked_average_pool(f, w)
    assert torch.allclose(p[0, 0], torch.tensor([1.0, 3.0]), atol=1e-4)
    assert torch.allclose(p[0, 1], torch.tensor([0.0, 3.0]), atol=1e-4)


# ----------------------------------------------------------------------------- real masks


def check_ring_on(mask: np.ndarray, n: int = 10, k_out: int = 21, k_in: int = 15) -> np.ndarray:
    pts, valid = ring_points(mask, n, k_out, k_in)
    assert pts.shape == (n, 2) and valid.all()
    h, w = mask.shape
    assert np.all((pts[:, 0] >= 0) & (pts[:, 0] <= w - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= h - 1))
    ix = np.floor(pts + 0.5).astype(int)
    assert not mask[ix[:, 1], ix[:, 0]].any(), "a background prompt lies inside the object"
    d = cheb_dist_to_mask(pts, mask)
    lo, hi = (k_in + 1) / 2 - 0.5, (k_out - 1) / 2 + 0.5  # band = Chebyshev distance 8..10 (+- half a pixel)
    assert np.all((d >= lo) & (d <= hi)), d
    # Every point is on (or between two adjacent pixels of) the band.
    b = band(mask, k_out, k_in)
    near_band = [b[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].any() for x, y in ix]
    assert all(near_band)
    return pts


@pytest.mark.parametrize("case,label", [(1, 1), (2, 2), (3, 3), (5, 4), (8, 1), (13, 4)])
def test_real_chaos_organs(data_dir, case, label):
    m = chaos_organ_slice(data_dir, case, label)
    assert m.sum() > 50, ORGANS[label]
    pts = check_ring_on(m)
    pos, length = contour_positions(pts, m)
    assert_cyclic_order(pos, length)
    steps = np.mod(np.diff(np.concatenate([pos, pos[:1]])), length)
    assert np.all(np.abs(steps - length / 10) <= 1.5), steps
    assert shoelace(pts) > 0
    # Ring-graph edges join spatial neighbours (16.2).
    gaps = np.hypot(*np.diff(np.vstack([pts, pts[:1]]), axis=0).T)
    assert gaps.max() <= 1.5 * np.median(gaps), gaps


def test_real_chaos_kidney_smaller_kernels(data_dir):
    m = chaos_organ_slice(data_dir, 10, 2)
    check_ring_on(m, n=16, k_out=11, k_in=7)


def test_real_isic_lesion(data_dir):
    m = isic_mask(data_dir)
    assert m.any() and not m.all()
    pts = check_ring_on(m)
    # ISIC lesions often reach the image edge; the order must still follow the (possibly cut) contour.
    assert shoelace(pts) > 0


def test_all_isic_lesions_outside_and_in_band(data_dir):
    for path in sorted((data_dir / "isic").glob("*_mask.png")):
        m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 127
        check_ring_on(m)


# ----------------------------------------------------------------------------- border cases


@pytest.mark.parametrize(
    "rows,cols",
    [
        (slice(0, 40), slice(50, 90)),  # top edge
        (slice(60, 100), slice(80, 120)),  # bottom-right corner
        (slice(30, 70), slice(0, 35)),  # left edge
        (slice(0, 100), slice(40, 60)),  # top to bottom: splits the band in two
    ],
)
def test_rectangles_touching_the_border(rows, cols):
    m = np.zeros((100, 120), bool)
    m[rows, cols] = True
    pts = check_ring_on(m)
    gaps = np.hypot(*np.diff(pts, axis=0).T)
    assert np.all(gaps > 0)
    assert shoelace(np.vstack([pts, pts[:1]])) != 0


def test_border_points_follow_the_contour_in_order():
    m = np.zeros((100, 120), bool)
    m[0:40, 50:90] = True  # touches the top edge: the ring is a U
    pts, valid = ring_points(m, 10)
    assert valid.all()
    # Clockwise on screen starting after the cut: down the right side, along the bottom, up the left.
    assert pts[0, 0] > 90 and pts[-1, 0] < 50
    assert np.all(np.diff(pts[3:7, 0]) < 0)  # bottom run goes right to left


def test_degenerate_masks_give_invalid_flags():
    pts, valid = ring_points(np.zeros((50, 60), bool), 10)
    assert pts.shape == (10, 2) and not valid.any()
    pts, valid = ring_points(np.ones((50, 60), bool), 10)
    assert not valid.any()
    one = np.zeros((50, 60), bool)
    one[25, 30] = True
    pts, valid = ring_points(one, 10)
    assert valid.all() and np.all(np.abs(cheb_dist_to_mask(pts, one) - 10) <= 1)


def test_bad_mask_input():
    with pytest.raises(ValueError, match="2-D"):
        ring_points(np.zeros((2, 10, 10), bool))
    with pytest.raises(ValueError, match="0 and 1"):
        ring_points(np.full((10, 10), 0.5))
    with pytest.raises(ValueError, match="dtype"):
        ring_points(np.zeros((10, 10), complex))
    with pytest.raises(ValueError, match="k_in"):
        ring_points(np.ones((10, 10), bool), 10, 15, 21)
    with pytest.raises(ValueError, match="odd"):
        ring_points(np.ones((10, 10), bool), 10, 20, 15)
