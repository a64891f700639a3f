"""Shared fixtures: the real data in ../shared/data (FOB_DATA overrides) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

# Same reason as in FoBSegmentLib/cli.py: spinning OpenMP threads slow every torch call on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import cv2
import numpy as np
import pytest
import SimpleITK as sitk

from FoBSegmentLib.evaluate.datasets import ORGANS  # noqa: F401  (tests import it from here)
from FoBSegmentLib.evaluate.metrics import dice  # noqa: F401  (the engine's one dice, for the tests)
from FoBSegmentLib.io import volumes
from FoBSegmentLib.paths import shared_data_dir

DATA = shared_data_dir()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "README.md").exists():
        pytest.fail(f"shared data not found at {DATA} (set FOB_DATA)")
    return DATA


def dermoscopy_support(data_dir: Path, tmp: Path, like: Path) -> tuple[Path, Path]:
    """An unrelated support: a dermoscopy image (grey, resized to the query's slice size) and its
    lesion mask, as one-slice volumes lying as the query's slices do (its spacing and direction)."""
    q = volumes.read_volume(like)
    h, w = q.array.shape[1:]
    rgb = cv2.imread(str(data_dir / "isic" / "ISIC_0012388.jpg"))
    grey = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY), (w, h)).astype(np.int16)
    mask = cv2.resize(cv2.imread(str(data_dir / "isic" / "ISIC_0012388_mask.png"), cv2.IMREAD_GRAYSCALE), (w, h),
                      interpolation=cv2.INTER_NEAREST) > 127
    img = sitk.GetImageFromArray(grey[None])
    img.SetSpacing(q.geometry.spacing)
    img.SetDirection(q.geometry.direction)
    ip, mp = tmp / "derm.nii.gz", tmp / "derm_mask.nii.gz"
    sitk.WriteImage(img, str(ip))
    lab = sitk.GetImageFromArray(mask[None].astype(np.uint8))
    lab.CopyInformation(img)
    sitk.WriteImage(lab, str(mp))
    return ip, mp
