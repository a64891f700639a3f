"""`fob batch` on a real Dask LocalCluster (2 worker processes on 127.0.0.1) with real volumes:
the cohort runs, a corrupt image fails alone with its reason, a re-run skips the finished rows (and
redoes a row whose options changed), --force redoes everything, an existing cluster is used through
--scheduler, bad manifests are refused before any work, Ctrl-C stops without partial outputs.

Rows use neighbour prompts and GrabCut (as Testing/test_cli_segment.py) (no learning, no downloads), so the Dice floors hold on
any machine; each floor sits below the measured value printed by the test.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest
from test_cli_segment import one_slice_support

from FoBSegmentLib import cli


def write_manifest(path: Path, rows: list[dict]) -> Path:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: str(v) for k, v in r.items()})
    return path


@pytest.fixture()
def cohort(tmp_path: Path, data_dir: Path) -> dict:
    """Three real jobs (CHAOS MR same volume, Synapse CT same volume, CHAOS MR cross-patient), one row
    whose image is a truncated real volume, one ISIC dermoscopy picture. Paths relative to the
    manifest where the inputs sit beside it, as a user writes them."""
    chaos, ct = data_dir / "chaos_mr_t2spir", data_dir / "synapse_ct"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    one_slice_support(chaos / "label_8.nii.gz", 4, inputs, name="sup_chaos8.nii.gz")
    one_slice_support(ct / "label_5.nii.gz", 3, inputs, name="sup_ct5.nii.gz")
    (inputs / "corrupt.nii.gz").write_bytes((chaos / "image_2.nii.gz").read_bytes()[:3000])
    common = {"segmenter": "grabcut", "prompts_from": "neighbour"}
    rows = [
        {"name": "chaos8_spleen", "image": chaos / "image_8.nii.gz", "support_mask": "inputs/sup_chaos8.nii.gz",
         "support_label": 4, "reference": chaos / "label_8.nii.gz", **common},
        {"name": "ct5_lkidney", "image": ct / "image_5.nii.gz", "support_mask": "inputs/sup_ct5.nii.gz",
         "support_label": 3, "reference": ct / "label_5.nii.gz", "window": "40,400", **common},
        {"name": "chaos5_from8", "image": chaos / "image_5.nii.gz", "support_image": chaos / "image_8.nii.gz",
         "support_mask": chaos / "label_8.nii.gz", "support_label": 3, "reference": chaos / "label_5.nii.gz",
         **common},
        {"name": "broken", "image": "inputs/corrupt.nii.gz", "support_mask": "inputs/sup_chaos8.nii.gz",
         "support_label": 4, "reference": "", **common},
        # A dermoscopy picture from another image's mask: no name (the file's), no reference, a .png mask.
        {"image": data_dir / "isic" / "ISIC_0012903.jpg", "support_mask": data_dir / "isic" / "ISIC_0012388_mask.png",
         "support_image": data_dir / "isic" / "ISIC_0012388.jpg", **common},
    ]
    manifest = write_manifest(tmp_path / "cohort.csv", rows)
    return {"manifest": manifest, "rows": rows, "out": tmp_path / "out", "dir": tmp_path}


def run_batch_cli(args: list, capsys) -> tuple[int, str, str]:
    rc = cli.main(["batch", *[str(a) for a in args]])
    so, se = capsys.readouterr()
    return rc, so, se


def statuses(out: Path) -> dict[str, dict]:
    return {p.name[: -len(".status.json")]: json.loads(p.read_text()) for p in out.glob("*.status.json")}


def report_rows(out: Path) -> tuple[int, int, list[str]]:
    page = (out / "report.html").read_text()
    rows = re.findall(r"<tr class=\"[^\"]*\">", page)
    thumbs = re.findall(r'<img class="thumb" src="([^"]+)"', page)
    return len(rows), len(thumbs), thumbs


def test_cohort_on_two_workers_resumes_and_isolates_a_failure(cohort, capsys) -> None:
    from distributed import LocalCluster

    out = cohort["out"]
    rc, so, se = run_batch_cli([cohort["manifest"], "-o", out, "--workers", "2"], capsys)
    assert rc == 1, se  # exit code = number of failed rows
    assert "2 worker(s)" in se and "4 done, 1 failed" in so
    st = statuses(out)
    assert {k: v["status"] for k, v in st.items()} == {
        "chaos8_spleen": "done", "ct5_lkidney": "done", "chaos5_from8": "done", "broken": "failed",
        "ISIC_0012903": "done"}
    assert (out / "ISIC_0012903.png").is_file() and st["ISIC_0012903"]["dice"] is None
    assert "cannot read" in st["broken"]["error"] and "corrupt.nii.gz" in st["broken"]["error"]
    assert "\n" not in st["broken"]["error"]
    assert "row 4 (broken) failed: cannot read" in se
    assert len({v["pid"] for v in st.values()}) == 2  # both worker processes took rows
    floors = {"chaos8_spleen": 0.80, "ct5_lkidney": 0.80, "chaos5_from8": 0.70}
    with capsys.disabled():
        print("\n" + ", ".join(f"{k} Dice {st[k]['dice']:.3f}" for k in floors))
    for name, floor in floors.items():
        assert st[name]["dice"] >= floor, (name, st[name]["dice"])
        assert (out / f"{name}.nii.gz").is_file() and (out / f"{name}.montage.png").is_file()
    assert not (out / "broken.nii.gz").exists() and not (out / "broken.montage.png").exists()
    n_rows, n_thumbs, thumbs = report_rows(out)
    assert (n_rows, n_thumbs) == (5, 4)
    assert all((out / t).is_file() for t in thumbs)  # relative links: the page opens from disk
    assert (out / "dice.png").is_file() and 'src="dice.png"' in (out / "report.html").read_text()
    assert not list(out.glob(".*"))

    # Re-run on an existing cluster (--scheduler): the finished rows are skipped, a row whose
    # options changed is redone, the failed row is tried again and fails again.
    rows = [dict(r) for r in cohort["rows"]]
    rows[1]["label_value"] = 3
    write_manifest(cohort["manifest"], rows)
    before = {k: (out / f"{k}.nii.gz").stat().st_mtime_ns for k in ("chaos8_spleen", "chaos5_from8")}
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        rc, so, se = run_batch_cli([cohort["manifest"], "-o", out, "--scheduler", cluster.scheduler_address], capsys)
    assert rc == 1, se
    assert "1 done, 1 failed, 3 skipped" in so, so
    assert {k: (out / f"{k}.nii.gz").stat().st_mtime_ns for k in before} == before
    assert statuses(out)["ct5_lkidney"]["key"] != st["ct5_lkidney"]["key"]

    # --force redoes every row (of a manifest without the two longest jobs).
    quick = write_manifest(cohort["dir"] / "quick.csv", [rows[i] for i in (0, 3, 4)])
    rc, so, se = run_batch_cli([quick, "-o", out, "--workers", "2", "--force", "--quiet"], capsys)
    assert rc == 1 and "2 done, 1 failed, 0 skipped" in so, so
    assert (out / "chaos8_spleen.nii.gz").stat().st_mtime_ns != before["chaos8_spleen"]
    assert report_rows(out)[:2] == (3, 2)


def _expect_refused(cohort, capsys, rows: list[dict] | str, pattern: str) -> None:
    manifest = cohort["dir"] / "bad.csv"
    if isinstance(rows, str):
        manifest.write_text(rows)
    else:
        write_manifest(manifest, rows)
    before = sorted(str(p) for p in cohort["dir"].rglob("*"))
    rc, so, se = run_batch_cli([manifest, "-o", cohort["out"]], capsys)
    lines = [line for line in se.splitlines() if line.startswith("fob: error:")]
    assert rc == 2 and len(lines) == 1, se
    assert pattern in lines[0], lines[0]
    assert "Dask" not in se  # refused before any cluster started
    assert sorted(str(p) for p in cohort["dir"].rglob("*")) == before  # no OUTDIR, nothing written
    with capsys.disabled():
        print(f"\n{lines[0]}")


def test_bad_manifests_are_refused_before_any_work(cohort, capsys) -> None:
    good = cohort["rows"][:3]
    _expect_refused(cohort, capsys, "image,segmenter\nx.nii.gz,graphcut\n", "missing column(s) support_mask")
    _expect_refused(cohort, capsys, [{**good[0], "organ": 4}], "unknown column(s) organ")
    _expect_refused(cohort, capsys, [good[0], {**good[1], "image": "inputs/nope.nii.gz"}],
                    "row 2: image inputs/nope.nii.gz not found")
    _expect_refused(cohort, capsys, [good[0], good[1], {**good[2], "name": "chaos8_spleen"}],
                    "row 3: writes chaos8_spleen.nii.gz like row 1 (duplicate output")
    _expect_refused(cohort, capsys, [good[0], {**good[1], "output": "inputs/sup_chaos8.nii.gz"}],
                    "row 2: its output sup_chaos8.nii.gz would overwrite an input of row 1")
    _expect_refused(cohort, capsys, [good[0], {**good[1], "slices": "9"}], "row 2: slices: must be 'auto' or 'A:B'")
    _expect_refused(cohort, capsys, [good[0], {**good[1], "window": "40"}], "row 2:")
    _expect_refused(cohort, capsys, [good[0], {**good[1], "absent_slices": "3-9"}],
                    "row 2: absent_slices: must be slice indices")
    _expect_refused(cohort, capsys, [good[0], {**good[1], "name": "dice", "output": "out/dice.png"}],
                    "row 2: output dice.png is the cohort's report")
    _expect_refused(cohort, capsys, [good[0], {**good[1], "refine": "sam-vit-h"}],
                    "row 2: refine: choose from none, litemedsam")
    _expect_refused(cohort, capsys, "image,support_mask\n", "has no row")


def test_absent_slices_column_reaches_the_request(cohort) -> None:
    from FoBSegmentLib.batch.manifest import read_manifest
    from FoBSegmentLib.files import SegmentRequest

    rows = [{**cohort["rows"][0], "absent_slices": "17, 4"}, cohort["rows"][1]]
    got = read_manifest(write_manifest(cohort["dir"] / "ends.csv", rows), cohort["out"])
    assert SegmentRequest(**got[0].request).absent_slices == (4, 17)
    assert SegmentRequest(**got[1].request).absent_slices == ()



def test_refine_column_reaches_the_request(cohort) -> None:
    from FoBSegmentLib.batch.manifest import read_manifest
    from FoBSegmentLib.files import SegmentRequest

    rows = [{**cohort["rows"][0], "refine": "litemedsam"}, {**cohort["rows"][1], "refine": "none"}]
    got = read_manifest(write_manifest(cohort["dir"] / "refine.csv", rows), cohort["out"])
    assert SegmentRequest(**got[0].request).settings().refine == "litemedsam"
    assert SegmentRequest(**got[1].request).settings().refine is None


def test_ctrl_c_stops_cleanly_and_the_rerun_finishes(cohort) -> None:
    """Ctrl-C in a terminal (SIGINT to the whole process group: the command and its Dask workers)
    once the first row is done: exit code 130 and one line, no traceback, no partial file, every label
    map has its 'done' record beside it, the report exists; the next run finishes the cohort without
    redoing the finished rows."""
    import os
    import signal
    import subprocess
    import sys

    from FoBSegmentLib.batch.manifest import read_manifest
    from FoBSegmentLib.batch.run import run_batch

    out = cohort["out"]
    # Six rows, so that some are still queued or running when the first one finishes (the two
    # same-volume jobs three times each; the cross-patient one would only make the test longer).
    same = cohort["rows"][:2]
    six = write_manifest(cohort["dir"] / "six.csv", [{**r, "name": r["name"] + tail} for tail in ("", "_again", "_third")
                                                    for r in same])
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen([sys.executable, "-m", "FoBSegmentLib.cli", "batch", str(six), "-o", str(out),
                             "--workers", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.status.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        so, se = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, se
    assert se.strip().splitlines()[-1] == "fob: cancelled" and "Traceback" not in se, se
    rows = read_manifest(six, out)
    done = {k for k, v in statuses(out).items() if v["status"] == "done"}
    assert done and len(done) < len(rows)
    assert {k for k, v in statuses(out).items()} == done  # no row recorded as failed by the stop
    assert {p.name[: -len(".nii.gz")] for p in out.glob("*.nii.gz")} == done
    assert not list(out.glob(".*"))
    assert report_rows(out)[:2] == (len(rows), len(done))
    first_times = {k: (out / f"{k}.nii.gz").stat().st_mtime_ns for k in done}
    summary = run_batch(rows, out, workers=2, progress=False)
    assert summary.skipped == len(done) and summary.done == len(rows) - len(done) and summary.failed == 0
    assert {k: (out / f"{k}.nii.gz").stat().st_mtime_ns for k in done} == first_times


@pytest.mark.slow
def test_unreachable_scheduler_is_one_line_and_leaves_no_folder(cohort, capsys) -> None:
    """--scheduler with nothing listening (127.0.0.1, a port just closed): after the connect timeout
    (20 s), one line and no OUTDIR."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, so, se = run_batch_cli([cohort["manifest"], "-o", cohort["out"], "--scheduler", f"tcp://127.0.0.1:{port}"],
                               capsys)
    assert rc == 2 and se.strip().splitlines()[-1].startswith("fob: error: cannot reach the Dask scheduler"), se
    assert not cohort["out"].exists()
