"""The fused causal depthwise conv1d + SiLU against a float64 loop over the taps.

The reference is written here, tap by tap with explicit zero padding, independently of both
backends (no F.conv1d). Half-precision inputs are rounded first and the reference sees the same
rounded values, so the only differences are the backends' arithmetic and the rounding of their
outputs. The Triton kernels run on the CPU in Triton's interpreter (a subprocess), and on the GPU
in the tests marked ``gpu`` (skipped without CUDA).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from interpreter import run_interpreted

from m4v.ops import causal_conv1d_silu
from m4v.ops.causal_conv import causal_conv1d_silu_torch, resolve_backend

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")


def conv_silu_loop(x, weight, bias=None):
    """float64 silu(bias + sum_j w[j] x[t - (k - 1) + j]), x[t < 0] = 0; x (b, d, l)."""
    x, weight = x.double(), weight.double()
    b, d, length = x.shape
    pre = x.new_zeros(b, d, length)
    if bias is not None:
        pre = pre + bias.double()[:, None]
    k = weight.shape[1]
    for j in range(k):
        delay = k - 1 - j  # tap j reads x[t - delay]
        kept = max(length - delay, 0)
        delayed = torch.cat([x.new_zeros(b, d, length - kept), x[..., :kept]], -1)
        pre = pre + weight[:, j, None] * delayed
    return pre * torch.sigmoid(pre)


def make_inputs(b, d, length, k, dtype=torch.float64, *, with_bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, length, generator=g).to(dtype)
    # a trained Mamba's conv weights are O(1 / sqrt(k)); keep the pre-activations O(1)
    weight = torch.randn(d, k, generator=g) / k**0.5
    bias = torch.randn(d, generator=g) * 0.5 if with_bias else None
    return tuple(None if t is None else t.to(device) for t in (x, weight, bias))


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def check_against_loop(fn, x, weight, bias, tol):
    """fn(x, weight, bias) against the loop: output and the gradients of a random functional of
    it, in x's, weight's and bias's dtypes."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    out = fn(*leaves) if bias is not None else fn(*leaves, None)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = conv_silu_loop(*ref_leaves)
    assert rel_err(out, ref) < tol, ("out", rel_err(out, ref))
    g_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    g_out = g_out.to(ref.device)
    grads = torch.autograd.grad(out, leaves, g_out.to(out.dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, g_out)
    for name, leaf, gr, r in zip(("x", "weight", "bias"), leaves, grads, ref_grads, strict=False):
        assert gr.dtype == leaf.dtype and gr.shape == leaf.shape, name
        assert rel_err(gr, r) < tol, (name, rel_err(gr, r))


# ----------------------------------------------------------------------------- the torch backend


def test_loop_matches_hand_computed_values():
    """The reference itself, k = 2 on one channel: pre = [w1 x0 + c, w0 x0 + w1 x1 + c]."""
    x, w, c = torch.tensor([[[1.0, -2.0]]]), torch.tensor([[0.5, 3.0]]), torch.tensor([0.25])
    pre = torch.tensor([3.0 * 1.0 + 0.25, 0.5 * 1.0 + 3.0 * -2.0 + 0.25])
    expected = (pre * torch.sigmoid(pre)).double()[None, None]
    torch.testing.assert_close(conv_silu_loop(x, w, c), expected)


@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("length", [1, 2, 37])
@pytest.mark.parametrize("with_bias", [True, False])
def test_torch_backend_matches_loop(k, length, with_bias):
    inputs = (t if t is None else t.double() for t in make_inputs(2, 5, length, k,
                                                                   with_bias=with_bias))
    check_against_loop(causal_conv1d_silu_torch, *inputs, 1e-12)


def test_torch_backend_gradcheck():
    x, weight, bias = (t.double().requires_grad_() for t in make_inputs(2, 3, 9, 4))
    assert torch.autograd.gradcheck(causal_conv1d_silu_torch, (x, weight, bias))


def test_torch_backend_casts_weight_to_x_dtype():
    x, weight, bias = make_inputs(1, 4, 11, 4, torch.float32)
    out = causal_conv1d_silu(x, weight.double(), bias.half(), backend="torch")
    assert out.dtype == torch.float32
    assert rel_err(out, conv_silu_loop(x, weight, bias.half())) < 1e-6


def test_dispatch_on_cpu():
    x, weight, bias = make_inputs(1, 4, 11, 4)
    assert resolve_backend("auto", x) == "torch"
    torch.testing.assert_close(causal_conv1d_silu(x, weight, bias),
                               causal_conv1d_silu_torch(x, weight, bias))
    with pytest.raises(RuntimeError, match="triton needs CUDA tensors"):
        causal_conv1d_silu(x, weight, bias, backend="triton")
    with pytest.raises(ValueError, match=r"one of \('auto', 'torch', 'triton'\), got 'cudnn'"):
        causal_conv1d_silu(x, weight, bias, backend="cudnn")


def test_rejects_bad_inputs():
    x, weight, bias = make_inputs(2, 4, 8, 4)
    cases = [
        ((x[0], weight, bias), r"x must have shape \(b, d, l\)"),
        ((x[:, :, :0], weight, bias), r"b, d, l >= 1"),
        ((x, weight[:, None], bias), r"weight must have shape \(d, k\) = \(4, k\).*pass w\[:, 0\]"),
        ((x, weight[:3], bias), r"weight must have shape \(d, k\) = \(4, k\)"),
        ((x, weight, bias[:3]), r"bias must have shape \(d,\) = \(4,\)"),
        ((x.long(), weight, bias), "x must be a real floating-point tensor"),
        ((x, weight.tolist(), bias), "weight must be a tensor, got list"),
        ((x, weight.to("meta"), bias), "weight is on meta, x on cpu"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            causal_conv1d_silu(*args)


@needs_triton
def test_triton_rejects_bad_inputs():
    from m4v.ops.causal_conv_triton import ConvTiles, causal_conv1d_silu_triton

    x, weight, bias = make_inputs(2, 4, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16, got torch.float64"):
        causal_conv1d_silu_triton(x.double(), weight, bias)
    with pytest.raises(ValueError, match=r"k must be <= 8, got weight of shape \(4, 9\)"):
        causal_conv1d_silu_triton(x, torch.zeros(4, 9), bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        causal_conv1d_silu_triton(x, weight, bias[:2])
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs CUDA tensors, got x on cpu"):
            causal_conv1d_silu_triton(x, weight, bias)
    with pytest.raises(ValueError, match="fwd_block_l must be a power of two, got 100"):
        ConvTiles(fwd_block_l=100)
    with pytest.raises(ValueError, match="bwd_tiles_per_program must be a positive integer"):
        ConvTiles(bwd_tiles_per_program=0)


# ----------------------------------------------------------------------------- the Triton kernels

INTERPRETED = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_causal_conv import check_against_loop, make_inputs
from m4v.ops.causal_conv_triton import ConvTiles, causal_conv1d_silu_triton

SMALL = ConvTiles(fwd_block_d=16, fwd_block_l=16, bwd_block_d=16, bwd_block_l=16,
                  bwd_tiles_per_program=1)
RUNS = ConvTiles(bwd_tiles_per_program=2)
cases = [  # (b, d, l, k, dtype, bias, tiles, tol)
    (2, 5, 37, 4, torch.float32, True, None, 2e-6),  # d, l not multiples of the tile
    (2, 5, 37, 3, torch.bfloat16, False, None, 1e-2),
    (2, 5, 600, 4, torch.bfloat16, True, RUNS, 1e-2),  # 3 tiles: runs of 2 tiles, then 1
    (2, 5, 600, 3, torch.float32, False, None, 2e-6),  # 3 tiles in one run
    (1, 40, 2, 4, torch.float32, True, SMALL, 2e-6),  # 3 channel blocks, l < k
    (2, 20, 70, 2, torch.float16, True, SMALL, 2e-3),  # 5 runs of one tile
    (1, 32, 100, 4, torch.float32, True, SMALL, 2e-6),  # full channel blocks: unmasked tiles
]
for i, (b, d, length, k, dtype, bias, tiles, tol) in enumerate(cases):
    x, weight, bias = make_inputs(b, d, length, k, dtype, with_bias=bias, seed=i)
    fn = lambda x, w, c: causal_conv1d_silu_triton(x, w, c, tiles=tiles)
    check_against_loop(fn, x, weight, bias, tol)
# a transposed view (the kernels read a dense copy), and a float64 weight
x, weight, bias = make_inputs(2, 5, 37, 4, torch.float32, seed=9)
check_against_loop(causal_conv1d_silu_triton, x.mT.contiguous().mT, weight.double(), bias, 2e-6)
"""


@needs_triton
def test_kernels_in_interpreter():
    """Forward and backward kernels on the CPU in Triton's interpreter (which is chosen when the
    kernels are defined, hence a fresh process): float32, bfloat16 and float16, with and without
    bias, k = 2, 3, 4; padding channels and steps, several tiles and runs of tiles."""
    run_interpreted(INTERPRETED)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("k", [4, 3])
def test_triton_matches_loop_on_gpu(dtype, tol, k):
    inputs = make_inputs(2, 96, 5000, k, dtype, device="cuda")
    assert resolve_backend("auto", inputs[0]) == "triton"
    fn = lambda x, w, c: causal_conv1d_silu(x, w, c, backend="triton")
    check_against_loop(fn, *inputs, tol)


@pytest.mark.gpu
@needs_triton
def test_triton_backward_is_deterministic():
    x, weight, bias = (t.requires_grad_() for t in make_inputs(2, 64, 3000, 4, torch.bfloat16,
                                                                 device="cuda"))
    out = causal_conv1d_silu(x, weight, bias, backend="triton")
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (x, weight, bias), g, retain_graph=True)
    second = torch.autograd.grad(out, (x, weight, bias), g)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
