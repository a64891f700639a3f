"""The file job behind `fob segment` (and `fob demo`, `fob bench`): read and check the files, build
the job (`job.build_job`), run it, write the label map and the prompts document atomically.

Every input is checked before any computation; nothing is written unless the whole job succeeds.
Frames: label maps are written on exactly the query image's grid (LPS geometry of the file).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from FoBSegmentLib.errors import SettingError
from FoBSegmentLib.job import JobSettings, build_job, load_components, prepare_image
from FoBSegmentLib.propagation import (
    CancelCheck,
    ProgressCallback,
    PropagationConfig,
    PropagationResult,
    SliceCallback,
)
from FoBSegmentLib.propagation.review import review_ranking, write_review


@dataclass
class SegmentRequest:
    """Everything `fob segment` takes, as plain values (see `fob segment --help`)."""

    image: str | os.PathLike
    output: str | os.PathLike
    support_mask: str | os.PathLike
    support_image: str | os.PathLike | None = None
    support_label: int | None = None
    label_value: int | None = None
    slices: str | tuple[int, int] = "auto"
    # Slices annotated as not showing the organ (e.g. just past its ends): no chain passes them.
    absent_slices: tuple[int, ...] = ()
    segmenter: str = "auto"
    sam_checkpoint: str | None = None
    refine: str | None = None
    model: str | None = None
    modality: str = "auto"
    window: tuple[float, float] | None = None
    device: str = "auto"
    prompts_out: str | os.PathLike | None = None
    prompts_in: str | os.PathLike | None = None
    review_out: str | os.PathLike | None = None
    prompts_from: str = "auto"
    axis: int | None = None
    largest_component: bool = False
    config: PropagationConfig | None = None
    # Refuse (ValueError, nothing written) when another patient's organ cannot be found in the image.
    strict: bool = False

    def settings(self) -> JobSettings:
        return JobSettings(
            prompts_from=self.prompts_from, model=self.model, device=self.device, segmenter=self.segmenter,
            sam_checkpoint=self.sam_checkpoint, modality=self.modality, window=self.window, axis=self.axis,
            slices=self.slices, largest_component=self.largest_component, config=self.config, refine=self.refine,
        )


@dataclass
class SegmentOutcome:
    """What `segment_files` did: the propagation result, the files written, the notes it logged."""

    result: PropagationResult
    output: Path
    prompts_out: Path | None
    messages: list[str] = field(default_factory=list)
    query: Any = None  # the query `io.volumes.Volume` (its geometry, path, modality hint)
    review_out: Path | None = None
    warnings: list[str] = field(default_factory=list)  # one line each, e.g. the organ was not found


def binary_support(label_arr: np.ndarray, label: int | None, path: Path) -> tuple[np.ndarray, int]:
    """The support label's voxels as bool, and the label chosen (the only one when not given)."""
    values = [int(v) for v in np.unique(label_arr) if v != 0]
    if not values:
        raise ValueError(f"the support mask {path.name} is empty (no non-zero voxel)")
    if label is None:
        if len(values) > 1:
            raise SettingError("support_label", f"needed: the support mask {path.name} holds labels "
                                                f"{', '.join(map(str, values))}")
        label = values[0]
    elif label not in values:
        raise SettingError("support_label", f"{label} is not present in {path.name} "
                                            f"(labels present: {', '.join(map(str, values))})")
    return label_arr == label, label


def _check_json_out(path: str | os.PathLike | None, field: str, suffix: str, others: list) -> Path | None:
    """A JSON output path checked before any work: its suffix, not an input or another output, writable."""
    if path is None:
        return None
    from FoBSegmentLib.atomic import check_writable

    out = Path(path)
    if not str(out).endswith(suffix):
        raise SettingError(field, f"{out} must end in {suffix}")
    for other in others:
        if other is not None and Path(other).resolve() == out.resolve():
            raise SettingError(field, f"{out} is also an input or another output")
    check_writable(out, "--" + field.replace("_", "-"))
    return out


def _label_value(req: SegmentRequest, out: Path, is_2d: bool) -> int:
    # An 8-bit 2D mask is viewed as a picture; 255 matches the dermoscopy masks' convention.
    value = req.label_value if req.label_value is not None else (255 if str(out).lower().endswith(".png") else 1)
    if not 1 <= value <= 65535:
        raise SettingError("label_value", f"must be in 1..65535, got {value}")
    if str(out).lower().endswith(".png") and not is_2d:
        raise ValueError("a .png output is only for 2D images; use .nii.gz for volumes")
    return value


def segment_files(
    req: SegmentRequest,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    log: Callable[[str], None] | None = None,
    on_slice: SliceCallback | None = None,
) -> SegmentOutcome:
    """Read, check, build the job, propagate (or replay `prompts_in`), write atomically.
    on_slice: see `propagation.propagate`."""
    from FoBSegmentLib.io import markups, volumes

    messages: list[str] = []

    def note(m: str) -> None:
        messages.append(m)
        if log is not None:
            log(m)

    settings = req.settings()
    settings.check()
    inputs = [req.image, req.support_mask, req.support_image, req.prompts_in]
    out = volumes.check_output_path(req.output, inputs)
    prompts_out = _check_json_out(req.prompts_out, "prompts_out", ".mrk.json", [*inputs, req.output])
    review_out = _check_json_out(req.review_out, "review_out", ".json", [*inputs, req.output, req.prompts_out])
    doc = markups.load_markups_document(req.prompts_in) if req.prompts_in is not None else None
    record = markups.propagation_record(doc, Path(req.prompts_in).name) if doc is not None else None
    if record is not None and settings.axis is None:
        settings.axis = int(record["axis"])

    query_vol = volumes.read_volume(req.image)
    same_file = req.support_image is not None and Path(req.support_image).resolve() == Path(req.image).resolve()
    support_vol = volumes.read_volume(req.support_image) if req.support_image is not None and not same_file else query_vol
    support_lab, turned = volumes.on_grid_of(support_vol, volumes.read_label(req.support_mask), "support mask")
    if turned is not None:
        note(turned)
    support_bin, label = binary_support(support_lab.array, req.support_label, Path(req.support_mask))
    if query_vol.is_rgb != support_vol.is_rgb:
        raise ValueError("the image and the support image must both be colour (RGB) or both grey")
    label_value = _label_value(req, out, query_vol.is_2d)

    query = prepare_image(query_vol, settings, "image", note)
    support = None
    if support_vol is not query_vol:
        # Another patient's volume is sliced by its own rule, whatever the query's axis.
        support = prepare_image(support_vol, dataclasses.replace(settings, axis=None), "support image", note)
    prompts_in = None
    if doc is not None:
        prompts_in = markups.markups_dict_to_prompts(doc, query_vol.geometry, query.axis, name=Path(req.prompts_in).name)
        if not prompts_in:
            raise ValueError(f"the prompts file {Path(req.prompts_in).name} holds no point")
        note(f"prompts: read from {Path(req.prompts_in).name} ({len(prompts_in)} slices"
             + (", with its propagation record)" if record is not None else ", no propagation record)"))
    if (settings.model is None and query_vol.is_rgb and support is not None and prompts_in is None
            and settings.prompts_from != "neighbour"):
        settings.model = str(_skin_default_model(note))  # issue 21: colour images get the dermoscopy model
    components = load_components(settings, replaying=prompts_in is not None)
    job = build_job(query, support_bin, settings, support=support, components=components, log=note,
                    support_name=f"label {label} of {Path(req.support_mask).name}", absent_slices=req.absent_slices)
    if prompts_in is not None:
        job = job.with_prompts(prompts_in, record)
    result = job.run(progress=progress, cancel=cancel, on_slice=on_slice)
    for line in result.notes:
        note(line)
    if result.warnings and req.strict:
        raise ValueError(f"--strict: {result.warnings[0]}; nothing written")
    out_arr = result.mask.astype(np.uint16 if label_value > 255 else np.uint8) * label_value
    # The side files first: if one fails nothing is left; if the label write fails, they are removed.
    written: list[Path] = []
    try:
        if prompts_out is not None:
            markups.write_prompt_markups(prompts_out, result.prompts, query_vol.geometry, query.axis,
                                         record=result.record)
            written.append(prompts_out)
        if review_out is not None:
            write_review(review_out, review_ranking(result))
            written.append(review_out)
        volumes.write_label(out, out_arr, query_vol.geometry)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return SegmentOutcome(result, out, prompts_out, messages, query_vol, review_out, result.warnings)


# ---- issue 21: one annotated image -> many (a folder or a list of 2-D query images) -------------------


def query_images(inputs: list[str | os.PathLike]) -> list[Path] | None:
    """The 2-D query images of `fob segment`'s IMAGE argument(s), or None for the one-image/volume job.

    Several arguments, or one folder holding .jpg/.png/.bmp pictures (not `*_mask.png`; a DICOM
    series folder holds none), are a many-images job."""
    from FoBSegmentLib.io.volumes import list_2d_images

    paths = [Path(p) for p in inputs]
    if len(paths) == 1 and not paths[0].is_dir():
        return None
    if len(paths) == 1:
        return list_2d_images(paths[0]) or None
    for p in paths:
        if p.is_dir():
            raise ValueError(f"{p} is a folder: give either one folder of images or a list of image files")
    return paths


@dataclass
class ManyOutcome:
    """What `segment_many` wrote: one outcome per query image (in input order) and the notes."""

    outcomes: list[SegmentOutcome]
    messages: list[str] = field(default_factory=list)


def mask_name(image: Path) -> str:
    """The output file name of a query image's mask: `<stem>_mask.png` (the data folders' convention)."""
    return f"{image.stem}_mask.png"


def segment_many(
    req: SegmentRequest,
    images: list[Path],
    progress: ProgressCallback | None = None,
    log: Callable[[str], None] | None = None,
) -> ManyOutcome:
    """Segment every 2-D query image of `images` from one support image and mask (`req.support_image`,
    `req.support_mask`); `req.output` is the output folder (created), one `<stem>_mask.png` each
    (`req.label_value`, default 255). Every input is read and checked, and every output path too,
    before any computation; nothing is left behind unless every image succeeds. The FoB model and the
    segmenter are loaded once."""
    from FoBSegmentLib.atomic import check_writable
    from FoBSegmentLib.io import volumes

    messages: list[str] = []

    def note(m: str) -> None:
        messages.append(m)
        if log is not None:
            log(m)

    if req.support_image is None:
        raise SettingError("support_image", "needed for several query images: the annotated image of the mask")
    for name in ("prompts_out", "prompts_in", "review_out"):
        if getattr(req, name) is not None:
            raise SettingError(name, "is for one image; not available with several query images")
    if not images:
        raise ValueError("no query image given")
    if len({p.stem for p in images}) != len(images):
        raise ValueError("two query images have the same name; their masks would overwrite each other")
    settings = req.settings()
    settings.check()
    outdir = Path(req.output)
    if outdir.exists() and not outdir.is_dir():
        raise SettingError("output", f"{outdir} must be a folder for several query images")
    inputs = {Path(p).resolve() for p in [*images, req.support_image, req.support_mask]}
    outputs = [outdir / mask_name(p) for p in images]
    for out in outputs:
        if out.resolve() in inputs:
            raise SettingError("output", f"{out} would overwrite an input")
    support_vol = volumes.read_volume(req.support_image)
    if not (support_vol.is_2d and support_vol.is_rgb):
        raise ValueError(f"several query images need a colour 2-D support image; {Path(req.support_image).name} "
                         "is not one")
    support_lab = volumes.read_label(req.support_mask)
    volumes.check_same_grid(support_vol, support_lab, "support mask")
    support_bin, label = binary_support(support_lab.array, req.support_label, Path(req.support_mask))
    queries = []
    for p in images:
        vol = volumes.read_volume(p)
        if not (vol.is_2d and vol.is_rgb):
            raise ValueError(f"{p.name} is not a colour 2-D image (a grey picture cannot be segmented with a "
                             "colour support; convert it to RGB)")
        queries.append(vol)
    label_value = req.label_value if req.label_value is not None else 255
    if not 1 <= label_value <= 255:
        raise SettingError("label_value", f"must be in 1..255 for .png masks, got {label_value}")
    support = prepare_image(support_vol, dataclasses.replace(settings, axis=None), "support image", note)
    if settings.model is None and settings.prompts_from != "neighbour":
        settings.model = str(_skin_default_model(note))
    components = load_components(settings)
    for line in components.notes:
        note(line)
    created = not outdir.exists()
    outdir.mkdir(exist_ok=True)  # its parent must exist, as for any output file
    try:
        for out in outputs:
            check_writable(out, "--output")
    except BaseException:
        if created:
            outdir.rmdir()
        raise

    outcomes: list[SegmentOutcome] = []
    written: list[Path] = []
    try:
        for n, (vol, out) in enumerate(zip(queries, outputs)):
            query = prepare_image(vol, settings, "image", None)
            job = build_job(query, support_bin, settings, support=support, components=components,
                            support_name=f"label {label} of {Path(req.support_mask).name}")
            result = job.run()
            volumes.write_label(out, result.mask.astype(np.uint8) * label_value, vol.geometry)
            written.append(out)
            outcomes.append(SegmentOutcome(result, out, None, [], vol, None, result.warnings))
            if progress is not None:
                progress(n + 1, len(queries), Path(vol.path).name)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created and not any(outdir.iterdir()):
            outdir.rmdir()
        raise
    return ManyOutcome(outcomes, messages)


def _skin_default_model(note: Callable[[str], None]) -> Path:
    """The shipped dermoscopy model, the default FoB model for colour 2-D images (issue 21)."""
    from FoBSegmentLib.model.checkpoint import skin_model_path

    path = skin_model_path()
    if not path.is_file():
        raise FileNotFoundError(f"the default dermoscopy model {path.name} is missing from {path.parent}; "
                                "pass --model or --prompts-from neighbour")
    note(f"FoB model: {path.name}, the dermoscopy model (the default for colour images; --model overrides)")
    return path
