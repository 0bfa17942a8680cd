"""Low-level operators of the M4V model.

* :mod:`m4v.ops.causal_conv`: the causal depthwise conv1d + SiLU of the Mamba mixer, backends
  ``torch`` (cuDNN's conv) and ``triton`` (fused forward and backward kernels);
* :mod:`m4v.ops.modulation`: adaLN's LayerNorm + modulation and gated residual, each one fused
  Triton kernel forward and one backward on CUDA;
* :mod:`m4v.ops.scan`: the selective scan (Mamba-1 S6 recurrence) with backends ``reference``,
  ``torch`` (chunked, custom op ``m4v::selective_scan``), ``triton`` and ``mamba_ssm``;
* :mod:`m4v.ops.zigzag`: the 8 zigzag scan orders of a token grid and their inverses.
"""

from m4v.ops.causal_conv import causal_conv1d_silu
from m4v.ops.scan import selective_scan, selective_scan_backward_flops, selective_scan_flops
from m4v.ops.zigzag import inverse_orders, raster_order, zigzag_orders

__all__ = [
    "causal_conv1d_silu",
    "inverse_orders",
    "raster_order",
    "selective_scan",
    "selective_scan_backward_flops",
    "selective_scan_flops",
    "zigzag_orders",
]
