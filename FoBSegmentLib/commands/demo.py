"""`fob demo`: the main job end to end on an embedded default case from ../shared/data.

A CHAOS MR patient, the liver, ONE annotated slice (the middle of the liver's slice range, taken
from the reference label map and written as the support mask), the default FoB model when one is
shipped (hybrid prompts: FoB finds the organ's extent; otherwise neighbour prompts, and the demo
says so) and the best weight-free segmenter. The
result, the support mask and the prompts (Slicer markups) go into a folder; the 3D Dice against
the reference is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from FoBSegmentLib.commands.segment import TqdmProgress
from FoBSegmentLib.evaluate.datasets import ORGANS as ORGAN_NAMES
from FoBSegmentLib.evaluate.datasets import dataset_dir
from FoBSegmentLib.evaluate.metrics import dice
from FoBSegmentLib.files import SegmentRequest, segment_files
from FoBSegmentLib.propagation import PROMPT_SOURCES

ORGANS = {name.replace(" ", "-"): value for value, name in ORGAN_NAMES.items()}
# Patient 39: its liver Dice with neighbour prompts + GrabCut (0.735) is close to the mean over the
# 15 CHAOS MR patients (0.724), so the demo shows the typical case, not the best one.
DEFAULT_PATIENT = "39"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the main job on a CHAOS MR patient from ../shared/data and print the Dice",
        description="Annotate one slice (taken from the reference), propagate it across the volume, "
        "write the result and print the 3D Dice against the reference.",
    )
    p.add_argument("-o", "--output-dir", default="fob-demo-output", metavar="DIR",
                   help="folder for the results (created; default ./fob-demo-output)")
    p.add_argument("--patient", default=DEFAULT_PATIENT, help=f"CHAOS MR patient id (default {DEFAULT_PATIENT})")
    p.add_argument("--organ", default="liver", choices=sorted(ORGANS), help="organ (default liver)")
    p.add_argument("--segmenter", default=None,
                   help="segmenter (default: the best weight-free one, so the demo needs no download)")
    p.add_argument("--prompts-from", default="auto", choices=("auto", *PROMPT_SOURCES),
                   help="auto = hybrid with the default FoB model when shipped, else neighbour chaining")
    p.add_argument("--model", metavar="PATH", help="FoB generator weights (default: the shipped model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FoBSegmentLib.atomic import check_writable
    from FoBSegmentLib.device import check_device
    from FoBSegmentLib.io import volumes
    from FoBSegmentLib.io.coords import axial_axis, put_slice, take_slice

    device = check_device(args.device)
    data = dataset_dir("chaos")
    image_path = data / f"image_{args.patient}.nii.gz"
    label_path = data / f"label_{args.patient}.nii.gz"
    if not image_path.exists():
        raise FileNotFoundError(
            f"demo data not found: {image_path} (the shared data folder ../shared/data, or FOB_DATA)"
        )
    out_dir = Path(args.output_dir)
    for parent in (out_dir, *out_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"--output-dir {out_dir}: {parent} is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    # All three outputs before the first one is written: a read-only one must not leave the others.
    outputs = {name: out_dir / name for name in ("support_mask.nii.gz", "segmentation.nii.gz", "prompts.mrk.json")}
    for path in outputs.values():
        check_writable(path, "demo output")

    image = volumes.read_volume(image_path)
    reference = volumes.read_label(label_path, image)
    organ = ORGANS[args.organ]
    ref = reference.array == organ
    axis = axial_axis(image.geometry)
    other = tuple(a for a in (0, 1, 2) if a != axis)
    present = np.flatnonzero(ref.any(axis=other))
    if len(present) == 0:
        raise ValueError(f"patient {args.patient} has no {args.organ} in its reference")
    middle = int(present[len(present) // 2])
    support = np.zeros(ref.shape, np.uint8)
    put_slice(support, axis, middle, take_slice(ref, axis, middle).astype(np.uint8))
    support_path = volumes.write_label(outputs["support_mask.nii.gz"], support, image.geometry)

    if args.segmenter is None:
        from FoBSegmentLib.segmenters import BEST_WEIGHT_FREE

        args.segmenter = BEST_WEIGHT_FREE
    req = SegmentRequest(
        image=image_path,
        output=outputs["segmentation.nii.gz"],
        support_mask=support_path,
        segmenter=args.segmenter,
        model=args.model,
        device=device,
        prompts_from=args.prompts_from,
        prompts_out=outputs["prompts.mrk.json"],
        largest_component=True,
    )
    print(
        f"fob demo: CHAOS MR patient {args.patient}, {args.organ}, one annotated slice ({middle} of "
        f"{ref.shape[axis]}), reference slices {present[0]}..{present[-1]}"
    )
    progress = TqdmProgress(enabled=not args.quiet and sys.stderr.isatty())
    try:
        outcome = segment_files(req, progress=progress, log=lambda m: print(f"  {m}"))
    finally:
        progress.close()
    result = outcome.result
    score = dice(result.mask, ref)
    seg = result.segmented
    print(f"  wrote {outcome.output}, {outcome.prompts_out} and {support_path}")
    print(
        f"Dice {score:.3f} against the reference ({args.organ}, prompts: {result.prompts_from}, "
        f"segmenter: {args.segmenter}, organ found on slices {seg[0] if seg else '-'}..{seg[1] if seg else '-'}, "
        f"{result.seconds:.1f} s)"
    )
    return 0
