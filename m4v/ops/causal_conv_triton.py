"""Causal depthwise conv1d + SiLU in Triton, forward and backward: Mamba's short convolution.

Per batch b, channel c and step t, with w (d, k) and bias (d,)::

    pre[t] = bias + sum_{j < k} w[j] x[t - (k - 1) + j]      (x[t < 0] = 0)
    out[t] = silu(pre[t])

Why: the mixer used to run ``F.silu(conv1d(x)[..., :l])``, cuDNN's depthwise conv padded on both
sides and then cropped. On an H200 at d = 3840, l = 61.7k, bf16 that took 4.7 ms forward and
backward where the bytes would take about 0.5 ms, and the crop's backward copied the gradient once
more. Here each pass reads its inputs and writes its outputs once, the SiLU fused in. Measured on
an H200 (b = 1, d = 3840, l = 61.7k, k = 4, bf16, ``triton.testing.do_bench``): forward 0.35 ms
(cuDNN + crop + SiLU: 3.0 ms), forward and backward through autograd 2.1 ms (8.2 ms).

Layout: x is dense (b, d, l), steps contiguous. A program computes a tile of ``block_d`` channels
x ``block_l`` steps, rows along the contiguous axis so that loads coalesce. The k taps are k
loads of the tile shifted by 0..k-1 steps: the overlap (the halo) is served by L1/L2, not by HBM.
Tiles whose halo and channels lie inside x load without masks (the masks cost about as much as
the loads). Maths is float32 whatever the input dtypes; the output has x's dtype.

Backward (nothing but x, w and bias saved; pre is recomputed)::

    dpre[t] = dout[t] sigmoid(pre[t]) (1 + pre[t] (1 - sigmoid(pre[t])))
    dx[t]   = sum_j w[j] dpre[t + (k - 1) - j]                 (dpre[t >= l] = 0)
    dw[j]   = sum_{b,t} dpre[t] x[t - (k - 1) + j],   dbias = sum_{b,t} dpre[t]

dx at a step needs dpre at the k steps from it onwards, which lie partly in the next tile: each
program recomputes dpre at those k shifts (k^2 shifted loads of x, L1 hits) rather than writing
dpre and reading it back. That recomputation, not memory, bounds the backward (about 1.75 ms of
the 2.1 above). dw and dbias are sums over batch and time: a backward program walks a run of
``bwd_tiles_per_program`` tiles of one channel block, sums in registers, and writes its float32
partial sums to its own slice of a buffer (b, runs, k + 1, d) (rows 0..k-1 dw's taps, row k
dbias's), reduced afterwards with ``torch.sum``: deterministic, no atomics.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from m4v.ops.causal_conv import check_inputs

MAX_TAPS = 8  # the taps are unrolled at compile time, and the backward makes k^2 loads per tile
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ConvTiles:
    """Tile sizes and warps of the two kernels (powers of two, but ``bwd_tiles_per_program``).

    ``*_block_d`` channels x ``*_block_l`` steps per tile; ``bwd_tiles_per_program``: tiles along
    time each backward program walks, summing dw and dbias on the way (fewer partial sums).
    Defaults: the fastest of a small sweep on an H200 at d = 3840, l = 61.7k, k = 4, bf16: small
    tiles, 16 (forward) and 8 (backward) elements a thread. The backward slows down sharply on
    larger ones (twice as slow at 8 x 256 on 4 warps, 30 times at 32 x 256, its k shifted
    recomputations keeping several tiles live)."""

    fwd_block_d: int = 4
    fwd_block_l: int = 256
    fwd_warps: int = 2
    bwd_block_d: int = 2
    bwd_block_l: int = 256
    bwd_warps: int = 2
    bwd_tiles_per_program: int = 4

    def __post_init__(self):
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if v < 1 or (name != "bwd_tiles_per_program" and v & (v - 1)):
                what = "a positive integer" if name == "bwd_tiles_per_program" else "a power of two"
                raise ValueError(f"ConvTiles.{name} must be {what}, got {v}")


DEFAULT_TILES = ConvTiles()


# ----------------------------------------------------------------------------------------------
# Triton device functions


@triton.jit
def _load_shifted(ptrs, steps, row_ok, shift, length, MASKED: tl.constexpr):
    """The tile ``shift`` steps from ``ptrs`` (pointers to a (BLOCK_D, BLOCK_L) tile of a (d, l)
    row-major array at ``steps``), as float32. With ``MASKED``, zero at steps outside
    [0, length) (the causal padding, the end of the sequence) and on rows past d; without, the
    caller knows the tile and its halo lie inside. The shift is a compile-time constant, an
    immediate offset of the loads rather than another tile of pointers."""
    if MASKED:
        at = steps + shift
        ok = row_ok[:, None] & ((at >= 0) & (at < length))[None, :]
        x = tl.load(ptrs + shift, mask=ok, other=0.0)
    else:
        x = tl.load(ptrs + shift)
    return x.to(tl.float32)


@triton.jit
def _store(ptrs, steps, row_ok, length, value, MASKED: tl.constexpr):
    value = value.to(ptrs.dtype.element_ty)
    if MASKED:
        tl.store(ptrs, value, mask=row_ok[:, None] & (steps < length)[None, :])
    else:
        tl.store(ptrs, value)


@triton.jit
def _tap(w_ptr, rows, row_ok, j, K: tl.constexpr):
    """Tap j of every row's filter, (BLOCK_D, 1) float32 (w is (d, K) float32)."""
    return tl.load(w_ptr + rows * K + j, mask=row_ok, other=0.0)[:, None]


@triton.jit
def _pre(x_ptrs, w_ptr, bias, rows, row_ok, steps, shift, length, K: tl.constexpr,
         MASKED: tl.constexpr):
    """pre = bias + sum_j w[j] x[t - (K - 1) + j] at t = steps + shift, (BLOCK_D, BLOCK_L)
    float32; ``x_ptrs`` point at x's tile at ``steps``."""
    pre = tl.zeros(x_ptrs.shape, tl.float32) + bias[:, None]
    for j in tl.static_range(K):
        x = _load_shifted(x_ptrs, steps, row_ok, shift - (K - 1) + j, length, MASKED)
        pre += _tap(w_ptr, rows, row_ok, j, K) * x
    return pre


@triton.jit
def _rows(pid_d, pid_b, dim, length, BLOCK_D: tl.constexpr):
    """(rows, rows < dim, the batch element's offset)."""
    rows = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    # the batch offset in int64: b d l passes 2^31 at the model's sizes, d l does not (checked)
    return rows, rows < dim, pid_b.to(tl.int64) * dim * length


@triton.jit
def _inside(first, halo_before, halo_after, pid_d, dim, length, BLOCK_D: tl.constexpr,
            BLOCK_L: tl.constexpr):
    """Whether the tile at steps ``first`` + [0, BLOCK_L), with ``halo_before`` steps before it
    and ``halo_after`` after, and its channels all lie inside x: then no load needs a mask
    (the masks cost as much as the loads, a few instructions per element each)."""
    return ((first >= halo_before) & (first + BLOCK_L + halo_after <= length)
            & ((pid_d + 1) * BLOCK_D <= dim))


@triton.jit
def _bias(bias_ptr, rows, row_ok, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        return tl.load(bias_ptr + rows, mask=row_ok, other=0.0)
    return tl.zeros(rows.shape, tl.float32)


@triton.jit
def _fwd_tile(x_ptrs, out_ptrs, w_ptr, bias, rows, row_ok, steps, length, K: tl.constexpr,
              MASKED: tl.constexpr):
    pre = _pre(x_ptrs, w_ptr, bias, rows, row_ok, steps, 0, length, K, MASKED)
    _store(out_ptrs, steps, row_ok, length, pre * tl.sigmoid(pre), MASKED)


@triton.jit
def _bwd_tile(x_ptrs, dout_ptrs, dx_ptrs, w_ptr, bias, rows, row_ok, steps, length, sums,
              K: tl.constexpr, MASKED: tl.constexpr):
    """Store dx on the tile; return ``sums`` (BLOCK_D, SUMS) plus the tile's sums: column
    j < K dw's tap j, column K dbias."""
    sum_cols = tl.arange(0, sums.shape[1])[None, :]
    dx = tl.zeros(x_ptrs.shape, tl.float32)
    for m in tl.static_range(K):  # dpre at t + m meets tap K - 1 - m in dx[t]
        pre = _pre(x_ptrs, w_ptr, bias, rows, row_ok, steps, m, length, K, MASKED)
        sig = tl.sigmoid(pre)
        dout = _load_shifted(dout_ptrs, steps, row_ok, m, length, MASKED)
        dpre = dout * sig * (1.0 + pre * (1.0 - sig))
        dx += _tap(w_ptr, rows, row_ok, K - 1 - m, K) * dpre
        if m == 0:
            for j in tl.static_range(K):
                x = _load_shifted(x_ptrs, steps, row_ok, j - (K - 1), length, MASKED)
                sums += tl.where(sum_cols == j, tl.sum(dpre * x, 1)[:, None], 0.0)
            sums += tl.where(sum_cols == K, tl.sum(dpre, 1)[:, None], 0.0)
    _store(dx_ptrs, steps, row_ok, length, dx, MASKED)
    return sums


# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _conv_silu_fwd_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, dim, length, K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """One (BLOCK_D, BLOCK_L) tile of out; grid (tiles along l, channel blocks, b)."""
    pid_d = tl.program_id(1)
    rows, row_ok, batch = _rows(pid_d, tl.program_id(2), dim, length, BLOCK_D)
    first = tl.program_id(0) * BLOCK_L
    steps = first + tl.arange(0, BLOCK_L)
    offs = batch + rows[:, None] * length + steps[None, :]
    bias = _bias(bias_ptr, rows, row_ok, HAS_BIAS)
    x_ptrs, out_ptrs = x_ptr + offs, out_ptr + offs
    if _inside(first, K - 1, 0, pid_d, dim, length, BLOCK_D, BLOCK_L):
        _fwd_tile(x_ptrs, out_ptrs, w_ptr, bias, rows, row_ok, steps, length, K, MASKED=False)
    else:
        _fwd_tile(x_ptrs, out_ptrs, w_ptr, bias, rows, row_ok, steps, length, K, MASKED=True)


@triton.jit
def _conv_silu_bwd_kernel(x_ptr, w_ptr, bias_ptr, dout_ptr, dx_ptr, part_ptr, dim, length,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_L: tl.constexpr, TILES: tl.constexpr, SUMS: tl.constexpr):
    """dx on a run of TILES tiles of one channel block, and the run's partial sums of dw and dbias;
    grid (runs, channel blocks, b). The partial sums go to part[b, run, :, rows], (K + 1, d)."""
    pid_run, pid_d, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, row_ok, batch = _rows(pid_d, pid_b, dim, length, BLOCK_D)
    bias = _bias(bias_ptr, rows, row_ok, HAS_BIAS)
    # SUMS = K + 1 rounded up to a power of two
    sums = tl.zeros((BLOCK_D, SUMS), tl.float32)
    # the last run's tiles past the end are masked out entirely: no bound to compute. TILES is
    # a compile-time constant: Triton 3.6's interpreter takes no runtime bound in range()
    for i in range(TILES):
        first = (pid_run * TILES + i) * BLOCK_L
        steps = first + tl.arange(0, BLOCK_L)
        offs = batch + rows[:, None] * length + steps[None, :]
        x_ptrs, dout_ptrs, dx_ptrs = x_ptr + offs, dout_ptr + offs, dx_ptr + offs
        if _inside(first, K - 1, K - 1, pid_d, dim, length, BLOCK_D, BLOCK_L):
            sums = _bwd_tile(x_ptrs, dout_ptrs, dx_ptrs, w_ptr, bias, rows, row_ok, steps, length,
                             sums, K, MASKED=False)
        else:
            sums = _bwd_tile(x_ptrs, dout_ptrs, dx_ptrs, w_ptr, bias, rows, row_ok, steps, length,
                             sums, K, MASKED=True)
    n_runs = tl.num_programs(0)
    sum_cols = tl.arange(0, SUMS)[None, :]
    part = part_ptr + ((pid_b * n_runs + pid_run) * (K + 1) + sum_cols) * dim + rows[:, None]
    tl.store(part, sums, mask=row_ok[:, None] & (sum_cols <= K))


# ----------------------------------------------------------------------------------------------
# Host side


def _check_triton_inputs(x, weight, bias) -> tuple[int, int, int, int]:
    """The common checks, then the kernels' own limits; returns (b, d, l, k)."""
    b, d, length, k = check_inputs(x, weight, bias)
    if x.dtype not in FLOATS:
        raise ValueError(f"causal_conv1d_silu (triton): x must be float32, float16 or bfloat16, "
                         f"got {x.dtype}")
    if k > MAX_TAPS:
        raise ValueError(f"causal_conv1d_silu (triton): the kernel width k must be <= {MAX_TAPS}, "
                         f"got weight of shape {tuple(weight.shape)}")
    if d * length >= 2**31:  # offsets within a batch element are int32
        raise ValueError(f"causal_conv1d_silu (triton): d * l must be < 2^31, got {d} * {length}")
    # the Triton interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors, for debugging
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"causal_conv1d_silu (triton) needs CUDA tensors, got x on {x.device}")
    return b, d, length, k


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def conv_forward(x: Tensor, weight: Tensor, bias: Tensor | None,
                 tiles: ConvTiles = DEFAULT_TILES) -> Tensor:
    """x (b, d, l) dense, weight (d, k), bias (d,) or None -> silu(conv) (b, d, l) in x's dtype."""
    b, d, length = x.shape
    w, bias32 = _f32(weight), _f32(bias)
    out = torch.empty_like(x)
    grid = (triton.cdiv(length, tiles.fwd_block_l), triton.cdiv(d, tiles.fwd_block_d), b)
    _conv_silu_fwd_kernel[grid](
        x, w, w if bias32 is None else bias32, out, d, length, K=w.shape[1],
        HAS_BIAS=bias is not None, BLOCK_D=tiles.fwd_block_d, BLOCK_L=tiles.fwd_block_l,
        num_warps=tiles.fwd_warps)
    return out


def conv_backward(x: Tensor, weight: Tensor, bias: Tensor | None, dout: Tensor,
                  tiles: ConvTiles = DEFAULT_TILES) -> tuple[Tensor, Tensor, Tensor | None]:
    """x, dout (b, d, l) dense; weight (d, k); bias (d,) or None -> (dx (b, d, l), dw (d, k),
    dbias (d,) or None), each in its input's dtype."""
    b, d, length = x.shape
    k = weight.shape[1]
    w, bias32 = _f32(weight), _f32(bias)
    dx = torch.empty_like(x)
    n_tiles = triton.cdiv(length, tiles.bwd_block_l)
    n_runs = triton.cdiv(n_tiles, tiles.bwd_tiles_per_program)
    part = torch.empty(b, n_runs, k + 1, d, device=x.device, dtype=torch.float32)
    _conv_silu_bwd_kernel[(n_runs, triton.cdiv(d, tiles.bwd_block_d), b)](
        x, w, w if bias32 is None else bias32, dout, dx, part, d, length, K=k,
        HAS_BIAS=bias is not None, BLOCK_D=tiles.bwd_block_d, BLOCK_L=tiles.bwd_block_l,
        TILES=tiles.bwd_tiles_per_program, SUMS=triton.next_power_of_2(k + 1),
        num_warps=tiles.bwd_warps)
    sums = part.sum((0, 1))  # (k + 1, d)
    dw = sums[:k].T.to(weight.dtype)
    dbias = None if bias is None else sums[k].to(bias.dtype)
    return dx, dw, dbias


class _CausalConv1dSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, tiles):
        ctx.save_for_backward(x, weight, bias)
        ctx.tiles = tiles
        return conv_forward(x, weight, bias, tiles)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias = ctx.saved_tensors
        dx, dw, dbias = conv_backward(x, weight, bias, dout.contiguous(), ctx.tiles)
        return dx, dw, dbias, None


def causal_conv1d_silu_triton(x: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                              tiles: ConvTiles | None = None) -> Tensor:
    """silu(causal depthwise conv1d(x)) on the GPU (module docstring), differentiable in x,
    weight and bias.

    Args:
        x: (b, d, l), float32, float16 or bfloat16; made dense if it is not.
        weight: (d, k), k <= 8, any float dtype. bias: (d,) or None.
        tiles: tile sizes (:class:`ConvTiles`).
    Returns:
        (b, d, l) in x's dtype. Gradients come back in each input's dtype.
    """
    _check_triton_inputs(x, weight, bias)
    return _CausalConv1dSiLU.apply(x.contiguous(), weight, bias, tiles or DEFAULT_TILES)
