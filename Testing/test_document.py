"""A propagation is a document: the prompts file (Slicer markups + the propagation record) gives back
the mask voxel for voxel, and an edited slice re-propagates only the slices chained from it.

Real CHAOS MR data; `fob segment` is run in-process (cli.main)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from FoBSegmentLib import cli
from FoBSegmentLib.files import SegmentRequest, segment_files
from FoBSegmentLib.io import volumes
from FoBSegmentLib.propagation import PropagationConfig
from FoBSegmentLib.propagation.document import RECORD_KEY

CHAOS = "chaos_mr_t2spir"


def fob(args: list, capsys) -> str:
    rc = cli.main(["segment", *[str(a) for a in args]])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return err


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def liver(tmp_path_factory, data_dir: Path) -> dict:
    """CHAOS MR 2, liver annotated on the middle slice of its range only."""
    tmp = tmp_path_factory.mktemp("liver")
    lab = volumes.read_label(data_dir / CHAOS / "label_2.nii.gz")
    ref = lab.array == 1
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    middle = int(zs[len(zs) // 2])
    sup = np.zeros(ref.shape, np.uint8)
    sup[middle][ref[middle]] = 1
    support = volumes.write_label(tmp / "support.nii.gz", sup, lab.geometry)
    return {"image": data_dir / CHAOS / "image_2.nii.gz", "support": support, "middle": middle, "dir": tmp}


def round_trip(liver: dict, tmp: Path, capsys, extra: list) -> tuple[np.ndarray, np.ndarray, dict]:
    a, b, p = tmp / "a.nii.gz", tmp / "b.nii.gz", tmp / "p.mrk.json"
    fob([liver["image"], "-o", a, "--support-mask", liver["support"], "--prompts-out", p, "--quiet", *extra], capsys)
    doc = json.loads(p.read_text())
    fob([liver["image"], "-o", b, "--support-mask", liver["support"], "--prompts-in", p, "--quiet",
         *[x for x in extra if x not in ("fob", "neighbour", "hybrid", "chained", "--prompts-from")]], capsys)
    return read(a), read(b), doc


@pytest.mark.parametrize("extra", [
    [],  # the defaults: hybrid prompts, graphcut
    ["--segmenter", "grabcut", "--prompts-from", "fob"],
    ["--segmenter", "graphcut", "--prompts-from", "fob"],
    ["--segmenter", "grabcut", "--prompts-from", "neighbour"],
    ["--segmenter", "random-walker", "--prompts-from", "fob"],
    ["--segmenter", "graphcut", "--prompts-from", "neighbour", "--slices", "8:14"],
    ["--segmenter", "graphcut", "--prompts-from", "chained"],
], ids=["default", "grabcut-fob", "graphcut-fob", "grabcut-neighbour", "random-walker-fob", "graphcut-range", "graphcut-chained"])
def test_unedited_prompts_file_reproduces_the_mask(liver: dict, tmp_path: Path, capsys, extra: list) -> None:
    a, b, doc = round_trip(liver, tmp_path, capsys, extra)
    assert a.any()
    assert np.array_equal(a, b), f"{int((a != b).sum())} voxels differ"
    # The file is still a Slicer markups file: two point lists, the record beside them.
    assert [m["name"] for m in doc["markups"]] == ["FoB background", "FoB foreground"]
    rec = doc[RECORD_KEY]
    assert rec["version"] == 1 and rec["annotated"] == [liver["middle"]]
    sources = {e["source"] for e in rec["slices"]}
    assert sources <= {"fob", "neighbour"}
    if extra[:2] == ["--segmenter", "graphcut"] and "fob" in extra:
        # FoB's mask prompt is no accepted slice: it travels in the record.
        assert all("priorMask" in e for e in rec["slices"] if e["source"] == "fob")


def test_cross_patient_prompts_file_reproduces_the_mask(tmp_path: Path, data_dir: Path, capsys) -> None:
    lab = volumes.read_label(data_dir / CHAOS / "label_3.nii.gz")
    ref = lab.array == 1
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    sup = np.zeros(ref.shape, np.uint8)
    sup[zs[len(zs) // 2]][ref[zs[len(zs) // 2]]] = 1
    support = volumes.write_label(tmp_path / "support3.nii.gz", sup, lab.geometry)
    common = [data_dir / CHAOS / "image_2.nii.gz", "--support-image", data_dir / CHAOS / "image_3.nii.gz",
              "--support-mask", support, "--prompts-from", "neighbour", "--quiet"]
    p = tmp_path / "p.mrk.json"
    fob([*common[:1], "-o", tmp_path / "a.nii.gz", *common[1:], "--prompts-out", p], capsys)
    rec = json.loads(p.read_text())[RECORD_KEY]
    # The second pass's seed (a cross-section the first pass found) travels with its own mask.
    assert [e["prior"] for e in rec["slices"]].count("self") == 1
    fob([*common[:1], "-o", tmp_path / "b.nii.gz", *common[1:], "--prompts-in", p], capsys)
    a, b = read(tmp_path / "a.nii.gz"), read(tmp_path / "b.nii.gz")
    assert a.any() and np.array_equal(a, b)


def _move_slice_points(doc: dict, z: int, shift_mm: float) -> int:
    """Move every point of slice z by shift_mm along L (first LPS axis); returns how many moved.
    The description stays: the position no longer matches it, so the point counts as edited."""
    moved = 0
    for m in doc["markups"]:
        for p in m["controlPoints"]:
            if f" slice={z} " in p["description"]:
                p["position"][0] += shift_mm
                moved += 1
    return moved


def test_editing_one_slice_redoes_only_the_slices_chained_from_it(liver: dict, tmp_path: Path, capsys) -> None:
    a_path, p = tmp_path / "a.nii.gz", tmp_path / "p.mrk.json"
    err = fob([liver["image"], "-o", a_path, "--support-mask", liver["support"], "--prompts-out", p], capsys)
    doc = json.loads(p.read_text())
    rec = doc[RECORD_KEY]
    middle = liver["middle"]
    chained_up = sorted(e["index"] for e in rec["slices"] if e["index"] > middle)
    assert len(chained_up) >= 4, err
    edited = chained_up[1]  # the second slice above the annotation: its parent is chained too
    assert _move_slice_points(doc, edited, 30.0) > 0
    p.write_text(json.dumps(doc))
    b_path = tmp_path / "b.nii.gz"
    err = fob([liver["image"], "-o", b_path, "--support-mask", liver["support"], "--prompts-in", p], capsys)
    a, b = read(a_path), read(b_path)
    differs = sorted(int(z) for z in np.flatnonzero((a != b).any(axis=(1, 2))))
    assert edited in differs, "the edited slice must change"
    # Only the edited slice and the slices chained from it (above it) may change; the annotation,
    # the chain below it and the edited slice's ancestors stay voxel for voxel.
    assert all(z >= edited for z in differs), differs
    assert np.array_equal(a[: edited], b[: edited])
    assert "1 edited slice(s)" in err


def test_removing_a_slices_points_clears_it_and_its_descendants(liver: dict, tmp_path: Path, capsys) -> None:
    a_path, p = tmp_path / "a.nii.gz", tmp_path / "p.mrk.json"
    fob([liver["image"], "-o", a_path, "--support-mask", liver["support"], "--prompts-out", p, "--quiet"], capsys)
    doc = json.loads(p.read_text())
    middle = liver["middle"]
    below = sorted((e["index"] for e in doc[RECORD_KEY]["slices"] if e["index"] < middle), reverse=True)
    cut = below[2]
    for m in doc["markups"]:
        m["controlPoints"] = [q for q in m["controlPoints"] if f" slice={cut} " not in q["description"]]
    p.write_text(json.dumps(doc))
    fob([liver["image"], "-o", tmp_path / "b.nii.gz", "--support-mask", liver["support"], "--prompts-in", p,
         "--quiet"], capsys)
    a, b = read(a_path), read(tmp_path / "b.nii.gz")
    assert not b[: cut + 1].any()  # the slice and everything chained below it
    assert np.array_equal(a[cut + 1 :], b[cut + 1 :])


def test_a_file_without_record_segments_each_slice_from_its_points(liver: dict, tmp_path: Path, capsys) -> None:
    p = tmp_path / "p.mrk.json"
    fob([liver["image"], "-o", tmp_path / "a.nii.gz", "--support-mask", liver["support"], "--prompts-out", p,
         "--quiet"], capsys)
    doc = json.loads(p.read_text())
    del doc[RECORD_KEY]
    p.write_text(json.dumps(doc))
    err = fob([liver["image"], "-o", tmp_path / "b.nii.gz", "--support-mask", liver["support"], "--prompts-in", p],
              capsys)
    assert "no propagation record" in err
    assert read(tmp_path / "b.nii.gz").any()


def test_a_damaged_record_is_a_one_line_error(liver: dict, tmp_path: Path, capsys) -> None:
    p = tmp_path / "p.mrk.json"
    fob([liver["image"], "-o", tmp_path / "a.nii.gz", "--support-mask", liver["support"], "--prompts-out", p,
         "--quiet"], capsys)
    doc = json.loads(p.read_text())
    doc[RECORD_KEY]["version"] = 99
    p.write_text(json.dumps(doc))
    out = tmp_path / "b.nii.gz"
    rc = cli.main(["segment", str(liver["image"]), "-o", str(out), "--support-mask", str(liver["support"]),
                   "--prompts-in", str(p)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert [line for line in err.splitlines() if line.startswith("fob: error:")] == [
        "fob: error: p.mrk.json: propagation record: version 99 is not 1"]


def test_sam_prompts_file_reproduces_the_mask(liver: dict, tmp_path: Path, capsys) -> None:
    """The same round trip through the SAM segmenter (a tiny random SAM: plumbing, not quality; FoB's
    prompts, because a chain through a random SAM's masks ends at once)."""
    import torch
    from test_sam import tiny_sam

    ckpt = tmp_path / "tiny_sam.pth"
    torch.save(tiny_sam().state_dict(), ckpt)
    a, b, doc = round_trip(liver, tmp_path, capsys, ["--segmenter", "sam", "--sam-checkpoint", ckpt,
                                                      "--prompts-from", "fob", "--slices",
                                                      f"{liver['middle'] - 2}:{liver['middle'] + 2}"])
    assert len(doc[RECORD_KEY]["slices"]) == 4
    assert np.array_equal(a, b), f"{int((a != b).sum())} voxels differ"


def test_a_chain_between_two_annotated_tips_replays_with_its_relearnt_look(
        liver: dict, tmp_path: Path, data_dir: Path, capsys) -> None:
    """The liver drawn on its two end slices only: both are tips, so the slice midway between them, as
    the first pass chained it, becomes a body seed (`neighbour.body_seed_pass`: look "body", its mask
    stored in the record as prior "self") and the gap is chained from it to both ends, re-learning the
    look at every step (`neighbour.gap_step`); the record says so per slice and the replay re-learns
    the look of the annotations and the body seed, voxel for voxel."""
    lab = volumes.read_label(data_dir / CHAOS / "label_2.nii.gz")
    ref = lab.array == 1
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    sup = np.zeros(ref.shape, np.uint8)
    sup[[zs[0], zs[-1]]] = ref[[zs[0], zs[-1]]]
    support = volumes.write_label(tmp_path / "tips.nii.gz", sup, lab.geometry)
    first, again, p = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "p.mrk.json"
    fob([liver["image"], "-o", first, "--support-mask", support, "--prompts-out", p, "--quiet"], capsys)
    entries = json.loads(p.read_text())[RECORD_KEY]["slices"]
    seeds = [e for e in entries if e.get("prior") == "self"]
    assert len(seeds) == 1 and zs[0] < seeds[0]["index"] < zs[-1] and "priorMask" in seeds[0]
    assert seeds[0]["look"] == "body"
    relearnt = sorted(e["index"] for e in entries if e.get("look") == "parent")
    assert relearnt == [z for z in range(zs[0] + 1, zs[-1]) if z != seeds[0]["index"]], relearnt
    fob([liver["image"], "-o", again, "--support-mask", support, "--prompts-in", p, "--quiet"], capsys)
    a, b = read(first), read(again)
    assert a[zs[0] + 1:zs[-1]].any()
    assert np.array_equal(a, b), f"{int((a != b).sum())} voxels differ"


def test_slices_between_two_agreeing_annotations_come_from_their_interpolated_shape(
        liver: dict, tmp_path: Path, data_dir: Path, capsys) -> None:
    lab = volumes.read_label(data_dir / CHAOS / "label_2.nii.gz")
    ref = lab.array == 1
    a, b = liver["middle"], liver["middle"] + 4
    sup = np.zeros(ref.shape, np.uint8)
    sup[a], sup[b] = ref[a], ref[b]
    support = volumes.write_label(tmp_path / "two.nii.gz", sup, lab.geometry)
    first, p = tmp_path / "a.nii.gz", tmp_path / "p.mrk.json"
    # Interpolated gaps are off by default; the record keeps the configuration that made the prompts,
    # so the replays below (plain `fob segment --prompts-in`) interpolate too.
    segment_files(SegmentRequest(liver["image"], first, support, prompts_out=p,
                                 config=PropagationConfig(interpolate_agreement=0.5)))
    doc = json.loads(p.read_text())
    sources = {e["index"]: e["source"] for e in doc[RECORD_KEY]["slices"]}
    assert [sources.get(z) for z in range(a + 1, b)] == ["interpolated"] * 3, sources
    assert all(sources[z] == "neighbour" for z in sources if not a <= z <= b)
    # Unedited, the file gives the mask back; moving the points of one interpolated slice changes that
    # slice alone (it has no parent and starts no chain).
    again = tmp_path / "b.nii.gz"
    fob([liver["image"], "-o", again, "--support-mask", support, "--prompts-in", p, "--quiet"], capsys)
    assert np.array_equal(read(first), read(again))
    assert _move_slice_points(doc, a + 2, 20.0) > 0
    p.write_text(json.dumps(doc))
    edited = tmp_path / "c.nii.gz"
    fob([liver["image"], "-o", edited, "--support-mask", support, "--prompts-in", p, "--quiet"], capsys)
    differs = np.flatnonzero((read(first) != read(edited)).any(axis=(1, 2))).tolist()
    assert differs == [a + 2]


def test_a_job_replays_its_own_record_only_when_points_were_edited(data_dir: Path) -> None:
    """`Job.replaying_edits` (what Slicer's Propagate volume runs after Predict prompts): the same job
    with the points its run gave is itself; with one slice's points moved it replays the record, and the
    result is what `--prompts-in` would give (the edited slice's mask changes, the other side of the
    annotation does not); a job with another setting or annotation does not take the record."""
    import dataclasses

    from FoBSegmentLib.job import JobSettings, build_job, prepare_image
    from FoBSegmentLib.propagation.document import edited_slices

    image = prepare_image(volumes.read_volume(data_dir / CHAOS / "image_2.nii.gz"), JobSettings())
    ref = volumes.read_label(data_dir / CHAOS / "label_2.nii.gz").array == 2
    zs = np.flatnonzero(ref.any(axis=(1, 2)))
    z0 = int(zs[len(zs) // 2])
    support = np.zeros(ref.shape, bool)
    support[z0] = ref[z0]
    settings = JobSettings(prompts_from="neighbour", segmenter="graphcut")
    job = build_job(image, support, settings)
    first = job.run()
    shown = {z: ps for z, ps in first.prompts.items() if z != z0}
    assert edited_slices(first.record, shown) == [] and job.replaying_edits(shown, first.record) is job

    z1 = z0 + 2
    ps = shown[z1]
    moved = dict(shown)
    moved[z1] = dataclasses.replace(ps, background=ps.background + 0.35 * (ps.background.mean(axis=0) - ps.background))
    assert edited_slices(first.record, moved) == [z1]
    again = job.replaying_edits(moved, first.record).run()
    assert again.mask[z1].sum() < first.mask[z1].sum()
    assert np.array_equal(again.mask[:z0], first.mask[:z0])
    assert any("edited" in n for n in again.notes)

    other = dataclasses.replace(settings, config=dataclasses.replace(PropagationConfig(), n_background=12))
    assert build_job(image, support, other).replaying_edits(moved, first.record).record is None
    wider = support.copy()
    wider[z0 - 1] = ref[z0 - 1]
    assert build_job(image, wider, settings).replaying_edits(moved, first.record).record is None
