"""evaluate/datasets.py, the one dataset/organ catalogue: folders, case listing, finders, and the
rule that evaluation never imports the training code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from FoBSegmentLib.evaluate import datasets as D
from FoBSegmentLib.evaluate import propagation as PR


def test_catalogue_matches_the_shared_data(data_dir: Path) -> None:
    assert D.ORGANS == {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
    assert D.ORGAN_LABELS["spleen"] == 4
    for name in D.DATASETS:
        assert D.dataset_dir(name).is_dir(), name
    assert set(D.VOLUME_DATASETS) | set(D.IMAGE_DATASETS) == set(D.DATASETS) == set(D.DATASET_TITLES)
    assert D.folder_kind(D.dataset_dir("chaos")) == "volumes"
    assert D.folder_kind(D.dataset_dir("isic")) == "images"
    with pytest.raises(ValueError, match="unknown dataset"):
        D.dataset_dir("sabs")


@pytest.mark.parametrize("dataset", ["chaos", "synapse"])
def test_list_cases_matches_the_propagation_protocol(dataset: str) -> None:
    cases = D.list_cases(dataset)
    assert [(c.case_id, c.image, c.label) for c in cases] == [
        (c.case_id, c.image, c.label) for c in PR.list_cases(dataset)
    ]
    ids = [int(c.case_id) for c in cases]
    assert ids == sorted(ids) and len(ids) == (15 if dataset == "chaos" else 5)
    assert [c.case_id for c in D.list_cases(dataset, ids=[cases[1].case_id])] == [cases[1].case_id]
    with pytest.raises(ValueError, match="no case 999"):
        D.list_cases(dataset, ids=["999"])


def test_list_cases_needs_labels(tmp_path: Path) -> None:
    (tmp_path / "image_1.nii.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no image_<id>"):
        D.list_cases("chaos", folder=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        D.list_cases("isic")


def test_evaluation_does_not_import_training() -> None:
    code = (
        "import sys, FoBSegmentLib.evaluate.protocol, FoBSegmentLib.evaluate.baselines, "
        "FoBSegmentLib.evaluate.datasets, FoBSegmentLib.evaluate.metrics\n"
        "print([m for m in sys.modules if m.startswith('FoBSegmentLib.train')])"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
