"""FoBSegment's benchmark suite: what a user waits for, measured against the targets of issue 8.

Entry points: `fob bench [--quick] [--json PATH] [--device cpu|cuda|auto] [--only GROUP ...]`
(FoBSegmentLib/commands/bench.py) and `python benchmarks/run.py ...` (the same, from a checkout).
The suite lives inside the package so an installed `fob` has it; `benchmarks/` at the repository
top is the documented entry point (see benchmarks/README.md and docs/BENCHMARKS.md).

Groups (each runs in its own subprocess per device, see `worker.py`):
    prompts      FoB prompt generation, lite and resnet101 (authors' config), 256 x 256, one slice / batched
    sam-encoder  SAM image encoder vit_b / vit_l / vit_h, random weights; LiteMedSAM on a new slice, real weights
    sam-decoder  SAM mask decoder on a cached embedding ("prompt edit -> new mask")
    weight-free  grabcut and random-walker segmenters on real CHAOS slices
    propagation  `fob segment` end to end on a real CHAOS MR volume (liver range)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

GROUPS = ("prompts", "sam-encoder", "sam-decoder", "weight-free", "propagation", "correction", "cross-patient")
SCHEMA = "fob-bench/1"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        return None
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _git_commit() -> str | None:
    from FoBSegmentLib.paths import REPO_ROOT

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cuda = torch.cuda.is_available()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "ram_gb": _ram_gb(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "loadavg_start": _loadavg(),
        "git_commit": _git_commit(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS") if k in os.environ},
    }


def resolve_devices(device: str) -> list[str]:
    """'auto': cpu, plus cuda when available; 'cpu'; 'cuda' (ValueError without CUDA)."""
    import torch

    if device == "auto":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    from FoBSegmentLib.device import resolve_device

    return [resolve_device(device)]


def _run_worker(group: str, device: str, quick: bool, repeats: int | None, profile: bool,
                threads: int | None = None) -> tuple[list[dict], int | None]:
    from FoBSegmentLib.bench.core import CaseResult

    package_parent = str(Path(__file__).resolve().parent.parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with tempfile.TemporaryDirectory(prefix="fob-bench-") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "FoBSegmentLib.bench.worker", "--group", group, "--device", device,
               "--out", str(out)]
        if quick:
            cmd.append("--quick")
        if repeats is not None:
            cmd += ["--repeats", str(repeats)]
        if profile:
            cmd.append("--profile")
        if threads is not None:
            cmd += ["--threads", str(threads)]
        # Progress lines of the child are echoed live; the last few are kept for an error row.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        last: list[str] = []
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            last = (last + [line.rstrip()])[-3:]
        proc.wait()
        if proc.returncode == 0 and out.exists():
            data = json.loads(out.read_text())
            for row in data["rows"]:
                row["baseline_rss_mb"] = data.get("baseline_rss_mb")
            return data["rows"], data.get("torch_threads")
        tail = " | ".join(last)
        row = CaseResult(group=group, case=f"{group} (whole group)", device=device, status="error",
                         note=f"worker exited with code {proc.returncode}: {tail[-400:]}")
        return [row.to_dict()], None


def run_bench(
    quick: bool = False,
    device: str = "auto",
    only: list[str] | None = None,
    json_path: str | os.PathLike | None = None,
    repeats: int | None = None,
    profile: bool = False,
    threads: int | None = None,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Run the selected groups on the selected devices, print the report, write JSON; returns the results."""
    from FoBSegmentLib.bench.report import comparisons, estimates, evaluate_targets, format_report

    stream = stream or sys.stdout
    groups = list(only) if only else list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown benchmark group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    if repeats is not None and repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    json_target = None
    if json_path is not None:
        json_target = Path(json_path)
        parent = json_target.parent if str(json_target.parent) else Path(".")
        if not parent.is_dir():
            raise FileNotFoundError(f"folder of --json {json_target} does not exist")
    devices = resolve_devices(device)
    from FoBSegmentLib.bench.data import chaos_dir

    chaos_dir()  # fail early, with one line, when the shared data is missing
    machine = machine_info()
    started = time.perf_counter()
    rows: list[dict] = []
    for dev in devices:
        for group in groups:
            print(f"fob bench: {group} on {dev} ...", file=sys.stderr, flush=True)
            group_rows, used = _run_worker(group, dev, quick, repeats, profile, threads)
            if used is not None:
                machine["torch_threads"] = used
            rows.extend(group_rows)
    machine["loadavg_end"] = _loadavg()
    import torch

    results: dict[str, Any] = {
        "schema": SCHEMA,
        "machine": machine,
        "config": {"quick": quick, "device": device, "devices": devices, "groups": groups, "repeats": repeats,
                   "profile": profile, "threads": threads},
        "results": rows,
        "targets": evaluate_targets(rows, devices, torch.cuda.is_available()),
        "comparisons": comparisons(rows),
        "estimates": estimates(rows),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(format_report(results), file=stream)
    print(f"\nwall time {results['wall_s']} s", file=stream)
    if json_target is not None:
        write_json_atomic(json_target, results)
        print(f"results written to {json_target}", file=stream)
    return results


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=str(parent))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
