"""Fused selective scan in Triton, forward and backward, with mamba-ssm's ``selective_scan_fn`` API.

Recurrence (per batch b, channel d, state n; time t)::

    dt_t = softplus(delta_t + delta_bias)      (softplus and bias optional)
    h_t  = exp(dt_t A) h_{t-1} + dt_t u_t B_t   h_{-1} = 0
    y_t  = sum_n C_t h_t + D u_t
    out  = y * silu(z)                          (gating optional)

Layout of the work. A tile is ``BLOCK_D`` channels x ``BLOCK_L`` steps with one thread per channel:
with ``BLOCK_L`` <= 8 bf16 steps (at most 16 bytes, one vector load) the whole tile row sits in the
thread's registers, so the scans along time are sequential register code, with no shuffles and no
shared memory. A program walks the tiles of one *chunk* of the sequence, carrying the n state
components as ``(BLOCK_D,)`` vectors. One thread per channel alone would leave the GPU nearly idle
(d = 3840 is 120 warps), so the sequence is cut into chunks scanned in parallel, in three steps
(the classic parallel scan over chunks):

1. ``_fwd_chunk_state_kernel``: every chunk but the last, from a zero state: its end state and
   the sum of its steps (its total decay is exp(A sum dt));
2. each program of the main kernel folds the summaries of the chunks before its own into its
   start state (a few dozen steps of the same recurrence);
3. ``_scan_fwd_kernel``: the scan proper, writing ``out``.

Chunks before the last are scanned twice: the price of parallelism, chosen (``*_programs_per_sm``)
so that the GPU is full and no more. Loads are bf16/fp16/fp32, maths is fp32; softplus, the bias,
``D * u`` and the ``silu(z)`` gate are fused.

Backward: with a gradient to come, the forward saves the state entering every tile of the
backward, float32 (8 bytes per input element at 8-step tiles and n = 16).
The adjoint ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` runs backwards in time, with the same three
steps mirrored: ``_bwd_chunk_adjoint_kernel`` summarises every chunk but the first (the adjoint it
sends to the chunk before, ``a_{t0} g_{t0}``, from a zero start), each program folds the chunks
after its own, and ``_scan_bwd_kernel`` walks its chunk's tiles in reverse: per tile it recomputes
h from the saved state and runs the adjoint backwards over the tile's columns (a_{t+1} is the next
column's a; past the tile's end it is folded into what the tile after sent). From h and g:

    ddt_t  = u_t sum_n g_t B_t + sum_n A g_t a_t h_{t-1},   with a_t h_{t-1} = h_t - dt_t u_t B_t
    du_t   = dt_t sum_n g_t B_t + D dy_t
    dA     = sum_t dt_t g_t a_t h_{t-1}
    dB_t   = sum_d g_t dt_t u_t,   dC_t = sum_d h_t dy_t

dB and dC are sums over channels that several programs share, dA, dD and the bias gradient sums
over time that several chunks share: every program writes its partial sums to its own slice of a
float32 buffer, reduced afterwards with ``torch.sum`` (deterministic, no atomics); the sums over
a tile's channels are a reduce-scatter across the warp (``_column_sums``). Unlike
mamba-ssm, a gradient flowing into ``last_state`` is propagated.

Speed: ``benchmarks/scan_gpu.py`` against mamba-ssm in the same run; the figures are in
reports/benchmarks/scan_gpu.json and the README.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MAX_STATE = 64  # the state loop is unrolled at compile time
STATE_BLOCK = tl.constexpr(32)  # channels per block of the state buffers' layout (_state_start)


@dataclass(frozen=True)
class ScanKernelConfig:
    """Tiles, warps, register caps and chunking of the kernels, per pass.

    ``fwd_*`` set the forward, ``bwd_*`` the backward; under autograd the forward saves one state
    per ``bwd_block_l`` steps for it, on tiles of at most that many steps. ``*_block_l`` steps
    per tile; ``*_block_d`` channels per program, one per thread when it equals 32 x
    ``*_warps`` (``bwd_block_d`` >= ``bwd_block_l``: each channel row ends up holding one
    column's sum in ``_column_sums``); ``*_programs_per_sm``: the sequence is cut into as many
    chunks as it takes to give every streaming multiprocessor about this many programs (fewer
    chunks when the batch and the channels already do). Defaults, on an H200 at d = 3840,
    d_state 16, bf16: tiles of 4 forward steps and 8 backward ones, the fastest of a sweep at 16k
    (``benchmarks/scan_gpu.py --sweep``; reports/benchmarks/scan_gpu_sweep.json). 23 forward
    programs per SM make 26 chunks: 3,120 programs, two waves of the 12 that fit on each of the
    132 multiprocessors at 168 registers (nearly three of the 8 that fit at 186, before B and C
    stayed bf16). 32 made 36 chunks, 4.09 waves at 186 registers: 7.5-8.5% slower than 23 at 16k
    and 64k (reports/benchmarks/scan_ab_gpu_bc_layout.json). Choose the chunking in whole waves.
    """

    fwd_block_l: int = 4
    fwd_block_d: int = 32
    fwd_warps: int = 1
    fwd_programs_per_sm: int = 23
    fwd_maxnreg: int | None = None
    bwd_block_l: int = 8
    bwd_block_d: int = 32
    bwd_warps: int = 1
    bwd_programs_per_sm: int = 64
    bwd_maxnreg: int | None = None

    def __post_init__(self):
        for name in self.__dataclass_fields__:
            v = getattr(self, name)
            if name.endswith("maxnreg"):
                if v is not None and not 32 <= v <= 255:
                    raise ValueError(f"ScanKernelConfig.{name} must be in [32, 255], got {v}")
            elif name.endswith("programs_per_sm"):
                if v < 1:
                    raise ValueError(f"ScanKernelConfig.{name} must be >= 1, got {v}")
            elif v < 1 or v & (v - 1):
                raise ValueError(f"ScanKernelConfig.{name} must be a power of two, got {v}")
        if self.bwd_block_d < self.bwd_block_l:
            raise ValueError(f"ScanKernelConfig.bwd_block_d ({self.bwd_block_d}) must be >= "
                             f"bwd_block_l ({self.bwd_block_l})")

    def tiles(self, grad: bool) -> tuple[int, int, int, int, int | None]:
        """(block_l, block_d, warps, programs_per_sm, maxnreg) of the forward or, with
        ``grad``, of the backward."""
        p = "bwd" if grad else "fwd"
        return tuple(getattr(self, f"{p}_{k}") for k in
                     ("block_l", "block_d", "warps", "programs_per_sm", "maxnreg"))


DEFAULT_CONFIG = ScanKernelConfig()


def chunk_tiles(n_tiles: int, row_programs: int, target_programs: int) -> int:
    """Tiles per chunk so that ``row_programs`` (batch x channel blocks) times the number of
    chunks reaches ``target_programs``; at least one tile, at most the whole sequence."""
    chunks = max(1, min(n_tiles, -(-target_programs // row_programs)))
    return -(-n_tiles // chunks)


# ----------------------------------------------------------------------------------------------
# Triton device functions


@triton.jit
def _then(a_first, x_first, a_second, x_second):
    """The affine maps h -> a h + x of two steps, applied in time order: first, then second."""
    return a_first * a_second, a_second * x_first + x_second


@triton.jit
def _carried_scan(a, x, carry):
    """h_t = a_t h_{t-1} + x_t along a (BLOCK_D, BLOCK_L) tile, with the (BLOCK_D,) state carried
    in from the previous tile entering through the first step (x_0 += a_0 carry)."""
    first = tl.arange(0, x.shape[1])[None, :] == 0
    _, h = tl.associative_scan((a, tl.where(first, x + a * carry[:, None], x)), 1, _then)
    return h


@triton.jit
def _halves(x):
    """The first and the second half of the columns of x (R, W), each (R, W / 2)."""
    return x.reshape(x.shape[0], 2, x.shape[1] // 2).permute(0, 2, 1).split()


@triton.jit
def _columns(x):
    """The W columns (R,) of x (R, W), W a power of two, as a tuple in order; register moves
    only, when a thread holds whole rows."""
    R: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    cols = (x,)
    for j in tl.static_range(8):
        if (W >> j) > 1:
            halves = ()
            for k in tl.static_range(1 << j):
                halves += _halves(cols[k])
            cols = halves
    out = ()
    for k in tl.static_range(W):
        out += (cols[k].reshape(R),)
    return out


@triton.jit
def _from_columns(cols):
    """The tile (R, W) of a tuple of W columns (R,): the inverse of ``_columns``.

    Joined in bit-reversed pairs (column k with k + W / 2, then those pairs likewise, ...): each
    join adds the innermost axis, so the tile's registers come out in column order, the layout
    of a tile loaded from memory. Joined in order and permuted, they came out bit-reversed, and
    for ``g * B`` the backward loaded every B tile a second time in that order, as 8 two-byte
    loads (128 of its 219 loads; reports/benchmarks/scan_ncu_bwd_e5cb00f.txt). Removing them
    took 5% of its instructions but no measurable time (3.55 against 3.56 ms at 16k, H200)."""
    R: tl.constexpr = cols[0].shape[0]
    parts = ()
    for k in tl.static_range(len(cols)):
        parts += (cols[k].reshape(R, 1),)
    for _halvings in tl.static_range(8):
        if len(parts) > 1:
            pairs = ()
            for k in tl.static_range(len(parts) // 2):
                joined = tl.join(parts[k], parts[k + len(parts) // 2])
                pairs += (joined.reshape(R, 2 * parts[0].shape[1]),)
            parts = pairs
    return parts[0]


@triton.jit
def _adjoint_scan(a, c, q):
    """g_t = c_t + a_{t+1} g_{t+1} backwards along a (BLOCK_D, BLOCK_L) tile, with q (BLOCK_D,),
    a g at the step after the tile, entering through the last step. Returns g and a_0 g_0, what
    the tile sends to the one before. A loop over the columns: Triton lowers a reversed
    ``associative_scan`` with lane shuffles even when the whole row lies in one thread."""
    a_cols = _columns(a)
    c_cols = _columns(c)
    W: tl.constexpr = len(c_cols)
    g = c_cols[W - 1] + q
    g_cols = (g,)
    for k in tl.static_range(W - 1):
        g = c_cols[W - 2 - k] + a_cols[W - 1 - k] * g
        g_cols = (g,) + g_cols
    return _from_columns(g_cols), a_cols[0] * g


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
def _load_dy(dout_ptr, z_ptr, offs, mask, HAS_Z: tl.constexpr):
    """Gradient reaching y: dout, times silu(z) with gating. Returns (dout, z, dy) in fp32 (z is
    dout again without gating)."""
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    zv = dout
    dy = dout
    if HAS_Z:
        zv = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = dout * zv * tl.sigmoid(zv)
    return dout, zv, dy


@triton.jit
def _row_vector(ptr, rows, row_ok, PRESENT: tl.constexpr):
    """(BLOCK_D,) float32 per-channel parameter, zeros when absent."""
    if PRESENT:
        return tl.load(ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    return tl.zeros(rows.shape, tl.float32)


@triton.jit
def _scaled_A(A_ptr, rows, row_ok, N: tl.constexpr):
    """A (d, n) as n vectors (BLOCK_D,) pre-scaled by log2(e): exp(dt A) = exp2(dt A log2 e)."""
    A2 = ()
    for n in tl.static_range(N):
        A2 += (tl.load(A_ptr + rows * N + n, mask=row_ok, other=0.0).to(tl.float32) * LOG2E,)
    return A2


@triton.jit
def _zeros_state(rows, N: tl.constexpr):
    hs = ()
    for _n in tl.static_range(N):
        hs += (tl.zeros(rows.shape, tl.float32),)
    return hs


@triton.jit
def _program_tile(pid_d, pid_b, dim, length, n_tiles, N: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_L: tl.constexpr):
    """What every kernel knows of its program: its channels ``rows`` (BLOCK_D,) and which exist,
    the tile's columns (BLOCK_L,), the offset of each row in (b, d, l) inputs and of the batch row
    in the (b, n, tiles x BLOCK_L) copies of B and C."""
    rows = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_L)
    return (rows, rows < dim, cols, (pid_b * dim + rows).to(tl.int64) * length,
            pid_b.to(tl.int64) * n_tiles * (N * BLOCK_L))


@triton.jit
def _bc_tile(ptr, bc_base, tile, n, cols, n_tiles, BLOCK_L: tl.constexpr):
    """B or C (BLOCK_L,) of state n at ``tile`` in float32, from its (b, n, tiles x BLOCK_L)
    copy in the input's dtype.

    Every thread holds the tile's B and C (they are the same for all channels of a program), and
    ptxas issues the loads of several states ahead: they take most of the forward's registers.
    Kept in bf16 until used (two per register), the forward needs 168 registers (ptxas, sm_90a)
    rather than 186: 3 warps per scheduler rather than 2. Copies laid out (b, tiles, n, BLOCK_L),
    every state at a constant offset from the tile's start, brought it to 80, but ptxas then issued
    each load right before its use and the forward waited on them: 1.15-1.42x slower with bf16
    copies, 1.4-1.6x with float32 ones (H200, 16k and 64k steps); L1 prefetches of the next tile
    (``prefetch.global.L1``, ``CCTL.E.PF1``) made that layout 1.5-1.8x slower still
    (reports/benchmarks/scan_ab_gpu_bc_layout.json). float32 copies for the chunk-summary and
    backward kernels alone take 7-11% of their instructions (the widening) but were 3% slower
    forward+backward (scan_gpu_bc32.json)."""
    return tl.load(ptr + bc_base + n * (n_tiles * BLOCK_L) + tile * BLOCK_L + cols).to(tl.float32)


@triton.jit
def _state_start(ptr, at, dim, rows, N: tl.constexpr):
    """Where component 0 of each row's state ``at`` lies in a state buffer laid out
    (..., blocks, n, STATE_BLOCK): a warp's channels side by side (coalesced) and component n at
    the constant offset n STATE_BLOCK. Stored (n, d), the compiler kept a pointer per component
    across the tile loop, in registers it then spilled; stored (d, n), a warp's accesses were
    64 bytes apart."""
    blocks = (dim + STATE_BLOCK - 1) // STATE_BLOCK
    return (ptr + (at.to(tl.int64) * blocks + rows // STATE_BLOCK) * (N * STATE_BLOCK)
            + rows % STATE_BLOCK)


@triton.jit
def _load_state(ptr, at, dim, rows, row_ok, N: tl.constexpr):
    """State ``at`` of a state buffer (see ``_state_start``) as a tuple of n vectors (BLOCK_D,)."""
    start = _state_start(ptr, at, dim, rows, N)
    hs = ()
    for n in tl.static_range(N):
        hs += (tl.load(start + n * STATE_BLOCK, mask=row_ok, other=0.0),)
    return hs


@triton.jit
def _store_state(ptr, at, hs, dim, rows, row_ok, N: tl.constexpr):
    """The n vectors (BLOCK_D,) of hs into state ``at`` of a state buffer."""
    start = _state_start(ptr, at, dim, rows, N)
    for n in tl.static_range(N):
        tl.store(start + n * STATE_BLOCK, hs[n], mask=row_ok)


@triton.jit
def _fold_chunks(carry, A2, dtsum_ptr, local_ptr, pid_b, n_chunks, dim, rows, row_ok,
                 first, count, step, N: tl.constexpr):
    """carry <- exp(A S_j) carry + local_j for chunks j = first, first + step, ... (count of
    them): the chunk summaries (S_j the sum of chunk j's steps) applied in scan order."""
    for i in range(0, count):
        at = pid_b * n_chunks + first + i * step
        s = tl.load(dtsum_ptr + at.to(tl.int64) * dim + rows, mask=row_ok, other=0.0)
        loc = _load_state(local_ptr, at, dim, rows, row_ok, N)
        new = ()
        for n in tl.static_range(N):
            new += (tl.exp2(A2[n] * s) * carry[n] + loc[n],)
        carry = new
    return carry


@triton.jit
def _store_summary(local_ptr, dtsum_ptr, at, carry, dtsum, dim, rows, row_ok, N: tl.constexpr):
    """A chunk's summary at ``at`` = (batch, chunk): its carried state and its sum of steps."""
    _store_state(local_ptr, at, carry, dim, rows, row_ok, N)
    tl.store(dtsum_ptr + at.to(tl.int64) * dim + rows, dtsum, mask=row_ok)


@triton.jit
def _swap_rows(x, M: tl.constexpr):
    """x (R, W) float32 with rows r and r ^ M exchanged, exactly (a bitwise xor-sum over each
    pair). With rows on the lanes of a warp this is one shuffle per register."""
    R: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    y = x.to(tl.int32, bitcast=True).reshape(R // (2 * M), 2, M, W)
    y = y ^ tl.xor_sum(y, 1, keep_dims=True)
    return y.reshape(R, W).to(tl.float32, bitcast=True)


@triton.jit
def _column_sums(x):
    """Sums over the rows of x (R, W), R >= W powers of two, scattered: row r holds the sum of
    column r // (R / W). A reduce-scatter: each halving of the columns sends the partner row only
    the half it gives away, (W - 1) + log2(R / W) shuffles in all where ``tl.sum(x, 0)`` takes
    W log2(R) (the backward's dB and dC were bound by those shuffles)."""
    R: tl.constexpr = x.shape[0]
    W: tl.constexpr = x.shape[1]
    rows = tl.arange(0, R)[:, None]
    for j in tl.static_range(8):
        if (W >> j) > 1:
            lo, hi = _halves(x)
            upper = (rows & (R >> (j + 1))) != 0
            x = tl.where(upper, hi, lo) + _swap_rows(tl.where(upper, lo, hi), R >> (j + 1))
    for j in tl.static_range(8):
        if (R >> j) > W:
            x += _swap_rows(x, (R // W) >> (j + 1))
    return tl.sum(x, axis=1)


# chunk and tile counts and the batch size only index: no compile per divisibility class
_RUNTIME_INTS = ["batch", "chunk_tiles", "n_tiles", "n_chunks"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _fwd_chunk_state_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, hloc_ptr, dtsum_ptr,
    batch, dim, length, chunk_tiles, n_tiles, n_chunks,
    N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Chunk ``pid_c`` (all but the last) from a zero state: its end state and sum of steps."""
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, row_ok, cols, row_base, bc_base = _program_tile(
        pid_d, pid_b, dim, length, n_tiles, N, BLOCK_D, BLOCK_L)
    A2 = _scaled_A(A_ptr, rows, row_ok, N)
    bias = _row_vector(bias_ptr, rows, row_ok, HAS_BIAS)

    hs = _zeros_state(rows, N)
    dtsum = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(0, chunk_tiles):
        tile = pid_c * chunk_tiles + i
        steps = tile * BLOCK_L + cols
        mask = row_ok[:, None] & (steps < length)[None, :]
        offs = row_base[:, None] + steps[None, :]
        dt = _load_dt(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
        dtu = dt * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dtsum += tl.sum(dt, axis=1)
        new = ()
        for n in tl.static_range(N):
            # a scan, not a reduction: Triton's cross-lane reductions may reorder the steps
            Bn = _bc_tile(B_ptr, bc_base, tile, n, cols, n_tiles, BLOCK_L)
            h = _carried_scan(tl.exp2(dt * A2[n][:, None]), dtu * Bn[None, :], hs[n])
            new += (_columns(h)[BLOCK_L - 1],)
        hs = new
    _store_summary(hloc_ptr, dtsum_ptr, pid_b * n_chunks + pid_c, hs, dtsum, dim, rows, row_ok, N)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, states_ptr, hloc_ptr, dtsum_ptr,
    batch, dim, length, chunk_tiles, n_tiles, n_chunks,
    N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_STATES: tl.constexpr, SAVE_EVERY: tl.constexpr,
):
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, row_ok, cols, row_base, bc_base = _program_tile(
        pid_d, pid_b, dim, length, n_tiles, N, BLOCK_D, BLOCK_L)
    A2 = _scaled_A(A_ptr, rows, row_ok, N)
    bias = _row_vector(bias_ptr, rows, row_ok, HAS_BIAS)
    Dv = _row_vector(D_ptr, rows, row_ok, HAS_D)

    hs = _fold_chunks(_zeros_state(rows, N), A2, dtsum_ptr, hloc_ptr, pid_b, n_chunks, dim,
                      rows, row_ok, 0, pid_c, 1, N)
    n_saved = (n_tiles + SAVE_EVERY - 1) // SAVE_EVERY
    first_tile = pid_c * chunk_tiles
    for i in range(0, tl.minimum(chunk_tiles, n_tiles - first_tile)):
        tile = first_tile + i
        steps = tile * BLOCK_L + cols
        mask = row_ok[:, None] & (steps < length)[None, :]
        offs = row_base[:, None] + steps[None, :]
        if SAVE_STATES and tile % SAVE_EVERY == 0:  # the state entering each backward tile
            _store_state(states_ptr, pid_b * n_saved + tile // SAVE_EVERY, hs, dim, rows,
                         row_ok, N)

        dt = _load_dt(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dtu = dt * u
        y = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
        new = ()
        for n in tl.static_range(N):
            # B, C: fp32, zero-padded to whole tiles (no masks, no conversions)
            Bn = _bc_tile(B_ptr, bc_base, tile, n, cols, n_tiles, BLOCK_L)
            Cn = _bc_tile(C_ptr, bc_base, tile, n, cols, n_tiles, BLOCK_L)
            h = _carried_scan(tl.exp2(dt * A2[n][:, None]), dtu * Bn[None, :], hs[n])
            y += h * Cn[None, :]
            new += (_columns(h)[BLOCK_L - 1],)
        hs = new

        if HAS_D:
            y += u * Dv[:, None]
        if HAS_Z:
            zv = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    if pid_c == n_chunks - 1:
        _store_state(last_ptr, pid_b, hs, dim, rows, row_ok, N)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _bwd_chunk_adjoint_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, qloc_ptr, dtsum_ptr,
    batch, dim, length, chunk_tiles, n_tiles, n_chunks,
    N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):
    """Chunk ``pid_c + 1`` (all but the first) with no adjoint entering from its right: what it
    sends to the chunk before, q = a_{t0} g_{t0} at its first step t0, and its sum of steps.
    Backwards, q_{t-1} = a_t (C_t dy_t + q_t): one exp per step, like the forward."""
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1) + 1, tl.program_id(2)
    rows, row_ok, cols, row_base, bc_base = _program_tile(
        pid_d, pid_b, dim, length, n_tiles, N, BLOCK_D, BLOCK_L)
    A2 = _scaled_A(A_ptr, rows, row_ok, N)
    bias = _row_vector(bias_ptr, rows, row_ok, HAS_BIAS)

    qs = _zeros_state(rows, N)
    dtsum = tl.zeros((BLOCK_D,), tl.float32)
    first_tile = pid_c * chunk_tiles
    tiles = tl.minimum(chunk_tiles, n_tiles - first_tile)
    for i in range(0, tiles):
        tile = first_tile + tiles - 1 - i
        steps = tile * BLOCK_L + cols
        mask = row_ok[:, None] & (steps < length)[None, :]
        offs = row_base[:, None] + steps[None, :]
        dt = _load_dt(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
        _, _, dy = _load_dy(dout_ptr, z_ptr, offs, mask, HAS_Z)
        dtsum += tl.sum(dt, axis=1)
        new = ()
        for n in tl.static_range(N):
            Cn = _bc_tile(C_ptr, bc_base, tile, n, cols, n_tiles, BLOCK_L)
            _, q = _adjoint_scan(tl.exp2(dt * A2[n][:, None]), dy * Cn[None, :], qs[n])
            new += (q,)
        qs = new
    _store_summary(qloc_ptr, dtsum_ptr, pid_b * n_chunks + pid_c, qs, dtsum, dim, rows, row_ok, N)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    dout_ptr, dlast_ptr, states_ptr, qloc_ptr, dtsum_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    batch, dim, length, chunk_tiles, n_tiles, n_chunks,
    N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr,
):
    pid_d, pid_c, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows, row_ok, cols, row_base, bc_base = _program_tile(
        pid_d, pid_b, dim, length, n_tiles, N, BLOCK_D, BLOCK_L)
    rows_rel = tl.arange(0, BLOCK_D)
    # this program's slice of the (d-blocks, b, tiles, n, BLOCK_L) partial sums of dB and dC
    part_base = (pid_d * batch + pid_b).to(tl.int64) * n_tiles * (N * BLOCK_L)
    A2 = _scaled_A(A_ptr, rows, row_ok, N)
    bias = _row_vector(bias_ptr, rows, row_ok, HAS_BIAS)
    Dv = _row_vector(D_ptr, rows, row_ok, HAS_D)

    # adjoint entering the chunk from its right, already times a_{t+1}: from the last state's
    # gradient through the summaries of every later chunk
    qs = _zeros_state(rows, N)
    if HAS_DLAST:
        qs = _load_state(dlast_ptr, pid_b, dim, rows, row_ok, N)
    qs = _fold_chunks(qs, A2, dtsum_ptr, qloc_ptr, pid_b, n_chunks, dim, rows, row_ok,
                      n_chunks - 1, n_chunks - 1 - pid_c, -1, N)
    dA_acc = _zeros_state(rows, N)
    dD_acc = tl.zeros((BLOCK_D,), tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), tl.float32)

    first_tile = pid_c * chunk_tiles
    tiles = tl.minimum(chunk_tiles, n_tiles - first_tile)
    for i in range(0, tiles):
        tile = first_tile + tiles - 1 - i
        steps = tile * BLOCK_L + cols
        mask = row_ok[:, None] & (steps < length)[None, :]
        offs = row_base[:, None] + steps[None, :]
        # where the scattered sums over the tile's channels go (see _column_sums): the tile's
        # block of the partial sums, each state's row of steps at a constant offset
        sum_at = part_base + tile * (N * BLOCK_L) + rows_rel // (BLOCK_D // BLOCK_L)
        sum_ok = rows_rel % (BLOCK_D // BLOCK_L) == 0
        # the forward's state entering the tile, loaded first: it comes from DRAM
        h0s = _load_state(states_ptr, pid_b * n_tiles + tile, dim, rows, row_ok, N)

        dt = _load_dt(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
        dtu = dt * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        _, _, dy = _load_dy(dout_ptr, z_ptr, offs, mask, HAS_Z)

        y = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)
        gB = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)  # sum_n g B
        gAh = tl.zeros((BLOCK_D, BLOCK_L), tl.float32)  # sum_n A g a h_{t-1}
        new_qs = ()
        new_dA = ()
        for n in tl.static_range(N):
            Bn = _bc_tile(B_ptr, bc_base, tile, n, cols, n_tiles, BLOCK_L)[None, :]
            Cn = _bc_tile(C_ptr, bc_base, tile, n, cols, n_tiles, BLOCK_L)[None, :]
            # forward states inside the tile
            a = tl.exp2(dt * A2[n][:, None])
            x = dtu * Bn
            h = _carried_scan(a, x, h0s[n])
            if HAS_Z:
                y += h * Cn
            # adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}, from the tile after through q
            g, q = _adjoint_scan(a, dy * Cn, qs[n])
            new_qs += (q,)

            gah = g * (h - x)  # g_t a_t h_{t-1}
            gAh += gah * (A2[n] * LN2)[:, None]
            new_dA += (dA_acc[n] + tl.sum(gah * dt, axis=1),)
            gB += g * Bn
            tl.store(dB_ptr + sum_at + n * BLOCK_L, _column_sums(g * dtu), mask=sum_ok)
            tl.store(dC_ptr + sum_at + n * BLOCK_L, _column_sums(h * dy), mask=sum_ok)
        qs = new_qs
        dA_acc = new_dA

        # read again rather than held through the state loop: registers are the limit there
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        du = dt * gB
        ddt = gAh + u * gB
        if HAS_D:
            du += Dv[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        if HAS_Z:
            if HAS_D:
                y += u * Dv[:, None]
            dout, zv, _ = _load_dy(dout_ptr, z_ptr, offs, mask, HAS_Z)
            z_sig = tl.sigmoid(zv)
            dz = dout * y * z_sig * (1.0 + zv * (1.0 - z_sig))
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if SOFTPLUS:
            raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                raw += bias[:, None]
            ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
        ddt = tl.where(mask, ddt, 0.0)
        dbias_acc += tl.sum(ddt, axis=1)
        tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + offs, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)

    # this chunk's partial sums of the parameter gradients: states at (chunk, b), and (chunks, b, d)
    at = pid_c * batch + pid_b
    _store_state(dA_ptr, at, dA_acc, dim, rows, row_ok, N)
    if HAS_D:
        tl.store(dD_ptr + at.to(tl.int64) * dim + rows, dD_acc, mask=row_ok)
    if HAS_BIAS:
        tl.store(dbias_ptr + at.to(tl.int64) * dim + rows, dbias_acc, mask=row_ok)


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


def _padded(t: Tensor, n_tiles: int, block_l: int) -> Tensor:
    """(b, n, l) -> (b, n, tiles x block_l), dense, zero past l: the kernels read whole tiles of
    B and C unmasked (B, C are d times smaller than u, so this copy is cheap)."""
    return torch.nn.functional.pad(t, (0, n_tiles * block_l - t.shape[-1]))


def _state_buffer(*lead: int, d: int, n: int, device) -> Tensor:
    """Uninitialised float32 states (*lead, d, n) in the kernels' layout, (*lead, blocks, n,
    STATE_BLOCK) (see ``_state_start``)."""
    sb = STATE_BLOCK.value
    return torch.empty(*lead, triton.cdiv(d, sb), n, sb, device=device, dtype=torch.float32)


def _states_to_dn(buf: Tensor, d: int) -> Tensor:
    """A state buffer (*lead, blocks, n, STATE_BLOCK) as (*lead, d, n), dense."""
    *lead, blocks, n, sb = buf.shape
    return buf.transpose(-1, -2).reshape(*lead, blocks * sb, n)[..., :d, :].contiguous()


def _states_from_dn(t: Tensor) -> Tensor:
    """States (*lead, d, n) as a float32 state buffer (the inverse of ``_states_to_dn``)."""
    *lead, d, n = t.shape
    sb = STATE_BLOCK.value
    padded = torch.nn.functional.pad(t.float(), (0, 0, 0, triton.cdiv(d, sb) * sb - d))
    return padded.reshape(*lead, -1, sb, n).transpose(-1, -2).contiguous()


def _optional(t: Tensor | None, fallback: Tensor) -> Tensor:
    """Kernels take a pointer even for absent inputs (never dereferenced)."""
    return t.contiguous() if t is not None else fallback


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    # the interpreter (CPU) has no multiprocessors: chunk as a small GPU would
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _chunking(u: Tensor, block_l: int, block_d: int, programs_per_sm: int
              ) -> tuple[int, int, int, int]:
    """(tiles, channel blocks, tiles per chunk, chunks) of a launch over u (b, d, l)."""
    b, d, length = u.shape
    n_tiles = triton.cdiv(length, block_l)
    d_blocks = triton.cdiv(d, block_d)
    per_chunk = chunk_tiles(n_tiles, b * d_blocks, programs_per_sm * _multiprocessors(u.device))
    return n_tiles, d_blocks, per_chunk, triton.cdiv(n_tiles, per_chunk)


def scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_states,
                 config: ScanKernelConfig = DEFAULT_CONFIG):
    """Launch the forward kernels. Returns out (b, d, l) in u's dtype, the last state and, with
    ``save_states``, the states entering the backward's tiles (else None), both state buffers
    (see ``_state_buffer``; ``_states_to_dn`` makes the last state (b, d, n))."""
    (b, d, length), n = u.shape, A.shape[1]
    u, delta, A = (t.contiguous() for t in (u, delta, A))
    block_l, block_d, warps, per_sm, maxnreg = config.tiles(grad=False)
    save_every = 1
    if save_states:  # the states fall on the backward's tile boundaries: tiles that divide those
        block_l = min(block_l, config.bwd_block_l)
        save_every = config.bwd_block_l // block_l
    n_tiles, d_blocks, per_chunk, n_chunks = _chunking(u, block_l, block_d, per_sm)
    B, C = _padded(B, n_tiles, block_l), _padded(C, n_tiles, block_l)
    f32 = dict(device=u.device, dtype=torch.float32)
    out = torch.empty_like(u, memory_format=torch.contiguous_format)
    last = _state_buffer(b, d=d, n=n, device=u.device)
    states = (_state_buffer(b, triton.cdiv(n_tiles, save_every), d=d, n=n, device=u.device)
              if save_states else last)
    hloc = _state_buffer(b, n_chunks, d=d, n=n, device=u.device)
    dtsum = torch.empty(b, n_chunks, d, **f32)
    sizes = (b, d, length, per_chunk, n_tiles, n_chunks)
    common = dict(N=n, BLOCK_D=block_d, BLOCK_L=block_l, HAS_BIAS=delta_bias is not None,
                  SOFTPLUS=bool(delta_softplus), num_warps=warps, maxnreg=maxnreg)
    bias = _optional(delta_bias, u)
    if n_chunks > 1:
        _fwd_chunk_state_kernel[(d_blocks, n_chunks - 1, b)](
            u, delta, A, B, bias, hloc, dtsum, *sizes, **common)
    _scan_fwd_kernel[(d_blocks, n_chunks, b)](
        u, delta, A, B, C, _optional(D, u), _optional(z, u), bias,
        out, last, states, hloc, dtsum, *sizes,
        HAS_D=D is not None, HAS_Z=z is not None, SAVE_STATES=save_states,
        SAVE_EVERY=save_every, **common)
    return out, last, (states if save_states else None)


def scan_backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, states, dout, dlast,
                  config: ScanKernelConfig = DEFAULT_CONFIG):
    """Launch the backward kernels. Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), each
    in its input's dtype (None for absent optional inputs)."""
    (b, d, length), n = u.shape, A.shape[1]
    u, delta, A, dout = (t.contiguous() for t in (u, delta, A, dout))
    block_l, block_d, warps, per_sm, maxnreg = config.tiles(grad=True)
    n_tiles, d_blocks, per_chunk, n_chunks = _chunking(u, block_l, block_d, per_sm)
    Bp, Cp = _padded(B, n_tiles, block_l), _padded(C, n_tiles, block_l)
    if states.shape[1] != n_tiles:
        raise ValueError(f"saved states hold {states.shape[1]} tiles, expected {n_tiles}")
    f32 = dict(device=u.device, dtype=torch.float32)
    # The kernel writes row-major (b, d, l). empty_like would copy a non-dense input's stride
    # order (say z is a transposed half of a (b, l, 2d) projection), scrambling dz.
    dense = dict(memory_format=torch.contiguous_format)
    du = torch.empty_like(u, **dense)
    ddelta = torch.empty_like(delta, **dense)
    dz = torch.empty_like(z, **dense) if z is not None else None
    qloc = _state_buffer(b, n_chunks, d=d, n=n, device=u.device)
    dtsum = torch.empty(b, n_chunks, d, **f32)
    dA_part = _state_buffer(n_chunks, b, d=d, n=n, device=u.device)
    dD_part = torch.empty(n_chunks, b, d, **f32) if D is not None else None
    dbias_part = torch.empty(n_chunks, b, d, **f32) if delta_bias is not None else None
    dB_part = torch.empty(d_blocks, b, n_tiles, n, block_l, **f32)
    dC_part = torch.empty(d_blocks, b, n_tiles, n, block_l, **f32)
    sizes = (b, d, length, per_chunk, n_tiles, n_chunks)
    common = dict(N=n, BLOCK_D=block_d, BLOCK_L=block_l, HAS_Z=z is not None,
                  HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
                  num_warps=warps, maxnreg=maxnreg)
    bias, zz = _optional(delta_bias, u), _optional(z, u)
    if n_chunks > 1:
        _bwd_chunk_adjoint_kernel[(d_blocks, n_chunks - 1, b)](
            delta, A, Cp, zz, bias, dout, qloc, dtsum, *sizes, **common)
    _scan_bwd_kernel[(d_blocks, n_chunks, b)](
        u, delta, A, Bp, Cp, _optional(D, u), zz, bias,
        dout, states if dlast is None else _states_from_dn(dlast), states, qloc, dtsum,
        du, ddelta, _optional(dz, du), dA_part, _optional(dD_part, dA_part),
        _optional(dbias_part, dA_part), dB_part, dC_part, *sizes,
        HAS_D=D is not None, HAS_DLAST=dlast is not None, **common)
    dA = _states_to_dn(dA_part.sum((0, 1)), d).to(A.dtype)
    # (b, tiles, n, block_l) -> (b, n, l)
    dB, dC = (part.sum(0).transpose(1, 2).reshape(b, n, -1)[..., :length].to(t.dtype)
              for part, t in ((dB_part, B), (dC_part, C)))
    dD = dD_part.sum((0, 1)).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum((0, 1)).to(delta_bias.dtype) if delta_bias is not None else None
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
        return out, _states_to_dn(last, u.shape[1])

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
