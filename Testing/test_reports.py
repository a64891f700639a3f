"""Visual reports on real data: `fob segment --report` (the montage), its refusals, and the plots of
`fob evaluate --protocol propagation` drawn from the protocol's own JSON records.

A PNG is checked by what it must show: its panels (the montage's chosen slices, read back from the
picture's grid of framed panels is brittle, so `MontageInfo` says which slices were drawn and the
test holds it to the propagation result), its size, and that it is a real, non-blank picture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli_segment import one_slice_support

from FoBSegmentLib import cli
from FoBSegmentLib.files import SegmentRequest, segment_files
from FoBSegmentLib.reports.montage import (
    ANNOTATED_COLOUR,
    BACKGROUND_COLOUR,
    FOREGROUND_COLOUR,
    MASK_COLOUR,
    REFERENCE_COLOUR,
    choose_slices,
    montage_of_outcome,
)


def _picture(path: Path) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.std() > 10, f"{path.name} is blank"
    return img


def test_segment_report_with_reference(tmp_path: Path, data_dir: Path, capsys) -> None:
    image = data_dir / "chaos_mr_t2spir" / "image_8.nii.gz"
    label = data_dir / "chaos_mr_t2spir" / "label_8.nii.gz"
    support, ref, middle = one_slice_support(label, 1, tmp_path)
    out, png = tmp_path / "liver.nii.gz", tmp_path / "liver.png"
    rc = cli.main(["segment", str(image), "-o", str(out), "--support-mask", str(support), "--segmenter", "graphcut",
                   "--prompts-from", "neighbour", "--report", str(png), "--reference", str(label)])
    so, se = capsys.readouterr()
    assert rc == 0, se
    assert "wrote" in so and "Dice 0." in so, so
    img = _picture(png)
    # The mask's contour and the reference's are both drawn, and the prompts in their two colours.
    for colour in (MASK_COLOUR, REFERENCE_COLOUR, FOREGROUND_COLOUR, BACKGROUND_COLOUR, ANNOTATED_COLOUR):
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        assert np.all(np.abs(img.astype(int) - rgb) < 40, axis=-1).sum() > 50, colour
    assert not list(tmp_path.glob(".*part*"))


def test_montage_panels_follow_the_propagation(tmp_path: Path, data_dir: Path) -> None:
    image = data_dir / "chaos_mr_t2spir" / "image_2.nii.gz"
    support, ref, middle = one_slice_support(data_dir / "chaos_mr_t2spir" / "label_2.nii.gz", 1, tmp_path)
    outcome = segment_files(SegmentRequest(image=image, output=tmp_path / "l.nii.gz", support_mask=support,
                                           segmenter="graphcut", prompts_from="neighbour"))
    res = outcome.result
    segmented = [z for z, r in res.slices.items() if r.area > 0]
    assert len(segmented) > 12  # the liver spans more slices than a 6-panel montage shows
    small = montage_of_outcome(tmp_path / "six.png", outcome, ref, max_panels=6)
    full = montage_of_outcome(tmp_path / "all.png", outcome, ref, max_panels=100)
    # All segmented slices when they fit; otherwise every k-th, but never without the annotated slice
    # nor a flagged one.
    assert full.slices == sorted(set(segmented) | set(res.flagged))
    assert middle in small.slices and small.annotated == [middle]
    assert set(res.flagged) <= set(small.slices) and small.flagged == sorted(res.flagged)
    assert len(small.slices) <= 6 + 1 + len(res.flagged)
    gaps = np.diff([z for z in small.slices if z not in res.flagged and z != middle])
    assert len(set(gaps.tolist())) <= 2  # evenly spaced
    # The picture has the grid it says: 6 panels per row at most, rows x cols panels.
    h6, w6 = _picture(tmp_path / "six.png").shape[:2]
    hf, wf = _picture(tmp_path / "all.png").shape[:2]
    assert (small.rows, small.columns) == (-(-len(small.slices) // 6), min(len(small.slices), 6))
    assert (full.rows, small.rows) == (4, 1) and hf > 3 * h6  # figure height grows with the rows
    assert choose_slices(res, 6) == small.slices
    with pytest.raises(ValueError, match="max_panels"):
        choose_slices(res, 0)


def test_segment_report_refusals_write_nothing(tmp_path: Path, data_dir: Path, capsys) -> None:
    image = data_dir / "chaos_mr_t2spir" / "image_2.nii.gz"
    support, _, _ = one_slice_support(data_dir / "chaos_mr_t2spir" / "label_2.nii.gz", 1, tmp_path)
    other_grid = data_dir / "chaos_mr_t2spir" / "label_8.nii.gz"
    base = ["segment", str(image), "-o", str(tmp_path / "o.nii.gz"), "--support-mask", str(support),
            "--segmenter", "graphcut", "--prompts-from", "neighbour"]
    cases = [
        (["--report", str(tmp_path / "r.jpg")], "--report"),
        (["--reference", str(other_grid)], "--report"),
        (["--report", str(tmp_path / "r.png"), "--reference", str(other_grid)], "size"),
        (["--report", str(tmp_path / "r.png"), "--reference", str(support), "--reference-label", "3"], "not present"),
        (["--report", str(tmp_path / "missing" / "r.png")], "does not exist"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for extra, pattern in cases:
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("fob: error:") and pattern in err[-1], err
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_segment_without_report_does_not_import_matplotlib(tmp_path: Path, data_dir: Path) -> None:
    import subprocess

    image = data_dir / "isic" / sorted(p.name for p in (data_dir / "isic").glob("*.jpg"))[0]
    mask = image.with_name(image.stem + "_mask.png")
    code = ("import sys; from FoBSegmentLib import cli; "
            f"rc = cli.main(['segment', {str(image)!r}, '-o', {str(tmp_path / 'o.png')!r}, '--support-mask', "
            f"{str(mask)!r}, '--segmenter', 'grabcut', '--prompts-from', 'neighbour', '--quiet']); "
            "print(rc, 'matplotlib' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout.split()[-2:] == ["0", "False"], proc.stdout + proc.stderr


def test_evaluate_plots_from_the_protocol_records(tmp_path: Path, capsys) -> None:
    from FoBSegmentLib.reports.plots import write_evaluation_plots

    table = tmp_path / "propagation.json"
    rc = cli.main(["evaluate", "--protocol", "propagation", "--dataset", "chaos", "--cases", "2", "5",
                   "--organs", "2", "3", "--methods", "copy", "fill3", "--json", str(table), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    records = json.loads(table.read_text())["records"]
    assert {len(r["annotated"]) for r in records} == {1, 3}
    paths = write_evaluation_plots(records, table)
    assert [p.name for p in paths] == ["propagation.dice_by_organ.png", "propagation.dice_by_annotated.png"]
    for p in paths:
        _picture(p)
    # Nothing scored (every method skipped): no plot, and no error after the tables were written.
    assert write_evaluation_plots([{**r, "dice": None} for r in records], tmp_path / "none.json") == []
    assert not list(tmp_path.glob("none*"))
    from FoBSegmentLib.reports.plots import plot_dice_by_organ

    with pytest.raises(ValueError, match="nothing to plot"):
        plot_dice_by_organ([], tmp_path / "x.png")
