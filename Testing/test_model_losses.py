"""FoB losses (fob_method.md 8): known values, masking, and the direction each loss pushes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from FoBSegmentLib.model.bppc import erode_mask, support_prototypes
from FoBSegmentLib.model.heatmaps import gaussian_heatmaps
from FoBSegmentLib.model.losses import foreground_loss, heatmap_loss, point_loss, rac_loss, total_loss


def test_heatmap_loss_values_and_masking():
    pts = torch.tensor([[[100.0, 120.0], [30.0, 40.0]]])
    target = gaussian_heatmaps(pts, None, (256, 256), 4.0)
    zeros = torch.zeros_like(target)
    phi_zero = torch.zeros(1, 2, 64, 64)
    # All-zero prediction: each term ~ pi sigma^2 / 256^2 (fob_method.md 8 sanity value, 1000 L ~ 0.77).
    val = float(heatmap_loss(zeros, phi_zero, target, torch.ones(1, 2, dtype=torch.bool)))
    assert abs(1000 * val - 1000 * math.pi * 16 / 256**2) < 0.05
    assert float(heatmap_loss(target, phi_zero, target, torch.ones(1, 2, dtype=torch.bool))) == pytest.approx(
        val / 2, rel=1e-5
    )
    # A wrong channel that is masked out does not count.
    bad = target.clone()
    bad[0, 1] = 5.0
    masked = heatmap_loss(bad, phi_zero, target, torch.tensor([[True, False]]))
    only_first = heatmap_loss(bad[:, :1], phi_zero[:, :1], target[:, :1], torch.ones(1, 1, dtype=torch.bool))
    assert float(masked) == pytest.approx(float(only_first), rel=1e-6)
    assert float(only_first) == pytest.approx(0.5 * float((target[0, 0] ** 2).mean()), rel=1e-5)
    none = heatmap_loss(bad.requires_grad_(), phi_zero, target, torch.zeros(1, 2, dtype=torch.bool))
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_softmax_heatmap_loss_is_smallest_at_the_target():
    pts = torch.tensor([[[100.0, 120.0], [30.0, 40.0]]])
    target = gaussian_heatmaps(pts / 4, None, (64, 64), 2.0)  # points (25, 30) and (7.5, 10)
    valid = torch.ones(1, 2, dtype=torch.bool)
    dist = target.flatten(2) / target.flatten(2).sum(-1, keepdim=True)
    entropy = float(-(dist * dist.clamp_min(1e-30).log()).sum(-1).mean())
    best = target.clamp_min(1e-30).log()  # logits whose softmax is the normalised target
    phi = best.clone()
    assert float(heatmap_loss(best, phi, target, valid, "softmax")) == pytest.approx(entropy, rel=1e-4)
    flat = torch.zeros_like(target, requires_grad=True)
    loss = heatmap_loss(flat, torch.zeros(1, 2, 64, 64), target, valid, "softmax")
    assert loss.item() == pytest.approx(math.log(64 * 64), rel=1e-4) and loss.item() > entropy
    loss.backward()
    # The gradient pulls logits up at the target point and down elsewhere.
    g = flat.grad[0, 0]
    assert float(g[30, 25]) < 0 < float(g[5, 60])
    masked = heatmap_loss(flat.detach(), torch.zeros(1, 2, 64, 64), target, torch.tensor([[True, False]]), "softmax")
    assert float(masked) == pytest.approx(math.log(64 * 64), rel=1e-4)


def test_point_loss():
    ref = torch.tensor([[[10.0, 10.0], [0.0, 0.0], [5.0, 5.0]]], requires_grad=True)
    gt = torch.tensor([[[13.0, 14.0], [0.0, 0.0], [100.0, 100.0]]])
    valid = torch.tensor([[True, True, False]])
    loss = point_loss(ref, gt, valid)
    assert float(loss.detach()) == pytest.approx((9 + 16) / 4)  # mean over 2 valid points x 2 coordinates
    loss.backward()
    assert float(ref.grad[0, 2].abs().sum()) == 0.0 and float(ref.grad[0, 0].abs().sum()) > 0


def test_foreground_loss():
    mask = torch.zeros(2, 16, 16)
    mask[:, 4:8, 4:8] = 1
    half = torch.full((2, 16, 16), 0.5)
    assert float(foreground_loss(half, mask)) == pytest.approx(math.log(2), rel=1e-5)  # fob_method.md 16.7
    perfect = mask.clamp(1e-6, 1 - 1e-6)
    assert float(foreground_loss(perfect, mask)) < 1e-4
    # Weighted as torch's NLLLoss with class weights [0.1, 1.0].
    prob = torch.rand(2, 16, 16) * 0.98 + 0.01
    logp = torch.stack([torch.log(1 - prob), torch.log(prob)], dim=1)
    ref = torch.nn.functional.nll_loss(logp, mask.long(), weight=torch.tensor([0.1, 1.0]))
    assert float(foreground_loss(prob, mask)) == pytest.approx(float(ref), rel=1e-5)
    # A dropped sample does not count.
    skew = prob.clone()
    skew[1] = 0.01
    assert float(foreground_loss(skew, mask, torch.tensor([True, False]))) == pytest.approx(
        float(foreground_loss(prob[:1], mask[:1])), rel=1e-5
    )


def test_rac_infonce_and_hinge():
    d = 8
    fg = torch.zeros(1, d)
    fg[0, 0] = 1
    pos = fg.clone()
    negs = torch.zeros(1, 4, d)
    negs[0, :, 1] = 1  # orthogonal to fg
    valid = torch.ones(1, 4, dtype=torch.bool)
    good = float(rac_loss(fg, pos, negs, valid, tau=0.1))
    assert good == pytest.approx(-math.log(math.exp(10) / (math.exp(10) + 4)), rel=1e-3)
    same = float(rac_loss(fg, fg, fg[:, None].expand(1, 4, d), valid, tau=0.1))
    assert same == pytest.approx(math.log(5), rel=1e-5)  # all similarities equal
    assert good < same
    # Invalid negatives drop out of the denominator.
    part = float(
        rac_loss(fg, fg, fg[:, None].expand(1, 4, d), torch.tensor([[True, False, False, False]]), tau=0.1)
    )
    assert part == pytest.approx(math.log(2), rel=1e-5)
    # Hinge (authors' code): mean max(0, 0.5 + cos).
    assert float(rac_loss(fg, pos, negs, valid, mode="hinge")) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        rac_loss(fg, pos, negs, valid, mode="triplet")


def test_total_loss_weights():
    parts = {
        "rac": torch.tensor(1.0),
        "heat": torch.tensor(2e-3),
        "coor": torch.tensor(1e4),
        "fore": torch.tensor(0.5),
    }
    assert float(total_loss(parts)) == pytest.approx(1.0 + 2.0 + 1.0 + 0.5)


def test_inner_band_is_the_rac_positive():
    m = torch.zeros(1, 64, 64)
    m[0, 10:50, 20:40] = 1
    er = erode_mask(m, 9)
    assert float(er.sum()) == (40 - 8) * (20 - 8)
    feats = torch.zeros(1, 2, 64, 64)
    band = (m - er)[0] > 0
    feats[0, 0][band] = 1.0  # channel 0 lights up only on the inner band
    feats[0, 1][er[0] > 0] = 1.0
    pts = torch.tensor([[[5.0, 5.0], [60.0, 60.0]]])
    out = support_prototypes(feats, m, pts, torch.ones(1, 2, dtype=torch.bool), 4.0, 9)
    np.testing.assert_allclose(out["inner_prototype"][0].numpy(), [1.0, 0.0], atol=1e-4)
    assert out["bg_prototypes"].shape == (1, 2, 2) and float(out["bg_prototypes"].abs().max()) < 1e-4


def test_heat_loss_option_is_checked():
    from FoBSegmentLib.model.config import FoBConfig

    assert FoBConfig().heat_loss == "mse"  # the paper's loss stays the default
    assert FoBConfig(heat_loss="softmax").heat_loss == "softmax"
    with pytest.raises(ValueError, match="heat_loss"):
        FoBConfig(heat_loss="l1")
