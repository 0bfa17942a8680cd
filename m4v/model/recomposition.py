"""MM-token re-composition: text + video -> one 1-D sequence for a unidirectional scan, and back.

The sequence of an MM-DiM layer is

    S = [T_pre, R, F_1, R, F_2, ..., R, F_n, T_app]

* ``T_pre``: the text, left zero-padded to ``text_len`` so the real tokens sit next to the video;
* ``R``: the layer's learnable register before every frame (boundary anchor and frame summary);
* ``F_i``: frame i's tokens in the layer's zigzag order (or raster order);
* ``T_app``: the text again, real tokens first. It has seen all the video, and the next layer's
  prepended copy carries that back: bidirectional text-video fusion from a unidirectional scan.

Inverse rule for the text: the two copies are averaged (token-wise, after undoing the left-pad).
Either copy alone would drop one direction of the fusion from the text stream; the mean keeps both
and is what the next layer's prepended copy then carries. Without text re-composition the text
stream is the prepended copy alone.

The video part of the permutation depends only on the frame sizes and the layer's direction, so it
is built once (cached) as one index: re-composition is a single ``index_select`` for the video and
registers plus a per-sample gather for the (short) text.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from m4v.ops.zigzag import zigzag_orders


@dataclass(frozen=True)
class SequenceSpec:
    """What goes into S: the layer's choices and the clip's frame sizes (in tokens)."""

    frame_sizes: tuple[tuple[int, int], ...]
    direction: int | None  # zigzag direction 0..7, or None for raster order
    registers: bool
    text_recomposition: bool


@lru_cache(maxsize=256)
def video_scan_index(spec: SequenceSpec) -> tuple[Tensor, Tensor]:
    """The video + register part of S as indices into ``[register, video tokens...]``.

    Returns:
        forward: (Lm,) index into the source ``cat([register (1), video (Lv)])``; entry 0 is the
            register, entry ``1 + j`` is video token j (frames concatenated, raster inside).
        inverse: (Lv,) position of each video token inside the middle part of S.
    """
    pieces, offset = [], 1
    for h, w in spec.frame_sizes:
        if spec.registers:
            pieces.append(torch.zeros(1, dtype=torch.long))
        if spec.direction is None:
            order = torch.arange(h * w)
        else:
            order = zigzag_orders(h, w)[spec.direction]
        pieces.append(order + offset)
        offset += h * w
    forward = torch.cat(pieces)
    video_len = offset - 1
    inverse = torch.empty(video_len, dtype=torch.long)
    is_video = forward > 0
    inverse[forward[is_video] - 1] = torch.nonzero(is_video).squeeze(1)
    return forward, inverse


def text_orders(text_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample permutations of the text slots: (left-padded order, right-padded order).

    ``text_mask`` (b, Lt) bool. ``left[b, k]`` is the text slot shown at position k of T_pre:
    padding first, then the real tokens in their order; ``right`` puts the real tokens first.
    Both are stable, so real tokens keep their relative order.
    """
    key = text_mask.to(torch.int8)
    left = torch.argsort(key, dim=1, stable=True)
    right = torch.argsort(1 - key, dim=1, stable=True)
    return left, right


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x (b, L, d), index (b, K) -> (b, K, d)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def _scatter_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Inverse of :func:`_gather_tokens` for a permutation ``index``."""
    out = torch.empty_like(x)
    return out.scatter_(1, index[..., None].expand(-1, -1, x.shape[-1]), x)


def recompose(text: Tensor, text_mask: Tensor, video: Tensor, register: Tensor | None,
              spec: SequenceSpec) -> Tensor:
    """Build S.

    Args:
        text: (b, Lt, d); text_mask: (b, Lt) bool; video: (b, Lv, d);
        register: (d,) learnable register (required when ``spec.registers``).
    Returns:
        (b, Lt + Lm [+ Lt], d) with Lm = Lv (+ number of frames when registers are on).
    """
    b, _, d = video.shape
    forward, _ = video_scan_index(spec)
    forward = forward.to(video.device)
    if spec.registers:
        src = torch.cat([register.to(video.dtype).expand(b, 1, d), video], dim=1)
    else:  # index entries are 1-based: put a placeholder that is never selected in slot 0
        src = torch.cat([video[:, :1], video], dim=1)
    middle = src.index_select(1, forward)
    text = text * text_mask[..., None].to(text.dtype)
    left, right = text_orders(text_mask)
    parts = [_gather_tokens(text, left), middle]
    if spec.text_recomposition:
        parts.append(_gather_tokens(text, right))
    return torch.cat(parts, dim=1)


def decompose(seq: Tensor, text_mask: Tensor, spec: SequenceSpec) -> tuple[Tensor, Tensor]:
    """Exact inverse of :func:`recompose` for the video; the averaging rule for the text.

    Args:
        seq: (b, L_S, d) the mixer's output over S.
    Returns:
        text (b, Lt, d) in the text stream's slot order, video (b, Lv, d) frames in raster order.
    """
    lt = text_mask.shape[1]
    _, inverse = video_scan_index(spec)
    left, right = text_orders(text_mask)
    pre = _scatter_tokens(seq[:, :lt], left)
    video = seq[:, lt:].index_select(1, inverse.to(seq.device))
    if spec.text_recomposition:
        app = _scatter_tokens(seq[:, seq.shape[1] - lt:], right)
        return 0.5 * (pre + app), video
    return pre, video
