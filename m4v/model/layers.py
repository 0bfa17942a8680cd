"""Small layers shared by the blocks: adaLN, MLP, attention heads with QK-norm + RoPE (the
modulation and the gated residual are fused ops: :mod:`m4v.ops.modulation`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m4v.model.rope import apply_rope


class AdaLN(nn.Module):
    """SiLU(c) -> Linear -> ``n`` chunks of width d, zero-initialised (adaLN-Zero: blocks start
    as the identity)."""

    def __init__(self, hidden: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(hidden, n * hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: Tensor) -> list[Tensor]:
        return list(self.linear(nn.functional.silu(c)).chunk(self.n, dim=-1))


class Mlp(nn.Module):
    def __init__(self, hidden: int, ratio: float):
        super().__init__()
        inner = int(hidden * ratio)
        self.net = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(approximate="tanh"),
                                 nn.Linear(inner, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class QKV(nn.Module):
    """Linear -> (q, k, v) as (b, heads, L, head_dim) with RMS QK-norm (as FLUX / PyramidFlow)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.linear = nn.Linear(hidden, 3 * hidden)
        self.q_norm = nn.RMSNorm(hidden // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(hidden // heads, eps=1e-6)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, length, _ = x.shape
        q, k, v = self.linear(x).reshape(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return rms_norm(q, self.q_norm), rms_norm(k, self.k_norm), v


def rms_norm(x: Tensor, norm: nn.RMSNorm) -> Tensor:
    """``norm(x)`` with the weight in x's dtype: under autocast x is bfloat16 and the weight
    float32, a mix for which PyTorch leaves its fused kernel for a chain of elementwise ones."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


def rotate_video(t: Tensor, text_len: int, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply RoPE to the video part of a joint (b, heads, Lt + Lv, head_dim) tensor. (``split``:
    two slices would each send their gradient back through a zero-filled whole-length copy.)"""
    text, video = t.split([text_len, t.shape[2] - text_len], dim=2)
    return torch.cat([text, apply_rope(video, cos, sin)], dim=2)
