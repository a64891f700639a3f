"""FoBSegmentLib: the FoB engine of the FoBSegment Slicer extension, importable without Slicer.

Public entry points:
    PromptSet            prompts in (x, y) = (column, row) pixel coordinates of one 2D slice
    FoBPromptGenerator   the FoB prompt generator (BPPC, BCM, SPR) as a torch.nn.Module

Heavy imports (torch) happen on first use of FoBPromptGenerator, so `import FoBSegmentLib` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from FoBSegmentLib.prompts import PromptSet

__version__ = "0.1.0"
__all__ = ["PromptSet", "FoBPromptGenerator", "__version__"]

if TYPE_CHECKING:
    from FoBSegmentLib.model.generator import FoBPromptGenerator


def __getattr__(name: str) -> Any:
    if name == "FoBPromptGenerator":
        from FoBSegmentLib.model.generator import FoBPromptGenerator

        return FoBPromptGenerator
    raise AttributeError(f"module 'FoBSegmentLib' has no attribute {name!r}")
