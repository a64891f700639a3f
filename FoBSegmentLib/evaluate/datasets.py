"""The one catalogue of datasets and organs: names, folders under the shared data, label values,
case listing and the file finders / readers that training and evaluation share.

Folders (`../shared/data`, FOB_DATA overrides; see its README.md):
- volume datasets hold `image_<id>.nii.gz` and `label_<id>.nii.gz` on the same grid, labels
  `ORGANS` (1 liver, 2 right kidney, 3 left kidney, 4 spleen);
- image datasets hold `<id>.jpg|png` RGB dermoscopy images and `<id>_mask.png` (0 / 255 lesion).

Arrays read here are (z, y, x) = (k, j, i) as SimpleITK returns them. Nothing here imports torch or
the training code: evaluation, training and the benchmark all import this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from FoBSegmentLib.paths import shared_data_dir

# Short name -> folder under the shared data.
DATASETS = {"chaos": "chaos_mr_t2spir", "synapse": "synapse_ct", "isic": "isic", "ph2": "ph2"}
DATASET_TITLES = {
    "chaos": "CHAOS MR T2-SPIR",
    "synapse": "Synapse CT",
    "isic": "ISIC dermoscopy",
    "ph2": "PH2 dermoscopy",
}
VOLUME_DATASETS = ("chaos", "synapse")
IMAGE_DATASETS = ("isic", "ph2")
# Label value -> organ name, the same in every abdominal volume dataset.
ORGANS = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
ORGAN_LABELS = {name: value for value, name in ORGANS.items()}

_IMAGE_RE = re.compile(r"^image_(\d+)\.(nii\.gz|nii|nrrd|mha)$")


def dataset_dir(dataset: str) -> Path:
    """The folder of a named dataset (`DATASETS`) under the shared data; ValueError for other names."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    return shared_data_dir() / DATASETS[dataset]


def find_volume_pairs(folder: str | Path) -> list[tuple[str, Path, Path]]:
    """(id, image path, label path) of `image_<id>.*` files sorted by the integer id (the lineage order).

    The label path is returned whether or not it exists; callers that need labels check it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {folder}")
    found = []
    for p in folder.iterdir():
        m = _IMAGE_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), m.group(1), p, folder / p.name.replace("image_", "label_", 1)))
    found.sort()
    return [(sid, img, lab) for _, sid, img, lab in found]


def find_skin_images(folder: str | Path) -> list[tuple[str, Path, Path]]:
    """(id, image path, mask path) of RGB images `<id>.jpg|png` (not `*_mask.png`), sorted by id."""
    from FoBSegmentLib.io.volumes import list_2d_images

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {folder}")
    return [(p.stem, p, folder / f"{p.stem}_mask.png") for p in list_2d_images(folder)]


def folder_kind(folder: str | Path) -> str:
    """'volumes' or 'images' (what a data folder holds); ValueError when it holds neither."""
    if find_volume_pairs(folder):
        return "volumes"
    if find_skin_images(folder):
        return "images"
    raise ValueError(f"{folder} holds neither image_<id>.nii.gz volumes nor RGB .jpg/.png images")


@dataclass(frozen=True)
class Case:
    """One volume of a dataset: image and reference label files (same grid)."""

    dataset: str
    case_id: str
    image: Path
    label: Path


def list_cases(dataset: str, folder: Path | None = None, ids: Iterable[str] | None = None) -> list[Case]:
    """The image / label pairs of a volume dataset (`VOLUME_DATASETS`), sorted by integer id; only
    cases whose label file exists.

    folder: read this folder instead of the dataset's own; ids: keep only these ids (strings),
    ValueError names any id that is not there.
    """
    if dataset not in VOLUME_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {', '.join(VOLUME_DATASETS)}")
    root = Path(folder) if folder is not None else dataset_dir(dataset)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder for {dataset} not found: {root}")
    found = {sid: Case(dataset, sid, img, lab) for sid, img, lab in find_volume_pairs(root) if lab.is_file()}
    if not found:
        raise FileNotFoundError(f"no image_<id>.nii.gz / label_<id>.nii.gz pairs in {root}")
    order = list(found)
    if ids is not None:
        wanted = [str(i) for i in ids]
        missing = [i for i in wanted if i not in found]
        if missing:
            raise ValueError(f"{dataset}: no case {', '.join(missing)} (cases: {', '.join(order)})")
        order = [c for c in order if c in wanted]
    return [found[c] for c in order]


def read_volume_array(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(Z, Y, X) array and (z, y, x) spacing in mm of a volume file."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim != 3:
        raise ValueError(f"{path.name} is not a 3-D volume (array shape {arr.shape})")
    sx, sy, sz = img.GetSpacing()
    return arr, (sz, sy, sx)


def normalise_volume(arr: np.ndarray) -> np.ndarray:
    """Raw voxels -> float32 [0, 1] with the engine's presets (CT window or MR percentile clip)."""
    from FoBSegmentLib.io.intensity import guess_modality, normalize

    return normalize(arr, guess_modality(arr).modality)


__all__ = [
    "DATASETS",
    "DATASET_TITLES",
    "IMAGE_DATASETS",
    "ORGANS",
    "ORGAN_LABELS",
    "VOLUME_DATASETS",
    "Case",
    "dataset_dir",
    "find_skin_images",
    "find_volume_pairs",
    "folder_kind",
    "list_cases",
    "normalise_volume",
    "read_volume_array",
]
