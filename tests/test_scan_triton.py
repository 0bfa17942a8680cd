"""The Triton selective scan against a float64 sequential loop (and mamba-ssm when importable).

GPU tests are marked ``gpu`` (skipped without CUDA). The reference is written here, step by step,
independently of the kernel and of the other backends. Inputs are drawn fresh, half-precision
inputs are rounded first and the reference sees the same rounded values, so the only differences
are the kernel's fp32 arithmetic and the rounding of its outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from interpreter import run_interpreted

pytest.importorskip("triton")
from m4v.ops.scan_triton import ScanKernelConfig, chunk_tiles, selective_scan_triton  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """float64 step-by-step recurrence; returns (out (b, d, l), last state (b, d, n))."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    dt = delta if delta_bias is None else delta + delta_bias.double()[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        x = (dt[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        h = torch.exp(dt[:, :, t, None] * A) * h + x
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.double()[:, None] * u
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def make_inputs(b, d, n, length, dtype, *, with_D=True, with_z=True, with_bias=True,
                softplus=True, seed=0, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    # delta: softplus(N(-2.5, 1)) ~ 0.08 as in a trained Mamba; positive directly otherwise
    delta = rnd(b, d, length, shift=-2.5) if softplus else rnd(b, d, length).abs() * 0.1
    inputs = dict(
        u=rnd(b, d, length).to(dtype), delta=delta.to(dtype),
        A=-torch.exp(rnd(d, n, scale=0.5, shift=1.0)),  # roughly Mamba's -[1..n]
        B=rnd(b, n, length).to(dtype), C=rnd(b, n, length).to(dtype),
        D=rnd(d) if with_D else None, z=rnd(b, d, length).to(dtype) if with_z else None,
        # without softplus a negative step would make the recurrence grow: keep it positive
        delta_bias=(rnd(d, scale=0.5) if softplus else rnd(d).abs() * 0.05) if with_bias else None,
    )
    return inputs


def rel_err(x, ref):
    """Relative L2 error; the 1e-6 floor keeps exactly-zero references (dA after a single step)
    from turning fp32 rounding into an infinite relative error."""
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-6)).item()


def check_against_loop(inputs, softplus, tol, *, config=None, last_state=True):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    res = selective_scan_triton(**leaves, delta_softplus=softplus, return_last_state=last_state,
                                config=config)
    out, last = res if last_state else (res, None)
    assert out.dtype == inputs["u"].dtype and out.shape == inputs["u"].shape
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    ref_out, ref_last = scan_loop(**ref_leaves, delta_softplus=softplus)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref_out) < tol, rel_err(out, ref_out)
    # fixed loss weights: the test must not pass or fail by the draw
    g = torch.Generator(device=ref_out.device).manual_seed(0)
    g_out = torch.randn(ref_out.shape, generator=g, dtype=ref_out.dtype, device=ref_out.device)
    loss, ref_loss = (out.double() * g_out).sum(), (ref_out * g_out).sum()
    if last_state:
        assert last.dtype == torch.float32 and rel_err(last, ref_last) < tol
        g_last = torch.randn(ref_last.shape, generator=g, dtype=ref_last.dtype,  # mamba-ssm
                             device=ref_last.device)  # drops this gradient; we propagate it
        loss, ref_loss = loss + (last.double() * g_last).sum(), ref_loss + (ref_last * g_last).sum()
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    ref_grads = torch.autograd.grad(ref_loss, [ref_leaves[k] for k in names])
    for name, gr, ref in zip(names, grads, ref_grads, strict=True):
        assert gr.dtype == leaves[name].dtype, name
        assert torch.isfinite(gr).all(), name
        assert rel_err(gr, ref) < tol, (name, rel_err(gr, ref))


# more channels than threads, and a chunk per tile (as many chunks as the sequence has tiles)
SMALL = ScanKernelConfig(fwd_block_l=4, fwd_block_d=64, fwd_programs_per_sm=1024,
                         bwd_block_l=4, bwd_block_d=64, bwd_programs_per_sm=1024)
# tile rows spread over several threads (time crosses lanes), different tiles and channel
# blocks forward and backward, hence different chunks, and a few chunks only; the forward's
# tiles longer than the backward's (it runs on the backward's to save their states)
SPLIT = ScanKernelConfig(fwd_block_l=32, fwd_block_d=2, fwd_warps=2, fwd_programs_per_sm=1,
                         bwd_block_l=8, bwd_block_d=8, bwd_warps=1, bwd_programs_per_sm=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 1e-2)])
def test_all_options_match_loop(dtype, tol):
    # d and l not multiples of the tiles: padding rows and steps on both sides
    inputs = make_inputs(2, 37, 16, 301, dtype, seed=1)
    check_against_loop(inputs, True, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("opts", [
    dict(with_D=False, with_z=False, with_bias=False, softplus=False),
    dict(with_D=True, with_z=False, with_bias=True, softplus=False),
    dict(with_D=False, with_z=True, with_bias=False, softplus=True),
])
def test_optional_inputs_match_loop(opts):
    inputs = make_inputs(1, 12, 4, 97, torch.float32, seed=2, **opts)
    check_against_loop(inputs, opts["softplus"], 2e-4, config=SMALL, last_state=False)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, SPLIT], ids=["default", "split"])
def test_long_sequence_many_tiles(config):
    # tens of tiles: state carried across tiles forward and adjoint carried backward
    inputs = make_inputs(1, 16, 16, 2560, torch.float32, seed=3)
    check_against_loop(inputs, True, 2e-4, config=config)
    with torch.no_grad():  # the forward's own tiles
        out, last = selective_scan_triton(**inputs, delta_softplus=True, return_last_state=True,
                                          config=config)
    ref_out, ref_last = scan_loop(**inputs, delta_softplus=True)
    assert rel_err(out, ref_out) < 2e-4 and rel_err(last, ref_last) < 2e-4


@pytest.mark.gpu
def test_single_step_and_mixed_dtypes():
    inputs = make_inputs(1, 5, 3, 1, torch.bfloat16, seed=4)
    check_against_loop(inputs, True, 1e-2)
    # B, C in float32 with bf16 u (mamba-ssm requires equal dtypes; we upcast)
    inputs = make_inputs(2, 9, 8, 70, torch.bfloat16, seed=5)
    inputs["B"], inputs["C"] = inputs["B"].float(), inputs["C"].float()
    check_against_loop(inputs, True, 1e-2, config=SMALL)


@pytest.mark.gpu
def test_no_grad_matches_and_backward_is_deterministic():
    inputs = make_inputs(1, 64, 16, 700, torch.bfloat16, seed=6)
    ref, _ = scan_loop(**inputs, delta_softplus=True)
    with torch.no_grad():  # no checkpoints: the forward's own (longer) tiles
        out_ng = selective_scan_triton(**inputs, delta_softplus=True)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out = selective_scan_triton(**leaves, delta_softplus=True)
    assert rel_err(out_ng, ref) < 1e-2 and rel_err(out, ref) < 1e-2
    # the two tilings sum in different orders: equal up to the bf16 rounding of the output
    assert rel_err(out_ng, out.double()) < 1e-2
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, list(leaves.values()), g, retain_graph=True)
    second = torch.autograd.grad(out, list(leaves.values()), g)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_matches_mamba_ssm():
    interface = pytest.importorskip("mamba_ssm.ops.selective_scan_interface")
    inputs = make_inputs(2, 96, 16, 1500, torch.bfloat16, seed=7)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ref_leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out = selective_scan_triton(**leaves, delta_softplus=True)
    ref = interface.selective_scan_fn(**ref_leaves, delta_softplus=True)
    exact, _ = scan_loop(**inputs, delta_softplus=True)
    # both within bf16 rounding of the exact result, and of each other
    assert rel_err(out, exact) < 1e-2 and rel_err(ref, exact) < 1e-2
    assert rel_err(out, ref.double()) < 1e-2
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), g)
    ref_grads = torch.autograd.grad(ref, list(ref_leaves.values()), g)
    for name, a, b in zip(leaves, grads, ref_grads, strict=True):
        assert rel_err(a, b.double()) < 2e-2, (name, rel_err(a, b.double()))


def model_layout(inputs):
    """u and z as a mixer that applies in_proj as nn.Linear would pass them (M4V's did, before it
    applied the projections weight-first): the two channel halves of a (b, l, 2d) output,
    transposed to (b, d, l): strided views, not dense tensors."""
    xz = torch.cat([inputs["u"], inputs["z"]], 1).transpose(1, 2).contiguous().transpose(1, 2)
    u, z = xz.chunk(2, 1)
    assert not z.is_contiguous()
    return {**inputs, "u": u, "z": z}


@pytest.mark.gpu
def test_model_layout_views():
    # a dz allocated in z's stride order once came back scrambled (NaN in training)
    check_against_loop(model_layout(make_inputs(2, 24, 16, 150, torch.bfloat16, seed=8)), True,
                       1e-2, config=SMALL)


INTERPRETED = """
import sys, torch, triton, triton.language as tl
sys.path.insert(0, {tests!r})
from test_scan_triton import ScanKernelConfig, check_against_loop, make_inputs, model_layout
from m4v.ops import scan_triton

@triton.jit
def column_sums(x_ptr, sums_ptr, tile_ptr, R: tl.constexpr, W: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * W + tl.arange(0, W)[None, :]
    x = tl.load(x_ptr + offs)
    tl.store(sums_ptr + tl.arange(0, R), scan_triton._column_sums(x))
    tl.store(tile_ptr + offs, scan_triton._from_columns(scan_triton._columns(x)))

# the reduce-scatter: row r holds the sum of column r // (R / W); columns split and rejoined
g = torch.Generator().manual_seed(0)
for R, W in ((32, 8), (32, 1), (16, 16), (64, 4)):
    x = torch.randn(R, W, dtype=torch.float64, generator=g).float()
    sums, tile = torch.empty(R), torch.empty(R, W)
    column_sums[(1,)](x, sums, tile, R, W)
    want = x.double().sum(0)[torch.arange(R) // (R // W)]
    assert (sums.double() - want).abs().max() < 1e-5, (R, W)
    assert torch.equal(tile, x), (R, W)
# a saved state every other forward tile; then forward tiles longer than the backward's, and a
# state size that is not a power of two (the state buffers' vectors padded)
for n, tiles in ((4, ScanKernelConfig(fwd_block_l=4, fwd_block_d=4, fwd_programs_per_sm=2,
                                      bwd_block_l=8, bwd_block_d=8, bwd_programs_per_sm=2)),
                 (3, ScanKernelConfig(fwd_block_l=8, fwd_block_d=8, fwd_programs_per_sm=2,
                                      bwd_block_l=4, bwd_block_d=4, bwd_programs_per_sm=2))):
    inputs = model_layout(make_inputs(1, 6, n, 37, torch.float32, seed=3, device="cpu"))
    check_against_loop(inputs, True, 2e-4, config=tiles)
# bf16 inputs: B and C are read in their own dtypes, also when these differ
inputs = make_inputs(1, 6, 4, 37, torch.bfloat16, seed=4, device="cpu")
for C in (inputs["C"], inputs["C"].float()):
    check_against_loop(dict(inputs, C=C), True, 1e-2, config=tiles)
"""


def test_kernels_in_interpreter():
    """Forward and backward kernels on the CPU in Triton's interpreter (which is chosen when
    the kernels are defined, hence a fresh process): several tiles and chunks of steps, one or
    two channel blocks with padding, the model's strided u and z."""
    run_interpreted(INTERPRETED)


@pytest.mark.parametrize("n_tiles, rows, target, per_chunk", [
    (100, 10, 40, 25),  # 4 chunks of 25 tiles make 40 programs
    (100, 10, 45, 20),  # 5 chunks (50 programs): the fewest that reach the target
    (100, 64, 40, 100),  # the channels alone fill the GPU: one chunk
    (7, 1, 1000, 1),  # never less than a tile per chunk
    (10, 3, 12, 3),  # 4 chunks asked, 10 tiles: 3 + 3 + 3 + 1
])
def test_chunk_tiles(n_tiles, rows, target, per_chunk):
    assert chunk_tiles(n_tiles, rows, target) == per_chunk


def test_rejects_bad_inputs():
    u = torch.zeros(1, 4, 8)
    good = dict(u=u, delta=u, A=torch.zeros(4, 2), B=torch.zeros(1, 2, 8), C=torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_triton(**{**good, "A": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan_triton(**{**good, "B": torch.zeros(1, 3, 8)})
    with pytest.raises(ValueError, match="delta_bias must have shape"):
        selective_scan_triton(**good, delta_bias=torch.zeros(5))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        selective_scan_triton(**{**good, "u": u.double()})
    with pytest.raises(ValueError, match="state size n"):
        selective_scan_triton(**{**good, "A": torch.zeros(4, 65), "B": torch.zeros(1, 65, 8),
                                 "C": torch.zeros(1, 65, 8)})
    with pytest.raises(ValueError, match="power of two"):
        ScanKernelConfig(bwd_block_l=48)
    with pytest.raises(ValueError, match="bwd_block_d .4. must be >= bwd_block_l .8."):
        ScanKernelConfig(bwd_block_d=4, bwd_block_l=8)
    with pytest.raises(ValueError, match="maxnreg must be in"):
        ScanKernelConfig(bwd_maxnreg=300)
    with pytest.raises(ValueError, match="needs CUDA"):
        selective_scan_triton(**good)
