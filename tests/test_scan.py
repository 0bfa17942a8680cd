import math

import pytest
import torch
import torch.nn.functional as F

from m4v.ops import scan_torch
from m4v.ops.scan import (
    available_backends,
    backend_unavailable_reason,
    resolve_backend,
    selective_scan,
    selective_scan_backward_flops,
    selective_scan_flops,
)
from m4v.ops.scan_reference import selective_scan_reference

F64 = torch.float64
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(b=2, d=3, n=4, length=37, dtype=F64, seed=0, optional=("D", "z", "delta_bias")):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    x = dict(
        u=r(b, d, length),
        # positive steps, so the recurrence decays also without softplus
        delta=torch.rand(b, d, length, generator=g, dtype=dtype) * 0.5,
        A=-torch.rand(d, n, generator=g, dtype=dtype) * 2,
        B=r(b, n, length),
        C=r(b, n, length),
        D=r(d),
        z=r(b, d, length),
        delta_bias=r(d) * 0.1,
    )
    return {k: v for k, v in x.items() if k in ("u", "delta", "A", "B", "C") or k in optional}


def outputs_and_grads(x, backend, delta_softplus, through_last_state=True):
    """out, last state and the gradients of a fixed random functional of both (or of out)."""
    x = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    out, last = selective_scan(
        **x, delta_softplus=delta_softplus, return_last_state=True, backend=backend
    )
    g = torch.Generator().manual_seed(123)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    w_last = torch.randn(last.shape, generator=g, dtype=last.dtype).to(last.device)
    w_last = w_last * through_last_state
    loss = (out * w_out).sum() + (last * w_last).sum()
    grads = torch.autograd.grad(loss, list(x.values()))
    return out, last, dict(zip(x, grads, strict=True))


def assert_close_rel(actual, expected, rtol, name=""):
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:g}"


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 steps and blocks of 3 chunks (for b * d * n = 24), so short sequences cross
    both boundaries."""
    monkeypatch.setattr(scan_torch, "DEFAULT_CHUNK", 4)
    monkeypatch.setattr(scan_torch, "BLOCK_ELEMENTS", 12 * 24)


def test_reference_matches_hand_unrolled_recurrence():
    """l = 3, n = 1: the state-space recurrence written out by hand."""
    u, delta, z = [0.5, -1.0, 2.0], [0.3, -0.2, 0.7], [0.4, -1.5, 0.9]
    A, B, C, D, bias = -0.8, [1.0, -2.0, 0.5], [0.7, 0.1, -1.2], 0.25, 0.1
    dt = [math.log1p(math.exp(v + bias)) for v in delta]  # softplus(delta + bias)
    h, expected = 0.0, []
    for t in range(3):
        h = math.exp(dt[t] * A) * h + dt[t] * B[t] * u[t]
        y = C[t] * h + D * u[t]
        expected.append(y * z[t] / (1 + math.exp(-z[t])))  # y * silu(z)

    def t3(v):
        return torch.tensor(v, dtype=F64).view(1, 1, 3)

    out, last = selective_scan_reference(
        t3(u),
        t3(delta),
        torch.tensor([[A]], dtype=F64),
        t3(B),
        t3(C),
        D=torch.tensor([D], dtype=F64),
        z=t3(z),
        delta_bias=torch.tensor([bias], dtype=F64),
        delta_softplus=True,
    )
    torch.testing.assert_close(out.view(-1), torch.tensor(expected, dtype=F64), rtol=1e-14, atol=0)
    assert last.item() == pytest.approx(h, rel=1e-14)


def test_reference_without_optional_terms_is_the_bare_recurrence():
    x = make_inputs(b=1, d=2, n=3, length=5, optional=())
    out, last = selective_scan_reference(**x)
    h = torch.zeros(1, 2, 3, dtype=F64)
    for t in range(5):
        dt = x["delta"][0, :, t, None]
        h = torch.exp(dt * x["A"]) * h + dt * x["u"][0, :, t, None] * x["B"][0, :, t]
        assert torch.allclose(out[0, :, t], (h * x["C"][0, :, t]).sum(-1), rtol=1e-14, atol=0)
    assert torch.allclose(last, h, rtol=1e-14, atol=0)


@pytest.mark.parametrize("delta_softplus", [False, True])
@pytest.mark.parametrize(
    "optional", [("D", "z", "delta_bias"), (), ("D",), ("z",), ("delta_bias",)]
)
def test_torch_backend_matches_reference_values_and_gradients(delta_softplus, optional):
    x = make_inputs(length=45, optional=optional)  # 45 = 2 full chunks of 16 + 13 steps
    ref = outputs_and_grads(x, "reference", delta_softplus)
    got = outputs_and_grads(x, "torch", delta_softplus)
    assert_close_rel(got[0], ref[0], 1e-12, "out")
    assert_close_rel(got[1], ref[1], 1e-12, "last_state")
    assert set(got[2]) == set(x)
    for name in x:
        assert_close_rel(got[2][name], ref[2][name], 1e-10, f"d{name}")


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 11, 12, 13, 24, 37])
def test_torch_backend_across_chunk_and_block_boundaries(small_chunks, length):
    assert scan_torch.scan_geometry(2, 3, 37, 4) == (4, 12)
    x = make_inputs(length=length, seed=length)
    ref = outputs_and_grads(x, "reference", True)
    got = outputs_and_grads(x, "torch", True)
    for a, b, name in [(got[0], ref[0], "out"), (got[1], ref[1], "last")] + [
        (got[2][k], ref[2][k], f"d{k}") for k in x
    ]:
        assert_close_rel(a, b, 1e-10, name)


@pytest.mark.parametrize("chunk,block", [(1, 1), (3, 9), (5, 10), (4, 40), (8, 16)])
def test_chunked_forward_with_explicit_geometry(chunk, block):
    x = make_inputs(length=37)
    ref_out, ref_last = selective_scan_reference(**x, delta_softplus=True)
    args = [x.get(k) for k in NAMES]
    out, last = scan_torch.scan_forward(*args, True, chunk=chunk, block=block)
    assert_close_rel(out, ref_out, 1e-12, "out")
    assert_close_rel(last, ref_last, 1e-12, "last")
    dout = torch.randn_like(ref_out)
    grads = scan_torch.scan_backward(dout, None, *args, True, chunk=chunk, block=block)
    ref_grads = scan_torch.scan_backward(dout, None, *args, True, chunk=37, block=37)
    for name, a, b in zip(NAMES, grads, ref_grads, strict=True):
        assert_close_rel(a, b, 1e-12, f"d{name}")


def test_growing_modes_with_positive_A_match_reference():
    x = make_inputs(length=30)
    x["A"] = torch.randn(3, 4, dtype=F64)  # mixed signs: some modes grow
    ref = outputs_and_grads(x, "reference", False)
    got = outputs_and_grads(x, "torch", False)
    assert_close_rel(got[0], ref[0], 1e-11, "out")
    for name in x:
        assert_close_rel(got[2][name], ref[2][name], 1e-10, f"d{name}")


def test_strong_decay_does_not_overflow_in_float32():
    """dt * A of -400 per step: exp(-cumsum) would overflow float32 within one step."""
    x = make_inputs(b=1, d=4, n=16, length=200, dtype=torch.float32)
    x["delta"] = x["delta"] + 25.0
    x["A"] = -torch.arange(1, 17, dtype=torch.float32).repeat(4, 1)
    ref = outputs_and_grads(x, "reference", True)
    got = outputs_and_grads(x, "torch", True)
    assert torch.isfinite(got[0]).all()
    assert_close_rel(got[0], ref[0], 1e-5, "out")
    for name in x:
        assert torch.isfinite(got[2][name]).all()
        assert_close_rel(got[2][name], ref[2][name], 1e-4, f"d{name}")


def test_float32_long_sequence_matches_reference():
    x = make_inputs(b=1, d=8, n=16, length=700, dtype=torch.float32)
    out = selective_scan(**x, delta_softplus=True, backend="torch")
    ref = selective_scan(**x, delta_softplus=True, backend="reference")
    assert out.dtype == torch.float32
    assert_close_rel(out, ref, 1e-5, "out")


def test_dtypes_follow_mamba_ssm():
    x = make_inputs(dtype=torch.float32)
    x["u"] = x["u"].to(torch.bfloat16)
    out, last = selective_scan(**x, delta_softplus=True, return_last_state=True, backend="torch")
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    x["u"] = x["u"].detach().requires_grad_()
    selective_scan(**x, backend="torch").float().sum().backward()
    assert x["u"].grad.dtype == torch.bfloat16
    x64 = make_inputs()
    out, last = selective_scan(**x64, return_last_state=True, backend="torch")
    assert out.dtype == F64 and last.dtype == F64


def test_non_contiguous_inputs():
    x = make_inputs(length=20)
    x["B"] = x["B"].transpose(1, 2).contiguous().transpose(1, 2)  # (b, n, l) with l-major memory
    x["u"] = x["u"][:, :, ::1].transpose(0, 0)
    assert not x["B"].is_contiguous()
    torch.testing.assert_close(
        selective_scan(**x, backend="torch"),
        selective_scan(**x, backend="reference"),
        rtol=1e-12,
        atol=1e-12,
    )


def test_gradcheck_through_the_custom_op(small_chunks):
    x = make_inputs(b=1, d=2, n=2, length=9)  # chunks of 4: crosses 2 chunk boundaries
    names = list(x)

    def fn(*tensors):
        kw = dict(zip(names, tensors, strict=True))
        return selective_scan(**kw, delta_softplus=True, return_last_state=True, backend="torch")

    inputs = tuple(v.detach().requires_grad_() for v in x.values())
    assert torch.autograd.gradcheck(fn, inputs)


def test_opcheck_schema_fake_and_autograd_registration():
    x = make_inputs(b=1, d=2, n=3, length=7)
    args = tuple(x.get(k) for k in NAMES) + (True,)
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
    # aot_dispatch_dynamic (torch.compile with dynamic shapes) is left out: slow, and the
    # scan is opaque to the compiler anyway.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    op = torch.ops.m4v.selective_scan.default
    torch.library.opcheck(op, args, test_utils=checks)
    torch.library.opcheck(op, args[:5] + (None, None, None, False), test_utils=checks)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_meta_device_gives_shapes_and_dtypes(backend):
    b, d, n, length = 2, 1536, 16, 4000
    meta = dict(device="meta")
    out, last = selective_scan(
        torch.empty(b, d, length, dtype=torch.bfloat16, **meta),
        torch.empty(b, d, length, **meta),
        torch.empty(d, n, **meta),
        torch.empty(b, n, length, **meta),
        torch.empty(b, n, length, **meta),
        D=torch.empty(d, **meta),
        z=torch.empty(b, d, length, **meta),
        delta_bias=torch.empty(d, **meta),
        delta_softplus=True,
        return_last_state=True,
        backend=backend if backend != "reference" else "torch",
    )
    assert out.device.type == "meta" and out.shape == (b, d, length)
    assert out.dtype == torch.bfloat16
    assert last.shape == (b, d, n) and last.dtype == torch.float32


def test_auto_picks_torch_off_cuda():
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("auto", "meta") == "torch"
    assert available_backends("cpu")[:2] == ["torch", "reference"]


class _ScanModule(torch.nn.Module):
    def forward(self, u, delta, A, B, C, z):
        return selective_scan(u, delta, A, B, C, z=z, delta_softplus=True) * 2


def test_jit_trace_shows_one_named_op():
    x = make_inputs(dtype=torch.float32, optional=("z",))
    traced = torch.jit.trace(_ScanModule(), tuple(x.values()))
    kinds = [node.kind() for node in traced.graph.nodes()]
    assert kinds.count("m4v::selective_scan") == 1
    assert not any(k.startswith("aten::exp") or k.startswith("aten::cumsum") for k in kinds)
    torch.testing.assert_close(traced(*x.values()), _ScanModule()(*x.values()))


def test_fvcore_sees_the_scan_as_one_unsupported_op():
    fvcore_nn = pytest.importorskip("fvcore.nn")
    x = make_inputs(dtype=torch.float32, optional=("z",))
    analysis = fvcore_nn.FlopCountAnalysis(_ScanModule(), tuple(x.values()))
    analysis.unsupported_ops_warnings(False)
    analysis.total()
    assert analysis.unsupported_ops()["m4v::selective_scan"] == 1


def test_flop_counter_uses_the_registered_formulas():
    from torch.utils.flop_counter import FlopCounterMode

    b, d, n, length = 2, 3, 4, 10
    x = {k: v.requires_grad_() for k, v in make_inputs(b, d, n, length).items()}
    with FlopCounterMode(display=False) as counter:
        selective_scan(**x, delta_softplus=True, backend="torch").sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.m4v.selective_scan] == selective_scan_flops(
        b, d, length, n, True, True, True, True
    )
    assert counts[torch.ops.m4v.selective_scan_backward] == selective_scan_backward_flops(
        b, d, length, n, True, True, True, True
    )


def test_flop_formula_terms():
    b, d, length, n = 2, 5, 7, 16
    bdl = b * d * length
    assert selective_scan_flops(b, d, length, n, False, False) == bdl * (7 * n + 1)
    assert selective_scan_flops(b, d, length, n, True, True) == bdl * (7 * n + 1 + 2 + 5)
    assert selective_scan_flops(b, d, length, n, True, False, multiply_add_as_one=True) == bdl * (
        5 * n + 1 + 1
    )
    assert selective_scan_flops(b, d, length, n, False, False, True, True) == bdl * (7 * n + 4)
    assert selective_scan_backward_flops(b, d, length, n, False, False) == bdl * (20 * n + 4)


# ----------------------------------------------------------------------------- bad input

GOOD = make_inputs(b=2, d=3, n=4, length=5)


@pytest.mark.parametrize(
    "name,bad,match",
    [
        ("u", torch.zeros(2, 3), r"u must be a tensor of shape \(b, d, l\), got \(2, 3\)"),
        ("u", torch.zeros(2, 3, 0, dtype=F64), r"l >= 1"),
        (
            "delta",
            torch.zeros(2, 3, 6, dtype=F64),
            r"delta must have shape \(b, d, l\) = \(2, 3, 5\)",
        ),
        ("A", torch.zeros(4, 4, dtype=F64), r"A must have shape \(d, n\) with d = 3, got \(4, 4\)"),
        ("B", torch.zeros(2, 5, 5, dtype=F64), r"B must have shape \(b, n, l\) = \(2, 4, 5\)"),
        ("B", torch.zeros(3, 4, dtype=F64), r"B of shape \(3, 4\) \(time-invariant"),
        ("C", torch.zeros(2, 1, 4, 5, dtype=F64), r"grouped C"),
        ("D", torch.zeros(4, dtype=F64), r"D must have shape \(d,\) = \(3,\), got \(4,\)"),
        ("z", torch.zeros(2, 3, 4, dtype=F64), r"z must have shape \(b, d, l\)"),
        ("delta_bias", torch.zeros(1, dtype=F64), r"delta_bias must have shape \(d,\)"),
        ("C", torch.zeros(2, 4, 5, dtype=torch.long), r"C must be a real floating-point tensor"),
        ("A", torch.zeros(3, 4, dtype=torch.complex64), r"A must be a real floating-point tensor"),
        ("D", [1.0, 2.0, 3.0], r"D must be a tensor"),
        ("z", torch.zeros(2, 3, 5, device="meta"), r"z is on meta, expected u's device cpu"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_argument(name, bad, match):
    x = dict(GOOD, **{name: bad})
    with pytest.raises(ValueError, match=match):
        selective_scan(**x)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cuda'"):
        selective_scan(**GOOD, backend="cuda")


@pytest.mark.parametrize("backend", ["triton", "mamba_ssm"])
def test_gpu_backends_on_cpu_tensors_say_why(backend):
    with pytest.raises(RuntimeError, match=f"{backend}.*needs CUDA tensors, got tensors on cpu"):
        selective_scan(**GOOD, backend=backend)


def test_unimportable_mamba_ssm_says_why():
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    except Exception:
        reason = backend_unavailable_reason("mamba_ssm", "cuda")
        assert reason is not None and reason.startswith("mamba_ssm is not importable: ")
    else:
        pytest.skip("mamba_ssm is importable here")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "mamba_ssm"])
def test_gpu_backends_match_reference(backend):
    if backend_unavailable_reason(backend, "cuda") is not None:
        pytest.skip(backend_unavailable_reason(backend, "cuda"))
    x = make_inputs(b=2, d=64, n=16, length=300, dtype=torch.float32)
    # mamba-ssm's backward ignores the gradient of the last state
    through_last = backend != "mamba_ssm"
    ref = outputs_and_grads(x, "reference", True, through_last)
    got = outputs_and_grads({k: v.cuda() for k, v in x.items()}, backend, True, through_last)
    assert_close_rel(got[0].cpu(), ref[0], 1e-4, "out")
    assert_close_rel(got[1].cpu(), ref[1], 1e-4, "last_state")
    for name in x:
        assert_close_rel(got[2][name].cpu(), ref[2][name], 1e-3, f"d{name}")


@pytest.mark.gpu
def test_auto_prefers_a_fused_kernel_on_cuda():
    expected = next((b for b in ("triton", "mamba_ssm")
                     if backend_unavailable_reason(b, "cuda") is None), "torch")
    assert resolve_backend("auto", "cuda") == expected


def test_softplus_matches_torch_definition():
    """delta_softplus uses torch's softplus (threshold 20), as mamba-ssm's reference does."""
    x = make_inputs(length=6, optional=())
    x["delta"] = x["delta"] * 60 - 10  # both sides of the threshold
    out = selective_scan(**x, delta_softplus=True, backend="torch")
    manual = selective_scan(**dict(x, delta=F.softplus(x["delta"])), backend="reference")
    assert_close_rel(out, manual, 1e-12, "out")


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fast_softplus_is_within_an_ulp_or_two(dtype):
    """The torch backend's softplus (vectorised kernels only) against float64 softplus."""
    # down to -80: float32 softplus stays a normal number; up to 120: far past the threshold
    x = torch.cat([torch.linspace(-80, 120, 100_001), torch.tensor([20.0, 19.99, 0.0])]).to(dtype)
    got = scan_torch._softplus(x)
    want = F.softplus(x.double())  # threshold 20: x itself above
    rel = ((got.double() - want).abs() / want).max()
    assert rel <= 2 * torch.finfo(dtype).eps, f"relative error {rel:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_torch_backend_leaves_its_inputs_alone(dtype):
    """The chunked scan works in place on its own buffers only (same-dtype .to() aliases)."""
    x = make_inputs(length=21, dtype=dtype)
    args = [x[k] for k in NAMES]
    before = [t.clone() for t in args]
    dout, dlast = torch.randn_like(x["u"]), torch.randn(2, 3, 4, dtype=dtype)
    saved = dout.clone(), dlast.clone()
    scan_torch.scan_forward(*args, True)
    scan_torch.scan_backward(dout, dlast, *args, True)
    for name, t, t0 in zip(NAMES, args, before, strict=True):
        assert torch.equal(t, t0), name
    assert torch.equal(dout, saved[0]) and torch.equal(dlast, saved[1])
