"""Whole-model GPU benchmarks: forward latency of M4V vs attention, and a training step.

1. Forward latency (bf16 weights under bf16 autocast, no grad, batch 1) of ``--forward-presets``
   (default ``small``, ``m4v-2b``, ``attention-2b``) at 768x1280 x 121 frames, in the canonical
   ``pyramid`` layout (last latent frame at the last stage with its eq. (1) history: 11,888
   tokens) and the ``flat`` layout (16 full-resolution frames: 61,568 tokens). One denoising
   forward; a generation makes many (``python -m harness.profile flops`` counts them).
2. A training step of ``--train-preset`` (default ``small``): bf16 autocast over fp32 weights,
   activation checkpointing (``model.gradient_checkpointing = True``) and without, AdamW,
   MSE on the velocity of the current frame (random inputs and target). Reports step time,
   tokens/s (all processed tokens: batch x (text + video)) and supervised tokens/s (the current
   frame's video tokens), and peak memory.

Each row also gives the GPU-busy time (the summed kernel durations): where it is well under the
wall time, the GPU waits for the host to launch work and the configuration is launch-bound.

CUDA events, median of ``--repeats`` after ``--warmup``; the scan backend that ran is recorded.

    PYTHONPATH=. python benchmarks/model_gpu.py --out reports/benchmarks/model_gpu.json
"""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.profile import (
    clip_geometry,
    clip_layout,
    device_name,
    gpu_busy_ms,
    model_case,
    peak_memory,
    time_fn,
    working_scan_backend,
    write_json,
)
from m4v.config import M4VConfig


def forward_latency(preset: str, layout_name: str, geom, device, dtype, warmup, repeats,
                    scan_backend: str) -> dict:
    cfg = M4VConfig.preset(preset).replace(scan_backend=scan_backend)
    layout = clip_layout(cfg, geom, layout_name)
    case = model_case(cfg, layout, device, dtype)
    case.module.eval()

    def fwd():
        with torch.no_grad():
            return case()

    t = time_fn(fwd, device, warmup=warmup, repeats=repeats)
    t["gpu_busy_ms"] = gpu_busy_ms(fwd, device)
    t["peak_memory_bytes"] = peak_memory(fwd, device)
    t["parameters"] = sum(p.numel() for p in case.module.parameters())
    t["sequence_tokens"] = layout.text_len + layout.video_len
    return t


def train_step(preset: str, geom, batch: int, checkpointing: bool, device, warmup,
               repeats, scan_backend: str) -> dict:
    cfg = M4VConfig.preset(preset).replace(scan_backend=scan_backend)
    layout = clip_layout(cfg, geom, "pyramid")
    case = model_case(cfg, layout, device, torch.float32, batch=batch)
    model = case.module.train()
    model.gradient_checkpointing = checkpointing
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    current = case.kwargs["frames"][-1]
    target = torch.randn(current.shape, device=device,
                         generator=torch.Generator(device=device).manual_seed(3))

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.mse_loss(model(**case.kwargs), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    t = time_fn(step, device, warmup=warmup, repeats=repeats)
    t["gpu_busy_ms"] = gpu_busy_ms(step, device)
    t["peak_memory_bytes"] = peak_memory(step, device)
    tokens = batch * (layout.text_len + layout.video_len)
    supervised = batch * layout.frame_lens[-1]
    t.update(batch=batch, gradient_checkpointing=checkpointing,
             parameters=sum(p.numel() for p in model.parameters()),
             sequence_tokens=layout.text_len + layout.video_len,
             tokens_per_s=tokens / (t["median_ms"] / 1e3),
             supervised_tokens_per_s=supervised / (t["median_ms"] / 1e3),
             final_loss=float(step().detach()))
    return t


def attempt(fn) -> dict:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (one GPU call must yield whatever it can)
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    geom = clip_geometry(*args.clip)
    backend, note = working_scan_backend(device)
    out = {"device": device_name(device), "torch": torch.__version__, "dtype": args.dtype,
           "clip": f"{geom.height}x{geom.width}, {geom.frames} frames",
           "scan_backend": backend, "scan_backend_note": note, "warmup": args.warmup,
           "repeats": args.repeats, "forward": {}, "train": {}}
    for preset in args.forward_presets:
        for layout in args.layouts:
            out["forward"][f"{preset}/{layout}"] = attempt(lambda p=preset, lay=layout: (
                forward_latency(p, lay, geom, device, dtype, args.warmup, args.repeats, backend)))
            write_json(out, args.out)
    train_geoms = [(clip_geometry(*args.clip), args.train_batch)]
    if args.train_clip_small:
        train_geoms.append((clip_geometry(*args.train_clip_small[:3]), args.train_clip_small[3]))
    for g, batch in train_geoms:
        for ckpt in (True, False):
            key = f"{args.train_preset}/{g.height}x{g.width}x{g.frames}/b{batch}/ckpt={ckpt}"
            out["train"][key] = attempt(lambda g=g, b=batch, c=ckpt: train_step(
                args.train_preset, g, b, c, device, args.warmup, args.repeats, backend))
            write_json(out, args.out)
    return out


def table(out: dict) -> str:
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731

    def busy(t: dict, digits: int = 2) -> str:
        return "-" if t.get("gpu_busy_ms") is None else f"{t['gpu_busy_ms']:.{digits}f}"
    lines = [f"{out['device']}, {out['clip']}, scan backend {out['scan_backend']}, median of "
             f"{out['repeats']}", "forward (no grad, " + out["dtype"] + ", batch 1):",
             f"{'model/layout':<26}{'tokens':>8}{'params':>10}{'ms':>10}{'GPU ms':>10}"
             f"{'peak MiB':>10}"]
    for key, t in out["forward"].items():
        if "error" in t:
            lines.append(f"{key:<26}  ERROR {t['error'][:80]}")
            continue
        lines.append(f"{key:<26}{t['sequence_tokens']:>8}{t['parameters'] / 1e9:>9.2f}B"
                     f"{t['median_ms']:>10.2f}{busy(t):>10}{mib(t['peak_memory_bytes']):>10}")
    lines += ["training step (bf16 autocast, AdamW):",
              f"{'preset/clip/batch/ckpt':<40}{'ms':>9}{'GPU ms':>9}{'tokens/s':>12}"
              f"{'sup. tok/s':>12}{'peak MiB':>10}"]
    for key, t in out["train"].items():
        if "error" in t:
            lines.append(f"{key:<40}  ERROR {t['error'][:80]}")
            continue
        lines.append(f"{key:<40}{t['median_ms']:>9.1f}{busy(t, 1):>9}{t['tokens_per_s']:>12,.0f}"
                     f"{t['supervised_tokens_per_s']:>12,.0f}{mib(t['peak_memory_bytes']):>10}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--forward-presets", nargs="+",
                        default=["small", "m4v-2b", "attention-2b"])
    parser.add_argument("--layouts", nargs="+", default=["pyramid", "flat"],
                        choices=("pyramid", "flat"))
    parser.add_argument("--clip", nargs=3, type=int, default=[768, 1280, 121],
                        metavar=("HEIGHT", "WIDTH", "FRAMES"))
    parser.add_argument("--train-preset", default="small")
    parser.add_argument("--train-batch", type=int, default=1)
    parser.add_argument("--train-clip-small", nargs=4, type=int, default=[384, 640, 121, 4],
                        metavar=("HEIGHT", "WIDTH", "FRAMES", "BATCH"),
                        help="a second training clip and its batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("reports/benchmarks/model_gpu.json"))
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("model_gpu.py: no CUDA device (use --device cpu for a smoke test)")
    out = run(args)
    print(table(out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
