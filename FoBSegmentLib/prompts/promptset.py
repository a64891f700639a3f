"""PromptSet: the prompts of one 2D slice, predicted by FoB or edited by a person.

Frame: every point is (x, y) = (column, row) in the pixel grid of the slice image it belongs to,
float, pixel centres at integer coordinates (the frame SAM's predictor receives).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _as_points(value: object, name: str) -> np.ndarray:
    arr = np.asarray(value if value is not None else np.zeros((0, 2)), dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"PromptSet.{name} must have shape (N, 2) as (x, y) points, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"PromptSet.{name} contains NaN or infinite coordinates")
    return arr


@dataclass
class PromptSet:
    """Background and foreground prompts of one slice.

    background: (N_p, 2) float, (x, y) = (column, row) pixels; for FoB, a ring in cyclic (clockwise) order.
    foreground: (N_f, 2) float, same frame.
    fg_probability: optional (H, W) float in [0, 1], FoB's coarse foreground map of the slice.
    prior_mask: optional (H, W) bool, where the object is expected (in propagation: the accepted
        mask of the neighbouring slice); segmenters with `uses_prior_mask` use it as a shape prior,
        the others ignore it.
    """

    background: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    foreground: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    fg_probability: np.ndarray | None = None
    prior_mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.background = _as_points(self.background, "background")
        self.foreground = _as_points(self.foreground, "foreground")
        if self.fg_probability is not None:
            prob = np.asarray(self.fg_probability, dtype=np.float32)
            if prob.ndim != 2:
                raise ValueError(f"PromptSet.fg_probability must be (H, W), got shape {prob.shape}")
            self.fg_probability = prob
        if self.prior_mask is not None:
            prior = np.asarray(self.prior_mask)
            if prior.ndim != 2 or not (prior.dtype == bool or np.issubdtype(prior.dtype, np.integer)):
                raise ValueError(f"PromptSet.prior_mask must be an (H, W) bool mask, got {prior.dtype} {prior.shape}")
            self.prior_mask = prior.astype(bool)

    def check_inside(self, height: int, width: int) -> None:
        """Raise ValueError when any point lies outside an (H, W) image (pixel centres -0.5 .. W-0.5).

        Coordinates are printed with 6 significant digits: a point from a hand-edited file can be
        1e300, whose fixed-point form has hundreds of digits."""
        for name, pts in (("background", self.background), ("foreground", self.foreground)):
            if len(pts) == 0:
                continue
            x, y = pts[:, 0], pts[:, 1]
            bad = (x < -0.5) | (x > width - 0.5) | (y < -0.5) | (y > height - 0.5)
            if np.any(bad):
                i = int(np.argmax(bad))
                raise ValueError(
                    f"{name} prompt {i} at (x={x[i]:.6g}, y={y[i]:.6g}) lies outside the {width}x{height} image"
                )

    @property
    def points_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, 2) float32 (x, y) points and (N,) int labels, 1 foreground then 0 background (SAM's convention)."""
        pts = np.concatenate([self.foreground, self.background], axis=0).astype(np.float32)
        labels = np.concatenate(
            [np.ones(len(self.foreground), dtype=np.int64), np.zeros(len(self.background), dtype=np.int64)]
        )
        return pts, labels
