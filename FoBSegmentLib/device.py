"""The one place that turns a user's `--device` into a device name torch accepts.

Every command, segmenter, the trainer and the benchmark resolve devices here, so `--device tpu`
or `--device cuda` on a machine without a GPU fails the same way, up front, everywhere.
"""

from __future__ import annotations

import re

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_SYNTAX = re.compile(r"(auto|cpu|mps|cuda)(?::(\d+))?")


def resolve_device(spec: str | None = "auto") -> str:
    """'auto' -> 'cuda' when available, else 'mps' when available, else 'cpu'; 'cpu', 'cuda',
    'cuda:N' and 'mps' are returned as given when usable here.

    Raises ValueError (one line) for an unknown name and for cuda / mps when not available.
    """
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "":
        text = "auto"
    match = _SYNTAX.fullmatch(text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ValueError(f"unknown --device {spec!r}; use {DEVICE_CHOICES}")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        # No torch import: weight-free runs on cpu should not pay seconds of start-up for a check.
        return "cpu"
    import torch

    if kind == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available(torch) else "cpu"
    if kind == "mps":
        if not _mps_available(torch):
            raise ValueError("--device mps requested but Apple MPS is not available here (use cpu or auto)")
        return "mps"
    if not torch.cuda.is_available():
        raise ValueError(f"--device {text} requested but CUDA is not available here (use cpu or auto)")
    if index is not None and int(index) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {text} requested but this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
        )
    return text


def check_device(spec: str | None = "auto") -> str:
    """Validate a `--device` up front and return it as given ('auto' stays 'auto').

    For commands that may never load a model: a wrong device must fail before any work, whether or
    not a model is loaded later. 'auto' and 'cpu' are always usable, so they cost no torch import.
    ValueError as `resolve_device`.
    """
    text = "auto" if spec is None else str(spec).strip().lower()
    if text in ("", "auto"):
        return "auto"
    resolve_device(text)
    return text


def _mps_available(torch) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
