"""Chunked parallel selective scan in plain PyTorch: the CPU default backend.

The scan is registered as the custom ops ``m4v::selective_scan`` and
``m4v::selective_scan_backward`` (forward and gradient), so tracing tools (TorchScript / fvcore,
``torch.utils.flop_counter``, ``torch.compile``) see each as one named node, and both have fake
(meta) kernels for shape-only runs. Call it through :func:`m4v.ops.scan.selective_scan`.

Algorithm: a two-level scan of the linear recurrence h_t = a_t * h_{t-1} + x_t, with
a_t = exp(dt_t A) and x_t = dt_t u_t B_t, over tensors laid out time-major (T, b, chunks, n, d):

1. inside every chunk of T steps, all chunks at once: the local scan from a zero state and the
   running product of the decays (T vectorised steps);
2. across chunks: the state entering each chunk (one small step per chunk);
3. fix-up: h = local + running product * state entering the chunk (one vectorised op).

A call costs O(T + l / T) Python steps instead of O(l). Only products of decays appear, never
exp of a cumulative sum of log-decays: exp(-cumsum(dt A)) overflows float32 once a chunk's total
decay passes ~88, which Mamba reaches at initialisation (A = -16, dt = 0.1, 64 steps), while
pairwise exp(cum_t - cum_s) costs O(T) times more work. The channel axis d is innermost so that
the broadcasts and reductions over n run over long contiguous rows. Long sequences are processed
in blocks so that memory stays bounded. The backward pass recomputes the states block by block
(from the states at block starts) and runs the adjoint recurrence
lambda_t = a_{t+1} lambda_{t+1} + C_t g_t with the same chunked scan, reversed.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK = 16
# Elements of one (T, b, chunks, n, d) working tensor per block: bounds memory and keeps a
# block's working set near the cache; the backward holds about 8 such tensors.
BLOCK_ELEMENTS = 1 << 19


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs are upcast)."""
    f64 = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if f64 else torch.float32


def scan_geometry(
    b: int, d: int, length: int, n: int, chunk: int | None = None, block: int | None = None
) -> tuple[int, int]:
    """(chunk, block) lengths in steps; block is a multiple of chunk."""
    chunk = min(chunk or DEFAULT_CHUNK, length)
    if block is None:
        block = chunk * max(1, BLOCK_ELEMENTS // (chunk * b * d * n))
    return chunk, max(chunk, block - block % chunk)


def _time_major(x: Tensor, chunk: int) -> Tensor:
    """(b, k, L) -> (T, b, chunks, k), zero-padded at the end to whole chunks."""
    b, k, length = x.shape
    chunks = -(-length // chunk)
    x = F.pad(x, (0, chunks * chunk - length))
    return x.reshape(b, k, chunks, chunk).permute(3, 0, 2, 1).contiguous()


def _from_time_major(x: Tensor, length: int) -> Tensor:
    """(T, b, chunks, k) -> (b, k, length)."""
    chunk, b, chunks, k = x.shape
    return x.permute(1, 3, 2, 0).reshape(b, k, chunks * chunk)[..., :length]


def chunked_linear_scan(a: Tensor, x: Tensor, h0: Tensor, reverse: bool = False) -> Tensor:
    """All states of h_t = a_t h_{t-1} + x_t (reverse: h_t = a_t h_{t+1} + x_t).

    a, x: (T, b, chunks, n, d), time t = chunk_index * T + step; h0 (b, n, d) is the state before
    the first step (reverse: after the last). Returns h (T, b, chunks, n, d), written over x (a
    fresh allocation per call costs a page-faulting pass over memory). No autograd.
    """
    chunk, chunks = x.shape[0], x.shape[2]
    steps = range(chunk - 1, -1, -1) if reverse else range(chunk)
    h, prod = x, a.clone()
    for prev, t in zip(steps[:-1], steps[1:], strict=True):
        h[t].addcmul_(a[t], h[prev])
        prod[t].mul_(prod[prev])
    last = steps[-1]
    entering = torch.empty_like(h[0])  # (b, chunks, n, d): state entering each chunk
    state = h0
    for c in range(chunks - 1, -1, -1) if reverse else range(chunks):
        entering[:, c] = state
        state = torch.addcmul(h[last, :, c], prod[last, :, c], state)
    return h.addcmul_(prod, entering)


def _discretize(delta, delta_bias, delta_softplus, dtype) -> tuple[Tensor, Tensor]:
    """(dt, pre-activation) in the compute dtype: dt = softplus(delta + bias) or delta + bias."""
    pre = delta.to(dtype)
    if delta_bias is not None:
        pre = pre + delta_bias.to(dtype)[:, None]
    return (F.softplus(pre) if delta_softplus else pre), pre


def _block_states(dt, u, At, B, h0, chunk):
    """States of one block. dt, u (b, d, L); At = A^T (n, d); B (b, n, L); h0 (b, n, d).

    Returns a and h (T, b, chunks, n, d), and time-major dt, dt * u (T, b, chunks, 1, d) and
    B (T, b, chunks, n, 1), shaped to broadcast against the states.
    """
    dt_t = _time_major(dt, chunk).unsqueeze(-2)
    dtu_t = _time_major(dt * u, chunk).unsqueeze(-2)
    B_t = _time_major(B, chunk).unsqueeze(-1)
    a = (dt_t * At).exp_()
    h = chunked_linear_scan(a, dtu_t * B_t, h0)
    return a, h, dt_t, dtu_t, B_t


def _last_state(h: Tensor, length: int) -> Tensor:
    """The state after step ``length - 1`` of a block, (b, n, d), copied out of h."""
    chunk = h.shape[0]
    return h[(length - 1) % chunk, :, (length - 1) // chunk].clone()


def _block_starts(length: int, block: int) -> list[int]:
    return list(range(0, length, block))


def scan_forward(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk=None, block=None
) -> tuple[Tensor, Tensor]:
    """out (b, d, l) in u's dtype, last state (b, d, n) in the compute dtype."""
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    dt, _ = _discretize(delta, delta_bias, delta_softplus, dtype)
    u_, At, B_, C_ = u.to(dtype), A.to(dtype).t(), B.to(dtype), C.to(dtype)
    (b, d, length), n = u.shape, A.shape[1]
    chunk, block = scan_geometry(b, d, length, n, chunk, block)
    state, ys = u_.new_zeros(b, n, d), []
    for s in _block_starts(length, block):
        e = min(length, s + block)
        _, h, *_ = _block_states(dt[..., s:e], u_[..., s:e], At, B_[..., s:e], state, chunk)
        state = _last_state(h, e - s)
        C_t = _time_major(C_[..., s:e], chunk).unsqueeze(-1)
        ys.append(_from_time_major(h.mul_(C_t).sum(-2), e - s))  # h is not needed after this
    out = torch.cat(ys, dim=-1)
    if D is not None:
        out = out + D.to(dtype)[:, None] * u_
    if z is not None:
        out = out * F.silu(z.to(dtype))
    return out.to(u.dtype), state.transpose(1, 2).contiguous()


def _next_decay(a: Tensor) -> Tensor:
    """a shifted one step back in time (a_next[t] = a[t + 1]), 1 after the block's last step."""
    nxt = torch.empty_like(a)
    nxt[:-1] = a[1:]
    nxt[-1, :, :-1] = a[0, :, 1:]
    nxt[-1, :, -1] = 1
    return nxt


def _previous_state(h: Tensor, h0: Tensor) -> Tensor:
    """h shifted one step forward in time (h_prev[t] = h[t - 1]), h0 before the first step."""
    prev = torch.empty_like(h)
    prev[1:] = h[:-1]
    prev[0, :, 1:] = h[-1, :, :-1]
    prev[0, :, 0] = h0
    return prev


def scan_backward(
    dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk=None, block=None
) -> tuple[Tensor | None, ...]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), None for absent inputs.

    dout (b, d, l) is the gradient of ``out``, dlast (b, d, n) that of the last state (or None).
    """
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    dt, pre = _discretize(delta, delta_bias, delta_softplus, dtype)
    u_, At, B_, C_ = u.to(dtype), A.to(dtype).t(), B.to(dtype), C.to(dtype)
    (b, d, length), n = u.shape, A.shape[1]
    chunk, block = scan_geometry(b, d, length, n, chunk, block)
    dout_ = dout.to(dtype)
    g = dout_ * F.silu(z.to(dtype)) if z is not None else dout_  # gradient of y + D u

    starts, states, state = _block_starts(length, block), [], u_.new_zeros(b, n, d)
    for s in starts:  # states entering each block
        states.append(state)
        e = min(length, s + block)
        h = _block_states(dt[..., s:e], u_[..., s:e], At, B_[..., s:e], state, chunk)[1]
        state = _last_state(h, e - s)

    du, ddt = torch.empty_like(u_), torch.empty_like(dt)
    dB, dC, dAt = torch.empty_like(B_), torch.empty_like(C_), torch.zeros_like(At)
    y = torch.empty_like(u_) if z is not None else None
    adjoint = dlast.to(dtype).transpose(1, 2) if dlast is not None else u_.new_zeros(b, n, d)
    for s, h0 in zip(reversed(starts), reversed(states), strict=True):
        e = min(length, s + block)
        a, h, dt_t, dtu_t, B_t = _block_states(
            dt[..., s:e], u_[..., s:e], At, B_[..., s:e], h0, chunk
        )
        C_t = _time_major(C_[..., s:e], chunk).unsqueeze(-1)
        g_t = _time_major(g[..., s:e], chunk).unsqueeze(-2)
        if y is not None:
            y[..., s:e] = _from_time_major((h * C_t).sum(-2), e - s)
        # lam_t = dL/dh_t = a_{t+1} lam_{t+1} + C_t g_t; the adjoint enters after the last step.
        lam = chunked_linear_scan(_next_decay(a), g_t * C_t, adjoint, reverse=True)
        adjoint = a[0, :, 0] * lam[0, :, 0]  # dL/dh before the block's first step
        dlog_a = a.mul_(lam).mul_(_previous_state(h, h0))  # a is not needed after this
        dAt += (dlog_a * dt_t).sum(dim=(0, 1, 2))
        d_dtu = (lam * B_t).sum(-2)
        ddt_t = (dlog_a * At).sum(-2) + d_dtu * _time_major(u_[..., s:e], chunk)
        ddt[..., s:e] = _from_time_major(ddt_t, e - s)
        du[..., s:e] = _from_time_major(d_dtu * dt_t.squeeze(-2), e - s)
        dB[..., s:e] = _from_time_major((lam * dtu_t).sum(-1), e - s)
        dC[..., s:e] = _from_time_major((h * g_t).sum(-1), e - s)

    dD = dz = ddelta_bias = None
    if D is not None:
        du = du + g * D.to(dtype)[:, None]
        dD = (g * u_).sum(dim=(0, 2))
    if z is not None:
        z_ = z.to(dtype)
        out_pre = y + D.to(dtype)[:, None] * u_ if D is not None else y
        sig = torch.sigmoid(z_)
        dz = dout_ * out_pre * sig * (1 + z_ * (1 - sig))  # d silu(z) / dz = sig (1 + z (1 - sig))
    ddelta = ddt * torch.sigmoid(pre) if delta_softplus else ddt
    if delta_bias is not None:
        ddelta_bias = ddelta.sum(dim=(0, 2))
    grads = (du, ddelta, dAt.t(), dB, dC, dD, dz, ddelta_bias)
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(
        None if gr is None else gr.to(t.dtype) for gr, t in zip(grads, inputs, strict=True)
    )


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("m4v::selective_scan", mutates_args=())
def selective_scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor]:
    """(out (b, d, l), last_state (b, d, n)); see :func:`m4v.ops.scan.selective_scan`."""
    return scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


@selective_scan_op.register_fake
def _selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    return u.new_empty(u.shape), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=dtype)


def _absent(like: Tensor) -> Tensor:
    # Custom-op outputs cannot be None: an empty tensor stands for "no gradient".
    return like.new_empty(0)


@torch.library.custom_op("m4v::selective_scan_backward", mutates_args=())
def selective_scan_backward_op(
    dout: Tensor,
    dlast_state: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); empty tensors for absent D, z, delta_bias."""
    grads = scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return tuple(_absent(u) if gr is None else gr for gr in grads)


@selective_scan_backward_op.register_fake
def _selective_scan_backward_fake(
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus
):
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    return tuple(_absent(u) if t is None else torch.empty_like(t) for t in inputs)


def _setup_context(ctx, inputs, output):
    *tensors, delta_softplus = inputs
    ctx.save_for_backward(*tensors)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout, dlast_state):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    grads = selective_scan_backward_op(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus
    )
    present = (u, delta, A, B, C, D, z, delta_bias)
    return (*(gr if t is not None else None for gr, t in zip(grads, present, strict=True)), None)


selective_scan_op.register_autograd(_backward, setup_context=_setup_context)
