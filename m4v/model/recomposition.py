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

Cost. Both directions are row gathers, and each one's backward is the other's gather. Every
row of S reads one row of the joint stream ``[text, video]`` (b, Lt + Lv, d) flattened (table
``compose``); the text padding slots are then zeroed and the register written into its rows (a
few rows each, in place). The way back reads every joint row from its row of S (table ``first``:
T_pre for the text), the text then averaged with its T_app rows. The block takes the joint
stream back whole, for one gated residual over text and video. Each direction is a single
autograd node (never a scatter-add: no atomics, deterministic) and no full-size copy is made
besides the gathers themselves: the stream padded with a zero row and the register row, text and
video gradients concatenated into one source, or the two streams apart (a concatenation for the
MLP after them) would each copy the whole stream, a pass over 236 MB in the 768p block. The row
tables depend on the text mask and the spec: they are built on the device once per (mask, spec)
and reused by every block of a forward that sees the same mask; the spec's part, made on the
host, goes over with a queued copy (:func:`m4v.transfer.to_device`), since the model's mask is a
new tensor every forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from m4v.ops.zigzag import zigzag_orders
from m4v.tensor_memo import TensorMemo
from m4v.transfer import to_device


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
    rows, the joint stream (b, Lt + Lv, d) as b (Lt + Lv) rows."""

    compose: Tensor  # (b L_S,) joint row read by each row of S (registers: any, overwritten)
    pre_padding: Tensor  # (b, Lt, 1) bool: T_pre slots that are padding (zeroed)
    app_padding: Tensor | None  # (b, Lt, 1) bool: the same for T_app
    first: Tensor  # (b (Lt + Lv),) row of S holding each joint row (T_pre for the text)
    text_first: Tensor  # (b Lt,) the text part of ``first``
    appended: Tensor | None  # (b Lt,) row of S holding each text slot's T_app copy
    text_rows: Tensor  # (b Lt,) the joint rows of the text slots
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
    register_at = to_device(torch.nonzero(forward == 0).squeeze(1), device)
    forward, inverse = to_device(forward, device), to_device(inverse, device)
    lm, lv = forward.numel(), inverse.numel()
    lj = lt + lv
    ls = lt + lm + (lt if spec.text_recomposition else 0)
    joint0 = torch.arange(b, device=device)[:, None] * lj  # (b, 1) first joint row of a sample
    seq0 = torch.arange(b, device=device)[:, None] * ls
    left, right = text_orders(text_mask)
    video_token = (forward - 1).clamp(min=0)[None]  # registers read token 0, then overwritten
    compose = [joint0 + left, joint0 + lt + video_token]
    if spec.text_recomposition:
        compose.append(joint0 + right)
    text_first = seq0 + torch.argsort(left, dim=1)
    video_first = seq0 + lt + inverse[None]
    return SequenceIndex(
        compose=torch.cat(compose, 1).flatten(),
        pre_padding=~text_mask.gather(1, left)[..., None],
        app_padding=~text_mask.gather(1, right)[..., None] if spec.text_recomposition else None,
        first=torch.cat([text_first, video_first], 1).flatten(),
        text_first=text_first.flatten(),
        appended=((seq0 + lt + lm + torch.argsort(right, dim=1)).flatten()
                  if spec.text_recomposition else None),
        text_rows=(joint0 + torch.arange(lt, device=device)).flatten(),
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
    def forward(ctx, x, register, mask, compose, pre_padding, app_padding, first, appended,
                registers):
        ctx.save_for_backward(mask, first, appended, registers)
        ctx.x_shape = x.shape
        ctx.register_dtype = None if register is None else register.dtype
        b, lt, d = x.shape[0], mask.shape[1], x.shape[-1]
        seq = _rows(x).index_select(0, compose)
        if register is not None:
            seq[registers] = register.to(x.dtype)
        seq = seq.view(b, -1, d)
        seq[:, :lt].masked_fill_(pre_padding, 0)
        if app_padding is not None:
            seq[:, -lt:].masked_fill_(app_padding, 0)
        return seq

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
        return dx, dreg, None, None, None, None, None, None, None


class _SequenceToJoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, seq, first, text_first, appended, text_rows, compose, registers):
        ctx.save_for_backward(compose, registers)
        ctx.seq_shape = seq.shape
        ctx.lt = text_first.numel() // seq.shape[0]
        ctx.two_copies = appended is not None
        rows = _rows(seq)
        joint = rows.index_select(0, first)
        if appended is not None:  # the text rows become the mean of the two copies (few rows)
            # in place through an index, not through a view: TorchScript's tracer (fvcore)
            # fails on in-place updates of views in here
            joint.index_copy_(0, text_rows, torch.lerp(
                rows.index_select(0, text_first), rows.index_select(0, appended), 0.5))
        return joint.view(seq.shape[0], -1, seq.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        compose, registers = ctx.saved_tensors
        lt = ctx.lt
        dseq = _rows(grad).index_select(0, compose).view(ctx.seq_shape)
        if ctx.two_copies:
            dseq[:, :lt].mul_(0.5)
            dseq[:, -lt:].mul_(0.5)
        if registers is not None:
            dseq.view(-1, dseq.shape[-1]).index_fill_(0, registers, 0)
        return dseq, None, None, None, None, None, None


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
                                  ix.compose, ix.pre_padding, ix.app_padding, ix.first,
                                  ix.appended, ix.registers)


def sequence_to_joint(seq: Tensor, text_mask: Tensor, spec: SequenceSpec) -> Tensor:
    """Inverse of :func:`joint_to_sequence`: exact for the video, the averaging rule for the
    text. seq (b, L_S, d) -> the joint stream (b, Lt + Lv, d): text in slot order, then the
    video, frames in raster order."""
    ix = _index_of(text_mask, spec, seq.device)
    if seq.shape[1] != ix.seq_len:
        raise ValueError(f"seq: got length {seq.shape[1]}, expected {ix.seq_len} for this spec "
                         f"and {text_mask.shape[1]} text slots")
    return _SequenceToJoint.apply(seq, ix.first, ix.text_first, ix.appended, ix.text_rows,
                                  ix.compose, ix.registers)


def decompose(seq: Tensor, text_mask: Tensor, spec: SequenceSpec) -> tuple[Tensor, Tensor]:
    """:func:`sequence_to_joint` as text (b, Lt, d) and video (b, Lv, d), apart."""
    joint = sequence_to_joint(seq, text_mask, spec)
    lt = text_mask.shape[1]
    return joint[:, :lt], joint[:, lt:]


def recompose(text: Tensor, text_mask: Tensor, video: Tensor, register: Tensor | None,
              spec: SequenceSpec) -> Tensor:
    """:func:`joint_to_sequence` of text (b, Lt, d) and video (b, Lv, d) given apart."""
    return joint_to_sequence(torch.cat([text, video], 1), text_mask, register, spec)
