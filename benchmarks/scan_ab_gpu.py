"""A/B of versions of the Triton scan (``m4v/ops/scan_triton.py``) side by side, in one run.

Each variant is ``NAME=SPEC``: SPEC a git revision (its ``m4v/ops/scan_triton.py``, via
``git show``) or the path of a modified copy of the file. Setting of ``scan_gpu.py`` (b = 1,
d = 3840, d_state 16, bf16, z + D + bias + softplus). Per variant and length: the no-grad forward
at several ``fwd_programs_per_sm`` (chunking), the forward that saves states for the backward, the
backward alone, and the per-kernel GPU time of the no-grad forward (profiler). Every variant's
output is compared with the first one's. Kernels are compiled first, one process per variant.

    python benchmarks/scan_ab_gpu.py old=f629cab new=HEAD --out $OUT/scan_ab.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import importlib.util
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cuda_time  # noqa: E402

from harness.profile import cuda_kernel_events  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCAN_FILE = "m4v/ops/scan_triton.py"
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def materialize(spec: str, into: Path, name: str) -> Path:
    """The variant's source file: SPEC itself if it is a file, else ``git show SPEC:SCAN_FILE``."""
    if Path(spec).is_file():
        return Path(spec).resolve()
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{spec}:{SCAN_FILE}"], check=True,
                            capture_output=True, text=True).stdout
    path = into / f"scan_{name}.py"
    path.write_text(source)
    return path


def load(name: str, path: Path):
    """Import a variant under its own module name (registered: its dataclasses need it)."""
    spec = importlib.util.spec_from_file_location(f"scan_variant_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_args(length: int, d: int = 3840, n: int = 16, seed: int = 0) -> list:
    """Positional inputs of ``scan_forward`` (u, delta, A, B, C, D, z, delta_bias)."""
    from scan_gpu import make_inputs

    inputs = make_inputs(1, d, n, length, seed)
    return [inputs[k] for k in ARGS]


def compile_variant(name: str, path: Path, programs_per_sm: list[int]) -> None:
    """Run every kernel of a variant once at a small length (fills Triton's disk cache)."""
    m = load(name, path)
    args = make_args(4096)
    for pps in programs_per_sm:
        m.scan_forward(*args, True, False,
                       dataclasses.replace(m.DEFAULT_CONFIG, fwd_programs_per_sm=pps))
    states = m.scan_forward(*args, True, True, m.DEFAULT_CONFIG)[2]
    m.scan_backward(*args, True, states, torch.randn_like(args[0]), None, m.DEFAULT_CONFIG)
    torch.cuda.synchronize()


def kernel_ms(fn, iters: int = 5) -> dict[str, float]:
    """GPU time per call of each kernel that ``fn`` launches (profiler, summed over launches)."""
    per_name: dict[str, float] = {}
    for e in cuda_kernel_events(fn, torch.device("cuda"), iters):
        name = e.name[:60]
        per_name[name] = per_name.get(name, 0.0) + e.time_range.elapsed_us() / iters / 1000
    return per_name


def time_variant(m, args: list, dout, pps: int, repeats: int) -> tuple[dict, dict | None]:
    """(times of one variant at one chunking, its forward's kernels or None): the backward and
    the kernels only at the variant's default chunking."""
    cfg = dataclasses.replace(m.DEFAULT_CONFIG, fwd_programs_per_sm=pps)
    row = dict(fwd_programs_per_sm=pps)
    row["fwd_ms"] = cuda_time(lambda: m.scan_forward(*args, True, False, cfg),
                              repeats=repeats).median_ms
    row["fwd_save_ms"] = cuda_time(lambda: m.scan_forward(*args, True, True, cfg),
                                   repeats=repeats).median_ms
    if pps != m.DEFAULT_CONFIG.fwd_programs_per_sm:
        return row, None
    states = m.scan_forward(*args, True, True, cfg)[2]
    row["bwd_ms"] = cuda_time(lambda: m.scan_backward(*args, True, states, dout, None, cfg),
                              repeats=repeats).median_ms
    return row, kernel_ms(lambda: m.scan_forward(*args, True, False, cfg))


def measure(mods: dict, lengths: list[int], programs_per_sm: list[int], repeats: int) -> dict:
    res = dict(rows=[], kernels={}, rel_diff_vs_first={})
    first = next(iter(mods))
    for length in lengths:
        args = make_args(length)
        dout = torch.randn_like(args[0])
        ref = mods[first].scan_forward(*args, True, False, mods[first].DEFAULT_CONFIG)[0].float()
        for name, m in mods.items():
            out = m.scan_forward(*args, True, False, m.DEFAULT_CONFIG)[0].float()
            res["rel_diff_vs_first"][f"{name}@{length}"] = ((out - ref).norm() / ref.norm()).item()
            # the backward is timed at the variant's default chunking: always among them
            for pps in sorted({*programs_per_sm, m.DEFAULT_CONFIG.fwd_programs_per_sm}):
                row, kernels = time_variant(m, args, dout, pps, repeats)
                row = dict(variant=name, length=length, **row)
                if kernels is not None:
                    res["kernels"][f"{name}@{length}"] = kernels
                res["rows"].append(row)
                print(row, flush=True)
        torch.cuda.empty_cache()
    return res


def print_table(res: dict) -> None:
    head = f"{'variant':>10} {'L':>6} {'pps':>4} {'fwd ms':>8} {'saving fwd':>11} {'bwd ms':>8}"
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        bwd = f"{r['bwd_ms']:.3f}" if "bwd_ms" in r else "-"
        print(f"{r['variant']:>10} {r['length']:>6} {r['fwd_programs_per_sm']:>4} "
              f"{r['fwd_ms']:>8.3f} {r['fwd_save_ms']:>11.3f} {bwd:>8}")
    for key, kernels in res["kernels"].items():
        scan = {k: round(v, 3) for k, v in kernels.items() if k.startswith("_")}
        print(f"  {key}: {scan}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("variants", nargs="+", metavar="NAME=SPEC")
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--programs-per-sm", type=int, nargs="+", default=[23, 32, 46])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "scan_ab_gpu.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("scan_ab_gpu.py needs a CUDA GPU")
    specs = dict(v.split("=", 1) for v in args.variants)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: materialize(spec, Path(tmp), name) for name, spec in specs.items()}
        with cf.ProcessPoolExecutor(len(paths), mp_context=mp.get_context("spawn")) as pool:
            for f in [pool.submit(compile_variant, n, p_, args.programs_per_sm)
                      for n, p_ in paths.items()]:
                f.result()
        mods = {name: load(name, path) for name, path in paths.items()}
        res = measure(mods, args.lengths, args.programs_per_sm, args.repeats)
    res.update(variants=specs, device=torch.cuda.get_device_name(), torch=torch.__version__,
               setting="b=1 d=3840 n=16 bf16, z+D+bias+softplus; CUDA events, median")
    print_table(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"[scan_ab_gpu] wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
