"""Block-causal joint attention over ``[text, frame_1, ..., frame_n]``.

The mask of PyramidFlow's autoregressive video model: text queries see text only; a video query in
frame i sees all text and every video token of frames <= i. Instead of materialising an
``(L, L)`` mask (3.7 G entries at 768p x 16 frames) each query group is one mask-free
``scaled_dot_product_attention`` over the key prefix it may see, so the current (largest) frame
runs on the flash kernel. Only the text padding needs a mask, and a ``(b, 1, 1, L_k)`` one at that.

The groups' queries are one ``split`` of q, and their keys and values prefix views of k and v
(:class:`_Prefixes`) whose gradients add into one tensor. Taken as slices, each group's gradient
would come back through its own zero-filled copy of the whole k (and v), and autograd would add
those up: 17 groups on 16 frames, about three passes over the whole tensor each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from m4v.tensor_memo import TensorMemo


def block_causal_mask(text_len: int, frame_lens: list[int], device=None) -> Tensor:
    """The dense ``(L, L)`` boolean mask (True = may attend) the split computation implements.

    Used by tests and by anyone who wants to check the layout; the model never builds it.
    """
    owner = [-1] * text_len  # -1: text
    for i, n in enumerate(frame_lens):
        owner += [i] * n
    o = torch.tensor(owner, device=device)
    q, k = o[:, None], o[None, :]
    text_q = (q == -1) & (k == -1)
    video_q = (q >= 0) & (k <= q)
    return text_q | video_q


_all_valid = TensorMemo()  # whether the last text mask seen has no padding


def _key_mask(text_mask: Tensor | None, key_len: int) -> Tensor | None:
    """(b, 1, 1, key_len) mask over a key prefix that starts with the text, or None if all valid
    (the mask-free call can take the flash kernel). Knowing that means a read-back to the host;
    it is made once per mask, not once per query group and block."""
    if text_mask is None or _all_valid.get(text_mask, None, lambda: bool(text_mask.all())):
        return None
    b, lt = text_mask.shape
    # A row with no real text token would give softmax over nothing (NaN): let it see slot 0.
    empty = ~text_mask.any(dim=1, keepdim=True)
    first = torch.zeros_like(text_mask)
    first[:, 0] = True
    text_ok = text_mask | (empty & first)
    keep = torch.ones(b, key_len, dtype=torch.bool, device=text_mask.device)
    keep[:, :lt] = text_ok
    return keep[:, None, None, :]


class _Prefixes(torch.autograd.Function):
    """The views ``x[:, :, :end]`` for each of ``ends`` (along the sequence axis, dim 2)."""

    @staticmethod
    def forward(ctx, x: Tensor, ends: tuple[int, ...]) -> tuple[Tensor, ...]:
        ctx.shape = x.shape
        ctx.ends = ends
        ctx.set_materialize_grads(False)
        return tuple(x[:, :, :end] for end in ends)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, None]:
        # longest prefix first: a whole-length gradient starts the sum (a copy, no zero fill)
        pairs = sorted(((end, g) for end, g in zip(ctx.ends, grads, strict=True)
                        if g is not None), key=lambda p: -p[0])
        if not pairs:
            return None, None
        if pairs[0][0] == ctx.shape[2]:
            total = pairs.pop(0)[1].clone()
        else:
            total = pairs[0][1].new_zeros(ctx.shape)
        for end, g in pairs:
            total[:, :, :end].add_(g)
        return total, None


def block_causal_attention(
    q: Tensor, k: Tensor, v: Tensor, text_len: int, frame_lens: list[int],
    text_mask: Tensor | None = None,
) -> Tensor:
    """Attention under :func:`block_causal_mask`.

    Args:
        q, k, v: (b, heads, L, head_dim) with ``L = text_len + sum(frame_lens)``.
        text_len: number of text tokens at the start of the sequence.
        frame_lens: tokens of each frame, in time order.
        text_mask: (b, text_len) bool, True for real tokens; padded text keys are ignored.
    Returns:
        (b, heads, L, head_dim)
    """
    total = text_len + sum(frame_lens)
    if q.shape[2] != total:
        raise ValueError(
            f"q: got sequence length {q.shape[2]}, expected text_len + frames = {total}"
        )
    groups = query_groups(text_len, frame_lens)
    ends = tuple(k_end for _, _, k_end in groups)
    queries = q.split([q_end - q_start for q_start, q_end, _ in groups], dim=2)
    mask = _key_mask(text_mask, total)
    outs = [F.scaled_dot_product_attention(
        qi, ki, vi, attn_mask=None if mask is None else mask[..., :end])
        for qi, ki, vi, end in zip(queries, _Prefixes.apply(k, ends), _Prefixes.apply(v, ends),
                                   ends, strict=True)]
    return torch.cat(outs, dim=2)


def query_groups(text_len: int, frame_lens: list[int]) -> list[tuple[int, int, int]]:
    """(query start, query end, key end) per group: the text, then each frame in time order."""
    groups = [(0, text_len, text_len)] if text_len else []
    start = text_len
    for n in frame_lens:
        groups.append((start, start + n, start + n))
        start += n
    return groups
