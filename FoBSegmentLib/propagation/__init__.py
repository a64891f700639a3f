"""Propagation of annotated slices across a volume (or to another patient): FoB's main job.

`propagate` is the one entry point; `job.build_job` assembles its inputs for every front end.
"""

from FoBSegmentLib.propagation.config import (
    MODALITY_CONFIG,
    PROMPT_SOURCES,
    PropagationConfig,
    check_slice_range,
    config_for_modality,
    parse_slice_list,
    parse_slices,
)
from FoBSegmentLib.propagation.document import RECORD_KEY, replay
from FoBSegmentLib.propagation.neighbour import prompts_from_mask
from FoBSegmentLib.propagation.propagate import propagate
from FoBSegmentLib.propagation.runner import cleanup_3d
from FoBSegmentLib.propagation.stopping import organ_range_from_probability
from FoBSegmentLib.propagation.supports import (
    assign_supports,
    chunk_supports,
    locate_mask,
    resize_support,
    support_slices_from_volume,
)
from FoBSegmentLib.propagation.types import (
    CancelCheck,
    ProgressCallback,
    PropagationCancelled,
    PropagationResult,
    SliceCallback,
    SliceReport,
    SupportSlice,
)

__all__ = [
    "MODALITY_CONFIG", "PROMPT_SOURCES", "RECORD_KEY", "CancelCheck", "ProgressCallback", "PropagationCancelled",
    "PropagationConfig", "PropagationResult", "SliceCallback", "SliceReport", "SupportSlice", "assign_supports",
    "check_slice_range", "chunk_supports", "cleanup_3d", "config_for_modality", "locate_mask",
    "organ_range_from_probability", "parse_slice_list", "parse_slices", "prompts_from_mask", "propagate", "replay", "resize_support", "support_slices_from_volume",
]
