"""Sequential selective scan: the ground truth the other backends are tested against.

A literal transcription of Mamba-1's discretised recurrence (mamba-ssm's ``selective_scan_ref``),
one time step at a time, differentiated by plain autograd. Slow (one Python iteration per step),
simple, and independent of the chunked implementation in :mod:`m4v.ops.scan_torch`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """Step-by-step scan. Shapes as :func:`m4v.ops.scan.selective_scan` (inputs not validated).

    Returns ``out`` (b, d, l) in u's dtype and the final state (b, d, n) in the compute dtype
    (float64 if any input is float64, else float32).
    """
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    u_, delta_, A_, B_, C_ = (t.to(dtype) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta_ = delta_ + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta_ = F.softplus(delta_)

    batch, dim, _ = u.shape
    decay = torch.exp(delta_[..., None] * A_[:, None, :])  # (b, d, l, n)
    drive = (delta_ * u_)[..., None] * B_.transpose(1, 2)[:, None]  # (b, d, l, n)
    h = u_.new_zeros(batch, dim, A.shape[1])
    ys = []
    # unbind, not indexing: the backward of l index ops would zero-fill l full-size gradients
    steps = zip(decay.unbind(2), drive.unbind(2), C_[:, None].unbind(3), strict=True)
    for decay_t, drive_t, C_t in steps:
        h = decay_t * h + drive_t
        ys.append((h * C_t).sum(-1))
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + D.to(dtype)[:, None] * u_
    if z is not None:
        out = out * F.silu(z.to(dtype))
    return out.to(u.dtype), h
