#!/usr/bin/env python3
"""FoBSegment benchmarks from a checkout: exactly `fob bench` (see benchmarks/README.md).

    .venv/bin/python benchmarks/run.py --quick --json bench.json
    .venv/bin/python benchmarks/run.py --only prompts sam-decoder --device cpu

The suite lives in the package (FoBSegmentLib/bench/) so that an installed `fob` carries it; this
file only puts the checkout on sys.path and calls the `fob` dispatcher.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from FoBSegmentLib.cli import main as fob_main

    return fob_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
