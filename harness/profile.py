"""Profiling M4V against the attention alternative: FLOPs, latency, peak memory, scaling sweeps.

    python -m harness.profile flops                     # the paper's headline, 768x1280, 121 frames
    python -m harness.profile flops --presets small --height 256 --width 256 --frames 17
    python -m harness.profile crosscheck                # fvcore == flop_counter == analytic
    python -m harness.profile latency --presets small --height 256 --width 256 --frames 17
    python -m harness.profile sweep suites/profile_paper.yaml [--latency]

Clips are given in pixels and mapped to latent tokens as the paper's pipeline does: the causal
3D VAE compresses 8x in space and maps 1 + 8k frames to 1 + k latent frames; 2x2 patches make a
latent frame of h x w into (h/2)(w/2) tokens (768x1280 -> 96x160 latent -> 48 x 80 = 3840 tokens);
the pyramid's stages have 1/4, 1/2 and all of that per side (240 / 960 / 3840 tokens).

**The canonical count** (``total``): one denoising forward (batch 1, no classifier-free guidance)
at the final pyramid stage predicting the LAST latent frame, with its whole history in the
temporal-pyramid layout of eq. (1) (newest history frame at full resolution, the one before at
half, all older ones at quarter; :func:`m4v.flow.history.history_stages`) and the full 128-slot
text. Other accountings are reported beside it: ``flat`` (every frame at full resolution, the
sequence a full-sequence video DiT sees) and ``generation`` (every forward of a whole
text-to-video generation with the default sampler: each frame, each stage, each Euler step,
conditional and unconditional rows).

The conventions of the counts (what is counted, FLOPs vs MACs, the engines) are in
:mod:`harness.flops`. Heavy imports (fvcore, duckdb, matplotlib, yaml) are local to the functions
that need them, so the GPU benchmarks import this module with torch alone.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from m4v.config import M4VConfig
from m4v.model import M4V
from m4v.model.blocks import MMDiMBlock, MMDiTBlock
from m4v.model.embeddings import ClipLayout

LAYOUTS = ("pyramid", "flat")
BENCHMARK_DIR = Path("reports") / "benchmarks"
UNITS = {
    "flops": "FLOPs: a multiply and an add count 2 (a matmul m x k by k x n = 2mkn); the scan's "
             "recurrence op by op (m4v.ops.scan.selective_scan_flops)",
    "macs": "MACs (fvcore's unit): a multiply-add counts 1; matrix ops = FLOPs / 2 exactly; the "
            "scan with multiply_add_as_one=True",
    "counted": "linear layers, matmul, depthwise conv1d (L + k - 1 outputs), attention QK^T and "
               "AV over every (query, key) pair given to SDPA, the selective scan; elementwise "
               "ops (norms, activations, modulation, RoPE, softmax, gathers) are not counted",
}
PAPER_PRESETS = ("m4v-2b", "attention-2b")
PAPER_CLIP = (768, 1280, 121)


# ----------------------------------------------------------------------------- clip geometry


@dataclass(frozen=True)
class ClipGeometry:
    """A pixel clip and its latent: (frames, height, width) before and after the VAE."""

    height: int
    width: int
    frames: int
    latent_frames: int
    latent_height: int
    latent_width: int
    patch_size: int
    stages: int

    def tokens(self, stage: int) -> tuple[int, int]:
        """Token grid of a latent frame at pyramid ``stage`` (the last stage is full size)."""
        shrink = 2 ** (self.stages - 1 - stage)
        p = self.patch_size
        return self.latent_height // p // shrink, self.latent_width // p // shrink


def clip_geometry(height: int, width: int, frames: int, *, patch_size: int = 2,
                  stages: int = 3, vae_spatial: int = 8, vae_temporal: int = 8) -> ClipGeometry:
    """Validate a pixel clip and map it to latent sizes (see the module docstring)."""
    unit = vae_spatial * patch_size
    pyramid_unit = unit * 2 ** (stages - 1)
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v <= 0 or v % unit:
            raise ValueError(f"{name}: got {v!r}, expected a positive multiple of {unit} pixels "
                             f"(VAE {vae_spatial}x times patch {patch_size})")
        if v % pyramid_unit:
            raise ValueError(f"{name}: got {v}, expected a multiple of {pyramid_unit} pixels so "
                             f"that all {stages} pyramid stages (each halving the latent) have "
                             f"whole patches")
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % vae_temporal:
        raise ValueError(f"frames: got {frames!r}, expected 1 + {vae_temporal}k (the causal VAE "
                         f"maps 1 + {vae_temporal}k frames to 1 + k latent frames), e.g. 121")
    return ClipGeometry(height, width, frames, 1 + (frames - 1) // vae_temporal,
                        height // vae_spatial, width // vae_spatial, patch_size, stages)


def clip_layout(cfg: M4VConfig, geom: ClipGeometry, layout: str = "pyramid",
                frame: int | None = None, stage: int | None = None) -> ClipLayout:
    """Token layout of the forward that predicts latent ``frame`` (default: the last) at ``stage``.

    ``"pyramid"``: the history of eq. (1) at its pyramid resolutions; ``"flat"``: every frame up to
    ``frame`` at full resolution (``stage`` must then be the last).
    """
    from m4v.flow.history import history_stages

    frame = geom.latent_frames - 1 if frame is None else frame
    stage = geom.stages - 1 if stage is None else stage
    if not 0 <= frame < geom.latent_frames:
        raise ValueError(f"frame: got {frame}, expected 0 <= frame < {geom.latent_frames}")
    if not 0 <= stage < geom.stages:
        raise ValueError(f"stage: got {stage}, expected 0 <= stage < {geom.stages}")
    if layout == "pyramid":
        history = history_stages(frame, stage)
    elif layout == "flat":
        if stage != geom.stages - 1:
            raise ValueError(f"stage: got {stage}, the flat layout exists at the last stage only")
        history = [(j, stage) for j in range(frame)]
    else:
        raise ValueError(f"layout: got {layout!r}, expected one of {LAYOUTS}")
    sizes = tuple(geom.tokens(s) for _, s in history) + (geom.tokens(stage),)
    ids = tuple(j for j, _ in history) + (frame,)
    return ClipLayout(cfg.max_text_len, sizes, ids)


def resolve_config(preset: str | M4VConfig, overrides: dict | None = None) -> M4VConfig:
    cfg = preset if isinstance(preset, M4VConfig) else M4VConfig.preset(preset)
    return cfg.replace(**overrides) if overrides else cfg


def preset_name(preset: str | M4VConfig) -> str:
    return preset if isinstance(preset, str) else f"custom-{preset.mixer}"


# ----------------------------------------------------------------------------- FLOPs

FVCORE_MAX_FLOPS = 2e10  # "auto" uses fvcore (real CPU activations) below this, else flop_counter
FVCORE_MAX_PARAMS = 1e8


def parameter_count(cfg: M4VConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in M4V(cfg).parameters())


def pick_engine(engine: str, cfg: M4VConfig, layout: ClipLayout) -> str:
    from harness.flops import ENGINES, analytic_count

    if engine != "auto":
        if engine not in ENGINES:
            raise ValueError(f"engine: got {engine!r}, expected 'auto' or one of {ENGINES}")
        return engine
    small = (analytic_count(cfg, layout).total_flops <= FVCORE_MAX_FLOPS
             and parameter_count(cfg) <= FVCORE_MAX_PARAMS)
    return "fvcore" if small else "flop_counter"


def _tally_dict(tally, cfg: M4VConfig) -> dict:
    core = ("mixer", "temporal", "mlp", "modulation")
    per = {}
    if cfg.num_introducer_layers:
        per["introducer_block"] = tally.flops["introducer"] // cfg.num_introducer_layers
    if cfg.num_core_layers:
        per["core_block"] = sum(tally.flops[k] for k in core) // cfg.num_core_layers
        per["core_mixer"] = tally.flops["mixer"] // cfg.num_core_layers
    return {
        "total": tally.total_flops,
        "total_macs": tally.total_macs,
        "by_module": dict(tally.flops),
        "by_module_macs": dict(tally.macs),
        "core_blocks": sum(tally.flops[k] for k in core),
        "core_blocks_macs": sum(tally.macs[k] for k in core),
        "per_block": per,
    }


def generation_forwards(geom: ClipGeometry, sampler=None) -> list[tuple[int, int, int]]:
    """(frame, stage, model rows) of every forward of a generation; rows = 2 with CFG."""
    from m4v.flow.sampler import PyramidSampler

    sampler = sampler or PyramidSampler(progress=False)
    out = []
    for i in range(geom.latent_frames):
        steps = sampler.first_frame_steps if i == 0 else sampler.steps
        guidance = sampler.first_frame_guidance if i == 0 else sampler.guidance
        rows = 2 if guidance != 1 else 1
        for stage, n in enumerate(steps):
            out.append((i, stage, n * rows))
    return out


def count_flops(preset: str | M4VConfig, height: int, width: int, frames: int, *,
                engine: str = "auto", layout: str = "pyramid", batch: int = 1,
                accountings: Sequence[str] = ("flat",), overrides: dict | None = None,
                vae_spatial: int = 8, vae_temporal: int = 8, progress: bool = False) -> dict:
    """FLOPs (and MACs) of M4V for a pixel clip; see the module docstring for what is counted.

    Args:
        preset: a preset name or an ``M4VConfig``; ``overrides``: config fields to change.
        engine: ``"auto"`` (fvcore where the model and activations fit, else flop_counter on meta
            tensors), ``"fvcore"``, ``"flop_counter"`` or ``"analytic"``.
        layout: the layout of ``total``: ``"pyramid"`` (canonical) or ``"flat"``.
        accountings: further keys: ``"flat"``, ``"pyramid"``, ``"generation"``.
    Returns:
        dict with ``total`` (FLOPs), ``total_macs``, ``by_module`` / ``by_module_macs``
        (introducer, mixer, temporal, mlp, modulation, other), ``core_blocks``, ``per_block``, the
        clip and token layout, the engine and units, and one dict per extra accounting.
    """
    from harness.flops import count_layout

    cfg = resolve_config(preset, overrides)
    if batch < 1:
        raise ValueError(f"batch: got {batch}, expected >= 1")
    unknown = set(accountings) - {"flat", "pyramid", "generation"}
    if unknown:
        raise ValueError(f"accountings: got {sorted(unknown)}, expected among "
                         "['flat', 'generation', 'pyramid']")
    geom = clip_geometry(height, width, frames, patch_size=cfg.patch_size,
                         stages=cfg.pyramid_stages, vae_spatial=vae_spatial,
                         vae_temporal=vae_temporal)
    lay = clip_layout(cfg, geom, layout)
    chosen = pick_engine(engine, cfg, lay)
    result = {
        "preset": preset_name(preset), "mixer": cfg.mixer, "engine": chosen, "units": UNITS,
        "video": {"height": height, "width": width, "frames": frames},
        "latent": {"frames": geom.latent_frames, "height": geom.latent_height,
                   "width": geom.latent_width},
        "layout": _layout_dict(cfg, lay, layout),
        "batch": batch,
        **_tally_dict(count_layout(cfg, lay, chosen, batch), cfg),
    }
    for extra in accountings:
        if extra == "generation":
            result["generation"] = _generation(cfg, geom, chosen, batch, progress)
        elif extra != layout:
            other = clip_layout(cfg, geom, extra)
            result[extra] = {"layout": _layout_dict(cfg, other, extra),
                             **_tally_dict(count_layout(cfg, other, chosen, batch), cfg)}
    return result


def _layout_dict(cfg: M4VConfig, lay: ClipLayout, name: str) -> dict:
    from harness.flops import scan_length

    out = {"name": name, "frame_tokens": lay.frame_lens, "frame_ids": list(lay.frame_ids),
           "text_tokens": lay.text_len, "video_tokens": lay.video_len,
           "sequence_tokens": lay.text_len + lay.video_len}
    if cfg.mixer == "mamba":
        out["scan_tokens"] = scan_length(cfg, lay)
    return out


def _generation(cfg: M4VConfig, geom: ClipGeometry, engine: str, batch: int,
                progress: bool) -> dict:
    """Sum over every forward of a whole generation (module docstring)."""
    from tqdm.auto import tqdm

    from harness.flops import Tally, count_layout

    total = Tally()
    forwards = generation_forwards(geom)
    for frame, stage, rows in tqdm(forwards, desc=f"generation ({cfg.mixer})", leave=False,
                                   disable=not progress):
        total = total + count_layout(cfg, clip_layout(cfg, geom, "pyramid", frame, stage),
                                     engine, batch * rows)
    return {"forwards": sum(rows for _, _, rows in forwards),
            "what": "every model call of one generation with the default PyramidSampler "
                    "(frame 0: guidance 7, steps [20, 20, 20]; later: guidance 5, steps "
                    "[10, 10, 10]; CFG doubles the rows); text encoder and VAE not included",
            **_tally_dict(total, cfg)}


def reduction(mamba: float, attention: float) -> float:
    """Fraction of FLOPs saved: 1 - mamba / attention."""
    return 1.0 - mamba / attention


def headline(m4v: dict, attention: dict) -> dict:
    """M4V vs the attention alternative per accounting: mixers, MM-DiM blocks, whole model."""
    pairs = {m4v["layout"]["name"]: (m4v, attention)}
    for key in ("pyramid", "flat", "generation"):
        if key in m4v and key in attention:
            pairs[key] = (m4v[key], attention[key])
    return {key: {
        "mixer_flops": [a["by_module"]["mixer"], b["by_module"]["mixer"]],
        "mixer_reduction": reduction(a["by_module"]["mixer"], b["by_module"]["mixer"]),
        "core_block_flops": [a["core_blocks"], b["core_blocks"]],
        "core_block_reduction": reduction(a["core_blocks"], b["core_blocks"]),
        "model_flops": [a["total"], b["total"]],
        "model_reduction": reduction(a["total"], b["total"]),
    } for key, (a, b) in pairs.items()}


# ----------------------------------------------------------------------------- timing


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: got {device!r} but CUDA is not available")
    return dev


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def time_fn(fn: Callable[[], object], device: torch.device | str, *, warmup: int = 3,
            repeats: int = 10) -> dict:
    """Median wall time of ``fn()`` in ms: CUDA events on a GPU, ``perf_counter`` on a CPU.

    ``warmup`` untimed calls first (kernel selection, autotuning, allocator warm-up). Each
    repeat is timed on its own, so the median ignores stragglers.
    """
    device = torch.device(device)
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup/repeats: got {warmup}/{repeats}, expected >= 0 / >= 1")
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "repeats": repeats, "warmup": warmup,
            "timer": "cuda events" if device.type == "cuda" else "perf_counter"}


def gpu_busy_ms(fn: Callable[[], object], device: torch.device | str,
                iters: int = 3) -> float | None:
    """GPU time of ``fn()`` in ms: the summed durations of its kernels and copies (profiler).

    Unlike wall time this leaves out the gaps in which the GPU waits for the host to launch
    work, so it is the cost a call adds when the host runs ahead (large neighbours, CUDA graphs).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    us = sum(e.time_range.elapsed_us() for e in cuda_kernel_events(fn, device, iters))
    return us / iters / 1e3


def cuda_kernel_events(fn: Callable[[], object], device: torch.device, iters: int) -> list:
    """The profiler's GPU events (kernels and copies) of ``iters`` calls of ``fn()``, after one
    untraced call (warm-up: compilation, allocator growth)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize(device)
    return [e for e in prof.events() if e.device_type == DeviceType.CUDA]


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak bytes allocated on a CUDA device during one ``fn()`` above what was held before."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def forward_backward(fn: Callable[[], object], inputs: Sequence[torch.Tensor],
                     params: Sequence[torch.Tensor]) -> Callable[[], object]:
    """A closure running ``fn`` and its backward w.r.t. ``inputs`` and ``params``.

    Gradients come from ``torch.autograd.grad`` (nothing accumulates into ``.grad``); the output
    gradients are fixed random tensors drawn once, so no reduction is timed.
    """
    grads: list[torch.Tensor] = []
    wrt = [t for t in (*inputs, *params) if t.requires_grad]

    def run():
        outs = fn()
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        if not grads:
            grads.extend(torch.randn_like(o) for o in outs)
        torch.autograd.grad(outs, wrt, grads, allow_unused=True)

    return run


@dataclass
class Case:
    """One timed thing: a module call on prepared inputs."""

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    grad_inputs: tuple
    autocast: torch.dtype | None = None  # run under torch.autocast in this dtype

    def __call__(self):
        if self.autocast is None:
            return self.module(*self.args, **self.kwargs)
        device = next(self.module.parameters()).device.type
        with torch.autocast(device, dtype=self.autocast):
            return self.module(*self.args, **self.kwargs)


def block_case(kind: str, cfg: M4VConfig, layout: ClipLayout, device, dtype, batch: int = 1,
               seed: int = 0) -> Case:
    """An MM-DiT (``"introducer_block"``) or MM-DiM / attention (``"core_block"``) block call."""
    from m4v.model.rope import rope_cos_sin

    torch.manual_seed(seed)
    with torch.device(device):
        block = MMDiTBlock(cfg) if kind == "introducer_block" else MMDiMBlock(cfg, 0)
    _randomize_zero_init(block)
    block = block.to(dtype=dtype)
    d = cfg.hidden_size
    g = torch.Generator(device=device).manual_seed(seed)
    text = torch.randn(batch, layout.text_len, d, device=device, dtype=dtype, generator=g)
    video = torch.randn(batch, layout.video_len, d, device=device, dtype=dtype, generator=g)
    c = torch.randn(batch, d, device=device, dtype=dtype, generator=g)
    rope = rope_cos_sin(layout, cfg.rope_axes, device)
    mask = torch.ones(batch, layout.text_len, dtype=torch.bool, device=device)
    return Case(kind, block, (text, video, c, layout, rope, mask), {}, (text, video))


def model_case(cfg: M4VConfig, layout: ClipLayout, device, dtype, batch: int = 1,
               seed: int = 0) -> Case:
    from harness.flops import model_inputs

    torch.manual_seed(seed)
    with torch.device(device):
        model = M4V(cfg)
    _randomize_zero_init(model)
    model = model.to(dtype=dtype)
    inputs = model_inputs(cfg, layout, batch, "cpu", torch.Generator().manual_seed(seed))
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else
                  [t.to(device) for t in v] if k == "frames" else v) for k, v in inputs.items()}
    for k in ("text", "pooled"):
        inputs[k] = inputs[k].to(dtype)
    inputs["frames"] = [f.to(dtype) for f in inputs["frames"]]
    # The noise-level embedding is computed in float32 (sinusoids of sigma * 1000): with
    # half-precision weights the model runs under autocast, as in training.
    reduced = dtype in (torch.bfloat16, torch.float16)
    return Case("model", model, (), inputs, tuple(inputs["frames"]),
                autocast=dtype if reduced else None)


def _randomize_zero_init(module: nn.Module) -> None:
    """Small random values for zero-initialised weights (adaLN-Zero, final layer).

    Timing on zeros can run faster than on real data; random weights keep it representative.
    """
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.normal_(0, 0.02)


def time_case(case: Case, modes: Sequence[str], device, *, warmup: int, repeats: int) -> dict:
    """Latency (and CUDA peak memory) of a case's forward and forward+backward."""
    out = {}
    call = case.__call__
    for mode in modes:
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return call()
        elif mode == "fwdbwd":
            for t in case.grad_inputs:
                t.requires_grad_(True)
            fn = forward_backward(call, case.grad_inputs, list(case.module.parameters()))
        else:
            raise ValueError(f"modes: got {mode!r}, expected 'fwd' or 'fwdbwd'")
        timing = time_fn(fn, device, warmup=warmup, repeats=repeats)
        timing["peak_memory_bytes"] = peak_memory(fn, device)
        timing["gpu_busy_ms"] = gpu_busy_ms(fn, device)
        out[mode] = timing
        for t in case.grad_inputs:
            t.requires_grad_(False)
    return out


def profile_latency(preset: str | M4VConfig, height: int, width: int, frames: int, *,
                    layout: str = "pyramid", what: Sequence[str] = ("core_block",),
                    modes: Sequence[str] = ("fwd", "fwdbwd"), device: str = "auto",
                    dtype: str = "bfloat16", batch: int = 1, warmup: int = 3, repeats: int = 10,
                    overrides: dict | None = None) -> dict:
    """Latency and peak memory of blocks and/or the whole model for a pixel clip."""
    cfg = resolve_config(preset, overrides)
    dev = resolve_device(device)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype: got {dtype!r}, expected a torch dtype name such as 'bfloat16'")
    geom = clip_geometry(height, width, frames, patch_size=cfg.patch_size,
                         stages=cfg.pyramid_stages)
    lay = clip_layout(cfg, geom, layout)
    note = None
    if cfg.mixer == "mamba" and cfg.scan_backend == "auto":
        backend, note = working_scan_backend(dev)
        cfg = cfg.replace(scan_backend=backend)
    result = {"preset": preset_name(preset), "mixer": cfg.mixer, "device": device_name(dev),
              "dtype": dtype, "batch": batch, "layout": _layout_dict(cfg, lay, layout),
              "video": {"height": height, "width": width, "frames": frames},
              "scan_backend": _scan_backend(cfg, dev), "scan_backend_note": note,
              "latency": {}}
    for kind in what:
        if kind == "model":
            case = model_case(cfg, lay, dev, torch_dtype, batch)
        elif kind in ("core_block", "introducer_block"):
            case = block_case(kind, cfg, lay, dev, torch_dtype, batch)
        else:
            raise ValueError(f"what: got {kind!r}, expected core_block, introducer_block or model")
        result["latency"][kind] = time_case(case, modes, dev, warmup=warmup, repeats=repeats)
        del case
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _scan_backend(cfg: M4VConfig, device: torch.device) -> str | None:
    if cfg.mixer != "mamba":
        return None
    from m4v.ops.scan import resolve_backend

    return resolve_backend(cfg.scan_backend, device)


def working_scan_backend(device: torch.device | str, wanted: str = "auto"
                         ) -> tuple[str, str | None]:
    """The backend ``wanted`` ("auto": the one it picks for ``device``) if it runs and agrees
    with "torch", else "torch".

    Returns (backend, why the automatic choice was rejected or None). A benchmark run on a lent
    GPU must not lose its Mamba measurements to a scan kernel still under development.
    """
    from m4v.ops.scan import resolve_backend, selective_scan

    device = torch.device(device)
    chosen = resolve_backend(wanted, device)
    if chosen in ("torch", "reference"):
        return chosen, None
    g = torch.Generator(device=device).manual_seed(0)
    d, n, length = 64, 16, 300
    rand = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    args = (rand(1, d, length), rand(1, d, length) - 2.0,
            -torch.rand(d, n, device=device, generator=g) - 0.5, rand(1, n, length),
            rand(1, n, length))
    kw = dict(D=rand(d), z=rand(1, d, length), delta_bias=rand(d), delta_softplus=True)
    try:
        got = selective_scan(*args, **kw, backend=chosen)
        ref = selective_scan(*args, **kw, backend="torch")
        err = float((got - ref).norm() / ref.norm())
    except Exception as e:  # noqa: BLE001
        return "torch", f"{chosen} failed: {type(e).__name__}: {e}"
    if not err < 1e-3:
        return "torch", f"{chosen} disagrees with torch: relative error {err:.2e}"
    return chosen, None


# ----------------------------------------------------------------------------- output


def write_json(obj, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    return path


def store_rows(rows: list[dict], store: str | None) -> str:
    """Write rows into the DuckDB store's ``profiles`` table; says where (or why not)."""
    try:
        from harness.store import Store
    except ImportError as e:  # the GPU machine has no duckdb
        return f"not stored ({e})"
    s = Store(store)
    s.write("profiles", rows)
    return f"stored {len(rows)} rows in {s.path}"


def flop_rows(profile: str, result: dict, device: str = "meta") -> list[dict]:
    setting = json.dumps({**result["video"], "layout": result["layout"]["name"],
                          "batch": result["batch"]}, sort_keys=True)
    params = {"engine": result["engine"], "tokens": result["layout"]["sequence_tokens"]}
    rows = [{"profile": profile, "model": result["preset"], "setting": setting,
             "metric": "flops.total", "device": device, "value": result["total"],
             "unit": "FLOP", "params": params},
            {"profile": profile, "model": result["preset"], "setting": setting,
             "metric": "macs.total", "device": device, "value": result["total_macs"],
             "unit": "MAC", "params": params},
            {"profile": profile, "model": result["preset"], "setting": setting,
             "metric": "flops.core_blocks", "device": device, "value": result["core_blocks"],
             "unit": "FLOP", "params": params}]
    for cat, v in result["by_module"].items():
        rows.append({"profile": profile, "model": result["preset"], "setting": setting,
                     "metric": f"flops.{cat}", "device": device, "value": v, "unit": "FLOP",
                     "params": params})
    return rows


def latency_rows(profile: str, result: dict) -> list[dict]:
    setting = json.dumps({**result["video"], "layout": result["layout"]["name"],
                          "batch": result["batch"], "dtype": result["dtype"]}, sort_keys=True)
    rows = []
    for kind, modes in result["latency"].items():
        for mode, t in modes.items():
            base = {"profile": profile, "model": result["preset"], "setting": setting,
                    "device": result["device"],
                    "params": {"scan_backend": result["scan_backend"], **t}}
            rows.append({**base, "metric": f"latency.{kind}.{mode}", "value": t["median_ms"],
                         "unit": "ms"})
            if t["peak_memory_bytes"] is not None:
                rows.append({**base, "metric": f"memory.{kind}.{mode}",
                             "value": t["peak_memory_bytes"], "unit": "bytes"})
    return rows


def fmt_flops(v: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(v) >= scale:
            return f"{v / scale:.3f} {unit}"
    return f"{v:.0f} "


def flops_table(results: list[dict], key: str | None = None) -> str:
    cols = ("introducer", "mixer", "temporal", "mlp", "modulation", "other")
    head = f"{'preset':<14}{'layout':<10}{'tokens':>8}" + "".join(f"{c:>13}" for c in cols)
    head += f"{'core blocks':>14}{'total':>14}"
    lines = [head, "-" * len(head)]
    for r in results:
        r = r if key is None else {**r[key], "preset": r["preset"]}
        name = r["layout"]["name"] if "layout" in r else key
        tokens = r["layout"]["sequence_tokens"] if "layout" in r else ""
        lines.append(f"{r['preset']:<14}{name:<10}{tokens:>8}"
                     + "".join(f"{fmt_flops(r['by_module'][c]):>13}" for c in cols)
                     + f"{fmt_flops(r['core_blocks']):>14}{fmt_flops(r['total']):>14}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sweep


def load_suite(path: str | Path) -> dict:
    import yaml

    spec = yaml.safe_load(Path(path).read_text())
    required = ("name", "presets", "resolutions", "latent_frames", "layouts")
    missing = [k for k in required if k not in spec]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}, expected {list(required)}")
    for res in spec["resolutions"]:
        if len(res) != 2:
            raise ValueError(f"{path}: resolutions: got {res!r}, expected [height, width]")
    return spec


def sweep(spec: dict, *, latency: bool = False, device: str = "auto",
          progress: bool = True) -> dict:
    """FLOPs (and optionally block latency) over presets x resolutions x frames x layouts."""
    from tqdm.auto import tqdm

    engine = spec.get("engine", "flop_counter")
    vae_t = spec.get("vae_temporal", 8)
    grid = [(p, tuple(r), k, lay) for p in spec["presets"] for r in spec["resolutions"]
            for k in spec["latent_frames"] for lay in spec["layouts"]]
    points = []
    lat_spec = spec.get("latency", {})
    for preset, (h, w), k, lay in tqdm(grid, desc=f"sweep {spec['name']}", disable=not progress):
        frames = 1 + vae_t * (k - 1)
        r = count_flops(preset, h, w, frames, engine=engine, layout=lay, accountings=())
        point = {"preset": preset, "height": h, "width": w, "latent_frames": k,
                 "frames": frames, "layout": lay, "tokens": r["layout"]["sequence_tokens"],
                 "flops": r, "latency": None}
        if latency and lay in lat_spec.get("layouts", spec["layouts"]) and \
                k in lat_spec.get("latent_frames", spec["latent_frames"]):
            point["latency"] = profile_latency(
                preset, h, w, frames, layout=lay, device=device,
                what=lat_spec.get("what", ["core_block"]),
                modes=lat_spec.get("modes", ["fwd", "fwdbwd"]),
                dtype=lat_spec.get("dtype", "bfloat16"),
                warmup=lat_spec.get("warmup", 2), repeats=lat_spec.get("repeats", 5))
        points.append(point)
    return {"suite": spec["name"], "engine": engine, "units": UNITS, "points": points,
            "slopes": scaling_slopes(points)}


def scaling_slopes(points: list[dict]) -> dict:
    """log-log slope of per-block mixer FLOPs vs tokens between the two largest clips per series.

    About 1 for a linear mixer, approaching 2 for attention once the quadratic term dominates.
    """
    series: dict[str, list] = {}
    for p in points:
        key = f"{p['preset']} {p['height']}x{p['width']} {p['layout']}"
        series.setdefault(key, []).append((p["tokens"], p["flops"]["per_block"]["core_mixer"]))
    out = {}
    for key, pts in series.items():
        pts = sorted(set(pts))
        if len(pts) >= 2 and pts[-1][0] > pts[-2][0]:
            (x0, y0), (x1, y1) = pts[-2], pts[-1]
            out[key] = math.log(y1 / y0) / math.log(x1 / x0)
    return out


def plot_sweep(result: dict, path: str | Path) -> Path:
    """Log-log plot of per-block mixer FLOPs (and block latency if measured) against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result["points"]
    has_latency = any(p["latency"] for p in points)
    fig, axes = plt.subplots(1, 3 if has_latency else 2, figsize=(15 if has_latency else 10, 4.5))
    series: dict[tuple, list] = {}
    for p in points:
        series.setdefault((p["preset"], p["height"], p["layout"]), []).append(p)
    for (preset, h, lay), pts in sorted(series.items()):
        pts.sort(key=lambda p: p["tokens"])
        x = [p["tokens"] for p in pts]
        style = dict(marker="o" if lay == "flat" else "s", ls="-" if "attention" in preset
                     else "--", label=f"{preset} {h}p {lay}")
        axes[0].plot(x, [p["flops"]["per_block"]["core_mixer"] for p in pts], **style)
        axes[1].plot(x, [p["flops"]["total"] for p in pts], **style)
        timed = [p for p in pts if p["latency"]]
        if has_latency and timed:
            axes[2].plot([p["tokens"] for p in timed],
                         [p["latency"]["latency"]["core_block"]["fwdbwd"]["median_ms"]
                          for p in timed], **style)
    titles = ["token mixer FLOPs, one block", "whole model FLOPs, one forward"]
    if has_latency:
        titles.append("core block fwd+bwd latency (ms)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sequence tokens (text + video)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    x_ref = sorted({p["tokens"] for p in points})
    if len(x_ref) >= 2:  # guide lines through the smallest attention point
        y0 = min(p["flops"]["per_block"]["core_mixer"] for p in points)
        for power, name in ((1, "linear"), (2, "quadratic")):
            axes[0].plot(x_ref, [y0 * (x / x_ref[0]) ** power for x in x_ref], color="grey",
                         lw=0.8, ls=":" if power == 1 else "-.", label=f"{name} guide")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI


def _clip_args(p: argparse.ArgumentParser, presets=PAPER_PRESETS, clip=PAPER_CLIP) -> None:
    p.add_argument("--presets", nargs="+", default=list(presets))
    p.add_argument("--height", type=int, default=clip[0])
    p.add_argument("--width", type=int, default=clip[1])
    p.add_argument("--frames", type=int, default=clip[2], help="video frames, 1 + 8k")
    p.add_argument("--layout", choices=LAYOUTS, default="pyramid")
    p.add_argument("--json", default=None, help="output JSON path")
    p.add_argument("--store", default=None, help="DuckDB store path (default: harness.store's)")
    p.add_argument("--no-store", action="store_true")


def cmd_flops(args) -> dict:
    results = []
    accountings = [] if args.no_generation else ["generation"]
    accountings.append("flat" if args.layout == "pyramid" else "pyramid")
    for preset in args.presets:
        t0 = time.perf_counter()
        r = count_flops(preset, args.height, args.width, args.frames, engine=args.engine,
                        layout=args.layout, accountings=accountings, progress=True)
        print(f"{preset}: counted with {r['engine']} in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        results.append(r)
    out = {"clip": {"height": args.height, "width": args.width, "frames": args.frames},
           "units": UNITS, "results": results}
    print(f"\nFLOPs of one forward ({args.height}x{args.width}, {args.frames} frames, "
          f"{args.layout} layout, last frame at the last stage, batch 1, no CFG); "
          f"engine {results[0]['engine']}; FLOPs = 2 x multiply-adds for matrix ops")
    print(flops_table(results))
    other = "flat" if args.layout == "pyramid" else "pyramid"
    print(f"\n{other} layout:")
    print(flops_table(results, other))
    if "generation" in results[0]:
        print("\nwhole generation (every forward, CFG rows included):")
        print(flops_table(results, "generation"))
    by_mixer = {r["mixer"]: r for r in results}
    if {"mamba", "attention"} <= set(by_mixer):
        out["headline"] = headline(by_mixer["mamba"], by_mixer["attention"])
        print("\nM4V vs attention alternative (fraction of FLOPs saved):")
        for key, h in out["headline"].items():
            print(f"  {key:<11} mixers {h['mixer_reduction']:6.1%}   MM-DiM blocks "
                  f"{h['core_block_reduction']:6.1%}   whole model {h['model_reduction']:6.1%}")
    path = write_json(out, args.json or BENCHMARK_DIR / "profile_flops.json")
    print(f"\nwrote {path}")
    if not args.no_store:
        rows = [row for r in results for row in flop_rows("flops", r)]
        print(store_rows(rows, args.store))
    return out


def cmd_crosscheck(args) -> dict:
    from harness.flops import ENGINES, count_layout

    rows = []
    for preset in args.presets:
        cfg = resolve_config(preset)
        geom = clip_geometry(args.height, args.width, args.frames, patch_size=cfg.patch_size,
                             stages=cfg.pyramid_stages)
        lay = clip_layout(cfg, geom, args.layout)
        tallies = {e: count_layout(cfg, lay, e) for e in ENGINES}
        ref = tallies["analytic"]
        for e, t in tallies.items():
            rows.append({"preset": preset, "engine": e, "flops": t.total_flops,
                         "macs": t.total_macs, "equal_to_analytic": t == ref,
                         "by_module": dict(t.flops)})
    print(f"{'preset':<14}{'engine':<14}{'FLOPs':>16}{'MACs':>16}  == analytic")
    for r in rows:
        print(f"{r['preset']:<14}{r['engine']:<14}{r['flops']:>16}{r['macs']:>16}  "
              f"{r['equal_to_analytic']}")
    clip = {"height": args.height, "width": args.width, "frames": args.frames,
            "layout": args.layout}
    path = write_json({"clip": clip, "units": UNITS, "rows": rows},
                      args.json or BENCHMARK_DIR / "profile_crosscheck.json")
    print(f"wrote {path}")
    if not all(r["equal_to_analytic"] for r in rows):
        raise SystemExit("engines disagree")
    return {"rows": rows}


def cmd_latency(args) -> dict:
    results = []
    for preset in args.presets:
        r = profile_latency(preset, args.height, args.width, args.frames, layout=args.layout,
                            what=args.what, modes=args.modes, device=args.device,
                            dtype=args.dtype, batch=args.batch, warmup=args.warmup,
                            repeats=args.repeats)
        results.append(r)
    print(f"latency ({results[0]['device']}, {args.dtype}, {args.height}x{args.width}, "
          f"{args.frames} frames, {args.layout} layout; median of {args.repeats})")
    print(f"{'preset':<14}{'part':<18}{'mode':<8}{'ms':>10}{'peak MiB':>10}  scan backend")
    for r in results:
        for kind, modes in r["latency"].items():
            for mode, t in modes.items():
                mem = t["peak_memory_bytes"]
                print(f"{r['preset']:<14}{kind:<18}{mode:<8}{t['median_ms']:>10.3f}"
                      f"{(mem / 2**20 if mem is not None else float('nan')):>10.1f}  "
                      f"{r['scan_backend']}")
    dev = "cuda" if results[0]["device"] and not results[0]["device"].startswith("cpu") else "cpu"
    path = write_json({"results": results},
                      args.json or BENCHMARK_DIR / f"profile_latency_{dev}.json")
    print(f"wrote {path}")
    if not args.no_store:
        print(store_rows([row for r in results for row in latency_rows("latency", r)],
                         args.store))
    return {"results": results}


def cmd_sweep(args) -> dict:
    spec = load_suite(args.suite)
    result = sweep(spec, latency=args.latency, device=args.device)
    print(f"{'preset':<14}{'res':>6}{'k':>4}{'layout':>9}{'tokens':>8}{'mixer/block':>14}"
          f"{'total':>14}{'fwd+bwd ms':>12}")
    for p in result["points"]:
        lat = (p["latency"]["latency"].get("core_block", {}).get("fwdbwd", {}).get("median_ms")
               if p["latency"] else None)
        print(f"{p['preset']:<14}{p['height']:>6}{p['latent_frames']:>4}{p['layout']:>9}"
              f"{p['tokens']:>8}{fmt_flops(p['flops']['per_block']['core_mixer']):>14}"
              f"{fmt_flops(p['flops']['total']):>14}"
              f"{(f'{lat:.3f}' if lat is not None else '-'):>12}")
    print("\nlog-log slope of mixer FLOPs vs tokens (largest two clips): ~1 linear, ~2 quadratic")
    for key, s in result["slopes"].items():
        print(f"  {key:<36} {s:.2f}")
    path = write_json(result, args.json or BENCHMARK_DIR / f"profile_sweep_{spec['name']}.json")
    print(f"wrote {path}")
    try:
        default = Path("reports") / f"profile_sweep_{spec['name']}.png"
        plot = plot_sweep(result, args.plot or default)
        print(f"wrote {plot}")
    except ImportError as e:  # the GPU machine has no matplotlib: plot later with `ingest`
        print(f"no plot ({e}); run `python -m harness.profile ingest {path}` where it is installed")
    if not args.no_store:
        rows = [row for p in result["points"] for row in flop_rows(spec["name"], p["flops"])]
        rows += [row for p in result["points"] if p["latency"]
                 for row in latency_rows(spec["name"], p["latency"])]
        print(store_rows(rows, args.store))
    return result


def cmd_ingest(args) -> None:
    """Store (and for sweeps, plot) a JSON written by flops / latency / sweep elsewhere."""
    data = json.loads(Path(args.file).read_text())
    name = args.profile or Path(args.file).stem
    if "points" in data:
        rows = [row for p in data["points"] for row in flop_rows(data["suite"], p["flops"])]
        rows += [row for p in data["points"] if p["latency"]
                 for row in latency_rows(data["suite"], p["latency"])]
        print(f"wrote {plot_sweep(data, args.plot or Path('reports') / f'{name}.png')}")
    elif "results" in data and data["results"] and "latency" in data["results"][0]:
        rows = [row for r in data["results"] for row in latency_rows(name, r)]
    elif "results" in data:
        rows = [row for r in data["results"] for row in flop_rows(name, r)]
    else:
        raise ValueError(f"{args.file}: not a JSON written by harness.profile")
    print(store_rows(rows, args.store))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("flops", help="FLOPs of M4V vs attention (default: the paper's clip)")
    _clip_args(p)
    p.add_argument("--engine", default="auto", choices=("auto", "fvcore", "flop_counter",
                                                        "analytic"))
    p.add_argument("--no-generation", action="store_true",
                   help="skip the whole-generation accounting")
    p.set_defaults(fn=cmd_flops)

    p = sub.add_parser("crosscheck", help="every engine on a small clip; they must agree")
    _clip_args(p, presets=("tiny",), clip=(128, 128, 17))
    p.set_defaults(fn=cmd_crosscheck)

    p = sub.add_parser("latency", help="latency and peak memory of blocks / the model")
    _clip_args(p)
    p.add_argument("--what", nargs="+", default=["core_block"],
                   choices=("core_block", "introducer_block", "model"))
    p.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=("fwd", "fwdbwd"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.set_defaults(fn=cmd_latency)

    p = sub.add_parser("sweep", help="FLOPs (and latency) over a suite of clips")
    p.add_argument("suite", nargs="?", default="suites/profile_paper.yaml")
    p.add_argument("--latency", action="store_true", help="also time core blocks (GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--store", default=None)
    p.add_argument("--no-store", action="store_true")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("ingest", help="store (and plot) a JSON measured elsewhere, e.g. a GPU")
    p.add_argument("file")
    p.add_argument("--profile", default=None, help="profile name (default: the file's stem)")
    p.add_argument("--plot", default=None)
    p.add_argument("--store", default=None)
    p.set_defaults(fn=cmd_ingest)

    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    args.fn(args)


if __name__ == "__main__":
    main()
