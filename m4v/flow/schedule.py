"""Noise schedule of pyramidal flow matching (PyramidFlow, Jin et al. 2024, sec. 3.1-3.2).

Convention (rectified flow): ``x = sigma * noise + (1 - sigma) * data``, sigma 1 is pure noise.

The flow is split into ``stages`` spatial stages. Stage ``k`` covers the global fraction
``[stage_range[k], stage_range[k + 1]]`` of the flow and runs at ``1 / 2**(stages - 1 - k)`` of the
full latent resolution. Its endpoints are read from PyramidFlow's discrete training table of
``N = num_train_timesteps`` sigmas, ``sigma_table[j] = (N - j) / N`` (shift 1), at index
``j = int(fraction * N)`` (an index of N means sigma 0). With N = 1000 and thirds this gives the
uncorrected boundaries 1.0, 0.667, 0.334, 0: the published 0.667 / 0.334 / 0.5007 come from this
truncation, not from exact thirds.

Why the start of a later stage is "corrected" (PyramidFlow sec. 3.2, "jump points"): at a stage
jump the previous stage ends at ``x = s * n + (1 - s) * d`` at half resolution, with ``s`` the
uncorrected start sigma of the new stage and ``o = 1 - s`` its data coefficient. Nearest upsampling
copies each noise value into a 2x2 block (within-block covariance ``s**2 * 11^T``). Renoising with
``x' = alpha * up(x) + beta * n_block``, where the block noise has covariance
``(1 + gamma) I - gamma 11^T`` (:func:`m4v.flow.pyramid.block_noise`), makes the noise isotropic
when ``alpha**2 * s**2 = beta**2 * gamma``; its variance is then
``beta**2 (1 + gamma) = (alpha * s)**2 (1 + 1/gamma)``. Requiring ``x'`` to be a point of the
straight path ``sigma' * n' + (1 - sigma') * up(d)`` (data and noise coefficients summing to one)
gives::

    alpha  = 1 / (sqrt(1 + 1/gamma) * (1 - o) + o)
    beta   = alpha * (1 - o) / sqrt(gamma)
    sigma' = 1 - alpha * o            # the corrected start sigma of the new stage

Note: ``alpha * o = o / (sqrt(1 + 1/gamma)(1 - o) + o)`` is the corrected *data* coefficient;
the start *sigma* is one minus it (stage 1: 1 - 0.19976 = 0.800; stage 2: 1 - 0.49925 = 0.5007).
With gamma = 1/3: ``sqrt(1 + 1/gamma) = 2`` and alpha / beta = 0.600 / 0.693 (stage 1),
0.750 / 0.434 (stage 2).

Within a stage, time is the stage-local sigma ``r`` from 1 (stage start) to 0 (stage end):
``x = r * start + (1 - r) * end`` and the global noise level is ``r * s_start + (1 - r) * s_end``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def table_sigma(fraction: float, num_train_timesteps: int) -> float:
    """Sigma of PyramidFlow's discrete table at the global flow ``fraction`` in [0, 1].

    ``sigma_table[j] = (N - j) / N`` for ``j = int(fraction * N) < N``, else 0.
    """
    index = int(fraction * num_train_timesteps)
    if index >= num_train_timesteps:
        return 0.0
    return (num_train_timesteps - index) / num_train_timesteps


def renoise_coefficients(uncorrected_start_sigma: float, gamma: float) -> tuple[float, float]:
    """``(alpha, beta)`` of the jump ``x' = alpha * up(x) + beta * n_block`` (module docstring).

    ``o = 1 - uncorrected_start_sigma``; ``alpha = 1 / (sqrt(1 + 1/gamma)(1 - o) + o)``,
    ``beta = alpha (1 - o) / sqrt(gamma)``.
    """
    o = 1.0 - uncorrected_start_sigma
    alpha = 1.0 / (math.sqrt(1.0 + 1.0 / gamma) * (1.0 - o) + o)
    beta = alpha * (1.0 - o) / math.sqrt(gamma)
    return alpha, beta


def corrected_start_sigma(uncorrected_start_sigma: float, gamma: float) -> float:
    """``1 - alpha * o``: the noise level right after renoising at a stage jump."""
    alpha, _ = renoise_coefficients(uncorrected_start_sigma, gamma)
    return 1.0 - alpha * (1.0 - uncorrected_start_sigma)


class PyramidSchedule:
    """Stage boundaries, endpoint sigmas and jump coefficients of pyramidal flow matching.

    Args:
        stages: number of spatial stages (each doubles the resolution of the previous one).
        gamma: block-noise correlation parameter (PyramidFlow: 1/3); in (0, 1/3] for sampling.
        stage_range: ``stages + 1`` increasing fractions of the flow from 0 to 1; default equal
            parts ``[0, 1/3, 2/3, 1]``.
        num_train_timesteps: size N of the discrete sigma table the boundaries are read from.

    Attributes (tuples indexed by stage, stage 0 the coarsest):
        uncorrected_start_sigmas, start_sigmas, end_sigmas.
    """

    def __init__(
        self,
        stages: int = 3,
        gamma: float = 1 / 3,
        stage_range: Sequence[float] | None = None,
        num_train_timesteps: int = 1000,
    ) -> None:
        if not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages: got {stages!r}, expected an int >= 1")
        if not gamma > 0:
            raise ValueError(f"gamma: got {gamma!r}, expected > 0")
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps: got {num_train_timesteps}, expected >= 1")
        if stage_range is None:
            stage_range = [k / stages for k in range(stages + 1)]
        stage_range = tuple(float(f) for f in stage_range)
        if (
            len(stage_range) != stages + 1
            or stage_range[0] != 0.0
            or stage_range[-1] != 1.0
            or any(a >= b for a, b in zip(stage_range[:-1], stage_range[1:], strict=True))
        ):
            raise ValueError(
                f"stage_range: got {stage_range}, expected {stages + 1} increasing values "
                "from 0 to 1"
            )
        self.stages = stages
        self.gamma = float(gamma)
        self.stage_range = stage_range
        self.num_train_timesteps = num_train_timesteps

        uncorrected = [table_sigma(f, num_train_timesteps) for f in stage_range]
        self.uncorrected_start_sigmas = tuple(uncorrected[:-1])
        self.end_sigmas = tuple(uncorrected[1:])
        self.start_sigmas = (uncorrected[0],) + tuple(
            corrected_start_sigma(s, self.gamma) for s in uncorrected[1:-1]
        )

    def __repr__(self) -> str:
        return (
            f"PyramidSchedule(stages={self.stages}, gamma={self.gamma:.4g}, "
            f"stage_range={self.stage_range}, num_train_timesteps={self.num_train_timesteps})"
        )

    def check_stage(self, stage: int) -> None:
        if not 0 <= stage < self.stages:
            raise ValueError(f"stage: got {stage}, expected 0 <= stage < {self.stages}")

    def levels_below_full(self, stage: int) -> int:
        """How many x2 downsamplings separate ``stage``'s resolution from the full latent."""
        self.check_stage(stage)
        return self.stages - 1 - stage

    def renoise(self, stage: int) -> tuple[float, float]:
        """``(alpha, beta)`` applied when jumping from ``stage - 1`` into ``stage`` (>= 1)."""
        self.check_stage(stage)
        if stage == 0:
            raise ValueError("stage: got 0, expected >= 1 (there is no jump into stage 0)")
        return renoise_coefficients(self.uncorrected_start_sigmas[stage], self.gamma)

    def global_sigma(self, stage: int, r: torch.Tensor | float) -> torch.Tensor | float:
        """Noise level of stage-local sigma ``r``: ``r * s_start + (1 - r) * s_end``."""
        self.check_stage(stage)
        return r * self.start_sigmas[stage] + (1 - r) * self.end_sigmas[stage]

    @staticmethod
    def stage_local_sigmas(steps: int) -> torch.Tensor:
        """Euler grid of one stage, ``(steps + 1,)``: ``linspace(1, 0, steps + 1)`` in float64.

        PyramidFlow uses ``linspace(1, 1/N, steps)`` followed by 0, which spends its last model
        call on a 1/N-long step; the uniform grid uses every call for an equal share of the stage.
        """
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: got {steps!r}, expected an int >= 1")
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
