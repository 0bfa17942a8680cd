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

Cost. The video part of S (registers + permuted frames, the "middle") depends only on the frame
sizes and the layer's direction: its indices are built once per (spec, device) and cached on that
device, so a call never copies an index from the host (a pageable host-to-device copy stalls the
launch queue). Moving the video is one ``index_select`` each way, and the two directions are each
other's adjoint, so the backward of one is the forward of the other: a gather, never a scatter-add
into a zero-filled buffer. The text (at most ``max_text_len`` tokens) goes through plain autograd.
Raster order without registers needs no gather at all.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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


@dataclass(frozen=True, eq=False)
class MiddleIndex:
    """:func:`video_scan_index` in the form the gathers use, on one device."""

    gather: Tensor  # (Lm,) video token at each middle position (register slots: 0, overwritten)
    inverse: Tensor  # (Lv,) middle position of each video token
    registers: Tensor  # (n_registers,) middle positions of the registers
    identity: bool  # the middle is the video itself (raster order, no registers)


@lru_cache(maxsize=256)
def middle_index(spec: SequenceSpec, device: torch.device) -> MiddleIndex:
    forward, inverse = video_scan_index(spec)
    identity = spec.direction is None and not spec.registers
    return MiddleIndex(
        gather=(forward - 1).clamp(min=0).to(device),
        inverse=inverse.to(device),
        registers=torch.nonzero(forward == 0).squeeze(1).to(device),
        identity=identity,
    )


def _to_middle(video: Tensor, register: Tensor | None, gather: Tensor, registers: Tensor) -> Tensor:
    """(b, Lv, d) video [+ (d,) register] -> (b, Lm, d) middle of S."""
    out = video.index_select(1, gather)
    if register is not None:
        out[:, registers] = register.to(out.dtype)
    return out


class _VideoToMiddle(torch.autograd.Function):
    # Index tensors are arguments (not a MiddleIndex) so that TorchScript can trace the call.
    @staticmethod
    def forward(ctx, video, register, gather, inverse, registers):
        ctx.save_for_backward(inverse, registers)
        ctx.register_dtype = None if register is None else register.dtype
        return _to_middle(video, register, gather, registers)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        inverse, registers = ctx.saved_tensors
        grad_register = None
        if ctx.register_dtype is not None and ctx.needs_input_grad[1]:
            grad_register = grad[:, registers].sum((0, 1)).to(ctx.register_dtype)
        return grad.index_select(1, inverse), grad_register, None, None, None


class _MiddleToVideo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, middle, gather, inverse, registers):
        ctx.save_for_backward(gather, registers)
        return middle.index_select(1, inverse)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        gather, registers = ctx.saved_tensors
        grad_middle = _to_middle(grad, None, gather, registers)
        grad_middle[:, registers] = 0  # registers are dropped: no gradient
        return grad_middle, None, None, None


def video_to_middle(video: Tensor, register: Tensor | None, index: MiddleIndex) -> Tensor:
    if not torch.is_grad_enabled():
        return _to_middle(video, register, index.gather, index.registers)
    return _VideoToMiddle.apply(video, register, index.gather, index.inverse, index.registers)


def middle_to_video(middle: Tensor, index: MiddleIndex) -> Tensor:
    if not torch.is_grad_enabled():
        return middle.index_select(1, index.inverse)
    return _MiddleToVideo.apply(middle, index.gather, index.inverse, index.registers)


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


class _OrdersCache:
    """:func:`text_orders` of the last mask seen, reused while it is the same unmodified tensor.

    Every MM-DiM block of a forward (and its ``decompose``) gets the same mask object: computing
    the orders once saves a handful of small kernel launches per block, which is most of the
    re-composition's cost at moderate lengths. Identity is checked through a weak reference
    (no stale hit after the mask is freed) and the tensor's version counter (no hit after an
    in-place change).
    """

    def __init__(self):
        self._ref = None
        self._version = -1
        self._orders: tuple[Tensor, Tensor] | None = None

    def __call__(self, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        ref = self._ref() if self._ref is not None else None
        if ref is text_mask and text_mask._version == self._version:
            return self._orders
        self._orders = text_orders(text_mask)
        self._ref = weakref.ref(text_mask)
        self._version = text_mask._version
        return self._orders


_orders = _OrdersCache()


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
        text: (b, Lt, d); text_mask: (b, Lt) bool (any device; moved to the text's);
        video: (b, Lv, d); register: (d,) learnable register (required when ``spec.registers``).
    Returns:
        (b, Lt + Lm [+ Lt], d) with Lm = Lv (+ number of frames when registers are on).
    """
    if spec.registers and register is None:
        raise ValueError("register: got None, expected a (d,) tensor since spec.registers is on")
    index = middle_index(spec, video.device)
    if index.identity:
        middle = video
    else:
        middle = video_to_middle(video, register if spec.registers else None, index)
    text_mask = text_mask.to(text.device)
    text = text * text_mask[..., None].to(text.dtype)
    left, right = _orders(text_mask)
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
    index = middle_index(spec, seq.device)
    sizes = [lt, index.gather.shape[0]] + ([lt] if spec.text_recomposition else [])
    if seq.shape[1] != sum(sizes):
        raise ValueError(f"seq: got length {seq.shape[1]}, expected {sum(sizes)} for this spec "
                         f"and {lt} text slots")
    # split (not slicing): its backward is one concatenation, not a zero-filled copy per slice
    pieces = seq.split(sizes, dim=1)
    video = pieces[1] if index.identity else middle_to_video(pieces[1], index)
    left, right = _orders(text_mask.to(seq.device))
    pre = _scatter_tokens(pieces[0], left)
    if spec.text_recomposition:
        return 0.5 * (pre + _scatter_tokens(pieces[2], right)), video
    return pre, video
