"""Autoregressive pyramidal flow sampler (PyramidFlow sec. 3.2-3.3, its video pipeline).

Latent frames are generated one at a time. For frame ``i``:

1. draw full-resolution noise ``(b, C, h, w)`` and downsample it to stage 0 (x2 per level, unit
   variance): the stage-0 start, sigma 1;
2. in each stage ``s``, Euler steps in the stage-local sigma ``r`` from 1 to 0
   (``x <- x + (r_next - r) * v``, ``v`` the predicted ``start - end``), the model seeing the
   global noise level ``sigma = r * s_start + (1 - r) * s_end``;
3. at each jump into stage ``s``: nearest x2 upsampling, then ``x <- alpha * x + beta * n`` with
   block noise ``n`` (:func:`m4v.flow.pyramid.block_noise`) and ``(alpha, beta)`` from
   :meth:`PyramidSchedule.renoise`; this lands exactly on the corrected start sigma of stage s;
4. the history of frame ``i`` is the eq. (1) layout (:mod:`m4v.flow.history`) of the frames
   generated so far, clean (the training-time corruption is not applied at sampling).

Classifier-free guidance: ``v = v_u + g (v_c - v_u)``, conditional and unconditional rows in one
batched model call (skipped, conditional only, when ``g == 1``). The first frame (the "image")
and later frames have their own guidance and per-stage steps (PyramidFlow: 7 with [20, 20, 20],
later 5 with [10, 10, 10]). ``neg_text`` is the unconditional text: the empty-prompt embedding
that text dropout used in training, or a negative prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from m4v.flow.conditioning import TextFields, TextLike, concat_text, text_fields
from m4v.flow.history import history_frames
from m4v.flow.pyramid import (
    block_noise,
    check_latent_size,
    downsample,
    downsample_noise,
    gaussian,
    upsample_nearest,
)
from m4v.flow.schedule import PyramidSchedule


def _check_steps(steps: Sequence[int], stages: int, name: str) -> tuple[int, ...]:
    steps = tuple(steps)
    if len(steps) != stages or any(not isinstance(k, int) or k < 1 for k in steps):
        raise ValueError(f"{name}: got {steps}, expected {stages} positive ints (one per stage)")
    return steps


class PyramidSampler:
    """Text-to-video sampling with pyramidal flow and a temporal pyramid (module docstring).

    Args:
        schedule: stage sigmas and jump coefficients; default ``PyramidSchedule()``.
        first_frame_guidance, first_frame_steps: CFG scale and Euler steps per stage of frame 0.
        guidance, steps: the same for every later frame.
        patch_size: model patch size (latent size must be a multiple of ``2**(stages-1) * patch``).
        progress: show a tqdm bar over frames.
    """

    def __init__(
        self,
        schedule: PyramidSchedule | None = None,
        *,
        first_frame_guidance: float = 7.0,
        first_frame_steps: Sequence[int] = (20, 20, 20),
        guidance: float = 5.0,
        steps: Sequence[int] = (10, 10, 10),
        patch_size: int = 2,
        progress: bool = True,
    ) -> None:
        self.schedule = schedule if schedule is not None else PyramidSchedule()
        stages = self.schedule.stages
        self.first_frame_steps = _check_steps(first_frame_steps, stages, "first_frame_steps")
        self.steps = _check_steps(steps, stages, "steps")
        self.first_frame_guidance = float(first_frame_guidance)
        self.guidance = float(guidance)
        if patch_size < 1:
            raise ValueError(f"patch_size: got {patch_size}, expected >= 1")
        self.patch_size = patch_size
        self.progress = progress

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        text: TextLike,
        neg_text: TextLike | None,
        *,
        num_frames: int,
        latent_hw: tuple[int, int],
        channels: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Generate latents ``(b, channels, num_frames, h, w)``, b = the batch of ``text``.

        ``neg_text``: batch 1 or b; may be None only if both guidance scales are 1.
        """
        sched = self.schedule
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames: got {num_frames!r}, expected an int >= 1")
        if channels < 1:
            raise ValueError(f"channels: got {channels}, expected >= 1")
        if len(tuple(latent_hw)) != 2:
            raise ValueError(f"latent_hw: got {latent_hw!r}, expected (h, w)")
        h, w = (int(v) for v in latent_hw)
        check_latent_size(h, w, sched.stages, self.patch_size, "latent_hw")
        batch = text.tokens.shape[0] if hasattr(text, "tokens") else 0
        cond = text_fields(text, batch, "text")
        uses_cfg = self.first_frame_guidance != 1 or (num_frames > 1 and self.guidance != 1)
        if neg_text is None and uses_cfg:
            raise ValueError("neg_text: got None, expected an embedding (guidance != 1 needs it)")
        uncond = text_fields(neg_text, batch, "neg_text") if neg_text is not None else None
        device = cond.tokens.device

        # generated clean frames per stage resolution, each (b, C, i, h_s, w_s)
        pyramid = []
        for stage in range(sched.stages):
            levels = sched.levels_below_full(stage)
            pyramid.append(torch.zeros(batch, channels, 0, h >> levels, w >> levels, device=device))
        bar = tqdm(range(num_frames), desc="frames", unit="frame", disable=not self.progress)
        for i in bar:
            first = i == 0
            frame = self.sample_frame(
                model, pyramid, i, cond, uncond,
                guidance=self.first_frame_guidance if first else self.guidance,
                steps=self.first_frame_steps if first else self.steps,
                shape=(batch, channels, h, w),
                generator=generator,
            )
            levels = [frame]
            for _ in range(sched.stages - 1):
                levels.append(downsample(levels[-1]))
            pyramid = [
                torch.cat([p, f.unsqueeze(2)], dim=2)
                for p, f in zip(pyramid, levels[::-1], strict=True)
            ]
        return pyramid[-1]

    def sample_frame(
        self,
        model: nn.Module,
        pyramid: Sequence[torch.Tensor],
        frame: int,
        cond: TextFields,
        uncond: TextFields | None,
        *,
        guidance: float,
        steps: Sequence[int],
        shape: tuple[int, int, int, int],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One latent frame ``(b, C, h, w)`` at full resolution through all stages.

        ``pyramid[s]``: clean frames generated so far at stage s, ``(b, C, >= frame, h_s, w_s)``.
        """
        sched = self.schedule
        steps = _check_steps(steps, sched.stages, "steps")
        device = cond.tokens.device
        cfg = guidance != 1
        if cfg and uncond is None:
            raise ValueError("uncond: got None, expected text fields (guidance != 1 needs them)")
        text = concat_text(cond, uncond) if cfg else cond

        x = downsample_noise(gaussian(shape, generator, device), sched.stages - 1)
        for stage in range(sched.stages):
            if stage > 0:
                alpha, beta = sched.renoise(stage)
                x = upsample_nearest(x)
                x = alpha * x + beta * block_noise(x.shape, sched.gamma, generator=generator,
                                                   device=device)
            history, ids = history_frames(pyramid, frame, stage)
            if cfg:
                history = [torch.cat([f, f]) for f in history]
            grid = sched.stage_local_sigmas(steps[stage])
            for r, r_next in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
                sigma = torch.full((x.shape[0],), sched.global_sigma(stage, r), device=device)
                if cfg:
                    x2, sigma2 = torch.cat([x, x]), torch.cat([sigma, sigma])
                    v = model(history + [x2], ids + [frame], sigma2, text.tokens, text.mask,
                              text.pooled)
                    v_cond, v_uncond = v.float().chunk(2)
                    v = v_uncond + guidance * (v_cond - v_uncond)
                else:
                    v = model(history + [x], ids + [frame], sigma, text.tokens, text.mask,
                              text.pooled).float()
                x = x + (r_next - r) * v
        return x
