"""FoBPromptGenerator: the inference API of the FoB prompt generator (like SamPredictor).

Inference (numpy in, PromptSet out; eval mode and torch.inference_mode inside)::

    gen = FoBPromptGenerator.load()                  # shipped Resources/fob_lite.safetensors
    gen = FoBPromptGenerator.from_config(n_bg=10)    # untrained, any FoBConfig field as keyword
    ps = gen.predict(support_image, support_mask, query_image)
    many = gen.predict_batch(support_image, support_mask, [q1, q2, ...], batch_size=8)
    sup = gen.encode_support(support_image, support_mask)   # cache once, reuse for many queries
    details = gen.predict_from_support(sup, [q1, q2])       # list of dicts (see predict_with_details)
    maps = gen.coarse_probabilities(sup, [q1, q2])          # P_fg only, (H, W) each, no ring heads

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

`FoBPromptGenerator` is a `FoBNet` (generator.py), so training drives the same object: `gen(...)`,
`gen.compute_losses(...)`, `gen.save(path)`. `save` / `load` use checkpoint.py: safetensors (path
ending .safetensors) with the config JSON in the metadata, or else a torch file of plain tensors +
JSON strings read with `torch.load(weights_only=True)`; `load` rejects anything that is not exactly
a FoB checkpoint of its own config (ValueError), never loading with strict=False.
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
import torch.nn.functional as F

from FoBSegmentLib.io.coords import point_pixels
from FoBSegmentLib.model import checkpoint
from FoBSegmentLib.model.bppc import support_prototypes
from FoBSegmentLib.model.config import FoBConfig
from FoBSegmentLib.model.generator import FoBNet
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.prompts.ring import erode_square, ring_points
from FoBSegmentLib.prompts.sampling import farthest_point_sampling

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


# ----------------------------------------------------------------------------- the predictor


def _query_probabilities(prob: torch.Tensor, chunk: list[tuple[torch.Tensor, tuple[int, int]]]) -> list[np.ndarray]:
    """P_fg (B, S, S) in the working frame -> per query its (H, W) float32 map in [0, 1] in the query's
    frame; chunk: the batch's (prepared tensor, (H, W)) pairs."""
    return [
        F.interpolate(prob[i][None, None], size=shape, mode="bilinear", align_corners=False)[0, 0]
        .clamp(0.0, 1.0).float().cpu().numpy()
        for i, (_, shape) in enumerate(chunk)
    ]


def _drop_foreground_like(bg: np.ndarray, prob: np.ndarray, threshold: float, keep_min: int = 3) -> np.ndarray:
    """(N, 2) (x, y) query-frame background prompts without those where the (H, W) coarse P_fg is
    >= threshold; the `keep_min` least foreground-like stay (in ring order) so a ring still encloses."""
    p = prob[point_pixels(bg, prob.shape)]
    keep = p < threshold
    if keep.sum() < min(keep_min, len(bg)):
        keep = np.zeros(len(bg), bool)
        keep[np.argsort(p, kind="stable")[: min(keep_min, len(bg))]] = True
    return bg[keep]


class FoBPromptGenerator(FoBNet):
    """FoB prompt generator: the network plus predict / predict_batch / encode_support, load / save."""

    @classmethod
    def from_config(cls, encoder_weights: str | Path | None = None, **overrides: Any) -> FoBPromptGenerator:
        """Untrained generator; `overrides` are FoBConfig fields (no arguments: the default, encoder 'lite').

        encoder_weights: a local torchvision ResNet-101 / DeepLabV3 file for encoder='resnet101'.
        """
        return cls(FoBConfig.from_dict(dict(overrides)), encoder_weights=encoder_weights)

    @staticmethod
    def default_model_path() -> Path:
        return checkpoint.default_model_path()

    def save(self, path: str | Path) -> Path:
        """Write the weights and config; '.safetensors' -> safetensors, anything else -> torch file.

        Written atomically (temporary file in the target folder, then os.replace). Returns the path.
        """
        return checkpoint.save_checkpoint(self, self.config, path)

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
        return checkpoint.load_checkpoint(path, cls).to(device).eval()

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

    def _prepare_queries(self, query_images: Sequence[np.ndarray], batch_size: int
                         ) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(query_images, np.ndarray):
            raise ValueError("query_images must be a list of (H, W[, 3]) arrays; use predict() for one image")
        return [self._prepare(q, f"query_images[{i}]") for i, q in enumerate(query_images)]

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
        if len(pts) <= c.n_fg:
            return pts  # every candidate, in raster order (the order the shipped results use)
        return pts[farthest_point_sampling(pts, c.n_fg, best)]

    def predict_from_support(
        self, support: SupportFeatures, query_images: Sequence[np.ndarray], batch_size: int = 8
    ) -> list[dict[str, Any]]:
        """Prompts for many queries from one encoded support; one details dict per query.

        Each dict: 'prompts' PromptSet (query frame), 'bg_confidence' (N_p,) heatmap peak values,
        'coarse_background' (N_p, 2) BCM argmax points (query frame), 'fg_probability_max' float.
        """
        prepared = self._prepare_queries(query_images, batch_size)
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
                prob_q = _query_probabilities(out["fg_prob"], chunk)
            prob_w = out["fg_prob"].float().cpu().numpy()
            refined = out["refined_points"].float().cpu().numpy()
            coarse = out["coarse_points"].float().cpu().numpy()
            conf = out["bg_confidence"].float().cpu().numpy()
            for i, (_, shape) in enumerate(chunk):
                bg = _to_query_frame(refined[i], shape, size) if support.ring_valid else np.zeros((0, 2))
                if self.config.bg_max_fg_prob < 1.0 and len(bg):
                    bg = _drop_foreground_like(bg, prob_q[i], self.config.bg_max_fg_prob)
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

    def coarse_probabilities(
        self, support: SupportFeatures, query_images: Sequence[np.ndarray], batch_size: int = 8
    ) -> list[np.ndarray]:
        """The coarse foreground map P_fg of each query, (H, W) float32 in [0, 1] in the query's frame:
        `predict_from_support`'s `fg_probability` to the bit (same batches, same operations) without
        the background ring's heads (BCM heatmaps, SPR), for callers that need where the organ is
        and not the prompts (the organ range of the `hybrid` source)."""
        size = self.config.image_size
        prepared = self._prepare_queries(query_images, batch_size)
        out: list[np.ndarray] = []
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start : start + batch_size]
            with self._inference():
                fq, tq = self.encoder(torch.stack([t for t, _ in chunk]).to(self.device))
                fg = support.fg_prototype.to(self.device, fq.dtype).expand(len(chunk), -1)
                out += _query_probabilities(self.coarse_probability(fq, tq, fg, size)[2], chunk)
        return out

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
        spr: bool = True,
    ) -> list[PromptSet]:
        """Prompts for many query slices; the support is encoded once, queries run `batch_size` at a time.
        spr False: the background ring before SPR (the BCM heatmaps' argmax, 'coarse_background')."""
        support = self.encode_support(support_image, support_mask)
        out = []
        for d in self.predict_from_support(support, query_images, batch_size):
            ps = d["prompts"]
            if not spr and len(ps.background):
                ps = PromptSet(np.asarray(d["coarse_background"], np.float64), ps.foreground,
                               fg_probability=ps.fg_probability)
            out.append(ps)
        return out


__all__ = ["FoBPromptGenerator", "SupportFeatures", "normalize_image"]
