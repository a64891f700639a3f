"""Weight-free segmenters (grabcut, random-walker) on real CHAOS liver slices.

Each timed call segments the next liver slice of the volume with a FoB-shaped prompt set built from
its ground truth (the oracle's: BPPC ring of 10 points + 10 foreground points), so the latency covers the spread of
organ sizes along the range. CPU algorithms: on CUDA they are not run again.
"""

from __future__ import annotations

from FoBSegmentLib.bench.core import CaseResult, Settings, run_case, skipped

NAMES = ("grabcut", "random-walker")


def cases(settings: Settings) -> list[CaseResult]:
    rows: list[CaseResult] = []
    for name in NAMES:
        case = f"{name} segmenter, one real slice"
        key = f"weightfree-{name}"
        if settings.device.startswith("cuda"):
            rows.append(skipped("weight-free", case, settings, "CPU algorithm, measured on the CPU run", key=key))
            continue

        def setup(name=name):
            from FoBSegmentLib.bench.adapters import make_segmenter
            from FoBSegmentLib.bench.data import load_volume
            from FoBSegmentLib.evaluate.baselines import oracle_prompts

            vol = load_volume()
            seg = make_segmenter(name, "cpu")
            work = [(vol.image[k], oracle_prompts(vol.organ_mask(k))) for k in vol.organ_slices]
            state = {"i": 0}

            def fn():
                img, prompts = work[state["i"] % len(work)]
                state["i"] += 1
                seg.segment(img, prompts)

            return fn

        reps = settings.reps(4, 28)
        rows.append(run_case("weight-free", case, settings, setup, repeats=reps, warmup=1, key=key,
                             params={"segmenter": name, "slices": "CHAOS liver range, 256x256"}))
        from FoBSegmentLib.bench.report import progress_line

        progress_line(rows[-1])
    return rows
