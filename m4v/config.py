"""Typed configuration of the M4V model and its presets.

The four ablation switches of the paper's architecture table live here, so an ablation grid is a
list of ``dataclasses.replace`` calls on one preset:

* ``registers``           learnable register token before every frame in the MM-DiM sequence;
* ``text_recomposition``  text both prepended and appended (True) or prepended only (False);
* ``mm_recomposition``    frames flattened in the layer's zigzag order (True) or raster order
                          (False);
* ``temporal_branch``     causal attention over frame-level tokens in parallel with the SSM.

``mixer="attention"`` swaps every MM-DiM block for a single-stream attention block of the same
width: the attention alternative used for FLOP and latency comparisons.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Mixer = Literal["mamba", "attention"]
_MIXERS = ("mamba", "attention")
_SCAN_BACKENDS = ("auto", "reference", "torch", "triton", "mamba_ssm")


@dataclass(frozen=True)
class M4VConfig:
    # latent video and patches
    in_channels: int = 16
    patch_size: int = 2
    # widths
    hidden_size: int = 1920
    num_heads: int = 30
    text_dim: int = 4096  # width of the per-token text embeddings (T5-XXL: 4096)
    pooled_dim: int = 768  # width of the pooled text vector (CLIP-L: 768)
    max_text_len: int = 128
    # two-stage hybrid backbone
    num_introducer_layers: int = 8  # L: MM-DiT dual-stream blocks
    num_core_layers: int = 16  # N: MM-DiM (or attention) single-stream blocks
    mlp_ratio: float = 4.0  # MM-DiM / attention block MLP; 0 disables it (introducer keeps 4)
    # Mamba mixer (Mamba-1)
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None  # None: ceil(hidden_size / 16), as in mamba-ssm
    scan_backend: str = "auto"
    # temporal branch
    temporal_dim: int = 8  # c: hidden width projected down before frames become single tokens
    temporal_heads: int = 1
    # pyramid: number of spatial stages (each halves the resolution of the previous)
    pyramid_stages: int = 3
    # ablation switches
    registers: bool = True
    text_recomposition: bool = True
    mm_recomposition: bool = True
    temporal_branch: bool = True
    mixer: Mixer = "mamba"

    def __post_init__(self) -> None:
        if self.mixer not in _MIXERS:
            raise ValueError(f"mixer: got {self.mixer!r}, expected one of {_MIXERS}")
        if self.scan_backend not in _SCAN_BACKENDS:
            raise ValueError(
                f"scan_backend: got {self.scan_backend!r}, expected one of {_SCAN_BACKENDS}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size: got {self.hidden_size}, "
                f"expected a multiple of num_heads={self.num_heads}"
            )
        if self.head_dim % 4:
            raise ValueError(
                f"head_dim: got {self.head_dim} (hidden_size / num_heads), "
                "expected a multiple of 4 "
                "so that 3D RoPE can split it into t, h, w parts"
            )
        for name in ("in_channels", "patch_size", "max_text_len", "d_state", "expand", "d_conv",
                     "temporal_dim", "temporal_heads", "pyramid_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: got {getattr(self, name)}, expected >= 1")
        if self.num_introducer_layers < 0 or self.num_core_layers < 0:
            raise ValueError("num_introducer_layers / num_core_layers: expected >= 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per token: C * p * p."""
        return self.in_channels * self.patch_size**2

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_size

    @property
    def dt_rank_value(self) -> int:
        return self.dt_rank if self.dt_rank is not None else -(-self.hidden_size // 16)

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Rotary dims for (t, h, w): a quarter of the head for time, the rest split evenly.

        Each part is even because rotations act on pairs.
        """
        hw = (self.head_dim - 2 * max(1, self.head_dim // 8)) // 2
        hw -= hw % 2
        return self.head_dim - 2 * hw, hw, hw

    def replace(self, **changes) -> M4VConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"config overrides: unknown fields {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    @staticmethod
    def preset(name: str) -> M4VConfig:
        if name not in PRESETS:
            raise ValueError(f"preset: got {name!r}, expected one of {sorted(PRESETS)}")
        return PRESETS[name]


PRESETS: dict[str, M4VConfig] = {
    # Trains on a 2-core CPU in minutes on the Shapes world (see m4v.data.shapes); its latent is
    # m4v.vae.PixelLatent (32x32 RGB -> 12 x 16 x 16 per frame), hence 12 channels.
    "tiny": M4VConfig(
        in_channels=12, hidden_size=64, num_heads=4, text_dim=64, pooled_dim=64,
        max_text_len=16, num_introducer_layers=1, num_core_layers=2, mlp_ratio=2.0,
        temporal_dim=4,
    ),
    # One GPU: a few hundred million parameters.
    "small": M4VConfig(
        hidden_size=768, num_heads=12, text_dim=768, pooled_dim=768, max_text_len=128,
        num_introducer_layers=2, num_core_layers=4,
    ),
    # The paper's scale: PyramidFlow miniFLUX geometry, 8 MM-DiT + 16 MM-DiM, width 1920.
    "m4v-2b": M4VConfig(),
    # The PyramidFlow-like baseline: the same with single-stream attention blocks.
    "attention-2b": M4VConfig(mixer="attention", temporal_branch=False, registers=False,
                              text_recomposition=False, mm_recomposition=False),
}
