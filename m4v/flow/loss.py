"""Training objective of pyramidal flow matching with a temporal pyramid (PyramidFlow sec. 3).

For one sample, with stage ``s`` (resolution ``1 / 2**(stages-1-s)``) and frame ``i``:

* ``noise`` = full-resolution ``N(0, I)`` downsampled to stage s, x2 per level (unit variance);
* ``end   = s_end * noise + (1 - s_end) * clean_i``                (clean at stage s);
* ``start = s_start * noise + (1 - s_start) * up(clean_i at stage s-1)``, nearest upsampling;
  stage 0 starts from pure noise (``s_start = 1``);
* ``r ~ U[0, 1]``, ``x = r * start + (1 - r) * end``, ``sigma = r * s_start + (1 - r) * s_end``;
* target velocity ``start - end`` (= dx/dr), loss ``MSE(model(history + [x]), start - end)``.

This is PyramidFlow's piecewise flow (paper eq. (7)-(9): each stage interpolates between a noisier
upsampled coarse endpoint and a cleaner endpoint at its own resolution; the same noise is used by
both endpoints, which makes the stage path straight). The history of frame ``i`` is the eq. (1)
layout (:mod:`m4v.flow.history`) built from the clean latents and corrupted with
``s * eps + (1 - s) * h``, ``s ~ U[0, 1/3]``. Only the newest frame is supervised.

Decisions (documented for the trainer and the sampler):

* **Stages** split the batch deterministically in the ratios ``stage_ratios`` (PyramidFlow's
  ``[1, 2, 1]``): ``floor(b * r_k / sum(r))`` samples each; the ``b mod sum`` leftover samples draw
  their stage at random with probabilities ``r_k / sum(r)``, so tiny batches still visit every
  stage with the right frequencies.
* **Frame index** ``i ~ U{0, ..., T-1}``. ``frame_sampling="batch"`` (default) draws one ``i`` per
  batch: every stage group then shares its history length and the step costs exactly ``stages``
  model calls with large groups. ``"sample"`` draws ``i`` per sample (less correlated gradients,
  up to ``stages * T`` calls with small groups). Both are unbiased for the same objective.
* **Grouping**: samples sharing ``(stage, i)`` have the same resolutions and history length and go
  through the model in one call. The batch loss is ``sum_g n_g / b * MSE_g`` (``MSE_g`` the mean
  over the group's elements), i.e. the mean of per-sample MSEs.
* **Text dropout**: with probability ``text_dropout`` a sample's text is replaced, row by row, by
  the caller's ``empty_text`` embedding (the text encoder applied to ``""``), the same embedding
  the sampler uses as the unconditional branch of classifier-free guidance. Unlike zero tokens
  with an all-False mask, a real empty-prompt embedding never leaves attention without a key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from m4v.flow.conditioning import TextLike, select_text, take_text, text_fields
from m4v.flow.history import corrupt_history, history_frames
from m4v.flow.pyramid import (
    check_latent_size,
    downsample_noise,
    gaussian,
    stage_pyramid,
    upsample_nearest,
)
from m4v.flow.schedule import PyramidSchedule

FrameSampling = Literal["batch", "sample"]


def split_by_ratio(
    batch: int, ratios: tuple[float, ...], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Stage of each of ``batch`` samples, ``(batch,)`` long, in the proportions ``ratios``.

    ``floor(batch * r_k / sum(r))`` samples per stage, in stage order; the remainder drawn from
    the categorical distribution ``r / sum(r)``.
    """
    total = float(sum(ratios))
    counts = [math.floor(batch * r / total) for r in ratios]
    left = batch - sum(counts)
    if left:
        draw = generator.device if generator is not None else "cpu"
        probs = torch.tensor([r / total for r in ratios], device=draw)
        for k in torch.multinomial(probs, left, replacement=True, generator=generator).tolist():
            counts[k] += 1
    return torch.tensor([k for k, n in enumerate(counts) for _ in range(n)], dtype=torch.long)


@dataclass(frozen=True)
class LossGroup:
    """One model call: samples with the same stage and frame index."""

    stage: int
    frame: int
    size: int
    mse: torch.Tensor  # detached scalar, mean over the group's elements


@dataclass
class FlowLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    groups: list[LossGroup]
    stages: torch.Tensor  # (b,) stage of each sample
    frames: torch.Tensor  # (b,) predicted frame index of each sample
    text_dropped: torch.Tensor  # (b,) bool, True where the empty text was used

    def stage_losses(self) -> dict[int, torch.Tensor]:
        """Size-weighted mean MSE per stage (detached), for logging."""
        sums: dict[int, torch.Tensor] = {}
        sizes: dict[int, int] = {}
        for g in self.groups:
            sums[g.stage] = sums.get(g.stage, 0) + g.mse * g.size
            sizes[g.stage] = sizes.get(g.stage, 0) + g.size
        return {k: sums[k] / sizes[k] for k in sorted(sums)}


class PyramidFlowLoss:
    """The pyramidal flow-matching loss (module docstring).

    Args:
        schedule: stage sigmas; default ``PyramidSchedule()`` (3 stages, gamma 1/3).
        stage_ratios: relative share of the batch per stage (one per stage).
        text_dropout: probability of replacing a sample's text by ``empty_text``.
        history_noise: history corruption ``s ~ U[0, history_noise)``.
        frame_sampling: ``"batch"`` (one frame index per batch) or ``"sample"`` (per sample).
        patch_size: model patch size; the coarsest stage must be a whole number of patches.
    """

    def __init__(
        self,
        schedule: PyramidSchedule | None = None,
        stage_ratios: tuple[float, ...] = (1, 2, 1),
        text_dropout: float = 0.1,
        history_noise: float = 1 / 3,
        frame_sampling: FrameSampling = "batch",
        patch_size: int = 2,
    ) -> None:
        self.schedule = schedule if schedule is not None else PyramidSchedule()
        stage_ratios = tuple(float(r) for r in stage_ratios)
        stages = self.schedule.stages
        if len(stage_ratios) != stages or min(stage_ratios) < 0 or not any(stage_ratios):
            raise ValueError(
                f"stage_ratios: got {stage_ratios}, expected {stages} non-negative "
                "values, not all zero"
            )
        if not 0 <= text_dropout <= 1:
            raise ValueError(f"text_dropout: got {text_dropout}, expected in [0, 1]")
        if not 0 <= history_noise <= 1:
            raise ValueError(f"history_noise: got {history_noise}, expected in [0, 1]")
        if frame_sampling not in ("batch", "sample"):
            raise ValueError(
                f"frame_sampling: got {frame_sampling!r}, expected 'batch' or 'sample'"
            )
        if patch_size < 1:
            raise ValueError(f"patch_size: got {patch_size}, expected >= 1")
        self.stage_ratios = stage_ratios
        self.text_dropout = float(text_dropout)
        self.history_noise = float(history_noise)
        self.frame_sampling = frame_sampling
        self.patch_size = patch_size

    def __call__(
        self,
        model: nn.Module,
        latents: torch.Tensor,
        text: TextLike,
        empty_text: TextLike,
        generator: torch.Generator | None = None,
    ) -> FlowLossOutput:
        """Loss on clean ``latents`` (b, C, T, h, w) with prompts ``text`` (batch b).

        ``empty_text``: the empty-prompt embedding, batch 1 or b (the text-dropout replacement).
        ``generator``: every random draw (stages, frames, noise, r, dropout) comes from it.
        """
        if latents.dim() != 5:
            raise ValueError(f"latents: got shape {tuple(latents.shape)}, expected (b, C, T, h, w)")
        b, _, num_frames, h, w = latents.shape
        sched = self.schedule
        check_latent_size(h, w, sched.stages, self.patch_size, "latents")
        device = latents.device
        draw = generator.device if generator is not None else device

        dropped = torch.rand(b, generator=generator, device=draw).to(device) < self.text_dropout
        cond = select_text(
            text_fields(text, b, "text"), text_fields(empty_text, b, "empty_text"), dropped
        )
        stages = split_by_ratio(b, self.stage_ratios, generator).to(device)
        frame_draws = 1 if self.frame_sampling == "batch" else b
        frames = torch.randint(num_frames, (frame_draws,), generator=generator, device=draw)
        frames = frames.to(device).expand(b)

        pyramid = stage_pyramid(latents.float(), sched.stages)
        total = latents.new_zeros((), dtype=torch.float32)
        groups = []
        keys = torch.unique(stages * num_frames + frames).tolist()
        for key in keys:
            stage, frame = divmod(int(key), num_frames)
            rows = torch.nonzero((stages == stage) & (frames == frame)).squeeze(1)
            n = rows.numel()
            x, sigma, target = self._noisy_frame(pyramid, rows, stage, frame, generator)
            hist, ids = history_frames(pyramid, frame, stage)
            hist = corrupt_history([f[rows] for f in hist], self.history_noise, generator)
            t = take_text(cond, rows)
            velocity = model(hist + [x], ids + [frame], sigma, t.tokens, t.mask, t.pooled)
            if velocity.shape != target.shape:
                raise ValueError(
                    f"model: returned shape {tuple(velocity.shape)}, expected {tuple(target.shape)}"
                )
            mse = F.mse_loss(velocity.float(), target)
            total = total + mse * (n / b)
            groups.append(LossGroup(stage, frame, n, mse.detach()))
        return FlowLossOutput(total, groups, stages, frames, dropped)

    def _noisy_frame(
        self,
        pyramid: list[torch.Tensor],
        rows: torch.Tensor,
        stage: int,
        frame: int,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x (n, C, h_s, w_s), sigma (n,), target = start - end)`` of ``frame`` at ``stage``."""
        sched = self.schedule
        full = pyramid[-1]
        n, c = rows.numel(), full.shape[1]
        noise = gaussian((n, c, *full.shape[-2:]), generator, full.device)
        noise = downsample_noise(noise, sched.levels_below_full(stage))
        s_start, s_end = sched.start_sigmas[stage], sched.end_sigmas[stage]
        end = s_end * noise + (1 - s_end) * pyramid[stage][rows, :, frame]
        if stage == 0:
            start = noise
        else:
            coarse = upsample_nearest(pyramid[stage - 1][rows, :, frame])
            start = s_start * noise + (1 - s_start) * coarse
        draw = generator.device if generator is not None else full.device
        r = torch.rand(n, generator=generator, device=draw).to(full.device)
        x = r.view(n, 1, 1, 1) * start + (1 - r.view(n, 1, 1, 1)) * end
        sigma = r * s_start + (1 - r) * s_end
        return x, sigma, start - end
