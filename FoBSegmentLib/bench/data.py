"""Real inputs of the benchmark: one CHAOS MR T2-SPIR volume from ../shared/data.

The volume is chosen once, deterministically: the patient whose liver (label 1) spans the most
slices (CHAOS volumes have 31-38 slices; the longest liver range there is 28 slices, patient 5),
ties to the smaller id. Images are (k, j, i) arrays as SimpleITK returns them; intensities are
normalised to [0, 1] by the 0.5 / 99.5 percentiles of the volume (what the pipeline's MR
normalisation does; the benchmark does not time this step).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from FoBSegmentLib.evaluate.datasets import ORGAN_LABELS, dataset_dir

LIVER = ORGAN_LABELS["liver"]


@dataclass
class BenchVolume:
    patient: str
    image_path: Path
    label_path: Path
    image: np.ndarray  # (K, H, W) float32 in [0, 1]
    label: np.ndarray  # (K, H, W) uint8, CHAOS labels
    organ_slices: np.ndarray  # indices k holding the liver, ascending
    support_index: int  # the annotated slice: the middle of the liver range

    def organ_mask(self, k: int) -> np.ndarray:
        return self.label[k] == LIVER


def chaos_dir() -> Path:
    path = dataset_dir("chaos")
    if not path.is_dir():
        raise FileNotFoundError(f"CHAOS MR data not found at {path} (set FOB_DATA to the shared data folder)")
    return path


def _read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def normalise_mr(volume: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(volume, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((volume.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=1)
def pick_patient() -> str:
    """The CHAOS id with the longest liver range (ties: smallest id)."""
    best: tuple[int, int, str] | None = None
    for label_path in sorted(chaos_dir().glob("label_*.nii.gz")):
        pid = label_path.name[len("label_"):-len(".nii.gz")]
        label = _read(label_path)
        n = int((label == LIVER).any(axis=(1, 2)).sum())
        key = (-n, int(pid) if pid.isdigit() else 10**9, pid)
        if best is None or key < best:
            best = key
    if best is None:
        raise FileNotFoundError(f"no label_*.nii.gz in {chaos_dir()}")
    return best[2]


@functools.lru_cache(maxsize=2)
def load_volume(patient: str | None = None) -> BenchVolume:
    pid = patient or pick_patient()
    image_path = chaos_dir() / f"image_{pid}.nii.gz"
    label_path = chaos_dir() / f"label_{pid}.nii.gz"
    image = normalise_mr(_read(image_path))
    label = _read(label_path).astype(np.uint8)
    organ = np.flatnonzero((label == LIVER).any(axis=(1, 2)))
    if organ.size == 0:
        raise ValueError(f"CHAOS patient {pid} has no liver label")
    support = int(organ[len(organ) // 2])
    return BenchVolume(pid, image_path, label_path, image, label, organ, support)


def prompts_from_mask(mask: np.ndarray, n_bg: int = 10, n_fg: int = 10, seed: int = 0):
    """A FoB-shaped PromptSet from a ground-truth mask: the BPPC ring outside it and foreground
    points spread inside its eroded core. Used where the benchmark needs realistic prompts without
    running the generator (segmenter and decoder cases)."""
    import cv2

    from FoBSegmentLib.prompts import PromptSet
    from FoBSegmentLib.prompts.sampling import random_points

    mask = np.asarray(mask, bool)
    try:
        from FoBSegmentLib.prompts.ring import ring_points

        bg, valid = ring_points(mask, n_bg)
        bg = bg[valid]
    except ImportError:
        bg = _simple_ring(mask, n_bg)
    core = cv2.erode(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    if not core.any():
        core = mask
    fg = random_points(core, n_fg, np.random.default_rng(seed))
    return PromptSet(background=bg, foreground=fg)


def _simple_ring(mask: np.ndarray, n: int) -> np.ndarray:
    import cv2

    outer = cv2.dilate(mask.astype(np.uint8), np.ones((21, 21), np.uint8))
    contours, _ = cv2.findContours(outer, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64)
    return pts[np.linspace(0, len(pts), n, endpoint=False).astype(int)]
