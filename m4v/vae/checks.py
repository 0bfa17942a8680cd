"""Input checks shared by the latent codecs: shapes that a codec cannot encode give a ValueError
naming the argument, the value it got and what it expects."""

from __future__ import annotations

import torch


def check_video(
    video: torch.Tensor,
    channels: int,
    spatial_factor: int,
    temporal_factor: int,
    name: str = "video",
) -> None:
    """Video (b, channels, T, H, W) float with H, W divisible by ``spatial_factor`` and, for codecs
    that compress time causally, T = 1 + temporal_factor * k."""
    if not isinstance(video, torch.Tensor) or not video.is_floating_point():
        raise ValueError(
            f"{name}: expected a float tensor (b, {channels}, T, H, W), got {_describe(video)}"
        )
    if video.ndim != 5 or video.shape[1] != channels:
        raise ValueError(
            f"{name}: got shape {tuple(video.shape)}, expected (b, {channels}, T, H, W)"
        )
    t, h, w = video.shape[2:]
    if temporal_factor > 1 and (t - 1) % temporal_factor:
        raise ValueError(
            f"{name}: got {t} frames, expected 1 + {temporal_factor}*k frames "
            f"(the first frame is encoded alone, then groups of {temporal_factor})"
        )
    if h % spatial_factor or w % spatial_factor:
        raise ValueError(
            f"{name}: got H x W = {h} x {w}, expected both divisible by {spatial_factor}"
        )


def check_latent(latent: torch.Tensor, channels: int, name: str = "latent") -> None:
    if not isinstance(latent, torch.Tensor) or not latent.is_floating_point():
        raise ValueError(
            f"{name}: expected a float tensor (b, {channels}, t, h, w), got {_describe(latent)}"
        )
    if latent.ndim != 5 or latent.shape[1] != channels:
        raise ValueError(
            f"{name}: got shape {tuple(latent.shape)}, expected (b, {channels}, t, h, w)"
        )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
