"""The only place where the benchmark touches the rest of the engine's APIs.

Each helper raises ImportError (-> the row is reported 'unavailable', not a failure) when the
module it needs is not part of this installation, so the suite runs on partial installs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any


def make_generator(encoder: str, device: str) -> Any:
    """Untrained FoB prompt generator with the given encoder, in eval mode on `device`."""
    import torch

    from FoBSegmentLib.model import FoBPromptGenerator

    torch.manual_seed(0)
    return FoBPromptGenerator.from_config(encoder=encoder).to(device).eval()


def shipped_generator(device: str) -> Any | None:
    """The shipped default model (Resources/fob_lite.safetensors) or None when it is not there."""
    from FoBSegmentLib.model import FoBPromptGenerator

    try:
        return FoBPromptGenerator.load(device=device)
    except FileNotFoundError:
        return None


def make_segmenter(name: str, device: str, checkpoint: str | None = None) -> Any:
    from FoBSegmentLib.segmenters import get_segmenter

    return get_segmenter(name, checkpoint=checkpoint, device=device)


_RANDOM_SAM: dict[str, Path] = {}


def random_sam_checkpoint(variant: str) -> Path:
    """A SAM checkpoint file with random weights (segment_anything's builder, seed 0), written once
    per process into a temporary folder: lets the engine's own SAM segmenter run without downloads."""
    if variant in _RANDOM_SAM and _RANDOM_SAM[variant].exists():
        return _RANDOM_SAM[variant]
    import torch
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry[variant]()
    folder = Path(tempfile.mkdtemp(prefix="fob-bench-"))
    path = folder / f"sam_{variant}_random.pth"
    torch.save(sam.state_dict(), path)
    del sam
    _RANDOM_SAM[variant] = path
    return path


def sam_segmenter_random(name: str, device: str) -> Any:
    """FoBSegment's SAM segmenter (`sam-vit-b`, ...) loaded from a random-weight checkpoint."""
    import FoBSegmentLib.segmenters as segmenters_pkg  # noqa: F401  (ImportError -> unavailable)

    variant = name.replace("sam-", "").replace("-", "_")
    try:
        return make_segmenter(name, device, checkpoint=str(random_sam_checkpoint(variant)))
    except ValueError as exc:
        if "unknown segmenter" in str(exc).lower() or name in str(exc) and "unknown" in str(exc).lower():
            raise ImportError(f"segmenter {name!r} is not available: {exc}") from None
        raise


def cleanup_random_checkpoints() -> None:
    for path in list(_RANDOM_SAM.values()):
        try:
            path.unlink()
            path.parent.rmdir()
        except OSError:
            pass
    _RANDOM_SAM.clear()
