"""M4V: the whole model.

    frames (history at pyramid resolutions + current noisy frame), sigma, text, pooled text
      -> patchify (2x2) -> L x MM-DiT introducer (dual-stream joint attention)
      -> N x MM-DiM core (re-composed sequence, zigzag Mamba, registers, temporal branch)
      -> final adaLN + linear on the current frame's tokens -> unpatchify -> velocity (b, C, h, w)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from m4v.config import M4VConfig
from m4v.model.blocks import MMDiMBlock, MMDiTBlock
from m4v.model.embeddings import ClipLayout, MLPEmbedder, TimestepEmbedder, patchify, unpatchify
from m4v.model.layers import AdaLN
from m4v.model.rope import rope_cos_sin
from m4v.ops.modulation import layer_norm_modulate


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch_dim: int):
        super().__init__()
        self.mod = AdaLN(hidden, 2)
        self.linear = nn.Linear(hidden, patch_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.mod(c)
        return self.linear(layer_norm_modulate(x, shift, scale))


class M4V(nn.Module):
    def __init__(self, cfg: M4VConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.patch_dim, d)
        self.context_embedder = nn.Linear(cfg.text_dim, d)
        self.t_embedder = TimestepEmbedder(d)
        self.pooled_embedder = MLPEmbedder(cfg.pooled_dim, d)
        self.introducer = nn.ModuleList(MMDiTBlock(cfg) for _ in range(cfg.num_introducer_layers))
        self.core = nn.ModuleList(MMDiMBlock(cfg, i) for i in range(cfg.num_core_layers))
        self.final = FinalLayer(d, cfg.patch_dim)
        self.gradient_checkpointing = False

    def forward(self, frames: list[Tensor], frame_ids: list[int], sigma: Tensor, text: Tensor,
                text_mask: Tensor, pooled: Tensor) -> Tensor:
        """Velocity of the current (last) frame.

        Args:
            frames: n tensors (b, C, h_i, w_i) in time order: history frames at their pyramid
                resolutions, then the current noisy frame.
            frame_ids: latent frame index of each frame (strictly increasing), for RoPE's t axis.
            sigma: (b,) noise level of the current frame in [0, 1].
            text: (b, Lt, text_dim), Lt <= max_text_len; text_mask: (b, Lt) bool, True = real.
            pooled: (b, pooled_dim).
        Returns:
            (b, C, h_n, w_n) float32.
        """
        txt, video, c, layout = self.backbone(frames, frame_ids, sigma, text, text_mask, pooled)
        h, w = frames[-1].shape[-2:]
        out = self.final(video[:, layout.frame_offsets[-1]:], c)
        return unpatchify(out, self.cfg.patch_size, self.cfg.in_channels, h, w).float()

    def backbone(self, frames, frame_ids, sigma, text, text_mask, pooled):
        """Embeddings and all blocks.

        Returns (text (b, max_text_len, d), video (b, Lv, d), c, layout)."""
        layout = self.check_inputs(frames, frame_ids, sigma, text, text_mask, pooled)
        cfg = self.cfg
        pad = cfg.max_text_len - text.shape[1]  # text always fills the fixed prepend length
        text = nn.functional.pad(text, (0, 0, 0, pad))
        text_mask = nn.functional.pad(text_mask, (0, pad), value=False)

        video = self.x_embedder(torch.cat([patchify(f, cfg.patch_size) for f in frames], dim=1))
        txt = self.context_embedder(text)
        c = self.t_embedder(sigma) + self.pooled_embedder(pooled)
        rope = rope_cos_sin(layout, cfg.rope_axes, video.device)
        for block in [*self.introducer, *self.core]:
            if self.gradient_checkpointing and self.training:
                txt, video = checkpoint(block, txt, video, c, layout, rope, text_mask,
                                        use_reentrant=False)
            else:
                txt, video = block(txt, video, c, layout, rope, text_mask)
        return txt, video, c, layout

    def check_inputs(self, frames, frame_ids, sigma, text, text_mask, pooled) -> ClipLayout:
        cfg = self.cfg
        if not isinstance(frames, (list, tuple)) or not frames:
            raise ValueError("frames: expected a non-empty list of (b, C, h, w) tensors")
        b = frames[0].shape[0]
        for i, f in enumerate(frames):
            if f.dim() != 4 or f.shape[0] != b or f.shape[1] != cfg.in_channels:
                raise ValueError(f"frames[{i}]: got shape {tuple(f.shape)}, expected "
                                 f"({b}, {cfg.in_channels}, h, w)")
            if f.shape[2] % cfg.patch_size or f.shape[3] % cfg.patch_size:
                raise ValueError(f"frames[{i}]: got size {tuple(f.shape[2:])}, expected h and w "
                                 f"divisible by patch_size={cfg.patch_size}")
        if len(frame_ids) != len(frames):
            raise ValueError(f"frame_ids: got {len(frame_ids)} ids, expected one per frame "
                             f"({len(frames)})")
        ids = [int(i) for i in frame_ids]
        if any(b2 <= a for a, b2 in zip(ids, ids[1:], strict=False)):
            raise ValueError(f"frame_ids: got {ids}, expected strictly increasing")
        if tuple(sigma.shape) != (b,):
            raise ValueError(f"sigma: got shape {tuple(sigma.shape)}, expected ({b},)")
        if text.dim() != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim:
            raise ValueError(f"text: got shape {tuple(text.shape)}, expected ({b}, Lt, "
                             f"{cfg.text_dim})")
        if text.shape[1] > cfg.max_text_len:
            raise ValueError(f"text: got {text.shape[1]} tokens, expected at most "
                             f"max_text_len={cfg.max_text_len}")
        if tuple(text_mask.shape) != tuple(text.shape[:2]) or text_mask.dtype != torch.bool:
            raise ValueError(f"text_mask: got {text_mask.dtype} {tuple(text_mask.shape)}, "
                             f"expected bool {tuple(text.shape[:2])}")
        if tuple(pooled.shape) != (b, cfg.pooled_dim):
            raise ValueError(f"pooled: got shape {tuple(pooled.shape)}, expected "
                             f"({b}, {cfg.pooled_dim})")
        p = cfg.patch_size
        # int(): under TorchScript tracing shapes are tensors; the layout must stay plain ints
        sizes = tuple((int(f.shape[2]) // p, int(f.shape[3]) // p) for f in frames)
        return ClipLayout(cfg.max_text_len, sizes, tuple(ids))
