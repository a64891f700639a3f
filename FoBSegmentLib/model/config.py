"""FoBConfig: every hyper-parameter of the FoB prompt generator, stored inside its checkpoints.

Lengths (sigma, k_out, k_in, erode_inner) are in pixels of the square working image
(`image_size` x `image_size`) that the generator resizes every input to.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

ENCODERS = ("lite", "resnet101")
DEFAULT_FEATURE_DIM = {"lite": 64, "resnet101": 512}
CONFIG_VERSION = 1


@dataclass
class FoBConfig:
    """Configuration of `FoBPromptGenerator` (defaults: fob_method.md sections 4-8, our [R] choices).

    encoder: 'lite' (CPU-sized, stride 8) or 'resnet101' (the authors' dilated ResNet-101, stride 4).
    n_bg: N_p background prompts; n_fg: at most N_f foreground prompts.
    sigma: Gaussian heatmap sigma (px); k_out, k_in: square dilation kernels of the BPPC ring (px).
    kappa: SPR refinement iterations; k_samples: deformable sampling points per prompt and step.
    fg_threshold: T on the coarse foreground probability P_fg; fg_sampling: 'fps' or 'raster'.
    tau: RAC InfoNCE temperature; rac: 'infonce' or 'hinge' (the authors' code).
    erode_inner: square erosion kernel for the RAC positive band M - erode(M, erode_inner).
    lambda_heat, lambda_coor: loss weights (L_coor in pixel units); fg_loss_bg_weight: NLL weight of
    background pixels in L_fore (foreground weight 1).
    heat_loss: 'mse' (the paper's L_heat) or 'softmax' (cross-entropy between each channel's spatial
    softmax and its normalised Gaussian target; use with lambda_heat about 1). MSE on a 4 px Gaussian
    in a 256 x 256 map is near its all-zero value from the start and the lite model barely leaves it
    on a CPU budget (Resources/MODEL_CARD.md).
    image_size: working size S; feature_dim: d, None = encoder default (lite 64, resnet101 512).
    heads: attention heads (BCM transformer and SPR context attention).
    bg_max_fg_prob: inference only: refined background prompts where the model's own coarse P_fg is
    >= this are dropped (at least 3 of the least foreground-like are kept); 1.0 keeps all (the
    paper). The dermoscopy model sets it (issue 21: its ring otherwise lands inside large lesions).
    """

    encoder: str = "lite"
    n_bg: int = 10
    n_fg: int = 10
    sigma: float = 4.0
    k_out: int = 21
    k_in: int = 15
    kappa: int = 3
    k_samples: int = 8
    fg_threshold: float = 0.9
    fg_sampling: str = "fps"
    tau: float = 0.1
    rac: str = "infonce"
    erode_inner: int = 9
    lambda_heat: float = 1e3
    lambda_coor: float = 1e-4
    fg_loss_bg_weight: float = 0.1
    heat_loss: str = "mse"
    image_size: int = 256
    feature_dim: int | None = None
    heads: int = 1
    bg_max_fg_prob: float = 1.0
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"FoBConfig.encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.feature_dim is None:
            self.feature_dim = DEFAULT_FEATURE_DIM[self.encoder]
        ints = {
            "n_bg": 3,
            "n_fg": 1,
            "k_out": 3,
            "k_in": 1,
            "kappa": 0,
            "k_samples": 1,
            "erode_inner": 3,
            "image_size": 64,
            "feature_dim": 8,
            "heads": 1,
        }
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"FoBConfig.{name} must be an integer >= {low}, got {value!r}")
        for name in ("k_out", "k_in", "erode_inner"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(
                    f"FoBConfig.{name} must be odd (a centred square kernel), got {getattr(self, name)}"
                )
        if self.k_in >= self.k_out:
            raise ValueError(f"FoBConfig.k_in ({self.k_in}) must be smaller than k_out ({self.k_out})")
        if self.image_size % 8:
            raise ValueError(f"FoBConfig.image_size must be a multiple of 8, got {self.image_size}")
        if self.feature_dim % self.heads:
            raise ValueError(
                f"FoBConfig.feature_dim ({self.feature_dim}) must be divisible by heads ({self.heads})"
            )
        if self.heat_loss not in ("mse", "softmax"):
            raise ValueError(f"FoBConfig.heat_loss must be 'mse' or 'softmax', got {self.heat_loss!r}")
        for name in ("sigma", "tau", "lambda_heat", "lambda_coor", "fg_loss_bg_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"FoBConfig.{name} must be a positive number, got {value!r}")
            setattr(self, name, float(value))
        if isinstance(self.bg_max_fg_prob, bool) or not 0.0 < float(self.bg_max_fg_prob) <= 1.0:
            raise ValueError(f"FoBConfig.bg_max_fg_prob must lie in (0, 1], got {self.bg_max_fg_prob!r}")
        self.bg_max_fg_prob = float(self.bg_max_fg_prob)
        if not 0.0 < float(self.fg_threshold) < 1.0:
            raise ValueError(f"FoBConfig.fg_threshold must lie in (0, 1), got {self.fg_threshold!r}")
        self.fg_threshold = float(self.fg_threshold)
        if self.fg_sampling not in ("fps", "raster"):
            raise ValueError(f"FoBConfig.fg_sampling must be 'fps' or 'raster', got {self.fg_sampling!r}")
        if self.rac not in ("infonce", "hinge"):
            raise ValueError(f"FoBConfig.rac must be 'infonce' or 'hinge', got {self.rac!r}")
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"FoBConfig.version {self.version!r} is not supported (expected {CONFIG_VERSION})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FoBConfig:
        """Build a config from a dict; unknown keys raise ValueError (no silent typos)."""
        if not isinstance(values, dict):
            raise ValueError(f"FoB config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FoB config key(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> FoBConfig:
        try:
            values = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"FoB config is not valid JSON: {exc}") from None
        return cls.from_dict(values)
