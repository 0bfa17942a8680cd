"""adaLN's elementwise work, fused: LayerNorm + modulation, and the gated residual.

Every DiT-style block wraps its mixer and its MLP in::

    h   = LayerNorm(x) * (1 + scale) + shift      (no affine; shift, scale per sample and channel)
    out = x + gate * f(h)

Composed in PyTorch that is three passes over the activations (LayerNorm, multiply, add) and
two, and the backward adds broadcast multiplies and sums over the sequence: in the MM-DiM block
on 16 full 768p frames (61,568 tokens x 1920) PyTorch's broadcast multiply kernel alone took
3.0 ms of the forward and backward's 60 on an H200 (13 launches;
reports/benchmarks/block_gpu_triton_unfused.json). Here each op is one Triton kernel forward and
one backward (that block: 53.8 and 54.3 ms in two runs instead of 57.8, block_gpu_triton.json);
the backward's sums over the sequence are partial sums per run of rows, reduced with
``torch.sum`` (deterministic). On the CPU, and as the reference the kernels are tested against,
the PyTorch composition runs.

Shapes: x, y, out (b, L, d); shift, scale, gate (b, d). Maths in float32; the output has the
inputs' promoted dtype (under autocast the LayerNorm is no longer promoted to float32 alone: its
consumers are projections that cast to the autocast dtype anyway); gradients have their inputs'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# The backward's grid: about this many programs, each a run of rows (a few dozen at the model's
# sizes), whose partial sums are (b, programs / b, d) float32. Fixed runs of 64 rows made 186
# programs at 11,888 tokens: the `small` training step without checkpointing took 85 ms with them
# and 60 with these (H200, medians of 5 that spread over 66-91 and 57-77 ms).
BWD_PROGRAMS = 2048


def layer_norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm(x) (no affine) * (1 + scale) + shift: x (b, L, d); shift, scale (b, d)."""
    if x.is_cuda and x.numel():
        return _LayerNormModulate.apply(x, shift, scale, eps)
    return layer_norm_modulate_torch(x, shift, scale, eps)


def gated_residual(x: Tensor, gate: Tensor, y: Tensor, start: int = 0) -> Tensor:
    """x + gate * y on the rows of x from ``start`` on (the rows y covers); the rows before pass
    through. x (b, L, d); y (b, L - start, d); gate (b, d). A branch that updates only the last
    rows of a joint stream (the video after the text) so updates it in one pass, with neither a
    padded y nor the stream split and joined again."""
    if x.is_cuda and x.numel():
        return _GatedResidual.apply(x, gate, y, start)
    return gated_residual_torch(x, gate, y, start)


def layer_norm_modulate_torch(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6
                              ) -> Tensor:
    h = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)
    return h * (1 + scale[:, None]) + shift[:, None]


def gated_residual_torch(x: Tensor, gate: Tensor, y: Tensor, start: int = 0) -> Tensor:
    if start:
        return torch.cat([x[:, :start], gated_residual_torch(x[:, start:], gate, y)], 1)
    return x + gate[:, None] * y


# ----------------------------------------------------------------------------------------------
# Triton kernels: a program per row forward, per run of rows backward; a row (d) is one tile


@triton.jit
def _row(ptr, batch, pos, stride_b, stride_l, cols, ok):
    """Row ``pos`` of sample ``batch`` of a (b, L, d) tensor with unit channel stride, float32."""
    at = batch.to(tl.int64) * stride_b + pos * stride_l
    return tl.load(ptr + at + cols, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _ln_modulate_fwd_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, mean_ptr, rstd_ptr,
                            length, dim, x_sb, x_sl, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    batch, pos = row // length, row % length
    cols = tl.arange(0, BLOCK_D)
    ok = cols < dim
    x = _row(x_ptr, batch, pos, x_sb, x_sl, cols, ok)
    mean = tl.sum(x, 0) / dim
    xc = tl.where(ok, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / dim + eps)
    shift = tl.load(shift_ptr + batch * dim + cols, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + batch * dim + cols, mask=ok, other=0.0).to(tl.float32)
    out = xc * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + row * dim + cols, out.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _ln_modulate_bwd_kernel(x_ptr, scale_ptr, dout_ptr, mean_ptr, rstd_ptr,
                            dx_ptr, dscale_ptr, dshift_ptr,
                            length, dim, x_sb, x_sl, d_sb, d_sl, rows, BLOCK_D: tl.constexpr):
    """dx = rstd (g - mean(g) - xhat mean(g xhat)) with g = dout (1 + scale); the partial sums of
    dscale = sum_L dout xhat and dshift = sum_L dout over this program's rows."""
    block, batch = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < dim
    w = 1.0 + tl.load(scale_ptr + batch * dim + cols, mask=ok, other=0.0).to(tl.float32)
    dscale = tl.zeros((BLOCK_D,), tl.float32)
    dshift = tl.zeros((BLOCK_D,), tl.float32)
    first = block.to(tl.int64) * rows  # 64-bit row offsets
    for pos in range(first, tl.minimum(first + rows, length)):
        row = batch * length + pos
        x = _row(x_ptr, batch, pos, x_sb, x_sl, cols, ok)
        dout = _row(dout_ptr, batch, pos, d_sb, d_sl, cols, ok)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(ok, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
        g = dout * w
        dx = rstd * (g - (tl.sum(g, 0) + xhat * tl.sum(g * xhat, 0)) / dim)
        tl.store(dx_ptr + row * dim + cols, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        dscale += dout * xhat
        dshift += dout
    part = (batch * tl.num_programs(0) + block).to(tl.int64) * dim + cols
    tl.store(dscale_ptr + part, dscale, mask=ok)
    tl.store(dshift_ptr + part, dshift, mask=ok)


@triton.jit
def _gated_residual_fwd_kernel(x_ptr, gate_ptr, y_ptr, out_ptr, length, dim, start, x_sb, x_sl,
                               y_sb, y_sl, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    batch, pos = row // length, row % length
    cols = tl.arange(0, BLOCK_D)
    ok = cols < dim
    gate = tl.load(gate_ptr + batch * dim + cols, mask=ok, other=0.0).to(tl.float32)
    # rows before ``start`` read y as zeros: x passes through
    out = (_row(x_ptr, batch, pos, x_sb, x_sl, cols, ok)
           + gate * _row(y_ptr, batch, pos - start, y_sb, y_sl, cols, ok & (pos >= start)))
    tl.store(out_ptr + row * dim + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gated_residual_bwd_kernel(dout_ptr, gate_ptr, y_ptr, dy_ptr, dgate_ptr, length, dim, start,
                               d_sb, d_sl, y_sb, y_sl, rows, BLOCK_D: tl.constexpr):
    """dy = gate dout; the partial sum of dgate = sum_L dout y over this program's rows (rows of
    y, ``length`` of them; row ``pos`` of y is row ``start + pos`` of dout)."""
    block, batch = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < dim
    gate = tl.load(gate_ptr + batch * dim + cols, mask=ok, other=0.0).to(tl.float32)
    dgate = tl.zeros((BLOCK_D,), tl.float32)
    first = block.to(tl.int64) * rows  # 64-bit row offsets
    for pos in range(first, tl.minimum(first + rows, length)):
        row = batch * length + pos
        dout = _row(dout_ptr, batch, start + pos, d_sb, d_sl, cols, ok)
        tl.store(dy_ptr + row * dim + cols, (gate * dout).to(dy_ptr.dtype.element_ty),
                 mask=ok)
        dgate += dout * _row(y_ptr, batch, pos, y_sb, y_sl, cols, ok)
    tl.store(dgate_ptr + (batch * tl.num_programs(0) + block).to(tl.int64) * dim + cols, dgate,
             mask=ok)


# ----------------------------------------------------------------------------------------------
# Host side


def _rows_dense(t: Tensor) -> Tensor:
    """t (b, L, d) with unit channel stride (any row and sample strides), copied if need be."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _bwd_grid(b: int, length: int) -> tuple[int, int]:
    """(rows per program, programs per sample) of a backward launch."""
    rows = triton.cdiv(b * length, BWD_PROGRAMS)
    return rows, triton.cdiv(length, rows)


def _launch(d: int) -> dict:
    block = triton.next_power_of_2(d)
    return dict(BLOCK_D=block, num_warps=max(1, min(8, block // 256)))


def _check(x: Tensor, name: str, *per_sample: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be (b, L, d), got shape {tuple(x.shape)}")
    for t in per_sample:
        if tuple(t.shape) != (x.shape[0], x.shape[2]):
            raise ValueError(f"{name}: per-sample vectors must be (b, d) = "
                             f"{(x.shape[0], x.shape[2])}, got {tuple(t.shape)}")


class _LayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        _check(x, "layer_norm_modulate", shift, scale)
        b, length, d = x.shape
        x, shift, scale = _rows_dense(x), shift.contiguous(), scale.contiguous()
        out = torch.empty(b, length, d, device=x.device,
                          dtype=torch.promote_types(x.dtype, torch.result_type(shift, scale)))
        mean = torch.empty(b * length, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _ln_modulate_fwd_kernel[(b * length,)](x, shift, scale, out, mean, rstd, length, d,
                                                x.stride(0), x.stride(1), eps, **_launch(d))
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        x, scale, mean, rstd = ctx.saved_tensors
        b, length, d = x.shape
        dout = _rows_dense(dout)
        rows, blocks = _bwd_grid(b, length)
        dx = torch.empty(b, length, d, device=x.device, dtype=x.dtype)
        dscale = torch.empty(b, blocks, d, device=x.device, dtype=torch.float32)
        dshift = torch.empty_like(dscale)
        _ln_modulate_bwd_kernel[(blocks, b)](
            x, scale, dout, mean, rstd, dx, dscale, dshift, length, d, x.stride(0), x.stride(1),
            dout.stride(0), dout.stride(1), rows, **_launch(d))
        return dx, dshift.sum(1).to(ctx.shift_dtype), dscale.sum(1).to(scale.dtype), None


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y, start):
        _check(x, "gated_residual", gate)
        b, length, d = x.shape
        if not 0 <= start <= length or tuple(y.shape) != (b, length - start, d):
            raise ValueError(f"gated_residual: y must be (b, L - start, d) = "
                             f"{(b, length - start, d)} for x {tuple(x.shape)} and start {start}, "
                             f"got {tuple(y.shape)}")
        x, gate, y = _rows_dense(x), gate.contiguous(), _rows_dense(y)
        out = torch.empty(b, length, d, device=x.device,
                          dtype=torch.promote_types(x.dtype, torch.result_type(gate, y)))
        _gated_residual_fwd_kernel[(b * length,)](x, gate, y, out, length, d, start, x.stride(0),
                                                   x.stride(1), y.stride(0), y.stride(1),
                                                   **_launch(d))
        ctx.save_for_backward(gate, y)
        ctx.x_dtype = x.dtype
        ctx.start = start
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        b, length, d = y.shape
        dout = _rows_dense(dout)
        rows, blocks = _bwd_grid(b, length)
        dy = torch.empty(b, length, d, device=y.device, dtype=y.dtype)
        dgate = torch.empty(b, blocks, d, device=y.device, dtype=torch.float32)
        _gated_residual_bwd_kernel[(blocks, b)](
            dout, gate, y, dy, dgate, length, d, ctx.start, dout.stride(0), dout.stride(1),
            y.stride(0), y.stride(1), rows, **_launch(d))
        return dout.to(ctx.x_dtype), dgate.sum(1).to(gate.dtype), dy, None
