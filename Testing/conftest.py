"""Shared fixtures: the real data in ../shared/data (FOB_DATA overrides) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

# Same reason as in FoBSegmentLib/cli.py: spinning OpenMP threads slow every torch call on 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from FoBSegmentLib.evaluate.datasets import ORGANS  # noqa: F401  (tests import it from here)
from FoBSegmentLib.evaluate.metrics import dice  # noqa: F401  (the engine's one dice, for the tests)
from FoBSegmentLib.paths import shared_data_dir

DATA = shared_data_dir()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "README.md").exists():
        pytest.fail(f"shared data not found at {DATA} (set FOB_DATA)")
    return DATA
