"""`fob segment` and `fob demo` end to end on real files: same-volume MR and CT, cross-patient MR,
a DICOM series, ISIC dermoscopy, the markups round trip, and one test per kind of bad input.

The prompt source is `neighbour` (no learning) and the segmenter GrabCut, so the Dice floors hold
without any trained model or downloaded weights; each floor sits a little below the measured value,
which is printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import dice

from FoBSegmentLib import cli
from FoBSegmentLib.io import volumes

DEMO_FLOOR = 0.69  # CHAOS MR 39 liver + grabcut: measured 0.735 (neighbour, and hybrid with the lite model)


def run_fob(args: list[str], capsys) -> tuple[int, str, str]:
    rc = cli.main(["segment", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    return rc, out, err


def report(capsys, text: str) -> None:
    """Print measured values to the test output (outside capsys, which captures the CLI's output)."""
    with capsys.disabled():
        print(text)


def one_slice_support(label_path: Path, organ: int, tmp: Path, reference=None, name="support.nii.gz"):
    """Write a support mask holding `organ` (value `organ`) on the middle slice of its range only."""
    img = reference
    lab = volumes.read_label(label_path, img)
    ref = lab.array == organ
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    middle = int(zs[len(zs) // 2])
    sup = np.zeros(ref.shape, np.uint8)
    sup[middle][ref[middle]] = organ
    path = volumes.write_label(tmp / name, sup, lab.geometry)
    return path, ref, middle


def same_geometry(out: Path, image: Path | str) -> None:
    o = sitk.ReadImage(str(out))
    i = volumes.read_volume(image).geometry
    assert o.GetSize() == i.size
    assert np.allclose(o.GetSpacing(), i.spacing, atol=1e-6)
    assert np.allclose(o.GetOrigin(), i.origin, atol=1e-4)
    assert np.allclose(o.GetDirection(), i.direction, atol=1e-6)


# --- end to end -------------------------------------------------------------------------------


def test_chaos_mr_same_volume_and_markups_round_trip(tmp_path: Path, data_dir: Path, capsys) -> None:
    image = data_dir / "chaos_mr_t2spir" / "image_8.nii.gz"
    support, ref, middle = one_slice_support(data_dir / "chaos_mr_t2spir" / "label_8.nii.gz", 4, tmp_path)
    out, prompts = tmp_path / "spleen.nii.gz", tmp_path / "prompts.mrk.json"
    rc, so, se = run_fob([image, "-o", out, "--support-mask", support, "--segmenter", "grabcut",
                          "--prompts-from", "neighbour", "--prompts-out", prompts], capsys)
    assert rc == 0, se
    same_geometry(out, image)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert set(np.unique(mask)) == {0, 1}
    d = dice(mask, ref)
    report(capsys, f"\nCHAOS MR 8 spleen, same volume, one slice {middle}: Dice {d:.3f} (neighbour + grabcut)\n{se}")
    assert d >= 0.87  # measured 0.914
    assert "modality MR" in se and "neighbour" in se
    # Round trip: the prompts file read back gives the same mask.
    out2 = tmp_path / "spleen_again.nii.gz"
    rc, so, se = run_fob([image, "-o", out2, "--support-mask", support, "--segmenter", "grabcut",
                          "--prompts-in", prompts], capsys)
    assert rc == 0, se
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out2))), mask)


def test_synapse_ct_same_volume_with_window_and_label_value(tmp_path: Path, data_dir: Path, capsys) -> None:
    image = data_dir / "synapse_ct" / "image_5.nii.gz"
    support, ref, middle = one_slice_support(data_dir / "synapse_ct" / "label_5.nii.gz", 3, tmp_path)
    out = tmp_path / "lk.nrrd"
    rc, so, se = run_fob([image, "-o", out, "--support-mask", support, "--segmenter", "grabcut",
                          "--prompts-from", "neighbour", "--window", "40,400", "--modality", "ct",
                          "--label-value", "3", "--largest-component"], capsys)
    assert rc == 0, se
    same_geometry(out, image)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert set(np.unique(mask)) == {0, 3}
    d = dice(mask == 3, ref)
    report(capsys, f"\nSynapse CT 5 left kidney, same volume, one slice {middle}: Dice {d:.3f} (neighbour + grabcut)")
    assert d >= 0.87  # measured 0.914


def test_chaos_mr_cross_patient(tmp_path: Path, data_dir: Path, capsys) -> None:
    # Support: patient 8's image and full label map (label 3, left kidney); query: patient 5.
    image = data_dir / "chaos_mr_t2spir" / "image_5.nii.gz"
    ref = volumes.read_label(data_dir / "chaos_mr_t2spir" / "label_5.nii.gz").array == 3
    out = tmp_path / "lk.nii.gz"
    rc, so, se = run_fob([image, "-o", out, "--support-image", data_dir / "chaos_mr_t2spir" / "image_8.nii.gz",
                          "--support-mask", data_dir / "chaos_mr_t2spir" / "label_8.nii.gz", "--support-label", "3",
                          "--segmenter", "grabcut", "--prompts-from", "neighbour"], capsys)
    assert rc == 0, se
    same_geometry(out, image)
    d = dice(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), ref)
    report(capsys, f"\nCHAOS MR cross-patient (support 8, query 5) left kidney: Dice {d:.3f} (neighbour + grabcut)\n{se}")
    assert d >= 0.78  # measured 0.843 (a pass from each of the 3 support slices; 0.830 from one pass)


def test_dicom_series(tmp_path: Path, data_dir: Path, capsys) -> None:
    series = data_dir / "dicom_series" / "chaos_mr_t2spir_2"
    img = volumes.read_volume(series)
    support, ref, middle = one_slice_support(
        data_dir / "dicom_series" / "chaos_mr_t2spir_2_label.nii.gz", 2, tmp_path, reference=img
    )
    out = tmp_path / "rk.seg.nrrd"
    rc, so, se = run_fob([series, "-o", out, "--support-mask", support, "--segmenter", "grabcut",
                          "--prompts-from", "neighbour"], capsys)
    assert rc == 0, se
    same_geometry(out, series)
    d = dice(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), ref)
    report(capsys, f"\nDICOM series (CHAOS 2) right kidney, one slice {middle}: Dice {d:.3f}\n{se}")
    assert "DICOM Modality tag says MR" in se
    assert d >= 0.74  # measured 0.781


def test_isic_cross_image_and_same_image(tmp_path: Path, data_dir: Path, capsys) -> None:
    isic = data_dir / "isic"
    out = tmp_path / "lesion.png"
    rc, so, se = run_fob([isic / "ISIC_0013085.jpg", "-o", out, "--support-image", isic / "ISIC_0013948.jpg",
                          "--support-mask", isic / "ISIC_0013948_mask.png", "--segmenter", "grabcut",
                          "--prompts-from", "neighbour"], capsys)
    assert rc == 0, se
    from PIL import Image

    mask = np.asarray(Image.open(out))
    ref = np.asarray(Image.open(isic / "ISIC_0013085_mask.png")) > 127
    assert mask.shape == ref.shape and set(np.unique(mask)) <= {0, 255}
    d = dice(mask > 0, ref)
    report(capsys, f"\nISIC 0013085 from support ISIC 0013948: Dice {d:.3f} (dermoscopy colour pipeline + grabcut)\n{se}")
    assert "modality RGB" in se
    # measured 0.747; 0.841 with the ring around the located lesion itself: the ring around its uncertain
    # band (propagation/skin.py, lesion_extent) leaves GrabCut room to grow into this image's textured skin
    assert d >= 0.70
    # Same image as its own support: the annotation is the answer, written unchanged.
    out2 = tmp_path / "same.png"
    ref = np.asarray(Image.open(isic / "ISIC_0012388_mask.png")) > 127
    rc, so, se = run_fob([isic / "ISIC_0012388.jpg", "-o", out2, "--support-mask", isic / "ISIC_0012388_mask.png",
                          "--segmenter", "grabcut", "--prompts-from", "neighbour"], capsys)
    assert rc == 0, se
    assert np.array_equal(np.asarray(Image.open(out2)) > 0, ref)


def test_absent_slices_end_the_organ_where_marked(tmp_path: Path, data_dir: Path, capsys) -> None:
    """CHAOS MR 39's left kidney from its middle slice: the chain runs past the kidney's lower end onto
    the spleen. Marking the first slice past each end absent (--absent-slices) keeps the result inside
    them, and the prompts file written with them replays to the same mask."""
    image = data_dir / "chaos_mr_t2spir" / "image_39.nii.gz"
    support, ref, _ = one_slice_support(data_dir / "chaos_mr_t2spir" / "label_39.nii.gz", 3, tmp_path)
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    absent = f"{zs[0] - 1},{zs[-1] + 1}"
    common = ["--support-mask", support, "--prompts-from", "neighbour", "--segmenter", "graphcut"]
    rc, _, se = run_fob([image, "-o", tmp_path / "free.nii.gz", *common], capsys)
    assert rc == 0, se
    free = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "free.nii.gz"))) > 0
    prompts = tmp_path / "p.mrk.json"
    rc, _, se = run_fob([image, "-o", tmp_path / "ends.nii.gz", *common, "--absent-slices", absent,
                         "--prompts-out", prompts], capsys)
    assert rc == 0, se
    ends = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ends.nii.gz"))) > 0
    d_free, d_ends = dice(free, ref), dice(ends, ref)
    report(capsys, f"\nCHAOS MR 39 left kidney (slices {zs[0]}..{zs[-1]}), one slice: Dice {d_free:.3f}, "
                   f"with --absent-slices {absent}: {d_ends:.3f}")
    beyond = np.ones(ref.shape[0], bool)
    beyond[zs[0]:zs[-1] + 1] = False
    assert free[beyond].any()  # the case this test is about: the chain ran past an end
    assert not ends[beyond].any()
    assert d_ends >= d_free + 0.05  # measured 0.829 -> 0.920 (0.533 -> 0.889 before `moved_prior`)
    rc, _, se = run_fob([image, "-o", tmp_path / "again.nii.gz", *common, "--absent-slices", absent,
                         "--prompts-in", prompts], capsys)
    assert rc == 0, se
    again = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "again.nii.gz"))) > 0
    assert np.array_equal(again, ends)


@pytest.mark.parametrize("value, pattern", [
    ("12;x", "--absent-slices must be slice indices"),
    ("999", "--absent-slices slice 999 is out of bounds"),
    ("MIDDLE", "--absent-slices slice MIDDLE shows the organ"),
])
def test_bad_absent_slices(chaos, capsys, value: str, pattern: str) -> None:
    (chaos["dir"] / "out").mkdir()
    middle = str(np.flatnonzero(volumes.read_label(chaos["support"]).array.any(axis=(1, 2)))[0])
    expect_error([chaos["image"], "-o", chaos["out"], "--support-mask", chaos["support"],
                  "--absent-slices", value.replace("MIDDLE", middle)],
                 capsys, chaos["dir"], pattern.replace("MIDDLE", middle))


def test_bad_absent_slices_across_patients(chaos, capsys, data_dir: Path) -> None:
    (chaos["dir"] / "out").mkdir()
    expect_error([data_dir / "chaos_mr_t2spir" / "image_8.nii.gz", "-o", chaos["out"], "--support-image",
                  chaos["image"], "--support-mask", chaos["support"], "--absent-slices", "3"],
                 capsys, chaos["dir"], "--absent-slices only for a support in the image itself")


def test_ctrl_c_leaves_no_output(tmp_path: Path, data_dir: Path, capsys, monkeypatch) -> None:
    from FoBSegmentLib.segmenters.grabcut import GrabCutSegmenter

    image = data_dir / "chaos_mr_t2spir" / "image_8.nii.gz"
    support, _, _ = one_slice_support(data_dir / "chaos_mr_t2spir" / "label_8.nii.gz", 2, tmp_path)
    calls = {"n": 0}
    real = GrabCutSegmenter.segment

    def interrupted(self, image, prompts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, image, prompts)

    monkeypatch.setattr(GrabCutSegmenter, "segment", interrupted)
    out = tmp_path / "o.nii.gz"
    rc, so, se = run_fob([image, "-o", out, "--support-mask", support, "--segmenter", "grabcut",
                          "--prompts-from", "neighbour", "--prompts-out", tmp_path / "p.mrk.json"], capsys)
    assert rc == 130 and "cancelled" in se
    assert sorted(p.name for p in tmp_path.iterdir()) == ["support.nii.gz"]


# --- bad input: one test each ----------------------------------------------------------------


@pytest.fixture()
def chaos(tmp_path: Path, data_dir: Path) -> dict:
    image = data_dir / "chaos_mr_t2spir" / "image_2.nii.gz"
    support, _, _ = one_slice_support(data_dir / "chaos_mr_t2spir" / "label_2.nii.gz", 2, tmp_path)
    return {"image": image, "support": support, "out": tmp_path / "out" / "seg.nii.gz", "dir": tmp_path}


def expect_error(args: list, capsys, folder: Path, pattern: str) -> str:
    before = sorted(p.name for p in folder.rglob("*"))
    rc, so, se = run_fob(args + ["--segmenter", "grabcut", "--prompts-from", "neighbour"], capsys)
    assert rc == 2
    lines = [line for line in se.strip().splitlines() if line.startswith("fob: error:")]
    assert len(lines) == 1, se
    assert pattern in lines[0], lines[0]
    assert sorted(p.name for p in folder.rglob("*")) == before  # no partial output, no temp file
    report(capsys, f"\n{lines[0]}")
    return lines[0]


def test_bad_missing_file(chaos, capsys) -> None:
    (chaos["dir"] / "out").mkdir()
    expect_error([chaos["dir"] / "nope.nii.gz", "-o", chaos["out"], "--support-mask", chaos["support"]],
                 capsys, chaos["dir"], "not found")


def test_bad_corrupt_file(chaos, capsys) -> None:
    (chaos["dir"] / "out").mkdir()
    bad = chaos["dir"] / "corrupt.nii.gz"
    bad.write_bytes(chaos["image"].read_bytes()[:3000])  # a truncated real volume
    expect_error([bad, "-o", chaos["out"], "--support-mask", chaos["support"]], capsys, chaos["dir"], "cannot read")


def test_bad_empty_support_mask(chaos, capsys) -> None:
    (chaos["dir"] / "out").mkdir()
    img = volumes.read_volume(chaos["image"])
    empty = volumes.write_label(chaos["dir"] / "empty.nii.gz", np.zeros(img.geometry.array_shape, np.uint8), img.geometry)
    expect_error([chaos["image"], "-o", chaos["out"], "--support-mask", empty], capsys, chaos["dir"], "empty")


def test_bad_support_label_not_present(chaos, capsys) -> None:
    (chaos["dir"] / "out").mkdir()
    expect_error([chaos["image"], "-o", chaos["out"], "--support-mask", chaos["support"], "--support-label", "4"],
                 capsys, chaos["dir"], "--support-label 4 is not present")


def test_bad_geometry_mismatch(chaos, capsys) -> None:
    (chaos["dir"] / "out").mkdir()
    shifted = sitk.ReadImage(str(chaos["support"]))
    shifted.SetOrigin(tuple(v + 10.0 for v in shifted.GetOrigin()))  # same size, 10 mm off
    other = chaos["dir"] / "shifted.nii.gz"
    sitk.WriteImage(shifted, str(other))
    expect_error([chaos["image"], "-o", chaos["out"], "--support-mask", other], capsys, chaos["dir"], "geometry")


def test_a_support_mask_stored_in_another_orientation_is_turned_onto_the_image(chaos, capsys, data_dir: Path) -> None:
    # The DICOM series' label map with the NIfTI of the same series (slices stored the other way, the same
    # points) is accepted, said, and gives the NIfTI label's result; so does a support mask saved that way.
    dicom_label = data_dir / "dicom_series" / "chaos_mr_t2spir_2_label.nii.gz"
    turned = volumes.on_grid_of(volumes.read_volume(chaos["image"]), volumes.read_label(dicom_label))[0]
    assert np.array_equal(turned.array, volumes.read_label(data_dir / "chaos_mr_t2spir" / "label_2.nii.gz").array)
    flipped = chaos["dir"] / "support_head_first.nii.gz"
    sitk.WriteImage(sitk.Flip(sitk.ReadImage(str(chaos["support"])), [False, False, True]), str(flipped))
    outs = []
    for k, support in enumerate((chaos["support"], flipped)):
        outs.append(chaos["dir"] / f"out{k}.nii.gz")
        rc, _so, se = run_fob([chaos["image"], "-o", outs[-1], "--support-mask", support, "--segmenter", "graphcut",
                               "--prompts-from", "neighbour"], capsys)
        assert rc == 0, se
        assert ("is stored with its axes running LAI, its image's LAS" in se) == (k == 1), se
    got = [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in outs]
    assert got[0].any() and np.array_equal(*got)


def test_bad_4d_image(chaos, capsys) -> None:
    (chaos["dir"] / "out").mkdir()
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(chaos["image"])))
    four = chaos["dir"] / "four.nii.gz"
    vol = sitk.GetImageFromArray(arr[:, :32, :32])
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(four))  # a real 4D NIfTI (two time points)
    expect_error([four, "-o", chaos["out"], "--support-mask", chaos["support"]], capsys, chaos["dir"], "4D")


def test_bad_slice_range(chaos, capsys) -> None:
    (chaos["dir"] / "out").mkdir()
    expect_error([chaos["image"], "-o", chaos["out"], "--support-mask", chaos["support"], "--slices", "5:40"],
                 capsys, chaos["dir"], "out of bounds")


def test_bad_output_folder_missing(chaos, capsys) -> None:
    expect_error([chaos["image"], "-o", chaos["out"], "--support-mask", chaos["support"]],
                 capsys, chaos["dir"], "does not exist")


def test_bad_output_equals_input(chaos, capsys) -> None:
    before = chaos["support"].read_bytes()
    expect_error([chaos["image"], "-o", chaos["support"], "--support-mask", chaos["support"]],
                 capsys, chaos["dir"], "also an input")
    assert chaos["support"].read_bytes() == before


# --- the installed command and the demo -------------------------------------------------------


def test_fob_command_line_process(tmp_path: Path, chaos) -> None:
    """The real process: exit code and one-line message on stderr (not only main())."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run(
        [sys.executable, "-m", "FoBSegmentLib.cli", "segment", str(chaos["image"]), "-o", str(chaos["out"]),
         "--support-mask", str(chaos["support"])],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fob: error: output folder")


def test_fob_demo(tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "demo-out"
    rc = cli.main(["demo", "-o", str(out_dir), "--quiet"])
    so, se = capsys.readouterr()
    assert rc == 0, se
    assert sorted(p.name for p in out_dir.iterdir()) == ["prompts.mrk.json", "segmentation.nii.gz", "support_mask.nii.gz"]
    line = [ln for ln in so.splitlines() if ln.startswith("Dice ")][-1]
    d = float(line.split()[1])
    report(capsys, f"\nfob demo: {line}")
    source = line.split("prompts: ")[1].split(",")[0]  # the demo says which prompt source it used
    assert source in ("neighbour", "hybrid", "fob")
    # Measured 0.735 both with neighbour prompts (no model) and hybrid (the shipped lite model).
    assert d >= DEMO_FLOOR


def test_axial_axis_found_whatever_the_array_order(tmp_path: Path, data_dir: Path, capsys) -> None:
    """The same patient with its voxel axes permuted (physical space unchanged): the axial axis is
    found from the direction matrix, the result keeps the permuted grid and matches the reference."""
    src = sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / "image_8.nii.gz"))
    lab = sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / "label_8.nii.gz"))
    order = [2, 0, 1]  # new i = old k (superior), new j = old i, new k = old j
    image, label = tmp_path / "perm.nii.gz", tmp_path / "perm_label.nii.gz"
    sitk.WriteImage(sitk.PermuteAxes(src, order), str(image))
    sitk.WriteImage(sitk.PermuteAxes(lab, order), str(label))
    vol = volumes.read_volume(image)
    from FoBSegmentLib.io.coords import axial_axis

    assert axial_axis(vol.geometry) == 2  # slices along i of the [k, j, i] array
    ref = volumes.read_label(label, vol).array == 4
    zs = np.flatnonzero(ref.any(axis=(0, 1)))
    middle = int(zs[len(zs) // 2])
    sup = np.zeros(ref.shape, np.uint8)
    sup[:, :, middle] = ref[:, :, middle]
    support = volumes.write_label(tmp_path / "sup.nii.gz", sup, vol.geometry)
    out = tmp_path / "o.nii.gz"
    rc, so, se = run_fob([image, "-o", out, "--support-mask", support, "--segmenter", "grabcut",
                          "--prompts-from", "neighbour"], capsys)
    assert rc == 0, se
    same_geometry(out, image)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).astype(bool)
    d = dice(mask, ref)
    report(capsys, f"\nCHAOS MR 8 spleen, axes permuted (axial = array axis 2): Dice {d:.3f}")
    assert d >= 0.87  # the unpermuted volume measures 0.914


def test_oblique_cardiac_stack_sliced_along_acquisition_axis(tmp_path: Path, data_dir: Path, capsys) -> None:
    """MS-CMRSeg bSSFP: an oblique short-axis stack whose axial axis (by direction) is in-plane;
    the default slices along the thick acquisition axis and keeps the oblique geometry."""
    image = data_dir / "cmr_bssfp" / "image_1.nii.gz"
    support, ref, middle = one_slice_support(data_dir / "cmr_bssfp" / "label_1.nii.gz", 2, tmp_path)
    out = tmp_path / "lv.nii.gz"
    rc, so, se = run_fob([image, "-o", out, "--support-mask", support, "--segmenter", "grabcut",
                          "--prompts-from", "neighbour"], capsys)
    assert rc == 0, se
    assert "acquisition axis" in se and "not the axial one" in se
    same_geometry(out, image)
    d = dice(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), ref)
    report(capsys, f"\nCMR bSSFP 1 LV blood pool, one slice {middle}: Dice {d:.3f} (neighbour + grabcut)")
    assert d >= 0.62  # measured 0.685
