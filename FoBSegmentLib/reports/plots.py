"""The plots of `fob evaluate --protocol propagation`, drawn from its JSON records (matplotlib, Agg).

Records: one dict per (dataset, case, organ, method) with at least `dataset`, `organ`, `method`,
`dice` (None when skipped) and `annotated` (the annotated slice indices), as
`evaluate.propagation.evaluate_case` writes them into the report's "records".

    write_evaluation_plots(records, "results/propagation.json")
    -> results/propagation.dice_by_organ.png       Dice per organ and method (box per method, per organ)
    -> results/propagation.dice_by_annotated.png   mean Dice per number of annotated slices, per method
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

ORGAN_NAMES = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
# Okabe-Ito: distinguishable for the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def _stem(path: Path) -> Path:
    name = path.name
    for suffix in (".json", ".md", ".txt"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return path.with_name(name)


def _scored(records: Iterable[dict]) -> list[dict]:
    return [r for r in records if r.get("dice") is not None]


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig, path: Path) -> Path:
    from FoBSegmentLib.atomic import atomic_output

    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_dice_by_organ(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Box plots of the Dice per organ (groups) and method (colours), every case a dot."""
    recs = _scored(records)
    if not recs:
        raise ValueError("no scored record (every Dice is missing): nothing to plot")
    organs = sorted({int(r["organ"]) for r in recs})
    methods = list(dict.fromkeys(r["method"] for r in recs))
    fig = _figure(max(5.0, 1.2 + 0.5 * len(organs) * len(methods)), 3.6)
    ax = fig.subplots()
    width = 0.8 / len(methods)
    for mi, m in enumerate(methods):
        colour = PALETTE[mi % len(PALETTE)]
        for oi, o in enumerate(organs):
            vals = [float(r["dice"]) for r in recs if r["method"] == m and int(r["organ"]) == o]
            if not vals:
                continue
            x = oi + (mi - (len(methods) - 1) / 2) * width
            ax.boxplot([vals], positions=[x], widths=width * 0.85, patch_artist=True, showfliers=False,
                       boxprops={"facecolor": colour, "alpha": 0.35, "edgecolor": colour},
                       medianprops={"color": colour}, whiskerprops={"color": colour}, capprops={"color": colour})
            ax.scatter(np.full(len(vals), x), vals, s=9, color=colour, zorder=3)
        ax.plot([], [], "s", color=colour, label=m)
    ax.set_xticks(range(len(organs)), [ORGAN_NAMES.get(o, str(o)) for o in organs])
    ax.set_xlim(-0.6, len(organs) - 0.4)
    ax.set_ylim(0, 1)
    ax.set_ylabel("3D Dice")
    ax.set_title("Dice per organ and method (each dot a case)", fontsize=10)
    ax.legend(fontsize=7, loc="lower left", ncols=min(len(methods), 4))
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_dice_by_annotated(records: Iterable[dict], path: str | os.PathLike) -> Path:
    """Mean Dice (with min-max bars) against the number of annotated slices, one line per method."""
    recs = _scored(records)
    if not recs:
        raise ValueError("no scored record (every Dice is missing): nothing to plot")
    methods = list(dict.fromkeys(r["method"] for r in recs))
    fig = _figure(5.0, 3.4)
    ax = fig.subplots()
    counts_all: set[int] = set()
    for mi, m in enumerate(methods):
        by_n: dict[int, list[float]] = {}
        for r in recs:
            if r["method"] == m:
                by_n.setdefault(len(r.get("annotated") or [None]), []).append(float(r["dice"]))
        ns = sorted(by_n)
        counts_all |= set(ns)
        means = [float(np.mean(by_n[n])) for n in ns]
        lo = [means[i] - min(by_n[n]) for i, n in enumerate(ns)]
        hi = [max(by_n[n]) - means[i] for i, n in enumerate(ns)]
        # Methods side by side around each count, so their bars do not hide each other.
        shift = (mi - (len(methods) - 1) / 2) * 0.08
        ax.errorbar([n + shift for n in ns], means, yerr=[lo, hi], marker="o", capsize=3,
                    color=PALETTE[mi % len(PALETTE)], label=m)
    ax.set_xticks(sorted(counts_all))
    ax.set_xlim(min(counts_all) - 0.5, max(counts_all) + 0.5)
    ax.set_xlabel("annotated slices")
    ax.set_ylabel("3D Dice (mean, min-max)")
    ax.set_ylim(0, 1)
    ax.set_title("Dice per number of annotated slices", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, Path(path))


def write_evaluation_plots(records: Iterable[dict], table_path: str | os.PathLike) -> list[Path]:
    """Both plots next to the evaluation's table `table_path` (its name without .json/.md + suffixes);
    none (an empty list) when no record has a Dice, e.g. every method skipped."""
    recs = list(records)
    if not _scored(recs):
        return []
    stem = _stem(Path(table_path))
    return [
        plot_dice_by_organ(recs, stem.with_name(stem.name + ".dice_by_organ.png")),
        plot_dice_by_annotated(recs, stem.with_name(stem.name + ".dice_by_annotated.png")),
    ]
