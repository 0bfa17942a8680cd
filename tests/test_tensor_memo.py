"""TensorMemo: values derived from a tensor are reused only for the same, unmodified tensor."""

import math

import torch

from m4v.ops.attention import block_causal_attention, block_causal_mask
from m4v.tensor_memo import TensorMemo


def test_computes_once_per_tensor_and_key():
    memo, calls = TensorMemo(), []
    t = torch.ones(3)

    def compute(tag):
        calls.append(tag)
        return tag

    assert memo.get(t, "a", lambda: compute("a")) == "a"
    assert memo.get(t, "a", lambda: compute("again")) == "a"
    assert memo.get(t, "b", lambda: compute("b")) == "b"
    assert calls == ["a", "b"]
    assert memo.get(torch.ones(3), "a", lambda: compute("other")) == "other"  # equal, not same


def test_in_place_change_or_free_invalidates():
    memo = TensorMemo()
    t = torch.ones(3)
    assert memo.get(t, None, lambda: float(t.sum())) == 3.0
    t[0] = 5.0
    assert memo.get(t, None, lambda: float(t.sum())) == 7.0
    t = torch.zeros(3)  # the old one is freed: the new one may get its id, and must not hit
    assert memo.get(t, None, lambda: float(t.sum())) == 0.0


def test_attention_sees_a_mask_padded_in_place():
    g = torch.Generator().manual_seed(0)
    lt, frames = 3, [2, 2]
    q, k, v = (torch.randn(1, 2, lt + 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(1, lt, dtype=torch.bool)

    def reference():
        allowed = block_causal_mask(lt, frames)[None, None] & torch.cat(
            [mask, torch.ones(1, 4, dtype=torch.bool)], 1)[:, None, None, :]
        scores = (q @ k.mT) / math.sqrt(8)
        return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v

    torch.testing.assert_close(block_causal_attention(q, k, v, lt, frames, mask), reference())
    mask[0, 2] = False  # the cached "no padding" must not survive this
    torch.testing.assert_close(block_causal_attention(q, k, v, lt, frames, mask), reference())
