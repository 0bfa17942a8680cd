"""Latent codecs: video (b, 3, T, H, W) in [-1, 1] <-> latent (b, C, t, h, w).

Every codec is an ``nn.Module`` with ``encode(video, sample=False)``, ``decode(latent)`` and the
attributes ``latent_channels``, ``spatial_factor``, ``temporal_factor``:

* ``PixelLatent``       parameter-free space-to-depth, the tiny CPU default (no training stage);
* ``CausalVAE3D``       the causal 3D VAE (8x8x8, 16 channels) trained with ``--stage vae``;
* ``DiffusersVideoVAE`` a published diffusers video autoencoder loaded from a local folder.
"""

from __future__ import annotations

from torch import nn

from m4v.vae.causal3d import CausalVAE3D, CausalVAE3DConfig, vae_loss
from m4v.vae.diffusers_adapter import DiffusersVideoVAE
from m4v.vae.pixel import PixelLatent

__all__ = [
    "CausalVAE3D",
    "CausalVAE3DConfig",
    "DiffusersVideoVAE",
    "PixelLatent",
    "load_codec",
    "vae_loss",
]

_SPEC_HELP = (
    "expected 'pixel' or 'pixel:<factor>', 'causal3d:<folder from CausalVAE3D.save_pretrained>', "
    "'causal3d-new:<preset>' (untrained, for VAE training) or 'diffusers:<folder>'"
)


def load_codec(spec: str) -> nn.Module:
    """Build a codec from a string spec, e.g. ``"pixel"``, ``"pixel:4"``, ``"causal3d:runs/vae"``,
    ``"causal3d-new:tiny"``, ``"diffusers:/weights/CogVideoX-2b/vae"``."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"spec: got {spec!r}, {_SPEC_HELP}")
    kind, _, arg = spec.partition(":")
    if kind == "pixel":
        if not arg:
            return PixelLatent()
        if not arg.isdigit():
            raise ValueError(f"spec: got {spec!r}, the pixel factor must be a positive integer")
        return PixelLatent(factor=int(arg))
    if kind == "causal3d" and arg:
        return CausalVAE3D.from_pretrained(arg)
    if kind == "causal3d-new" and arg:
        return CausalVAE3D(CausalVAE3DConfig.preset(arg))
    if kind == "diffusers" and arg:
        return DiffusersVideoVAE.from_folder(arg)
    raise ValueError(f"spec: got {spec!r}, {_SPEC_HELP}")
