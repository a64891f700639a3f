"""One benchmark group in its own process (so peak memory and imports never leak between groups).

    python -m FoBSegmentLib.bench.worker --group prompts --device cpu [--quick] [--repeats N]
        [--profile] [--threads N] --out rows.json

Writes {"rows": [...], "torch_threads": int, "baseline_rss_mb": float} to --out; progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from FoBSegmentLib.bench.core import Settings

PRELOAD = ("cv2", "scipy.ndimage", "SimpleITK", "skimage.segmentation", "segment_anything",
           "FoBSegmentLib.model.predictor", "FoBSegmentLib.segmenters", "FoBSegmentLib.pipeline",
           "FoBSegmentLib.io.volumes", "FoBSegmentLib.io.intensity")


def run_group(group: str, settings: Settings) -> list[dict]:
    from FoBSegmentLib.bench import GROUPS

    if group not in GROUPS:
        raise ValueError(f"unknown benchmark group {group!r}; choose from {', '.join(GROUPS)}")
    if group == "prompts":
        from FoBSegmentLib.bench.group_prompts import cases
    elif group == "sam-encoder":
        from FoBSegmentLib.bench.group_sam import encoder_cases as cases
    elif group == "sam-decoder":
        from FoBSegmentLib.bench.group_sam import decoder_cases as cases
    elif group == "weight-free":
        from FoBSegmentLib.bench.group_weightfree import cases
    elif group == "correction":
        from FoBSegmentLib.bench.group_correction import cases
    elif group == "cross-patient":
        from FoBSegmentLib.bench.group_cross import cases
    else:
        from FoBSegmentLib.bench.group_propagation import cases
    return [r.to_dict() for r in cases(settings)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m FoBSegmentLib.bench.worker")
    p.add_argument("--group", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import torch

    if a.threads is not None:
        torch.set_num_threads(a.threads)
    # Shared inputs and libraries first, so the first case's memory is not charged with imports
    # (torch alone is ~700 MB resident with the CUDA build); the baseline is reported separately.
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    from FoBSegmentLib.bench.core import current_rss_mb
    from FoBSegmentLib.bench.data import load_volume

    load_volume()
    baseline = current_rss_mb()
    settings = Settings(quick=a.quick, device=a.device, repeats=a.repeats, profile=a.profile)
    from FoBSegmentLib.bench.adapters import cleanup_random_checkpoints

    try:
        rows = run_group(a.group, settings)
    finally:
        cleanup_random_checkpoints()  # random SAM checkpoints are 0.4-2.5 GB
    with open(a.out, "w") as f:
        json.dump({"rows": rows, "torch_threads": torch.get_num_threads(), "baseline_rss_mb": baseline}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
