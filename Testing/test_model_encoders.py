"""Encoders behind one interface: lite and the authors' dilated ResNet-101 (local weight files only)."""

from __future__ import annotations

import pytest
import torch

from FoBSegmentLib import FoBPromptGenerator
from FoBSegmentLib.model.encoders import LiteEncoder, ResNet101Encoder, build_encoder


@pytest.mark.parametrize("size", [128, 256])
def test_lite_encoder_shapes(size):
    enc = LiteEncoder(64).eval()
    with torch.no_grad():
        f, t = enc(torch.randn(2, 3, size, size))
    assert f.shape == (2, 64, size // 8, size // 8) and t.shape == (2,)
    assert torch.isfinite(f).all() and torch.isfinite(t).all()


def test_resnet_encoder_weight_file_loading(tmp_path):
    from torchvision.models import resnet101

    torch.manual_seed(0)
    ref = resnet101(weights=None)
    state = ref.state_dict()
    plain = tmp_path / "resnet101.pth"
    torch.save(state, plain)
    enc = ResNet101Encoder(512, plain)
    assert torch.equal(enc.layer3[5].conv2.weight, ref.layer3[5].conv2.weight)
    assert torch.equal(enc.fc.weight, ref.fc.weight)  # ImageNet head kept for the threshold branch
    # torchvision DeepLabV3 checkpoints: 'backbone.' prefix, no fc; fc keeps its init.
    deeplab = tmp_path / "deeplab.pth"
    torch.save(
        {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}
        | {"classifier.0.weight": torch.zeros(1)},
        deeplab,
    )
    enc2 = ResNet101Encoder(512, deeplab)
    assert torch.equal(enc2.layer1[0].conv1.weight, ref.layer1[0].conv1.weight)
    # Missing backbone tensors, junk and absent files are clear errors.
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, partial)
    with pytest.raises(ValueError, match="lack"):
        ResNet101Encoder(512, partial)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk" * 100)
    with pytest.raises(ValueError, match="junk.pth is not a ResNet-101 weights file"):
        ResNet101Encoder(512, junk)
    with pytest.raises(FileNotFoundError):
        ResNet101Encoder(512, tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="lite"):
        build_encoder("lite", 64, plain)


@pytest.mark.slow
def test_resnet101_generator_forward_and_gradients():
    torch.manual_seed(1)
    g = FoBPromptGenerator.from_config(encoder="resnet101", image_size=64, feature_dim=128, n_bg=6)
    assert g.config.feature_dim == 128 and g.encoder.stride == 4
    s = torch.randn(1, 3, 64, 64)
    q = torch.randn(1, 3, 64, 64)
    m = torch.zeros(1, 64, 64)
    m[0, 20:40, 24:44] = 1
    out = g(s, m, q)
    assert out["phi"].shape == (1, 6, 16, 16) and out["heatmaps"].shape == (1, 6, 64, 64)
    losses = g.compute_losses(out, m)
    losses["total"].backward()
    dead = [n for n, p in g.named_parameters() if p.grad is None or float(p.grad.abs().max()) <= 1e-9]
    assert not dead, dead


def test_resnet101_default_dim_is_512():
    g = FoBPromptGenerator.from_config(encoder="resnet101")
    assert g.config.feature_dim == 512 and g.encoder.reduce.weight.shape == (512, 1024, 1, 1)
