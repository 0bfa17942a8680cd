"""Fused selective scan in Triton, forward and backward, with mamba-ssm's ``selective_scan_fn`` API.

Recurrence (per batch b, channel d, state n; time t)::

    dt_t = softplus(delta_t + delta_bias)      (softplus and bias optional)
    h_t  = exp(dt_t A) h_{t-1} + dt_t u_t B_t   h_{-1} = 0
    y_t  = sum_n C_t h_t + D u_t
    out  = y * silu(z)                          (gating optional)

Layout of the work: one program owns ``BLOCK_D`` channels of one batch row and walks the sequence
in tiles of ``BLOCK_L`` steps. The state of each of the n components is a ``(BLOCK_D,)`` vector
carried in registers from tile to tile; inside a tile the recurrence is a
``tl.associative_scan`` over the pairs (a_t, x_t) = (exp(dt_t A), dt_t u_t B_t), one state
component at a time (a static loop over n), so every thread owns a row segment of consecutive steps
and the scan is mostly sequential inside threads. Loads are bf16/fp16/fp32, maths is fp32; softplus,
the bias, ``D * u`` and the ``silu(z)`` gate are fused.

Backward: the forward saves the state at the start of every backward tile, ``(b, tiles, d, n)``
float32 (1/``bwd_block_l`` of the state trajectory). The backward walks its tiles in reverse;
per tile it recomputes h inside the tile from the saved start state and runs the adjoint recurrence
``g_t = C_t dy_t + a_{t+1} g_{t+1}`` as an associative scan over the time-reversed tile (a_{t+1}
comes from the delta tile loaded one step later). From h and g:

    ddt_t  = u_t sum_n g_t B_t + sum_n A g_t a_t h_{t-1},   with a_t h_{t-1} = h_t - dt_t u_t B_t
    du_t   = dt_t sum_n g_t B_t + D dy_t
    dA     = sum_t dt_t g_t a_t h_{t-1}
    dB_t   = sum_d g_t dt_t u_t,   dC_t = sum_d h_t dy_t

dB and dC are sums over channels that several programs share: every program writes its partial sum
to its own slice of a float32 buffer, reduced afterwards with ``torch.sum`` (deterministic, no
atomics). Unlike mamba-ssm, a gradient flowing into ``last_state`` is propagated.

Speed (b=1, d=3840, n=16, bf16, z+softplus; mamba-ssm 2.3.2 in the same run): on an H200
(reports/benchmarks/scan_gpu.json) the no-grad forward runs at 0.90-0.94x mamba-ssm's speed at
16k-64k (1.70 vs 1.54 ms at 16k), forward+backward at 0.53-0.60x (11.0 vs 6.6 ms); the H100
figures and the tile sweep are in scan_gpu_h100.json. Both are far from the memory floor
(~0.17 ms at 16k): the kernels are latency bound at low occupancy (the backward uses all 255
registers and spills). Known costs: the adjoint's time reversal (``tl.flip``: ~3 shuffles per
element), Triton's cross-lane scan (exclusive shift and per-element prefix), and the cross-warp
reductions for dB and dC.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MAX_STATE = 64  # the state loop is unrolled at compile time


@dataclass(frozen=True)
class ScanKernelConfig:
    """Tiles (steps x channels), warps and register caps of the kernels.

    ``fwd_*`` tile the forward when no gradient is needed. When one is, the forward runs on the
    backward's tiles (``bwd_*``, no register cap) so that it can checkpoint the state where each
    backward tile starts. Defaults: the fastest of a sweep on an H100 at d = 3840, d_state 16,
    bf16, L = 16k (reports/benchmarks/scan_gpu_h100.json, ``sweep_at_16k``): capping the no-grad
    forward at 128 registers raised occupancy and cut it from 2.23 to 1.67 ms; backward tiles
    longer than 64 steps were slower (more lanes along time, more shuffles).
    """

    fwd_block_l: int = 256
    fwd_block_d: int = 4
    fwd_warps: int = 4
    bwd_block_l: int = 64
    bwd_block_d: int = 8
    bwd_warps: int = 2
    fwd_maxnreg: int | None = 128
    bwd_maxnreg: int | None = None

    def __post_init__(self):
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if name.endswith("maxnreg"):
                if v is not None and not 32 <= v <= 255:
                    raise ValueError(f"ScanKernelConfig.{name} must be in [32, 255], got {v}")
            elif v < 1 or v & (v - 1):
                raise ValueError(f"ScanKernelConfig.{name} must be a power of two, got {v}")


DEFAULT_CONFIG = ScanKernelConfig()


# ----------------------------------------------------------------------------------------------
# Triton device functions


@triton.jit
def _affine_combine(a_left, x_left, a_right, x_right):
    """Compose h -> a_left h + x_left, then h -> a_right h + x_right. The reversed scan uses the
    same formula: there 'left' is the part already accumulated from the right end."""
    return a_left * a_right, a_right * x_left + x_right


@triton.jit
def _softplus(x):
    """log(1 + e^x), identity above 20 (the torch / mamba-ssm threshold). log1p(e) for
    e = e^-|x| by Goldberg's correction log(w) * e / (w - 1), w = 1 + e: accurate to a few ulps
    where plain log(1 + e) would lose the digits of a small e."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    log1p_e = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x <= 20.0, tl.maximum(x, 0.0) + log1p_e, x)


@triton.jit
def _load_dt(delta_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Discretisation step (BLOCK_D, BLOCK_L) in fp32, exactly 0 outside the mask (so that padded
    steps neither decay nor feed the state)."""
    dt = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += bias[:, None]
    if SOFTPLUS:
        dt = _softplus(dt)
    return tl.where(mask, dt, 0.0)


@triton.jit
def _column(x, at):
    """x[:, j] of a (BLOCK_D, BLOCK_L) tile; ``at`` (1, BLOCK_L) is True at column j only. A
    select (not a product with a one-hot) so the compiler drops the registers known to be off."""
    return tl.sum(tl.where(at, x, 0.0), axis=1)


# tile counts and the batch size only index: no need for a compile per divisibility class
@triton.jit(do_not_specialize=["n_tiles"])
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, states_ptr,
    dim, length, bc_len, n_tiles,
    N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < dim
    cols = tl.arange(0, BLOCK_L)
    first = (cols == 0)[None, :]
    last = (cols == BLOCK_L - 1)[None, :]
    row_base = (pid_b * dim + rows).to(tl.int64) * length  # (BLOCK_D,) offsets of each row
    bc_base = pid_b.to(tl.int64) * N * bc_len

    # A pre-scaled by log2(e): exp(dt A) = exp2(dt A log2 e)
    A2 = ()
    for n in tl.static_range(N):
        A2 += (tl.load(A_ptr + rows * N + n, mask=row_ok, other=0.0).to(tl.float32) * LOG2E,)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)

    hs = ()
    for _n in tl.static_range(N):
        hs += (tl.zeros((BLOCK_D,), tl.float32),)
    for tile in range(0, n_tiles):
        steps = tile * BLOCK_L + cols
        step_ok = steps < length
        mask = row_ok[:, None] & step_ok[None, :]
        offs = row_base[:, None] + steps[None, :]
        if SAVE_STATES:  # the state entering each tile, for the backward
            st_base = ((pid_b * n_tiles + tile) * dim + rows).to(tl.int64) * N
            for n in tl.static_range(N):
                tl.store(states_ptr + st_base + n, hs[n], mask=row_ok)

        dt = _load_dt(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dtu = dt * u
        y = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
        new_hs = ()
        for n in tl.static_range(N):
            # B, C: fp32, zero-padded to whole tiles (no masks, no conversions)
            Bn = tl.load(B_ptr + bc_base + n * bc_len + steps)
            Cn = tl.load(C_ptr + bc_base + n * bc_len + steps)
            a = tl.exp2(dt * A2[n][:, None])
            x = dtu * Bn[None, :]
            # the carried state enters through the first step: x_0 += a_0 h_in
            x = tl.where(first, x + a * hs[n][:, None], x)
            _, h = tl.associative_scan((a, x), 1, _affine_combine)
            y += h * Cn[None, :]
            new_hs += (_column(h, last),)
        hs = new_hs

        if HAS_D:
            y += u * Dv[:, None]
        if HAS_Z:
            zv = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    last_base = (pid_b * dim + rows).to(tl.int64) * N
    for n in tl.static_range(N):
        tl.store(last_ptr + last_base + n, hs[n], mask=row_ok)


@triton.jit(do_not_specialize=["batch", "n_tiles"])
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    dout_ptr, dlast_ptr, states_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    batch, dim, length, bc_len, n_tiles,
    N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < dim
    cols = tl.arange(0, BLOCK_L)
    first = (cols == 0)[None, :]
    last = (cols == BLOCK_L - 1)[None, :]
    rev = BLOCK_L - 1 - cols
    row_base = (pid_b * dim + rows).to(tl.int64) * length
    bc_base = pid_b.to(tl.int64) * N * bc_len
    # this program's slice of the (d-blocks, b, n, l) partial sums of dB and dC
    part_base = (pid_d * batch + pid_b).to(tl.int64) * N * length

    A2 = ()
    for n in tl.static_range(N):
        A2 += (tl.load(A_ptr + rows * N + n, mask=row_ok, other=0.0).to(tl.float32) * LOG2E,)
    bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    Dv = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)

    last_base = (pid_b * dim + rows).to(tl.int64) * N
    gs = ()  # adjoint state entering each tile from the right: g at the tile's end + 1
    for n in tl.static_range(N):
        if HAS_DLAST:
            gs += (tl.load(dlast_ptr + last_base + n, mask=row_ok, other=0.0).to(tl.float32),)
        else:
            gs += (tl.zeros((BLOCK_D,), tl.float32),)
    dA_acc = ()
    for _n in tl.static_range(N):
        dA_acc += (tl.zeros((BLOCK_D,), tl.float32),)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)

    for it in range(0, n_tiles):
        tile = n_tiles - 1 - it
        steps = tile * BLOCK_L + cols
        step_ok = steps < length
        mask = row_ok[:, None] & step_ok[None, :]
        offs = row_base[:, None] + steps[None, :]
        next_mask = row_ok[:, None] & (steps + 1 < length)[None, :]

        raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            raw += bias[:, None]
        dt = raw
        if SOFTPLUS:
            dt = _softplus(raw)
        dt = tl.where(mask, dt, 0.0)
        # a_{t+1} needs the step after t: the same tile read one step later
        dt_next = _load_dt(delta_ptr, offs + 1, next_mask, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            z_sig = tl.sigmoid(zv)
            dy = dout * zv * z_sig
        else:
            dy = dout
        dtu = dt * u
        dt_next_rev = tl.flip(dt_next, 1)
        dy_rev = tl.flip(dy, 1)

        st_base = ((pid_b * n_tiles + tile) * dim + rows).to(tl.int64) * N
        y = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
        gB = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)  # sum_n g B
        gAh = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)  # sum_n A g a h_{t-1}
        new_gs = ()
        new_dA = ()
        for n in tl.static_range(N):
            Bn = tl.load(B_ptr + bc_base + n * bc_len + steps)[None, :]
            Cn = tl.load(C_ptr + bc_base + n * bc_len + steps)[None, :]
            h0 = tl.load(states_ptr + st_base + n, mask=row_ok, other=0.0)
            # forward states inside the tile
            x = dtu * Bn
            a = tl.exp2(dt * A2[n][:, None])
            _, h = tl.associative_scan((a, tl.where(first, x + a * h0[:, None], x)), 1,
                                       _affine_combine)
            if HAS_Z:
                y += h * Cn
            # adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}
            # adjoint in time-reversed order, where it is a forward scan: Triton's reversed scan
            # flips every operand and result through shuffles, one flip of g is cheaper
            a_next = tl.exp2(dt_next_rev * A2[n][:, None])
            c = dy_rev * tl.load(C_ptr + bc_base + n * bc_len + tile * BLOCK_L + rev)[None, :]
            # the adjoint entering from the right joins at the tile's last step: register 0
            c = tl.where(first, c + a_next * gs[n][:, None], c)
            _, g = tl.associative_scan((a_next, c), 1, _affine_combine)
            new_gs += (_column(g, last),)  # g at the tile's first step
            g = tl.flip(g, 1)

            gah = g * (h - x)  # g_t a_t h_{t-1}
            gAh += gah * (A2[n] * LN2)[:, None]
            new_dA += (dA_acc[n] + tl.sum(gah * dt, axis=1),)
            gB += g * Bn
            tl.store(dB_ptr + part_base + n * length + steps, tl.sum(g * dtu, axis=0), mask=step_ok)
            tl.store(dC_ptr + part_base + n * length + steps, tl.sum(h * dy, axis=0), mask=step_ok)
        gs = new_gs
        dA_acc = new_dA

        du = dt * gB
        ddt = gAh + u * gB
        if HAS_D:
            du += Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        if HAS_Z:
            if HAS_D:
                y += u * Dv[:, None]
            dz = dout * y * z_sig * (1.0 + zv * (1.0 - z_sig))
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if SOFTPLUS:
            ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
        ddt = tl.where(mask, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)

    # per-batch partial sums of the parameter gradients: (b, d, n) and (b, d)
    for n in tl.static_range(N):
        tl.store(dA_ptr + last_base + n, dA_acc[n], mask=row_ok)
    vec_base = pid_b * dim + rows
    if HAS_D:
        tl.store(dD_ptr + vec_base, dD_acc, mask=row_ok)
    if HAS_BIAS:
        tl.store(dbias_ptr + vec_base, dbias_acc, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Host side


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> tuple[int, int, int, int]:
    """Validate shapes/dtypes/devices; return (b, d, l, n)."""
    floats = (torch.float32, torch.float16, torch.bfloat16)
    named = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in floats:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}")
    if u.dim() != 3:
        raise ValueError(f"u must be (b, d, l), got shape {tuple(u.shape)}")
    b, d, length = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d, n) = ({d}, n), got shape {tuple(A.shape)}")
    n = A.shape[1]
    if not 1 <= n <= MAX_STATE:
        raise ValueError(f"A's state size n must be in [1, {MAX_STATE}], got {n}")
    expect = {"delta": (b, d, length), "B": (b, n, length), "C": (b, n, length),
              "z": (b, d, length),
              "D": (d,), "delta_bias": (d,)}
    for name, shape in expect.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if length < 1:
        raise ValueError(f"sequence length must be >= 1, got {length}")
    # the Triton interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors, for debugging
    if u.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the triton scan needs CUDA tensors, got u on {u.device}")
    return b, d, length, n


def _padded_f32(t: Tensor, length: int) -> Tensor:
    """(b, n, l) -> (b, n, length) float32, zero beyond l: the kernels read whole tiles of B and
    C unmasked and unconverted (B, C are d times smaller than u, so this copy is cheap)."""
    out = t.new_zeros(*t.shape[:-1], length, dtype=torch.float32)
    out[..., : t.shape[-1]] = t
    return out


def _optional(t: Tensor | None, fallback: Tensor) -> Tensor:
    """Kernels take a pointer even for absent inputs (never dereferenced)."""
    return t.contiguous() if t is not None else fallback


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_states,
                 config: ScanKernelConfig = DEFAULT_CONFIG):
    """Launch the forward kernel. Returns (out (b, d, l) in u's dtype, last_state (b, d, n) fp32,
    states (b, backward tiles, d, n) fp32 or None)."""
    (b, d, length), n = u.shape, A.shape[1]
    u, delta, A = (t.contiguous() for t in (u, delta, A))
    # with a gradient to come, the backward's tiles: the states saved are where its tiles start
    block_l, block_d, warps, maxnreg = (
        (config.bwd_block_l, config.bwd_block_d, config.bwd_warps, config.bwd_maxnreg)
        if save_states else
        (config.fwd_block_l, config.fwd_block_d, config.fwd_warps, config.fwd_maxnreg))
    n_tiles = triton.cdiv(length, block_l)
    bc_len = n_tiles * block_l
    B, C = _padded_f32(B, bc_len), _padded_f32(C, bc_len)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = torch.empty(b, d, n, device=u.device, dtype=torch.float32)
    states = (torch.empty(b, n_tiles, d, n, device=u.device, dtype=torch.float32)
              if save_states else last)
    _scan_fwd_kernel[(triton.cdiv(d, block_d), b)](
        u, delta, A, B, C, _optional(D, u), _optional(z, u), _optional(delta_bias, u),
        out, last, states,
        d, length, bc_len, n_tiles,
        N=n, BLOCK_D=block_d, BLOCK_L=block_l,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), SAVE_STATES=save_states,
        num_warps=warps, maxnreg=maxnreg,
    )
    return out, last, (states if save_states else None)


def scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, states, dout, dlast,
                  config: ScanKernelConfig = DEFAULT_CONFIG):
    """Launch the backward kernel. Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each in
    its input's dtype (None for absent optional inputs)."""
    (b, d, length), n = u.shape, A.shape[1]
    u, delta, A, dout = (t.contiguous() for t in (u, delta, A, dout))
    n_tiles = triton.cdiv(length, config.bwd_block_l)
    bc_len = n_tiles * config.bwd_block_l
    B32, C32 = _padded_f32(B, bc_len), _padded_f32(C, bc_len)
    if states.shape[1] != n_tiles:
        raise ValueError(f"saved states hold {states.shape[1]} tiles, expected {n_tiles}")
    d_blocks = triton.cdiv(d, config.bwd_block_d)
    f32 = dict(device=u.device, dtype=torch.float32)
    # The kernel writes row-major (b, d, l). empty_like would copy a non-dense input's stride
    # order (the model's z is a transposed half of in_proj's output), scrambling dz.
    dense = dict(memory_format=torch.contiguous_format)
    du = torch.empty_like(u, **dense)
    ddelta = torch.empty_like(delta, **dense)
    dz = torch.empty_like(z, **dense) if z is not None else None
    dA_part = torch.empty(b, d, n, **f32)
    dD_part = torch.empty(b, d, **f32) if D is not None else None
    dbias_part = torch.empty(b, d, **f32) if delta_bias is not None else None
    dB_part = torch.empty(d_blocks, b, n, length, **f32)
    dC_part = torch.empty(d_blocks, b, n, length, **f32)
    _scan_bwd_kernel[(d_blocks, b)](
        u, delta, A, B32, C32, _optional(D, u), _optional(z, u), _optional(delta_bias, u),
        dout, _optional(dlast, states), states,
        du, ddelta, _optional(dz, du), dA_part, _optional(dD_part, dA_part),
        _optional(dbias_part, dA_part), dB_part, dC_part,
        b, d, length, bc_len, n_tiles,
        N=n, BLOCK_D=config.bwd_block_d, BLOCK_L=config.bwd_block_l,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=bool(delta_softplus), HAS_DLAST=dlast is not None,
        num_warps=config.bwd_warps, maxnreg=config.bwd_maxnreg,
    )
    dA = dA_part.sum(0).to(A.dtype)
    dB = dB_part.sum(0).to(B.dtype)
    dC = dC_part.sum(0).to(C.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, dz, dbias


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                config, save):
        out, last, states = scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                         save_states=save, config=config)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.delta_softplus = delta_softplus
            ctx.config = config
        if not return_last_state:
            return out
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast=None):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        grads = scan_backward(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, states,
                              dout, None if dlast is None else dlast.contiguous(),
                              config=ctx.config)
        return (*grads, None, None, None, None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False, *,
                          config: ScanKernelConfig | None = None):
    """Selective scan on the GPU, differentiable in every tensor input.

    Args:
        u, delta: (b, d, l); float32, float16 or bfloat16.
        A: (d, n), n <= 64. B, C: (b, n, l). D, delta_bias: (d,). z: (b, d, l).
        delta_softplus: apply softplus (threshold 20) to ``delta + delta_bias``.
        return_last_state: also return the state after the last step.
        config: tile sizes (:class:`ScanKernelConfig`); the default suits d_state 16 on H100.
    Returns:
        out (b, d, l) in u's dtype, and with ``return_last_state`` the last state (b, d, n) in
        float32 (mamba-ssm's conventions). Gradients come back in each input's dtype.
    """
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    # forward() runs with grad mode off: decide here whether the backward's checkpoints are needed
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return _SelectiveScanTriton.apply(*tensors, bool(delta_softplus), bool(return_last_state),
                                      config or DEFAULT_CONFIG, save)
