"""Targets, comparisons, the printed table and profiler summaries of the benchmark suite."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

# ---------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One target of issue 8. `keys`: result rows that can judge it, first available wins.
    metric: 'median_ms' (per slice), 'total_s' (whole job) or 'scaled40_s' (per-slice time x 40)."""

    name: str
    keys: tuple[str, ...]
    device: str  # 'cpu' or 'cuda'
    metric: str
    limit: float
    unit: str


TARGETS = (
    Target("prompt edit -> new mask (decoder only, cached embedding)",
           ("sam-decoder-segmenter", "sam-decoder"), "cpu", "median_ms", 100.0, "ms/slice"),
    Target("FoB lite prompts, one slice, 256x256", ("prompts-lite-single",), "cpu", "median_ms", 50.0, "ms"),
    Target("whole-volume propagation, lite + weight-free, 40-slice range",
           ("propagation-lite-graphcut", "propagation-lite-grabcut"), "cpu", "scaled40_s", 20.0, "s"),
    Target("GPU: FoB prompts, 100-slice range, batched", ("prompts-lite-range100",), "cuda", "total_s", 1.0, "s"),
    Target("GPU: SAM vit_h, full range", ("propagation-lite-sam-vit-h",), "cuda", "scaled40_s", 30.0, "s"),
    Target("one correction -> updated volume, 40-slice range (issue 16)", ("correction-update",), "cpu",
           "total_s", 3.0, "s"),
)


def _find(rows: list[dict[str, Any]], key: str, device: str) -> dict[str, Any] | None:
    for r in rows:
        if r["key"] == key and r["device"].split(":")[0] == device and r["status"] == "ok":
            return r
    return None


def _metric(row: dict[str, Any], metric: str) -> float | None:
    if metric == "median_ms":
        return row.get("median_ms")
    if metric == "total_s":
        return row.get("total_s")
    if metric == "scaled40_s":
        value = (row.get("params") or {}).get("scaled_to_40_slices_s")
        if value is None:
            return None
        total = row.get("total_s") or 0.0
        return max(float(value), float(total))
    raise ValueError(metric)


def evaluate_targets(rows: list[dict[str, Any]], devices: list[str], cuda_available: bool) -> list[dict[str, Any]]:
    out = []
    for t in TARGETS:
        entry: dict[str, Any] = {"target": t.name, "limit": t.limit, "unit": t.unit, "device": t.device,
                                 "measured": None, "status": "SKIP", "row": None, "detail": ""}
        if t.device == "cuda" and not cuda_available:
            entry["detail"] = "skipped: no CUDA"
        elif t.device not in [d.split(":")[0] for d in devices]:
            entry["detail"] = f"skipped: --device does not include {t.device}"
        else:
            row = next((r for k in t.keys if (r := _find(rows, k, t.device)) is not None), None)
            value = _metric(row, t.metric) if row else None
            if row is None or value is None:
                entry["detail"] = "not measured (group not run, unavailable or failed)"
            else:
                entry.update(measured=round(float(value), 3), row=row["case"],
                             status="PASS" if value < t.limit else "FAIL")
                if t.metric == "scaled40_s":
                    p = row.get("params") or {}
                    entry["detail"] = (f"{row.get('total_s')} s measured for {p.get('range_slices')} slices, "
                                       f"scaled to 40 slices")
        out.append(entry)
    return out


def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios against the authors' configuration (dilated ResNet-101, 256 x 256, one slice at a time)."""
    pairs = [
        ("authors' resnet101 one slice / lite one slice", "prompts-resnet101-single", "prompts-lite-single", "median_ms"),
        ("authors' resnet101 one slice / lite batched", "prompts-resnet101-single", "prompts-lite-batch", "median_ms"),
        ("authors' resnet101 one slice / lite, support encoded once", "prompts-resnet101-single",
         "prompts-lite-single-cached", "median_ms"),
        ("propagation: resnet101 + grabcut / lite + grabcut", "propagation-resnet101-grabcut",
         "propagation-lite-grabcut", "total_s"),
    ]
    out = []
    for device in sorted({r["device"] for r in rows}):
        dev = device.split(":")[0]
        for name, num, den, metric in pairs:
            a, b = _find(rows, num, dev), _find(rows, den, dev)
            if a and b and a.get(metric) and b.get(metric):
                out.append({"comparison": name, "device": device, "numerator": a[metric], "denominator": b[metric],
                            "unit": "ms/slice" if metric == "median_ms" else "s", "ratio": round(a[metric] / b[metric], 2)})
    return out


def estimates(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole-range SAM propagation from per-slice parts when it was not run end to end (--quick)."""
    out = []
    prop = _find(rows, "propagation-lite-grabcut", "cpu")
    n = (prop or {}).get("params", {}).get("range_slices")
    for variant in ("vit_b", "vit_l", "vit_h"):
        for dev in ("cpu", "cuda"):
            if _find(rows, f"propagation-lite-sam-{variant.replace('_', '-')}", dev):
                continue
            enc = _find(rows, f"sam-encoder-{variant}", dev)
            dec = _find(rows, "sam-decoder", dev)
            fob = _find(rows, "prompts-lite-single", dev) or _find(rows, "prompts-lite-single", "cpu")
            if not (enc and dec and fob) or n is None:
                continue
            per = (enc["median_ms"] + dec["median_ms"] + fob["median_ms"]) / 1e3
            out.append({"estimate": f"propagation FoB lite + SAM {variant}, {n}-slice liver range", "device": dev,
                        "seconds": round(per * (n - 1), 1), "seconds_40_slices": round(per * 40, 1),
                        "how": "(SAM encoder + decoder + lite prompts per slice) x segmented slices; "
                               "excludes I/O and clean-up"})
    return out


# ---------------------------------------------------------------------------------------- output


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _baseline(rows: list[dict[str, Any]]) -> str:
    values = [r["baseline_rss_mb"] for r in rows if r.get("baseline_rss_mb")]
    return f"{min(values):.0f}-{max(values):.0f}" if values else "?"


def progress_line(row: Any) -> None:
    r = row if isinstance(row, dict) else row.to_dict()
    if r["status"] == "ok":
        extra = f", total {r['total_s']:.2f} s" if r.get("total_s") is not None else ""
        per = str(r.get("unit") or "ms/slice").split("/")[-1]  # a slice, a job, a correction
        text = (f"{r['median_ms']:.1f} ms/{per} median, p90 {r['p90_ms']:.1f} (n={r['n']}){extra}, "
                f"peak +{r['peak_mem_mb']:.0f} MB")
    else:
        text = f"{r['status']}: {r['note']}"
    print(f"  [{r['device']}] {r['case']}: {text}", file=sys.stderr, flush=True)


def format_report(results: dict[str, Any]) -> str:
    rows = results["results"]
    lines: list[str] = []
    m = results["machine"]
    lines.append(f"fob bench ({'quick' if results['config']['quick'] else 'full'} mode), {m.get('date')}")
    lines.append(f"machine: {m.get('cpu_model')}, {m.get('cpus_usable')} usable cores, torch threads "
                 f"{m.get('torch_threads')}, RAM {m.get('ram_gb')} GB, torch {m.get('torch')}, "
                 f"CUDA: {m.get('cuda_device') or 'none'}")
    env = ", ".join(f"{k}={v}" for k, v in (m.get("env") or {}).items()) or "none"
    lines.append(f"load average at start / end: {m.get('loadavg_start')} / {m.get('loadavg_end')} "
                 f"(a loaded machine inflates every number); thread env: {env}")
    header = ("group", "case", "dev", "n", "median ms/slice", "p90 ms/slice", "cpu ms/slice", "total s", "peak MB",
              "status / note")
    table = [header]
    for r in rows:
        note = r["note"] if r["status"] != "ok" else ""
        if r["status"] == "ok" and r["group"] == "propagation":
            p = r.get("params") or {}
            note = f"{p.get('range_slices')} slices (x40: {p.get('scaled_to_40_slices_s')} s)"
        if r["status"] == "ok" and r["group"] == "correction":
            p = r.get("params") or {}
            note = (f"{p.get('segmenter_calls_update')} vs {p.get('segmenter_calls_full')} segmenter calls; "
                    f"full {p.get('full_repropagation_s')} s")
        if len(note) > 70:
            note = note[:67] + "..."
        status = r["status"] if r["status"] != "ok" else ""
        table.append((r["group"], r["case"], r["device"], str(r["n"] or "-"), _fmt(r["median_ms"]),
                      _fmt(r["p90_ms"]), _fmt(r.get("cpu_median_ms")), _fmt(r["total_s"], 2), _fmt(r["peak_mem_mb"], 0),
                      (status + (": " if status and note else "") + note)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        cells = [c.ljust(w) if j in (0, 1, 2, 9) else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("median / p90: wall clock per slice over n runs; cpu: process CPU time per slice, all threads "
                 "(load-independent work); peak MB: resident memory added by the case (model + working memory) "
                 "over the process after imports (torch, OpenCV, SimpleITK, segment_anything: "
                 f"{_baseline(rows)} MB resident before any case); CUDA rows add cuda_peak_mb in the JSON.")
    lines.append("")
    lines.append("targets:")
    for t in results["targets"]:
        if t["status"] == "SKIP":
            lines.append(f"  {'SKIP':4}  {t['target']} < {t['limit']:g} {t['unit']}: {t['detail']}")
        else:
            detail = f" ({t['detail']})" if t["detail"] else ""
            lines.append(f"  {t['status']:4}  {t['target']} < {t['limit']:g} {t['unit']}: "
                         f"measured {t['measured']:g} {t['unit']} [{t['device']}]{detail}")
    if results["comparisons"]:
        lines.append("")
        lines.append("against the authors' configuration (dilated ResNet-101, 256x256, one slice at a time):")
        for c in results["comparisons"]:
            lines.append(f"  [{c['device']}] {c['comparison']}: {_fmt(c['numerator'])} / {_fmt(c['denominator'])} "
                         f"{c['unit']} = x{c['ratio']:.2f}")
    if results["estimates"]:
        lines.append("")
        lines.append("estimates (not run end to end in this mode):")
        for e in results["estimates"]:
            lines.append(f"  [{e['device']}] {e['estimate']}: ~{e['seconds']:g} s "
                         f"(~{e['seconds_40_slices']:g} s for 40 slices); {e['how']}")
    profiles = [(r["case"], r["params"]["profile_top"]) for r in rows if (r.get("params") or {}).get("profile_top")]
    for case, top in profiles:
        lines.append("")
        lines.append(f"profile of '{case}' (cProfile, top by own time; cumulative in brackets):")
        for p in top["by_tottime"]:
            lines.append(f"  {p['tottime_s']:8.3f} s own  [{p['cumtime_s']:8.3f} s cum]  {p['ncalls']:>7}  {p['function']}")
        lines.append("  top by cumulative time:")
        for p in top["by_cumtime"]:
            lines.append(f"  {p['cumtime_s']:8.3f} s cum  {p['ncalls']:>7}  {p['function']}")
    return "\n".join(lines)


def profile_summary(profiler: Any, limit: int = 15) -> dict[str, list[dict[str, Any]]]:
    import pstats

    stats = pstats.Stats(profiler)
    entries = []
    for (filename, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        short = filename
        for marker in ("site-packages/", "FoBSegmentLib/"):
            if marker in filename:
                short = (marker if marker == "FoBSegmentLib/" else "") + filename.split(marker, 1)[1]
        entries.append({"function": f"{short}:{line}({func})", "ncalls": nc, "tottime_s": round(tt, 4),
                        "cumtime_s": round(ct, 4)})
    by_tt = sorted(entries, key=lambda e: -e["tottime_s"])[:limit]
    by_ct = [e for e in sorted(entries, key=lambda e: -e["cumtime_s"]) if "FoBSegmentLib" in e["function"]][:limit]
    return {"by_tottime": by_tt, "by_cumtime": by_ct}
