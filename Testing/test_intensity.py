"""io/intensity.py: presets and the modality guess on real CT, MR and dermoscopy data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from FoBSegmentLib.io import intensity, volumes


def test_guess_modality_on_real_data(data_dir: Path) -> None:
    ct = volumes.read_volume(data_dir / "synapse_ct" / "image_1.nii.gz")
    mr = volumes.read_volume(data_dir / "chaos_mr_t2spir" / "image_5.nii.gz")
    cmr = volumes.read_volume(data_dir / "cmr_bssfp" / "image_1.nii.gz")
    rgb = volumes.read_volume(data_dir / "isic" / "ISIC_0012388.jpg")
    dcm = volumes.read_volume(data_dir / "dicom_series" / "chaos_mr_t2spir_2")
    g_ct = intensity.guess_modality(ct.array)
    assert g_ct.modality == "ct" and "below -50" in g_ct.reason
    assert intensity.guess_modality(mr.array).modality == "mr"
    assert intensity.guess_modality(cmr.array).modality == "mr"
    assert intensity.guess_modality(rgb.array, rgb.modality_hint, rgb.is_rgb).modality == "rgb"
    g_dcm = intensity.guess_modality(dcm.array, dcm.modality_hint)
    assert g_dcm.modality == "mr" and "DICOM" in g_dcm.reason
    print(f"\nCT: {g_ct.reason}\nMR: {intensity.guess_modality(mr.array).reason}")


def test_ct_window() -> None:
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    assert np.allclose(intensity.ct_window(hu), [0.0, 0.0, 0.5, 1.0, 1.0])
    assert np.allclose(intensity.ct_window(hu, -600, 1500), np.clip((hu + 1350) / 1500, 0, 1))
    assert intensity.normalize(hu, "ct", (40, 400)).dtype == np.float32


def test_mr_clip_on_real_volume(data_dir: Path) -> None:
    arr = volumes.read_volume(data_dir / "chaos_mr_t2spir" / "image_5.nii.gz").array
    out = intensity.mr_clip(arr)
    assert out.shape == arr.shape and out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    # 0.5 % of voxels sit at each clipped end, not more (ties at 0 in the MR background allowed).
    assert np.mean(out == 1.0) <= 0.006
    assert np.allclose(intensity.mr_clip(np.full((3, 4), 7.0)), 0.0)


def test_rgb_to_float(data_dir: Path) -> None:
    rgb = volumes.read_volume(data_dir / "isic" / "ISIC_0012388.jpg").array
    out = intensity.normalize(rgb, "rgb")
    assert out.shape == rgb.shape and np.allclose(out * 255, rgb)


@pytest.mark.parametrize("text", ["40", "a,b", "40,0", "40,-3", "1,2,3"])
def test_parse_window_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="window"):
        intensity.parse_window(text)


def test_parse_window_and_misuse() -> None:
    assert intensity.parse_window(" -600, 1500") == (-600.0, 1500.0)
    with pytest.raises(ValueError, match="CT only"):
        intensity.normalize(np.zeros((2, 2)), "mr", (40, 400))
    with pytest.raises(ValueError, match="unknown modality"):
        intensity.normalize(np.zeros((2, 2)), "pet")
