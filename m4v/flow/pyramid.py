"""Spatial pyramid operations on latents, after PyramidFlow (Jin et al. 2024, sec. 3.1-3.2).

Latents are ``(b, C, h, w)`` frames or ``(b, C, t, h, w)`` clips; every operation acts on the last
two (spatial) axes only. One pyramid level is a factor 2 in each spatial direction.

* :func:`downsample`: 2x2 mean per level. This is exactly ``F.interpolate(scale_factor=0.5,
  mode="bilinear", align_corners=False)`` (each output sample sits midway between two input
  samples in each direction), which PyramidFlow uses, computed as an average pool.
* :func:`downsample_noise`: the same, times 2 per level, so unit-variance white noise stays unit
  variance (the mean of 4 independent values has variance 1/4).
* :func:`upsample_nearest`: each value copied into a 2x2 block per level.
* :func:`block_noise`: the renoising noise of stage jumps, 2x2 blocks with covariance
  ``(1 + gamma) I - gamma 11^T``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def check_latent_size(height: int, width: int, stages: int, patch_size: int, name: str) -> None:
    """Raise ValueError (naming ``name``) unless h, w are multiples of ``2**(stages-1) * patch``.

    The coarsest stage must still be a whole number of patches.
    """
    factor = 2 ** (stages - 1) * patch_size
    if height < 1 or width < 1 or height % factor or width % factor:
        raise ValueError(
            f"{name}: got spatial size {height}x{width}, expected multiples of "
            f"2**(stages-1) * patch_size = {factor} (stages={stages}, patch_size={patch_size})"
        )


def _frames(x: torch.Tensor, name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """View ``(b, C, h, w)`` or ``(b, C, t, h, w)`` as frames ``(b or b*t, C, h, w)``."""
    if x.dim() == 4:
        return x, x.shape
    if x.dim() == 5:
        b, c, t, h, w = x.shape
        return x.transpose(1, 2).reshape(b * t, c, h, w), x.shape
    raise ValueError(
        f"{name}: got shape {tuple(x.shape)}, expected (b, C, h, w) or (b, C, t, h, w)"
    )


def _unframes(y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 4:
        return y
    b, c, t = shape[:3]
    return y.reshape(b, t, c, *y.shape[-2:]).transpose(1, 2)


def downsample(x: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """2x2 mean pooling ``levels`` times: ``(..., h, w) -> (..., h / 2**levels, w / 2**levels)``."""
    if levels < 0:
        raise ValueError(f"levels: got {levels}, expected >= 0")
    if levels == 0:
        return x
    h, w = x.shape[-2:]
    k = 2**levels
    if h % k or w % k:
        raise ValueError(f"x: got spatial size {h}x{w}, expected multiples of 2**levels = {k}")
    y, shape = _frames(x, "x")
    return _unframes(F.avg_pool2d(y, kernel_size=k, stride=k), shape)


def downsample_noise(noise: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """:func:`downsample` times ``2**levels``: keeps white noise at unit variance."""
    return downsample(noise, levels) * (2.0**levels)


def upsample_nearest(x: torch.Tensor, levels: int = 1) -> torch.Tensor:
    """Nearest-neighbour x2 upsampling ``levels`` times (each value fills a 2x2 block per level)."""
    if levels < 0:
        raise ValueError(f"levels: got {levels}, expected >= 0")
    if levels == 0:
        return x
    k = 2**levels
    return x.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def stage_pyramid(x: torch.Tensor, stages: int) -> list[torch.Tensor]:
    """``[x at stage 0 (coarsest), ..., x at stage stages-1 (= x)]`` by repeated :func:`downsample`.

    Each level is pooled from the next finer one, which equals pooling the full resolution
    directly (means of means over equal-size blocks).
    """
    if stages < 1:
        raise ValueError(f"stages: got {stages}, expected >= 1")
    levels = [x]
    for _ in range(stages - 1):
        levels.append(downsample(levels[-1]))
    return levels[::-1]


def gaussian(
    shape: Sequence[int],
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``device``/``dtype``.

    Drawing on the generator's device keeps results identical whichever device runs the model.
    """
    draw_device = generator.device if generator is not None else device
    z = torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=torch.float32)
    return z.to(device=device, dtype=dtype or torch.float32)


def block_noise(
    shape: Sequence[int],
    gamma: float = 1 / 3,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Noise of shape ``(..., h, w)`` made of independent 2x2 blocks, each ``N(0, Sigma)``.

    ``Sigma = (1 + gamma) I_4 - gamma 11^T``: unit variance, correlation ``-gamma`` between the
    four cells of a block (PyramidFlow's ``sample_block_noise``; sec. 3.2 "jump points").
    Sampled in closed form as ``p z + q (sum z) 1`` with ``z ~ N(0, I_4)``,
    ``p = sqrt(1 + gamma)``, ``q = (sqrt(1 - 3 gamma) - p) / 4`` (so that ``p**2 = 1 + gamma`` and
    ``2pq + 4q**2 = -gamma``); Sigma is a covariance only for ``gamma <= 1/3``. At gamma = 1/3 it
    is singular: each block sums to 0, so the noise carries nothing at the coarser scale.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or shape[-1] % 2 or shape[-2] % 2 or min(shape) < 1:
        raise ValueError(f"shape: got {shape}, expected (..., h, w) with even h and w")
    if not 0 <= gamma <= 1 / 3 + 1e-12:
        raise ValueError(f"gamma: got {gamma}, expected 0 <= gamma <= 1/3 (covariance must be PSD)")
    *lead, h, w = shape
    z = gaussian((*lead, h // 2, w // 2, 4), generator, device, torch.float32)
    p = math.sqrt(1.0 + gamma)
    q = (math.sqrt(max(0.0, 1.0 - 3.0 * gamma)) - p) / 4.0
    cells = p * z + q * z.sum(dim=-1, keepdim=True)
    # cells (..., h/2, w/2, [row, col]) -> (..., h/2, row, w/2, col) -> (..., h, w)
    cells = cells.unflatten(-1, (2, 2)).movedim(-2, -3).reshape(*lead, h, w)
    return cells.to(dtype=dtype or torch.float32)
