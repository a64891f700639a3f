"""The weight-free segmenters on real slices of ../shared/data, prompted as FoB would prompt them.

Prompts come from the reference mask: 10 background points on FoB's BPPC ring about 10 px outside the
organ (FoBSegmentLib.prompts.ring.ring_points, clockwise), plus 10 foreground points drawn from the mask
eroded by 3 px. Slices: for each organ of each volume, the slice where it is largest and the slice a
quarter of the way through its extent (smaller, harder); every ISIC image. Dice per organ and dataset
is printed (visible in the normal pytest output) and checked against floors set a little below what
was measured; each segmenter must also beat the trivial answer "the ring's polygon interior".
"""

from __future__ import annotations

import time
import warnings
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ORGANS, dice
from scipy import ndimage

from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.prompts.sampling import random_points
from FoBSegmentLib.segmenters import get_segmenter
from FoBSegmentLib.segmenters.base import ordered_ring, polygon_mask

CHAOS_IDS = (1, 2, 3, 5, 8, 10)
SYNAPSE_IDS = (1, 5, 7, 11, 15)

# Measured (see the printed table; docs in the module docstring) minus ~0.05-0.08.
FLOORS = {
    "grabcut": {"chaos_mr_t2spir": {1: 0.85, 2: 0.86, 3: 0.87, 4: 0.87},
                "synapse_ct": {1: 0.80, 2: 0.78, 3: 0.78, 4: 0.83},
                "isic": {0: 0.80}},
    "random-walker": {"chaos_mr_t2spir": {1: 0.80, 2: 0.86, 3: 0.87, 4: 0.86},
                      "synapse_ct": {1: 0.82, 2: 0.76, 3: 0.78, 4: 0.82},
                      "isic": {0: 0.70}},
}
MEAN_FLOOR = {"grabcut": 0.85, "random-walker": 0.84}


def ring_from_mask(mask: np.ndarray) -> np.ndarray:
    """10 clockwise background points about 10 px outside the mask, (10, 2) (x, y)."""
    from FoBSegmentLib.prompts.ring import ring_points

    pts, valid = ring_points(mask, 10)
    return pts[valid]


def prompts_from_mask(mask: np.ndarray, seed: int = 0) -> PromptSet:
    ring = ring_from_mask(mask)
    inner = ndimage.binary_erosion(mask, iterations=3)
    if inner.sum() < 10:
        inner = mask
    return PromptSet(background=ring, foreground=random_points(inner, 10, np.random.default_rng(seed)))


def unit(img: np.ndarray) -> np.ndarray:
    img = img.astype(np.float32)
    return (img - img.min()) / max(float(img.max() - img.min()), 1e-6)


def load_cases(data: Path) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    cases = []
    for dataset, ids in (("chaos_mr_t2spir", CHAOS_IDS), ("synapse_ct", SYNAPSE_IDS)):
        for i in ids:
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(data / dataset / f"image_{i}.nii.gz")))
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(data / dataset / f"label_{i}.nii.gz")))
            for organ in ORGANS:
                areas = (label == organ).sum(axis=(1, 2))
                zs = np.nonzero(areas)[0]
                for z in sorted({int(areas.argmax()), int(zs[len(zs) // 4])}):
                    if areas[z] >= 30:
                        cases.append((dataset, organ, unit(image[z]), label[z] == organ))
    for mask_path in sorted((data / "isic").glob("*_mask.png")):
        rgb = cv2.cvtColor(cv2.imread(str(mask_path).replace("_mask.png", ".jpg")), cv2.COLOR_BGR2RGB)
        cases.append(("isic", 0, rgb.astype(np.float32) / 255.0, cv2.imread(str(mask_path), 0) > 127))
    return cases


@pytest.fixture(scope="module")
def measured(data_dir: Path) -> dict:
    cases = load_cases(data_dir)
    out: dict = {"dice": defaultdict(list), "time": defaultdict(list), "polygon": defaultdict(list)}
    segs = {name: get_segmenter(name) for name in FLOORS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seg in segs.values():  # warm-up: first calls pay imports and allocations
            seg.segment(cases[0][2], prompts_from_mask(cases[0][3]))
        for dataset, organ, image, mask in cases:
            prompts = prompts_from_mask(mask)
            poly = polygon_mask(ordered_ring(prompts.background), *mask.shape)
            out["polygon"][(dataset, organ)].append(dice(poly, mask))
            for name, seg in segs.items():
                t0 = time.perf_counter()
                result = seg.segment(image, prompts)
                out["time"][name].append(time.perf_counter() - t0)
                assert result.mask.shape == mask.shape and result.mask.dtype == bool
                out["dice"][(name, dataset, organ)].append(dice(result.mask, mask))
    return out


def test_report_and_floors(measured: dict, capsys: pytest.CaptureFixture) -> None:
    lines = ["", "weight-free segmenters, Dice (mean over slices) with ring_points prompts + 10 inner points:"]
    failures = []
    for name, floors in FLOORS.items():
        all_means = []
        for dataset, organs in floors.items():
            for organ, floor in organs.items():
                values = measured["dice"][(name, dataset, organ)]
                mean = float(np.mean(values))
                all_means.append(mean)
                poly = float(np.mean(measured["polygon"][(dataset, organ)]))
                lines.append(f"  {name:<13} {dataset:<16} {ORGANS.get(organ, 'lesion'):<13} n={len(values):>2} "
                             f"Dice {mean:.3f} (min {min(values):.3f}; ring polygon alone {poly:.3f}; floor {floor})")
                if mean < floor:
                    failures.append(f"{name} {dataset} organ {organ}: {mean:.3f} < {floor}")
        t = np.asarray(measured["time"][name]) * 1000
        lines.append(f"  {name:<13} mean Dice {np.mean(all_means):.3f}; time per slice median {np.median(t):.0f} ms, "
                     f"90th percentile {np.percentile(t, 90):.0f} ms, max {t.max():.0f} ms")
        if np.mean(all_means) < MEAN_FLOOR[name]:
            failures.append(f"{name} mean {np.mean(all_means):.3f} < {MEAN_FLOOR[name]}")
    with capsys.disabled():
        print("\n".join(lines))
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("name", list(FLOORS))
def test_beats_the_ring_polygon(measured: dict, name: str) -> None:
    """On CT and MR the segmenter must add something over filling the background ring.

    Not asserted for ISIC: dermoscopy lesions are large convex blobs, a 10 px ring is tight around a
    ~300 px lesion and its polygon alone scores ~0.91 Dice, above both segmenters (they under-segment
    the pale lesion rim); the report prints both numbers.
    """
    for dataset in ("chaos_mr_t2spir", "synapse_ct"):
        keys = [k for k in measured["polygon"] if k[0] == dataset]
        seg = np.mean([np.mean(measured["dice"][(name, *k)]) for k in keys])
        poly = np.mean([np.mean(measured["polygon"][k]) for k in keys])
        assert seg > poly + 0.03, f"{name} on {dataset}: Dice {seg:.3f} vs ring polygon {poly:.3f}"


@pytest.mark.parametrize("name", list(FLOORS))
def test_fast_enough_for_interactive_use(measured: dict, name: str) -> None:
    # 2 shared CPU cores in CI: a loose bound; the report prints the real numbers
    assert np.median(measured["time"][name]) < 0.5
