"""The evaluation protocol, metrics and baselines (issue 6), on synthetic cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from FoBSegmentLib.evaluate import baselines, metrics
from FoBSegmentLib.evaluate import protocol as P
from FoBSegmentLib.evaluate.datasets import find_volume_pairs
from FoBSegmentLib.prompts import PromptSet
from FoBSegmentLib.prompts.ring import ring_points
from FoBSegmentLib.prompts.sampling import farthest_points

# ----------------------------------------------------------------------------- folds and slices


def test_folds_match_the_fob_lineage_on_20_and_30_volumes():
    chaos = P.make_folds(20)
    assert [f.members for f in chaos] == [
        [0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12], [12, 13, 14, 15, 16], [16, 17, 18, 19, 0]
    ]
    assert [f.support for f in chaos] == [2, 6, 10, 14, 18]  # supp_idx = 2: the third volume
    assert all(len(f.queries) == 4 for f in chaos)
    sabs = P.make_folds(30)
    assert sabs[0].members == list(range(7)) and sabs[4].members == [24, 25, 26, 27, 28, 29, 0]
    assert all(len(f.queries) == 6 for f in sabs)


@pytest.mark.parametrize("n", [5, 15, 20, 30])
def test_fold_bookkeeping_never_mixes_support_queries_and_training(n):
    folds = P.make_folds(n)
    assert len(folds) == 5
    for f in folds:
        assert f.support in f.members and f.support not in f.queries
        assert sorted(f.queries + [f.support]) == sorted(f.members)
        assert not set(f.train) & set(f.queries) and f.support not in f.train
        assert sorted(f.train + f.members) == list(range(n))
    supports = {f.support for f in folds}
    assert len(supports) == 5  # every fold has its own support scan
    if n == 15:  # our adaptation: folds of 4, support = third, as documented in protocol.py
        assert [f.members for f in folds] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [9, 10, 11, 12], [12, 13, 14, 0]]
        assert supports == {2, 5, 8, 11, 14}
        assert set().union(*[f.queries for f in folds]) == set(range(15)) - supports
    if n == 5:  # Synapse here: folds of 2, support = second, every case is a query exactly once
        assert sorted(q for f in folds for q in f.queries) == list(range(5))


def test_make_folds_rejects_too_few_volumes():
    with pytest.raises(ValueError, match="at least"):
        P.make_folds(3)


def test_support_slices_and_query_chunks():
    gt = np.zeros((30, 8, 8), np.int32)
    gt[10:22, 2:5, 2:5] = 1  # 12 organ slices: 10..21
    assert P.support_slices(gt, 1) == [10 + 2, 10 + 6, 10 + 10]  # int(12 * {1/6, 1/2, 5/6})
    chunks = P.query_chunks(gt, 1)
    assert [z for z, _ in chunks] == list(range(10, 22))
    assert [c for _, c in chunks] == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(ValueError, match="no voxel"):
        P.support_slices(gt, 2)


# ----------------------------------------------------------------------------- metrics


def _disc(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_dice_and_counter():
    a = np.zeros((4, 4), bool)
    a[:2] = True
    b = np.zeros((4, 4), bool)
    b[1:3] = True
    assert metrics.dice(a, b) == pytest.approx(0.5)
    assert metrics.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    c = metrics.DiceCounter()
    c.add(a, b)
    c.add(a, a)
    assert (c.tp, c.fp, c.fn) == (4 + 8, 4, 4)
    assert c.dice == pytest.approx(2 * 12 / (2 * 12 + 8))
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(a, b[:2])


def test_prompt_quality_on_known_geometry():
    gt = _disc((100, 100), (50, 50), 20)
    angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    ring = np.stack([50 + 30 * np.cos(angles), 50 + 30 * np.sin(angles)], axis=1)  # 10 px outside
    far = np.array([[2.0, 2.0], [97.0, 2.0]])  # ~48 px outside
    inside_bg = np.array([[50.0, 50.0]])  # 20 px inside
    fg = np.array([[50.0, 50.0], [55.0, 50.0], [90.0, 90.0]])
    q = metrics.prompt_quality(np.concatenate([ring, far, inside_bg]), fg, gt)
    assert q.bg_outside == pytest.approx(10 / 11)
    assert q.bg_in_band == pytest.approx(8 / 11)
    d_far = np.hypot(48, 48) - 20
    assert q.bg_distance == pytest.approx((8 * 10 + 2 * d_far + 20) / 11, abs=1.0)
    assert q.fg_inside == pytest.approx(2 / 3)
    empty = metrics.prompt_quality(np.zeros((0, 2)), np.zeros((0, 2)), gt)
    assert empty.bg_outside is None and empty.fg_inside is None
    with pytest.raises(ValueError, match="non-empty"):
        metrics.prompt_quality(ring, fg, np.zeros((10, 10), bool))


# ----------------------------------------------------------------------------- baselines


def test_baselines_follow_the_coarse_map():
    gt = _disc((96, 96), (40, 50), 15)
    prob = np.clip(ndi.gaussian_filter(gt.astype(np.float32), 4), 0, 1)
    prob = prob / prob.max()
    conf = baselines.confidence_prompts(prob, 10, 10)
    fr, fc = conf.foreground[:, 1].astype(int), conf.foreground[:, 0].astype(int)
    assert len(conf.foreground) == 10 and gt[fr, fc].all()
    br, bc = conf.background[:, 1].astype(int), conf.background[:, 0].astype(int)
    assert len(conf.background) == 10 and not gt[br, bc].any()
    d = np.hypot(*(conf.foreground[:, None] - conf.foreground[None]).transpose(2, 0, 1))
    assert d[~np.eye(10, dtype=bool)].min() >= baselines.DEFAULT_MIN_SPACING_PX - 1e-9
    samp = baselines.mask_sampled_prompts(prob, 10, 10, seed=1)
    coarse = baselines.coarse_mask(prob)
    r, c = samp.foreground[:, 1].astype(int), samp.foreground[:, 0].astype(int)
    assert coarse[r, c].all()
    r, c = samp.background[:, 1].astype(int), samp.background[:, 0].astype(int)
    assert not coarse[r, c].any()
    assert np.array_equal(samp.background, baselines.mask_sampled_prompts(prob, 10, 10, seed=1).background)
    assert metrics.dice(coarse, gt) > 0.8
    empty = baselines.mask_sampled_prompts(np.full((20, 20), 0.1, np.float32))
    assert len(empty.foreground) == 1  # fallback: the most confident pixel
    orc = baselines.oracle_prompts(gt)
    q = metrics.prompt_quality(orc.background, orc.foreground, gt)
    assert q.bg_outside == 1.0 and q.bg_in_band == 1.0 and q.fg_inside == 1.0
    with pytest.raises(ValueError, match="coarse foreground map"):
        baselines.confidence_prompts(np.zeros(5))


# ----------------------------------------------------------------------------- the protocol end to end

SHAPE = (96, 96)
CENTRES = {1: (30, 30), 2: (66, 66)}


def _synthetic_volumes(n=5, z=12, seed=0):
    """n volumes: organ 1 on slices 2..9, organ 2 on slices 4..11, discs whose radius changes with z.

    Organ pixels are bright (0.8), the rest dark (0.2); pixel (0, 0) encodes (volume, slice) so a stub
    predictor can tell which slices it was given.
    """
    rng = np.random.default_rng(seed)
    vols = []
    for v in range(n):
        gt = np.zeros((z,) + SHAPE, np.int32)
        for k in range(z):
            if 2 + v % 2 <= k <= 9:
                gt[k][_disc(SHAPE, CENTRES[1], 6 + (k % 4) + v)] = 1
            if 4 <= k <= 11:
                gt[k][_disc(SHAPE, CENTRES[2], 5 + (k % 3))] = 2
        img = np.where(gt > 0, 0.8, 0.2).astype(np.float32) + rng.normal(0, 0.01, gt.shape).astype(np.float32)
        for k in range(z):
            img[k, 0, 0] = 0.001 * (100 * v + k)
        vols.append(P.EvalVolume(f"vol{v}", img, gt))
    return vols


class ThresholdInRing:
    """Stub segmenter: bright pixels inside the polygon of the background prompts (optionally eroded)."""

    name = "threshold-in-ring"

    def __init__(self, erode: int = 0):
        self.erode = erode
        self.calls = 0

    def segment(self, image, prompts):
        from FoBSegmentLib.segmenters.base import SegmentationResult, ordered_ring, polygon_mask

        self.calls += 1
        if len(prompts.background) < 3:
            raise ValueError("need a ring")
        inside = polygon_mask(ordered_ring(prompts.background), *image.shape[:2])
        mask = inside & (image > 0.5)
        if self.erode:
            mask = ndi.binary_erosion(mask, iterations=self.erode)
        return SegmentationResult(mask=mask, score=1.0)


def _expected_dice(vols, organ, erode):
    """Protocol Dice of a segmenter returning the ground truth eroded by `erode` px, from the labels alone.

    Synapse-style folds of 2 over 5 volumes: every volume is the single query of one fold, so the
    organ Dice is the mean over volumes of the 3-D Dice over that volume's organ slices.
    """
    per_volume = []
    for v in vols:
        tp = fp = fn = 0
        for k in range(v.gt.shape[0]):
            g = v.gt[k] == organ
            if not g.any():
                continue  # slices without the organ are not evaluated (method doc 11.1)
            p = ndi.binary_erosion(g, iterations=erode) if erode else g
            tp += (p & g).sum()
            fp += (p & ~g).sum()
            fn += (~p & g).sum()
        per_volume.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(per_volume))


def test_perfect_prompts_give_the_segmenters_dice():
    vols = _synthetic_volumes()
    organs = {1: "liver", 2: "right kidney"}
    for erode in (0, 1):
        seg = ThresholdInRing(erode)
        res = P.evaluate_volumes(vols, lambda f, o: None, seg, ["oracle"], organs, progress=False)
        for organ, name in organs.items():
            assert res["dice"]["oracle"][name] == pytest.approx(_expected_dice(vols, organ, erode), abs=1e-12)
        n_slices = sum(int((v.gt == o).reshape(v.gt.shape[0], -1).any(1).sum()) for v in vols for o in organs)
        assert seg.calls == n_slices  # only organ-containing query slices are segmented
    assert res["dice"]["oracle"]["liver"] < 0.95  # the eroded run really differs
    q = res["prompt_quality"]["oracle"]["liver"]
    assert q["bg_outside"] == 1.0 and q["fg_inside"] == 1.0


def test_protocol_bookkeeping_with_a_recording_predictor():
    vols = _synthetic_volumes()
    calls = []
    asked = []

    def predictor_for(fold, organ):
        asked.append((fold.index, organ))
        def predict(s_img, s_mask, queries):
            sv, sz = divmod(round(s_img[0, 0] * 1000), 100)
            out = []
            for q in queries:
                qv, qz = divmod(round(q[0, 0] * 1000), 100)
                calls.append((fold.index, sv, sz, qv, qz))
                # A perfect generator: ring and foreground of the bright blob under the support mask.
                blob, _ = ndi.label(q > 0.5)
                ids = np.unique(blob[s_mask & (blob > 0)])
                region = np.isin(blob, ids) if len(ids) else s_mask
                ring, valid = ring_points(region, 10)
                fg = farthest_points(ndi.binary_erosion(region, iterations=2), 5)
                out.append(P.SlicePrediction(ring[valid], fg, region.astype(np.float32), ring[valid]))
            return out

        return predict

    res = P.evaluate_volumes(
        vols, predictor_for, ThresholdInRing(), ["fob", "fob-nospr", "coarse"], {1: "liver"}, progress=False
    )
    folds = P.make_folds(len(vols))
    assert asked == [(f.index, 1) for f in folds]  # one generator per fold and test organ
    for fold_i, sv, sz, qv, qz in calls:
        fold = folds[fold_i]
        assert sv == fold.support and qv in fold.queries and qv != sv and qv not in fold.train
        zs = P.support_slices(vols[sv].gt, 1)
        chunks = dict(P.query_chunks(vols[qv].gt, 1))
        assert sz == zs[chunks[qz]]  # chunk j of the query uses support slice j
    assert len(calls) == sum(int((v.gt == 1).reshape(12, -1).any(1).sum()) for v in vols)
    for m in ("fob", "fob-nospr", "coarse"):
        assert res["dice"][m]["liver"] == pytest.approx(1.0)
    assert [f["support"] for f in res["folds"]] == [f"vol{f.support}" for f in folds]
    table = P.format_table(res)
    assert "liver" in table and "100.00" in table


def test_unknown_method_and_missing_generator_are_clear_errors():
    vols = _synthetic_volumes()
    with pytest.raises(ValueError, match="unknown method"):
        P.evaluate_volumes(vols, lambda f, o: None, ThresholdInRing(), ["magic"], progress=False)
    with pytest.raises(ValueError, match="no prompt generator"):
        P.evaluate_volumes(vols, lambda f, o: None, ThresholdInRing(), ["fob"], {1: "liver"}, progress=False)


def test_real_generator_runs_every_method_on_the_synthetic_case():
    from FoBSegmentLib.model import FoBPromptGenerator

    vols = _synthetic_volumes(z=12)
    gen = FoBPromptGenerator.from_config(image_size=64)
    res = P.evaluate_volumes(
        vols, lambda f, o: P.generator_predictor(gen), ThresholdInRing(), list(P.ALL_METHODS),
        {2: "right kidney"}, folds=P.make_folds(5)[:2], progress=False,
    )
    for m in P.ALL_METHODS:
        assert 0.0 <= res["dice"][m]["right kidney"] <= 1.0
        assert len(res["per_fold"][m]["right kidney"]) == 2
    assert res["dice"]["oracle"]["right kidney"] == pytest.approx(1.0)
    assert res["prompt_quality"]["fob"]["right kidney"]["bg_outside"] is not None
    assert "coarse" not in res["prompt_quality"] or not res["prompt_quality"]["coarse"]


def test_skin_protocol_pairs_each_image_with_the_next():
    imgs = []
    for i in range(4):
        m = _disc((64, 64), (32, 20 + 5 * i), 10)
        imgs.append((f"img{i}", np.where(m, 0.9, 0.1).astype(np.float32), m))
    res = P.evaluate_skin(imgs, None, ThresholdInRing(), ["oracle"], progress=False)
    pairs = [(r["support"], r["query"]) for r in res["records"]]
    assert pairs == [("img0", "img1"), ("img1", "img2"), ("img2", "img3"), ("img3", "img0")]
    assert res["dice"]["oracle"]["lesion"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2"):
        P.evaluate_skin(imgs[:1], None, ThresholdInRing(), ["oracle"], progress=False)


def test_methods_prompts_uses_the_right_points():
    pred = P.SlicePrediction(
        background=np.array([[1.0, 1.0]] * 3), foreground=np.array([[5.0, 5.0]]),
        fg_probability=np.zeros((10, 10), np.float32), background_coarse=np.array([[2.0, 2.0]] * 3),
    )
    gt = np.zeros((10, 10), bool)
    gt[4:6, 4:6] = True
    assert np.array_equal(P.methods_prompts("fob", pred, gt).background, pred.background)
    assert np.array_equal(P.methods_prompts("fob-nospr", pred, gt).background, pred.background_coarse)
    assert P.methods_prompts("coarse", pred, gt) is None
    assert isinstance(P.methods_prompts("oracle", None, gt), PromptSet)


def test_protocol_dice_equals_the_real_segmenters_own_dice_with_oracle_prompts():
    """With perfect prompts the protocol reports exactly the Dice the segmenter itself achieves."""
    import cv2

    from FoBSegmentLib.segmenters.grabcut import GrabCutSegmenter

    vols = _synthetic_volumes()
    seg = GrabCutSegmenter()
    res = P.evaluate_volumes(vols, lambda f, o: None, seg, ["oracle"], {2: "right kidney"}, progress=False)
    per_volume = []
    for v in vols:  # folds of 2 over 5 volumes: each volume is the query of exactly one fold
        counter = metrics.DiceCounter()
        for z in range(v.gt.shape[0]):
            g = v.gt[z] == 2
            if g.any():
                cv2.setRNGSeed(0)
                counter.add(seg.segment(v.image[z], baselines.oracle_prompts(g)).mask, g)
        per_volume.append(counter.dice)
    assert res["dice"]["oracle"]["right kidney"] == pytest.approx(np.mean(per_volume), abs=1e-12)
    assert res["dice"]["oracle"]["right kidney"] > 0.8  # small bright discs (radius 5-7 px) on a dark background


def test_fold_training_ids_never_hold_a_fold_member(data_dir, tmp_path):
    ids = [sid for sid, _i, _l in find_volume_pairs(data_dir / "chaos_mr_t2spir")]
    for fold in P.make_folds(len(ids)):
        train = P.fold_training_ids(data_dir / "chaos_mr_t2spir", fold.index)
        assert len(train) == len(ids) - len(fold.members)
        assert not set(train) & {ids[i] for i in fold.members}  # neither the support nor a query
    with pytest.raises(ValueError, match="0..4"):
        P.fold_training_ids(data_dir / "chaos_mr_t2spir", 5)
    # image folders have their own folds since issue 21 (Testing/test_skin.py); an empty folder has none
    with pytest.raises(ValueError, match="volume folders"):
        P.fold_training_ids(tmp_path, 0)


def test_fob_map_hands_the_coarse_components_with_a_foreground_prompt():
    prob = np.zeros((20, 20), np.float32)
    prob[2:6, 2:6] = 0.9
    prob[12:18, 12:18] = 0.8
    pred = P.SlicePrediction(background=np.array([[0.0, 0.0], [19.0, 0.0], [19.0, 19.0]]),
                             foreground=np.array([[14.0, 15.0]]), fg_probability=prob, background_coarse=None)
    ps = P.methods_prompts("fob-map", pred, np.zeros((20, 20), bool))
    assert np.array_equal(ps.prior_mask, prob == np.float32(0.8))  # the component the point lies on only
    assert np.array_equal(ps.background, pred.background) and ps.fg_probability is prob
    pred.foreground = np.array([[10.0, 0.0]])  # no point on the map: all of it
    assert np.array_equal(P.methods_prompts("fob-map", pred, np.zeros((20, 20), bool)).prior_mask, prob >= 0.5)
    pred.fg_probability = np.zeros((20, 20), np.float32)  # an empty map gives no mask prompt
    assert P.methods_prompts("fob-map", pred, np.zeros((20, 20), bool)).prior_mask is None
