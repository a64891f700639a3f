"""io/volumes.py on the real files of ../shared/data: formats, geometry, labels, atomic writes, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FoBSegmentLib.io import volumes
from FoBSegmentLib.io.coords import axial_axis


def test_nifti_volume_and_label_share_geometry(data_dir: Path) -> None:
    img = volumes.read_volume(data_dir / "chaos_mr_t2spir" / "image_2.nii.gz")
    lab = volumes.read_label(data_dir / "chaos_mr_t2spir" / "label_2.nii.gz", img)
    ref = sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / "image_2.nii.gz"))
    assert img.array.dtype == np.float32 and img.array.shape == (31, 256, 256)
    assert np.array_equal(img.array, sitk.GetArrayFromImage(ref).astype(np.float32))
    assert img.geometry.size == tuple(ref.GetSize())
    assert np.allclose(img.geometry.origin, ref.GetOrigin()) and np.allclose(img.geometry.direction, ref.GetDirection())
    assert sorted(np.unique(lab.array).tolist()) == [0, 1, 2, 3, 4]
    assert not img.is_2d and not img.is_rgb and img.modality_hint is None


def test_dicom_series_folder(data_dir: Path) -> None:
    series = data_dir / "dicom_series" / "chaos_mr_t2spir_2"
    img = volumes.read_volume(series)
    lab = volumes.read_label(data_dir / "dicom_series" / "chaos_mr_t2spir_2_label.nii.gz", img)
    assert img.array.shape == (31, 256, 256)
    assert img.modality_hint == "mr" and "31 files" in img.description
    # The series is the NIfTI volume 2 with the slice axis flipped (see the data README).
    nifti = volumes.read_volume(data_dir / "chaos_mr_t2spir" / "image_2.nii.gz")
    assert np.array_equal(img.array, nifti.array[::-1])
    assert axial_axis(img.geometry) == 0
    assert lab.array.shape == img.array.shape


def test_isic_rgb_image_and_mask(data_dir: Path) -> None:
    img = volumes.read_volume(data_dir / "isic" / "ISIC_0012388.jpg")
    mask = volumes.read_label(data_dir / "isic" / "ISIC_0012388_mask.png", img)
    assert img.is_rgb and img.is_2d and img.modality_hint == "rgb"
    assert img.array.shape == (340, 512, 3) and img.grid_array.shape == (1, 340, 512, 3)
    assert img.geometry.size == (512, 340, 1)
    assert mask.array.shape == (1, 340, 512) and set(np.unique(mask.array)) == {0, 255}


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii"])
def test_other_formats_round_trip(tmp_path: Path, data_dir: Path, suffix: str) -> None:
    src = sitk.ReadImage(str(data_dir / "synapse_ct" / "image_1.nii.gz"))
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(src, str(path))
    img = volumes.read_volume(path)
    assert np.array_equal(img.array, sitk.GetArrayFromImage(src).astype(np.float32))
    assert img.geometry.same_grid(volumes.read_volume(data_dir / "synapse_ct" / "image_1.nii.gz").geometry)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd", ".mha"])
def test_write_label_keeps_exact_geometry(tmp_path: Path, data_dir: Path, suffix: str) -> None:
    img = volumes.read_volume(data_dir / "dicom_series" / "chaos_mr_t2spir_2")  # oblique-ish, flipped axis
    lab = (volumes.read_label(data_dir / "dicom_series" / "chaos_mr_t2spir_2_label.nii.gz", img).array == 1)
    out = volumes.write_label(tmp_path / f"liver{suffix}", lab.astype(np.uint8), img.geometry)
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == img.geometry.size
    assert np.allclose(back.GetSpacing(), img.geometry.spacing, atol=1e-6)
    assert np.allclose(back.GetOrigin(), img.geometry.origin, atol=1e-4)
    assert np.allclose(back.GetDirection(), img.geometry.direction, atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(back), lab.astype(np.uint8))
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_write_label_png_for_2d(tmp_path: Path, data_dir: Path) -> None:
    img = volumes.read_volume(data_dir / "isic" / "ISIC_0012903.jpg")
    mask = volumes.read_label(data_dir / "isic" / "ISIC_0012903_mask.png", img)
    out = volumes.write_label(tmp_path / "m.png", mask.array.astype(np.uint8), img.geometry)
    assert np.array_equal(volumes.read_label(out, img).array, mask.array)


def test_write_label_failure_leaves_nothing(tmp_path: Path, data_dir: Path) -> None:
    img = volumes.read_volume(data_dir / "chaos_mr_t2spir" / "image_2.nii.gz")
    with pytest.raises(ValueError, match="does not match the grid"):
        volumes.write_label(tmp_path / "x.nii.gz", np.zeros((3, 4, 5), np.uint8), img.geometry)
    with pytest.raises(ValueError, match="one-slice"):
        volumes.write_label(tmp_path / "x.png", np.zeros(img.geometry.array_shape, np.uint8), img.geometry)
    assert list(tmp_path.iterdir()) == []


def test_missing_and_corrupt_files(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        volumes.read_volume(tmp_path / "nope.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        volumes.read_volume(bad)
    src = data_dir / "chaos_mr_t2spir" / "image_2.nii.gz"
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(src.read_bytes()[:3000])  # ITK alone would zero-fill this silently
    with pytest.raises(ValueError, match="truncated"):
        volumes.read_volume(truncated)
    raw = tmp_path / "cut.nii"
    sitk.WriteImage(sitk.ReadImage(str(src)), str(raw))
    raw.write_bytes(raw.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="truncated|cannot read"):
        volumes.read_volume(raw)
    badjpg = tmp_path / "bad.jpg"
    badjpg.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match="cannot read"):
        volumes.read_volume(badjpg)
    empty_dir = tmp_path / "dicom"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="DICOM"):
        volumes.read_volume(empty_dir)


def test_4d_image_rejected(tmp_path: Path, data_dir: Path) -> None:
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / "image_2.nii.gz")))
    vol = sitk.GetImageFromArray(arr[:8, :64, :64])
    path = tmp_path / "four.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([vol, vol, vol]), str(path))  # a real 4D NIfTI
    assert sitk.ReadImage(str(path)).GetDimension() == 4
    with pytest.raises(ValueError, match="4D"):
        volumes.read_volume(path)


def test_geometry_mismatch_message(data_dir: Path) -> None:
    img = volumes.read_volume(data_dir / "chaos_mr_t2spir" / "image_2.nii.gz")
    with pytest.raises(ValueError, match="size"):
        volumes.read_label(data_dir / "chaos_mr_t2spir" / "label_3.nii.gz", img)
    # Same size, different origin: the DICOM label against the NIfTI image.
    with pytest.raises(ValueError, match="geometry"):
        volumes.read_label(data_dir / "dicom_series" / "chaos_mr_t2spir_2_label.nii.gz", img)


def test_check_output_path(tmp_path: Path, data_dir: Path) -> None:
    image = data_dir / "chaos_mr_t2spir" / "image_2.nii.gz"
    assert volumes.check_output_path(tmp_path / "o.nii.gz", [image]) == tmp_path / "o.nii.gz"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        volumes.check_output_path(tmp_path / "missing" / "o.nii.gz", [image])
    with pytest.raises(ValueError, match="also an input"):
        volumes.check_output_path(image, [image])
    rel = Path(os.path.relpath(image))
    with pytest.raises(ValueError, match="also an input"):
        volumes.check_output_path(rel, [image.resolve()])
    with pytest.raises(ValueError, match="extension"):
        volumes.check_output_path(tmp_path / "o.txt", [image])
    with pytest.raises(ValueError, match="inside the input DICOM"):
        volumes.check_output_path(data_dir / "dicom_series" / "chaos_mr_t2spir_2" / "o.nii.gz",
                                  [data_dir / "dicom_series" / "chaos_mr_t2spir_2"])
