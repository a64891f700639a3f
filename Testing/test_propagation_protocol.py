"""The propagation protocol (issue 10) and its model-free baselines, on the real data in ../shared/data.

Floors below were measured with the implementations they guard (graphcut weight-free segmenter,
itk-morphologicalcontourinterpolation 2.1.2) and sit a few points under the measured value, so a
regression fails while harmless numeric noise does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import dice

from FoBSegmentLib.evaluate import propagation as PR
from FoBSegmentLib.evaluate import propagation_report as REP
from FoBSegmentLib.evaluate.datasets import Case, list_cases
from FoBSegmentLib.evaluate.interpolation import (
    copy_mask,
    evenly_spaced_slices,
    fill_between_slices,
    middle_slice,
    organ_slice_range,
)

# CHAOS patient 1, left kidney: 16 slices, about 1 s per method.
CASE, ORGAN = "1", 3


def _labels(data_dir: Path, case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / f"label_{case}.nii.gz")))


def _segmenter():
    from FoBSegmentLib.segmenters import get_segmenter

    return get_segmenter("graphcut")


# ----------------------------------------------------------------------------------------------
# small pieces


def test_slice_choice_helpers() -> None:
    assert middle_slice(12, 35) == 24  # 23.5 rounds up, not to even
    assert middle_slice(7, 28) == 18
    assert evenly_spaced_slices(12, 35, 3) == [12, 24, 35]
    assert evenly_spaced_slices(12, 35, 5) == [12, 18, 24, 29, 35]
    assert evenly_spaced_slices(3, 4, 5) == [3, 4]  # a range shorter than the count
    with pytest.raises(ValueError):
        evenly_spaced_slices(5, 4, 3)
    with pytest.raises(ValueError):
        organ_slice_range(np.zeros((4, 5, 5), bool), 0)


def test_markdown_section_replaces_only_between_markers(tmp_path: Path) -> None:
    doc = tmp_path / "RESULTS.md"
    REP.write_markdown_section(doc, f"{REP.SECTION_START}\nfirst\n{REP.SECTION_END}")
    assert doc.read_text() == f"{REP.SECTION_START}\nfirst\n{REP.SECTION_END}\n"
    doc.write_text(f"# Results\n\nother engineer's table\n\n{REP.SECTION_START}\nfirst\n{REP.SECTION_END}\n\ntail\n")
    REP.write_markdown_section(doc, f"{REP.SECTION_START}\nsecond\n{REP.SECTION_END}")
    text = doc.read_text()
    assert "first" not in text and "second" in text
    assert text.startswith("# Results\n\nother engineer's table\n") and text.endswith("\n\ntail\n")
    doc.write_text("# Results only\n")
    REP.write_markdown_section(doc, f"{REP.SECTION_START}\nthird\n{REP.SECTION_END}")
    assert doc.read_text().startswith("# Results only\n\n" + REP.SECTION_START)


# ----------------------------------------------------------------------------------------------
# baselines


def test_mask_copy_on_real_volume(data_dir: Path) -> None:
    ref = _labels(data_dir, "1") == 1
    first, last = organ_slice_range(ref, 0)
    z = middle_slice(first, last)
    out = copy_mask(ref[z], ref.shape, 0, (first, last))
    assert np.array_equal(out[z], ref[z])
    assert all(np.array_equal(out[k], ref[z]) for k in range(first, last + 1))
    assert not out[:first].any() and not out[last + 1 :].any()
    d = dice(out, ref)
    # The liver changes shape a lot along z: measured 0.655 for patient 1.
    assert 0.6 < d < 0.75
    with pytest.raises(ValueError):
        copy_mask(ref[z], ref.shape, 0, (first, ref.shape[0]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SWIG wrappers of ITK
@pytest.mark.slow  # loading ITK's Python modules alone takes 10-35 s here
def test_fill_between_slices_itk_on_chaos_liver(data_dir: Path) -> None:
    ref = _labels(data_dir, "1") == 1
    out5, picks5 = fill_between_slices(ref, 0, 5)
    out3, picks3 = fill_between_slices(ref, 0, 3)
    assert picks5 == [12, 18, 24, 29, 35] and picks3 == [12, 24, 35]
    for z in picks5:  # annotated slices are kept as drawn
        assert np.array_equal(out5[z], ref[z])
    between = [z for z in range(12, 36) if z not in picks5]
    assert all(out5[z].any() for z in between)  # every gap was filled, not just the seeds returned
    assert not out5[:12].any() and not out5[36:].any()  # no extrapolation beyond the annotated ends
    d5, d3 = dice(out5, ref), dice(out3, ref)
    # Measured on patient 1's liver: 0.907 from 5 slices, 0.745 from 3.
    assert d5 > 0.88
    assert 0.70 < d3 < d5
    seeds_only = np.zeros_like(ref)
    seeds_only[picks5] = ref[picks5]
    assert d5 > dice(seeds_only, ref) + 0.5


# ----------------------------------------------------------------------------------------------
# the protocol


def test_protocol_runs_on_one_patient_and_organ(data_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from FoBSegmentLib.cli import main as fob

    out_json = tmp_path / "prop.json"
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nkept\n")
    argv = [
        "evaluate", "--protocol", "propagation", "--dataset", "chaos", "--cases", CASE, "--organs", str(ORGAN),
        "--methods", "neighbour", "plain", "copy", "--json", str(out_json), "--markdown", str(doc), "--quiet",
    ]
    monkeypatch.setattr("sys.argv", ["fob", *argv])  # the report records the command as typed
    assert fob(argv) == 0
    printed = capsys.readouterr().out
    assert "left kidney" in printed and "neighbour chain" in printed and "mask propagation" in printed
    assert "mask copy" in printed
    report = json.loads(out_json.read_text())
    recs = {r["method"]: r for r in report["records"]}
    assert set(recs) == {"neighbour", "plain", "copy"}
    ref = _labels(data_dir, CASE) == ORGAN
    first, last = organ_slice_range(ref, 0)
    for r in recs.values():
        assert r["case"] == CASE and r["organ"] == ORGAN and r["ref_range"] == [first, last]
        assert r["annotated"] == [middle_slice(first, last)]
    # Measured on patient 1's left kidney (graphcut): neighbour chain 0.953, plain mask propagation
    # 0.827, mask copy 0.776.
    assert recs["neighbour"]["dice"] > 0.9
    assert recs["plain"]["dice"] > 0.75
    assert 0.7 < recs["copy"]["dice"] < recs["neighbour"]["dice"]
    err = recs["neighbour"]["errors"]
    # The breakdown accounts for every voxel of both masks.
    assert 2 * err["tp"] + sum(err[k] for k in ("missed_slices_fn", "extra_slices_fp", "inslice_fn", "inslice_fp")) == \
        pytest.approx(2 * err["tp"] / recs["neighbour"]["dice"], rel=1e-9)
    assert report["datasets"]["chaos"]["dice"]["neighbour"]["left kidney"] == recs["neighbour"]["dice"]
    text = doc.read_text()
    assert text.startswith("# Results\n\nkept\n") and REP.SECTION_START in text and REP.SECTION_END in text
    assert f"fob evaluate --protocol propagation --dataset chaos --cases {CASE}" in text and "graphcut" in text

    # --from-json: reports run apart (one per dataset, in parallel) merge into one, tables rebuilt from
    # their records. The second one is this run's report with its records relabelled as another dataset.
    other = dict(report, records=[dict(r, dataset="synapse", case="1") for r in report["records"]])
    other_json = tmp_path / "other.json"
    other_json.write_text(json.dumps(other))
    merged_json, merged_doc = tmp_path / "merged.json", tmp_path / "MERGED.md"
    assert fob(["evaluate", "--protocol", "propagation", "--from-json", str(out_json), str(other_json),
                "--json", str(merged_json), "--markdown", str(merged_doc)]) == 0
    merged = json.loads(merged_json.read_text())
    assert set(merged["datasets"]) == {"chaos", "synapse"} and len(merged["records"]) == 2 * len(report["records"])
    for ds in ("chaos", "synapse"):
        assert merged["datasets"][ds]["dice"]["neighbour"]["left kidney"] == recs["neighbour"]["dice"]
    assert merged["seconds"] == pytest.approx(2 * report["seconds"])
    assert "### CHAOS MR" in merged_doc.read_text() and "### Synapse CT" in merged_doc.read_text()
    # A later run's rows join the table (a report of another method on the same case), in METHODS order.
    later = dict(report, methods={"fill3": "fill"}, records=[dict(recs["copy"], method="fill3", dice=0.5)])
    other_json.write_text(json.dumps(later))
    assert fob(["evaluate", "--protocol", "propagation", "--from-json", str(out_json), str(other_json),
                "--json", str(merged_json)]) == 0
    merged = json.loads(merged_json.read_text())
    assert list(merged["methods"]) == ["neighbour", "plain", "fill3", "copy"]
    assert merged["datasets"]["chaos"]["dice"]["fill3"]["left kidney"] == 0.5
    capsys.readouterr()
    other_json.write_text(json.dumps(dict(other, segmenter="grabcut")))
    assert fob(["evaluate", "--protocol", "propagation", "--from-json", str(out_json), str(other_json)]) == 2
    assert "differ in one of: segmenter, model" in capsys.readouterr().err
    assert fob(["evaluate", "--protocol", "propagation", "--from-json", str(doc)]) == 2
    assert "is not JSON" in capsys.readouterr().err


def test_protocol_rejects_bad_input(capsys) -> None:
    from FoBSegmentLib.cli import main as fob

    assert fob(["evaluate", "--protocol", "propagation", "--dataset", "isic"]) == 2
    assert "runs on chaos and synapse" in capsys.readouterr().err
    assert fob(["evaluate", "--protocol", "propagation", "--cases", "999", "--quiet"]) == 2
    assert "none of them is a chaos case" in capsys.readouterr().err
    assert fob(["evaluate", "--protocol", "propagation", "--methods", "magic"]) == 2
    assert "unknown propagation method" in capsys.readouterr().err


def test_protocol_prediction_is_what_fob_segment_writes(data_dir: Path, tmp_path: Path) -> None:
    """The protocol runs `fob segment`'s pipeline: same input, identical label map."""
    from FoBSegmentLib.cli import main as fob

    case = list_cases("chaos", ids=[CASE])[0]
    outcome = PR.evaluate_case(case, [ORGAN], ["neighbour"], PR.Runtime(segmenter=_segmenter()), keep_masks=True)
    ours = outcome.masks[(ORGAN, "neighbour")]
    lab_img = sitk.ReadImage(str(case.label))
    lab = sitk.GetArrayFromImage(lab_img)
    z = outcome.records[0]["annotated"][0]
    support = np.zeros_like(lab, dtype=np.uint8)
    support[z] = lab[z] == ORGAN
    sup_img = sitk.GetImageFromArray(support)
    sup_img.CopyInformation(lab_img)
    sup_path, out_path = tmp_path / "annotated.nii.gz", tmp_path / "out.nii.gz"
    sitk.WriteImage(sup_img, str(sup_path))
    rc = fob(["segment", str(case.image), "--support-mask", str(sup_path), "-o", str(out_path),
              "--segmenter", "graphcut", "--prompts-from", "neighbour", "--quiet"])
    assert rc == 0
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(out_path))) > 0
    assert theirs.any() and np.array_equal(ours, theirs)


def test_pipeline_never_reads_the_reference_beyond_the_annotated_slice(data_dir: Path, tmp_path: Path) -> None:
    """Perturb the reference label everywhere except the annotated slice (organ range kept, so the
    protocol picks the same slice): the pipeline's result, including where its stopping rule ends
    the organ, must be identical, while the Dice against the perturbed label changes."""
    case = list_cases("chaos", ids=[CASE])[0]
    lab_img = sitk.ReadImage(str(case.label))
    lab = sitk.GetArrayFromImage(lab_img)
    ref = lab == ORGAN
    first, last = organ_slice_range(ref, 0)
    z = middle_slice(first, last)
    fake = lab.copy()
    rng = np.random.default_rng(0)
    for k in range(lab.shape[0]):
        if k == z:
            continue
        fake[k][fake[k] == ORGAN] = 0
        if first <= k <= last:
            # A random blob elsewhere: the organ's range (and so the annotated slice) is unchanged.
            r0, c0 = rng.integers(10, 200, size=2)
            fake[k, r0 : r0 + 30, c0 : c0 + 30] = ORGAN
    # Other labels scrambled too (never into the organ's label, which would move its range).
    other = (fake != ORGAN) & (fake != 0)
    fake[other] = rng.choice([v for v in (1, 2, 3, 4) if v != ORGAN], size=int(other.sum())).astype(fake.dtype)
    fake[z] = lab[z]
    fake_img = sitk.GetImageFromArray(fake.astype(np.uint8))
    fake_img.CopyInformation(lab_img)
    fake_path = tmp_path / f"label_{CASE}.nii.gz"
    sitk.WriteImage(fake_img, str(fake_path))
    fake_case = Case(case.dataset, case.case_id, case.image, fake_path)

    runtime = PR.Runtime(segmenter=_segmenter())
    real = PR.evaluate_case(case, [ORGAN], ["neighbour"], runtime, keep_masks=True)
    pert = PR.evaluate_case(fake_case, [ORGAN], ["neighbour"], runtime, keep_masks=True)
    a, b = real.masks[(ORGAN, "neighbour")], pert.masks[(ORGAN, "neighbour")]
    assert a.sum() > 1000 and np.array_equal(a, b)
    ra, rb = real.records[0], pert.records[0]
    assert ra["annotated"] == rb["annotated"] == [z]
    assert ra["pred_range"] == rb["pred_range"] and ra["notes"] == rb["notes"]
    assert ra["dice"] > 0.88 and rb["dice"] < 0.5


def test_target_lines_compare_the_default_with_the_issue_bar() -> None:
    table = {
        "hybrid": {"liver": 0.82, "spleen": 0.95, "mean": 0.885},
        "fill3": {"liver": 0.74, "spleen": 0.97, "mean": 0.855},
        "plain": {"liver": 0.80, "spleen": 0.90, "mean": 0.85},
        "fill5": {"liver": 0.99, "spleen": 0.99, "mean": 0.99},  # 5 slices: not part of the bar
    }
    lines = REP.target_lines(table)
    assert "mean 88.5, short of 90 by 1.5" in lines[0]
    assert "liver 82.0 vs 80.0 (mask propagation, +2.0)" in lines[1]
    assert "spleen 95.0 vs 97.0 (fill-between 3, -2.0)" in lines[1]
    assert "target 90 reached" in REP.target_lines({"neighbour": {"liver": 0.95, "mean": 0.95}})[0]
    assert REP.target_lines({"fill3": {"liver": 0.7, "mean": 0.7}}) == []
