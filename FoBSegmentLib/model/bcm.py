"""BCM: Background-centric Context Modeling (fob_method.md 5), batched and size-agnostic.

Shapes: query features (B, d, h, w); support prototypes (B, N, d); the working image is S x S.
Positional encodings are computed per call from normalised positions (fixed 2-D sinusoids over the
cell centres (j + 0.5) / w, (i + 0.5) / h and a 1-D sinusoid over the prompt index), so the module
has no parameter tied to the feature-grid size. Proposal dot products are scaled by 1 / sqrt(d)
(fixes D17: unscaled products saturated the attention bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoid_2d(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(dim, h, w) fixed encoding of normalised cell centres; dim/4 frequencies per axis and sin/cos."""
    nf = max(dim // 4, 1)
    freqs = (2.0 ** torch.linspace(0, math.log2(max(h, w, 2)), nf, device=device)) * math.pi
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    ey = ys[:, None] * freqs[None]  # (h, nf)
    ex = xs[:, None] * freqs[None]  # (w, nf)
    pe = torch.cat(
        [
            ey.sin()[:, None, :].expand(h, w, nf),
            ey.cos()[:, None, :].expand(h, w, nf),
            ex.sin()[None, :, :].expand(h, w, nf),
            ex.cos()[None, :, :].expand(h, w, nf),
        ],
        dim=-1,
    )
    if pe.shape[-1] < dim:
        pe = F.pad(pe, (0, dim - pe.shape[-1]))
    return pe[..., :dim].permute(2, 0, 1).to(dtype)


def sinusoid_1d(n: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, dim) transformer sinusoid over the prompt index."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe.to(dtype)


class BCM(nn.Module):
    """Foreground prototype matching, foreground suppression, prompt matching, masked attention, head."""

    def __init__(self, dim: int, n_prompts: int, heads: int = 1) -> None:
        super().__init__()
        self.dim, self.n_prompts, self.heads = dim, n_prompts, heads
        self.lin_s = nn.Linear(dim, dim)
        self.lin_q = nn.Linear(dim, dim)
        self.reweight = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.ReLU(inplace=True), nn.Linear(2 * dim, dim), nn.Tanh()
        )
        self.bias_conv = nn.Conv2d(n_prompts, 1, 1)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        # No biases right before the head's InstanceNorm: a per-channel constant is normalised away,
        # so such a bias could never learn.
        self.norm2 = nn.LayerNorm(dim, bias=False)
        self.head = nn.Sequential(
            nn.Conv2d(dim, dim, 1, bias=False),
            nn.InstanceNorm2d(dim, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, n_prompts, 1),
        )
        # Start near all-zero heatmaps and proposals (fob_method.md 16.7: 1000 L_heat about 0.77), so
        # the first updates are not spent on undoing random outputs; small, not zero, so that
        # every layer before them still receives a gradient on the first step.
        nn.init.normal_(self.head[-1].weight, std=1e-3)
        nn.init.zeros_(self.head[-1].bias)
        with torch.no_grad():
            self.lin_s.weight.mul_(0.05)
            self.lin_s.bias.zero_()
        # A zero bias keeps ReLU(conv(Phi)) partly active: a constant key bias cancels in the softmax,
        # so the bias only learns through pixels where the ReLU clips.
        nn.init.zeros_(self.bias_conv.bias)

    def coarse_foreground(
        self, fq: torch.Tensor, fg_prototype: torch.Tensor, threshold: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """C = cos(F_q, p_fg) (B, h, w) and P_fg = sigmoid(10 C + 0.5 t) (B, h, w) at the feature grid."""
        cos = F.cosine_similarity(fq, fg_prototype[:, :, None, None], dim=1, eps=1e-6)
        prob = torch.sigmoid(10.0 * cos + 0.5 * threshold[:, None, None])
        return cos, prob

    def forward(
        self, fq: torch.Tensor, cos: torch.Tensor, prototypes: torch.Tensor, out_size: int
    ) -> dict[str, torch.Tensor]:
        """fq (B, d, h, w), cos (B, h, w), prototypes (B, N, d) -> 'phi' (B, N, h, w), 'heatmaps' (B, N, S, S)."""
        b, d, h, w = fq.shape
        n = prototypes.shape[1]
        if n != self.n_prompts:
            raise ValueError(f"BCM was built for {self.n_prompts} prompts, got {n}")
        f_sup = (1.0 - cos).unsqueeze(1) * fq
        f_pos = f_sup + sinusoid_2d(h, w, d, fq.device, fq.dtype).unsqueeze(0)
        tokens = f_pos.flatten(2).transpose(1, 2)  # (B, L, d)

        s = self.lin_s(prototypes + sinusoid_1d(n, d, fq.device, fq.dtype).unsqueeze(0))
        s_hat = (1.0 + self.reweight(s)) * s
        phi = torch.bmm(self.lin_q(tokens), s_hat.transpose(1, 2)) / math.sqrt(d)  # (B, L, N)
        phi = phi.transpose(1, 2).reshape(b, n, h, w)

        # Only the key term m_j of the authors' bias m_i + m_j changes a softmax row.
        m = F.relu(self.bias_conv(phi)).flatten(1)  # (B, L)
        hd = d // self.heads
        q, k, v = self.qkv(tokens).reshape(b, h * w, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None, :].to(q.dtype))
        att = att.transpose(1, 2).reshape(b, h * w, d)
        x1 = self.norm1(tokens + self.proj(att))
        x2 = self.norm2(x1 + self.ffn(x1))
        f_m = x2.transpose(1, 2).reshape(b, d, h, w)
        heat = self.head(f_m)
        heat = F.interpolate(heat, size=(out_size, out_size), mode="bilinear", align_corners=False)
        return {"phi": phi, "heatmaps": heat, "suppressed": f_sup}


def heatmap_argmax(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel argmax of (B, N, H, W) -> points (B, N, 2) (x, y) float pixels (detached), peaks (B, N)."""
    b, n, h, w = heatmaps.shape
    peak, idx = heatmaps.detach().flatten(2).max(dim=-1)
    pts = torch.stack([(idx % w).float(), torch.div(idx, w, rounding_mode="floor").float()], dim=-1)
    return pts, peak
