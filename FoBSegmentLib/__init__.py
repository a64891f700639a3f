"""FoBSegmentLib: the FoB engine of the FoBSegment Slicer extension, importable without Slicer.

Public entry points:
    PromptSet            prompts in (x, y) = (column, row) pixel coordinates of one 2D slice
    FoBPromptGenerator   the FoB prompt generator (BPPC, BCM, SPR) as a torch.nn.Module

Both load on first use, so `import FoBSegmentLib` imports nothing heavy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["PromptSet", "FoBPromptGenerator", "__version__"]

if TYPE_CHECKING:
    from FoBSegmentLib.model import FoBPromptGenerator
    from FoBSegmentLib.prompts import PromptSet


def __getattr__(name: str) -> Any:
    # Lazy, so `fob` owns every import from its first line (Ctrl-C during start-up is a clean cancel).
    if name == "FoBPromptGenerator":
        from FoBSegmentLib.model import FoBPromptGenerator

        return FoBPromptGenerator
    if name == "PromptSet":
        from FoBSegmentLib.prompts import PromptSet

        return PromptSet
    raise AttributeError(f"module 'FoBSegmentLib' has no attribute {name!r}")
