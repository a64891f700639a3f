"""Tables, target checks and the plot of the interactive protocol (`evaluate/interactive.py`).

Every number is a mean 3D Dice (%) over the cases of a dataset; "N" counts annotated slices (for
the prompts strategy: 1 annotated slice plus N - 1 corrections by prompts).
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from FoBSegmentLib.evaluate.datasets import DATASET_TITLES, ORGANS
from FoBSegmentLib.evaluate.report import markers, write_section

SECTION = "interactive"
TARGETS = {1: 90.0, 3: 93.0, 5: 95.0}
ROWS = (("ranked", "pipeline, slices chosen by the ranking"), ("blind", "pipeline, blind annotator (largest gap)"),
        ("prompts", "pipeline, corrections by prompts (ranked slice)"), ("even", "pipeline, evenly spread incl. both ends"),
        ("even_inner", "pipeline, evenly spread, ends left out"),
        ("fill_ranked", "Fill between slices, the ranked slices"), ("fill_even", "Fill between slices, evenly spread"),
        ("oracle", "analysis: pipeline, the slice most wrong drawn next (reads ref.)"))


def _curve(rec: dict, row: str, rounds: int) -> list[float | None]:
    """Dice (%) for N = 1..rounds+1 annotated slices of one record and row (None where undefined)."""
    n_max = rounds + 1
    if row not in rec:  # a strategy left out of the run (--strategies)
        vals = []
    elif row in ("ranked", "blind", "prompts", "oracle"):
        vals = list(rec[row])
    elif row == "fill_ranked":
        vals = [None, *rec["fill_ranked"]]
    else:
        vals = [rec[row].get(str(n)) for n in range(1, n_max + 1)]
    vals = (vals + [None] * n_max)[:n_max]
    return [None if v is None else 100.0 * v for v in vals]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise(records: list[dict], rounds: int) -> dict[str, Any]:
    """{dataset: {"organs": {organ: {row: [mean per N]}}, "mean": {row: [mean over organs per N]}}}."""
    out: dict[str, Any] = {}
    for ds in sorted({r["dataset"] for r in records}):
        recs = [r for r in records if r["dataset"] == ds]
        organs: dict[str, Any] = {}
        for organ in sorted({r["organ"] for r in recs}):
            of = [r for r in recs if r["organ"] == organ]
            organs[ORGANS[organ]] = {row: [_mean([_curve(r, row, rounds)[n] for r in of]) for n in range(rounds + 1)]
                                     for row, _ in ROWS}
        mean = {row: [_mean([organs[o][row][n] for o in organs]) for n in range(rounds + 1)] for row, _ in ROWS}
        out[ds] = {"organs": organs, "mean": mean, "cases": len({r["case"] for r in recs})}
    return out


def _rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    """The ROWS this summary has numbers for (a run may leave strategies out)."""
    return [(row, label) for row, label in ROWS if any(v is not None for v in s["mean"][row])]


def check_targets(summary: dict[str, Any], rounds: int) -> list[str]:
    """One line per target of the issue whose rows were measured: met or missed, by how much."""
    lines = []
    for ds, s in summary.items():
        have = {row for row, _ in _rows(s)}
        for row in ("even", "even_inner", "ranked"):
            for n, target in TARGETS.items():
                if n > rounds + 1 or row not in have:
                    continue
                v = s["mean"][row][n - 1]
                ok = v is not None and v >= target
                lines.append(f"{ds}: {row} {n} slice(s) {v:.1f} vs target {target:.0f}: "
                             + ("met" if ok else f"missed by {target - v:.1f}"))
        misses = [f"{o} N={n + 1} ({s['organs'][o][row][n]:.1f} vs {s['organs'][o][fill][n]:.1f})"
                  for o in s["organs"] for row, fill in (("even", "fill_even"), ("ranked", "fill_ranked"))
                  for n in range(1, rounds + 1)
                  if s["organs"][o][row][n] is not None and s["organs"][o][fill][n] is not None
                  and s["organs"][o][row][n] <= s["organs"][o][fill][n]]
        if have & {"fill_even", "fill_ranked"}:
            lines.append(f"{ds}: above Fill between slices for every organ and N >= 2: "
                         + ("yes" if not misses else "no, " + "; ".join(misses)))
        for row in sorted(have & {"even", "even_inner", "ranked"}):
            m = [v for v in s["mean"][row] if v is not None]
            drops = [f"N={i + 2}" for i, (a, b) in enumerate(zip(m, m[1:])) if b < a]
            lines.append(f"{ds}: {row} monotone in N: " + ("yes" if not drops else "no, drops at " + ", ".join(drops)))
        for k in (1, 3):
            if k <= rounds and {"ranked", "blind"} <= have:
                a, b = s["mean"]["ranked"][k], s["mean"]["blind"][k]
                lines.append(f"{ds}: ranking vs blind after {k} round(s): {a:.1f} vs {b:.1f} "
                             + ("(ranking better)" if a > b else "(ranking NOT better)"))
    return lines


def build(records: list[dict], rounds: int, source: str, segmenter: str, model_line: str, notes: list[str],
          seconds: float) -> dict[str, Any]:
    summary = summarise(records, rounds)
    command = "fob " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["evaluate"] else \
        "fob evaluate --protocol interactive (called from Python)"
    return {"command": command, "date": time.strftime("%Y-%m-%d"), "prompts_from": source, "segmenter": segmenter,
            "model": model_line, "notes": notes, "rounds": rounds, "seconds": round(seconds, 1),
            "host": {"machine": platform.machine(), "cpus": os.cpu_count()},
            "summary": summary, "targets": check_targets(summary, rounds), "records": records}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _table(s: dict[str, Any], rounds: int) -> list[str]:
    head = "| organ | method | " + " | ".join(f"N={n}" for n in range(1, rounds + 2)) + " |"
    lines = [head, "|" + "---|" * (rounds + 3)]
    for organ, rows in [*s["organs"].items(), ("mean", s["mean"])]:
        for row, label in _rows(s):
            lines.append(f"| {organ} | {label} | " + " | ".join(_fmt(v) for v in rows[row]) + " |")
    return lines


def text_tables(doc: dict[str, Any]) -> str:
    out = []
    for ds, s in doc["summary"].items():
        out.append(f"{DATASET_TITLES.get(ds, ds)} ({s['cases']} cases), mean 3D Dice % by annotated slices N")
        out += _table(s, doc["rounds"])
        out.append("")
    return "\n".join(out + doc["targets"])


def plot(doc: dict[str, Any], path: Path) -> None:
    """Dice against annotated slices, one panel per organ and dataset, the baselines beside (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = doc["summary"]
    organs = list(ORGANS.values())
    fig, axes = plt.subplots(len(summary), len(organs) + 1, figsize=(4 * (len(organs) + 1), 3.4 * len(summary)),
                             squeeze=False, sharey=True)
    n = np.arange(1, doc["rounds"] + 2)
    styles = {"ranked": ("C0", "-", "o"), "blind": ("C1", "--", "s"), "prompts": ("C2", ":", "^"),
              "even": ("C3", "-", "d"), "even_inner": ("C4", "-", "v"), "fill_ranked": ("C7", "-.", "x"),
              "fill_even": ("k", "-.", "+"), "oracle": ("C5", ":", "*")}
    for i, (ds, s) in enumerate(summary.items()):
        for j, organ in enumerate([*organs, "mean"]):
            ax = axes[i][j]
            rows = s["mean"] if organ == "mean" else s["organs"].get(organ)
            if rows is None:
                ax.set_visible(False)
                continue
            for row, label in _rows(s):
                ys = np.array([np.nan if v is None else v for v in rows[row]])
                color, ls, marker = styles[row]
                ax.plot(n, ys, color=color, linestyle=ls, marker=marker, markersize=4, label=label)
            ax.set_title(f"{DATASET_TITLES.get(ds, ds)}: {organ}", fontsize=9)
            ax.set_xlabel("annotated slices N")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("3D Dice %")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from FoBSegmentLib.atomic import atomic_output

    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def markdown(doc: dict[str, Any], plot_path: str | None, section: str = SECTION) -> str:
    start, end = markers(section)
    title = "## The annotation loop (issue 16)" if section == SECTION else f"## The annotation loop (issue 16): {section}"
    # Reports merged with --from-json ran apart (often side by side): the sum of their seconds is not a wall time.
    merged = " ; " in doc["command"]
    timing = f"{doc['seconds']:.0f} s {'summed over the runs merged here' if merged else 'wall time'}"
    lines = [start, title, "",
             f"Command: `{doc['command']}`", "",
             f"Pipeline: `fob segment`'s job (prompts {doc['prompts_from']}, segmenter {doc['segmenter']}, "
             f"model {doc['model']}). {doc['rounds']} rounds; {timing} on {doc['host']['cpus']} CPUs, {doc['date']}.", ""]
    lines += [f"Note: {n}" for n in doc.get("notes") or []] + ([""] if doc.get("notes") else [])
    if plot_path:
        lines += [f"![Dice against annotated slices]({os.path.relpath(plot_path, 'docs')})", ""]
    for ds, s in doc["summary"].items():
        lines += [f"### {DATASET_TITLES.get(ds, ds)} ({s['cases']} cases): mean 3D Dice % by annotated slices N", ""]
        lines += _table(s, doc["rounds"]) + [""]
    lines += ["Targets:", ""] + [f"- {t}" for t in doc["targets"]] + ["", end]
    return "\n".join(lines) + "\n"


def write_markdown(doc: dict[str, Any], path: Path, plot_path: str | None, section: str = SECTION) -> None:
    write_section(path, markdown(doc, plot_path, section))
