"""The fused adaLN ops (m4v.ops.modulation) against a float64 reference written out here: the
PyTorch path on the CPU, the Triton kernels in Triton's interpreter and on CUDA."""

from __future__ import annotations

import pytest
import torch
from interpreter import run_interpreted

from m4v.ops.modulation import (
    _GatedResidual,
    _LayerNormModulate,
    gated_residual,
    layer_norm_modulate,
)


def reference(x, shift, scale, gate, y, eps=1e-6):
    """LayerNorm by its definition (biased variance), then the two ops, in float64; y covers the
    last rows of x (zeros before)."""
    x, shift, scale, gate, y = (t.double() for t in (x, shift, scale, gate, y))
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    h = (x - mean) / torch.sqrt(var + eps) * (1 + scale[:, None]) + shift[:, None]
    padded = torch.cat([y.new_zeros(x.shape[0], x.shape[1] - y.shape[1], x.shape[2]), y], 1)
    return h, x + gate[:, None] * padded


def make_case(b, length, d, dtypes, seed, device="cpu", start=0):
    """x as a strided view (every other row of a wider tensor), the per-sample vectors and y
    (the last ``length - start`` rows) in the given dtypes (x, per-sample, y)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(b, 2 * length, d, generator=g) * 3 + 1
    x = wide.to(device, dtypes[0])[:, ::2]
    shift, scale, gate = (torch.randn(b, d, generator=g).to(device, dtypes[1]) for _ in range(3))
    y = torch.randn(b, length - start, d, generator=g).to(device, dtypes[2])
    return x, shift, scale, gate, y


def check(ln_fn, gr_fn, case, tol):
    """Outputs and every gradient (random output gradients) within tol (relative L2)."""
    leaves = [t.detach().clone().requires_grad_() for t in case]
    ref_leaves = [t.detach().double().requires_grad_() for t in case]
    x, shift, scale, gate, y = leaves
    h, out = ln_fn(x, shift, scale), gr_fn(x, gate, y, x.shape[1] - y.shape[1])
    # PyTorch's type promotion, as the composition has it
    assert h.dtype == torch.promote_types(x.dtype, shift.dtype)
    assert out.dtype == torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))
    ref_h, ref_out = reference(*ref_leaves)
    g = torch.Generator().manual_seed(9)
    dh, dout = (torch.randn(t.shape, generator=g).to(t.device, t.dtype) for t in (h, out))
    grads = torch.autograd.grad([h, out], leaves, [dh, dout])
    ref_grads = torch.autograd.grad([ref_h, ref_out], ref_leaves, [dh.double(), dout.double()])
    names = ["h", "out", "x", "shift", "scale", "gate", "y"]
    for name, a, b, leaf in zip(names, [h, out, *grads], [ref_h, ref_out, *ref_grads],
                                [h, out, *leaves], strict=True):
        assert a.dtype == leaf.dtype, name
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < tol, (name, err)


def test_torch_path_matches_reference():
    f32 = (torch.float32,) * 3
    check(layer_norm_modulate, gated_residual, make_case(2, 5, 12, f32, seed=0), 1e-6)
    check(layer_norm_modulate, gated_residual, make_case(2, 5, 12, f32, seed=0, start=2), 1e-6)


INTERPRETED = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_modulation import check, make_case
from m4v.ops import modulation as m

ln = lambda x, shift, scale: m._LayerNormModulate.apply(x, shift, scale, 1e-6)
gr = m._GatedResidual.apply
f32, bf16 = torch.float32, torch.bfloat16
# runs of 18 backward rows, the last ragged; a width that is not a power of two
m.BWD_PROGRAMS = 8
assert m._bwd_grid(2, 70) == (18, 4)
check(ln, gr, make_case(2, 70, 24, (f32, f32, f32), seed=1), 1e-5)
# y covering the last 61 rows only (the video after 9 text rows)
check(ln, gr, make_case(2, 70, 24, (f32, f32, f32), seed=4, start=9), 1e-5)
# bf16 activations with float32 per-sample vectors, and the residual stream in float32
check(ln, gr, make_case(1, 9, 16, (bf16, f32, bf16), seed=2), 1e-2)
check(ln, gr, make_case(1, 9, 16, (f32, bf16, bf16), seed=3), 1e-2)
"""


def test_kernels_in_interpreter():
    """The Triton kernels on the CPU in Triton's interpreter (chosen when the kernels are
    defined, hence a fresh process)."""
    run_interpreted(INTERPRETED)


@pytest.mark.gpu
@pytest.mark.parametrize("dtypes, tol", [((torch.float32,) * 3, 1e-5),
                                         ((torch.bfloat16,) * 3, 1e-2),
                                         ((torch.float32, torch.bfloat16, torch.bfloat16), 1e-2)])
def test_kernels_on_cuda(dtypes, tol):
    check(layer_norm_modulate, gated_residual, make_case(2, 300, 1920, dtypes, 4, "cuda"), tol)
    check(layer_norm_modulate, gated_residual,
          make_case(2, 300, 1920, dtypes, 5, "cuda", start=77), tol)


def test_rejects_bad_shapes():
    # checked before any launch: the CPU sees the errors the GPU would
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"\(b, d\) = \(2, 4\), got \(2, 5\)"):
        _LayerNormModulate.apply(x, torch.zeros(2, 5), torch.zeros(2, 4), 1e-6)
    with pytest.raises(ValueError, match="x must be"):
        _GatedResidual.apply(x[0], torch.zeros(2, 4), x[0], 0)
    with pytest.raises(ValueError, match=r"y must be \(b, L - start, d\) = \(2, 3, 4\)"):
        _GatedResidual.apply(x, torch.zeros(2, 4), x[:, :2], 0)
    with pytest.raises(ValueError, match=r"= \(2, 1, 4\) for x \(2, 3, 4\) and start 2"):
        _GatedResidual.apply(x, torch.zeros(2, 4), x, 2)
