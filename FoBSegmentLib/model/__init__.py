"""The FoB prompt generator (fob_method.md 3-8) in pieces, split like segment-anything.

predictor.py   FoBPromptGenerator: load / save, predict / predict_batch / encode_support (the
               inference API, numpy in, PromptSet out); normalize_image, SupportFeatures
generator.py   FoBNet: the network (nn.Module), forward + compute_losses for training
checkpoint.py  save / read / validate checkpoints (safetensors, torch weights-only), the shipped
               default model's path, `load_weights_only` for every torch file the engine reads
config.py      FoBConfig, every hyper-parameter, stored in checkpoints
encoders.py    'lite' and 'resnet101' encoders behind one interface
bppc.py        support prototypes (background ring, foreground, RAC inner band)
bcm.py         background-centric context modelling (coarse P_fg, matching, masked attention, head)
spr.py         structure-guided prompt refinement (graph, context attention, deformable steps)
heatmaps.py    Gaussian point heatmaps, heatmap-weighted masked average pooling
losses.py      L_heat, L_coor, L_fore, L_rac and the total

The BPPC ring sampler and the point samplers are pure numpy/OpenCV: FoBSegmentLib.prompts.
`from FoBSegmentLib.model import FoBPromptGenerator` imports torch on first use only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from FoBSegmentLib.model.config import FoBConfig
    from FoBSegmentLib.model.generator import FoBNet
    from FoBSegmentLib.model.predictor import FoBPromptGenerator, SupportFeatures, normalize_image

_EXPORTS = {
    "FoBPromptGenerator": "predictor",
    "SupportFeatures": "predictor",
    "normalize_image": "predictor",
    "FoBNet": "generator",
    "FoBConfig": "config",
}
__all__ = ["FoBPromptGenerator", "SupportFeatures", "normalize_image", "FoBNet", "FoBConfig"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"FoBSegmentLib.model.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
