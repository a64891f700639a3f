"""Moved to FoBSegmentLib.prompts.ring; this re-export keeps old imports working until they change."""

from FoBSegmentLib.prompts.ring import dilate_square, erode_square, ring_points  # noqa: F401
