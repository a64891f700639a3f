"""The paper's evaluation protocols (method doc section 11), adapted to the data available here.

Abdominal, FoB / ADNet lineage (11.1):
- Volumes sorted by the integer in `image_<id>.nii.gz`. Folds overlap by one volume: with n volumes and
  5 folds, step = n // 5 and fold k holds positions (k * step + j) mod n for j = 0..step. With n = 20
  (full CHAOS) this is exactly {0-4}, {4-8}, {8-12}, {12-16}, {16-19, 0}; with n = 30 (full SABS)
  {0-6}, ..., {24-29, 0}. Adaptation here: CHAOS has 15 volumes -> folds of 4 ({0-3}, {3-6}, {6-9},
  {9-12}, {12-14, 0}); the 5 Synapse cases -> folds of 2 ({0, 1}, ..., {4, 0}).
- Support volume = the third volume of the fold (`supp_idx = 2`), clamped to the last one for folds
  of fewer than 3 volumes (Synapse here: the second); every other fold member is a query. Training
  volumes of a fold are all volumes outside it, so they are never queries of that fold.
- Per organ (1-way 1-shot): the support volume's slices containing the organ, n_s of them; support
  slices at positions int(n_s * {1/6, 1/2, 5/6}). The query's organ-containing slices (selected with
  the ground truth), split into 3 chunks at int(linspace(0, n_q, 4)); chunk j uses support slice j.
- Metric: per query volume, 3-D Dice accumulated over the selected slices only; organ Dice of a fold =
  mean over its query volumes; reported organ Dice = mean over folds; mean over organs.

Skin (11.3, adapted): the images of one folder sorted by id, support = image i, query = image
(i + 1) mod n, 2-D Dice per episode, mean over episodes. The data here carries no diagnosis labels
for ISIC, so there is a single category ("lesion"). Held out (issue 21): `SKIN_FOLDS` folds of
consecutive images, fold k = positions floor(k n / K) .. floor((k + 1) n / K) (the last one wraps to
image 0), so that its episodes (support i, query i + 1 inside the fold) are exactly the protocol's
episodes, each in one fold; a fold's model trains on the images outside it (`fob train --fold K`).
Methods only the skin protocol has: 'lesion' (`fob segment`'s dermoscopy pipeline,
`propagation.skin`: FoB's coarse map and colour locate the lesion, the segmenter cuts it) and
'lesion-colour' (the same without FoB: weight-free and model-free).

Every prompt source sees the query image only (never its label); the oracle is the exception by
design and is reported as an upper bound. Arrays: volumes (z, y, x) = (k, j, i); slices (row, col);
points (x, y).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from FoBSegmentLib.evaluate.baselines import (
    coarse_mask,
    confidence_prompts,
    mask_sampled_prompts,
    oracle_prompts,
)
from FoBSegmentLib.evaluate.datasets import (
    ORGANS,
    find_skin_images,
    find_volume_pairs,
    normalise_volume,
    read_volume_array,
)
from FoBSegmentLib.evaluate.metrics import DiceCounter, PromptQuality, dice, mean_quality, prompt_quality
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.propagation.fob import with_mask_prompt

SUPPORT_FRACTIONS = (1 / 6, 1 / 2, 5 / 6)
# Methods and what they measure. 'coarse' needs no segmenter; 'oracle' reads the query label.
ALL_METHODS = ("fob", "fob-nospr", "fob-map", "confidence", "mask-sampled", "coarse", "oracle")
# Skin protocol only: they need the support image (colour) as well as the generator's output.
SKIN_METHODS = ("lesion", "lesion-colour")
# Two folds: every image is held out once with two models (the CPU budget of issue 21).
SKIN_FOLDS = 2
METHOD_LABELS = {
    "fob": "FoB (BPPC+BCM+SPR)",
    "fob-nospr": "FoB without SPR (coarse argmax; the ring `fob segment` uses, `fob_spr` off)",
    "fob-map": "FoB's prompts with its coarse map as a mask prompt (the segmenter starts from it)",
    "confidence": "(i) most confident fg/bg points",
    "mask-sampled": "(ii) points sampled in/out of coarse mask (ProtoSAM-style)",
    "coarse": "(iii) coarse fg map > 0.5 (ALPNet-like, no segmenter)",
    "oracle": "oracle prompts from the query label (upper bound)",
    "lesion": "fob segment's dermoscopy pipeline (FoB coarse map + colour locate, then segmenter)",
    "lesion-colour": "dermoscopy pipeline, colour only (no FoB model)",
}


@dataclass
class Fold:
    """One fold: positions into the sorted volume list."""

    index: int
    members: list[int]
    support: int
    queries: list[int]
    train: list[int]


def make_folds(n_volumes: int, n_folds: int = 5, support_position: int = 2) -> list[Fold]:
    """The FoB/ADNet overlapping folds over n sorted volumes (see module docstring)."""
    if n_folds < 1 or n_volumes < max(2, n_folds):
        raise ValueError(f"need at least max(2, n_folds) volumes for {n_folds} folds, got {n_volumes}")
    step = n_volumes // n_folds
    folds = []
    for k in range(n_folds):
        members = list(dict.fromkeys((k * step + j) % n_volumes for j in range(step + 1)))
        support = members[min(support_position, len(members) - 1)]
        queries = [m for m in members if m != support]
        train = [i for i in range(n_volumes) if i not in members]
        folds.append(Fold(k, members, support, queries, train))
    return folds


def skin_folds(n_images: int, n_folds: int = SKIN_FOLDS) -> list[Fold]:
    """The held-out folds of the skin protocol over n sorted images (module docstring). `support` is
    the fold's first image; every member but the last supports the next one."""
    if n_folds < 1 or n_images < 2 * n_folds:
        raise ValueError(f"need at least {2 * n_folds} images for {n_folds} skin folds, got {n_images}")
    folds = []
    for k in range(n_folds):
        lo, hi = (k * n_images) // n_folds, ((k + 1) * n_images) // n_folds
        members = [i % n_images for i in range(lo, hi + 1)]
        train = [i for i in range(n_images) if i not in members]
        folds.append(Fold(k, members, members[0], members[1:], train))
    return folds


def fold_training_ids(folder: str | Path, fold: int, n_folds: int = 5) -> list[str]:
    """Ids of the volumes in `folder` that fold `fold` of the protocol may train on: every volume that
    is neither its support nor one of its queries (the same sorted order as `load_eval_volumes`).
    An image folder (dermoscopy) uses the skin folds (`skin_folds`, `SKIN_FOLDS` of them)."""
    ids = [sid for sid, _img, _lab in find_volume_pairs(folder)]
    if not ids:
        images = [sid for sid, _img, _mask in find_skin_images(folder)]
        if not images:
            raise ValueError(f"--fold needs volume folders (image_<id> files) or image folders; {folder} has neither")
        folds = skin_folds(len(images))
        if not 0 <= fold < len(folds):
            raise ValueError(f"--fold must be in 0..{len(folds) - 1} for image folders, got {fold}")
        return [images[i] for i in folds[fold].train]
    folds = make_folds(len(ids), n_folds)
    if not 0 <= fold < len(folds):
        raise ValueError(f"--fold must be in 0..{len(folds) - 1}, got {fold}")
    return [ids[i] for i in folds[fold].train]


def support_slices(gt: np.ndarray, organ: int) -> list[int]:
    """The 3 support slice indices of a (Z, Y, X) label volume for one organ (positions 1/6, 1/2, 5/6)."""
    zs = np.nonzero((gt == organ).reshape(gt.shape[0], -1).any(1))[0]
    if len(zs) == 0:
        raise ValueError(f"the support volume contains no voxel of label {organ}")
    return [int(zs[int(len(zs) * f)]) for f in SUPPORT_FRACTIONS]


def query_chunks(gt: np.ndarray, organ: int) -> list[tuple[int, int]]:
    """(query slice index, chunk 0..2) for every slice of a (Z, Y, X) label volume containing the organ."""
    zs = np.nonzero((gt == organ).reshape(gt.shape[0], -1).any(1))[0]
    bounds = np.linspace(0, len(zs), 4).astype(int)
    return [(int(zs[i]), j) for j in range(3) for i in range(bounds[j], bounds[j + 1])]


@dataclass
class SlicePrediction:
    """What a prompt generator returns for one query slice (all in the query's (x, y) frame).

    background: (N_p, 2) refined background prompts; background_coarse: (N_p, 2) before refinement
    (None when the generator has no such stage); foreground: (N_f, 2); fg_probability: (H, W) coarse
    foreground map in [0, 1].
    """

    background: np.ndarray
    foreground: np.ndarray
    fg_probability: np.ndarray | None = None
    background_coarse: np.ndarray | None = None


# (support image (H, W[, 3]) [0, 1], support mask (H, W) bool, [query images]) -> [SlicePrediction]
# One support serves many queries (the chunk of a query volume), so generators encode it once.
Predictor = Callable[[np.ndarray, np.ndarray, list[np.ndarray]], list[SlicePrediction]]


def generator_predictor(generator, batch_size: int = 8) -> Predictor:
    """Wrap a FoBPromptGenerator: refined + coarse background prompts, foreground prompts, P_fg."""

    def predict(support_image: np.ndarray, support_mask: np.ndarray, queries: list[np.ndarray]) -> list[SlicePrediction]:
        if not queries:
            return []
        sup = generator.encode_support(support_image, support_mask)
        out = []
        for d in generator.predict_from_support(sup, list(queries), batch_size):
            ps = d["prompts"]
            coarse = d["coarse_background"] if len(ps.background) else np.zeros((0, 2))
            out.append(SlicePrediction(ps.background, ps.foreground, ps.fg_probability, coarse))
        return out

    return predict


@dataclass
class EvalVolume:
    """A labelled evaluation volume: image (Z, H, W) float32 [0, 1], gt (Z, H, W) int."""

    name: str
    image: np.ndarray
    gt: np.ndarray


def methods_prompts(
    method: str, pred: SlicePrediction | None, gt_slice: np.ndarray, n_fg: int = 10, n_bg: int = 10
) -> PromptSet | None:
    """The PromptSet a method hands to the segmenter for one slice (None for 'coarse')."""
    if method == "oracle":
        return oracle_prompts(gt_slice, n_fg, n_bg)
    if pred is None:
        raise ValueError(f"method {method!r} needs a prompt generator")
    if method == "fob":
        return PromptSet(pred.background, pred.foreground, pred.fg_probability)
    if method == "fob-map":
        if pred.fg_probability is None:
            raise ValueError("method 'fob-map' needs the generator's coarse foreground map")
        return with_mask_prompt(PromptSet(pred.background, pred.foreground, pred.fg_probability))
    if method == "fob-nospr":
        if pred.background_coarse is None:
            raise ValueError("the generator gives no coarse (pre-SPR) background prompts")
        return PromptSet(pred.background_coarse, pred.foreground, pred.fg_probability)
    if pred.fg_probability is None:
        raise ValueError(f"method {method!r} needs the generator's coarse foreground map")
    if method == "confidence":
        return confidence_prompts(pred.fg_probability, n_fg, n_bg)
    if method == "mask-sampled":
        return mask_sampled_prompts(pred.fg_probability, n_fg, n_bg)
    if method == "coarse":
        return None
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")


@dataclass
class _Acc:
    counter: DiceCounter = field(default_factory=DiceCounter)
    quality: list[PromptQuality] = field(default_factory=list)
    failures: int = 0


def _segment_slice(method, pred, image, gt_slice, segmenter, n_fg, n_bg) -> tuple[np.ndarray, PromptQuality | None, bool]:
    """(mask (H, W) bool, prompt quality or None, failed?) of one method on one slice."""
    if method == "coarse":
        if pred is None or pred.fg_probability is None:
            raise ValueError("method 'coarse' needs the generator's coarse foreground map")
        return coarse_mask(pred.fg_probability), None, False
    prompts = methods_prompts(method, pred, gt_slice, n_fg, n_bg)
    quality = prompt_quality(prompts.background, prompts.foreground, gt_slice)
    if segmenter is None:
        raise ValueError(f"method {method!r} needs a segmenter")
    # OpenCV's global RNG seeds GrabCut's GMM initialisation; reseeding per call makes every slice's
    # result independent of what ran before (same numbers per dataset, fold or method subset).
    cv2.setRNGSeed(0)
    try:
        mask = np.asarray(segmenter.segment(image, prompts).mask, bool)
    except ValueError:
        # A prompt set the segmenter rejects (e.g. fewer than 3 background points enclosing nothing)
        # is the prompt source's failure: it scores an empty mask and is counted.
        return np.zeros(gt_slice.shape, bool), quality, True
    return mask, quality, False


def evaluate_volumes(
    volumes: Sequence[EvalVolume],
    predictor_for: Callable[[Fold, int], Predictor | None],
    segmenter,
    methods: Sequence[str] = ALL_METHODS,
    organs: dict[int, str] | None = None,
    folds: Sequence[Fold] | None = None,
    n_fg: int = 10,
    n_bg: int = 10,
    progress: bool = True,
) -> dict:
    """Run the abdominal protocol (11.1). Returns a JSON-ready dict (see `summarise`).

    predictor_for(fold, organ_label) gives the prompt generator for that fold and test organ: the same
    one everywhere when a single model is evaluated, one per fold for held-out Setting I models, one per
    fold and organ for Setting II models (trained with that organ excluded). It may return None when
    only 'oracle' is evaluated.
    """
    from tqdm import tqdm

    organs = organs or ORGANS
    for m in methods:
        if m not in ALL_METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    folds = list(folds) if folds is not None else make_folds(len(volumes))
    records: list[dict] = []
    jobs = [(f, o, q) for f in folds for o in organs for q in f.queries]
    bar = tqdm(total=len(jobs), desc="evaluate", unit="scan", disable=not progress)
    t0 = time.time()
    for fold in folds:
        sup = volumes[fold.support]
        for organ, organ_name in organs.items():
            predictor = predictor_for(fold, organ)
            s_idx = support_slices(sup.gt, organ)
            for qi in fold.queries:
                if qi == fold.support:
                    raise AssertionError("a support volume is among its own queries")
                qry = volumes[qi]
                accs = {m: _Acc() for m in methods}
                slices = query_chunks(qry.gt, organ)
                preds: dict[int, SlicePrediction | None] = {z: None for z, _ in slices}
                if any(m != "oracle" for m in methods):
                    if predictor is None:
                        raise ValueError("no prompt generator for this fold")
                    for j in range(3):
                        zq = [z for z, c in slices if c == j]
                        zs = s_idx[j]
                        got = predictor(sup.image[zs], sup.gt[zs] == organ, [qry.image[z] for z in zq])
                        preds.update(zip(zq, got))
                for z, _chunk in slices:
                    gt_slice = qry.gt[z] == organ
                    pred = preds[z]
                    for m in methods:
                        mask, quality, failed = _segment_slice(m, pred, qry.image[z], gt_slice, segmenter, n_fg, n_bg)
                        accs[m].counter.add(mask, gt_slice)
                        accs[m].failures += int(failed)
                        if quality is not None:
                            accs[m].quality.append(quality)
                for m, acc in accs.items():
                    q = mean_quality(acc.quality) if acc.quality else None
                    records.append(
                        {
                            "fold": fold.index, "organ": organ_name, "method": m, "support": sup.name,
                            "support_slices": s_idx, "query": qry.name, "n_slices": len(slices),
                            "dice": acc.counter.dice, "failures": acc.failures,
                            "prompt_quality": q.as_dict() if q else None,
                        }
                    )
                bar.update(1)
    bar.close()
    result = summarise(records, list(organs.values()), list(methods))
    result["folds"] = [
        {
            "index": f.index,
            "support": volumes[f.support].name,
            "queries": [volumes[i].name for i in f.queries],
            "train": [volumes[i].name for i in f.train],
        }
        for f in folds
    ]
    result["seconds"] = round(time.time() - t0, 1)
    return result


def summarise(records: list[dict], organ_names: list[str], methods: list[str]) -> dict:
    """Organ Dice = mean over folds of (mean over the fold's query volumes); mean over organs.

    Prompt quality per method and organ = mean over query volumes of their per-slice means.
    """
    table: dict[str, dict[str, float]] = {}
    per_fold: dict[str, dict[str, list[float]]] = {}
    quality: dict[str, dict[str, dict]] = {}
    for m in methods:
        table[m], per_fold[m], quality[m] = {}, {}, {}
        for o in organ_names:
            recs = [r for r in records if r["method"] == m and r["organ"] == o]
            if not recs:
                continue
            folds = sorted({r["fold"] for r in recs})
            fold_means = [float(np.mean([r["dice"] for r in recs if r["fold"] == f])) for f in folds]
            per_fold[m][o] = fold_means
            table[m][o] = float(np.mean(fold_means))
            qs = [r["prompt_quality"] for r in recs if r["prompt_quality"]]
            if qs:
                quality[m][o] = {
                    k: (float(np.mean([q[k] for q in qs if q[k] is not None]))
                        if any(q[k] is not None for q in qs) else None)
                    for k in qs[0]
                }
        if table[m]:
            table[m]["mean"] = float(np.mean([table[m][o] for o in organ_names if o in table[m]]))
    return {"dice": table, "per_fold": per_fold, "prompt_quality": quality, "records": records}


def evaluate_skin(
    images: Sequence[tuple[str, np.ndarray, np.ndarray]],
    predictor: Predictor | Callable[[Fold], Predictor | None] | None,
    segmenter,
    methods: Sequence[str] = ALL_METHODS,
    n_fg: int = 10,
    n_bg: int = 10,
    progress: bool = True,
    folds: Sequence[Fold] | None = None,
) -> dict:
    """2-D protocol: images = [(id, image (H, W, 3) [0, 1], mask (H, W) bool)] sorted by id; support i,
    query (i + 1) mod n. Dice per episode, mean over episodes (single category 'lesion').

    folds: None = one fold holding every episode (one model); else `skin_folds`, with `predictor` a
    function fold -> Predictor (one held-out model per fold). Methods: ALL_METHODS and SKIN_METHODS."""
    from tqdm import tqdm

    from FoBSegmentLib.propagation.skin import segment_lesion

    if len(images) < 2:
        raise ValueError(f"the skin protocol needs at least 2 images, got {len(images)}")
    for m in methods:
        if m not in ALL_METHODS + SKIN_METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS + SKIN_METHODS)}")
    n = len(images)
    if folds is None:
        one = Fold(0, list(range(n)), 0, list(range(1, n)) + [0], [])
        episodes = [(one, i) for i in range(n)]
        def predictor_for(_fold: Fold):
            return predictor
    else:
        episodes = [(f, i) for f in folds for i in f.members[:-1]]
        predictor_for = predictor  # type: ignore[assignment]
    needs_model = any(m not in ("oracle", "lesion-colour") for m in methods)
    records = []
    t0 = time.time()
    for fold, i in tqdm(episodes, desc="evaluate", unit="img", disable=not progress):
        sid, s_img, s_msk = images[i]
        qid, q_img, q_msk = images[(i + 1) % n]
        pred = None
        if needs_model:
            fold_predictor = predictor_for(fold) if predictor_for is not None else None
            if fold_predictor is None:
                raise ValueError("no prompt generator for this fold")
            pred = fold_predictor(s_img, s_msk, [q_img])[0]
        for m in methods:
            if m in SKIN_METHODS:
                prob = pred.fg_probability if (m == "lesion" and pred is not None) else None
                if m == "lesion" and prob is None:
                    raise ValueError("method 'lesion' needs the generator's coarse foreground map")
                if segmenter is None:
                    raise ValueError(f"method {m!r} needs a segmenter")
                mask, prompts, _located = segment_lesion(q_img, s_img, s_msk, segmenter, prob)
                quality = prompt_quality(prompts.background, prompts.foreground, q_msk) if prompts else None
                failed = prompts is None
            else:
                mask, quality, failed = _segment_slice(m, pred, q_img, q_msk, segmenter, n_fg, n_bg)
            records.append(
                {
                    "fold": fold.index, "organ": "lesion", "method": m, "support": sid, "query": qid, "n_slices": 1,
                    "dice": dice(mask, q_msk), "failures": int(failed),
                    "prompt_quality": quality.as_dict() if quality else None,
                }
            )
    result = summarise(records, ["lesion"], list(methods))
    result["protocol"] = "skin"
    if folds is not None:
        result["folds"] = [
            {"index": f.index, "support": images[f.members[0]][0], "queries": [images[i][0] for i in f.queries],
             "train": [images[i][0] for i in f.train]}
            for f in folds
        ]
    result["seconds"] = round(time.time() - t0, 1)
    return result


def format_table(result: dict, title: str = "") -> str:
    """Organ x method Dice table (%), last row the mean over organs; then prompt quality of each method."""
    table = result["dice"]
    methods = [m for m in table if table[m]]
    organs = [o for o in next(iter(table.values())) if o != "mean"] if methods else []
    head = ["organ"] + methods
    rows = [[o] + [f"{100 * table[m][o]:.2f}" if o in table[m] else "-" for m in methods] for o in organs]
    rows.append(["mean"] + [f"{100 * table[m]['mean']:.2f}" for m in methods])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    qual = result.get("prompt_quality", {})
    if any(qual.get(m) for m in methods):
        lines.append("")
        lines.append("prompt quality (mean over organs): bg outside | bg in 20-px band | bg dist px | fg inside")
        for m in methods:
            qs = list(qual.get(m, {}).values())
            if not qs:
                continue

            def avg(k: str, qs=qs) -> str:
                vals = [q[k] for q in qs if q.get(k) is not None]
                return f"{np.mean(vals):.3f}" if vals else "-"

            lines.append(f"  {m:<13} {avg('bg_outside')} | {avg('bg_in_band')} | {avg('bg_distance_px')} | {avg('fg_inside')}")
    return "\n".join(lines)


def load_eval_volumes(folder: str | Path) -> list[EvalVolume]:
    """All `image_<id>` / `label_<id>` pairs of a folder, sorted by id, intensities normalised to [0, 1]
    with the engine's presets (the same images the pipeline hands to the generator)."""
    out = []
    for sid, img_path, lab_path in find_volume_pairs(folder):
        if not lab_path.is_file():
            raise FileNotFoundError(f"evaluation needs labels: {lab_path} is missing")
        arr, _ = read_volume_array(img_path)
        gt, _ = read_volume_array(lab_path)
        if gt.shape != arr.shape:
            raise ValueError(f"{lab_path.name} shape {gt.shape} differs from its image {arr.shape}")
        out.append(EvalVolume(f"{Path(folder).name}/{sid}", normalise_volume(arr), gt.astype(np.int32)))
    if not out:
        raise ValueError(f"no image_<id> volumes found in {folder}")
    return out


def load_skin_images(folder: str | Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """[(id, image (H, W, 3) float32 [0, 1], mask (H, W) bool)] of a dermoscopy folder, sorted by id."""
    from PIL import Image

    out = []
    for sid, img_path, mask_path in find_skin_images(folder):
        if not mask_path.is_file():
            raise FileNotFoundError(f"evaluation needs masks: {mask_path} is missing")
        with Image.open(img_path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        with Image.open(mask_path) as im:
            mask = np.asarray(im.convert("L")) > 127
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"{mask_path.name} size differs from its image")
        out.append((sid, rgb, mask))
    if not out:
        raise ValueError(f"no images found in {folder}")
    return out
