"""`fob train` on real data: the loss goes down, checkpoints load, --resume continues exactly (issue 6).

A 128 x 128 working size keeps these runs short on a CPU; everything else is the real pipeline
(CHAOS MR volume, supervoxel pseudo-labels, augmentation, Adam).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from FoBSegmentLib.cli import main
from FoBSegmentLib.model import FoBPromptGenerator
from FoBSegmentLib.train.episodes import VolumeEpisodeSampler, load_training_volumes
from FoBSegmentLib.train.loop import episode_tensors, output_files, read_loss_log

SMALL = '{"image_size": 128}'


@pytest.fixture(scope="module")
def one_volume(data_dir, tmp_path_factory):
    """A data folder holding one real CHAOS volume (image only) and a private pseudo-label cache."""
    root = tmp_path_factory.mktemp("train_data")
    folder = root / "chaos_mr_t2spir"
    folder.mkdir()
    shutil.copy(data_dir / "chaos_mr_t2spir" / "image_2.nii.gz", folder / "image_2.nii.gz")
    return folder, root / "cache"


def _train(folder, out, steps, *extra):
    return main(
        ["train", "--data", str(folder), "--steps", str(steps), "--out", str(out), "--seed", "7",
         "--model-config", SMALL, "--quiet", *extra]
    )


def _mean_loss(model: FoBPromptGenerator, episodes) -> float:
    model.eval()
    with torch.no_grad():
        vals = []
        for ep in episodes:
            s_img, s_msk, q_img, q_msk = episode_tensors([ep], torch.device("cpu"))
            vals.append(float(model.compute_losses(model(s_img, s_msk, q_img), q_msk)["total"]))
    return float(np.mean(vals))


@pytest.mark.slow
def test_training_reduces_the_loss_and_writes_a_loadable_checkpoint(one_volume, tmp_path, monkeypatch):
    folder, cache = one_volume
    monkeypatch.setenv("FOB_CACHE", str(cache))
    out = tmp_path / "run" / "model.safetensors"
    assert _train(folder, out, 40, "--lr", "1e-3", "--checkpoint-every", "20", "--threads", "1") == 0
    files = output_files(out)
    for f in files.values():
        assert f.is_file(), f
    log = read_loss_log(files["log"])
    assert [r["step"] for r in log] == list(range(1, 41))
    assert all(np.isfinite(r["total"]) for r in log)

    trained = FoBPromptGenerator.load(out)
    assert trained.config.image_size == 128 and trained.config.encoder == "lite"
    torch.manual_seed(7)
    untrained = FoBPromptGenerator.from_config(image_size=128)
    # Held-fixed episodes (no augmentation, own seed): the trained model must fit them better.
    vols = load_training_volumes([folder], setting=1, size=128, progress=False)
    sampler = VolumeEpisodeSampler(vols, augment=False)
    rng = np.random.default_rng(123)
    episodes = [sampler.sample(rng) for _ in range(6)]
    before, after = _mean_loss(untrained, episodes), _mean_loss(trained, episodes)
    assert after < 0.8 * before, (before, after)
    # The logged training loss also went down (first vs last quarter of the run).
    first = np.mean([r["total"] for r in log[:10]])
    last = np.mean([r["total"] for r in log[-10:]])
    assert last < first, (first, last)
    summary = json.loads(files["summary"].read_text())
    assert summary["step"] == 40 and summary["training_items"] == ["chaos_mr_t2spir/2"]
    # The state file is a plain weights-only checkpoint.
    state = torch.load(files["state"], weights_only=True)
    assert state["step"] == 40 and "optimizer" in state and json.loads(state["train_config"])["steps"] == 40


def test_resume_continues_at_the_right_step_exactly(one_volume, tmp_path, monkeypatch):
    folder, cache = one_volume
    monkeypatch.setenv("FOB_CACHE", str(cache))
    torch.set_num_threads(1)  # identical arithmetic for the two runs
    straight = tmp_path / "a" / "m.safetensors"
    split = tmp_path / "b" / "m.safetensors"
    assert _train(folder, straight, 4, "--checkpoint-every", "2", "--threads", "1") == 0
    assert _train(folder, split, 2, "--checkpoint-every", "2", "--threads", "1") == 0
    assert torch.load(output_files(split)["state"], weights_only=True)["step"] == 2
    assert _train(folder, split, 4, "--checkpoint-every", "2", "--threads", "1", "--resume") == 0

    log_a = read_loss_log(output_files(straight)["log"])
    log_b = read_loss_log(output_files(split)["log"])
    assert [r["step"] for r in log_b] == [1, 2, 3, 4]
    for ra, rb in zip(log_a, log_b):
        assert ra["total"] == pytest.approx(rb["total"], rel=1e-5, abs=1e-6), (ra, rb)
    wa = FoBPromptGenerator.load(straight).state_dict()
    wb = FoBPromptGenerator.load(split).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # Nothing left to do, a different setup, or no state at all: clear errors, exit code 2.
    assert _train(folder, split, 4, "--resume") == 2
    assert _train(folder, split, 6, "--resume", "--setting", "2", "--exclude-organs", "1") == 2
    assert _train(folder, tmp_path / "c" / "m.safetensors", 4, "--resume") == 2


def test_train_rejects_bad_input(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "m.pt"), "--quiet"]) == 2
    assert "neither" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--steps", "0"]) == 2
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "m.pt"), "--fold", "0"]) == 2
    assert "volume folders" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "m.pt"), "--fold", "0",
                 "--include-ids", '{"empty": ["1"]}']) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_setting1_training_on_dermoscopy_images(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FOB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "isic"
    folder.mkdir()
    for sid in ("ISIC_0012388", "ISIC_0012903"):
        shutil.copy(data_dir / "isic" / f"{sid}.jpg", folder / f"{sid}.jpg")  # no masks: Setting I
    out = tmp_path / "skin.safetensors"
    assert _train(folder, out, 3, "--threads", "1") == 0
    assert FoBPromptGenerator.load(out).config.image_size == 128
    assert [r["step"] for r in read_loss_log(output_files(out)["log"])] == [1, 2, 3]
    # Setting II needs diagnosis labels that this data does not carry: a clear error.
    assert _train(folder, tmp_path / "s2.safetensors", 3, "--setting", "2", "--exclude-organs", "1") == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (mixed-precision training path)")
def test_training_on_cuda_uses_mixed_precision_and_resumes(one_volume, tmp_path, monkeypatch):
    folder, cache = one_volume
    monkeypatch.setenv("FOB_CACHE", str(cache))
    out = tmp_path / "cuda" / "model.safetensors"
    assert _train(folder, out, 4, "--device", "cuda", "--checkpoint-every", "2") == 0
    assert _train(folder, out, 6, "--device", "cuda", "--resume") == 0
    log = read_loss_log(output_files(out)["log"])
    assert [r["step"] for r in log] == list(range(1, 7)) and all(np.isfinite(r["total"]) for r in log)
    summary = json.loads(output_files(out)["summary"].read_text())
    assert summary["device"].startswith("cuda")
    assert FoBPromptGenerator.load(out).config.image_size == 128  # saved on the CPU, loads anywhere


def test_init_starts_from_a_model_and_checks_its_config(one_volume, tmp_path, monkeypatch):
    folder, cache = one_volume
    monkeypatch.setenv("FOB_CACHE", str(cache))
    first = tmp_path / "a" / "m.safetensors"
    assert _train(folder, first, 2, "--threads", "1") == 0
    tuned = tmp_path / "b" / "m.safetensors"
    assert _train(folder, tuned, 1, "--threads", "1", "--init", str(first), "--max-gap", "2", "--lr", "1e-12") == 0
    wa = FoBPromptGenerator.load(first).state_dict()
    wb = FoBPromptGenerator.load(tuned).state_dict()
    # One step at a negligible learning rate: the weights are the initial model's.
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    # Another model config: a one-line error, exit code 2.
    assert main(["train", "--data", str(folder), "--steps", "1", "--out", str(tmp_path / "c" / "m.safetensors"),
                 "--init", str(first), "--quiet"]) == 2
