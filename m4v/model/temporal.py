"""The temporal branch of an MM-DiM block: causal attention over frame-level tokens.

Runs in parallel with the SSM path. The hidden width is projected down to a small ``c`` per
position; every history frame is average-pooled to the clip's smallest frame grid
``(hs, ws)`` (the coarsest pyramid level present) and becomes ONE token of size
``S = c * hs * ws``. The current frame, at a ``k``-times finer grid, is split the same way into
``k * k`` tokens (strided: token (a, b) holds cells ``[a::k, b::k]``, so each is a whole-frame
view aligned with the history tokens). Causal attention over these few tokens costs O(i^2) in the
number of frames i. The result is reshaped back, upsampled (nearest) for history frames, projected
to the hidden width, and added to the video tokens through the block's gate.

Projections act per position (d -> c and c -> d), so the branch works at any resolution.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m4v.model.embeddings import ClipLayout


def temporal_grid(frame_sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The smallest frame grid of the clip; every frame must be an integer multiple of it."""
    hs = min(h for h, _ in frame_sizes)
    ws = min(w for _, w in frame_sizes)
    for h, w in frame_sizes:
        if h % hs or w % ws or h // hs != w // ws:
            raise ValueError(
                f"frames: got token grids {list(frame_sizes)}, expected every frame to be the same "
                f"integer multiple of the smallest grid {(hs, ws)} in both axes (pyramid levels)")
    return hs, ws


def frame_level_tokens(
    x: Tensor, layout: ClipLayout, grid: tuple[int, int]
) -> tuple[Tensor, list[int]]:
    """Video features (b, Lv, c) -> frame-level tokens (b, n_tok, c*hs*ws) and each token's frame.

    History frames give one pooled token each; the last (current) frame gives k*k split tokens.
    """
    b, _, c = x.shape
    hs, ws = grid
    tokens, owner = [], []
    last = len(layout.frame_sizes) - 1
    for i, ((h, w), off) in enumerate(zip(layout.frame_sizes, layout.frame_offsets, strict=True)):
        f = x[:, off:off + h * w].transpose(1, 2).reshape(b, c, h, w)
        if i < last:
            tokens.append(F.adaptive_avg_pool2d(f, grid).reshape(b, 1, c * hs * ws))
            owner.append(i)
        else:
            k = h // hs
            f = f.reshape(b, c, hs, k, ws, k).permute(0, 3, 5, 1, 2, 4)  # (b, k, k, c, hs, ws)
            tokens.append(f.reshape(b, k * k, c * hs * ws))
            owner += [i] * (k * k)
    return torch.cat(tokens, dim=1), owner


def frame_level_to_video(y: Tensor, layout: ClipLayout, grid: tuple[int, int], c: int) -> Tensor:
    """Inverse layout of :func:`frame_level_tokens`: (b, n_tok, c*hs*ws) -> (b, Lv, c)."""
    b = y.shape[0]
    hs, ws = grid
    out, pos = [], 0
    last = len(layout.frame_sizes) - 1
    for i, (h, w) in enumerate(layout.frame_sizes):
        if i < last:
            g = y[:, pos].reshape(b, c, hs, ws)
            g = F.interpolate(g, size=(h, w), mode="nearest") if (h, w) != grid else g
            pos += 1
        else:
            k = h // hs
            g = y[:, pos:pos + k * k].reshape(b, k, k, c, hs, ws).permute(0, 3, 4, 1, 5, 2)
            g = g.reshape(b, c, h, w)
        out.append(g.reshape(b, c, h * w).transpose(1, 2))
    return torch.cat(out, dim=1)


def few_token_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Softmax attention written as two matrix products, in float32 at least: q, k, v
    (b, h, n, s), mask (n, n) True where a query may see a key -> (b, h, n, s) in v's dtype.

    The branch has a few tokens (one per frame) with very long heads (s = c x grid cells, 30,720
    at 768p); the fused attention kernels are not made for such heads: on an H200 PyTorch's
    memory-efficient kernel took 6.9 ms for this backward in the 768p MM-DiM block, where these
    products move a few megabytes. float32 (autocast off) because a score sums s products: in
    bfloat16 its rounding alone would shift the softmax's logits by ~0.4%."""
    device = q.device.type
    with (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
          else contextlib.nullcontext()):
        wide = torch.promote_types(v.dtype, torch.float32)
        scores = (q.to(wide) @ k.to(wide).mT) * q.shape[-1] ** -0.5
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return (weights @ v.to(wide)).to(v.dtype)


class TemporalBranch(nn.Module):
    def __init__(self, hidden: int, dim: int, heads: int = 1):
        super().__init__()
        if dim % heads:
            raise ValueError(
                f"temporal_heads: got {heads}, expected a divisor of temporal_dim={dim}"
            )
        self.dim, self.heads = dim, heads
        self.qkv = nn.Linear(hidden, 3 * dim)
        self.proj = nn.Linear(dim, hidden)

    def forward(self, video: Tensor, layout: ClipLayout) -> Tensor:
        """video (b, Lv, hidden), already modulated -> (b, Lv, hidden) update of the video."""
        grid = temporal_grid(layout.frame_sizes)
        q, k, v = self.qkv(video).chunk(3, dim=-1)
        (q, owner), (k, _), (v, _) = (frame_level_tokens(t, layout, grid) for t in (q, k, v))
        o = torch.tensor(owner, device=video.device)
        mask = o[None, :] <= o[:, None]  # a token sees its own frame and earlier ones
        b, n, s = q.shape
        # Heads split the channel axis: each head sees c/heads channels over the whole grid.
        split = lambda t: t.reshape(b, n, self.heads, s // self.heads).transpose(1, 2)
        y = few_token_attention(split(q), split(k), split(v), mask)
        y = y.transpose(1, 2).reshape(b, n, s)
        return self.proj(frame_level_to_video(y, layout, grid, self.dim))
