"""Intensity presets: raw voxel values -> float32 in [0, 1], the one normalisation the pipeline does.

CT: a window (level L, width W in Hounsfield units; abdomen L=40, W=400 by default).
MR: percentile clipping (0.5 - 99.5 by default) then min-max scaling, because MR has no absolute unit.
RGB: 8-bit colour divided by 255 (kept (H, W, 3)).

Shapes are preserved: [k, j, i] volumes, (H, W) slices or (H, W, 3) colour images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ABDOMEN_WINDOW = (40.0, 400.0)
MR_PERCENTILES = (0.5, 99.5)
MODALITIES = ("ct", "mr", "rgb")


@dataclass(frozen=True)
class ModalityGuess:
    """The modality chosen for an image and a one-line reason a user can check."""

    modality: str
    reason: str


# Bounds of --window. Hounsfield units span about -1024 (air) to a few thousand (dense metal,
# extended-range scanners up to ~30000); anything beyond these limits is a typo, and the float32
# arithmetic of `ct_window` stays exact enough inside them (a width of 1e300 overflows to inf).
WINDOW_LEVEL_LIMIT = 100_000.0
WINDOW_WIDTH_RANGE = (0.001, 200_000.0)


def parse_window(text: str) -> tuple[float, float]:
    """'L,W' (e.g. '40,400' or '-600,1500') -> (level, width); ValueError naming --window otherwise.

    level: finite, within +-100000 HU; width: finite, 0.001 .. 200000 HU.
    """
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2:
        raise ValueError(f"--window must be 'L,W' (level,width in HU), e.g. 40,400; got {text!r}")
    values = []
    for name, part in zip(("level", "width"), parts):
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--window {name} {part!r} is not a number (expected L,W such as 40,400; got {text!r})") from None
        if not np.isfinite(value):
            raise ValueError(f"--window {name} {part!r} is not a finite number (got {text!r})")
        values.append(value)
    level, width = values
    if abs(level) > WINDOW_LEVEL_LIMIT:
        raise ValueError(
            f"--window level {parts[0]!r} is out of range: use a level between {-WINDOW_LEVEL_LIMIT:g} and "
            f"{WINDOW_LEVEL_LIMIT:g} HU (got {text!r})"
        )
    lo, hi = WINDOW_WIDTH_RANGE
    if not lo <= width <= hi:
        raise ValueError(
            f"--window width {parts[1]!r} is out of range: use a width between {lo:g} and {hi:g} HU (got {text!r})"
        )
    return level, width


def guess_modality(array: np.ndarray, hint: str | None = None, is_rgb: bool = False) -> ModalityGuess:
    """Guess ct / mr / rgb from the data, and say why.

    array: raw voxel values, any shape. hint: a modality read from the file (DICOM Modality tag),
    which wins. CT is recognised by a sizeable fraction of voxels below -50 (fat and air in HU);
    MR magnitude images are never negative.
    """
    if is_rgb:
        return ModalityGuess("rgb", "the image has three colour channels")
    if hint in ("ct", "mr"):
        return ModalityGuess(hint, f"the DICOM Modality tag says {hint.upper()}")
    values = np.asarray(array)
    # A strided sample keeps this cheap on large volumes; the fraction is stable at that size.
    sample = values.ravel()[:: max(1, values.size // 2_000_000)].astype(np.float32)
    frac_neg = float(np.mean(sample < -50.0)) if sample.size else 0.0
    lo = float(sample.min()) if sample.size else 0.0
    if frac_neg > 0.05:
        return ModalityGuess(
            "ct", f"{100 * frac_neg:.0f}% of voxels are below -50 (Hounsfield units of fat/air), minimum {lo:.0f}"
        )
    return ModalityGuess(
        "mr", f"only {100 * frac_neg:.1f}% of voxels are below -50 (minimum {lo:.0f}), so not Hounsfield units"
    )


def ct_window(array: np.ndarray, level: float = ABDOMEN_WINDOW[0], width: float = ABDOMEN_WINDOW[1]) -> np.ndarray:
    """HU -> [0, 1]: values below L - W/2 become 0, above L + W/2 become 1 (float32, same shape)."""
    lo = level - width / 2.0
    out = (np.asarray(array, dtype=np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0)


def mr_clip(array: np.ndarray, percentiles: tuple[float, float] = MR_PERCENTILES) -> np.ndarray:
    """Clip to the given percentiles of the whole array, scale to [0, 1] (float32, same shape).

    Percentiles come from the whole volume, not per slice, so slices stay comparable along the
    propagation; a constant image becomes all zeros.
    """
    arr = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(arr, percentiles)
    if hi <= lo:
        return np.zeros_like(arr)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def rgb_to_float(array: np.ndarray) -> np.ndarray:
    """(H, W, 3) 8-bit colour -> float32 in [0, 1]; values above 255 (16-bit) are scaled by their max."""
    arr = np.asarray(array, dtype=np.float32)
    if arr.ndim < 3 or arr.shape[-1] != 3:
        raise ValueError(f"an RGB image must be (H, W, 3), got shape {arr.shape}")
    scale = 255.0 if arr.max(initial=0) <= 255 else float(arr.max())
    return np.clip(arr / scale, 0.0, 1.0)


def normalize(
    array: np.ndarray,
    modality: str,
    window: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = MR_PERCENTILES,
) -> np.ndarray:
    """Apply the preset of `modality` ('ct', 'mr' or 'rgb') -> float32 in [0, 1], same shape.

    window: (level, width) for CT; ignored otherwise (ValueError when given for MR/RGB, so a
    mistaken `--window` is not silently dropped).
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    if window is not None and modality != "ct":
        raise ValueError(f"--window applies to CT only, but the image is treated as {modality.upper()}")
    if modality == "ct":
        level, width = window if window is not None else ABDOMEN_WINDOW
        return ct_window(array, level, width)
    if modality == "mr":
        return mr_clip(array, percentiles)
    return rgb_to_float(array)
