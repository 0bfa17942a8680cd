"""Re-composition's hand-written backward vs a token-by-token reference under plain autograd."""

import itertools

import pytest
import torch

from m4v.model.recomposition import SequenceSpec, decompose, recompose
from m4v.ops.zigzag import zigzag_orders

SIZES = ((1, 2), (2, 4), (4, 8))


def frame_orders(spec):
    for h, w in SIZES:
        yield h * w, (range(h * w) if spec.direction is None
                      else [int(j) for j in zigzag_orders(h, w)[spec.direction]])


def reference_recompose(text, mask, video, register, spec):
    """S built one token at a time (autograd differentiates the stack)."""
    rows = []
    for i in range(text.shape[0]):
        real = [text[i, k] for k in range(text.shape[1]) if mask[i, k]]
        pad = [torch.zeros_like(text[i, 0])] * (text.shape[1] - len(real))
        seq, offset = pad + real, 0
        for n, order in frame_orders(spec):
            seq += [register] if spec.registers else []
            seq += [video[i, offset + j] for j in order]
            offset += n
        seq += real + pad if spec.text_recomposition else []
        rows.append(torch.stack(seq))
    return torch.stack(rows)


def reference_decompose(seq, mask, spec):
    """-> (real text tokens of every sample, concatenated (K, d); video (b, Lv, d))."""
    lt = mask.shape[1]
    texts, videos = [], []
    for i in range(seq.shape[0]):
        n = int(mask[i].sum())
        real = seq[i, lt - n:lt]
        if spec.text_recomposition:
            real = 0.5 * (real + seq[i, seq.shape[1] - lt:seq.shape[1] - lt + n])
        texts.append(real)
        tokens, pos, offset = {}, lt, 0
        for n_tok, order in frame_orders(spec):
            pos += 1 if spec.registers else 0
            for k, j in enumerate(order):
                tokens[offset + j] = seq[i, pos + k]
            pos += n_tok
            offset += n_tok
        videos.append(torch.stack([tokens[j] for j in range(offset)]))
    return torch.cat(texts), torch.stack(videos)


@pytest.mark.parametrize("registers, text_recomposition, direction",
                         list(itertools.product([True, False], [True, False], [None, 2])))
def test_recompose_decompose_values_and_gradients_match_reference(
        registers, text_recomposition, direction):
    g = torch.Generator().manual_seed(0)
    b, lt, d = 3, 5, 4
    lv = sum(h * w for h, w in SIZES)
    mask = torch.arange(lt)[None] < torch.tensor([5, 2, 0])[:, None]  # full, short, empty text
    spec = SequenceSpec(SIZES, direction, registers, text_recomposition)
    leaves = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
              for s in ((b, lt, d), (b, lv, d), (d,))]
    seq = recompose(leaves[0], mask, leaves[1], leaves[2], spec)
    ref_seq = reference_recompose(leaves[0], mask, leaves[1], leaves[2], spec)
    assert torch.equal(seq, ref_seq)

    weight = torch.randn(seq.shape, generator=g, dtype=torch.float64)
    text, video = decompose(seq * weight, mask, spec)
    ref_text, ref_video = reference_decompose(ref_seq * weight, mask, spec)
    assert torch.allclose(video, ref_video) and torch.allclose(text[mask], ref_text)

    w_text = torch.randn(ref_text.shape, generator=g, dtype=torch.float64)
    w_video = torch.randn(video.shape, generator=g, dtype=torch.float64)
    w_seq = torch.randn(seq.shape, generator=g, dtype=torch.float64)  # reaches the registers
    loss = (text[mask] * w_text).sum() + (video * w_video).sum() + (seq * w_seq).sum()
    ref_loss = (ref_text * w_text).sum() + (ref_video * w_video).sum() + (ref_seq * w_seq).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, leaves, allow_unused=True)
    for name, a, r in zip(("text", "video", "register"), grads, ref_grads, strict=True):
        if r is None:  # no registers: the register takes no part
            assert a is None or not a.any(), name
        else:
            assert a is not None and torch.allclose(a, r), name


def test_cached_text_orders_follow_the_mask():
    spec = SequenceSpec(((1, 1),), None, False, True)
    text, video = torch.arange(1.0, 5.0)[None, :, None], torch.zeros(1, 1, 1)
    mask = torch.tensor([[True, True, False, False]])
    seq = lambda m: recompose(text, m, video, None, spec)[0, :, 0].tolist()  # noqa: E731
    assert seq(mask) == [0, 0, 1, 2, 0, 1, 2, 0, 0]
    mask[0, 2] = True  # in place: the cached orders must not be reused
    assert seq(mask) == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert seq(torch.tensor([[False, True, True, True]])) == [0, 2, 3, 4, 0, 2, 3, 4, 0]
