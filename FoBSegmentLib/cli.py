"""The `fob` command: a thin dispatcher over FoBSegmentLib.commands.*.

Every expected failure (bad input, missing file, bad checkpoint) surfaces as one line on stderr,
`fob: error: ...`, and a non-zero exit code; tracebacks only with FOB_DEBUG=1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Before torch is first imported: idle OpenMP threads otherwise spin and, on a small or shared
# machine, steal the cores the working thread needs (measured 3-10x slower per slice; docs/BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from FoBSegmentLib import __version__

# Order = order in `fob --help`. A module that is missing is skipped so partial installs still work.
COMMAND_MODULES = ["segment", "batch", "demo", "models", "train", "evaluate", "bench"]


class FoBError(Exception):
    """An expected failure whose message is the whole story for the user."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fob", description="FoB few-shot segmentation engine (FoBSegment).")
    parser.add_argument("--version", action="version", version=f"fob {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"FoBSegmentLib.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"FoBSegmentLib.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `fob` with `argv` (default sys.argv[1:]); returns the exit code.

    Ctrl-C anywhere in here, the start-up imports of the command modules (torch: seconds) included,
    ends with `fob: cancelled` and exit code 130, never a traceback.
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("fob: cancelled", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (FoBError, ValueError, FileNotFoundError, PermissionError, OSError, RuntimeError) as exc:
        if os.environ.get("FOB_DEBUG"):
            raise
        from FoBSegmentLib.errors import SettingError

        text = exc.as_flag() if isinstance(exc, SettingError) else str(exc)  # settings are flags here
        message = " ".join(text.split()) or type(exc).__name__
        print(f"fob: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
