"""Prompts of one 2-D slice and the pure numpy/OpenCV ways of placing them.

promptset.py  PromptSet: background / foreground (x, y) points, optional P_fg map and prior mask
ring.py       BPPC ring sampler `ring_points(mask, n_points, k_out, k_in)` (background prompts)
sampling.py   farthest-point sampling, points spread over a region, interior points of a mask

Nothing here imports torch, so the Slicer module and the weight-free segmenters can use it alone.
"""

from FoBSegmentLib.prompts.promptset import PromptSet

__all__ = ["PromptSet"]
