"""`auto` without torch or segment-anything (issue 18, defect 3): Slicer before the PyTorch extension is
installed, with a SAM checkpoint already in the weights cache. It must give the weight-free segmenter and
say why, not raise ModuleNotFoundError."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from FoBSegmentLib import weights
from FoBSegmentLib.segmenters import get_segmenter


@pytest.fixture
def cached_sam(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(b"not opened: the packages are checked first")
    monkeypatch.setattr(weights, "checkpoint_for", lambda name, cache_dir=None: path if name == "sam-vit-b" else None)
    return path


@pytest.mark.parametrize("absent", ["torch", "segment_anything"])
def test_auto_falls_back_to_graphcut_when_sam_packages_are_missing(cached_sam: Path, monkeypatch, absent: str) -> None:
    # None in sys.modules makes `import <name>` raise ImportError, as in a Python without the package;
    # the SAM module is dropped too so that it is imported again (and fails) rather than reused.
    monkeypatch.setitem(sys.modules, absent, None)
    monkeypatch.setitem(sys.modules, "FoBSegmentLib.segmenters.sam", None)
    seg = get_segmenter("auto")
    assert seg.name == "graphcut"
    pip_name = {"torch": "torch", "segment_anything": "segment-anything"}[absent]
    assert cached_sam.name in seg.auto_choice and pip_name in seg.auto_choice
    # and it segments: the fallback is a working segmenter, not a placeholder
    from FoBSegmentLib.prompts import PromptSet

    image = np.zeros((40, 40), np.float32)
    image[12:28, 12:28] = 1.0
    ring = np.array([[6, 6], [20, 4], [34, 6], [36, 20], [34, 34], [20, 36], [6, 34], [4, 20]], float)
    mask = seg.segment(image, PromptSet(background=ring, foreground=np.array([[20.0, 20.0]]))).mask
    assert mask[20, 20] and not mask[2, 2]


def test_auto_with_an_explicit_checkpoint_and_no_torch_falls_back_too(cached_sam: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "FoBSegmentLib.segmenters.sam", None)
    seg = get_segmenter("auto", checkpoint=cached_sam)
    assert seg.name == "graphcut" and "torch" in seg.auto_choice


def test_requirements_list_pymaxflow_the_graph_cut_needs() -> None:
    """graphcut (the weight-free default) imports maxflow: the module's requirements must install it."""
    root = Path(__file__).resolve().parent.parent
    reqs = (root / "FoBSegment" / "Resources" / "requirements.txt").read_text(encoding="utf-8").lower()
    assert any(line.startswith("pymaxflow") for line in reqs.splitlines())
    import ast

    tree = ast.parse((root / "FoBSegment" / "FoBSegment.py").read_text(encoding="utf-8"))
    engine = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "ENGINE_PACKAGES")
    listed = {r.split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in ast.literal_eval(engine.value).values()}
    in_file = {line.split(">")[0].split("<")[0].split("=")[0].strip() for line in reqs.splitlines()
               if line.strip() and not line.startswith("#")}
    assert listed <= in_file, f"requirements.txt lacks {listed - in_file}"
