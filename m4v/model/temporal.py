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
import math

import torch
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


def history_runs(layout: ClipLayout) -> list[tuple[int, int, int]]:
    """Consecutive history frames (all but the current one) of one size, as (number of frames,
    h, w). A pyramid clip has a few runs (13 frames at the coarsest level, ...), a flat clip one;
    each run is handled by one reshape."""
    runs: list[list[int]] = []
    for h, w in layout.frame_sizes[:-1]:
        if runs and (runs[-1][1], runs[-1][2]) == (h, w):
            runs[-1][0] += 1
        else:
            runs.append([1, h, w])
    return [tuple(r) for r in runs]


def frame_level_tokens(x: Tensor, layout: ClipLayout, grid: tuple[int, int]) -> Tensor:
    """Video features (b, Lv, c) -> frame-level tokens (b, n_tok, c*hs*ws), values ordered
    (c, hs, ws): one average-pooled token per history frame, then the current frame's k*k split
    tokens (token (a, b) holds cells ``[a::k, b::k]``)."""
    b, _, c = x.shape
    hs, ws = grid
    runs = history_runs(layout)
    # one split, not a slice per run: a slice's backward is a zero-filled copy of the whole x
    *parts, cur = x.split([m * h * w for m, h, w in runs] + [math.prod(layout.current_size)], 1)
    tokens = []
    for part, (m, h, _) in zip(parts, runs, strict=True):
        f = h // hs  # the pooling window, f x f cells
        cells = part.reshape(b, m, hs, f, ws, f, c)
        cells = cells.mean((3, 5)) if f > 1 else cells.reshape(b, m, hs, ws, c)
        tokens.append(cells.permute(0, 1, 4, 2, 3).reshape(b, m, c * hs * ws))
    k = layout.current_size[0] // hs
    cur = cur.reshape(b, hs, k, ws, k, c)
    tokens.append(cur.permute(0, 2, 4, 5, 1, 3).reshape(b, k * k, c * hs * ws))
    return torch.cat(tokens, dim=1)


def frame_level_to_video(y: Tensor, layout: ClipLayout, grid: tuple[int, int], c: int) -> Tensor:
    """Inverse layout of :func:`frame_level_tokens`, history tokens upsampled (nearest):
    (b, n_tok, c*hs*ws) -> (b, Lv, c)."""
    b = y.shape[0]
    hs, ws = grid
    runs = history_runs(layout)
    h, w = layout.current_size
    k = h // hs
    *parts, cur = y.split([m for m, _, _ in runs] + [k * k], 1)
    out = []
    for part, (m, rh, rw) in zip(parts, runs, strict=True):
        f = rh // hs
        cells = part.reshape(b, m, c, hs, 1, ws, 1).expand(b, m, c, hs, f, ws, f)
        out.append(cells.permute(0, 1, 3, 4, 5, 6, 2).reshape(b, m * rh * rw, c))
    cur = cur.reshape(b, k, k, c, hs, ws).permute(0, 4, 1, 5, 2, 3)  # (b, hs, k, ws, k, c)
    out.append(cur.reshape(b, h * w, c))
    return torch.cat(out, dim=1)


def frame_causal_mask(num_history: int, num_split: int, device=None) -> Tensor:
    """(n, n) bool, n = num_history + num_split: a token sees its own frame and earlier ones
    (history frames one token each, the current frame's split tokens all one frame). Built on
    the device: a host tensor copied there would make the launch queue wait for the GPU."""
    frame = torch.arange(num_history + num_split, device=device).clamp_(max=num_history)
    return frame[None, :] <= frame[:, None]


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

    def forward(self, x: Tensor, layout: ClipLayout) -> Tensor:
        """x (b, Lt + Lv, hidden), the block's joint stream, already modulated -> (b, Lv, hidden)
        update of the video.

        The text rows are projected too, and dropped: Lt of Lt + Lv rows, so that the gradient
        of x comes back from the projection as one dense tensor. Given the video alone, a view
        of the joint stream, that gradient would be zero-padded to the whole stream (a copy)."""
        grid = temporal_grid(layout.frame_sizes)
        # one layout pass for q, k and v: channels are the outer index of a token's values
        qkv = self.qkv(x)[:, layout.text_len:]
        q, k, v = frame_level_tokens(qkv, layout, grid).chunk(3, dim=-1)
        history = len(layout.frame_sizes) - 1
        mask = frame_causal_mask(history, q.shape[1] - history, x.device)
        b, n, s = q.shape
        # Heads split the channel axis: each head sees c/heads channels over the whole grid.
        split = lambda t: t.reshape(b, n, self.heads, s // self.heads).transpose(1, 2)
        y = few_token_attention(split(q), split(k), split(v), mask)
        y = y.transpose(1, 2).reshape(b, n, s)
        return self.proj(frame_level_to_video(y, layout, grid, self.dim))
