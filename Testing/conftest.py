"""Shared fixtures: the real data in ../shared/data (FOB_DATA overrides) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

# Same reason as in FoBSegmentLib/cli.py: spinning OpenMP threads slow every torch call on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

from FoBSegmentLib.paths import shared_data_dir

DATA = shared_data_dir()
ORGANS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "README.md").exists():
        pytest.fail(f"shared data not found at {DATA} (set FOB_DATA)")
    return DATA


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean arrays of the same shape; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(a, b).sum() / denom)
