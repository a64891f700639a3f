"""FoBPromptGenerator: shapes, gradient flow, a few optimisation steps on a real CHAOS pair,
bad input, save/load round trips and corrupt checkpoints."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from FoBSegmentLib import FoBPromptGenerator, PromptSet
from FoBSegmentLib.model import normalize_image
from FoBSegmentLib.model.config import FoBConfig
from FoBSegmentLib.prompts.sampling import farthest_point_sampling


@pytest.fixture(scope="module")
def chaos_pair(data_dir):
    """Adjacent T2-SPIR slices of CHAOS patient 5 through the spleen: (img_s, mask_s, img_q, mask_q)."""
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / "image_5.nii.gz")))
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / "chaos_mr_t2spir" / "label_5.nii.gz")))
    organ = lab == 4
    z = int(np.argmax(organ.sum(axis=(1, 2))))
    assert organ[z].sum() > 200 and organ[z + 1].sum() > 200
    return img[z].astype(np.float32), organ[z], img[z + 1].astype(np.float32), organ[z + 1]


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    return FoBPromptGenerator.from_config()


def to_batch(img: np.ndarray) -> torch.Tensor:
    x = normalize_image(np.repeat(img[:, :, None], 3, axis=2).astype(np.float32))
    return torch.from_numpy(x.transpose(2, 0, 1)).unsqueeze(0)


# ----------------------------------------------------------------------------- inference shapes


@pytest.mark.parametrize("shape", [(200, 240), (256, 256), (320, 320)])
@pytest.mark.parametrize("n_bg", [6, 10, 16])
def test_predict_shapes_and_ranges(chaos_pair, shape, n_bg):
    torch.manual_seed(1)
    g = FoBPromptGenerator.from_config(n_bg=n_bg, n_fg=5)
    img_s, m_s, img_q, _ = chaos_pair
    h, w = shape
    sup = cv2.resize(img_s, (w, h), interpolation=cv2.INTER_LINEAR)
    msk = cv2.resize(m_s.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    qry = cv2.resize(img_q, (w + 16, h - 8), interpolation=cv2.INTER_LINEAR)  # query size differs
    ps = g.predict(sup, msk, qry)
    assert isinstance(ps, PromptSet)
    assert ps.background.shape == (n_bg, 2)
    assert 1 <= len(ps.foreground) <= 5 and ps.foreground.shape[1] == 2
    assert ps.fg_probability.shape == (h - 8, w + 16)
    assert ps.fg_probability.min() >= 0.0 and ps.fg_probability.max() <= 1.0
    ps.check_inside(h - 8, w + 16)


def test_predict_rgb_and_uint8(data_dir, gen):
    rgb = cv2.cvtColor(cv2.imread(str(data_dir / "isic" / "ISIC_0012388.jpg")), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(data_dir / "isic" / "ISIC_0012388_mask.png"), cv2.IMREAD_GRAYSCALE) > 127
    ps = gen.predict(rgb, mask, rgb)  # uint8 RGB, non-square
    assert ps.background.shape == (10, 2) and ps.fg_probability.shape == rgb.shape[:2]
    ps.check_inside(*rgb.shape[:2])
    # Raw intensities and [0, 1] scaling give the same prompts (per-image z-score).
    a = gen.predict(rgb.astype(np.float32), mask, rgb.astype(np.float32))
    b = gen.predict(rgb.astype(np.float32) / 255.0, mask, rgb.astype(np.float32) / 255.0)
    np.testing.assert_allclose(a.background, b.background, atol=1e-3)


def test_predict_batch_matches_predict(chaos_pair, gen):
    img_s, m_s, img_q, _ = chaos_pair
    queries = [img_q, img_s, cv2.resize(img_q, (200, 180))]
    many = gen.predict_batch(img_s, m_s, queries, batch_size=2)
    assert len(many) == 3
    for q, ps in zip(queries, many):
        one = gen.predict(img_s, m_s, q)
        np.testing.assert_allclose(ps.background, one.background, atol=1e-3)
        np.testing.assert_allclose(ps.foreground, one.foreground, atol=1e-3)
        np.testing.assert_allclose(ps.fg_probability, one.fg_probability, atol=1e-4)


def test_coarse_probabilities_are_the_prompts_maps(chaos_pair, gen):
    """The coarse map alone (no background heads) is the prompts' fg_probability to the bit."""
    img_s, m_s, img_q, _ = chaos_pair
    queries = [img_q, img_s, cv2.resize(img_q, (200, 180))]
    maps = gen.coarse_probabilities(gen.encode_support(img_s, m_s), queries, batch_size=2)
    for ps, prob in zip(gen.predict_batch(img_s, m_s, queries, batch_size=2), maps):
        assert prob.shape == ps.fg_probability.shape and np.array_equal(prob, ps.fg_probability)
    with pytest.raises(ValueError, match="batch_size"):
        gen.coarse_probabilities(gen.encode_support(img_s, m_s), queries, batch_size=0)


def test_predict_with_details(chaos_pair, gen):
    img_s, m_s, img_q, _ = chaos_pair
    d = gen.predict_with_details(img_s, m_s, img_q)
    assert d["bg_confidence"].shape == (10,)
    assert d["coarse_background"].shape == (10, 2)
    ring = d["support_ring"]
    assert ring.shape == (10, 2)
    ix = np.floor(ring + 0.5).astype(int)
    assert not m_s[ix[:, 1], ix[:, 0]].any()  # support ring (support frame) outside the support mask
    assert 0.0 <= d["fg_probability_max"] <= 1.0


def test_support_filling_the_image_gives_no_background(chaos_pair, gen):
    img_s, _, img_q, _ = chaos_pair
    ps = gen.predict(img_s, np.ones(img_s.shape, bool), img_q)
    assert ps.background.shape == (0, 2) and len(ps.foreground) >= 1


def test_foreground_prompts_spread_and_fallback(gen):
    prob = np.zeros((256, 256), np.float32)
    prob[100:200, 40:220] = 0.95
    prob[150, 130] = 0.99
    pts = gen._foreground_points(prob)
    assert pts.shape == (10, 2)
    assert np.all(prob[pts[:, 1].astype(int), pts[:, 0].astype(int)] >= 0.9)
    assert tuple(pts[0]) == (130.0, 150.0)  # starts at the most probable candidate
    d = np.hypot(*(pts[:, None] - pts[None]).transpose(2, 0, 1))
    d[np.eye(10, dtype=bool)] = np.inf
    assert d.min() > 25, "foreground prompts clump (raster order would put them on one row)"
    low = np.full((64, 64), 0.2, np.float32)
    low[10, 20] = 0.5
    np.testing.assert_array_equal(gen._foreground_points(low), [[20.0, 10.0]])


def test_farthest_point_sampling_small_sets():
    pts = np.array([[0, 0], [10, 0], [0, 10], [1, 1]], float)
    assert sorted(farthest_point_sampling(pts, 10).tolist()) == [0, 1, 2, 3]
    assert farthest_point_sampling(pts, 2, start=3).tolist() == [3, 1] or farthest_point_sampling(
        pts, 2, start=3
    ).tolist() == [3, 2]


# ----------------------------------------------------------------------------- training forward


def test_forward_batch_shapes_and_losses(chaos_pair):
    torch.manual_seed(2)
    g = FoBPromptGenerator.from_config(n_bg=6)
    img_s, m_s, img_q, m_q = chaos_pair
    si = torch.cat([to_batch(img_s), to_batch(img_q)])
    qi = torch.cat([to_batch(img_q), to_batch(img_s)])
    sm = torch.from_numpy(np.stack([m_s, m_q])).float()
    qm = torch.from_numpy(np.stack([m_q, m_s])).float()
    out = g(si, sm, qi)
    assert out["heatmaps"].shape == (2, 6, 256, 256)
    assert out["phi"].shape == (2, 6, 32, 32)
    assert out["fg_prob"].shape == (2, 256, 256)
    prob = out["fg_prob"].detach()
    assert float(prob.min()) > 0 and float(prob.max()) < 1
    assert out["refined_points"].shape == (2, 6, 2) and out["refined_points"].requires_grad
    assert (
        float(out["refined_points"].detach().min()) >= 0
        and float(out["refined_points"].detach().max()) <= 255
    )
    assert out["bg_prototypes"].shape == (2, 6, 64)
    assert out["support_valid"].all()
    losses = g.compute_losses(out, qm)
    for k in ("heat", "coor", "fore", "rac", "total"):
        assert losses[k].ndim == 0 and torch.isfinite(losses[k]), k
    # Initial values near the sanity values of fob_method.md 16.7 (near-zero heatmaps at init).
    assert 0.3 < 1000 * float(losses["heat"].detach()) < 3.0
    expect = float((losses["rac"] + 1e3 * losses["heat"] + 1e-4 * losses["coor"] + losses["fore"]).detach())
    assert abs(float(losses["total"].detach()) - expect) < 1e-4 * max(1.0, abs(expect))


def test_every_parameter_gets_a_gradient(chaos_pair):
    torch.manual_seed(3)
    g = FoBPromptGenerator.from_config()
    img_s, m_s, img_q, m_q = chaos_pair
    out = g(to_batch(img_s), torch.from_numpy(m_s)[None].float(), to_batch(img_q))
    losses = g.compute_losses(out, torch.from_numpy(m_q)[None].float())
    losses["total"].backward()
    # Above float rounding noise (a structurally dead parameter shows gradients of ~1e-12).
    dead = [n for n, p in g.named_parameters() if p.grad is None or float(p.grad.abs().max()) <= 1e-9]
    assert not dead, f"parameters without gradient: {dead}"
    assert len([n for n, _ in g.named_parameters() if n.startswith("spr.")]) > 10


def test_spr_trained_by_point_loss_alone(chaos_pair):
    torch.manual_seed(4)
    g = FoBPromptGenerator.from_config()
    img_s, m_s, img_q, m_q = chaos_pair
    out = g(to_batch(img_s), torch.from_numpy(m_s)[None].float(), to_batch(img_q))
    g.compute_losses(out, torch.from_numpy(m_q)[None].float())["coor"].backward()
    spr = {n: p for n, p in g.named_parameters() if n.startswith("spr.")}
    dead = [n for n, p in spr.items() if p.grad is None or float(p.grad.abs().max()) <= 1e-9]
    assert not dead, f"SPR parameters untouched by L_coor: {dead}"
    # The point loss also reaches the encoder through SPR's feature sampling (no detach).
    assert float(g.encoder.reduce.weight.grad.abs().sum()) > 0


def test_invalid_query_ring_is_masked(chaos_pair):
    torch.manual_seed(5)
    g = FoBPromptGenerator.from_config()
    img_s, m_s, img_q, _ = chaos_pair
    out = g(to_batch(img_s), torch.from_numpy(m_s)[None].float(), to_batch(img_q))
    losses = g.compute_losses(out, torch.zeros(1, 256, 256))
    assert float(losses["heat"].detach()) == 0.0 and float(losses["coor"].detach()) == 0.0
    assert not losses["gt_valid"].any()
    losses["total"].backward()  # still differentiable (L_fore, L_rac)


def test_adam_steps_reduce_loss_on_real_pair(chaos_pair):
    torch.manual_seed(6)
    g = FoBPromptGenerator.from_config()
    img_s, m_s, img_q, m_q = chaos_pair
    si, qi = to_batch(img_s), to_batch(img_q)
    sm, qm = torch.from_numpy(m_s)[None].float(), torch.from_numpy(m_q)[None].float()
    opt = torch.optim.Adam(g.parameters(), lr=3e-4)
    history = []
    for _ in range(6):
        losses = g.compute_losses(g(si, sm, qi), qm)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        history.append(float(losses["total"].detach()))
    with torch.no_grad():
        final = float(g.compute_losses(g(si, sm, qi), qm)["total"])
    assert final < 0.5 * history[0], (history, final)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors(chaos_pair, gen):
    img_s, m_s, img_q, _ = chaos_pair
    cases = [
        ((img_s, np.zeros_like(m_s), img_q), "empty"),
        ((img_s, m_s[:100], img_q), "shape"),
        ((np.where(m_s, np.nan, img_s), m_s, img_q), "NaN"),
        ((img_s, m_s, np.full_like(img_q, np.inf)), "NaN or infinite"),
        ((img_s, m_s * 0.5, img_q), "only 0 and 1"),
        ((img_s, m_s.astype(complex), img_q), "dtype"),
        ((img_s.astype(complex), m_s, img_q), "real numbers"),
        ((img_s.astype(object), m_s, img_q), "real numbers"),
        ((img_s[None, :, :, None], m_s, img_q), "shape"),
        ((img_s, m_s, np.stack([img_q] * 4, axis=-1)), r"\(H, W, 3\)"),
        ((img_s, m_s[None], img_q), "2-D"),
        ((img_s[:4, :4], m_s[:4, :4], img_q), "too small"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            gen.predict(*args)
    with pytest.raises(ValueError, match="list"):
        gen.predict_batch(img_s, m_s, img_q)
    with pytest.raises(ValueError, match="batch_size"):
        gen.predict_batch(img_s, m_s, [img_q], batch_size=0)


def test_forward_shape_errors(gen):
    x = torch.zeros(1, 3, 256, 256)
    with pytest.raises(ValueError, match="support_mask"):
        gen(x, torch.zeros(1, 128, 128), x)
    with pytest.raises(ValueError, match="query_img"):
        gen(x, torch.zeros(1, 256, 256), torch.zeros(2, 3, 256, 256))
    with pytest.raises(ValueError, match="support_img"):
        gen(torch.zeros(1, 1, 256, 256), torch.zeros(1, 256, 256), torch.zeros(1, 1, 256, 256))


def test_config_errors():
    with pytest.raises(ValueError, match="unknown FoB config"):
        FoBPromptGenerator.from_config(n_bgg=3)
    with pytest.raises(ValueError, match="encoder"):
        FoBPromptGenerator.from_config(encoder="vit")
    with pytest.raises(ValueError, match="k_in"):
        FoBConfig(k_out=15, k_in=21)
    with pytest.raises(ValueError, match="fg_threshold"):
        FoBConfig(fg_threshold=1.5)
    c = FoBConfig()
    assert (c.encoder, c.n_bg, c.n_fg, c.sigma, c.k_out, c.k_in, c.kappa, c.k_samples) == (
        "lite",
        10,
        10,
        4.0,
        21,
        15,
        3,
        8,
    )
    assert c.fg_threshold == 0.9 and c.tau == 0.1 and c.image_size == 256
    assert FoBConfig.from_json(c.to_json()) == c


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_load_round_trip(tmp_path, chaos_pair, suffix):
    torch.manual_seed(7)
    g = FoBPromptGenerator.from_config(n_bg=8, fg_threshold=0.8)
    with torch.no_grad():  # move off the init so a silent re-init could not pass
        for p in g.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = g.save(tmp_path / f"model{suffix}")
    g2 = FoBPromptGenerator.load(path)
    assert g2.config == g.config and g2.config.n_bg == 8
    for (k, a), (k2, b) in zip(g.state_dict().items(), g2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    img_s, m_s, img_q, _ = chaos_pair
    a, b = g.predict(img_s, m_s, img_q), g2.predict(img_s, m_s, img_q)
    np.testing.assert_array_equal(a.background, b.background)
    np.testing.assert_array_equal(a.foreground, b.foreground)
    np.testing.assert_array_equal(a.fg_probability, b.fg_probability)
    if suffix == ".pt":
        obj = torch.load(path, weights_only=True)
        assert json.loads(obj["config"])["n_bg"] == 8


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    torch.manual_seed(8)
    g = FoBPromptGenerator.from_config(n_bg=6)
    good = g.save(tmp_path / "good.safetensors")
    raw = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all" * 10)
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01garbage" * 50)
    good_pt = g.save(tmp_path / "good.pt")
    (tmp_path / "trunc.pt").write_bytes(good_pt.read_bytes()[:1000])
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    state = {k: v.clone().contiguous() for k, v in g.state_dict().items()}
    meta = {"format": "fob-prompt-generator", "format_version": "1", "config": FoBConfig(n_bg=10).to_json()}
    save_file(state, str(tmp_path / "mismatch.safetensors"), metadata=meta)
    state.pop(next(iter(state)))
    meta6 = dict(meta, config=FoBConfig(n_bg=6).to_json())
    save_file(state, str(tmp_path / "missing.safetensors"), metadata=meta6)
    save_file(g.state_dict(), str(tmp_path / "badcfg.safetensors"), metadata=dict(meta, config="{nope"))
    torch.save({"format": "fob-prompt-generator", "state_dict": {"a": [1, 2]}}, tmp_path / "nontensor.pt")
    expected = {
        "trunc.safetensors": "not a FoB checkpoint",
        "junk.safetensors": "not a FoB checkpoint",
        "junk.pt": "not a FoB checkpoint",
        "trunc.pt": "not a FoB checkpoint",
        "foreign.safetensors": "not a FoB",
        "mismatch.safetensors": "expected",
        "missing.safetensors": "missing",
        "badcfg.safetensors": "bad config",
        "nontensor.pt": "non-tensors",
    }
    for name, msg in expected.items():
        with pytest.raises(ValueError, match=msg):
            FoBPromptGenerator.load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        FoBPromptGenerator.load(tmp_path / "absent.safetensors")


def test_default_model_missing_says_how_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv("FOB_RESOURCES", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="fob train"):
        FoBPromptGenerator.load()
    FoBPromptGenerator.from_config(n_bg=4).save(tmp_path / "fob_lite.safetensors")
    assert FoBPromptGenerator.load().config.n_bg == 4


def test_to_device_and_eval_restored(chaos_pair):
    g = FoBPromptGenerator.from_config().train()
    img_s, m_s, img_q, _ = chaos_pair
    g.predict(img_s, m_s, img_q)
    assert g.training  # predict switched to eval and back
    if torch.cuda.is_available():
        g = g.to("cuda")
        ps = g.predict(img_s, m_s, img_q)
        assert ps.background.shape == (10, 2)


def test_spr_sampling_frame_16_6():
    """IDR samples features in the documented frame: pixel centre 8j + 3.5 of a stride-8 map is cell j."""
    from FoBSegmentLib.model.spr import SPR

    torch.manual_seed(9)
    fq = torch.randn(1, 4, 32, 32)
    pts = torch.tensor([[[[3.5, 3.5], [8 * 20 + 3.5, 8 * 7 + 3.5], [0.0, 255.0], [255.0, 0.0]]]])
    grid = (pts + 0.5) / 256 * 2 - 1
    assert float(grid.abs().max()) <= 1.0
    got = SPR._sample(fq, pts, 256)[0, 0]  # (K, d)
    torch.testing.assert_close(got[0], fq[0, :, 0, 0])
    torch.testing.assert_close(got[1], fq[0, :, 7, 20])
    # Points in the outer half cell read the edge cell (border padding), not a fade to zero.
    torch.testing.assert_close(got[2], fq[0, :, 31, 0])
    torch.testing.assert_close(got[3], fq[0, :, 0, 31])
