"""MM-DiM block vs the attention block on a GPU at 768x1280 x 121-frame token counts.

Blocks at the paper's width (1920): the MM-DiM block of ``m4v-2b`` (Mamba mixer, registers, zigzag
re-composition, text re-composition and the temporal branch on) and the single-stream attention
block of ``attention-2b`` (block-causal joint attention, flash SDPA per query group), bf16
weights and activations, batch 1. Two token layouts, both named in the output:

* ``pyramid``: the canonical forward (last latent frame at the last stage with its eq. (1)
  temporal-pyramid history): 13 x 240 + 960 + 3840 + 3840 video tokens + 128 text = 11,888;
* ``flat``: all 16 latent frames at full resolution: 16 x 3840 + 128 = 61,568 tokens.

For the MM-DiM block it also times, on the same shapes, (a) re-composition + its inverse
(``recompose`` + ``decompose``: text padding/orders, registers, zigzag gather and inverse) and
(b) the selective scan alone and (c) the causal conv1d + SiLU alone (the mixer's fused op and, as
its anchor, cuDNN's conv + crop + SiLU), and reports each as a share of the block's time, in wall
time (CUDA events) and in GPU-busy time (profiler: summed kernel time,
without launch gaps). The MM-DiM block's top kernels (forward+backward) are listed too. Forward and
forward+backward (gradients of inputs and weights), CUDA events, median of ``--repeats`` after
``--warmup``. ``--baseline-recomposition FILE`` also times another implementation of the
re-composition module (e.g. the previous version) for comparison.

    PYTHONPATH=. python benchmarks/block_gpu.py --out reports/benchmarks/block_gpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.profile import (
    Case,
    block_case,
    clip_geometry,
    clip_layout,
    cuda_kernel_events,
    device_name,
    forward_backward,
    gpu_busy_ms,
    peak_memory,
    time_case,
    time_fn,
    working_scan_backend,
    write_json,
)
from m4v.config import M4VConfig
from m4v.model import recomposition
from m4v.ops.causal_conv import causal_conv1d_silu
from m4v.ops.scan import resolve_backend, selective_scan

MODES = ("fwd", "fwdbwd")


def timed(fn_fwd, fn_fwdbwd, device, warmup, repeats) -> dict:
    out = {}
    for mode, fn in (("fwd", fn_fwd), ("fwdbwd", fn_fwdbwd)):
        t = time_fn(fn, device, warmup=warmup, repeats=repeats)
        t["peak_memory_bytes"] = peak_memory(fn, device)
        t["gpu_busy_ms"] = gpu_busy_ms(fn, device)
        out[mode] = t
    return out


def round_trip(module, x, mask, register, spec):
    """The block's re-composition and its inverse, joint stream in and out. A baseline module of
    an earlier API is called the way the block then called it: the inverse as text and video
    apart (``decompose``), or both ways apart (``recompose``)."""
    if hasattr(module, "sequence_to_joint"):
        seq = module.joint_to_sequence(x, mask, register, spec)
        return module.sequence_to_joint(seq, mask, spec)
    if hasattr(module, "joint_to_sequence"):
        return module.decompose(module.joint_to_sequence(x, mask, register, spec), mask, spec)
    lt = mask.shape[1]
    seq = module.recompose(x[:, :lt], mask, x[:, lt:], register, spec)
    return torch.cat(module.decompose(seq, mask, spec), 1)


def recomposition_case(module, block, layout, device, dtype):
    """Closures timing the re-composition round trip on the block's shapes."""
    g = torch.Generator(device=device).manual_seed(1)
    d = block.cfg.hidden_size
    x = torch.randn(1, layout.text_len + layout.video_len, d, device=device, dtype=dtype,
                    generator=g)
    mask = torch.ones(1, layout.text_len, dtype=torch.bool, device=device)
    register = block.register
    cfg = block.cfg
    spec = module.SequenceSpec(layout.frame_sizes, block.direction, cfg.registers,
                               cfg.text_recomposition)

    def fwd():
        with torch.no_grad():
            return round_trip(module, x, mask, register, spec)

    leaf = x.detach().requires_grad_(True)
    return fwd, forward_backward(lambda: round_trip(module, leaf, mask, register, spec), [leaf],
                                 [register])


def scan_case(block, layout, device, dtype):
    """Closures timing the block's selective scan alone, on its sequence length."""
    from harness.flops import scan_length

    mixer = block.mixer
    length = scan_length(block.cfg, layout)
    di, n = mixer.d_inner, mixer.d_state
    g = torch.Generator(device=device).manual_seed(2)
    rand = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    u = F.silu(rand(1, di, length))
    delta = 0.1 * rand(1, di, length)
    B, C, z = rand(1, n, length), rand(1, n, length), rand(1, di, length)
    A = -torch.exp(mixer.A_log.detach().float())
    D, bias = mixer.D.detach().float(), mixer.dt_proj.bias.detach().float()
    backend = mixer.scan_backend

    def fwd():
        with torch.no_grad():
            return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias,
                                  delta_softplus=True, backend=backend)

    leaves = [t.detach().requires_grad_(True) for t in (u, delta, A, B, C, D, z, bias)]

    def call():
        u_, d_, a_, b_, c_, dd_, z_, bias_ = leaves
        return selective_scan(u_, d_, a_, b_, c_, D=dd_, z=z_, delta_bias=bias_,
                              delta_softplus=True, backend=backend)

    return fwd, forward_backward(call, leaves, []), length


class _Mix(torch.nn.Module):
    """A block's token mixer alone (MM-DiM: re-composition + Mamba + inverse; attention: QKV +
    block-causal attention + projection) on the joint stream."""

    def __init__(self, block, layout, rope, mask):
        super().__init__()
        self.block, self.layout, self.rope, self.mask = block, layout, rope, mask

    def forward(self, x):
        return self.block.mix(x, self.layout, self.rope, self.mask)


def mixer_case(block_case_: Case, layout, device, dtype) -> Case:
    text, video, _, _, rope, mask = block_case_.args
    x = torch.cat([text, video], dim=1).detach().clone()
    return Case("mixer", _Mix(block_case_.module, layout, rope, mask), (x,), {}, (x,))


def conv_case(block, layout, device, dtype, backend: str):
    """Closures timing the Mamba mixer's causal conv1d + SiLU alone, on ``backend`` ("auto": the
    mixer's own, the fused Triton kernels on CUDA; "torch": cuDNN's conv, cropped, then SiLU)."""
    from harness.flops import scan_length

    conv = block.mixer.conv1d
    g = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(1, conv.in_channels, scan_length(block.cfg, layout), device=device,
                    dtype=dtype, generator=g)

    def op(t):
        return causal_conv1d_silu(t, conv.weight[:, 0], conv.bias, backend=backend)

    def fwd():
        with torch.no_grad():
            return op(x)

    leaf = x.detach().requires_grad_(True)
    return fwd, forward_backward(lambda: op(leaf), [leaf], list(conv.parameters()))


def top_kernels(fn, device, iters: int = 2, k: int = 40) -> list[dict]:
    """The ``k`` GPU kernels (and copies) with the most time per call of ``fn``."""
    per_name: dict[str, list] = {}
    for e in cuda_kernel_events(fn, device, iters):
        entry = per_name.setdefault(e.name, [0.0, 0])
        entry[0] += e.time_range.elapsed_us() / iters
        entry[1] += 1
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:k]
    return [{"kernel": name[:120], "us_per_call": us, "launches_per_call": n / iters}
            for name, (us, n) in ranked]


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("baseline_recomposition", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def attempt(results: dict, key: str, fn):
    """Run one measurement; a failure is recorded, not fatal (one GPU call must yield data)."""
    try:
        results[key] = fn()
    except Exception as e:  # noqa: BLE001
        results[key] = {"error": f"{type(e).__name__}: {e}"}
        traceback.print_exc()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    backend, note = working_scan_backend(device, args.scan_backend)
    mamba_cfg = M4VConfig.preset(args.presets[0]).replace(scan_backend=backend)
    attn_cfg = M4VConfig.preset(args.presets[1])
    geom = clip_geometry(*args.clip)
    baseline = load_module(args.baseline_recomposition) if args.baseline_recomposition else None
    out = {"device": device_name(device), "torch": torch.__version__, "dtype": args.dtype,
           "presets": args.presets, "width": mamba_cfg.hidden_size,
           "clip": f"{geom.height}x{geom.width}, {geom.frames} frames "
                   f"({geom.latent_frames} latent frames)", "batch": 1,
           "scan_backend": resolve_backend(mamba_cfg.scan_backend, device),
           "scan_backend_note": note,
           "warmup": args.warmup, "repeats": args.repeats, "layouts": {}}
    for name in args.layouts:
        layout = clip_layout(mamba_cfg, geom, name)
        out["layouts"][name] = measure_layout(layout, mamba_cfg, attn_cfg, baseline, device,
                                              dtype, args.warmup, args.repeats)
        write_json(out, args.out)  # after every layout: a crash later keeps what was measured
    return out


def measure_layout(layout, mamba_cfg, attn_cfg, baseline, device, dtype, warmup, repeats) -> dict:
    res = {"frame_tokens": layout.frame_lens, "text_tokens": layout.text_len,
           "sequence_tokens": layout.text_len + layout.video_len}
    block = block_case("core_block", mamba_cfg, layout, device, dtype)
    attempt(res, "mmdim_block",
            lambda: time_case(block, MODES, device, warmup=warmup, repeats=repeats))
    attempt(res, "mmdim_mixer", lambda: time_case(mixer_case(block, layout, device, dtype), MODES,
                                                  device, warmup=warmup, repeats=repeats))
    impls = [("recomposition", recomposition)]
    impls += [("recomposition_baseline", baseline)] if baseline is not None else []
    for key, module in impls:
        attempt(res, key, lambda m=module: timed(
            *recomposition_case(m, block.module, layout, device, dtype), device, warmup, repeats))

    def scan():
        fwd, fwdbwd, length = scan_case(block.module, layout, device, dtype)
        return {"length": length, **timed(fwd, fwdbwd, device, warmup, repeats)}

    attempt(res, "scan", scan)
    for key, backend in (("conv1d", "auto"), ("conv1d_cudnn", "torch")):
        attempt(res, key, lambda b=backend: timed(
            *conv_case(block.module, layout, device, dtype, b), device, warmup, repeats))
    if device.type == "cuda":
        for t in block.grad_inputs:
            t.requires_grad_(True)
        run = forward_backward(block, block.grad_inputs, list(block.module.parameters()))
        attempt(res, "mmdim_block_fwdbwd_kernels", lambda: top_kernels(run, device))
        for t in block.grad_inputs:
            t.requires_grad_(False)
    del block
    if device.type == "cuda":
        torch.cuda.empty_cache()
    block = block_case("core_block", attn_cfg, layout, device, dtype)
    attempt(res, "attention_block",
            lambda: time_case(block, MODES, device, warmup=warmup, repeats=repeats))
    attempt(res, "attention_mixer", lambda: time_case(mixer_case(block, layout, device, dtype),
                                                      MODES, device, warmup=warmup,
                                                      repeats=repeats))
    summarize(res)
    return res


def ms(res: dict, key: str, mode: str, field: str = "median_ms") -> float | None:
    entry = res.get(key, {})
    return entry.get(mode, {}).get(field) if "error" not in entry else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize(res: dict) -> None:
    """Speed-ups (attention / MM-DiM) and shares of the MM-DiM block, in wall and GPU time."""
    res["summary"] = {}
    for mode in MODES:
        row = {}
        for field, tag in (("median_ms", ""), ("gpu_busy_ms", "_gpu")):
            get = lambda key, f=field, m=mode: ms(res, key, m, f)  # noqa: E731
            row[f"speedup_vs_attention{tag}"] = ratio(get("attention_block"), get("mmdim_block"))
            row[f"mixer_speedup_vs_attention{tag}"] = ratio(get("attention_mixer"),
                                                            get("mmdim_mixer"))
            row[f"recomposition_share{tag}"] = ratio(get("recomposition"), get("mmdim_block"))
            row[f"scan_share{tag}"] = ratio(get("scan"), get("mmdim_block"))
            row[f"conv1d_share{tag}"] = ratio(get("conv1d"), get("mmdim_block"))
        res["summary"][mode] = row


def table(out: dict) -> str:
    lines = [f"{out['device']}, {out['presets']}, {out['clip']}, {out['dtype']}, batch 1, "
             f"scan backend {out['scan_backend']}; median of {out['repeats']} (ms)",
             f"{'layout':<9}{'tokens':>8}{'mode':>8}{'MM-DiM':>10}{'attention':>11}"
             f"{'speed-up':>10}{'mixers':>8}{'recomp':>9}{'share':>8}{'GPU sh.':>8}{'scan':>9}"
             f"{'share':>8}{'GPU sh.':>8}{'recomp old':>12}"]
    fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    for name, res in out["layouts"].items():
        for mode in MODES:
            s = res["summary"][mode]
            lines.append(
                f"{name:<9}{res['sequence_tokens']:>8}{mode:>8}"
                f"{fmt(ms(res, 'mmdim_block', mode)):>10}"
                f"{fmt(ms(res, 'attention_block', mode)):>11}"
                f"{fmt(s['speedup_vs_attention'], 2):>10}"
                f"{fmt(s['mixer_speedup_vs_attention'], 2):>8}"
                f"{fmt(ms(res, 'recomposition', mode)):>9}{pct(s['recomposition_share']):>8}"
                f"{pct(s['recomposition_share_gpu']):>8}{fmt(ms(res, 'scan', mode)):>9}"
                f"{pct(s['scan_share']):>8}{pct(s['scan_share_gpu']):>8}"
                f"{fmt(ms(res, 'recomposition_baseline', mode)):>12}")
    for name, res in out["layouts"].items():
        s = res["summary"]
        lines.append(f"{name}: conv1d+SiLU fwd {fmt(ms(res, 'conv1d', 'fwd'))} ms "
                     f"({pct(s['fwd']['conv1d_share'])}; cuDNN "
                     f"{fmt(ms(res, 'conv1d_cudnn', 'fwd'))}), fwd+bwd "
                     f"{fmt(ms(res, 'conv1d', 'fwdbwd'))} ms ({pct(s['fwdbwd']['conv1d_share'])}; "
                     f"cuDNN {fmt(ms(res, 'conv1d_cudnn', 'fwdbwd'))}); "
                     f"MM-DiM GPU-busy fwd {fmt(ms(res, 'mmdim_block', 'fwd', 'gpu_busy_ms'))} / "
                     f"fwd+bwd {fmt(ms(res, 'mmdim_block', 'fwdbwd', 'gpu_busy_ms'))} ms")
        kernels = res.get("mmdim_block_fwdbwd_kernels")
        if isinstance(kernels, list):
            for kern in kernels[:8]:
                us, n = kern["us_per_call"], kern["launches_per_call"]
                lines.append(f"    {us:>9.0f} us x{n:<4.0f} {kern['kernel'][:90]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="+", default=["pyramid", "flat"],
                        choices=("pyramid", "flat"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--baseline-recomposition", default=None)
    parser.add_argument("--scan-backend", default="auto",
                        help="the MM-DiM block's scan (auto, triton, mamba_ssm, torch)")
    parser.add_argument("--presets", nargs=2, default=["m4v-2b", "attention-2b"],
                        metavar=("MAMBA", "ATTENTION"))
    parser.add_argument("--clip", nargs=3, type=int, default=[768, 1280, 121],
                        metavar=("HEIGHT", "WIDTH", "FRAMES"))
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/block_gpu.json"))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("block_gpu.py: no CUDA device (use --device cpu for a smoke test)")
    out = run(args)
    print(table(out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
