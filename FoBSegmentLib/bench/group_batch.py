"""`fob batch` throughput on Dask: a cohort of the real `../shared/data` volumes with 1 and 2 workers.

    python -m FoBSegmentLib.bench.group_batch [--repeat 1] [--workers 1 2] [--json PATH]

The cohort: every CHAOS MR T2-SPIR volume (15) and every Synapse CT volume (5), the liver from one
annotated slice (the middle of its range), the options of a plain `fob segment` (prompts auto,
segmenter auto), each row with its reference (Dice) and montage, exactly as `fob batch` runs it
(`batch.rows.run_row`). `--repeat R` runs the cohort R times (distinct rows, R x 20 volumes).

Three measurements of the same rows:
- direct: `run_row` called in this process, one torch thread, no Dask (after one untimed warm-up row
  so the imports and the first model load are not counted): the time a volume costs without Dask;
- Dask with W workers (a LocalCluster, as `fob batch` starts it): the cluster start-up, the workers'
  warm-up (imports, preloaded once per worker) and the cohort itself (`batch.run._run_on_client`,
  the code path of `fob batch`), timed apart.
Reported: volumes per minute (cohort only, and end to end with start-up), the 2-worker / 1-worker
ratio, and the per-volume overhead of Dask = cohort time per volume with 1 worker - direct time per
volume (both do the same rows on one core), also as a fraction of the direct time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Same reason as cli.py: idle OpenMP threads spinning on a 2-core machine distort every number.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

ORGAN = 1  # liver: present in every CHAOS and Synapse volume


def write_cohort(folder: Path, repeat: int = 1) -> Path:
    """The manifest of the cohort (supports written into `folder`); returns its path."""
    import csv

    from FoBSegmentLib.bench.data import chaos_dir
    from FoBSegmentLib.io import volumes

    data = chaos_dir().parent
    pairs = []
    for ds in ("chaos_mr_t2spir", "synapse_ct"):
        for img in sorted((data / ds).glob("image_*.nii.gz"), key=lambda p: int(p.name[6:-7])):
            pairs.append((ds, img, img.with_name(img.name.replace("image_", "label_"))))
    if not pairs:
        raise FileNotFoundError(f"no volumes under {data}")
    rows = []
    for ds, img, lab in pairs:
        label = volumes.read_label(lab)
        ref = label.array == ORGAN
        zs = np.flatnonzero(ref.any(axis=(1, 2)))
        sup = np.zeros(ref.shape, np.uint8)
        sup[zs[len(zs) // 2]][ref[zs[len(zs) // 2]]] = ORGAN
        support = volumes.write_label(folder / f"support_{ds}_{img.name}", sup, label.geometry)
        for r in range(repeat):
            rows.append({"name": f"{ds}_{img.name[:-7]}_r{r}", "image": str(img), "support_mask": str(support),
                         "support_label": ORGAN, "reference": str(lab)})
    manifest = folder / "cohort.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return manifest


def _warm() -> int:
    """Run once on every worker before the clock starts: the imports a row needs."""
    import matplotlib  # noqa: F401
    import torch  # noqa: F401

    import FoBSegmentLib.files  # noqa: F401
    import FoBSegmentLib.reports.montage  # noqa: F401

    return os.getpid()


def _system_busy_s() -> float:
    """CPU seconds all processes of the machine have used so far (Linux /proc/stat), 0 elsewhere."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _span(statuses: list[dict]) -> float:
    return max(s["t_end"] for s in statuses) - min(s["t_start"] for s in statuses)


def measure_direct(rows: list, out: Path) -> dict[str, Any]:
    import torch

    from FoBSegmentLib.batch.rows import run_row

    torch.set_num_threads(1)
    warm = out / "warmup"
    warm.mkdir()
    run_row(rows[0], str(warm), None, 1)
    busy0, own0, t0 = _system_busy_s(), _own_cpu_s(), time.perf_counter()
    statuses = [run_row(row, str(out), None, 1) for row in rows]
    seconds = time.perf_counter() - t0
    own = _own_cpu_s() - own0
    others = _system_busy_s() - busy0 - own
    failed = [s for s in statuses if s.get("status") != "done"]
    if failed:
        raise RuntimeError(f"row {failed[0]['row']} failed: {failed[0].get('error')}")
    return {"seconds": round(seconds, 2), "per_volume_s": round(seconds / len(rows), 3),
            "volumes_per_min": round(60 * len(rows) / seconds, 2),
            "segment_s_mean": round(float(np.mean([s["seconds"] for s in statuses])), 3),
            "cpu_per_volume_s": round(own / len(rows), 3),
            "row_cpu_s_mean": round(float(np.mean([s["row_cpu_seconds"] for s in statuses])), 3),
            "other_processes_cores": round(max(0.0, others) / seconds, 2),
            "dice_median": round(float(np.median([s["dice"] for s in statuses])), 3)}


def measure_dask(rows: list, out: Path, workers: int) -> dict[str, Any]:
    from distributed import Client, Event

    from FoBSegmentLib.batch.run import BatchSummary, Progress, _run_on_client, start_local_cluster

    t0 = time.perf_counter()
    cluster = start_local_cluster(workers, 1)
    client = Client(cluster)
    try:
        t1 = time.perf_counter()
        pids = client.run(_warm)
        t2 = time.perf_counter()
        summary = BatchSummary(total=len(rows))
        w0, own0, busy0 = sum(client.run(_own_cpu_s).values()), _own_cpu_s(), _system_busy_s()
        _run_on_client(client, rows, out, 1, summary, Progress(len(rows), sys.stderr, enabled=False), None, Event)
        t3 = time.perf_counter()
        # Workers (the rows and Dask's threads) + this process (client, scheduler and nannies).
        dask_cpu = sum(client.run(_own_cpu_s).values()) - w0 + _own_cpu_s() - own0
        others = _system_busy_s() - busy0 - dask_cpu
    finally:
        client.close()
        cluster.close()
    statuses = list(summary.statuses.values())
    if summary.failed:
        bad = next(s for s in statuses if s.get("status") != "done")
        raise RuntimeError(f"row {bad['row']} failed: {bad.get('error')}")
    cohort = t3 - t2
    return {"workers": workers, "worker_pids": len(set(pids.values())), "start_s": round(t1 - t0, 2),
            "warmup_s": round(t2 - t1, 2), "cohort_s": round(cohort, 2), "span_s": round(_span(statuses), 2),
            "end_to_end_s": round(t3 - t0, 2), "volumes_per_min": round(60 * len(rows) / cohort, 2),
            "volumes_per_min_end_to_end": round(60 * len(rows) / (t3 - t0), 2),
            "row_s_mean": round(float(np.mean([s["row_seconds"] for s in statuses])), 3),
            "cpu_per_volume_s": round(dask_cpu / len(rows), 3),
            "row_cpu_s_mean": round(float(np.mean([s["row_cpu_seconds"] for s in statuses])), 3),
            "other_processes_cores": round(max(0.0, others) / cohort, 2),
            # What the cohort could use at most (the cores other processes left) and what it used.
            "cores_left_by_others": round(_usable_cores() - max(0.0, others) / cohort, 2),
            "cores_used": round(dask_cpu / cohort, 2),
            "rows_per_worker": sorted(np.unique([s["pid"] for s in statuses], return_counts=True)[1].tolist())}


def run(repeat: int = 1, workers: list[int] | None = None, json_path: str | None = None) -> dict[str, Any]:
    from FoBSegmentLib.batch.manifest import read_manifest
    from FoBSegmentLib.bench import machine_info, write_json_atomic

    workers = workers or [1, 2]
    result: dict[str, Any] = {"schema": "fob-bench-batch/1", "machine": machine_info(),
                              "command": "python -m FoBSegmentLib.bench.group_batch " + " ".join(sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="fob-bench-batch-") as tmp:
        folder = Path(tmp)
        manifest = write_cohort(folder, repeat)
        out = folder / "direct"
        out.mkdir()
        rows = read_manifest(manifest, out)
        result["volumes"] = len(rows)
        print(f"fob bench batch: {len(rows)} volumes, direct (no Dask, 1 thread) ...", file=sys.stderr, flush=True)
        result["direct"] = measure_direct(rows, out)
        result["dask"] = {}
        for w in workers:
            print(f"fob bench batch: Dask LocalCluster, {w} worker(s) ...", file=sys.stderr, flush=True)
            wout = folder / f"dask{w}"
            wout.mkdir()
            result["dask"][str(w)] = measure_dask(read_manifest(manifest, wout), wout, w)
    d = result["dask"]
    direct = result["direct"]["per_volume_s"]
    if "1" in d:
        per1 = d["1"]["cohort_s"] / result["volumes"]
        result["dask_overhead_per_volume_s"] = round(per1 - direct, 3)
        result["dask_overhead_fraction"] = round((per1 - direct) / direct, 3)
        # The same in CPU seconds, which other processes on the machine cannot distort.
        cpu_direct = result["direct"]["cpu_per_volume_s"]
        result["dask_overhead_cpu_per_volume_s"] = round(d["1"]["cpu_per_volume_s"] - cpu_direct, 3)
        result["dask_overhead_cpu_fraction"] = round(result["dask_overhead_cpu_per_volume_s"] / cpu_direct, 3)
        result["overhead_target_met"] = result["dask_overhead_fraction"] < 0.10
    if "1" in d and "2" in d:
        result["speedup_2_vs_1"] = round(d["2"]["volumes_per_min"] / d["1"]["volumes_per_min"], 3)
        result["speedup_2_vs_1_end_to_end"] = round(d["2"]["volumes_per_min_end_to_end"]
                                                    / d["1"]["volumes_per_min_end_to_end"], 3)
        result["speedup_target_met"] = result["speedup_2_vs_1"] >= 1.7
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(format_result(result))
    if json_path:
        write_json_atomic(Path(json_path), result)
        print(f"results written to {json_path}")
    return result


def format_result(r: dict[str, Any]) -> str:
    dr = r["direct"]
    lines = [f"fob batch on Dask: {r['volumes']} volumes (CHAOS MR + Synapse CT, liver, prompts auto, segmenter auto)",
             f"  direct, no Dask, 1 thread: {dr['volumes_per_min']} volumes/min "
             f"({dr['per_volume_s']} s, {dr['cpu_per_volume_s']} CPU s per volume, median Dice {dr['dice_median']}); "
             f"other processes used {dr['other_processes_cores']} cores meanwhile"]
    for w, m in r["dask"].items():
        lines.append(f"  Dask {w} worker(s): {m['volumes_per_min']} volumes/min for the cohort "
                     f"({m['cohort_s']} s), {m['volumes_per_min_end_to_end']} end to end "
                     f"(cluster start {m['start_s']} s, warm-up {m['warmup_s']} s); {m['cpu_per_volume_s']} CPU s per "
                     f"volume; rows per worker {m['rows_per_worker']}; other processes used "
                     f"{m['other_processes_cores']} cores meanwhile, the cohort {m['cores_used']} of the "
                     f"{m['cores_left_by_others']} they left")
    if "speedup_2_vs_1" in r:
        lines.append(f"  2 workers / 1 worker: x{r['speedup_2_vs_1']} (cohort), x{r['speedup_2_vs_1_end_to_end']} "
                     f"(end to end); target >= 1.7: {'PASS' if r['speedup_target_met'] else 'FAIL'}")
    if "dask_overhead_per_volume_s" in r:
        lines.append(f"  Dask overhead per volume: {r['dask_overhead_per_volume_s']} s = "
                     f"{100 * r['dask_overhead_fraction']:.1f} % of a volume's time; target < 10 %: "
                     f"{'PASS' if r['overhead_target_met'] else 'FAIL'}; in CPU time "
                     f"{r['dask_overhead_cpu_per_volume_s']} s = {100 * r['dask_overhead_cpu_fraction']:.1f} %")
    m = r["machine"]
    lines.append(f"  machine: {m['cpu_model']}, {m['cpus_usable']} usable cores; load average at start "
                 f"{m['loadavg_start']}, at the end {m['loadavg_end']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m FoBSegmentLib.bench.group_batch", description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=1, help="run the 20-volume cohort R times (default 1)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure (default 1 2)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    a = p.parse_args(argv)
    if a.repeat < 1 or any(w < 1 for w in a.workers):
        p.error("--repeat and --workers must be at least 1")
    run(a.repeat, a.workers, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
