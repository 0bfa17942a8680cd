"""The Mamba-1 mixer of an MM-DiM block (selective SSM, Gu & Dao 2023), unidirectional.

in_proj -> (x, z); x: causal depthwise conv1d (k = d_conv) -> SiLU, one fused op
(:func:`m4v.ops.causal_conv1d_silu`, Triton kernels on CUDA) -> x_proj -> (dt, B, C);
dt_proj(dt) + softplus -> delta; selective scan(x, delta, A, B, C, D) gated by SiLU(z); out_proj.
Initialisation follows mamba-ssm (S4D-real A, dt log-uniform in [dt_min, dt_max]).

Inside, tensors are channels first, (b, channels, L), the layout of the conv and of the scan; the
projections are applied weight-first (``W @ x``, as mamba-ssm does), so that every tensor the conv
and the scan read is dense without a copy. Applied as ``x @ W^T`` (nn.Linear's way), each would
be a transposed view, and the conv, the scan and their backward passes each made it dense.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

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
        x, z = weight_first(self.in_proj.weight, x.mT).chunk(2, dim=1)  # (b, d_inner, L) each
        x = causal_conv1d_silu(x, self.conv1d.weight[:, 0], self.conv1d.bias,
                               backend=self.conv_backend)
        dt, B, C = weight_first(self.x_proj.weight, x).split(
            [self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = weight_first(self.dt_proj.weight, dt)  # the bias goes to the scan, fused
        y = selective_scan(
            x, delta, -torch.exp(self.A_log.float()), B, C, D=self.D.float(), z=z,
            delta_bias=self.dt_proj.bias.float(), delta_softplus=True, backend=self.scan_backend,
        )
        # one copy of the (smaller) d_model-wide output; left a transposed view, its gradient
        # would reach the scan's backward as one, to be made dense there at d_inner width
        return weight_first(self.out_proj.weight, y).mT.contiguous()


def weight_first(weight: Tensor, x: Tensor) -> Tensor:
    """A linear map (no bias) on channels-first x: weight (o, i), x (b, i, L) -> (b, o, L), dense.

    One batched product with the weight broadcast over the batch (a stride-0 view). Under
    autocast the weight is cast before it is broadcast: cast after, it would be copied per batch
    element."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        weight = weight.to(torch.get_autocast_dtype(device))
    return torch.bmm(weight.expand(x.shape[0], *weight.shape), x)
