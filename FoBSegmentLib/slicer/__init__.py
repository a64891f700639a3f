"""The Slicer side of the engine: the module's Logic over MRML nodes, without Qt or `slicer.app`.

    parameters   the one parameter definition (FoBParameters) of the Logic and the widget's wrapper
    mrml         MRML <-> numpy: parent transforms, volume geometry and voxels, segment masks
    point_lists  prompts as markups point lists; a control point's slice
    worker       PropagationJob, SegmentTask and what a worker thread computes from them (no MRML)
    logic        FoBSegmentLogic, the orchestration
    controller   the widget's state without Qt: the worker and its queue, button states, edit debounce
    review       the review panel's rows (slice states, the engine's ranking) and the shortcuts

Names are loaded on first use, so `FoBSegmentLib.slicer.parameters` stays importable without Slicer
(the widget imports it before the engine's packages are installed). Inside this package `import slicer`
is Slicer's module: every import here is absolute.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from FoBSegmentLib.slicer.logic import FoBSegmentLogic
    from FoBSegmentLib.slicer.mrml import (
        image_from_array,
        parent_to_world,
        segment_mask,
        set_segment_mask,
        volume_array,
        volume_geometry,
        vtk_matrix,
    )
    from FoBSegmentLib.slicer.parameters import NODE_REFERENCES, FoBParameters
    from FoBSegmentLib.slicer.worker import PropagationJob

_EXPORTS = {
    "FoBSegmentLogic": "logic",
    "PropagationJob": "worker",
    "FoBParameters": "parameters",
    "NODE_REFERENCES": "parameters",
    "image_from_array": "mrml",
    "parent_to_world": "mrml",
    "segment_mask": "mrml",
    "set_segment_mask": "mrml",
    "volume_array": "mrml",
    "volume_geometry": "mrml",
    "vtk_matrix": "mrml",
}
__all__ = [
    "NODE_REFERENCES",
    "FoBParameters",
    "FoBSegmentLogic",
    "PropagationJob",
    "image_from_array",
    "parent_to_world",
    "segment_mask",
    "set_segment_mask",
    "volume_array",
    "volume_geometry",
    "vtk_matrix",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'FoBSegmentLib.slicer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"FoBSegmentLib.slicer.{module}"), name)
