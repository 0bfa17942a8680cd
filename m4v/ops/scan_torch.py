"""Chunked parallel selective scan in plain PyTorch: the CPU default backend.

The scan is registered as the custom ops ``m4v::selective_scan`` and
``m4v::selective_scan_backward`` (forward and gradient), so tracing tools (TorchScript / fvcore,
``torch.utils.flop_counter``, ``torch.compile``) see each as one named node, and both have fake
(meta) kernels for shape-only runs. Call it through :func:`m4v.ops.scan.selective_scan`.

Algorithm: a two-level scan of the linear recurrence h_t = a_t * h_{t-1} + x_t, with
a_t = exp(dt_t A) and x_t = dt_t u_t B_t, over tensors laid out time-major (l, b, n, d), the
time axis cut into chunks of T steps:

1. inside every chunk, all chunks at once: the local scan from a zero state and the running
   product of the decays (T vectorised steps);
2. across chunks: the state entering each chunk (one small step per chunk);
3. fix-up: h = local + running product * state entering the chunk (one vectorised op).

A call costs O(T + l / T) Python steps instead of O(l). Only products of decays appear, never
exp of a cumulative sum of log-decays: exp(-cumsum(dt A)) overflows float32 once a chunk's total
decay passes ~88, which Mamba reaches at initialisation (A = -16, dt = 0.1, 64 steps), while
pairwise exp(cum_t - cum_s) costs O(T) times more work. The channel axis d is innermost so that
the broadcasts and reductions over n run over long contiguous rows, and time is outermost so that
the state before each step (h_{t-1}) and the decay after it (a_{t+1}) are plain views, offset by
one step, of buffers holding one extra step. Long sequences are processed in blocks so that memory
stays bounded. Fresh memory costs a page fault per 4 KiB page on first touch, a large share of the
run time (more than an elementwise pass over it): the (block, b, n, d) working tensors are
allocated once per call and reused by every block, fresh tensors are updated in place, and the
work buffers are freed before the epilogues allocate their outputs.

The backward pass recomputes the states block by block (from the states at block starts) and runs
the adjoint recurrence lambda_t = a_{t+1} lambda_{t+1} + C_t g_t with the same chunked scan,
reversed. Its reductions over n (for dt u) and over d (dB, dC) are batched matrix products, which
read the state tensors once instead of writing and re-reading an elementwise product.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK = 16
# Elements of one (block, b, n, d) working tensor: bounds memory and keeps a block's working set
# near the cache; the forward holds 2 such tensors, the backward 4.
BLOCK_ELEMENTS = 1 << 19
# exp(x) = 2 ** (x log2 e): torch's float32 CPU exp2 kernel is 2.3x (AVX2) to 4.3x (AVX-512)
# faster than exp (measured), and the decays' exp is a large share of the scan.
LOG2E = 1.4426950408889634


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


def _local_scans(a: Tensor, x: Tensor, prod: Tensor, chunk: int, reverse: bool):
    """Step 1, in place: x becomes the scan of every chunk from a zero state, prod the running
    products of the decays (prod may be a itself when a is not needed afterwards).

    Returns x and prod viewed as (chunks, T, b, n, d) and the index of each chunk's last step.
    """
    av, hv, pv = (t.view(-1, chunk, *t.shape[1:]) for t in (a, x, prod))
    # One unbind per tensor instead of an indexing op per step: the steps are small ops, whose
    # Python overhead counts.
    a_s, h_s, p_s = av.unbind(1), hv.unbind(1), pv.unbind(1)
    steps = range(chunk - 1, -1, -1) if reverse else range(chunk)
    if prod is not a:
        p_s[steps[0]].copy_(a_s[steps[0]])
    for prev, t in zip(steps[:-1], steps[1:], strict=True):
        h_s[t].addcmul_(a_s[t], h_s[prev])
        torch.mul(a_s[t], p_s[prev], out=p_s[t])  # after the line above when prod is a
    return hv, pv, steps[-1]


def _cross_chunks(hv, pv, last, h0, reverse, entering=None) -> Tensor:
    """Step 2: the state entering each chunk, written to entering (chunks, b, n, d) if given.

    Returns the state after the last chunk (reverse: before the first).
    """
    order = range(hv.shape[0] - 1, -1, -1) if reverse else range(hv.shape[0])
    h_last, p_last = hv[:, last].unbind(0), pv[:, last].unbind(0)
    state = h0
    for c in order:
        if entering is not None:
            entering[c] = state
        state = torch.addcmul(h_last[c], p_last[c], state)
    return state


def chunked_linear_scan(
    a: Tensor, x: Tensor, h0: Tensor, chunk: int, prod: Tensor, reverse: bool = False
) -> Tensor:
    """All states of h_t = a_t h_{t-1} + x_t (reverse: h_t = a_t h_{t+1} + x_t).

    a, x: (l, b, n, d), l a multiple of chunk; h0 (b, n, d) is the state before the first step
    (reverse: after the last). The states are written over x, which is returned; prod (same
    shape) is work space, and may be a itself when a is not needed afterwards. No autograd.
    """
    hv, pv, last = _local_scans(a, x, prod, chunk, reverse)
    entering = h0.new_empty(hv.shape[0], 1, *h0.shape)
    _cross_chunks(hv, pv, last, h0, reverse, entering[:, 0])
    hv.addcmul_(pv, entering)
    return x


def final_state(a: Tensor, x: Tensor, h0: Tensor, chunk: int) -> Tensor:
    """The state after the last step of h_t = a_t h_{t-1} + x_t, without the fix-up of every
    state (steps 1 and 2 only). a and x are overwritten."""
    return _cross_chunks(*_local_scans(a, x, a, chunk, reverse=False), h0, reverse=False)


def _softplus(x: Tensor) -> Tensor:
    """F.softplus(x) (beta 1, threshold 20: x itself above 20), from vectorised kernels only.

    torch's float32 softplus and log1p CPU kernels take about 12 ns an element, as long as the
    rest of the forward at d = 128, while exp and log are vectorised (measured). log1p(t) =
    log(u) - ((u - 1) - t) / u with u = 1 + t corrects the rounding of 1 + t to first order:
    within about 1 ulp of log1p(t) for all t > 0 (t itself once u rounds to 1). In place on two
    temporaries.
    """
    t = x.clamp(max=20).exp_()  # the clamp keeps exp finite; those elements take x below
    u = t + 1
    u -= 1  # exact, as is (u - 1) - t, where the correction matters (t < 1: Sterbenz)
    t -= u  # -((u - 1) - t): minus the rounding error of 1 + t
    u += 1  # exact again
    t /= u
    return torch.where(x <= 20, u.log_().add_(t), x, out=t)


class _Scan:
    """The inputs in the compute dtype, time-major and zero-padded to whole chunks, and the
    geometry. Padded steps have dt = 0, hence a = 1 and x = 0: they carry the state unchanged.

    Time-major: dt, u (l, b, 1, d); B, C (l, b, n, 1), shaped to broadcast against the states
    (l, b, n, d); pre = delta + delta_bias (l, b, d), softplus's input.
    """

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, block):
        self.dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        (self.b, self.d, self.length), self.n = u.shape, A.shape[1]
        self.chunk, self.block = scan_geometry(self.b, self.d, self.length, self.n, chunk, block)
        self.padded = -(-self.length // self.chunk) * self.chunk
        self.softplus = delta_softplus
        self.pre = self.time_major(delta)
        if delta_bias is not None:
            self.pre += delta_bias.to(self.dtype)
        dt = _softplus(self.pre) if delta_softplus else self.pre
        dt[self.length :] = 0  # the bias and softplus moved the padding off 0
        self.dt = dt.unsqueeze(-2)
        self.u = self.time_major(u).unsqueeze(-2)
        self.B = self.time_major(B).unsqueeze(-1)
        self.C = self.time_major(C).unsqueeze(-1)
        self.At = A.to(self.dtype).t().contiguous()  # (n, d): d innermost, as in the states
        self.A2 = self.At * LOG2E

    # Both conversions are one 2-D transpose of (b k, l): torch copies those 4-5x faster than the
    # equivalent 3-D permutes (measured).
    def time_major(self, x: Tensor) -> Tensor:
        """(b, k, l) -> (padded l, b, k) in the compute dtype."""
        b, k, length = x.shape
        out = x.new_empty(self.padded, b, k, dtype=self.dtype)
        out[length:] = 0
        out.view(self.padded, b * k)[:length] = x.reshape(b * k, length).t()
        return out

    def from_time_major(self, x: Tensor) -> Tensor:
        """(padded l, b, k) -> (b, k, l), contiguous."""
        _, b, k = x.shape
        return x.view(-1, b * k)[: self.length].t().contiguous().view(b, k, self.length)

    def blocks(self) -> list[tuple[int, int]]:
        """(start, end) of each block, in steps."""
        return [(s, min(self.padded, s + self.block)) for s in range(0, self.padded, self.block)]

    def work(self, steps: int) -> Tensor:
        """A flat work buffer for (steps, b, n, d) tensors, viewed with :meth:`view`; never
        longer than the padded sequence plus one step, which no view needs more of."""
        return self.dt.new_empty(min(steps, self.padded + 1) * self.b * self.n * self.d)

    def view(self, work: Tensor, steps: int) -> Tensor:
        """The first steps of a work buffer as a contiguous (steps, b, n, d) tensor."""
        return work[: steps * self.b * self.n * self.d].view(steps, self.b, self.n, self.d)

    def drive(self, s: int, e: int, a: Tensor, x: Tensor) -> Tensor:
        """Decays a_t = exp(dt_t A) and inputs x_t = dt_t u_t B_t of steps s..e-1 into a, x.

        Returns dt u (e - s, b, 1, d), made per block: a whole-sequence copy would cost memory.
        """
        dtu = self.dt[s:e] * self.u[s:e]
        torch.exp2(torch.mul(self.dt[s:e], self.A2, out=a), out=a)
        torch.mul(dtu, self.B[s:e], out=x)
        return dtu

    def y(self, h: Tensor, C: Tensor, out: Tensor) -> Tensor:
        """y_t = sum_n C_t h_t, (l, b, 1, d) into out, as a batched row-times-matrix product."""
        m = h.shape[0] * self.b
        torch.bmm(C.view(m, 1, self.n), h.view(m, self.n, self.d), out=out.view(m, 1, self.d))
        return out


def _forward_blocks(sc: _Scan) -> tuple[Tensor, Tensor]:
    """y (l, b, 1, d) and the last state (b, n, d). The work buffers are freed on return."""
    a_work, h_work = sc.work(sc.block), sc.work(sc.block)
    state, y = sc.u.new_zeros(sc.b, sc.n, sc.d), torch.empty_like(sc.u)
    for s, e in sc.blocks():
        a, h = sc.view(a_work, e - s), sc.view(h_work, e - s)
        sc.drive(s, e, a, h)
        chunked_linear_scan(a, h, state, sc.chunk, prod=a)
        state = h[-1].clone()  # padded steps carry the last step's state unchanged
        sc.y(h, sc.C[s:e], out=y[s:e])
    return y, state


def scan_forward(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk=None, block=None
) -> tuple[Tensor, Tensor]:
    """out (b, d, l) in u's dtype, last state (b, d, n) in the compute dtype."""
    sc = _Scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, block)
    y, state = _forward_blocks(sc)
    if D is not None:
        y.addcmul_(sc.u, D.to(sc.dtype))
    out = sc.from_time_major(y.squeeze(-2))
    if z is not None:
        out.mul_(F.silu(z.to(sc.dtype)))
    return out.to(u.dtype), state.transpose(1, 2).contiguous()


def _backward_blocks(sc: _Scan, g: Tensor, adjoint: Tensor, with_y: bool):
    """Time-major gradients of the scan proper: du, ddt (l, b, 1, d), dB, dC (l, b, n, 1), dA^T
    (n, d), and y (l, b, 1, d) when with_y, from g = dL/dy (l, b, 1, d) and adjoint = dL/d(last
    state) (b, n, d). The work buffers are freed on return."""
    b, n, d = sc.b, sc.n, sc.d
    # Work buffers, one step longer than a block: a_ext holds a_t and then a_{t+1} = 1 after the
    # block's last step (the adjoint's decays are a_ext[1:]); h_ext holds the state entering the
    # block and then the block's states (the states before each step are h_ext[:-1]).
    a_work, h_work = sc.work(sc.block + 1), sc.work(sc.block + 1)
    prod_work, lam_work = sc.work(sc.block), sc.work(sc.block)

    states, state = [], sc.u.new_zeros(b, n, d)
    for s, e in sc.blocks():  # states entering each block
        states.append(state)
        a, h = sc.view(a_work, e - s), sc.view(h_work, e - s)
        sc.drive(s, e, a, h)
        state = final_state(a, h, state, sc.chunk)

    du, ddt, dB, dC = (torch.empty_like(t) for t in (sc.u, sc.dt, sc.B, sc.C))
    dAt = torch.zeros_like(sc.At)
    y = torch.empty_like(sc.u) if with_y else None
    for (s, e), h0 in zip(reversed(sc.blocks()), reversed(states), strict=True):
        steps, m = e - s, (e - s) * b
        a_ext, h_ext = sc.view(a_work, steps + 1), sc.view(h_work, steps + 1)
        a, h, h_prev = a_ext[:-1], h_ext[1:], h_ext[:-1]
        prod, lam = sc.view(prod_work, steps), sc.view(lam_work, steps)
        dtu = sc.drive(s, e, a, h)
        a_ext[-1], h_ext[0] = 1, h0
        chunked_linear_scan(a, h, h0, sc.chunk, prod)
        if y is not None:
            sc.y(h, sc.C[s:e], out=y[s:e])
        h_rows, g_rows = h.view(m, n, d), g[s:e].view(m, 1, d)
        torch.bmm(g_rows, h_rows.transpose(1, 2), out=dC[s:e].view(m, 1, n))  # sum_d g h

        # lam_t = dL/dh_t = a_{t+1} lam_{t+1} + C_t g_t; the adjoint enters after the last step.
        torch.mul(g[s:e], sc.C[s:e], out=lam)
        chunked_linear_scan(a_ext[1:], lam, adjoint, sc.chunk, prod, reverse=True)
        adjoint = a[0] * lam[0]  # dL/dh before the block's first step
        lam_rows = lam.view(m, n, d)
        d_dtu = torch.bmm(sc.B[s:e].view(m, 1, n), lam_rows).view(steps, b, 1, d)  # sum_n lam B
        torch.bmm(dtu.view(m, 1, d), lam_rows.transpose(1, 2), out=dB[s:e].view(m, 1, n))
        torch.mul(d_dtu, sc.dt[s:e], out=du[s:e])

        # dL/d(dt A) per step and state, then its reductions: over n (with A) for dt, over time
        # (with dt) for A. Elementwise: A and dt vary along different axes.
        dlog_a = a.mul_(lam).mul_(h_prev)  # a is not needed after this
        torch.sum(torch.mul(dlog_a, sc.At, out=prod), dim=-2, keepdim=True, out=ddt[s:e])
        ddt[s:e].addcmul_(d_dtu, sc.u[s:e])
        dAt += dlog_a.mul_(sc.dt[s:e]).sum(dim=(0, 1))
    return du, ddt, dB, dC, dAt, y


def scan_backward(
    dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk=None, block=None
) -> tuple[Tensor | None, ...]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), None for absent inputs.

    dout (b, d, l) is the gradient of ``out``, dlast (b, d, n) that of the last state (or None).
    """
    sc = _Scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, block)
    z_ = z.to(sc.dtype) if z is not None else None
    # g = dL/dy, the gradient of y + D u
    g = sc.time_major(F.silu(z_).mul_(dout) if z is not None else dout).unsqueeze(-2)
    last = dlast.transpose(1, 2) if dlast is not None else sc.u.new_zeros(sc.b, sc.n, sc.d)
    du, ddt, dB, dC, dAt, y = _backward_blocks(sc, g, last.to(sc.dtype), with_y=z is not None)

    dD = dz = ddelta_bias = None
    if D is not None:
        D_ = D.to(sc.dtype)
        du.addcmul_(g, D_)
        dD = (g * sc.u).sum(dim=(0, 1, 2))
    if sc.softplus:
        ddt.mul_(sc.pre.sigmoid_().unsqueeze(-2))  # softplus' = sigmoid; pre is not needed after
    if z is not None:
        if D is not None:
            y.addcmul_(sc.u, D_)
        out_pre = sc.from_time_major(y.squeeze(-2))  # the output before the gate
        sig = torch.sigmoid(z_)
        # d silu(z) / dz = sig (1 + z (1 - sig))
        dz = torch.rsub(sig, 1).mul_(z_).add_(1).mul_(sig).mul_(out_pre).mul_(dout)
    du, ddelta, dB, dC = (
        sc.from_time_major(t.squeeze(i)) for t, i in ((du, -2), (ddt, -2), (dB, -1), (dC, -1))
    )
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
