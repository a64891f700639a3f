"""FoB prompt generation: `lite` and `resnet101` (the authors' dilated ResNet-101) at 256 x 256.

Untrained generators (`FoBPromptGenerator.from_config`): latency does not depend on the weights.
Inputs are real CHAOS slices: the support is the middle liver slice with its ground-truth mask, the
queries are the other liver slices. "one slice" times `predict(support, mask, query)`; "batched"
times `predict_batch(support, mask, queries, batch_size=len(queries))` (one forward pass over the
batch, support encoded once) and divides by the batch size.
On CUDA the issue's target case is added: a 100-slice range in one batched call.
"""

from __future__ import annotations

from FoBSegmentLib.bench.core import CaseResult, Settings, run_case, skipped

ENCODERS = ("lite", "resnet101")


def _inputs(n_queries: int):
    from FoBSegmentLib.bench.data import load_volume

    vol = load_volume()
    others = [k for k in vol.organ_slices if k != vol.support_index]
    picks = [others[i % len(others)] for i in range(n_queries)]
    support = vol.image[vol.support_index]
    mask = vol.organ_mask(vol.support_index)
    queries = [vol.image[k] for k in picks]
    return support, mask, queries


def cases(settings: Settings) -> list[CaseResult]:
    import torch

    from FoBSegmentLib.bench.adapters import make_generator

    rows: list[CaseResult] = []
    cuda = settings.device.startswith("cuda")
    batch = 8 if settings.quick else 16
    for encoder in ENCODERS:
        heavy = encoder == "resnet101" and not cuda
        # one slice at a time
        reps = settings.reps(1 if heavy else 3, 3 if heavy else 30) if not cuda else settings.reps(10, 50)
        warm = 0 if heavy and settings.quick else 1

        def setup_single(encoder=encoder, n=reps):
            gen = make_generator(encoder, settings.device)
            support, mask, queries = _inputs(max(1, n))
            state = {"i": 0}

            def fn():
                q = queries[state["i"] % len(queries)]
                state["i"] += 1
                with torch.inference_mode():
                    gen.predict(support, mask, q)

            return fn

        key = f"prompts-{encoder}-single"
        label = "authors' config: " if encoder == "resnet101" else ""
        rows.append(run_case("prompts", f"{label}FoB {encoder} prompts, one slice, 256x256", settings,
                             setup_single, repeats=reps, warmup=warm, key=key,
                             params={"encoder": encoder, "size": 256, "batch": 1, "weights": "untrained"}))
        _progress(rows[-1])
        # one slice at a time, support encoded once (what an interactive session can cache)
        if not (heavy and settings.quick):

            def setup_cached(encoder=encoder, n=reps):
                gen = make_generator(encoder, settings.device)
                support, mask, queries = _inputs(max(1, n))
                sup = gen.encode_support(support, mask)
                state = {"i": 0}

                def fn():
                    q = queries[state["i"] % len(queries)]
                    state["i"] += 1
                    gen.predict_from_support(sup, [q])

                return fn

            rows.append(run_case("prompts", f"FoB {encoder} prompts, one slice, support encoded once", settings,
                                 setup_cached, repeats=reps, warmup=1, key=f"prompts-{encoder}-single-cached",
                                 params={"encoder": encoder, "size": 256, "batch": 1, "weights": "untrained",
                                         "path": "encode_support once + predict_from_support"}))
            _progress(rows[-1])
        # batched
        if heavy and settings.quick:
            rows.append(skipped("prompts", f"FoB {encoder} prompts, batched x{batch}, 256x256", settings,
                                "skipped in --quick on CPU", key=f"prompts-{encoder}-batch"))
            continue
        breps = settings.reps(1, 1 if heavy else 10) if not cuda else settings.reps(5, 20)
        bsize = 8 if heavy else batch

        def setup_batch(encoder=encoder, batch=bsize):
            gen = make_generator(encoder, settings.device)
            support, mask, queries = _inputs(batch)

            def fn():
                with torch.inference_mode():
                    gen.predict_batch(support, mask, queries, batch_size=len(queries))

            return fn

        rows.append(run_case("prompts", f"FoB {encoder} prompts, batched x{bsize}, 256x256", settings,
                             setup_batch, repeats=breps, warmup=0 if heavy else 1, items=bsize,
                             key=f"prompts-{encoder}-batch",
                             params={"encoder": encoder, "size": 256, "batch": bsize, "weights": "untrained"}))
        _progress(rows[-1])

    if cuda:
        for encoder in ENCODERS:
            def setup_range(encoder=encoder):
                gen = make_generator(encoder, settings.device)
                support, mask, queries = _inputs(100)

                def fn():
                    with torch.inference_mode():
                        gen.predict_batch(support, mask, queries, batch_size=len(queries))

                return fn

            row = run_case("prompts", f"FoB {encoder} prompts, 100-slice range, one batched call", settings,
                           setup_range, repeats=settings.reps(3, 10), warmup=1, items=100,
                           key=f"prompts-{encoder}-range100",
                           params={"encoder": encoder, "size": 256, "batch": 100, "weights": "untrained"})
            if row.median_ms is not None:
                row.total_s = round(row.median_ms * 100 / 1e3, 3)
            rows.append(row)
            _progress(row)
    return rows


def _progress(row: CaseResult) -> None:
    from FoBSegmentLib.bench.report import progress_line

    progress_line(row)
