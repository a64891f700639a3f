"""Training data and episode samplers (method doc sections 9.1-9.4).

Data folders (`fob train --data DIR...`):
- volume folders hold `image_<id>.nii.gz` (and, for Setting II only, `label_<id>.nii.gz`);
- image folders hold `<id>.jpg`/`.png` RGB dermoscopy images (`*_mask.png` files are ground truth and
  are never read for Setting I).

Setting I reads no label file at all: the masks are supervoxels (volumes) or SLIC superpixels (2-D),
see `pseudolabels.py`.

Every slice is resized to the generator's working size S x S (bilinear for images, nearest for label
maps) once at load time. Intensities are normalised with the pipeline's own presets
(`io/intensity.py`: CT abdomen window, MR percentile clipping, RGB / 255) so training sees exactly the
[0, 1] images the engine hands to the generator at inference. Arrays are (z, y, x) = (k, j, i);
slices are (row, col).

Abdominal episodes (9.4): pick a training volume, a label id (supervoxel in Setting I), and a pair of
adjacent slices (z, z+1) that both contain it; support = one, query = the other (order reversed with
p = 0.5); at least one of the two masks has >= `min_size` pixels. We pick the label uniformly among the
labels that have at least one admissible pair, then the pair uniformly: this is the reference's
rejection loop without its unbounded retries. Setting II removes every slice that contains ANY
excluded (test) organ (the definition; `exclude_mode="all"` gives the lineage code's AND, D10).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

# Evaluation reads the same files, so the finders and readers live in its dataset catalogue.
from FoBSegmentLib.evaluate.datasets import (
    find_skin_images,
    find_volume_pairs,
    normalise_volume,
    read_volume_array,
)
from FoBSegmentLib.train.augment import augment_pair, skin_transform
from FoBSegmentLib.train.pseudolabels import SupervoxelParams, image_superpixels, volume_supervoxels


@dataclass
class Episode:
    """One 1-way 1-shot training episode.

    support_image, query_image: (S, S) grey or (S, S, 3) RGB float32 in [0, 1].
    support_mask, query_mask: (S, S) uint8 in {0, 1}.
    info: where it came from (volume name, label id, slice indices) for logs and tests.
    """

    support_image: np.ndarray
    support_mask: np.ndarray
    query_image: np.ndarray
    query_mask: np.ndarray
    info: dict = field(default_factory=dict)


@dataclass
class TrainingVolume:
    """One training volume on the S x S grid.

    image: (Z, S, S) float32 in [0, 1]; labels: (Z, S, S) int32, the episode label map (supervoxels in
    Setting I, ground truth in Setting II with gt labels); allowed: (Z,) bool, slices episodes may use.
    """

    name: str
    image: np.ndarray
    labels: np.ndarray
    allowed: np.ndarray
    classes: np.ndarray | None = None  # label ids that may be foreground; None = every id > 0


def resize_stack(stack: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    """Resize every (Y, X) slice of a (Z, Y, X) stack to (size, size); identity when already that size."""
    if stack.shape[1:] == (size, size):
        return stack
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    src = stack.astype(np.float32) if not nearest else stack.astype(np.int32)
    out = [cv2.resize(s, (size, size), interpolation=interp) for s in src]
    return np.stack(out).astype(stack.dtype if nearest else np.float32)


def excluded_slices(gt: np.ndarray, organs: Sequence[int], mode: str = "any") -> np.ndarray:
    """(Z,) bool: slices of a (Z, Y, X) ground-truth map to drop in Setting II.

    mode 'any': a slice is dropped when it contains any of `organs` (the Setting II definition);
    'all': only when it contains every one of them (the Q-Net/CAT-Net/GMRD code, D10).
    """
    if mode not in ("any", "all"):
        raise ValueError(f"exclude mode must be 'any' or 'all', got {mode!r}")
    if not len(organs):
        return np.zeros(gt.shape[0], dtype=bool)
    present = np.stack([(gt == o).reshape(gt.shape[0], -1).any(1) for o in organs], axis=1)
    return present.any(1) if mode == "any" else present.all(1)


def load_training_volumes(
    folders: Sequence[str | Path],
    setting: int = 1,
    size: int = 256,
    exclude_organs: Sequence[int] = (),
    exclude_mode: str = "any",
    setting2_labels: str = "gt",
    params: SupervoxelParams | None = None,
    include_ids: dict[str, Sequence[str]] | None = None,
    progress: bool = True,
) -> list[TrainingVolume]:
    """Load the volumes of `folders` for training (pseudo-labels computed or read from the cache).

    setting 1: supervoxel labels, no label file read. setting 2: slices with the excluded organs are
    removed (ground truth read for that); episode labels are the ground truth of the other organs
    (`setting2_labels="gt"`) or supervoxels (`"supervoxels"`, the FoB code's variant).
    include_ids: optional {folder name: ids} restricting which volumes are used (per-fold training).
    """
    from tqdm import tqdm

    if setting not in (1, 2):
        raise ValueError(f"--setting must be 1 or 2, got {setting}")
    if setting2_labels not in ("gt", "supervoxels"):
        raise ValueError(f"setting2_labels must be 'gt' or 'supervoxels', got {setting2_labels!r}")
    if setting == 2 and not exclude_organs:
        raise ValueError("Setting II needs --exclude-organs (the test organ labels, e.g. 1 for liver)")
    jobs = []
    for folder in folders:
        folder = Path(folder)
        wanted = None if include_ids is None else {str(i) for i in include_ids.get(folder.name, [])}
        for sid, img, lab in find_volume_pairs(folder):
            if wanted is None or sid in wanted:
                jobs.append((folder.name, sid, img, lab))
    if not jobs:
        raise ValueError("no training volumes (image_<id>.nii.gz) found in " + ", ".join(map(str, folders)))
    out = []
    for fname, sid, img_path, lab_path in tqdm(jobs, desc="pseudo-labels", unit="vol", disable=not progress):
        arr, _ = read_volume_array(img_path)
        image = resize_stack(normalise_volume(arr), size, nearest=False)
        allowed = np.ones(arr.shape[0], dtype=bool)
        classes = None
        if setting == 2:
            if not lab_path.is_file():
                raise FileNotFoundError(f"Setting II needs ground truth: {lab_path} is missing")
            gt, _ = read_volume_array(lab_path)
            if gt.shape != arr.shape:
                raise ValueError(f"{lab_path.name} shape {gt.shape} differs from its image {arr.shape}")
            allowed = ~excluded_slices(gt, exclude_organs, exclude_mode)
        if setting == 2 and setting2_labels == "gt":
            labels = resize_stack(gt.astype(np.int32), size, nearest=True)
            classes = np.array([c for c in np.unique(gt) if c > 0 and c not in set(exclude_organs)], dtype=np.int32)
        else:
            labels = resize_stack(volume_supervoxels(img_path, params), size, nearest=True)
        out.append(TrainingVolume(f"{fname}/{sid}", image, labels.astype(np.int32), allowed, classes))
    return out


class VolumeEpisodeSampler:
    """Abdominal episodes from nearby slices of one label (method doc 9.4), with augmentation (9.5).

    max_gap: support and query are `g` slices apart, g drawn uniformly from 1..max_gap (1 = the
        method's adjacent pairs). The pipeline's chain uses adjacent supports, but FoB from the
        annotated slice and a chain that skipped a slice see larger distances.
    end_fraction: share of episodes drawn at a label's ends (the first or last `max_gap` pairs of
        its slice run, where the mask shrinks towards its tip): where a chain must decide to stop.
    With max_gap 1 and end_fraction 0 the draws are exactly the method's (same random stream).
    """

    def __init__(self, volumes: Sequence[TrainingVolume], min_size: int = 200, augment: bool = True,
                 max_gap: int = 1, end_fraction: float = 0.0) -> None:
        if min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size}")
        if max_gap < 1:
            raise ValueError(f"max_gap must be >= 1, got {max_gap}")
        if not 0.0 <= end_fraction <= 1.0:
            raise ValueError(f"end_fraction must lie in [0, 1], got {end_fraction}")
        self.volumes = list(volumes)
        self.min_size = min_size
        self.augment = augment
        self.max_gap = int(max_gap)
        self.end_fraction = float(end_fraction)
        # Per gap g, per volume: {label id: array of admissible lower slice indices z (pair = z, z+g)}.
        self.pairs_by_gap: dict[int, list[dict[int, np.ndarray]]] = {
            g: [self._admissible_pairs(v, g) for v in self.volumes] for g in range(1, self.max_gap + 1)
        }
        self.pairs = self.pairs_by_gap[1]
        self.usable_by_gap = {g: [i for i, p in enumerate(ps) if p] for g, ps in self.pairs_by_gap.items()}
        self.usable = self.usable_by_gap[1]
        if not self.usable:
            raise ValueError(
                f"no episode possible: no label covers two adjacent allowed slices with >= {min_size} px"
            )

    def _admissible_pairs(self, vol: TrainingVolume, gap: int = 1) -> dict[int, np.ndarray]:
        z, n_ids = vol.labels.shape[0], int(vol.labels.max()) + 1
        if z <= gap:
            return {}
        # counts[z, k]: pixels of label k on slice z.
        flat = vol.labels.reshape(z, -1).astype(np.int64) + (np.arange(z, dtype=np.int64) * n_ids)[:, None]
        counts = np.bincount(flat.ravel(), minlength=z * n_ids).reshape(z, n_ids)
        counts[:, 0] = 0
        counts[~vol.allowed] = 0
        if vol.classes is not None:
            keep = np.zeros(n_ids, dtype=bool)
            keep[vol.classes[vol.classes < n_ids]] = True
            counts[:, ~keep] = 0
        a, b = counts[:-gap], counts[gap:]
        ok = (a > 0) & (b > 0) & (np.maximum(a, b) >= self.min_size)
        return {int(k): np.nonzero(ok[:, k])[0] for k in np.nonzero(ok.any(0))[0]}

    def sample(self, rng: np.random.Generator) -> Episode:
        gap = 1
        if self.max_gap > 1:
            gap = int(rng.integers(1, self.max_gap + 1))
            if not self.usable_by_gap[gap]:
                gap = 1
        usable, by_vol = self.usable_by_gap[gap], self.pairs_by_gap[gap]
        vi = usable[int(rng.integers(len(usable)))]
        vol, pairs = self.volumes[vi], by_vol[vi]
        ids = sorted(pairs)
        k = ids[int(rng.integers(len(ids)))]
        cand = pairs[k]
        if self.end_fraction > 0 and rng.random() < self.end_fraction and len(cand) > 2 * self.max_gap:
            # The label's ends: the pairs nearest the first and last slice it shows.
            cand = np.concatenate([cand[: self.max_gap], cand[-self.max_gap :]])
        z = int(cand[int(rng.integers(len(cand)))])
        zs, zq = (z, z + gap) if rng.random() < 0.5 else (z + gap, z)
        s_img, q_img = vol.image[zs], vol.image[zq]
        s_msk = (vol.labels[zs] == k).astype(np.uint8)
        q_msk = (vol.labels[zq] == k).astype(np.uint8)
        if self.augment:
            s_img, s_msk, q_img, q_msk = augment_pair(s_img, s_msk, q_img, q_msk, rng)
        return Episode(
            s_img.astype(np.float32), s_msk, q_img.astype(np.float32), q_msk,
            {"volume": vol.name, "label": k, "support_slice": zs, "query_slice": zq, "gap": gap},
        )


@dataclass
class TrainingImage:
    """One 2-D training image: image (S, S, 3) float32 [0, 1]; labels (S, S) int32 SLIC ids from 1."""

    name: str
    image: np.ndarray
    labels: np.ndarray


def load_training_images(
    folders: Sequence[str | Path], size: int = 256, include_ids: Sequence[str] | None = None, progress: bool = True
) -> list[TrainingImage]:
    """RGB images with their SLIC pseudo-labels (5 segments, compactness 15, on the full-resolution image)."""
    from PIL import Image
    from tqdm import tqdm

    jobs = [j for f in folders for j in find_skin_images(f) if include_ids is None or j[0] in set(include_ids)]
    if not jobs:
        raise ValueError("no RGB training images found in " + ", ".join(map(str, folders)))
    out = []
    for sid, img_path, _ in tqdm(jobs, desc="pseudo-labels", unit="img", disable=not progress):
        with Image.open(img_path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        labels = image_superpixels(img_path)
        out.append(
            TrainingImage(
                sid,
                cv2.resize(rgb, (size, size), interpolation=cv2.INTER_LINEAR),
                cv2.resize(labels, (size, size), interpolation=cv2.INTER_NEAREST).astype(np.int32),
            )
        )
    return out


class SkinEpisodeSampler:
    """Skin Setting I episodes (9.4): one image, one SLIC segment, two independent augmentations;
    masks eroded by a 3x3 minimum filter."""

    def __init__(self, images: Sequence[TrainingImage], min_size: int = 200) -> None:
        self.images = list(images)
        self.min_size = min_size
        if not self.images:
            raise ValueError("no training images")

    def sample(self, rng: np.random.Generator, max_tries: int = 100) -> Episode:
        for _ in range(max_tries):
            item = self.images[int(rng.integers(len(self.images)))]
            ids = np.unique(item.labels)
            k = int(ids[int(rng.integers(len(ids)))])
            mask = ndi.minimum_filter((item.labels == k).astype(np.uint8), size=3)
            s_img, s_msk = skin_transform(item.image, mask, rng)
            q_img, q_msk = skin_transform(item.image, mask, rng)
            if max(s_msk.sum(), q_msk.sum()) >= self.min_size and s_msk.any() and q_msk.any():
                return Episode(s_img, s_msk, q_img, q_msk, {"image": item.name, "label": k})
        raise ValueError(f"no skin episode with a segment of >= {self.min_size} px after {max_tries} tries")


class MixedSampler:
    """Draws from several samplers (e.g. MR and CT volumes, or volumes and skin images) in turn, at random."""

    def __init__(self, samplers: Sequence[Callable[[np.random.Generator], Episode]]) -> None:
        self.samplers = list(samplers)

    def sample(self, rng: np.random.Generator) -> Episode:
        return self.samplers[int(rng.integers(len(self.samplers)))](rng)
