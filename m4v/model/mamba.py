"""The Mamba-1 mixer of an MM-DiM block (selective SSM, Gu & Dao 2023), unidirectional.

in_proj -> (x, z); x: causal depthwise conv1d (k = d_conv) -> SiLU, one fused op
(:func:`m4v.ops.causal_conv1d_silu`, Triton kernels on CUDA) -> x_proj -> (dt, B, C);
dt_proj(dt) + softplus -> delta; selective scan(x, delta, A, B, C, D) gated by SiLU(z); out_proj.
Initialisation follows mamba-ssm (S4D-real A, dt log-uniform in [dt_min, dt_max]).

Inside, tensors are channels first, (b, channels, L), the layout of the conv and of the scan,
while the blocks hand over token rows (b, L, d). The two projections that cross between the
layouts, in_proj and out_proj, are products that read one layout and write the other
(:func:`rows_to_channels`, :func:`channels_to_rows`), and so are their backward passes: every
tensor the conv and the scan read, and every gradient going back to the block, is dense without
a copy. With autograd's own backward of ``W @ x^T``, the gradient of x came back as a transposed
view, which re-composition's backward then gathered rows of, strided; in_proj's two halves,
taken with ``chunk``, had their gradients concatenated into a (b, 2 d_inner, L) copy; and
out_proj's result needed a copy to be token rows again.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from m4v.ops.causal_conv import causal_conv1d_silu
from m4v.ops.scan import selective_scan


class MambaMixer(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, d_conv: int = 4,
                 dt_rank: int | None = None, scan_backend: str = "auto",
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4):
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)
        self.scan_backend = scan_backend
        self.conv_backend = "auto"  # causal_conv1d_silu's; "torch" runs cuDNN's conv
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        # the conv runs through causal_conv1d_silu; the module holds its parameters, under the
        # names checkpoints know (conv1d.weight (d_inner, 1, d_conv), conv1d.bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_floor)
        with torch.no_grad():  # bias = softplus^-1(dt), so softplus(bias) starts at dt
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def forward(self, x: Tensor) -> Tensor:
        """(b, L, d_model) -> (b, L, d_model)."""
        x, z = rows_to_channels(x, self.in_proj.weight, 2)  # (b, d_inner, L) each
        x = causal_conv1d_silu(x, self.conv1d.weight[:, 0], self.conv1d.bias,
                               backend=self.conv_backend)
        dt, B, C = weight_first(self.x_proj.weight, x).split(
            [self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = weight_first(self.dt_proj.weight, dt)  # the bias goes to the scan, fused
        y = selective_scan(
            x, delta, -torch.exp(self.A_log.float()), B, C, D=self.D.float(), z=z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, backend=self.scan_backend,
        )
        return channels_to_rows(y, self.out_proj.weight)


def _autocast_dtype(device: str) -> torch.dtype | None:
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def weight_first(weight: Tensor, x: Tensor) -> Tensor:
    """A linear map (no bias) on channels-first x: weight (o, i), x (b, i, L) -> (b, o, L), dense.

    One batched product with the weight broadcast over the batch (a stride-0 view). Under
    autocast the weight is cast before it is broadcast: cast after, it would be copied per batch
    element."""
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:
        weight = weight.to(dtype)
    return torch.bmm(weight.expand(x.shape[0], *weight.shape), x)


def _batch_summed(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out (m, n) <- sum over the batch of a (B, m, k) @ b (B, k, n): a weight's gradient."""
    if a.shape[0] == 1:
        return torch.mm(a[0], b[0], out=out)
    return torch.sum(torch.bmm(a, b), 0, out=out)


def _to_channels(x: Tensor, weight: Tensor, parts: int) -> tuple[Tensor, ...]:
    return tuple(weight_first(w, x.mT) for w in weight.chunk(parts))


def _to_rows(y: Tensor, weight: Tensor) -> Tensor:
    return torch.bmm(y.mT, weight.mT.expand(y.shape[0], *weight.mT.shape))


class _RowsToChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, parts):
        ctx.save_for_backward(x, weight)
        return _to_channels(x, weight, parts)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        dx = dweight = None
        pieces = tuple(zip(weight.chunk(len(grads)), grads, strict=True))
        if ctx.needs_input_grad[0]:
            for w, g in pieces:  # dx = sum over the parts of g^T W, accumulated in place
                if g is None:
                    continue
                wb = w.expand(x.shape[0], *w.shape)
                dx = torch.bmm(g.mT, wb) if dx is None else dx.baddbmm_(g.mT, wb)
        if ctx.needs_input_grad[1]:
            dweight = torch.empty_like(weight)
            for out, (_w, g) in zip(dweight.chunk(len(grads)), pieces, strict=True):
                if g is None:
                    out.zero_()
                else:
                    _batch_summed(g, x, out)
        return dx, dweight, None


class _ChannelsToRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight):
        ctx.save_for_backward(y, weight)
        return _to_rows(y, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, weight = ctx.saved_tensors
        dy = dweight = None
        if ctx.needs_input_grad[0]:  # W^T g^T: (b, i, L), dense
            dy = torch.bmm(weight.mT.expand(y.shape[0], *weight.mT.shape), grad.mT)
        if ctx.needs_input_grad[1]:
            dweight = _batch_summed(grad.mT, y.mT, torch.empty_like(weight))
        return dy, dweight


def _needs_graph(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rows_to_channels(x: Tensor, weight: Tensor, parts: int = 1) -> tuple[Tensor, ...]:
    """``W x^T`` in ``parts`` equal blocks of output channels: token rows x (b, L, i), weight
    (o, i) -> ``parts`` tensors (b, o / parts, L), each dense (for any batch size: one product
    per part). The gradient of x comes back dense (b, L, i), the parts' contributions summed in
    place."""
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:  # cast outside the autograd node: its backward runs without autocast
        x, weight = x.to(dtype), weight.to(dtype)
    if _needs_graph(x, weight):
        return _RowsToChannels.apply(x, weight, parts)
    # plain products without a gradient to come: FLOP counters trace through them
    return _to_channels(x, weight, parts)


def channels_to_rows(y: Tensor, weight: Tensor) -> Tensor:
    """``y^T W^T``: channels-first y (b, i, L), weight (o, i) -> token rows (b, L, o), dense; the
    gradient of y comes back dense (b, i, L)."""
    dtype = _autocast_dtype(y.device.type)
    if dtype is not None:
        y, weight = y.to(dtype), weight.to(dtype)
    if _needs_graph(y, weight):
        return _ChannelsToRows.apply(y, weight)
    return _to_rows(y, weight)
