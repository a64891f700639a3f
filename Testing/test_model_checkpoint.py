"""Files that are not weights-only checkpoints, given to `fob segment` as FoB weights (--model) or
as a SAM checkpoint (--sam-checkpoint): one `fob: error:` line naming the file, a non-zero exit
code, no warning and never torch's advice to load with weights_only=False (that runs the file's
code). The real process is run, so warnings printed by torch would show on its stderr."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from FoBSegmentLib.io import volumes
from FoBSegmentLib.model import FoBPromptGenerator
from FoBSegmentLib.model.checkpoint import load_weights_only

ROOT = Path(__file__).resolve().parent.parent


def _bad_files(folder: Path) -> dict[str, Path]:
    """Four files a user might pass by mistake: text, plain pickles of a dict and of an object, and
    a torch zip file whose dict holds an object (refused by weights_only)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "model.pt"
    text.write_text("these are not weights\n")
    dict_pickle = folder / "dict.pt"
    dict_pickle.write_bytes(pickle.dumps({"state_dict": {"w": [1.0, 2.0]}, "format": "fob-prompt-generator"}))
    obj_pickle = folder / "object.pth"
    obj_pickle.write_bytes(pickle.dumps(Namespace(weights=[1.0, 2.0])))
    torch_obj = folder / "torch_object.pth"
    torch.save({"model": Path("x")}, torch_obj)
    return {"text": text, "dict pickle": dict_pickle, "object pickle": obj_pickle, "torch object": torch_obj}


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> dict:
    """CHAOS MR patient 2 and a one-slice liver support mask, plus the bad files."""
    tmp = tmp_path_factory.mktemp("checkpoints")
    image = data_dir / "chaos_mr_t2spir" / "image_2.nii.gz"
    lab = volumes.read_label(data_dir / "chaos_mr_t2spir" / "label_2.nii.gz")
    ref = lab.array == 1
    middle = int(np.flatnonzero(ref.any(axis=(1, 2)))[ref.any(axis=(1, 2)).sum() // 2])
    sup = np.zeros(ref.shape, np.uint8)
    sup[middle][ref[middle]] = 1
    support = volumes.write_label(tmp / "support.nii.gz", sup, lab.geometry)
    return {"image": image, "support": support, "out": tmp / "out.nii.gz", "bad": _bad_files(tmp / "bad")}


def _fob_segment(case: dict, extra: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "FoBSegmentLib.cli", "segment", str(case["image"]), "-o", str(case["out"]),
         "--support-mask", str(case["support"]), "--quiet", *extra],
        capture_output=True, text=True, env=env, timeout=300,
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, path: Path, kind: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fob: error: "), proc.stderr
    assert f"{path.name} is not a {kind}" in lines[0]
    assert "weights_only=False" not in proc.stderr and "weights_only" not in proc.stderr
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("which", ["text", "dict pickle", "object pickle", "torch object"])
def test_fob_segment_model_not_a_checkpoint(case: dict, which: str) -> None:
    bad = case["bad"][which]
    proc = _fob_segment(case, ["--prompts-from", "fob", "--model", str(bad), "--segmenter", "grabcut"])
    _assert_one_line_error(proc, bad, "FoB")
    assert not case["out"].exists()


@pytest.mark.parametrize("which", ["text", "dict pickle", "object pickle", "torch object"])
def test_fob_segment_sam_checkpoint_not_a_checkpoint(case: dict, which: str) -> None:
    bad = case["bad"][which]
    proc = _fob_segment(case, ["--prompts-from", "neighbour", "--segmenter", "sam-vit-b",
                               "--sam-checkpoint", str(bad)])
    _assert_one_line_error(proc, bad, "SAM checkpoint")
    assert not case["out"].exists()


def test_load_weights_only_is_silent_and_names_the_file(tmp_path: Path) -> None:
    bad = _bad_files(tmp_path)
    for path in bad.values():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # any warning torch emits fails the test
            with pytest.raises(ValueError) as err:
                load_weights_only(path, "FoB checkpoint")
        msg = str(err.value)
        assert msg == f"{path.name} is not a FoB checkpoint (not a safetensors file or a weights-only PyTorch checkpoint)"
    good = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(load_weights_only(good, "FoB checkpoint")["w"], torch.ones(2))


@pytest.mark.parametrize("which", ["text", "dict pickle", "object pickle", "torch object"])
def test_generator_load_refuses_non_checkpoints(tmp_path: Path, which: str) -> None:
    path = _bad_files(tmp_path)[which]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=f"^{path.name} is not a FoB"):
            FoBPromptGenerator.load(path)
