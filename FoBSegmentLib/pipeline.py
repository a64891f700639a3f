"""Temporary: the old import path (removed once every caller imports propagation/job/files)."""
# ruff: noqa: F401
from FoBSegmentLib.files import SegmentOutcome, SegmentRequest, binary_support, segment_files
from FoBSegmentLib.job import default_slice_axis, load_generator
from FoBSegmentLib.propagation import *  # noqa: F403
from FoBSegmentLib.propagation.neighbour import interior_points, prompts_from_mask
from FoBSegmentLib.propagation.stopping import (
    intensity_match,
    intensity_range,
    median_inside,
    organ_range_from_probability,
)
from FoBSegmentLib.propagation.supports import _scaled_mask
