#!/usr/bin/env python3
"""Quick start and test runner: creates or reuses `.venv`, installs the project into it, then runs.

    python3 dev.py demo          # the main job on the embedded default (fob demo)
    python3 dev.py test          # the whole test suite (pytest), then nothing else
    python3 dev.py test -m "not slow"   # extra arguments go to pytest
    python3 dev.py fob ARGS...   # any fob command inside the environment

Only the standard library is used here, so it runs on a bare Python 3.10-3.12.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".fob-install-stamp"


def _install_fingerprint() -> str:
    h = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def ensure_venv() -> None:
    if sys.version_info < (3, 10) or sys.version_info >= (3, 13):
        sys.exit(f"dev.py: Python 3.10-3.12 is required, this is {sys.version.split()[0]}")
    if not PY.exists():
        print("dev.py: creating .venv", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    fingerprint = _install_fingerprint()
    if STAMP.exists() and STAMP.read_text() == fingerprint:
        return
    print("dev.py: installing FoBSegmentLib and its dependencies into .venv (first run takes a few minutes)",
          flush=True)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + ["-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[test]"], check=True)
    STAMP.write_text(fingerprint)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "fob"}:
        print(__doc__)
        return 2
    ensure_venv()
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        return subprocess.call([str(BIN / "fob"), "demo", *rest], cwd=ROOT)
    if cmd == "fob":
        return subprocess.call([str(BIN / "fob"), *rest], cwd=ROOT)
    return subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
