"""The defects of issue 15 ("tried as a new user would"), one CLI test (or a few) each, on real files.

The project's rule for bad input: ONE line `fob: error: ...` naming what the user typed, a non-zero
exit code, no traceback, no partial output (nor temporary file). Weight-free throughout (neighbour
prompts, graph cut), so no model download is needed; a run takes about a second.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FoBSegmentLib import atomic, cli
from FoBSegmentLib.io import volumes

REPO = Path(__file__).resolve().parent.parent
FAST = ["--segmenter", "graphcut", "--prompts-from", "neighbour", "--quiet"]
ITK_NOISE = ("Traceback", "WARNING", ".cxx", "sitk::", "itk::", "SimpleITK", "ImageIO", "Exception thrown")


def fob(args: list, capfd) -> tuple[int, str, str]:
    """`fob ARGS` in-process; capfd (not capsys) also sees what C++ code (ITK) prints on fd 2."""
    rc = cli.main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def expect_error(args: list, capfd, folder: Path, *fragments: str) -> str:
    """Run `fob ARGS`, expect exit 2 and exactly one stderr line, `fob: error: ...` holding every
    fragment; nothing may appear in (or vanish from) `folder`. Returns the line."""
    before = listing(folder)
    rc, out, err = fob(args, capfd)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("fob: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert listing(folder) == before  # no output, no temporary file
    return lines[0]


@pytest.fixture(scope="module")
def case(tmp_path_factory, data_dir: Path) -> dict:
    """CHAOS MR patient 2, right kidney: a one-slice support mask and a prompts file made by
    `fob segment --prompts-out` (the file a user would start editing from)."""
    folder = tmp_path_factory.mktemp("case")
    image = data_dir / "chaos_mr_t2spir" / "image_2.nii.gz"
    label = volumes.read_label(data_dir / "chaos_mr_t2spir" / "label_2.nii.gz")
    organ = label.array == 2
    zs = np.flatnonzero(organ.any(axis=(1, 2)))
    middle = int(zs[len(zs) // 2])
    support = np.zeros(organ.shape, np.uint8)
    support[middle][organ[middle]] = 1
    support_path = volumes.write_label(folder / "support.nii.gz", support, label.geometry)
    prompts = folder / "prompts.mrk.json"
    rc = cli.main(["segment", str(image), "-o", str(folder / "seed.nii.gz"), "--support-mask", str(support_path),
                   "--prompts-out", str(prompts), *FAST])
    assert rc == 0 and prompts.exists()
    return {"image": image, "support": support_path, "prompts": prompts}


def segment_args(case: dict, out: Path, *extra) -> list:
    return ["segment", case["image"], "-o", out, "--support-mask", case["support"], *FAST, *extra]


# --- 1. outputs get the umask's mode, not mkstemp's 0600 ------------------------------------------


@pytest.fixture()
def umask():
    """Set the process umask for one test and restore it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)],
                         ids=["umask022", "umask077", "umask002"])
def test_outputs_get_the_umask_mode(tmp_path: Path, case: dict, capfd, umask, mask: int, expected: int) -> None:
    umask(mask)
    out, prompts = tmp_path / "seg.nii.gz", tmp_path / "p.mrk.json"
    rc, _, err = fob(segment_args(case, out, "--prompts-out", prompts), capfd)
    assert rc == 0, err
    assert (mode(out), mode(prompts)) == (expected, expected)


def test_overwritten_output_gets_the_umask_mode(tmp_path: Path, case: dict, capfd, umask) -> None:
    out = tmp_path / "seg.nrrd"
    umask(0o077)
    assert fob(segment_args(case, out), capfd)[0] == 0
    assert mode(out) == 0o600
    umask(0o022)  # the same command again under the usual umask: 0644, not the old file's 0600
    assert fob(segment_args(case, out), capfd)[0] == 0
    assert mode(out) == 0o644
    assert listing(tmp_path) == ["seg.nrrd"]


def test_atomic_writers_follow_the_umask(tmp_path: Path, umask) -> None:
    umask(0o027)
    atomic.write_text_atomic(tmp_path / "a.json", "{}")
    with atomic.atomic_output(tmp_path / "b.bin") as tmp:
        Path(tmp).write_bytes(b"x")
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.bin") == 0o640


def test_demo_outputs_get_the_umask_mode(tmp_path: Path, capfd, umask) -> None:
    umask(0o022)
    out_dir = tmp_path / "demo"
    rc, _, err = fob(["demo", "-o", out_dir, "--quiet", "--prompts-from", "neighbour"], capfd)
    assert rc == 0, err
    files = sorted(out_dir.iterdir())
    assert [p.name for p in files] == ["prompts.mrk.json", "segmentation.nii.gz", "support_mask.nii.gz"]
    assert {mode(p) for p in files} == {0o644}


# --- 2. Ctrl-C during start-up: `fob: cancelled`, exit 130 -----------------------------------------

# Runs the real `python -m FoBSegmentLib.cli`, but sends the process a real SIGINT the moment it
# starts importing the module named by FOB_TEST_SIGINT_AT: a Ctrl-C at a chosen instant of the
# start-up, deterministic, with no hook in the product code. The marker file proves it happened.
SIGINT_AT_IMPORT = textwrap.dedent("""
    import importlib.abc, os, runpy, signal, sys

    class InterruptAt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == os.environ["FOB_TEST_SIGINT_AT"]:
                sys.meta_path.remove(self)
                open(os.environ["FOB_TEST_MARKER"], "w").close()
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, InterruptAt())
    sys.argv = ["fob", *sys.argv[1:]]
    runpy.run_module("FoBSegmentLib.cli", run_name="__main__", alter_sys=True)
""")


@pytest.mark.parametrize("module", [
    "FoBSegmentLib.commands.segment",  # building the parser
    "FoBSegmentLib.files",  # the command modules' imports
    "SimpleITK",  # reading the image
    "torch",  # the seconds-long import before the FoB model loads (prompts auto)
])
def test_ctrl_c_during_start_up_is_a_clean_cancel(tmp_path: Path, case: dict, module: str) -> None:
    marker = tmp_path / "interrupted"
    out = tmp_path / "seg.nii.gz"
    env = dict(os.environ, PYTHONPATH=str(REPO), FOB_TEST_SIGINT_AT=module, FOB_TEST_MARKER=str(marker))
    env.pop("FOB_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-c", SIGINT_AT_IMPORT, "segment", str(case["image"]), "-o", str(out),
         "--support-mask", str(case["support"]), "--segmenter", "graphcut", "--quiet"],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert marker.exists(), f"{module} was never imported: the test did not interrupt anything"
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert proc.stderr == "fob: cancelled\n"
    assert proc.stdout == ""
    assert listing(tmp_path) == ["interrupted"]


# --- 3. --device is validated up front, model or not -----------------------------------------------


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("device, fragment", [
    ("tpu", "unknown --device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
    ("cuda:x", "unknown --device 'cuda:x'"),
    ("mps:0", "unknown --device 'mps:0'"),
    ("cuda", "--device cuda requested but CUDA is not available here"),
    ("cuda:7", "--device cuda:7 requested but"),
])
def test_bad_device_without_a_model(tmp_path: Path, case: dict, capfd, device: str, fragment: str) -> None:
    if device == "cuda" and cuda_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    # --prompts-from neighbour: no model is ever loaded, yet the device must be refused.
    expect_error(segment_args(case, tmp_path / "seg.nii.gz", "--device", device), capfd, tmp_path, fragment)


def test_bad_device_is_reported_before_reading_anything(tmp_path: Path, capfd) -> None:
    # The image does not exist: the device error comes first, so nothing was read.
    expect_error(["segment", tmp_path / "missing.nii.gz", "-o", tmp_path / "o.nii.gz", "--support-mask",
                  tmp_path / "missing_mask.nii.gz", "--device", "tpu"], capfd, tmp_path, "unknown --device 'tpu'")


def test_demo_bad_device(tmp_path: Path, capfd) -> None:
    expect_error(["demo", "-o", tmp_path / "demo", "--device", "tpu"], capfd, tmp_path, "unknown --device 'tpu'")


def test_one_device_resolver_everywhere() -> None:
    from FoBSegmentLib import device
    from FoBSegmentLib.bench import resolve_devices
    from FoBSegmentLib.segmenters import base
    from FoBSegmentLib.train.loop import resolve_device as train_device

    assert device.resolve_device("cpu") == "cpu" and device.resolve_device(" CPU ") == "cpu"
    assert device.resolve_device("auto") in ("cpu", "cuda", "mps")
    assert device.check_device("auto") == "auto"
    assert base.resolve_device is device.resolve_device
    assert str(train_device("cpu")) == "cpu"
    assert resolve_devices("cpu") == ["cpu"]
    messages = set()
    for resolve in (device.resolve_device, base.resolve_device, train_device, resolve_devices):
        with pytest.raises(ValueError) as err:
            resolve("tpu")
        messages.add(str(err.value))
    assert messages == {"unknown --device 'tpu'; use auto, cpu, cuda, cuda:N or mps"}


# --- 4. an unwritable output is found before any work, named as the user wrote it ----------------


@pytest.fixture()
def read_only_dir(tmp_path: Path):
    """A folder nobody can create files in, even root: `chattr +i` (immutable) when running as root,
    plain permissions otherwise; skipped where neither works."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() == 0:
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root without `chattr +i` here: no way to make a folder read-only")

        def unlock() -> None:
            subprocess.run([chattr, "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)

        def unlock() -> None:
            folder.chmod(0o755)
    try:
        try:
            (folder / "probe").touch()
        except OSError:
            pass
        else:
            pytest.skip("the folder stayed writable (file system ignores chattr / permissions)")
        yield folder
    finally:
        unlock()


def test_read_only_output_folder_is_found_before_any_work(tmp_path: Path, case: dict, capfd, read_only_dir,
                                                          monkeypatch) -> None:
    read = []
    real = volumes.read_volume
    monkeypatch.setattr(volumes, "read_volume", lambda *a, **k: read.append(a) or real(*a, **k))
    out = read_only_dir / "seg.nii.gz"
    line = expect_error(segment_args(case, out), capfd, tmp_path,
                        f"cannot write output {out}: folder {read_only_dir} is not writable")
    assert ".part" not in line and ".fob-write-check" not in line
    assert read == []  # refused before the image was read


def test_output_parent_is_a_file(tmp_path: Path, case: dict, capfd) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    out = blocker / "seg.nii.gz"
    expect_error(segment_args(case, out), capfd, tmp_path, f"output {out}: {blocker} is not a folder")


def test_output_folder_missing(tmp_path: Path, case: dict, capfd) -> None:
    out = tmp_path / "nope" / "seg.nii.gz"
    expect_error(segment_args(case, out), capfd, tmp_path, f"output folder {tmp_path / 'nope'} does not exist")


def test_read_only_existing_output_is_not_replaced(tmp_path: Path, case: dict, capfd) -> None:
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"keep me")
    out.chmod(0o444)  # no write bit for anyone: refused even as root (os.access says yes to root)
    expect_error(segment_args(case, out), capfd, tmp_path, f"output {out} exists and is read-only")
    assert out.read_bytes() == b"keep me"


def test_check_writable_names_the_users_path(tmp_path: Path, monkeypatch) -> None:
    """The probe's failure (whatever makes the folder unwritable) is reported with the user's path."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".fob-write-check.abc123"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError) as err:
        atomic.check_writable(tmp_path / "p.mrk.json", "--prompts-out")
    assert str(err.value) == (f"cannot write --prompts-out {tmp_path / 'p.mrk.json'}: folder {tmp_path} "
                              "is not writable (Permission denied)")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic.check_writable(tmp_path / "missing" / "p.mrk.json", "--prompts-out")
    assert listing(tmp_path) == []


def test_failed_rename_names_the_target_not_the_temporary_file(tmp_path: Path, monkeypatch) -> None:
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", src)

    monkeypatch.setattr(os, "replace", refuse)
    target = tmp_path / "out.json"
    with pytest.raises(PermissionError) as err:
        atomic.write_text_atomic(target, "{}")
    assert str(err.value).startswith(f"cannot write {target}: folder {tmp_path} is not writable")
    assert ".part" not in str(err.value)
    assert listing(tmp_path) == []


# --- 5. --window: finite, in range, the bad part named ---------------------------------------------


@pytest.mark.parametrize("window, fragments", [
    ("0,1e300", ("--window width '1e300' is out of range", "between 0.001 and 200000 HU")),
    ("nan,400", ("--window level 'nan' is not a finite number",)),
    ("40,inf", ("--window width 'inf' is not a finite number",)),
    ("40,0", ("--window width '0' is out of range",)),
    ("40,-400", ("--window width '-400' is out of range",)),
    ("1e9,400", ("--window level '1e9' is out of range", "between -100000 and 100000 HU")),
    ("abc,400", ("--window level 'abc' is not a number",)),
    ("40", ("--window must be 'L,W'",)),
])
def test_bad_window(tmp_path: Path, data_dir: Path, capfd, window: str, fragments: tuple) -> None:
    image = data_dir / "synapse_ct" / "image_1.nii.gz"
    expect_error(["segment", image, "-o", tmp_path / "o.nii.gz", "--support-mask", data_dir / "synapse_ct" /
                  "label_1.nii.gz", "--modality", "ct", f"--window={window}", *FAST],
                 capfd, tmp_path, *fragments)


# --- 6. hand-edited prompts: short numbers, the chosen segmenter named, deep JSON ------------------


def edited_prompts(case: dict, folder: Path, edit) -> Path:
    doc = json.loads(case["prompts"].read_text())
    edit(doc)
    path = folder / "edited.mrk.json"
    path.write_text(json.dumps(doc))
    return path


def test_prompt_with_a_huge_coordinate(tmp_path: Path, case: dict, capfd) -> None:
    def huge(doc):
        doc["markups"][0]["controlPoints"][0]["position"][0] = 1e300

    prompts = edited_prompts(case, tmp_path, huge)
    line = expect_error(segment_args(case, tmp_path / "o.nii.gz", "--prompts-in", prompts), capfd, tmp_path,
                        "edited.mrk.json: background point 'b0' (markup 0 point 0) at IJK (", "e+299",
                        "lies outside the volume of size (256, 256, 31)")
    assert len(line) < 200, line  # not 300-digit numbers
    assert ") 0 at" not in line  # no stray point index after the point's own name


def test_prompt_check_inside_prints_compact_numbers() -> None:
    from FoBSegmentLib.prompts import PromptSet

    with pytest.raises(ValueError) as err:
        PromptSet(foreground=[[1e300, 5.25]]).check_inside(10, 10)
    assert str(err.value) == "foreground prompt 0 at (x=1e+300, y=5.25) lies outside the 10x10 image"


@pytest.mark.parametrize("segmenter", ["graphcut", "grabcut", "random-walker"])
def test_prompts_without_background_name_the_chosen_segmenter(tmp_path: Path, case: dict, capfd,
                                                              segmenter: str) -> None:
    def drop_background(doc):
        # Without the propagation record each slice is segmented from its points alone (with the
        # record, graphcut has the shape prior and needs no background point).
        doc.pop("fobPropagation", None)
        for markup in doc["markups"]:
            markup["controlPoints"] = [p for p in markup["controlPoints"] if not p["label"].startswith("b")]

    prompts = edited_prompts(case, tmp_path, drop_background)
    args = ["segment", case["image"], "-o", tmp_path / "o.nii.gz", "--support-mask", case["support"],
            "--segmenter", segmenter, "--prompts-in", prompts, "--quiet"]
    line = expect_error(args, capfd, tmp_path, f"{segmenter} needs at least 3 background prompts", "got 0")
    others = {"graphcut", "grabcut", "random-walker"} - {segmenter}
    assert not any(f"{name} needs" in line for name in others), line


def test_deeply_nested_prompts_file(tmp_path: Path, case: dict, capfd) -> None:
    deep = tmp_path / "deep.mrk.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    line = expect_error(segment_args(case, tmp_path / "o.nii.gz", "--prompts-in", deep), capfd, tmp_path,
                        "deep.mrk.json: not a Slicer markups file (JSON nested too deeply to read)")
    assert "recursion" not in line.lower()


# --- 7. unreadable files and folders: one line, no ITK internals -----------------------------------


@pytest.mark.parametrize("name, content, fragment", [
    ("empty.nii.gz", b"", "the file is empty (0 bytes)"),
    ("empty.nrrd", b"", "the file is empty (0 bytes)"),
    ("notes.nrrd", b"these are my notes, not an image\n", "not a readable image (no image reader recognises"),
    ("notes.nii", b"these are my notes, not an image\n" * 20, "not a readable image"),
])
def test_unreadable_image_file(tmp_path: Path, case: dict, capfd, name: str, content: bytes, fragment: str) -> None:
    bad = tmp_path / name
    bad.write_bytes(content)
    line = expect_error(["segment", bad, "-o", tmp_path / "o.nii.gz", "--support-mask", case["support"], *FAST],
                        capfd, tmp_path, f"cannot read {bad}", fragment)
    for noise in ITK_NOISE:
        assert noise not in line, line


@pytest.mark.parametrize("content", [None, "readme.txt"])
def test_folder_without_dicom(tmp_path: Path, case: dict, capfd, content: str | None) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    if content:
        (folder / content).write_text("not DICOM")
    rc, out, err = fob(["segment", folder, "-o", tmp_path / "o.nii.gz", "--support-mask", case["support"], *FAST],
                       capfd)
    assert rc == 2
    assert err == f"fob: error: {folder} is a folder without a readable DICOM series\n"  # no ITK WARNING block
    import SimpleITK

    assert SimpleITK.ProcessObject.GetGlobalWarningDisplay()  # restored for everybody else


# --- 8. NaN / inf voxels in NIfTI (SimpleITK reads them as 0) --------------------------------------


def float_copy_with(image: Path, path: Path, bad: float, dtype=np.float32) -> Path:
    src = sitk.ReadImage(str(image))
    arr = sitk.GetArrayFromImage(src).astype(dtype)
    arr[10, 100, 100] = bad
    arr[20, 3, 250] = bad
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(src)
    sitk.WriteImage(out, str(path))
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("bad, dtype", [(np.nan, np.float32), (np.inf, np.float32), (-np.inf, np.float64)])
def test_nan_voxels_in_a_nifti(tmp_path: Path, case: dict, capfd, suffix: str, bad: float, dtype) -> None:
    path = float_copy_with(case["image"], tmp_path / f"with_nan{suffix}", bad, dtype)
    expect_error(["segment", path, "-o", tmp_path / "o.nii.gz", "--support-mask", case["support"], *FAST],
                 capfd, tmp_path, f"{path} contains NaN or infinite voxel values")


def test_nan_in_a_float_nifti_label_map(tmp_path: Path, case: dict, capfd) -> None:
    path = float_copy_with(case["support"], tmp_path / "mask.nii.gz", np.nan)
    expect_error(["segment", case["image"], "-o", tmp_path / "o.nii.gz", "--support-mask", path, *FAST],
                 capfd, tmp_path, f"{path} contains NaN or infinite voxel values; a label map must hold integer")


def test_finite_float_nifti_is_still_read(tmp_path: Path, case: dict) -> None:
    path = float_copy_with(case["image"], tmp_path / "float.nii.gz", 7.0)
    vol = volumes.read_volume(path)
    assert vol.array.dtype == np.float32 and vol.array[10, 100, 100] == 7.0
    assert vol.array.shape == (31, 256, 256)


def test_truncated_float_nifti(tmp_path: Path, case: dict, capfd) -> None:
    full = float_copy_with(case["image"], tmp_path / "full.nii", 1.0)
    cut = tmp_path / "cut.nii"
    cut.write_bytes(full.read_bytes()[:-5000])
    full.unlink()
    expect_error(["segment", cut, "-o", tmp_path / "o.nii.gz", "--support-mask", case["support"], *FAST],
                 capfd, tmp_path, f"cannot read {cut}")
