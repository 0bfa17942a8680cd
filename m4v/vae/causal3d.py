"""Causal 3D video VAE: 8x8x8 compression (space 8, time 8), 16 latent channels.

Shape contract: video (b, 3, T, H, W) in [-1, 1] with T = 1 + 8k and H, W divisible by 8
<-> latent (b, 16, 1 + k, H/8, W/8). Latent frame 0 encodes video frame 0 alone; latent frame j >= 1
encodes video frames 8j-7 .. 8j, so an image is a one-frame video.

Design choices that the rest of the code relies on:

* **Causal in time.** Every convolution pads time on the past side only (replicating the first
  frame); temporal downsampling is a stride-2 causal convolution mapping 1 + 2m frames to 1 + m,
  and temporal upsampling repeats each frame twice and drops the first copy (1 + m -> 1 + 2m).
  Hence latent frame j depends only on video frames <= 8j, and decoded frame t only on latent
  frames <= ceil(t / 8).
* **Norms are per pixel** (RMS over channels, as in Wan's VAE), and there is no spatial
  self-attention. Every output value therefore depends on a bounded spatio-temporal neighbourhood,
  which is what makes the tiled and chunked decodes below exact instead of approximate.
* **Chunked encode and decode are exact** by carrying the causal-convolution cache between
  chunks: each causal convolution keeps the last k_t - s_t frames of its input (kernel minus
  stride) and uses them as the past padding of the next chunk, so chunk-by-chunk processing
  performs the same arithmetic as one pass (chunks after the first hold whole groups of 8 frames).
* **Tiled decode** cuts space into tiles decoded with extra context and cross-fades neighbours
  (see ``CausalVAE3D.tiled_decode``); it equals plain decode once the context covers the decoder's
  receptive radius (``CausalVAE3D.decoder_receptive_radius``).

The latent handed to the diffusion model is normalised: ``(mean - shift_factor) * scaling_factor``;
both factors are buffers saved with the weights and set from data by ``calibrate_latent_scaling``
after VAE training. Training loss: ``vae_loss`` (L1 reconstruction + a small KL term; no LPIPS
or GAN term).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from m4v.vae.checks import check_latent, check_video

Cache = dict  # causal-conv cache for chunked decoding: module -> past frames (or a started flag)

_LOGVAR_RANGE = (-30.0, 20.0)


@dataclass(frozen=True)
class CausalVAE3DConfig:
    in_channels: int = 3
    latent_channels: int = 16
    # One width per resolution level; each step between levels halves T (causally), H and W, so
    # 4 widths give the 8x8x8 compression.
    widths: tuple[int, ...] = (64, 128, 256, 256)
    layers_per_block: int = 2  # residual blocks per encoder level (the decoder uses one more)
    kl_weight: float = 1e-4  # weight of the KL term per latent element, against per-pixel L1
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.widths or min(self.widths) < 1:
            raise ValueError(
                f"widths: got {self.widths}, expected a non-empty tuple of positive ints"
            )
        for name in ("in_channels", "latent_channels", "layers_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected >= 1")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight: got {self.kl_weight}, expected >= 0")

    @property
    def factor(self) -> int:
        """Compression in each of T, H, W."""
        return 2 ** (len(self.widths) - 1)

    @staticmethod
    def preset(name: str) -> CausalVAE3DConfig:
        presets = {
            "small": CausalVAE3DConfig(),
            "tiny": CausalVAE3DConfig(widths=(8, 16, 16, 16), layers_per_block=1),
        }
        if name not in presets:
            raise ValueError(f"preset: got {name!r}, expected one of {sorted(presets)}")
        return presets[name]


class ChannelRMSNorm(nn.Module):
    """RMS norm over the channels of each (t, h, w) position: x (b, c, t, h, w)."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(dim=1, keepdim=True) + self.eps)
        return (x * scale).to(x.dtype) * self.weight.view(1, -1, 1, 1, 1)


class CausalConv3d(nn.Module):
    """3D convolution padded in time on the past side only; zero padding in space.

    With a ``cache``, the past padding of a later chunk is the previous chunk's last
    k_t - s_t input frames (s_t: temporal stride), which makes chunked processing equal to
    processing at once, provided every chunk after the first has a multiple of s_t frames.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.kt, self.st = kernel, stride
        self.conv = nn.Conv3d(
            cin, cout, kernel, stride=stride, padding=(0, kernel // 2, kernel // 2)
        )

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        if self.kt == 1:
            return self.conv(x)
        past = None if cache is None else cache.get(self)
        if past is None:
            past = x[:, :, :1].expand(-1, -1, self.kt - 1, -1, -1)
        x = torch.cat([past, x], dim=2)
        if cache is not None:
            # Not detached: gradients must flow across chunks (reward fine-tuning decodes this way).
            cache[self] = x[:, :, x.shape[2] - (self.kt - self.st) :]
        return self.conv(x)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.norm1 = ChannelRMSNorm(cin, eps)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = ChannelRMSNorm(cout, eps)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halves T causally (1 + 2m -> 1 + m: output j sees frames 2j-2..2j), H and W."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, kernel=3, stride=2)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return self.conv(x, cache)


class Upsample(nn.Module):
    """Doubles T causally (1 + m -> 1 + 2m: each frame twice, the first copy of frame 0 dropped),
    H and W."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x = x.repeat_interleave(2, dim=2)
        first_chunk = cache is None or (self, "started") not in cache
        if first_chunk:
            x = x[:, :, 1:]
        if cache is not None:
            cache[(self, "started")] = True
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x, cache)


class Encoder(nn.Module):
    def __init__(self, cfg: CausalVAE3DConfig):
        super().__init__()
        w, eps = cfg.widths, cfg.norm_eps
        self.conv_in = CausalConv3d(cfg.in_channels, w[0])
        self.levels = nn.ModuleList()
        prev = w[0]
        for i, width in enumerate(w):
            level = nn.ModuleList()
            for _ in range(cfg.layers_per_block):
                level.append(ResBlock(prev, width, eps))
                prev = width
            if i < len(w) - 1:
                level.append(Downsample(width))
            self.levels.append(level)
        self.mid = ResBlock(prev, prev, eps)
        self.norm_out = ChannelRMSNorm(prev, eps)
        self.conv_out = CausalConv3d(prev, 2 * cfg.latent_channels)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """(b, 3, 1 + f*k, H, W) -> (b, 2 * latent, 1 + k, H/f, W/f): mean and logvar stacked.
        With a cache, a later chunk of f*k frames gives k latent frames."""
        x = self.conv_in(x, cache)
        for level in self.levels:
            for layer in level:
                x = layer(x, cache)
        x = self.mid(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class Decoder(nn.Module):
    def __init__(self, cfg: CausalVAE3DConfig):
        super().__init__()
        w, eps = cfg.widths, cfg.norm_eps
        # Spatial receptive radius in latent pixels, summed while building: a 3x3 convolution at
        # upsampled resolution 2^s reaches 1 / 2^s latent pixels.
        radius, scale = 0.0, 1
        self.conv_in = CausalConv3d(cfg.latent_channels, w[-1])
        self.mid = ResBlock(w[-1], w[-1], eps)
        radius += 3
        self.levels = nn.ModuleList()
        prev = w[-1]
        for i in reversed(range(len(w))):
            level = nn.ModuleList()
            for _ in range(cfg.layers_per_block + 1):
                level.append(ResBlock(prev, w[i], eps))
                prev = w[i]
                radius += 2 / scale
            if i > 0:
                level.append(Upsample(w[i]))
                scale *= 2
                radius += 1 / scale
            self.levels.append(level)
        self.norm_out = ChannelRMSNorm(prev, eps)
        self.conv_out = CausalConv3d(prev, cfg.in_channels)
        radius += 1 / scale
        self.receptive_radius = math.ceil(radius)

    def forward(self, z: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        """(b, latent, t, h, w) -> (b, 3, 1 + f*(t-1), h*f, w*f); with a cache, a later chunk of t
        latent frames gives f*t video frames."""
        x = self.mid(self.conv_in(z, cache), cache)
        for level in self.levels:
            for layer in level:
                x = layer(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class CausalVAE3D(nn.Module):
    """Causal 3D VAE with a diagonal Gaussian posterior (see the module docstring)."""

    def __init__(self, config: CausalVAE3DConfig | None = None):
        super().__init__()
        self.config = config or CausalVAE3DConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("latent_shift", torch.zeros(()))

    # -- codec interface --------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def spatial_factor(self) -> int:
        return self.config.factor

    @property
    def temporal_factor(self) -> int:
        return self.config.factor

    @property
    def scaling_factor(self) -> float:
        return float(self.latent_scale)

    @property
    def shift_factor(self) -> float:
        return float(self.latent_shift)

    @property
    def decoder_receptive_radius(self) -> int:
        """Latent pixels beyond which a latent value cannot influence a decoded pixel."""
        return self.decoder.receptive_radius

    def posterior(
        self, video: torch.Tensor, chunk: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """video (b, 3, 1 + 8k, H, W) -> mean, logvar (b, 16, 1 + k, H/8, W/8), unnormalised.

        ``chunk``: encode ``chunk`` latent frames at a time (video frames 0 .. 8(chunk-1), then
        8*chunk per step), carrying the causal-convolution cache: exact, with activation memory
        bounded by the chunk instead of the clip. None: the whole clip at once.
        """
        check_video(video, self.config.in_channels, self.spatial_factor, self.temporal_factor)
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk: got {chunk}, expected a positive number of latent frames")
        if chunk is None:
            moments = self.encoder(video)
        else:
            f, cache = self.temporal_factor, {}
            bounds = [0, *range(1 + f * (chunk - 1), video.shape[2], f * chunk), video.shape[2]]
            moments = torch.cat(
                [
                    self.encoder(video[:, :, a:b], cache)
                    for a, b in zip(bounds[:-1], bounds[1:], strict=True)
                ],
                dim=2,
            )
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*_LOGVAR_RANGE)

    def encode(
        self,
        video: torch.Tensor,
        sample: bool = False,
        generator: torch.Generator | None = None,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Normalised latent (b, 16, 1 + k, H/8, W/8): the posterior mean, or a sample of it.
        ``chunk``: see ``posterior``."""
        mean, logvar = self.posterior(video, chunk)
        z = _sample(mean, logvar, generator) if sample else mean
        return (z - self.latent_shift) * self.latent_scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent (b, 16, t, h, w) -> video (b, 3, 1 + 8(t-1), 8h, 8w), unclamped."""
        check_latent(latent, self.latent_channels)
        return self.decoder(self._denormalise(latent))

    def tiled_decode(
        self, latent: torch.Tensor, tile: int | None = 32, overlap: int = 8, chunk: int | None = 4
    ) -> torch.Tensor:
        """Decode with bounded memory: spatial tiles and temporal chunks.

        Space is cut into near-equal tiles of at most ``tile`` x ``tile`` latent pixels (None: one
        tile). Each is decoded with ``overlap`` latent pixels of its neighbours' context on every
        side; across each tile boundary the two decodes are cross-faded linearly over a band of
        ``overlap`` latent pixels centred on the boundary, so no value within ``overlap / 2`` of
        a decoded region's border (where zero padding distorts it) is used. The result equals
        ``decode`` up to float rounding once ``overlap >= 2 * decoder_receptive_radius``; smaller
        overlaps save memory at the cost of small errors confined to the seams.

        Time is decoded ``chunk`` latent frames at a time (None: all at once), carrying the
        causal-convolution cache between chunks: exact.
        Peak activation memory scales with (tile + 2 overlap)^2 * chunk instead of h * w * t.
        """
        check_latent(latent, self.latent_channels)
        if tile is not None and tile < 1:
            raise ValueError(
                f"tile: got {tile}, expected a positive number of latent pixels or None"
            )
        if tile is not None and not 0 <= overlap <= tile // 2:
            raise ValueError(
                f"overlap: got {overlap}, expected 0 <= overlap <= tile // 2 = {tile // 2}"
            )
        if chunk is not None and chunk < 1:
            raise ValueError(
                f"chunk: got {chunk}, expected a positive number of latent frames or None"
            )
        z = self._denormalise(latent)
        b, _, t, h, w = z.shape
        f = self.spatial_factor
        out = z.new_zeros(
            b, self.config.in_channels, 1 + self.temporal_factor * (t - 1), h * f, w * f
        )
        for ys, ye, yw in _tile_plan(h, tile, overlap, f):
            for xs, xe, xw in _tile_plan(w, tile, overlap, f):
                weight = (yw[:, None] * xw[None, :]).to(out)
                cache: Cache = {}
                frame = 0
                for cs in range(0, t, chunk or t):
                    part = self.decoder(z[:, :, cs : cs + (chunk or t), ys:ye, xs:xe], cache)
                    n = part.shape[2]
                    out[:, :, frame : frame + n, ys * f : ye * f, xs * f : xe * f] += part * weight
                    frame += n
        return out

    def _denormalise(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.latent_scale + self.latent_shift

    # -- latent statistics ------------------------------------------------------------------
    @torch.no_grad()
    def calibrate_latent_scaling(self, videos: Iterable[torch.Tensor]) -> tuple[float, float]:
        """Set shift/scale so that encoded ``videos`` (an iterable of batches) have zero mean and
        unit std; returns (scaling_factor, shift_factor)."""
        total, sq, count = 0.0, 0.0, 0
        for video in videos:
            mean, _ = self.posterior(video)
            total += mean.double().sum().item()
            sq += mean.double().pow(2).sum().item()
            count += mean.numel()
        if count == 0:
            raise ValueError("videos: got no batches, expected at least one video batch")
        mu = total / count
        std = math.sqrt(max(sq / count - mu * mu, 1e-12))
        self.latent_shift.fill_(mu)
        self.latent_scale.fill_(1.0 / std)
        return self.scaling_factor, self.shift_factor

    # -- persistence ------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``folder`` (each atomically)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"_class_name": type(self).__name__, **dataclasses.asdict(self.config)}
        _atomic_write(
            folder / "config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2))
        )
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        _atomic_write(folder / "model.safetensors", lambda p: save_file(state, str(p)))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, map_location: str = "cpu") -> CausalVAE3D:
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path, weights_path = folder / "config.json", folder / "model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"causal3d VAE folder {str(folder)!r}: expected config.json and model.safetensors "
                "there, as written by CausalVAE3D.save_pretrained (e.g. after `--stage vae` "
                "training)"
            )
        raw = json.loads(config_path.read_text())
        raw.pop("_class_name", None)
        model = cls(CausalVAE3DConfig(**raw))
        model.load_state_dict(load_file(str(weights_path), device=map_location))
        return model


def vae_loss(vae: CausalVAE3D, video: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of ``--stage vae``: video (b, 3, 1 + 8k, H, W) in [-1, 1].

    loss = mean |x - D(z)| + kl_weight * mean KL(q(z|x) || N(0, I)), z ~ q(z|x) by
    reparameterisation; both means are per element (pixel value / latent value).
    """
    mean, logvar = vae.posterior(video)
    recon = vae.decoder(_sample(mean, logvar))
    l1 = (recon - video).abs().mean()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = l1 + vae.config.kl_weight * kl
    with torch.no_grad():
        mse = F.mse_loss(recon, video)
    logs = {
        "loss": loss.item(),
        "l1": l1.item(),
        "kl": kl.item(),
        "mse": mse.item(),
        "psnr": (10 * torch.log10(4.0 / mse.clamp_min(1e-12))).item(),
    }
    return loss, logs


def _sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None):
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise


def _tile_plan(n: int, tile: int | None, overlap: int, f: int):
    """Tiles along one latent axis of length ``n``: (start, end) of each decoded region (core plus
    ``overlap`` of context, clipped) and the blending weights (f * (end - start),) of its pixels.

    Weights ramp linearly across a band of ``overlap`` latent pixels centred on each interior core
    boundary; neighbouring ramps are complementary, so the weights sum to one at every pixel.
    """
    count = 1 if tile is None else -(-n // tile)
    edges = [round(i * n / count) for i in range(count + 1)]
    half = overlap * f / 2
    plan = []
    for c0, c1 in zip(edges[:-1], edges[1:], strict=True):
        start, end = max(0, c0 - overlap), min(n, c1 + overlap)
        centre = torch.arange(start * f, end * f, dtype=torch.float64) + 0.5
        weight = torch.ones_like(centre)
        if c0 > 0:
            weight *= _ramp(centre - c0 * f, half)
        if c1 < n:
            weight *= _ramp(c1 * f - centre, half)
        plan.append((start, end, weight))
    return plan


def _ramp(distance: torch.Tensor, half: float) -> torch.Tensor:
    """0 at ``-half`` (outside the core), 1 at ``+half`` (inside); a step when ``half`` is 0."""
    if half == 0:
        return (distance > 0).double()
    return ((distance + half) / (2 * half)).clamp(0, 1)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
