"""The training loop: AdamW with warm-up, gradient clipping, EMA, bf16 autocast, DDP / FSDP2,
atomic resumable checkpoints, JSONL metrics and a tqdm bar.

Exact resume. Every random draw of step ``s`` on rank ``r`` (noise, timesteps, text dropout,
history corruption, any dropout) comes from the global RNGs re-seeded at the start of the step
from ``(seed, s, r)``, and the data of step ``s`` is a pure function of ``(seed, s)``
(:mod:`m4v.train.batches`). The checkpoint stores parameters, EMA, optimiser and lr-scheduler state
and the step; with them a resumed run performs the same arithmetic as one that never stopped.
This replaces storing RNG states: those would tie a resume to the world size that saved them,
while a seed derived from the step is valid on any number of ranks (the per-rank draws then
differ, as they must, but the data of each step stays the same global batch).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from tqdm.auto import tqdm

from m4v.train.batches import step_batches
from m4v.train.checkpoint import (
    CheckpointManager,
    check_resume_config,
    latest_on_all_ranks,
    read_checkpoint_info,
)
from m4v.train.components import Task, build_task, sample_prompts
from m4v.train.config import TrainConfig, apply_overrides
from m4v.train.distributed import (
    DistInfo,
    init_distributed,
    mean_over_ranks,
    resolve_parallel,
    shutdown,
    unwrap,
    wrap,
)
from m4v.train.ema import EMA
from m4v.train.metrics import MetricsLog, Sink


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # optimiser steps done
    resumed_from: int | None  # step of the checkpoint this invocation started from
    checkpoint: Path | None  # the latest checkpoint when training ended
    last_metrics: dict[str, float] = field(default_factory=dict)
    samples: list[Path] = field(default_factory=list)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The 63-bit seed of step ``step`` on rank ``rank``."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` after ``k`` optimiser steps: linear warm-up to 1, then constant
    or a cosine decay to ``min_lr_ratio`` at ``cfg.steps`` (the ``--steps`` of this invocation)."""

    def factor(k: int) -> float:
        if k < cfg.warmup_steps:
            return (k + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (k - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def resolve_run_config(run_dir: str | os.PathLike, preset: str | None,
                       overrides: dict[str, Any]) -> tuple[TrainConfig, Path | None]:
    """The configuration to train with in ``run_dir`` and its latest checkpoint (or None).

    A new run starts from ``preset`` (default ``tiny``). A run with a checkpoint starts from the
    checkpoint's own configuration unless ``preset`` is given explicitly; either way the
    ``overrides`` are applied, local paths made absolute, and the result must be resumable from
    the checkpoint (:func:`m4v.train.checkpoint.check_resume_config` raises otherwise).
    """
    latest = CheckpointManager(run_dir).latest()
    if latest is None:
        base = TrainConfig.preset_config(preset or "tiny")
        return apply_overrides(base, overrides).with_absolute_paths(), None
    stored = read_checkpoint_info(latest).config
    base = TrainConfig.preset_config(preset) if preset else stored
    cfg = apply_overrides(base, overrides).with_absolute_paths()
    check_resume_config(stored, cfg, latest)
    return cfg, latest


def check_fsdp_call_pattern(cfg: TrainConfig, world_size: int) -> None:
    """FSDP2 gathers each block's parameters on every forward call, so all ranks must call the
    model equally often. The flow loss makes one call per (stage, frame) group of its batch:
    that count is the same everywhere only when each stage's share of the per-rank batch is a
    whole number (no randomly placed leftovers) and one frame index is drawn per batch."""
    local = cfg.batch_size // world_size
    ratios = cfg.flow.stage_ratios
    shares = [local * r / sum(ratios) for r in ratios]
    if cfg.flow.frame_sampling != "batch" or not all(s.is_integer() for s in shares):
        raise ValueError(
            f"parallel=fsdp: got per-rank batch {local} (batch_size {cfg.batch_size} / "
            f"{world_size} ranks), flow.stage_ratios {ratios}, flow.frame_sampling "
            f"{cfg.flow.frame_sampling!r}; expected frame_sampling 'batch' and a per-rank batch "
            f"whose stage shares are whole numbers (a multiple of {sum(ratios):g} for these "
            "ratios), so that every rank makes the same number of model calls (FSDP2 gathers "
            "parameters in each call; unequal counts deadlock). Or use parallel=ddp."
        )


def _precision_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.precision == "auto":
        return device.type == "cuda"
    if cfg.precision == "bf16" and device.type == "cpu":
        return True  # allowed (CPU autocast supports bf16), if rarely useful
    return cfg.precision == "bf16"


def _set_activation_checkpointing(module: nn.Module, enabled: bool) -> int:
    """Switch ``gradient_checkpointing`` on every submodule that has it; return how many."""
    count = 0
    for sub in module.modules():
        if hasattr(sub, "gradient_checkpointing"):
            sub.gradient_checkpointing = enabled
            count += 1
    return count


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (all ranks agree on a reduced norm), else ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class _Window:
    """Sums of the logged statistics since the last log line (kept on the device)."""

    def __init__(self, names: Iterable[str]):
        self.names = list(names) + ["grad_norm"]
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = dict.fromkeys(self.names, 0)
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor], samples: int) -> None:
        for k, v in stats.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] += 1
        self.samples += samples

    def means(self, device: torch.device) -> dict[str, float]:
        """Per-rank means averaged over ranks (a statistic missing on a rank counts 0 there)."""
        values: dict[str, float] = {}
        for k in self.names:
            values[f"sum.{k}"] = float(self.sums[k]) if k in self.sums else 0.0
            values[f"n.{k}"] = float(self.counts[k])
        values = mean_over_ranks(values, device)  # ratios of means == ratios of sums
        return {k: values[f"sum.{k}"] / values[f"n.{k}"] for k in self.names if values[f"n.{k}"]}


class Trainer:
    """One training invocation in ``run_dir`` (resuming if it holds a checkpoint)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | os.PathLike, info: DistInfo, *,
                 sinks: Iterable[Sink] = (), build: Callable[[TrainConfig], Task] = build_task,
                 progress: bool = True):
        self.cfg, self.info = cfg, info
        self.run_dir = Path(run_dir)
        self.device = info.device
        self.progress = progress and info.is_main
        self.manager = CheckpointManager(self.run_dir, keep_last=cfg.keep_last)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", sinks, enabled=info.is_main)

        seed_everything(cfg.seed)  # the same initial weights on every rank
        self.task = build(cfg)
        module = self.task.module.to(self.device)
        for frozen in self.task.frozen:
            frozen.to(self.device)
        self.bf16 = _precision_bf16(cfg, self.device)
        checkpointing = cfg.activation_checkpointing
        if checkpointing is None:
            checkpointing = self.device.type == "cuda"
        _set_activation_checkpointing(module, checkpointing)
        self.parallel = resolve_parallel(cfg.parallel, info)
        if self.parallel == "fsdp" and cfg.stage == "t2v":
            check_fsdp_call_pattern(cfg, info.world_size)
        self.module = wrap(module, self.parallel, info, self.bf16)
        self.params = [p for p in unwrap(self.module).parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg))
        self.ema = EMA(unwrap(self.module), cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step = 0

    # ------------------------------------------------------------------ state

    def _state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save(self) -> Path:
        meta = {
            "world_size": self.info.world_size, "parallel": self.parallel,
            "scheduler": self.scheduler.state_dict(), "has_ema": self.ema is not None,
            "samples_seen": self.step * self.cfg.batch_size, "torch": torch.__version__,
        }
        path = self.manager.save(self.step, self._state(), self.cfg, meta)
        self.metrics.log({"event": "checkpoint", "step": self.step, "path": str(path)})
        return path

    def load(self, path: Path) -> None:
        state = self._state()
        trainer = self.manager.load(path, state)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.step = int(trainer["step"])

    # ------------------------------------------------------------------ loop

    def _train_step(self, batch: dict, window: _Window) -> None:
        inputs = self.task.prepare(batch, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss, stats = self.module(**inputs)
        loss.backward()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        window.add({**stats, "grad_norm": grad_norm}, self.cfg.batch_size)

    def _log(self, window: _Window) -> dict[str, float]:
        means = window.means(self.device)
        elapsed = time.perf_counter() - window.start
        record = {"event": "train", "step": self.step, "lr": self.scheduler.get_last_lr()[0],
                  "samples_per_s": window.samples / max(elapsed, 1e-9), **means}
        self.metrics.log(record)
        window.reset()
        if not math.isfinite(means.get("loss", 0.0)):
            raise FloatingPointError(
                f"loss is {means['loss']} at step {self.step}: training diverged. Resume from the "
                "last checkpoint with a lower lr (--set lr=...) or stronger clipping (grad_clip)."
            )
        return record

    def fit(self, resume_from: Path | None) -> TrainResult:
        cfg, info = self.cfg, self.info
        resumed = None
        if resume_from is not None:
            self.load(resume_from)
            resumed = self.step
            dropped = self.metrics.truncate_after(self.step)
            if info.is_main:
                print(f"resumed from step {self.step} ({resume_from})"
                      + (f"; dropped {dropped} metric records logged after it" if dropped else ""),
                      flush=True)
        elif info.is_main:
            print(f"training from scratch in {self.run_dir}", flush=True)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(cfg.to_json())
            self.metrics.log({"event": "start", "step": self.step, "run_dir": str(self.run_dir),
                              "world_size": info.world_size, "parallel": self.parallel,
                              "config": cfg.to_dict()})

        last: dict[str, float] = {}
        checkpoint = resume_from
        if self.step < cfg.steps:
            batches = step_batches(self.task.dataset, cfg.batch_size, info.rank, info.world_size,
                                   cfg.seed, self.step, cfg.data.num_workers)
            window = _Window(getattr(unwrap(self.module), "stat_names", ["loss"]))
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.stage}", unit="step",
                       disable=not self.progress, dynamic_ncols=True, file=sys.stderr)
            self.module.train()
            while self.step < cfg.steps:
                seed_everything(step_seed(cfg.seed, self.step, info.rank))
                self._train_step(next(batches), window)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    last = self._log(window)
                    bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4f}")
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    checkpoint = self.save()
            bar.close()
        elif info.is_main:
            print(f"already at step {self.step} (--steps {cfg.steps}): nothing to train; "
                  "pass a larger --steps to continue", flush=True)
        return TrainResult(self.run_dir, self.step, resumed, checkpoint, last)


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, sinks: Iterable[Sink] = (),
          build: Callable[[TrainConfig], Task] = build_task, progress: bool = True) -> TrainResult:
    """Train ``cfg`` in ``run_dir``, resuming from its latest checkpoint if it has one.

    Runs as one process, or as one rank of a ``torchrun`` job (the process group is created from
    the environment and destroyed at the end). Ends with samples in ``run_dir/samples`` (stage
    t2v, ``cfg.sample_at_end``) or the exported VAE in ``run_dir/vae`` (stage vae).
    """
    info = init_distributed(cfg.device)
    try:
        manager = CheckpointManager(run_dir, keep_last=cfg.keep_last)
        latest = latest_on_all_ranks(manager)
        if latest is not None:
            check_resume_config(read_checkpoint_info(latest).config, cfg, latest)
        trainer = Trainer(cfg, run_dir, info, sinks=sinks, build=build, progress=progress)
        result = trainer.fit(latest)
        if result.checkpoint is not None:
            result.samples = finish(cfg, result.checkpoint, trainer, info)
        return result
    finally:
        shutdown(info)


def finish(cfg: TrainConfig, checkpoint: Path, trainer: Trainer, info: DistInfo) -> list[Path]:
    """End-of-run products from the final checkpoint: sample videos (t2v) or the VAE export."""
    run_dir = trainer.run_dir
    if cfg.stage == "vae":
        from m4v.train.vae_export import export_vae

        if info.is_main:
            folder = export_vae(checkpoint, run_dir / "vae", trainer.task.dataset, trainer.device)
            print(f"VAE: {folder} (use it with --set codec=causal3d:{folder})", flush=True)
            return [folder]
        return []
    if not cfg.sample_at_end or cfg.sample.num_prompts == 0:
        return []
    from m4v.generate import generate

    paths = generate(checkpoint, sample_prompts(cfg), cfg.sample.num_samples, run_dir / "samples",
                     rank=info.rank, world_size=info.world_size, device=str(trainer.device),
                     progress=trainer.progress)
    if info.is_main:
        print(f"samples: {run_dir / 'samples'}", flush=True)
    trainer.metrics.log({"event": "samples", "step": trainer.step,
                         "folder": str(run_dir / "samples"), "count": len(paths)})
    return paths
