"""The montage of a propagation: the slices a reader checks at a glance, drawn with matplotlib.

One panel per chosen slice: the image, the mask contour, the reference contour (when given), the
prompts the segmenter received (foreground and background in two colours), the annotated slices
framed, the flagged slices framed and titled with their reason.

Frames: the volume arrays are [k, j, i]; a panel shows `io.coords.take_slice` of the slicing axis,
(H, W) = (rows, cols) with row 0 at the top; prompts are (x, y) = (column, row) pixels, which is
matplotlib's (x, y) on an `imshow` with the default origin="upper".

matplotlib is imported here only (Agg backend, no display needed): `fob segment` without --report
never imports it.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Colours chosen to stay apart on grey MR/CT and on skin pictures, and apart from each other; the
# two prompt kinds also differ by marker (+ / x), which survives colour-vision deficiencies.
MASK_COLOUR = "#FFD400"  # yellow
REFERENCE_COLOUR = "#00B4FF"  # sky blue, dashed
FOREGROUND_COLOUR = "#00D046"  # green +
BACKGROUND_COLOUR = "#FF2A2A"  # red x
ANNOTATED_COLOUR = "#1F3BFF"  # blue frame
FLAGGED_COLOUR = "#E000E0"  # magenta frame


@dataclass
class MontageInfo:
    """What a written montage shows: the slices of its panels (in order), and which were marked."""

    path: Path
    slices: list[int]
    annotated: list[int]
    flagged: list[int]
    columns: int
    rows: int


def choose_slices(result, max_panels: int = 12) -> list[int]:
    """The slices of the montage: every k-th segmented slice (k so that at most `max_panels` are
    taken), plus every annotated and every flagged slice, which are never left out."""
    if max_panels < 1:
        raise ValueError(f"max_panels must be >= 1, got {max_panels}")
    segmented = sorted(z for z, r in result.slices.items() if r.source != "skipped" and (r.area > 0 or r.source == "annotation"))
    must = {z for z, r in result.slices.items() if r.source == "annotation"} | set(result.flagged)
    if len(segmented) <= max_panels:
        return sorted(set(segmented) | must)
    room = max(max_panels - len(must), 1)
    step = math.ceil(len(segmented) / room)
    return sorted(set(segmented[::step]) | must)


def _panel_grid(count: int, panel_inches: float, dpi: int):
    """A figure of `count` panels, at most 6 a row, axes off; returns (figure, axes [rows, cols],
    (width, height, title height) in inches)."""
    from matplotlib.figure import Figure

    cols = min(count, 6)
    rows = math.ceil(count / cols)
    # At least 4.5 inches wide: a montage of one or two panels (a 2D picture) has room for its title.
    title_inches = 0.6
    panel = max(panel_inches, 4.5 / cols)
    width, height = cols * panel, rows * panel + title_inches
    fig = Figure(figsize=(width, height), dpi=dpi)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes, (width, height, title_inches)


def _draw_overlays(ax, mask: np.ndarray, reference: np.ndarray | None, prompts) -> None:
    """On one panel: the (H, W) mask's contour, the reference's (dashed; None = none) and the prompts
    ((x, y) = (column, row) pixels; None = none)."""
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=MASK_COLOUR, linewidths=1.3)
    if reference is not None and reference.any() and not reference.all():
        ax.contour(reference.astype(np.float32), levels=[0.5], colors=REFERENCE_COLOUR, linewidths=0.8,
                   linestyles="dashed")
    if prompts is not None:
        if len(prompts.foreground):
            ax.scatter(prompts.foreground[:, 0], prompts.foreground[:, 1], s=14, marker="+", c=FOREGROUND_COLOUR,
                       linewidths=1.0)
        if len(prompts.background):
            ax.scatter(prompts.background[:, 0], prompts.background[:, 1], s=10, marker="x", c=BACKGROUND_COLOUR,
                       linewidths=1.0)


def _display(image: np.ndarray) -> np.ndarray:
    """A slice scaled to [0, 1] for display only (1st-99th percentile), whatever the modality."""
    img = np.asarray(image, np.float32)
    if img.ndim == 3:  # RGB
        hi = float(img.max()) or 1.0
        return np.clip(img / (255.0 if hi > 1.0 else 1.0), 0, 1)
    lo, hi = np.percentile(img, [1, 99])
    return np.clip((img - lo) / (hi - lo if hi > lo else 1.0), 0, 1)


def write_montage(
    path: str | os.PathLike,
    image: np.ndarray,
    result,
    reference: np.ndarray | None = None,
    dice: float | None = None,
    title: str = "",
    max_panels: int = 12,
    panel_inches: float = 2.2,
    dpi: int = 100,
) -> MontageInfo:
    """Write the montage of `result` (a PropagationResult) over `image` ([k, j, i] grey, or an RGB
    2D image (H, W, 3)) to `path` (PNG, atomically). reference: [k, j, i] bool, same grid."""
    import matplotlib

    matplotlib.use("Agg", force=False)

    from FoBSegmentLib.atomic import atomic_output
    from FoBSegmentLib.io.coords import take_slice

    mask = np.asarray(result.mask) > 0
    rgb = image.ndim == 3 and mask.shape[0] == 1 and image.shape[-1] == 3
    axis = result.axis
    if reference is not None:
        reference = np.asarray(reference, bool)
        if reference.shape != mask.shape:
            raise ValueError(f"the reference grid {reference.shape} differs from the mask's {mask.shape}")
    slices = choose_slices(result, max_panels) or [int(mask.shape[axis] // 2)]
    annotated = [z for z in slices if result.slices.get(z) is not None and result.slices[z].source == "annotation"]
    flagged_all = set(result.flagged)
    flagged = [z for z in slices if z in flagged_all]
    fig, axes, (width, height, title_inches) = _panel_grid(len(slices), panel_inches, dpi)
    for ax, z in zip(axes.flat, slices):
        img = image if rgb else take_slice(image, axis, z)
        m = mask[0] if rgb else take_slice(mask, axis, z)
        ax.imshow(_display(img), cmap=None if rgb else "gray", interpolation="nearest")
        r = None if reference is None else (reference[0] if rgb else take_slice(reference, axis, z))
        _draw_overlays(ax, m, r, result.prompts.get(z))
        rep = result.slices.get(z)
        label = f"slice {z}"
        colour = "black"
        if z in annotated:
            label += " annotated"
            colour = ANNOTATED_COLOUR
        if z in flagged:
            reasons = "; ".join(f for f in rep.flags if not f.startswith("chain-end"))
            label += f"\nflag: {reasons}"
            colour = FLAGGED_COLOUR
        if z in annotated or z in flagged:
            ax.set_axis_on()
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(FLAGGED_COLOUR if z in flagged else ANNOTATED_COLOUR)
                spine.set_linewidth(3)
        ax.set_title(label, fontsize=7, color=colour)
    head = title or "segmentation"
    if dice is not None:
        head += f"   Dice {dice:.3f}"
    head += f"   {len(slices)} of {len(choose_slices(result, 10**6))} slices"
    legend = ("mask yellow" + (", reference blue dashed" if reference is not None else "")
              + "; prompts: + foreground green, x background red; frames: annotated blue, flagged magenta")
    # About 16 characters of 7-point text per inch: wrap the legend to the figure's width.
    legend = textwrap.fill(legend, width=max(30, int(width * 16)))
    fig.suptitle(head + "\n" + legend, fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 1 - title_inches / height))
    target = Path(path)
    with atomic_output(target) as tmp:
        fig.savefig(tmp, format="png")
    return MontageInfo(target, slices, annotated, flagged, axes.shape[1], axes.shape[0])


def montage_of_outcome(path: str | os.PathLike, outcome, reference: np.ndarray | None = None,
                       dice: float | None = None, max_panels: int = 12, **kw) -> MontageInfo:
    """The montage of a `files.SegmentOutcome` (its query volume and propagation result)."""
    vol = outcome.query
    image = vol.array if vol.is_rgb else vol.grid_array
    name = Path(vol.path).name if vol.path is not None else ""
    return write_montage(path, image, outcome.result, reference, dice, title=name, max_panels=max_panels, **kw)


def read_reference(path: str | os.PathLike, query, label: int | None) -> np.ndarray:
    """The reference label map as bool on the query's grid: `label`'s voxels, else every non-zero voxel."""
    from FoBSegmentLib.io import volumes

    ref, _turned = volumes.on_grid_of(query, volumes.read_label(path), "reference")
    arr = np.asarray(ref.grid_array)
    if label is None:
        return arr != 0
    if not (arr == label).any():
        raise ValueError(f"label {label} is not present in the reference {Path(path).name}")
    return arr == label


@dataclass
class ReportRequest:
    """`fob segment --report`: checked before the job runs, written after it (`write`)."""

    path: Path
    reference: np.ndarray | None = None
    reference_name: str = ""
    info: MontageInfo | None = None
    dice: float | None = None

    def write(self, outcome) -> MontageInfo:
        """Draw the montage of `outcome`; if that fails, the job's outputs go too (all or nothing)."""
        try:
            if self.reference is not None:
                from FoBSegmentLib.labelmap import dice

                self.dice = float(dice(np.asarray(outcome.result.mask) > 0, self.reference))
            self.info = montage_of_outcome(self.path, outcome, self.reference, self.dice)
        except BaseException:
            for p in (outcome.output, outcome.prompts_out):
                if p is not None and Path(p).is_file():
                    Path(p).unlink()
            raise
        return self.info


def check_report_request(req, report: str | os.PathLike | None, reference: str | os.PathLike | None,
                         reference_label: int | None) -> ReportRequest:
    """Check `--report` / `--reference` of a `files.SegmentRequest` before any work: a writable .png
    that is no input or output, a reference on the image's grid holding the organ's label."""
    from FoBSegmentLib.atomic import check_writable
    from FoBSegmentLib.errors import SettingError

    if report is None:
        raise SettingError("report", "needed: --reference and --reference-label are drawn into the montage REPORT.png")
    path = Path(report)
    if not path.name.lower().endswith(".png"):
        raise SettingError("report", f"{path} must end in .png")
    others = [req.image, req.support_mask, req.support_image, req.prompts_in, req.output, req.prompts_out, reference]
    for other in others:
        if other is not None and Path(other).resolve() == path.resolve():
            raise SettingError("report", f"{path} is also an input or an output")
    check_writable(path, "--report")
    if reference is None:
        if reference_label is not None:
            raise SettingError("reference_label", "needs --reference")
        return ReportRequest(path)
    from FoBSegmentLib.files import binary_support
    from FoBSegmentLib.io import volumes

    label = reference_label
    if label is None:
        # The organ's value in the support mask: the usual case is a reference with the same labels.
        _, label = binary_support(volumes.read_label(req.support_mask).array, req.support_label, Path(req.support_mask))
    try:
        ref = read_reference(reference, volumes.read_volume(req.image), label)
    except ValueError as exc:
        if "not present" in str(exc) and reference_label is None:
            raise SettingError("reference_label", f"needed: {exc}") from None
        raise
    return ReportRequest(path, ref, Path(reference).name)


# ---- issue 21: the montage of many 2-D images segmented from one annotated image ----------------------


def write_images_montage(
    path: str | os.PathLike,
    outcomes: list,
    references: list[np.ndarray | None] | None = None,
    title: str = "",
    max_panels: int = 48,
    panel_inches: float = 2.2,
    dpi: int = 100,
) -> tuple[MontageInfo, list[float | None]]:
    """One panel per query image of `files.segment_many`'s outcomes (the first `max_panels`): the
    image, the mask contour, the reference contour (references[i], (H, W) bool, or None), the prompts.
    Returns the montage info (its `slices` are the panel indices) and each image's Dice (None without
    a reference)."""
    import matplotlib

    matplotlib.use("Agg", force=False)

    from FoBSegmentLib.atomic import atomic_output
    from FoBSegmentLib.labelmap import dice as dice_of

    if not outcomes:
        raise ValueError("no segmented image to draw")
    refs = list(references) if references is not None else [None] * len(outcomes)
    dices: list[float | None] = []
    for oc, ref in zip(outcomes, refs):
        dices.append(None if ref is None else float(dice_of(np.asarray(oc.result.mask[0]) > 0, ref)))
    shown = list(range(min(len(outcomes), max_panels)))
    fig, axes, (width, height, title_inches) = _panel_grid(len(shown), panel_inches, dpi)
    for ax, i in zip(axes.flat, shown):
        oc = outcomes[i]
        m = np.asarray(oc.result.mask[0]) > 0
        ax.imshow(_display(oc.query.array), interpolation="nearest")
        _draw_overlays(ax, m, refs[i], oc.result.prompts.get(0))
        label = Path(oc.query.path).name
        if dices[i] is not None:
            label += f"  Dice {dices[i]:.3f}"
        flagged = bool(oc.warnings) or not m.any()
        ax.set_title(label + ("\nflag: " + (oc.warnings[0] if oc.warnings else "empty mask") if flagged else ""),
                     fontsize=7, color=FLAGGED_COLOUR if flagged else "black")
    head = title or "segmentation"
    known = [d for d in dices if d is not None]
    if known:
        head += f"   mean Dice {np.mean(known):.3f} over {len(known)} images"
    head += f"   {len(shown)} of {len(outcomes)} images"
    legend = ("mask yellow" + (", reference blue dashed" if known else "")
              + "; prompts: + foreground green, x background red")
    legend = textwrap.fill(legend, width=max(30, int(width * 16)))
    fig.suptitle(head + "\n" + legend, fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 1 - title_inches / height))
    target = Path(path)
    with atomic_output(target) as tmp:
        fig.savefig(tmp, format="png")
    flagged_idx = [i for i in shown if outcomes[i].warnings or not np.asarray(outcomes[i].result.mask).any()]
    return MontageInfo(target, shown, [], flagged_idx, axes.shape[1], axes.shape[0]), dices
