"""Atomic file output: write a temporary file in the target's folder, then rename it over the target.

A reader, or a crash, never sees a half-written file, and a failed write leaves nothing behind,
neither the target nor the temporary file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: str | os.PathLike, make_parents: bool = False) -> Iterator[str]:
    """Yield a temporary path beside `path`; on a normal exit it replaces `path`, on an error it is removed.

    The temporary name ends with the target's own suffixes (`.nii.gz`, `.safetensors`...), so writers
    that pick the format from the extension write the right one. Without `make_parents` a missing
    folder is an error (FileNotFoundError), as it should be for user-given output paths.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if make_parents:
        folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part" + "".join(target.suffixes), dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str, make_parents: bool = True) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_output(path, make_parents=make_parents) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def check_writable(path: str | os.PathLike, what: str) -> None:
    """ValueError / FileNotFoundError when `path` cannot be written (placeholder until the helper's version)."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"folder of {what} {target} does not exist")
