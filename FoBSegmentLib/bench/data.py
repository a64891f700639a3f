"""Real inputs of the benchmark: one CHAOS MR T2-SPIR volume from ../shared/data.

The volume is chosen once, deterministically: the patient whose liver (label 1) spans the most
slices (CHAOS volumes have 31-38 slices; the longest liver range there is 28 slices, patient 5),
ties to the smaller id. Images are (k, j, i) arrays as SimpleITK returns them; intensities go
through the pipeline's MR preset (`io.intensity.normalize(..., "mr")`; not timed).
Prompts from a ground-truth mask are the oracle's (`evaluate.baselines.oracle_prompts`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from FoBSegmentLib.evaluate.datasets import ORGAN_LABELS, dataset_dir
from FoBSegmentLib.io.intensity import normalize

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
    image = normalize(_read(image_path), "mr")
    label = _read(label_path).astype(np.uint8)
    organ = np.flatnonzero((label == LIVER).any(axis=(1, 2)))
    if organ.size == 0:
        raise ValueError(f"CHAOS patient {pid} has no liver label")
    support = int(organ[len(organ) // 2])
    return BenchVolume(pid, image_path, label_path, image, label, organ, support)
