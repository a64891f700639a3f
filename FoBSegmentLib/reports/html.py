"""OUTDIR/report.html of a batch: one table row per manifest row (thumbnail montage, status, time,
flags, Dice), sortable by clicking a column header, and the Dice distribution plot.

The page is one self-contained file that opens from disk with no server: the thumbnails are the
rows' own montage PNGs beside it (relative links, so OUTDIR can be moved or zipped whole), the
sorting is a few lines of inline JavaScript, and the plot is `dice.png` (matplotlib).
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

_SORT_JS = """
function sortBy(col, numeric) {
  const body = document.querySelector('#rows tbody');
  const rows = Array.from(body.rows);
  const th = document.querySelectorAll('#rows th')[col];
  const dir = th.dataset.dir === 'asc' ? -1 : 1;
  document.querySelectorAll('#rows th').forEach(h => h.dataset.dir = '');
  th.dataset.dir = dir === 1 ? 'asc' : 'desc';
  rows.sort((a, b) => {
    const x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
    if (numeric) {
      const fx = x === '' ? -Infinity : parseFloat(x), fy = y === '' ? -Infinity : parseFloat(y);
      return dir * (fx - fy);
    }
    return dir * x.localeCompare(y);
  });
  rows.forEach(r => body.appendChild(r));
}
"""

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: middle; text-align: left; }
th { cursor: pointer; background: #eee; }
th[data-dir=asc]::after { content: ' \\25B2'; } th[data-dir=desc]::after { content: ' \\25BC'; }
tr.failed td { background: #fde8e8; } tr.notrun td { background: #f4f4f4; color: #777; }
img.thumb { max-height: 160px; }
"""

COLUMNS = [("row", True), ("name", False), ("status", False), ("seconds", True), ("flags", True),
           ("Dice", True), ("montage", False), ("details", False)]


def _rows_data(outdir: Path, rows: list) -> list[dict[str, Any]]:
    from FoBSegmentLib.batch.rows import read_status

    data = []
    for row in rows:
        st = read_status(row.status_path(outdir)) or {}
        if st.get("key") not in (None, row.key()):
            st = {**st, "status": "stale", "error": "inputs or options changed since this record"}
        data.append({"row": row.number, "name": row.name, "status": st.get("status", "not run"), "st": st,
                     "montage": row.montage_path(outdir)})
    return data


def write_dice_plot(path: Path, dice: list[float]) -> None:
    """The Dice distribution (histogram over [0, 1], each row's value as a tick below it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from FoBSegmentLib.atomic import atomic_output

    fig = Figure(figsize=(5.5, 2.8), dpi=100)
    ax = fig.subplots()
    ax.hist(dice, bins=20, range=(0.0, 1.0), color="#0072B2", edgecolor="white")
    ax.plot(dice, [0] * len(dice), "|", color="black", markersize=12)
    ax.set_xlim(0, 1)
    ax.set_xlabel("Dice against the reference")
    ax.set_ylabel("rows")
    if dice:
        ax.set_title(f"{len(dice)} rows with a reference: median {sorted(dice)[len(dice) // 2]:.3f}, "
                     f"min {min(dice):.3f}", fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")


def write_batch_report(outdir: str | os.PathLike, rows: list) -> Path:
    """Write OUTDIR/report.html (and OUTDIR/dice.png when a row has a Dice) from the rows' status
    records on disk, so a resumed cohort's report covers every row, whichever run did it."""
    from FoBSegmentLib.atomic import write_text_atomic

    out = Path(outdir)
    data = _rows_data(out, rows)
    dice = [d["st"]["dice"] for d in data if d["status"] == "done" and d["st"].get("dice") is not None]
    counts = {s: sum(1 for d in data if d["status"] == s) for s in ("done", "failed", "not run", "stale")}
    plot = ""
    if dice:
        write_dice_plot(out / "dice.png", dice)
        plot = '<h2>Dice distribution</h2><img src="dice.png" alt="Dice distribution">'
    body = []
    for d in data:
        st = d["st"]
        flags = st.get("flags") or {}
        n_flags = sum(1 for v in flags.values() if v)
        flag_text = "; ".join(f"slice {z}: {', '.join(v)}" for z, v in flags.items() if v)
        dv = st.get("dice") if d["status"] == "done" else None
        thumb = ""
        if d["status"] == "done" and d["montage"].is_file():
            rel = html.escape(d["montage"].name)
            thumb = f'<a href="{rel}"><img class="thumb" src="{rel}" alt="montage of {html.escape(d["name"])}"></a>'
        detail = st.get("error") or flag_text or ""
        seconds = st.get("seconds")
        cls = {"failed": "failed", "stale": "failed", "not run": "notrun"}.get(d["status"], "")
        cells = [
            (str(d["row"]), str(d["row"])),
            (d["name"], html.escape(d["name"])),
            (d["status"], html.escape(d["status"])),
            ("" if seconds is None else str(seconds), "" if seconds is None else f"{seconds:.1f} s"),
            (str(n_flags), str(n_flags) if d["status"] == "done" else ""),
            ("" if dv is None else f"{dv:.6f}", "" if dv is None else f"{dv:.3f}"),
            ("", thumb),
            (detail, html.escape(detail)),
        ]
        tds = "".join(f'<td data-v="{html.escape(v)}">{shown}</td>' for v, shown in cells)
        body.append(f'<tr class="{cls}">{tds}</tr>')
    heads = "".join(f'<th onclick="sortBy({i}, {str(num).lower()})">{name}</th>'
                    for i, (name, num) in enumerate(COLUMNS))
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>fob batch report</title>"
        f"<style>{_STYLE}</style><script>{_SORT_JS}</script></head><body>\n"
        f"<h1>fob batch: {len(data)} rows</h1><p>{html.escape(summary)}. Click a column header to sort; "
        "click a thumbnail for the full montage (mask yellow, reference blue dashed, foreground prompts "
        "green +, background red x, annotated slices framed blue, flagged slices framed magenta).</p>\n"
        f"{plot}\n<h2>Rows</h2>\n<table id=\"rows\"><thead><tr>{heads}</tr></thead><tbody>\n"
        + "\n".join(body)
        + "\n</tbody></table>\n"
        "</body></html>\n"
    )
    target = out / "report.html"
    write_text_atomic(target, page, make_parents=False)
    return target
