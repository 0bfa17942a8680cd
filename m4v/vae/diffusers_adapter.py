"""Published video autoencoders (diffusers format, local folder) behind the codec interface.

Users who start from released VAE weights (CogVideoX, HunyuanVideo, Wan, LTX-Video, Mochi) copy
the autoencoder folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, i.e. the
``vae/`` folder of a diffusers pipeline) to the machine; nothing is downloaded. The class is
picked from ``config.json``'s ``_class_name``.

Latent normalisation follows each model's own pipeline, written as one rule:
``latent = (z - mean) * scaling_factor / std``, where mean/std are the per-channel
``latents_mean``/``latents_std`` (config entries for Wan and Mochi, buffers for LTX) when the
model has them, else ``shift_factor`` and 1; ``scaling_factor`` defaults to 1 (Wan has none).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from m4v.vae.checks import check_latent, check_video

SUPPORTED_CLASSES = (
    "AutoencoderKLCogVideoX",
    "AutoencoderKLHunyuanVideo",
    "AutoencoderKLWan",
    "AutoencoderKLLTXVideo",
    "AutoencoderKLMochi",
)


class DiffusersVideoVAE(nn.Module):
    """Wraps a diffusers video autoencoder: video (b, 3, 1 + f_t k, H, W) in [-1, 1] <->
    normalised latent (b, C, 1 + k, H / f_s, W / f_s). Parameters are frozen (gradients still flow
    to the latent through ``decode``, as reward fine-tuning needs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        name = type(model).__name__
        if name not in SUPPORTED_CLASSES:
            raise ValueError(f"model: got a {name}, expected one of {SUPPORTED_CLASSES}")
        self.model = model.eval().requires_grad_(False)
        cfg = model.config
        self._spatial, self._temporal = _compression(model)
        self._channels = int(cfg.get("latent_channels") or cfg.get("z_dim"))
        mean, std = _latent_stats(model, self._channels)
        self.register_buffer("latents_mean", mean.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", std.view(1, -1, 1, 1, 1), persistent=False)
        scaling = cfg.get("scaling_factor")
        self.scaling_factor = 1.0 if scaling is None else float(scaling)

    @classmethod
    def from_folder(
        cls, path: str | os.PathLike, dtype: torch.dtype | None = None, tiling: bool = False
    ) -> DiffusersVideoVAE:
        """Load from a local diffusers autoencoder folder (or a pipeline folder with ``vae/``).

        ``tiling=True`` turns on the model's own tiled encode/decode (less memory at high res).
        """
        folder = _resolve_folder(Path(path))
        raw = json.loads((folder / "config.json").read_text())
        name = raw.get("_class_name")
        if name not in SUPPORTED_CLASSES:
            raise ValueError(
                f"{folder / 'config.json'}: _class_name is {name!r}, "
                f"expected one of {SUPPORTED_CLASSES}"
            )
        import diffusers

        kwargs = {} if dtype is None else {"torch_dtype": dtype}
        model = getattr(diffusers, name).from_pretrained(str(folder), **kwargs)
        if tiling:
            model.enable_tiling()
        return cls(model)

    @property
    def latent_channels(self) -> int:
        return self._channels

    @property
    def spatial_factor(self) -> int:
        return self._spatial

    @property
    def temporal_factor(self) -> int:
        return self._temporal

    def encode(
        self, video: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normalised latent of ``video``: the posterior mean, or a sample of it."""
        check_video(video, 3, self.spatial_factor, self.temporal_factor)
        dist = self.model.encode(video.to(self.model.dtype)).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return (z - self.latents_mean.to(z)) * self.scaling_factor / self.latents_std.to(z)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent (b, C, t, h, w) -> video (b, 3, 1 + f_t (t - 1), h f_s, w f_s)."""
        check_latent(latent, self.latent_channels)
        z = latent.to(self.model.dtype)
        z = z * self.latents_std.to(z) / self.scaling_factor + self.latents_mean.to(z)
        return self.model.decode(z).sample


def _resolve_folder(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    what = "does not exist" if not path.exists() else "has no config.json (nor vae/config.json)"
    raise FileNotFoundError(
        f"diffusers VAE folder {str(path)!r} {what}. Put a diffusers video autoencoder there: "
        "config.json (with _class_name, one of " + ", ".join(SUPPORTED_CLASSES) + ") and "
        "diffusion_pytorch_model.safetensors, e.g. the vae/ folder of a diffusers pipeline "
        "(CogVideoX, HunyuanVideo, Wan, LTX-Video) copied to this machine."
    )


def _compression(model: nn.Module) -> tuple[int, int]:
    """(spatial, temporal) compression, from the architecture where a config field could disagree
    with it, else from the ratios the model computes itself."""
    cfg, name = model.config, type(model).__name__
    if name == "AutoencoderKLCogVideoX":
        return 2 ** (len(cfg.block_out_channels) - 1), int(cfg.temporal_compression_ratio)
    if name == "AutoencoderKLWan":
        down = list(cfg.temperal_downsample)
        return 2 ** len(down) * int(cfg.get("patch_size") or 1), 2 ** sum(bool(d) for d in down)
    return int(model.spatial_compression_ratio), int(model.temporal_compression_ratio)


def _latent_stats(model: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) the model's pipeline normalises with."""
    cfg = model.config
    buffers = dict(model.named_buffers(recurse=False))
    mean, std = buffers.get("latents_mean"), buffers.get("latents_std")
    if mean is None:
        mean = cfg.get("latents_mean")
        std = cfg.get("latents_std")
    if mean is None or std is None:
        shift = cfg.get("shift_factor") or 0.0
        return torch.full((channels,), float(shift)), torch.ones(channels)
    mean = torch.as_tensor(mean, dtype=torch.float32).detach().clone().flatten()
    std = torch.as_tensor(std, dtype=torch.float32).detach().clone().flatten()
    if mean.numel() != channels or std.numel() != channels:
        raise ValueError(
            f"latents_mean / latents_std: got {mean.numel()} / {std.numel()} values, "
            f"expected {channels} (one per latent channel)"
        )
    return mean, std
