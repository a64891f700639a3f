"""The one job builder: settings + images -> a propagation job. `fob segment` (files.py), the Slicer
Logic, `fob evaluate` and `fob bench` all build their jobs here, so they run the same job.

A job is made in three steps, each usable on its own:
    prepare_image(volume, settings)       normalised intensities, modality and slicing axis
    load_components(settings)             the FoB generator (on its device) and the segmenter
    build_job(query, support_mask, ...)   supports, prompt source, configuration -> Job
and `Job.run` propagates (or replays a prompts file).

Frames: volumes are [k, j, i] arrays (RGB 2D images [1, H, W, 3] once prepared); the slicing axis is
an array axis of [k, j, i]; support masks are bool on their own image's [k, j, i] grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from FoBSegmentLib.errors import SettingError
from FoBSegmentLib.io.coords import slice_axes, slice_spacing, take_slice
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.propagation import (
    PROMPT_SOURCES,
    PropagationConfig,
    PropagationResult,
    SupportSlice,
    check_slice_range,
    chunk_supports,
    config_for_modality,
    parse_slices,
    propagate,
    support_slices_from_volume,
)
from FoBSegmentLib.propagation.document import (
    check_record,
    config_from_record,
    edited_slices,
    support_fingerprint,
)
from FoBSegmentLib.propagation.refine import REFINERS

Log = Callable[[str], None]
MODALITIES = ("auto", "ct", "mr", "rgb")
# Another patient's support is resampled to the query's pixel size only when the two differ by more
# than this share (`in_query_pixels`): patients' bodies differ by more, which the locate step's affine
# registrations absorb, while resampling blurs the look the segmenter learns from the support's pixels
# (on Synapse CT, whose pixels differ by 1.5-8 % between pairs, resampling them all cost 3.8 points).
PIXEL_SCALE_TOLERANCE = 0.1


@dataclass
class JobSettings:
    """What a person chooses; every front end fills this and nothing else decides.

    prompts_from: auto | fob | neighbour | hybrid (auto: hybrid with a FoB model, else neighbour).
    model: FoB weights file, None = the shipped default. device: auto | cpu | cuda[:N] | mps, for the
        model and the segmenter. segmenter / sam_checkpoint: `segmenters.get_segmenter` arguments.
    modality: auto | ct | mr | rgb, the intensity preset and the propagation's modality preset.
    window: CT (level, width) in HU, None = the abdominal default. axis: array axis of [k, j, i] to
        slice along, None = the rule of `default_slice_axis`. slices: "auto", (first, last) or the
        same as `fob segment --slices` text ("A:B").
    config: the propagation's base configuration (None = defaults); the modality preset is applied to
        the fields left at their defaults unless `modality_presets` is False.
    refine: None, or a box-prompted segmenter (`propagation.refine.REFINERS`) that redraws the outline
        of each segmented slice once the chains are done.
    """

    prompts_from: str = "auto"
    model: str | None = None
    device: str = "auto"
    segmenter: str = "auto"
    sam_checkpoint: str | None = None
    modality: str = "auto"
    window: tuple[float, float] | None = None
    axis: int | None = None
    slices: str | tuple[int, int] = "auto"
    largest_component: bool = False
    config: PropagationConfig | None = None
    modality_presets: bool = True
    refine: str | None = None

    def check(self) -> None:
        """SettingError naming the first bad field."""
        if self.prompts_from not in ("auto", *PROMPT_SOURCES):
            raise SettingError("prompts_from", f"must be auto, {', '.join(PROMPT_SOURCES)}; got {self.prompts_from!r}")
        if self.modality not in MODALITIES:
            raise SettingError("modality", f"must be one of {', '.join(MODALITIES)}; got {self.modality!r}")
        if self.axis is not None and self.axis not in (0, 1, 2):
            raise SettingError("axis", f"must be 0, 1 or 2; got {self.axis!r}")
        if self.refine is not None and self.refine not in REFINERS:
            raise SettingError("refine", f"must be one of {', '.join(REFINERS)} or none; got {self.refine!r}")


@dataclass
class PreparedImage:
    """An image ready for propagation: `volume` (io.volumes.Volume), `normalised` [k, j, i] float32
    in [0, 1] ([1, H, W, 3] for colour), its `modality` and the slicing `axis`."""

    volume: Any
    normalised: np.ndarray
    modality: str
    axis: int


def default_slice_axis(geometry: Any) -> tuple[int, str]:
    """The array axis of [k, j, i] to slice along by default, and why.

    A clearly anisotropic volume (one spacing > 1.5x both others) is sliced along its thick axis,
    the acquisition axis, whatever its orientation (oblique cardiac short-axis stacks); otherwise
    along the axial axis from the direction matrix (`io.coords.axial_axis`).
    """
    from FoBSegmentLib.io.coords import axial_axis

    sp = np.asarray(geometry.spacing, dtype=np.float64)
    thick = int(np.argmax(sp))
    others = np.delete(sp, thick)
    if sp[thick] > 1.5 * others.max():
        axis = 2 - thick
        kind = "axial" if axis == axial_axis(geometry) else "not the axial one"
        return axis, f"the acquisition axis, {sp[thick]:.2f} mm slices, {kind}"
    return axial_axis(geometry), "the axial axis of the direction matrix"


def prepare_image(volume: Any, settings: JobSettings, what: str = "image", log: Log | None = None) -> PreparedImage:
    """Normalise a volume's intensities (`io.intensity`) and choose its slicing axis.

    volume: an `io.volumes.Volume` (from a file, or built from a Slicer node). Raises SettingError
    for a modality, window or axis that does not fit the image.
    """
    from FoBSegmentLib.io import intensity

    say = log or (lambda _m: None)
    name = Path(str(volume.path)).name
    if "alpha channel ignored" in getattr(volume, "description", ""):
        say(f"{what}: {name} has an alpha channel; it is ignored, the colour channels are segmented")
    if settings.modality == "auto":
        guess = intensity.guess_modality(volume.array, volume.modality_hint, volume.is_rgb)
        say(f"{what}: modality {guess.modality.upper()} ({guess.reason})")
        modality = guess.modality
    else:
        modality = settings.modality
        if modality == "rgb" and not volume.is_rgb:
            raise SettingError("modality", f"rgb but {name} is not a colour image")
        if volume.is_rgb and modality != "rgb":
            raise SettingError("modality", f"{name} is a colour image; use rgb or auto")
    if settings.window is not None and modality != "ct":
        raise SettingError("window", f"applies to CT only, but {what} is treated as {modality.upper()}")
    window = settings.window if modality == "ct" else None
    grid = volume.grid_array
    norm = intensity.normalize(grid if not volume.is_rgb else volume.array, modality, window).reshape(grid.shape)
    chosen = settings.axis
    if volume.is_2d:
        if chosen not in (None, 0):
            raise SettingError("axis", "a 2D image has one slice; the axis must be 0")
        chosen = 0
    elif chosen is None:
        chosen, why = default_slice_axis(volume.geometry)
        say(f"slicing along array axis {chosen} of [k, j, i] ({why}); --axis overrides")
    slice_axes(chosen)
    return PreparedImage(volume, np.asarray(norm, np.float32), modality, int(chosen))


def load_generator(model: str | None, required: bool, device: str = "cpu") -> tuple[Any, str]:
    """The FoB generator (`model` or the shipped default) on `device` ("auto" resolves to
    cuda/mps/cpu) and a line saying which; (None, why) when no default is shipped and `required` is False."""
    try:
        from FoBSegmentLib.model import FoBPromptGenerator
    except ImportError as exc:
        if required or model:
            raise ValueError(f"the FoB model code is not available ({exc})") from None
        return None, "no FoB model code in this installation"
    from FoBSegmentLib.device import resolve_device

    dev = resolve_device(device)
    try:
        gen = FoBPromptGenerator.load(model, device=dev) if model else FoBPromptGenerator.load(device=dev)
    except FileNotFoundError as exc:
        if required or model:
            raise
        return None, f"no default FoB model shipped ({' '.join(str(exc).split())})"
    return gen, f"FoB model {Path(model).name if model else 'default (Resources)'} on {dev}"


@dataclass
class Components:
    """What a job computes with: the FoB generator (None without a model), the segmenter, the
    resolved prompt source, and lines saying which."""

    generator: Any
    segmenter: Any
    prompts_from: str
    notes: list[str] = field(default_factory=list)
    refiner: Any = None


def load_components(settings: JobSettings, replaying: bool = False, generator: Any = None,
                    segmenter: Any = None, refiner: Any = None) -> Components:
    """Load (or take the given, already loaded) generator, segmenter and refiner for `settings`.

    auto: hybrid (FoB finds the organ's extent, neighbour chaining its shape) when a FoB model is
    available, else neighbour; an explicit --model with auto means hybrid too. replaying: a prompts
    file is replayed, no model is needed.
    """
    settings.check()
    notes: list[str] = []
    source = settings.prompts_from
    if replaying:
        notes.append("prompts: read from the prompts file, nothing predicted")
    elif generator is not None:
        notes.append("prompts: the FoB model already loaded")
    elif source in ("fob", "hybrid", "chained") or settings.model:
        generator, why = load_generator(settings.model, required=True, device=settings.device)
        notes.append(f"prompts: {why}")
    elif source == "auto":
        generator, why = load_generator(None, required=False, device=settings.device)
        if generator is None:
            notes.append(f"prompts: neighbour chaining (no learning), because {why}")
        else:
            # Said plainly (issue 17): on the evaluation data FoB's range never changed the result,
            # and FoB chained into every slice scored below the neighbour chain (docs/RESULTS.md).
            notes.append("prompts: hybrid: FoB's coarse map bounds the organ's slice range, the shape comes from "
                         "the neighbour chain, because FoB chained into every slice (--prompts-from chained) "
                         "scored below it (docs/RESULTS.md, 'FoB in the chain'); on CHAOS MR and Synapse CT "
                         f"the range did not change the result; {why}")
    else:
        notes.append("prompts: neighbour chaining from the annotated slice (no learning)")
    if source == "auto":
        source = "hybrid" if generator is not None else "neighbour"
    if segmenter is None:
        from FoBSegmentLib.segmenters import get_segmenter

        segmenter = get_segmenter(settings.segmenter, checkpoint=settings.sam_checkpoint, device=settings.device)
    notes.append(getattr(segmenter, "auto_choice", None) or f"segmenter: {getattr(segmenter, 'name', settings.segmenter)}")
    if settings.refine is None:
        refiner = None
    else:
        if refiner is None:
            from FoBSegmentLib.segmenters import get_segmenter

            refiner = get_segmenter(settings.refine, device=settings.device)
        notes.append(f"outlines: refined by {settings.refine} in the box of each chain mask")
    return Components(generator, segmenter, source, notes, refiner)


@dataclass
class Job:
    """One propagation, ready to run (no file, no MRML: safe on a worker thread).

    image: the prepared query [k, j, i] float32; supports: the annotated slices (resampled later to
    the query's slice size when they come from another patient); prompts_in / record: a prompts
    file to replay instead of predicting (see `propagation.document`). support: another patient's
    grey volume, registered onto the query when the job runs (`support_transform`, computed then
    unless given) so the locate step knows where to look.
    """

    query: PreparedImage
    supports: list[SupportSlice]
    same_volume: bool
    components: Components
    config: PropagationConfig
    notes: list[str] = field(default_factory=list)
    prompts_in: dict[int, PromptSet] | None = None
    record: dict | None = None
    support: PreparedImage | None = None
    support_transform: Any = None

    @property
    def axis(self) -> int:
        return self.query.axis

    @property
    def image(self) -> np.ndarray:
        return self.query.normalised

    @property
    def prompts_from(self) -> str:
        return self.components.prompts_from

    def _placed_supports(self, progress: Any = None) -> list[SupportSlice]:
        """The supports, `placed` by the registration of another patient's whole grey
        volume onto the query (a replay of a prompts file needs no locate step: none made)."""
        if self.support is None or self.prompts_in is not None or self.support.volume.is_rgb \
                or min(self.support.normalised.shape[:3]) < 2 or min(self.query.normalised.shape[:3]) < 2:
            return self.supports
        from FoBSegmentLib.propagation.locate import expected_slices, register_volumes

        if self.support_transform is None:
            if progress is not None:
                progress(0, 1, "registering the support volume onto the query")
            self.support_transform = register_volumes(self.query, self.support)
        return expected_slices(self.query, self.support, self.supports, self.support_transform)

    def with_prompts(self, prompts: dict[int, PromptSet], record: dict | None) -> Job:
        """A copy that replays `prompts` (and their propagation record, if any) instead of predicting.
        The record's configuration wins over the settings (it is what made the prompts)."""
        job = dataclasses.replace(self, prompts_in=dict(prompts), record=record, notes=list(self.notes))
        if record is not None:
            if int(record.get("axis", self.axis)) != self.axis:
                raise SettingError("axis", f"the prompts file was made slicing along axis {record.get('axis')}, "
                                           f"this job slices along {self.axis}")
            job.config = config_from_record(record)
        return job

    def replaying_edits(self, prompts: dict[int, PromptSet], record: dict | None) -> Job:
        """This job, or a copy that replays `record` with `prompts` (`with_prompts`) when the record
        is that of a run of this very job (same annotated slices, prompt source and configuration) and
        `prompts` (the points as shown and edited since) differ from what that run gave its slices.
        A preview edited by hand then gives the mask of its points, as Segment and `fob segment
        --prompts-in` do; a changed annotation or setting is a new job, predicted afresh."""
        if record is None or not self.same_volume or not record.get("sameVolume", True):
            return self
        record = check_record(record)
        same = (int(record["axis"]) == self.axis and record["promptsFrom"] == self.prompts_from
                and record["config"] == self.config.to_json()
                and record.get("support") == support_fingerprint(self.supports))
        edited = edited_slices(record, prompts) if same else []
        if not edited:
            return self
        job = self.with_prompts(prompts, record)
        job.notes.append(f"replayed the prediction with the points as edited on slice(s) "
                         f"{', '.join(map(str, edited))}")
        return job

    def run(self, progress: Any = None, cancel: Any = None, on_slice: Any = None,
            previous: PropagationResult | None = None) -> PropagationResult:
        """Propagate (see `propagation.propagate` for the callbacks and `previous`)."""
        return propagate(
            self.query.normalised,
            self._placed_supports(progress),
            self.components.segmenter,
            axis=self.axis,
            same_volume=self.same_volume,
            prompts_from=self.components.prompts_from,
            generator=self.components.generator,
            config=self.config,
            prompts_in=self.prompts_in,
            record=self.record,
            previous=previous,
            progress=progress,
            cancel=cancel,
            on_slice=on_slice,
            spacing=slice_spacing(self.query.volume.geometry, self.axis),
            refiner=self.components.refiner,
        )


def job_config(settings: JobSettings, modality: str, n_slices: int) -> PropagationConfig:
    """The propagation configuration of `settings` for a query of `modality` with `n_slices` slices."""
    cfg = dataclasses.replace(settings.config) if settings.config is not None else PropagationConfig()
    if settings.modality_presets:
        cfg = config_for_modality(cfg, modality)
    # Text as `fob segment --slices` takes it ("auto", "A:B") or a (first, last) pair.
    rng = parse_slices(settings.slices) if isinstance(settings.slices, str) else settings.slices
    cfg.slices = rng if rng == "auto" else (int(rng[0]), int(rng[1]))
    check_slice_range(cfg.slices, n_slices)
    cfg.largest_component = bool(settings.largest_component or cfg.largest_component)
    return cfg


def in_query_axes(query: PreparedImage, support: PreparedImage, mask: np.ndarray
                  ) -> tuple[PreparedImage, np.ndarray, tuple[str, str] | None]:
    """Another patient's support image and its mask ([k, j, i] bool, or labels, on its grid) with their axes
    permuted and reversed to run as the query's do (`io.coords.reorient`), and (the support's
    orientation, the query's) when they did not. Whether a scan is stored head first or feet first,
    or mirrored in plane, is a matter of the file, not of the anatomy: the locate step compares slice
    heights, slices and volumes array against array. A 2D picture has no anatomical axes to turn."""
    from FoBSegmentLib.io.coords import orientation, reorient, reoriented_axis

    if query.volume.is_2d or support.volume.is_2d:
        return support, mask, None
    geometry = support.volume.geometry
    want, have = orientation(query.volume.geometry), orientation(geometry)
    if want == have:
        return support, mask, None
    normalised, turned = reorient(support.normalised, geometry, want)
    volume = dataclasses.replace(support.volume, array=reorient(support.volume.array, geometry, want)[0],
                                 geometry=turned)
    prepared = PreparedImage(volume, normalised, support.modality, reoriented_axis(geometry, turned, support.axis))
    return prepared, reorient(mask, geometry, want)[0], (have, want)


def in_query_pixels(query: PreparedImage, support: PreparedImage, mask: np.ndarray
                    ) -> tuple[PreparedImage, np.ndarray, str | None]:
    """Another patient's support image and its mask ([k, j, i] bool on its grid, axes as the query's:
    `in_query_axes`) on the query's slice size, cut or padded about the centre of the support's
    field of view (moved as little as keeps its organ inside), and resampled in plane to the query's
    pixel spacing where the two differ by more than `PIXEL_SCALE_TOLERANCE` (image linear, mask
    nearest; the slices stay as they are), and a line saying so; unchanged (None) when the two
    slice grids already agree. Before, a support of another slice size was stretched to the query's,
    so a cropped export or a smaller field of view showed its organ larger than it is."""
    import SimpleITK as sitk

    from FoBSegmentLib.io.coords import Geometry

    axis = query.axis
    if query.volume.is_2d or support.volume.is_2d or support.axis != axis:
        return support, mask, None
    plane = slice_axes(axis)
    q_geom, s_geom = query.volume.geometry, support.volume.geometry
    q_mm, s_mm = [q_geom.spacing[2 - a] for a in plane], [s_geom.spacing[2 - a] for a in plane]
    q_px, s_px = [query.normalised.shape[a] for a in plane], [support.normalised.shape[a] for a in plane]
    mm = [qm if abs(qm / sm - 1) > PIXEL_SCALE_TOLERANCE else sm for qm, sm in zip(q_mm, s_mm)]
    if q_px == s_px and mm == s_mm:
        return support, mask, None
    start = [0.0, 0.0, 0.0]  # (k, j, i): the new grid's first voxel, in the support's continuous index
    spacing, size = list(s_geom.spacing), list(s_geom.size)
    organ = np.nonzero(mask)
    for a, m, sm, qp, sp in zip(plane, mm, s_mm, q_px, s_px):
        span = (qp - 1) * m / sm  # the new grid's extent along a, in support pixels
        first = (sp - 1) / 2 - span / 2
        if organ[a].size:  # (an empty mask is refused by the caller, with its own message)
            lo, hi = float(organ[a].min()), float(organ[a].max())
            first = lo if lo < first else (hi - span if hi > first + span else first)
        start[a] = float(np.floor(first)) if m == sm else first  # (same pixels: cut whole, no interpolation)
        spacing[2 - a], size[2 - a] = m, qp
    grid = Geometry(tuple(spacing), tuple(float(v) for v in s_geom.ijk_to_lps([start[::-1]])[0]),
                    s_geom.direction, tuple(int(v) for v in size))

    def resampled(array: np.ndarray, nearest: bool) -> np.ndarray:
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        s_geom.apply_to_sitk(img)
        ref = sitk.Image(list(grid.size), sitk.sitkUInt8)
        grid.apply_to_sitk(ref)
        return sitk.GetArrayFromImage(sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor if nearest
                                                    else sitk.sitkLinear, 0.0))

    volume = dataclasses.replace(support.volume, array=resampled(support.volume.array, False), geometry=grid)
    moved = PreparedImage(volume, resampled(support.normalised, False), support.modality, axis)
    fmt = "{} x {} px of {:.3g} x {:.3g} mm".format
    how = "resampled in plane" if mm != s_mm else "cut or padded about its centre"
    return moved, resampled(mask.astype(np.uint8), True) > 0, (
        f"support: {how} from {fmt(s_px[1], s_px[0], s_mm[1], s_mm[0])} to {fmt(q_px[1], q_px[0], mm[1], mm[0])} "
        f"(the image: {q_mm[1]:.3g} x {q_mm[0]:.3g} mm), at the scale of its anatomy")


def build_job(
    query: PreparedImage,
    support_mask: np.ndarray,
    settings: JobSettings,
    support: PreparedImage | None = None,
    components: Components | None = None,
    log: Log | None = None,
    support_name: str = "the support mask",
    absent_slices: tuple[int, ...] | list[int] = (),
) -> Job:
    """The job for annotated slices `support_mask` ([k, j, i] bool on the support's grid; the support
    is the query itself when `support` is None) under `settings`. absent_slices: slices annotated as
    not showing the organ (same volume only).

    components: an already loaded generator/segmenter (evaluations and the Slicer Logic reuse them
    across jobs); loaded from the settings when None. Raises ValueError / SettingError.
    """
    say = log or (lambda _m: None)
    same_volume = support is None or support is query
    sup_img = query if same_volume else support
    mask = np.asarray(support_mask, bool)
    if mask.shape != sup_img.normalised.shape[:3]:
        raise ValueError(f"{support_name} has shape {mask.shape}, its image {sup_img.normalised.shape[:3]}")
    turned = scaled = None
    if not same_volume:
        sup_img, mask, turned = in_query_axes(query, sup_img, mask)
        sup_img, mask, scaled = in_query_pixels(query, sup_img, mask)
    supports = support_slices_from_volume(sup_img.normalised, mask, sup_img.axis)
    if not supports:
        raise ValueError(f"{support_name} is empty: outline the organ on at least one slice")
    if absent_slices:
        # Annotated absences (the organ is not on these slices): chains stop before them.
        if not same_volume:
            raise SettingError("absent_slices", "only for a support in the image itself")
        absent = sorted({int(z) for z in absent_slices})
        n = query.normalised.shape[query.axis]
        if absent[0] < 0 or absent[-1] >= n:
            bad = absent[0] if absent[0] < 0 else absent[-1]
            raise SettingError("absent_slices", f"slice {bad} is out of bounds: the volume has slices 0..{n - 1} "
                                                "along this axis")
        drawn = sorted(set(absent) & {s.index for s in supports})
        if drawn:
            raise SettingError("absent_slices", f"slice {drawn[0]} shows the organ in {support_name}: a slice is "
                                                "annotated or marked absent, not both")
        rows, cols = slice_axes(query.axis)
        hw = (query.normalised.shape[rows], query.normalised.shape[cols])
        supports += [SupportSlice(z, np.asarray(take_slice(query.normalised, query.axis, z)), np.zeros(hw, bool), n)
                     for z in absent]
    where = "this image" if same_volume else Path(str(sup_img.volume.path)).name
    notes = [f"support: {support_name} on {len(supports)} slice(s) of {where}"]
    if turned is not None:
        notes.append(f"support: {where} is stored with its axes running {turned[0]}, the image's {turned[1]}; its "
                     "voxels are reordered to run as the image's (nothing resampled), and support slice numbers count "
                     "in that order")
    if scaled is not None:
        notes.append(scaled)
    if not same_volume:
        if query.volume.is_rgb != sup_img.volume.is_rgb:
            raise ValueError("the image and the support image must both be colour (RGB) or both grey")
        supports = chunk_supports(supports)
    cfg = job_config(settings, query.modality, query.normalised.shape[query.axis])
    comps = components if components is not None else load_components(settings)
    notes += comps.notes
    for line in notes:
        say(line)
    return Job(query, supports, same_volume, comps, cfg, notes, support=None if same_volume else sup_img)
