"""DINO ViT backbones for VBench's subject consistency, without a clone of the DINO repository.

VBench loads DINO with ``torch.hub.load(repo_or_dir=<local DINO clone>, model="dino_vitb16",
source="local", path=<checkpoint>, read_frame=...)``. The harness passes its own hub folder
(``dino_hub/hubconf.py``), whose ``dino_vitb16`` builds the network here and loads the
checkpoint named by ``path``. (The upstream hubconf ignores ``path`` and downloads the weights
into the torch hub cache, which fails offline.)

The network is timm's ``VisionTransformer``, whose parameter names equal DINO's
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}``, ``norm``), with DINO's position-embedding interpolation for inputs other than
the training size (VBench resizes the shorter side to 224 and keeps the aspect ratio) and DINO's
output: the final-norm CLS token. The architecture is read from the checkpoint: width from
``pos_embed``, patch size from ``patch_embed.proj``, depth from the blocks, MLP ratio from
``mlp.fc1``, heads = width / 64 (DINO's ViT-S/B use 64-wide heads).
"""

from __future__ import annotations

import math
import os
import re

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

HEAD_DIM = 64


def interpolate_position_embedding(pos_embed: torch.Tensor, grid_h: int, grid_w: int,
                                   square_input: bool) -> torch.Tensor:
    """DINO's ``interpolate_pos_encoding``: ``pos_embed`` (1, 1 + n*n, c) -> (1, 1 + gh*gw, c).

    The n x n patch grid is resized bicubically with scale factors ``(g + 0.1) / n`` (DINO's
    offset, which avoids floating-point rounding of the output size); returned unchanged for a
    square input of the training grid size.
    """
    n_patches = pos_embed.shape[1] - 1
    if n_patches == grid_h * grid_w and square_input:
        return pos_embed
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"pos_embed: got {n_patches} patch positions, expected a square grid")
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side),
                         mode="bicubic")
    if grid.shape[-2:] != (grid_h, grid_w):
        raise RuntimeError(f"interpolated grid {tuple(grid.shape[-2:])} != {(grid_h, grid_w)}")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


class DinoVisionTransformer(VisionTransformer):
    """timm ViT with DINO's position interpolation; ``forward(x (b, 3, h, w)) -> (b, c)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square = x.shape[-1] == x.shape[-2]
        # DINO's patch convolution drops a remainder of fewer than patch-size pixels
        grid = self.patch_embed.proj(x)  # (b, c, gh, gw)
        b, c, gh, gw = grid.shape
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), grid.flatten(2).transpose(1, 2)], 1)
        tokens = tokens + interpolate_position_embedding(self.pos_embed, gh, gw, square)
        return self.norm(self.blocks(tokens))[:, 0]


def build_from_state_dict(state: dict[str, torch.Tensor]) -> DinoVisionTransformer:
    try:
        dim = state["pos_embed"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        side = math.isqrt(state["pos_embed"].shape[1] - 1)
        depth = len({k for k in state if re.fullmatch(r"blocks\.\d+\.attn\.qkv\.weight", k)})
        mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
    except KeyError as e:
        raise ValueError(f"not a DINO ViT state dict: no {e.args[0]!r}") from None
    if dim % HEAD_DIM:
        raise ValueError(f"DINO ViT width {dim} is not a multiple of the head width {HEAD_DIM}")
    model = DinoVisionTransformer(
        img_size=patch * side, patch_size=patch, embed_dim=dim, depth=depth,
        num_heads=dim // HEAD_DIM, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0,
        global_pool="token",
    )
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_dino(path: str | os.PathLike) -> DinoVisionTransformer:
    """A DINO ViT from a published backbone checkpoint (a plain state dict, as
    ``dino_vitbase16_pretrain.pth``)."""
    return build_from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
