"""Selective scan (Mamba-1's S6 recurrence) with interchangeable backends.

Semantics are mamba-ssm's ``selective_scan_fn`` / ``selective_scan_ref``. With
dt = softplus(delta + delta_bias) (or delta + delta_bias without ``delta_softplus``; the bias
defaults to 0), for every batch b, channel d and state index n:

    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t,   h_{-1} = 0      (state (b, d, n))
    y_t = sum_n C_t h_t
    out = (y + D u) * silu(z)                                      (each term when given)

Shapes: u, delta, z (b, d, l); A (d, n), real; B, C (b, n, l) (input-dependent); D, delta_bias
(d,). Computation is in float32, or float64 when any input is float64; ``out`` has u's dtype and
the last state (b, d, n) the compute dtype (as mamba-ssm).

Backends (``backend=``):

* ``"reference"``: sequential loop over time, plain autograd; the ground truth.
* ``"torch"``: chunked parallel scan (:mod:`m4v.ops.scan_torch`), the custom op
  ``m4v::selective_scan`` with its backward ``m4v::selective_scan_backward``; any device, meta
  tensors included (shape-only fake kernel), visible as one node to TorchScript / fvcore and to
  ``torch.utils.flop_counter`` (a FLOP formula is registered for both ops here).
* ``"triton"``: the fused GPU kernel of :mod:`m4v.ops.scan_triton`, CUDA tensors only.
* ``"mamba_ssm"``: mamba-ssm's CUDA kernel, when it can be imported. Its backward ignores the
  gradient of the last state (only ``out`` is differentiated); the other backends propagate both.
* ``"auto"``: CUDA tensors: triton, else mamba_ssm, else torch; any other device: torch. The
  order is measured on an H200 (reports/benchmarks/block_gpu*.json, scan_gpu.json): inside the
  MM-DiM block, at the model's 12k and 62k tokens, the Triton kernel is the faster one, forward
  and forward+backward; alone, at 16k and 64k tokens, too, in wall and in GPU time. At 4k tokens
  (last timed on the kernels before B and C stayed bf16) mamba-ssm's was faster in wall time,
  and in GPU time for the forward without gradient: a lone call of ours waits longer on its
  launch work; README.

FLOPs (:func:`selective_scan_flops`), counting every multiply, add and transcendental as one,
per state element (b, d, l, n) of the forward recurrence as defined (sequential evaluation):

    dt*A 1, exp 1, B*(dt u) 1, a*h + x 2, C*h summed over n 2          = 7 b d l n
    plus per (b, d, l): dt*u 1; D: D*u + y 2; z: silu 4 and product 1 = 5;
    delta_bias 1; softplus 2.

The often-quoted 9 b d l n (A. Gu, mamba-ssm issue #110) includes the ~2x combine work of a
work-efficient parallel scan; 7 is the work of the recurrence itself, which is what
``torch.utils.flop_counter`` gets here. With ``multiply_add_as_one=True`` a multiply followed by
an add counts once (the convention of fvcore's matmul handles): 5 b d l n, D term 1. The
backward (:func:`selective_scan_backward_flops`) recomputes the states, as mamba-ssm's kernel
does, and costs 20 b d l n (+2 with z, to recompute y).
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch
from torch import Tensor
from torch.utils.flop_counter import flop_registry, register_flop_formula

from m4v.ops.scan_reference import selective_scan_reference
from m4v.ops.scan_torch import selective_scan_op

BACKENDS = ("auto", "reference", "torch", "triton", "mamba_ssm")
_NEEDS_CUDA = ("triton", "mamba_ssm")


# ----------------------------------------------------------------------------- validation


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_tensor(name: str, t, expected: tuple[int, ...], meaning: str, device) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(
            f"selective_scan: {name} must be a tensor {meaning}, got {type(t).__name__}"
        )
    if not t.is_floating_point():
        raise ValueError(
            f"selective_scan: {name} must be a real floating-point tensor, got dtype {t.dtype}"
        )
    if _shape(t) != expected:
        raise ValueError(
            f"selective_scan: {name} must have shape {meaning} = {expected}, got {_shape(t)}"
        )
    if t.device != device:
        raise ValueError(f"selective_scan: {name} is on {t.device}, expected u's device {device}")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    if not isinstance(u, Tensor) or u.dim() != 3:
        got = _shape(u) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"selective_scan: u must be a tensor of shape (b, d, l), got {got}")
    b, d, length = u.shape
    if length < 1:
        raise ValueError(f"selective_scan: u must have length l >= 1, got shape {_shape(u)}")
    if not isinstance(A, Tensor) or A.dim() != 2 or A.shape[0] != d:
        got = _shape(A) if isinstance(A, Tensor) else type(A).__name__
        raise ValueError(f"selective_scan: A must have shape (d, n) with d = {d}, got {got}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if isinstance(t, Tensor) and t.dim() == 2:
            raise ValueError(
                f"selective_scan: {name} of shape {_shape(t)} (time-invariant, (d, n)) is not "
                f"supported; pass input-dependent {name} of shape (b, n, l) = {(b, n, length)}"
            )
        if isinstance(t, Tensor) and t.dim() == 4:
            raise ValueError(
                f"selective_scan: grouped {name} of shape {_shape(t)} (b, g, n, l) is not "
                f"supported; pass {name} of shape (b, n, l) = {(b, n, length)}"
            )
    expected = {
        "u": (u, (b, d, length), "(b, d, l)"),
        "delta": (delta, (b, d, length), "(b, d, l)"),
        "A": (A, (d, n), "(d, n)"),
        "B": (B, (b, n, length), "(b, n, l)"),
        "C": (C, (b, n, length), "(b, n, l)"),
        "D": (D, (d,), "(d,)"),
        "z": (z, (b, d, length), "(b, d, l)"),
        "delta_bias": (delta_bias, (d,), "(d,)"),
    }
    for name, (t, shape, meaning) in expected.items():
        if t is not None or name in ("u", "delta", "A", "B", "C"):
            _check_tensor(name, t, shape, meaning, u.device)


# ----------------------------------------------------------------------------- backends


@functools.cache
def _import(backend: str):
    """(function, None) or (None, reason it cannot be imported)."""
    module, attr = {
        "triton": ("m4v.ops.scan_triton", "selective_scan_triton"),
        "mamba_ssm": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
    }[backend]
    try:
        if backend == "triton":
            importlib.import_module("triton")
        return getattr(importlib.import_module(module), attr), None
    except Exception as e:  # a broken CUDA extension raises more than ImportError
        return None, f"{type(e).__name__}: {e}"


def backend_unavailable_reason(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device``, or None when it can."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    if backend not in _NEEDS_CUDA:
        return None
    if torch.device(device).type != "cuda":
        return f"{backend} needs CUDA tensors, got tensors on {torch.device(device)}"
    reason = _import(backend)[1]
    return None if reason is None else f"{backend} is not importable: {reason}"


def available_backends(device: torch.device | str) -> list[str]:
    """Backends usable for tensors on ``device``, fastest first (module docstring)."""
    order = ("triton", "mamba_ssm", "torch", "reference")
    return [b for b in order if backend_unavailable_reason(b, device) is None]


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend ``backend`` means for tensors on ``device``; raises if unusable."""
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return available_backends(device)[0]
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"selective_scan backend {backend!r} is unavailable: {reason}")
    return backend


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba-ssm's semantics (see the module docstring).

    Args:
        u, delta: (b, d, l). A: (d, n). B, C: (b, n, l). D: (d,) or None. z: (b, d, l) or None.
        delta_bias: (d,) or None. delta_softplus: apply softplus to delta + delta_bias.
        return_last_state: also return the state after the last step.
        backend: "auto", "reference", "torch", "triton" or "mamba_ssm".

    Returns:
        out (b, d, l) in u's dtype, and with ``return_last_state`` the last state (b, d, n).
    """
    with warnings.catch_warnings():
        # Under torch.jit.trace shapes are traced values: checking them is meant to be static.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    name = resolve_backend(backend, u.device)
    if name in _NEEDS_CUDA:
        fn = _import(name)[0]
        return fn(
            u,
            delta,
            A,
            B,
            C,
            D=D,
            z=z,
            delta_bias=delta_bias,
            delta_softplus=delta_softplus,
            return_last_state=return_last_state,
        )
    if name == "reference":
        out, last = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    else:
        out, last = selective_scan_op(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (out, last) if return_last_state else out


# ----------------------------------------------------------------------------- FLOPs


def selective_scan_flops(
    b: int,
    d: int,
    l: int,  # noqa: E741 (the scan length, named as in the papers)
    n: int,
    with_D: bool,
    with_z: bool,
    with_delta_bias: bool = False,
    delta_softplus: bool = False,
    multiply_add_as_one: bool = False,
) -> int:
    """Forward FLOPs of one selective scan (derivation in the module docstring)."""
    per_state = 5 if multiply_add_as_one else 7
    per_step = 1  # dt * u
    per_step += (1 if multiply_add_as_one else 2) if with_D else 0
    per_step += 5 if with_z else 0
    per_step += 1 if with_delta_bias else 0
    per_step += 2 if delta_softplus else 0
    return b * d * l * (per_state * n + per_step)


def selective_scan_backward_flops(
    b: int,
    d: int,
    l: int,  # noqa: E741
    n: int,
    with_D: bool,
    with_z: bool,
    with_delta_bias: bool = False,
    delta_softplus: bool = False,
    multiply_add_as_one: bool = False,
) -> int:
    """Backward FLOPs of one selective scan, states recomputed.

    Per (b, d, l, n): recompute dt*A, exp, B*(dt u), a*h + x (5); adjoint C*g and
    a_next*lam + w (3); dlog_a = lam*a*h_prev (2); then four multiply-accumulates: dt grad
    (sum_n dlog_a A), dA (sum dlog_a dt), d(dt u) (sum_n lam B), dB (sum_d lam dt u) and
    dC (sum_d g h), 2 each: 20 (13 counting multiply-adds once); z adds y's recompute (2).
    Per (b, d, l): dt*u 1; du and dt from d(dt u) 3; D: 4; z: silu and gating 5, out + D u 2,
    silu' and dz 7; delta_bias: 1 forward + 1 reduction; softplus: 2 forward + 4 backward.
    """
    mac = multiply_add_as_one
    per_state = (13 if mac else 20) + ((1 if mac else 2) if with_z else 0)
    per_step = 1 + (2 if mac else 3)
    per_step += (2 if mac else 4) if with_D else 0
    per_step += (5 + 7 + (2 if with_D else 0)) if with_z else 0
    per_step += 2 if with_delta_bias else 0
    per_step += 6 if delta_softplus else 0
    return b * d * l * (per_state * n + per_step)


def _scan_op_flops(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_shape=None, **kw):
    b, d, length = u
    return selective_scan_flops(
        b, d, length, A[1], D is not None, z is not None, delta_bias is not None, delta_softplus
    )


def _scan_backward_op_flops(
    dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_shape=None, **kw
):
    b, d, length = u
    return selective_scan_backward_flops(
        b, d, length, A[1], D is not None, z is not None, delta_bias is not None, delta_softplus
    )


for _op, _formula in (
    (torch.ops.m4v.selective_scan, _scan_op_flops),
    (torch.ops.m4v.selective_scan_backward, _scan_backward_op_flops),
):
    if _op not in flop_registry:  # module reloads must not register twice
        register_flop_formula(_op)(_formula)
