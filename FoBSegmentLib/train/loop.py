"""The FoB training loop (method doc 9.6-9.7): episodes -> generator.forward -> compute_losses -> Adam.

Files written next to `out` (the model file, e.g. `fob_lite.safetensors`, written by the
generator's own `save`):
- `<stem>.state.pt`: resumable training state (model and optimizer state, LR schedule, step, the
  training and model config as JSON, RNG states), every `checkpoint_every` steps and at the end;
  read back with `torch.load(weights_only=True)`.
- `<stem>.loss.jsonl`: one JSON line per step (total and each loss term, lr, seconds).
- `<stem>.train.json`: a human-readable summary (config, step reached, wall time, training volumes).
The model file itself is rewritten at every checkpoint so a usable model exists early.

Repeatability: one `numpy.random.Generator` (seeded) drives episode sampling and augmentation, and
`torch.manual_seed` the model initialisation; both are saved in the state, so on the CPU (same
thread count) a run resumed at step k continues exactly like an uninterrupted run.
Mixed precision: on CUDA the forward runs under autocast (bfloat16 where supported, else float16
with a gradient scaler); on the CPU everything is float32.

Several processes: under `torchrun --nproc_per_node N` (which sets RANK, WORLD_SIZE, LOCAL_RANK and
the rendezvous address) the model is wrapped in DistributedDataParallel, gloo on the CPU and NCCL on
GPUs (one GPU per process, `cuda:LOCAL_RANK`). Every rank draws its own episodes (rank 0 with the
seed's own stream, so a one-process run is unchanged; rank r > 0 with the stream of [seed, r]); the
gradients are averaged, so one step sees `batch_size` x N episodes. Only rank 0 writes files (model,
state, loss log, summary); the loss logged is the mean over the ranks; the state keeps every rank's
episode stream, so a run resumes exactly with the same number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from FoBSegmentLib.atomic import atomic_output, write_text_atomic
from FoBSegmentLib.device import resolve_device as resolve_device_name
from FoBSegmentLib.evaluate.datasets import folder_kind
from FoBSegmentLib.train.episodes import (
    Episode,
    MixedSampler,
    SkinEpisodeSampler,
    VolumeEpisodeSampler,
    load_training_images,
    load_training_volumes,
)

STATE_FORMAT = "fob-train-state-1"
_FIELD_DEFAULTS = {"max_gap": 1, "end_fraction": 0.0, "init": None}


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in its state file).

    data: data folders; setting: 1 (pseudo-labels) or 2 (test organs excluded); steps: total
    optimisation steps; lr / lr_step / lr_gamma: Adam learning rate decayed by gamma every lr_step
    steps (method doc [R]: 1e-4, 3000, 0.95); checkpoint_every: steps between checkpoints;
    max_minutes: stop early (with a checkpoint) after this much wall time, 0 = no limit;
    model: FoBConfig overrides (encoder, ...); include_ids: {folder name: [ids]} to train on a subset
    (per-fold models); grad_clip: max gradient norm, 0 = off; max_gap / end_fraction: slice distances
    1..max_gap between support and query and the share of episodes at a label's ends
    (`VolumeEpisodeSampler`); init: a FoB model file (same model config) whose weights the run
    starts from instead of a random initialisation (fine-tuning).
    """

    data: list[str]
    out: str
    setting: int = 1
    steps: int = 36000
    seed: int = 2025
    device: str = "auto"
    lr: float = 1e-4
    lr_step: int = 3000
    lr_gamma: float = 0.95
    batch_size: int = 1
    checkpoint_every: int = 200
    max_minutes: float = 0.0
    min_size: int = 200
    max_gap: int = 1
    end_fraction: float = 0.0
    exclude_organs: list[int] = field(default_factory=list)
    exclude_mode: str = "any"
    setting2_labels: str = "gt"
    augment: bool = True
    grad_clip: float = 0.0
    threads: int = 0
    encoder_weights: str | None = None
    init: str | None = None
    include_ids: dict[str, list[str]] | None = None
    model: dict = field(default_factory=lambda: {"encoder": "lite"})

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data needs at least one folder")
        if self.setting not in (1, 2):
            raise ValueError(f"--setting must be 1 or 2, got {self.setting}")
        for name in ("steps", "lr_step", "batch_size", "checkpoint_every", "min_size", "max_gap"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 < self.lr_gamma <= 1):
            raise ValueError("lr must be > 0 and lr_gamma in (0, 1]")
        if not 0.0 <= self.end_fraction <= 1.0:
            raise ValueError(f"end_fraction must lie in [0, 1], got {self.end_fraction}")
        if self.exclude_mode not in ("any", "all"):
            raise ValueError(f"exclude mode must be 'any' or 'all', got {self.exclude_mode!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def output_files(out: str | Path) -> dict[str, Path]:
    """Paths of the files a run writes for model file `out`."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return {
        "model": out,
        "state": out.with_name(stem + ".state.pt"),
        "log": out.with_name(stem + ".loss.jsonl"),
        "summary": out.with_name(stem + ".train.json"),
    }


def resolve_device(name: str) -> torch.device:
    """`--device` as a torch.device; the rules (and the ValueError) are FoBSegmentLib.device's."""
    return torch.device(resolve_device_name(name))


@dataclass
class Distributed:
    """This process's place in a torchrun group (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def distributed_from_env() -> Distributed:
    """The group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Distributed(rank, world, local)


def _start_group(dist_ctx: Distributed, device: torch.device) -> torch.device:
    """Join the process group (gloo on the CPU, NCCL on GPUs); the device this rank trains on."""
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", dist_ctx.local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"training on several processes needs cpu or cuda, not {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=dist_ctx.rank, world_size=dist_ctx.world)
    return device


def episode_rng(seed: int, rank: int) -> np.random.Generator:
    """Rank 0 draws the seed's own stream (a one-process run is unchanged); rank r > 0 its own."""
    return np.random.default_rng(seed if rank == 0 else [seed, rank])


def build_sampler(cfg: TrainConfig, image_size: int, progress: bool = True) -> tuple[Callable, list[str]]:
    """(sample(rng) -> Episode, names of the training items) for the folders of `cfg`."""
    vol_dirs = [d for d in cfg.data if folder_kind(d) == "volumes"]
    img_dirs = [d for d in cfg.data if folder_kind(d) == "images"]
    samplers, names = [], []
    if vol_dirs:
        vols = load_training_volumes(
            vol_dirs, cfg.setting, image_size, cfg.exclude_organs, cfg.exclude_mode, cfg.setting2_labels,
            include_ids=cfg.include_ids, progress=progress,
        )
        samplers.append(VolumeEpisodeSampler(vols, cfg.min_size, cfg.augment, cfg.max_gap, cfg.end_fraction).sample)
        names += [v.name for v in vols]
    if img_dirs:
        if cfg.setting != 1:
            raise ValueError("Setting II for dermoscopy needs diagnosis labels, which this data does not have")
        imgs = []
        for d in img_dirs:
            # One folder at a time, so that every training item is named by its own folder (the
            # held-out check of `fob evaluate --protocol skin` compares these names with its queries).
            ids = None if cfg.include_ids is None else cfg.include_ids.get(Path(d).name, [])
            if ids is not None and not ids:
                continue
            part = load_training_images([d], image_size, ids, progress)
            imgs += part
            names += [f"{Path(d).name}/{i.name}" for i in part]
        if not imgs:
            raise ValueError("no RGB training images selected in " + ", ".join(map(str, img_dirs)))
        samplers.append(SkinEpisodeSampler(imgs, cfg.min_size).sample)
    return (samplers[0] if len(samplers) == 1 else MixedSampler(samplers).sample), names


def episode_tensors(episodes: list[Episode], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Stack episodes into (B, 3, S, S) z-scored images and (B, S, S) masks (the generator's input)."""
    from FoBSegmentLib.model import normalize_image

    def img(x: np.ndarray) -> np.ndarray:
        x = np.repeat(x[:, :, None], 3, axis=2) if x.ndim == 2 else x
        return normalize_image(x.astype(np.float32)).transpose(2, 0, 1)

    s_img = torch.from_numpy(np.stack([img(e.support_image) for e in episodes])).to(device)
    q_img = torch.from_numpy(np.stack([img(e.query_image) for e in episodes])).to(device)
    s_msk = torch.from_numpy(np.stack([e.support_mask for e in episodes]).astype(np.float32)).to(device)
    q_msk = torch.from_numpy(np.stack([e.query_mask for e in episodes]).astype(np.float32)).to(device)
    return s_img, s_msk, q_img, q_msk


def _atomic_torch_save(obj: dict, path: Path) -> None:
    with atomic_output(path, make_parents=True) as tmp:
        torch.save(obj, tmp)


def _truncate_log(path: Path, step: int) -> None:
    """Keep only the log lines of steps <= `step` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            break
    write_text_atomic(path, "".join(k + "\n" for k in keep))


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) training, on one process or as one rank of a torchrun group. Returns a summary
    dict (steps done, first/last losses, files, seconds, rank, processes)."""
    files = output_files(cfg.out)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    ctx = distributed_from_env()
    device = resolve_device(cfg.device)
    if ctx.active:
        device = _start_group(ctx, device)
    try:
        return _train(cfg, resume, progress and ctx.main, files, device, ctx)
    finally:
        if ctx.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _train(cfg: TrainConfig, resume: bool, progress: bool, files: dict[str, Path], device: torch.device,
           ctx: Distributed) -> dict:
    from tqdm import tqdm

    from FoBSegmentLib.model import FoBPromptGenerator

    if ctx.active:
        import torch.distributed as dist
    state = None
    if resume:
        if not files["state"].is_file():
            raise FileNotFoundError(f"--resume: no training state {files['state']} to continue from")
        from FoBSegmentLib.model.checkpoint import load_weights_only

        try:
            state = load_weights_only(files["state"], "FoB training state")
        except ValueError as exc:
            raise ValueError(f"--resume: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"--resume: {files['state'].name} is not a FoB training state")
        old = json.loads(state["train_config"])
        for key in ("data", "setting", "model", "exclude_organs", "exclude_mode", "setting2_labels", "include_ids",
                    "max_gap", "end_fraction", "init"):
            # A state written before a field existed ran with its default.
            if old.get(key, _FIELD_DEFAULTS.get(key)) != dataclasses.asdict(cfg).get(key):
                raise ValueError(f"--resume: {key} differs from the run being resumed ({old.get(key)!r})")
        if int(state.get("world_size", 1)) != ctx.world:
            raise ValueError(f"--resume: the run was trained by {int(state.get('world_size', 1))} process(es); "
                             f"resume it with as many (torchrun --nproc_per_node), not {ctx.world}")

    torch.manual_seed(cfg.seed)
    rng = episode_rng(cfg.seed, ctx.rank)
    model = FoBPromptGenerator.from_config(encoder_weights=cfg.encoder_weights, **cfg.model).to(device)
    if cfg.init and state is None:
        start = FoBPromptGenerator.load(cfg.init)
        if start.config.to_dict() != model.config.to_dict():
            raise ValueError(f"--init: {Path(cfg.init).name} was trained with another model config "
                             f"({start.config.to_json()}); give the same --encoder and --model-config")
        model.load_state_dict(start.state_dict(), strict=True)
    model.train()
    net = model
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        # Every rank built the same initial weights (same torch seed); DDP also broadcasts rank 0's.
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    step, elapsed_before = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(json.loads(state["scheduler"]))
        if "scaler" in state:
            scaler.load_state_dict(json.loads(state["scaler"]))
        step = int(state["step"])
        elapsed_before = float(state["seconds"])
        rng_states = json.loads(state["numpy_rng_ranks"]) if "numpy_rng_ranks" in state else [state["numpy_rng"]]
        rng.bit_generator.state = json.loads(rng_states[ctx.rank])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        _truncate_log(files["log"], step)
        if step >= cfg.steps:
            raise ValueError(f"--resume: the run already reached step {step} (>= --steps {cfg.steps})")

    sample, names = build_sampler(cfg, model.config.image_size, progress)
    if ctx.main:
        files["model"].parent.mkdir(parents=True, exist_ok=True)
        if state is None and files["log"].exists():
            files["log"].unlink()

    def checkpoint() -> None:
        nonlocal saved_at
        rng_states = [json.dumps(rng.bit_generator.state)]
        if ctx.active:
            # A collective: every rank reaches the same checkpoints (same step, shared stop decision).
            rng_states = [None] * ctx.world
            dist.all_gather_object(rng_states, json.dumps(rng.bit_generator.state))
        saved_at = step
        if not ctx.main:
            return
        model.save(files["model"])
        obj = {
            "format": STATE_FORMAT,
            "step": step,
            "seconds": elapsed_before + (time.time() - t0),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": json.dumps(scheduler.state_dict()),
            "train_config": cfg.to_json(),
            "model_config": model.config.to_json(),
            "numpy_rng": rng_states[0],
            "numpy_rng_ranks": json.dumps(rng_states),
            "world_size": ctx.world,
            "torch_rng": torch.get_rng_state(),
        }
        if scaler.is_enabled():
            obj["scaler"] = json.dumps(scaler.state_dict())
        if device.type == "cuda":
            obj["cuda_rng"] = torch.cuda.get_rng_state()
        _atomic_torch_save(obj, files["state"])
        summary = {
            "step": step, "steps": cfg.steps, "seconds": round(obj["seconds"], 1), "device": str(device),
            "torch_threads": torch.get_num_threads(), "processes": ctx.world, "train_config": dataclasses.asdict(cfg),
            "model_config": model.config.to_dict(), "training_items": names,
        }
        write_text_atomic(files["summary"], json.dumps(summary, indent=1) + "\n")

    t0 = time.time()
    saved_at = -1
    first: dict | None = None
    last: dict | None = None
    skipped = 0
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not progress)
    with open(files["log"] if ctx.main else os.devnull, "a") as log:
        while step < cfg.steps:
            episodes = [sample(rng) for _ in range(cfg.batch_size)]
            s_img, s_msk, q_img, q_msk = episode_tensors(episodes, device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                out = net(s_img, s_msk, q_img)
            # Losses in float32: the heatmap MSE is ~1e-4 and would lose precision in half.
            out = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in out.items()}
            losses = model.compute_losses(out, q_msk)
            total = losses["total"]
            step += 1
            record = {"step": step, "lr": optimizer.param_groups[0]["lr"]}
            terms = ("total", "heat", "coor", "fore", "rac")
            values = torch.stack([losses[k].detach().float().reshape(()) for k in terms]).cpu()
            finite = bool(torch.isfinite(values[0]))
            if ctx.active:
                # The ranks agree on the step: the mean losses are logged, and one rank's non-finite
                # loss skips the update everywhere (a rank alone in backward would hang the others).
                flags = torch.tensor([0.0 if finite else 1.0])
                dist.all_reduce(values)
                dist.all_reduce(flags)
                values /= ctx.world
                finite = float(flags) == 0.0
            record.update({k: float(v) for k, v in zip(terms, values)})
            if finite:
                scaler.scale(total).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                skipped += 1  # a non-finite loss must not poison the weights; the step still counts
                record["skipped"] = True
            scheduler.step()
            record["seconds"] = round(elapsed_before + time.time() - t0, 2)
            log.write(json.dumps(record) + "\n")
            log.flush()
            first = first or record
            last = record
            bar.update(1)
            bar.set_postfix(loss=f"{record['total']:.3f}")
            out_of_time = cfg.max_minutes > 0 and (time.time() - t0) / 60.0 >= cfg.max_minutes
            if ctx.active and cfg.max_minutes > 0:
                stop = torch.tensor([1.0 if out_of_time else 0.0])
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
                out_of_time = float(stop) > 0
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                checkpoint()
            if out_of_time:
                break
    bar.close()
    if saved_at != step:
        checkpoint()
    return {
        "step": step, "first": first, "last": last, "skipped": skipped,
        "seconds": round(time.time() - t0, 1), "files": {k: str(v) for k, v in files.items()},
        "rank": ctx.rank, "processes": ctx.world,
    }


def read_loss_log(path: str | Path) -> list[dict]:
    """The JSON lines of a loss log."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
