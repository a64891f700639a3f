"""Where the project's resources, the shared data and the user cache live (no machine paths baked in)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def resources_dir() -> Path:
    """`Resources/` of the extension (models.json, the shipped default model); FOB_RESOURCES overrides."""
    return Path(os.environ.get("FOB_RESOURCES", REPO_ROOT / "Resources"))


def shared_data_dir() -> Path:
    """The real data used by tests, the demo and evaluations: `../shared/data`; FOB_DATA overrides."""
    return Path(os.environ.get("FOB_DATA", REPO_ROOT.parent / "shared" / "data"))


def cache_dir() -> Path:
    """User cache for downloaded weights and embeddings: FOB_CACHE, else XDG cache, else ~/.cache/fobsegment."""
    if "FOB_CACHE" in os.environ:
        return Path(os.environ["FOB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fobsegment"
