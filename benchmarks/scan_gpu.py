"""GPU speed of the selective scan: our Triton kernel against mamba-ssm's CUDA kernel (the anchor).

Setting of the M4V-2B scan (DESIGN.md section 11): b = 1, d = 3840, d_state = 16, bfloat16, with
z gating, D, delta_bias and softplus; L = 4k, 16k and 64k tokens. For each length and backend:
forward time (under no_grad, as in inference) and forward+backward time (autograd.grad of all
inputs), each as the wall time of one call (CUDA events: where the GPU waits for the host's launch
work, that counts), as GPU time (the profiler's summed kernel time: the cost inside a model, where
the host runs ahead) and as host time (that launch work alone); the forward's effective bandwidth
(the fewest bytes it must move: u, delta, z read, out written, B and C read, over its wall time) and
the speed-ups over mamba-ssm measured in the same run.
Outputs and gradients of the Triton kernel are compared with mamba-ssm's at every length.
``--sweep`` first compiles a few tile configurations of the Triton kernel in parallel, times them at
16k and uses the best.

    python benchmarks/scan_gpu.py                       # writes reports/benchmarks/scan_gpu.json
    python benchmarks/scan_gpu.py --sweep --out $OUT/scan_gpu.json
mamba-ssm comes from PYTHONPATH (see shared/gpu/build-mamba-sm90.sh); without it the table has
no anchor and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cuda_time, host_ms  # noqa: E402

from harness.profile import gpu_busy_ms  # noqa: E402
from m4v.ops import scan_triton  # noqa: E402
from m4v.ops.scan_triton import ScanKernelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ANCHOR = "mamba_ssm"
# overrides of the default ScanKernelConfig; each costs a compile, done in parallel processes
# before timing. Lost on an H200 at 16k, and no longer offered: tiles of 8 or 16 forward steps
# and 2 warps per program (reports/benchmarks/scan_gpu_sweep.json); register caps, which trade
# spills for warps per SM: the backward took 4.87 and 6.04 ms under caps of 168 and 144 registers
# against 3.56 uncapped (5.44-8.30 ms with tiles of 4 steps), the forward 1.47 and 1.62 ms under
# 144 and 128 against 1.26; L2 prefetches of the tiles ahead (``prefetch.global.L2``, an option
# made for that run), 1-4 tiles ahead in the backward (3.62-3.78 ms against 3.57) and 8-32 ahead
# in the forward (1.54-1.59 ms against 1.27) (scan_gpu_sweep_caps_prefetch.json).
CANDIDATES = [
    {},
    dict(bwd_block_l=4),
    dict(bwd_programs_per_sm=32),
    dict(bwd_programs_per_sm=128),
]
SWEEP_LENGTH = 16384


def make_inputs(b: int, d: int, n: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    f32 = dict(device="cuda", dtype=torch.float32)
    return dict(
        u=torch.randn(b, d, length, generator=g, **bf16),
        delta=torch.randn(b, d, length, generator=g, **bf16) - 2.5,
        A=-torch.arange(1, n + 1, **f32).repeat(d, 1),  # Mamba's S4D-real initialisation
        B=torch.randn(b, n, length, generator=g, **bf16),
        C=torch.randn(b, n, length, generator=g, **bf16),
        D=torch.ones(d, **f32),
        z=torch.randn(b, d, length, generator=g, **bf16),
        delta_bias=torch.rand(d, generator=g, **f32) * 0.1,
    )


def load_backends(names: list[str], config: ScanKernelConfig) -> dict:
    """name -> callable(**inputs) with mamba-ssm's signature; unavailable ones are reported."""
    fns = {}
    for name in names:
        try:
            if name == "triton":
                fns[name] = lambda config=config, **kw: scan_triton.selective_scan_triton(
                    **kw, config=config)
            elif name == "mamba_ssm":
                mod = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
                fns[name] = mod.selective_scan_fn
            elif name == "torch":
                from m4v.ops.scan import selective_scan
                fns[name] = lambda **kw: selective_scan(**kw, backend="torch")
            else:
                raise ValueError(f"unknown backend {name!r}")
        except ImportError as e:
            print(f"[scan_gpu] backend {name} unavailable: {e}")
    return fns


def fwd_bytes(b: int, d: int, n: int, length: int) -> int:
    """Fewest bytes the bf16 forward moves: u, delta, z read, out written, B and C read."""
    return 2 * (4 * b * d * length + 2 * b * n * length)


def time_backend(fn, inputs: dict, repeats: int) -> dict:
    """Forward and forward+backward (ms): medians of one call's wall time, its GPU time and its
    host (launch) time."""

    def fwd():
        with torch.no_grad():
            return fn(**inputs, delta_softplus=True)

    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    g_out = torch.randn_like(inputs["u"])

    def fwd_bwd():
        out = fn(**leaves, delta_softplus=True)
        return torch.autograd.grad(out, list(leaves.values()), g_out)

    return dict(fwd_ms=cuda_time(fwd, repeats=repeats).median_ms,
                fwd_bwd_ms=cuda_time(fwd_bwd, repeats=repeats).median_ms,
                fwd_gpu_ms=gpu_busy_ms(fwd, "cuda"), fwd_bwd_gpu_ms=gpu_busy_ms(fwd_bwd, "cuda"),
                # twice the repeats: 20 calls each of the torch backend take about 20 s at 4k
                fwd_host_ms=host_ms(fwd, calls=2 * repeats),
                fwd_bwd_host_ms=host_ms(fwd_bwd, calls=2 * repeats))


def compare(fn, ref_fn, inputs: dict) -> dict:
    """Relative L2 differences of out and of every gradient between two backends."""
    res = {}
    outs = []
    for f in (fn, ref_fn):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        out = f(**leaves, delta_softplus=True)
        g = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(1),
                        device="cuda", dtype=out.dtype)
        grads = torch.autograd.grad(out, list(leaves.values()), g)
        outs.append([out, *grads])
    for name, a, b in zip(["out", *inputs], outs[0], outs[1], strict=True):
        res[name] = ((a.float() - b.float()).norm() / b.float().norm()).item()
    return res


def _run_candidate(cand: dict, b: int, d: int, n: int) -> None:
    """One forward and backward of the candidate at the sweep's shape (compiles its kernels into
    Triton's cache)."""
    inputs = make_inputs(b, d, n, SWEEP_LENGTH, seed=2)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    cfg = dataclasses.replace(scan_triton.DEFAULT_CONFIG, **cand)
    scan_triton.scan_forward(*args, True, False, cfg)
    states = scan_triton.scan_forward(*args, True, True, cfg)[2]
    scan_triton.scan_backward(*args, True, states, torch.randn_like(inputs["u"]), None, cfg)
    torch.cuda.synchronize()


def precompile(b: int, d: int, n: int, workers: int = 8) -> None:
    """Compile every sweep candidate in parallel processes (Triton's disk cache keeps them)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_run_candidate, c, b, d, n): c for c in CANDIDATES}
        for f in tqdm(cf.as_completed(futures), total=len(futures), desc="precompile"):
            if f.exception() is not None:
                print(f"[scan_gpu] candidate {futures[f]} failed: {f.exception()!r}")


def sweep(b: int, d: int, n: int, repeats: int) -> tuple[ScanKernelConfig, list]:
    """Time the candidates at 16k: the no-grad forward, the forward that saves states for the
    backward, and the backward alone. Returns the forward settings of the fastest no-grad forward
    and the backward settings of the fastest training pair (saving forward + backward: the
    backward's tile sets where the forward saves)."""
    inputs = make_inputs(b, d, n, SWEEP_LENGTH, seed=2)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    dout = torch.randn_like(inputs["u"])
    rows = []
    for cand in tqdm(CANDIDATES, desc="sweep"):
        cfg = dataclasses.replace(scan_triton.DEFAULT_CONFIG, **cand)
        try:
            fwd = cuda_time(lambda cfg=cfg: scan_triton.scan_forward(*args, True, False, cfg),
                            repeats=repeats).median_ms
            save = cuda_time(lambda cfg=cfg: scan_triton.scan_forward(*args, True, True, cfg),
                             repeats=repeats).median_ms
            states = scan_triton.scan_forward(*args, True, True, cfg)[2]
            bwd = cuda_time(lambda cfg=cfg, states=states: scan_triton.scan_backward(
                *args, True, states, dout, None, cfg), repeats=repeats).median_ms
            del states
        except Exception as e:  # noqa: BLE001 - a failing candidate is reported, not fatal
            print(f"[scan_gpu] {cand} failed: {e!r}")
            continue
        rows.append(dict(overrides=cand, fwd_ms=fwd, fwd_save_ms=save, bwd_ms=bwd))
        print(f"  {cand or 'default'}: fwd {fwd:.3f} ms, saving fwd {save:.3f} ms, "
              f"bwd {bwd:.3f} ms")
    fastest_fwd = min(rows, key=lambda r: r["fwd_ms"])["overrides"]
    fastest_pair = min(rows, key=lambda r: r["fwd_save_ms"] + r["bwd_ms"])["overrides"]
    picked = {k: v for k, v in fastest_fwd.items() if k.startswith("fwd")}
    picked.update({k: v for k, v in fastest_pair.items() if k.startswith("bwd")})
    return dataclasses.replace(scan_triton.DEFAULT_CONFIG, **picked), rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--dim", type=int, default=3840)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--backends", nargs="+", default=["triton", "mamba_ssm", "torch"])
    p.add_argument("--torch-max-length", type=int, default=4096,
                   help="skip the (slow) chunked torch backend above this length")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sweep", action="store_true", help="pick the Triton tiles by timing first")
    p.add_argument("--sweep-only", action="store_true", help="only the sweep (no length table)")
    p.add_argument("--precompile", action="store_true",
                   help="only compile the sweep candidates, in parallel processes")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "scan_gpu.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("scan_gpu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    b, d, n = args.batch, args.dim, args.state

    if args.precompile:
        precompile(b, d, n)
        return {}
    config, sweep_rows = scan_triton.DEFAULT_CONFIG, []
    if args.sweep or args.sweep_only:
        precompile(b, d, n)  # one candidate's kernels take about a minute to compile
        config, sweep_rows = sweep(b, d, n, max(3, args.repeats // 2))
        print(f"[scan_gpu] chosen config: {config}")
    fns = load_backends(args.backends, config)
    results = []
    for length in tqdm([] if args.sweep_only else args.lengths, desc="lengths"):
        inputs = make_inputs(b, d, n, length)
        row = dict(length=length, backends={})
        for name, fn in fns.items():
            if name == "torch" and length > args.torch_max_length:
                continue
            reps = args.repeats if name != "torch" else 3
            r = row["backends"][name] = time_backend(fn, inputs, reps)
            r["fwd_gb_per_s"] = fwd_bytes(b, d, n, length) / (r["fwd_ms"] * 1e-3) / 1e9
        if "triton" in fns and ANCHOR in fns:
            row["triton_vs_mamba_rel_diff"] = compare(fns["triton"], fns[ANCHOR], inputs)
        anchor = row["backends"].get(ANCHOR)
        for r in row["backends"].values():
            for key in ("fwd", "fwd_bwd", "fwd_gpu", "fwd_bwd_gpu"):
                r[f"{key}_speedup"] = anchor[f"{key}_ms"] / r[f"{key}_ms"] if anchor else None
        results.append(row)
        del inputs
        torch.cuda.empty_cache()

    report = dict(
        benchmark="scan_gpu",
        setting=dict(batch=b, dim=d, d_state=n, dtype="bfloat16", z=True, D=True,
                     delta_bias=True, delta_softplus=True),
        anchor=ANCHOR if ANCHOR in fns else None,
        device=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=importlib.import_module("triton").__version__,
        mamba_ssm=_version("mamba_ssm"), python=platform.python_version(),
        triton_config=dataclasses.asdict(config),
        sweep_at_16k=sweep_rows, results=results,
        timing="wall: CUDA events around one call, 3 warm-up calls, median of --repeats (3 for "
               "torch); GPU: summed kernel time of 3 profiled calls, averaged; host: 2 x repeats "
               "calls launched back to back, clock stopped before the GPU is waited for",
    )
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"[scan_gpu] wrote {args.out}")
    return report


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return None


def print_table(report: dict) -> None:
    print(f"\nselective scan, {report['device']}, b={report['setting']['batch']} "
          f"d={report['setting']['dim']} n={report['setting']['d_state']} bf16, z+D+bias+softplus"
          f"; speed-up vs {report['anchor'] or 'no anchor (mamba-ssm missing)'}")
    print("wall: one call between CUDA events; GPU: its summed kernel time; x: speed-up; "
          "host: its launch work")
    cols = [("fwd", "fwd"), ("fwd_gpu", "fwd GPU"), ("fwd_bwd", "fwd+bwd"),
            ("fwd_bwd_gpu", "fwd+bwd GPU")]
    head = f"{'L':>6} {'backend':>10} " + " ".join(
        f"{label + ' ms':>15} {'x':>5}" for _, label in cols) + f" {'fwd GB/s':>9}" \
        + f" {'host ms fwd, fwd+bwd':>21}"
    print(head)
    print("-" * len(head))
    for row in report["results"]:
        for name, r in row["backends"].items():
            cells = []
            for key, _ in cols:
                x = r[f"{key}_speedup"]
                cells.append(f"{r[key + '_ms']:>15.3f} {f'{x:.2f}' if x else '-':>5}")
            print(f"{row['length']:>6} {name:>10} " + " ".join(cells)
                  + f" {r['fwd_gb_per_s']:>9.0f} {r['fwd_host_ms']:>10.3f} "
                  f"{r['fwd_bwd_host_ms']:>10.3f}")
        if "triton_vs_mamba_rel_diff" in row:
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in row["triton_vs_mamba_rel_diff"].items())
            print(f"{'':>6} triton vs mamba rel. diff: {diffs}")


if __name__ == "__main__":
    main()
