"""`fob evaluate`: the paper's protocols, FoB against prompt baselines with the same segmenter.

    fob evaluate --protocol fob --dataset chaos synapse --model Resources/fob_lite.safetensors \\
        --segmenter grabcut --json out/results.json --markdown docs/RESULTS.md
    fob evaluate --protocol skin --dataset isic ph2 --segmenter grabcut --json out/skin.json
    fob evaluate --protocol skin --dataset isic ph2 --model 'runs/skin/fold{fold}.safetensors'
        # held out: one model per skin fold (`fob train --fold K` on the image folders); the skin
        # protocol adds the rows lesion / lesion-colour (fob segment's dermoscopy pipeline)
    fob evaluate --protocol propagation --dataset chaos synapse --json out/propagation.json \\
        --markdown docs/RESULTS.md          # FoBSegmentLib/evaluate/propagation.py

Prints an organ x method Dice table (%) per dataset, writes every number (per fold, per query scan,
prompt quality) to --json, and optionally a Markdown report. `--model` may contain `{fold}` to use
one model per fold (e.g. `runs/fold{fold}.safetensors`, held-out Setting I) and `{organ}` (the
label, 1-4) to use one per fold and test organ (Setting II: `runs/fold{fold}_organ{organ}.safetensors`,
each trained with `--setting 2 --exclude-organs <organ>`). The datasets resolve to `../shared/data/...`
(FOB_DATA overrides) unless --data names the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from FoBSegmentLib.atomic import write_text_atomic
from FoBSegmentLib.evaluate.datasets import DATASETS, VOLUME_DATASETS, dataset_dir
from FoBSegmentLib.propagation.refine import REFINERS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate FoB and prompt baselines with the paper's protocol",
        description="Evaluate FoB and the prompt baselines (i) confidence points, (ii) mask-sampled points, "
        "(iii) coarse map, plus FoB without SPR and oracle prompts, with one segmenter; or (--protocol propagation) "
        "fob segment's propagation from one annotated slice against Fill between slices and mask copy.",
    )
    p.add_argument("--protocol", choices=("auto", "fob", "skin", "propagation", "interactive"), default="auto",
                   help="fob: 5-fold abdominal protocol; skin: 2-D support i / query i+1; propagation: one "
                   "annotated slice -> the whole organ through fob segment's pipeline (chaos, synapse); interactive: "
                   "the annotation loop (a simulated annotator draws the slice the review ranking puts first, "
                   "against a blind annotator, corrections by prompts and Fill between slices); auto: by dataset")
    p.add_argument("--dataset", nargs="+", default=["chaos"], choices=sorted(DATASETS), metavar="NAME",
                   help="chaos, synapse, isic, ph2 (several allowed)")
    p.add_argument("--data", metavar="DIR", help="data folder (only with a single --dataset)")
    p.add_argument("--model", metavar="PATH", default=None,
                   help="generator checkpoint (default: the shipped Resources model); may contain {fold} "
                   "and {organ} (one model per fold / per fold and test organ)")
    p.add_argument("--segmenter", default=None,
                   help="segmenter name (get_segmenter), e.g. grabcut, sam; default grabcut (fob/skin: FoB prompts "
                        "alone, where graphcut would run GrabCut anyway), graphcut for the propagation protocol")
    p.add_argument("--checkpoint", metavar="FILE", help="segmenter weights (e.g. SAM)")
    p.add_argument("--refine", default="none", choices=("none", *REFINERS),
                   help="propagation and interactive protocols: redraw each chained slice's outline with this "
                        "model, as `fob segment --refine` (default none)")
    p.add_argument("--methods", nargs="+", metavar="M", default=None,
                   help="subset of: fob fob-nospr confidence mask-sampled coarse oracle (default all); "
                   "propagation protocol: fob hybrid chained neighbour plain fill3 fill5 copy (default) and the "
                   "analysis rows neighbour3 ceiling; cross = the cross-patient rows cross1 crossvol atlas_affine "
                   "atlas_deform; their analysis rows cross1_range crossvol_range are given the organ's slices")
    p.add_argument("--folds", nargs="+", type=int, metavar="K", help="only these folds (0-4)")
    p.add_argument("--organs", nargs="+", type=int, metavar="LABEL", help="only these labels (1-4)")
    p.add_argument("--device", default="cpu",
                   help="device of the generator and, for the propagation protocol, of the segmenter (cpu, cuda, auto)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--json", metavar="OUT", help="write all results as JSON")
    p.add_argument("--markdown", metavar="OUT",
                   help="write the tables into OUT between the --section markers (e.g. docs/RESULTS.md); the "
                   "propagation protocol writes its own `propagation` section")
    p.add_argument("--from-json", nargs="+", metavar="JSON",
                   help="no evaluation: merge earlier --json reports of the same protocol (e.g. one per dataset, "
                   "run in parallel; propagation: also rows of other methods run later; interactive: the strategies of a "
                   "later report replace an earlier one's on the same case and organ) and print / write their tables "
                   "(fob, propagation and interactive protocols)")
    p.add_argument("--section", default="fob-protocol", metavar="NAME",
                   help="the --markdown section to write, between <!-- NAME:start/end --> (default fob-protocol: "
                   "the shipped model; e.g. heldout-setting1, heldout-setting2 for per-fold models)")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a line for the report's header (e.g. what the model was trained on); repeatable")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--rounds", type=int, default=6,
                   help="interactive protocol: annotation rounds after the first slice (default 6)")
    p.add_argument("--prompts-from", default=None, choices=("hybrid", "neighbour", "fob"),
                   help="interactive protocol: the pipeline's prompt source (default hybrid, fob segment's default)")
    p.add_argument("--plot", metavar="PNG", help="interactive protocol: write the Dice-per-slices plot (PNG)")
    p.add_argument("--strategies", nargs="+", metavar="NAME",
                   help="interactive protocol: a subset of ranked blind prompts even fill (default all; fill "
                   "between the ranked slices needs ranked), plus the analysis row oracle (only when named: the "
                   "slice the result gets most wrong is drawn next, read from the reference)")
    p.add_argument("--cases", nargs="+", metavar="ID",
                   help="propagation protocol: only these case ids (e.g. 1 2 for CHAOS); default all")
    p.set_defaults(func=run)


def _segmenter(args: argparse.Namespace):
    try:
        from FoBSegmentLib.segmenters import get_segmenter
    except ImportError:
        raise ValueError("no segmenters are installed (FoBSegmentLib.segmenters.get_segmenter missing)") from None
    # The paper's protocol hands `fob-map` a mask prompt: GrabCut takes it only when asked (`mask_prompt`).
    options = {"mask_prompt": True} if args.segmenter == "grabcut" else {}
    return get_segmenter(args.segmenter, checkpoint=args.checkpoint, device=args.device, **options)


def _training_summary(model_path: Path | None) -> dict | None:
    """The summary `fob train` writes next to a model (`<stem>.train.json`), if present and readable."""
    if model_path is None:
        return None
    from FoBSegmentLib.train.loop import output_files

    summary = output_files(model_path)["summary"]
    if not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    return data if isinstance(data, dict) else None


def _held_out_record(entry: dict, summary: dict, queries: list[str], organ: int, organ_name: str) -> None:
    """Add what one model's training summary says about one (fold, organ) of the protocol to `entry`:
    the fold's query scans it trained on, its setting, and for Setting II whether the test organ was
    excluded (the protocol needs it excluded)."""
    seen = set(entry.get("queries_in_training", [])) | (set(queries) & set(summary.get("training_items", [])))
    entry["queries_in_training"] = sorted(seen)
    cfg = summary.get("train_config") or {}
    setting = cfg.get("setting")
    entry.setdefault("settings", {})[organ_name] = setting
    if setting == 2:
        entry.setdefault("test_organ_excluded", {})[organ_name] = organ in (cfg.get("exclude_organs") or [])


def _per_fold(model: str | None) -> bool:
    """True when --model names one model per fold (and organ) through {fold} / {organ}."""
    return model is not None and ("{fold}" in model or "{organ}" in model)


def _merge(args: argparse.Namespace) -> int:
    """Combine reports written by earlier runs (`--json`) into one; print and write their tables."""
    from FoBSegmentLib.evaluate import protocol as P
    from FoBSegmentLib.evaluate.report import load_report

    merged: dict | None = None
    commands = []
    for name in args.from_json:
        rep = load_report(name, "fob", lambda d: isinstance(d.get("datasets"), dict))
        if merged is None:
            merged = {**rep, "datasets": {}}
        elif (rep.get("model"), rep.get("segmenter")) != (merged.get("model"), merged.get("segmenter")):
            raise ValueError(f"--from-json: {name} used another model or segmenter than {args.from_json[0]}")
        commands.append(rep.get("command") or "fob evaluate")
        merged["datasets"].update(rep["datasets"])
    merged["command"] = " ; ".join(dict.fromkeys(commands))
    merged["notes"] = list(dict.fromkeys(list(merged.get("notes", [])) + list(args.note)))
    for result in merged["datasets"].values():
        print(P.format_table(result, result.get("title", "") + " - Dice %") + "\n")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(merged, indent=1) + "\n")
    if args.markdown:
        from FoBSegmentLib.evaluate.report import markdown_report, write_section

        write_section(Path(args.markdown), markdown_report(merged, args.section))
        print(f"wrote {args.markdown}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.segmenter is None:
        args.segmenter = "graphcut" if args.protocol in ("propagation", "interactive") else "grabcut"
    if args.protocol == "propagation":
        from FoBSegmentLib.evaluate import propagation

        return int(propagation.run(args) or 0)
    if args.protocol == "interactive":
        from FoBSegmentLib.evaluate import interactive

        return int(interactive.run(args) or 0)

    from FoBSegmentLib.evaluate.report import markers

    markers(args.section)  # a bad name fails now, not after the evaluation
    if args.from_json:
        return _merge(args)

    import torch

    from FoBSegmentLib.evaluate import protocol as P
    from FoBSegmentLib.model import FoBPromptGenerator

    if args.data and len(args.dataset) != 1:
        raise ValueError("--data can only be used with a single --dataset")
    skin_only = all((args.protocol if args.protocol != "auto" else ("fob" if ds in VOLUME_DATASETS else "skin"))
                    == "skin" for ds in args.dataset)
    allowed = P.ALL_METHODS + (P.SKIN_METHODS if skin_only else ())
    methods = list(args.methods) if args.methods else list(allowed)
    for m in methods:
        if m not in allowed:
            extra = " (lesion, lesion-colour: --protocol skin only)" if m in P.SKIN_METHODS else ""
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(allowed)}{extra}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for ds in args.dataset:
        proto = args.protocol if args.protocol != "auto" else ("fob" if ds in VOLUME_DATASETS else "skin")
        if proto == "fob" and ds not in VOLUME_DATASETS:
            raise ValueError(f"--protocol fob needs a volume dataset (chaos, synapse), not {ds}; use --protocol skin")
        if proto == "skin" and ds in VOLUME_DATASETS:
            raise ValueError(f"--protocol skin needs a 2-D dataset (isic, ph2), not {ds}")
        if proto == "skin" and args.model is not None and "{organ}" in args.model:
            raise ValueError(f"--model with {{organ}} needs the abdominal protocol (chaos, synapse), not {ds}")
    organs = P.ORGANS
    if args.organs:
        bad = [o for o in args.organs if o not in P.ORGANS]
        if bad:
            raise ValueError(f"--organs: unknown label(s) {bad}; use 1 liver, 2 right kidney, 3 left kidney, 4 spleen")
        organs = {o: P.ORGANS[o] for o in args.organs}
    needs_model = any(m not in ("oracle", "lesion-colour") for m in methods)
    segmenter = _segmenter(args) if any(m != "coarse" for m in methods) else None
    model_arg = args.model
    models: dict[str, object] = {}

    def model_path(fold: int | None, organ: int | None = None) -> Path | None:
        if model_arg is None:
            return None
        return Path(model_arg.replace("{fold}", str(fold)).replace("{organ}", str(organ)))

    def load_model(fold: int | None, organ: int | None = None):
        path = model_path(fold, organ)
        if path is None and skin_only:
            from FoBSegmentLib.model.checkpoint import skin_model_path

            path = skin_model_path()  # colour images: the dermoscopy model is the default (issue 21)
        key = str(path)
        if key not in models:
            gen = FoBPromptGenerator.load(path, device=args.device if args.device != "auto" else "cpu")
            models[key] = gen
        return models[key], path

    report = {
        "command": "fob evaluate " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["evaluate"] else None,
        "segmenter": args.segmenter,
        "model": model_arg or ("Resources/fob_skin_lite.safetensors, for dermoscopy (default)" if skin_only
                               else "Resources/fob_lite.safetensors (default)"),
        "methods": {m: P.METHOD_LABELS[m] for m in methods},
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d"),
        "notes": list(args.note),
        "datasets": {},
    }
    for ds in args.dataset:
        folder = Path(args.data) if args.data else dataset_dir(ds)
        if not folder.is_dir():
            raise FileNotFoundError(f"data folder for {ds} not found: {folder}")
        if ds in VOLUME_DATASETS:
            volumes = P.load_eval_volumes(folder)
            all_folds = P.make_folds(len(volumes))
            folds = all_folds if not args.folds else [f for f in all_folds if f.index in args.folds]
            if args.folds and len(folds) != len(set(args.folds)):
                raise ValueError(f"--folds must be in 0..{len(all_folds) - 1}")
            if needs_model and _per_fold(model_arg):
                missing = [p for f in folds for o in organs if not (p := model_path(f.index, o)).is_file()]
                if missing:  # found now, not after the folds before it were evaluated
                    raise FileNotFoundError(f"--model: {len(missing)} per-fold model(s) missing, e.g. {missing[0]}")
            seen: dict[int, dict] = {}

            def predictor_for(fold, organ, volumes=volumes, seen=seen):
                if not needs_model:
                    return None
                gen, path = load_model(fold.index, organ)
                summary = _training_summary(path)
                if summary is not None:
                    queries = [volumes[i].name for i in fold.queries]
                    _held_out_record(seen.setdefault(fold.index, {}), summary, queries, organ, P.ORGANS[organ])
                return P.generator_predictor(gen)

            result = P.evaluate_volumes(
                volumes, predictor_for, segmenter, methods, organs, folds, progress=not args.quiet
            )
            result["held_out"] = seen or None
            title = f"{ds} ({folder.name}), FoB protocol, {len(volumes)} volumes, segmenter {args.segmenter}"
        else:
            images = P.load_skin_images(folder)
            if _per_fold(model_arg):
                # Held out (issue 21): one model per skin fold, trained with `fob train --fold K`.
                all_folds = P.skin_folds(len(images))
                folds = all_folds if not args.folds else [f for f in all_folds if f.index in args.folds]
                if args.folds and len(folds) != len(set(args.folds)):
                    raise ValueError(f"--folds must be in 0..{len(all_folds) - 1} for {ds}")
                missing = [p for f in folds if not (p := model_path(f.index)).is_file()] if needs_model else []
                if missing:
                    raise FileNotFoundError(f"--model: {len(missing)} per-fold model(s) missing, e.g. {missing[0]}")
                seen_skin: dict[int, dict] = {}

                def fold_predictor(fold, images=images, folder=folder, seen=seen_skin):
                    gen, path = load_model(fold.index)
                    summary = _training_summary(path)
                    if summary is not None:
                        queries = [f"{folder.name}/{images[i][0]}" for i in fold.queries]
                        _held_out_record(seen.setdefault(fold.index, {}), summary, queries, 0, "lesion")
                    return P.generator_predictor(gen)

                result = P.evaluate_skin(images, fold_predictor if needs_model else None, segmenter, methods,
                                         progress=not args.quiet, folds=folds)
                result["held_out"] = seen_skin or None
            else:
                predictor = P.generator_predictor(load_model(None)[0]) if needs_model else None
                result = P.evaluate_skin(images, predictor, segmenter, methods, progress=not args.quiet)
            title = f"{ds} ({folder.name}), 2-D protocol, {len(images)} images, segmenter {args.segmenter}"
        result["title"] = title
        report["datasets"][ds] = result
        print(P.format_table(result, title + " - Dice %"))
        print(f"({result['seconds']:.0f} s)\n")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        from FoBSegmentLib.evaluate.report import markdown_report, write_section

        write_section(Path(args.markdown), markdown_report(report, args.section))
        print(f"wrote {args.markdown}")
    return 0
