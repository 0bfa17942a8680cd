"""CPU speed of the chunked selective scan ("torch" backend) against the sequential reference.

Times forward and forward+backward of ``m4v.ops.scan.selective_scan`` at several lengths, in one
process with one thread, and reports each backend's time and its speed-up over the reference
measured in the same run. Typical Mamba-block settings: b = 1, d = 128, n = 16, with z, D,
delta_bias and softplus, float32.

Both the CPU time of the thread and the wall time are recorded (best of ``--repeats``); the
speed-up uses CPU time, which other processes on a shared machine disturb far less.

    PYTHONPATH=. python benchmarks/scan_cpu.py            # l = 1k, 4k, 16k
    PYTHONPATH=. python benchmarks/scan_cpu.py --lengths 1024 --repeats 5 --out /tmp/scan.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from m4v.ops.scan import selective_scan

BACKENDS = ("reference", "torch")


def make_inputs(b: int, d: int, n: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        u=torch.randn(b, d, length, generator=g),
        delta=torch.randn(b, d, length, generator=g) - 2.0,
        A=-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),  # Mamba's S4D-real init
        B=torch.randn(b, n, length, generator=g),
        C=torch.randn(b, n, length, generator=g),
        D=torch.ones(d),
        z=torch.randn(b, d, length, generator=g),
        delta_bias=torch.rand(d, generator=g) * 0.1,
    )


def time_once(inputs: dict, backend: str, backward: bool) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of one call (and its backward)."""
    tensors = {k: v.detach().requires_grad_(backward) for k, v in inputs.items()}
    cpu, wall = time.thread_time(), time.perf_counter()
    out = selective_scan(**tensors, delta_softplus=True, backend=backend)
    if backward:
        out.sum().backward()  # CPU autograd runs in the calling thread
    return time.thread_time() - cpu, time.perf_counter() - wall


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    passes = ["fwd"] + ([] if args.no_backward else ["fwd+bwd"])
    cases = [(length, p, be) for length in args.lengths for p in passes for be in BACKENDS]
    rows, bar = [], tqdm(cases, desc="scan_cpu", unit="case")
    for length, p, backend in bar:
        bar.set_postfix_str(f"l={length} {p} {backend}")
        inputs = make_inputs(args.batch, args.dim, args.state, length)
        time_once(make_inputs(args.batch, args.dim, args.state, 64), backend, p != "fwd")  # warm-up
        # The reference is slow and stable: one timing at long lengths is enough.
        repeats = 1 if backend == "reference" and length > 4096 else args.repeats
        times = [time_once(inputs, backend, p != "fwd") for _ in range(repeats)]
        rows.append(
            dict(
                length=length,
                passes=p,
                backend=backend,
                cpu_ms=min(c for c, _ in times) * 1e3,
                wall_ms=min(w for _, w in times) * 1e3,
                repeats=repeats,
            )
        )
    reference = {
        (r["length"], r["passes"]): r["cpu_ms"] for r in rows if r["backend"] == "reference"
    }
    for row in rows:
        row["speedup_vs_reference"] = reference[row["length"], row["passes"]] / row["cpu_ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'l':>6} {'passes':>8} {'backend':>10} {'cpu ms':>10} {'wall ms':>10} {'x ref':>7}")
    for r in rows:
        print(
            f"{r['length']:>6} {r['passes']:>8} {r['backend']:>10} {r['cpu_ms']:>10.1f} "
            f"{r['wall_ms']:>10.1f} {r['speedup_vs_reference']:>7.2f}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-backward", action="store_true", help="time the forward only")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/scan_cpu.json"))
    args = parser.parse_args(argv)

    rows = run(args)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(
        benchmark="scan_cpu",
        config=dict(
            batch=args.batch,
            dim=args.dim,
            state=args.state,
            threads=args.threads,
            repeats=args.repeats,
            z=True,
            D=True,
            delta_bias=True,
            delta_softplus=True,
            dtype="float32",
        ),
        machine=dict(
            platform=platform.platform(), processor=platform.processor(), torch=torch.__version__
        ),
        rows=rows,
    )
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
