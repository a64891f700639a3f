"""FoBPromptGenerator: the FoB prompt generator (BPPC, BCM, SPR) as one torch.nn.Module.

Inference (numpy in, PromptSet out; eval mode and torch.inference_mode inside)::

    gen = FoBPromptGenerator.load()                  # shipped Resources/fob_lite.safetensors
    gen = FoBPromptGenerator.from_config(n_bg=10)    # untrained, any FoBConfig field as keyword
    ps = gen.predict(support_image, support_mask, query_image)
    many = gen.predict_batch(support_image, support_mask, [q1, q2, ...], batch_size=8)
    sup = gen.encode_support(support_image, support_mask)   # cache once, reuse for many queries
    details = gen.predict_from_support(sup, [q1, q2])       # list of dicts (see predict_with_details)

- support_image, query_image: (H, W) or (H, W, 3) real arrays of any size (also (H, W, 1)); raw
  intensities or [0, 1] both work: every image is resized to the square working size S
  (config.image_size, default 256; cv2 area/bilinear) and then z-scored over all its pixels and
  channels (a constant image becomes zeros). Grayscale is replicated to 3 channels.
- support_mask: (H, W) bool (or 0/1 numbers) with the support image's (H, W); must not be empty.
- Returned points are (x, y) = (column, row) float pixels of the QUERY image (pixel centres at
  integers; working-frame point p maps to (p + 0.5) * W / S - 0.5); `fg_probability` is the coarse
  foreground map P_fg resized to the query's (H, W), in [0, 1].
- Background prompts: N_p refined points (SPR output) in ring order (clockwise on screen). When the
  support mask leaves no ring inside the image (object fills the image), background is empty.
- Foreground prompts: up to N_f points with P_fg >= T, spread by farthest-point sampling on the
  candidate set eroded by a (2 sigma + 1) square (uneroded when erosion empties it), starting at
  the most probable candidate; with no candidate, the single argmax of P_fg.

Training (tensors in the S x S working frame, batch B >= 1)::

    out = gen(support_img (B, 3, S, S), support_mask (B, S, S), query_img (B, 3, S, S))
    losses = gen.compute_losses(out, query_mask (B, S, S))   # 'heat', 'coor', 'fore', 'rac', 'total'
    losses["total"].backward()

`forward` returns a dict:
    'heatmaps' H_hat (B, N, S, S); 'phi' Phi (B, N, h, w); 'fg_prob' P_fg (B, S, S) in (0, 1);
    'fg_prob_lowres' (B, h, w); 'cosine' C (B, h, w); 'threshold' t (B,);
    'coarse_points' (B, N, 2) argmax of H_hat, detached; 'bg_confidence' (B, N) heatmap peaks;
    'refined_points' P'_b (B, N, 2), differentiable (SPR); 'query_prototypes' Q (B, N, d);
    'bg_prototypes' P (B, N, d); 'fg_prototype' p_fg (B, d); 'inner_prototype' p_p (B, d);
    'support_points' (B, N, 2) ring of the support, 'support_valid' (B, N) bool;
    'support_mask_valid' (B,) bool (non-empty support masks); 'features_query' F_q (B, d, h, w).
Images should be z-scored per image (use `normalize_image`); masks are 0/1. Ring points can be
passed in (`support_ring=(points, valid)`, `query_ring=...`) when a data loader computes them in
its workers; otherwise they are computed with `ring_points` (CPU, OpenCV). Invalid rings (empty
masks, no band) are masked out of the losses; an episode with nothing valid gives a zero total that
still backpropagates.

Checkpoints: `save(path)` writes safetensors (path ending .safetensors) with the config JSON in the
metadata, or else a torch file of plain tensors + JSON strings; both load with
`torch.load(weights_only=True)` semantics. `load` rejects anything that is not exactly a FoB
checkpoint of its own config (ValueError), never loading with strict=False.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from FoBSegmentLib.atomic import atomic_output
from FoBSegmentLib.model.bcm import BCM, heatmap_argmax
from FoBSegmentLib.model.bppc import batch_ring_points, support_prototypes
from FoBSegmentLib.model.config import FoBConfig
from FoBSegmentLib.model.encoders import build_encoder
from FoBSegmentLib.model.heatmaps import gaussian_heatmaps
from FoBSegmentLib.model.losses import foreground_loss, heatmap_loss, point_loss, rac_loss, total_loss
from FoBSegmentLib.model.ring import erode_square, ring_points
from FoBSegmentLib.model.spr import SPR
from FoBSegmentLib.paths import resources_dir
from FoBSegmentLib.prompts import PromptSet

CHECKPOINT_FORMAT = "fob-prompt-generator"
CHECKPOINT_FORMAT_VERSION = "1"
DEFAULT_MODEL_NAME = "fob_lite.safetensors"


# ----------------------------------------------------------------------------- input checks


def _check_image(image: object, name: str) -> np.ndarray:
    """(H, W) / (H, W, 1) / (H, W, 3) real finite array -> float32 (H, W, 3)."""
    if not isinstance(image, np.ndarray):
        try:
            image = np.asarray(image)
        except Exception:
            raise ValueError(f"{name} must be an array, got {type(image).__name__}") from None
    if image.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold real numbers (int or float), got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif not (image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"{name} must have shape (H, W) or (H, W, 3), got {image.shape}")
    if image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"{name} is too small ({image.shape[0]}x{image.shape[1]}); need at least 8x8 pixels")
    image = image.astype(np.float32)
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return image


def _check_mask(mask: object, shape: tuple[int, int], name: str = "support_mask") -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {arr.shape}")
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape} but the support image is {shape[0]}x{shape[1]}")
    if arr.dtype != bool:
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"{name} must be boolean (or 0/1 numbers), got dtype {arr.dtype}")
        if not np.all((arr == 0) | (arr == 1)):
            raise ValueError(f"{name} must contain only 0 and 1 (or be boolean); threshold it first")
        arr = arr.astype(bool)
    if not arr.any():
        raise ValueError(f"{name} is empty: FoB needs at least one foreground pixel in the support")
    return arr


def normalize_image(image: np.ndarray) -> np.ndarray:
    """z-score of a float (H, W, 3) image over all pixels and channels; constant images become zeros."""
    mean = float(image.mean())
    std = float(image.std())
    out = image - mean
    return out / std if std > 1e-8 else np.zeros_like(out)


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    interp = cv2.INTER_AREA if (h > size and w > size) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    h, w = mask.shape
    if (h, w) == (size, size):
        return mask.copy()
    out = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) >= 0.5
    if not out.any():
        # A structure thinner than a working pixel: keep every working pixel it touches.
        rows, cols = np.nonzero(mask)
        out[np.minimum(rows * size // h, size - 1), np.minimum(cols * size // w, size - 1)] = True
    return out


def _to_query_frame(points: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    h, w = shape
    out = np.empty_like(points, dtype=np.float64)
    out[:, 0] = (points[:, 0] + 0.5) * (w / size) - 0.5
    out[:, 1] = (points[:, 1] + 0.5) * (h / size) - 0.5
    return out


def farthest_point_sampling(points: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """Indices of n points of (M, 2) `points` picked greedily farthest from those already picked."""
    m = len(points)
    if m <= n:
        return np.arange(m)
    chosen = [start]
    dist = np.sum((points - points[start]) ** 2, axis=1)
    for _ in range(n - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.sum((points - points[nxt]) ** 2, axis=1))
    return np.asarray(chosen)


# ----------------------------------------------------------------------------- support cache


@dataclass
class SupportFeatures:
    """Encoded support, reusable across queries (tensors on the model's device, inference tensors).

    bg_prototypes (1, N, d); fg_prototype (1, d); ring: (N, 2) (x, y) in the working frame;
    ring_valid: False when the support mask leaves no ring (then no background prompts);
    support_shape: (H, W) of the original support image.
    """

    bg_prototypes: torch.Tensor
    fg_prototype: torch.Tensor
    ring: np.ndarray
    ring_valid: bool
    support_shape: tuple[int, int]


# ----------------------------------------------------------------------------- the module


class FoBPromptGenerator(nn.Module):
    """FoB prompt generator: shared encoder, BPPC prototypes, BCM heatmaps, SPR refinement."""

    def __init__(self, config: FoBConfig | None = None, encoder_weights: str | Path | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else FoBConfig()
        c = self.config
        self.encoder = build_encoder(c.encoder, c.feature_dim, encoder_weights)
        self.bcm = BCM(c.feature_dim, c.n_bg, c.heads)
        self.spr = SPR(c.feature_dim, c.kappa, c.k_samples, c.heads)

    # ---------------------------------------------------------------- construction / persistence

    @classmethod
    def from_config(cls, encoder_weights: str | Path | None = None, **overrides: Any) -> FoBPromptGenerator:
        """Untrained generator; `overrides` are FoBConfig fields (no arguments: the default, encoder 'lite').

        encoder_weights: a local torchvision ResNet-101 / DeepLabV3 file for encoder='resnet101'.
        """
        return cls(FoBConfig.from_dict(dict(overrides)), encoder_weights=encoder_weights)

    @staticmethod
    def default_model_path() -> Path:
        return resources_dir() / DEFAULT_MODEL_NAME

    def save(self, path: str | Path) -> Path:
        """Write the weights and config; '.safetensors' -> safetensors, anything else -> torch file.

        Written atomically (temporary file in the target folder, then os.replace). Returns the path.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        meta = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "config": self.config.to_json(),
        }
        with atomic_output(path) as tmp:
            if path.suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file(state, tmp, metadata=meta)
            else:
                torch.save({**meta, "state_dict": state}, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> FoBPromptGenerator:
        """Load a checkpoint written by `save` (None: the shipped Resources/fob_lite.safetensors).

        Raises FileNotFoundError when the file is missing, ValueError when it is corrupt, truncated,
        not a FoB checkpoint, or its tensors do not match its own config. Returns the model in eval mode.
        """
        if path is None:
            path = cls.default_model_path()
            if not path.is_file():
                raise FileNotFoundError(
                    f"the default FoB model {path.name} is missing from {path.parent}; "
                    "train one with `fob train` (or pass a checkpoint path)"
                )
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FoB checkpoint not found: {path}")
        meta, state = _read_checkpoint(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{path.name} is not a FoB prompt-generator checkpoint (format {meta.get('format')!r})"
            )
        if str(meta.get("format_version")) != CHECKPOINT_FORMAT_VERSION:
            raise ValueError(
                f"{path.name}: unsupported FoB checkpoint version {meta.get('format_version')!r}"
            )
        try:
            config = FoBConfig.from_json(meta.get("config"))
        except ValueError as exc:
            raise ValueError(f"{path.name}: bad config in checkpoint: {exc}") from None
        model = cls(config)
        own = model.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            what = []
            if missing:
                what.append(f"{len(missing)} missing (e.g. {missing[0]})")
            if unexpected:
                what.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
            raise ValueError(f"{path.name} does not match its FoB config: tensors {', '.join(what)}")
        for k, v in own.items():
            if tuple(state[k].shape) != tuple(v.shape) or state[k].dtype != v.dtype:
                raise ValueError(
                    f"{path.name}: tensor {k} is {tuple(state[k].shape)} {state[k].dtype}, "
                    f"expected {tuple(v.shape)} {v.dtype}"
                )
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    # ---------------------------------------------------------------- training forward

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _query_forward(
        self,
        fq: torch.Tensor,
        tq: torch.Tensor,
        bg_prototypes: torch.Tensor,
        fg_prototype: torch.Tensor,
        size: int,
    ) -> dict[str, torch.Tensor]:
        cos, prob = self.bcm.coarse_foreground(fq, fg_prototype, tq)
        prob_up = F.interpolate(prob.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=True)[
            :, 0
        ]
        out = self.bcm(fq, cos, bg_prototypes, size)
        coarse, peak = heatmap_argmax(out["heatmaps"])
        spr = self.spr(fq, coarse, None, bg_prototypes, size, self.config.sigma)
        return {
            "heatmaps": out["heatmaps"],
            "phi": out["phi"],
            "fg_prob": prob_up,
            "fg_prob_lowres": prob,
            "cosine": cos,
            "threshold": tq,
            "coarse_points": coarse,
            "bg_confidence": peak,
            "refined_points": spr["refined"],
            "query_prototypes": spr["query_prototypes"],
            "features_query": fq,
        }

    def forward(
        self,
        support_img: torch.Tensor,
        support_mask: torch.Tensor,
        query_img: torch.Tensor,
        support_ring: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One batch of episodes in the S x S working frame; see the module docstring for the outputs.

        support_img, query_img: (B, 3, S, S) float, z-scored; support_mask: (B, S, S) 0/1.
        support_ring: optional precomputed ((B, N, 2) points, (B, N) valid) of the support masks.
        """
        if (
            support_img.ndim != 4
            or support_img.shape[1] != 3
            or support_img.shape[-1] != support_img.shape[-2]
        ):
            raise ValueError(f"support_img must be (B, 3, S, S), got {tuple(support_img.shape)}")
        if tuple(query_img.shape) != tuple(support_img.shape):
            raise ValueError(
                f"query_img {tuple(query_img.shape)} must match support_img {tuple(support_img.shape)}"
            )
        b, _, size, _ = support_img.shape
        if tuple(support_mask.shape) != (b, size, size):
            raise ValueError(
                f"support_mask must be (B, S, S) = {(b, size, size)}, got {tuple(support_mask.shape)}"
            )
        if size % self.encoder.stride:
            raise ValueError(
                f"working size {size} must be a multiple of the encoder stride {self.encoder.stride}"
            )
        mask = support_mask.to(support_img.dtype)
        feats, thr = self.encoder(torch.cat([support_img, query_img], dim=0))
        fs, fq = feats[:b], feats[b:]
        tq = thr[b:]
        if support_ring is None:
            pts, valid = batch_ring_points(mask, self.config.n_bg, self.config.k_out, self.config.k_in)
        else:
            pts, valid = (
                support_ring[0].to(mask.device, torch.float32),
                support_ring[1].to(mask.device, torch.bool),
            )
        sp = support_prototypes(fs, mask, pts, valid, self.config.sigma, self.config.erode_inner)
        out = self._query_forward(fq, tq, sp["bg_prototypes"], sp["fg_prototype"], size)
        out.update(
            bg_prototypes=sp["bg_prototypes"],
            fg_prototype=sp["fg_prototype"],
            inner_prototype=sp["inner_prototype"],
            support_points=pts,
            support_valid=valid,
            support_mask_valid=mask.flatten(1).amax(1) > 0.5,
        )
        return out

    def compute_losses(
        self,
        outputs: dict[str, torch.Tensor],
        query_mask: torch.Tensor,
        query_ring: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses of one `forward` output against query_mask (B, S, S) 0/1.

        Returns 'heat', 'coor' (pixels^2, unweighted), 'fore', 'rac' and 'total' = rac +
        lambda_heat heat + lambda_coor coor + fore, plus 'gt_points' (B, N, 2) / 'gt_valid' (B, N).
        Ring channels count only where both the support and the query ring are valid.
        """
        c = self.config
        heat = outputs["heatmaps"]
        b, n, size, _ = heat.shape
        if tuple(query_mask.shape) != (b, size, size):
            raise ValueError(
                f"query_mask must be (B, S, S) = {(b, size, size)}, got {tuple(query_mask.shape)}"
            )
        qm = query_mask.to(heat.device, heat.dtype)
        if query_ring is None:
            gt, gt_valid = batch_ring_points(qm, n, c.k_out, c.k_in)
        else:
            gt, gt_valid = (
                query_ring[0].to(heat.device, torch.float32),
                query_ring[1].to(heat.device, torch.bool),
            )
        valid = gt_valid & outputs["support_valid"]
        target = gaussian_heatmaps(gt, valid, (size, size), c.sigma)
        losses = {
            "heat": heatmap_loss(heat, outputs["phi"], target, valid, c.heat_loss),
            "coor": point_loss(outputs["refined_points"], gt, valid),
            "fore": foreground_loss(
                outputs["fg_prob"], qm, outputs["support_mask_valid"], c.fg_loss_bg_weight
            ),
            "rac": rac_loss(
                outputs["fg_prototype"],
                outputs["inner_prototype"],
                outputs["bg_prototypes"],
                outputs["support_valid"] & outputs["support_mask_valid"][:, None],
                c.tau,
                c.rac,
            ),
        }
        losses["total"] = total_loss(losses, c.lambda_heat, c.lambda_coor)
        losses["gt_points"] = gt
        losses["gt_valid"] = gt_valid
        return losses

    # ---------------------------------------------------------------- inference

    @contextmanager
    def _inference(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.train(was_training)

    def _prepare(self, image: object, name: str) -> tuple[torch.Tensor, tuple[int, int]]:
        img = _check_image(image, name)
        work = normalize_image(_resize_image(img, self.config.image_size))
        return torch.from_numpy(np.ascontiguousarray(work.transpose(2, 0, 1))), img.shape[:2]

    def encode_support(self, support_image: np.ndarray, support_mask: np.ndarray) -> SupportFeatures:
        """Encode one support slice once: (H, W[, 3]) image + (H, W) bool mask -> SupportFeatures."""
        img, shape = self._prepare(support_image, "support_image")
        mask = _resize_mask(_check_mask(support_mask, shape), self.config.image_size)
        c = self.config
        pts, valid = ring_points(mask, c.n_bg, c.k_out, c.k_in)
        dev = self.device
        with self._inference():
            fs, _ = self.encoder(img.unsqueeze(0).to(dev))
            mt = torch.from_numpy(mask).to(dev, fs.dtype).unsqueeze(0)
            sp = support_prototypes(
                fs,
                mt,
                torch.from_numpy(pts).to(dev, torch.float32).unsqueeze(0),
                torch.from_numpy(valid).to(dev).unsqueeze(0),
                c.sigma,
                c.erode_inner,
            )
        return SupportFeatures(sp["bg_prototypes"], sp["fg_prototype"], pts, bool(valid.all()), shape)

    def _foreground_points(self, prob: np.ndarray) -> np.ndarray:
        """Up to N_f (x, y) working-frame points on P_fg (S, S) (see the module docstring)."""
        c = self.config
        cand = prob >= c.fg_threshold
        if not cand.any():
            r, col = np.unravel_index(int(np.argmax(prob)), prob.shape)
            return np.array([[col, r]], np.float64)
        if c.fg_sampling == "raster":
            rows, cols = np.nonzero(cand)
            idx = np.linspace(0, len(rows) - 1, min(c.n_fg, len(rows))).astype(int)
            return np.stack([cols[idx], rows[idx]], axis=1).astype(np.float64)
        inner = erode_square(cand, 2 * int(round(c.sigma)) + 1) & cand
        if inner.any():
            cand = inner
        rows, cols = np.nonzero(cand)
        best = int(np.argmax(prob[rows, cols]))
        if len(rows) > 1024:
            # FPS cost grows with the candidate count; a regular subset of about 1024 keeps it ~1 ms.
            step = int(np.ceil(np.sqrt(len(rows) / 1024)))
            keep = (rows % step == 0) & (cols % step == 0)
            keep[best] = True
            rows, cols = rows[keep], cols[keep]
            best = int(np.count_nonzero(keep[:best]))
        pts = np.stack([cols, rows], axis=1).astype(np.float64)
        return pts[farthest_point_sampling(pts, c.n_fg, best)]

    def predict_from_support(
        self, support: SupportFeatures, query_images: Sequence[np.ndarray], batch_size: int = 8
    ) -> list[dict[str, Any]]:
        """Prompts for many queries from one encoded support; one details dict per query.

        Each dict: 'prompts' PromptSet (query frame), 'bg_confidence' (N_p,) heatmap peak values,
        'coarse_background' (N_p, 2) BCM argmax points (query frame), 'fg_probability_max' float.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(query_images, np.ndarray):
            raise ValueError("query_images must be a list of (H, W[, 3]) arrays; use predict() for one image")
        prepared = [self._prepare(q, f"query_images[{i}]") for i, q in enumerate(query_images)]
        size = self.config.image_size
        results: list[dict[str, Any]] = []
        dev = self.device
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start : start + batch_size]
            batch = torch.stack([t for t, _ in chunk]).to(dev)
            with self._inference():
                fq, tq = self.encoder(batch)
                nb = len(chunk)
                bg_p = support.bg_prototypes.to(dev, fq.dtype).expand(nb, -1, -1)
                out = self._query_forward(
                    fq, tq, bg_p, support.fg_prototype.to(dev, fq.dtype).expand(nb, -1), size
                )
                prob_q = [
                    F.interpolate(
                        out["fg_prob"][i][None, None], size=shape, mode="bilinear", align_corners=False
                    )[0, 0]
                    .clamp(0.0, 1.0)
                    .float()
                    .cpu()
                    .numpy()
                    for i, (_, shape) in enumerate(chunk)
                ]
            prob_w = out["fg_prob"].float().cpu().numpy()
            refined = out["refined_points"].float().cpu().numpy()
            coarse = out["coarse_points"].float().cpu().numpy()
            conf = out["bg_confidence"].float().cpu().numpy()
            for i, (_, shape) in enumerate(chunk):
                bg = _to_query_frame(refined[i], shape, size) if support.ring_valid else np.zeros((0, 2))
                fg = _to_query_frame(self._foreground_points(prob_w[i]), shape, size)
                results.append(
                    {
                        "prompts": PromptSet(background=bg, foreground=fg, fg_probability=prob_q[i]),
                        "bg_confidence": conf[i] if support.ring_valid else np.zeros(0, np.float32),
                        "coarse_background": _to_query_frame(coarse[i], shape, size),
                        "fg_probability_max": float(prob_w[i].max()),
                    }
                )
        return results

    def predict_with_details(
        self, support_image: np.ndarray, support_mask: np.ndarray, query_image: np.ndarray
    ) -> dict[str, Any]:
        """`predict` plus 'bg_confidence', 'coarse_background', 'fg_probability_max' and
        'support_ring' ((N_p, 2) support ring points in the support image's frame)."""
        support = self.encode_support(support_image, support_mask)
        details = self.predict_from_support(support, [query_image])[0]
        ring = support.ring if support.ring_valid else np.zeros((0, 2))
        details["support_ring"] = _to_query_frame(ring, support.support_shape, self.config.image_size)
        return details

    def predict(
        self, support_image: np.ndarray, support_mask: np.ndarray, query_image: np.ndarray
    ) -> PromptSet:
        """Prompts for one query slice (see the module docstring for frames and normalisation)."""
        return self.predict_with_details(support_image, support_mask, query_image)["prompts"]

    def predict_batch(
        self,
        support_image: np.ndarray,
        support_mask: np.ndarray,
        query_images: Sequence[np.ndarray],
        batch_size: int = 8,
    ) -> list[PromptSet]:
        """Prompts for many query slices; the support is encoded once, queries run `batch_size` at a time."""
        support = self.encode_support(support_image, support_mask)
        return [d["prompts"] for d in self.predict_from_support(support, query_images, batch_size)]


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors or torch checkpoint; ValueError for anything unreadable."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if path.suffix == ".safetensors" or (len(head) == 8 and not head.startswith(b"PK")):
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}
            return meta, state
        except Exception as exc:
            if path.suffix == ".safetensors":
                raise ValueError(
                    f"{path.name} is not a readable safetensors file ({type(exc).__name__}: {exc})"
                ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(
            f"{path.name} is not a readable FoB checkpoint ({type(exc).__name__}: {msg})"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        raise ValueError(f"{path.name} is not a FoB prompt-generator checkpoint (no state_dict)")
    state = obj["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(
            f"{path.name} is not a FoB prompt-generator checkpoint (state_dict holds non-tensors)"
        )
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return meta, state


__all__ = ["FoBPromptGenerator", "FoBConfig", "SupportFeatures", "normalize_image", "farthest_point_sampling"]
