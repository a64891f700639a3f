"""`fob bench`: latency and memory benchmarks against the targets of issue 8 (see docs/BENCHMARKS.md).

The suite itself is FoBSegmentLib.bench (inside the package, so an installed `fob` has it);
`benchmarks/run.py` at the repository top is the same entry point for a checkout.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from FoBSegmentLib.bench import GROUPS

    p = subparsers.add_parser(
        "bench",
        help="latency and memory benchmarks",
        description="Per-slice latency (median, p90) and peak memory of FoB prompt generation, the SAM "
        "encoder and decoder, the weight-free segmenters and whole-volume propagation on a real CHAOS MR "
        "volume, with the targets of issue 8 marked PASS/FAIL. Each group runs in its own process.",
    )
    p.add_argument("--quick", action="store_true",
                   help="few repetitions, only SAM vit_b, no SAM propagation (CI mode, about 2 minutes on 2 cores)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH (atomically)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="auto (default): CPU always, plus CUDA when available")
    p.add_argument("--only", nargs="+", metavar="GROUP", choices=GROUPS,
                   help=f"run only these groups: {', '.join(GROUPS)}")
    p.add_argument("--repeats", type=int, metavar="N", help="override every case's repetition count")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch intra-op threads in every group (default: torch's default, one per core)")
    p.add_argument("--profile", action="store_true",
                   help="cProfile the propagation runs and print the hotspots")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from FoBSegmentLib.bench import run_bench

    run_bench(quick=args.quick, device=args.device, only=args.only, json_path=args.json,
              repeats=args.repeats, profile=args.profile, threads=args.threads)
    return 0
