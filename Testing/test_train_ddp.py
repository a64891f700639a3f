"""`fob train` under torchrun: two CPU processes (gloo on 127.0.0.1) train with DistributedDataParallel
on a real CHAOS volume for a few steps; rank 0 alone writes the files, the checkpoint loads, each
rank drew its own episodes, and a resume with another process count is refused.

A 128 x 128 working size keeps the run short (as in test_train_loop.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from FoBSegmentLib.cli import main
from FoBSegmentLib.model import FoBPromptGenerator
from FoBSegmentLib.train.loop import episode_rng, output_files, read_loss_log

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_ranks_train_and_the_checkpoint_loads(data_dir: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "chaos_mr_t2spir"
    folder.mkdir()
    shutil.copy(data_dir / "chaos_mr_t2spir" / "image_2.nii.gz", folder / "image_2.nii.gz")
    out = tmp_path / "run" / "ddp.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT), FOB_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo")  # the loopback interface only: nothing leaves 127.0.0.1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "FoBSegmentLib.cli", "train", "--data", str(folder),
           "--steps", "4", "--checkpoint-every", "2", "--out", str(out), "--seed", "7",
           "--model-config", '{"image_size": 128}', "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("trained to step 4") == 1, proc.stdout  # rank 0 reports, rank 1 is silent
    assert "2 processes (DistributedDataParallel)" in proc.stdout
    files = output_files(out)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(f.name for f in files.values())
    log = read_loss_log(files["log"])
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["total"]) for r in log)

    trained = FoBPromptGenerator.load(out)
    assert trained.config.image_size == 128
    torch.manual_seed(7)
    init = FoBPromptGenerator.from_config(image_size=128).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in trained.state_dict().items())  # it did learn
    state = torch.load(files["state"], weights_only=True)
    assert state["step"] == 4 and state["world_size"] == 2
    ranks = [json.loads(s) for s in json.loads(state["numpy_rng_ranks"])]
    # Each rank drew from its own stream: rank 0 the seed's (as a one-process run), rank 1 another.
    assert ranks[0] != ranks[1]
    assert ranks[0]["bit_generator"] == episode_rng(7, 0).bit_generator.state["bit_generator"]
    assert episode_rng(7, 0).random() != episode_rng(7, 1).random()
    assert json.loads(files["summary"].read_text())["processes"] == 2

    # One process cannot resume a two-process run exactly: a clear one-line refusal.
    rc = main(["train", "--data", str(folder), "--steps", "6", "--out", str(out), "--seed", "7",
               "--model-config", '{"image_size": 128}', "--quiet", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "trained by 2 process(es)" in err, err
