"""Input embeddings: 2x2 patches, noise level, pooled text; and the token layout of a clip."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ClipLayout:
    """Where every token of a temporal-pyramid clip sits in the joint sequence.

    The joint sequence is ``[text (text_len), frame_1, ..., frame_n]``; frame i is a grid of
    ``frame_sizes[i] = (h_i, w_i)`` tokens in raster order. The last frame is the current
    (noisy) one.
    """

    text_len: int
    frame_sizes: tuple[tuple[int, int], ...]
    frame_ids: tuple[int, ...]

    @cached_property
    def frame_lens(self) -> list[int]:
        return [h * w for h, w in self.frame_sizes]

    @cached_property
    def frame_offsets(self) -> list[int]:
        """Start of each frame inside the video token stream (b, Lv, d)."""
        out, pos = [], 0
        for n in self.frame_lens:
            out.append(pos)
            pos += n
        return out

    @property
    def video_len(self) -> int:
        return sum(self.frame_lens)

    @property
    def current_size(self) -> tuple[int, int]:
        return self.frame_sizes[-1]


def patchify(x: Tensor, p: int) -> Tensor:
    """(b, c, h, w) -> (b, (h/p)(w/p), c*p*p), tokens in raster order, values ordered (c, p, p)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, p: int, c: int, h: int, w: int) -> Tensor:
    """Inverse of :func:`patchify`: (b, (h/p)(w/p), c*p*p) -> (b, c, h, w)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(b,) -> (b, dim): the DiT / ADM frequency embedding (cos first, then sin)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)  # at least float32: t is up to 1000
    freqs = torch.exp(-math.log(max_period) / half
                      * torch.arange(half, device=t.device, dtype=dtype))
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear: the vector embedder of both the noise level and pooled text."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TimestepEmbedder(nn.Module):
    """Noise level sigma in [0, 1] -> (b, hidden). sigma is scaled to [0, 1000] as in DiT/FLUX."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = MLPEmbedder(freq_dim, hidden)

    def forward(self, sigma: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(sigma * 1000.0, self.freq_dim))
