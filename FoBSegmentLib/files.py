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
from FoBSegmentLib.propagation.locate import flag_cross_patient
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
    segmenter: str = "auto"
    sam_checkpoint: str | None = None
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
            slices=self.slices, largest_component=self.largest_component, config=self.config,
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
    support_lab = volumes.read_label(req.support_mask)
    volumes.check_same_grid(support_vol, support_lab, "support mask")
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
    components = load_components(settings, replaying=prompts_in is not None)
    job = build_job(query, support_bin, settings, support=support, components=components, log=note,
                    support_name=f"label {label} of {Path(req.support_mask).name}")
    if prompts_in is not None:
        job = job.with_prompts(prompts_in, record)
    result = job.run(progress=progress, cancel=cancel, on_slice=on_slice)
    for line in result.notes:
        note(line)
    warnings = flag_cross_patient(result)
    if warnings and req.strict:
        raise ValueError(f"--strict: {warnings[0]}; nothing written")
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
    return SegmentOutcome(result, out, prompts_out, messages, query_vol, review_out, warnings)
