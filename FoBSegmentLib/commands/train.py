"""`fob train`: self-supervised (Setting I) or organ-excluded (Setting II) training of the FoB generator.

    fob train --data ../shared/data/chaos_mr_t2spir ../shared/data/synapse_ct --setting 1 \\
        --steps 36000 --out runs/fob_lite.safetensors --encoder lite --seed 2025
    fob train ... --resume          # continue the run whose files sit next to --out
    fob train --data ../shared/data/chaos_mr_t2spir --fold 0 --out runs/fold0.safetensors
        # held out: only the volumes that fold 0 of `fob evaluate` never uses as support or query
    fob train --data ../shared/data/isic ../shared/data/ph2 --fold 0 --out runs/skin/fold0.safetensors
        # dermoscopy held out: the images outside skin fold 0 of each folder (issue 21)
    fob train ... --fold 0 --setting 2 --exclude-organs 1 --out runs/fold0_organ1.safetensors
        # Setting II for the liver; evaluate with --model 'runs/fold{fold}_organ{organ}.safetensors'
    torchrun --nproc_per_node 2 -m FoBSegmentLib.cli train --data ... --out runs/ddp.safetensors
        # DistributedDataParallel: gloo on the CPU, NCCL with one GPU per process; rank 0 writes the files

See FoBSegmentLib/train/loop.py for the files written next to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the FoB prompt generator (Setting I pseudo-labels or Setting II)",
        description="Train the FoB prompt generator on volumes (image_<id>.nii.gz) and/or RGB images. "
        "Setting I reads no labels (supervoxels / SLIC superpixels, cached); Setting II removes every "
        "slice containing an excluded (test) organ.",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="DIR", help="data folders")
    p.add_argument("--setting", type=int, choices=(1, 2), default=1)
    p.add_argument("--steps", type=int, default=36000, help="total optimisation steps (default 36000)")
    p.add_argument("--out", required=True, metavar="CKPT", help="model file to write (.safetensors or .pt)")
    p.add_argument("--resume", action="store_true", help="continue from the state saved next to --out")
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--encoder", choices=("lite", "resnet101"), default="lite")
    p.add_argument("--encoder-weights", metavar="FILE", help="local torchvision ResNet-101 weights (resnet101)")
    p.add_argument("--exclude-organs", type=int, nargs="*", default=[], metavar="LABEL",
                   help="Setting II: label values of the test organs (e.g. 1 for liver)")
    p.add_argument("--exclude-mode", choices=("any", "all"), default="any",
                   help="drop slices containing ANY excluded organ (definition, default) or ALL (lineage code)")
    p.add_argument("--setting2-labels", choices=("gt", "supervoxels"), default="gt",
                   help="Setting II episode masks: ground truth of the other organs, or supervoxels")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-step", type=int, default=3000, help="decay the learning rate every N steps")
    p.add_argument("--lr-gamma", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=1, help="episodes per step (reference: 1)")
    p.add_argument("--checkpoint-every", type=int, default=200, metavar="N")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop with a checkpoint after this wall time")
    p.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0 = off)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--max-gap", type=int, default=1, metavar="G",
                   help="support and query slices 1..G apart (default 1: adjacent, the method's episodes)")
    p.add_argument("--end-fraction", type=float, default=0.0, metavar="F",
                   help="share of episodes drawn at a label's first/last slices (default 0)")
    p.add_argument("--init", metavar="MODEL",
                   help="start from this FoB model's weights (same --encoder and --model-config): fine-tuning")
    p.add_argument("--no-augment", action="store_true", help="disable the episode augmentation")
    p.add_argument("--include-ids", metavar="JSON",
                   help='train on a subset, e.g. \'{"chaos_mr_t2spir": ["1", "2"]}\' (per-fold models)')
    p.add_argument("--fold", type=int, metavar="K",
                   help="train only on the volumes that fold K (0-4) of `fob evaluate` does not test on (held-out "
                   "per-fold models; each volume folder uses its own folds; an image folder (dermoscopy) uses the "
                   "skin folds 0-1 of `fob evaluate --protocol skin`)")
    p.add_argument("--model-config", metavar="JSON", default="{}",
                   help="extra FoBConfig fields as JSON, e.g. '{\"n_bg\": 10}'")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _json_arg(text: str | None, name: str):
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc.msg}") from None


def run(args: argparse.Namespace) -> int:
    from FoBSegmentLib.train.loop import TrainConfig, train

    for d in args.data:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--data folder not found: {d}")
    model = _json_arg(args.model_config, "--model-config")
    if not isinstance(model, dict):
        raise ValueError("--model-config must be a JSON object")
    if "encoder" in model and model["encoder"] != args.encoder:
        raise ValueError("give the encoder with --encoder, not in --model-config")
    model = {**model, "encoder": args.encoder}
    include = _json_arg(args.include_ids, "--include-ids")
    if include is not None and not isinstance(include, dict):
        raise ValueError("--include-ids must be a JSON object {folder name: [ids]}")
    if args.fold is not None:
        from FoBSegmentLib.evaluate.protocol import fold_training_ids

        if include is not None:
            raise ValueError("give either --fold or --include-ids, not both")
        include = {Path(d).name: fold_training_ids(d, args.fold) for d in args.data}
    cfg = TrainConfig(
        data=[str(Path(d)) for d in args.data], out=str(args.out), setting=args.setting, steps=args.steps,
        seed=args.seed, device=args.device, lr=args.lr, lr_step=args.lr_step, lr_gamma=args.lr_gamma,
        batch_size=args.batch_size, checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes,
        exclude_organs=list(args.exclude_organs), exclude_mode=args.exclude_mode,
        max_gap=args.max_gap, end_fraction=args.end_fraction,
        setting2_labels=args.setting2_labels, augment=not args.no_augment, grad_clip=args.grad_clip,
        threads=args.threads, encoder_weights=args.encoder_weights, init=args.init,
        include_ids={k: [str(i) for i in v] for k, v in include.items()} if include else None, model=model,
    )
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    if result.get("rank", 0) != 0:
        return 0  # under torchrun only rank 0 reports (and writes) anything
    first, last = result["first"], result["last"]
    if first and last:
        print(
            f"trained to step {result['step']} in {result['seconds']:.0f} s; "
            f"loss {first['total']:.4f} (step {first['step']}) -> {last['total']:.4f} (step {last['step']})"
        )
    if result.get("processes", 1) > 1:
        print(f"{result['processes']} processes (DistributedDataParallel), {args.batch_size} episode(s) each per step")
    print(f"model: {result['files']['model']}")
    print(f"state: {result['files']['state']}  loss log: {result['files']['log']}")
    return 0
