"""Measurement primitives of the benchmark suite: timing, peak memory, result rows.

Latency: wall-clock `time.perf_counter` around each call, after `warmup` untimed calls; on CUDA the
device is synchronised before the clock stops. A call that handles `items` slices counts as `items`
slices of `1 / items` of its time each (the per-slice latency of a batched call).

Peak memory (per case, not per group): what the case holds while it runs, i.e. its model plus its
working memory, over the process after imports and earlier cases.
- CPU: the process's peak resident set (Linux `VmHWM`), reset by writing 5 to `/proc/self/clear_refs`
  after the case's setup (so transient peaks of model construction do not count, the built model
  does); the reported value is that peak minus the resident set before the setup. Where the
  reset is not possible (non-Linux) `resource.getrusage(...).ru_maxrss` is used instead, which only
  grows; each group runs in its own subprocess so groups never see each other's peaks.
  (`tracemalloc` is not used: it misses the allocations of torch's C++ allocator.)
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus the memory
  allocated before the case.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

MB = 1024.0 * 1024.0


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_mb() -> float:
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return value / MB if sys.platform == "darwin" else value / 1024.0


def current_rss_mb() -> float | None:
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb / 1024.0


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so one case's garbage is not the next one's baseline."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of one case; `start()` before the case's setup, `stop()` after its last call."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.method = ""
        self._rss0 = 0.0
        self._cuda0 = 0

    def start(self) -> None:
        gc.collect()
        _trim_heap()
        if _reset_peak_rss() and current_rss_mb() is not None:
            self.method = "VmHWM"
            self._rss0 = current_rss_mb() or 0.0
        else:
            self.method = "ru_maxrss"
            self._rss0 = current_rss_mb() or _maxrss_mb()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda0 = torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        """Forget transient peaks so far (model construction); the baseline stays the pre-setup RSS."""
        if self.method == "VmHWM":
            _reset_peak_rss()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def stop(self) -> dict[str, float | str | None]:
        if self.method == "VmHWM":
            peak = (_proc_status_kb("VmHWM") or 0) / 1024.0
        else:
            peak = _maxrss_mb()
        out: dict[str, float | str | None] = {
            "peak_rss_mb": round(peak, 1),
            "peak_mem_mb": round(max(0.0, peak - self._rss0), 1),
            "mem_method": self.method,
            "cuda_peak_mb": None,
        }
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            out["cuda_peak_mb"] = round((torch.cuda.max_memory_allocated() - self._cuda0) / MB, 1)
            out["mem_method"] = f"{self.method}+cuda.max_memory_allocated"
        return out


def synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def time_calls(
    fn: Callable[[], Any],
    *,
    repeats: int,
    warmup: int = 1,
    items: int = 1,
    device: str = "cpu",
    budget_s: float | None = None,
    cpu_out: list[float] | None = None,
) -> list[float]:
    """Wall seconds per item of `repeats` timed calls of `fn` (fewer when `budget_s` runs out; at least
    one). `cpu_out` receives the process CPU seconds per item of the same calls (all threads summed)."""
    sync = synchronizer(device)
    for _ in range(max(0, warmup)):
        fn()
        sync()
    times: list[float] = []
    cpu: list[float] = []
    started = time.perf_counter()
    for _ in range(max(1, repeats)):
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) / items)
        cpu.append((time.process_time() - c0) / items)
        if budget_s is not None and time.perf_counter() - started > budget_s:
            break
    if cpu_out is not None:
        cpu_out.extend(cpu)
    return times


def summarize(seconds: list[float]) -> dict[str, float | int | None]:
    """median / p90 / min / mean in milliseconds (p90: linear interpolation, numpy's default)."""
    if not seconds:
        return {"n": 0, "median_ms": None, "p90_ms": None, "min_ms": None, "mean_ms": None}
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "n": int(ms.size),
        "median_ms": round(float(np.median(ms)), 3),
        "p90_ms": round(float(np.percentile(ms, 90)), 3),
        "min_ms": round(float(ms.min()), 3),
        "mean_ms": round(float(ms.mean()), 3),
    }


@dataclass
class CaseResult:
    """One row of the benchmark table.

    status: 'ok'; 'skipped' (by design: --quick, no CUDA, ...); 'unavailable' (a module it needs is
    not installed / not written yet); 'error' (it raised; `note` holds the message).
    Latencies are per slice (`unit`), wall clock; `cpu_median_ms` is the process CPU time per slice
    (all threads summed), a load-independent measure of the work done; `total_s` is the wall time of
    the whole job for volume cases.
    """

    group: str
    case: str
    device: str
    status: str = "ok"
    unit: str = "ms/slice"
    n: int = 0
    items: int = 1
    median_ms: float | None = None
    p90_ms: float | None = None
    min_ms: float | None = None
    mean_ms: float | None = None
    cpu_median_ms: float | None = None
    total_s: float | None = None
    peak_mem_mb: float | None = None
    peak_rss_mb: float | None = None
    cuda_peak_mb: float | None = None
    mem_method: str = ""
    note: str = ""
    key: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Settings:
    """What a group needs to know: mode, device, repetition counts."""

    quick: bool
    device: str
    repeats: int | None = None  # override of every case's repetition count
    profile: bool = False

    def reps(self, quick: int, full: int) -> int:
        if self.repeats is not None:
            return max(1, self.repeats)
        return quick if self.quick else full


def run_case(
    group: str,
    case: str,
    settings: Settings,
    setup: Callable[[], Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    items: int = 1,
    key: str = "",
    note: str = "",
    params: dict[str, Any] | None = None,
    budget_s: float | None = None,
) -> CaseResult:
    """Build a case with `setup()` (returns the callable to time), time it, measure its peak memory.

    ImportError / ModuleNotFoundError from setup mark the row 'unavailable'; any other exception 'error'.
    """
    row = CaseResult(group=group, case=case, device=settings.device, items=items, key=key, note=note,
                     params=dict(params or {}))
    probe = MemoryProbe(settings.device)
    probe.start()
    fn = None
    try:
        fn = setup()
        gc.collect()
        _trim_heap()
        probe.reset_peak()
        cpu: list[float] = []
        times = time_calls(fn, repeats=repeats, warmup=warmup, items=items, device=settings.device,
                           budget_s=budget_s, cpu_out=cpu)
        row.__dict__.update(summarize(times))
        row.cpu_median_ms = round(float(np.median(cpu)) * 1e3, 3)
        if warmup == 0:
            row.note = _join(row.note, "no warm-up (first call included)")
    except (ImportError, NotImplementedError) as exc:
        row.status = "unavailable"
        row.note = _join(row.note, f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a benchmark reports failures, it does not stop on them
        row.status = "error"
        row.note = _join(row.note, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        if os.environ.get("FOB_DEBUG"):
            raise
    finally:
        mem = probe.stop()
        if row.status == "ok":
            row.__dict__.update(mem)
        del fn
        gc.collect()
        if settings.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
    return row


def skipped(group: str, case: str, settings: Settings, note: str, *, key: str = "",
            status: str = "skipped", params: dict[str, Any] | None = None) -> CaseResult:
    return CaseResult(group=group, case=case, device=settings.device, status=status, note=note, key=key,
                      params=dict(params or {}))


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a and b else (a or b)


@contextmanager
def measured(row: CaseResult, device: str) -> Iterator[None]:
    """The memory the block adds goes into `row`; an exception in it makes the row an error with a
    one-line note (a benchmark group goes on to its next case)."""
    probe = MemoryProbe(device)
    probe.start()
    try:
        yield
    except Exception as exc:  # noqa: BLE001
        row.status = "error"
        row.note = _join(row.note, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    finally:
        mem = probe.stop()
        if row.status == "ok":
            row.__dict__.update(mem)
