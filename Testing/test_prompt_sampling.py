"""prompts/sampling.py: the one farthest-point sampler and its helpers give exactly what the copies
they replaced gave (the generator's FPS, evaluate.baselines.farthest_points, pipeline.interior_points,
the random draws of the baselines and the benchmark), and `mask_prompt_points` what the oracle and
the neighbour chain build from a mask, on real CHAOS MR masks."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from FoBSegmentLib.prompts.sampling import (
    farthest_point_sampling,
    farthest_points,
    interior_points,
    mask_prompt_points,
    random_points,
)


def _legacy_fps(points: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """The FoB generator's sampler before the merge (with its m <= n shortcut removed)."""
    chosen = [start]
    dist = np.sum((points - points[start]) ** 2, axis=1)
    for _ in range(n - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.sum((points - points[nxt]) ** 2, axis=1))
    return np.asarray(chosen)


def _legacy_interior(mask: np.ndarray, count: int, deep_px: float = 12.0) -> np.ndarray:
    """pipeline.interior_points before the merge."""
    m = np.asarray(mask, bool)
    if not m.any() or count < 1:
        return np.zeros((0, 2))
    dist = ndi.distance_transform_edt(m)
    dmax = float(dist.max())
    rows, cols = np.nonzero(dist >= max(1.0, 0.3 * dmax, min(0.5 * dmax, deep_px)))
    if len(rows) == 0:
        rows, cols = np.nonzero(dist == dmax)
    cand = np.stack([cols, rows], axis=1).astype(np.float64)
    picks = [int(np.argmax(dist[rows, cols]))]
    d2 = np.sum((cand - cand[picks[0]]) ** 2, axis=1)
    while len(picks) < min(count, len(cand)):
        nxt = int(np.argmax(d2))
        if d2[nxt] < 4.0:
            break
        picks.append(nxt)
        d2 = np.minimum(d2, np.sum((cand - cand[nxt]) ** 2, axis=1))
    return cand[picks]


@pytest.fixture(scope="module")
def organ_masks(data_dir) -> list[np.ndarray]:
    """Every fourth slice of each organ of CHAOS MR patient 3 (large, small, thin masks)."""
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / "label_3.nii.gz")))
    out = []
    for organ in (1, 2, 3, 4):
        zs = np.flatnonzero((lab == organ).any(axis=(1, 2)))
        out += [lab[z] == organ for z in zs[::4]]
    return out


def test_fps_matches_the_generator_copy(organ_masks) -> None:
    for mask in organ_masks[::3]:
        rows, cols = np.nonzero(mask)
        pts = np.stack([cols, rows], axis=1).astype(np.float64)
        if len(pts) <= 10:
            continue
        start = len(pts) // 2
        assert np.array_equal(farthest_point_sampling(pts, 10, start), _legacy_fps(pts, 10, start))


def test_interior_points_match_the_pipeline_copy(organ_masks) -> None:
    for mask in organ_masks:
        for count in (1, 4, 12):
            got = interior_points(mask, count)
            assert np.array_equal(got, _legacy_interior(mask, count))
            assert mask[got[:, 1].astype(int), got[:, 0].astype(int)].all()
    assert interior_points(np.zeros((8, 8), bool), 5).shape == (0, 2)
    assert interior_points(organ_masks[0], 0).shape == (0, 2)


def test_farthest_points_start_deep_and_spread(organ_masks) -> None:
    mask = max(organ_masks, key=np.count_nonzero)
    pts = farthest_points(mask, 6)
    depth = ndi.distance_transform_edt(mask)
    assert depth[int(pts[0, 1]), int(pts[0, 0])] == depth.max()
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    assert d[~np.eye(6, dtype=bool)].min() > 10
    assert farthest_points(np.zeros((5, 5), bool), 3).shape == (0, 2)
    assert len(farthest_points(np.eye(4, dtype=bool), 10)) == 4  # fewer pixels than asked: all of them


def test_min_spacing_stops_early() -> None:
    pts = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float64)
    assert len(farthest_point_sampling(pts, 4, min_spacing=2.0)) == 1
    assert len(farthest_point_sampling(pts, 4)) == 4


def test_random_points_are_the_seeded_draws(organ_masks) -> None:
    mask = organ_masks[1]
    rows, cols = np.nonzero(mask)
    pick = np.random.default_rng(3).choice(len(rows), size=min(10, len(rows)), replace=False)
    expected = np.stack([cols[pick], rows[pick]], axis=1).astype(np.float64)
    assert np.array_equal(random_points(mask, 10, np.random.default_rng(3)), expected)
    assert random_points(np.zeros((4, 4), bool), 3, np.random.default_rng(0)).shape == (0, 2)


def test_mask_prompt_points_spread_are_the_oracle_prompts(organ_masks) -> None:
    """The oracle's choice before the merge: ring of the truth + farthest points in the 2-px erosion."""
    from FoBSegmentLib.prompts.ring import ring_points

    for mask in organ_masks[::2]:
        ring, valid = ring_points(mask, 10, 21, 15)
        inner = ndi.binary_erosion(mask, iterations=2)
        fg = farthest_points(inner if inner.any() else mask, 10)
        bg2, fg2 = mask_prompt_points(mask, 10, 10)
        assert np.array_equal(bg2, ring[valid]) and np.array_equal(fg2, fg)


def test_mask_prompt_points_interior_are_the_neighbour_chain_prompts(organ_masks) -> None:
    """With the chain's counts and kernels, "interior" gives `prompts_from_mask`'s points exactly, so
    the chain can build its prompts with this helper without changing a voxel."""
    from FoBSegmentLib.propagation import PropagationConfig, prompts_from_mask

    cfg = PropagationConfig()
    checked = 0
    for mask in organ_masks:
        ps = prompts_from_mask(mask, cfg)
        if ps is None:
            continue
        nf = cfg.n_foreground
        if cfg.fg_area_per_point > 0:
            nf = max(nf, min(cfg.max_foreground, int(round(np.count_nonzero(mask) / cfg.fg_area_per_point))))
        bg, fg = mask_prompt_points(mask, cfg.n_background, nf, ring=(cfg.ring_k_out, cfg.ring_k_in),
                                    foreground="interior")
        assert np.array_equal(bg, ps.background) and np.array_equal(fg, ps.foreground)
        checked += 1
    assert checked > 10


def test_mask_prompt_points_edge_cases() -> None:
    bg, fg = mask_prompt_points(np.zeros((16, 16), bool))
    assert bg.shape == (0, 2) and fg.shape == (0, 2)
    thin = np.zeros((40, 40), bool)
    thin[20, 10:30] = True  # erosion empties it: the points fall on the mask itself
    _, fg = mask_prompt_points(thin, 4, 3)
    assert len(fg) == 3 and all(thin[int(y), int(x)] for x, y in fg)
    with pytest.raises(ValueError):
        mask_prompt_points(thin, foreground="random")
