"""Setting I pseudo-labels: supervoxels of unlabeled volumes and SLIC superpixels of dermoscopy images.

No ground truth is read here. Everything is computed once and cached on disk under
`cache_dir()/pseudolabels/`, keyed by the SHA-256 of the input file and the parameters.

Supervoxels (volumes). The method doc (section 9.2) uses ADNet's Cython `felzenszwalb_3d`
(scale 1, sigma 0, min_size 5000 voxels, anisotropic spacing). scikit-image only ships a 2-D
Felzenszwalb, and a pure-Python 3-D graph merge over ~7 M edges would take minutes per volume, so
we build 3-D supervoxels in two fast steps:

1. Felzenszwalb on every axial slice (scikit-image, Cython), on the volume rescaled to [0, 255]
   with the method's `scale=1`, and a per-slice `min_size` (default 400 px, the SSL-ALPNet 2-D
   value; a 3-D supervoxel of 5000 voxels spans several 7.7 mm slices of ~1000 px each).
2. Linking across slices: segment `a` of slice z and `b` of slice z+1 become the same supervoxel
   when they are each other's best match by intersection-over-union and that IoU is at least
   `link_iou` (default 0.3). Mutual best matches are one-to-one, so the supervoxels are tubes
   through the stack and never snowball into one giant label; a region whose cross-section changes
   a lot between slices is cut there, which is what the episode sampler wants anyway (support and
   query are adjacent slices of the same label, section 9.4).

The body mask follows ADNet: per slice, threshold the [0, 255] volume at 10, keep the largest
connected component, fill holes; voxels outside it get label 0. Supervoxel ids are 1..K.

A 3-D SLIC alternative (`method="slic"`, scikit-image `slic` on the whole volume with the voxel
spacing and the body mask) is available; it is slower (~6 s vs ~2 s per CHAOS volume) and its
compact segments follow organ boundaries less closely.

Arrays are (z, y, x) = (k, j, i), as SimpleITK returns them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import felzenszwalb, slic

from FoBSegmentLib.atomic import atomic_output
from FoBSegmentLib.paths import cache_dir

CACHE_VERSION = 1


@dataclass(frozen=True)
class SupervoxelParams:
    """Parameters of the volume pseudo-labels (all part of the cache key)."""

    method: str = "felzenszwalb"  # "felzenszwalb" (per slice + linking) or "slic" (3-D)
    scale: float = 1.0  # Felzenszwalb scale (method doc: 1)
    sigma: float = 0.0  # Felzenszwalb pre-smoothing (method doc: 0)
    min_size: int = 400  # Felzenszwalb minimum segment size per slice, pixels
    link_iou: float = 0.3  # minimum IoU of a mutual best match between adjacent slices
    body_threshold: float = 10.0  # on the volume rescaled to [0, 255]
    slic_segments: int = 300  # only for method="slic"
    slic_compactness: float = 0.1  # only for method="slic" (intensities in [0, 1])

    def __post_init__(self) -> None:
        if self.method not in ("felzenszwalb", "slic"):
            raise ValueError(f"unknown supervoxel method {self.method!r} (felzenszwalb or slic)")
        if self.min_size < 1 or not 0.0 < self.link_iou <= 1.0:
            raise ValueError("supervoxel min_size must be >= 1 and link_iou in (0, 1]")


def rescale_to_255(volume: np.ndarray) -> np.ndarray:
    """Min-max rescale to float32 [0, 255] (ADNet's first step); a constant volume becomes all zeros."""
    vol = np.asarray(volume, dtype=np.float32)
    lo, hi = float(vol.min()), float(vol.max())
    if hi <= lo:
        return np.zeros_like(vol)
    return (vol - lo) * (255.0 / (hi - lo))


def body_mask(volume255: np.ndarray, threshold: float = 10.0) -> np.ndarray:
    """Per-slice body mask of a (Z, Y, X) volume in [0, 255]: threshold, largest component, holes filled."""
    vol = np.asarray(volume255)
    if vol.ndim != 3:
        raise ValueError(f"body_mask expects a (Z, Y, X) volume, got shape {vol.shape}")
    out = np.zeros(vol.shape, dtype=bool)
    for z in range(vol.shape[0]):
        lab, n = ndi.label(vol[z] > threshold)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        out[z] = ndi.binary_fill_holes(lab == int(sizes.argmax()))
    return out


def _link_slices(slice_labels: list[np.ndarray], link_iou: float) -> np.ndarray:
    """Merge per-slice segment ids (0 = none) into volume ids by mutual-best-IoU links; returns (Z, Y, X)."""
    offsets, next_id = [], 1
    for lab in slice_labels:  # make ids globally unique: slice z uses offset + 1 .. offset + max
        offsets.append(next_id - 1)
        next_id += int(lab.max())
    parent = np.arange(next_id, dtype=np.int64)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for z in range(len(slice_labels) - 1):
        a, b = slice_labels[z], slice_labels[z + 1]
        na, nb = int(a.max()) + 1, int(b.max()) + 1
        if na == 1 or nb == 1:
            continue
        inter = np.bincount((a.astype(np.int64) * nb + b).ravel(), minlength=na * nb).reshape(na, nb)
        inter[0, :] = 0
        inter[:, 0] = 0
        size_a, size_b = inter.sum(1), inter.sum(0)
        union = size_a[:, None] + size_b[None, :] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        best_b = iou.argmax(1)
        best_a = iou.argmax(0)
        for ia in range(1, na):
            ib = int(best_b[ia])
            if ib > 0 and best_a[ib] == ia and iou[ia, ib] >= link_iou:
                ra, rb = find(offsets[z] + ia), find(offsets[z + 1] + ib)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([find(i) for i in range(next_id)], dtype=np.int64)
    out = np.zeros((len(slice_labels),) + slice_labels[0].shape, dtype=np.int64)
    for z, lab in enumerate(slice_labels):
        glob = np.where(lab > 0, lab.astype(np.int64) + offsets[z], 0)
        out[z] = roots[glob]
    return out


def _relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Ids 1..K in order of first appearance in the sorted id list; 0 stays 0. Returns int32."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


def compute_supervoxels(
    volume: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0), params: SupervoxelParams | None = None
) -> np.ndarray:
    """Supervoxel pseudo-labels of one volume.

    volume: (Z, Y, X) intensities, any scale. spacing_zyx: voxel size in mm along (z, y, x), used by
    the SLIC variant. Returns (Z, Y, X) int32, 0 outside the body, supervoxels 1..K.
    """
    params = params or SupervoxelParams()
    vol = np.asarray(volume)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise ValueError(f"supervoxels need a (Z, Y, X) volume, got shape {vol.shape}")
    if not np.all(np.isfinite(vol)):
        raise ValueError("volume contains NaN or infinite values")
    v255 = rescale_to_255(vol)
    body = body_mask(v255, params.body_threshold)
    if params.method == "slic":
        if not body.any():
            return np.zeros(vol.shape, dtype=np.int32)
        labels = slic(
            v255 / 255.0,
            n_segments=params.slic_segments,
            compactness=params.slic_compactness,
            channel_axis=None,
            spacing=np.asarray(spacing_zyx, dtype=float),
            mask=body,
            start_label=1,
        ).astype(np.int64)
    else:
        per_slice = []
        for z in range(vol.shape[0]):
            if not body[z].any():
                per_slice.append(np.zeros(vol.shape[1:], dtype=np.int64))
                continue
            seg = felzenszwalb(v255[z], scale=params.scale, sigma=params.sigma, min_size=params.min_size)
            seg = seg.astype(np.int64) + 1  # felzenszwalb starts at 0; 0 is reserved for "outside the body"
            seg[~body[z]] = 0
            per_slice.append(seg)
        labels = _link_slices(per_slice, params.link_iou)
    labels[~body] = 0
    return _relabel_consecutive(labels)


def slic_superpixels(image_rgb: np.ndarray, n_segments: int = 5, compactness: float = 15.0) -> np.ndarray:
    """SLIC pseudo-labels of a 2-D RGB dermoscopy image (method doc 9.2: 5 segments, compactness 15).

    image_rgb: (H, W, 3), uint8 or float. Returns (H, W) int32 with ids starting at 1; every pixel
    belongs to a segment (no background id), as in the reference.
    """
    img = np.asarray(image_rgb)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"SLIC pseudo-labels need an (H, W, 3) RGB image, got shape {img.shape}")
    return slic(img, n_segments=n_segments, compactness=compactness, start_label=1, channel_axis=-1).astype(
        np.int32
    )


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_path(kind: str, source: Path, params: dict, root: Path | None) -> Path:
    key = json.dumps({"v": CACHE_VERSION, "kind": kind, "file": file_sha256(source), "params": params}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return (root or cache_dir()) / "pseudolabels" / f"{kind}_{digest}.npz"


def _atomic_save_npz(path: Path, labels: np.ndarray) -> None:
    with atomic_output(path, make_parents=True) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, labels=labels)


def _load_cached(path: Path) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["labels"]
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache entry is recomputed, not trusted


def volume_supervoxels(
    image_path: str | os.PathLike, params: SupervoxelParams | None = None, cache_root: Path | None = None
) -> np.ndarray:
    """Cached supervoxels of an image file (NIfTI/NRRD/MHA). Returns (Z, Y, X) int32 (see compute_supervoxels)."""
    import SimpleITK as sitk

    params = params or SupervoxelParams()
    source = Path(image_path)
    if not source.is_file():
        raise FileNotFoundError(f"volume not found: {source}")
    path = _cache_path("supervoxels", source, asdict(params), cache_root)
    cached = _load_cached(path)
    if cached is not None:
        return cached
    img = sitk.ReadImage(str(source))
    vol = sitk.GetArrayFromImage(img)
    if vol.ndim != 3:
        raise ValueError(f"{source.name} is not a 3-D volume (array shape {vol.shape})")
    sx, sy, sz = img.GetSpacing()
    labels = compute_supervoxels(vol, (sz, sy, sx), params)
    _atomic_save_npz(path, labels)
    return labels


def image_superpixels(
    image_path: str | os.PathLike, n_segments: int = 5, compactness: float = 15.0, cache_root: Path | None = None
) -> np.ndarray:
    """Cached SLIC pseudo-labels of a 2-D RGB image file (PNG/JPG). Returns (H, W) int32, ids from 1."""
    from PIL import Image

    source = Path(image_path)
    if not source.is_file():
        raise FileNotFoundError(f"image not found: {source}")
    path = _cache_path("slic", source, {"n_segments": n_segments, "compactness": compactness}, cache_root)
    cached = _load_cached(path)
    if cached is not None:
        return cached
    with Image.open(source) as im:
        rgb = np.asarray(im.convert("RGB"))
    labels = slic_superpixels(rgb, n_segments, compactness)
    _atomic_save_npz(path, labels)
    return labels
