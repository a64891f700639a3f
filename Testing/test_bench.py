"""`fob bench`: the quick mode runs on a small subset and writes sane JSON (no timing assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from FoBSegmentLib.bench import GROUPS, SCHEMA
from FoBSegmentLib.bench.core import summarize, time_calls
from FoBSegmentLib.bench.report import TARGETS, comparisons, evaluate_targets
from FoBSegmentLib.cli import main

STATUSES = {"ok", "skipped", "unavailable", "error"}
ROW_KEYS = {"group", "case", "device", "status", "unit", "n", "items", "median_ms", "p90_ms", "min_ms",
            "mean_ms", "cpu_median_ms", "total_s", "peak_mem_mb", "peak_rss_mb", "note", "key", "params"}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    rc = main(["bench", "--quick", "--device", "cpu", "--repeats", "1", "--only", "sam-decoder", "weight-free",
               "--json", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_quick_json_schema(quick_results):
    r = quick_results
    assert r["schema"] == SCHEMA
    assert r["config"]["quick"] is True and r["config"]["devices"] == ["cpu"]
    assert r["config"]["groups"] == ["sam-decoder", "weight-free"]
    m = r["machine"]
    assert m["cpus"] >= 1 and m["torch"] and m["date"]
    assert isinstance(r["wall_s"], float) and r["wall_s"] > 0
    groups = {row["group"] for row in r["results"]}
    assert groups <= {"sam-decoder", "weight-free"} and "sam-decoder" in groups
    for row in r["results"]:
        assert ROW_KEYS <= set(row), row
        assert row["status"] in STATUSES, row
        assert row["device"] == "cpu"
        if row["status"] != "ok":
            assert row["note"], row  # every non-measured row says why
            continue
        assert row["n"] >= 1 and row["unit"] == "ms/slice"
        for k in ("median_ms", "p90_ms", "min_ms", "mean_ms"):
            assert math.isfinite(row[k]) and row[k] > 0, (k, row)
        assert row["min_ms"] <= row["median_ms"] <= row["p90_ms"] + 1e-9
        assert row["peak_mem_mb"] >= 0 and row["peak_rss_mb"] > 0
    # The raw SAM decoder case needs only segment_anything: it must have been measured.
    decoder = [row for row in r["results"] if row["key"] == "sam-decoder"]
    assert len(decoder) == 1 and decoder[0]["status"] == "ok", decoder


def test_quick_targets_and_gpu_skip(quick_results):
    targets = quick_results["targets"]
    assert [t["target"] for t in targets] == [t.name for t in TARGETS]
    for t in targets:
        assert t["status"] in {"PASS", "FAIL", "SKIP"}
        if t["status"] == "SKIP":
            assert t["detail"]
        else:
            assert t["measured"] > 0 and t["status"] == ("PASS" if t["measured"] < t["limit"] else "FAIL")
    import torch

    if not torch.cuda.is_available():
        gpu = [t for t in targets if t["device"] == "cuda"]
        assert gpu and all(t["status"] == "SKIP" and t["detail"] == "skipped: no CUDA" for t in gpu)
    decoder_target = targets[0]
    assert decoder_target["status"] in {"PASS", "FAIL"}  # judged on the decoder row measured above


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--only", "no-such-group"])
    assert exc.value.code == 2
    rc = main(["bench", "--quick", "--only", "sam-decoder", "--json", str(tmp_path / "missing" / "b.json")])
    assert rc == 2
    assert "fob: error:" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_statistics_and_target_logic():
    s = summarize([0.010, 0.020, 0.030, 0.040, 0.100])
    assert s["n"] == 5 and s["median_ms"] == pytest.approx(30.0) and s["min_ms"] == pytest.approx(10.0)
    assert s["p90_ms"] == pytest.approx(76.0)  # linear interpolation between 40 and 100
    assert summarize([])["median_ms"] is None
    calls = []
    times = time_calls(lambda: calls.append(1), repeats=3, warmup=2, items=4)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)

    def row(key, median=None, total=None, params=None, device="cpu"):
        return {"key": key, "device": device, "status": "ok", "case": key, "median_ms": median,
                "total_s": total, "params": params or {}}

    rows = [row("sam-decoder", median=80.0), row("prompts-lite-single", median=60.0),
            row("prompts-resnet101-single", median=600.0),
            row("propagation-lite-grabcut", total=10.0, params={"range_slices": 20, "scaled_to_40_slices_s": 20.0})]
    t = {e["target"]: e for e in evaluate_targets(rows, ["cpu"], cuda_available=False)}
    assert t[TARGETS[0].name]["status"] == "PASS"
    assert t[TARGETS[1].name]["status"] == "FAIL"
    assert t[TARGETS[2].name]["status"] == "FAIL"  # 20 s scaled to 40 slices is not under 20 s
    assert t[TARGETS[3].name]["detail"] == "skipped: no CUDA"
    ratio = [c for c in comparisons(rows) if c["comparison"].endswith("/ lite one slice")]
    assert ratio and ratio[0]["ratio"] == pytest.approx(10.0)


def test_groups_documented():
    table = (Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md").read_text()
    assert {"prompts", "propagation", "correction"} <= set(GROUPS)
    assert [g for g in GROUPS if f"| `{g}` |" not in table] == []
