"""SAM (segment_anything) as a FoB prompt consumer, with cached image embeddings.

What FoB does with SAM (docs: fob_method.md section 10): the slice is min-max scaled to uint8 RGB,
SAM resizes its long side to the encoder's input size (1024) and the points are mapped the same way;
foreground prompts get label 1, background prompts label 0, no box, no mask input, and SAM returns
three candidate masks (multimask output).

Choice among the candidates (`mask_choice`):
    "iou"    (default) the candidate with the highest predicted IoU, SAM's own quality estimate;
    0, 1, 2  a fixed index, as the FoB authors do (0 for abdominal data, 1 for Skin-DS);
    "single" ask SAM for one mask (multimask_output=False), SAM's advice for unambiguous prompts.

Frames: prompts are (x, y) = (column, row) pixels of the input slice, which is SAM's own point frame.

Loading never unpickles code: `.safetensors` via safetensors, anything else via
torch.load(weights_only=True). The checkpoint's architecture is read from its tensor shapes and must
match the requested model (sam-vit-h/l/b); `sam` accepts any SAM-architecture checkpoint (e.g. a
small one) and builds the architecture the checkpoint describes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.segmenters.base import (
    SegmentationResult,
    check_image,
    check_prompts,
    resolve_device,
    to_uint8_rgb,
)
from FoBSegmentLib.segmenters.embedding_cache import EmbeddingCache, image_key

log = logging.getLogger("FoBSegmentLib.segmenters")

DECODER_HEADS = 8  # every released SAM/MedSAM decoder uses 8 heads; head count is not visible in weights


@dataclass(frozen=True)
class SamArch:
    """The hyper-parameters of a SAM model that its state dict determines (plus DECODER_HEADS)."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    mlp_ratio: float
    out_chans: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    iou_head_depth: int
    iou_head_hidden_dim: int
    num_multimask_outputs: int

    def variant(self) -> str:
        """'vit_h' / 'vit_l' / 'vit_b' when the encoder matches a released SAM, else a description."""
        for name, spec in SAM_VARIANTS.items():
            if (self.embed_dim, self.depth, self.num_heads, self.global_attn_indexes) == spec:
                return name
        return f"custom ViT (embed_dim {self.embed_dim}, depth {self.depth})"


# (embed_dim, depth, num_heads, global_attn_indexes), as segment_anything.build_sam defines them.
SAM_VARIANTS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
}
NAME_TO_VARIANT = {"sam-vit-h": "vit_h", "sam-vit-l": "vit_l", "sam-vit-b": "vit_b", "medsam": "vit_b"}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors without executing pickled code.

    `.safetensors` -> safetensors; anything else -> torch.load(weights_only=True). Accepts a bare state
    dict or one wrapped as {"model": ...} / {"state_dict": ...}; strips a DataParallel "module." prefix.
    Raises FileNotFoundError or a one-line ValueError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{path.name} is not a SAM checkpoint (not a readable safetensors file: {first})") from None
    else:
        from FoBSegmentLib.model.checkpoint import load_weights_only

        obj = load_weights_only(path, "SAM checkpoint")
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path.name} does not hold a state dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        out[key[len("module."):] if key.startswith("module.") else key] = value
    if not out:
        raise ValueError(f"{path.name} holds no tensors")
    return out


def infer_sam_arch(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> SamArch:
    """Read a SAM architecture off a state dict's tensor shapes; ValueError when it is not SAM's."""
    needed = (
        "image_encoder.patch_embed.proj.weight",
        "image_encoder.pos_embed",
        "image_encoder.neck.0.weight",
        "prompt_encoder.point_embeddings.0.weight",
        "mask_decoder.mask_tokens.weight",
        "mask_decoder.iou_token.weight",
    )
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(f"{source} is not a SAM checkpoint (no {missing[0]})")
    patch = state["image_encoder.patch_embed.proj.weight"]
    embed_dim, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = int(state["image_encoder.pos_embed"].shape[1])
    depth = 0
    while f"image_encoder.blocks.{depth}.norm1.weight" in state:
        depth += 1
    if depth == 0 or "image_encoder.blocks.0.attn.rel_pos_h" not in state:
        raise ValueError(f"{source} is not a SAM checkpoint (image encoder without relative-position blocks)")
    head_dim = int(state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
    global_idx, window = [], 14
    for i in range(depth):
        size = (int(state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0]) + 1) // 2
        if size == grid:
            global_idx.append(i)
        else:
            window = size
    dec_depth = 0
    while f"mask_decoder.transformer.layers.{dec_depth}.norm1.weight" in state:
        dec_depth += 1
    iou_depth = 0
    while f"mask_decoder.iou_prediction_head.layers.{iou_depth}.weight" in state:
        iou_depth += 1
    return SamArch(
        img_size=grid * patch_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=max(1, embed_dim // head_dim),
        global_attn_indexes=tuple(global_idx),
        window_size=window,
        mlp_ratio=float(state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]) / embed_dim,
        out_chans=int(state["image_encoder.neck.0.weight"].shape[0]),
        mask_in_chans=int(state["prompt_encoder.mask_downscaling.3.weight"].shape[0]),
        decoder_depth=dec_depth,
        decoder_mlp_dim=int(state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]),
        iou_head_depth=iou_depth,
        iou_head_hidden_dim=int(state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]),
        num_multimask_outputs=int(state["mask_decoder.mask_tokens.weight"].shape[0]) - 1,
    )


def build_sam(arch: SamArch) -> torch.nn.Module:
    """A randomly initialised segment_anything `Sam` with the given architecture (eval mode)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = arch.img_size // arch.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=arch.img_size,
            patch_size=arch.patch_size,
            embed_dim=arch.embed_dim,
            depth=arch.depth,
            num_heads=arch.num_heads,
            mlp_ratio=arch.mlp_ratio,
            out_chans=arch.out_chans,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=arch.window_size,
            global_attn_indexes=arch.global_attn_indexes,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.out_chans,
            image_embedding_size=(grid, grid),
            input_image_size=(arch.img_size, arch.img_size),
            mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=arch.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=arch.decoder_depth,
                embedding_dim=arch.out_chans,
                mlp_dim=arch.decoder_mlp_dim,
                num_heads=DECODER_HEADS,
            ),
            transformer_dim=arch.out_chans,
            iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def load_sam(checkpoint: str | Path, name: str = "sam", device: str = "cpu") -> tuple[torch.nn.Module, SamArch]:
    """Build and load a SAM checkpoint for segmenter `name` (sam-vit-h/l/b, medsam or sam = any).

    ValueError when the file is not a SAM checkpoint or is one of another variant than `name` asks
    for (e.g. ViT-B weights for sam-vit-h).
    """
    path = Path(checkpoint)
    state = load_state_dict(path)
    arch = infer_sam_arch(state, source=path.name)
    wanted = NAME_TO_VARIANT.get(name)
    if wanted is not None and arch.variant() != wanted:
        raise ValueError(
            f"{path.name} is a SAM {arch.variant()} checkpoint, but {name} needs a SAM {wanted} checkpoint"
        )
    if wanted is not None:
        from segment_anything import sam_model_registry

        model = sam_model_registry[wanted](checkpoint=None)
    else:
        model = build_sam(arch)
    return loaded(model, state, f"{path.name} does not fit the SAM {arch.variant()} architecture", device), arch


def loaded(model: torch.nn.Module, state: Mapping[str, torch.Tensor], mismatch: str, device: str) -> torch.nn.Module:
    """`model` with `state` loaded (every key, every shape), in eval mode on `device`; ValueError
    "<mismatch>: <the first 200 characters of torch's complaint>" when the two do not fit."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise ValueError(f"{mismatch}: {first}") from None
    return model.to(device).eval()


def checkpoint_identity(path: str | Path) -> str:
    """A cheap identity of a checkpoint file (resolved path, size, mtime): keys the embedding cache."""
    p = Path(path).resolve()
    st = p.stat()
    return hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


class SamSegmenter:
    """FoB's SAM call with per-slice embedding caching.

    Args:
        checkpoint: path of a SAM checkpoint (.pth read with weights_only=True, or .safetensors).
        name: "sam-vit-h", "sam-vit-l", "sam-vit-b" (architecture enforced) or "sam" (any SAM).
        device: "auto", "cpu", "cuda", "cuda:N", "mps".
        mask_choice: "iou" (default), "single", or a fixed candidate index (the authors use 0).
        cache_size: embeddings kept in memory (LRU, default 16; a ViT embedding is 4 MiB).
        disk_cache: a folder for embeddings on disk, True for <FoB cache>/embeddings, None = memory only.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        name: str = "sam",
        device: str = "auto",
        mask_choice: str | int = "iou",
        cache_size: int = 16,
        disk_cache: str | Path | bool | None = None,
    ) -> None:
        if name not in ("sam", "sam-vit-h", "sam-vit-l", "sam-vit-b"):
            raise ValueError(f"SamSegmenter name must be sam, sam-vit-h, sam-vit-l or sam-vit-b, got {name!r}")
        self.mask_choice = _check_choice(mask_choice)
        self.device = resolve_device(device)
        self.checkpoint = Path(checkpoint)
        self.model, self.arch = load_sam(self.checkpoint, name, self.device)
        self.name = name
        from segment_anything.utils.transforms import ResizeLongestSide

        self.transform = ResizeLongestSide(self.arch.img_size)
        self.model_key = f"{name}:{checkpoint_identity(self.checkpoint)}"
        self.cache = EmbeddingCache(cache_size, disk_cache)

    # -- embeddings -------------------------------------------------------------------------------

    def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, str]:
        rgb = to_uint8_rgb(check_image(image))
        return rgb, image_key(rgb, self.model_key)

    @torch.no_grad()
    def _encode(self, rgbs: Sequence[np.ndarray]) -> list[dict[str, torch.Tensor]]:
        batch, sizes = [], []
        for rgb in rgbs:
            resized = self.transform.apply_image(rgb)
            t = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous().float()
            sizes.append((rgb.shape[:2], resized.shape[:2]))
            batch.append(self.model.preprocess(t[None])[0])  # normalises and pads to img_size x img_size
        features = self.model.image_encoder(torch.stack(batch))
        return [
            {
                "features": features[i : i + 1],
                "original_size": torch.tensor(orig, dtype=torch.int64),
                "input_size": torch.tensor(inp, dtype=torch.int64),
            }
            for i, (orig, inp) in enumerate(sizes)
        ]

    def embed(self, image: np.ndarray) -> dict[str, torch.Tensor]:
        """The cached embedding of one slice: features (1, C, h, w), original_size (H, W), input_size."""
        return self.embed_many([image])[0]

    def embed_many(self, images: Sequence[np.ndarray], batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
        """Embeddings of several slices, encoding only the uncached ones, `batch_size` at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        prepared = [self._prepare(im) for im in images]
        out: list[dict[str, torch.Tensor] | None] = [self.cache.get(k, self.device) for _, k in prepared]
        todo = [i for i, e in enumerate(out) if e is None]
        for start in range(0, len(todo), batch_size):
            idx = todo[start : start + batch_size]
            for i, emb in zip(idx, self._encode([prepared[i][0] for i in idx])):
                self.cache.put(prepared[i][1], emb)
                out[i] = emb
        return [e for e in out if e is not None]

    set_image = embed  # SamPredictor-style name: precompute a slice's embedding before editing prompts

    # -- decoding ---------------------------------------------------------------------------------

    def segment(self, image: np.ndarray, prompts: PromptSet) -> SegmentationResult:
        """Segment one slice (H, W) or (H, W, 3), any range, with FoB prompts in (x, y) pixels.

        Returns mask (H, W) bool (logit > 0), score = predicted IoU of the chosen candidate,
        logits (H, W) float32 of the chosen candidate at the input resolution.
        """
        img = check_image(image)
        check_prompts(prompts, *img.shape[:2])
        if len(prompts.foreground) + len(prompts.background) == 0:
            raise ValueError("SAM needs at least one prompt; got no foreground and no background points")
        return self._decode(self.embed(img), prompts)

    def segment_many(self, images: Sequence[np.ndarray], prompts_list: Sequence[PromptSet],
                     batch_size: int = 4) -> list[SegmentationResult]:
        """segment() over several slices, with their embeddings computed in batches first."""
        if len(images) != len(prompts_list):
            raise ValueError(f"{len(images)} images but {len(prompts_list)} prompt sets")
        checked = [check_image(im) for im in images]
        for im, pr in zip(checked, prompts_list):
            check_prompts(pr, *im.shape[:2])
            if len(pr.foreground) + len(pr.background) == 0:
                raise ValueError("SAM needs at least one prompt; got an empty PromptSet")
        embs = self.embed_many(checked, batch_size=batch_size)
        return [self._decode(e, p) for e, p in zip(embs, prompts_list)]

    @torch.no_grad()
    def _decode(self, emb: dict[str, torch.Tensor], prompts: PromptSet) -> SegmentationResult:
        original = tuple(int(v) for v in emb["original_size"])
        input_size = tuple(int(v) for v in emb["input_size"])
        points, labels = prompts.points_and_labels
        coords = self.transform.apply_coords(points.astype(np.float64), original)
        coords_t = torch.as_tensor(coords, dtype=torch.float32, device=self.device)[None]
        labels_t = torch.as_tensor(labels, dtype=torch.int64, device=self.device)[None]
        sparse, dense = self.model.prompt_encoder(points=(coords_t, labels_t), boxes=None, masks=None)
        multimask = self.mask_choice != "single"
        low_res, iou = self.model.mask_decoder(
            image_embeddings=emb["features"].to(self.device),
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        logits = self.model.postprocess_masks(low_res, input_size, original)[0]  # (C, H, W)
        iou = iou[0]
        idx = _choose(self.mask_choice, iou)
        chosen = logits[idx].float().cpu().numpy()
        return SegmentationResult(mask=chosen > 0.0, score=float(iou[idx]), logits=chosen.astype(np.float32))


def _check_choice(choice: str | int) -> str | int:
    if isinstance(choice, str) and choice in ("iou", "single"):
        return choice
    if isinstance(choice, (int, np.integer)) and not isinstance(choice, bool) and 0 <= int(choice) <= 2:
        return int(choice)
    if isinstance(choice, str) and choice.isdigit() and int(choice) <= 2:
        return int(choice)
    raise ValueError(f"mask_choice must be 'iou', 'single' or an index 0-2, got {choice!r}")


def _choose(choice: str | int, iou: torch.Tensor) -> int:
    if choice == "single":
        return 0
    if choice == "iou":
        return int(torch.argmax(iou))
    if int(choice) >= iou.shape[0]:
        raise ValueError(f"mask_choice {choice} but the model returned {iou.shape[0]} candidates")
    return int(choice)
