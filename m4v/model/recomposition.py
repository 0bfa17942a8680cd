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

Cost. Both directions are row gathers. Every row of S reads one row of the joint stream
``[text, video]`` (b, Lt + Lv, d) flattened, of a zero row (text padding) or of the register, so
building S is one ``index_select`` from the rows padded with [zero, register]; the way back is one
``index_select`` of S for the video and two small ones (the text copies, Lt rows each). Each
direction is a single autograd node whose backward is again a gather (never a scatter-add: no
atomics, deterministic). The row tables depend on the text mask and the spec: they are built on
the device once per (mask, spec) and reused by every block of a forward that sees the same mask
(a pageable host-to-device copy per call would stall the launch queue).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from m4v.ops.zigzag import zigzag_orders
from m4v.tensor_memo import TensorMemo


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


@dataclass(frozen=True, eq=False)
class SequenceIndex:
    """Row tables of one (text mask, spec) on one device. Rows are flat: S (b, L_S, d) as b L_S
    rows; the joint stream (b, Lt + Lv, d) as b (Lt + Lv) rows followed by a zero row and the
    register row; the two streams apart as b Lt text rows, b Lv video rows and a zero row."""

    compose: Tensor  # (b L_S,) row read by each row of S (padding -> zero, register slots)
    compose_adjoint: Tensor  # (b L_S,) stream row that reads each row of S back (registers: zero)
    first: Tensor  # (b (Lt + Lv),) row of S holding each joint row (T_pre for the text)
    text_first: Tensor  # (b Lt,) the text part of ``first``
    video_first: Tensor  # (b Lv,) the video part of ``first``
    appended: Tensor | None  # (b Lt,) row of S holding each text slot's T_app copy
    registers: Tensor | None  # (b frames,) rows of S holding the register
    mask: Tensor  # (b, Lt, 1) bool
    seq_len: int
    _masks: dict = field(default_factory=dict)

    def mask_as(self, dtype: torch.dtype) -> Tensor:
        if dtype not in self._masks:
            self._masks[dtype] = self.mask.to(dtype)
        return self._masks[dtype]


def sequence_index(text_mask: Tensor, spec: SequenceSpec) -> SequenceIndex:
    """Build the row tables (on ``text_mask``'s device) for a (b, Lt) bool mask."""
    device = text_mask.device
    b, lt = text_mask.shape
    forward, inverse = video_scan_index(spec)
    # on the host: nonzero has no meta kernel (FLOP counts run the model on meta tensors)
    register_at = torch.nonzero(forward == 0).squeeze(1).to(device)
    forward, inverse = forward.to(device), inverse.to(device)
    lm, lv = forward.numel(), inverse.numel()
    lj = lt + lv
    ls = lt + lm + (lt if spec.text_recomposition else 0)
    # the zero row comes after the b (Lt + Lv) token rows in both flat layouts (joint, streams)
    zero, register = b * lj, b * lj + 1
    joint0 = torch.arange(b, device=device)[:, None] * lj  # (b, 1) first joint row of a sample
    seq0 = torch.arange(b, device=device)[:, None] * ls
    text0 = torch.arange(b, device=device)[:, None] * lt  # first text / video row of a
    video0 = b * lt + torch.arange(b, device=device)[:, None] * lv  # sample, streams apart
    left, right = text_orders(text_mask)
    is_register = (forward == 0)[None]
    video_token = (forward - 1).clamp(min=0)[None]
    compose = [torch.where(text_mask.gather(1, left), joint0 + left, zero),
               torch.where(is_register, register, joint0 + lt + video_token)]
    adjoint = [text0 + left, torch.where(is_register, zero, video0 + video_token)]
    if spec.text_recomposition:
        compose.append(torch.where(text_mask.gather(1, right), joint0 + right, zero))
        adjoint.append(text0 + right)
    text_first = seq0 + torch.argsort(left, dim=1)
    video_first = seq0 + lt + inverse[None]
    return SequenceIndex(
        compose=torch.cat(compose, 1).flatten(),
        compose_adjoint=torch.cat(adjoint, 1).flatten(),
        first=torch.cat([text_first, video_first], 1).flatten(),
        text_first=text_first.flatten(), video_first=video_first.flatten(),
        appended=((seq0 + lt + lm + torch.argsort(right, dim=1)).flatten()
                  if spec.text_recomposition else None),
        registers=(seq0 + lt + register_at[None]).flatten() if spec.registers else None,
        mask=text_mask[..., None], seq_len=ls,
    )


_index = TensorMemo()  # the row tables of the last text mask seen, per (spec, device)


def _index_of(text_mask: Tensor, spec: SequenceSpec, device: torch.device) -> SequenceIndex:
    return _index.get(text_mask, (spec, device), lambda: sequence_index(text_mask.to(device), spec))


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


class _JointToSequence(torch.autograd.Function):
    # Index tensors are arguments (not a SequenceIndex) so that TorchScript can trace the call.
    @staticmethod
    def forward(ctx, x, register, mask, compose, first, appended, registers):
        ctx.save_for_backward(mask, first, appended, registers)
        ctx.x_shape = x.shape
        ctx.register_dtype = None if register is None else register.dtype
        padded = F.pad(_rows(x), (0, 0, 0, 2))  # + a zero row + the register row
        if register is not None:
            padded[-1] = register.to(x.dtype)
        return padded.index_select(0, compose).view(x.shape[0], -1, x.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        mask, first, appended, registers = ctx.saved_tensors
        grad = _rows(grad)
        dx = grad.index_select(0, first).view(ctx.x_shape)
        text = dx[:, : mask.shape[1]]
        if appended is not None:
            text.add_(grad.index_select(0, appended).view(text.shape))
        text.mul_(mask)  # padding slots were read as zeros
        dreg = None
        if ctx.register_dtype is not None and ctx.needs_input_grad[1]:
            dreg = grad.index_select(0, registers).sum(0).to(ctx.register_dtype)
        return dx, dreg, None, None, None, None, None


class _SequenceToStreams(torch.autograd.Function):
    # out of place only: TorchScript's tracer (fvcore) fails on in-place updates in here
    @staticmethod
    def forward(ctx, seq, compose_adjoint, text_first, video_first, appended):
        ctx.save_for_backward(compose_adjoint)
        ctx.seq_shape = seq.shape
        ctx.two_copies = appended is not None
        rows = _rows(seq)
        b, d = seq.shape[0], seq.shape[-1]
        text = rows.index_select(0, text_first)
        if appended is not None:  # the mean of the two copies
            text = torch.lerp(text, rows.index_select(0, appended), 0.5)
        return text.view(b, -1, d), rows.index_select(0, video_first).view(b, -1, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, dtext: Tensor, dvideo: Tensor):
        (compose_adjoint,) = ctx.saved_tensors
        if ctx.two_copies:
            dtext = 0.5 * dtext
        rows = torch.cat([_rows(dtext), _rows(dvideo), dvideo.new_zeros(1, dvideo.shape[-1])])
        return rows.index_select(0, compose_adjoint).view(ctx.seq_shape), None, None, None, None


def joint_to_sequence(x: Tensor, text_mask: Tensor, register: Tensor | None,
                      spec: SequenceSpec) -> Tensor:
    """Build S from the joint stream.

    Args:
        x: (b, Lt + Lv, d) text slots then video tokens (frames concatenated, raster inside);
        text_mask: (b, Lt) bool (any device); register: (d,) (required when ``spec.registers``).
    Returns:
        (b, Lt + Lm [+ Lt], d) with Lm = Lv (+ number of frames when registers are on).
    """
    if spec.registers and register is None:
        raise ValueError("register: got None, expected a (d,) tensor since spec.registers is on")
    lv = sum(h * w for h, w in spec.frame_sizes)
    if x.shape[1] != text_mask.shape[1] + lv:
        raise ValueError(f"x: got {x.shape[1]} tokens, expected {text_mask.shape[1]} text slots "
                         f"+ {lv} video tokens for this spec")
    ix = _index_of(text_mask, spec, x.device)
    return _JointToSequence.apply(x, register if spec.registers else None, ix.mask_as(x.dtype),
                                  ix.compose, ix.first, ix.appended, ix.registers)


def decompose(seq: Tensor, text_mask: Tensor, spec: SequenceSpec) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`joint_to_sequence`: exact for the video, the averaging rule for the
    text. seq (b, L_S, d) -> text (b, Lt, d) in slot order, video (b, Lv, d) frames in raster
    order."""
    ix = _index_of(text_mask, spec, seq.device)
    if seq.shape[1] != ix.seq_len:
        raise ValueError(f"seq: got length {seq.shape[1]}, expected {ix.seq_len} for this spec "
                         f"and {text_mask.shape[1]} text slots")
    return _SequenceToStreams.apply(seq, ix.compose_adjoint, ix.text_first, ix.video_first,
                                    ix.appended)


def recompose(text: Tensor, text_mask: Tensor, video: Tensor, register: Tensor | None,
              spec: SequenceSpec) -> Tensor:
    """:func:`joint_to_sequence` of text (b, Lt, d) and video (b, Lv, d) given apart."""
    return joint_to_sequence(torch.cat([text, video], 1), text_mask, register, spec)
