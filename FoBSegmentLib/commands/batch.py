"""`fob batch`: run a cohort of `fob segment` jobs from a CSV manifest on Dask (docs/BATCH.md).

    fob batch MANIFEST.csv -o OUTDIR [--scheduler ADDRESS] [--workers N] [--force] [--quiet]

Exit code: 0 when every row is done, else the number of failed rows (at most 100); a manifest that
cannot run is refused before any work (`fob: error: ...`, exit code 2), Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MAX_EXIT = 100


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "batch",
        help="segment a cohort from a CSV manifest on Dask (resumable, with an HTML report)",
        description="Run one `fob segment` job per manifest row on a Dask cluster: a local one (one worker "
        "per core, one torch thread each) or an existing one (--scheduler). Finished rows are skipped on "
        "the next run; a failing row is recorded with its reason and the cohort goes on. Writes each row's "
        "label map, montage and status record, and OUTDIR/report.html. Manifest columns: see docs/BATCH.md.",
    )
    p.add_argument("manifest", metavar="MANIFEST.csv",
                   help="one row per job: image, support_mask [, support_image, support_label, reference, "
                        "reference_label, name, output, slices, segmenter, prompts_from, modality, window, axis, "
                        "label_value, largest_component, model, sam_checkpoint, device]")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="output folder (created if its parent exists)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="an existing Dask scheduler, e.g. tcp://10.0.0.5:8786 (default: a local cluster)")
    p.add_argument("--workers", type=_positive, metavar="N",
                   help="worker processes of the local cluster (default: one per core)")
    p.add_argument("--threads", type=_positive, default=1, metavar="N",
                   help="torch threads per row (default 1: the cores go to parallel rows)")
    p.add_argument("--force", action="store_true", help="redo the rows already finished")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FoBSegmentLib.atomic import check_writable
    from FoBSegmentLib.batch.manifest import read_manifest

    if args.scheduler is not None and args.workers is not None:
        raise ValueError("--workers is for the local cluster; an existing cluster (--scheduler) has its own")
    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise NotADirectoryError(f"output folder {outdir} is a file")
    parent = outdir.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"folder {parent} of the output folder {outdir} does not exist")
    rows = read_manifest(args.manifest, outdir)
    created = not outdir.exists()
    outdir.mkdir(exist_ok=True)
    try:
        check_writable(outdir / "report.html", "batch report")
    except OSError:
        if created:
            outdir.rmdir()
        raise
    from FoBSegmentLib.batch.run import run_batch

    try:
        summary = run_batch(rows, outdir, scheduler=args.scheduler, workers=args.workers, force=args.force,
                            torch_threads=args.threads, stream=sys.stderr, progress=not args.quiet)
    except Exception:
        if created and not any(outdir.iterdir()):
            outdir.rmdir()  # nothing ran (no cluster, no scheduler): leave no trace
        raise
    print(f"fob batch: {summary.done} done, {summary.failed} failed, {summary.skipped} skipped (finished "
          f"earlier) of {summary.total} rows in {summary.seconds:.0f} s; report: {summary.report}")
    for number, st in sorted(summary.statuses.items()):
        if st.get("status") == "failed":
            print(f"fob batch: row {number} ({st.get('name')}) failed: {st.get('error')}", file=sys.stderr)
    return min(summary.failed, MAX_EXIT)
