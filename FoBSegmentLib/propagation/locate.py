"""The locate step of a cross-patient propagation: where is another patient's organ in this query?

When the support comes with its whole grey volume, the two volumes are registered first
(`register_volumes`, a 3D affine of SimpleITK): it says on which query slice each support slice's
organ lies and carries the support there (`expected_slices`). Then the supports (another patient's
annotated slices) are registered onto query slices with SimpleITK's 2D registration (an affine of
the whole slice, driven by the body outline and the spine, then an affine restricted to the
neighbourhood of the organ), the support mask is carried along, and the query slice where the
registered support looks most like the query around the organ, less a price for its distance from
the guess (`GUESS_PRIOR`), is chosen: once around the support's relative height, once around the
volume registration's slice, and the volume registration's own
placement is kept as a third candidate. The caller segments each candidate's seed, chains from the
best-scored one and moves on to the next when that chain does not follow the organ across the slices
its size calls for (`neighbour.cross_patient`). Only the query image and the supports are read (never
a query reference).

Confidence of the organ (`organ_confidence`): the weaker of (a) the normalised cross-correlation
between the registered support image and the query over the placed organ and a band around it and
(b) the share of the placed organ's core whose query intensities lie in the support organ's 2-98 %
range (after histogram matching), halved when the segmenter drops the seed. Below `LOW_CONFIDENCE`
the organ is taken as not found (a one-line warning, a refusal with `fob segment --strict`).
Once the chain has run, the result is checked against the whole-volume registration's own
placement of the organ (`registration_agreement`): when they barely overlap, one of the two is
wrong, and the same kind of warning says so (`DISPUTED_NOTE`); so does one when no candidate's
chain followed the organ (`NOT_FOLLOWED_NOTE`).

Frames: slices are (H, W) = (rows, cols) float images in [0, 1] on the query's pixel grid (the
supports were put on it: another patient's volume by `job.in_query_pixels`, a picture by
`supports.resize_support`); SimpleITK images built from them have
unit spacing and zero origin, so their physical (x, y) is the (column, row) pixel frame. Volumes
(`volume_image`) are the prepared [k, j, i] arrays with their spacing, zero origin and identity
direction: physical points of that frame, not LPS, and index (i, j, k) = the array's reversed.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from FoBSegmentLib.labelmap import dice
from FoBSegmentLib.morphology import core, dilate, disk
from FoBSegmentLib.propagation.types import PlacedSupport, SupportSlice

# Below this the located organ does not look like the support's: set on 4 development pairs (CHAOS 1,
# 8 and Synapse 1, 7, all organs) and supports without the organ / from dermoscopy.
LOW_CONFIDENCE = 0.4
# Note prefix of a warning (`flag_cross_patient` makes it one of the result's warnings; --strict refuses).
LOW_CONFIDENCE_NOTE = "cross-patient: organ not found"
# Dice between the result and the whole-volume registration's placement of the support's organ (on
# the best slice within `REGISTERED_WINDOW` of where it puts it) below which the two disagree about
# where the organ is. Either may be the wrong one and nothing here says which, so it is a warning,
# not a choice. Set on the development cases (CHAOS MR and Synapse CT, one slice): most right
# results overlap 0.3-0.9, and results that missed an organ the registration found 0.0-0.1.
REGISTRATION_AGREEMENT = 0.3
# Note prefix of that disagreement (a warning, like LOW_CONFIDENCE_NOTE).
DISPUTED_NOTE = "cross-patient: placement disputed"
# Note prefix of a warning: no seed candidate's first pass followed the organ across the slices its
# size calls for (`neighbour.followed_extent`); the organ found may be another structure, or its tip.
NOT_FOLLOWED_NOTE = "cross-patient: organ not followed"
# Dice between the seed slice segmented with the support's look and the placed organ below which
# the look is learnt from the query's seed slice instead (`neighbour.cross_patient_look`).
SEED_AGREEMENT = 0.3
# Half-width of the slice search around the whole-volume registration's guess, as a share of the
# query's slices: that guess is closer than a relative height (`locate(window=...)`) when it holds.
REGISTERED_WINDOW = 0.1
# What the slice search pays, in appearance match, for each share of the query's slices between a
# slice and its guess (`_search`): a slice a tenth of the volume away must match 0.05 better. Around
# one guess the match varies little from slice to slice, and a neighbour of the organ with its look
# (fluid-filled bowel below a spleen on T2) can match a little better than the organ does, while the
# guesses mostly fall inside the organ; set by reasoning (docs/RESULTS.md, cross-patient section).
GUESS_PRIOR = 0.5
# The 2D registrations of the slice search run side by side on up to this many threads (SimpleITK
# releases the GIL; each registration is single-threaded, so the scores are the same on any count).
SEARCH_THREADS = max(1, min(4, os.cpu_count() or 1))
# Volume registrations kept (`register_volumes`): a person segmenting several organs of one query from
# one support patient, or propagating again, pays the 3D registration once.
VOLUME_CACHE = 4


@dataclass
class Located:
    """Where the organ of support `support` was placed: query slice `z`, mask (H, W) bool, the
    confidence of that placement, and the score of every query slice tried (slice -> confidence)."""

    z: int
    mask: np.ndarray
    confidence: float
    support: SupportSlice
    scores: dict[int, float] = field(default_factory=dict)


def _grey(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img, np.float32)
    return a.mean(axis=2) if a.ndim == 3 else a


def _sitk(img: np.ndarray):
    import SimpleITK as sitk

    return sitk.GetImageFromArray(np.ascontiguousarray(_grey(img), dtype=np.float32))


@contextmanager
def one_thread() -> Iterator[None]:
    """SimpleITK on one thread inside the block: its threaded metric sums change with the work
    split, and a registration's path with them; one thread makes the located organ reproducible
    (a replay must give the same mask)."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def register_affine(fixed: np.ndarray, moving: np.ndarray, fixed_mask: np.ndarray | None = None,
                    initial=None, shrink: tuple[int, ...] = (4, 2, 1)):
    """A 2D affine SimpleITK transform mapping fixed (query) points to moving (support) points,
    Mattes mutual information, multi-resolution, deterministic (all pixels sampled, one thread).
    fixed_mask: (H, W) bool, the pixels the metric counts (None: all). initial: a transform to
    start from (default: the images' centres of mass aligned)."""
    import SimpleITK as sitk

    f, m = _sitk(fixed), _sitk(moving)
    if initial is None:
        # A blank slice (zero-filled edges of a volume) has no centre of mass: its centre stands in.
        blank = not (np.any(_grey(fixed) > 0) and np.any(_grey(moving) > 0))
        mode = sitk.CenteredTransformInitializerFilter
        initial = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(2),
                                                    mode.GEOMETRY if blank else mode.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.NONE)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(sitk.GetImageFromArray(np.asarray(fixed_mask, np.uint8)))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=100,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([max(0, s - 1) for s in shrink])
    reg.SetInitialTransform(sitk.AffineTransform(initial), inPlace=False)
    reg.SetNumberOfThreads(1)
    try:
        out = reg.Execute(f, m)
    except RuntimeError:
        return initial
    return _as_affine(out)


def _as_affine(tf):
    """A registration's result (a generic, possibly composite, transform) as an AffineTransform."""
    import SimpleITK as sitk

    tf = tf.Downcast()
    if isinstance(tf, sitk.CompositeTransform):
        tf = tf.GetNthTransform(tf.GetNumberOfTransforms() - 1).Downcast()
    return sitk.AffineTransform(tf)


def warp(img: np.ndarray, transform, like: np.ndarray, nearest: bool = False) -> np.ndarray:
    """`img` (support frame) resampled onto `like`'s (query) grid through `transform`."""
    import SimpleITK as sitk

    src = sitk.GetImageFromArray(np.ascontiguousarray(img, dtype=np.float32))
    ref = _sitk(like)
    out = sitk.Resample(src, ref, transform, sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out)


def _region(mask: np.ndarray, radius: int) -> np.ndarray:
    return dilate(mask, disk(radius))


def _radius(mask: np.ndarray) -> int:
    return int(np.clip(0.5 * np.sqrt(mask.sum() / np.pi), 6, 25))


def appearance_match(query: np.ndarray, warped_image: np.ndarray, mask: np.ndarray) -> float:
    """Normalised cross-correlation of the registered support image and the query slice over the
    placed organ and a band around it ((H, W) bool `mask`): how well the located organ and its
    surroundings match the support's appearance and shape. In [-1, 1]; -1 for an empty mask."""
    if mask.sum() < 5:
        return -1.0
    reg = _region(mask, _radius(mask))
    a, b = _grey(query)[reg].astype(np.float64), _grey(warped_image)[reg].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else -1.0


def place(query: np.ndarray, support: SupportSlice, global_tf=None):
    """Register `support` onto the (H, W) `query` slice: a whole-slice affine (or `global_tf`),
    then an affine on the organ's neighbourhood. Returns (mask, warped image, confidence, transform)."""
    tf = global_tf if global_tf is not None else register_affine(query, support.image)
    mask = warp(support.mask.astype(np.float32), tf, query, nearest=True) > 0.5
    if mask.sum() >= 5:
        local = register_affine(query, support.image, fixed_mask=_region(mask, 2 * _radius(mask)),
                                initial=tf, shrink=(2, 1))
        m2 = warp(support.mask.astype(np.float32), local, query, nearest=True) > 0.5
        # A local fit that loses most of the organ (it slid off the image) is not taken.
        if m2.sum() >= 0.5 * mask.sum() and m2.sum() <= 2.0 * mask.sum():
            tf, mask = local, m2
    img = warp(_grey(support.image), tf, query)
    return mask, img, appearance_match(query, img, mask), tf


def locate(
    slice_of: Callable[[int], np.ndarray],
    n: int,
    supports: list[SupportSlice],
    rng: tuple[int, int],
    window: float = 0.35,
) -> list[Located]:
    """Where the organ of another patient's `supports` (sorted by index, on the query's slice grid)
    may be in the query volume of `n` slices (`slice_of(z)` -> (H, W) float slice), inside the
    inclusive range `rng`: one candidate per first guess of the query slice.

    The guesses: each support's relative height in its own volume (searched within `window` x n),
    and, when the supports carry `placed`, where the registration of the two whole volumes puts
    them (searched within `REGISTERED_WINDOW` x n); plus that registration's own placement of the
    middle support, refined on its slice. A whole-slice registration made at the guess is reused on
    the slices searched, and each slice is scored by the appearance match of the registered support
    around the organ, less `GUESS_PRIOR` for its distance from the guess. With several supports (a
    whole labelled volume, chunked)
    every support votes: a query slice z for the middle support scores the mean match of all
    supports at their own offsets from it. The winner is then registered again, locally, on its
    own slice. Each candidate is the middle support's placement on its chosen slice; the caller
    picks among them (`neighbour.cross_patient`), because neither guess is always right:
    relative heights differ between patients, and a whole-volume registration can fail.
    """
    mid = supports[len(supports) // 2]
    n_sup = mid.volume_slices or max(s.index for s in supports) + 1
    # A one-slice support (a 2D image) has no height of its own: the query's middle is the guess.
    height = (lambda s: s.index * (n - 1) / (n_sup - 1)) if n_sup > 1 else (lambda s: (n - 1) / 2)
    guesses = [(height, window)]
    registered = all(s.placed is not None for s in supports)
    if registered:
        guesses.append(((lambda s: s.placed.index), REGISTERED_WINDOW))
    out: list[Located] = []
    for at, share in guesses:
        found = _search(slice_of, supports, rng, {id(s): int(round(at(s))) for s in supports},
                        max(1, int(round(share * n))), n)
        if all(c.z != found.z for c in out):
            out.append(found)
    if registered and mid.placed.mask.sum() >= 5:
        # The volume registration's own placement, refined on its slice like the others.
        z = int(np.clip(round(mid.placed.index), 0, n - 1))
        if rng[0] <= z <= rng[1]:
            carried = SupportSlice(mid.index, mid.placed.image, mid.placed.mask, mid.volume_slices)
            mask, _img, conf, _tf = place(slice_of(z), carried, _identity())
            out.append(Located(z, mask, conf, mid, {z: conf}))
    return out


def _identity():
    import SimpleITK as sitk

    return sitk.AffineTransform(2)


def _search(slice_of: Callable[[int], np.ndarray], supports: list[SupportSlice], rng: tuple[int, int],
            guess: dict[int, int], half: int, n: int) -> Located:
    """The best slice within `half` slices of the middle support's guess (`locate`) in a query of
    `n` slices: the best appearance match less `GUESS_PRIOR` per share of the n slices between it and
    the guess. `guess` maps id(support) -> its guessed query slice. The Located's scores are the
    appearance matches alone."""
    import SimpleITK as sitk

    mid = supports[len(supports) // 2]
    lo, hi = rng
    z0 = min(max(guess[id(mid)], lo), hi)
    tf0 = register_affine(slice_of(z0), mid.image, shrink=(4, 2))
    cache: dict[tuple[int, int], float] = {}

    def score_at(j: int, z: int, initial=tf0) -> float:
        if not lo <= z <= hi:
            return -1.0
        key = (j, z)
        if key not in cache:
            s = supports[j]
            q = slice_of(z)
            tf = register_affine(q, s.image, initial=initial, shrink=(4,))
            m = warp(s.mask.astype(np.float32), tf, q, nearest=True) > 0.5
            cache[key] = appearance_match(q, warp(_grey(s.image), tf, q), m)
        return cache[key]

    window = range(max(lo, z0 - half), min(hi, z0 + half) + 1)
    keys = sorted({(j, z + guess[id(s)] - guess[id(mid)]) for z in window for j, s in enumerate(supports)})
    keys = [k for k in keys if lo <= k[1] <= hi]
    if SEARCH_THREADS > 1 and len(keys) > 1:
        # Each thread starts from its own copy of the first transform: nothing SimpleITK is shared.
        starts = [sitk.AffineTransform(tf0) for _ in keys]
        with ThreadPoolExecutor(SEARCH_THREADS) as pool:
            list(pool.map(lambda k, t: score_at(*k, initial=t), keys, starts))  # each fills `cache`
    weights = [float(s.mask.sum()) for s in supports]
    scores: dict[int, float] = {}
    for z in window:
        votes = [score_at(j, z + guess[id(s)] - guess[id(mid)]) for j, s in enumerate(supports)]
        # A support's vote counts by the organ it shows (an organ's tip says little).
        scores[z] = float(np.average(votes, weights=weights))
    zbest = max(scores, key=lambda z: scores[z] - GUESS_PRIOR * abs(z - z0) / max(1, n))
    mask, _img, conf, _tf = place(slice_of(zbest), mid, register_affine(slice_of(zbest), mid.image, initial=tf0,
                                                                        shrink=(4, 2)))
    return Located(int(zbest), mask, conf, mid, scores)


def volume_image(prepared):
    """A prepared grey volume (`job.PreparedImage`) as a SimpleITK image with its spacing; origin 0
    and identity direction, because another patient's origin and orientation say nothing about
    where its anatomy lies relative to this one's (the registration finds that)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(prepared.normalised, dtype=np.float32))
    img.SetSpacing(tuple(float(v) for v in prepared.volume.geometry.spacing))
    return img


_registered: OrderedDict[tuple[str, str], Any] = OrderedDict()  # (query, support) keys, oldest first
_registered_lock = threading.Lock()


def _volume_key(prepared) -> str:
    """A fingerprint of what a volume registration reads of a prepared volume: voxels and spacing."""
    h = hashlib.sha1(np.ascontiguousarray(prepared.normalised, dtype=np.float32).tobytes())
    h.update(np.asarray(prepared.volume.geometry.spacing, np.float64).tobytes())
    return h.hexdigest()


def register_volumes(query, support):
    """3D affine SimpleITK transform mapping the query's physical points (`volume_image` frame) to
    the support's: Mattes mutual information of the whole volumes, centres of mass aligned first,
    multi-resolution, 5 % of the voxels sampled with a fixed seed on one thread (reproducible).
    query, support: grey `job.PreparedImage`s. The atlas baselines of the evaluation use it too.
    The last `VOLUME_CACHE` results are kept by the two volumes' content (a copy is returned)."""
    import SimpleITK as sitk

    key = (_volume_key(query), _volume_key(support))
    with _registered_lock:
        if key in _registered:
            _registered.move_to_end(key)
            return sitk.Transform(_registered[key])
    tf = _register_volumes(query, support)
    with _registered_lock:
        _registered[key] = tf
        while len(_registered) > VOLUME_CACHE:
            _registered.popitem(last=False)
    return sitk.Transform(tf)


def clear_volume_registrations() -> None:
    """Forget the kept volume registrations (a benchmark timing the first job of a pair)."""
    with _registered_lock:
        _registered.clear()


def _register_volumes(query, support):
    import SimpleITK as sitk

    f, m = volume_image(query), volume_image(support)
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=100)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetSmoothingSigmasAreSpecifiedInPhysicalUnits(False)
    reg.SetInitialTransform(init, inPlace=False)
    with one_thread():
        return reg.Execute(f, m)


def expected_slices(query, support, supports: list[SupportSlice], transform=None) -> list[SupportSlice]:
    """`supports` (slices of the grey `support` volume, on its own grid) with `placed` set: where
    `transform` (query -> support physical points, default `register_volumes`) carries each one.
    Its organ's centroid gives the query slice; the support volume and the slice's mask (extended
    one slice either way, so a slightly tilted mapping still cuts through it) are resampled onto
    the query grid and read on that slice."""
    import SimpleITK as sitk

    from FoBSegmentLib.io.coords import put_slice, slice_axes, take_slice

    tf = transform if transform is not None else register_volumes(query, support)
    inverse = tf.GetInverse()
    f, m = volume_image(query), volume_image(support)
    with one_thread():
        image = sitk.GetArrayFromImage(sitk.Resample(m, f, tf, sitk.sitkLinear, 0.0))
    rows, cols = slice_axes(support.axis)
    n_query = query.normalised.shape[query.axis]
    out = []
    for s in supports:
        r, c = np.nonzero(s.mask)
        kji = [0.0, 0.0, 0.0]
        kji[support.axis], kji[rows], kji[cols] = float(s.index), float(r.mean()), float(c.mean())
        point = inverse.TransformPoint(m.TransformContinuousIndexToPhysicalPoint(kji[::-1]))
        z_query = float(f.TransformPhysicalPointToContinuousIndex(point)[::-1][query.axis])
        slab = np.zeros(support.normalised.shape[:3], np.uint8)
        for k in range(max(0, s.index - 1), min(slab.shape[support.axis], s.index + 2)):
            put_slice(slab, support.axis, k, s.mask)
        lab = sitk.GetImageFromArray(slab)
        lab.CopyInformation(m)
        with one_thread():
            warped = sitk.GetArrayFromImage(sitk.Resample(lab, f, tf, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
        z = int(np.clip(round(z_query), 0, n_query - 1))
        placed = PlacedSupport(z_query, np.array(take_slice(image, query.axis, z), np.float32),
                               np.array(take_slice(warped, query.axis, z), bool))
        out.append(replace(s, placed=placed))
    return out


def match_intensities(query: np.ndarray, image: np.ndarray) -> np.ndarray:
    """`image` (another patient's slice) with its intensity histogram matched to the (H, W) `query`
    slice (SimpleITK HistogramMatching, pixels above the mean: the body), clipped to [0, 1]."""
    import SimpleITK as sitk

    a = np.asarray(image, np.float32)
    if a.ndim == 3:
        return a  # colour: no histogram of a body to match
    f = sitk.HistogramMatchingImageFilter()
    f.SetNumberOfHistogramLevels(128)
    f.SetNumberOfMatchPoints(15)
    f.ThresholdAtMeanIntensityOn()
    out = sitk.GetArrayFromImage(f.Execute(_sitk(a), _sitk(query)))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def match_supports(slice_of: Callable[[int], np.ndarray], n: int, supports: list[SupportSlice], z: int,
                   mid: SupportSlice) -> list[SupportSlice]:
    """The supports with intensities matched to the query slice where each one's organ is expected
    (z for `mid`, the others at their offset from it), as new SupportSlices."""
    out = []
    for s in supports:
        q = slice_of(int(np.clip(z + (s.index - mid.index), 0, n - 1)))
        out.append(replace(s, image=match_intensities(q, s.image)))
    return out


def located_confidence(notes: list[str]) -> tuple[int, float] | None:
    """(seed slice, confidence) of a cross-patient propagation, read from its notes; None otherwise."""
    import re

    for n in notes:
        hit = re.match(r"cross-patient: .* onto query slice (\d+), confidence (-?[0-9.]+)", n)
        if hit:
            return int(hit.group(1)), float(hit.group(2))
    return None


def registration_agreement(accepted: Callable[[int], np.ndarray], n: int, supports: list[SupportSlice]
                           ) -> tuple[int, float] | None:
    """(query slice z, Dice) between the whole-volume registration's placement of the middle
    support's organ and the result (`accepted(z)` -> (H, W) bool) on the slice z, within
    `REGISTERED_WINDOW` x n slices of where the registration puts the organ, that overlaps it most
    (the registration's slice may be a few off); None without such a placement inside the query's
    `n` slices (no support volume, a replay, a registration that carries the organ out of the query)."""
    mid = supports[len(supports) // 2]
    if mid.placed is None or mid.placed.mask.sum() < 5:
        return None
    zr = int(round(mid.placed.index))
    if not 0 <= zr < n:
        return None
    half = max(1, int(round(REGISTERED_WINDOW * n)))
    return max(((z, float(dice(accepted(z), mid.placed.mask))) for z in range(max(0, zr - half), min(n, zr + half + 1))),
               key=lambda t: (t[1], -abs(t[0] - zr)))


def disputed_note(accepted: Callable[[int], np.ndarray], n: int, supports: list[SupportSlice]) -> str | None:
    """The `DISPUTED_NOTE` line when the result (`accepted(z)` -> (H, W) bool) overlaps the
    registration's placement less than `REGISTRATION_AGREEMENT` (`registration_agreement`); None
    when they agree or there is no placement to compare with."""
    check = registration_agreement(accepted, n, supports)
    if check is None or check[1] >= REGISTRATION_AGREEMENT:
        return None
    z, agreement = check
    return (f"{DISPUTED_NOTE}: the registration of the two whole volumes puts the organ around query slice {z}, "
            f"where the result overlaps it at most {agreement:.2f} (Dice) < {REGISTRATION_AGREEMENT}; check the result")


def flag_cross_patient(result) -> list[str]:
    """Review flags of a cross-patient `PropagationResult` (in place): the seed slice is flagged with
    the organ's confidence, and every segmented slice when it is low or the volume registration puts
    the organ elsewhere (so they lead the review ranking). Returns the one-line warnings (empty when
    the organ was found with confidence where the registration puts it too)."""
    found = located_confidence(result.notes)
    if found is None:
        return []
    z0, conf = found
    low = conf < LOW_CONFIDENCE
    disputed = [n for n in result.notes if n.startswith((DISPUTED_NOTE, NOT_FOLLOWED_NOTE))]
    for z, rep in result.slices.items():
        if rep.area <= 0 or rep.source == "annotation":
            continue
        if z == z0:
            rep.flags.append(f"review: cross-patient seed, organ located with confidence {conf:.2f}")
        elif low:
            rep.flags.append(f"review: cross-patient organ located with low confidence {conf:.2f}")
        if disputed:
            rep.flags.append("review: the organ's placement is in doubt (" + "; ".join(
                n.split(": ")[1] for n in disputed) + ")")
    if not np.asarray(result.mask).any():
        return [f"{LOW_CONFIDENCE_NOTE}: nothing was segmented from the located seed (query slice {z0}, "
                f"confidence {conf:.2f})"]
    warnings = [next(n for n in result.notes if n.startswith(LOW_CONFIDENCE_NOTE))] if low else []
    return warnings + disputed


def core_of(mask: np.ndarray) -> np.ndarray:
    """The placed organ eroded by a fifth of its radius (at least 2 px): pixels that are organ even
    where the placement is a few pixels off."""
    return core(mask, 0.2)


def organ_confidence(appearance: float, inside: float, kept: float) -> float:
    """The organ's confidence from three signs in [0, 1] (appearance may be negative): the appearance
    match around the placed organ, the share of its core holding the support organ's intensities,
    and the share of it the segmenter keeps on the seed slice. The weakest of the first two decides;
    a seed the segmenter all but drops (kept < 0.1) halves it."""
    conf = min(appearance, inside)
    return conf * 0.5 if kept < 0.1 else conf
