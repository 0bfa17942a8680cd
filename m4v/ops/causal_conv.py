"""Causal depthwise conv1d followed by SiLU (Mamba's short convolution), with two backends.

For x (b, d, l), weight (d, k) and bias (d,) (or None), per channel c and step t::

    out[t] = silu(bias + sum_{j < k} w[j] x[t - (k - 1) + j]),   x[t < 0] = 0

that is ``F.silu(F.conv1d(x, w[:, None], bias, padding=k - 1, groups=d)[..., :l])``.

Backends (``backend=``):

* ``"torch"``: exactly that expression (cuDNN on CUDA); any device and dtype. Weight and bias are
  cast to x's dtype first, as autocast would, so that both backends take the same inputs.
* ``"triton"``: the fused kernels of :mod:`m4v.ops.causal_conv_triton`, CUDA tensors of float32,
  float16 or bfloat16 and k <= 8; on an H200 at the model's sizes about 8 times faster than the
  torch backend forward, 4 times forward and backward (figures in that module's docstring).
* ``"auto"``: triton where it can run (CUDA, an importable Triton, a dtype it takes), else torch.
"""

from __future__ import annotations

import functools
import importlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")


def check_inputs(x, weight, bias) -> tuple[int, int, int, int]:
    """Validate what every backend needs; return (b, d, l, k)."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"causal_conv1d_silu: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"causal_conv1d_silu: {name} must be a real floating-point tensor, "
                             f"got dtype {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"causal_conv1d_silu: {name} is on {t.device}, x on {x.device}")
    if x.dim() != 3 or min(x.shape) < 1:
        raise ValueError(f"causal_conv1d_silu: x must have shape (b, d, l) with b, d, l >= 1, "
                         f"got {tuple(x.shape)}")
    b, d, length = x.shape
    if weight.dim() != 2 or weight.shape[0] != d or weight.shape[1] < 1:
        raise ValueError(f"causal_conv1d_silu: weight must have shape (d, k) = ({d}, k), k >= 1, "
                         f"got {tuple(weight.shape)} (a Conv1d's (d, 1, k) weight: pass w[:, 0])")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"causal_conv1d_silu: bias must have shape (d,) = ({d},), "
                         f"got {tuple(bias.shape)}")
    return b, d, length, weight.shape[1]


@functools.cache
def _import_triton():
    """(causal_conv1d_silu_triton, None) or (None, reason it cannot be imported)."""
    try:
        module = importlib.import_module("m4v.ops.causal_conv_triton")
        return module.causal_conv1d_silu_triton, None
    except Exception as e:  # a broken Triton install raises more than ImportError
        return None, f"{type(e).__name__}: {e}"


def backend_unavailable_reason(backend: str, x: Tensor) -> str | None:
    """Why ``backend`` cannot run on x (its device and dtype), or None when it can."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"causal_conv1d_silu: backend must be one of {BACKENDS[1:]}, "
                         f"got {backend!r}")
    if backend == "torch":
        return None
    if x.device.type != "cuda":
        return f"triton needs CUDA tensors, got x on {x.device}"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"triton takes float32, float16 or bfloat16, got x of {x.dtype}"
    reason = _import_triton()[1]
    return None if reason is None else f"triton is not importable: {reason}"


def resolve_backend(backend: str, x: Tensor) -> str:
    """The concrete backend ``backend`` means for x; raises if it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"causal_conv1d_silu: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if backend_unavailable_reason("triton", x) is None else "torch"
    reason = backend_unavailable_reason(backend, x)
    if reason is not None:
        raise RuntimeError(f"causal_conv1d_silu backend {backend!r} is unavailable: {reason}")
    return backend


def causal_conv1d_silu_torch(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """(b, d, l), weight (d, k), bias (d,) or None -> (b, d, l): cuDNN's conv, cropped, SiLU."""
    d, k = weight.shape
    bias = None if bias is None else bias.to(x.dtype)
    pre = F.conv1d(x, weight.to(x.dtype)[:, None], bias, padding=k - 1, groups=d)
    return F.silu(pre[..., : x.shape[-1]])


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                       backend: str = "auto") -> Tensor:
    """silu(causal depthwise conv1d(x)) (module docstring).

    Args:
        x: (b, d, l). weight: (d, k). bias: (d,) or None.
        backend: "auto", "torch" or "triton".
    Returns:
        (b, d, l) in x's dtype.
    """
    with warnings.catch_warnings():
        # Under torch.jit.trace (fvcore) shapes are traced values: checking them is meant static.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        check_inputs(x, weight, bias)
    if resolve_backend(backend, x) == "triton":
        return _import_triton()[0](x, weight, bias)
    return causal_conv1d_silu_torch(x, weight, bias)
