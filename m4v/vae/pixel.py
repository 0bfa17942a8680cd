"""The parameter-free latent space of the tiny CPU default: per-frame space-to-depth.

Why: the embedded default (the Shapes world, 8 frames of 32x32) must train from scratch on a
2-core CPU in minutes. A learned VAE would need its own pre-training stage and would add its
reconstruction error to every metric; ``pixel_unshuffle`` costs nothing, is exactly invertible,
and still gives the diffusion model a smaller grid with more channels per cell (32x32 RGB ->
12 x 16 x 16 per frame at ``factor=2``), which is the shape of problem a latent video model solves.
There is no temporal compression: every video frame is one latent frame.

Scale: Shapes-world colours are corners of the RGB cube, so every value is exactly +-1 and the
latent already has unit scale (measured on 64 default clips: mean -0.03, std 1.00); the default
``scale=1.0`` leaves values untouched. ``scale``/``shift`` exist for other data:
latent = (pixels - shift) * scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m4v.vae.checks import check_latent, check_video


class PixelLatent(nn.Module):
    """Space-to-depth latent: video (b, 3, T, H, W) <-> latent (b, 3 * f * f, T, H / f, W / f)."""

    temporal_factor = 1

    def __init__(self, factor: int = 2, channels: int = 3, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        if factor < 1:
            raise ValueError(f"factor: got {factor}, expected >= 1")
        if channels < 1:
            raise ValueError(f"channels: got {channels}, expected >= 1")
        if scale == 0:
            raise ValueError(
                "scale: got 0, expected a non-zero number (the map must be invertible)"
            )
        self.factor = factor
        self.channels = channels
        self.scale = float(scale)
        self.shift = float(shift)

    @property
    def latent_channels(self) -> int:
        return self.channels * self.factor**2

    @property
    def spatial_factor(self) -> int:
        return self.factor

    def encode(self, video: torch.Tensor, sample: bool = False) -> torch.Tensor:
        """(b, c, T, H, W) -> (b, c f^2, T, H/f, W/f). ``sample`` is accepted for interface parity
        with the VAE and ignored: the map is deterministic."""
        check_video(video, self.channels, self.spatial_factor, self.temporal_factor)
        b, c, t, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)
        z = F.pixel_unshuffle(frames, self.factor)
        z = z.reshape(b, t, -1, h // self.factor, w // self.factor).transpose(1, 2)
        return (z - self.shift) * self.scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """(b, c f^2, t, h, w) -> (b, c, t, h f, w f), the exact inverse of ``encode``."""
        check_latent(latent, self.latent_channels)
        b, c, t, h, w = latent.shape
        z = latent / self.scale + self.shift
        frames = F.pixel_shuffle(z.transpose(1, 2).reshape(b * t, c, h, w), self.factor)
        return frames.reshape(b, t, self.channels, h * self.factor, w * self.factor).transpose(1, 2)

    def extra_repr(self) -> str:
        return (
            f"factor={self.factor}, channels={self.channels}, scale={self.scale}, "
            f"shift={self.shift}"
        )
