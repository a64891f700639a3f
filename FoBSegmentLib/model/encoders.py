"""Shared image encoders of the FoB generator, behind one interface.

`encoder(x)` with x (B, 3, S, S) normalised images returns `(features (B, d, S/stride, S/stride),
threshold (B,))`; `encoder.out_dim` = d and `encoder.stride` describe the feature grid.

- `resnet101` (fob_method.md 3): torchvision ResNet-101 with layer2 and layer3 dilated (stride 4),
  feature = Conv1x1(1024 -> d, no bias)(layer3), threshold = Linear(1000 -> 1)(fc(GAP(layer4))).
  Weights are read only from a file the caller names (torchvision's `resnet101-*.pth` or
  `deeplabv3_resnet101_coco-*.pth`); nothing is ever downloaded.
- `lite`: a small dilated CNN at stride 8 (32 x 32 tokens at S = 256) with GroupNorm (independent of
  the batch size, so training on batches of 1-2 behaves like inference); threshold from a pooled
  stride-16 branch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


def _conv_block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        _gn(cout),
        nn.ReLU(inplace=True),
    )


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = _conv_block(cin, cout, dilation=dilation)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.norm2 = _gn(cout)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.skip(x) + self.norm2(self.conv2(self.conv1(x))))


class LiteEncoder(nn.Module):
    """Small CPU-friendly encoder: stride 8, `out_dim` channels, threshold from a stride-16 branch."""

    stride = 8

    def __init__(self, out_dim: int = 64) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.stem = nn.Sequential(
            _conv_block(3, 24, stride=2),  # S/2
            _conv_block(24, 32, stride=2),  # S/4
            _conv_block(32, 48, stride=2),  # S/8
        )
        # Dilated blocks widen the receptive field (about 100 px) without shrinking the token grid.
        self.blocks = nn.Sequential(
            _ResBlock(48, out_dim, dilation=2), _ResBlock(out_dim, out_dim, dilation=4)
        )
        self.reduce = nn.Conv2d(out_dim, out_dim, 1, bias=False)
        self.thresh_branch = _conv_block(out_dim, 96, stride=2)
        self.thresh_fc = nn.Linear(96, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.blocks(self.stem(x))
        t = self.thresh_fc(self.thresh_branch(h).mean(dim=(2, 3))).squeeze(-1)
        return self.reduce(h), t


class ResNet101Encoder(nn.Module):
    """The authors' encoder: dilated ResNet-101 (stride 4), 1024 -> out_dim projection of layer3."""

    stride = 4

    def __init__(self, out_dim: int = 512, weights: str | Path | None = None) -> None:
        super().__init__()
        from torchvision.models import resnet101

        net = resnet101(weights=None, replace_stride_with_dilation=[True, True, False])
        if weights is not None:
            _load_resnet_weights(net, Path(weights))
        self.out_dim = out_dim
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.fc = net.fc  # 2048 -> 1000 (ImageNet head when the file has one), then -> 1
        self.reduce = nn.Conv2d(1024, out_dim, 1, bias=False)
        nn.init.kaiming_normal_(self.reduce.weight, mode="fan_out", nonlinearity="relu")
        self.thresh_fc = nn.Linear(1000, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h3 = self.layer3(self.layer2(self.layer1(self.stem(x))))
        h4 = self.layer4(h3)
        t = self.thresh_fc(self.fc(h4.mean(dim=(2, 3)))).squeeze(-1)
        return self.reduce(h3), t


def _load_resnet_weights(net: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"ResNet-101 weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # corrupt/foreign file: one clear line instead of a traceback
            raise ValueError(f"cannot read ResNet-101 weights {path.name}: {type(exc).__name__}: {exc}") from None
    else:
        from FoBSegmentLib.model.checkpoint import load_weights_only

        state = load_weights_only(path, "ResNet-101 weights file")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"ResNet-101 weights {path.name} do not hold a state dict")
    # torchvision's DeepLabV3 checkpoints prefix the backbone with 'backbone.'.
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    own = net.state_dict()
    needed = [k for k in own if not k.startswith("fc.")]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ValueError(
            f"ResNet-101 weights {path.name} lack {len(missing)} backbone tensors (e.g. {missing[0]})"
        )
    picked = {k: v for k, v in state.items() if k in own}
    for k, v in picked.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"ResNet-101 weights {path.name}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
            )
    own.update(picked)
    net.load_state_dict(own, strict=True)


def build_encoder(name: str, out_dim: int, weights: str | Path | None = None) -> nn.Module:
    """Encoder by config name ('lite' or 'resnet101'); `weights` only for resnet101 (a local file)."""
    if name == "lite":
        if weights is not None:
            raise ValueError(
                "the lite encoder has no pretrained weights; pass a FoB checkpoint to load() instead"
            )
        return LiteEncoder(out_dim)
    if name == "resnet101":
        return ResNet101Encoder(out_dim, weights)
    raise ValueError(f"unknown encoder {name!r} (expected 'lite' or 'resnet101')")
