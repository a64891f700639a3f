"""What the propagation protocol (`evaluate/propagation.py`) reports: per-dataset Dice tables, the
error breakdown, the JSON report and the `propagation` section of docs/RESULTS.md.

Records are the dicts `propagation.evaluate_case` returns, one per (case, organ, method); Dice
values are fractions in [0, 1], printed as percentages.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from FoBSegmentLib.atomic import write_text_atomic
from FoBSegmentLib.evaluate.datasets import DATASET_TITLES, ORGANS, Case
from FoBSegmentLib.evaluate.propagation import CROSS_METHODS, METHODS, PIPELINE_SOURCES
from FoBSegmentLib.evaluate.report import markers, write_section

SECTION_START, SECTION_END = markers("propagation")
# A run of the cross-patient rows only (`--methods cross`) writes its own section (issue 20).
CROSS_START, CROSS_END = markers("propagation-cross")
CROSS_TARGETS = {"cross1": 75.0, "crossvol": 85.0}
# FoB + SAM ViT-H in the paper, Setting I mean Dice (../shared/docs/fob_method.md, 13.1): 3 support
# slices of another patient's labelled volume, the query slices chosen from its ground truth (11.1),
# as the `crossvol_range` row is given them.
PAPER_FOB_SAM = {"chaos": 84.46, "synapse": 86.21}
# Baselines that need at most 3 annotated slices (the bar for every organ).
FEW_SLICE_BASELINES = ("fill3", "plain", "copy")
TARGET_MEAN = 90.0
ERROR_KINDS = ("missed_slices_fn", "extra_slices_fp", "inslice_fn", "inslice_fp")


# ----------------------------------------------------------------------------------------------
# summaries


def summarise(records: list[dict], datasets: list[str], organs: list[int], methods: list[str]) -> dict:
    """dataset -> method -> {organ name: mean Dice over cases, 'mean': mean over organs, 'n': cases}."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for ds in datasets:
        table[ds] = {}
        for m in methods:
            row: dict[str, Any] = {}
            for o in organs:
                vals = [r["dice"] for r in records if r["dataset"] == ds and r["method"] == m
                        and r["organ"] == o and r.get("dice") is not None]
                row[ORGANS[o]] = float(np.mean(vals)) if vals else None
                row.setdefault("n", len(vals))
            organ_means = [row[ORGANS[o]] for o in organs]
            row["mean"] = float(np.mean(organ_means)) if organ_means and all(v is not None for v in organ_means) else None
            table[ds][m] = row
    return table


def breakdown_summary(records: list[dict], datasets: list[str], methods: list[str]) -> dict:
    """dataset -> method -> organ -> share of the Dice loss per error kind (sums over cases).

    Dice = 2TP / (2TP + FP + FN), so the loss splits exactly into FN and FP voxel counts; each kind is
    reported as its fraction of (FP + FN), plus the mean Dice and, for chains, the mean Dice with
    the best stop (`propagation.best_stop_dice`, reads the reference).
    """
    out: dict[str, dict] = {}
    for ds in datasets:
        out[ds] = {}
        for m in methods:
            out[ds][m] = {}
            for o, name in ORGANS.items():
                rs = [r for r in records if r["dataset"] == ds and r["method"] == m and r["organ"] == o and r.get("errors")]
                if not rs:
                    continue
                tot = {k: sum(r["errors"][k] for r in rs) for k in ERROR_KINDS}
                err = sum(tot.values())
                out[ds][m][name] = {k: (tot[k] / err if err else 0.0) for k in ERROR_KINDS}
                best = [r["dice_best_stop"] for r in rs if r.get("dice_best_stop") is not None]
                out[ds][m][name]["dice"] = float(np.mean([r["dice"] for r in rs]))
                out[ds][m][name]["dice_best_stop"] = float(np.mean(best)) if len(best) == len(rs) else None
    return out


# ----------------------------------------------------------------------------------------------
# tables and Markdown


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def format_table(summary: dict, dataset: str, organs: list[int], methods: list[str], markdown: bool = False) -> str:
    """Organ x method Dice (%) table, one row per method, mean over organs last."""
    names = [ORGANS[o] for o in organs]
    rows = [[METHODS[m][0], *[_pct(summary[dataset][m][n]) for n in names], _pct(summary[dataset][m]["mean"]),
             str(summary[dataset][m]["n"])] for m in methods]
    head = ["method", *names, "mean", "cases"]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            lines.append("| " + " | ".join([r[0], *r[1:-2], f"**{r[-2]}**", r[-1]]) + " |")
        return "\n".join(lines)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]])


def target_lines(table: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown bullets: the default pipeline (FoB hybrid, else the neighbour chain) against the
    issue's target (mean >= 90) and, organ by organ, against the best baseline with at most 3
    annotated slices, computed from `table` (method -> organ -> Dice in [0, 1])."""
    ours = next((m for m in ("hybrid", "neighbour") if table.get(m, {}).get("mean") is not None), None)
    if ours is None:
        return []
    row = table[ours]
    gap = 100 * row["mean"] - TARGET_MEAN
    out = [f"- {METHODS[ours][0]} (the default pipeline): mean {100 * row['mean']:.1f}, "
           + (f"target {TARGET_MEAN:.0f} reached" if gap >= 0 else f"short of {TARGET_MEAN:.0f} by {-gap:.1f}")]
    parts = []
    for organ in (o for o in ORGANS.values() if row.get(o) is not None):
        cands = [(table[m][organ], m) for m in FEW_SLICE_BASELINES if table.get(m, {}).get(organ) is not None]
        if cands:
            best, m = max(cands)
            parts.append(f"{organ} {100 * row[organ]:.1f} vs {100 * best:.1f} ({METHODS[m][0]}, "
                         f"{100 * (row[organ] - best):+.1f})")
    if parts:
        out.append("- per organ against the best baseline with at most 3 annotated slices: " + "; ".join(parts))
    return out + [""]


def _header_lines(report: dict) -> list[str]:
    lines = [
        SECTION_START,
        "## Propagation from one annotated slice (issue 10)",
        "",
        "Generated by `FoBSegmentLib/evaluate/propagation.py`; do not edit by hand (only the text between",
        "the propagation markers is replaced).",
        "",
        f"- command: `{report['command']}`",
        f"- segmenter: `{report['segmenter']}`",
        f"- FoB model: {report['model']}",
        f"- date: {report['date']}, {report['host']['cpus']} CPUs, {report['seconds']:.0f} s",
        "- protocol: per case and organ, the annotated slice is the middle of the organ's axial slice range "
        "in the reference; 3D Dice over the whole volume (%), mean over cases; `mean` = mean over organs.",
        "- baselines: `fill-between N` = Slicer's Fill between slices (ITK MorphologicalContourInterpolator, "
        "Slicer's settings) from N reference slices spread evenly over the organ's range, both end slices "
        "included; `mask copy` = the annotated mask on every slice of the organ's range, the range taken from "
        "the reference (optimistic by definition); `mask propagation` = the plain baseline (ring and "
        "points from the adjacent slice's result, the same segmenter without its shape prior, stops only when the mask "
        "vanishes or jumps); `neighbour chain` = `fob segment --prompts-from neighbour` (no model).",
    ]
    lines += [f"- note: {n}" for n in report.get("notes", [])]
    lines.append("")
    extra = [m for m in report["methods"] if m in ("neighbour3", "ceiling")]
    if extra:
        lines += ["Analysis rows (not part of the issue's comparison):", ""]
        lines += [f"- `{METHODS[m][0]}`: {report['methods'][m]}" for m in extra]
        lines.append("")
    return lines


def _breakdown_lines(loss: dict) -> list[str]:
    """The 'where the Dice is lost' table of one dataset (pipeline methods only)."""
    rows = [(m, o, v) for m, per in loss.items() if m in PIPELINE_SOURCES for o, v in per.items()]
    if not rows:
        return []
    lines = [
        "Where the Dice is lost (share of all FP + FN voxels, summed over cases): organ ends not "
        "reached, slices segmented beyond the organ, misses and leaks on slices both hold.",
        "",
        "| method | organ | Dice | Dice with the best stop (reads ref.) | ends missed (FN) "
        "| beyond the organ (FP) | in-slice misses (FN) | in-slice leaks (FP) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, o, v in rows:
        cells = [f"{100 * v[k]:.0f}%" for k in ERROR_KINDS]
        lines.append(f"| {METHODS[m][0]} | {o} | {_pct(v.get('dice'))} | {_pct(v.get('dice_best_stop'))} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


PROMPT_KINDS = {"used": "prompts the segmenter received", "fob_ring": "FoB's ring (SPR), every point",
                "fob_ring_coarse": "FoB's ring before SPR (heatmap argmax), every point",
                "fob_ring_used": "FoB's ring, the points the chain used"}


def prompt_quality_summary(records: list[dict], datasets: list[str], methods: list[str]) -> dict:
    """dataset -> method -> kind -> {"bg_inside", "ring_distance", "slices"}: the per-slice prompt
    quality of `propagation.prompt_quality`, averaged over every scored slice of every case and organ."""
    out: dict[str, dict] = {}
    for ds in datasets:
        out[ds] = {}
        for m in methods:
            rs = [r for r in records if r["dataset"] == ds and r["method"] == m and r.get("prompt_quality")]
            for kind in PROMPT_KINDS:
                per = [p for r in rs for p in r["prompt_quality"].get(kind, {}).get("per_slice", [])]
                if not per:
                    continue
                dists = [p[3] for p in per if p[3] is not None]
                out[ds].setdefault(m, {})[kind] = {
                    "slices": len(per),
                    "bg_inside": float(np.mean([p[2] / p[1] for p in per])),
                    "ring_distance": float(np.mean(dists)) if dists else None,
                }
    return out


def _prompt_quality_lines(quality: dict) -> list[str]:
    """The prompt-quality table of one dataset."""
    rows = [(m, k, v) for m, per in quality.items() for k, v in per.items()]
    if not rows:
        return []
    lines = [
        "Background prompts per slice against the reference (scoring only): share inside the organ and mean "
        "distance to its contour, averaged over the segmented slices of every case and organ.",
        "",
        "| method | prompts | slices | background points inside the organ | mean distance to the contour (px) |",
        "|---|---|---|---|---|",
    ]
    for m, k, v in rows:
        d = "-" if v["ring_distance"] is None else f"{v['ring_distance']:.1f}"
        lines.append(f"| {METHODS[m][0]} | {PROMPT_KINDS[k]} | {v['slices']} | {100 * v['bg_inside']:.1f}% | {d} |")
    return lines + [""]


def _is_cross(report: dict) -> bool:
    return bool(report["methods"]) and all(m in CROSS_METHODS for m in report["methods"])


def cross_records_lines(report: dict) -> list[str]:
    """Targets of issue 20 and the per-case warnings of the cross-patient pipeline rows."""
    out: list[str] = []
    for ds, block in report["datasets"].items():
        table = block["dice"]
        for m, target in CROSS_TARGETS.items():
            row = table.get(m)
            if not row or row.get("mean") is None:
                continue
            organs = {o: row[o] for o in ORGANS.values() if row.get(o) is not None}
            worst = min(organs, key=lambda o: organs[o])
            recs = [r for r in report["records"] if r["dataset"] == ds and r["method"] == m and r.get("dice") is not None]
            silent = [r for r in recs if r["dice"] < 0.2 and not r.get("warning")]
            warned = [r for r in recs if r.get("warning")]
            gap = 100 * row["mean"] - target
            line = (f"- {block['title'].split(' (')[0]}, {METHODS[m][0]}: mean {100 * row['mean']:.1f} "
                    + (f"(target {target:.0f} reached)" if gap >= 0 else f"(short of {target:.0f} by {-gap:.1f})")
                    + f"; lowest organ {worst} {100 * organs[worst]:.1f}; {len(warned)} of {len(recs)} cases warned; "
                    f"{len(silent)} case(s) below 20 without a warning")
            if m == "crossvol" and table.get("atlas_deform"):
                beat = [o for o in organs if table["atlas_deform"].get(o) is not None and organs[o] > table["atlas_deform"][o]]
                line += f"; above the deformable atlas on {len(beat)} of {len(organs)} organs"
            out.append(line)
        row = table.get("crossvol_range")
        if row and row.get("mean") is not None and ds in PAPER_FOB_SAM:
            one = table.get("cross1_range", {}).get("mean")
            out.append(f"- {block['title'].split(' (')[0]}, given the organ's slices as FoB's evaluation gives them: "
                       + (f"one slice {100 * one:.1f}, " if one is not None else "")
                       + f"volume {100 * row['mean']:.1f}, against FoB + SAM ViT-H's {PAPER_FOB_SAM[ds]:.2f} in the paper")
    return out + [""] if out else []


def cross_markdown_section(report: dict) -> str:
    """The cross-patient section of docs/RESULTS.md (issue 20), markers included."""
    lines = [
        CROSS_START,
        "## Across patients: another patient's annotation segments the query (issue 20)",
        "",
        "Generated by `FoBSegmentLib/evaluate/propagation.py`; do not edit by hand (only the text between",
        "the propagation-cross markers is replaced).",
        "",
        f"- command: `{report['command']}`",
        f"- segmenter: `{report['segmenter']}`",
        f"- date: {report['date']}, {report['host']['cpus']} CPUs, {report['seconds']:.0f} s",
        "- protocol: each case is the query, the support is the next case of the same dataset (sorted ids, "
        "cyclic); 3D Dice over the whole query volume (%), mean over cases; `mean` = mean over organs.",
    ]
    lines += [f"- `{METHODS[m][0]}`: {report['methods'][m]}" for m in report["methods"]]
    lines += [f"- note: {n}" for n in report.get("notes", []) if "pipeline error" not in n]
    lines.append("")
    for block in report["datasets"].values():
        lines += [f"### {block['title']}", "", block["markdown_table"], ""]
    lines += cross_records_lines(report)
    lines.append(CROSS_END)
    return "\n".join(lines)


def markdown_section(report: dict) -> str:
    """The propagation section of docs/RESULTS.md, markers included (the cross-patient section for
    a run of the cross-patient rows only)."""
    if _is_cross(report):
        return cross_markdown_section(report)
    lines = _header_lines(report)
    for ds, block in report["datasets"].items():
        lines += [f"### {block['title']}", "", block["markdown_table"], ""]
        lines += target_lines(block["dice"])
        lines += _breakdown_lines(report.get("breakdown", {}).get(ds, {}))
        lines += _prompt_quality_lines(report.get("prompt_quality", {}).get(ds, {}))
    lines.append(SECTION_END)
    return "\n".join(lines)


def write_markdown_section(path: Path, section: str) -> None:
    """Replace the text between the propagation markers of `path` (append the section when the file
    has none; create the file with only the section). Atomic."""
    write_section(path, section, header="")


# ----------------------------------------------------------------------------------------------
# the report of one run


def build_report(
    records: list[dict],
    cases: list[Case],
    organs: list[int],
    methods: list[str],
    *,
    command: str,
    segmenter: str,
    model_line: str,
    notes: list[str],
    seconds: float,
) -> dict[str, Any]:
    """The JSON report of a run: header, per-dataset tables (also printed, as the run's output), the
    error breakdown and every record. A record with a pipeline error adds a note (also on stderr)."""
    used = list(dict.fromkeys(c.dataset for c in cases))
    summary = summarise(records, used, organs, methods)
    report: dict[str, Any] = {
        "protocol": "propagation",
        "command": command,
        "segmenter": segmenter,
        "model": model_line,
        "methods": {m: METHODS[m][1] for m in methods},
        "organs": {o: ORGANS[o] for o in organs},
        "date": time.strftime("%Y-%m-%d"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "seconds": seconds,
        "notes": notes,
        "datasets": {},
        "breakdown": breakdown_summary(records, used, methods),
        "prompt_quality": prompt_quality_summary(records, used, methods),
        "records": records,
    }
    for r in (r for r in records if r.get("error")):
        line = (f"{r['dataset']} case {r['case']} {ORGANS[r['organ']]} {r['method']}: pipeline error "
                f"({r['error']}); scored as the annotated slice alone")
        report["notes"].append(line)
        print(f"note: {line}", file=sys.stderr)
    for ds in used:
        n_cases = len([c for c in cases if c.dataset == ds])
        title = f"{DATASET_TITLES[ds]} ({n_cases} cases), segmenter {report['segmenter']}"
        print(f"\n{title} - 3D Dice % over the whole volume, one annotated slice (baselines: see methods)")
        print(format_table(summary, ds, organs, methods))
        report["datasets"][ds] = {
            "title": title,
            "dice": summary[ds],
            "markdown_table": format_table(summary, ds, organs, methods, markdown=True),
        }
    return report


def merge_reports(paths: list[str]) -> dict[str, Any]:
    """One report from earlier `--json` reports of this protocol (`--from-json`: e.g. one per dataset,
    run in parallel, or rows added by a later run), as if one run had made it: the tables are rebuilt
    from their records, with every method any of them ran, the seconds summed. They must share
    segmenter and model."""
    from types import SimpleNamespace

    from FoBSegmentLib.evaluate.report import read_reports

    records, head = read_reports(paths, "propagation", "breakdown", ("segmenter", "model"))
    cases = [SimpleNamespace(dataset=ds, case_id=c) for ds, c in dict.fromkeys((r["dataset"], r["case"]) for r in records)]
    organs = sorted({int(r["organ"]) for r in records})
    ran = {r["method"] for r in records}
    return build_report(records, cases, organs, [m for m in METHODS if m in ran],
                        command=" ; ".join(c for c in dict.fromkeys(head["commands"]) if c),
                        segmenter=head["segmenter"], model_line=head["model"],
                        notes=list(dict.fromkeys(head.get("notes", []))), seconds=head["seconds_total"])


def write_outputs(report: dict, json_path: str | None, markdown_path: str | None) -> None:
    """--json: the whole report; --markdown: its section between the propagation markers."""
    if json_path:
        write_text_atomic(Path(json_path), json.dumps(report, indent=1) + "\n")
        print(f"wrote {json_path}")
        from FoBSegmentLib.reports.plots import write_evaluation_plots

        for plot in write_evaluation_plots(report["records"], json_path):
            print(f"wrote {plot}")
    if markdown_path:
        write_markdown_section(Path(markdown_path), markdown_section(report))
        name = "propagation-cross" if _is_cross(report) else "propagation"
        print(f"wrote the {name} section of {markdown_path}")
