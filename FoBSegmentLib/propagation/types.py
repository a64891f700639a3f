"""The data a propagation takes and gives back.

Frames: volumes are [k, j, i] arrays (RGB 2D images [1, H, W, 3]); a slice is the (H, W) = (rows,
cols) image taken along one array axis (`io.coords.take_slice`); prompts are (x, y) = (column, row)
pixels of their slice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from FoBSegmentLib.prompts import PromptSet

ProgressCallback = Callable[[int, int, str], None]
CancelCheck = Callable[[], bool]
# on_slice(z, mask): slice index along the axis and its accepted (H, W) bool mask, on the caller's thread.
SliceCallback = Callable[[int, np.ndarray], None]


class PropagationCancelled(Exception):
    """Raised between slices when the cancel callback returns True; nothing has been written."""


@dataclass
class SupportSlice:
    """One annotated slice: index along the slicing axis of its own volume, its image (H, W) or
    (H, W, 3) float in [0, 1], and its mask (H, W) bool. Another patient's slice may carry
    `placed`: where a registration of the two whole volumes puts it in the query
    (`locate.expected_slices`); None when no volume registration was made."""

    index: int
    image: np.ndarray
    mask: np.ndarray
    volume_slices: int | None = None
    placed: PlacedSupport | None = None


@dataclass
class PlacedSupport:
    """Another patient's support slice carried into the query by a whole-volume registration:
    `index` the (fractional) query slice of its organ's centroid, and on query slice round(index)
    the support's `image` (H, W) float and `mask` (H, W) bool resampled there (query pixel grid)."""

    index: float
    image: np.ndarray
    mask: np.ndarray


@dataclass
class SliceReport:
    """What happened on one slice.

    source: "annotation" (copied from the support mask), "fob", "neighbour", "interpolated" (between two
        annotated slices that agree, from the shape interpolated between them), "prompts-in" (the
        person's prompts of a prompts file without a propagation record), "edited" (a slice whose
        prompts a person changed, replayed from a propagation record), or "skipped" (outside the
        organ range / after the chain stopped).
    area: foreground pixels in the final 2D mask.
    support_index: the support slice that fed this slice (index in the support volume), if any.
    parent: the slice whose accepted mask gave this slice its prompts and shape prior (neighbour
        chaining), None when the prompts did not come from another slice.
    prior: where the shape prior came from: "parent", "moved" (the parent's mask carried onto this
        slice by the motion between the two, `motion.move_mask`), "none", "stored" (a mask kept in the
        propagation record, e.g. another patient's support moved onto the seed slice), or "self"
        (the slice's own mask is kept in the record: the seed of a cross-patient second pass or a
        body seed, taken from the first pass, `neighbour.second_pass` / `body_seed_pass`; the seed
        where two tip chains agree, `neighbour.tip_consensus`).
    chain: [root, step, stop, next annotated slice or None] of the neighbour chain that produced
        (or ended at) this slice: a later run with the same chain reuses the slice as it was.
    look: how the segmenter's look was learnt for this slice (`neighbour.gap_look`): "annotations"
        (from the annotated slices or the supports), "own" (a chain outward from the annotated span,
        from the annotated slice nearest it alone), "parent" (re-learnt from the annotated slices and
        the parent's accepted mask) or "tip" (from the annotated slices and this slice under the
        parent's mask, with the growth of a chain from the organ's tip; `neighbour.gap_step`); on the
        seed of a cross-patient first pass, "query" when its look was learnt from the query's own seed
        slice after no chain with the support's look followed the organ (`neighbour.cross_patient`);
        "body" on a body seed (`neighbour.body_seed_pass`: its mask, stored in the record, comes
        from the first pass, and the look is learnt from it and the annotated slices).
    ahead: for look "tip" or "parent", the annotated slice the chain runs towards (its reach,
        `neighbour.gap_step`). cone: the step was held to that annotation's cone alone, not to the
        cap of a "parent" step (`neighbour.reach_of`): with the cap, it failed an end rule.
    score: the segmenter's confidence; fg_max: max of FoB's coarse probability (FoB/hybrid).
    agreement: how well this slice's final mask agrees with its two neighbours' final masks carried
        onto it by the motion between the slices (`motion.neighbour_agreement`, mean Dice; None when
        neither the slice nor its neighbours show the organ): the review ranking's sign of error.
    flags: review hints, e.g. "area-jump x2.3", "intensity-mismatch", "chain-end: mask vanished".
    """

    index: int
    source: str
    area: int = 0
    support_index: int | None = None
    parent: int | None = None
    prior: str = "none"
    chain: list | None = None
    look: str = "annotations"
    ahead: int | None = None
    cone: bool = False
    score: float | None = None
    fg_max: float | None = None
    agreement: float | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class PropagationResult:
    """mask: [k, j, i] uint8 (1 = organ), same shape as the query volume (RGB: [1, H, W]).
    prompts: slice index -> PromptSet the segmenter received on that slice (annotated slices and
        stepping stones outside an explicit range have none here; the record keeps the latter).
    slices: slice index -> SliceReport for every slice along `axis`.
    order: the segmented slices in the order they were accepted (parents before children).
    record: the propagation record (`propagation.document`), what a prompts file needs to rebuild
        this result.
    accepted: [k, j, i] bool, each slice's mask as accepted, before the 3D clean-up (what the next
        slice of a chain was made from); a later run reuses it (`propagate(previous=...)`).
    refined: [k, j, i] bool, the outlines refined from `accepted` before the clean-up
        (`propagation.refine`), None without a refiner; a later run with the same refiner reuses them.
    segmented_count: how many times the segmenter ran (a reused slice costs nothing).
    notes: human-readable lines (which prompt source, where the chain stopped, ...).
    warnings: the one-line warnings a front end must show (another patient's organ not found, or
        its placement disputed: `locate.flag_cross_patient`); `fob segment --strict` refuses on one.
    """

    mask: np.ndarray
    prompts: dict[int, PromptSet]
    slices: dict[int, SliceReport]
    axis: int
    prompts_from: str
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    order: list[int] = field(default_factory=list)
    record: dict | None = None
    accepted: np.ndarray | None = field(default=None, repr=False)
    refined: np.ndarray | None = field(default=None, repr=False)
    segmented_count: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[int]:
        """Slices a person should look at (any flag other than the normal chain ends)."""
        return [z for z, r in sorted(self.slices.items()) if any(not f.startswith("chain-end") for f in r.flags)]

    @property
    def review(self) -> list[dict]:
        """The review ranking (`propagation.review`): [{"index", "score", "reason"}], most doubtful first."""
        from FoBSegmentLib.propagation.review import review_ranking

        return [item.to_json() for item in review_ranking(self)]

    @property
    def segmented(self) -> tuple[int, int] | None:
        zs = [z for z, r in self.slices.items() if r.area > 0]
        return (min(zs), max(zs)) if zs else None
