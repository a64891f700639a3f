"""The skin protocol through `fob segment` itself (issue 21): every episode (support image i, query
image i + 1 of a folder sorted by id) is one `fob segment QUERY -o OUT --support-image S --support-mask
M` run, exactly as a user types it, and the written mask is scored against the query's reference.

    python benchmarks/skin_segment.py ../shared/data/isic ../shared/data/ph2 \
        [--model 'runs/skin/fold{fold}.safetensors'] [-- extra fob segment options]

With `{fold}` in --model each episode uses the model of its held-out skin fold (`fob train --fold K`),
as `fob evaluate --protocol skin` does; without --model, `fob segment`'s defaults (the shipped
dermoscopy model). Prints the mean Dice per folder and writes nothing outside a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from FoBSegmentLib import cli  # noqa: E402
from FoBSegmentLib.evaluate.datasets import find_skin_images  # noqa: E402
from FoBSegmentLib.evaluate.metrics import dice  # noqa: E402
from FoBSegmentLib.evaluate.protocol import skin_folds  # noqa: E402


def _mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--model", help="FoB model; may contain {fold} (one held-out model per skin fold)")
    args = ap.parse_args(argv)
    for folder in args.folders:
        items = find_skin_images(folder)
        n = len(items)
        fold_of = {i: f.index for f in skin_folds(n) for i in f.members[:-1]}
        scores = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(n):
                _sid, s_img, s_mask = items[i]
                qid, q_img, q_mask = items[(i + 1) % n]
                out = Path(tmp) / f"{qid}_mask.png"
                cmd = ["segment", str(q_img), "-o", str(out), "--support-image", str(s_img),
                       "--support-mask", str(s_mask), "--quiet", *extra]
                if args.model:
                    cmd += ["--model", args.model.replace("{fold}", str(fold_of[i]))]
                with contextlib.redirect_stdout(io.StringIO()):
                    rc = cli.main(cmd)
                if rc != 0:
                    raise SystemExit(f"fob segment failed on {qid} (exit {rc})")
                scores.append(dice(_mask(out), _mask(q_mask)))
        print(f"{Path(folder).name}: fob segment, {n} episodes, mean Dice {100 * np.mean(scores):.1f} "
              f"(min {100 * np.min(scores):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
